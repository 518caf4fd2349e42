//! The release boundary (PRIVACY.md §3.0): a plan node of its own directly above the
//! aggregate that consumes protected rows.
//!
//! [`Release`] takes that aggregate with one hidden distinct-entity count per protected
//! scan behind it (`airlock_reaches_k`, see `reaches.rs`), passes on the rows where every
//! count reaches its table's k, and drops the counts. It is a barrier for the optimizer:
//! it lets no predicate through (every output column is in
//! `prevent_predicate_push_down_columns`) and no limit (`supports_limit_pushdown` is
//! false), so nothing an analyst wrote above it is ever evaluated on a suppressed group.
//! [`ReleaseExec`] is its execution plan; it owns the counter of suppressed groups.
//!
//! In remainder mode (§3.4) the input is the union of the groups and one merged row of
//! the small groups (built by `threshold.rs`); the node applies the same k rule to both.

use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, BooleanArray, Int64Array, RecordBatch};
use datafusion::arrow::compute::{and, filter_record_batch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, DFSchemaRef, DataFusionError};
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Expr, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties, RecordBatchStream,
};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};
use futures::{Stream, StreamExt};

use super::protect::Protect;

/// Prefix of the hidden count columns.
pub const COUNT_PREFIX: &str = "__airlock_count_";

/// Indexes of a boundary input's kept columns, and of its count columns with their k.
type Layout = (Vec<usize>, Vec<(usize, u64)>);

/// The release boundary.
#[derive(Debug, Clone)]
pub struct Release {
    pub input: LogicalPlan,
    /// (count column name, k) for every protected scan behind the aggregate.
    pub counts: Vec<(String, u64)>,
    /// Small groups merged into one row (§3.4) rather than dropped.
    pub remainder: bool,
    schema: DFSchemaRef,
    /// Groups withheld, for the audit log and the metrics.
    pub suppressed: Arc<AtomicU64>,
}

impl PartialEq for Release {
    fn eq(&self, other: &Self) -> bool {
        self.input == other.input
            && self.counts == other.counts
            && self.remainder == other.remainder
    }
}

impl Eq for Release {}

impl Hash for Release {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.input.hash(state);
        self.counts.hash(state);
        self.remainder.hash(state);
    }
}

impl PartialOrd for Release {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.counts.partial_cmp(&other.counts)
    }
}

impl Release {
    pub fn try_new(
        input: LogicalPlan,
        counts: Vec<(String, u64)>,
        remainder: bool,
    ) -> Result<Self> {
        Self::with_counter(input, counts, remainder, Arc::default())
    }

    fn with_counter(
        input: LogicalPlan,
        counts: Vec<(String, u64)>,
        remainder: bool,
        suppressed: Arc<AtomicU64>,
    ) -> Result<Self> {
        let input_schema = input.schema();
        for (name, _) in &counts {
            if !input_schema.fields().iter().any(|f| f.name() == name) {
                return Err(DataFusionError::Plan(format!(
                    "release boundary: the input has no count column {name}"
                )));
            }
        }
        let kept: Vec<_> = input_schema
            .iter()
            .filter(|(_, f)| !f.name().starts_with(COUNT_PREFIX))
            .map(|(q, f)| (q.cloned(), Arc::clone(f)))
            .collect();
        let schema = Arc::new(DFSchema::new_with_metadata(
            kept,
            input_schema.metadata().clone(),
        )?);
        Ok(Self {
            input,
            counts,
            remainder,
            schema,
            suppressed,
        })
    }

    /// Indexes of the input's kept columns and of its count columns (with k).
    fn layout(
        input: &datafusion::arrow::datatypes::Schema,
        counts: &[(String, u64)],
    ) -> Result<Layout> {
        let kept = (0..input.fields().len())
            .filter(|i| !input.field(*i).name().starts_with(COUNT_PREFIX))
            .collect();
        let counted = counts
            .iter()
            .map(|(name, k)| Ok((input.index_of(name)?, *k)))
            .collect::<Result<Vec<_>>>()?;
        Ok((kept, counted))
    }
}

