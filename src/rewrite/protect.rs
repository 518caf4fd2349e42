//! Masks, row filters and the hidden entity column at each protected scan (§3.1, §3.8).
//!
//! A scan of a protected table becomes `Protect ← TableScan`: one plan node of its own
//! that applies the row filters of the principal's roles to the real values, then
//! replaces each wiped column by its mask (same name, same Arrow type) and, where the k
//! rule applies, adds the hidden column `__airlock_entity#<n>#<k>#<d|r>#<table>` (the
//! entity key, or the whole row for a table without one). Being its own node, the
//! optimizer cannot merge an analyst's projection into the masks or push an analyst's
//! predicate below the row filter; the verifier finds it above every protected scan.
//!
//! Masks are a function ([`Mask`]) whose secret (the `hash` salt) lives in the function,
//! never in the plan: no plan display, explanation or error can show it. The salt comes
//! from a [`MaskSecret`]: random per process on one machine; in a cluster, derived from
//! the cluster secret, so that a worker (which finds functions by name, and is told only
//! the policy's digest) hashes as the front end would.

use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::array::{Array, ArrayRef, StringArray, new_null_array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema, DFSchemaRef, TableReference};
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ExprSchemable, Extension, LogicalPlan, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, TableScan, UserDefinedLogicalNodeCore, Volatility,
};

use super::{HIDDEN_PREFIX, PolicyContext, TableRules};
use crate::policy::tables::{MaskKind, SmallGroups};

/// What a hidden entity column's name says: which scan (or union slot) it comes from,
/// the k to reach, and the table whose entities it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityColumn {
    pub id: String,
    pub k: u64,
    /// `small_groups = "remainder"` (§3.4) rather than drop.
    pub remainder: bool,
    pub table: String,
}

impl EntityColumn {
    pub fn name(&self) -> String {
        let mode = if self.remainder { "r" } else { "d" };
        format!(
            "{HIDDEN_PREFIX}entity#{}#{}#{mode}#{}",
            self.id, self.k, self.table
        )
    }

    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(HIDDEN_PREFIX)?.strip_prefix("entity#")?;
        let mut parts = rest.splitn(4, '#');
        let id = parts.next()?.to_string();
        let k = parts.next()?.parse().ok()?;
        let remainder = match parts.next()? {
            "r" => true,
            "d" => false,
            _ => return None,
        };
        let table = parts.next()?.to_string();
        Some(Self {
            id,
            k,
            remainder,
            table,
        })
    }
}

/// The plan node over one protected scan.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Protect {
    pub input: LogicalPlan,
    /// The protected table, as `schema.table`.
    pub table: String,
    /// The row filters of the principal's roles, AND-ed, over the scan's own columns.
    pub row_filter: Option<Expr>,
    /// One per output column: the column, its mask, or the entity key.
    pub exprs: Vec<Expr>,
    pub schema: DFSchemaRef,
}

impl Protect {
    fn try_new(
        input: LogicalPlan,
        table: String,
        row_filter: Option<Expr>,
        exprs: Vec<Expr>,
    ) -> Result<Self> {
        let fields = exprs
            .iter()
            .map(|e| e.to_field(input.schema()))
            .collect::<Result<Vec<_>>>()?;
        let schema = Arc::new(DFSchema::new_with_metadata(fields, Default::default())?);
        Ok(Self {
            input,
            table,
            row_filter,
            exprs,
            schema,
        })
    }
}

impl Protect {
    /// The same node without the outputs at `drop` (indexes into `exprs`).
    pub(super) fn without(&self, drop: &[usize]) -> Result<Self> {
        let exprs = self
            .exprs
            .iter()
            .enumerate()
            .filter(|(i, _)| !drop.contains(i))
            .map(|(_, e)| e.clone())
            .collect();
        Self::try_new(
            self.input.clone(),
            self.table.clone(),
            self.row_filter.clone(),
            exprs,
        )
    }
}

impl PartialOrd for Protect {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.table.partial_cmp(&other.table)
    }
}

impl UserDefinedLogicalNodeCore for Protect {
    fn name(&self) -> &str {
        "AirlockProtect"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        let mut e = self.exprs.clone();
        if let Some(f) = &self.row_filter {
            e.push(f.clone());
        }
        e
    }

