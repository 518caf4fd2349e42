//! SQL text → one statement that may run, or a typed refusal.
//!
//! Only queries run: SELECT, WITH and VALUES. DDL, DML, COPY, SET, CREATE EXTERNAL TABLE,
//! CREATE FUNCTION, transactions and every other statement kind are refused with
//! `STATEMENT_NOT_ALLOWED` before anything is planned. EXPLAIN (and EXPLAIN ANALYZE) is
//! left to the caller, which checks the `admin` action. JDBC-style `?` placeholders are
//! renumbered to DataFusion's `$1, $2, ...` in textual order.

use std::ops::ControlFlow;

use datafusion::sql::parser::{DFParserBuilder, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{self, Expr as SqlExpr, Value, visit_expressions_mut};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::{Error, Result};
use crate::policy::refusal::{ReasonCode, Refusal};

/// A statement that passed the gate.
#[derive(Debug)]
pub enum Checked {
    /// A plain query.
    Query(DFStatement),
    /// `EXPLAIN [ANALYZE] <query>`: runs only for `admin`.
    Explain(DFStatement),
}

/// The deepest expression tree a statement may build. The parser bounds parentheses and
/// function calls itself, but a chain of infix operators (`a + a + ...`, `x::int::int`)
/// builds a deep tree without parser recursion; every later pass (planning,
/// optimization, evaluation) then recurses through it.
pub const MAX_NESTING: usize = 2_000;

/// Parses exactly one statement and lets through only queries and EXPLAIN of a query.
pub fn parse(sql: &str, recursion_limit: usize) -> Result<Checked> {
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize()
        .map_err(|e| Error::Query(format!("SQL error: {e}")))?;
    let bound = nesting_bound(&tokens);
    if bound > MAX_NESTING {
        return Err(Error::Query(format!(
            "expression nesting too deep: up to {bound} levels, the limit is {MAX_NESTING}"
        )));
    }
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(&dialect)
        .with_recursion_limit(recursion_limit)
        .build()
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| Error::Query(e.strip_backtrace()))?;
    let mut stmt = match statements.len() {
        0 => return Err(Error::Query("no SQL statement was sent".into())),
        1 => statements.pop_front().expect("one statement"),
        n => {
            return Err(Error::Query(format!(
                "send one statement at a time (got {n})"
            )));
        }
    };
    number_placeholders(&mut stmt);
    match &stmt {
        DFStatement::Statement(s) => match s.as_ref() {
            ast::Statement::Query(_) => Ok(Checked::Query(stmt)),
            ast::Statement::Explain { statement, .. } => {
                if matches!(statement.as_ref(), ast::Statement::Query(_)) {
                    Ok(Checked::Explain(stmt))
                } else {
                    Err(not_allowed(&statement.to_string()))
                }
            }
            other => Err(not_allowed(&other.to_string())),
        },
        DFStatement::Explain(e) => match e.statement.as_ref() {
            DFStatement::Statement(s) if matches!(s.as_ref(), ast::Statement::Query(_)) => {
                Ok(Checked::Explain(stmt))
            }
            other => Err(not_allowed(&other.to_string())),
        },
        DFStatement::CreateExternalTable(_) => Err(not_allowed("CREATE EXTERNAL TABLE")),
        DFStatement::CopyTo(_) => Err(not_allowed("COPY")),
        DFStatement::Reset(_) => Err(not_allowed("RESET")),
    }
}

