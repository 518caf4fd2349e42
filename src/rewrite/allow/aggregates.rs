//! What an aggregate's argument may be below a release boundary (PRIVACY.md §3.2).
//!
//! `count(*)`, `count(col)`, `count(DISTINCT col)`, and for the other functions on the
//! table's allow-list a bare numeric filterable column. Nothing computed: a function, a
//! cast, a comparison or a division inside an aggregate turns "a group of thousands" into
//! "the one person in it who matches" (`sum(cost * CAST(zip = '1' AS DOUBLE))`). Two owner
//! opt-ins widen this, each weakening the guarantee:
//!
//! - `arithmetic_aggregates`: sums, differences and products of distinct numeric
//!   filterable columns and numeric literals, each column at most once;
//! - `conditional_aggregates`: CASE and `FILTER (WHERE ...)` whose conditions use only
//!   filterable columns. Each branch's rows are then held to k on their own (the
//!   boundary counts them: `super::super::branches`), so a condition that picks one
//!   person out of a large group releases nothing. A CASE is the aggregate's whole
//!   argument or a branch of another CASE, never a term of arithmetic: two CASEs
//!   multiplied keep the rows where both hold, which no branch count follows.
//!
//! Choices the boundary cannot count branch by branch are refused at any opt-in: the
//! COALESCE-like functions (their branches are decided by NULLs and comparisons of
//! values), and a column of the nullable side of an outer join (its rows are those the
//! join's conditions pick: `LEFT JOIN nation n ON ... AND c_acctbal = 9977.62` and
//! `count(n.n_name)` counted one customer's orders in a group of thousands).
//!
//! Widening casts that type coercion adds (`sum(int_col)` sums `CAST(int_col AS BIGINT)`)
//! keep a column bare: they change no value.

use crate::config::TableName;

/// How a protected column may be used (§3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnClass {
    /// May appear in predicates, group keys, functions and aggregates.
    Filterable,
    /// The privacy unit: only bare, as a join key, group key or inside count.
    Unit,
    /// A wiped column (it carries only its mask): bare, or as a function argument.
    Wiped,
    /// A column the owner left out of `filterable`: bare only.
    NotFilterable,
}

impl ColumnClass {
    /// How a refusal names a column of this class.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Filterable => "the column",
            Self::Unit => "the entity key",
            Self::Wiped => "the wiped column",
            Self::NotFilterable => "the non-filterable column",
        }
    }
}

/// A column of a protected table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceColumn {
    pub table: TableName,
    pub column: String,
    /// Which scan of the table (a self-join scans it twice).
    pub scan: usize,
}

impl std::fmt::Display for SourceColumn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.table, self.column)
    }
}

/// What an aggregate argument is made of.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A bare column of a protected table.
    Column {
        source: SourceColumn,
        class: ColumnClass,
        numeric: bool,
    },
    /// A literal, a parameter, or a value not derived from protected rows.
    Constant,
    /// Sums, differences and products of the parts.
    Arithmetic(Vec<Shape>),
    /// A CASE: a choice among the branches, each held to k by the boundary.
    Conditional(Vec<Shape>),
    /// A value the query's own conditions decide to keep or blank out: a column of the
    /// nullable side of an outer join is NULL except where the join's conditions (and
    /// any filter of that side) hold. Conditional logic, like CASE.
    Marked { inner: Box<Shape>, why: String },
    /// Anything else, as a refusal names it ("a cast of a comparison").
    Other(String),
}

/// The owner's opt-ins that apply to one aggregate (all tables feeding it must opt in).
#[derive(Debug, Clone, Copy, Default)]
pub struct OptIns {
    pub arithmetic: bool,
    pub conditional: bool,
}

/// Why an argument is refused, and with which reason code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgumentError {
    /// Not on the list: names the construct.
    NotAllowed(String),
    /// Conditional logic without `conditional_aggregates`.
    Conditional(String),
    /// Conditional logic whose branches no count can hold to k, at any opt-in.
    Unbounded(String),
    /// A non-filterable column used other than bare.
    Restricted(String),
}