impl UserDefinedLogicalNodeCore for Release {
    fn name(&self) -> &str {
        "AirlockRelease"
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

    /// Nothing above the boundary may be pushed below it.
    fn prevent_predicate_push_down_columns(&self) -> HashSet<String> {
        self.schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let counts: Vec<String> = self
            .counts
            .iter()
            .map(|(c, k)| format!("{c} >= {k}"))
            .collect();
        write!(
            f,
            "AirlockRelease: {}{}",
            counts.join(" AND "),
            if self.remainder {
                ", small groups merged"
            } else {
                ""
            }
        )
    }

    fn with_exprs_and_inputs(
        &self,
        _exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        Self::with_counter(
            inputs.remove(0),
            self.counts.clone(),
            self.remainder,
            Arc::clone(&self.suppressed),
        )
    }

    fn necessary_children_exprs(&self, output_columns: &[usize]) -> Option<Vec<Vec<usize>>> {
        let input = self.input.schema();
        let mut needed: Vec<usize> = output_columns
            .iter()
            .map(|i| {
                input.index_of_column_by_name(
                    self.schema.qualified_field(*i).0,
                    self.schema.field(*i).name(),
                )
            })
            .collect::<Option<Vec<_>>>()?;
        for (name, _) in &self.counts {
            needed.push(input.index_of_column_by_name(None, name)?);
        }
        needed.sort_unstable();
        needed.dedup();
        Some(vec![needed])
    }

    fn supports_limit_pushdown(&self) -> bool {
        false
    }
}

/// The release boundary of a plan node, if it is one.
pub fn as_release(plan: &LogicalPlan) -> Option<&Release> {
    match plan {
        LogicalPlan::Extension(e) => e.node.as_any().downcast_ref::<Release>(),
        _ => None,
    }
}

/// Executes a [`Release`]: keeps the rows whose counts all reach k, drops the counts.
#[derive(Debug)]
pub struct ReleaseExec {
    input: Arc<dyn ExecutionPlan>,
    kept: Vec<usize>,
    counts: Vec<(usize, u64)>,
    schema: SchemaRef,
    suppressed: Arc<AtomicU64>,
    properties: Arc<PlanProperties>,
}

impl ReleaseExec {
    fn try_new(
        input: Arc<dyn ExecutionPlan>,
        counts: &[(String, u64)],
        suppressed: Arc<AtomicU64>,
    ) -> Result<Self> {
        let (kept, counts) = Release::layout(&input.schema(), counts)?;
        let schema = Arc::new(input.schema().project(&kept)?);
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(input.output_partitioning().partition_count()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            input,
            kept,
            counts,
            schema,
            suppressed,
            properties,
        })
    }

    /// The groups this boundary withheld so far.
    pub fn suppressed(&self) -> &Arc<AtomicU64> {
        &self.suppressed
    }
}

impl DisplayAs for ReleaseExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let counts: Vec<String> = self
            .counts
            .iter()
            .map(|(i, k)| format!("#{i} >= {k}"))
            .collect();
        write!(f, "AirlockReleaseExec: {}", counts.join(" AND "))
    }
}

impl ExecutionPlan for ReleaseExec {
    fn name(&self) -> &str {
        "AirlockReleaseExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
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
        let input = children.remove(0);
        let names: Vec<(String, u64)> = self
            .counts
            .iter()
            .map(|(i, k)| (self.input.schema().field(*i).name().clone(), *k))
            .collect();
        Ok(Arc::new(Self::try_new(
            input,
            &names,
            Arc::clone(&self.suppressed),
        )?))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        Ok(Box::pin(ReleaseStream {
            input,
            kept: self.kept.clone(),
            counts: self.counts.clone(),
            schema: Arc::clone(&self.schema),
            suppressed: Arc::clone(&self.suppressed),
        }))
    }
}

struct ReleaseStream {
    input: SendableRecordBatchStream,
    kept: Vec<usize>,
    counts: Vec<(usize, u64)>,
    schema: SchemaRef,
    suppressed: Arc<AtomicU64>,
}