/// An upper bound of the expression depth a token stream can produce: within each
/// bracket group, every operator token can add a level; commas and clause keywords
/// start a new expression.
fn nesting_bound(tokens: &[Token]) -> usize {
    let mut groups: Vec<usize> = vec![0];
    let mut sum = 0usize;
    let mut max = 0usize;
    for t in tokens {
        match t {
            Token::Whitespace(_)
            | Token::EOF
            | Token::Period
            | Token::Number(..)
            | Token::Placeholder(_) => {}
            Token::LParen | Token::LBracket | Token::LBrace => groups.push(0),
            Token::RParen | Token::RBracket | Token::RBrace => {
                if groups.len() > 1 {
                    sum -= groups.pop().unwrap_or(0);
                }
            }
            Token::Comma | Token::SemiColon => {
                let top = groups.last_mut().expect("never empty");
                sum -= *top;
                *top = 0;
            }
            Token::Word(w) => match w.keyword {
                Keyword::AND
                | Keyword::OR
                | Keyword::NOT
                | Keyword::IS
                | Keyword::LIKE
                | Keyword::ILIKE
                | Keyword::SIMILAR
                | Keyword::BETWEEN
                | Keyword::IN
                | Keyword::AT
                | Keyword::COLLATE
                | Keyword::DIV => {
                    *groups.last_mut().expect("never empty") += 1;
                    sum += 1;
                }
                Keyword::SELECT
                | Keyword::FROM
                | Keyword::WHERE
                | Keyword::GROUP
                | Keyword::HAVING
                | Keyword::ORDER
                | Keyword::LIMIT
                | Keyword::ON
                | Keyword::UNION
                | Keyword::WHEN
                | Keyword::THEN
                | Keyword::ELSE => {
                    let top = groups.last_mut().expect("never empty");
                    sum -= *top;
                    *top = 0;
                }
                _ => {}
            },
            // Every other token may be an operator: count it (an overestimate is safe).
            _ => {
                *groups.last_mut().expect("never empty") += 1;
                sum += 1;
            }
        }
        max = max.max(groups.len() + sum);
    }
    max
}