/// Checks one argument of `function` (lower-case name) against §3.2.
pub fn check_argument(
    function: &str,
    distinct: bool,
    shape: &Shape,
    opt_ins: OptIns,
) -> Result<(), ArgumentError> {
    let counting = function == "count";
    if distinct && !counting {
        return Err(ArgumentError::NotAllowed(format!(
            "DISTINCT inside {function}(...)"
        )));
    }
    let mut seen = Vec::new();
    value(function, counting, shape, opt_ins, &mut seen, true)
}

fn value(
    function: &str,
    counting: bool,
    shape: &Shape,
    opt_ins: OptIns,
    seen: &mut Vec<SourceColumn>,
    top: bool,
) -> Result<(), ArgumentError> {
    match shape {
        Shape::Constant => Ok(()),
        Shape::Column {
            source,
            class,
            numeric,
        } => {
            if seen.contains(source) {
                return Err(ArgumentError::NotAllowed(format!(
                    "{source} used twice inside {function}(...)"
                )));
            }
            seen.push(source.clone());
            match class {
                // count(col) and count(DISTINCT col) count entities or values, never read them.
                ColumnClass::Unit | ColumnClass::Wiped if counting && top => Ok(()),
                // A column the owner left out of `filterable` may not select rows, but it
                // may be counted and, bare, summed: that is what aggregates are for.
                ColumnClass::NotFilterable if top && (counting || *numeric) => Ok(()),
                ColumnClass::Filterable if counting || *numeric => Ok(()),
                ColumnClass::Filterable => Err(ArgumentError::NotAllowed(format!(
                    "the non-numeric column {source} inside {function}(...)"
                ))),
                other => Err(ArgumentError::Restricted(format!(
                    "{} {source} inside {function}(...)",
                    other.describe()
                ))),
            }
        }
        Shape::Arithmetic(parts) => {
            // Name what is inside first: "a cast of a comparison" says more than
            // "arithmetic".
            if let Some(what) = first_other(parts) {
                return Err(ArgumentError::NotAllowed(format!(
                    "{what} inside {function}(...)"
                )));
            }
            if !opt_ins.arithmetic {
                return Err(ArgumentError::NotAllowed(format!(
                    "arithmetic inside {function}(...) (the owner has not set arithmetic_aggregates)"
                )));
            }
            for p in parts {
                match p {
                    Shape::Column { .. } | Shape::Constant | Shape::Arithmetic(_) => {
                        value(function, false, p, opt_ins, seen, false)?
                    }
                    // A CASE's branches are held to k one by one; inside arithmetic two
                    // of them combine (`CASE WHEN nation = 21 ... END * CASE WHEN
                    // balance > 9000 ... END` is non-zero only where both hold, one
                    // person), a region no count follows.
                    Shape::Conditional(_) if opt_ins.conditional => {
                        return Err(ArgumentError::Unbounded(format!(
                            "a CASE inside arithmetic inside {function}(...) (write the arithmetic inside the CASE's branches)"
                        )));
                    }
                    Shape::Marked { .. } => value(function, false, p, opt_ins, seen, false)?,
                    Shape::Conditional(_) => {
                        return Err(ArgumentError::Conditional(format!(
                            "conditional logic inside {function}(...)"
                        )));
                    }
                    Shape::Other(what) => {
                        return Err(ArgumentError::NotAllowed(format!(
                            "{what} inside {function}(...)"
                        )));
                    }
                }
            }
            Ok(())
        }
        Shape::Conditional(branches) => {
            if !opt_ins.conditional {
                return Err(ArgumentError::Conditional(format!(
                    "conditional logic (CASE, COALESCE, NULLIF, ...) inside {function}(...)"
                )));
            }
            for b in branches {
                // Each branch is its own value: a column may appear in several branches.
                let mut branch_seen = seen.clone();
                value(function, counting, b, opt_ins, &mut branch_seen, false)?;
            }
            Ok(())
        }
        Shape::Marked { why, .. } => {
            if !opt_ins.conditional {
                return Err(ArgumentError::Conditional(format!(
                    "{why} inside {function}(...)"
                )));
            }
            Err(ArgumentError::Unbounded(format!(
                "{why} inside {function}(...)"
            )))
        }
        Shape::Other(what) => Err(ArgumentError::NotAllowed(format!(
            "{what} inside {function}(...)"
        ))),
    }
}

