//! The Flight SQL service: authentication, planning, streaming and metadata over gRPC.
//!
//! No policy logic lives here. Each RPC authenticates its caller, asks the session
//! layer for the caller's locked-down session, hands SQL to `query`, and streams what
//! comes back. Errors become statuses in exactly one place (`Error::into_status`).

pub mod approvals;
pub mod budget;
pub mod guard;
pub mod handles;
pub mod metadata;
pub mod request_id;

use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionBeginSavepointRequest, ActionBeginSavepointResult, ActionBeginTransactionRequest,
    ActionBeginTransactionResult, ActionClosePreparedStatementRequest,
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    ActionCreatePreparedSubstraitPlanRequest, ActionEndTransactionRequest, Any, CommandGetCatalogs,
    CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandGetXdbcTypeInfo, CommandPreparedStatementQuery, CommandPreparedStatementUpdate,
    CommandStatementIngest, CommandStatementQuery, CommandStatementSubstraitPlan,
    CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage,
    SchemaAsIpc, Ticket,
};
use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::common::ScalarValue;
use futures::{Stream, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::approval::ApprovalStore;
use crate::approval::budget::BudgetLedger;
use crate::audit::{AuditTrail, Event as AuditEvent, RELEASING};
use crate::auth::{Authenticator, Credentials, Principal};
use crate::error::{Error, Result};
use crate::policy::refusal::{ReasonCode, Refusal};
use crate::query;
use crate::session::Sessions;
pub use handles::{Handles, PreparedStatement};
pub use request_id::{RequestId, RequestIdLayer};

type DoGetStream =
    Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send + 'static>>;
type HandshakeStream = Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>;
type ActionStream =
    Pin<Box<dyn Stream<Item = Result<arrow_flight::Result, Status>> + Send + 'static>>;

/// Custom Flight actions (besides Flight SQL's own).
pub mod actions {
    /// Body: SQL text. Result: the privacy explanation as UTF-8 text.
    pub const PRIVACY_EXPLAIN: &str = "PrivacyExplain";
    /// Body: empty. Result: the new policy version as UTF-8 text. Needs `admin` on `*`.
    pub const RELOAD_POLICY: &str = "ReloadPolicy";
    /// Body: empty. Result: JSON `{"principal": ..., "tables": [{"table": "s.t",
    /// "actions": ["aggregate", ...]}], "quota": {...}}`: every table the caller can
    /// see, and what is left of their quotas (`crate::quota::Quotas::remaining`).
    pub const MY_ACCESS: &str = "MyAccess";
}

/// The Flight SQL endpoint.
#[derive(Debug)]
pub struct AirlockService {
    auth: Arc<Authenticator>,
    sessions: Arc<Sessions>,
    users: crate::auth::Users,
    approvals: Arc<dyn ApprovalStore>,
    audit: Arc<dyn AuditTrail>,
    state_dir: std::path::PathBuf,
    handles: Handles,
    /// Planning threads at once (planning runs off the async threads, see [`Self::planning`]).
    planners: Arc<tokio::sync::Semaphore>,
    /// The privacy-budget ledger (in the approvals database).
    ledger: Arc<dyn BudgetLedger>,
    quotas: Arc<crate::quota::Quotas>,
}

/// What each principal may still spend: privacy budget on DP tables, and quotas.
pub struct Allowances {
    pub ledger: Arc<dyn BudgetLedger>,
    pub quotas: Arc<crate::quota::Quotas>,
}

impl AirlockService {
    pub fn new(
        auth: Arc<Authenticator>,
        sessions: Arc<Sessions>,
        users: crate::auth::Users,
        approvals: Arc<dyn ApprovalStore>,
        audit: Arc<dyn AuditTrail>,
        state_dir: std::path::PathBuf,
        allowances: Allowances,
    ) -> Self {
        let Allowances { ledger, quotas } = allowances;
        Self {
            ledger,
            quotas,
            auth,
            users,
            approvals,
            audit,
            planners: Arc::new(tokio::sync::Semaphore::new(
                sessions.limits().max_concurrent_queries,
            )),
            sessions,
            state_dir,
            handles: Handles::default(),
        }
    }

    /// Audits a query that was not released (refused, sent to approval, or failed) and
    /// returns its error, or `AUDIT_UNAVAILABLE` when the record cannot be written: no
    /// answer leaves without its record.
    fn audit_unreleased(
        &self,
        principal: &Principal,
        rid: &RequestId,
        sql: Option<&str>,
        err: Error,
    ) -> Error {
        self.audit_outcome("query", principal, rid, sql, None, err)
    }

    /// [`Self::audit_unreleased`] for any kind of record (`query`, `explain`, `upload`).
    fn audit_outcome(
        &self,
        kind: &str,
        principal: &Principal,
        rid: &RequestId,
        sql: Option<&str>,
        detail: Option<String>,
        err: Error,
    ) -> Error {
        if let Error::AuditUnavailable(_) = err {
            return err;
        }
        let (decision, code) = match &err {
            Error::Refused(r) => (
                match r.code {
                    ReasonCode::ApprovalPending => "approval_pending",
                    ReasonCode::ApprovalDenied => "approval_denied",
                    _ => "refused",
                },
                Some(r.code.as_str().to_string()),
            ),
            _ => ("failed", None),
        };
        let approval = match &err {
            Error::Refused(r) => r
                .message
                .strip_prefix("request ")
                .and_then(|m| m.split(':').next())
                .map(str::to_string),
            _ => None,
        };
        if kind == "query" {
            crate::telemetry::metrics()
                .queries
                .with_label_values(&[decision, code.as_deref().unwrap_or("")])
                .inc();
        }
        let written = self.audit.append_blocking(AuditEvent {
            kind: kind.into(),
            principal: principal.name.clone(),
            request_id: rid.to_string(),
            approval,
            sql_fingerprint: sql.map(sql_fingerprint),
            sql: sql.map(str::to_string),
            decision: decision.into(),
            reason_code: code,
            detail,
            ..Default::default()
        });
        match written {
            Ok(_) => err,
            Err(e) => Error::AuditUnavailable(e),
        }
    }

    /// The caller's principal. Wrong passwords and throttled logins are audited.
    async fn principal<T>(&self, request: &Request<T>) -> Result<Arc<Principal>> {
        let peer = request.remote_addr().map(|a| a.ip());
        let cert = client_certificate(request);
        match self
            .auth
            .authenticate(request.metadata(), peer, cert.as_ref())
            .await
        {
            Ok(principal) => {
                tracing::Span::current().record("principal", principal.name.as_str());
                Ok(principal)
            }
            Err(e) => {
                let user = match Credentials::from_metadata(request.metadata()) {
                    Ok(Credentials::Basic { user, .. }) => user,
                    _ => String::new(),
                };
                Err(self.login_failed(&user, peer, &RequestId::of(request), e))
            }
        }
    }

    /// Audits a failed password login (wrong password, throttled) and returns its error,
    /// or `AUDIT_UNAVAILABLE` when the record cannot be written.
    fn login_failed(
        &self,
        user: &str,
        peer: Option<std::net::IpAddr>,
        rid: &RequestId,
        e: crate::auth::Error,
    ) -> Error {
        let decision = match e {
            crate::auth::Error::InvalidCredentials => "failed",
            crate::auth::Error::RateLimited { .. } => "rate_limited",
            crate::auth::Error::CertificateRequired => "certificate_required",
            _ => return e.into(),
        };
        let written = self.audit.append_blocking(AuditEvent {
            kind: "login".into(),
            // A user name is the client's text: bounded in the record.
            principal: user.chars().take(256).collect(),
            request_id: rid.to_string(),
            decision: decision.into(),
            reason_code: matches!(e, crate::auth::Error::RateLimited { .. })
                .then(|| ReasonCode::RateLimited.as_str().to_string()),
            peer: peer.map(|p| p.to_string()),
            ..Default::default()
        });
        match written {
            Ok(_) => e.into(),
            Err(a) => Error::AuditUnavailable(a),
        }
    }

    /// Runs a planning step (SQL → optimized plan: CPU-bound, and for hostile SQL slow)
    /// on a blocking thread, never on the async threads, under the query timeout, after a
    /// cheap bound on the SQL's size (`query::parse::check_size`). When the caller goes
    /// away or the timeout passes the step is abandoned: it holds one of the
    /// `max_concurrent_queries` planner permits until it ends, so abandoned work is
    /// bounded too.
    async fn planning<T, F>(&self, sql: &str, step: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let limits = self.sessions.limits();
        let timeout = limits.query_timeout;
        let (depth, nodes) = (limits.max_expression_depth, limits.max_expression_nodes);
        let over = || {
            Error::ResourceExhausted(format!(
                "planning exceeded the query time limit of {}",
                humantime::format_duration(timeout)
            ))
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let permit = tokio::time::timeout_at(deadline, Arc::clone(&self.planners).acquire_owned())
            .await
            .map_err(|_| over())?
            .map_err(|_| Error::Internal("planner permits closed".into()))?;
        let sql = sql.to_string();
        let runtime = tokio::runtime::Handle::current();
        let span = tracing::Span::current();
        let task = tokio::task::spawn_blocking(move || {
            use tracing::Instrument;
            let _permit = permit;
            let _entered = span.enter();
            query::parse::check_size(&sql, depth, nodes)?;
            runtime.block_on(step.in_current_span())
        });
        match tokio::time::timeout_at(deadline, task).await {
            Err(_) => Err(over()),
            Ok(Err(e)) => Err(Error::Internal(format!("planning task: {e}"))),
            Ok(Ok(result)) => result,
        }
    }

    /// A FlightInfo whose one endpoint's ticket is `ticket`; no counts (-1), ever.
    fn flight_info(
        schema: &Schema,
        ticket: Bytes,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo> {
        Ok(FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Error::Internal(format!("encoding a schema: {e}")))?
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
            .with_descriptor(descriptor))
    }

    /// FlightInfo for a metadata command: the ticket is the command itself.
    async fn metadata_info<T>(
        &self,
        cmd: impl ProstMessageExt,
        schema: &Schema,
        request: Request<T>,
    ) -> Result<FlightInfo>
    where
        T: Into<FlightDescriptor>,
    {
        self.principal(&request).await?;
        let ticket = Bytes::from(cmd.as_any().encode_to_vec());
        Self::flight_info(schema, ticket, request.into_inner().into())
    }

    /// Plans SQL for the caller, keeps the plan server-side and answers with its ticket.
    async fn plan_to_info_audited(
        &self,
        principal: &Arc<Principal>,
        rid: &RequestId,
        sql: &str,
        params: Option<&[ScalarValue]>,
        descriptor: FlightDescriptor,
        epsilon: Option<f64>,
    ) -> Result<FlightInfo> {
        self.plan_to_info(principal, sql, params, descriptor, epsilon)
            .await
            .map_err(|e| self.audit_unreleased(principal, rid, Some(sql), e))
    }

    /// Plans `sql` with approvals, off the async threads (see [`Self::planning`]).
    async fn plan_query(
        &self,
        principal: &Arc<Principal>,
        sql: &str,
        params: Option<&[ScalarValue]>,
    ) -> Result<query::PlannedQuery> {
        self.quotas.start_query(&principal.name)?;
        let session = self.sessions.session_for(principal);
        let approvals = Arc::clone(&self.approvals);
        let owned_sql = sql.to_string();
        let params = params.map(<[ScalarValue]>::to_vec);
        let bound = params
            .as_deref()
            .filter(|p| !p.is_empty())
            .map(query::params_key);
        let mut planned = self
            .planning(sql, async move {
                query::plan_with_approvals(
                    session,
                    &owned_sql,
                    params.as_deref(),
                    approvals.as_ref(),
                )
                .await
            })
            .await?;
        planned.params = bound;
        Ok(planned)
    }

    async fn plan_to_info(
        &self,
        principal: &Arc<Principal>,
        sql: &str,
        params: Option<&[ScalarValue]>,
        descriptor: FlightDescriptor,
        epsilon: Option<f64>,
    ) -> Result<FlightInfo> {
        let planned = self.plan_query(principal, sql, params).await?;
        self.info_for(planned, epsilon, descriptor)
    }

    /// Keeps a planned query server-side and answers with its ticket.
    fn info_for(
        &self,
        mut planned: query::PlannedQuery,
        epsilon: Option<f64>,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo> {
        planned.epsilon = epsilon;
        let schema = Arc::clone(&planned.schema);
        let handle = self.handles.put_query(planned);
        let ticket = TicketStatementQuery {
            statement_handle: handle,
        };
        Self::flight_info(
            &schema,
            Bytes::from(ticket.as_any().encode_to_vec()),
            descriptor,
        )
    }

    /// Runs a planned query and streams it; failures are audited.
    async fn run_planned(
        &self,
        planned: &query::PlannedQuery,
        rid: RequestId,
    ) -> Result<DoGetStream> {
        self.release(planned, rid.clone())
            .await
            .map_err(|e| self.audit_unreleased(planned.principal(), &rid, Some(&planned.sql), e))
    }

    /// Starts a release: the record that authorises it is on disk before its first batch
    /// can leave (refused with `AUDIT_UNAVAILABLE` when it cannot be written); the record
    /// of how it ended follows when the stream is done with. A stream whose client stops
    /// reading for `limits.stream_idle_timeout` is cancelled.
    async fn release(&self, planned: &query::PlannedQuery, rid: RequestId) -> Result<DoGetStream> {
        let audit = Arc::clone(&self.audit);
        let event = AuditEvent {
            kind: "query".into(),
            principal: planned.principal().name.clone(),
            request_id: rid.to_string(),
            approval: planned.approval.clone(),
            sql_fingerprint: Some(sql_fingerprint(&planned.sql)),
            sql: Some(planned.sql.clone()),
            params: planned.params.clone(),
            decision: if planned.approval.is_some() {
                "released_approved"
            } else {
                "released"
            }
            .into(),
            ..Default::default()
        };
        // A DP query is charged before it reads data (§5b); every charge is audited.
        // A charge is spent even if its record then fails: nothing is released without it.
        let charged = query::dp::charge(planned, self.ledger.as_ref(), &self.sessions.catalog())
            .await
            .map_err(|e| self.audit_unreleased(planned.principal(), &rid, Some(&planned.sql), e))?;
        if let Some(c) = &charged {
            self.audit
                .append(AuditEvent {
                    kind: "budget".into(),
                    decision: if c.repeat { "repeat" } else { "charged" }.into(),
                    privacy_budget: Some(c.describe()),
                    ..event.clone()
                })
                .await
                .map_err(Error::AuditUnavailable)?;
        }
        let started = std::time::Instant::now();
        let quota = self.quotas.open_release(&planned.principal().name)?;
        let mut stream = query::execute(planned, &self.sessions)
            .await?
            .with_quota(quota);
        if let Some(c) = &charged {
            // One answer per charged identity: kept before it leaves, served to repeats.
            let ledger = Arc::clone(&self.ledger);
            stream = stream.map_batches(|s| query::dp::answer_once(s, ledger, c));
        }
        // Nothing leaves before this record is on disk. Dropping the stream on error
        // releases nothing (no end record: it never started).
        self.audit
            .append(AuditEvent {
                decision: RELEASING.into(),
                ..event.clone()
            })
            .await
            .map_err(Error::AuditUnavailable)?;
        let stream = stream.on_finish(move |o| {
            let m = crate::telemetry::metrics();
            m.queries
                .with_label_values(&[event.decision.as_str(), ""])
                .inc();
            m.latency
                .with_label_values(&[event.decision.as_str()])
                .observe(started.elapsed().as_secs_f64());
            m.groups_suppressed.inc_by(o.groups_suppressed);
            audit.record(AuditEvent {
                decision: if o.completed {
                    event.decision.clone()
                } else {
                    format!("{}_incomplete", event.decision)
                },
                reason_code: o
                    .quota_exceeded
                    .then(|| ReasonCode::QuotaExceeded.as_str().to_string()),
                groups_suppressed: Some(o.groups_suppressed),
                rows_released: Some(o.rows),
                bytes_released: Some(o.bytes),
                ..event
            });
        });
        let schema = Arc::clone(stream.schema());
        let rid_for_errors = rid.clone();
        let batches = stream
            .detach(self.sessions.limits().stream_idle_timeout)
            .map_err(move |e| FlightError::Tonic(Box::new(e.into_status(&rid_for_errors))));
        let flight = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(move |e| flight_error_to_status(e, &rid));
        Ok(Box::pin(flight))
    }
}

fn flight_error_to_status(e: FlightError, rid: &RequestId) -> Status {
    match e {
        FlightError::Tonic(status) => *status,
        other => Error::Internal(format!("encoding results: {other}")).into_status(rid),
    }
}

fn one_batch(batch: RecordBatch) -> DoGetStream {
    let schema = batch.schema();
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async move { Ok(batch) }))
        .map_err(|e| flight_error_to_status(e, &RequestId::new()));
    Box::pin(stream)
}

fn ipc_schema(schema: &Schema) -> Result<Bytes> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e| Error::Internal(format!("encoding a schema: {e}")))?;
    Ok(bytes)
}

