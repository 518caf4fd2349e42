//! Connections to workers, each call signed with the cluster secret.
//!
//! Installed on the front end and on every worker: a worker that reads a shuffle from
//! another worker calls it too, and proves the secret like any caller.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use datafusion::error::DataFusionError;
use datafusion_distributed::grpc::{BoxCloneSyncChannel, create_worker_client};
use datafusion_distributed::{ChannelResolver, WorkerChannel};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use url::Url;

use super::auth::{ClusterSecret, HEADER};

/// One lazily connected channel per worker URL; every request gets a fresh proof.
#[derive(Debug, Clone)]
pub struct SignedChannels {
    secret: Arc<ClusterSecret>,
    /// Mutual TLS (`tls.rs`), if the cluster uses it.
    tls: Option<ClientTlsConfig>,
    channels: Arc<DashMap<Url, Channel>>,
}

impl SignedChannels {
    pub fn new(secret: Arc<ClusterSecret>, tls: Option<ClientTlsConfig>) -> Self {
        Self {
            secret,
            tls,
            channels: Arc::default(),
        }
    }

    fn channel(&self, url: &Url) -> Result<Channel, DataFusionError> {
        if let Some(c) = self.channels.get(url) {
            return Ok(c.clone());
        }
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| DataFusionError::Configuration(format!("worker URL {url}: {e}")))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| DataFusionError::Configuration(format!("cluster TLS: {e}")))?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        self.channels.insert(url.clone(), channel.clone());
        Ok(channel)
    }
}

#[async_trait]
impl ChannelResolver for SignedChannels {
    async fn get_worker_client_for_url(
        &self,
        url: &Url,
    ) -> Result<Box<dyn WorkerChannel>, DataFusionError> {
        let channel = self.channel(url)?;
        let secret = Arc::clone(&self.secret);
        let signed = tower::ServiceExt::map_request(
            channel,
            move |mut req: http::Request<tonic::body::Body>| {
                let proof =
                    http::HeaderValue::from_str(&secret.sign_now()).expect("a proof is ASCII");
                req.headers_mut().insert(HEADER, proof);
                req
            },
        );
        Ok(create_worker_client(BoxCloneSyncChannel::new(signed)))
    }
}
