//! The one checker of PRIVACY.md §3.2: what may stand below a release boundary.
//!
//! It walks the analyst's plan (after type coercion, before any policy rewrite) bottom
//! up. Every node whose input carries raw rows of a protected table must be on the
//! operator list ([`allow::operators`]); every expression there is classified by where
//! its values come from ([`Kind`]): public (literals, parameters, public tables, released
//! values), filterable (computed from filterable columns by allowed functions), or a bare
//! restricted column (the privacy unit, a wiped column, one the owner left out of
//! `filterable`), which may only be moved, grouped on, joined on or counted. The first
//! aggregate (or DISTINCT) over raw rows is where the release boundary goes; its
//! arguments must have an allowed [`Shape`]. Above it, everything is released data.
//!
//! The checker only looks facts up in the allow-lists; anything it does not find there
//! is a [`Violation`] with a stable code and a message naming the construct and where it
//! stands. It never rewrites: [`super::total`], [`super::protect`] and
//! [`super::threshold`] do, once the decision is to release.

use std::collections::BTreeSet;

use datafusion::common::DFSchema;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    BinaryExpr, Distinct, Expr, ExprSchemable, Join, JoinType, LogicalPlan, Operator, Subquery,
    TableScan,
};

use super::PolicyContext;
use super::allow::aggregates::{self, ArgumentError, ColumnClass, OptIns, Shape, SourceColumn};
use super::allow::casts;
use super::allow::functions::{self, FunctionRule, Shape as FunctionShape, Size};
use super::allow::operators::{self, NodeRule};
use super::allow::sizes::{self, Growth, Width};
use crate::config::TableName;
use crate::policy::refusal::ReasonCode;

/// A reason the automatic rules do not release a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: ReasonCode,
    /// The protected tables the violation is about (empty: about the query itself).
    pub tables: BTreeSet<TableName>,
    pub message: String,
}

/// What the checker found in one plan.
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    pub violations: Vec<Violation>,
    /// Every protected table the plan scans under the automatic rules.
    pub scanned: BTreeSet<TableName>,
}

/// Checks `plan` for the principal of `ctx`.
pub fn analyze(plan: &LogicalPlan, ctx: &PolicyContext) -> Analysis {
    let mut c = Checker {
        ctx,
        violations: Vec::new(),
        deferred: Vec::new(),
        scanned: BTreeSet::new(),
        values: Vec::new(),
        next_id: 0,
        recursive: false,
        scans: 0,
        growth: Growth::default(),
    };
    let root = c.walk(plan);
    if root.raw.is_empty() {
        let deferred = std::mem::take(&mut c.deferred);
        c.violations.extend(deferred);
    } else {
        c.violation(
            ReasonCode::AggregateRequired,
            &root.raw,
            format!(
                "rows of {} would leave unaggregated; aggregate them (count, sum, avg, ...) with GROUP BY",
                names(&root.raw)
            ),
        );
    }
    if root.cross.is_some() {
        c.unjoined(&root.raw.clone());
    }
    if c.recursive && !c.scanned.is_empty() {
        let t = c.scanned.clone();
        c.violation(
            ReasonCode::RecursiveNotAllowed,
            &t,
            format!(
                "recursive queries over {} are not released automatically",
                names(&t)
            ),
        );
    }
    if c.growth.guarded_calls > sizes::MAX_GUARDED_CALLS {
        let t = c.scanned.clone();
        c.violation(
            ReasonCode::ExpressionNotAllowed,
            &t,
            format!(
                "{} calls of functions that can fail on some values (abs, round, substr, date_part, ...) on rows of {} (at most {}): the time a failure on one hidden row costs would add up",
                c.growth.guarded_calls,
                names(&t),
                sizes::MAX_GUARDED_CALLS
            ),
        );
    }
    if !c.growth.within_limits() {
        let t = c.scanned.clone();
        c.violation(
            ReasonCode::ExpressionNotAllowed,
            &t,
            format!(
                "concatenations and pads that add {} bytes of literal text to every row (at most {}) and join {} computed values (at most {}), and patterns of {} characters (at most {}), on rows of {}",
                c.growth.added_bytes,
                sizes::MAX_ADDED_BYTES,
                c.growth.joined_operands,
                sizes::MAX_JOINED_OPERANDS,
                c.growth.pattern_chars,
                sizes::MAX_PATTERN_CHARS,
                names(&t)
            ),
        );
    }
    c.violations.dedup();
    Analysis {
        violations: c.violations,
        scanned: c.scanned,
    }
}

/// The columns of a relation the query makes itself (VALUES, generate_series, the
/// results of a subquery), joined to protected rows: their values follow the join key,
/// row by row, as the analyst wrote them, so inside an aggregate they are conditional
/// logic (`JOIN (VALUES ('90001', 1000000), ('10000', 0)) v(z, w) ON p.zip = v.z` and
/// `sum(v.w)` is `sum(CASE WHEN zip = '90001' ...)`: one person weighted out of a group
/// of thousands). They stay usable as filters and group keys (the k rule applies); as an
/// aggregate argument they are refused, at any opt-in (PRIVACY.md §3.2: joins may not
/// mark protected rows at the analyst's choice). A catalog table's columns are the
/// owner's data, and a one-row relation's columns are the same on every row: neither
/// marks anything.
fn mark_joined(cols: &mut [Col], raw: &BTreeSet<TableName>) {
    for c in cols {
        if made_by_query(&c.provenance)
            && c.kind == Kind::Public
            && !matches!(c.shape, Shape::Other(_))
        {
            c.shape = Shape::Other(format!(
                "a column of a relation the query makes (VALUES, generate_series or a subquery's results) joined to rows of {}, which marks them at the analyst's choice",
                names(raw)
            ));
        }
    }
}

/// Whether a column comes from a relation the query makes (VALUES, generate_series, a
/// subquery's results or a computed column), rather than from a catalog table (whose size
/// is the owner's) or from a relation of at most one row.
fn made_by_query(p: &Provenance) -> bool {
    !matches!(
        p,
        Provenance::Catalog | Provenance::Column { .. } | Provenance::Single
    )
}

/// Where a value comes from.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// Literals, parameters, public tables, released values.
    Public,
    /// Computed from filterable columns (or from a wiped column's mask).
    Filterable,
    /// A bare column that may only be moved, grouped on, joined on or counted.
    Restricted(SourceColumn, ColumnClass),
}

impl Kind {
    fn join(self, other: Kind) -> Kind {
        match (self, other) {
            (Kind::Public, Kind::Public) => Kind::Public,
            _ => Kind::Filterable,
        }
    }
}

/// What a relation's column is, for the uniqueness of join keys (§3.2).
#[derive(Debug, Clone, PartialEq)]
enum Provenance {
    /// A column of a protected catalog table, scanned as raw rows.
    Catalog,
    /// Column `column` of scan `scan` of a catalog table whose rows are public to the
    /// principal: unique only through the table's declared keys.
    Column {
        scan: usize,
        table: TableName,
        column: String,
    },
    /// Column `index` of VALUES list `id`.
    Values {
        id: usize,
        index: usize,
    },
    /// The values of generate_series/range: distinct by construction.
    Series,
    /// Group key `index` of aggregate `id`, which has `keys` group keys.
    GroupKey {
        id: usize,
        index: usize,
        keys: usize,
    },
    /// A column of a relation with at most one row.
    Single,
    Other,
}

#[derive(Debug, Clone)]
struct Col {
    kind: Kind,
    shape: Shape,
    provenance: Provenance,
    /// How long its strings can be (allow::sizes).
    width: Width,
}

impl Col {
    fn public(provenance: Provenance) -> Self {
        let width = match provenance {
            // The owner's data, or numbers.
            Provenance::Catalog | Provenance::Column { .. } => Width::STORED,
            Provenance::Series => Width::SCALAR,
            // VALUES: set from its literals where the list is read. Anything else (a
            // released value, a one-row relation) may be as long as the analyst made it.
            Provenance::Values { .. }
            | Provenance::GroupKey { .. }
            | Provenance::Single
            | Provenance::Other => Width::UNKNOWN,
        };
        Self {
            kind: Kind::Public,
            shape: Shape::Constant,
            provenance,
            width,
        }
    }
}

