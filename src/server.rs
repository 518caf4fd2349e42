//! Wiring: a validated configuration → a serving Flight SQL endpoint.
//!
//! [`Airlock::build`] opens the users file, the catalog and the policy (each failure is a
//! start-up error naming file and line); [`Airlock::start`] binds and serves in the
//! background, which is what tests and the demo use; `SIGHUP` reloads the policy, and a
//! bad policy leaves the last good one in force. When `console_listen` is set, the owner
//! console (`crate::console`) is served on the same runtime, and stops with the endpoint.
//!
//! The server runs on a runtime of its own, whatever runtime the caller has: its threads
//! have large stacks ([`WORKER_STACK`]), so deep (but bounded, see `query::parse`) plans
//! cannot overflow them, and a caller's small test runtime changes nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::approval::ApprovalStore;
use crate::approval::budget::BudgetLedger;
use crate::audit::AuditTrail;
use crate::auth::{Authenticator, Users};
use crate::catalog::Catalog;
use crate::catalog::hot::Refresh;
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
    #[error("cluster: {0}")]
    Cluster(String),
    #[error("shared state: {0}")]
    State(crate::state::Error),
    #[error("cannot start the server runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Approvals(#[from] crate::approval::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::Error),
    #[error("query engine: {0}")]
    Engine(#[from] datafusion::error::DataFusionError),
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("console: {0}")]
    Console(#[from] crate::console::ServeError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a running server needs, built and validated.
#[derive(Debug)]
pub struct Airlock {
    pub config: ServiceConfig,
    pub users: Users,
    pub sessions: Arc<Sessions>,
    pub auth: Arc<Authenticator>,
    pub approvals: Arc<dyn ApprovalStore>,
    /// The privacy-budget ledger, in the state store.
    pub ledger: Arc<dyn BudgetLedger>,
    pub audit: Arc<dyn AuditTrail>,
    pub quotas: Arc<crate::quota::Quotas>,
}

/// Stack size of the server's threads: planning and evaluation recurse through
/// expression trees (up to `query::parse::MAX_NESTING` levels).
pub const WORKER_STACK: usize = 32 * 1024 * 1024;

/// A server running in the background on its own runtime. Dropping it stops the server.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// Where `/metrics` is served, when configured.
    pub metrics_addr: Option<SocketAddr>,
    /// Where the owner console is served, when configured (`https` when TLS is).
    pub console_addr: Option<SocketAddr>,
    pub airlock: Arc<Airlock>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Running {
    /// Stops accepting calls and waits for the server task to end.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown();
        self.wait().await
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
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Airlock {
    /// Opens users, catalog and policy. Every problem is reported with file and line.
    pub async fn build(config: ServiceConfig) -> Result<Self> {
        let users = Users::load(&config.users_file)?;
        check_users_against_config(&config, &users)?;
        let bootstrap = Sessions::bootstrap_state();
        let catalog = Catalog::open(&config.datasets, &bootstrap, config.limits.cache_memory)
            .await?
            .with_uploads(&config.state_dir, &bootstrap)
            .await?;
        let policy = PolicyStore::open(config.policy_dir.clone(), &users, &catalog).await?;
        let cluster = match &config.cluster {
            Some(c) => Some(Arc::new(
                crate::cluster::Cluster::open(c).map_err(Error::Cluster)?,
            )),
            None => None,
        };
        let sessions = Arc::new(Sessions::new(
            Arc::new(policy),
            Arc::new(catalog),
            config.limits.clone(),
            cluster,
        )?);
        let crate::state::State {
            approvals,
            ledger,
            audit,
            tokens,
        } = crate::state::State::open(&config.state_dir, &config.state).await?;
        let auth = Arc::new(
            Authenticator::new(users.clone(), config.limits.token_ttl)
                .with_login_limits(crate::auth::LoginLimits {
                    max_concurrent: config.limits.max_concurrent_logins,
                    failures_per_minute: config.limits.failed_logins_per_minute,
                })
                .with_shared_tokens(tokens),
        );
        let quotas = Arc::new(crate::quota::Quotas::new(
            &config.limits,
            audit.released_today_at_open(),
        ));
        Ok(Self {
            config,
            users,
            sessions,
            auth,
            approvals,
            ledger,
            audit,
            quotas,
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

    /// Binds the listen address and serves in the background, on the server's own runtime.
    pub async fn start(self) -> Result<Running> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
            .thread_name("airlock-worker")
            .thread_stack_size(WORKER_STACK)
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let airlock = Arc::new(self);
        let tls = match &airlock.config.tls {
            None => None,
            Some(tls) => {
                let cert = std::fs::read(&tls.cert)
                    .map_err(|e| Error::Tls(format!("{}: {e}", tls.cert.display())))?;
                let key = std::fs::read(&tls.key)
                    .map_err(|e| Error::Tls(format!("{}: {e}", tls.key.display())))?;
                let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
                if let Some(ca) = &tls.client_ca {
                    // Mutual TLS: a connection without a certificate this CA issued (and
                    // within its validity) fails in the TLS handshake.
                    let ca = std::fs::read(ca)
                        .map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
                    config = config.client_ca_root(Certificate::from_pem(ca));
                }
                Some(config)
            }
        };
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(SocketAddr, Option<SocketAddr>)>>();
        let (metrics_tx, metrics_rx) = oneshot::channel::<SocketAddr>();
        let (tx, rx) = oneshot::channel::<()>();
        let server = Arc::clone(&airlock);
        let task = runtime.spawn(async move {
            let addr = server.config.listen;
            let bound = async {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind { addr, source })?;
                let local = listener
                    .local_addr()
                    .map_err(|source| Error::Bind { addr, source })?;
                let mut builder = Server::builder();
                if let Some(tls) = tls {
                    builder = builder
                        .tls_config(tls)
                        .map_err(|e| Error::Tls(e.to_string()))?;
                }
                let console = match server.config.console_listen {
                    Some(addr) => {
                        Some(crate::console::bind(addr, server.config.tls.as_ref()).await?)
                    }
                    None => None,
                };
                Ok::<_, Error>((listener, local, builder, console))
            }
            .await;
            let (listener, local, builder, console) = match bound {
                Ok(b) => b,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            let service = AirlockService::new(
                Arc::clone(&server.auth),
                Arc::clone(&server.sessions),
                server.users.clone(),
                Arc::clone(&server.approvals),
                Arc::clone(&server.audit),
                server.config.state_dir.clone(),
                crate::flight::Allowances {
                    ledger: Arc::clone(&server.ledger),
                    quotas: Arc::clone(&server.quotas),
                },
            );
            let router = builder
                .layer(RequestIdLayer)
                .add_service(service.into_server());
            spawn_reload_on_sighup(Arc::clone(&server));
            spawn_hot_refresh(Arc::clone(&server));
            if let Some(addr) = server.config.metrics_listen {
                match crate::telemetry::bind_metrics(addr).await {
                    Ok(l) => {
                        if let Ok(a) = l.local_addr() {
                            tracing::info!(addr = %a, "metrics on /metrics");
                            let _ = metrics_tx.send(a);
                        }
                        tokio::spawn(crate::telemetry::serve_metrics(
                            l,
                            Arc::clone(&server.approvals),
                            readiness(&server),
                        ));
                    }
                    Err(e) => tracing::error!(addr = %addr, error = %e, "cannot serve metrics"),
                }
            }
            // The console stops with the Flight endpoint (or when this task ends).
            let (console_stop, console_stopped) = oneshot::channel::<()>();
            let console_addr = console.map(|l| {
                let addr = l.addr;
                tracing::info!(addr = %addr, tls = l.is_tls(), "console listening");
                let pages = crate::console::router(Arc::new(crate::console::Console::new(
                    Arc::clone(&server),
                    l.is_tls(),
                )));
                tokio::spawn(crate::console::run(l, pages, console_stopped));
                addr
            });
            tracing::info!(addr = %local, tls = server.config.tls.is_some(), "airlock listening");
            let _ = ready_tx.send(Ok((local, console_addr)));
            router
                .serve_with_incoming_shutdown(incoming(listener), async {
                    let _ = rx.await;
                    let _ = console_stop.send(());
                })
                .await
                .map_err(Error::from)
        });
        let (addr, console_addr) = match ready_rx.await {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(e)) => {
                runtime.shutdown_background();
                return Err(e);
            }
            Err(_) => {
                runtime.shutdown_background();
                return Err(Error::Runtime(std::io::Error::other(
                    "the server task ended before listening",
                )));
            }
        };
        let metrics_addr = match airlock.config.metrics_listen {
            Some(_) => metrics_rx.await.ok(),
            None => None,
        };
        Ok(Running {
            addr,
            metrics_addr,
            console_addr,
            airlock,
            shutdown: Some(tx),
            task: Some(task),
            runtime: Some(runtime),
        })
    }
}

/// What the users file and the configuration must agree on: users who log in with a
/// certificate need mutual TLS, and `[limits.users.<name>]` must name a user.
fn check_users_against_config(config: &ServiceConfig, users: &Users) -> Result<(), Diagnostics> {
    use crate::config::{Collector, Diagnostic};
    let mut out = Collector::default();
    let mutual = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    if !mutual && let Some(user) = users.any_needs_certificate() {
        out.push(Diagnostic::new(
            &config.users_file,
            None,
            format!(
                "user {user} logs in with a client certificate, but mutual TLS is off (set [tls] client_ca, --tls-client-ca)"
            ),
        ));
    }
    for (name, (_, origin)) in &config.limits.user_quotas {
        if users.get(name).is_none() {
            let (file, line) = origin
                .clone()
                .map_or((config.users_file.clone(), None), |(f, l)| (f, Some(l)));
            out.push(Diagnostic::new(
                file,
                line,
                format!(
                    "limits.users.{name}: no such user in {}",
                    config.users_file.display()
                ),
            ));
        }
    }
    out.finish(())
}

/// Ready when the policy is loaded and the state store can be written: the audit trail
/// took its last write (PostgreSQL: answered its last call or heartbeat) and, for the
/// embedded store, the audit and approvals directories take a synced write (see
/// `telemetry`).
fn readiness(airlock: &Arc<Airlock>) -> crate::telemetry::Readiness {
    let weak = Arc::downgrade(airlock);
    Arc::new(move || {
        let airlock = weak.upgrade().ok_or("shutting down")?;
        let mut why = Vec::new();
        if airlock.sessions.policy().current().version == 0 {
            why.push("no policy loaded");
        }
        if !airlock.audit.writable() {
            why.push("the audit trail cannot be written");
        }
        if airlock.config.state.url.is_none() {
            let dir = &airlock.config.state_dir;
            if !crate::audit::probe_dir(&dir.join("audit")) {
                why.push("the audit trail cannot be written");
            }
            if !crate::audit::probe_dir(&dir.join("approvals")) {
                why.push("the state store cannot be written");
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    })
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

/// Accepted connections, with Nagle's algorithm off: results and small responses leave
/// at once instead of waiting for the client's delayed ACK (40 ms on Linux, twice per
/// query: 90 ms for `SELECT 1` before this, 5 ms after).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Checks the hot (`cache = true`) datasets' files every `limits.cache_check_interval`
/// and swaps in fresh rows when they change (see `catalog::hot`).
fn spawn_hot_refresh(airlock: Arc<Airlock>) {
    let hot: Vec<_> = airlock
        .config
        .datasets
        .iter()
        .filter(|d| d.cache)
        .cloned()
        .collect();
    if hot.is_empty() {
        return;
    }
    let every = airlock.config.limits.cache_check_interval;
    let budget = airlock.config.limits.cache_memory;
    let weak = Arc::downgrade(&airlock);
    drop(airlock);
    tokio::spawn(async move {
        let state = Sessions::bootstrap_state();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(airlock) = weak.upgrade() else { break };
            for d in &hot {
                let refresh = airlock
                    .sessions
                    .catalog()
                    .refresh_hot(d, &state, budget)
                    .await;
                match &refresh {
                    Refresh::Unchanged => continue,
                    Refresh::Reloaded(_, h) => {
                        tracing::info!(dataset = %d.name, bytes = h.bytes, "hot dataset reloaded")
                    }
                    Refresh::Kept { error, .. } => tracing::error!(
                        dataset = %d.name,
                        error = %error,
                        "hot dataset changed but was not reloaded; the old rows stay"
                    ),
                }
                airlock
                    .sessions
                    .update_catalog(|c| c.with_refresh(&d.name, &refresh));
            }
        }
    });
}
