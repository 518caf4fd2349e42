//! The DP release node (PRIVACY.md §5b): the boundary of a table in `release = "dp"`.
//!
//! [`DpRelease`] stands where the aggregate stood. Its input is one row per protected
//! row: the unit (hidden entity column), the group keys, and the summed values as
//! Float64, all computed below it under the allow-list and in total form. It does the
//! aggregation itself, because the contribution bounds must be applied before it:
//!
//! 1. at most C rows per (unit, group): the C rows with the smallest keyed hash of their
//!    content (never the arrival order, which the analyst could influence);
//! 2. at most L0 groups per unit: the L0 groups with the smallest keyed SHA-256 of
//!    (unit, group);
//! 3. values clamped to the owner's bounds, in fixed point, summed in checked `i128`
//!    (steps 1–3 in [`crate::dp::bound`], which reads rows sorted by unit without a
//!    repartition, and any others after one);
//! 4. per group, discrete Laplace noise (exact, `crate::dp::noise`) on each measurement,
//!    drawn from ChaCha20 keyed by SHA-256(query seed, group key): the same query, same
//!    seed and same data give the same answer, in any execution order;
//! 5. a grouped query keeps a group only when its noisy unit count reaches τ.
//!
//! The seed and the ε-split ([`Grant`]) are set when the ledger charged the query; a
//! node executed without one fails (closed). Output: the aggregate's own columns (counts
//! Int64, sums and averages Float64), then one `<name>_ci95` Float64 column per noisy
//! aggregate: the half-width of its 95% noise interval (noise only, not clamping bias).

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock};

use datafusion::arrow::array::{
    Array, ArrayRef, Float64Array, Float64Builder, Int64Builder, RecordBatch,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, SchemaRef};
use datafusion::common::runtime::SpawnedTask;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, DFSchemaRef, DataFusionError};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, LogicalPlan, UserDefinedLogicalNodeCore};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType, reset_plan_states};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties,
    Partitioning, PlanProperties,
};
use futures::StreamExt;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use crate::dp::bound::{self, Layout, Rule, Runs, RunsEnd, Scattered, Totals, overflow};
use crate::dp::noise::{discrete_laplace, os_rng};
use crate::dp::plan::{Accounting, Measure};
use crate::policy::dp::{DpPolicy, FIXED_SCALE, StoredFile};

/// One released aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd)]
pub enum DpAggregate {
    /// COUNT(*): rows after bounding.
    Rows,
    /// COUNT(DISTINCT unit).
    Units,
    /// SUM of value column j.
    Sum(usize),
    /// AVG of value column j: noisy sum / noisy rows.
    Avg(usize),
}

impl DpAggregate {
    pub fn measures(&self) -> Vec<Measure> {
        match self {
            Self::Rows => vec![Measure::Rows],
            Self::Units => vec![Measure::Units],
            Self::Sum(j) => vec![Measure::Sum(*j)],
            Self::Avg(j) => vec![Measure::Sum(*j), Measure::Rows],
        }
    }
}

/// What the ledger's charge gives the node: the accounting at the charged ε and the
/// query's seed.
#[derive(Debug, Clone)]
pub struct Grant {
    pub accounting: Accounting,
    pub seed: [u8; 32],
}

/// The DP release boundary.
#[derive(Debug, Clone)]
pub struct DpRelease {
    /// Columns: unit, then `groups` keys, then one Float64 per bounded value column.
    pub input: LogicalPlan,
    pub table: String,
    pub groups: usize,
    /// Each value column's name and fixed-point bounds.
    pub values: Vec<(String, i64, i64)>,
    pub aggregates: Vec<DpAggregate>,
    pub policy: DpPolicy,
    schema: DFSchemaRef,
    /// Set once the query is charged.
    pub grant: Arc<OnceLock<Grant>>,
}