/// One leaf of a chain of keyless inner joins, waiting for the equalities of the filter
/// directly above it (an implicit equi-join, `FROM a, b WHERE a.k = b.k`).
#[derive(Debug, Clone)]
struct Leaf {
    raw: bool,
    columns: std::ops::Range<usize>,
}

#[derive(Debug, Clone, Default)]
struct Info {
    cols: Vec<Col>,
    /// Protected tables whose raw rows shape this node's rows.
    raw: BTreeSet<TableName>,
    cross: Option<Vec<Leaf>>,
}

impl Info {
    fn public(width: usize) -> Self {
        Self {
            cols: vec![Col::public(Provenance::Other); width],
            raw: BTreeSet::new(),
            cross: None,
        }
    }
}

struct Checker<'a> {
    ctx: &'a PolicyContext,
    violations: Vec<Violation>,
    /// ORDER BY / LIMIT over raw rows: reported unless the rows reach the output raw.
    deferred: Vec<Violation>,
    scanned: BTreeSet<TableName>,
    /// The literal rows of each VALUES list seen, by id.
    values: Vec<Vec<Vec<Expr>>>,
    next_id: usize,
    recursive: bool,
    scans: usize,
    /// What the concatenations and pads below boundaries add to a row (allow::sizes).
    growth: Growth,
}

/// The context of one expression check: where it stands and which tables it touches.
struct Place<'a> {
    schema: &'a DFSchema,
    cols: &'a [Col],
    tables: &'a BTreeSet<TableName>,
    /// "in a filter", "in a group key", ...
    what: &'a str,
}

