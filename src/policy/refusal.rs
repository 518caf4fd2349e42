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
    /// A function that reads files, is not part of the locked-down engine, or is not on
    /// the allow-list of functions that may run below the release boundary (§3.2.1).
    FunctionNotAllowed,
    /// Bulk ingest or update by a principal without the right to do so.
    WriteNotAllowed,
    /// Raw rows of a protected table would reach the output (PRIVACY.md §3.2).
    AggregateRequired,
    /// An aggregate function off the table's allow-list (§3.2).
    AggregateNotAllowed,
    /// CASE/IF/COALESCE/NULLIF or FILTER inside an aggregate (§3.6).
    ConditionalAggregate,
    /// A non-filterable column (entity key, wiped column) compared with a literal (§3.6).
    FilterNotAllowed,
    /// A window function over raw protected rows (§3.6).
    WindowNotAllowed,
    /// ROLLUP, CUBE or GROUPING SETS over protected rows (§3.6).
    GroupingSetsNotAllowed,
    /// EXCEPT or INTERSECT over raw protected rows (§3.6).
    SetOperationNotAllowed,
    /// A recursive CTE over protected tables (§3.6).
    RecursiveNotAllowed,
    /// A correlated subquery on a protected table (§3.6).
    CorrelatedSubqueryNotAllowed,
    /// Raw protected rows reaching the output through a subquery (§3.5).
    SubqueryNotAllowed,
    /// The principal holds no action that allows querying the table.
    AccessDenied,
    /// The result needs the data owner's approval (§4).
    ApprovalPending,
    /// The owner denied the approval request (§4).
    ApprovalDenied,
    /// A plan shape the verifier cannot classify: denied, fail closed.
    UnclassifiedPlan,
    /// An expression below the release boundary that is not on the allow-list (§3.2):
    /// a cast, comparison, function or division inside an aggregate, an operator.
    ExpressionNotAllowed,
    /// A plan node that may not stand below the release boundary (§3.2): ORDER BY,
    /// LIMIT, UNNEST, DISTINCT ON over raw protected rows.
    OperatorNotAllowed,
    /// A join that could mark or multiply protected rows at the analyst's choice (§3.2).
    JoinNotAllowed,
    /// A name reserved for the rewriter (`__airlock*`, `airlock_*`, §3.6).
    ReservedName,
    /// The audit trail cannot be written: nothing is released or decided until it can
    /// (PRIVACY.md §5). Retryable.
    AuditUnavailable,
    /// Too many failed logins for a user name or from an address, or a principal's
    /// queries per minute or queries at once over its quota (`[limits]`); retry later.
    RateLimited,
    /// A query on a table in differential-privacy mode (§5b) that DP mode cannot answer:
    /// an aggregate other than COUNT(*), COUNT(DISTINCT unit), SUM/AVG of a bounded
    /// column, a join that is neither with a public table nor on the privacy unit, ...
    DpNotSupported,
    /// The principal's privacy budget on the dataset cannot pay for the query (§5b).
    BudgetExhausted,
    /// A principal's rows or bytes released today are at their daily quota; retry after
    /// midnight UTC.
    QuotaExceeded,
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
            Self::AggregateRequired => "AGGREGATE_REQUIRED",
            Self::AggregateNotAllowed => "AGGREGATE_NOT_ALLOWED",
            Self::ConditionalAggregate => "CONDITIONAL_AGGREGATE",
            Self::FilterNotAllowed => "FILTER_NOT_ALLOWED",
            Self::WindowNotAllowed => "WINDOW_NOT_ALLOWED",
            Self::GroupingSetsNotAllowed => "GROUPING_SETS_NOT_ALLOWED",
            Self::SetOperationNotAllowed => "SET_OPERATION_NOT_ALLOWED",
            Self::RecursiveNotAllowed => "RECURSIVE_NOT_ALLOWED",
            Self::CorrelatedSubqueryNotAllowed => "CORRELATED_SUBQUERY_NOT_ALLOWED",
            Self::SubqueryNotAllowed => "SUBQUERY_NOT_ALLOWED",
            Self::AccessDenied => "ACCESS_DENIED",
            Self::ApprovalPending => "APPROVAL_PENDING",
            Self::ApprovalDenied => "APPROVAL_DENIED",
            Self::UnclassifiedPlan => "UNCLASSIFIED_PLAN",
            Self::ExpressionNotAllowed => "EXPRESSION_NOT_ALLOWED",
            Self::OperatorNotAllowed => "OPERATOR_NOT_ALLOWED",
            Self::JoinNotAllowed => "JOIN_NOT_ALLOWED",
            Self::ReservedName => "RESERVED_NAME",
            Self::AuditUnavailable => "AUDIT_UNAVAILABLE",
            Self::RateLimited => "RATE_LIMITED",
            Self::DpNotSupported => "DP_NOT_SUPPORTED",
            Self::BudgetExhausted => "BUDGET_EXHAUSTED",
            Self::QuotaExceeded => "QUOTA_EXCEEDED",
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
    /// When trying again may succeed (quotas, rate limits); sent as gRPC `RetryInfo`.
    pub retry_after: Option<std::time::Duration>,
}

impl Refusal {
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A refusal that may succeed after `after`; the message should say so too.
    pub fn retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after = Some(after);
        self
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
