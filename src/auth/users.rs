//! The users file: names, argon2id password hashes and roles.
//!
//! ```toml
//! [users.analyst]
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."   # from `airlock user hash`
//! roles = ["analyst"]
//! ```

use std::collections::HashMap;
use std::path::Path;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2};
use serde::Deserialize;
use toml::Spanned;

use crate::config::{Collector, Diagnostic, Diagnostics};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub password_hash: String,
    #[serde(default)]
    pub roles: Vec<String>,
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
        for (name, entry) in raw.users {
            let span = entry.span();
            let entry = entry.into_inner();
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
    fn hash_roundtrip() {
        let h = hash_password("pw").unwrap();
        let e = UserEntry {
            password_hash: h,
            roles: vec![],
        };
        assert!(verify(Some(&e), "pw"));
        assert!(!verify(Some(&e), "px"));
        assert!(!verify(None, "pw"));
    }
}
