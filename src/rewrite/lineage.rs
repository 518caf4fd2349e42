//! Lineage: for every column of every plan node, which protected tables and columns it
//! derives from, and whether it is raw or already a k-safe aggregate; for every node,
//! which protected tables' raw rows shape its rows.
//!
//! The walk goes through projections, aliases, CTEs, subqueries (scalar, IN, EXISTS),
//! joins of every kind, unions, DISTINCT, sorts and limits, and records [`Finding`]s:
//! neutral facts that the gate and the rejections turn into violations. A plan node it
//! does not know is a finding too (fail closed). Only tables subject to the automatic
//! rules for this principal are "protected" here (see [`super::TableRules::automatic`]).

use std::collections::BTreeSet;

use datafusion::common::DFSchema;
use datafusion::common::tree_node::TreeNode;
use datafusion::logical_expr::{Distinct, Expr, JoinType, LogicalPlan, Operator};

use super::PolicyContext;
use crate::config::TableName;

/// A protected source column.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    pub table: TableName,
    pub column: String,
}

/// The lineage of one output column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnLineage {
    /// Protected columns this value is computed from.
    pub sources: BTreeSet<Source>,
    /// True while the value is a raw (not yet k-aggregated) protected value.
    pub raw: bool,
}

/// The lineage of one plan node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// Protected tables whose raw rows determine this node's rows (their number,
    /// their existence). Empty for public data and for k-safe aggregates.
    pub rows: BTreeSet<TableName>,
    pub columns: Vec<ColumnLineage>,
}

impl Lineage {
    fn public(width: usize) -> Self {
        Self {
            rows: BTreeSet::new(),
            columns: vec![ColumnLineage::default(); width],
        }
    }

    /// Whether any raw protected row or value is here.
    pub fn is_raw(&self) -> bool {
        !self.rows.is_empty() || self.columns.iter().any(|c| c.raw)
    }

    /// Every protected table that is raw here.
    pub fn raw_tables(&self) -> BTreeSet<TableName> {
        let mut t = self.rows.clone();
        for c in self.columns.iter().filter(|c| c.raw) {
            t.extend(c.sources.iter().map(|s| s.table.clone()));
        }
        t
    }
}

/// A fact about the plan that a rule may object to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Raw protected rows or values reach the output.
    RawOutput(BTreeSet<TableName>),
    /// An aggregate function over raw rows of `tables`.
    Aggregate {
        tables: BTreeSet<TableName>,
        function: String,
        conditional: bool,
        filter: bool,
    },
    /// DISTINCT ON over raw rows (keeps one row's values per key).
    DistinctOn(BTreeSet<TableName>),
    GroupingSets(BTreeSet<TableName>),
    Window(BTreeSet<TableName>),
    /// INTERSECT / EXCEPT (semi and anti joins at analysis time) over raw rows.
    SetOperation(BTreeSet<TableName>),
    Recursive(BTreeSet<TableName>),
    CorrelatedSubquery(BTreeSet<TableName>),
    /// A subquery yields raw protected rows into an expression.
    RawSubquery(BTreeSet<TableName>),
    /// A protected column compared with a literal.
    LiteralComparison(Source),
    /// The principal scans a protected table without `aggregate` (or `read`).
    NoAutomaticAccess(TableName),
    /// A plan node the rewriter cannot classify.
    Unclassified {
        node: String,
        tables: BTreeSet<TableName>,
    },
}

/// The lineage of a whole plan and everything found on the way.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub root: Lineage,
    pub findings: Vec<Finding>,
    /// Every protected table the plan scans.
    pub scanned: BTreeSet<TableName>,
}

/// Computes the plan's lineage and findings.
pub fn analyze(plan: &LogicalPlan, ctx: &PolicyContext) -> Report {
    let mut w = Walker {
        ctx,
        findings: Vec::new(),
        scanned: BTreeSet::new(),
        recursive: false,
    };
    let root = w.walk(plan);
    if root.is_raw() {
        w.findings.push(Finding::RawOutput(root.raw_tables()));
    }
    // A recursive CTE anywhere in a query that reads protected tables is refused, even
    // when the recursion itself reads none: it can generate probes (the safer reading
    // of §3.6).
    if w.recursive && !w.scanned.is_empty() {
        w.findings.push(Finding::Recursive(w.scanned.clone()));
    }
    Report {
        root,
        findings: w.findings,
        scanned: w.scanned,
    }
}

struct Walker<'a> {
    ctx: &'a PolicyContext,
    findings: Vec<Finding>,
    scanned: BTreeSet<TableName>,
    recursive: bool,
}

