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
//! 3. values clamped to the owner's bounds, in fixed point, summed in checked `i128`;
//! 4. per group, discrete Laplace noise (exact, `crate::dp::noise`) on each measurement,
//!    drawn from ChaCha20 keyed by SHA-256(query seed, group key): the same query, same
//!    seed and same data give the same answer, in any execution order;
//! 5. a grouped query keeps a group only when its noisy unit count reaches τ.
//!
//! The seed and the ε-split ([`Grant`]) are set when the ledger charged the query; a
//! node executed without one fails (closed). Output: the aggregate's own columns (counts
//! Int64, sums and averages Float64), then one `<name>_ci95` Float64 column per noisy
//! aggregate: the half-width of its 95% noise interval (noise only, not clamping bias).

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{
    Array, ArrayRef, Float64Array, Float64Builder, Int64Builder, RecordBatch,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, SchemaRef};
use datafusion::arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, DFSchemaRef, DataFusionError};
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, LogicalPlan, UserDefinedLogicalNodeCore};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::StreamExt;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use crate::dp::noise::{discrete_laplace, os_rng};
use crate::dp::plan::{Accounting, Measure};
use crate::policy::dp::{DpPolicy, FIXED_SCALE, to_fixed};

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
    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
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
        let input = self.input.execute(0, context)?;
        let node = self.node.clone();
        let schema = Arc::clone(&self.schema);
        let fut = async move {
            let mut acc = Accumulator::new(&node, &grant)?;
            let mut input = input;
            while let Some(batch) = input.next().await {
                acc.add(&batch?)?;
            }
            acc.finish(&node, &grant, &schema)
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            futures::stream::once(fut),
        )))
    }
}

/// The rows one unit gives one group: at most C, those with the smallest keyed hashes.
#[derive(Debug, Default)]
struct Contribution {
    /// (hash, values in fixed point; None for NULL)
    rows: Vec<(u64, Vec<Option<i64>>)>,
}

/// Everything read so far, bounded per unit and group.
pub struct Accumulator {
    units: RowConverter,
    keys: RowConverter,
    c: usize,
    groups: usize,
    seed: [u8; 32],
    bounds: Vec<(i64, i64)>,
    cells: HashMap<(OwnedRow, OwnedRow), Contribution>,
}

impl Accumulator {
    fn new(node: &DpRelease, grant: &Grant) -> Result<Self> {
        let s = node.input.schema();
        let unit = SortField::new(s.field(0).data_type().clone());
        // A global aggregate has one group, keyed by a constant.
        let keys = if node.groups == 0 {
            vec![SortField::new(DataType::Boolean)]
        } else {
            (1..=node.groups)
                .map(|i| SortField::new(s.field(i).data_type().clone()))
                .collect()
        };
        Ok(Self {
            units: RowConverter::new(vec![unit])?,
            keys: RowConverter::new(keys)?,
            c: usize::try_from(node.policy.max_rows_per_group_per_unit).unwrap_or(usize::MAX),
            groups: node.groups,
            seed: grant.seed,
            bounds: node.values.iter().map(|(_, lo, hi)| (*lo, *hi)).collect(),
            cells: HashMap::new(),
        })
    }

    fn add(&mut self, batch: &RecordBatch) -> Result<()> {
        let g = self.keys_len();
        let units = self.units.convert_columns(&[Arc::clone(batch.column(0))])?;
        let keys = if g == 0 {
            self.keys.convert_columns(&[global_key(batch.num_rows())])?
        } else {
            self.keys.convert_columns(&batch.columns()[1..=g])?
        };
        let values: Vec<Float64Array> = batch.columns()[g + 1..]
            .iter()
            .map(|c| {
                Ok(cast(c, &DataType::Float64)?
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .cloned()
                    .ok_or_else(|| DataFusionError::Internal("DP value column".into()))?)
            })
            .collect::<Result<_>>()?;
        for r in 0..batch.num_rows() {
            // A row without a unit belongs to no one we can bound: it is dropped.
            if batch.column(0).is_null(r) {
                continue;
            }
            let vals: Vec<Option<i64>> = values
                .iter()
                .zip(&self.bounds)
                .map(|(a, (lo, hi))| {
                    (!a.is_null(r)).then(|| {
                        let v = a.value(r);
                        if v.is_nan() {
                            *lo
                        } else {
                            to_fixed(v).clamp(*lo, *hi)
                        }
                    })
                })
                .collect();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.seed.hash(&mut h);
            units.row(r).as_ref().hash(&mut h);
            keys.row(r).as_ref().hash(&mut h);
            vals.hash(&mut h);
            let hash = h.finish();
            let cell = self
                .cells
                .entry((units.row(r).owned(), keys.row(r).owned()))
                .or_default();
            cell.rows.push((hash, vals));
            if cell.rows.len() > 2 * self.c.max(16) {
                Self::trim(&mut cell.rows, self.c);
            }
        }
        Ok(())
    }