impl PartialEq for DpRelease {
    fn eq(&self, o: &Self) -> bool {
        self.input == o.input
            && self.table == o.table
            && self.groups == o.groups
            && self.values == o.values
            && self.aggregates == o.aggregates
            && self.schema == o.schema
    }
}
impl Eq for DpRelease {}
impl Hash for DpRelease {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.input.hash(state);
        self.table.hash(state);
        self.aggregates.hash(state);
    }
}
impl PartialOrd for DpRelease {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        self.table.partial_cmp(&o.table)
    }
}

/// Suffix of the interval columns.
pub const CI_SUFFIX: &str = "_ci95";

impl DpRelease {
    /// `output` is the replaced aggregate's schema (keys, then one field per aggregate).
    #[expect(clippy::too_many_arguments, reason = "one value per part of the node")]
    pub fn try_new(
        input: LogicalPlan,
        table: String,
        groups: usize,
        values: Vec<(String, i64, i64)>,
        aggregates: Vec<DpAggregate>,
        policy: DpPolicy,
        output: &DFSchema,
        grant: Arc<OnceLock<Grant>>,
    ) -> Result<Self> {
        let mut fields = Vec::new();
        for (i, (q, f)) in output.iter().enumerate() {
            if i < groups {
                fields.push((q.cloned(), Arc::clone(f)));
            } else {
                let t = match aggregates[i - groups] {
                    DpAggregate::Rows | DpAggregate::Units => DataType::Int64,
                    _ => DataType::Float64,
                };
                fields.push((q.cloned(), Arc::new(Field::new(f.name(), t, true))));
            }
        }
        for (_, f) in output.iter().skip(groups) {
            fields.push((
                None,
                Arc::new(Field::new(
                    format!("{}{CI_SUFFIX}", f.name()),
                    DataType::Float64,
                    true,
                )),
            ));
        }
        let schema = Arc::new(DFSchema::new_with_metadata(fields, Default::default())?);
        Ok(Self {
            input,
            table,
            groups,
            values,
            aggregates,
            policy,
            schema,
            grant,
        })
    }

    /// Every measurement the aggregates need.
    pub fn measures(&self) -> Vec<Measure> {
        self.aggregates.iter().flat_map(|a| a.measures()).collect()
    }

    /// The accounting of this node at `epsilon`.
    pub fn accounting(
        &self,
        epsilon: f64,
    ) -> std::result::Result<Accounting, crate::dp::plan::Error> {
        let bounds: Vec<(i64, i64)> = self.values.iter().map(|(_, lo, hi)| (*lo, *hi)).collect();
        Accounting::new(
            &self.policy,
            epsilon,
            &self.measures(),
            &bounds,
            self.groups > 0,
        )
    }
}

impl UserDefinedLogicalNodeCore for DpRelease {
    fn name(&self) -> &str {
        "AirlockDpRelease"
    }
    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }
    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }
    fn expressions(&self) -> Vec<Expr> {
        vec![]
    }
    fn prevent_predicate_push_down_columns(&self) -> std::collections::HashSet<String> {
        self.schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    }
    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let bounds: Vec<String> = self
            .values
            .iter()
            .map(|(c, lo, hi)| {
                format!(
                    "{c} in [{}, {}]",
                    *lo as f64 / FIXED_SCALE as f64,
                    *hi as f64 / FIXED_SCALE as f64
                )
            })
            .collect();
        write!(
            f,
            "AirlockDpRelease: {} L0={} C={} bounds [{}] aggregates {:?}",
            self.table,
            self.policy.max_groups_per_unit,
            self.policy.max_rows_per_group_per_unit,
            bounds.join(", "),
            self.aggregates
        )?;
        if let Ok(a) = self.accounting(self.policy.max_epsilon.0) {
            write!(f, " at the maximum ε: {}", a.describe())?;
        }
        Ok(())
    }
    fn with_exprs_and_inputs(
        &self,
        _exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        let mut out = self.clone();
        out.input = inputs.remove(0);
        Ok(out)
    }
    fn necessary_children_exprs(&self, _output_columns: &[usize]) -> Option<Vec<Vec<usize>>> {
        Some(vec![(0..self.input.schema().fields().len()).collect()])
    }
    fn supports_limit_pushdown(&self) -> bool {
        false
    }
}

