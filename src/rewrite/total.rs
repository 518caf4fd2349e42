//! Totality below the release boundary (PRIVACY.md §3.2.1): no run-time error there.
//!
//! An error that fires for one value is an oracle: `sum(1 / CAST(dx <> 'flu' AS INT))`
//! over a filter that isolates one person fails exactly when their diagnosis is 'flu'.
//! After the checker has accepted a plan, every expression below a boundary is put in a
//! total form:
//!
//! - a cast that can fail ([`casts::is_total`] says which cannot) becomes `TRY_CAST`,
//!   NULL where the cast would fail;
//! - division and modulo, whose kernels fail on a zero divisor and on the smallest
//!   integer divided by -1, run through [`Guard`]: NULL where the operation fails;
//! - functions that the allow-list marks [`Totality::Guarded`] run through [`Guard`] too;
//! - decimal `+`, `-` and `*`, whose kernels fail when a result does not fit its type
//!   (`CAST(cost AS DECIMAL(38,33)) * 70` failed for a cost over 2430: hostile round 19),
//!   run through [`Guard`] too.
//!
//! Integer `+`, `-`, `*` and negation wrap in DataFusion (they never raise), and floats
//! overflow to infinity, so they stay as they are.
//!
//! What a guard costs may not depend on which rows fail either (hostile round 22 looked
//! for it): operators run every row through one checked operation (`checked.rs`), and a
//! function whose batch fails is split in halves until the failing rows stand alone.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, new_null_array};
use datafusion::arrow::compute::concat;
use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::error::Result;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::type_coercion::binary::BinaryTypeCoercer;
use datafusion::logical_expr::{
    BinaryExpr, Cast, ColumnarValue, Expr, ExprSchemable, LogicalPlan, Operator, ReturnFieldArgs,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TryCast, Volatility,
};

use super::allow::casts;
use super::allow::functions::{self, Totality};

/// Puts every expression of `plan` that sees raw protected rows in its total form.
/// `below` says whether a node's expressions run below a boundary.
pub fn rewrite(plan: LogicalPlan, below: &dyn Fn(&LogicalPlan) -> bool) -> Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|node| {
        if !below(&node) {
            return Ok(Transformed::no(node));
        }
        let inputs: Vec<Arc<DFSchema>> = node
            .inputs()
            .iter()
            .map(|i| Arc::clone(i.schema()))
            .collect();
        let schema = match inputs.as_slice() {
            [one] => Arc::clone(one),
            [l, r] => Arc::new(l.join(r)?),
            _ => return Ok(Transformed::no(node)),
        };
        // Keep every output column's name: parents refer to them by name.
        let names = NamePreserver::new(&node);
        let rewritten = node.map_expressions(|e| {
            let saved = names.save(&e);
            total_expr(e, &schema).map(|t| t.update_data(|e| saved.restore(e)))
        })?;
        if rewritten.transformed {
            rewritten.map_data(|p| p.recompute_schema())
        } else {
            Ok(rewritten)
        }
    })
    .map(|t| t.data)
}

