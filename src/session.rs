//! Principal → locked-down DataFusion [`SessionState`].
//!
//! Each principal gets a session whose catalog holds only the tables they hold some
//! action on (see `catalog`), built against one policy snapshot and rebuilt when the
//! policy or the catalog changes. The state has no table factories (no CREATE EXTERNAL
//! TABLE), no file formats for COPY, no URL tables, no function factory (no CREATE
//! FUNCTION) and only the built-in functions; table functions are limited to
//! `generate_series` and `range`, which read no files. Statement kinds are gated in
//! `query::parse`. Every query gets its own memory pool with the configured limit and no
//! spill directory, so a query over its memory fails cleanly instead of writing
//! protected data to disk. The privacy rewriter (`crate::rewrite`) is the session's
//! analyzer: no plan of this session runs without it.

use std::sync::Arc;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use datafusion::execution::SessionStateDefaults;
use datafusion::execution::TaskContext;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{GreedyMemoryPool, TrackConsumersPool};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::prelude::SessionConfig;

use crate::auth::Principal;
use crate::catalog::{CATALOG_NAME, Catalog};
use crate::cluster::Cluster;
use crate::config::Limits;
use crate::policy::{PolicySnapshot, PolicyStore};
use crate::rewrite::PolicyContext;
use crate::rewrite::protect::MaskSecret;

/// A principal's session: their catalog view and the policy it was built with.
#[derive(Debug)]
pub struct PrincipalSession {
    pub principal: Arc<Principal>,
    pub policy: Arc<PolicySnapshot>,
    /// The principal's rights on every protected table, as the rewriter applies them.
    pub privacy: Arc<PolicyContext>,
    pub state: SessionState,
    /// The same session for releasing owner-approved results (masks and row filters
    /// only, PRIVACY.md §4).
    pub approved_state: SessionState,
    /// The principal's rights as the approved session applies them.
    pub approved_privacy: Arc<PolicyContext>,
    catalog_generation: u64,
}

/// The catalog in force and its generation (bumped when tables are added).
#[derive(Debug)]
struct CatalogVersion {
    catalog: Arc<Catalog>,
    generation: u64,
}

/// Builds and caches one locked-down session per principal.
#[derive(Debug)]
pub struct Sessions {
    policy: Arc<PolicyStore>,
    catalog: ArcSwap<CatalogVersion>,
    limits: Limits,
    runtime: Arc<RuntimeEnv>,
    cache: DashMap<Arc<Principal>, Arc<PrincipalSession>>,
    slots: Arc<tokio::sync::Semaphore>,
    /// Workers for the stages below release boundaries, if this front end has any.
    cluster: Option<Arc<Cluster>>,
    /// The salt source of `hash` masks (the cluster's, when there is one).
    masks: MaskSecret,
}

/// The DataFusion configuration every session starts from.
pub fn base_config() -> SessionConfig {
    let mut config = SessionConfig::new()
        .with_default_catalog_and_schema(CATALOG_NAME, "public")
        .with_create_default_catalog_and_schema(false)
        .with_information_schema(true);
    let options = config.options_mut();
    // Many clients (the JDBC driver, older pyarrow) do not read Utf8View: plan with Utf8.
    options.sql_parser.map_string_types_to_utf8view = false;
    options.execution.parquet.schema_force_view_types = false;
    no_skipping(options);
    config
}

/// The work a query does may not depend on which rows it skips (docs/DESIGN.md,
/// "Readings of the contract"): no row group, page or bloom-filter pruning (the time of
/// `WHERE cost > x` would say whether some row group's largest cost exceeds x), and no
/// filters made at run time from the rows a join or an aggregate has seen.
pub fn no_skipping(options: &mut datafusion::config::ConfigOptions) {
    options.execution.parquet.pruning = false;
    options.execution.parquet.enable_page_index = false;
    options.execution.parquet.bloom_filter_on_read = false;
    options.optimizer.enable_dynamic_filter_pushdown = false;
    options.optimizer.enable_join_dynamic_filter_pushdown = false;
    options.optimizer.enable_aggregate_dynamic_filter_pushdown = false;
    options.optimizer.enable_topk_dynamic_filter_pushdown = false;
}

