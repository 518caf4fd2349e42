//! The users file: names, argon2id password hashes, client certificates and roles.
//!
//! ```toml
//! [users.analyst]
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."   # from `airlock user hash`
//! roles = ["analyst"]
//!
//! [users.etl]                      # logs in with its client certificate alone
//! login = "certificate"
//! certificate = "CN=etl.example"   # or DNS:..., EMAIL:..., URI:... (a subject alt name)
//! roles = ["analyst"]
//!
//! [users.owner]                    # needs its password and its certificate
//! password_hash = "$argon2id$..."
//! login = "password_and_certificate"
//! certificate = "CN=owner"
//! roles = ["owner"]
//! ```
//!
//! `login = "certificate"` and `"password_and_certificate"` need mutual TLS
//! (`[tls] client_ca`); two users may not name the same certificate identity.

use std::collections::HashMap;
use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2};
use serde::Deserialize;
use toml::Spanned;

use crate::config::{Collector, Diagnostic, Diagnostics};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// Empty for `login = "certificate"`.
    #[serde(default)]
    pub password_hash: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// How the user proves who they are.
    #[serde(default)]
    pub login: LoginMode,
    /// The client certificate identity (`CN=...`, `DNS:...`, `EMAIL:...`, `URI:...`) of
    /// a user whose login involves a certificate.
    pub certificate: Option<String>,
}

/// What a user must present to log in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginMode {
    /// A password (Basic credentials). With mutual TLS on, the connection still needs a
    /// certificate from the client CA, but any such certificate will do.
    #[default]
    Password,
    /// The client certificate naming `certificate`, and nothing else; no password.
    Certificate,
    /// The password and a client certificate naming `certificate`.
    PasswordAndCertificate,
}

