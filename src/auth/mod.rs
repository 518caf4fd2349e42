//! Credentials → [`Principal`].
//!
//! Basic credentials are checked against argon2id hashes from the users file; a Flight
//! Handshake trades them for a random bearer token that lives only in this process,
//! expires, and is bound to its principal. Basic on every call is accepted too (a
//! verified Basic pair is remembered under a keyed hash for a short while, so argon2 does
//! not run on every call). Anything else is `Unauthenticated`. Passwords are never logged
//! and never kept in clear.
//!
//! With mutual TLS (`[tls] client_ca`) every connection carries a client certificate the
//! TLS layer verified. A user with `login = "certificate"` is known by that certificate
//! alone (a call with no `authorization` header); one with
//! `login = "password_and_certificate"` needs both. A token issued on a connection with a
//! certificate is good only on connections presenting the same certificate.
//!
//! Several front ends sharing a PostgreSQL state share tokens too
//! ([`crate::state::TokenStore`]): a token issued by one is honoured by the others, which
//! find it (by its SHA-256; the token itself is never stored) when they do not hold it.

pub mod certificate;
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

pub use certificate::ClientCertificate;
pub use users::{LoginMode, UserEntry, Users, hash_password};

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
    #[error("too many failed logins for this user or address; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("this user must present their client certificate (mutual TLS)")]
    CertificateRequired,
    /// The shared token store (PostgreSQL state) did not answer: no token is issued or
    /// honoured that it does not hold. Details are logged, never sent.
    #[error("the shared state cannot be reached; retry later")]
    StateUnavailable,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Standard base64 with or without padding: some clients (ADBC's Go driver) omit it.
const BASIC_DECODER: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How long a verified Basic pair is remembered.
const BASIC_CACHE_TTL: Duration = Duration::from_secs(300);

/// The window failed logins are counted in.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Throttled keys kept before expired windows are swept.
const FAILURE_SWEEP_AT: usize = 10_000;

/// How password checks are bounded: argon2id takes 19 MiB and tens of milliseconds per
/// check, so wrong passwords must not run it without bound.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    /// Password verifications running at once; further ones wait their turn.
    pub max_concurrent: usize,
    /// Failed logins per user name, and per client address, within a minute; more are
    /// refused with `RATE_LIMITED` (without running argon2) until the minute is over.
    pub failures_per_minute: u32,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            max_concurrent: 4,
            failures_per_minute: 10,
        }
    }
}

/// Failed logins in the current window of one user name or address.
#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
}
#[derive(Debug)]
struct Grant {
    principal: Arc<Principal>,
    expires: Instant,
    /// The certificate of the connection the token was issued on, if it had one.
    certificate: Option<[u8; 32]>,
}