    fn prevent_predicate_push_down_columns(&self) -> HashSet<String> {
        self.schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "AirlockProtect: {}", self.table)?;
        if self.row_filter.is_some() {
            // The predicate is the owner's policy: shown in the policy view, not in plans.
            write!(f, ", row filter")?;
        }
        let exprs: Vec<String> = self.exprs.iter().map(|e| e.to_string()).collect();
        write!(f, ", [{}]", exprs.join(", "))
    }

    fn with_exprs_and_inputs(
        &self,
        mut exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        let input = inputs.remove(0);
        let row_filter = self.row_filter.as_ref().and_then(|_| exprs.pop());
        // Projection push-down may have narrowed the scan: keep the outputs it can still
        // compute (the parent asked only for those).
        let available = input.schema();
        exprs.retain(|e| e.column_refs().iter().all(|c| available.has_column(c)));
        Self::try_new(input, self.table.clone(), row_filter, exprs)
    }

    fn necessary_children_exprs(&self, output_columns: &[usize]) -> Option<Vec<Vec<usize>>> {
        let input = self.input.schema();
        let mut needed: Vec<usize> = Vec::new();
        for i in output_columns {
            for c in self.exprs.get(*i)?.column_refs() {
                needed.push(input.index_of_column(c).ok()?);
            }
        }
        needed.sort_unstable();
        needed.dedup();
        Some(vec![needed])
    }

    fn supports_limit_pushdown(&self) -> bool {
        false
    }
}

/// Puts a [`Protect`] node over every protected scan of the plan (subqueries included).
pub fn apply(plan: LogicalPlan, ctx: &PolicyContext, salt: &Arc<str>) -> Result<LogicalPlan> {
    let counter = AtomicUsize::new(0);
    plan.transform_up_with_subqueries(|node| match node {
        LogicalPlan::TableScan(scan) => match ctx.rules(&scan.table_name) {
            Some((table, rules)) => {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                protect(scan, table, rules, n, salt).map(Transformed::yes)
            }
            None => Ok(Transformed::no(LogicalPlan::TableScan(scan))),
        },
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

fn protect(
    scan: TableScan,
    table: &crate::config::TableName,
    rules: &TableRules,
    n: usize,
    salt: &Arc<str>,
) -> Result<LogicalPlan> {
    let qualifier = scan.table_name.clone();
    let wanted: Vec<_> = scan.projected_schema.fields().iter().cloned().collect();
    // Scan every column: the entity key and the row filter's columns must be there;
    // projection push-down narrows the scan again after the rewrite.
    let full = LogicalPlan::TableScan(
        datafusion::logical_expr::TableScanBuilder::new(
            scan.table_name.clone(),
            Arc::clone(&scan.source),
        )
        .with_filters(scan.filters.clone())
        .with_fetch(scan.fetch)
        .build()?,
    );
    let row_filter = rules
        .row_filter
        .clone()
        .map(|p| coerced(requalify(p, &qualifier)?, &full))
        .transpose()?;
    let mut exprs: Vec<Expr> = wanted
        .iter()
        .map(|f| {
            let column = Expr::Column(Column::new(Some(qualifier.clone()), f.name()));
            match (!rules.unmasked)
                .then(|| rules.policy.mask_for(f.name(), f.data_type()))
                .flatten()
            {
                Some(kind) => Mask::call(column, kind, f.data_type().clone(), salt)
                    .alias_qualified(Some(qualifier.clone()), f.name()),
                None => column,
            }
        })
        .collect();
    if rules.automatic() {
        let entity = match &rules.policy.privacy_unit {
            Some(unit) => Expr::Column(Column::new(Some(qualifier.clone()), unit)),
            None => datafusion::functions::core::r#struct().call(
                full.schema()
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .collect(),
            ),
        };
        let name = EntityColumn {
            id: n.to_string(),
            k: rules.policy.min_group_size,
            remainder: rules.policy.small_groups == SmallGroups::Remainder,
            table: table.to_string(),
        }
        .name();
        exprs.push(entity.alias_qualified(Some(qualifier.clone()), name));
    }
    Ok(LogicalPlan::Extension(Extension {
        node: Arc::new(Protect::try_new(
            full,
            table.to_string(),
            row_filter,
            exprs,
        )?),
    }))
}

/// The row filter typed against the scan (the analyst's plan was coerced before this
/// rule ran; the filter must be too: `zip = '10001'` over a numeric zip).
fn coerced(predicate: Expr, scan: &LogicalPlan) -> Result<Expr> {
    use datafusion::optimizer::AnalyzerRule;
    use datafusion::optimizer::analyzer::type_coercion::TypeCoercion;
    let filter = LogicalPlan::Filter(datafusion::logical_expr::Filter::try_new(
        predicate,
        Arc::new(scan.clone()),
    )?);
    match TypeCoercion::new().analyze(filter, &Default::default())? {
        LogicalPlan::Filter(f) => Ok(f.predicate),
        other => Err(datafusion::error::DataFusionError::Internal(format!(
            "row filter coercion returned {}",
            other.display()
        ))),
    }
}

/// Points a row filter's columns at the scan's qualifier as written in the query.
fn requalify(e: Expr, qualifier: &TableReference) -> Result<Expr> {
    e.transform(|e| match e {
        Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::new(
            Some(qualifier.clone()),
            c.name,
        )))),
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

/// Where the salt of `hash` masks comes from.
#[derive(Clone, Default)]
pub enum MaskSecret {
    /// Random for the life of the process: a single front end.
    #[default]
    Process,
    /// Derived from the cluster secret: every front end and worker of one cluster hashes
    /// alike (`crate::cluster`).
    Cluster(Arc<ring::hmac::Key>),
}

impl fmt::Debug for MaskSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.write_str(match self {
            Self::Process => "MaskSecret::Process",
            Self::Cluster(_) => "MaskSecret::Cluster",
        })
    }
}