/// Bounds the size of a query before anything expensive runs: the deepest expression
/// nesting (operators, calls, casts, and each subscript or field access of a chain such as
/// `a[1:1][1:1]`, which the planner turns into nested calls, counted as several levels)
/// and the number of expression nodes. Planning time grows faster than linearly with both (a 300-subscript chain of 6 KB
/// planned for 16 s, a 1999-term sum for 11-19 s), so this check is what keeps one short
/// query from holding a planner thread. SQL that does not parse passes: planning reports
/// its syntax error.
pub fn check_size(sql: &str, max_depth: usize, max_nodes: usize) -> Result<()> {
    // Levels one subscript or field access counts for: planning a chain of them costs far
    // more per level than an operator chain (debug build: 127 chained slices 1.9 s, a
    // 255-term sum 0.26 s), and real queries chain a few at most.
    const SUBSCRIPT_WEIGHT: usize = 8;

    use datafusion::sql::sqlparser::ast::{Visit, Visitor};

    #[derive(Default)]
    struct Size {
        depth: usize,
        deepest: usize,
        nodes: usize,
        weights: Vec<usize>,
        max_depth: usize,
        max_nodes: usize,
    }
    impl Visitor for Size {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &SqlExpr) -> ControlFlow<()> {
            let weight = match expr {
                SqlExpr::CompoundFieldAccess { access_chain, .. } => {
                    1 + SUBSCRIPT_WEIGHT * access_chain.len()
                }
                _ => 1,
            };
            self.weights.push(weight);
            self.depth += weight;
            self.nodes += weight;
            self.deepest = self.deepest.max(self.depth);
            if self.deepest > self.max_depth || self.nodes > self.max_nodes {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
        fn post_visit_expr(&mut self, _: &SqlExpr) -> ControlFlow<()> {
            self.depth -= self.weights.pop().unwrap_or(0);
            ControlFlow::Continue(())
        }
    }

    let Ok(Checked::Query(stmt) | Checked::Explain(stmt)) = parse(sql, 50) else {
        return Ok(());
    };
    let mut size = Size {
        max_depth,
        max_nodes,
        ..Default::default()
    };
    let inner = match &stmt {
        DFStatement::Statement(s) => Some(s.as_ref()),
        DFStatement::Explain(e) => match e.statement.as_ref() {
            DFStatement::Statement(s) => Some(s.as_ref()),
            _ => None,
        },
        _ => None,
    };
    if let Some(s) = inner {
        let _ = s.visit(&mut size);
    }
    if size.deepest > max_depth {
        return Err(Error::Query(format!(
            "query too complex: expressions nest more than {max_depth} levels deep \
             (limits.max_expression_depth)"
        )));
    }
    if size.nodes > max_nodes {
        return Err(Error::Query(format!(
            "query too complex: more than {max_nodes} expression nodes \
             (limits.max_expression_nodes)"
        )));
    }
    Ok(())
}

fn not_allowed(statement_text: &str) -> Error {
    let kind: Vec<&str> = statement_text.split_whitespace().take(2).collect();
    let kind = kind.join(" ").to_ascii_uppercase();
    Refusal::new(
        ReasonCode::StatementNotAllowed,
        format!("only queries (SELECT, WITH, VALUES) may run; {kind} ... is not allowed"),
    )
    .into()
}

/// Rewrites `?` placeholders to `$1`, `$2`, ... in the order they appear.
fn number_placeholders(stmt: &mut DFStatement) {
    let DFStatement::Statement(s) = stmt else {
        return;
    };
    let mut n = 0;
    let _ = visit_expressions_mut(s.as_mut(), |expr| {
        if let SqlExpr::Value(v) = expr
            && let Value::Placeholder(p) = &mut v.value
            && p == "?"
        {
            n += 1;
            *p = format!("${n}");
        }
        ControlFlow::<()>::Continue(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sql: &str) -> bool {
        matches!(parse(sql, 50), Err(Error::Refused(r)) if r.code == ReasonCode::StatementNotAllowed)
    }

    #[test]
    fn only_queries_pass() {
        for sql in [
            "SELECT 1",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "VALUES (1), (2)",
            "select * from (values (1)) t",
        ] {
            assert!(matches!(parse(sql, 50), Ok(Checked::Query(_))), "{sql}");
        }
        for sql in [
            "CREATE TABLE t (a INT)",
            "CREATE VIEW v AS SELECT 1",
            "DROP TABLE hospital.patients",
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "DELETE FROM t",
            "COPY (SELECT 1) TO '/tmp/x.csv'",
            "SET datafusion.execution.batch_size = 1",
            "RESET datafusion.execution.batch_size",
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
            "CREATE FUNCTION f(a INT) RETURNS INT RETURN a",
            "BEGIN",
            "EXPLAIN INSERT INTO t VALUES (1)",
            "PREPARE p AS SELECT 1",
            "SHOW TABLES",
        ] {
            assert!(
                refused(sql),
                "{sql} should be refused: {:?}",
                parse(sql, 50)
            );
        }
    }

    #[test]
    fn explain_is_separated() {
        assert!(matches!(
            parse("EXPLAIN SELECT 1", 50),
            Ok(Checked::Explain(_))
        ));
        assert!(matches!(
            parse("EXPLAIN ANALYZE SELECT 1", 50),
            Ok(Checked::Explain(_))
        ));
    }

    #[test]
    fn several_statements_are_refused() {
        assert!(matches!(
            parse("SELECT 1; SELECT 2", 50),
            Err(Error::Query(_))
        ));
    }

    #[test]
    fn question_marks_are_numbered() {
        let Checked::Query(s) = parse("SELECT ? + 1 WHERE ? > 2", 50).unwrap() else {
            panic!()
        };
        assert_eq!(s.to_string(), "SELECT $1 + 1 WHERE $2 > 2");
    }

    #[test]
    fn operator_chains_are_bounded() {
        let chain = format!("SELECT {}", vec!["a"; 5_000].join(" + "));
        assert!(matches!(parse(&chain, 50), Err(Error::Query(m)) if m.contains("too deep")));
        let casts = format!("SELECT 1{}", "::int".repeat(3_000));
        assert!(matches!(parse(&casts, 50), Err(Error::Query(_))));
        // Long flat lists are fine.
        let list = format!(
            "SELECT 1 WHERE 1 IN ({})",
            (0..10_000)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert!(parse(&list, 50).is_ok());
        let ors = format!(
            "SELECT 1 WHERE {}",
            (0..500)
                .map(|i| format!("a = {i}"))
                .collect::<Vec<_>>()
                .join(" OR ")
        );
        assert!(parse(&ors, 50).is_ok());
    }

    #[test]
    fn size_is_bounded_before_planning() {
        let slices = format!("SELECT make_array(1){}", "[1:1]".repeat(300));
        let err = check_size(&slices, 128, 10_000).unwrap_err().to_string();
        assert!(err.contains("nest more than 128"), "{err}");
        let sum = format!("SELECT {}", vec!["1"; 1999].join("+"));
        assert!(check_size(&sum, 128, 10_000).is_err());
        let list = format!(
            "SELECT 1 WHERE 1 IN ({})",
            (0..20_000)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let err = check_size(&list, 128, 10_000).unwrap_err().to_string();
        assert!(err.contains("expression nodes"), "{err}");
        assert!(check_size("SELECT a + b * 2 FROM t WHERE c IN (1, 2, 3)", 128, 10_000).is_ok());
        assert!(
            check_size("SELEKT", 128, 10_000).is_ok(),
            "left to planning"
        );
    }

    #[test]
    fn deep_nesting_is_a_clean_error() {
        let sql = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
        assert!(matches!(parse(&sql, 50), Err(Error::Query(_))));
    }
}
