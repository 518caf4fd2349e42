//! Wiring: a validated configuration → a serving Flight SQL endpoint.
//!
//! [`Airlock::build`] opens the users file, the catalog and the policy (each failure is a
//! start-up error naming file and line); [`Airlock::start`] binds and serves in the
//! background, which is what tests and the demo use; `SIGHUP` reloads the policy, and a
//! bad policy leaves the last good one in force.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::auth::{Authenticator, Users};
use crate::catalog::Catalog;
use crate::config::{Diagnostics, ServiceConfig};
use crate::flight::{AirlockService, RequestIdLayer};
use crate::policy::PolicyStore;
use crate::session::Sessions;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] Diagnostics),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("query engine: {0}")]
    Engine(#[from] datafusion::error::DataFusionError),
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a running server needs, built and validated.
#[derive(Debug)]
pub struct Airlock {
    pub config: ServiceConfig,
    pub users: Users,
    pub sessions: Arc<Sessions>,
    pub auth: Arc<Authenticator>,
}

/// A server running in the background. Dropping it stops the server.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub airlock: Arc<Airlock>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

impl Running {
    /// Stops accepting calls and waits for the server task to end.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// Waits until the server ends (e.g. on a signal handled by the caller).
    pub async fn wait(mut self) -> Result<()> {
        match self.task.take() {
            Some(t) => t.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// Asks the server to stop without waiting.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Airlock {
    /// Opens users, catalog and policy. Every problem is reported with file and line.
    pub async fn build(config: ServiceConfig) -> Result<Self> {
        let users = Users::load(&config.users_file)?;
        let catalog = Catalog::open(&config.datasets, &Sessions::bootstrap_state()).await?;
        let policy = PolicyStore::open(config.policy_dir.clone(), &users, &catalog).await?;
        let sessions = Arc::new(Sessions::new(
            Arc::new(policy),
            Arc::new(catalog),
            config.limits.clone(),
        )?);
        let auth = Arc::new(Authenticator::new(users.clone(), config.limits.token_ttl));
        Ok(Self {
            config,
            users,
            sessions,
            auth,
        })
    }

    /// Validates configuration, users, datasets and policies without serving.
    pub async fn check(config: ServiceConfig) -> Result<()> {
        Self::build(config).await.map(|_| ())
    }

    /// Reloads the policy directory; the last good policy stays on error.
    pub async fn reload_policy(&self) -> Result<u64, Diagnostics> {
        let catalog = self.sessions.catalog();
        self.sessions
            .policy()
            .reload(&self.users, &catalog)
            .await
            .map(|s| s.version)
    }

    /// Binds the listen address and serves in the background.
    pub async fn start(self) -> Result<Running> {
        let addr = self.config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let airlock = Arc::new(self);
        let service = AirlockService::new(Arc::clone(&airlock.auth), Arc::clone(&airlock.sessions));

        let mut builder = Server::builder();
        if let Some(tls) = &airlock.config.tls {
            let cert = std::fs::read(&tls.cert)
                .map_err(|e| Error::Tls(format!("{}: {e}", tls.cert.display())))?;
            let key = std::fs::read(&tls.key)
                .map_err(|e| Error::Tls(format!("{}: {e}", tls.key.display())))?;
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
                .map_err(|e| Error::Tls(e.to_string()))?;
        }
        let (tx, rx) = oneshot::channel::<()>();
        let router = builder
            .layer(RequestIdLayer)
            .add_service(service.into_server());
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = rx.await;
                })
                .await
                .map_err(Error::from)
        });
        spawn_reload_on_sighup(Arc::clone(&airlock));
        tracing::info!(addr = %local, tls = airlock.config.tls.is_some(), "airlock listening");
        Ok(Running {
            addr: local,
            airlock,
            shutdown: Some(tx),
            task: Some(task),
        })
    }
}

#[cfg(unix)]
fn spawn_reload_on_sighup(airlock: Arc<Airlock>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; policy reload only through the admin action");
        return;
    };
    let weak = Arc::downgrade(&airlock);
    drop(airlock);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(airlock) = weak.upgrade() else { break };
            match airlock.reload_policy().await {
                Ok(version) => tracing::info!(version, "policy reloaded on SIGHUP"),
                Err(e) => {
                    tracing::error!(errors = %e, "policy reload failed; the last good policy stays in force")
                }
            }
        }
    });
}

#[cfg(not(unix))]
fn spawn_reload_on_sighup(_airlock: Arc<Airlock>) {}