impl MaskSecret {
    /// The salt of `hash` masks under the policy with this digest: a new policy hashes
    /// anew.
    pub fn salt(&self, policy_digest: &str) -> Arc<str> {
        static PROCESS_SALT: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| uuid::Uuid::new_v4().simple().to_string());
        match self {
            Self::Process => Arc::from(format!("{}{policy_digest}", *PROCESS_SALT)),
            Self::Cluster(key) => {
                let tag = ring::hmac::sign(key, policy_digest.as_bytes());
                Arc::from(
                    tag.as_ref()
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>(),
                )
            }
        }
    }
}

/// Every mask, under the policy with this digest, for a worker's function registry: a
/// worker finds a plan's functions by name, and a mask takes its type from the plan.
pub fn worker_masks(secret: &MaskSecret, policy_digest: &str) -> Vec<Arc<ScalarUDF>> {
    let salt = secret.salt(policy_digest);
    [
        MaskKind::Star,
        MaskKind::Null,
        MaskKind::Hash,
        MaskKind::Last4,
    ]
    .into_iter()
    .map(|kind| {
        Arc::new(ScalarUDF::new_from_impl(Mask {
            kind,
            data_type: DataType::Utf8,
            salt: Arc::clone(&salt),
            signature: Signature::any(1, Volatility::Immutable),
        }))
    })
    .collect()
}

/// The mask of a wiped column, of the column's own type. The salt of `hash` masks is
/// part of the function, not of its arguments: it never appears in a plan.
pub struct Mask {
    kind: MaskKind,
    data_type: DataType,
    salt: Arc<str>,
    signature: Signature,
}

impl Mask {
    pub fn call(column: Expr, kind: MaskKind, data_type: DataType, salt: &Arc<str>) -> Expr {
        ScalarUDF::new_from_impl(Self {
            kind,
            data_type,
            salt: Arc::clone(salt),
            signature: Signature::any(1, Volatility::Immutable),
        })
        .call(vec![column])
    }

    pub fn kind(&self) -> MaskKind {
        self.kind
    }
}

impl fmt::Debug for Mask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the salt.
        f.debug_struct("Mask")
            .field("kind", &self.kind)
            .field("data_type", &self.data_type)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Mask {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.data_type == other.data_type && self.salt == other.salt
    }
}

impl Eq for Mask {}

impl Hash for Mask {
    fn hash<H: Hasher>(&self, state: &mut H) {
        format!("{:?}", self.kind).hash(state);
        self.data_type.hash(state);
    }
}