impl Walker<'_> {
    fn walk(&mut self, plan: &LogicalPlan) -> Lineage {
        let inputs: Vec<Lineage> = plan.inputs().into_iter().map(|p| self.walk(p)).collect();
        // Subqueries inside this node's expressions, judged in this node's context.
        let outer_raw = inputs.iter().any(Lineage::is_raw);
        let sub_rows = self.subqueries(plan, outer_raw);
        let mut out = self.node(plan, &inputs);
        out.rows.extend(sub_rows);
        out
    }

    fn node(&mut self, plan: &LogicalPlan, inputs: &[Lineage]) -> Lineage {
        let width = plan.schema().fields().len();
        let first = || {
            inputs
                .first()
                .cloned()
                .unwrap_or_else(|| Lineage::public(width))
        };
        match plan {
            LogicalPlan::TableScan(scan) => match self.ctx.rules(&scan.table_name) {
                Some((name, rules)) if rules.automatic() => {
                    self.scanned.insert(name.clone());
                    if !rules.aggregate {
                        self.findings.push(Finding::NoAutomaticAccess(name.clone()));
                    }
                    Lineage {
                        rows: BTreeSet::from([name.clone()]),
                        columns: scan
                            .projected_schema
                            .fields()
                            .iter()
                            .map(|f| ColumnLineage {
                                sources: BTreeSet::from([Source {
                                    table: name.clone(),
                                    column: f.name().clone(),
                                }]),
                                raw: true,
                            })
                            .collect(),
                    }
                }
                _ => Lineage::public(width),
            },
            LogicalPlan::Projection(p) => {
                let input = first();
                self.check_comparisons(&p.expr, p.input.schema(), &input);
                Lineage {
                    columns: p
                        .expr
                        .iter()
                        .map(|e| expr_lineage(e, p.input.schema(), &input))
                        .collect(),
                    rows: input.rows,
                }
            }
            LogicalPlan::Filter(f) => {
                let input = first();
                self.check_comparisons(
                    std::slice::from_ref(&f.predicate),
                    f.input.schema(),
                    &input,
                );
                input
            }
            LogicalPlan::Aggregate(a) => {
                let input = first();
                self.check_comparisons(&a.group_expr, a.input.schema(), &input);
                self.check_comparisons(&a.aggr_expr, a.input.schema(), &input);
                let raw = input.raw_tables();
                if !raw.is_empty() {
                    if a.group_expr
                        .iter()
                        .any(|e| matches!(e, Expr::GroupingSet(_)))
                    {
                        self.findings.push(Finding::GroupingSets(raw.clone()));
                    }
                    for e in &a.aggr_expr {
                        self.aggregate_findings(e, a.input.schema(), &input);
                    }
                }
                // Group keys keep their sources (for later comparisons); nothing is raw
                // any more: the threshold makes every released group k-safe.
                let mut columns: Vec<ColumnLineage> = a
                    .group_expr
                    .iter()
                    .flat_map(|e| match e {
                        Expr::GroupingSet(gs) => gs
                            .distinct_expr()
                            .into_iter()
                            .map(|e| expr_lineage(e, a.input.schema(), &input))
                            .collect::<Vec<_>>(),
                        e => vec![expr_lineage(e, a.input.schema(), &input)],
                    })
                    .map(|mut c| {
                        c.raw = false;
                        c
                    })
                    .collect();
                columns.resize(width, ColumnLineage::default());
                Lineage {
                    rows: BTreeSet::new(),
                    columns,
                }
            }
            LogicalPlan::Distinct(Distinct::All(_)) => {
                let mut input = first();
                input.rows.clear();
                for c in &mut input.columns {
                    c.raw = false;
                }
                input
            }
            LogicalPlan::Distinct(Distinct::On(on)) => {
                let input = first();
                if input.is_raw() {
                    self.findings.push(Finding::DistinctOn(input.raw_tables()));
                }
                let mut columns: Vec<ColumnLineage> = on
                    .select_expr
                    .iter()
                    .map(|e| expr_lineage(e, on.input.schema(), &input))
                    .collect();
                columns.resize(width, ColumnLineage::default());
                Lineage {
                    rows: input.rows,
                    columns,
                }
            }
            LogicalPlan::Window(w) => {
                let input = first();
                self.check_comparisons(&w.window_expr, w.input.schema(), &input);
                if input.is_raw() {
                    self.findings.push(Finding::Window(input.raw_tables()));
                }
                let mut columns = input.columns.clone();
                columns.extend(
                    w.window_expr
                        .iter()
                        .map(|e| expr_lineage(e, w.input.schema(), &input)),
                );
                Lineage {
                    rows: input.rows,
                    columns,
                }
            }
            LogicalPlan::Join(j) => {
                let (left, right) = (&inputs[0], &inputs[1]);
                let mut both = left.clone();
                both.rows.extend(right.rows.iter().cloned());
                both.columns.extend(right.columns.iter().cloned());
                let joined_schema = j.left.schema().join(j.right.schema()).ok();
                if let (Some(filter), Some(schema)) = (&j.filter, &joined_schema) {
                    self.check_comparisons(std::slice::from_ref(filter), schema, &both);
                }
                let semi_or_anti = matches!(
                    j.join_type,
                    JoinType::LeftSemi
                        | JoinType::LeftAnti
                        | JoinType::RightSemi
                        | JoinType::RightAnti
                        | JoinType::LeftMark
                        | JoinType::RightMark
                );
                if semi_or_anti && both.is_raw() {
                    self.findings.push(Finding::SetOperation(both.raw_tables()));
                }
                let mut out = match j.join_type {
                    JoinType::LeftSemi | JoinType::LeftAnti => left.clone(),
                    JoinType::RightSemi | JoinType::RightAnti => right.clone(),
                    JoinType::LeftMark => {
                        let mut l = left.clone();
                        l.columns.push(ColumnLineage::default());
                        l
                    }
                    JoinType::RightMark => {
                        let mut r = right.clone();
                        r.columns.push(ColumnLineage::default());
                        r
                    }
                    _ => both.clone(),
                };
                // Which rows survive depends on both sides.
                out.rows = both.rows;
                out.columns.resize(width, ColumnLineage::default());
                out
            }
            LogicalPlan::Union(_) => {
                let mut out = Lineage::public(width);
                for input in inputs {
                    out.rows.extend(input.rows.iter().cloned());
                    for (o, c) in out.columns.iter_mut().zip(&input.columns) {
                        o.sources.extend(c.sources.iter().cloned());
                        o.raw |= c.raw;
                    }
                }
                out
            }
            LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Repartition(_)
            | LogicalPlan::Subquery(_)
            | LogicalPlan::Explain(_)
            | LogicalPlan::Analyze(_) => {
                let mut l = first();
                l.columns.resize(width, ColumnLineage::default());
                l
            }
            LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => Lineage::public(width),
            LogicalPlan::Unnest(_) => {
                let input = first();
                let any = ColumnLineage {
                    sources: input
                        .columns
                        .iter()
                        .flat_map(|c| c.sources.iter().cloned())
                        .collect(),
                    raw: input.columns.iter().any(|c| c.raw),
                };
                Lineage {
                    rows: input.rows,
                    columns: vec![any; width],
                }
            }
            LogicalPlan::RecursiveQuery(_) => {
                self.recursive = true;
                let mut out = Lineage::public(width);
                for input in inputs {
                    out.rows.extend(input.raw_tables());
                }
                for c in &mut out.columns {
                    c.raw = !out.rows.is_empty();
                }
                out
            }
            LogicalPlan::Statement(_)
            | LogicalPlan::Extension(_)
            | LogicalPlan::Dml(_)
            | LogicalPlan::Ddl(_)
            | LogicalPlan::Copy(_)
            | LogicalPlan::DescribeTable(_) => {
                let mut tables: BTreeSet<TableName> = BTreeSet::new();
                for i in inputs {
                    tables.extend(i.raw_tables());
                }
                self.findings.push(Finding::Unclassified {
                    node: plan.display().to_string(),
                    tables: tables.clone(),
                });
                Lineage {
                    rows: tables,
                    columns: vec![ColumnLineage::default(); width],
                }
            }
        }
    }

    /// Walks every subquery in the node's expressions. Returns the protected tables whose
    /// raw rows a subquery feeds into this node.
    fn subqueries(&mut self, plan: &LogicalPlan, outer_raw: bool) -> BTreeSet<TableName> {
        let mut subs = Vec::new();
        for e in plan.expressions() {
            let _ = e.apply(|e| {
                match e {
                    Expr::ScalarSubquery(s) => subs.push(s.clone()),
                    Expr::InSubquery(s) => subs.push(s.subquery.clone()),
                    Expr::Exists(s) => subs.push(s.subquery.clone()),
                    Expr::SetComparison(s) => subs.push(s.subquery.clone()),
                    _ => {}
                }
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            });
        }
        let mut raw = BTreeSet::new();
        for s in subs {
            let before = self.scanned.clone();
            let l = self.walk(&s.subquery);
            let touched: BTreeSet<TableName> = self.scanned.difference(&before).cloned().collect();
            let correlated = !s.outer_ref_columns.is_empty();
            if correlated && (l.is_raw() || outer_raw || !touched.is_empty()) {
                let mut tables = l.raw_tables();
                tables.extend(touched);
                self.findings.push(Finding::CorrelatedSubquery(tables));
            }
            if l.is_raw() {
                let tables = l.raw_tables();
                self.findings.push(Finding::RawSubquery(tables.clone()));
                raw.extend(tables);
            }
        }
        raw
    }

    fn aggregate_findings(&mut self, e: &Expr, schema: &DFSchema, input: &Lineage) {
        let _ = e.apply(|e| {
            if let Expr::AggregateFunction(f) = e {
                let mut tables = BTreeSet::new();
                for a in &f.params.args {
                    let l = expr_lineage(a, schema, input);
                    tables.extend(l.sources.into_iter().map(|s| s.table));
                }
                // count(*) and other column-free aggregates count the raw rows themselves.
                tables.extend(input.raw_tables());
                let conditional = f.params.args.iter().any(has_conditional);
                self.findings.push(Finding::Aggregate {
                    tables,
                    function: f.func.name().to_ascii_lowercase(),
                    conditional,
                    filter: f.params.filter.is_some(),
                });
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        });
    }

    /// Records every comparison of a protected column with a literal.
    fn check_comparisons(&mut self, exprs: &[Expr], schema: &DFSchema, input: &Lineage) {
        for e in exprs {
            let _ = e.apply(|e| {
                let pairs: Vec<(&Expr, Vec<&Expr>)> = match e {
                    Expr::BinaryExpr(b) if is_comparison(b.op) => {
                        vec![(&b.left, vec![&*b.right]), (&b.right, vec![&*b.left])]
                    }
                    Expr::Like(l) | Expr::SimilarTo(l) => vec![(&l.expr, vec![&*l.pattern])],
                    Expr::InList(l) => vec![(&l.expr, l.list.iter().collect())],
                    Expr::Between(b) => vec![(&b.expr, vec![&*b.low, &*b.high])],
                    _ => vec![],
                };
                for (side, others) in pairs {
                    if others.iter().all(|o| is_constant(o)) {
                        for s in expr_lineage(side, schema, input).sources {
                            self.findings.push(Finding::LiteralComparison(s));
                        }
                    }
                }
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            });
        }
    }
}

