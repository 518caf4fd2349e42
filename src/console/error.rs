//! The console's errors and the one place that turns them into HTTP responses: a page
//! saying what went wrong, never an internal detail (those go to the log with an id).

use askama::Template;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not signed in (or the session expired): back to the sign-in page.
    #[error("sign in first")]
    SignIn {
        /// The request came from htmx: tell it to navigate instead of swapping a page in.
        htmx: bool,
    },
    /// Signed in, but this page or action is not theirs.
    #[error("{0}")]
    Forbidden(String),
    /// A POST without the session's CSRF token (or with another one).
    #[error("the form was stale or forged: its CSRF token is missing or wrong; reload the page")]
    Csrf,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    /// A fault of the service; details are logged, never shown.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Maps the service's error type (from the shared approval handlers).
    pub fn from_service(e: crate::Error) -> Self {
        use crate::Error as E;
        match e {
            E::Refused(r) => Error::Forbidden(r.to_string()),
            E::InvalidRequest(m) if m.starts_with("no approval request") => Error::NotFound(m),
            E::InvalidRequest(m) | E::Query(m) => Error::BadRequest(m),
            E::Auth(a) => Error::Forbidden(a.to_string()),
            E::ResourceExhausted(m) => Error::Internal(m),
            E::Unimplemented(m) => Error::BadRequest(m),
            E::Execution(d) | E::WorkerLost(d) => Error::Internal(d.to_string()),
            E::Internal(m) => Error::Internal(m),
            // Nothing is decided while the trail cannot be written (fail closed).
            E::AuditUnavailable(a) => {
                Error::Internal(format!("the audit trail cannot be written: {a}"))
            }
        }
    }

    pub fn session(e: tower_sessions::session::Error) -> Self {
        Error::Internal(format!("session: {e}"))
    }

    pub fn render(e: askama::Error) -> Self {
        Error::Internal(format!("template: {e}"))
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    title: &'a str,
    message: &'a str,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, title, message) = match &self {
            Error::SignIn { htmx: true } => {
                let mut r = StatusCode::UNAUTHORIZED.into_response();
                r.headers_mut()
                    .insert("hx-redirect", HeaderValue::from_static("/login"));
                return r;
            }
            Error::SignIn { htmx: false } => return Redirect::to("/login").into_response(),
            Error::Forbidden(m) => (StatusCode::FORBIDDEN, "Not allowed", m.clone()),
            Error::Csrf => (StatusCode::FORBIDDEN, "Refused", self.to_string()),
            Error::NotFound(m) => (StatusCode::NOT_FOUND, "Not found", m.clone()),
            Error::BadRequest(m) => (StatusCode::BAD_REQUEST, "Bad request", m.clone()),
            Error::Internal(m) => {
                let id = crate::approval::new_id();
                tracing::error!(error = %m, error_id = %id, "console error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Something went wrong",
                    format!("internal error {id}; the details are in the server log"),
                )
            }
        };
        let page = ErrorPage {
            status: status.as_u16(),
            title,
            message: &message,
        };
        match page.render() {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (
                status,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                message,
            )
                .into_response(),
        }
    }
}

/// Unknown paths.
pub async fn not_found() -> Error {
    Error::NotFound("no such page".into())
}
