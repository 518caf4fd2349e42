//! Joins below a release boundary read all of their input, whatever the rows.
//!
//! DataFusion's hash join collects its build side first and, when that holds no row (or
//! only NULL keys), never reads its probe side: the join is over before it starts. Below
//! a boundary the build side can be raw protected rows under the analyst's filter, so
//! whether the probe side ran, with all the work and memory it costs, said whether a
//! hidden row passed the filter. The analyst chooses that cost: `JOIN generate_series(1,
//! 100000000)` or a released subquery of self-joins took 0.05 s when no hidden row
//! matched and 0.8–1.1 s when the target did, and a probe side that needs more than the
//! query's memory failed only when the target matched (hostile round 19, H1 and H2).
//!
//! So every join below a boundary reads its probe input to the end before it ends:
//!
//! | join | read to the end |
//! |---|---|
//! | hash join, nested loop join, cross join | the probe (right) input; the build (left) input is always collected in full |
//! | sort-merge join, symmetric hash join | both inputs: either may stop early |
//!
//! [`ProbeExec`] over such an input keeps each partition's stream where [`JoinEndExec`],
//! over the join, can reach it. When the join's partition ends, `JoinEndExec` reads
//! whatever of that stream the join left (all of it, when the join never polled it) and
//! only then ends. The work is then the same whether or not a hidden row reached the
//! join, up to the join's own probing (a hash lookup per probe row, where the build side
//! had rows), and an error or a memory limit the probe input meets, it meets either way.
//! Where the join read its input to the end, as it does whenever its build side has
//! rows, this costs nothing: the stream is already gone.
//!
//! The join's own work still differs: where the build side has rows it hashes and looks
//! up every probe row, where it is empty it does not. Over a series the analyst sizes
//! (10⁸ values) that alone was 0.35 s (hostile round 20), so a series is never the
//! streamed side of a join whose collected side reads rows: inner and semi hash joins
//! trade sides, and a join that cannot is refused (`series_collected`, with its table).
//!
//! Above every boundary the rows are released and joins are left as DataFusion plans
//! them. Stages a cluster hands to its workers (`crate::cluster`) are not rewritten
//! (docs/DESIGN.md, "Readings of the contract").

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::JoinType;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::joins::{
    CrossJoinExec, HashJoinExec, NestedLoopJoinExec, PartitionMode, SortMergeJoinExec,
    SymmetricHashJoinExec,
};
use datafusion::physical_plan::memory::LazyMemoryExec;
use datafusion::physical_plan::placeholder_row::PlaceholderRowExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties,
    PhysicalExpr, PlanProperties, RecordBatchStream, ReplaceChildrenOptions,
};
use futures::{Stream, StreamExt};
use parking_lot::Mutex;

use super::boundary::ReleaseExec;
use super::dp_release::DpReleaseExec;
use crate::policy::refusal::{ReasonCode, Refusal};

/// Puts every join below a release boundary of `plan` between a [`JoinEndExec`] and
/// [`ProbeExec`]s (see the module docs). Subtrees for which `skip` holds (a cluster's
/// workers' stages) are left as they are.
pub fn apply(
    plan: Arc<dyn ExecutionPlan>,
    skip: &dyn Fn(&Arc<dyn ExecutionPlan>) -> bool,
) -> Result<Arc<dyn ExecutionPlan>> {
    rewrite(plan, false, skip)
}

fn rewrite(
    plan: Arc<dyn ExecutionPlan>,
    below: bool,
    skip: &dyn Fn(&Arc<dyn ExecutionPlan>) -> bool,
) -> Result<Arc<dyn ExecutionPlan>> {
    if skip(&plan) || plan.children().is_empty() {
        return Ok(plan);
    }
    let inside = below
        || plan.downcast_ref::<ReleaseExec>().is_some()
        || plan.downcast_ref::<DpReleaseExec>().is_some();
    let children = plan
        .children()
        .into_iter()
        .map(|c| rewrite(Arc::clone(c), inside, skip))
        .collect::<Result<Vec<_>>>()?;
    let same = plan
        .children()
        .iter()
        .zip(&children)
        .all(|(a, b)| Arc::ptr_eq(a, b));
    let plan = if same { plan } else { replace(plan, children)? };
    if !below {
        return Ok(plan);
    }
    let plan = series_collected(plan)?;
    // A swapped join comes back under the projection that restores its column order.
    if plan.downcast_ref::<ProjectionExec>().is_some()
        && let [join] = plan.children().as_slice()
        && !streamed_inputs(join).is_empty()
    {
        let join = read_to_end(Arc::clone(join))?;
        return replace(plan, vec![join]);
    }
    read_to_end(plan)
}

