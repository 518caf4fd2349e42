//! The owner console: web pages, served by the same process on their own address
//! (`console_listen`), where data owners decide approval requests and watch their tables'
//! use, and analysts follow their own requests.
//!
//! ```text
//! session     sign-in with the users file, the session cookie, CSRF tokens, who is an owner
//! requests    pending and decided requests, one request's SQL, plan and explanation, decisions
//! activity    the audit trail (filtered, with the chain's status) and its hourly chart
//! policy      per table: who may do what (casbin), entity key, k, wiped columns, row filters
//! mine        the analyst's view: their own requests and their access
//! assets      htmx and the style sheet, embedded in the binary
//! serve       the listener: HTTP/1.1, or TLS with the Flight endpoint's certificate
//! ```
//!
//! What it guarantees: the console shows requests, plans, audit records and policy, never
//! table data; every decision goes through the same code as the Flight actions
//! (`flight::approvals::handle`: the same authorisation, the same audit record). An owner
//! sees only what touches a table they hold `approve` or `admin` on (service admins see
//! everything); an analyst sees only their own requests and gets 403 on owner pages.
//! Every state-changing request is a POST that passes the Origin/Sec-Fetch-Site check
//! (tower-http's CSRF layer) and carries the session's CSRF token.

mod activity;
mod assets;
mod chart;
mod error;
mod mine;
mod policy;
mod requests;
mod serve;
mod session;
mod store;
mod views;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::routing::{get, post};
use datafusion::execution::SessionState;
use parking_lot::Mutex;
use tower_http::csrf::CsrfLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_sessions::SessionManagerLayer;
use tower_sessions::cookie::SameSite;

use crate::auth::Principal;
use crate::config::TableName;
use crate::server::Airlock;
use crate::session::Sessions;

pub use error::Error;
pub use serve::{Error as ServeError, Listener, bind, run};

/// The session cookie's name.
pub const COOKIE: &str = "airlock_console";

/// Longest a console request may take (the row count of a request runs its query).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest request body: sign-in, decisions and their reasons.
pub const BODY_LIMIT: usize = 16 * 1024;

/// How long a computed "rows it would release" stays in the list.
const ROWS_TTL: Duration = Duration::from_secs(60);

/// Content Security Policy: scripts and styles only from this origin (no inline code),
/// no framing, forms post only here.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Everything the console's handlers share.
#[derive(Debug)]
pub struct Console {
    airlock: Arc<Airlock>,
    /// Served over TLS: the cookie is `Secure` and HSTS is sent.
    secure: bool,
    /// Request id → when counted and how many rows approving it would release.
    rows: Mutex<HashMap<String, (Instant, Option<u64>)>>,
    /// Parses audit SQL to learn which tables a record touches (no catalog needed).
    parser: SessionState,
    sql_tables: Mutex<HashMap<String, Vec<TableName>>>,
}

/// What one principal may see in the console: the tables they own, or everything.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// `admin` on `*`: every table, every request, every record.
    pub admin: bool,
    /// Tables (in the catalog) on which the principal holds `approve` or `admin`.
    pub tables: BTreeSet<TableName>,
}

impl Scope {
    /// Principals holding `approve` or `admin` on some table get the owner's view.
    pub fn is_owner(&self) -> bool {
        self.admin || !self.tables.is_empty()
    }

    /// Whether something touching `tables` is theirs to see. Unknown tables (an empty
    /// list) are for service admins only: fail closed.
    pub fn covers(&self, tables: &[TableName]) -> bool {
        self.admin || tables.iter().any(|t| self.tables.contains(t))
    }
}

impl Console {
    pub fn new(airlock: Arc<Airlock>, secure: bool) -> Self {
        Self {
            airlock,
            secure,
            rows: Mutex::new(HashMap::new()),
            parser: Sessions::bootstrap_state(),
            sql_tables: Mutex::new(HashMap::new()),
        }
    }

    /// The principal a user name stands for, with their roles from the users file.
    pub fn principal(&self, name: &str) -> Option<Arc<Principal>> {
        self.airlock.users.get(name).map(|u| {
            Arc::new(Principal {
                name: name.to_string(),
                roles: u.roles.clone(),
            })
        })
    }

    /// The principal's owner scope under the policy in force.
    pub fn scope(&self, principal: &Principal) -> Scope {
        use crate::policy::Action;
        let policy = self.airlock.sessions.policy().current();
        let catalog = self.airlock.sessions.catalog();
        let admin = policy.is_service_admin(principal);
        let tables = catalog
            .tables()
            .map(|(t, _)| t)
            .filter(|t| {
                admin
                    || policy.allows(principal, t, Action::Approve)
                    || policy.allows(principal, t, Action::Admin)
            })
            .cloned()
            .collect();
        Scope { admin, tables }
    }
}

/// The console's routes and layers, ready to serve.
pub fn router(console: Arc<Console>) -> Router {
    let secure = console.secure;
    let sessions = SessionManagerLayer::new(store::BoundedStore::default())
        .with_name(COOKIE)
        .with_http_only(true)
        .with_same_site(SameSite::Strict)
        .with_secure(secure)
        .with_path("/");
    let mut router = Router::new()
        .route("/", get(session::home))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/requests", get(requests::page))
        .route("/requests/live", get(requests::live))
        .route("/requests/{id}", get(requests::detail))
        .route("/requests/{id}/approve", post(requests::approve))
        .route("/requests/{id}/deny", post(requests::deny))
        .route("/activity", get(activity::page))
        .route("/policy", get(policy::page))
        .route("/mine", get(mine::requests))
        .route("/mine/live", get(mine::live))
        .route("/access", get(mine::access))
        .route("/assets/{file}", get(assets::asset))
        .fallback(error::not_found)
        .with_state(console)
        .layer(sessions)
        // Origin / Sec-Fetch-Site: cross-site POSTs never reach a handler.
        .layer(CsrfLayer::new())
        .layer(RequestBodyLimitLayer::new(BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ));
    let headers: [(&str, &str); 7] = [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "same-origin"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
        ("cache-control", "no-store"),
    ];
    for (name, value) in headers {
        router = router.layer(SetResponseHeaderLayer::if_not_present(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        ));
    }
    if secure {
        router = router.layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("strict-transport-security"),
            HeaderValue::from_static("max-age=31536000"),
        ));
    }
    router
}
