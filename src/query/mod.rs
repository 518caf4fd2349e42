//! Plan and run one query for one principal.
//!
//! `parse` gates the statement kind; [`plan`] turns SQL into an optimized logical plan
//! (the analyzer, where policy rules run, is part of that), fixes the result schema the
//! client is promised, and [`execute()`] streams batches in exactly that schema, under the
//! query timeout, the memory limit and the concurrency limit. Nothing here collects a
//! whole result.

pub mod execute;
pub mod output;
pub mod parse;

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::TableReference;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::Statement as DFStatement;

pub use execute::{QueryStream, execute};

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
    let plan = logical_plan(&session, sql).await?;
    let plan = bind(plan, params)?;
    let plan = output::normalize(plan).map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let plan = session
        .state
        .optimize(&plan)
        .map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let schema = Arc::new(plan.schema().as_arrow().clone());
    Ok(PlannedQuery {
        session,
        sql: sql.to_string(),
        plan,
        schema,
    })
}

/// Plans `sql` without parameters to learn its result and parameter schemas.
pub async fn prepare(session: Arc<PrincipalSession>, sql: &str) -> Result<Prepared> {
    let plan = logical_plan(&session, sql).await?;
    let types = plan
        .get_parameter_types()
        .map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let parameter_schema = Arc::new(parameter_schema(&types)?);
    let plan = output::normalize(plan).map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    // The rewriter may add columns (remainder mode); report the schema DoGet will have
    // when the plan can be analyzed without its parameters, else the query's own.
    let dataset_schema = match session.state.optimize(&plan) {
        Ok(analyzed) => analyzed.schema().as_arrow().clone(),
        Err(_) => plan.schema().as_arrow().clone(),
    };
    Ok(Prepared {
        dataset_schema: Arc::new(dataset_schema),
        parameter_schema,
    })
}

/// The privacy explanation of `sql` for the session's principal: masks, filters,
/// thresholds, the decision and, when it would run, the rewritten plan. Runs nothing.
pub async fn explain_privacy(session: Arc<PrincipalSession>, sql: &str) -> Result<String> {
    let plan = logical_plan(&session, sql).await?;
    let plan = output::normalize(plan).map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let analyzed = session.state.optimize(&plan).ok();
    Ok(crate::rewrite::explain::explain(
        &session.privacy,
        &plan,
        analyzed.as_ref(),
    ))
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
    let tables: Vec<TableName> = refs.iter().filter_map(table_name).collect();
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

fn table_name(r: &TableReference) -> Option<TableName> {
    match r {
        TableReference::Partial { schema, table } => {
            TableName::parse(&format!("{schema}.{table}")).ok()
        }
        TableReference::Full {
            catalog,
            schema,
            table,
        } if catalog.as_ref() == crate::catalog::CATALOG_NAME => {
            TableName::parse(&format!("{schema}.{table}")).ok()
        }
        _ => None,
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
