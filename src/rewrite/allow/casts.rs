//! Casts that cannot fail (PRIVACY.md §3.2.1).
//!
//! A cast not in this table can fail on some value (a string that is not a number, a
//! number too large for the target): below a release boundary it becomes `TRY_CAST`,
//! which yields NULL where the cast would fail, so no error depends on a protected value.
//!
//! [`is_widening`] is narrower: the casts that keep a value's identity (every value maps
//! to a distinct value of a wider type). Such a cast is what type coercion puts on a join
//! key or an aggregate argument (`sum(int_col)` sums `CAST(int_col AS BIGINT)`), and it
//! does not count as "a cast inside an aggregate".

use datafusion::arrow::datatypes::DataType;

/// Whether `CAST(x AS to)` succeeds for every `x` of type `from`.
pub fn is_total(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    if from == to || is_widening(from, to) {
        return true;
    }
    match (from, to) {
        // NULL casts to anything.
        (Null, _) => true,
        // Every value has a text form.
        (
            Boolean | Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 | Float16
            | Float32 | Float64 | Decimal128(..) | Decimal256(..) | Date32 | Date64 | Utf8
            | LargeUtf8 | Utf8View,
            Utf8 | LargeUtf8 | Utf8View,
        ) => true,
        // Every integer and decimal has a (possibly rounded) double; every float has a
        // double; booleans are 0 or 1.
        (
            Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 | Float16 | Float32
            | Decimal128(..),
            Float64,
        ) => true,
        (Boolean, Int8 | Int16 | Int32 | Int64 | Float32 | Float64) => true,
        _ => false,
    }
}

/// Whether the cast maps every value of `from` to a distinct, equal value of `to`.
pub fn is_widening(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    if from == to {
        return true;
    }
    match (from, to) {
        (Int8, Int16 | Int32 | Int64) | (Int16, Int32 | Int64) | (Int32, Int64) => true,
        (UInt8, UInt16 | UInt32 | UInt64 | Int16 | Int32 | Int64) => true,
        (UInt16, UInt32 | UInt64 | Int32 | Int64) | (UInt32, UInt64 | Int64) => true,
        // Integers up to 2^53 are exact doubles.
        (Int8 | Int16 | Int32 | UInt8 | UInt16 | UInt32, Float64) => true,
        (Float16, Float32 | Float64) | (Float32, Float64) => true,
        (Utf8, LargeUtf8 | Utf8View) | (Utf8View, Utf8 | LargeUtf8) | (LargeUtf8, Utf8View) => true,
        // A decimal fits a decimal with at least as many digits on both sides of the point.
        (Decimal128(p1, s1), Decimal128(p2, s2)) => {
            let (p1, s1, p2, s2) = (*p1 as i16, *s1 as i16, *p2 as i16, *s2 as i16);
            s2 >= s1 && p2 - s2 >= p1 - s1
        }
        // An integer fits a decimal with enough integer digits.
        (Int8 | Int16 | Int32 | Int64, Decimal128(p, s)) => {
            let digits = match from {
                Int8 => 3,
                Int16 => 5,
                Int32 => 10,
                _ => 19,
            };
            (*p as i16 - *s as i16) >= digits
        }
        (Date32, Date64) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{ArrayRef, Int64Array, StringArray};
    use datafusion::arrow::compute::{CastOptions, cast_with_options};
    use std::sync::Arc;

    use super::*;

    fn strict() -> CastOptions<'static> {
        CastOptions {
            safe: false,
            ..Default::default()
        }
    }

    #[test]
    fn listed_casts_succeed_on_extremes() {
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![Some(i64::MIN), Some(i64::MAX), None]));
        for to in [
            DataType::Utf8,
            DataType::Float64,
            DataType::Decimal128(20, 0),
        ] {
            assert!(is_total(&DataType::Int64, &to));
            cast_with_options(&ints, &to, &strict()).unwrap();
        }
    }

    #[test]
    fn failing_casts_are_not_listed() {
        let strings: ArrayRef = Arc::new(StringArray::from(vec!["1", "x", ""]));
        assert!(!is_total(&DataType::Utf8, &DataType::Int64));
        assert!(cast_with_options(&strings, &DataType::Int64, &strict()).is_err());
        assert!(!is_total(&DataType::Int64, &DataType::Int32));
        assert!(!is_total(&DataType::Float64, &DataType::Int64));
        assert!(!is_total(&DataType::Int64, &DataType::Decimal128(10, 2)));
    }

    #[test]
    fn a_boolean_to_double_cast_is_total_but_not_widening() {
        assert!(is_total(&DataType::Boolean, &DataType::Float64));
        assert!(!is_widening(&DataType::Boolean, &DataType::Float64));
    }
}