impl ReleaseStream {
    fn release(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let mut keep = BooleanArray::from(vec![true; batch.num_rows()]);
        for (i, k) in &self.counts {
            let counts = batch
                .column(*i)
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| {
                    DataFusionError::Internal("release boundary: count column is not Int64".into())
                })?;
            let k = i64::try_from(*k).unwrap_or(i64::MAX);
            // A NULL count (no entity at all) is below every k.
            let reaches: BooleanArray = counts
                .iter()
                .map(|c| Some(c.is_some_and(|c| c >= k)))
                .collect();
            keep = and(&keep, &reaches)?;
        }
        let withheld = batch.num_rows() - keep.true_count();
        self.suppressed
            .fetch_add(withheld as u64, Ordering::Relaxed);
        let kept = filter_record_batch(&batch, &keep)?;
        Ok(kept.project(&self.kept)?)
    }
}

impl Stream for ReleaseStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.input.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(batch))) => Poll::Ready(Some(self.release(batch))),
            other => other,
        }
    }
}

impl RecordBatchStream for ReleaseStream {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

/// Plans Airlock's logical nodes: [`Release`] into [`ReleaseExec`], [`Protect`] into a
/// filter (the row filters) and a projection (masks and entity key).
#[derive(Debug, Default)]
pub struct AirlockPlanner;

#[async_trait]
impl ExtensionPlanner for AirlockPlanner {
    async fn plan_extension(
        &self,
        planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        session_state: &dyn Session,
        planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        if let Some(r) = node.as_any().downcast_ref::<Release>() {
            return Ok(Some(Arc::new(ReleaseExec::try_new(
                Arc::clone(&physical_inputs[0]),
                &r.counts,
                Arc::clone(&r.suppressed),
            )?)));
        }
        if let Some(d) = node.as_any().downcast_ref::<super::dp_release::DpRelease>() {
            return Ok(Some(Arc::new(super::dp_release::DpReleaseExec::try_new(
                Arc::clone(&physical_inputs[0]),
                d.clone(),
            )?)));
        }
        if let Some(p) = node.as_any().downcast_ref::<Protect>() {
            let input_schema = logical_inputs[0].schema();
            let mut plan = Arc::clone(&physical_inputs[0]);
            if let Some(f) = &p.row_filter {
                let predicate =
                    planner.create_physical_expr(f, input_schema, session_state, planning_ctx)?;
                plan = Arc::new(FilterExec::try_new(predicate, plan)?);
            }
            let exprs = p
                .exprs
                .iter()
                .zip(p.schema.fields())
                .map(|(e, f)| {
                    Ok((
                        planner.create_physical_expr(
                            e,
                            input_schema,
                            session_state,
                            planning_ctx,
                        )?,
                        f.name().clone(),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok(Some(Arc::new(ProjectionExec::try_new(exprs, plan)?)));
        }
        Ok(None)
    }
}

/// A query planner that knows Airlock's nodes and, in a cluster, hands the part of a
/// plan below its release boundaries to workers (`crate::cluster::planner`).
#[derive(Debug, Default)]
pub struct AirlockQueryPlanner {
    distributor: Option<Arc<crate::cluster::planner::Distributor>>,
}

impl AirlockQueryPlanner {
    pub fn new(distributor: Option<Arc<crate::cluster::planner::Distributor>>) -> Self {
        Self { distributor }
    }
}

#[async_trait]
impl datafusion::execution::context::QueryPlanner for AirlockQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session_state: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let planner =
            datafusion::physical_planner::DefaultPhysicalPlanner::with_extension_planners(vec![
                Arc::new(AirlockPlanner),
            ]);
        let plan = planner
            .create_physical_plan(logical_plan, session_state)
            .await?;
        let plan = match &self.distributor {
            Some(d) => d.place(plan, session_state).await?,
            None => plan,
        };
        // Joins below a boundary read their inputs to the end (`drain`); the stages
        // workers run are planned there.
        super::drain::apply(plan, &|p| {
            p.downcast_ref::<datafusion_distributed::DistributedExec>()
                .is_some()
        })
    }
}

/// The suppressed-group counters of every release boundary in a physical plan.
pub fn suppression_counters(plan: &Arc<dyn ExecutionPlan>) -> Vec<Arc<AtomicU64>> {
    let mut out = Vec::new();
    let mut stack = vec![Arc::clone(plan)];
    while let Some(p) = stack.pop() {
        if let Some(r) = p.downcast_ref::<ReleaseExec>() {
            out.push(Arc::clone(r.suppressed()));
        }
        stack.extend(p.children().into_iter().cloned());
    }
    out
}
