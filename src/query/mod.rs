//! Plan and run one query for one principal.
//!
//! `parse` gates the statement kind; [`plan`] turns SQL into an optimized logical plan
//! (the analyzer, where policy rules run, is part of that), fixes the result schema the
//! client is promised, and [`execute()`] streams batches in exactly that schema, under the
//! query timeout, the memory limit and the concurrency limit. Nothing here collects a
//! whole result.

pub mod dp;
pub mod execute;
pub mod output;
pub mod parse;

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::sql::parser::Statement as DFStatement;

pub use execute::{Outcome, QueryStream, execute};

use crate::approval::{ApprovalStore, NewRequest, RequestKey, Status};
use crate::auth::Principal;
use crate::config::TableName;
use crate::error::{Error, Phase, Result};
use crate::policy::Action;
use crate::policy::refusal::{ReasonCode, Refusal};
use crate::session::PrincipalSession;
use parse::Checked;

/// A query planned for one principal, ready to execute.
#[derive(Debug)]
pub struct PlannedQuery {
    pub session: Arc<PrincipalSession>,
    pub sql: String,
    /// The optimized plan (policy rules applied).
    pub plan: LogicalPlan,
    /// What DoGet streams, exactly: FlightInfo carries the same schema.
    pub schema: SchemaRef,
    /// The approval request this plan releases, when an owner approved it.
    pub approval: Option<String>,
    /// The normalized fingerprint of the bound query (before the rewrite).
    pub fingerprint: String,
    /// The ε the client asked to spend (`airlock-epsilon`), for DP tables.
    pub epsilon: Option<f64>,
    /// A prepared statement's bound parameter values ([`params_key`]), for the audit
    /// record: the SQL alone does not say whose rows a `WHERE id = ?` released.
    pub params: Option<String>,
}

impl PlannedQuery {
    pub fn principal(&self) -> &Arc<Principal> {
        &self.session.principal
    }
}

/// The shape of a prepared statement.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub dataset_schema: SchemaRef,
    pub parameter_schema: SchemaRef,
}

/// Plans `sql` (with bound parameters, if any) for the session's principal.
pub async fn plan(
    session: Arc<PrincipalSession>,
    sql: &str,
    params: Option<&[ScalarValue]>,
) -> Result<PlannedQuery> {
    use tracing::Instrument;
    let plan = logical_plan(&session, sql)
        .instrument(tracing::info_span!("parse"))
        .await?;
    plan_parsed(session, sql, plan, params)
}

/// [`plan`] from the statement's parsed plan.
fn plan_parsed(
    session: Arc<PrincipalSession>,
    sql: &str,
    plan: LogicalPlan,
    params: Option<&[ScalarValue]>,
) -> Result<PlannedQuery> {
    let plan = bind(plan, params)?;
    let plan = output::normalize(plan).map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let fingerprint = crate::rewrite::fingerprint::fingerprint(&plan);
    // The analyzer (the privacy rules), the optimizer and the verifier.
    let plan = tracing::info_span!("rewrite").in_scope(|| {
        crate::rewrite::plan(&session.state, &session.privacy, &plan)
            .map_err(|e| Error::from_datafusion(e, Phase::Planning))
    })?;
    let schema = Arc::new(plan.schema().as_arrow().clone());
    Ok(PlannedQuery {
        session,
        sql: sql.to_string(),
        plan,
        schema,
        approval: None,
        fingerprint,
        epsilon: None,
        params: None,
    })
}

