//! `airlock worker`: runs stages of plans that a front end of its cluster sends.
//!
//! A worker holds no policy, no users and no dataset list: plans name the files they
//! read. It answers only callers that prove the cluster secret (`auth.rs`), and calls
//! other workers (to read their shuffles) with the same proof. Its functions are
//! DataFusion's own plus what Airlock's rewriter puts below a release boundary: the
//! `airlock_reaches_k` count, the total-form guards and, for the policy whose digest the
//! front end names, the masks. It writes nothing to disk: a stage over its memory fails.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateDefaults;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::ScalarUDF;
use datafusion_distributed::{DistributedExt, Worker, WorkerQueryContext, WorkerSessionBuilder};
use tonic::service::interceptor::InterceptedService;

use super::POLICY_DIGEST_HEADER;
use super::auth::{ClusterSecret, Verifier};
use super::channel::SignedChannels;
use super::tls::ClusterTls;
use crate::rewrite::protect::{self, MaskSecret};
use crate::rewrite::{reaches, total};

/// Builds the session each received stage runs in.
struct WorkerSessions {
    secret: Arc<ClusterSecret>,
    channels: SignedChannels,
    /// DataFusion's scalar functions and the guards over them.
    scalar: Vec<Arc<ScalarUDF>>,
    /// Stages received (one session each).
    stages: Arc<AtomicU64>,
}

#[async_trait]
impl WorkerSessionBuilder for WorkerSessions {
    async fn build_session_state(
        &self,
        ctx: WorkerQueryContext,
    ) -> Result<SessionState, DataFusionError> {
        self.stages.fetch_add(1, Ordering::Relaxed);
        let mut scalar = self.scalar.clone();
        // Masks only under a policy the front end names; without it a masked plan fails.
        if let Some(digest) = ctx
            .headers
            .get(POLICY_DIGEST_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            scalar.extend(protect::worker_masks(
                &MaskSecret::Cluster(self.secret.mask_key()),
                digest,
            ));
        }
        let mut aggregates = SessionStateDefaults::default_aggregate_functions();
        aggregates.push(Arc::new(reaches::udaf()));
        Ok(ctx
            .builder
            .with_scalar_functions(scalar)
            .with_aggregate_functions(aggregates)
            .with_distributed_channel_resolver(self.channels.clone())
            .build())
    }
}

/// A worker serving in this process.
pub struct RunningWorker {
    pub addr: SocketAddr,
    stages: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningWorker {
    /// How many stage tasks this worker has been sent.
    pub fn stages(&self) -> u64 {
        self.stages.load(Ordering::Relaxed)
    }

    /// Stops serving and waits for the server to end.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }

    /// Serves until the process is told to stop.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        (&mut self.task).await??;
        Ok(())
    }
}

/// Binds `listen` and serves a worker with `memory` bytes for its stages; with `tls`,
/// over mutual TLS (callers need a certificate from the cluster CA).
pub async fn start(
    listen: SocketAddr,
    secret: Arc<ClusterSecret>,
    memory: usize,
    tls: Option<ClusterTls>,
) -> anyhow::Result<RunningWorker> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(GreedyMemoryPool::new(memory)))
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()?;
    let defaults = SessionStateDefaults::default_scalar_functions();
    let mut scalar = defaults.clone();
    scalar.extend(total::worker_functions(&defaults)?);
    let stages = Arc::new(AtomicU64::new(0));
    let sessions = WorkerSessions {
        secret: Arc::clone(&secret),
        channels: SignedChannels::new(Arc::clone(&secret), tls.as_ref().map(ClusterTls::client)),
        scalar,
        stages: Arc::clone(&stages),
    };
    let worker = Worker::from_session_builder(sessions)
        .with_runtime_env(runtime)
        .with_version(env!("CARGO_PKG_VERSION"));
    let verifier = Arc::new(Verifier::new(secret));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let service = InterceptedService::new(worker.into_worker_server(), verifier.interceptor());
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        server = server.tls_config(tls.server())?;
    }
    let task = tokio::spawn(server.add_service(service).serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        async {
            let _ = rx.await;
        },
    ));
    tracing::info!(%addr, "airlock worker listening");
    Ok(RunningWorker {
        addr,
        stages,
        shutdown: Some(tx),
        task,
    })
}