/// The DP release of a plan node, if it is one.
pub fn as_dp_release(plan: &LogicalPlan) -> Option<&DpRelease> {
    match plan {
        LogicalPlan::Extension(e) => e.node.as_any().downcast_ref::<DpRelease>(),
        _ => None,
    }
}

/// Every DP release in a plan (subqueries included).
pub fn dp_releases(plan: &LogicalPlan) -> Vec<DpRelease> {
    let mut out = Vec::new();
    let _ = plan.apply_with_subqueries(|p| {
        if let Some(d) = as_dp_release(p) {
            out.push(d.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

/// Executes a [`DpRelease`].
#[derive(Debug)]
pub struct DpReleaseExec {
    input: Arc<dyn ExecutionPlan>,
    node: DpRelease,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl DpReleaseExec {
    pub fn try_new(input: Arc<dyn ExecutionPlan>, node: DpRelease) -> Result<Self> {
        let schema: SchemaRef = Arc::new(node.schema.as_arrow().clone());
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Ok(Self {
            input,
            node,
            schema,
            properties,
        })
    }
}

impl DisplayAs for DpReleaseExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "AirlockDpReleaseExec: {}", self.node.table)
    }
}

impl ExecutionPlan for DpReleaseExec {
    fn name(&self) -> &str {
        "AirlockDpReleaseExec"
    }
    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }
    /// The input as it comes: sorted by unit, it is bounded without a repartition
    /// ([`bound::Runs`]); otherwise the node repartitions it by unit itself.
    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::UnspecifiedDistribution]
    }
    /// A round-robin repartition below would interleave a sorted input's batches.
    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }
    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }
    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_plan::PhysicalExpr>,
        ) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }
    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::try_new(
            children.remove(0),
            self.node.clone(),
        )?))
    }
    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(
                "DP release has one partition".into(),
            ));
        }
        let grant = self.node.grant.get().cloned().ok_or_else(|| {
            DataFusionError::Execution(
                "DP release: the query was not charged to a privacy budget".into(),
            )
        })?;
        let (input, node) = (Arc::clone(&self.input), self.node.clone());
        let schema = Arc::clone(&self.schema);
        // Decided before any row is read, from the table and the plan alone: the
        // choice must not depend on the rows the query selects (its time would tell).
        let clustered = node
            .policy
            .stored_in_unit_order
            .as_ref()
            .is_some_and(|file| in_stored_order(&input, file));
        let fut = async move {
            let sorted = match clustered {
                true => bound_clustered(&input, &node, &grant, &context).await?,
                false => None,
            };
            let totals = match sorted {
                Some(totals) => totals,
                // Not in order after all: the file was replaced between planning and
                // reading, or with the same size, time and tag (owners' acts, not a
                // query's; DESIGN.md, "Two ways to read the rows").
                None => bound_scattered(&input, &node, &grant, &context).await?,
            };
            release(totals, &layout(&node)?, &node, &grant, &schema)
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            futures::stream::once(fut),
        )))
    }
}

/// Whether `plan` delivers a table's rows in their stored order, each partition a
/// stretch of one file that follows the previous partition's: filters and projections
/// over a scan of byte ranges of one file, in order. Filters keep the order of what they
/// keep, so a table stored in unit order reaches the release in unit order. The file
/// must still be the one whose order was read (its size and time of change).
fn in_stored_order(plan: &Arc<dyn ExecutionPlan>, file: &StoredFile) -> bool {
    if plan.downcast_ref::<FilterExec>().is_some()
        || plan.downcast_ref::<ProjectionExec>().is_some()
    {
        return matches!(plan.children().as_slice(), [child] if in_stored_order(child, file));
    }
    let Some(scan) = plan
        .downcast_ref::<DataSourceExec>()
        .and_then(|s| s.data_source().downcast_ref::<FileScanConfig>())
    else {
        return false;
    };
    let mut last: Option<(&str, i64)> = None;
    let stored = file;
    for file in scan.file_groups.iter().flat_map(|g| g.files()) {
        let (start, end) = file
            .range
            .as_ref()
            .map_or((0, i64::MAX), |r| (r.start, r.end));
        if crate::policy::sorted::stored_file(file) != *stored {
            return false;
        }
        let location: &str = file.object_meta.location.as_ref();
        if last.is_some_and(|(l, e)| l != location || start < e) {
            return false;
        }
        last = Some((location, end));
    }
    last.is_some()
}

