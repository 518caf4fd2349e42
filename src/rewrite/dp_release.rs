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
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::runtime::SpawnedTask;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, DFSchemaRef, DataFusionError};
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, LogicalPlan, UserDefinedLogicalNodeCore};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties,
    Partitioning, PlanProperties,
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
    /// Rows hash-partitioned by unit: every unit's rows meet in one partition, so each
    /// partition bounds its units on its own (in parallel) and only the per-group
    /// totals are merged before the noise.
    fn required_input_distribution(&self) -> Vec<Distribution> {
        let unit = self.input.schema().field(0).name().clone();
        vec![Distribution::KeyPartitioned(vec![Arc::new(
            datafusion::physical_expr::expressions::Column::new(&unit, 0),
        )])]
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
        let inputs = (0..self.input.output_partitioning().partition_count())
            .map(|p| self.input.execute(p, Arc::clone(&context)))
            .collect::<Result<Vec<_>>>()?;
        let node = self.node.clone();
        let schema = Arc::clone(&self.schema);
        let fut = async move {
            let tasks: Vec<_> = inputs
                .into_iter()
                .map(|mut input| {
                    let (node, grant) = (node.clone(), grant.clone());
                    SpawnedTask::spawn(async move {
                        let mut acc = Accumulator::new(&node, &grant)?;
                        while let Some(batch) = input.next().await {
                            acc.add(&batch?)?;
                        }
                        acc.bounded(&node)
                    })
                })
                .collect();
            let mut totals = Totals::new();
            for t in tasks {
                let part = t
                    .join_unwind()
                    .await
                    .map_err(|e| DataFusionError::Execution(format!("DP release: {e}")))??;
                merge(&mut totals, part, node.values.len())?;
            }
            Accumulator::new(&node, &grant)?.release(totals, &node, &grant, &schema)
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            futures::stream::once(fut),
        )))
    }
}

/// The rows one unit gives one group in one partition, before bounding.
#[derive(Debug)]
struct Cell {
    /// The group key's id (its index in [`Accumulator::key_bytes`]).
    key: u32,
    rows: usize,
    /// `rows × values` fixed-point values, row after row (None for NULL).
    vals: Vec<Option<i64>>,
}

/// Per group key (its row bytes): units, rows and sums after bounding.
type Totals = HashMap<Box<[u8]>, (i128, i128, Vec<i128>)>;

fn overflow() -> DataFusionError {
    DataFusionError::Execution("DP release: a sum overflows".into())
}

/// Adds one partition's totals to `into` (partitions hold disjoint units).
fn merge(into: &mut Totals, part: Totals, values: usize) -> Result<()> {
    for (key, (units, rows, sums)) in part {
        let g = into.entry(key).or_insert_with(|| (0, 0, vec![0; values]));
        g.0 = g.0.checked_add(units).ok_or_else(overflow)?;
        g.1 = g.1.checked_add(rows).ok_or_else(overflow)?;
        for (t, v) in g.2.iter_mut().zip(sums) {
            *t = t.checked_add(v).ok_or_else(overflow)?;
        }
    }
    Ok(())
}

/// The rows of one partition read so far, per unit and group.
///
/// Laid out for the common case, where a unit has a handful of rows in a handful of
/// groups: one map probe per row (by the unit's row bytes), a short scan of the unit's
/// cells, the values appended to the cell. Nothing is hashed for the bounds until a
/// cell holds more than C rows or a unit more than L0 groups; the rows kept are then
/// the same as if every row had been hashed on arrival.
pub struct Accumulator {
    units: RowConverter,
    keys: RowConverter,
    c: usize,
    groups: usize,
    seed: [u8; 32],
    bounds: Vec<(i64, i64)>,
    /// Group keys seen (row bytes) and their ids: few in any query that can release.
    key_ids: HashMap<Box<[u8]>, u32>,
    key_bytes: Vec<Box<[u8]>>,
    /// Per unit (its row bytes), its cells, one per group it gives rows to.
    cells: hashbrown::HashMap<Box<[u8]>, Vec<Cell>>,
}