impl LoginMode {
    pub fn needs_certificate(self) -> bool {
        !matches!(self, Self::Password)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUsers {
    #[serde(default)]
    users: HashMap<String, Spanned<UserEntry>>,
}

/// All known users, by name.
#[derive(Debug, Clone, Default)]
pub struct Users(HashMap<String, UserEntry>);

impl Users {
    pub fn from_entries(entries: impl IntoIterator<Item = (String, UserEntry)>) -> Self {
        Self(entries.into_iter().collect())
    }

    /// Reads and validates a users file; every bad entry is reported with its line.
    pub fn load(path: &Path) -> Result<Self, Diagnostics> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Diagnostics::one(Diagnostic::new(path, None, format!("cannot read: {e}")))
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, Diagnostics> {
        let raw: RawUsers = toml::from_str(text)
            .map_err(|e| Diagnostics::one(Diagnostic::from_toml(path, text, &e)))?;
        let mut out = Collector::default();
        let mut users = HashMap::new();
        let mut certificates: HashMap<String, String> = HashMap::new();
        let mut entries: Vec<_> = raw.users.into_iter().collect();
        entries.sort_by_key(|(_, e)| e.span().start);
        for (name, entry) in entries {
            let span = entry.span();
            let entry = entry.into_inner();
            let mut problem = |message: String| {
                out.push(Diagnostic::at_span(
                    path,
                    text,
                    Some(span.clone()),
                    format!("user {name}: {message}"),
                ))
            };
            match (&entry.certificate, entry.login.needs_certificate()) {
                (None, true) => problem(format!(
                    "login = {:?} needs certificate = \"CN=...\" (or DNS:, EMAIL:, URI:)",
                    entry.login
                )),
                (Some(_), false) => problem(
                    "certificate is set but login = \"password\"; set login = \"certificate\" or \"password_and_certificate\"".into(),
                ),
                (Some(c), true) if !super::certificate::valid_identity(c) => problem(format!(
                    "certificate {c:?} must start with CN=, DNS:, EMAIL: or URI:"
                )),
                (Some(c), true) => {
                    if let Some(other) = certificates.insert(c.clone(), name.clone()) {
                        problem(format!("certificate {c:?} is already user {other}'s"));
                    }
                }
                (None, false) => {}
            }
            if entry.login == LoginMode::Certificate {
                if !entry.password_hash.is_empty() {
                    problem("login = \"certificate\" takes no password_hash".into());
                }
                users.insert(name, entry);
                continue;
            }
            match PasswordHash::new(&entry.password_hash) {
                Ok(h) if h.algorithm == Algorithm::Argon2id.ident() => {}
                Ok(_) => out.push(Diagnostic::at_span(
                    path,
                    text,
                    Some(span.clone()),
                    format!("user {name}: password_hash must be argon2id"),
                )),
                Err(e) => out.push(Diagnostic::at_span(
                    path,
                    text,
                    Some(span.clone()),
                    format!("user {name}: password_hash is not a PHC string: {e}"),
                )),
            }
            if name.is_empty() || name.contains(':') {
                out.push(Diagnostic::at_span(
                    path,
                    text,
                    Some(span),
                    format!("user {name:?}: names may not be empty or contain ':'"),
                ));
            }
            users.insert(name, entry);
        }
        out.finish(Self(users))
    }

    pub fn get(&self, name: &str) -> Option<&UserEntry> {
        self.0.get(name)
    }

    /// The user who logs in with a certificate naming one of `cert`'s identities
    /// (`login = "certificate"` only).
    pub fn by_certificate(
        &self,
        cert: &super::certificate::ClientCertificate,
    ) -> Option<(&str, &UserEntry)> {
        self.0
            .iter()
            .find(|(_, e)| {
                e.login == LoginMode::Certificate
                    && e.certificate.as_deref().is_some_and(|c| cert.names(c))
            })
            .map(|(n, e)| (n.as_str(), e))
    }

    /// Whether any user needs a client certificate (then `[tls] client_ca` must be set).
    pub fn any_needs_certificate(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(_, e)| e.login.needs_certificate())
            .map(|(n, _)| n.as_str())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &UserEntry)> {
        self.0.iter()
    }
}

/// An argon2id PHC hash of `password` with a random salt.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// A hash no password matches; verified against for unknown users so that a wrong name
/// and a wrong password take the same time.
const DECOY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$bQk8kdVd4ZtF3kN7xO0BvJX0Kx2Gz8mY9rN3x8y7y0Q";

/// True when `password` matches the entry. Runs argon2 even when there is no entry.
#[cfg(test)]
pub(crate) fn verify(entry: Option<&UserEntry>, password: &str) -> bool {
    verify_in(entry, password, &mut Vec::new())
}

/// [`verify`] with argon2's working memory (19 MiB for the default parameters) in
/// `memory`, grown as needed and kept by the caller for the next check. Reusing a few
/// long-lived buffers, instead of allocating and freeing 19 MiB per check on whichever
/// thread runs it, is what keeps the process's memory flat under a flood of wrong
/// passwords: the allocator kept the freed blocks per thread arena (800 MB after 40
/// concurrent failures, four at a time).
pub(crate) fn verify_in(
    entry: Option<&UserEntry>,
    password: &str,
    memory: &mut Vec<argon2::Block>,
) -> bool {
    use argon2::{Algorithm, Params, Version};
    // A user without a password (`login = "certificate"`) costs the same as a stranger.
    let entry = entry.filter(|e| e.login != LoginMode::Certificate);
    let hash = entry.map_or(DECOY_HASH, |e| e.password_hash.as_str());
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Ok(params), Some(expected), Some(salt)) =
        (Params::try_from(&parsed), parsed.hash, parsed.salt)
    else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, argon2::Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let computed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password.as_bytes(),
        salt,
        &mut out,
        &mut memory[..blocks],
    );
    // Output's equality is constant-time.
    computed.is_ok()
        && argon2::password_hash::Output::new(&out).is_ok_and(|o| o == expected)
        && entry.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_argon2id_and_names_the_line() {
        let text = "[users.a]\npassword_hash = \"plain\"\n";
        let err = Users::parse(Path::new("u.toml"), text).unwrap_err();
        assert!(err.to_string().starts_with("u.toml:1: user a"), "{err}");
    }

    #[test]
    fn certificate_logins_are_validated() {
        let ok = "[users.a]\nlogin = \"certificate\"\ncertificate = \"CN=a\"\n";
        let users = Users::parse(Path::new("u.toml"), ok).unwrap();
        assert_eq!(users.get("a").unwrap().login, LoginMode::Certificate);
        for (text, why) in [
            ("[users.a]\nlogin = \"certificate\"\n", "needs certificate"),
            (
                "[users.a]\nlogin = \"certificate\"\ncertificate = \"a\"\n",
                "must start with",
            ),
            (
                "[users.a]\nlogin = \"certificate\"\ncertificate = \"CN=a\"\n[users.b]\nlogin = \"certificate\"\ncertificate = \"CN=a\"\n",
                "already user a's",
            ),
            (
                "[users.a]\nlogin = \"certificate\"\ncertificate = \"CN=a\"\npassword_hash = \"x\"\n",
                "takes no password_hash",
            ),
        ] {
            let err = Users::parse(Path::new("u.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn hash_roundtrip() {
        let h = hash_password("pw").unwrap();
        let e = UserEntry {
            password_hash: h,
            ..Default::default()
        };
        assert!(verify(Some(&e), "pw"));
        assert!(!verify(Some(&e), "px"));
        assert!(!verify(None, "pw"));
    }
}