/// The ε a client asked to spend (the `airlock-epsilon` call header), if any.
fn epsilon_of<T>(request: &Request<T>) -> Result<Option<f64>> {
    let value = match request.metadata().get(query::dp::EPSILON_HEADER) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            Error::InvalidRequest(format!("{} is not text", query::dp::EPSILON_HEADER))
        })?),
    };
    query::dp::parse_epsilon(value)
}

fn refuse<T>(code: ReasonCode, message: &str) -> Result<T> {
    Err(Refusal::new(code, message).into())
}

/// Runs a handler body and maps its error through the one mapping.
async fn respond<T>(rid: &RequestId, body: impl Future<Output = Result<T>>) -> Result<T, Status> {
    body.await.map_err(|e| e.into_status(rid))
}

#[tonic::async_trait]
impl FlightSqlService for AirlockService {
    type FlightService = AirlockService;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<HandshakeStream>, Status> {
        let rid = RequestId::of(&request);
        let cert = client_certificate(&request);
        let token = respond(&rid, async {
            let principal = match Credentials::from_metadata(request.metadata()) {
                Ok(_) => self.principal(&request).await?,
                // A certificate login: no password, no handshake payload to read.
                Err(crate::auth::Error::MissingCredentials)
                    if cert
                        .as_ref()
                        .is_some_and(|c| self.auth.principal_for_certificate(c).is_ok()) =>
                {
                    self.principal(&request).await?
                }
                Err(crate::auth::Error::MissingCredentials) => {
                    // Older clients send BasicAuth in the first handshake message.
                    let peer = request.remote_addr().map(|a| a.ip());
                    let mut stream = request.into_inner();
                    let first = stream
                        .message()
                        .await
                        .map_err(|_| crate::auth::Error::MissingCredentials)?
                        .ok_or(crate::auth::Error::MissingCredentials)?;
                    let basic = arrow_flight::BasicAuth::decode(first.payload)
                        .map_err(|_| crate::auth::Error::MissingCredentials)?;
                    if basic.username.is_empty() {
                        return Err(crate::auth::Error::MissingCredentials.into());
                    }
                    let p = match self
                        .auth
                        .verify_password(&basic.username, &basic.password, peer, cert.as_ref())
                        .await
                    {
                        Ok(p) => p,
                        Err(e) => return Err(self.login_failed(&basic.username, peer, &rid, e)),
                    };
                    tracing::Span::current().record("principal", p.name.as_str());
                    p
                }
                Err(e) => return Err(e.into()),
            };
            tracing::info!("handshake: token issued");
            Ok(self.auth.issue_token(principal, cert.as_ref()).await?)
        })
        .await?;
        let response = HandshakeResponse {
            protocol_version: 0,
            payload: Bytes::from(token.clone().into_bytes()),
        };
        let mut resp: Response<HandshakeStream> =
            Response::new(Box::pin(futures::stream::iter(vec![Ok(response)])));
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Internal("token is not a header value".into()).into_status(&rid))?;
        resp.metadata_mut().insert("authorization", header);
        Ok(resp)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            let principal = self.principal(&request).await?;
            if query.transaction_id.is_some() {
                return Err(Error::Unimplemented(
                    "transactions are not supported: the service is read-only".into(),
                ));
            }
            let epsilon = epsilon_of(&request)?;
            self.plan_to_info_audited(
                &principal,
                &rid,
                &query.query,
                None,
                request.into_inner(),
                epsilon,
            )
            .await
        })
        .await
        .map(Response::new)
    }

    async fn get_flight_info_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            refuse(
                ReasonCode::SubstraitNotAllowed,
                "Substrait plans are not accepted (a read relation can name any file); send SQL",
            )
        })
        .await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            let principal = self.principal(&request).await?;
            let stmt = self
                .handles
                .prepared(&cmd.prepared_statement_handle, &principal)?;
            let epsilon = epsilon_of(&request)?;
            if let Some(planned) = self
                .handles
                .take_first_run(&cmd.prepared_statement_handle, &principal)
                .filter(|p| Arc::ptr_eq(&p.session, &self.sessions.session_for(&principal)))
            {
                // Planned when it was prepared, in the session it would be planned in now.
                self.quotas.start_query(&principal.name).map_err(|e| {
                    self.audit_unreleased(&principal, &rid, Some(&stmt.sql), e.into())
                })?;
                return self.info_for(planned, epsilon, request.into_inner());
            }
            let params = params_for(&stmt)?;
            self.plan_to_info_audited(
                &principal,
                &rid,
                &stmt.sql,
                params.as_deref(),
                request.into_inner(),
                epsilon,
            )
            .await
        })
        .await
        .map(Response::new)
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        let schema = query.into_builder().schema();
        respond(&rid, self.metadata_info(query, &schema, request))
            .await
            .map(Response::new)
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        let schema = query.clone().into_builder().schema();
        respond(&rid, self.metadata_info(query, &schema, request))
            .await
            .map(Response::new)
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        let schema = metadata::tables_schema(query.clone());
        respond(&rid, self.metadata_info(query, &schema, request))
            .await
            .map(Response::new)
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        let schema = query.into_builder().schema();
        respond(&rid, self.metadata_info(query, &schema, request))
            .await
            .map(Response::new)
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        let schema = metadata::sql_info().schema();
        respond(&rid, self.metadata_info(query, &schema, request))
            .await
            .map(Response::new)
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        let schema = metadata::primary_keys_schema();
        respond(&rid, self.metadata_info(query, &schema, request))
            .await
            .map(Response::new)
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        let schema = metadata::foreign_keys_schema();
        respond(&rid, self.metadata_info(query, &schema, request))
            .await
            .map(Response::new)
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        let schema = metadata::foreign_keys_schema();
        respond(&rid, self.metadata_info(query, &schema, request))
            .await
            .map(Response::new)
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        let schema = metadata::foreign_keys_schema();
        respond(&rid, self.metadata_info(query, &schema, request))
            .await
            .map(Response::new)
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let rid = RequestId::of(&request);
        let schema = metadata::xdbc_type_info().schema();
        respond(&rid, self.metadata_info(query, &schema, request))
            .await
            .map(Response::new)
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            let principal = self.principal(&request).await?;
            let planned = self
                .handles
                .take_query(&ticket.statement_handle, &principal)
                .map_err(|e| self.audit_unreleased(&principal, &rid, None, e))?;
            self.run_planned(&planned, rid.clone()).await
        })
        .await
        .map(Response::new)
    }

    async fn do_get_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            let principal = self.principal(&request).await?;
            let stmt = self
                .handles
                .prepared(&cmd.prepared_statement_handle, &principal)
                .map_err(|e| self.audit_unreleased(&principal, &rid, None, e))?;
            let mut planned = async {
                let params = params_for(&stmt)?;
                self.plan_query(&principal, &stmt.sql, params.as_deref())
                    .await
            }
            .await
            .map_err(|e| self.audit_unreleased(&principal, &rid, Some(&stmt.sql), e))?;
            planned.epsilon = epsilon_of(&request)?;
            self.run_planned(&planned, rid.clone()).await
        })
        .await
        .map(Response::new)
    }

    async fn do_get_catalogs(
        &self,
        _query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            metadata::catalogs()
        })
        .await
        .map(|b| Response::new(one_batch(b)))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            let principal = self.principal(&request).await?;
            let session = self.sessions.session_for(&principal);
            metadata::db_schemas(&session, query).await
        })
        .await
        .map(|b| Response::new(one_batch(b)))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            let principal = self.principal(&request).await?;
            let session = self.sessions.session_for(&principal);
            metadata::tables(&session, query).await
        })
        .await
        .map(|b| Response::new(one_batch(b)))
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            metadata::table_types()
        })
        .await
        .map(|b| Response::new(one_batch(b)))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            query
                .into_builder(metadata::sql_info())
                .build()
                .map_err(|e| Error::Internal(format!("sql info: {e}")))
        })
        .await
        .map(|b| Response::new(one_batch(b)))
    }

    async fn do_get_primary_keys(
        &self,
        _query: CommandGetPrimaryKeys,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            Ok(RecordBatch::new_empty(metadata::primary_keys_schema()))
        })
        .await
        .map(|b| Response::new(one_batch(b)))
    }

    async fn do_get_exported_keys(
        &self,
        _query: CommandGetExportedKeys,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.empty_foreign_keys(request).await
    }

    async fn do_get_imported_keys(
        &self,
        _query: CommandGetImportedKeys,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.empty_foreign_keys(request).await
    }

    async fn do_get_cross_reference(
        &self,
        _query: CommandGetCrossReference,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.empty_foreign_keys(request).await
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            query
                .into_builder(metadata::xdbc_type_info())
                .build()
                .map_err(|e| Error::Internal(format!("type info: {e}")))
        })
        .await
        .map(|b| Response::new(one_batch(b)))
    }

    async fn do_get_fallback(
        &self,
        request: Request<Ticket>,
        message: Any,
    ) -> Result<Response<DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            Err(Error::InvalidRequest(format!(
                "unsupported ticket type {}",
                message.type_url
            )))
        })
        .await
    }

    async fn do_put_statement_update(
        &self,
        _cmd: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            refuse(
                ReasonCode::StatementNotAllowed,
                "the service is read-only: only queries may run",
            )
        })
        .await
    }

    async fn do_put_prepared_statement_update(
        &self,
        _cmd: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            refuse(
                ReasonCode::StatementNotAllowed,
                "the service is read-only: only queries may run",
            )
        })
        .await
    }

    async fn do_put_substrait_plan(
        &self,
        _cmd: CommandStatementSubstraitPlan,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            refuse(
                ReasonCode::SubstraitNotAllowed,
                "Substrait plans are not accepted; send SQL",
            )
        })
        .await
    }

    async fn do_put_statement_ingest(
        &self,
        cmd: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            let principal = self.principal(&request).await?;
            let stream = request.into_inner().map_err(FlightError::from);
            let batches = FlightRecordBatchStream::new_from_flight_data(stream);
            // The record of an accepted upload is written before the table is served.
            let record = |table: &crate::config::TableName, rows: i64| {
                self.audit
                    .append_blocking(AuditEvent {
                        kind: "upload".into(),
                        principal: principal.name.clone(),
                        request_id: rid.to_string(),
                        decision: "ingested".into(),
                        rows_released: Some(rows.max(0) as u64),
                        detail: Some(format!("table {table}")),
                        ..Default::default()
                    })
                    .map(|_| ())
                    .map_err(Error::AuditUnavailable)
            };
            let detail: String = format!(
                "table {}.{}",
                cmd.schema
                    .as_deref()
                    .unwrap_or(crate::ingest::DEFAULT_SCHEMA),
                cmd.table
            )
            .chars()
            .take(200)
            .collect();
            crate::ingest::ingest(
                &self.sessions,
                &self.state_dir,
                &principal,
                cmd,
                batches,
                record,
            )
            .await
            .map_err(|e| self.audit_outcome("upload", &principal, &rid, None, Some(detail), e))
        })
        .await
    }

    async fn do_put_prepared_statement_query(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            let principal = self.principal(&request).await?;
            // Check ownership before reading anything the client sends.
            self.handles
                .prepared(&cmd.prepared_statement_handle, &principal)?;
            // Read at most `max_parameter_bytes`, and stop at the second row: one row of
            // parameters is all a query takes.
            let max = self.sessions.limits().max_parameter_bytes;
            let mut seen = 0usize;
            let stream = request
                .into_inner()
                .map_err(FlightError::from)
                .and_then(move |d| {
                    seen += d.data_header.len() + d.data_body.len() + d.app_metadata.len();
                    futures::future::ready(if seen > max {
                        Err(FlightError::ProtocolError(format!(
                            "the parameters exceed the limit of {}",
                            bytesize::ByteSize::b(max as u64)
                        )))
                    } else {
                        Ok(d)
                    })
                });
            let mut reader = FlightRecordBatchStream::new_from_flight_data(stream);
            let mut batches: Vec<RecordBatch> = Vec::new();
            while let Some(batch) = reader
                .try_next()
                .await
                .map_err(|e| Error::InvalidRequest(format!("cannot read parameters: {e}")))?
            {
                batches.push(batch);
                if batches.iter().map(RecordBatch::num_rows).sum::<usize>() > 1 {
                    break;
                }
            }
            let params = first_row(&batches)?;
            self.handles
                .bind(&cmd.prepared_statement_handle, &principal, params)?;
            Ok(DoPutPreparedStatementResult {
                prepared_statement_handle: Some(cmd.prepared_statement_handle),
            })
        })
        .await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            let principal = self.principal(&request).await?;
            if query.transaction_id.is_some() {
                return Err(Error::Unimplemented(
                    "transactions are not supported: the service is read-only".into(),
                ));
            }
            let session = self.sessions.session_for(&principal);
            let sql = query.query.clone();
            let (prepared, planned) = self
                .planning(
                    &query.query,
                    async move { query::prepare(session, &sql).await },
                )
                .await
                .map_err(|e| self.audit_unreleased(&principal, &rid, Some(&query.query), e))?;
            let dataset_schema = ipc_schema(&prepared.dataset_schema)?;
            let parameter_schema = ipc_schema(&prepared.parameter_schema)?;
            let handle = self.handles.put_prepared(
                PreparedStatement {
                    principal,
                    sql: query.query,
                    prepared,
                    params: None,
                },
                planned,
            );
            Ok(ActionCreatePreparedStatementResult {
                prepared_statement_handle: handle,
                dataset_schema,
                parameter_schema,
            })
        })
        .await
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            let principal = self.principal(&request).await?;
            self.handles
                .close_prepared(&query.prepared_statement_handle, &principal)
        })
        .await
    }

    async fn do_action_create_prepared_substrait_plan(
        &self,
        _query: ActionCreatePreparedSubstraitPlanRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            refuse(
                ReasonCode::SubstraitNotAllowed,
                "Substrait plans are not accepted; send SQL",
            )
        })
        .await
    }

    async fn do_action_begin_transaction(
        &self,
        _query: ActionBeginTransactionRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionBeginTransactionResult, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            Err(Error::Unimplemented(
                "transactions are not supported: the service is read-only".into(),
            ))
        })
        .await
    }

    async fn do_action_end_transaction(
        &self,
        _query: ActionEndTransactionRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            Err(Error::Unimplemented(
                "transactions are not supported: the service is read-only".into(),
            ))
        })
        .await
    }

    async fn do_action_begin_savepoint(
        &self,
        _query: ActionBeginSavepointRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionBeginSavepointResult, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            Err(Error::Unimplemented(
                "savepoints are not supported: the service is read-only".into(),
            ))
        })
        .await
    }

    async fn do_action_fallback(
        &self,
        request: Request<arrow_flight::Action>,
    ) -> Result<Response<ActionStream>, Status> {
        let rid = RequestId::of(&request);
        let body = respond(&rid, async {
            let principal = self.principal(&request).await?;
            let action = request.into_inner();
            match action.r#type.as_str() {
                actions::PRIVACY_EXPLAIN => {
                    let sql = std::str::from_utf8(&action.body).map_err(|_| {
                        Error::InvalidRequest("the body must be SQL text (UTF-8)".into())
                    })?;
                    let session = self.sessions.session_for(&principal);
                    let owned = sql.to_string();
                    let explained = self
                        .planning(
                            sql,
                            async move { query::explain_privacy(session, &owned).await },
                        )
                        .await
                        .map_err(|e| {
                            self.audit_outcome("explain", &principal, &rid, Some(sql), None, e)
                        })?;
                    self.audit
                        .append(AuditEvent {
                            kind: "explain".into(),
                            principal: principal.name.clone(),
                            request_id: rid.to_string(),
                            sql_fingerprint: Some(sql_fingerprint(sql)),
                            sql: Some(sql.to_string()),
                            decision: "explained".into(),
                            ..Default::default()
                        })
                        .await
                        .map_err(Error::AuditUnavailable)?;
                    Ok(explained)
                }
                actions::MY_ACCESS => {
                    let policy = self.sessions.policy().current();
                    let catalog = self.sessions.catalog();
                    let mut access: Vec<serde_json::Value> = Vec::new();
                    for (t, _) in catalog
                        .tables()
                        .filter(|(t, _)| policy.can_see(&principal, t))
                    {
                        let actions: Vec<&str> = crate::policy::Action::ALL
                            .into_iter()
                            .filter(|a| policy.allows(&principal, t, *a))
                            .map(crate::policy::Action::as_str)
                            .collect();
                        let mut entry =
                            serde_json::json!({ "table": t.to_string(), "actions": actions });
                        // DP tables: the release mode and what is left of the budget.
                        if policy.tables.get(t).and_then(|p| p.dp()).is_some() {
                            entry["release"] = "dp".into();
                            entry["budget"] = budget::remaining_json(
                                self.ledger.as_ref(),
                                &policy,
                                &principal.name,
                                &principal.roles,
                                &t.schema,
                            )
                            .await
                            .ok()
                            .flatten()
                            .unwrap_or(serde_json::Value::Null);
                        }
                        access.push(entry);
                    }
                    Ok(serde_json::json!({
                        "principal": principal.name,
                        "tables": access,
                        "quota": self.quotas.remaining(&principal.name),
                    })
                    .to_string())
                }
                actions::RELOAD_POLICY => {
                    if !self
                        .sessions
                        .policy()
                        .current()
                        .is_service_admin(&principal)
                    {
                        return refuse(
                            ReasonCode::AccessDenied,
                            "reloading the policy needs the admin action on *",
                        );
                    }
                    let catalog = self.sessions.catalog();
                    match self.sessions.policy().reload(&self.users, &catalog).await {
                        Ok(snapshot) => Ok(format!(
                            "policy version {} ({})",
                            snapshot.version, snapshot.digest
                        )),
                        Err(d) => Err(Error::InvalidRequest(format!(
                            "the policy was not reloaded; the last good one stays in force:\n{d}"
                        ))),
                    }
                }
                other if budget::is_action(other) => {
                    let policy = self.sessions.policy().current();
                    budget::handle(
                        other,
                        &action.body,
                        &principal,
                        &policy,
                        self.ledger.as_ref(),
                        self.audit.as_ref(),
                        &rid.to_string(),
                    )
                    .await
                    .unwrap_or_else(|| {
                        Err(Error::InvalidRequest(format!("unknown action {other:?}")))
                    })
                }
                other => match approvals::handle(
                    other,
                    &action.body,
                    &principal,
                    &self.sessions,
                    self.approvals.as_ref(),
                    self.audit.as_ref(),
                    &rid,
                )
                .await
                {
                    Some(result) => result,
                    None => Err(Error::InvalidRequest(format!("unknown action {other:?}"))),
                },
            }
        })
        .await?;
        let result = arrow_flight::Result {
            body: Bytes::from(body.into_bytes()),
        };
        Ok(Response::new(Box::pin(futures::stream::iter(vec![Ok(
            result,
        )]))))
    }

    async fn list_custom_actions(&self) -> Option<Vec<Result<arrow_flight::ActionType, Status>>> {
        let described: [(&str, &str); 11] = [
            (
                budget::LIST,
                "Privacy budgets: charges and ε/δ spent per principal and dataset (admin on *); JSON",
            ),
            (
                budget::SHOW,
                "What is left of a principal's privacy budget (body: {\"principal\", \"dataset\", \"roles\"}); JSON",
            ),
            (
                budget::GRANT,
                "Add ε/δ to a principal's budget (body: {\"principal\", \"dataset\", \"epsilon\", \"delta\"}); audited",
            ),
            (
                actions::PRIVACY_EXPLAIN,
                "Explain in plain words how the privacy policy rewrites a query (body: SQL); shows no data",
            ),
            (
                actions::MY_ACCESS,
                "The tables you can see, the actions you hold on each, and what is left of your quotas; JSON",
            ),
            (
                approvals::LIST,
                "List approval requests you may decide (body: {\"pending\": bool}); JSON",
            ),
            (
                approvals::SHOW,
                "Show one request: who, when, SQL, rewritten plan, reasons, rows it would release",
            ),
            (
                approvals::APPROVE,
                "Approve a request (body: {\"id\", \"max_rows\"?, \"expires_in_secs\"?, \"reusable\"?})",
            ),
            (
                approvals::DENY,
                "Deny a request with a reason (body: {\"id\", \"reason\"})",
            ),
            (
                approvals::STATUS,
                "The status of a request, for clients that poll (body: {\"id\"})",
            ),
            (
                actions::RELOAD_POLICY,
                "Reload the policy directory atomically (admin on *); a bad policy leaves the last good one",
            ),
        ];
        Some(
            described
                .into_iter()
                .map(|(kind, description)| {
                    Ok(arrow_flight::ActionType {
                        r#type: kind.into(),
                        description: description.into(),
                    })
                })
                .collect(),
        )
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

impl AirlockService {
    async fn empty_foreign_keys(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let rid = RequestId::of(&request);
        respond(&rid, async {
            self.principal(&request).await?;
            Ok(RecordBatch::new_empty(metadata::foreign_keys_schema()))
        })
        .await
        .map(|b| Response::new(one_batch(b)))
    }

    /// The tonic service, ready to add to a server (behind [`guard::Guarded`]).
    pub fn into_server(
        self,
    ) -> arrow_flight::flight_service_server::FlightServiceServer<guard::Guarded> {
        arrow_flight::flight_service_server::FlightServiceServer::new(guard::Guarded(Arc::new(
            self,
        )))
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024)
    }
}