/// The total form of one expression over `schema`.
pub fn total_expr(e: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    e.transform_up(|e| match e {
        Expr::Cast(Cast { expr, field }) => {
            let from = expr.get_type(schema)?;
            if casts::is_total(&from, field.data_type()) {
                Ok(Transformed::no(Expr::Cast(Cast { expr, field })))
            } else {
                Ok(Transformed::yes(Expr::TryCast(TryCast { expr, field })))
            }
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(op, Operator::Divide | Operator::Modulo) =>
        {
            if safe_divisor(&right) {
                return Ok(Transformed::no(Expr::BinaryExpr(BinaryExpr {
                    left,
                    op,
                    right,
                })));
            }
            let (lt, rt) = (left.get_type(schema)?, right.get_type(schema)?);
            let udf = Guard::operator(op, &lt, &rt)?;
            Ok(Transformed::yes(udf.call(vec![*left, *right])))
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(op, Operator::Plus | Operator::Minus | Operator::Multiply) =>
        {
            let (lt, rt) = (left.get_type(schema)?, right.get_type(schema)?);
            if !(is_decimal(&lt) || is_decimal(&rt)) {
                return Ok(Transformed::no(Expr::BinaryExpr(BinaryExpr {
                    left,
                    op,
                    right,
                })));
            }
            let udf = Guard::operator(op, &lt, &rt)?;
            Ok(Transformed::yes(udf.call(vec![*left, *right])))
        }
        Expr::ScalarFunction(f)
            if functions::rule(f.func.name()).is_some_and(|r| r.totality == Totality::Guarded)
                && !is_guard(&f) =>
        {
            let udf = ScalarUDF::new_from_impl(Guard::function(Arc::clone(&f.func)));
            Ok(Transformed::yes(Expr::ScalarFunction(
                ScalarFunction::new_udf(Arc::new(udf), f.args),
            )))
        }
        other => Ok(Transformed::no(other)),
    })
}

/// Every guard a plan can hold, for a worker's function registry (`crate::cluster`): a
/// worker finds a plan's functions by name and takes their result types from the plan.
/// The operator guards' kernels do not depend on the types they were planned with.
pub fn worker_functions(defaults: &[Arc<ScalarUDF>]) -> Result<Vec<Arc<ScalarUDF>>> {
    let mut out = Vec::new();
    for op in [Operator::Divide, Operator::Modulo] {
        out.push(Arc::new(Guard::operator(
            op,
            &DataType::Int64,
            &DataType::Int64,
        )?));
    }
    let decimal = DataType::Decimal128(38, 10);
    for op in [Operator::Plus, Operator::Minus, Operator::Multiply] {
        out.push(Arc::new(Guard::operator(op, &decimal, &decimal)?));
    }
    out.extend(
        defaults
            .iter()
            .filter(|f| functions::rule(f.name()).is_some_and(|r| r.totality == Totality::Guarded))
            .map(|f| Arc::new(ScalarUDF::new_from_impl(Guard::function(Arc::clone(f))))),
    );
    Ok(out)
}

/// A literal divisor that no dividend can fail on: not zero, not -1, not NULL.
fn safe_divisor(e: &Expr) -> bool {
    let Expr::Literal(v, _) = e else { return false };
    let as_f64 = match v {
        ScalarValue::Float32(Some(x)) => *x as f64,
        ScalarValue::Float64(Some(x)) => *x,
        ScalarValue::Int8(Some(x)) => *x as f64,
        ScalarValue::Int16(Some(x)) => *x as f64,
        ScalarValue::Int32(Some(x)) => *x as f64,
        ScalarValue::Int64(Some(x)) => *x as f64,
        ScalarValue::UInt8(Some(x)) => *x as f64,
        ScalarValue::UInt16(Some(x)) => *x as f64,
        ScalarValue::UInt32(Some(x)) => *x as f64,
        ScalarValue::UInt64(Some(x)) => *x as f64,
        _ => return false,
    };
    as_f64 != 0.0 && as_f64 != -1.0
}

fn is_decimal(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Decimal32(..)
            | DataType::Decimal64(..)
            | DataType::Decimal128(..)
            | DataType::Decimal256(..)
    )
}

fn is_guard(f: &ScalarFunction) -> bool {
    f.func.inner().as_ref().downcast_ref::<Guard>().is_some()
}

/// What a guard runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Guarded {
    Operator { op: Operator, result: DataType },
    Function(Arc<ScalarUDF>),
}

/// Runs an operator or a function; where it fails on a row, that row is NULL.
#[derive(Debug, Clone)]
pub struct Guard {
    inner: Guarded,
    name: String,
    signature: Signature,
}

impl PartialEq for Guard {
    fn eq(&self, other: &Self) -> bool {
        self.inner == other.inner
    }
}

impl Eq for Guard {}

