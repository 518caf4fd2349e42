//! Differential-privacy settings (PRIVACY.md §5b): a table's `release = "dp"` section
//! and the analysts' budgets, both from `policies/tables.toml`.
//!
//! Real numbers (ε, δ, bounds) are kept as [`Real`], a float compared by its bits, so
//! that a policy stays `Eq` and hashes into the policy version exactly. Bounds are
//! converted to fixed point ([`FIXED_SCALE`]) where sums are computed; the policy keeps
//! what the owner wrote.

use std::collections::BTreeMap;

use crate::config::TableName;

/// Sums of bounded columns are computed in units of 1/FIXED_SCALE (checked `i128`).
pub const FIXED_SCALE: i64 = 1_000;

/// The largest ε a single query may spend when the owner does not say (`max_epsilon`).
pub const DEFAULT_MAX_EPSILON: f64 = 1.0;

/// The default δ of a DP table (`delta`).
pub const DEFAULT_DELTA: f64 = 1e-6;

/// A float compared and hashed by its bits (policy values are finite, never NaN).
#[derive(Debug, Clone, Copy)]
pub struct Real(pub f64);

impl PartialEq for Real {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Real {}

/// How a protected table's aggregates are released.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReleaseMode {
    /// k-thresholds (§3.3), the default.
    #[default]
    Threshold,
    /// Differential privacy (§5b).
    Dp(DpPolicy),
}

/// The DP settings of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpPolicy {
    /// L0: the most groups one unit may contribute to in one query.
    pub max_groups_per_unit: u64,
    /// C: the most rows one unit may contribute to one group.
    pub max_rows_per_group_per_unit: u64,
    /// Clamp range per summable column; a column not listed cannot be summed.
    pub bounds: BTreeMap<String, (Real, Real)>,
    /// The most ε one query may spend (also the default when the query does not say).
    pub max_epsilon: Real,
    /// δ of one query (the probability that a one-unit group is released is ≤ δ).
    pub delta: Real,
    /// The one file holding the table's rows, if they are stored in the order of its
    /// unit: read from the data when the policy loads (`super::sorted`), never from
    /// `tables.toml`.
    pub stored_in_unit_order: Option<StoredFile>,
}

/// One file as it was when its order was read: a query uses the order only while the
/// file it scans is still this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFile {
    pub location: String,
    pub size: u64,
    /// Last modified, in microseconds since the epoch.
    pub modified: i64,
    /// The store's tag (for local files: inode, time and size, so a file renamed over
    /// it with the same size and time is another file).
    pub e_tag: Option<String>,
}

impl DpPolicy {
    /// The clamp range of a column in fixed point, if it may be summed.
    pub fn fixed_bounds(&self, column: &str) -> Option<(i64, i64)> {
        self.bounds
            .get(column)
            .map(|(lo, hi)| (to_fixed(lo.0), to_fixed(hi.0)))
    }
}

/// A value in fixed point, rounded to the nearest unit and saturated at the i64 range.
pub fn to_fixed(v: f64) -> i64 {
    let scaled = (v * FIXED_SCALE as f64).round();
    if scaled >= i64::MAX as f64 {
        i64::MAX
    } else if scaled <= i64::MIN as f64 {
        i64::MIN
    } else {
        scaled as i64
    }
}

/// Who a budget belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Holder {
    Principal(String),
    Role(String),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Principal(p) => write!(f, "principal {p}"),
            Self::Role(r) => write!(f, "role {r}"),
        }
    }
}

/// A privacy budget of one principal (or every principal of a role, each on its own)
/// on one dataset (a schema: every DP table in it draws on the same budget).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub holder: Holder,
    pub dataset: String,
    pub epsilon: Real,
    pub delta: Real,
    /// The budget starts afresh every period (seconds), if set.
    pub renew_secs: Option<u64>,
}

/// Every configured budget.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Budgets {
    pub budgets: Vec<Budget>,
}

impl Budgets {
    /// The budget that applies to a principal on a dataset: their own entry first, else
    /// the smallest (in ε) of their roles' entries (the most careful reading). None: the
    /// principal has no DP budget there and every DP query is refused.
    pub fn for_principal(&self, name: &str, roles: &[String], dataset: &str) -> Option<&Budget> {
        let on = |b: &&Budget| b.dataset == dataset;
        self.budgets
            .iter()
            .filter(on)
            .find(|b| b.holder == Holder::Principal(name.to_string()))
            .or_else(|| {
                self.budgets
                    .iter()
                    .filter(on)
                    .filter(|b| matches!(&b.holder, Holder::Role(r) if roles.contains(r)))
                    .min_by(|a, b| a.epsilon.0.total_cmp(&b.epsilon.0))
            })
    }

    /// The dataset of a table.
    pub fn dataset_of(table: &TableName) -> String {
        table.schema.to_string()
    }
}