/// Plans `sql` and, when the automatic rules send it to approval (§4), finds or creates
/// its request: pending or denied requests refuse with their id; an approved, unexpired
/// one releases the rows (masks and row filters still applied, at most the approved row
/// cap).
pub async fn plan_with_approvals(
    session: Arc<PrincipalSession>,
    sql: &str,
    params: Option<&[ScalarValue]>,
    approvals: &dyn ApprovalStore,
) -> Result<PlannedQuery> {
    let why = match plan(Arc::clone(&session), sql, params).await {
        Err(Error::Refused(r)) if r.code == ReasonCode::ApprovalPending => r.message,
        other => return other,
    };
    let unbound = logical_plan(&session, sql).await?;
    let fingerprint = crate::rewrite::fingerprint::fingerprint(&unbound);
    let bound = bind(unbound, params)?;
    let bound = output::normalize(bound).map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let tables: Vec<String> = approval_tables(&session, &bound)?;
    let released = crate::rewrite::plan(&session.approved_state, &session.approved_privacy, &bound)
        .map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let now = crate::approval::now();
    let request = approvals
        .find_or_create(
            NewRequest {
                key: RequestKey {
                    principal: session.principal.name.clone(),
                    fingerprint,
                    params: params_key(params.unwrap_or_default()),
                    policy: session.policy.digest.clone(),
                },
                roles: session.principal.roles.clone(),
                sql: sql.to_string(),
                tables,
                reasons: why,
                plan: crate::rewrite::fingerprint::full_text(&released),
            },
            now,
        )
        .await
        .map_err(Error::from_store)?;
    match &request.status {
        Status::Denied { reason } => Err(Refusal::new(
            ReasonCode::ApprovalDenied,
            format!("request {}: {reason}", request.id),
        )
        .into()),
        Status::Approved { max_rows, .. }
            if request.usable(now)
                && approvals
                    .consume(&request.id, now)
                    .await
                    .map_err(Error::from_store)? =>
        {
            let plan = match max_rows {
                Some(n) => LogicalPlanBuilder::from(released)
                    .limit(0, Some(*n as usize))
                    .and_then(|b| b.build())
                    .map_err(|e| Error::from_datafusion(e, Phase::Planning))?,
                None => released,
            };
            let schema = Arc::new(plan.schema().as_arrow().clone());
            tracing::info!(request = %request.id, "releasing an approved result");
            Ok(PlannedQuery {
                session,
                sql: sql.to_string(),
                plan,
                schema,
                approval: Some(request.id),
                fingerprint: String::new(),
                epsilon: None,
                params: None,
            })
        }
        _ => Err(Refusal::new(
            ReasonCode::ApprovalPending,
            format!("request {}: {}", request.id, request.reasons),
        )
        .into()),
    }
}

/// The tables an approval of the query is about: every protected table whose automatic
/// rules it fails, and every other protected table it reads (an approved result releases
/// them all under masks and row filters only, so the approver must hold `approve` on
/// each). Refused unless the principal holds `request` on every one of them: the rule
/// rejects such queries first, this keeps a DP refusal's approval path to it as well.
fn approval_tables(session: &PrincipalSession, plan: &LogicalPlan) -> Result<Vec<String>> {
    let analysis = crate::rewrite::check::analyze(plan, &session.privacy);
    let tables: std::collections::BTreeSet<_> = analysis
        .violations
        .iter()
        .flat_map(|v| v.tables.iter().cloned())
        .chain(analysis.scanned)
        .collect();
    if let Some(t) = tables
        .iter()
        .find(|t| !session.privacy.tables.get(*t).is_some_and(|r| r.request))
    {
        return Err(Refusal::new(
            ReasonCode::AccessDenied,
            format!(
                "an approval of this query would release {t}, on which you may not request one"
            ),
        )
        .into());
    }
    Ok(tables.iter().map(ToString::to_string).collect())
}

/// Bound parameters as a stable JSON text (type and value of each).
pub fn params_key(params: &[ScalarValue]) -> String {
    let list: Vec<(String, String)> = params
        .iter()
        .map(|p| (p.data_type().to_string(), p.to_string()))
        .collect();
    serde_json::to_string(&list).unwrap_or_default()
}

/// The parameters of a [`params_key`] text.
pub fn params_from_key(key: &str) -> Result<Vec<ScalarValue>> {
    let list: Vec<(String, String)> = serde_json::from_str(key)
        .map_err(|e| Error::Internal(format!("stored parameters: {e}")))?;
    list.into_iter()
        .map(|(t, v)| {
            let t: DataType = t
                .parse()
                .map_err(|e| Error::Internal(format!("stored parameter type: {e}")))?;
            if v == "NULL" {
                ScalarValue::try_from(&t).map_err(|e| Error::Internal(e.to_string()))
            } else {
                ScalarValue::try_from_string(v, &t).map_err(|e| Error::Internal(e.to_string()))
            }
        })
        .collect()
}

/// The approved form of `sql` for the session's principal (masks and row filters only):
/// what an approval would release.
pub async fn approved_plan(
    session: &PrincipalSession,
    sql: &str,
    params: Option<&[ScalarValue]>,
) -> Result<LogicalPlan> {
    let plan = bind(logical_plan(session, sql).await?, params)?;
    let plan = output::normalize(plan).map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    crate::rewrite::plan(&session.approved_state, &session.approved_privacy, &plan)
        .map_err(|e| Error::from_datafusion(e, Phase::Planning))
}

