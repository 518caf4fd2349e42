//! The service's error type and the one place that turns errors into gRPC statuses.
//!
//! Every module that can fail has its own error enum; they meet here. [`Error::into_status`]
//! is an exhaustive match with no catch-all arm, so a new error kind is a compile error
//! until someone decides which status it maps to. Internal faults reach the client as a
//! request id only; their details go to the log.

use datafusion::error::DataFusionError;
use tonic::{Code, Status};

use crate::auth;
use crate::flight::RequestId;
use crate::policy::refusal::{ReasonCode, Refusal, find_refusal};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Header carrying a refusal's stable reason code next to the status message.
pub const REASON_CODE_HEADER: &str = "airlock-reason-code";
/// Header carrying the request id of every failed call.
pub const REQUEST_ID_HEADER: &str = "airlock-request-id";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Missing, malformed or wrong credentials.
    #[error(transparent)]
    Auth(#[from] auth::Error),

    /// A policy decision: the statement or result is not allowed.
    #[error(transparent)]
    Refused(#[from] Refusal),

    /// The request itself is malformed: a bad ticket, an unknown handle, bad parameters.
    #[error("{0}")]
    InvalidRequest(String),

    /// The SQL does not parse or plan (syntax error, unknown table or column, type error).
    #[error("{0}")]
    Query(String),

    /// A limit was hit: query timeout, memory per query, concurrency.
    #[error("{0}")]
    ResourceExhausted(String),

    /// A Flight SQL feature this service deliberately does not offer.
    #[error("{0}")]
    Unimplemented(String),

    /// A failure while computing a result. The cause may carry data values (a failed cast
    /// echoes its input), so it is logged, never sent.
    #[error("query failed during execution")]
    Execution(#[source] DataFusionError),

    /// A worker of the cluster was lost during the query (`crate::cluster`): the query
    /// failed; retrying is safe. Details are logged, never sent.
    #[error("a cluster worker was lost during the query")]
    WorkerLost(#[source] DataFusionError),

    /// The audit trail cannot record what the request would do: nothing is released.
    /// Details (the I/O error) are logged, never sent.
    #[error("the audit trail cannot be written")]
    AuditUnavailable(#[source] crate::audit::Error),

    /// A fault of the service itself; details are logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Where a DataFusion error happened: errors raised while planning describe the SQL the
/// client sent; errors raised while executing may describe data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Planning,
    Execution,
}

impl Error {
    /// An approval or budget store's failure: the shared state not answering is the
    /// audit trail not answering (nothing is released unaudited); anything else is a
    /// fault of the service.
    pub fn from_store(err: crate::approval::Error) -> Self {
        match err {
            crate::approval::Error::Shared(e) => {
                Error::AuditUnavailable(crate::audit::Error::Shared(e))
            }
            other => Error::Internal(other.to_string()),
        }
    }

    /// Classifies a DataFusion error without ever copying a runtime message to the client.
    pub fn from_datafusion(err: DataFusionError, phase: Phase) -> Self {
        if let Some(refusal) = find_refusal(&err) {
            return Error::Refused(refusal.clone());
        }
        if let Some(msg) = resources_exhausted(&err) {
            return Error::ResourceExhausted(msg);
        }
        match phase {
            Phase::Execution if lost_worker(&err) => Error::WorkerLost(err),
            Phase::Execution => Error::Execution(err),
            Phase::Planning => match root(&err) {
                DataFusionError::SQL(..)
                | DataFusionError::Plan(_)
                | DataFusionError::SchemaError(..)
                | DataFusionError::NotImplemented(_)
                | DataFusionError::Configuration(_) => Error::Query(root(&err).strip_backtrace()),
                _ => Error::Internal(err.to_string()),
            },
        }
    }

    /// The single mapping from errors to gRPC statuses.
    pub fn into_status(self, request_id: &RequestId) -> Status {
        let mut retry = None;
        let (code, message, reason) = match self {
            Error::Auth(e @ auth::Error::RateLimited { retry_after_secs }) => {
                retry = Some(std::time::Duration::from_secs(retry_after_secs));
                (
                    Code::ResourceExhausted,
                    format!("[{}] {e}", ReasonCode::RateLimited),
                    Some(ReasonCode::RateLimited.as_str()),
                )
            }
            Error::Auth(
                e @ (auth::Error::MissingCredentials
                | auth::Error::Malformed
                | auth::Error::InvalidCredentials
                | auth::Error::InvalidToken
                | auth::Error::CertificateRequired),
            ) => (Code::Unauthenticated, e.to_string(), None),
            Error::Auth(e @ auth::Error::StateUnavailable) => (
                Code::Unavailable,
                format!("[{}] {e}", ReasonCode::AuditUnavailable),
                Some(ReasonCode::AuditUnavailable.as_str()),
            ),
            // Retryable: the service refuses until its audit trail can be written again.
            Error::Refused(r) if r.code == ReasonCode::AuditUnavailable => {
                (Code::Unavailable, r.to_string(), Some(r.code.as_str()))
            }
            // Quotas: the caller may try again later (gRPC RetryInfo says when).
            Error::Refused(r)
                if matches!(r.code, ReasonCode::RateLimited | ReasonCode::QuotaExceeded) =>
            {
                retry = r.retry_after;
                (
                    Code::ResourceExhausted,
                    r.to_string(),
                    Some(r.code.as_str()),
                )
            }
            Error::Refused(r) => (Code::PermissionDenied, r.to_string(), Some(r.code.as_str())),
            Error::InvalidRequest(m) => (Code::InvalidArgument, m, None),
            Error::Query(m) => (Code::InvalidArgument, m, None),
            Error::ResourceExhausted(m) => (Code::ResourceExhausted, m, None),
            Error::Unimplemented(m) => (Code::Unimplemented, m, None),
            Error::Execution(e) => {
                tracing::warn!(request_id = %request_id, error = %e, "query failed during execution");
                (
                    Code::Internal,
                    format!("query failed during execution (request id {request_id})"),
                    None,
                )
            }
            Error::WorkerLost(e) => {
                tracing::warn!(request_id = %request_id, error = %e, "a cluster worker was lost during a query");
                (
                    Code::Unavailable,
                    format!(
                        "a worker of the cluster was lost during the query; it failed, and retrying is safe (request id {request_id})"
                    ),
                    None,
                )
            }
            Error::AuditUnavailable(e) => {
                tracing::error!(request_id = %request_id, error = %e, "audit trail unavailable; refused");
                let r = ReasonCode::AuditUnavailable;
                (
                    Code::Unavailable,
                    format!(
                        "[{r}] the audit trail cannot be written; nothing is released until it can (request id {request_id})"
                    ),
                    Some(r.as_str()),
                )
            }
            Error::Internal(m) => {
                tracing::error!(request_id = %request_id, error = %m, "internal error");
                (
                    Code::Internal,
                    format!("internal error (request id {request_id})"),
                    None,
                )
            }
        };
        let mut status = match retry {
            Some(after) => {
                use tonic_types::{ErrorDetails, StatusExt};
                Status::with_error_details(
                    code,
                    message,
                    ErrorDetails::with_retry_info(Some(after)),
                )
            }
            None => Status::new(code, message),
        };
        if let Ok(v) = request_id.to_string().parse() {
            status.metadata_mut().insert(REQUEST_ID_HEADER, v);
        }
        if let Some(reason) = reason {
            status.metadata_mut().insert(
                REASON_CODE_HEADER,
                tonic::metadata::MetadataValue::from_static(reason),
            );
        }
        status
    }
}

/// The error under any context, diagnostic or sharing wrapper; the first of a collection
/// (the planner reports several problems of one query that way).
fn root(err: &DataFusionError) -> &DataFusionError {
    match err {
        DataFusionError::Context(_, inner) => root(inner),
        DataFusionError::Diagnostic(_, inner) => root(inner),
        DataFusionError::Shared(inner) => root(inner),
        DataFusionError::Collection(errs) if !errs.is_empty() => root(&errs[0]),
        other => other,
    }
}

/// Whether a query failed because the connection to a cluster worker broke (the
/// transport, never an error the worker's computation raised, which may describe data).
/// Either way the query failed; this only picks UNAVAILABLE (retry) over INTERNAL.
fn lost_worker(err: &DataFusionError) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if e.downcast_ref::<tonic::transport::Error>().is_some() {
            return true;
        }
        if let Some(DataFusionError::Shared(inner)) = e.downcast_ref::<DataFusionError>()
            && lost_worker(inner)
        {
            return true;
        }
        // datafusion-distributed wraps a broken stream's status in its own error, without
        // a source: recognise the transport failure by the start of its text (an error
        // a worker's computation raised starts with its own code and message).
        let text = e.to_string();
        if text.starts_with("code: 'Unknown error', message: \"transport error\"")
            || text.starts_with("Error connecting to Distributed DataFusion worker")
        {
            return true;
        }
        next = e.source();
    }
    false
}

fn resources_exhausted(err: &DataFusionError) -> Option<String> {
    match root(err) {
        DataFusionError::ResourcesExhausted(m) => Some(format!(
            "query exceeded its memory limit ({})",
            m.lines().next().unwrap_or_default()
        )),
        DataFusionError::Collection(errs) => errs.iter().find_map(resources_exhausted),
        _ => None,
    }
}