fn layout(node: &DpRelease) -> Result<Layout> {
    Layout::new(node.input.schema().as_arrow(), node.groups)
}

fn rule(node: &DpRelease, grant: &Grant) -> Rule {
    let clamp = node.values.iter().map(|(_, lo, hi)| (*lo, *hi)).collect();
    Rule::new(&node.policy, clamp, grant.seed)
}

fn join_error(e: impl fmt::Display) -> DataFusionError {
    DataFusionError::Execution(format!("DP release: {e}"))
}

/// Bounds the input as it comes, partition by partition, if every partition delivers its
/// units in increasing order and the partitions' ranges fit ([`bound::Runs`]). None as
/// soon as they do not: nothing read so far is used.
async fn bound_clustered(
    input: &Arc<dyn ExecutionPlan>,
    node: &DpRelease,
    grant: &Grant,
    context: &Arc<TaskContext>,
) -> Result<Option<Totals>> {
    let n = input.output_partitioning().partition_count();
    let ranges = Arc::new(Mutex::new(vec![None; n]));
    let given_up = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(n);
    for p in 0..n {
        let mut stream = input.execute(p, Arc::clone(context))?;
        let mut runs = Runs::new(layout(node)?, rule(node, grant));
        let (ranges, given_up) = (Arc::clone(&ranges), Arc::clone(&given_up));
        tasks.push(SpawnedTask::spawn(async move {
            while let Some(batch) = stream.next().await {
                if given_up.load(AtomicOrdering::Relaxed) {
                    return Ok(None);
                }
                let in_order = runs.add(&batch?)?;
                let fits = in_order && {
                    let mut ranges = ranges.lock().map_err(join_error)?;
                    ranges[p] = runs.range()?;
                    bound::ranges_fit(&ranges)
                };
                if !fits {
                    given_up.store(true, AtomicOrdering::Relaxed);
                    return Ok(None);
                }
            }
            runs.finish().map(Some)
        }));
    }
    let mut parts = Vec::with_capacity(n);
    for t in tasks {
        let part: Result<Option<RunsEnd>> = t.join_unwind().await.map_err(join_error)?;
        parts.push(part?);
    }
    let Some(parts) = parts.into_iter().collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    bound::combine(parts, layout(node)?, rule(node, grant))
}

/// Bounds rows in any order: the input anew (its state reset, as a recursive query
/// does), hash-partitioned by unit, each partition's units kept until it ends
/// ([`bound::Scattered`]).
async fn bound_scattered(
    input: &Arc<dyn ExecutionPlan>,
    node: &DpRelease,
    grant: &Grant,
    context: &Arc<TaskContext>,
) -> Result<Totals> {
    let unit = input.schema().field(0).name().clone();
    let partitions = context.session_config().target_partitions().max(1);
    let input: Arc<dyn ExecutionPlan> = Arc::new(RepartitionExec::try_new(
        reset_plan_states(Arc::clone(input))?,
        Partitioning::Hash(vec![Arc::new(Column::new(&unit, 0))], partitions),
    )?);
    let mut tasks = Vec::with_capacity(partitions);
    for p in 0..partitions {
        let mut stream = input.execute(p, Arc::clone(context))?;
        let mut acc = Scattered::new(layout(node)?, rule(node, grant));
        tasks.push(SpawnedTask::spawn(async move {
            while let Some(batch) = stream.next().await {
                acc.add(&batch?)?;
            }
            acc.finish()
        }));
    }
    let mut totals = Totals::new();
    for t in tasks {
        let part = t.join_unwind().await.map_err(join_error)??;
        bound::merge(&mut totals, part, node.values.len())?;
    }
    Ok(totals)
}