impl ScalarUDFImpl for Mask {
    fn name(&self) -> &str {
        match self.kind {
            MaskKind::Star => "airlock_mask_star",
            MaskKind::Null => "airlock_mask_null",
            MaskKind::Hash => "airlock_mask_hash",
            MaskKind::Last4 => "airlock_mask_last4",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(self.data_type.clone())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        // The type the plan says (on a worker, the plan is all there is to say it).
        let data_type = args.return_field.data_type();
        let input = args.args[0].clone().into_array(n)?;
        let masked = mask_array(&input, self.kind, &self.salt)?;
        Ok(ColumnarValue::Array(match masked {
            Some(strings) if data_type != &DataType::Utf8 => {
                // Back to the column's own type; a type that has no such text is NULL.
                cast(&strings, data_type).unwrap_or_else(|_| new_null_array(data_type, n))
            }
            Some(strings) => strings,
            None => new_null_array(data_type, n),
        }))
    }
}

/// The masked strings of `input` (NULL stays NULL), or None for the `null` mask.
fn mask_array(input: &ArrayRef, kind: MaskKind, salt: &str) -> Result<Option<ArrayRef>> {
    use sha2::{Digest, Sha256};
    if kind == MaskKind::Null {
        return Ok(None);
    }
    let text = cast(input, &DataType::Utf8)?;
    let text = text
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| datafusion::error::DataFusionError::Internal("mask input".into()))?;
    let out: StringArray = text
        .iter()
        .map(|v| {
            v.map(|v| match kind {
                MaskKind::Star => "*".to_string(),
                MaskKind::Hash => Sha256::digest(format!("{salt}{v}").as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
                MaskKind::Last4 => {
                    let chars: Vec<char> = v.chars().collect();
                    let keep = chars.len().saturating_sub(4);
                    "*".repeat(keep) + chars[keep..].iter().collect::<String>().as_str()
                }
                MaskKind::Null => String::new(),
            })
        })
        .collect();
    Ok(Some(Arc::new(out) as ArrayRef))
}

/// The [`Mask`] of a mask call, if `e` is one.
pub fn as_mask(e: &Expr) -> Option<&Mask> {
    match e {
        Expr::Alias(a) => as_mask(&a.expr),
        Expr::ScalarFunction(f) => f.func.inner().as_ref().downcast_ref::<Mask>(),
        _ => None,
    }
}

/// Whether a plan node is a [`Protect`] node.
pub fn as_protect(plan: &LogicalPlan) -> Option<&Protect> {
    match plan {
        LogicalPlan::Extension(e) => e.node.as_any().downcast_ref::<Protect>(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::StringArray;

    use super::*;

    #[test]
    fn masks_keep_nulls_and_hide_values() {
        let input: ArrayRef = Arc::new(StringArray::from(vec![Some("123-45-6789"), None]));
        let star = mask_array(&input, MaskKind::Star, "s").unwrap().unwrap();
        let star = star.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(star.value(0), "*");
        assert!(star.is_null(1));
        let last4 = mask_array(&input, MaskKind::Last4, "s").unwrap().unwrap();
        assert_eq!(
            last4
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .value(0),
            "*******6789"
        );
        let a = mask_array(&input, MaskKind::Hash, "salt-a")
            .unwrap()
            .unwrap();
        let b = mask_array(&input, MaskKind::Hash, "salt-b")
            .unwrap()
            .unwrap();
        assert_ne!(
            a.as_any().downcast_ref::<StringArray>().unwrap().value(0),
            b.as_any().downcast_ref::<StringArray>().unwrap().value(0)
        );
    }

    #[test]
    fn cluster_salts_agree_between_processes_and_change_with_the_policy() {
        let secret = |s: &str| {
            crate::cluster::auth::ClusterSecret::from_bytes(s.as_bytes())
                .unwrap()
                .mask_key()
        };
        let a = MaskSecret::Cluster(secret("cluster-secret-0123456789abcdef0123"));
        // Another process (a worker, another front end) with the same file.
        let b = MaskSecret::Cluster(secret("cluster-secret-0123456789abcdef0123"));
        let other = MaskSecret::Cluster(secret("another-secret-0123456789abcdef0123"));
        assert_eq!(a.salt("digest-1"), b.salt("digest-1"));
        assert_ne!(a.salt("digest-1"), a.salt("digest-2"));
        assert_ne!(a.salt("digest-1"), other.salt("digest-1"));
        assert_ne!(a.salt("digest-1"), MaskSecret::Process.salt("digest-1"));
        assert!(!format!("{a:?}").contains(&*a.salt("digest-1")));
    }

    #[test]
    fn the_salt_is_not_in_the_debug_form() {
        let salt: Arc<str> = Arc::from("very-secret-salt");
        let e = Mask::call(
            Expr::Column(Column::from_name("ssn")),
            MaskKind::Hash,
            DataType::Utf8,
            &salt,
        );
        assert!(!format!("{e:?}").contains("very-secret-salt"));
        assert!(!format!("{e}").contains("very-secret-salt"));
    }
}
