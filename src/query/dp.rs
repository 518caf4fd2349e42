//! Charging a DP query to its principal's privacy budget, before it reads data.
//!
//! The ε to spend comes from the `airlock-epsilon` call header (default: the most the
//! tables allow per query). Every DP release of the plan gets an equal share; all must
//! be in one dataset. The charge is durable when this returns; an exhausted budget is a
//! `BUDGET_EXHAUSTED` refusal that says what is left. A repeat of the identical query
//! (principal, plan fingerprint, ε, policy version, and the files every scanned table
//! answers from) is free and is served the answer released the first time, kept in the
//! ledger before it left ([`answer_once`]); a repeat on changed data is charged anew, or
//! the two answers would difference out the change exactly.
//!
//! Why kept, not recomputed with the same seed: the same noise over a different result
//! gives the exact difference away, and a query's result need not be a function of its
//! text (`random()` or `now()` in a subquery, a LIMIT over an unordered union). PRIVACY.md
//! §5b promises the identical *answer*; keeping it is the reading that needs no proof of
//! determinism.

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::DataFusionError;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{StreamExt, TryStreamExt};

use crate::approval::budget::{Allowance, BudgetLedger, Charge, DELTA_UNITS, QueryIdentity, Spent};
use crate::catalog::Catalog;
use crate::config::TableName;
use crate::error::{Error, Result};
use crate::policy::refusal::{ReasonCode, Refusal};
use crate::rewrite::dp_release::{Grant, dp_releases};

use super::PlannedQuery;

/// The call header that carries a query's ε.
pub const EPSILON_HEADER: &str = "airlock-epsilon";

/// What a charge did, for the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct Charged {
    pub dataset: String,
    pub epsilon: f64,
    pub delta: f64,
    pub repeat: bool,
    pub remaining: Option<Spent>,
    /// The ledger's key of the query's identity.
    pub identity: String,
    /// The answer released the first time (Arrow IPC stream), for a repeat.
    pub kept: Option<Vec<u8>>,
}

impl Charged {
    pub fn describe(&self) -> String {
        let left = self.remaining.map_or(String::new(), |r| {
            format!("; remaining ε={} δ={}", r.epsilon(), r.delta())
        });
        if self.repeat {
            format!(
                "{}: repeat of a charged query, nothing charged (ε={}){left}",
                self.dataset, self.epsilon
            )
        } else {
            format!(
                "{}: charged ε={} δ={}{left}",
                self.dataset, self.epsilon, self.delta
            )
        }
    }
}

/// Parses the header's value.
pub fn parse_epsilon(value: Option<&str>) -> Result<Option<f64>> {
    match value {
        None => Ok(None),
        Some(v) => match v.trim().parse::<f64>() {
            Ok(e) if e.is_finite() && e > 0.0 => Ok(Some(e)),
            _ => Err(Error::InvalidRequest(format!(
                "{EPSILON_HEADER} must be a positive number, got {v:?}"
            ))),
        },
    }
}

/// A digest of the data every table the plan scans answers from (see
/// [`Catalog::data_version`]).
fn data_version(plan: &LogicalPlan, catalog: &Catalog) -> String {
    let mut tables = std::collections::BTreeSet::new();
    let _ = plan.apply_with_subqueries(|p| {
        if let LogicalPlan::TableScan(t) = p {
            tables.insert(TableName {
                schema: t.table_name.schema().unwrap_or_default().to_string(),
                table: t.table_name.table().to_string(),
            });
        }
        Ok(TreeNodeRecursion::Continue)
    });
    tables
        .iter()
        .map(|t| catalog.data_version(t))
        .collect::<Vec<_>>()
        .join(",")
}

