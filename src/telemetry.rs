//! Logging, traces and metrics.
//!
//! - Logs: structured `tracing` output, human-readable or JSON; `RUST_LOG` (or `--log`)
//!   filters. No SQL literals or data values are logged at info.
//! - Traces: a span per RPC (`rpc`, with request id and principal) and per planning
//!   phase (`parse`, `rewrite`, `execute`); exported with OTLP/gRPC when an endpoint is
//!   configured.
//! - Metrics: Prometheus text on `GET /metrics` of the metrics listener: queries by
//!   decision and reason code, latency histograms, groups suppressed, pending approvals.
//! - Health, on the same listener: `GET /healthz` answers 200 while the process serves
//!   (liveness); `GET /readyz` answers 200 only when the policy is loaded and the audit
//!   trail and the state store take writes, 503 with the reasons otherwise.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::approval::ApprovalStore;

/// An exporter that runs the OTLP exporter's futures on its own runtime.
#[derive(Debug)]
struct OnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    rt: tokio::runtime::Runtime,
}

impl opentelemetry_sdk::trace::SpanExporter for OnRuntime {
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let inner = &self.inner;
        // The batch thread has no runtime of its own; block on ours.
        self.rt.block_on(inner.export(batch))
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Flushes exported spans when dropped (at shutdown).
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber once; later calls are no-ops (tests call it freely).
pub fn init(default_filter: &str, json: bool) {
    let _ = init_with_otlp(default_filter, json, None);
}

/// Installs logging and, given an OTLP/gRPC endpoint (e.g. `http://127.0.0.1:4317`),
/// span export. Must run inside a Tokio runtime when exporting.
pub fn init_with_otlp(
    default_filter: &str,
    json: bool,
    otlp: Option<&str>,
) -> Result<TelemetryGuard, String> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let (fmt_json, fmt_text) = if json {
        (Some(fmt.json()), None)
    } else {
        (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .compact(),
            ),
        )
    };
    let provider = match otlp {
        None => None,
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            // The SDK's batch processor exports from a plain OS thread; the gRPC exporter
            // needs a Tokio reactor, so it gets a small runtime of its own.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("airlock-otlp")
                .enable_all()
                .build()
                .map_err(|e| format!("OTLP runtime: {e}"))?;
            let inner = {
                let _entered = rt.enter();
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .build()
                    .map_err(|e| format!("OTLP exporter: {e}"))?
            };
            let exporter = OnRuntime { inner, rt };
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("airlock")
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("airlock")));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_json)
        .with(fmt_text)
        .with(otel)
        .try_init();
    Ok(TelemetryGuard { provider })
}

/// The service's Prometheus metrics.
pub struct Metrics {
    registry: Registry,
    pub queries: IntCounterVec,
    pub latency: HistogramVec,
    pub groups_suppressed: IntCounter,
    pub pending_approvals: IntGauge,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
        let registry = Registry::new();
        let queries = IntCounterVec::new(
            Opts::new(
                "airlock_queries_total",
                "Queries by decision and reason code",
            ),
            &["decision", "code"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "airlock_query_duration_seconds",
                "From planning to the last batch, by decision",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["decision"],
        )
        .expect("valid metric");
        let groups_suppressed = IntCounter::new(
            "airlock_groups_suppressed_total",
            "Groups below k that were not released",
        )
        .expect("valid metric");
        let pending_approvals = IntGauge::new(
            "airlock_pending_approvals",
            "Approval requests waiting for an owner",
        )
        .expect("valid metric");
        for c in [
            Box::new(queries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(groups_suppressed.clone()),
            Box::new(pending_approvals.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Metrics {
            registry,
            queries,
            latency,
            groups_suppressed,
            pending_approvals,
        }
    });
    &METRICS
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The readiness check: `Ok` when ready, else the reasons. Called off the async threads
/// (it may write a probe file).
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves `GET /metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped.
pub async fn serve_metrics(
    listener: TcpListener,
    approvals: Arc<dyn ApprovalStore>,
    ready: Readiness,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let approvals = Arc::clone(&approvals);
        let ready = Arc::clone(&ready);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let approvals = Arc::clone(&approvals);
                let ready = Arc::clone(&ready);
                async move {
                    let text = |status: StatusCode, body: String| {
                        Response::builder()
                            .status(status)
                            .header("content-type", "text/plain")
                            .body(Full::new(Bytes::from(body)))
                    };
                    let response = if req.uri().path() == "/healthz" {
                        text(StatusCode::OK, "ok\n".into())
                    } else if req.uri().path() == "/readyz" {
                        let checked = tokio::task::spawn_blocking(move || ready())
                            .await
                            .unwrap_or_else(|e| Err(format!("readiness check failed: {e}")));
                        match checked {
                            Ok(()) => text(StatusCode::OK, "ready\n".into()),
                            Err(why) => text(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("not ready: {why}\n"),
                            ),
                        }
                    } else if req.uri().path() == "/metrics" {
                        if let Ok(pending) = approvals.list(true).await {
                            metrics().pending_approvals.set(pending.len() as i64);
                        }
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(metrics().render())))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    Ok::<_, Infallible>(response.expect("valid response"))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind_metrics(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