impl Hash for Guard {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.inner.hash(state);
    }
}

impl fmt::Display for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Guard {
    fn operator(op: Operator, left: &DataType, right: &DataType) -> Result<ScalarUDF> {
        let result = BinaryTypeCoercer::new(left, &op, right).get_result_type()?;
        let name = match op {
            Operator::Divide => "airlock_total_divide",
            Operator::Modulo => "airlock_total_modulo",
            Operator::Plus => "airlock_total_add",
            Operator::Minus => "airlock_total_subtract",
            Operator::Multiply => "airlock_total_multiply",
            other => {
                return Err(datafusion::error::DataFusionError::Internal(format!(
                    "no total form of {other}"
                )));
            }
        };
        Ok(ScalarUDF::new_from_impl(Self {
            inner: Guarded::Operator { op, result },
            name: name.to_string(),
            signature: Signature::any(2, Volatility::Immutable),
        }))
    }

    fn function(f: Arc<ScalarUDF>) -> Self {
        Self {
            name: format!("airlock_total_{}", f.name()),
            signature: f.signature().clone(),
            inner: Guarded::Function(f),
        }
    }

    fn run(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        match &self.inner {
            Guarded::Operator { op, .. } => {
                use datafusion::arrow::compute::kernels::numeric::{add, div, mul, rem, sub};
                // The checked kernels: they fail where the result does not fit, and the
                // guard makes that row NULL.
                let f = match op {
                    Operator::Divide => div,
                    Operator::Modulo => rem,
                    Operator::Plus => add,
                    Operator::Minus => sub,
                    _ => mul,
                };
                datafusion::physical_expr_common::datum::apply(&args.args[0], &args.args[1], f)
            }
            Guarded::Function(f) => f.invoke_with_args(args),
        }
    }
}

impl ScalarUDFImpl for Guard {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match &self.inner {
            Guarded::Operator { result, .. } => Ok(result.clone()),
            Guarded::Function(f) => f.return_type(arg_types),
        }
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        match &self.inner {
            Guarded::Operator { result, .. } => Ok(Arc::new(
                datafusion::arrow::datatypes::Field::new(self.name(), result.clone(), true),
            )),
            Guarded::Function(f) => {
                let field = f.return_field_from_args(args)?;
                // A failure becomes NULL: the result is nullable whatever the function says.
                Ok(Arc::new(field.as_ref().clone().with_nullable(true)))
            }
        }
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        match &self.inner {
            Guarded::Operator { .. } => Ok(arg_types.to_vec()),
            Guarded::Function(f) => f.coerce_types(arg_types),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if let Guarded::Operator { op, .. } = &self.inner
            && let Some(out) = super::checked::apply(
                *op,
                &args.args[0],
                &args.args[1],
                args.number_rows,
                args.return_field.data_type(),
            )
        {
            // Every row through the same checked operation (`checked.rs`).
            return out;
        }
        if args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)))
        {
            return self.run(args.clone()).or_else(|_| {
                Ok(ColumnarValue::Scalar(ScalarValue::try_from(
                    args.return_field.data_type(),
                )?))
            });
        }
        let rows = args.number_rows;
        self.rows(&args, 0, rows).map(ColumnarValue::Array)
    }
}

impl Guard {
    /// Rows `offset..offset + len` of `args`, NULL where the function fails. A batch
    /// that fails is split in halves until the failing rows stand alone: one failing row
    /// costs about two more passes over the batch and a call per halving, not a call per
    /// row (which made one hidden row's failure cost milliseconds per expression).
    fn rows(&self, args: &ScalarFunctionArgs, offset: usize, len: usize) -> Result<ArrayRef> {
        let part = ScalarFunctionArgs {
            args: args
                .args
                .iter()
                .map(|a| match a {
                    ColumnarValue::Array(arr) => ColumnarValue::Array(arr.slice(offset, len)),
                    scalar => scalar.clone(),
                })
                .collect(),
            arg_fields: args.arg_fields.clone(),
            number_rows: len,
            return_field: Arc::clone(&args.return_field),
            config_options: Arc::clone(&args.config_options),
        };
        let data_type = args.return_field.data_type();
        match self.run(part).and_then(|v| v.into_array(len)) {
            Ok(a) => Ok(a),
            Err(_) if len <= 1 => Ok(new_null_array(data_type, len)),
            Err(_) => {
                let half = len / 2;
                let first = self.rows(args, offset, half)?;
                let second = self.rows(args, offset + half, len - half)?;
                Ok(concat(&[first.as_ref(), second.as_ref()])?)
            }
        }
    }
}