/// The keyed hash that orders a cell's rows for the C bound: a function of the query's
/// seed and the row's content (unit, group, values), never of its position.
fn row_hash(seed: &[u8; 32], unit: &[u8], key: &[u8], vals: &[Option<i64>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut h);
    unit.hash(&mut h);
    key.hash(&mut h);
    vals.hash(&mut h);
    h.finish()
}

/// The keyed SHA-256 that orders a unit's groups for the L0 bound.
fn group_hash(seed: &[u8; 32], unit: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"airlock-dp-l0");
    h.update(seed);
    h.update((unit.len() as u64).to_be_bytes());
    h.update(unit);
    h.update(key);
    h.finalize().into()
}

/// Keeps the C rows of a cell with the smallest keyed hashes (ties broken by value).
fn trim(cell: &mut Cell, c: usize, nv: usize, seed: &[u8; 32], unit: &[u8], key: &[u8]) {
    if cell.rows <= c {
        return;
    }
    let mut rows: Vec<(u64, &[Option<i64>])> = (0..cell.rows)
        .map(|r| {
            let v = &cell.vals[r * nv..(r + 1) * nv];
            (row_hash(seed, unit, key, v), v)
        })
        .collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    rows.truncate(c);
    let vals = rows.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    cell.rows = rows.len();
    cell.vals = vals;
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
            key_ids: HashMap::new(),
            key_bytes: Vec::new(),
            cells: hashbrown::HashMap::new(),
        })
    }

    fn add(&mut self, batch: &RecordBatch) -> Result<()> {
        let g = self.groups;
        let units = self.units.convert_columns(&[Arc::clone(batch.column(0))])?;
        let keys = if g == 0 {
            self.keys.convert_columns(&[global_key(batch.num_rows())])?
        } else {
            self.keys.convert_columns(&batch.columns()[1..=g])?
        };
        let values: Vec<Float64Array> = batch.columns()[g + 1..]
            .iter()
            .map(|c| {
                cast(c, &DataType::Float64)?
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .cloned()
                    .ok_or_else(|| DataFusionError::Internal("DP value column".into()))
            })
            .collect::<Result<_>>()?;
        let nv = values.len();
        let unit_column = batch.column(0);
        // The previous row's group id: rows of one group often arrive together.
        let mut last: Option<(usize, u32)> = None;
        for r in 0..batch.num_rows() {
            // A row without a unit belongs to no one we can bound: it is dropped.
            if unit_column.is_null(r) {
                continue;
            }
            let key = keys.row(r);
            let id = match last {
                Some((p, id)) if keys.row(p) == key => id,
                _ => match self.key_ids.get(key.as_ref()) {
                    Some(id) => *id,
                    None => {
                        let id = u32::try_from(self.key_bytes.len()).map_err(|_| {
                            DataFusionError::Execution("DP release: too many groups".into())
                        })?;
                        self.key_ids.insert(key.as_ref().into(), id);
                        self.key_bytes.push(key.as_ref().into());
                        id
                    }
                },
            };
            last = Some((r, id));
            let unit = units.row(r);
            let cells = self.cells.entry_ref(unit.as_ref()).or_default();
            let i = match cells.iter().position(|c| c.key == id) {
                Some(i) => i,
                None => {
                    cells.push(Cell {
                        key: id,
                        rows: 0,
                        vals: Vec::new(),
                    });
                    cells.len() - 1
                }
            };
            let cell = &mut cells[i];
            cell.rows += 1;
            cell.vals
                .extend(values.iter().zip(&self.bounds).map(|(a, (lo, hi))| {
                    (!a.is_null(r)).then(|| {
                        let v = a.value(r);
                        if v.is_nan() {
                            *lo
                        } else {
                            to_fixed(v).clamp(*lo, *hi)
                        }
                    })
                }));
            // Memory stays bounded by C per cell, whatever one unit holds.
            if cell.rows > 2 * self.c.max(16) {
                let key = &self.key_bytes[id as usize];
                trim(cell, self.c, nv, &self.seed, unit.as_ref(), key);
            }
        }
        Ok(())
    }

    /// Bounds this partition's units (C rows per group, L0 groups per unit) and totals
    /// what they give each group.
    fn bounded(self, node: &DpRelease) -> Result<Totals> {
        let l0 = usize::try_from(node.policy.max_groups_per_unit).unwrap_or(usize::MAX);
        let nv = self.bounds.len();
        let mut totals: Vec<(i128, i128, Vec<i128>)> =
            vec![(0, 0, vec![0; nv]); self.key_bytes.len()];
        for (unit, mut cells) in self.cells {
            for cell in cells.iter_mut() {
                let key = &self.key_bytes[cell.key as usize];
                trim(cell, self.c, nv, &self.seed, &unit, key);
            }
            if cells.len() > l0 {
                // The L0 groups with the smallest keyed SHA-256 of (unit, group).
                let mut ranked: Vec<([u8; 32], Cell)> = cells
                    .into_iter()
                    .map(|c| {
                        let key = &self.key_bytes[c.key as usize];
                        (group_hash(&self.seed, &unit, key), c)
                    })
                    .collect();
                ranked.sort_unstable_by_key(|a| a.0);
                ranked.truncate(l0);
                cells = ranked.into_iter().map(|(_, c)| c).collect();
            }
            for cell in &cells {
                let g = &mut totals[cell.key as usize];
                g.0 = g.0.checked_add(1).ok_or_else(overflow)?;
                g.1 = g.1.checked_add(cell.rows as i128).ok_or_else(overflow)?;
                if nv > 0 {
                    for row in cell.vals.chunks_exact(nv) {
                        for (s, v) in g.2.iter_mut().zip(row) {
                            if let Some(v) = v {
                                *s = s.checked_add(*v as i128).ok_or_else(overflow)?;
                            }
                        }
                    }
                }
            }
        }
        // A group every one of whose units spent their L0 elsewhere is not there at all.
        Ok(self
            .key_bytes
            .into_iter()
            .zip(totals)
            .filter(|(_, t)| t.0 > 0)
            .collect())
    }

    /// Adds noise to every group's totals, selects groups (τ) and builds the output.
    fn release(
        self,
        mut groups: Totals,
        node: &DpRelease,
        grant: &Grant,
        schema: &SchemaRef,
    ) -> Result<RecordBatch> {
        let nv = self.bounds.len();
        // A global aggregate releases one row even over no rows.
        if self.groups == 0 && groups.is_empty() {
            let key = self.keys.convert_columns(&[global_key(1)])?;
            groups.insert(key.row(0).as_ref().into(), (0, 0, vec![0; nv]));
        }
        let mut keys: Vec<Box<[u8]>> = groups.keys().cloned().collect();
        keys.sort();
        let acc = &grant.accounting;
        let mut released_keys = Vec::new();
        let mut figures: Vec<Vec<i128>> = Vec::new();
        for key in keys {
            let (units, rows, sums) = &groups[&key];
            let mut rng = noise_rng(&self.seed, &key);
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
            let parser = self.keys.parser();
            columns.extend(
                self.keys
                    .convert_rows(released_keys.iter().map(|k| parser.parse(k)))?,
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

/// Runs the DP release of `node` over in-memory batches (the node's input rows), as
/// the execution plan does. For tests and benchmarks of the mechanism itself.
pub fn release_batches(
    node: &DpRelease,
    grant: &Grant,
    batches: &[RecordBatch],
) -> Result<RecordBatch> {
    let mut acc = Accumulator::new(node, grant)?;
    for b in batches {
        acc.add(b)?;
    }
    let schema: SchemaRef = Arc::new(node.schema.as_arrow().clone());
    let totals = acc.bounded(node)?;
    Accumulator::new(node, grant)?.release(totals, node, grant, &schema)
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

    fn policy(l0: u64, c: u64, delta: f64) -> DpPolicy {
        DpPolicy {
            max_groups_per_unit: l0,
            max_rows_per_group_per_unit: c,
            bounds: [("v".to_string(), (Real(0.0), Real(100.0)))].into(),
            max_epsilon: Real(10.0),
            delta: Real(delta),
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
        // Bounding itself, without noise: feed only the heavy unit with "base" rows.
        let mut acc = Accumulator::new(&n, &grant).unwrap();
        acc.add(&batch(&n, &rows)).unwrap();
        let seven = acc
            .units
            .convert_columns(&[Arc::new(Int64Array::from(vec![7]))])
            .unwrap();
        let heavy = acc.cells[seven.row(0).as_ref()].len();
        assert_eq!(heavy, 6, "six cells (base and g0..g4) before the L0 cut");
    }

    /// The bounds are applied lazily (a cell is hashed only past C rows, a unit only
    /// past L0 groups, some cells trimmed mid-stream): the totals must be those of the
    /// rule itself, every row hashed on arrival, whatever the batch boundaries.
    #[test]
    fn lazy_bounds_keep_what_the_rule_keeps() {
        use rand::Rng;
        let (l0, c) = (3usize, 5usize);
        let n = node(
            1,
            vec![DpAggregate::Rows, DpAggregate::Sum(0)],
            policy(l0 as u64, c as u64, 1e-6),
        );
        let groups = ["a", "b", "c", "d", "e", "f"];
        let mut rng = rand::rng();
        for _ in 0..20 {
            // Up to 80 rows per cell: past 2·max(C, 16), so trims happen while adding.
            let rows: Vec<(i64, &str, f64)> = (0..3_000)
                .map(|_| {
                    (
                        rng.random_range(0..40),
                        groups[rng.random_range(0..groups.len())],
                        f64::from(rng.random_range(0..150)),
                    )
                })
                .collect();
            let grant = Grant {
                accounting: n.accounting(1.0).unwrap(),
                seed: fresh_seed(),
            };
            let mut acc = Accumulator::new(&n, &grant).unwrap();
            for chunk in rows.chunks(rng.random_range(1..500)) {
                acc.add(&batch(&n, chunk)).unwrap();
            }
            let lazy = acc.bounded(&n).unwrap();

            // The rule, eagerly: per (unit, group) the C smallest (hash, value) rows, per
            // unit the L0 groups with the smallest SHA-256.
            let conv = Accumulator::new(&n, &grant).unwrap();
            let b = batch(&n, &rows);
            let units = conv
                .units
                .convert_columns(&[Arc::clone(b.column(0))])
                .unwrap();
            let keys = conv
                .keys
                .convert_columns(&[Arc::clone(b.column(1))])
                .unwrap();
            type Rows = Vec<(u64, Vec<Option<i64>>)>;
            let mut cells: HashMap<(Vec<u8>, Vec<u8>), Rows> = HashMap::new();
            for (r, row) in rows.iter().enumerate() {
                let v = vec![Some(to_fixed(row.2).clamp(0, 100 * FIXED_SCALE))];
                let (u, k) = (
                    units.row(r).as_ref().to_vec(),
                    keys.row(r).as_ref().to_vec(),
                );
                let h = row_hash(&grant.seed, &u, &k, &v);
                cells.entry((u, k)).or_default().push((h, v));
            }
            type Ranked = Vec<([u8; 32], Vec<u8>, i128, i128)>;
            let mut by_unit: HashMap<Vec<u8>, Ranked> = HashMap::new();
            for ((u, k), mut rs) in cells {
                rs.sort();
                rs.truncate(c);
                let sum = rs.iter().map(|(_, v)| v[0].unwrap() as i128).sum();
                let g = group_hash(&grant.seed, &u, &k);
                by_unit
                    .entry(u)
                    .or_default()
                    .push((g, k, rs.len() as i128, sum));
            }
            let mut eager = Totals::new();
            for (_, mut gs) in by_unit {
                gs.sort();
                gs.truncate(l0);
                for (_, k, rows, sum) in gs {
                    let t = eager.entry(k.into()).or_insert((0, 0, vec![0]));
                    t.0 += 1;
                    t.1 += rows;
                    t.2[0] += sum;
                }
            }
            assert_eq!(lazy, eager);
        }
    }
}