/// Plans `sql` without parameters to learn its result and parameter schemas.
///
/// A statement that takes no parameters is planned in full, exactly as [`plan`] would plan
/// its execution, and that plan comes back too when the rules allowed it: clients such as
/// ADBC and JDBC prepare every query and execute it at once, and the execution may then
/// run this plan (`flight::handles` says when) instead of planning the same SQL twice.
/// A statement the rules refuse still prepares: the refusal comes, audited, when it runs.
pub async fn prepare(
    session: Arc<PrincipalSession>,
    sql: &str,
) -> Result<(Prepared, Option<PlannedQuery>)> {
    let plan = logical_plan(&session, sql).await?;
    let types = plan
        .get_parameter_types()
        .map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let parameter_schema = Arc::new(parameter_schema(&types)?);
    let unplanned = |plan: LogicalPlan| -> Result<(SchemaRef, LogicalPlan)> {
        let plan =
            output::normalize(plan).map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
        Ok((Arc::new(plan.schema().as_arrow().clone()), plan))
    };
    // The rewriter may add columns (remainder mode); report the schema DoGet will have
    // when the plan can be analyzed (without its parameters), else the query's own.
    let (dataset_schema, planned) = if types.is_empty() {
        match plan_parsed(Arc::clone(&session), sql, plan.clone(), None) {
            Ok(planned) => (Arc::clone(&planned.schema), Some(planned)),
            Err(_) => (unplanned(plan)?.0, None),
        }
    } else {
        let (own, plan) = unplanned(plan)?;
        match crate::rewrite::plan(&session.state, &session.privacy, &plan) {
            Ok(analyzed) => (Arc::new(analyzed.schema().as_arrow().clone()), None),
            Err(_) => (own, None),
        }
    };
    let prepared = Prepared {
        dataset_schema,
        parameter_schema,
    };
    Ok((prepared, planned))
}

/// The privacy explanation of `sql` for the session's principal: masks, filters,
/// thresholds, the decision and, when it would run, the rewritten plan. Runs nothing.
pub async fn explain_privacy(session: Arc<PrincipalSession>, sql: &str) -> Result<String> {
    let plan = logical_plan(&session, sql).await?;
    let plan = output::normalize(plan).map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let analyzed = crate::rewrite::plan(&session.state, &session.privacy, &plan).ok();
    let mut text = crate::rewrite::explain::explain(&session.privacy, &plan, analyzed.as_ref());
    // DP releases: the contribution bounds, the clamp ranges, the ε split and τ at the
    // table's maximum ε (the default; a smaller `airlock-epsilon` scales the noise up).
    for d in analyzed
        .as_ref()
        .map(crate::rewrite::dp_release::dp_releases)
        .unwrap_or_default()
    {
        use std::fmt::Write;
        let bounds: Vec<String> = d
            .values
            .iter()
            .map(|(c, lo, hi)| {
                let f = crate::policy::dp::FIXED_SCALE as f64;
                format!("{c} clamped to [{}, {}]", *lo as f64 / f, *hi as f64 / f)
            })
            .collect();
        let _ = writeln!(
            text,
            "Differential privacy on {}: each patient/unit contributes at most L0 = {} groups and C = {} rows per group; {}.",
            d.table,
            d.policy.max_groups_per_unit,
            d.policy.max_rows_per_group_per_unit,
            if bounds.is_empty() {
                "no summed columns".to_string()
            } else {
                bounds.join(", ")
            }
        );
        match d.accounting(d.policy.max_epsilon.0) {
            Ok(a) => {
                let _ = writeln!(
                    text,
                    "  noise at ε = {} (the default): {}",
                    d.policy.max_epsilon.0,
                    a.describe()
                );
            }
            Err(e) => {
                let _ = writeln!(text, "  {e}");
            }
        }
    }
    Ok(text)
}

/// The unoptimized logical plan of a gated statement.
async fn logical_plan(session: &PrincipalSession, sql: &str) -> Result<LogicalPlan> {
    let state = &session.state;
    let limit = state.config_options().sql_parser.recursion_limit.get();
    let stmt = match parse::parse(sql, limit)? {
        Checked::Query(s) => s,
        Checked::Explain(s) => {
            check_explain(session, &s)?;
            s
        }
    };
    let plan = state
        .statement_to_plan(stmt)
        .await
        .map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    // Defence in depth: the gate above should make these impossible.
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(|_| Refusal::new(ReasonCode::StatementNotAllowed, "only queries may run"))?;
    Ok(plan)
}

