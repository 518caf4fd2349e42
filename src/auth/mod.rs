//! Credentials → [`Principal`].
//!
//! Basic credentials are checked against argon2id hashes from the users file; a Flight
//! Handshake trades them for a random bearer token that lives only in this process,
//! expires, and is bound to its principal. Basic on every call is accepted too (a
//! verified Basic pair is remembered under a keyed hash for a short while, so argon2 does
//! not run on every call). Anything else is `Unauthenticated`. Passwords are never logged
//! and never kept in clear.

pub mod users;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use dashmap::DashMap;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

pub use users::{UserEntry, Users, hash_password};

/// An authenticated user and their roles. Every request has exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    pub name: String,
    pub roles: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("no credentials: send Basic or Bearer authorization")]
    MissingCredentials,
    #[error("malformed authorization header")]
    Malformed,
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("unknown or expired token; authenticate again")]
    InvalidToken,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Standard base64 with or without padding: some clients (ADBC's Go driver) omit it.
const BASIC_DECODER: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How long a verified Basic pair is remembered.
const BASIC_CACHE_TTL: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Grant {
    principal: Arc<Principal>,
    expires: Instant,
}

/// Verifies credentials and issues tokens.
#[derive(Debug)]
pub struct Authenticator {
    users: Users,
    token_ttl: Duration,
    tokens: DashMap<String, Grant>,
    basic_cache: DashMap<[u8; 32], Grant>,
    cache_key: [u8; 32],
}

impl Authenticator {
    pub fn new(users: Users, token_ttl: Duration) -> Self {
        let mut cache_key = [0u8; 32];
        rand::rng().fill_bytes(&mut cache_key);
        Self {
            users,
            token_ttl,
            tokens: DashMap::new(),
            basic_cache: DashMap::new(),
            cache_key,
        }
    }

    /// Checks a username and password (argon2id, off the async threads).
    pub async fn verify_password(&self, user: &str, password: &str) -> Result<Arc<Principal>> {
        let key = self.basic_key(user, password);
        if let Some(g) = self.basic_cache.get(&key)
            && g.expires > Instant::now()
        {
            return Ok(Arc::clone(&g.principal));
        }
        let entry = self.users.get(user).cloned();
        let password = zeroize::Zeroizing::new(password.to_string());
        let user_name = user.to_string();
        let principal = tokio::task::spawn_blocking(move || {
            users::verify(entry.as_ref(), &password).then(|| {
                let entry = entry.expect("verify fails without an entry");
                Arc::new(Principal {
                    name: user_name,
                    roles: entry.roles,
                })
            })
        })
        .await
        .map_err(|_| Error::InvalidCredentials)?
        .ok_or(Error::InvalidCredentials)?;
        self.basic_cache.insert(
            key,
            Grant {
                principal: Arc::clone(&principal),
                expires: Instant::now() + BASIC_CACHE_TTL,
            },
        );
        Ok(principal)
    }

    /// Issues a new bearer token for a principal.
    pub fn issue_token(&self, principal: Arc<Principal>) -> String {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let token = URL_SAFE_NO_PAD.encode(bytes);
        let now = Instant::now();
        if self.tokens.len() % 256 == 255 {
            self.tokens.retain(|_, g| g.expires > now);
            self.basic_cache.retain(|_, g| g.expires > now);
        }
        self.tokens.insert(
            token.clone(),
            Grant {
                principal,
                expires: now + self.token_ttl,
            },
        );
        token
    }

    /// The principal behind a call's `authorization` header: Bearer or Basic.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Arc<Principal>> {
        match Credentials::from_metadata(metadata)? {
            Credentials::Bearer(token) => self.principal_for_token(&token),
            Credentials::Basic { user, password } => self.verify_password(&user, &password).await,
        }
    }

    fn principal_for_token(&self, token: &str) -> Result<Arc<Principal>> {
        let now = Instant::now();
        if let Some(g) = self.tokens.get(token) {
            if g.expires > now {
                return Ok(Arc::clone(&g.principal));
            }
        } else {
            return Err(Error::InvalidToken);
        }
        self.tokens.remove(token);
        Err(Error::InvalidToken)
    }

    fn basic_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update((user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }
}

/// Credentials as sent in an `authorization` header.
#[derive(Debug, PartialEq, Eq)]
pub enum Credentials {
    Basic { user: String, password: String },
    Bearer(String),
}

impl Credentials {
    pub fn from_metadata(metadata: &MetadataMap) -> Result<Self> {
        let value = metadata
            .get("authorization")
            .ok_or(Error::MissingCredentials)?
            .to_str()
            .map_err(|_| Error::Malformed)?;
        Self::parse(value)
    }

    pub fn parse(value: &str) -> Result<Self> {
        let (scheme, rest) = value.trim().split_once(' ').ok_or(Error::Malformed)?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            if rest.is_empty() {
                return Err(Error::Malformed);
            }
            Ok(Credentials::Bearer(rest.to_string()))
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = BASIC_DECODER.decode(rest).map_err(|_| Error::Malformed)?;
            let decoded = String::from_utf8(decoded).map_err(|_| Error::Malformed)?;
            let (user, password) = decoded.split_once(':').ok_or(Error::Malformed)?;
            Ok(Credentials::Basic {
                user: user.to_string(),
                password: password.to_string(),
            })
        } else {
            Err(Error::MissingCredentials)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        let users = Users::from_entries([(
            "ann".to_string(),
            UserEntry {
                password_hash: hash_password("secret").unwrap(),
                roles: vec!["analyst".into()],
            },
        )]);
        Authenticator::new(users, Duration::from_secs(60))
    }

    #[tokio::test]
    async fn basic_then_bearer() {
        let a = auth();
        let p = a.verify_password("ann", "secret").await.unwrap();
        assert_eq!(p.roles, vec!["analyst".to_string()]);
        assert_eq!(
            a.verify_password("ann", "nope").await.unwrap_err(),
            Error::InvalidCredentials
        );
        assert_eq!(
            a.verify_password("bob", "secret").await.unwrap_err(),
            Error::InvalidCredentials
        );
        let token = a.issue_token(p.clone());
        let mut md = MetadataMap::new();
        md.insert("authorization", format!("Bearer {token}").parse().unwrap());
        assert_eq!(a.authenticate(&md).await.unwrap(), p);
        md.insert("authorization", "Bearer forged".parse().unwrap());
        assert_eq!(a.authenticate(&md).await.unwrap_err(), Error::InvalidToken);
    }

    #[tokio::test]
    async fn expired_tokens_are_refused() {
        let users = Users::from_entries([]);
        let a = Authenticator::new(users, Duration::from_millis(0));
        let t = a.issue_token(Arc::new(Principal {
            name: "x".into(),
            roles: vec![],
        }));
        assert_eq!(a.principal_for_token(&t).unwrap_err(), Error::InvalidToken);
    }

    #[test]
    fn parses_headers() {
        assert_eq!(
            Credentials::parse("Basic YW5uOnM6ZWNyZXQ=").unwrap(),
            Credentials::Basic {
                user: "ann".into(),
                password: "s:ecret".into()
            }
        );
        assert_eq!(
            Credentials::parse("Basic !!").unwrap_err(),
            Error::Malformed
        );
        assert_eq!(
            Credentials::parse("Digest abc").unwrap_err(),
            Error::MissingCredentials
        );
    }
}
