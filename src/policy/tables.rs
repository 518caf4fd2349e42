//! `policies/tables.toml`: the privacy settings of each protected table (PRIVACY.md §2).
//!
//! Parsing rejects unknown keys; validation against the catalog rejects unknown tables
//! and columns. Each error names the file and line. Defaults are the contract's: every
//! row its own entity, k = 10, the default aggregate allow-list, every column filterable
//! but the entity key and wiped ones, small groups dropped, no conditional aggregates.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use datafusion::arrow::datatypes::{DataType, Schema};
use serde::Deserialize;
use toml::Spanned;

use super::dp::{
    Budget, Budgets, DEFAULT_DELTA, DEFAULT_MAX_EPSILON, DpPolicy, Holder, Real, ReleaseMode,
};
use crate::config::{Collector, Diagnostic, Diagnostics, TableName};

/// The default `min_group_size` (k).
pub const DEFAULT_MIN_GROUP_SIZE: u64 = 10;

/// The default aggregate allow-list.
pub const DEFAULT_AGGREGATES: [&str; 5] = ["count", "sum", "avg", "stddev", "var"];

/// Aggregate names an owner may put on an allow-list. Functions that return one
/// person's value (min, max, median, ...) may be listed, at the owner's own risk.
pub const KNOWN_AGGREGATES: [&str; 16] = [
    "count",
    "sum",
    "avg",
    "stddev",
    "stddev_pop",
    "var",
    "var_pop",
    "min",
    "max",
    "median",
    "approx_distinct",
    "approx_median",
    "approx_percentile_cont",
    "corr",
    "covar_samp",
    "covar_pop",
];

/// How a wiped column is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskKind {
    /// `'*'` (strings only; the default for strings).
    Star,
    /// NULL of the column's type (the default for everything else).
    Null,
    /// A keyed hash of the value, stable within one policy version.
    Hash,
    /// Everything but the last four characters replaced with `*` (strings only).
    Last4,
}

/// What happens to groups below k.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmallGroups {
    #[default]
    Drop,
    Remainder,
}

/// A row-level filter applied at the scan for principals holding `role`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFilter {
    pub role: String,
    pub predicate: String,
}

/// The validated settings of one protected table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePolicy {
    pub privacy_unit: Option<String>,
    pub min_group_size: u64,
    pub wipe: BTreeSet<String>,
    pub masks: BTreeMap<String, MaskKind>,
    pub aggregates: BTreeSet<String>,
    pub filterable: BTreeSet<String>,
    pub small_groups: SmallGroups,
    /// Owner opt-in (§3.2): sums, differences and products of distinct numeric
    /// filterable columns and literals inside aggregates. Weakens the guarantee.
    pub arithmetic_aggregates: bool,
    /// Owner opt-in (§3.2): CASE and FILTER (WHERE ...) inside aggregates, conditions on
    /// filterable columns only. Weakens the guarantee.
    pub conditional_aggregates: bool,
    pub row_filters: Vec<RowFilter>,
    /// `release = "threshold"` (the default) or `"dp"` with its settings (§5b).
    pub release: ReleaseMode,
}

impl TablePolicy {
    /// The product's default for a table without a section (uploads): every row its own
    /// entity, k = 10, the default allow-list, every column filterable, small groups
    /// dropped, no conditional aggregates, no masks.
    pub fn defaults(schema: &Schema) -> Self {
        Self {
            privacy_unit: None,
            min_group_size: DEFAULT_MIN_GROUP_SIZE,
            wipe: BTreeSet::new(),
            masks: BTreeMap::new(),
            aggregates: DEFAULT_AGGREGATES.iter().map(|s| s.to_string()).collect(),
            filterable: schema.fields().iter().map(|f| f.name().clone()).collect(),
            small_groups: SmallGroups::Drop,
            arithmetic_aggregates: false,
            conditional_aggregates: false,
            row_filters: vec![],
            release: ReleaseMode::Threshold,
        }
    }

    /// The DP settings, if the table is released under differential privacy.
    pub fn dp(&self) -> Option<&DpPolicy> {
        match &self.release {
            ReleaseMode::Dp(d) => Some(d),
            ReleaseMode::Threshold => None,
        }
    }

