//! Sign-in with the users file (argon2id, the same check as the Flight handshake), the
//! session cookie, CSRF tokens, sign-out, and who gets the owner's view.
//!
//! A session holds the user's name and a random CSRF token; nothing else. Signing in
//! replaces the session id (no fixation) and the token. Every POST carries the token in a
//! form field, compared in constant time ([`Action`]); the sign-in form's token lives in
//! an anonymous session that expires after [`ANONYMOUS_TTL`]. A signed-in session lasts
//! `limits.token_ttl` from sign-in, like a Flight bearer token.

use std::sync::Arc;

use askama::Template;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::response::{Html, IntoResponse, Redirect, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tower_sessions::{Expiry, Session};

use super::Console;
use super::error::{Error, Result};
use super::views::Layout;
use crate::auth::Principal;

const USER: &str = "user";
const CSRF: &str = "csrf";

/// How long an unused sign-in form stays valid.
pub const ANONYMOUS_TTL: time::Duration = time::Duration::minutes(15);

/// A signed-in principal, with their session and its CSRF token.
#[derive(Debug, Clone)]
pub struct Signed {
    pub principal: Arc<Principal>,
    pub csrf: String,
    pub owner: bool,
    pub session: Session,
}

impl Signed {
    /// The page frame for this principal.
    pub fn layout(&self, active: &'static str) -> Layout {
        Layout {
            user: Some(self.principal.name.clone()),
            owner: self.owner,
            csrf: self.csrf.clone(),
            active,
        }
    }

    /// Owner pages and actions: 403 for everyone else.
    pub fn require_owner(&self) -> Result<()> {
        if self.owner {
            Ok(())
        } else {
            Err(Error::Forbidden(
                "this page is for data owners: it needs approve or admin on a table".into(),
            ))
        }
    }
}

async fn session_of(parts: &mut Parts) -> Result<Session> {
    Session::from_request_parts(parts, &())
        .await
        .map_err(|(_, m)| Error::Internal(m.to_string()))
}

impl FromRequestParts<Arc<Console>> for Signed {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, console: &Arc<Console>) -> Result<Self> {
        let htmx = parts.headers.contains_key("hx-request");
        let session = session_of(parts).await?;
        let name: Option<String> = session.get(USER).await.map_err(Error::session)?;
        let csrf: Option<String> = session.get(CSRF).await.map_err(Error::session)?;
        let (Some(name), Some(csrf)) = (name, csrf) else {
            return Err(Error::SignIn { htmx });
        };
        // A user removed from the users file is signed out.
        let Some(principal) = console.principal(&name) else {
            session.flush().await.map_err(Error::session)?;
            return Err(Error::SignIn { htmx });
        };
        let owner = console.scope(&principal).is_owner();
        Ok(Self {
            principal,
            csrf,
            owner,
            session,
        })
    }
}

/// A signed-in principal holding the owner's view; 403 for anyone else.
#[derive(Debug, Clone)]
pub struct Owner(pub Signed);

impl FromRequestParts<Arc<Console>> for Owner {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, console: &Arc<Console>) -> Result<Self> {
        let signed = Signed::from_request_parts(parts, console).await?;
        signed.require_owner()?;
        Ok(Self(signed))
    }
}

/// A form POST by a signed-in principal whose CSRF token matched their session's.
#[derive(Debug)]
pub struct Action<T> {
    pub who: Signed,
    pub form: T,
}

impl<T: DeserializeOwned> FromRequest<Arc<Console>> for Action<T> {
    type Rejection = Error;

    async fn from_request(req: Request, console: &Arc<Console>) -> Result<Self> {
        let (mut parts, body) = req.into_parts();
        let who = Signed::from_request_parts(&mut parts, console).await?;
        let bytes = axum::body::to_bytes(body, super::BODY_LIMIT)
            .await
            .map_err(|_| Error::BadRequest("the form is too large".into()))?;
        check_token(&bytes, &who.csrf)?;
        let form = serde_urlencoded::from_bytes(&bytes)
            .map_err(|e| Error::BadRequest(format!("bad form: {e}")))?;
        Ok(Self { who, form })
    }
}

/// A form without fields of its own (only the token).
#[derive(Debug, Deserialize)]
pub struct NoFields {}