/// A join between a [`JoinEndExec`] and [`ProbeExec`]s over the inputs it streams; any
/// other node as it is.
fn read_to_end(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let streamed = streamed_inputs(&plan);
    if streamed.is_empty() {
        return Ok(plan);
    }
    let mut children: Vec<_> = plan.children().into_iter().cloned().collect();
    for &i in streamed {
        children[i] = Arc::new(ProbeExec::new(Arc::clone(&children[i])));
    }
    Ok(Arc::new(JoinEndExec::new(replace(plan, children)?)))
}

/// What the leaves of a subtree read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Reads {
    /// A `generate_series` or `range`, which the analyst can make as large as they like.
    series: bool,
    /// Rows of anything else: a table (protected or not) or VALUES. Whether such an
    /// input has rows can depend on hidden rows.
    rows: bool,
}

fn reads(plan: &Arc<dyn ExecutionPlan>) -> Reads {
    if plan.downcast_ref::<LazyMemoryExec>().is_some() {
        return Reads {
            series: true,
            rows: false,
        };
    }
    let children = plan.children();
    if children.is_empty() {
        // A one-row or empty relation the query makes holds nothing hidden.
        let made = plan.downcast_ref::<PlaceholderRowExec>().is_some()
            || plan.downcast_ref::<EmptyExec>().is_some();
        return Reads {
            series: false,
            rows: !made,
        };
    }
    children
        .into_iter()
        .map(reads)
        .fold(Reads::default(), |a, b| Reads {
            series: a.series || b.series,
            rows: a.rows || b.rows,
        })
}

/// A join that would stream a series past a collected side that reads rows, made to
/// collect the series instead, or refused. Reading the streamed side to the end is not
/// enough for it: where the collected side has rows, the join also hashes and looks up
/// each streamed row, and an empty one skips that (10⁸ series rows: 0.51 against
/// 0.35 s, hostile round 20). So the series must be the side collected in full:
///
/// | collected side reads | streamed side reads | |
/// |---|---|---|
/// | no rows (only series, one-row relations) | anything | kept: nothing hidden decides its size |
/// | rows | no series | kept: the streamed side is the owner's data or the query's text |
/// | rows, no series | a series | inner and semi hash joins trade sides |
/// | rows and a series | a series, no rows | inner and semi hash joins trade sides (`p JOIN series h ... JOIN series g`, hostile round 21) |
/// | rows and a series | a series and rows | refused: either order streams a series past rows |
///
/// Any other join (outer, nested loop, cross) that would stream a series past rows is
/// refused. `check.rs` refuses outer joins of protected rows with relations the query
/// makes before a plan gets here; this is the rule for what is left, on the plan that
/// runs.
fn series_collected(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let Some(inputs) = collected_and_streamed(&plan) else {
        return Ok(plan);
    };
    let (collected, streamed) = (reads(inputs.0), reads(inputs.1));
    if !streamed.series || !collected.rows {
        return Ok(plan);
    }
    if let Some(join) = plan.downcast_ref::<HashJoinExec>()
        && matches!(
            join.join_type(),
            JoinType::Inner | JoinType::LeftSemi | JoinType::RightSemi
        )
        && (!collected.series || !streamed.rows)
        && let Some(swapped) = swap(join, &plan)?
    {
        return Ok(swapped);
    }
    Err(Refusal::new(
        ReasonCode::JoinNotAllowed,
        "a join below a release boundary that would look up the rows of a generate_series one by one only where rows of a table reach it: put the series on one side of the join only, joined by an inner join",
    )
    .into())
}