impl Sessions {
    pub fn new(
        policy: Arc<PolicyStore>,
        catalog: Arc<Catalog>,
        limits: Limits,
        cluster: Option<Arc<Cluster>>,
    ) -> datafusion::error::Result<Self> {
        // No cached file listings: uploads add files to tables while the server runs.
        let caches = datafusion::execution::cache::cache_manager::CacheManagerConfig::default()
            .with_list_files_cache_limit(0);
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(caches)
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()?;
        Ok(Self {
            policy,
            catalog: ArcSwap::from_pointee(CatalogVersion {
                catalog,
                generation: 0,
            }),
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_queries)),
            limits,
            runtime,
            cache: DashMap::new(),
            masks: cluster
                .as_ref()
                .map(|c| c.mask_secret())
                .unwrap_or_default(),
            cluster,
        })
    }

    /// A bare state for reading dataset schemas at start-up (no catalog, no user).
    pub fn bootstrap_state() -> SessionState {
        SessionStateBuilder::new()
            .with_config(base_config())
            .build()
    }

    pub fn policy(&self) -> &Arc<PolicyStore> {
        &self.policy
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.catalog.load().catalog)
    }

    /// Replaces the catalog with `change` applied to the one in force (an upload, a hot
    /// dataset reloaded); concurrent changes are each applied once, none lost. Every
    /// session is rebuilt lazily.
    pub fn update_catalog(&self, change: impl Fn(&Catalog) -> Catalog) {
        self.catalog.rcu(|current| CatalogVersion {
            catalog: Arc::new(change(&current.catalog)),
            generation: current.generation + 1,
        });
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Execution slots: one per query allowed to run at once.
    pub fn slots(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.slots
    }

    /// The principal's session for the policy in force now.
    pub fn session_for(&self, principal: &Arc<Principal>) -> Arc<PrincipalSession> {
        let policy = self.policy.current();
        let catalog = self.catalog.load_full();
        if let Some(s) = self.cache.get(principal)
            && s.policy.version == policy.version
            && s.catalog_generation == catalog.generation
        {
            return Arc::clone(&s);
        }
        let session = Arc::new(self.build(principal, policy, &catalog));
        self.cache
            .insert(Arc::clone(principal), Arc::clone(&session));
        session
    }

    fn build(
        &self,
        principal: &Arc<Principal>,
        policy: Arc<PolicySnapshot>,
        catalog: &CatalogVersion,
    ) -> PrincipalSession {
        let view = catalog.catalog.view(|t| policy.can_see(principal, t));
        let privacy = Arc::new(PolicyContext::new(
            Arc::clone(principal),
            Arc::clone(&policy),
            &catalog.catalog,
        ));
        let approved = Arc::new(privacy.approved());
        let digest = &policy.digest;
        let state = self.state(
            Arc::clone(&view),
            privacy.analyzer_rules(&self.masks),
            digest,
        );
        let approved_state = self.state(view, approved.analyzer_rules(&self.masks), digest);
        PrincipalSession {
            principal: Arc::clone(principal),
            policy,
            privacy,
            state,
            approved_state,
            approved_privacy: approved,
            catalog_generation: catalog.generation,
        }
    }

    /// A locked-down state over `view` with the given analyzer.
    fn state(
        &self,
        view: Arc<dyn datafusion::catalog::CatalogProviderList>,
        analyzer_rules: Vec<Arc<dyn datafusion::optimizer::AnalyzerRule + Send + Sync>>,
        policy_digest: &str,
    ) -> SessionState {
        let mut builder = SessionStateBuilder::new()
            .with_analyzer_rules(analyzer_rules)
            .with_config(base_config())
            .with_runtime_env(Arc::clone(&self.runtime))
            .with_catalog_list(view)
            .with_expr_planners(SessionStateDefaults::default_expr_planners())
            .with_scalar_functions(SessionStateDefaults::default_scalar_functions())
            .with_aggregate_functions(SessionStateDefaults::default_aggregate_functions())
            .with_window_functions(SessionStateDefaults::default_window_functions())
            .with_table_function_list(
                SessionStateDefaults::default_table_functions()
                    .into_iter()
                    .filter(|f| matches!(f.name(), "generate_series" | "range"))
                    .collect(),
            );
        let mut distributor = None;
        if let Some(cluster) = &self.cluster {
            // The configuration is set above: the crate adds its own to it.
            builder = cluster.configure(builder, policy_digest);
            distributor = Some(Arc::clone(cluster.distributor()));
        }
        builder
            .with_query_planner(Arc::new(
                crate::rewrite::boundary::AirlockQueryPlanner::new(distributor),
            ))
            .build()
    }

    /// A task context for one query: the session's state with a fresh memory pool of the
    /// configured size.
    pub fn task_context(&self, session: &PrincipalSession) -> Arc<TaskContext> {
        let pool = TrackConsumersPool::new(
            GreedyMemoryPool::new(self.limits.memory_per_query),
            std::num::NonZeroUsize::new(3).expect("non-zero"),
        );
        let runtime = RuntimeEnv {
            memory_pool: Arc::new(pool),
            disk_manager: Arc::clone(&self.runtime.disk_manager),
            cache_manager: Arc::clone(&self.runtime.cache_manager),
            object_store_registry: Arc::clone(&self.runtime.object_store_registry),
        };
        Arc::new(TaskContext::from(&session.state).with_runtime(Arc::new(runtime)))
    }
}
