//! Which configured workers are alive: the URLs the planner may place stages on.
//!
//! The crate asks for worker URLs when it plans a query and again when it runs it; a
//! background task probes every configured worker each second (a TCP connection with a
//! short timeout) and keeps the list of those that answer, so a killed worker stops
//! getting new stages within about a second. When none answers, queries run on the front
//! end alone.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use datafusion::error::DataFusionError;
use datafusion_distributed::WorkerResolver;
use url::Url;

/// How often workers are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The configured workers and the live ones among them.
#[derive(Debug)]
pub struct Workers {
    configured: Vec<Url>,
    live: ArcSwap<Vec<Url>>,
}

impl Workers {
    /// Workers start out live: the first probe runs at once.
    pub fn new(configured: Vec<Url>) -> Arc<Self> {
        Arc::new(Self {
            live: ArcSwap::from_pointee(configured.clone()),
            configured,
        })
    }

    pub fn configured(&self) -> &[Url] {
        &self.configured
    }

    pub fn live(&self) -> Arc<Vec<Url>> {
        self.live.load_full()
    }

    /// Probes every worker once and keeps those that answer.
    pub async fn probe(&self) {
        let checks = self.configured.iter().map(|url| async move {
            let alive = match (url.host_str(), url.port_or_known_default()) {
                (Some(host), Some(port)) => {
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    tokio::time::timeout(
                        Duration::from_millis(500),
                        tokio::net::TcpStream::connect((host, port)),
                    )
                    .await
                    .is_ok_and(|c| c.is_ok())
                }
                _ => false,
            };
            alive.then(|| url.clone())
        });
        let live: Vec<Url> = futures::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect();
        let before = self.live.load();
        if live.len() != before.len() {
            tracing::warn!(
                live = live.len(),
                configured = self.configured.len(),
                "cluster workers changed: {}",
                live.iter().map(Url::as_str).collect::<Vec<_>>().join(", ")
            );
        }
        self.live.store(Arc::new(live));
    }

    /// Probes forever, every [`PROBE_INTERVAL`]; stops when the last handle is dropped.
    pub fn spawn_probes(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(workers) = weak.upgrade() else {
                    return;
                };
                workers.probe().await;
                drop(workers);
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        });
    }
}

/// The crate's view of [`Workers`].
#[derive(Debug, Clone)]
pub struct LiveWorkers(pub Arc<Workers>);

impl WorkerResolver for LiveWorkers {
    fn get_urls(&self) -> Result<Vec<Url>, DataFusionError> {
        Ok(self.0.live().as_ref().clone())
    }
}