/// Verifies credentials and issues tokens.
#[derive(Debug)]
pub struct Authenticator {
    users: Users,
    token_ttl: Duration,
    tokens: DashMap<String, Grant>,
    basic_cache: DashMap<[u8; 32], Grant>,
    cache_key: [u8; 32],
    limits: LoginLimits,
    verifications: Arc<tokio::sync::Semaphore>,
    /// argon2's working memory, one buffer per verification that may run at once, reused.
    memory: Arc<parking_lot::Mutex<Vec<Vec<argon2::Block>>>>,
    failed_users: DashMap<String, Failures>,
    failed_peers: DashMap<std::net::IpAddr, Failures>,
    /// Tokens shared with the other front ends, if any.
    shared: Option<Arc<dyn crate::state::TokenStore>>,
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
            limits: LoginLimits::default(),
            verifications: Arc::new(tokio::sync::Semaphore::new(
                LoginLimits::default().max_concurrent,
            )),
            memory: Arc::default(),
            failed_users: DashMap::new(),
            failed_peers: DashMap::new(),
            shared: None,
        }
    }

    /// The same authenticator, sharing its tokens through `store` (when given).
    pub fn with_shared_tokens(mut self, store: Option<Arc<dyn crate::state::TokenStore>>) -> Self {
        self.shared = store;
        self
    }

    /// The same authenticator with other login limits.
    pub fn with_login_limits(mut self, limits: LoginLimits) -> Self {
        self.verifications = Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent.max(1)));
        self.limits = limits;
        self
    }

    /// Checks a username and password (argon2id, off the async threads, at most
    /// `max_concurrent` at once); throttles failures per user name and per `peer`. A user
    /// with `login = "password_and_certificate"` also needs `cert` to name them (the
    /// console, which has no client certificates, passes `None`: such users cannot sign
    /// in there).
    pub async fn verify_password(
        &self,
        user: &str,
        password: &str,
        peer: Option<std::net::IpAddr>,
        cert: Option<&ClientCertificate>,
    ) -> Result<Arc<Principal>> {
        let principal = self.check_password(user, password, peer).await?;
        self.check_certificate(user, cert)?;
        Ok(principal)
    }

    /// A password user's certificate requirement, once the password is right.
    fn check_certificate(&self, user: &str, cert: Option<&ClientCertificate>) -> Result<()> {
        let Some(entry) = self.users.get(user) else {
            return Err(Error::InvalidCredentials);
        };
        match entry.login {
            LoginMode::Password => Ok(()),
            // verify_in never accepts a password for these; fail closed anyway.
            LoginMode::Certificate => Err(Error::InvalidCredentials),
            LoginMode::PasswordAndCertificate => {
                let wanted = entry.certificate.as_deref().unwrap_or_default();
                match cert {
                    Some(c) if !wanted.is_empty() && c.names(wanted) => Ok(()),
                    _ => Err(Error::CertificateRequired),
                }
            }
        }
    }

    /// The user a client certificate logs in by itself (`login = "certificate"`).
    pub fn principal_for_certificate(&self, cert: &ClientCertificate) -> Result<Arc<Principal>> {
        let (name, entry) = self
            .users
            .by_certificate(cert)
            .ok_or(Error::MissingCredentials)?;
        Ok(Arc::new(Principal {
            name: name.to_string(),
            roles: entry.roles.clone(),
        }))
    }

    async fn check_password(
        &self,
        user: &str,
        password: &str,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Arc<Principal>> {
        let key = self.basic_key(user, password);
        if let Some(g) = self.basic_cache.get(&key)
            && g.expires > Instant::now()
        {
            return Ok(Arc::clone(&g.principal));
        }
        self.check_throttle(user, peer)?;
        let permit = Arc::clone(&self.verifications)
            .acquire_owned()
            .await
            .map_err(|_| Error::InvalidCredentials)?;
        // Others may have failed while this one waited.
        self.check_throttle(user, peer)?;
        let entry = self.users.get(user).cloned();
        let password = zeroize::Zeroizing::new(password.to_string());
        let user_name = user.to_string();
        let memory = Arc::clone(&self.memory);
        let principal = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // At most `max_concurrent` buffers exist: one per permit.
            let mut buffer = memory.lock().pop().unwrap_or_default();
            let ok = users::verify_in(entry.as_ref(), &password, &mut buffer);
            memory.lock().push(buffer);
            ok.then(|| {
                let entry = entry.expect("verify fails without an entry");
                Arc::new(Principal {
                    name: user_name,
                    roles: entry.roles,
                })
            })
        })
        .await
        .map_err(|_| Error::InvalidCredentials)?;
        let Some(principal) = principal else {
            self.count_failure(user, peer);
            return Err(Error::InvalidCredentials);
        };
        self.basic_cache.insert(
            key,
            Grant {
                principal: Arc::clone(&principal),
                expires: Instant::now() + BASIC_CACHE_TTL,
                certificate: None,
            },
        );
        Ok(principal)
    }

    /// Refuses when the user name or the address failed too often in the current window.
    fn check_throttle(&self, user: &str, peer: Option<std::net::IpAddr>) -> Result<()> {
        let now = Instant::now();
        let limit = self.limits.failures_per_minute;
        let over = |f: &Failures| -> Option<u64> {
            let end = f.since + FAILURE_WINDOW;
            (f.count >= limit && end > now).then(|| (end - now).as_secs() + 1)
        };
        let by_user = self.failed_users.get(user).and_then(|f| over(&f));
        let by_peer = peer.and_then(|p| self.failed_peers.get(&p).and_then(|f| over(&f)));
        match by_user.max(by_peer) {
            Some(retry_after_secs) => Err(Error::RateLimited { retry_after_secs }),
            None => Ok(()),
        }
    }

    fn count_failure(&self, user: &str, peer: Option<std::net::IpAddr>) {
        let now = Instant::now();
        let bump = |f: &mut Failures| {
            if f.since + FAILURE_WINDOW <= now {
                *f = Failures {
                    since: now,
                    count: 0,
                };
            }
            f.count = f.count.saturating_add(1);
        };
        let fresh = Failures {
            since: now,
            count: 0,
        };
        if self.failed_users.len() > FAILURE_SWEEP_AT {
            self.failed_users
                .retain(|_, f| f.since + FAILURE_WINDOW > now);
        }
        if self.failed_peers.len() > FAILURE_SWEEP_AT {
            self.failed_peers
                .retain(|_, f| f.since + FAILURE_WINDOW > now);
        }
        bump(&mut self.failed_users.entry(user.to_string()).or_insert(fresh));
        if let Some(p) = peer {
            bump(&mut self.failed_peers.entry(p).or_insert(fresh));
        }
    }

    /// Issues a new bearer token for a principal, good only on connections presenting
    /// `cert` when there is one. With shared tokens, fails when the store does not keep
    /// it (another front end would not honour it).
    pub async fn issue_token(
        &self,
        principal: Arc<Principal>,
        cert: Option<&ClientCertificate>,
    ) -> Result<String> {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let token = URL_SAFE_NO_PAD.encode(bytes);
        if let Some(store) = &self.shared {
            let grant = crate::state::SharedGrant {
                hash: token_hash(&token),
                principal: principal.name.clone(),
                certificate: cert.map(|c| hex(&c.fingerprint)),
                expires_at: crate::approval::now() + self.token_ttl.as_secs() as i64,
            };
            store.put_token(&grant).await.map_err(|e| {
                tracing::error!(error = %e, "cannot keep a token in the shared state");
                Error::StateUnavailable
            })?;
        }
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
                certificate: cert.map(|c| c.fingerprint),
            },
        );
        Ok(token)
    }

    /// The principal behind a call's `authorization` header (Bearer or Basic), or, with
    /// no header, behind its client certificate (`login = "certificate"` users).
    pub async fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer: Option<std::net::IpAddr>,
        cert: Option<&ClientCertificate>,
    ) -> Result<Arc<Principal>> {
        match Credentials::from_metadata(metadata) {
            Ok(Credentials::Bearer(token)) => match self.principal_for_token(&token, cert) {
                Err(Error::InvalidToken)
                    if self.shared.is_some() && !self.tokens.contains_key(&token) =>
                {
                    self.principal_for_shared_token(&token, cert).await
                }
                other => other,
            },
            Ok(Credentials::Basic { user, password }) => {
                self.verify_password(&user, &password, peer, cert).await
            }
            Err(Error::MissingCredentials) if cert.is_some() => {
                self.principal_for_certificate(cert.expect("checked"))
            }
            Err(e) => Err(e),
        }
    }

    fn principal_for_token(
        &self,
        token: &str,
        cert: Option<&ClientCertificate>,
    ) -> Result<Arc<Principal>> {
        let now = Instant::now();
        if let Some(g) = self.tokens.get(token) {
            let same_certificate = g
                .certificate
                .is_none_or(|fp| cert.is_some_and(|c| c.fingerprint == fp));
            if g.expires > now && same_certificate {
                return Ok(Arc::clone(&g.principal));
            }
            if !same_certificate {
                return Err(Error::InvalidToken);
            }
        } else {
            return Err(Error::InvalidToken);
        }
        self.tokens.remove(token);
        Err(Error::InvalidToken)
    }

    /// A token another front end issued: found in the shared store, bound to the same
    /// certificate, for a user this front end knows; then held here until it expires.
    async fn principal_for_shared_token(
        &self,
        token: &str,
        cert: Option<&ClientCertificate>,
    ) -> Result<Arc<Principal>> {
        let store = self.shared.as_ref().ok_or(Error::InvalidToken)?;
        let now = crate::approval::now();
        let grant = store
            .get_token(&token_hash(token), now)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot read a token from the shared state");
                Error::StateUnavailable
            })?
            .ok_or(Error::InvalidToken)?;
        if grant.certificate.is_some() && grant.certificate != cert.map(|c| hex(&c.fingerprint)) {
            return Err(Error::InvalidToken);
        }
        let entry = self
            .users
            .get(&grant.principal)
            .ok_or(Error::InvalidToken)?;
        let principal = Arc::new(Principal {
            name: grant.principal.clone(),
            roles: entry.roles.clone(),
        });
        let left = Duration::from_secs(grant.expires_at.saturating_sub(now).max(0) as u64);
        self.tokens.insert(
            token.to_string(),
            Grant {
                principal: Arc::clone(&principal),
                expires: Instant::now() + left,
                certificate: cert
                    .filter(|_| grant.certificate.is_some())
                    .map(|c| c.fingerprint),
            },
        );
        Ok(principal)
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