/// A join's inputs: the one it collects, then the one it streams past it.
type Sides<'a> = (&'a Arc<dyn ExecutionPlan>, &'a Arc<dyn ExecutionPlan>);

/// The (collected, streamed) inputs of a join that collects one input and streams the
/// other past it.
fn collected_and_streamed(plan: &Arc<dyn ExecutionPlan>) -> Option<Sides<'_>> {
    if let Some(j) = plan.downcast_ref::<HashJoinExec>() {
        return Some((j.left(), j.right()));
    }
    if let Some(j) = plan.downcast_ref::<NestedLoopJoinExec>() {
        return Some((j.left(), j.right()));
    }
    if let Some(j) = plan.downcast_ref::<CrossJoinExec>() {
        return Some((j.left(), j.right()));
    }
    None
}

/// `join` with its sides traded, the new collected side made one partition where the
/// join collects it whole; `None` where its mode does not say.
fn swap(
    join: &HashJoinExec,
    plan: &Arc<dyn ExecutionPlan>,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    match join.partition_mode() {
        // Both sides are partitioned alike: they trade places as they are.
        PartitionMode::Partitioned => Ok(Some(join.swap_inputs(PartitionMode::Partitioned)?)),
        PartitionMode::CollectLeft => {
            let right = Arc::clone(join.right());
            let right: Arc<dyn ExecutionPlan> = if right.output_partitioning().partition_count() > 1
            {
                Arc::new(CoalescePartitionsExec::new(right))
            } else {
                right
            };
            let one = replace(Arc::clone(plan), vec![Arc::clone(join.left()), right])?;
            match one.downcast_ref::<HashJoinExec>() {
                Some(j) => Ok(Some(j.swap_inputs(PartitionMode::CollectLeft)?)),
                None => Ok(None),
            }
        }
        PartitionMode::Auto => Ok(None),
    }
}

/// `plan` over new `children`, its properties computed again from them (the cluster's
/// placement uses it too).
pub(crate) fn replace(
    plan: Arc<dyn ExecutionPlan>,
    children: Vec<Arc<dyn ExecutionPlan>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.replace_children(
        children,
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
    )
}

/// The inputs of a join that it may stop reading before their end.
fn streamed_inputs(plan: &Arc<dyn ExecutionPlan>) -> &'static [usize] {
    if plan.downcast_ref::<HashJoinExec>().is_some()
        || plan.downcast_ref::<NestedLoopJoinExec>().is_some()
        || plan.downcast_ref::<CrossJoinExec>().is_some()
    {
        &[1]
    } else if plan.downcast_ref::<SortMergeJoinExec>().is_some()
        || plan.downcast_ref::<SymmetricHashJoinExec>().is_some()
    {
        &[0, 1]
    } else {
        &[]
    }
}

/// One partition's stream of a [`ProbeExec`], shared with the [`JoinEndExec`] above.
/// `None` once it ended or was taken.
type Slot = Arc<Mutex<Option<SendableRecordBatchStream>>>;

/// A [`ProbeExec`]'s streams by partition, shared with the [`JoinEndExec`] above.
type Slots = Arc<Mutex<HashMap<usize, Slot>>>;

/// A join's input, passed through unchanged; each partition's stream stays reachable
/// for the [`JoinEndExec`] above the join (see the module docs).
pub struct ProbeExec {
    input: Arc<dyn ExecutionPlan>,
    slots: Slots,
}

impl ProbeExec {
    fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        Self {
            input,
            slots: Arc::default(),
        }
    }
}

impl fmt::Debug for ProbeExec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("ProbeExec")
            .field("input", &self.input)
            .finish_non_exhaustive()
    }
}

/// What a [`JoinEndExec`] needs of one [`ProbeExec`] below it.
#[derive(Clone)]
struct Probe {
    input: Arc<dyn ExecutionPlan>,
    slots: Slots,
}