/// The first part that is neither a column, a constant, arithmetic nor a choice.
fn first_other(parts: &[Shape]) -> Option<&str> {
    parts.iter().find_map(|p| match p {
        Shape::Other(what) => Some(what.as_str()),
        Shape::Arithmetic(inner) | Shape::Conditional(inner) => first_other(inner),
        Shape::Marked { inner, .. } => first_other(std::slice::from_ref(inner)),
        Shape::Column { .. } | Shape::Constant => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, class: ColumnClass) -> Shape {
        Shape::Column {
            source: SourceColumn {
                table: TableName::parse("s.t").unwrap(),
                column: name.into(),
                scan: 0,
            },
            class,
            numeric: true,
        }
    }

    const NONE: OptIns = OptIns {
        arithmetic: false,
        conditional: false,
    };
    const BOTH: OptIns = OptIns {
        arithmetic: true,
        conditional: true,
    };

    #[test]
    fn bare_columns_and_counts() {
        assert!(
            check_argument("sum", false, &col("salary", ColumnClass::Filterable), NONE).is_ok()
        );
        assert!(check_argument("count", true, &col("pid", ColumnClass::Unit), NONE).is_ok());
        assert!(check_argument("count", false, &Shape::Constant, NONE).is_ok());
        assert!(matches!(
            check_argument("sum", false, &col("pid", ColumnClass::Unit), NONE),
            Err(ArgumentError::Restricted(_))
        ));
        assert!(
            check_argument("sum", true, &col("salary", ColumnClass::Filterable), NONE).is_err()
        );
    }

    #[test]
    fn computed_arguments_need_opt_ins() {
        let product = Shape::Arithmetic(vec![
            col("price", ColumnClass::Filterable),
            Shape::Arithmetic(vec![
                Shape::Constant,
                col("discount", ColumnClass::Filterable),
            ]),
        ]);
        assert!(check_argument("sum", false, &product, NONE).is_err());
        assert!(check_argument("sum", false, &product, BOTH).is_ok());
        let twice = Shape::Arithmetic(vec![
            col("price", ColumnClass::Filterable),
            col("price", ColumnClass::Filterable),
        ]);
        assert!(check_argument("sum", false, &twice, BOTH).is_err());
        let indicator = Shape::Arithmetic(vec![
            col("cost", ColumnClass::Filterable),
            Shape::Other("a cast of a comparison".into()),
        ]);
        assert_eq!(
            check_argument("sum", false, &indicator, BOTH),
            Err(ArgumentError::NotAllowed(
                "a cast of a comparison inside sum(...)".into()
            ))
        );
        let case = Shape::Conditional(vec![
            col("salary", ColumnClass::Filterable),
            Shape::Constant,
        ]);
        assert!(matches!(
            check_argument("sum", false, &case, NONE),
            Err(ArgumentError::Conditional(_))
        ));
        assert!(check_argument("sum", false, &case, BOTH).is_ok());
    }

    #[test]
    fn nullable_side_of_an_outer_join_is_conditional() {
        let marked = |inner| Shape::Marked {
            inner: Box::new(inner),
            why: "a column of the nullable side of an outer join".into(),
        };
        let salary = marked(col("salary", ColumnClass::Filterable));
        assert_eq!(
            check_argument("sum", false, &salary, NONE),
            Err(ArgumentError::Conditional(
                "a column of the nullable side of an outer join inside sum(...)".into()
            ))
        );
        // With the opt-in too: no count holds the rows the join's conditions pick to k.
        assert!(matches!(
            check_argument("sum", false, &salary, BOTH),
            Err(ArgumentError::Unbounded(_))
        ));
        // Counted entities of the nullable side: a FILTER by another name.
        let pid = marked(col("pid", ColumnClass::Unit));
        assert!(check_argument("count", true, &pid, NONE).is_err());
        // Inside arithmetic, too.
        let diff = Shape::Arithmetic(vec![col("age", ColumnClass::Filterable), salary]);
        assert!(matches!(
            check_argument(
                "sum",
                false,
                &diff,
                OptIns {
                    arithmetic: true,
                    conditional: false
                }
            ),
            Err(ArgumentError::Conditional(_))
        ));
    }
}