    /// The mask of a wiped column: its configured kind or the type's default.
    pub fn mask_for(&self, column: &str, data_type: &DataType) -> Option<MaskKind> {
        if !self.wipe.contains(column) {
            return None;
        }
        Some(self.masks.get(column).copied().unwrap_or(match data_type {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => MaskKind::Star,
            _ => MaskKind::Null,
        }))
    }
}

/// Every protected table's settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TablesPolicy {
    pub tables: BTreeMap<TableName, TablePolicy>,
    /// Privacy budgets of analysts on datasets with DP tables (§5b).
    pub budgets: Budgets,
    /// Keys the owner declares unique, per table (`unique = [[...]]` in a table's
    /// section or in `[public."schema.table"]`); checked against the data when the policy
    /// loads. Protected rows may join a relation that is not protected only on one of
    /// these (or on keys unique by construction): duplicates would weight a person.
    pub unique: BTreeMap<TableName, Vec<UniqueKey>>,
}

/// One declared unique key: its columns, and where it stands in `tables.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueKey {
    pub columns: Vec<String>,
    pub span: std::ops::Range<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    tables: BTreeMap<String, Spanned<RawTable>>,
    #[serde(default)]
    budgets: Vec<Spanned<RawBudget>>,
    /// Tables that are not protected, for their unique keys.
    #[serde(default)]
    public: BTreeMap<String, Spanned<RawPublic>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPublic {
    #[serde(default)]
    unique: Vec<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    principal: Option<String>,
    role: Option<String>,
    dataset: Spanned<String>,
    epsilon: Spanned<f64>,
    delta: Spanned<f64>,
    renew: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawRelease {
    #[default]
    Threshold,
    Dp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    privacy_unit: Option<Spanned<String>>,
    min_group_size: Option<Spanned<i64>>,
    #[serde(default)]
    wipe: Vec<Spanned<String>>,
    #[serde(default)]
    masks: BTreeMap<String, Spanned<MaskKind>>,
    aggregates: Option<Vec<Spanned<String>>>,
    filterable: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    small_groups: SmallGroups,
    #[serde(default)]
    arithmetic_aggregates: bool,
    #[serde(default)]
    conditional_aggregates: bool,
    #[serde(default)]
    row_filters: Vec<Spanned<RawRowFilter>>,
    release: Option<Spanned<RawRelease>>,
    max_groups_per_unit: Option<Spanned<i64>>,
    max_rows_per_group_per_unit: Option<Spanned<i64>>,
    #[serde(default)]
    bounds: BTreeMap<String, Spanned<Vec<f64>>>,
    max_epsilon: Option<Spanned<f64>>,
    delta: Option<Spanned<f64>>,
    #[serde(default)]
    unique: Vec<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRowFilter {
    role: String,
    #[serde(rename = "where")]
    predicate: String,
}

impl TablesPolicy {
    /// Parses `tables.toml` and validates it against the catalog's table schemas.
    pub fn parse(
        path: &Path,
        text: &str,
        schema_of: &dyn Fn(&TableName) -> Option<Schema>,
    ) -> Result<Self, Diagnostics> {
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| Diagnostics::one(Diagnostic::from_toml(path, text, &e)))?;
        let mut out = Collector::default();
        let mut tables = BTreeMap::new();
        let mut unique = BTreeMap::new();
        for (name, entry) in raw.tables {
            let table_span = entry.span();
            let err = |span: std::ops::Range<usize>, msg: String| {
                Diagnostic::at_span(path, text, Some(span), msg)
            };
            let Some((table, schema)) =
                catalog_table(path, text, &name, table_span.clone(), schema_of, &mut out)
            else {
                continue;
            };
            let raw = entry.into_inner();
            let raw_dp = RawDp {
                release: raw.release.clone(),
                max_groups_per_unit: raw.max_groups_per_unit.clone(),
                max_rows_per_group_per_unit: raw.max_rows_per_group_per_unit.clone(),
                bounds: raw.bounds.clone(),
                max_epsilon: raw.max_epsilon.clone(),
                delta: raw.delta.clone(),
                table_span: table_span.clone(),
            };
            let mut column = |c: &Spanned<String>, what: &str| -> Option<String> {
                if schema.field_with_name(c.get_ref()).is_ok() {
                    Some(c.get_ref().clone())
                } else {
                    out.push(err(
                        c.span(),
                        format!("{table}: {what} column {:?} does not exist", c.get_ref()),
                    ));
                    None
                }
            };
            let privacy_unit = raw
                .privacy_unit
                .as_ref()
                .and_then(|c| column(c, "privacy_unit"));
            let wipe: BTreeSet<String> =
                raw.wipe.iter().filter_map(|c| column(c, "wiped")).collect();
            let filterable_raw: Option<BTreeSet<String>> = raw.filterable.as_ref().map(|cols| {
                cols.iter()
                    .filter_map(|c| column(c, "filterable"))
                    .collect()
            });
            let min_group_size = match raw.min_group_size {
                None => DEFAULT_MIN_GROUP_SIZE,
                Some(k) if *k.get_ref() >= 1 => *k.get_ref() as u64,
                Some(k) => {
                    out.push(err(
                        k.span(),
                        format!("{table}: min_group_size must be at least 1"),
                    ));
                    DEFAULT_MIN_GROUP_SIZE
                }
            };
            let mut masks = BTreeMap::new();
            for (col, kind) in raw.masks {
                if !wipe.contains(&col) {
                    out.push(err(
                        kind.span(),
                        format!("{table}: mask for {col:?}, which is not in wipe"),
                    ));
                    continue;
                }
                let is_string = schema
                    .field_with_name(&col)
                    .map(|f| {
                        matches!(
                            f.data_type(),
                            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                        )
                    })
                    .unwrap_or(false);
                if matches!(
                    kind.get_ref(),
                    MaskKind::Star | MaskKind::Last4 | MaskKind::Hash
                ) && !is_string
                {
                    out.push(err(
                        kind.span(),
                        format!(
                            "{table}: mask {:?} needs a string column, {col:?} is not",
                            kind.get_ref()
                        ),
                    ));
                    continue;
                }
                masks.insert(col, *kind.get_ref());
            }
            let aggregates: BTreeSet<String> = match &raw.aggregates {
                None => DEFAULT_AGGREGATES.iter().map(|s| s.to_string()).collect(),
                Some(list) => list
                    .iter()
                    .filter_map(|a| {
                        let name = a.get_ref().to_ascii_lowercase();
                        if KNOWN_AGGREGATES.contains(&name.as_str()) {
                            Some(name)
                        } else {
                            out.push(err(
                                a.span(),
                                format!("{table}: unknown aggregate {:?}", a.get_ref()),
                            ));
                            None
                        }
                    })
                    .collect(),
            };
            let filterable = match filterable_raw {
                Some(f) => {
                    for c in &f {
                        if Some(c) == privacy_unit.as_ref() || wipe.contains(c) {
                            out.push(err(
                                table_span.clone(),
                                format!("{table}: {c:?} is the entity key or wiped and cannot be filterable"),
                            ));
                        }
                    }
                    f
                }
                None => schema
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .filter(|c| Some(c) != privacy_unit.as_ref() && !wipe.contains(c))
                    .collect(),
            };
            let mut row_filters = Vec::new();
            for rf in raw.row_filters {
                let span = rf.span();
                let rf = rf.into_inner();
                match parse_predicate(&table, &schema, &rf.predicate) {
                    Ok(_) => row_filters.push(RowFilter {
                        role: rf.role,
                        predicate: rf.predicate,
                    }),
                    Err(e) => out.push(err(
                        span,
                        format!("{table}: row filter for role {}: {e}", rf.role),
                    )),
                }
            }
            let keys = unique_keys(&table, &schema, &raw.unique, &mut |sp, m| {
                out.push(err(sp, m))
            });
            if !keys.is_empty() {
                unique.insert(table.clone(), keys);
            }
            let release = dp_settings(
                &table,
                &raw_dp,
                &schema,
                privacy_unit.as_deref(),
                &mut |sp, m| out.push(err(sp, m)),
            );
            tables.insert(
                table,
                TablePolicy {
                    privacy_unit,
                    min_group_size,
                    wipe,
                    masks,
                    aggregates,
                    filterable,
                    small_groups: raw.small_groups,
                    arithmetic_aggregates: raw.arithmetic_aggregates,
                    conditional_aggregates: raw.conditional_aggregates,
                    row_filters,
                    release,
                },
            );
        }
        for (name, entry) in raw.public {
            let span = entry.span();
            let err = |sp: std::ops::Range<usize>, m: String| {
                Diagnostic::at_span(path, text, Some(sp), m)
            };
            let Some((table, schema)) =
                catalog_table(path, text, &name, span.clone(), schema_of, &mut out)
            else {
                continue;
            };
            if tables.contains_key(&table) {
                out.push(err(
                    span,
                    format!(
                        "{table} is protected ([tables.\"{table}\"]): declare its unique keys there"
                    ),
                ));
                continue;
            }
            let keys = unique_keys(&table, &schema, &entry.get_ref().unique, &mut |sp, m| {
                out.push(err(sp, m))
            });
            if !keys.is_empty() {
                unique.insert(table, keys);
            }
        }
        let mut budgets = Vec::new();
        for b in raw.budgets {
            let span = b.span();
            let b = b.into_inner();
            let err = |sp: std::ops::Range<usize>, m: String| {
                Diagnostic::at_span(path, text, Some(sp), m)
            };
            let holder = match (b.principal, b.role) {
                (Some(p), None) => Holder::Principal(p),
                (None, Some(r)) => Holder::Role(r),
                _ => {
                    out.push(err(
                        span,
                        "budget: give exactly one of principal or role".into(),
                    ));
                    continue;
                }
            };
            let dataset = b.dataset.get_ref().clone();
            if !tables
                .iter()
                .any(|(t, p)| t.schema == dataset && p.dp().is_some())
            {
                out.push(err(
                    b.dataset.span(),
                    format!("budget for {holder}: dataset {dataset:?} has no table with release = \"dp\""),
                ));
            }
            let eps = *b.epsilon.get_ref();
            if !(eps.is_finite() && eps > 0.0) {
                out.push(err(
                    b.epsilon.span(),
                    format!("budget for {holder}: epsilon must be a positive number"),
                ));
            }
            let delta = *b.delta.get_ref();
            if !(delta.is_finite() && (0.0..1.0).contains(&delta)) {
                out.push(err(
                    b.delta.span(),
                    format!("budget for {holder}: delta must be in [0, 1)"),
                ));
            }
            let renew_secs = match &b.renew {
                None => None,
                Some(r) => {
                    match humantime::parse_duration(r.get_ref()) {
                        Ok(d) if d.as_secs() > 0 => Some(d.as_secs()),
                        _ => {
                            out.push(err(r.span(), format!("budget for {holder}: renew {:?} is not a duration such as \"30d\"", r.get_ref())));
                            None
                        }
                    }
                }
            };
            if budgets
                .iter()
                .any(|o: &Budget| o.holder == holder && o.dataset == dataset)
            {
                out.push(err(
                    span,
                    format!("budget for {holder} on {dataset} is given twice"),
                ));
                continue;
            }
            budgets.push(Budget {
                holder,
                dataset,
                epsilon: Real(eps),
                delta: Real(delta),
                renew_secs,
            });
        }
        out.finish(Self {
            tables,
            budgets: Budgets { budgets },
            unique,
        })
    }

    pub fn get(&self, table: &TableName) -> Option<&TablePolicy> {
        self.tables.get(table)
    }

    /// The declared unique keys of a table (none if it declares none).
    pub fn unique_keys(&self, table: &TableName) -> &[UniqueKey] {
        self.unique.get(table).map_or(&[], Vec::as_slice)
    }
}

/// The table a section names and its schema, or why there is none (reported).
fn catalog_table(
    path: &Path,
    text: &str,
    name: &str,
    span: std::ops::Range<usize>,
    schema_of: &dyn Fn(&TableName) -> Option<Schema>,
    out: &mut Collector,
) -> Option<(TableName, Schema)> {
    let table = match TableName::parse(name) {
        Ok(t) => t,
        Err(e) => {
            out.push(Diagnostic::at_span(path, text, Some(span), e));
            return None;
        }
    };
    let Some(schema) = schema_of(&table) else {
        out.push(Diagnostic::at_span(
            path,
            text,
            Some(span),
            format!("table {table} is not in the catalog"),
        ));
        return None;
    };
    Some((table, schema))
}

/// Validates `unique = [["a"], ["b", "c"]]`: each key a non-empty list of existing,
/// distinct columns.
fn unique_keys(
    table: &TableName,
    schema: &Schema,
    raw: &[Spanned<Vec<Spanned<String>>>],
    report: &mut dyn FnMut(std::ops::Range<usize>, String),
) -> Vec<UniqueKey> {
    let mut keys = Vec::new();
    for key in raw {
        let mut columns: Vec<String> = Vec::new();
        let mut ok = !key.get_ref().is_empty();
        if !ok {
            report(
                key.span(),
                format!("{table}: a unique key needs at least one column"),
            );
        }
        for c in key.get_ref() {
            if schema.field_with_name(c.get_ref()).is_err() {
                report(
                    c.span(),
                    format!(
                        "{table}: unique key column {:?} does not exist",
                        c.get_ref()
                    ),
                );
                ok = false;
            } else if columns.contains(c.get_ref()) {
                report(
                    c.span(),
                    format!("{table}: {:?} is twice in one unique key", c.get_ref()),
                );
                ok = false;
            } else {
                columns.push(c.get_ref().clone());
            }
        }
        if ok {
            keys.push(UniqueKey {
                columns,
                span: key.span(),
            });
        }
    }
    keys
}

/// The DP keys of one table section, kept apart from the threshold keys.
struct RawDp {
    release: Option<Spanned<RawRelease>>,
    max_groups_per_unit: Option<Spanned<i64>>,
    max_rows_per_group_per_unit: Option<Spanned<i64>>,
    bounds: BTreeMap<String, Spanned<Vec<f64>>>,
    max_epsilon: Option<Spanned<f64>>,
    delta: Option<Spanned<f64>>,
    table_span: std::ops::Range<usize>,
}

/// Validates the DP keys of a table: they are an error on a threshold table (a typo
/// there would silently weaken nothing, but would mislead the owner); on a DP table
/// L0 and C are required, bounds must name numeric columns with lo <= hi, and ε, δ
/// must be in range.
fn dp_settings(
    table: &TableName,
    raw: &RawDp,
    schema: &Schema,
    privacy_unit: Option<&str>,
    err: &mut dyn FnMut(std::ops::Range<usize>, String),
) -> ReleaseMode {
    let Some(release) = raw
        .release
        .as_ref()
        .filter(|r| *r.get_ref() == RawRelease::Dp)
    else {
        let stray = [
            raw.max_groups_per_unit.as_ref().map(|s| s.span()),
            raw.max_rows_per_group_per_unit.as_ref().map(|s| s.span()),
            raw.max_epsilon.as_ref().map(|s| s.span()),
            raw.delta.as_ref().map(|s| s.span()),
        ];
        if let Some(sp) = stray
            .into_iter()
            .flatten()
            .next()
            .or_else(|| raw.bounds.values().next().map(|b| b.span()))
        {
            err(sp, format!("{table}: DP settings need release = \"dp\""));
        }
        return ReleaseMode::Threshold;
    };
    if privacy_unit.is_none() {
        err(
            release.span(),
            format!("{table}: release = \"dp\" needs a privacy_unit"),
        );
    }
    let mut positive = |v: &Option<Spanned<i64>>, key: &str| -> u64 {
        match v {
            Some(n) if *n.get_ref() >= 1 => *n.get_ref() as u64,
            Some(n) => {
                err(n.span(), format!("{table}: {key} must be at least 1"));
                1
            }
            None => {
                err(
                    raw.table_span.clone(),
                    format!("{table}: release = \"dp\" needs {key}"),
                );
                1
            }
        }
    };
    let max_groups_per_unit = positive(&raw.max_groups_per_unit, "max_groups_per_unit");
    let max_rows_per_group_per_unit = positive(
        &raw.max_rows_per_group_per_unit,
        "max_rows_per_group_per_unit",
    );
    let mut bounds = BTreeMap::new();
    for (col, range) in &raw.bounds {
        let numeric = schema
            .field_with_name(col)
            .map(|f| f.data_type().is_numeric())
            .ok();
        match numeric {
            None => err(
                range.span(),
                format!("{table}: bounds column {col:?} does not exist"),
            ),
            Some(false) => err(
                range.span(),
                format!("{table}: bounds column {col:?} is not numeric"),
            ),
            Some(true) => {}
        }
        if Some(col.as_str()) == privacy_unit {
            err(
                range.span(),
                format!("{table}: the privacy unit {col:?} cannot be summed"),
            );
        }
        match range.get_ref().as_slice() {
            [lo, hi]
                if lo.is_finite()
                    && hi.is_finite()
                    && lo <= hi
                    && lo.abs() < 1e12
                    && hi.abs() < 1e12 =>
            {
                bounds.insert(col.clone(), (Real(*lo), Real(*hi)));
            }
            _ => err(
                range.span(),
                format!(
                    "{table}: bounds for {col:?} must be [lo, hi] with lo <= hi, |lo|, |hi| < 1e12"
                ),
            ),
        }
    }
    let max_epsilon = match &raw.max_epsilon {
        None => DEFAULT_MAX_EPSILON,
        Some(e) if e.get_ref().is_finite() && *e.get_ref() > 0.0 && *e.get_ref() <= 10.0 => {
            *e.get_ref()
        }
        Some(e) => {
            err(e.span(), format!("{table}: max_epsilon must be in (0, 10]"));
            DEFAULT_MAX_EPSILON
        }
    };
    let delta = match &raw.delta {
        None => DEFAULT_DELTA,
        Some(d) if d.get_ref().is_finite() && *d.get_ref() > 0.0 && *d.get_ref() < 1e-2 => {
            *d.get_ref()
        }
        Some(d) => {
            err(d.span(), format!("{table}: delta must be in (0, 0.01)"));
            DEFAULT_DELTA
        }
    };
    ReleaseMode::Dp(DpPolicy {
        max_groups_per_unit,
        max_rows_per_group_per_unit,
        bounds,
        max_epsilon: Real(max_epsilon),
        delta: Real(delta),
        stored_in_unit_order: None,
    })
}

/// Parses a row filter against its table's columns (qualified with the table's name).
pub fn parse_predicate(
    table: &TableName,
    schema: &Schema,
    sql: &str,
) -> datafusion::error::Result<datafusion::logical_expr::Expr> {
    use datafusion::common::{DFSchema, TableReference};
    let qualifier = TableReference::partial(table.schema.as_str(), table.table.as_str());
    let df_schema = DFSchema::try_from_qualified_schema(qualifier, schema)?;
    datafusion::prelude::SessionContext::new().parse_sql_expr(sql, &df_schema)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::Field;

    fn schema_of(t: &TableName) -> Option<Schema> {
        (t.to_string() == "h.p").then(|| {
            Schema::new(vec![
                Field::new("pid", DataType::Int64, false),
                Field::new("name", DataType::Utf8, true),
                Field::new("age", DataType::Int32, true),
            ])
        })
    }

    #[test]
    fn defaults_follow_the_contract() {
        let p = TablesPolicy::parse(
            Path::new("tables.toml"),
            "[tables.\"h.p\"]\nprivacy_unit = \"pid\"\nwipe = [\"name\"]\n",
            &schema_of,
        )
        .unwrap();
        let t = &p.tables[&TableName::parse("h.p").unwrap()];
        assert_eq!(t.min_group_size, 10);
        assert_eq!(t.filterable, BTreeSet::from(["age".to_string()]));
        assert_eq!(t.mask_for("name", &DataType::Utf8), Some(MaskKind::Star));
        assert_eq!(t.small_groups, SmallGroups::Drop);
        assert!(t.aggregates.contains("avg") && !t.aggregates.contains("max"));
    }

    #[test]
    fn errors_name_lines() {
        let err = TablesPolicy::parse(
            Path::new("tables.toml"),
            "[tables.\"h.p\"]\nprivacy_unit = \"pid\"\nwipe = [\"nme\"]\n\n[tables.\"h.q\"]\n",
            &schema_of,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("tables.toml:3: h.p: wiped column \"nme\""),
            "{err}"
        );
        assert!(
            err.contains("tables.toml:5: table h.q is not in the catalog"),
            "{err}"
        );
        let err = TablesPolicy::parse(Path::new("t.toml"), "[tables.\"h.p\"]\nk = 3\n", &schema_of)
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.toml:2: unknown field `k`"), "{err}");
        let err = TablesPolicy::parse(
            Path::new("t.toml"),
            "[tables.\"h.p\"]\n\n[[tables.\"h.p\".row_filters]]\nrole = \"r\"\nwhere = \"agee > 3\"\n",
            &schema_of,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("row filter for role r"), "{err}");
    }

    #[test]
    fn unique_keys_parse_and_name_lines() {
        let schema_of = |t: &TableName| match t.to_string().as_str() {
            "h.p" | "h.pub" => schema_of(&TableName::parse("h.p").unwrap()),
            _ => None,
        };
        let p = TablesPolicy::parse(
            Path::new("tables.toml"),
            "[tables.\"h.p\"]\nunique = [[\"pid\"]]\n\n[public.\"h.pub\"]\nunique = [[\"name\", \"age\"], [\"pid\"]]\n",
            &schema_of,
        )
        .unwrap();
        let pub_keys: Vec<Vec<String>> = p
            .unique_keys(&TableName::parse("h.pub").unwrap())
            .iter()
            .map(|k| k.columns.clone())
            .collect();
        assert_eq!(
            pub_keys,
            vec![vec!["name".to_string(), "age".into()], vec!["pid".into()]]
        );
        assert_eq!(p.unique_keys(&TableName::parse("h.p").unwrap()).len(), 1);
        assert!(
            !p.tables.contains_key(&TableName::parse("h.pub").unwrap()),
            "public stays public"
        );
        let err = TablesPolicy::parse(
            Path::new("t.toml"),
            "[tables.\"h.p\"]\n\n[public.\"h.p\"]\nunique = [[\"pid\"]]\n\n[public.\"h.pub\"]\nunique = [[\"nope\"], []]\n\n[public.\"h.q\"]\n",
            &schema_of,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("t.toml:3: h.p is protected"), "{err}");
        assert!(
            err.contains("t.toml:7: h.pub: unique key column \"nope\" does not exist"),
            "{err}"
        );
        assert!(
            err.contains("h.pub: a unique key needs at least one column"),
            "{err}"
        );
        assert!(
            err.contains("t.toml:9: table h.q is not in the catalog"),
            "{err}"
        );
    }

    const DP: &str = "[tables.\"h.p\"]\nprivacy_unit = \"pid\"\nrelease = \"dp\"\nmax_groups_per_unit = 2\nmax_rows_per_group_per_unit = 3\nbounds = { age = [0, 120] }\nmax_epsilon = 1.0\ndelta = 1e-6\n";

    #[test]
    fn dp_settings_parse() {
        let text = format!(
            "{DP}\n[[budgets]]\nprincipal = \"analyst\"\ndataset = \"h\"\nepsilon = 10.0\ndelta = 1e-5\nrenew = \"30d\"\n"
        );
        let p = TablesPolicy::parse(Path::new("tables.toml"), &text, &schema_of).unwrap();
        let t = &p.tables[&TableName::parse("h.p").unwrap()];
        let dp = t.dp().expect("dp");
        assert_eq!(dp.max_groups_per_unit, 2);
        assert_eq!(dp.max_rows_per_group_per_unit, 3);
        assert_eq!(dp.fixed_bounds("age"), Some((0, 120_000)));
        assert_eq!(dp.fixed_bounds("name"), None);
        let b = p.budgets.for_principal("analyst", &[], "h").unwrap();
        assert_eq!(b.epsilon.0, 10.0);
        assert_eq!(b.renew_secs, Some(30 * 86400));
        assert!(p.budgets.for_principal("bob", &[], "h").is_none());
    }

    #[test]
    fn dp_errors_name_lines() {
        let bad = "[tables.\"h.p\"]\nprivacy_unit = \"pid\"\nrelease = \"dp\"\nmax_groups_per_unit = 0\nmax_rows_per_group_per_unit = 3\nbounds = { name = [0, 1], age = [5, 1] }\nmax_epsilon = 50.0\n\n[[budgets]]\nrole = \"r\"\ndataset = \"x\"\nepsilon = -1.0\ndelta = 0.0\n";
        let err = TablesPolicy::parse(Path::new("t.toml"), bad, &schema_of)
            .unwrap_err()
            .to_string();
        for want in [
            "t.toml:4: h.p: max_groups_per_unit must be at least 1",
            "t.toml:6: h.p: bounds column \"name\" is not numeric",
            "t.toml:6: h.p: bounds for \"age\" must be [lo, hi]",
            "t.toml:7: h.p: max_epsilon must be in (0, 10]",
            "t.toml:11: budget for role r: dataset \"x\" has no table",
            "t.toml:12: budget for role r: epsilon must be a positive number",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
        let stray = "[tables.\"h.p\"]\nprivacy_unit = \"pid\"\nmax_epsilon = 1.0\n";
        let err = TablesPolicy::parse(Path::new("t.toml"), stray, &schema_of)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.toml:3: h.p: DP settings need release = \"dp\""),
            "{err}"
        );
        let no_l0 = "[tables.\"h.p\"]\nprivacy_unit = \"pid\"\nrelease = \"dp\"\nmax_rows_per_group_per_unit = 1\n";
        let err = TablesPolicy::parse(Path::new("t.toml"), no_l0, &schema_of)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs max_groups_per_unit"), "{err}");
    }
}
