//! Scale-out: stages of a query on `datafusion-distributed` workers.
//!
//! A front end keeps everything that decides what leaves: parsing, the policy rewrite,
//! the verifier, approvals, audit, the release boundary and DP noise. Only the part of a
//! physical plan below the release boundary runs on workers (`planner.rs` says exactly
//! which). Workers answer only callers that prove the cluster secret (`auth.rs`,
//! `channel.rs`), and a background probe keeps the list of live ones (`workers.rs`).
//! `worker.rs` is the `airlock worker` service.

pub mod auth;
pub mod channel;
pub mod planner;
pub mod tls;
pub mod worker;
pub mod workers;

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::execution::session_state::SessionStateBuilder;
use datafusion_distributed::{DistributedExt, SessionStateBuilderExt};
use url::Url;

use crate::rewrite::protect::MaskSecret;
use auth::ClusterSecret;
use channel::SignedChannels;
use planner::Distributor;
use workers::{LiveWorkers, Workers};

/// The header that names the policy (by digest) whose masks a plan holds.
pub const POLICY_DIGEST_HEADER: &str = "x-airlock-policy-digest";

/// `[cluster]` of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Worker URLs, e.g. `http://10.0.0.5:50061`.
    pub workers: Vec<Url>,
    /// The shared secret's file.
    pub secret_file: PathBuf,
    /// Bytes of files per scan partition when spreading a scan over workers (the crate's
    /// `file_scan_config_bytes_per_partition`; lower spreads small tables wider).
    pub scan_partition_bytes: Option<usize>,
    /// Mutual TLS with the workers, if set (worker URLs are then `https://`).
    pub tls: Option<tls::ClusterTlsFiles>,
}

/// A worker URL: `http://host:port`, or `https://host:port` with cluster TLS.
pub fn parse_worker_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s.trim()).map_err(|e| format!("worker URL {s:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || url.port_or_known_default().is_none()
    {
        return Err(format!(
            "worker URL {s:?}: expected http://host:port (https:// with cluster TLS)"
        ));
    }
    Ok(url)
}

/// Whether a worker URL names this machine's loopback.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// A front end's cluster: its secret, its workers, and the planner that places stages.
#[derive(Debug)]
pub struct Cluster {
    secret: Arc<ClusterSecret>,
    channels: SignedChannels,
    distributor: Arc<Distributor>,
    scan_partition_bytes: Option<usize>,
}

impl Cluster {
    /// Reads the secret and starts probing the workers (needs a Tokio runtime).
    pub fn open(config: &ClusterConfig) -> Result<Self, String> {
        let secret = Arc::new(ClusterSecret::load(&config.secret_file)?);
        let tls = config.tls.as_ref().map(tls::ClusterTls::load).transpose()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        if let Some(url) = config.workers.iter().find(|u| u.scheme() != scheme) {
            return Err(format!(
                "worker URL {url}: with{} cluster TLS, worker URLs are {scheme}://",
                if tls.is_some() { "" } else { "out" }
            ));
        }
        // Without TLS, rows (below the threshold, before it is applied) cross the network
        // in clear: only on this machine's loopback.
        if tls.is_none()
            && let Some(url) = config.workers.iter().find(|u| !is_loopback(u))
        {
            return Err(format!(
                "worker {url} is not on this machine: rows would cross the network in clear; set cluster TLS (tls_cert, tls_key, tls_ca / --cluster-tls-*)"
            ));
        }
        let workers = Workers::new(config.workers.clone());
        workers.spawn_probes();
        Ok(Self {
            channels: SignedChannels::new(Arc::clone(&secret), tls.map(|t| t.client())),
            distributor: Arc::new(Distributor::new(workers)),
            secret,
            scan_partition_bytes: config.scan_partition_bytes,
        })
    }

    /// The salt source of `hash` masks: the cluster's, so workers hash alike.
    pub fn mask_secret(&self) -> MaskSecret {
        MaskSecret::Cluster(self.secret.mask_key())
    }

    pub fn distributor(&self) -> &Arc<Distributor> {
        &self.distributor
    }

    /// Adds what the crate needs to a session's builder: its configuration, the live
    /// workers, signed channels, and the policy digest workers build masks for. The
    /// builder's configuration must already be set; the caller sets its query planner
    /// afterwards (ours, which calls [`Distributor::place`]).
    pub fn configure(
        &self,
        builder: SessionStateBuilder,
        policy_digest: &str,
    ) -> SessionStateBuilder {
        let mut headers = http::HeaderMap::new();
        // A digest is hex; were it ever not a header value, workers would have no masks
        // for it and a masked plan would fail there.
        if let Ok(digest) = http::HeaderValue::from_str(policy_digest) {
            headers.insert(POLICY_DIGEST_HEADER, digest);
        }
        let mut builder = builder
            .with_distributed_planner()
            .with_distributed_worker_resolver(LiveWorkers(Arc::clone(self.distributor.workers())))
            .with_distributed_channel_resolver(self.channels.clone())
            .with_distributed_passthrough_headers(headers)
            .expect("the policy digest header does not use the crate's reserved prefix");
        if let Some(bytes) = self.scan_partition_bytes {
            builder = builder
                .with_distributed_file_scan_config_bytes_per_partition(bytes.max(1))
                .expect("a byte count is a valid setting");
        }
        builder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_tls_workers_must_be_on_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("s");
        std::fs::write(&secret_file, "s".repeat(40)).unwrap();
        let config = |url: &str| ClusterConfig {
            workers: vec![parse_worker_url(url).unwrap()],
            secret_file: secret_file.clone(),
            scan_partition_bytes: None,
            tls: None,
        };
        let err = Cluster::open(&config("http://10.0.0.5:50061")).unwrap_err();
        assert!(err.contains("in clear"), "{err}");
        let err = Cluster::open(&config("https://127.0.0.1:50061")).unwrap_err();
        assert!(err.contains("http://"), "{err}");
        assert!(is_loopback(
            &parse_worker_url("http://localhost:1").unwrap()
        ));
        assert!(is_loopback(&parse_worker_url("http://[::1]:1").unwrap()));
        assert!(!is_loopback(&parse_worker_url("http://worker1:1").unwrap()));
    }
}
