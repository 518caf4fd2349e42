//! A small Flight SQL client for people and scripts: `airlock sql` and the owner tools.
//!
//! It keeps gRPC statuses intact (code and message), so a refusal prints with its code:
//! `PermissionDenied: [STATEMENT_NOT_ALLOWED] ...`.

use std::io::Write;
use std::path::Path;

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
use arrow_flight::{FlightDescriptor, HandshakeRequest, Ticket};
use base64::Engine as _;
use datafusion::arrow::array::RecordBatch;
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] Status),
    #[error("{0}")]
    Output(String),
}

impl Error {
    /// The reason code of a refusal, when the server sent one.
    pub fn reason_code(&self) -> Option<String> {
        match self {
            Error::Status(s) => s
                .metadata()
                .get(crate::error::REASON_CODE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach and log in to a server (shared by `airlock sql` and `airlock approvals`).
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Server URL, e.g. grpc://127.0.0.1:50051 (grpc+tls:// for TLS).
    #[arg(long, env = "AIRLOCK_URL", default_value = "grpc://127.0.0.1:50051")]
    pub url: String,
    /// User name.
    #[arg(long, env = "AIRLOCK_USER")]
    pub user: String,
    /// Password (prefer the environment variable over the flag).
    #[arg(long, env = "AIRLOCK_PASSWORD", hide_env_values = true)]
    pub password: String,
    /// CA certificate (PEM) to trust for grpc+tls:// URLs.
    #[arg(long, env = "AIRLOCK_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
}

impl ConnectArgs {
    pub async fn connect(&self) -> Result<Client> {
        Client::connect(
            &self.url,
            &self.user,
            &self.password,
            self.tls_ca.as_deref(),
        )
        .await
    }
}

/// Output formats of `airlock sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned table.
    Table,
    /// CSV with a header line.
    Csv,
    /// One JSON object per line.
    Json,
}

/// An authenticated connection.
#[derive(Debug, Clone)]
pub struct Client {
    inner: FlightServiceClient<Channel>,
    token: String,
}

impl Client {
    /// Connects to `url` (`grpc://`, `grpc+tcp://`, `http://`; `grpc+tls://` or `https://`
    /// for TLS, trusting `tls_ca` when given) and trades the password for a token.
    pub async fn connect(
        url: &str,
        user: &str,
        password: &str,
        tls_ca: Option<&Path>,
    ) -> Result<Self> {
        let connect_err = |reason: String| Error::Connect {
            url: url.to_string(),
            reason,
        };
        let (tls, rest) = if let Some(r) = url
            .strip_prefix("grpc+tls://")
            .or_else(|| url.strip_prefix("https://"))
        {
            (true, r)
        } else if let Some(r) = url
            .strip_prefix("grpc+tcp://")
            .or_else(|| url.strip_prefix("grpc://"))
            .or_else(|| url.strip_prefix("http://"))
        {
            (false, r)
        } else {
            (false, url)
        };
        let scheme = if tls { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{rest}"))
            .map_err(|e| connect_err(e.to_string()))?;
        if tls {
            let mut config = ClientTlsConfig::new();
            if let Some(ca) = tls_ca {
                let pem =
                    std::fs::read(ca).map_err(|e| connect_err(format!("{}: {e}", ca.display())))?;
                config = config.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| connect_err(e.to_string()))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let mut inner = FlightServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        let mut req = Request::new(futures::stream::iter(vec![HandshakeRequest::default()]));
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        req.metadata_mut().insert(
            "authorization",
            format!("Basic {basic}")
                .parse()
                .map_err(|_| connect_err("bad credentials header".into()))?,
        );
        let resp = inner.handshake(req).await?;
        let token = resp
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
            .ok_or_else(|| connect_err("the server sent no bearer token".into()))?;
        Ok(Self { inner, token })
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Ok(v) = format!("Bearer {}", self.token).parse() {
            req.metadata_mut().insert("authorization", v);
        }
        req
    }

    /// Runs a query and returns its batches as they arrive.
    pub async fn query(&mut self, sql: &str) -> Result<FlightRecordBatchStream> {
        let cmd = CommandStatementQuery {
            query: sql.to_string(),
            transaction_id: None,
        };
        let descriptor = FlightDescriptor::new_cmd(cmd.as_any().encode_to_vec());
        let info = self
            .inner
            .get_flight_info(self.request(descriptor))
            .await?
            .into_inner();
        let ticket = info
            .endpoint
            .first()
            .and_then(|e| e.ticket.clone())
            .unwrap_or_else(|| Ticket::new(Vec::<u8>::new()));
        let stream = self.inner.do_get(self.request(ticket)).await?.into_inner();
        Ok(FlightRecordBatchStream::new_from_flight_data(
            stream.map_err(Into::into),
        ))
    }

    /// Runs a custom Flight action and returns the bodies of its results.
    pub async fn action(&mut self, kind: &str, body: Vec<u8>) -> Result<Vec<bytes::Bytes>> {
        let action = arrow_flight::Action::new(kind, body);
        let mut stream = self
            .inner
            .do_action(self.request(action))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = stream.message().await? {
            out.push(r.body);
        }
        Ok(out)
    }
}

impl Client {
    /// The server's privacy explanation of a query (nothing runs).
    pub async fn explain(&mut self, sql: &str) -> Result<String> {
        let bodies = self
            .action(
                crate::flight::actions::PRIVACY_EXPLAIN,
                sql.as_bytes().to_vec(),
            )
            .await?;
        Ok(bodies
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect())
    }

    /// Runs an action whose body and answer are JSON text.
    pub async fn json_action(
        &mut self,
        kind: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let bodies = self.action(kind, body.to_string().into_bytes()).await?;
        let text: String = bodies
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        serde_json::from_str(&text).map_err(|e| Error::Output(format!("bad answer to {kind}: {e}")))
    }

    /// Asks the server to reload its policy (admin on `*`).
    pub async fn reload_policy(&mut self) -> Result<String> {
        let bodies = self
            .action(crate::flight::actions::RELOAD_POLICY, Vec::new())
            .await?;
        Ok(bodies
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect())
    }
}

/// Runs `sql` and writes the result to `out` in `format`.
pub async fn run_sql(
    client: &mut Client,
    sql: &str,
    format: Format,
    out: &mut dyn Write,
) -> Result<usize> {
    let mut stream = client.query(sql).await?;
    let mut rows = 0;
    let io = |e: std::io::Error| Error::Output(e.to_string());
    let arrow = |e: datafusion::arrow::error::ArrowError| Error::Output(e.to_string());
    match format {
        Format::Table => {
            let mut batches: Vec<RecordBatch> = Vec::new();
            while let Some(b) = stream.next().await {
                let b = b.map_err(flight_to_status)?;
                rows += b.num_rows();
                batches.push(b);
            }
            if batches.is_empty()
                && let Some(schema) = stream.schema()
            {
                batches.push(RecordBatch::new_empty(schema.clone()));
            }
            let table =
                datafusion::arrow::util::pretty::pretty_format_batches(&batches).map_err(arrow)?;
            writeln!(out, "{table}").map_err(io)?;
            writeln!(out, "({rows} row{})", if rows == 1 { "" } else { "s" }).map_err(io)?;
        }
        Format::Csv => {
            let mut w = datafusion::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut *out);
            while let Some(b) = stream.next().await {
                let b = b.map_err(flight_to_status)?;
                rows += b.num_rows();
                w.write(&b).map_err(arrow)?;
            }
        }
        Format::Json => {
            let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut *out);
            while let Some(b) = stream.next().await {
                let b = b.map_err(flight_to_status)?;
                rows += b.num_rows();
                w.write(&b).map_err(arrow)?;
            }
            w.finish().map_err(arrow)?;
        }
    }
    Ok(rows)
}

fn flight_to_status(e: arrow_flight::error::FlightError) -> Error {
    match e {
        arrow_flight::error::FlightError::Tonic(s) => Error::Status(*s),
        other => Error::Output(other.to_string()),
    }
}

/// Decodes an Any-wrapped message (for callers of [`Client::action`]).
pub fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| Error::Output(format!("bad response: {e}")))
}
