//! Client certificates (mutual TLS) → the identities a users file can name.
//!
//! The TLS layer (rustls, `[tls] client_ca`) has already checked the chain, the validity
//! period and the CA before a call reaches the service; this module only reads who the
//! leaf certificate names: its subject common names (`CN=...`) and its subject
//! alternative names (`DNS:...`, `EMAIL:...`, `URI:...`). A user entry's `certificate`
//! is one of those strings, compared exactly.

use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The prefixes an identity may have (the form of `certificate` in users.toml).
pub const IDENTITY_PREFIXES: [&str; 4] = ["CN=", "DNS:", "EMAIL:", "URI:"];

/// The leaf certificate a client presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// `CN=...`, `DNS:...`, `EMAIL:...`, `URI:...`, in certificate order.
    pub identities: Vec<String>,
    /// SHA-256 of the DER: a token issued on one certificate is good only with it.
    pub fingerprint: [u8; 32],
}

impl ClientCertificate {
    /// Reads a DER certificate; `None` when it does not parse (the call then has no
    /// certificate identity, which fails closed for every user that needs one).
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut identities: Vec<String> = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(|cn| format!("CN={cn}"))
            .collect();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => identities.push(format!("DNS:{d}")),
                    GeneralName::RFC822Name(e) => identities.push(format!("EMAIL:{e}")),
                    GeneralName::URI(u) => identities.push(format!("URI:{u}")),
                    _ => {}
                }
            }
        }
        Some(Self {
            identities,
            fingerprint: Sha256::digest(der).into(),
        })
    }

    /// Whether the certificate names `identity` (e.g. `CN=alice`).
    pub fn names(&self, identity: &str) -> bool {
        self.identities.iter().any(|i| i == identity)
    }

    /// The first identity, for logs and the audit trail.
    pub fn primary(&self) -> &str {
        self.identities.first().map_or("", String::as_str)
    }
}

/// Whether `identity` has one of the [`IDENTITY_PREFIXES`] and something after it.
pub fn valid_identity(identity: &str) -> bool {
    IDENTITY_PREFIXES
        .iter()
        .any(|p| identity.len() > p.len() && identity.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_common_name_and_alternative_names() {
        let mut params = rcgen::CertificateParams::new(vec!["alice.example".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        params.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "alice@example.org".try_into().unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let c = ClientCertificate::from_der(cert.der()).unwrap();
        assert_eq!(
            c.identities,
            ["CN=alice", "DNS:alice.example", "EMAIL:alice@example.org"]
        );
        assert!(c.names("CN=alice") && !c.names("CN=alic"));
        assert!(valid_identity("CN=alice") && !valid_identity("CN=") && !valid_identity("alice"));
    }
}