/// Adds noise to every group's totals, selects groups (τ) and builds the output.
fn release(
    mut groups: Totals,
    layout: &Layout,
    node: &DpRelease,
    grant: &Grant,
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let nv = node.values.len();
    // A global aggregate releases one row even over no rows.
    if node.groups == 0 && groups.is_empty() {
        groups.insert(layout.global_key()?, (0, 0, vec![0; nv]));
    }
    let mut keys: Vec<Box<[u8]>> = groups.keys().cloned().collect();
    keys.sort();
    let acc = &grant.accounting;
    let mut released_keys = Vec::new();
    let mut figures: Vec<Vec<i128>> = Vec::new();
    for key in keys {
        let (units, rows, sums) = &groups[&key];
        let mut rng = noise_rng(&grant.seed, &key);
        let mut noisy = Vec::with_capacity(acc.noises.len());
        for n in &acc.noises {
            let truth = match n.measure {
                Measure::Units => *units,
                Measure::Rows => *rows,
                Measure::Sum(j) => sums[j],
            };
            let z = discrete_laplace(&mut rng, n.scale.0, n.scale.1);
            noisy.push(truth.checked_add(z).ok_or_else(overflow)?);
        }
        if let Some(tau) = acc.tau
            && noisy[0] < tau
        {
            continue;
        }
        released_keys.push(key);
        figures.push(noisy);
    }
    let mut columns: Vec<ArrayRef> = Vec::new();
    if node.groups > 0 {
        let keys = layout.key_converter();
        let parser = keys.parser();
        columns.extend(keys.convert_rows(released_keys.iter().map(|k| parser.parse(k)))?);
    }
    let idx = |m: &Measure| {
        acc.noise(m)
            .map(|(i, _)| i)
            .ok_or_else(|| DataFusionError::Internal("DP release: a measure without noise".into()))
    };
    let mut cis: Vec<ArrayRef> = Vec::new();
    for a in &node.aggregates {
        match a {
            DpAggregate::Rows | DpAggregate::Units => {
                let m = if *a == DpAggregate::Rows {
                    Measure::Rows
                } else {
                    Measure::Units
                };
                let i = idx(&m)?;
                let mut b = Int64Builder::new();
                for f in &figures {
                    b.append_value(i64::try_from(f[i]).map_err(|_| overflow())?);
                }
                columns.push(Arc::new(b.finish()));
                let w = acc.noises[i].half_width(0.05);
                cis.push(Arc::new(Float64Array::from(vec![w; figures.len()])));
            }
            DpAggregate::Sum(j) => {
                let i = idx(&Measure::Sum(*j))?;
                let b: Float64Array = figures
                    .iter()
                    .map(|f| Some(f[i] as f64 / FIXED_SCALE as f64))
                    .collect();
                columns.push(Arc::new(b));
                let w = acc.noises[i].half_width(0.05);
                cis.push(Arc::new(Float64Array::from(vec![w; figures.len()])));
            }
            DpAggregate::Avg(j) => {
                let (si, ri) = (idx(&Measure::Sum(*j))?, idx(&Measure::Rows)?);
                // Each of the two at 97.5%: the corners of both intervals hold the
                // ratio with probability at least 95% (union bound).
                let hs = acc.noises[si].half_width(0.025);
                let hr = acc.noises[ri].half_width(0.025);
                let mut avg = Float64Builder::new();
                let mut ci = Float64Builder::new();
                for f in &figures {
                    let s = f[si] as f64 / FIXED_SCALE as f64;
                    let n = (f[ri] as f64).max(1.0);
                    let a = s / n;
                    avg.append_value(a);
                    if n - hr >= 1.0 {
                        let w = [
                            (s + hs) / (n - hr),
                            (s - hs) / (n - hr),
                            (s + hs) / (n + hr),
                            (s - hs) / (n + hr),
                        ]
                        .iter()
                        .map(|c| (c - a).abs())
                        .fold(0.0, f64::max);
                        ci.append_value(w);
                    } else {
                        // Too few rows for a finite interval.
                        ci.append_null();
                    }
                }
                columns.push(Arc::new(avg.finish()));
                cis.push(Arc::new(ci.finish()));
            }
        }
    }
    columns.extend(cis);
    let columns = columns
        .into_iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(c)
            } else {
                Ok(cast(&c, f.data_type())?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

/// The generator of one group's noise: ChaCha20 keyed by SHA-256(seed, group key).
pub fn noise_rng(seed: &[u8; 32], key: &[u8]) -> rand_chacha::ChaCha20Rng {
    let mut h = Sha256::new();
    h.update(b"airlock-dp-noise");
    h.update(seed);
    h.update(key);
    rand_chacha::ChaCha20Rng::from_seed(h.finalize().into())
}

/// A fresh seed from the operating system.
pub fn fresh_seed() -> [u8; 32] {
    let mut s = [0u8; 32];
    rand::RngCore::fill_bytes(&mut os_rng(), &mut s);
    s
}

/// Runs the DP release of `node` over in-memory batches (the node's input rows) in any
/// order, as the execution plan does for rows out of order. For tests and benchmarks of
/// the mechanism itself.
pub fn release_batches(
    node: &DpRelease,
    grant: &Grant,
    batches: &[RecordBatch],
) -> Result<RecordBatch> {
    let mut acc = Scattered::new(layout(node)?, rule(node, grant));
    for b in batches {
        acc.add(b)?;
    }
    let schema: SchemaRef = Arc::new(node.schema.as_arrow().clone());
    release(acc.finish()?, &layout(node)?, node, grant, &schema)
}

#[cfg(test)]
mod tests {
    //! The statistics of the mechanism, in process (thousands of runs in a second or
    //! two). Each run draws a fresh seed from the OS, as every distinct query does.
    use super::*;
    use crate::policy::dp::Real;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::Schema;
    use datafusion::common::ToDFSchema;
    use datafusion::logical_expr::EmptyRelation;
    use std::collections::HashMap;

    fn policy(l0: u64, c: u64, delta: f64) -> DpPolicy {
        DpPolicy {
            max_groups_per_unit: l0,
            max_rows_per_group_per_unit: c,
            bounds: [("v".to_string(), (Real(0.0), Real(100.0)))].into(),
            max_epsilon: Real(10.0),
            delta: Real(delta),
            stored_in_unit_order: None,
        }
    }

    fn node(groups: usize, aggregates: Vec<DpAggregate>, policy: DpPolicy) -> DpRelease {
        let mut fields = vec![Field::new("unit", DataType::Int64, true)];
        if groups > 0 {
            fields.push(Field::new("key", DataType::Utf8, true));
        }
        fields.push(Field::new("v", DataType::Float64, true));
        let input_schema = Schema::new(fields).to_dfschema_ref().unwrap();
        let mut out = Vec::new();
        if groups > 0 {
            out.push(Field::new("key", DataType::Utf8, true));
        }
        for (i, _) in aggregates.iter().enumerate() {
            out.push(Field::new(format!("agg{i}"), DataType::Float64, true));
        }
        let output = Schema::new(out).to_dfschema().unwrap();
        DpRelease::try_new(
            LogicalPlan::EmptyRelation(EmptyRelation {
                produce_one_row: false,
                schema: input_schema,
            }),
            "t.t".into(),
            groups,
            vec![("v".into(), 0, 100 * FIXED_SCALE)],
            aggregates,
            policy,
            &output,
            Arc::default(),
        )
        .unwrap()
    }

    /// Rows (unit, key, value) as the node's input.
    fn batch(node: &DpRelease, rows: &[(i64, &str, f64)]) -> RecordBatch {
        let schema: SchemaRef = Arc::new(node.input.schema().as_arrow().clone());
        let mut cols: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        ))];
        if node.groups > 0 {
            cols.push(Arc::new(StringArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )));
        }
        cols.push(Arc::new(Float64Array::from(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        )));
        RecordBatch::try_new(schema, cols).unwrap()
    }

    fn run(node: &DpRelease, eps: f64, rows: &[(i64, &str, f64)]) -> RecordBatch {
        let grant = Grant {
            accounting: node.accounting(eps).unwrap(),
            seed: fresh_seed(),
        };
        release_batches(node, &grant, &[batch(node, rows)]).unwrap()
    }

    fn first_i64(b: &RecordBatch, col: usize) -> i64 {
        b.column(col)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .unwrap()
            .value(0)
    }

    fn units(n: i64) -> Vec<(i64, &'static str, f64)> {
        (0..n).map(|u| (u, "a", 50.0)).collect()
    }

    /// Neighbouring datasets (one unit added): for every output value with enough mass
    /// in both, the ratio of frequencies stays within e^ε. Tolerance: with at least
    /// 400 hits per bin, each frequency's relative sd is at most 5%, so the ratio's is
    /// about 7%; 1.3·e^ε is more than 4 sd above e^ε. The largest ratio seen must also
    /// come close to e^ε (the test has power: the discrete Laplace attains the bound).
    #[test]
    fn neighbouring_datasets_change_outputs_by_at_most_e_to_the_epsilon() {
        let eps = 1.0;
        let n = node(0, vec![DpAggregate::Units], policy(1, 1, 1e-6));
        let runs = 20_000;
        let hist = |d: &[(i64, &str, f64)]| {
            let mut h = HashMap::<i64, u32>::new();
            for _ in 0..runs {
                *h.entry(first_i64(&run(&n, eps, d), 0)).or_default() += 1;
            }
            h
        };
        let (d, d1) = (hist(&units(20)), hist(&units(21)));
        let mut worst: f64 = 0.0;
        for (k, a) in &d {
            let Some(b) = d1.get(k) else { continue };
            if *a < 400 || *b < 400 {
                continue;
            }
            let r = (*a as f64 / *b as f64).max(*b as f64 / *a as f64);
            assert!(r <= 1.3 * eps.exp(), "output {k}: ratio {r}");
            worst = worst.max(r);
        }
        assert!(
            worst > 0.7 * eps.exp(),
            "largest ratio {worst}: the test has no power"
        );
    }

    /// A group that exists for one unit alone is released with probability at most
    /// δ (here δ = 5e-2, so 4,000 runs expect at most 200 releases; 300 is about
    /// 7 sd above).
    #[test]
    fn a_one_unit_group_is_released_about_delta_of_the_time() {
        let n = node(1, vec![DpAggregate::Rows], policy(1, 1, 5e-2));
        let mut rows = units(50);
        rows.push((999, "rare", 50.0));
        let mut released = 0;
        for _ in 0..4_000 {
            let b = run(&n, 1.0, &rows);
            let keys = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            assert!(
                (0..keys.len()).any(|i| keys.value(i) == "a"),
                "the big group is released"
            );
            released += (0..keys.len()).filter(|i| keys.value(*i) == "rare").count();
        }
        assert!(released <= 300, "released {released} times in 4000");
        // And the exact probability: P(1 + Z >= τ) <= δ / L0.
        let a = n.accounting(1.0).unwrap();
        let b = a.noises[0].scale_f64();
        let alpha = (-1.0 / b).exp();
        let tau = a.tau.unwrap() as i32;
        assert!(alpha.powi(tau - 1) / (1.0 + alpha) <= 5e-2);
    }

    /// The differencing attack: count(all) and count(all but one person) are exact on a
    /// threshold table (difference 1). Here their answer distributions overlap: the
    /// total variation distance stays near the theoretical (1-α)/(1+α) = 0.46 at ε = 1.
    #[test]
    fn differencing_answers_overlap() {
        let n = node(0, vec![DpAggregate::Rows], policy(1, 1, 1e-6));
        let runs = 10_000;
        let hist = |d: &[(i64, &str, f64)]| {
            let mut h = HashMap::<i64, f64>::new();
            for _ in 0..runs {
                *h.entry(first_i64(&run(&n, 1.0, d), 0)).or_default() += 1.0 / runs as f64;
            }
            h
        };
        let (all, but_one) = (hist(&units(50)), hist(&units(49)));
        let keys: std::collections::BTreeSet<i64> =
            all.keys().chain(but_one.keys()).copied().collect();
        let tv: f64 = keys
            .iter()
            .map(|k| (all.get(k).unwrap_or(&0.0) - but_one.get(k).unwrap_or(&0.0)).abs())
            .sum::<f64>()
            / 2.0;
        // ε is split over units and rows: each at 0.5, so α = e^-0.5 and TV ≈ 0.245.
        assert!(tv < 0.35, "total variation {tv}");
    }

    /// The reported 95% intervals cover the true (bounded) value at least ~95% of the
    /// time: for COUNT, SUM and AVG (AVG's interval is conservative by construction).
    #[test]
    fn intervals_cover_the_truth_95_percent_of_the_time() {
        let n = node(
            0,
            vec![DpAggregate::Rows, DpAggregate::Sum(0), DpAggregate::Avg(0)],
            policy(1, 1, 1e-6),
        );
        let rows: Vec<(i64, &str, f64)> = (0..300).map(|u| (u, "a", (u % 100) as f64)).collect();
        let (count, sum) = (300.0, rows.iter().map(|r| r.2).sum::<f64>());
        let avg = sum / count;
        let runs = 2_000;
        let mut covered = [0u32; 3];
        for _ in 0..runs {
            let b = run(&n, 1.0, &rows);
            let f = |i: usize| {
                b.column(i)
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .map(|a| a.value(0))
            };
            let c = first_i64(&b, 0) as f64;
            let (s, a) = (f(1).unwrap(), f(2).unwrap());
            let (cc, sc, ac) = (f(3).unwrap(), f(4).unwrap(), f(5).unwrap());
            covered[0] += u32::from((c - count).abs() <= cc);
            covered[1] += u32::from((s - sum).abs() <= sc + 1e-9);
            covered[2] += u32::from((a - avg).abs() <= ac + 1e-9);
        }
        for (what, c) in ["count", "sum", "avg"].iter().zip(covered) {
            let rate = c as f64 / runs as f64;
            // sd of the rate at 95%: 0.5%; 0.93 is 4 sd below.
            assert!(rate >= 0.93, "{what}: coverage {rate}");
        }
    }

    /// One unit with many rows in many groups counts at most C rows in at most L0
    /// groups, whatever the order of its rows; the same seed gives the same answer in
    /// any order.
    #[test]
    fn contributions_are_bounded_and_order_does_not_matter() {
        let n = node(
            1,
            vec![DpAggregate::Rows, DpAggregate::Sum(0)],
            policy(2, 3, 1e-6),
        );
        let mut rows: Vec<(i64, &str, f64)> = Vec::new();
        for u in 0..400 {
            rows.push((u, "base", 1.0));
        }
        let groups = ["g0", "g1", "g2", "g3", "g4"];
        for g in groups {
            for _ in 0..50 {
                rows.push((7, g, 1_000.0)); // clamped to 100
            }
        }
        let grant = Grant {
            accounting: n.accounting(10.0).unwrap(),
            seed: fresh_seed(),
        };
        let a = release_batches(&n, &grant, &[batch(&n, &rows)]).unwrap();
        let mut reversed = rows.clone();
        reversed.reverse();
        let b = release_batches(&n, &grant, &[batch(&n, &reversed)]).unwrap();
        assert_eq!(a, b, "same seed, any order: the same answer");
        // The heavy unit's groups each hold one unit: never released (τ), and "base"
        // counts at most 400 rows (plus small noise at ε = 10).
        let keys = a.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(keys.len(), 1, "{a:?}");
        assert_eq!(keys.value(0), "base");
        let count = a
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0);
        assert!((count - 400).abs() < 30, "{count}");
    }
}
