//! Which part of a plan runs on workers: only what lies below the release boundary.
//!
//! The front end plans a query as it always does (policy rewrite, optimizer, verifier,
//! physical planner); then [`Distributor::place`] hands the subtrees that can run
//! elsewhere to `datafusion-distributed`, which cuts them into stages behind network
//! boundaries. What it hands over is chosen from the top down:
//!
//! - a release node ([`ReleaseExec`], [`DpReleaseExec`]) never leaves the front end: the
//!   k threshold, the suppressed-group count the audit reads and the DP noise all run in
//!   this process. Its input is placed instead; a hash repartition directly below it stays
//!   here too, so the release keeps its parallelism;
//! - a subtree is handed over whole when it can run on a worker: it holds no release node,
//!   every leaf is a file scan (workers read the same dataset files) or an empty source,
//!   at least one leaf is a file scan, and it does work above its scans that the crate
//!   splits into stages (an aggregate or a hash repartition). Anything else (an in-memory hot dataset, a
//!   table function, a node only this process knows) stays here, and its children are
//!   considered in turn. A bare scan (with filters and projections) is not handed over:
//!   it would only move rows to this process, and datafusion-distributed 4.0 asks such a
//!   stage for partitions it does not have ("partition 1 not available") when the scan is
//!   one file it cannot split. So row queries run on the front end.
//!
//! [`verify_placement`] checks the result (no release node under a `DistributedExec`),
//! and a worker cannot decode a release node at all (no codec knows it): a bug here fails
//! the query rather than release anything from a worker.
//!
//! The crate distributes the plan a `QueryPlanner` returns; [`Distributor`] wraps its
//! planner around [`CarrierPlanner`], which returns a physical plan carried in a logical
//! [`Carrier`] node, so that the crate's planner can be applied to any subtree.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::{DFSchema, DFSchemaRef};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::{Expr, Extension, LogicalPlan, UserDefinedLogicalNodeCore};
use datafusion::physical_plan::Partitioning;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::placeholder_row::PlaceholderRowExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use datafusion_distributed::SessionStateBuilderExt;

use super::workers::Workers;
use crate::rewrite::boundary::ReleaseExec;
use crate::rewrite::dp_release::DpReleaseExec;
use crate::rewrite::drain::replace;

/// A physical plan carried through the crate's logical-plan entry point.
#[derive(Clone)]
pub struct Carrier {
    plan: Arc<dyn ExecutionPlan>,
    schema: DFSchemaRef,
}

impl Carrier {
    fn wrap(plan: Arc<dyn ExecutionPlan>) -> Result<LogicalPlan> {
        let schema = Arc::new(DFSchema::try_from(plan.schema().as_ref().clone())?);
        Ok(LogicalPlan::Extension(Extension {
            node: Arc::new(Self { plan, schema }),
        }))
    }
}

impl fmt::Debug for Carrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Carrier({})", self.plan.name())
    }
}

impl PartialEq for Carrier {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.plan, &other.plan)
    }
}

impl Eq for Carrier {}

impl Hash for Carrier {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.plan) as *const () as usize).hash(state);
    }
}

impl PartialOrd for Carrier {
    fn partial_cmp(&self, _other: &Self) -> Option<std::cmp::Ordering> {
        None
    }
}

impl UserDefinedLogicalNodeCore for Carrier {
    fn name(&self) -> &str {
        "AirlockCarrier"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        vec![]
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "AirlockCarrier")
    }

    fn with_exprs_and_inputs(&self, _exprs: Vec<Expr>, _inputs: Vec<LogicalPlan>) -> Result<Self> {
        Ok(self.clone())
    }
}

/// Returns the physical plan a [`Carrier`] holds.
#[derive(Debug)]
struct CarrierPlanner;

#[async_trait]
impl QueryPlanner for CarrierPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        _session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match logical_plan {
            LogicalPlan::Extension(e) => match e.node.as_any().downcast_ref::<Carrier>() {
                Some(c) => Ok(Arc::clone(&c.plan)),
                None => Err(DataFusionError::Internal("not a carried plan".into())),
            },
            _ => Err(DataFusionError::Internal("not a carried plan".into())),
        }
    }
}

/// Places the parts of a physical plan that may run on workers.
pub struct Distributor {
    planner: Arc<dyn QueryPlanner + Send + Sync>,
    workers: Arc<Workers>,
}