/// The form's `csrf` field must equal the session's token.
fn check_token(form: &[u8], expected: &str) -> Result<()> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(form).unwrap_or_default();
    let sent = pairs
        .iter()
        .find(|(k, _)| k == CSRF)
        .map(|(_, v)| v.as_str());
    match sent {
        Some(sent) if same(sent.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(Error::Csrf),
    }
}

/// Constant-time equality (lengths are not secret: every token has the same length).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    layout: Layout,
    error: Option<String>,
    user: String,
}

/// `/`: owners go to the requests, everyone else to their own requests.
pub async fn home(who: Signed) -> Redirect {
    Redirect::to(if who.owner { "/requests" } else { "/mine" })
}

/// GET `/login`: the sign-in form (and an anonymous session holding its token).
pub async fn login_page(State(console): State<Arc<Console>>, req: Request) -> Result<Response> {
    let (mut parts, _) = req.into_parts();
    if Signed::from_request_parts(&mut parts, &console)
        .await
        .is_ok()
    {
        return Ok(Redirect::to("/").into_response());
    }
    let session = session_of(&mut parts).await?;
    login_form(&session, None, String::new()).await
}

async fn login_form(session: &Session, error: Option<String>, user: String) -> Result<Response> {
    let token = match session.get::<String>(CSRF).await.map_err(Error::session)? {
        Some(t) => t,
        None => {
            let t = new_token();
            session.insert(CSRF, &t).await.map_err(Error::session)?;
            t
        }
    };
    session.set_expiry(Some(Expiry::OnInactivity(ANONYMOUS_TTL)));
    let status = if error.is_some() {
        axum::http::StatusCode::UNAUTHORIZED
    } else {
        axum::http::StatusCode::OK
    };
    let page = LoginPage {
        layout: Layout {
            user: None,
            owner: false,
            csrf: token,
            active: "login",
        },
        error,
        user,
    };
    Ok((status, Html(page.render().map_err(Error::render)?)).into_response())
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

/// POST `/login`: checks the token and the password; on success a fresh session.
pub async fn login(State(console): State<Arc<Console>>, req: Request) -> Result<Response> {
    let (mut parts, body) = req.into_parts();
    let peer = parts
        .extensions
        .get::<super::serve::PeerAddr>()
        .map(|p| p.0);
    let session = session_of(&mut parts).await?;
    let bytes = axum::body::to_bytes(body, super::BODY_LIMIT)
        .await
        .map_err(|_| Error::BadRequest("the form is too large".into()))?;
    let expected: Option<String> = session.get(CSRF).await.map_err(Error::session)?;
    match expected {
        Some(t) => check_token(&bytes, &t)?,
        None => return Err(Error::Csrf),
    }
    let form: LoginForm = serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| Error::BadRequest(format!("bad form: {e}")))?;
    let password = zeroize::Zeroizing::new(form.password);
    match console
        .airlock
        .auth
        .verify_password(&form.user, &password, peer, None)
        .await
    {
        Ok(principal) => {
            session.cycle_id().await.map_err(Error::session)?;
            session
                .insert(USER, &principal.name)
                .await
                .map_err(Error::session)?;
            session
                .insert(CSRF, new_token())
                .await
                .map_err(Error::session)?;
            let ttl = console.airlock.config.limits.token_ttl;
            session.set_expiry(Some(Expiry::OnInactivity(
                time::Duration::try_from(ttl).unwrap_or(time::Duration::hours(8)),
            )));
            tracing::info!(principal = %principal.name, "console sign-in");
            Ok(Redirect::to("/").into_response())
        }
        Err(_) => {
            tracing::info!("console sign-in refused");
            login_form(
                &session,
                Some("Unknown user or wrong password.".into()),
                form.user,
            )
            .await
        }
    }
}

/// POST `/logout`: ends the session.
pub async fn logout(action: Action<NoFields>) -> Result<Redirect> {
    action.who.session.flush().await.map_err(Error::session)?;
    Ok(Redirect::to("/login"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        let t = new_token();
        assert_eq!(t.len(), 43);
        assert!(check_token(format!("a=1&csrf={t}").as_bytes(), &t).is_ok());
        assert!(check_token(b"a=1", &t).is_err());
        assert!(check_token(format!("csrf={}", &t[..42]).as_bytes(), &t).is_err());
        assert!(check_token(format!("csrf={}x", &t[..42]).as_bytes(), &t).is_err());
        assert!(!same(b"", b"x"));
    }
}
