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

/// Parses exactly one statement and lets through only queries and EXPLAIN of a query.
pub fn parse(sql: &str, recursion_limit: usize) -> Result<Checked> {
    let dialect = GenericDialect {};
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
    fn deep_nesting_is_a_clean_error() {
        let sql = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
        assert!(matches!(parse(&sql, 50), Err(Error::Query(_))));
    }
}