/// EXPLAIN shows counts before suppression: only for principals holding `admin` on every
/// table the query names (or on the whole service).
fn check_explain(session: &PrincipalSession, stmt: &DFStatement) -> Result<()> {
    let policy = &session.policy;
    let principal = &session.principal;
    if policy.is_service_admin(principal) {
        return Ok(());
    }
    let refs = session
        .state
        .resolve_table_references(stmt)
        .map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let tables: Vec<TableName> = refs.iter().filter_map(crate::rewrite::table_name).collect();
    let allowed = !tables.is_empty()
        && tables.len() == refs.len()
        && tables
            .iter()
            .all(|t| policy.allows(principal, t, Action::Admin));
    if allowed {
        Ok(())
    } else {
        Err(Refusal::new(
            ReasonCode::ExplainNotAllowed,
            "EXPLAIN shows counts before suppression and needs the admin action",
        )
        .into())
    }
}

/// Binds positional parameters, casting each to the type the plan expects where known.
fn bind(plan: LogicalPlan, params: Option<&[ScalarValue]>) -> Result<LogicalPlan> {
    let types = plan
        .get_parameter_types()
        .map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let params = params.unwrap_or_default();
    if types.is_empty() {
        if !params.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "the query takes no parameters, {} were bound",
                params.len()
            )));
        }
        return Ok(plan);
    }
    if params.len() != types.len() {
        return Err(Error::InvalidRequest(format!(
            "the query takes {} parameter(s), {} were bound",
            types.len(),
            params.len()
        )));
    }
    let mut values = Vec::with_capacity(params.len());
    for (i, value) in params.iter().enumerate() {
        let expected = types.get(&format!("${}", i + 1)).cloned().flatten();
        let value = match expected {
            Some(t) if t != value.data_type() && !value.is_null() => {
                value.cast_to(&t).map_err(|_| {
                    Error::InvalidRequest(format!("parameter ${} cannot be cast to {t}", i + 1))
                })?
            }
            Some(t) if value.is_null() => ScalarValue::try_from(&t).unwrap_or(value.clone()),
            _ => value.clone(),
        };
        values.push(value);
    }
    plan.with_param_values(ParamValues::from(values))
        .map_err(|e| Error::from_datafusion(e, Phase::Planning))
}

fn parameter_schema(types: &HashMap<String, Option<DataType>>) -> Result<Schema> {
    let mut fields: Vec<(usize, Field)> = Vec::with_capacity(types.len());
    for (name, t) in types {
        let n: usize = name
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                Error::Query(format!(
                    "named parameter {name} is not supported; use $1 or ?"
                ))
            })?;
        fields.push((
            n,
            Field::new(name, t.clone().unwrap_or(DataType::Null), true),
        ));
    }
    fields.sort_by_key(|(n, _)| *n);
    Ok(Schema::new(
        fields.into_iter().map(|(_, f)| f).collect::<Vec<_>>(),
    ))
}

/// How many rows an (already analyzed) plan would release: runs `count(*)` over it.
pub async fn count_rows(
    sessions: &crate::session::Sessions,
    session: &PrincipalSession,
    plan: LogicalPlan,
) -> Result<u64> {
    use datafusion::arrow::array::Int64Array;
    use datafusion::functions_aggregate::expr_fn::count;
    use datafusion::logical_expr::lit;
    use futures::TryStreamExt;
    let counted = LogicalPlanBuilder::from(plan)
        .aggregate(
            Vec::<datafusion::logical_expr::Expr>::new(),
            vec![count(lit(1)).alias("n")],
        )
        .and_then(|b| b.build())
        .map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let state = &session.approved_state;
    let physical = state
        .query_planner()
        .create_physical_plan(&counted, state)
        .await
        .map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let batches: Vec<_> =
        datafusion::physical_plan::execute_stream(physical, sessions.task_context(session))
            .map_err(|e| Error::from_datafusion(e, Phase::Execution))?
            .try_collect()
            .await
            .map_err(|e| Error::from_datafusion(e, Phase::Execution))?;
    Ok(batches
        .first()
        .and_then(|b| {
            b.column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .map(|a| a.value(0))
        })
        .unwrap_or(0) as u64)
}
