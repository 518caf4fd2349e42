//! Telemetry: Prometheus `/metrics`, and spans exported with OTLP to an in-test receiver.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock::client::Client;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn metrics_endpoint_answers() {
    let mut config = demo_config();
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = start_with(config).await;
    let url = format!("grpc://{}", server.addr);
    let mut analyst = Client::connect(&url, "analyst", "analyst", None)
        .await
        .unwrap();
    let mut out = Vec::new();
    let csv = airlock::client::Format::Csv;
    airlock::client::run_sql(
        &mut analyst,
        "SELECT zip, count(*) FROM hospital.patients GROUP BY zip",
        csv,
        &mut out,
    )
    .await
    .unwrap();
    let _ = airlock::client::run_sql(
        &mut analyst,
        "SELECT max(age) FROM hospital.patients",
        csv,
        &mut out,
    )
    .await;

    let addr = server.metrics_addr.expect("metrics listener");
    let text = http_get(addr, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("airlock_queries_total{code=\"\",decision=\"released\"}"),
        "{text}"
    );
    assert!(
        text.contains(
            "airlock_queries_total{code=\"APPROVAL_PENDING\",decision=\"approval_pending\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("airlock_query_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("airlock_groups_suppressed_total"), "{text}");
    assert!(text.contains("airlock_pending_approvals 1"), "{text}");
    assert!(http_get(addr, "/other").await.starts_with("HTTP/1.1 404"));
}

/// A received span: its name and attribute keys.
type Span = (String, Vec<String>);

#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in &request.get_ref().resource_spans {
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    let keys = s.attributes.iter().map(|a| a.key.clone()).collect();
                    spans.push((s.name.clone(), keys));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[test]
fn spans_reach_an_otlp_receiver() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let receiver = Receiver::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let otlp = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(receiver.clone());
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--patients",
            "500",
            "--console-listen",
            "off",
            "--state-dir",
        ])
        .arg(state.path())
        .args(["--otlp-endpoint", &format!("http://{otlp}")])
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "the demo ended"
        );
        if let Some(a) = line.trim().strip_prefix("airlock listening on ") {
            break a.to_string();
        }
    };
    rt.block_on(async {
        let mut analyst = Client::connect(&format!("grpc://{addr}"), "analyst", "analyst", None)
            .await
            .unwrap();
        let mut sink = Vec::new();
        airlock::client::run_sql(
            &mut analyst,
            "SELECT ward, count(*) FROM hospital.patients GROUP BY ward",
            airlock::client::Format::Csv,
            &mut sink,
        )
        .await
        .unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let names: Vec<String> = receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        if ["rpc", "parse", "rewrite", "execute"]
            .iter()
            .all(|n| names.iter().any(|s| s == n))
        {
            let spans = receiver.spans.lock().unwrap();
            let rpc = spans
                .iter()
                .find(|(n, keys)| n == "rpc" && keys.contains(&"principal".to_string()));
            assert!(
                rpc.is_some(),
                "an rpc span carries the principal: {spans:?}"
            );
            assert!(
                spans
                    .iter()
                    .any(|(n, keys)| n == "rpc" && keys.contains(&"request_id".to_string()))
            );
            break;
        }
        assert!(Instant::now() < deadline, "spans did not arrive: {names:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}
