//! The cluster secret, and the proof of it that every call to a worker carries.
//!
//! A worker runs whatever plan it is sent, so it answers only callers that prove they
//! hold the cluster's shared secret: every gRPC call carries the header
//! `x-airlock-cluster-auth: v1.<unix seconds>.<nonce>.<tag>`, where the tag is
//! HMAC-SHA256 over the version, time and nonce with a key derived from the secret. The
//! worker checks the tag in constant time (`ring::hmac::verify`), refuses a time more than
//! [`WINDOW`] away from its clock, and refuses a nonce it has seen (a replayed header).
//! The same secret derives the key of `hash` masks (`crate::rewrite::protect::MaskSecret`),
//! so every front end and worker of one cluster hashes alike.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use ring::hmac;

/// The header that carries the proof.
pub const HEADER: &str = "x-airlock-cluster-auth";

/// How far a caller's clock may be from the worker's.
pub const WINDOW: Duration = Duration::from_secs(30);

/// Fewest bytes a cluster secret may have.
pub const MIN_SECRET_BYTES: usize = 32;

/// The shared secret of one cluster: front ends and workers hold the same file.
pub struct ClusterSecret {
    auth: hmac::Key,
    masks: Arc<hmac::Key>,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("ClusterSecret")
    }
}

impl ClusterSecret {
    /// Reads a secret file: at least [`MIN_SECRET_BYTES`] bytes once surrounding
    /// whitespace is trimmed (e.g. `openssl rand -hex 32 > cluster.secret`).
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the cluster secret {}: {e}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    file = %path.display(),
                    "the cluster secret is readable by other users of this machine; chmod 600 it"
                );
            }
        }
        Self::from_bytes(bytes.trim_ascii()).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_bytes(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "a cluster secret needs at least {MIN_SECRET_BYTES} bytes (it has {}); make one with `openssl rand -hex 32`",
                secret.len()
            ));
        }
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derive =
            |label: &[u8]| hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&root, label).as_ref());
        Ok(Self {
            auth: derive(b"airlock cluster auth v1"),
            masks: Arc::new(derive(b"airlock mask key v1")),
        })
    }

    /// The key `hash` masks derive their salt from.
    pub fn mask_key(&self) -> Arc<hmac::Key> {
        Arc::clone(&self.masks)
    }

    /// A fresh proof for one call.
    pub fn sign_now(&self) -> String {
        let nonce: [u8; 16] = rand::random();
        self.sign(unix_now(), &hex(&nonce))
    }

    fn sign(&self, time: u64, nonce: &str) -> String {
        let tag = hmac::sign(&self.auth, message(time, nonce).as_bytes());
        format!("v1.{time}.{nonce}.{}", hex(tag.as_ref()))
    }
}

fn message(time: u64, nonce: &str) -> String {
    format!("airlock-cluster-v1\n{time}\n{nonce}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Why a call was refused (logged by the worker; the caller only learns that it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Missing,
    Malformed,
    BadTag,
    Stale,
    Replayed,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Missing => "no cluster proof",
            Self::Malformed => "a malformed cluster proof",
            Self::BadTag => "a cluster proof made with another secret",
            Self::Stale => "a cluster proof outside the time window",
            Self::Replayed => "a replayed cluster proof",
        })
    }
}

/// The worker's side: checks proofs and remembers the nonces of the time window.
#[derive(Debug)]
pub struct Verifier {
    secret: Arc<ClusterSecret>,
    seen: Mutex<HashMap<String, u64>>,
}

impl Verifier {
    pub fn new(secret: Arc<ClusterSecret>) -> Self {
        Self {
            secret,
            seen: Mutex::new(HashMap::new()),
        }
    }

    pub fn check(&self, header: Option<&str>) -> Result<(), Refused> {
        self.check_at(header, unix_now())
    }

    fn check_at(&self, header: Option<&str>, now: u64) -> Result<(), Refused> {
        let header = header.ok_or(Refused::Missing)?;
        let mut parts = header.split('.');
        let (Some("v1"), Some(time), Some(nonce), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Refused::Malformed);
        };
        let time: u64 = time.parse().map_err(|_| Refused::Malformed)?;
        if nonce.len() != 32 || unhex(nonce).is_none() {
            return Err(Refused::Malformed);
        }
        let tag = unhex(tag).ok_or(Refused::Malformed)?;
        hmac::verify(&self.secret.auth, message(time, nonce).as_bytes(), &tag)
            .map_err(|_| Refused::BadTag)?;
        if time.abs_diff(now) > WINDOW.as_secs() {
            return Err(Refused::Stale);
        }
        let mut seen = self.seen.lock();
        if seen.len() > 4096 {
            seen.retain(|_, t| t.abs_diff(now) <= WINDOW.as_secs());
        }
        if seen.insert(nonce.to_string(), time).is_some() {
            return Err(Refused::Replayed);
        }
        Ok(())
    }

    /// A tonic interceptor that lets through only calls with a valid proof.
    pub fn interceptor(
        self: Arc<Self>,
    ) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
        move |req: tonic::Request<()>| {
            let header = req.metadata().get(HEADER).and_then(|v| v.to_str().ok());
            match self.check(header) {
                Ok(()) => Ok(req),
                Err(why) => {
                    tracing::warn!(peer = ?req.remote_addr(), %why, "refused a call to this worker");
                    Err(tonic::Status::unauthenticated(
                        "this worker answers only its cluster's front ends",
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Arc<ClusterSecret> {
        Arc::new(ClusterSecret::from_bytes(s.as_bytes()).unwrap())
    }

    #[test]
    fn a_proof_is_accepted_once_and_only_with_the_same_secret() {
        let ours = secret("0123456789abcdef0123456789abcdef");
        let theirs = secret("fedcba9876543210fedcba9876543210");
        let verifier = Verifier::new(Arc::clone(&ours));
        let proof = ours.sign_now();
        assert_eq!(verifier.check(Some(&proof)), Ok(()));
        assert_eq!(verifier.check(Some(&proof)), Err(Refused::Replayed));
        assert_eq!(
            verifier.check(Some(&theirs.sign_now())),
            Err(Refused::BadTag)
        );
        assert_eq!(verifier.check(None), Err(Refused::Missing));
        assert_eq!(verifier.check(Some("v1.1.2.3")), Err(Refused::Malformed));
        // A valid tag from a minute ago is stale; so is one from the future.
        let now = unix_now();
        let old = ours.sign(now - 60, &hex(&[7; 16]));
        assert_eq!(verifier.check_at(Some(&old), now), Err(Refused::Stale));
        let ahead = ours.sign(now + 60, &hex(&[8; 16]));
        assert_eq!(verifier.check_at(Some(&ahead), now), Err(Refused::Stale));
        // A tampered time fails the tag.
        let tampered = proof.replacen(&format!("v1.{}", now), &format!("v1.{}", now + 1), 1);
        assert!(verifier.check(Some(&tampered)).is_err());
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(ClusterSecret::from_bytes(b"too short").is_err());
    }
}
