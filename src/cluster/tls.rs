//! Mutual TLS between front ends and workers, on top of the secret's proof.
//!
//! The HMAC proof (`auth.rs`) authenticates every call but leaves rows in clear on the
//! wire. With `[cluster] tls_cert`, `tls_key` and `tls_ca` set, workers serve TLS and
//! require a client certificate from that CA, and front ends and workers (which call each
//! other) connect over TLS with their own certificate, trusting only that CA. Worker URLs
//! are then `https://`.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The PEM files of a cluster member: its certificate chain and key, and the cluster CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The files, read.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    identity: Identity,
    ca: Certificate,
}

impl ClusterTls {
    pub fn load(files: &ClusterTlsFiles) -> Result<Self, String> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| format!("cluster TLS file {}: {e}", p.display()))
        };
        Ok(Self {
            identity: Identity::from_pem(read(&files.cert)?, read(&files.key)?),
            ca: Certificate::from_pem(read(&files.ca)?),
        })
    }

    /// What a worker serves with: its identity, and client certificates required.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// What a caller connects with: its identity, trusting only the cluster CA.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
    }
}