/// Charges the query if it has DP releases (None: it has none).
pub async fn charge(
    query: &PlannedQuery,
    ledger: &dyn BudgetLedger,
    catalog: &Catalog,
) -> Result<Option<Charged>> {
    let nodes = dp_releases(&query.plan);
    if nodes.is_empty() {
        return Ok(None);
    }
    let datasets: std::collections::BTreeSet<String> = nodes
        .iter()
        .map(|n| n.table.split('.').next().unwrap_or_default().to_string())
        .collect();
    if datasets.len() != 1 {
        return Err(Refusal::new(
            ReasonCode::DpNotSupported,
            "one query may draw on the privacy budget of one dataset only",
        )
        .into());
    }
    let dataset = datasets.into_iter().next().unwrap_or_default();
    let n = nodes.len() as f64;
    let max = nodes
        .iter()
        .map(|d| d.policy.max_epsilon.0)
        .fold(f64::INFINITY, f64::min);
    let epsilon = query.epsilon.unwrap_or(max * n);
    let accountings = nodes
        .iter()
        .map(|d| d.accounting(epsilon / n))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::from(Refusal::new(ReasonCode::DpNotSupported, e.to_string())))?;
    let cost = Spent {
        epsilon_micros: accountings.iter().map(|a| a.epsilon_micros as u64).sum(),
        delta_units: accountings.iter().map(|a| a.delta_units).sum(),
    };
    let principal = query.principal();
    let policy = &query.session.policy;
    let Some(budget) =
        policy
            .tables
            .budgets
            .for_principal(&principal.name, &principal.roles, &dataset)
    else {
        return Err(Refusal::new(
            ReasonCode::BudgetExhausted,
            format!("no privacy budget on dataset {dataset}: remaining ε=0"),
        )
        .into());
    };
    let allowance = Allowance {
        epsilon_micros: crate::dp::noise::epsilon_micros(budget.epsilon.0) as u64,
        delta_units: (budget.delta.0 * DELTA_UNITS).floor() as u64,
        renew_secs: budget.renew_secs,
    };
    let identity = QueryIdentity {
        principal: principal.name.clone(),
        dataset: dataset.clone(),
        fingerprint: query.fingerprint.clone(),
        epsilon_micros: cost.epsilon_micros,
        policy: policy.digest.clone(),
        data: data_version(&query.plan, catalog),
    };
    let key = identity.key();
    let (seed, repeat, remaining, kept) = match ledger
        .charge(&identity, cost, &allowance)
        .await
        .map_err(Error::from_store)?
    {
        Charge::Charged { seed, remaining } => (seed, false, Some(remaining), None),
        Charge::Repeat { seed, answer } => (seed, true, None, answer),
        Charge::Exhausted { remaining } => {
            return Err(Refusal::new(
                ReasonCode::BudgetExhausted,
                format!(
                    "this query needs ε={} δ={} on dataset {dataset}; remaining ε={} δ={}",
                    cost.epsilon(),
                    cost.delta(),
                    remaining.epsilon(),
                    remaining.delta()
                ),
            )
            .into());
        }
    };
    for (i, (node, accounting)) in nodes.iter().zip(accountings).enumerate() {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(seed);
        h.update((i as u64).to_be_bytes());
        // The plan was built for this one execution; a grant already set would be a
        // second execution of the same plan object: refuse rather than reuse.
        node.grant
            .set(Grant {
                accounting,
                seed: h.finalize().into(),
            })
            .map_err(|_| Error::Internal("a DP plan executed twice".into()))?;
    }
    Ok(Some(Charged {
        dataset,
        epsilon: cost.epsilon(),
        delta: cost.delta(),
        repeat,
        remaining,
        identity: key,
        kept,
    }))
}

/// The most a DP answer may weigh to be kept (DP answers are groups that cleared τ, so
/// few; this bounds the ledger's rows).
pub const MAX_KEPT_ANSWER: usize = 64 * 1024 * 1024;

/// The stream a charged DP query releases: its kept answer on a repeat; otherwise the
/// whole result of `executed`, kept in the ledger first and then released (or the answer
/// another execution of the same identity kept before it). Nothing leaves unkept.
pub fn answer_once(
    executed: SendableRecordBatchStream,
    ledger: Arc<dyn BudgetLedger>,
    charged: &Charged,
) -> SendableRecordBatchStream {
    let schema = executed.schema();
    let identity = charged.identity.clone();
    let kept = charged.kept.clone();
    let out = Arc::clone(&schema);
    let answer = futures::stream::once(async move {
        let bytes = match kept {
            Some(bytes) => bytes,
            None => {
                let batches = collect_bounded(executed).await?;
                let bytes = encode(&schema, &batches)?;
                ledger
                    .keep_answer(&identity, bytes)
                    .await
                    .map_err(|e| DataFusionError::External(Box::new(e)))?
            }
        };
        decode(&bytes)
    })
    .map_ok(|batches| futures::stream::iter(batches.into_iter().map(Ok)))
    .try_flatten();
    Box::pin(RecordBatchStreamAdapter::new(out, answer))
}

async fn collect_bounded(
    mut stream: SendableRecordBatchStream,
) -> datafusion::common::Result<Vec<RecordBatch>> {
    let mut batches = Vec::new();
    let mut size = 0;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        size += batch.get_array_memory_size();
        if size > MAX_KEPT_ANSWER {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "a DP answer larger than {} MiB cannot be kept for its repeats; group more coarsely",
                MAX_KEPT_ANSWER >> 20
            )));
        }
        batches.push(batch);
    }
    Ok(batches)
}

fn encode(schema: &SchemaRef, batches: &[RecordBatch]) -> datafusion::common::Result<Vec<u8>> {
    let mut writer =
        datafusion::arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema.as_ref())?;
    for b in batches {
        writer.write(b)?;
    }
    Ok(writer.into_inner()?)
}

fn decode(bytes: &[u8]) -> datafusion::common::Result<Vec<RecordBatch>> {
    let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(bytes, None)?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}