impl Probe {
    fn of(plan: &Arc<dyn ExecutionPlan>) -> Option<Self> {
        plan.downcast_ref::<ProbeExec>().map(|p| Self {
            input: Arc::clone(&p.input),
            slots: Arc::clone(&p.slots),
        })
    }

    /// What is left of partition `partition`'s stream: the join's, or a new one when the
    /// join never opened it.
    fn rest(&self, partition: usize, context: Arc<TaskContext>) -> Result<Slot> {
        match self.slots.lock().remove(&partition) {
            Some(slot) => Ok(slot),
            None => Ok(Arc::new(Mutex::new(Some(
                self.input.execute(partition, context)?,
            )))),
        }
    }
}

impl DisplayAs for ProbeExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("AirlockProbeExec: read to the end")
    }
}

impl ExecutionPlan for ProbeExec {
    fn name(&self) -> &str {
        "AirlockProbeExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(children.remove(0))))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let stream = self.input.execute(partition, context)?;
        let schema = stream.schema();
        let slot: Slot = Arc::new(Mutex::new(Some(stream)));
        self.slots.lock().insert(partition, Arc::clone(&slot));
        Ok(Box::pin(SlotStream { slot, schema }))
    }
}

/// The join's view of a probe stream.
struct SlotStream {
    slot: Slot,
    schema: SchemaRef,
}

impl Stream for SlotStream {
    type Item = Result<RecordBatch>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut slot = self.slot.lock();
        let Some(stream) = slot.as_mut() else {
            return Poll::Ready(None);
        };
        let next = stream.poll_next_unpin(cx);
        if matches!(next, Poll::Ready(None)) {
            // Ended: nothing is left to read.
            *slot = None;
        }
        next
    }
}

impl RecordBatchStream for SlotStream {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

/// A join below a boundary, passed through unchanged; when one of its partitions ends,
/// what its [`ProbeExec`] inputs still hold of that partition is read to the end first.
pub struct JoinEndExec {
    join: Arc<dyn ExecutionPlan>,
    probes: Vec<Probe>,
}

impl fmt::Debug for JoinEndExec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("JoinEndExec")
            .field("join", &self.join)
            .finish_non_exhaustive()
    }
}

impl JoinEndExec {
    fn new(join: Arc<dyn ExecutionPlan>) -> Self {
        let probes = join.children().into_iter().filter_map(Probe::of).collect();
        Self { join, probes }
    }
}

impl DisplayAs for JoinEndExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("AirlockJoinEndExec: inputs read to the end")
    }
}

impl ExecutionPlan for JoinEndExec {
    fn name(&self) -> &str {
        "AirlockJoinEndExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.join.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.join]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(children.remove(0))))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let join = self.join.execute(partition, Arc::clone(&context))?;
        let schema = join.schema();
        Ok(Box::pin(JoinEndStream {
            join: Some(join),
            probes: self.probes.clone(),
            draining: None,
            partition,
            context,
            schema,
        }))
    }
}

struct JoinEndStream {
    /// The join's stream, until it ends.
    join: Option<SendableRecordBatchStream>,
    /// The probe inputs whose rest is still to be read.
    probes: Vec<Probe>,
    /// The rest being read now.
    draining: Option<Slot>,
    partition: usize,
    context: Arc<TaskContext>,
    schema: SchemaRef,
}