/// The parameters a prepared statement will run with.
fn params_for(stmt: &PreparedStatement) -> Result<Option<Vec<ScalarValue>>> {
    let wanted = stmt.prepared.parameter_schema.fields().len();
    match (&stmt.params, wanted) {
        (None, 0) => Ok(None),
        (None, n) => Err(Error::InvalidRequest(format!(
            "the statement takes {n} parameter(s); bind them first"
        ))),
        (Some(p), _) => Ok(Some(p.clone())),
    }
}

/// One row of bound parameters as scalars.
fn first_row(batches: &[RecordBatch]) -> Result<Vec<ScalarValue>> {
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    if rows != 1 {
        return Err(Error::InvalidRequest(format!(
            "bind exactly one row of parameters to a query (got {rows})"
        )));
    }
    let batch = batches.iter().find(|b| b.num_rows() == 1).expect("one row");
    batch
        .columns()
        .iter()
        .map(|c| {
            ScalarValue::try_from_array(c, 0)
                .map_err(|e| Error::InvalidRequest(format!("bad parameter: {e}")))
        })
        .collect()
}

/// The client certificate of the call's connection (mutual TLS), already verified
/// against `[tls] client_ca` by the TLS layer.
fn client_certificate<T>(request: &Request<T>) -> Option<crate::auth::ClientCertificate> {
    let certs = request.peer_certs()?;
    crate::auth::ClientCertificate::from_der(certs.first()?.as_ref())
}

/// The SQL fingerprint recorded in the audit log: a hash of the text as sent.
fn sql_fingerprint(sql: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(sql.trim().as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}