/// The name a token is stored under in the shared state: its SHA-256, hex.
fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
                ..Default::default()
            },
        )]);
        Authenticator::new(users, Duration::from_secs(60))
    }

    #[tokio::test]
    async fn basic_then_bearer() {
        let a = auth();
        let p = a
            .verify_password("ann", "secret", None, None)
            .await
            .unwrap();
        assert_eq!(p.roles, vec!["analyst".to_string()]);
        assert_eq!(
            a.verify_password("ann", "nope", None, None)
                .await
                .unwrap_err(),
            Error::InvalidCredentials
        );
        assert_eq!(
            a.verify_password("bob", "secret", None, None)
                .await
                .unwrap_err(),
            Error::InvalidCredentials
        );
        let token = a.issue_token(p.clone(), None).await.unwrap();
        let mut md = MetadataMap::new();
        md.insert("authorization", format!("Bearer {token}").parse().unwrap());
        assert_eq!(a.authenticate(&md, None, None).await.unwrap(), p);
        md.insert("authorization", "Bearer forged".parse().unwrap());
        assert_eq!(
            a.authenticate(&md, None, None).await.unwrap_err(),
            Error::InvalidToken
        );
    }

    #[tokio::test]
    async fn failed_logins_are_throttled_per_user_and_per_address() {
        let a = auth().with_login_limits(LoginLimits {
            max_concurrent: 1,
            failures_per_minute: 2,
        });
        let here: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let there: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..2 {
            assert_eq!(
                a.verify_password("ann", "nope", Some(here), None)
                    .await
                    .unwrap_err(),
                Error::InvalidCredentials
            );
        }
        // The user name is throttled, from any address, even with the right password.
        assert!(matches!(
            a.verify_password("ann", "secret", Some(there), None).await,
            Err(Error::RateLimited { retry_after_secs }) if retry_after_secs <= 61
        ));
        // The address is throttled for any user name.
        assert!(matches!(
            a.verify_password("bob", "x", Some(here), None).await,
            Err(Error::RateLimited { .. })
        ));
        // Others are not.
        assert_eq!(
            a.verify_password("bob", "x", Some(there), None)
                .await
                .unwrap_err(),
            Error::InvalidCredentials
        );
    }

    #[tokio::test]
    async fn expired_tokens_are_refused() {
        let users = Users::from_entries([]);
        let a = Authenticator::new(users, Duration::from_millis(0));
        let t = a
            .issue_token(
                Arc::new(Principal {
                    name: "x".into(),
                    roles: vec![],
                }),
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            a.principal_for_token(&t, None).unwrap_err(),
            Error::InvalidToken
        );
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
