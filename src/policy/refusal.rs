//! Typed policy refusals with stable reason codes.
//!
//! A refusal is a value, never a formatted string: it travels through DataFusion as
//! `DataFusionError::External` and reaches the client as `PermissionDenied` with the
//! code in brackets at the start of the message (`[STATEMENT_NOT_ALLOWED] ...`) and in
//! the `airlock-reason-code` response header. Codes are part of the public contract:
//! never rename one; add new ones at the end.

use std::fmt;

/// Stable reason codes. Their `as_str` form is what clients see and match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    /// DDL, DML, COPY, SET, CREATE EXTERNAL TABLE, transactions: anything but a query.
    StatementNotAllowed,
    /// EXPLAIN / EXPLAIN ANALYZE without the `admin` action.
    ExplainNotAllowed,
    /// Substrait plans: a read relation can name any file.
    SubstraitNotAllowed,
    /// A function that reads files or is not part of the locked-down engine.
    FunctionNotAllowed,
    /// Bulk ingest or update by a principal without the right to do so.
    WriteNotAllowed,
}

impl ReasonCode {
    /// The stable text of the code.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::StatementNotAllowed => "STATEMENT_NOT_ALLOWED",
            Self::ExplainNotAllowed => "EXPLAIN_NOT_ALLOWED",
            Self::SubstraitNotAllowed => "SUBSTRAIT_NOT_ALLOWED",
            Self::FunctionNotAllowed => "FUNCTION_NOT_ALLOWED",
            Self::WriteNotAllowed => "WRITE_NOT_ALLOWED",
        }
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy decision not to run or release something. The message never carries a data
/// value: it names SQL constructs, tables and columns only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ReasonCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.code, self.message)
    }
}

impl std::error::Error for Refusal {}

impl From<Refusal> for datafusion::error::DataFusionError {
    fn from(r: Refusal) -> Self {
        datafusion::error::DataFusionError::External(Box::new(r))
    }
}

/// Finds a refusal carried anywhere inside a DataFusion error (it may be wrapped in
/// context or in a shared error by the time it comes back).
pub fn find_refusal(err: &datafusion::error::DataFusionError) -> Option<&Refusal> {
    use datafusion::error::DataFusionError as E;
    match err {
        E::External(e) => e.downcast_ref::<Refusal>(),
        E::Context(_, inner) => find_refusal(inner),
        E::Shared(inner) => find_refusal(inner),
        E::Diagnostic(_, inner) => find_refusal(inner),
        E::Collection(errs) => errs.iter().find_map(find_refusal),
        _ => None,
    }
}