/// The lineage of an expression over an input.
pub fn expr_lineage(e: &Expr, schema: &DFSchema, input: &Lineage) -> ColumnLineage {
    let mut out = ColumnLineage::default();
    for c in e.column_refs() {
        if let Ok(i) = schema.index_of_column(c)
            && let Some(l) = input.columns.get(i)
        {
            out.sources.extend(l.sources.iter().cloned());
            out.raw |= l.raw;
        }
    }
    out
}

fn is_comparison(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom
            | Operator::RegexMatch
            | Operator::RegexIMatch
            | Operator::RegexNotMatch
            | Operator::RegexNotIMatch
            | Operator::LikeMatch
            | Operator::ILikeMatch
            | Operator::NotLikeMatch
            | Operator::NotILikeMatch
    )
}

/// An expression with no column and no subquery: a literal, a parameter, or a function
/// of those.
fn is_constant(e: &Expr) -> bool {
    let mut constant = true;
    let _ = e.apply(|e| {
        if matches!(
            e,
            Expr::Column(_)
                | Expr::OuterReferenceColumn(..)
                | Expr::ScalarSubquery(_)
                | Expr::InSubquery(_)
                | Expr::Exists(_)
        ) {
            constant = false;
            return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    constant
}

/// Conditional logic that can single one person out of a group.
fn has_conditional(e: &Expr) -> bool {
    let mut found = false;
    let _ = e.apply(|e| {
        let hit = match e {
            Expr::Case(_) => true,
            Expr::ScalarFunction(f) => matches!(
                f.func.name().to_ascii_lowercase().as_str(),
                "coalesce"
                    | "nullif"
                    | "nvl"
                    | "nvl2"
                    | "ifnull"
                    | "if"
                    | "iff"
                    | "greatest"
                    | "least"
            ),
            _ => false,
        };
        if hit {
            found = true;
            return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    found
}