/// Whether an expression is in total form: the verifier's check after optimization.
/// Returns the first construct that is not.
pub fn not_total(e: &Expr, schema: &DFSchema) -> Option<String> {
    let mut found = None;
    let _ = e.apply(|e| {
        let bad = match e {
            Expr::Cast(Cast { expr, field }) => match expr.get_type(schema) {
                Ok(from) => (!casts::is_total(&from, field.data_type()))
                    .then(|| format!("a cast to {} that can fail", field.data_type())),
                // Types of columns the verifier cannot resolve here are checked where they are.
                Err(_) => None,
            },
            Expr::BinaryExpr(BinaryExpr { op, right, .. })
                if matches!(op, Operator::Divide | Operator::Modulo) && !safe_divisor(right) =>
            {
                Some("a division by a value that may be zero".to_string())
            }
            Expr::ScalarFunction(f) if !is_guard(f) && super::protect::as_mask(e).is_none() => {
                match functions::rule(f.func.name()) {
                    Some(r) if r.totality == Totality::Total => None,
                    Some(_) => Some(format!("{} without its guard", f.func.name())),
                    None if f.func.name() == "struct" => None,
                    None => Some(format!(
                        "function {} that is not on the allow-list",
                        f.func.name()
                    )),
                }
            }
            _ => None,
        };
        if bad.is_some() {
            found = bad;
            return Ok(datafusion::common::tree_node::TreeNodeRecursion::Stop);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    found
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, Int64Array};
    use datafusion::common::config::ConfigOptions;

    use super::*;

    fn args(a: ArrayRef, b: ArrayRef) -> ScalarFunctionArgs {
        ScalarFunctionArgs {
            arg_fields: vec![
                Arc::new(datafusion::arrow::datatypes::Field::new(
                    "a",
                    a.data_type().clone(),
                    true,
                )),
                Arc::new(datafusion::arrow::datatypes::Field::new(
                    "b",
                    b.data_type().clone(),
                    true,
                )),
            ],
            number_rows: a.len(),
            args: vec![ColumnarValue::Array(a), ColumnarValue::Array(b)],
            return_field: Arc::new(datafusion::arrow::datatypes::Field::new(
                "r",
                DataType::Int64,
                true,
            )),
            config_options: Arc::new(ConfigOptions::default()),
        }
    }

    #[test]
    fn guarded_division_is_null_where_it_would_fail() {
        let udf = Guard::operator(Operator::Divide, &DataType::Int64, &DataType::Int64).unwrap();
        let a: ArrayRef = Arc::new(Int64Array::from(vec![
            Some(10),
            Some(i64::MIN),
            Some(7),
            None,
        ]));
        let b: ArrayRef = Arc::new(Int64Array::from(vec![Some(2), Some(-1), Some(0), Some(1)]));
        let out = udf
            .invoke_with_args(args(a, b))
            .unwrap()
            .into_array(4)
            .unwrap();
        let out = out.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(out.value(0), 5);
        assert!(out.is_null(1) && out.is_null(2) && out.is_null(3));
    }

    #[test]
    fn a_guarded_function_is_null_only_where_it_fails() {
        use datafusion::arrow::array::Int32Array;
        let make_date = datafusion::functions::datetime::make_date();
        let udf = ScalarUDF::new_from_impl(Guard::function(make_date));
        // One invalid day among 1 000 valid ones, then two more at the ends.
        let mut days: Vec<i32> = (0..1000).map(|i| 1 + i % 28).collect();
        days[613] = 40;
        days[0] = 0;
        days[999] = 99;
        let n = days.len();
        let int = |v: Vec<i32>| ColumnarValue::Array(Arc::new(Int32Array::from(v)) as ArrayRef);
        let field = |name: &str, t: DataType| {
            Arc::new(datafusion::arrow::datatypes::Field::new(name, t, true))
        };
        let out = udf
            .invoke_with_args(ScalarFunctionArgs {
                args: vec![int(vec![2000; n]), int(vec![1; n]), int(days)],
                arg_fields: vec![
                    field("y", DataType::Int32),
                    field("m", DataType::Int32),
                    field("d", DataType::Int32),
                ],
                number_rows: n,
                return_field: field("r", DataType::Date32),
                config_options: Arc::new(ConfigOptions::default()),
            })
            .unwrap()
            .into_array(n)
            .unwrap();
        assert_eq!(out.len(), n);
        let nulls: Vec<usize> = (0..n).filter(|i| out.is_null(*i)).collect();
        assert_eq!(nulls, vec![0, 613, 999]);
    }

    /// `x`, failing on any batch that holds `bad`; counts its calls.
    #[derive(Debug, PartialEq, Eq, Hash)]
    struct FailsOn {
        bad: i64,
        signature: Signature,
    }

    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    impl ScalarUDFImpl for FailsOn {
        fn name(&self) -> &str {
            "fails_on"
        }
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn return_type(&self, _: &[DataType]) -> Result<DataType> {
            Ok(DataType::Int64)
        }
        fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
            CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let a = args.args[0].clone().into_array(args.number_rows)?;
            let values = a.as_any().downcast_ref::<Int64Array>().unwrap();
            if values.iter().any(|v| v == Some(self.bad)) {
                return datafusion::common::exec_err!("fails");
            }
            Ok(ColumnarValue::Array(a))
        }
    }

    #[test]
    fn one_failing_row_costs_a_call_per_halving_not_per_row() {
        let f = Arc::new(ScalarUDF::new_from_impl(FailsOn {
            bad: -1,
            signature: Signature::any(1, Volatility::Immutable),
        }));
        let udf = ScalarUDF::new_from_impl(Guard::function(f));
        let n = 8192;
        let mut values: Vec<i64> = (0..n as i64).collect();
        values[5000] = -1;
        let field = Arc::new(datafusion::arrow::datatypes::Field::new(
            "x",
            DataType::Int64,
            true,
        ));
        CALLS.store(0, std::sync::atomic::Ordering::Relaxed);
        let out = udf
            .invoke_with_args(ScalarFunctionArgs {
                args: vec![ColumnarValue::Array(Arc::new(Int64Array::from(values)))],
                arg_fields: vec![Arc::clone(&field)],
                number_rows: n,
                return_field: field,
                config_options: Arc::new(ConfigOptions::default()),
            })
            .unwrap()
            .into_array(n)
            .unwrap();
        assert_eq!(out.null_count(), 1);
        assert!(out.is_null(5000));
        // The whole batch, then two halves per level down to the one row: 1 + 2 * 13.
        let calls = CALLS.load(std::sync::atomic::Ordering::Relaxed);
        assert!(calls <= 27, "{calls} calls");
    }

    #[test]
    fn literal_divisors() {
        assert!(safe_divisor(&datafusion::logical_expr::lit(3i64)));
        assert!(!safe_divisor(&datafusion::logical_expr::lit(0i64)));
        assert!(!safe_divisor(&datafusion::logical_expr::lit(-1i32)));
        assert!(!safe_divisor(&datafusion::logical_expr::lit(0.0f64)));
        assert!(safe_divisor(&datafusion::logical_expr::lit(2.5f64)));
    }
}