impl fmt::Debug for Distributor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Distributor")
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl Distributor {
    pub fn new(workers: Arc<Workers>) -> Self {
        let mut builder = SessionStateBuilder::new();
        *builder.query_planner() = Some(Arc::new(CarrierPlanner));
        let state = builder.with_distributed_planner().build();
        Self {
            planner: Arc::clone(state.query_planner()),
            workers,
        }
    }

    pub fn workers(&self) -> &Arc<Workers> {
        &self.workers
    }

    /// `plan` with every part that may run on workers handed to them. With no live
    /// worker, the plan runs here, as on a single machine.
    pub async fn place(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if self.workers.live().is_empty() {
            tracing::warn!("no cluster worker is alive: the query runs on this front end");
            return Ok(plan);
        }
        let placed = self.place_node(plan, session).await?;
        verify_placement(&placed)?;
        tracing::debug!(
            plan = %datafusion_distributed::display_plan_ascii(placed.as_ref(), false),
            "placed a plan on the cluster"
        );
        Ok(placed)
    }

    fn place_node<'a>(
        &'a self,
        plan: Arc<dyn ExecutionPlan>,
        session: &'a dyn Session,
    ) -> futures::future::BoxFuture<'a, Result<Arc<dyn ExecutionPlan>>> {
        Box::pin(async move {
            if is_release(&plan) {
                let mut children = Vec::new();
                for child in plan.children() {
                    children.push(self.below_release(Arc::clone(child), session).await?);
                }
                return replace(plan, children);
            }
            if shippable(&plan) {
                let partitioning = plan.output_partitioning().clone();
                let shipped = self
                    .planner
                    .create_physical_plan(&Carrier::wrap(plan)?, session)
                    .await?;
                // A distributed input has one partition. A parent that relied on a hash
                // partitioning (a partitioned join: both sides split alike) gets it back.
                return match partitioning {
                    Partitioning::Hash(..)
                        if shipped.output_partitioning().partition_count()
                            != partitioning.partition_count() =>
                    {
                        Ok(Arc::new(RepartitionExec::try_new(shipped, partitioning)?))
                    }
                    _ => Ok(shipped),
                };
            }
            if plan.children().is_empty() {
                return Ok(plan);
            }
            let mut children = Vec::new();
            for child in plan.children() {
                children.push(self.place_node(Arc::clone(child), session).await?);
            }
            replace(plan, children)
        })
    }

    /// A release's input: a hash repartition right below it stays here.
    async fn below_release(
        &self,
        child: Arc<dyn ExecutionPlan>,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if let Some(r) = child.downcast_ref::<RepartitionExec>() {
            let input = self.place_node(Arc::clone(r.input()), session).await?;
            return Ok(Arc::new(RepartitionExec::try_new(
                input,
                r.partitioning().clone(),
            )?));
        }
        self.place_node(child, session).await
    }
}

/// A node that must run in the front end's process.
fn is_release(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.downcast_ref::<ReleaseExec>().is_some() || plan.downcast_ref::<DpReleaseExec>().is_some()
}

/// Whether a whole subtree may run on workers (see the module's list).
pub fn shippable(plan: &Arc<dyn ExecutionPlan>) -> bool {
    fn walk(plan: &Arc<dyn ExecutionPlan>, scans: &mut usize, exchanges: &mut usize) -> bool {
        if is_release(plan) {
            return false;
        }
        let hash_exchange = plan
            .downcast_ref::<RepartitionExec>()
            .is_some_and(|r| matches!(r.partitioning(), Partitioning::Hash(..)));
        if hash_exchange || plan.downcast_ref::<AggregateExec>().is_some() {
            *exchanges += 1;
        }
        let children = plan.children();
        if children.is_empty() {
            if let Some(source) = plan.downcast_ref::<DataSourceExec>() {
                let data = source.data_source();
                if data.downcast_ref::<MemorySourceConfig>().is_some() {
                    return false;
                }
                if data.downcast_ref::<FileScanConfig>().is_some() {
                    *scans += 1;
                    return true;
                }
                return false;
            }
            return plan.downcast_ref::<EmptyExec>().is_some()
                || plan.downcast_ref::<PlaceholderRowExec>().is_some();
        }
        children.into_iter().all(|c| walk(c, scans, exchanges))
    }
    let (mut scans, mut exchanges) = (0, 0);
    walk(plan, &mut scans, &mut exchanges) && scans > 0 && exchanges > 0
}

/// Fails closed if any release node ended up where workers run it: inside what a
/// `DistributedExec` hands out.
pub fn verify_placement(plan: &Arc<dyn ExecutionPlan>) -> Result<()> {
    fn holds_release(plan: &Arc<dyn ExecutionPlan>) -> bool {
        is_release(plan) || plan.children().into_iter().any(holds_release)
    }
    if plan
        .downcast_ref::<datafusion_distributed::DistributedExec>()
        .is_some()
    {
        if plan.children().into_iter().any(holds_release) {
            return Err(DataFusionError::Internal(
                "a release boundary was placed on cluster workers; refused".into(),
            ));
        }
        return Ok(());
    }
    plan.children().into_iter().try_for_each(verify_placement)
}