    fn keys_len(&self) -> usize {
        self.groups
    }

    /// Keeps the C rows with the smallest hashes.
    fn trim(rows: &mut Vec<(u64, Vec<Option<i64>>)>, c: usize) {
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        rows.truncate(c);
    }

    /// Bounds, aggregates, adds noise and selects groups.
    fn finish(
        mut self,
        node: &DpRelease,
        grant: &Grant,
        schema: &SchemaRef,
    ) -> Result<RecordBatch> {
        let overflow = || DataFusionError::Execution("DP release: a sum overflows".into());
        // Per unit, its groups; keep the L0 with the smallest keyed SHA-256.
        let mut by_unit: HashMap<OwnedRow, Vec<([u8; 32], OwnedRow, Contribution)>> =
            HashMap::new();
        for ((unit, key), mut cell) in self.cells.drain() {
            Self::trim(&mut cell.rows, self.c);
            let mut h = Sha256::new();
            h.update(b"airlock-dp-l0");
            h.update(self.seed);
            h.update((unit.row().as_ref().len() as u64).to_be_bytes());
            h.update(unit.row().as_ref());
            h.update(key.row().as_ref());
            by_unit
                .entry(unit)
                .or_default()
                .push((h.finalize().into(), key, cell));
        }
        let l0 = usize::try_from(node.policy.max_groups_per_unit).unwrap_or(usize::MAX);
        let nv = self.bounds.len();
        // key -> (units, rows, sums)
        let mut groups: HashMap<OwnedRow, (i128, i128, Vec<i128>)> = HashMap::new();
        for (_, mut cells) in by_unit {
            cells.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            cells.truncate(l0);
            for (_, key, cell) in cells {
                let g = groups.entry(key).or_insert_with(|| (0, 0, vec![0; nv]));
                g.0 = g.0.checked_add(1).ok_or_else(overflow)?;
                g.1 =
                    g.1.checked_add(cell.rows.len() as i128)
                        .ok_or_else(overflow)?;
                for (_, vals) in &cell.rows {
                    for (j, v) in vals.iter().enumerate() {
                        if let Some(v) = v {
                            g.2[j] = g.2[j].checked_add(*v as i128).ok_or_else(overflow)?;
                        }
                    }
                }
            }
        }
        // A global aggregate releases one row even over no rows.
        if self.groups == 0 && groups.is_empty() {
            let key = self.keys.convert_columns(&[global_key(1)])?;
            groups.insert(key.row(0).owned(), (0, 0, vec![0; nv]));
        }
        let mut keys: Vec<OwnedRow> = groups.keys().cloned().collect();
        keys.sort();
        let acc = &grant.accounting;
        let mut released_keys = Vec::new();
        let mut figures: Vec<Vec<i128>> = Vec::new();
        for key in keys {
            let (units, rows, sums) = &groups[&key];
            let mut rng = noise_rng(&self.seed, key.row().as_ref());
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
        if self.groups > 0 {
            columns.extend(
                self.keys
                    .convert_rows(released_keys.iter().map(|k| k.row()))?,
            );
        }
        let idx = |m: &Measure| {
            acc.noise(m).map(|(i, _)| i).ok_or_else(|| {
                DataFusionError::Internal("DP release: a measure without noise".into())
            })
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
}

/// The generator of one group's noise: ChaCha20 keyed by SHA-256(seed, group key).
pub fn noise_rng(seed: &[u8; 32], key: &[u8]) -> rand_chacha::ChaCha20Rng {
    let mut h = Sha256::new();
    h.update(b"airlock-dp-noise");
    h.update(seed);
    h.update(key);
    rand_chacha::ChaCha20Rng::from_seed(h.finalize().into())
}

fn global_key(n: usize) -> ArrayRef {
    Arc::new(datafusion::arrow::array::BooleanArray::from(vec![true; n]))
}

/// A fresh seed from the operating system.
pub fn fresh_seed() -> [u8; 32] {
    let mut s = [0u8; 32];
    rand::RngCore::fill_bytes(&mut os_rng(), &mut s);
    s
}