impl Stream for JoinEndStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(join) = self.join.as_mut() {
            match join.poll_next_unpin(cx) {
                Poll::Ready(None) => self.join = None,
                other => return other,
            }
        }
        loop {
            if let Some(slot) = self.draining.clone() {
                let mut rest = slot.lock();
                match rest.as_mut().map(|s| s.poll_next_unpin(cx)) {
                    // Read and dropped: only the work counts.
                    Some(Poll::Ready(Some(Ok(_)))) => continue,
                    Some(Poll::Ready(Some(Err(e)))) => {
                        *rest = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Some(Poll::Pending) => return Poll::Pending,
                    Some(Poll::Ready(None)) | None => {
                        *rest = None;
                        drop(rest);
                        self.draining = None;
                    }
                }
            }
            let Some(probe) = self.probes.pop() else {
                return Poll::Ready(None);
            };
            let (partition, context) = (self.partition, Arc::clone(&self.context));
            match probe.rest(partition, context) {
                Ok(slot) => self.draining = Some(slot),
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

impl RecordBatchStream for JoinEndStream {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    use super::*;

    /// The physical plan of `sql` over two small tables `t(a)` and `u(b)`, rewritten as
    /// if below a release boundary.
    async fn below_boundary(sql: &str) -> Result<Arc<dyn ExecutionPlan>> {
        let mut config = datafusion::prelude::SessionConfig::new();
        crate::session::no_skipping(config.options_mut());
        let ctx = SessionContext::new_with_config(config);
        for (name, column) in [("t", "a"), ("u", "b")] {
            let schema = Arc::new(Schema::new(vec![Field::new(
                column,
                DataType::Int64,
                false,
            )]));
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from_iter_values(1..=20))],
            )?;
            ctx.register_table(
                name,
                Arc::new(MemTable::try_new(schema, vec![vec![batch]])?),
            )?;
        }
        let plan = ctx.sql(sql).await?.create_physical_plan().await?;
        rewrite(plan, true, &|_| false)
    }

    /// No join streams a series past a collected side that reads rows.
    fn no_series_streamed_past_rows(plan: &Arc<dyn ExecutionPlan>) {
        if let Some((collected, streamed)) = collected_and_streamed(plan) {
            assert!(
                !(reads(streamed).series && reads(collected).rows),
                "{}",
                datafusion::physical_plan::displayable(plan.as_ref()).indent(true)
            );
        }
        for c in plan.children() {
            no_series_streamed_past_rows(c);
        }
    }

    #[tokio::test]
    async fn a_series_is_the_collected_side_of_a_join_with_rows() {
        for sql in [
            "SELECT count(*) FROM t JOIN generate_series(1, 100000) g ON t.a = g.value",
            "SELECT count(*) FROM generate_series(1, 100000) g JOIN t ON t.a = g.value",
            // Hostile round 21: a small series joined first put a series on the collected
            // side too, and the big one stayed streamed.
            "SELECT count(*) FROM t JOIN generate_series(0, 127) h ON t.a = h.value \
             JOIN generate_series(1, 100000) g ON t.a = g.value",
            "SELECT count(*) FROM t JOIN generate_series(1, 100000) g ON t.a = g.value \
             JOIN generate_series(0, 127) h ON t.a = h.value",
            "SELECT count(*) FROM t WHERE a IN (SELECT value FROM generate_series(1, 100000))",
        ] {
            let plan = below_boundary(sql).await.unwrap();
            no_series_streamed_past_rows(&plan);
        }
    }

    #[tokio::test]
    async fn a_join_with_a_series_and_rows_on_both_sides_is_refused() {
        let err = below_boundary(
            "SELECT count(*) FROM (SELECT t.a FROM t JOIN generate_series(1, 10) h ON t.a = h.value) x \
             JOIN (SELECT u.b FROM u JOIN generate_series(1, 100000) g ON u.b = g.value) y ON x.a = y.b",
        )
        .await
        .map(|p| datafusion::physical_plan::displayable(p.as_ref()).indent(true).to_string())
        .unwrap_err();
        let refusal = crate::policy::refusal::find_refusal(&err).expect("a refusal");
        assert_eq!(refusal.code, ReasonCode::JoinNotAllowed, "{refusal}");
    }

    #[tokio::test]
    async fn joins_without_a_series_keep_their_sides() {
        let sql = "SELECT count(*) FROM t JOIN u ON t.a = u.b";
        let plan = below_boundary(sql).await.unwrap();
        let join = find_join(&plan).expect("a hash join");
        assert!(join.downcast_ref::<HashJoinExec>().is_some());
    }

    fn find_join(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
        if plan.downcast_ref::<HashJoinExec>().is_some() {
            return Some(Arc::clone(plan));
        }
        plan.children().into_iter().find_map(find_join)
    }
}