impl Checker<'_> {
    fn violation(&mut self, code: ReasonCode, tables: &BTreeSet<TableName>, message: String) {
        self.violations.push(Violation {
            code,
            tables: tables.clone(),
            message,
        });
    }

    fn id(&mut self) -> usize {
        self.next_id += 1;
        self.next_id
    }

    /// The columns of a scan of a table whose rows are not protected from this
    /// principal: public values, each known as which column of which scan it is (for
    /// the table's declared unique keys).
    fn catalog_columns(&mut self, table: TableName, scan: &TableScan) -> Vec<Col> {
        let id = self.id();
        scan.projected_schema
            .fields()
            .iter()
            .map(|f| {
                Col::public(Provenance::Column {
                    scan: id,
                    table: table.clone(),
                    column: f.name().clone(),
                })
            })
            .collect()
    }

    fn unjoined(&mut self, tables: &BTreeSet<TableName>) {
        self.violation(
            ReasonCode::JoinNotAllowed,
            tables,
            format!(
                "a cross join of rows of {} without an equality between both sides (write the join condition, or use JOIN ... ON)",
                names(tables)
            ),
        );
    }

    fn walk(&mut self, plan: &LogicalPlan) -> Info {
        let inputs: Vec<Info> = plan.inputs().into_iter().map(|p| self.walk(p)).collect();
        let raw: BTreeSet<TableName> = inputs.iter().flat_map(|i| i.raw.iter().cloned()).collect();
        self.subqueries(plan, &raw);
        let consumes_cross = matches!(plan, LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_))
            || matches!(plan, LogicalPlan::Join(j) if is_keyless_inner(j));
        if !consumes_cross && inputs.iter().any(|i| i.cross.is_some()) {
            self.unjoined(&raw);
        }
        if raw.is_empty() {
            return self.public_node(plan, &inputs);
        }
        match operators::rule(plan) {
            NodeRule::Refused { code, what } => {
                let ordering = matches!(plan, LogicalPlan::Sort(_) | LogicalPlan::Limit(_));
                let v = Violation {
                    code,
                    tables: raw.clone(),
                    message: format!(
                        "{what} over raw rows of {} is not released automatically (only projections, filters and joins may stand below the aggregate)",
                        names(&raw)
                    ),
                };
                // ORDER BY and LIMIT over rows that reach the output unaggregated are
                // said by AGGREGATE_REQUIRED; below an aggregate they are their own fault.
                if ordering {
                    self.deferred.push(v);
                } else {
                    self.violations.push(v);
                }
                // The rows above are still raw: if they reach the output, that is said too.
                Info {
                    raw,
                    ..Info::public(plan.schema().fields().len())
                }
            }
            NodeRule::Boundary => self.boundary(plan, &inputs[0]),
            NodeRule::Leaf | NodeRule::Allowed => self.raw_node(plan, inputs, raw),
        }
    }

    /// A node none of whose inputs carries raw protected rows.
    fn public_node(&mut self, plan: &LogicalPlan, inputs: &[Info]) -> Info {
        let width = plan.schema().fields().len();
        match plan {
            LogicalPlan::TableScan(scan) => {
                if let Some((name, rules)) = self.ctx.rules(&scan.table_name) {
                    if rules.automatic() {
                        let scan_id = self.scans;
                        self.scans += 1;
                        self.scanned.insert(name.clone());
                        let tables = BTreeSet::from([name.clone()]);
                        if !rules.aggregate {
                            self.violation(
                                ReasonCode::AccessDenied,
                                &tables,
                                format!("no automatic results from {name}: its results need the data owner's approval"),
                            );
                        }
                        let cols = scan
                            .projected_schema
                            .fields()
                            .iter()
                            .map(|f| {
                                let source = SourceColumn {
                                    table: name.clone(),
                                    column: f.name().clone(),
                                    scan: scan_id,
                                };
                                let class = rules.class(f.name());
                                Col {
                                    kind: match class {
                                        ColumnClass::Filterable => Kind::Filterable,
                                        other => Kind::Restricted(source.clone(), other),
                                    },
                                    shape: Shape::Column {
                                        source,
                                        class,
                                        numeric: f.data_type().is_numeric(),
                                    },
                                    provenance: Provenance::Catalog,
                                    width: Width::STORED,
                                }
                            })
                            .collect();
                        return Info {
                            cols,
                            raw: tables,
                            cross: None,
                        };
                    }
                    return Info {
                        cols: self.catalog_columns(name.clone(), scan),
                        ..Info::default()
                    };
                }
                if let Some(name) = super::table_name(&scan.table_name) {
                    return Info {
                        cols: self.catalog_columns(name, scan),
                        ..Info::default()
                    };
                }
                let table_function = scan.table_name.table();
                let provenance = if table_function.starts_with("generate_series")
                    || table_function.starts_with("range")
                {
                    Provenance::Series
                } else {
                    Provenance::Other
                };
                Info {
                    cols: vec![Col::public(provenance); width],
                    ..Info::default()
                }
            }
            LogicalPlan::Values(v) => {
                let id = self.values.len();
                self.values.push(v.values.clone());
                Info {
                    cols: (0..width)
                        .map(|index| Col {
                            width: v
                                .values
                                .iter()
                                .filter_map(|row| row.get(index))
                                .map(literal_width)
                                .fold(Width::default(), |a, b| Width {
                                    text: a.text.max(b.text),
                                    copies: a.copies.max(b.copies),
                                }),
                            ..Col::public(Provenance::Values { id, index })
                        })
                        .collect(),
                    ..Info::default()
                }
            }
            LogicalPlan::EmptyRelation(_) => Info {
                cols: vec![Col::public(Provenance::Single); width],
                ..Info::default()
            },
            LogicalPlan::Projection(p) => Info {
                cols: p
                    .expr
                    .iter()
                    .map(|e| match strip(e) {
                        Expr::Column(c) => p
                            .input
                            .schema()
                            .index_of_column(c)
                            .ok()
                            .and_then(|i| inputs[0].cols.get(i).cloned())
                            .unwrap_or(Col::public(Provenance::Other)),
                        _ => Col::public(Provenance::Other),
                    })
                    .collect(),
                ..Info::default()
            },
            LogicalPlan::Filter(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::Subquery(_) => {
                let mut i = inputs[0].clone();
                i.cross = None;
                i.cols.resize(width, Col::public(Provenance::Other));
                i
            }
            LogicalPlan::Aggregate(_) | LogicalPlan::Distinct(Distinct::All(_)) => {
                self.grouped(plan)
            }
            LogicalPlan::RecursiveQuery(_) => {
                self.recursive = true;
                Info::public(width)
            }
            LogicalPlan::Extension(_)
            | LogicalPlan::Statement(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Ddl(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::DescribeTable(_) => {
                let t = self.scanned.clone();
                self.violation(
                    ReasonCode::UnclassifiedPlan,
                    &t,
                    format!(
                        "the plan contains a node the policy cannot classify: {}",
                        plan.display()
                    ),
                );
                Info::public(width)
            }
            LogicalPlan::Join(_)
            | LogicalPlan::Union(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::Distinct(Distinct::On(_))
            | LogicalPlan::Unnest(_)
            | LogicalPlan::Repartition(_)
            | LogicalPlan::Explain(_)
            | LogicalPlan::Analyze(_) => Info::public(width),
        }
    }

    /// A projection, filter, alias or join over raw rows.
    fn raw_node(
        &mut self,
        plan: &LogicalPlan,
        inputs: Vec<Info>,
        raw: BTreeSet<TableName>,
    ) -> Info {
        let width = plan.schema().fields().len();
        match plan {
            LogicalPlan::Projection(p) => {
                let input = &inputs[0];
                let place = Place {
                    schema: p.input.schema(),
                    cols: &input.cols,
                    tables: &raw,
                    what: "in a SELECT expression",
                };
                let cols = p.expr.iter().map(|e| self.column(e, &place)).collect();
                Info {
                    cols,
                    raw,
                    cross: None,
                }
            }
            LogicalPlan::Filter(f) => {
                let mut input = inputs.into_iter().next().unwrap_or_default();
                match input.cross.take() {
                    Some(leaves) => {
                        self.implicit_join(&f.predicate, f.input.schema(), &input, leaves, &raw)
                    }
                    None => {
                        let place = Place {
                            schema: f.input.schema(),
                            cols: &input.cols,
                            tables: &raw,
                            what: "in a filter",
                        };
                        self.value(&f.predicate, &place);
                    }
                }
                input
            }
            LogicalPlan::SubqueryAlias(_) | LogicalPlan::Subquery(_) => {
                let mut i = inputs.into_iter().next().unwrap_or_default();
                i.cols.resize(width, Col::public(Provenance::Other));
                i
            }
            LogicalPlan::Join(j) => self.join(j, inputs, raw),
            other => {
                // The operator table said Allowed or Leaf for a node this function does not
                // know: fail closed.
                self.violation(
                    ReasonCode::UnclassifiedPlan,
                    &raw,
                    format!(
                        "the plan contains a node the policy cannot classify: {}",
                        other.display()
                    ),
                );
                Info::public(width)
            }
        }
    }

    /// A column of a projection: bare columns keep what they are; anything computed is
    /// checked and becomes filterable (or public).
    fn column(&mut self, e: &Expr, place: &Place) -> Col {
        if let Some(i) = bare_column(e, place.schema)
            && let Some(c) = place.cols.get(i)
        {
            return c.clone();
        }
        let kind = self.value(e, place);
        let shape = self.shape(e, place);
        Col {
            kind: match kind {
                Kind::Restricted(..) => Kind::Filterable,
                k => k,
            },
            shape,
            provenance: Provenance::Other,
            width: self.width(e, place),
        }
    }

    /// Classifies an expression below the boundary, recording every violation in it.
    fn value(&mut self, e: &Expr, place: &Place) -> Kind {
        match e {
            Expr::Column(c) => match place.schema.index_of_column(c) {
                Ok(i) => place
                    .cols
                    .get(i)
                    .map(|c| c.kind.clone())
                    .unwrap_or(Kind::Public),
                Err(_) => {
                    self.violation(
                        ReasonCode::UnclassifiedPlan,
                        place.tables,
                        format!("a column the policy cannot resolve {}", place.what),
                    );
                    Kind::Public
                }
            },
            Expr::Literal(..) | Expr::Placeholder(_) => Kind::Public,
            Expr::Alias(a) => self.value(&a.expr, place),
            Expr::BinaryExpr(b) => self.binary(b, place),
            Expr::Like(l) => {
                let kind = self.operand(&l.expr, "a pattern match", place);
                self.pattern(&l.expr, &l.pattern, place);
                kind
            }
            Expr::SimilarTo(l) => {
                let kind = self.operand(&l.expr, "a pattern match", place);
                self.not_allowed(
                    place,
                    "SIMILAR TO (a regular expression; only LIKE and ILIKE patterns are on the list)",
                );
                kind
            }
            Expr::Not(x)
            | Expr::IsNotNull(x)
            | Expr::IsNull(x)
            | Expr::IsTrue(x)
            | Expr::IsFalse(x)
            | Expr::IsUnknown(x)
            | Expr::IsNotTrue(x)
            | Expr::IsNotFalse(x)
            | Expr::IsNotUnknown(x) => self.operand(x, "a condition", place),
            Expr::Negative(x) => self.operand(x, "arithmetic", place),
            Expr::Between(b) => {
                let mut k = self.operand(&b.expr, "a comparison", place);
                k = k.join(self.operand(&b.low, "a comparison", place));
                k.join(self.operand(&b.high, "a comparison", place))
            }
            Expr::InList(l) => {
                let mut k = self.operand(&l.expr, "a comparison", place);
                for x in &l.list {
                    k = k.join(self.operand(x, "a comparison", place));
                }
                k
            }
            Expr::Case(c) => {
                let mut k = Kind::Public;
                if let Some(x) = &c.expr {
                    k = k.join(self.operand(x, "CASE", place));
                }
                for (w, t) in &c.when_then_expr {
                    k = k.join(self.operand(w, "CASE", place));
                    k = k.join(self.operand(t, "CASE", place));
                }
                if let Some(x) = &c.else_expr {
                    k = k.join(self.operand(x, "CASE", place));
                }
                k
            }
            Expr::Cast(datafusion::logical_expr::Cast { expr, field })
            | Expr::TryCast(datafusion::logical_expr::TryCast { expr, field }) => {
                let kind = self.value(expr, place);
                match kind {
                    Kind::Restricted(source, class) => {
                        let from = expr.get_type(place.schema).ok();
                        if from.is_some_and(|f| casts::is_widening(&f, field.data_type())) {
                            Kind::Restricted(source, class)
                        } else {
                            self.restricted(place, &source, class, "a cast");
                            Kind::Filterable
                        }
                    }
                    k => k,
                }
            }
            Expr::ScalarFunction(f) => {
                let name = f.func.name();
                let Some(rule) = functions::rule(name) else {
                    self.violation(
                        ReasonCode::FunctionNotAllowed,
                        place.tables,
                        format!(
                            "function {name} is not on the allow-list of functions that may run on rows of {} (PRIVACY.md §3.2.1)",
                            names(place.tables)
                        ),
                    );
                    return Kind::Filterable;
                };
                self.size(rule, &f.args, place);
                let width = self.width(e, place);
                self.wide(width, name, place);
                let mut k = Kind::Public;
                for (i, a) in f.args.iter().enumerate() {
                    if rule.literal_args.contains(&i) {
                        if !is_constant(a) {
                            self.not_allowed(
                                place,
                                &format!(
                                    "{name} with a column as argument {} (it must be a literal)",
                                    i + 1
                                ),
                            );
                        }
                        continue;
                    }
                    k = k.join(match self.value(a, place) {
                        // A wiped column carries only its mask: a function may read it.
                        Kind::Restricted(_, ColumnClass::Wiped) => Kind::Filterable,
                        Kind::Restricted(source, class) => {
                            self.restricted(
                                place,
                                &source,
                                class,
                                &format!("an argument of {name}"),
                            );
                            Kind::Filterable
                        }
                        other => other,
                    });
                }
                k
            }
            Expr::ScalarSubquery(s) => {
                if s.outer_ref_columns.is_empty() {
                    // A released value: its own plan was checked as a query of its own.
                    Kind::Public
                } else {
                    self.violation(
                        ReasonCode::CorrelatedSubqueryNotAllowed,
                        place.tables,
                        format!(
                            "a correlated subquery {} over rows of {}",
                            place.what,
                            names(place.tables)
                        ),
                    );
                    Kind::Filterable
                }
            }
            Expr::InSubquery(_) | Expr::Exists(_) | Expr::SetComparison(_) => {
                self.violation(
                    ReasonCode::SubqueryNotAllowed,
                    place.tables,
                    format!(
                        "an IN, EXISTS, ANY or ALL subquery {} over rows of {} (compare with a scalar subquery or join instead)",
                        place.what,
                        names(place.tables)
                    ),
                );
                Kind::Filterable
            }
            Expr::OuterReferenceColumn(..) => {
                self.violation(
                    ReasonCode::CorrelatedSubqueryNotAllowed,
                    place.tables,
                    format!("a correlated subquery over rows of {}", names(place.tables)),
                );
                Kind::Filterable
            }
            Expr::AggregateFunction(f) => {
                self.not_allowed(place, &format!("aggregate {}", f.func.name()));
                Kind::Filterable
            }
            Expr::WindowFunction(_) => {
                self.violation(
                    ReasonCode::WindowNotAllowed,
                    place.tables,
                    format!("a window function over rows of {}", names(place.tables)),
                );
                Kind::Filterable
            }
            Expr::GroupingSet(_) => {
                self.violation(
                    ReasonCode::GroupingSetsNotAllowed,
                    place.tables,
                    format!(
                        "ROLLUP, CUBE and GROUPING SETS over {} are not released automatically",
                        names(place.tables)
                    ),
                );
                Kind::Filterable
            }
            #[allow(deprecated)]
            Expr::Wildcard { .. } => {
                self.not_allowed(place, "a wildcard");
                Kind::Filterable
            }
            Expr::ScalarVariable(..)
            | Expr::Unnest(_)
            | Expr::HigherOrderFunction(_)
            | Expr::Lambda(_)
            | Expr::LambdaVariable(_) => {
                self.not_allowed(place, &describe(e));
                Kind::Filterable
            }
        }
    }

    /// An operand that may not be a restricted column.
    fn operand(&mut self, e: &Expr, what: &str, place: &Place) -> Kind {
        match self.value(e, place) {
            Kind::Restricted(source, class) => {
                self.restricted(place, &source, class, what);
                Kind::Filterable
            }
            k => k,
        }
    }

    fn binary(&mut self, b: &BinaryExpr, place: &Place) -> Kind {
        use Operator::*;
        let what = match b.op {
            Eq | NotEq | Lt | LtEq | Gt | GtEq | IsDistinctFrom | IsNotDistinctFrom => {
                "a comparison"
            }
            And | Or => "a condition",
            Plus | Minus | Multiply | Divide | Modulo => "arithmetic",
            StringConcat => {
                self.growth.operand(&b.left);
                self.growth.operand(&b.right);
                let width = self.width(&b.left, place).plus(self.width(&b.right, place));
                self.wide(width, "a string concatenation", place);
                "a string concatenation"
            }
            LikeMatch | ILikeMatch | NotLikeMatch | NotILikeMatch => {
                self.pattern(&b.left, &b.right, place);
                "a pattern match"
            }
            RegexMatch | RegexIMatch | RegexNotMatch | RegexNotIMatch => {
                self.not_allowed(
                    place,
                    "a regular-expression match (only LIKE and ILIKE patterns are on the list)",
                );
                "a pattern match"
            }
            _ => {
                self.not_allowed(place, &format!("the operator {}", b.op));
                "an operator"
            }
        };
        if matches!(b.op, Plus | Minus)
            && !(is_constant(&b.left) && is_constant(&b.right))
            && [&b.left, &b.right].iter().any(|e| {
                e.get_type(place.schema).is_ok_and(|t| {
                    t.is_temporal()
                        || matches!(t, datafusion::arrow::datatypes::DataType::Interval(_))
                })
            })
        {
            self.not_allowed(place, "date or time arithmetic on a column");
        }
        let l = self.operand(&b.left, what, place);
        let r = self.operand(&b.right, what, place);
        l.join(r)
    }

    /// A LIKE / ILIKE pattern: a literal short enough to compile on every row, matched
    /// against a string short enough that matching costs little per row.
    fn pattern(&mut self, input: &Expr, pattern: &Expr, place: &Place) {
        match sizes::pattern_chars(pattern) {
            Some(chars) => {
                self.growth.pattern_chars = self.growth.pattern_chars.saturating_add(chars);
            }
            None => self.not_allowed(
                place,
                &format!(
                    "a pattern that is not a literal of at most {} characters",
                    sizes::MAX_PATTERN_CHARS
                ),
            ),
        }
        if !self.width(input, place).fits_pattern() {
            self.not_allowed(
                place,
                &format!(
                    "a pattern match on more than one stored value and {} bytes of literal text",
                    sizes::MAX_PATTERN_INPUT_BYTES
                ),
            );
        }
    }

    /// A string made below a boundary may be at most so long (allow::sizes).
    fn wide(&mut self, width: Width, what: &str, place: &Place) {
        if !width.fits() {
            self.not_allowed(
                place,
                &if width.text >= Width::UNKNOWN.text {
                    format!("{what} of a released value (its length is not bounded)")
                } else {
                    format!(
                        "{what} making strings of up to {} bytes of literal text and {} stored values per row (at most {} and {})",
                        width.text,
                        width.copies,
                        sizes::MAX_ADDED_BYTES,
                        sizes::MAX_JOINED_OPERANDS
                    )
                },
            );
        }
    }

    /// How long the strings of `e` can be, from its columns' widths (allow::sizes).
    /// Anything that is not text (a number, a date, a boolean) prints in a few bytes.
    fn width(&self, e: &Expr, place: &Place) -> Width {
        let is_text = e.get_type(place.schema).is_ok_and(|t| {
            use datafusion::arrow::datatypes::DataType::*;
            matches!(
                t,
                Utf8 | LargeUtf8 | Utf8View | Binary | LargeBinary | BinaryView | Dictionary(..)
            )
        });
        if !is_text && !matches!(e, Expr::Literal(..)) {
            return Width::SCALAR;
        }
        let sum = |args: &[Expr]| {
            args.iter()
                .fold(Width::default(), |w, a| w.plus(self.width(a, place)))
        };
        match e {
            Expr::Column(c) => place
                .schema
                .index_of_column(c)
                .ok()
                .and_then(|i| place.cols.get(i))
                .map(|c| c.width)
                .unwrap_or(Width::UNKNOWN),
            Expr::Literal(..) => literal_width(e),
            Expr::Alias(a) => self.width(&a.expr, place),
            Expr::Cast(c) => self.width(&c.expr, place),
            Expr::TryCast(c) => self.width(&c.expr, place),
            Expr::BinaryExpr(b) if b.op == Operator::StringConcat => {
                self.width(&b.left, place).plus(self.width(&b.right, place))
            }
            Expr::Case(c) => c
                .when_then_expr
                .iter()
                .map(|(_, t)| self.width(t, place))
                .chain(c.else_expr.iter().map(|x| self.width(x, place)))
                .fold(Width::SCALAR, Width::plus),
            Expr::ScalarFunction(f) => match functions::rule(f.func.name()).map(|r| r.size) {
                // A length that is not allowed is refused on its own (`size`).
                Some(Size::Pads(at)) => f
                    .args
                    .get(at)
                    .and_then(sizes::pad_chars)
                    .map(|n| Width::text(usize::try_from(n.max(0)).unwrap_or(0) * 4))
                    .unwrap_or(Width::SCALAR),
                Some(Size::Replaces(..) | Size::Translates(..)) => f
                    .args
                    .first()
                    .map(|a| self.width(a, place))
                    .unwrap_or(Width::SCALAR),
                Some(Size::Joins) => sizes::joined(f.func.name(), &f.args)
                    .fold(Width::default(), |w, a| w.plus(self.width(a, place))),
                Some(Size::Bounded) => sum(&f.args),
                None => Width::UNKNOWN,
            },
            Expr::ScalarSubquery(_) => Width::UNKNOWN,
            // Comparisons, arithmetic, conditions: numbers and booleans.
            _ => Width::SCALAR,
        }
    }

    /// How long a function's result can be (allow::sizes): pads take a small literal
    /// length, substitutions never grow a string, concatenations count towards the
    /// query's growth.
    fn size(&mut self, rule: &FunctionRule, args: &[Expr], place: &Place) {
        let name = rule.name;
        if rule.totality == functions::Totality::Guarded {
            self.growth.guarded_calls += 1;
        }
        match rule.size {
            Size::Bounded => {}
            Size::Joins => {
                for a in sizes::joined(name, args) {
                    self.growth.operand(a);
                }
            }
            Size::Pads(at) => match args.get(at).and_then(sizes::pad_chars) {
                Some(chars) => self.growth.pad(chars),
                None => self.not_allowed(
                    place,
                    &format!(
                        "{name} with a length that is not an integer literal of at most {} characters",
                        sizes::MAX_PAD_CHARS
                    ),
                ),
            },
            Size::Replaces(from, to) | Size::Translates(from, to) => {
                let text = |i: usize| args.get(i).and_then(sizes::literal_text);
                let grows = match (text(from), text(to)) {
                    (Some(f), Some(t)) if matches!(rule.size, Size::Replaces(..)) => {
                        sizes::replace_grows(f, t)
                    }
                    (Some(f), Some(t)) => sizes::translate_grows(f, t),
                    _ => true,
                };
                if grows {
                    self.not_allowed(
                        place,
                        &format!(
                            "{name} with a replacement longer than what it replaces (no string may grow)"
                        ),
                    );
                }
            }
        }
    }

    fn restricted(&mut self, place: &Place, source: &SourceColumn, class: ColumnClass, what: &str) {
        self.violation(
            ReasonCode::FilterNotAllowed,
            place.tables,
            format!(
                "{source} is {} and may only be used bare (as a join key, a group key or inside count); found in {what} {}",
                match class {
                    ColumnClass::Unit => "the entity key",
                    ColumnClass::Wiped => "a wiped column",
                    ColumnClass::NotFilterable | ColumnClass::Filterable => "not filterable",
                },
                place.what
            ),
        );
    }

    fn not_allowed(&mut self, place: &Place, what: &str) {
        self.violation(
            ReasonCode::ExpressionNotAllowed,
            place.tables,
            format!("{what} {} on {}", place.what, names(place.tables)),
        );
    }

    /// The shape of an aggregate argument (or of a computed column, for later use in one).
    fn shape(&mut self, e: &Expr, place: &Place) -> Shape {
        match e {
            Expr::Alias(a) => self.shape(&a.expr, place),
            Expr::Column(c) => place
                .schema
                .index_of_column(c)
                .ok()
                .and_then(|i| place.cols.get(i))
                .map(|c| c.shape.clone())
                .unwrap_or(Shape::Other("a column the policy cannot resolve".into())),
            Expr::Literal(..) | Expr::Placeholder(_) => Shape::Constant,
            Expr::ScalarSubquery(s) if s.outer_ref_columns.is_empty() => Shape::Constant,
            Expr::Cast(datafusion::logical_expr::Cast { expr, field })
            | Expr::TryCast(datafusion::logical_expr::TryCast { expr, field }) => {
                match expr.get_type(place.schema) {
                    // Type coercion puts these on aggregate arguments (avg of an integer
                    // averages its double): numeric to numeric, never failing.
                    Ok(from)
                        if casts::is_widening(&from, field.data_type())
                            || (from.is_numeric()
                                && field.data_type().is_numeric()
                                && casts::is_total(&from, field.data_type())) =>
                    {
                        self.shape(expr, place)
                    }
                    _ => Shape::Other(format!("a cast of {}", describe(expr))),
                }
            }
            Expr::Negative(x) => Shape::Arithmetic(vec![self.shape(x, place)]),
            Expr::BinaryExpr(b)
                if matches!(b.op, Operator::Plus | Operator::Minus | Operator::Multiply) =>
            {
                Shape::Arithmetic(vec![
                    self.shape(&b.left, place),
                    self.shape(&b.right, place),
                ])
            }
            Expr::Case(c) => {
                let mut branches: Vec<Shape> = c
                    .when_then_expr
                    .iter()
                    .map(|(_, t)| self.shape(t, place))
                    .collect();
                branches.push(match &c.else_expr {
                    Some(x) => self.shape(x, place),
                    None => Shape::Constant,
                });
                Shape::Conditional(branches)
            }
            // A choice decided by NULLs and comparisons of values: the boundary cannot
            // count its branches' rows, as it counts CASE's (write CASE instead).
            Expr::ScalarFunction(f)
                if functions::rule(f.func.name())
                    .is_some_and(|r| r.shape == FunctionShape::Conditional) =>
            {
                Shape::Other(format!(
                    "{}(...), a choice whose branches cannot each be held to k (write it as CASE)",
                    f.func.name()
                ))
            }
            other => Shape::Other(describe(other)),
        }
    }

    /// The aggregate (or DISTINCT) that consumes raw rows: the release boundary goes above it.
    fn boundary(&mut self, plan: &LogicalPlan, input: &Info) -> Info {
        let tables = input.raw.clone();
        if let LogicalPlan::Aggregate(a) = plan {
            let schema = a.input.schema();
            for g in &a.group_expr {
                if let Expr::GroupingSet(_) = g {
                    self.violation(
                        ReasonCode::GroupingSetsNotAllowed,
                        &tables,
                        format!(
                            "ROLLUP, CUBE and GROUPING SETS over {} are not released automatically",
                            names(&tables)
                        ),
                    );
                    continue;
                }
                let place = Place {
                    schema,
                    cols: &input.cols,
                    tables: &tables,
                    what: "in a group key",
                };
                // A bare column of any kind may be a group key (grouping by the entity key
                // makes one-entity groups, which the k rule withholds).
                if bare_column(g, schema).is_none() {
                    self.value(g, &place);
                }
            }
            let opt_ins = self.opt_ins(&tables);
            for e in &a.aggr_expr {
                self.aggregate(e, schema, input, &tables, opt_ins);
            }
        }
        self.grouped(plan)
    }

    /// The output of an aggregate or DISTINCT: released (or public) values whose group
    /// keys are unique together, a relation of at most one row without keys.
    fn grouped(&mut self, plan: &LogicalPlan) -> Info {
        let width = plan.schema().fields().len();
        let id = self.id();
        let keys = match plan {
            LogicalPlan::Aggregate(a) => a.group_expr.len(),
            _ => width,
        };
        Info {
            cols: (0..width)
                .map(|index| {
                    Col::public(if keys == 0 {
                        Provenance::Single
                    } else if index < keys {
                        Provenance::GroupKey { id, index, keys }
                    } else {
                        Provenance::Other
                    })
                })
                .collect(),
            ..Info::default()
        }
    }

    fn opt_ins(&self, tables: &BTreeSet<TableName>) -> OptIns {
        let all = |f: fn(&super::TableRules) -> bool| {
            tables.iter().all(|t| self.ctx.tables.get(t).is_some_and(f))
        };
        OptIns {
            arithmetic: all(|r| r.policy.arithmetic_aggregates),
            conditional: all(|r| r.policy.conditional_aggregates),
        }
    }

    fn aggregate(
        &mut self,
        e: &Expr,
        schema: &DFSchema,
        input: &Info,
        tables: &BTreeSet<TableName>,
        opt_ins: OptIns,
    ) {
        let Expr::AggregateFunction(AggregateFunction { func, params }) = strip(e) else {
            self.violation(
                ReasonCode::ExpressionNotAllowed,
                tables,
                format!("{} as an aggregate over {}", describe(e), names(tables)),
            );
            return;
        };
        let name = func.name().to_ascii_lowercase();
        let refusing: BTreeSet<TableName> = tables
            .iter()
            .filter(|t| {
                self.ctx
                    .tables
                    .get(*t)
                    .is_some_and(|r| !r.policy.aggregates.contains(&name))
            })
            .cloned()
            .collect();
        if !refusing.is_empty() {
            let allowed = self.allowed_aggregates(&refusing);
            self.violation(
                ReasonCode::AggregateNotAllowed,
                &refusing,
                format!(
                    "aggregate {name} is not on the allow-list of {} (allowed: {allowed})",
                    names(&refusing)
                ),
            );
        }
        let what = format!("inside {name}(...)");
        let place = Place {
            schema,
            cols: &input.cols,
            tables,
            what: &what,
        };
        if !params.order_by.is_empty() {
            self.not_allowed(&place, "ORDER BY");
        }
        if let Some(filter) = &params.filter {
            if !opt_ins.conditional {
                self.violation(
                    ReasonCode::ConditionalAggregate,
                    tables,
                    format!(
                        "a FILTER clause on {name}(...) can single one person out of a group of {} (the owner has not set conditional_aggregates)",
                        names(tables)
                    ),
                );
            }
            self.value(filter, &place);
        }
        for arg in &params.args {
            // Restricted columns inside computations, unknown functions, subqueries.
            if bare_column(arg, schema).is_none() {
                self.value(arg, &place);
            }
            let shape = self.shape(arg, &place);
            match aggregates::check_argument(&name, params.distinct, &shape, opt_ins) {
                Ok(()) => {}
                Err(ArgumentError::NotAllowed(what)) | Err(ArgumentError::Restricted(what)) => {
                    self.violation(
                        ReasonCode::ExpressionNotAllowed,
                        tables,
                        format!("{what} on {}", names(tables)),
                    )
                }
                Err(ArgumentError::Conditional(what)) => self.violation(
                    ReasonCode::ConditionalAggregate,
                    tables,
                    format!(
                        "{what} can single one person out of a group of {} (the owner has not set conditional_aggregates)",
                        names(tables)
                    ),
                ),
                Err(ArgumentError::Unbounded(what)) => self.violation(
                    ReasonCode::ConditionalAggregate,
                    tables,
                    format!(
                        "{what} can single one person out of a group of {}: no count holds the rows it keeps to k (aggregate the protected side, or write the condition as CASE, whose branches are each held to k)",
                        names(tables)
                    ),
                ),
            }
        }
    }

    fn allowed_aggregates(&self, tables: &BTreeSet<TableName>) -> String {
        let mut common: Option<BTreeSet<String>> = None;
        for t in tables {
            if let Some(r) = self.ctx.tables.get(t) {
                common = Some(match common {
                    None => r.policy.aggregates.clone(),
                    Some(c) => c.intersection(&r.policy.aggregates).cloned().collect(),
                });
            }
        }
        common
            .unwrap_or_default()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn join(&mut self, j: &Join, inputs: Vec<Info>, raw: BTreeSet<TableName>) -> Info {
        let mut it = inputs.into_iter();
        let (left, right) = (it.next().unwrap_or_default(), it.next().unwrap_or_default());
        let schema = j.schema.as_ref();
        let mut cols = left.cols.clone();
        cols.extend(right.cols.iter().cloned());
        let split = left.cols.len();
        if !raw.is_empty() {
            for (range, side_raw) in [
                (0..split, !left.raw.is_empty()),
                (split..cols.len(), !right.raw.is_empty()),
            ] {
                if !side_raw {
                    mark_joined(&mut cols[range], &raw);
                }
            }
        }
        // Equality conjuncts between the two sides are join keys; the rest are predicates.
        let mut keys: Vec<(usize, usize)> = Vec::new();
        for (l, r) in &j.on {
            match (
                bare_column(l, j.left.schema()),
                bare_column(r, j.right.schema()),
            ) {
                (Some(a), Some(b)) => keys.push((a, split + b)),
                _ => self.violation(
                    ReasonCode::JoinNotAllowed,
                    &raw,
                    format!(
                        "a join key that is not a column ({}) over rows of {}",
                        describe(l),
                        names(&raw)
                    ),
                ),
            }
        }
        let mut rest = Vec::new();
        if let Some(filter) = &j.filter {
            for c in split_conjunction(filter) {
                match equality(c, schema) {
                    Some((a, b)) if (a < split) != (b < split) => keys.push((a.min(b), a.max(b))),
                    _ => rest.push(c.clone()),
                }
            }
        }
        let place = Place {
            schema,
            cols: &cols,
            tables: &raw,
            what: "in a join condition",
        };
        for c in &rest {
            self.value(c, &place);
        }
        if keys.is_empty() {
            if is_keyless_inner(j) {
                // An implicit equi-join: the filter directly above must join the sides.
                let mut leaves = left.cross.clone().unwrap_or_else(|| {
                    vec![Leaf {
                        raw: !left.raw.is_empty(),
                        columns: 0..split,
                    }]
                });
                let right_leaves = right.cross.clone().unwrap_or_else(|| {
                    vec![Leaf {
                        raw: !right.raw.is_empty(),
                        columns: 0..right.cols.len(),
                    }]
                });
                leaves.extend(right_leaves.into_iter().map(|l| Leaf {
                    raw: l.raw,
                    columns: l.columns.start + split..l.columns.end + split,
                }));
                return Info {
                    cols,
                    raw,
                    cross: Some(leaves),
                };
            }
            self.violation(
                ReasonCode::JoinNotAllowed,
                &raw,
                format!(
                    "a join of rows of {} without an equality between columns of both sides (join keys must be columns, not expressions)",
                    names(&raw)
                ),
            );
        }
        self.key_pairs(&keys, &cols, &raw);
        if !left.raw.is_empty() && !right.raw.is_empty() && !keys.is_empty() {
            let by_unit = keys
                .iter()
                .any(|(a, b)| is_unit(&cols[*a]) || is_unit(&cols[*b]));
            if !by_unit {
                self.repeating_join(&keys, schema, &raw);
            }
        }
        let sides = [
            (0..split, !left.raw.is_empty()),
            (split..cols.len(), !right.raw.is_empty()),
        ];
        for (range, side_raw) in &sides {
            if !side_raw {
                let side_keys: Vec<usize> = keys
                    .iter()
                    .flat_map(|(a, b)| [*a, *b])
                    .filter(|i| range.contains(i))
                    .collect();
                self.unique(&side_keys, &cols, &raw);
            }
        }
        // Outer joins: a nullable side that is not a protected table marks rows.
        let nullable: &[usize] = match j.join_type {
            JoinType::Left => &[1],
            JoinType::Right => &[0],
            JoinType::Full => &[0, 1],
            _ => &[],
        };
        if !nullable.is_empty() {
            self.outer_with_made(&sides, &cols, &raw);
        }
        for side in nullable {
            // Its columns are NULL except where the join's conditions hold: a self-join
            // `LEFT JOIN patients t ON p.patient_id = t.patient_id AND p.zip <> '90000'`
            // makes `sum(p.cost) - sum(t.cost)` one patient's cost, in one k-safe row.
            for c in &mut cols[sides[*side].0.clone()] {
                if !matches!(c.shape, Shape::Other(_)) {
                    c.shape = Shape::Marked {
                        inner: Box::new(c.shape.clone()),
                        why: format!(
                            "a column of the nullable side of an outer join over rows of {} (NULL except where the join's conditions hold)",
                            names(&raw)
                        ),
                    };
                }
            }
            if !sides[*side].1 && !self.opt_ins(&raw).conditional {
                self.violation(
                    ReasonCode::ConditionalAggregate,
                    &raw,
                    format!(
                        "an outer join whose nullable side is not a protected table marks rows of {} at the analyst's choice (the owner has not set conditional_aggregates)",
                        names(&raw)
                    ),
                );
            }
        }
        Info {
            cols,
            raw,
            cross: None,
        }
    }

    /// An outer join of protected rows with a relation the query makes. The join keeps
    /// every row of its preserved side, and looks each one up in the other side's rows
    /// only where that side has any: with `patients p RIGHT JOIN generate_series(1, 1e8)
    /// g ON p.age = g.value AND <condition on one patient>`, the 10^8 lookups ran only
    /// when the patient met the condition (0.41 s against 0.64 s, hostile round 20). An
    /// inner join can be planned so that its made side is always the one hashed
    /// (rewrite::drain); an outer join cannot without holding the whole made relation, so
    /// it is refused, at any opt-in: stricter than §3.2's letter, which allows such joins
    /// under `conditional_aggregates` (docs/DESIGN.md, "Whether a hidden row exists may
    /// not decide what else runs"). The made side's size is the analyst's to choose; a
    /// catalog table's is the owner's, and a one-row relation is looked up once.
    fn outer_with_made(
        &mut self,
        sides: &[(std::ops::Range<usize>, bool); 2],
        cols: &[Col],
        raw: &BTreeSet<TableName>,
    ) {
        let made = sides.iter().any(|(range, side_raw)| {
            !side_raw
                && cols[range.clone()]
                    .iter()
                    .any(|c| made_by_query(&c.provenance))
        });
        if made {
            self.violation(
                ReasonCode::JoinNotAllowed,
                raw,
                format!(
                    "an outer join of rows of {} with a relation the query makes (VALUES, generate_series or a subquery's results): how much of it the join looks up would depend on whether hidden rows reach the join",
                    names(raw)
                ),
            );
        }
    }

    /// The filter directly above a chain of keyless inner joins: its equalities between
    /// columns of different leaves are join keys and must connect every leaf.
    fn implicit_join(
        &mut self,
        predicate: &Expr,
        schema: &DFSchema,
        input: &Info,
        leaves: Vec<Leaf>,
        raw: &BTreeSet<TableName>,
    ) {
        let leaf_of = |i: usize| leaves.iter().position(|l| l.columns.contains(&i));
        let mut parent: Vec<usize> = (0..leaves.len()).collect();
        fn find(p: &mut [usize], x: usize) -> usize {
            let mut r = x;
            while p[r] != r {
                r = p[r];
            }
            p[x] = r;
            r
        }
        let mut keys = Vec::new();
        let mut rest = Vec::new();
        for c in split_conjunction(predicate) {
            let links: Vec<(usize, usize)> = match equality(c, schema) {
                Some(pair) => vec![pair],
                None => {
                    // TPC-H Q19: `(a = b AND ...) OR (a = b AND ...)` joins on a = b too.
                    rest.push(c.clone());
                    common_equalities(c, schema).into_iter().collect()
                }
            };
            for (a, b) in links {
                if leaf_of(a).is_some() && leaf_of(b).is_some() && leaf_of(a) != leaf_of(b) {
                    let (la, lb) = (
                        find(&mut parent, leaf_of(a).unwrap_or(0)),
                        find(&mut parent, leaf_of(b).unwrap_or(0)),
                    );
                    parent[la] = lb;
                    keys.push((a, b));
                } else if equality(c, schema).is_some() {
                    rest.push(c.clone());
                }
            }
        }
        let place = Place {
            schema,
            cols: &input.cols,
            tables: raw,
            what: "in a filter",
        };
        for c in &rest {
            self.value(c, &place);
        }
        let roots: BTreeSet<usize> = (0..leaves.len()).map(|i| find(&mut parent, i)).collect();
        if roots.len() > 1 {
            self.unjoined(raw);
        }
        self.key_pairs(&keys, &input.cols, raw);
        // Leaves of protected rows must be joined to each other on a privacy unit.
        let raw_leaf = |i: usize| leaf_of(i).filter(|l| leaves[*l].raw);
        let mut by_unit: Vec<usize> = (0..leaves.len()).collect();
        for (a, b) in &keys {
            if let (Some(la), Some(lb)) = (raw_leaf(*a), raw_leaf(*b))
                && (is_unit(&input.cols[*a]) || is_unit(&input.cols[*b]))
            {
                let (ra, rb) = (find(&mut by_unit, la), find(&mut by_unit, lb));
                by_unit[ra] = rb;
            }
        }
        let raw_roots: BTreeSet<usize> = (0..leaves.len())
            .filter(|l| leaves[*l].raw)
            .map(|l| find(&mut by_unit, l))
            .collect();
        if raw_roots.len() > 1 {
            self.repeating_join(&keys, schema, raw);
        }
        // Every other leaf must be determined by the protected rows: one of its unique
        // keys equated, column by column, to columns of protected leaves or of leaves
        // already determined. Then each protected row meets at most one row of it. (A
        // leaf unique on a key that joins only another public leaf is not enough:
        // `c.x = s.x AND s.u = n.u` repeats c's rows once per s row with that x.)
        let mut determined: Vec<bool> = leaves.iter().map(|l| l.raw).collect();
        loop {
            let mut grew = false;
            for (i, leaf) in leaves.iter().enumerate() {
                if determined[i] {
                    continue;
                }
                let side_keys: Vec<usize> = keys
                    .iter()
                    .flat_map(|(a, b)| [(*a, *b), (*b, *a)])
                    .filter(|(this, other)| {
                        leaf.columns.contains(this)
                            && leaf_of(*other).is_some_and(|l| determined[l])
                    })
                    .map(|(this, _)| this)
                    .collect();
                if self.is_unique(&side_keys, &input.cols) {
                    determined[i] = true;
                    grew = true;
                }
            }
            if !grew {
                break;
            }
        }
        if determined.iter().any(|d| !d) {
            self.not_unique(raw);
        }
    }

    /// A restricted column may be a join key only against another restricted column of
    /// a protected catalog table. Joined with anything that can be filtered (a filterable
    /// column, a public table, VALUES), the filter on the partner would select people by
    /// their entity key: `patient_id = visits.visit_id ... WHERE visit_id <> 7`.
    fn key_pairs(&mut self, keys: &[(usize, usize)], cols: &[Col], raw: &BTreeSet<TableName>) {
        for (a, b) in keys {
            for (this, other) in [(a, b), (b, a)] {
                if let (
                    Some(Col {
                        kind: Kind::Restricted(source, class),
                        ..
                    }),
                    Some(o),
                ) = (cols.get(*this), cols.get(*other))
                    && !(o.provenance == Provenance::Catalog
                        && matches!(o.kind, Kind::Restricted(..)))
                {
                    self.violation(
                        ReasonCode::JoinNotAllowed,
                        raw,
                        format!(
                            "{source} is {} and may be joined only with the entity key or another non-filterable column of a protected table (a filterable partner could select people by it)",
                            class.describe()
                        ),
                    );
                }
            }
        }
    }

    /// Protected rows joined with protected rows on anything but a privacy unit: each row
    /// is repeated once per partner row with the same key value, and the analyst chooses
    /// those counts (a self-join on `zip` weights a big zip's rows by its size and a lone
    /// patient's by 1; sums then give that patient away by their remainder).
    fn repeating_join(
        &mut self,
        keys: &[(usize, usize)],
        schema: &DFSchema,
        raw: &BTreeSet<TableName>,
    ) {
        let on: Vec<String> = keys
            .iter()
            .flat_map(|(a, b)| [*a, *b])
            .filter_map(|i| schema.fields().get(i).map(|f| f.name().clone()))
            .collect();
        self.violation(
            ReasonCode::JoinNotAllowed,
            raw,
            format!(
                "a join of protected rows of {} with protected rows on {} repeats each row once per partner with the same value, a weight the analyst chooses: protected rows may be joined with protected rows only on a privacy unit",
                names(raw),
                on.join(", ")
            ),
        );
    }

    /// A relation that is not protected may join protected rows only on keys whose
    /// values are unique in it: duplicates would weight one person many times.
    fn unique(&mut self, keys: &[usize], cols: &[Col], raw: &BTreeSet<TableName>) {
        if !self.is_unique(keys, cols) {
            self.not_unique(raw);
        }
    }

    fn not_unique(&mut self, raw: &BTreeSet<TableName>) {
        self.violation(
            ReasonCode::JoinNotAllowed,
            raw,
            format!(
                "a join of rows of {} with a relation whose join keys may repeat (it would count one person several times); join on a key the owner declared unique (`unique` in tables.toml) or on keys unique by construction",
                names(raw)
            ),
        );
    }

    /// Whether the columns `keys` (of one side of a join) hold each value at most once:
    /// they include a declared unique key of one scan of a catalog table, all the group
    /// keys of one aggregate, distinct literal tuples of one VALUES list, the values of
    /// generate_series, or columns of a relation of at most one row.
    fn is_unique(&self, keys: &[usize], cols: &[Col]) -> bool {
        let provenances: Vec<&Provenance> = keys
            .iter()
            .filter_map(|i| cols.get(*i))
            .map(|c| &c.provenance)
            .collect();
        provenances.iter().any(|p| match p {
            Provenance::Series | Provenance::Single => true,
            Provenance::Column { scan, table, .. } => {
                let joined: BTreeSet<&str> = provenances
                    .iter()
                    .filter_map(|q| match q {
                        Provenance::Column { scan: s, column, .. } if s == scan => {
                            Some(column.as_str())
                        }
                        _ => None,
                    })
                    .collect();
                self.ctx
                    .policy
                    .tables
                    .unique_keys(table)
                    .iter()
                    .any(|k| k.columns.iter().all(|c| joined.contains(c.as_str())))
            }
            Provenance::GroupKey { id, keys, .. } => (0..*keys).all(|k| {
                provenances
                    .iter()
                    .any(|q| matches!(q, Provenance::GroupKey { id: i, index, .. } if i == id && *index == k))
            }),
            Provenance::Values { id, .. } => {
                let indexes: Vec<usize> = provenances
                    .iter()
                    .filter_map(|q| match q {
                        Provenance::Values { id: i, index } if i == id => Some(*index),
                        _ => None,
                    })
                    .collect();
                self.values.get(*id).is_some_and(|rows| {
                    let mut seen = BTreeSet::new();
                    rows.iter().all(|row| {
                        let key: Option<Vec<String>> = indexes
                            .iter()
                            .map(|i| match row.get(*i) {
                                Some(Expr::Literal(v, _)) => Some(format!("{v:?}")),
                                _ => None,
                            })
                            .collect();
                        key.is_some_and(|k| seen.insert(k))
                    })
                })
            }
            // Raw protected rows are never "the other side" here; anything else may repeat.
            Provenance::Catalog | Provenance::Other => false,
        })
    }

    /// Checks every subquery in the node's expressions as a query of its own.
    fn subqueries(&mut self, plan: &LogicalPlan, outer_raw: &BTreeSet<TableName>) {
        let mut subs: Vec<Subquery> = Vec::new();
        for e in plan.expressions() {
            let _ = e.apply(|e| {
                match e {
                    Expr::ScalarSubquery(s) => subs.push(s.clone()),
                    Expr::InSubquery(s) => subs.push(s.subquery.clone()),
                    Expr::Exists(s) => subs.push(s.subquery.clone()),
                    Expr::SetComparison(s) => subs.push(s.subquery.clone()),
                    _ => {}
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        for s in subs {
            let before = self.scanned.len();
            let info = self.walk(&s.subquery);
            let touches = self.scanned.len() > before;
            let mut tables = info.raw.clone();
            tables.extend(outer_raw.iter().cloned());
            if !s.outer_ref_columns.is_empty() && (touches || !tables.is_empty()) {
                let mut t = tables.clone();
                if t.is_empty() {
                    t = self.scanned.clone();
                }
                self.violation(
                    ReasonCode::CorrelatedSubqueryNotAllowed,
                    &t,
                    format!(
                        "correlated subqueries on {} are not released automatically",
                        names(&t)
                    ),
                );
            }
            if !info.raw.is_empty() {
                self.violation(
                    ReasonCode::SubqueryNotAllowed,
                    &info.raw,
                    format!(
                        "a subquery feeds raw rows of {} into the query; aggregate it first",
                        names(&info.raw)
                    ),
                );
            }
            if info.cross.is_some() {
                self.unjoined(&info.raw);
            }
        }
    }
}

/// The privacy unit of a protected table, bare.
fn is_unit(c: &Col) -> bool {
    matches!(c.kind, Kind::Restricted(_, ColumnClass::Unit))
}

fn is_keyless_inner(j: &Join) -> bool {
    j.join_type == JoinType::Inner && j.on.is_empty() && j.filter.is_none()
}

/// The expression under any aliases.
fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip(&a.expr),
        e => e,
    }
}

/// The index of the input column an expression is, through aliases and widening casts.
fn bare_column(e: &Expr, schema: &DFSchema) -> Option<usize> {
    match e {
        Expr::Alias(a) => bare_column(&a.expr, schema),
        Expr::Column(c) => schema.index_of_column(c).ok(),
        Expr::Cast(datafusion::logical_expr::Cast { expr, field })
        | Expr::TryCast(datafusion::logical_expr::TryCast { expr, field }) => {
            let from = expr.get_type(schema).ok()?;
            casts::is_widening(&from, field.data_type())
                .then(|| bare_column(expr, schema))
                .flatten()
        }
        _ => None,
    }
}

/// `a = b` between two bare columns: their indexes.
fn equality(e: &Expr, schema: &DFSchema) -> Option<(usize, usize)> {
    match strip(e) {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => Some((bare_column(left, schema)?, bare_column(right, schema)?)),
        _ => None,
    }
}

/// The column equalities that hold in every branch of a disjunction.
fn common_equalities(e: &Expr, schema: &DFSchema) -> BTreeSet<(usize, usize)> {
    let norm = |(a, b): (usize, usize)| (a.min(b), a.max(b));
    match strip(e) {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Or,
            right,
        }) => {
            let l = common_equalities(left, schema);
            let r = common_equalities(right, schema);
            l.intersection(&r).copied().collect()
        }
        Expr::BinaryExpr(BinaryExpr {
            op: Operator::And, ..
        }) => split_conjunction(e)
            .into_iter()
            .flat_map(|c| match equality(c, schema) {
                Some(p) => BTreeSet::from([norm(p)]),
                None => common_equalities(c, schema),
            })
            .collect(),
        other => equality(other, schema).map(norm).into_iter().collect(),
    }
}

/// How long a literal's text is (a number, date or boolean prints in a few bytes).
fn literal_width(e: &Expr) -> Width {
    match sizes::literal_text(e) {
        Some(t) => Width::text(t.len()),
        None if matches!(e, Expr::Literal(..)) => Width::SCALAR,
        None => Width::UNKNOWN,
    }
}

/// No column and no subquery: a literal, a parameter, or a function of those.
pub fn is_constant(e: &Expr) -> bool {
    let mut constant = true;
    let _ = e.apply(|e| {
        if matches!(
            e,
            Expr::Column(_)
                | Expr::OuterReferenceColumn(..)
                | Expr::ScalarSubquery(_)
                | Expr::InSubquery(_)
                | Expr::Exists(_)
                | Expr::SetComparison(_)
                | Expr::AggregateFunction(_)
                | Expr::WindowFunction(_)
        ) {
            constant = false;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    constant
}

/// How a refusal names an expression: the construct, never a value.
pub fn describe(e: &Expr) -> String {
    use Operator::*;
    match e {
        Expr::Alias(a) => describe(&a.expr),
        Expr::Column(_) => "a column".into(),
        Expr::Literal(..) | Expr::Placeholder(_) => "a literal".into(),
        Expr::BinaryExpr(b) => match b.op {
            Eq | NotEq | Lt | LtEq | Gt | GtEq | IsDistinctFrom | IsNotDistinctFrom => {
                "a comparison".into()
            }
            And | Or => "a condition".into(),
            Divide | Modulo => "a division".into(),
            Plus | Minus | Multiply => "arithmetic".into(),
            op => format!("the operator {op}"),
        },
        Expr::Like(_) | Expr::SimilarTo(_) => "a pattern match".into(),
        Expr::Not(_) => "NOT".into(),
        Expr::IsNull(_) | Expr::IsNotNull(_) => "an IS NULL test".into(),
        Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsUnknown(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::IsNotUnknown(_) => "a truth test".into(),
        Expr::Negative(_) => "a negation".into(),
        Expr::Between(_) => "a comparison".into(),
        Expr::Case(_) => "CASE".into(),
        Expr::Cast(c) => format!("a cast of {}", describe(&c.expr)),
        Expr::TryCast(c) => format!("a cast of {}", describe(&c.expr)),
        Expr::ScalarFunction(f) => format!("a call of {}", f.func.name()),
        Expr::AggregateFunction(f) => format!("aggregate {}", f.func.name()),
        Expr::WindowFunction(_) => "a window function".into(),
        Expr::InList(_) => "an IN list".into(),
        Expr::Exists(_)
        | Expr::InSubquery(_)
        | Expr::SetComparison(_)
        | Expr::ScalarSubquery(_) => "a subquery".into(),
        Expr::OuterReferenceColumn(..) => "a correlated column".into(),
        Expr::GroupingSet(_) => "GROUPING SETS".into(),
        Expr::ScalarVariable(..) => "a variable".into(),
        #[allow(deprecated)]
        Expr::Wildcard { .. } => "a wildcard".into(),
        Expr::Unnest(_) => "UNNEST".into(),
        Expr::HigherOrderFunction(_) | Expr::Lambda(_) | Expr::LambdaVariable(_) => {
            "a lambda".into()
        }
    }
}

pub(crate) fn names(tables: &BTreeSet<TableName>) -> String {
    if tables.is_empty() {
        return "the query".into();
    }
    tables
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
