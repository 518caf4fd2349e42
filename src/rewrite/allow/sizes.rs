//! How much work one row may cost below a release boundary (PRIVACY.md §3.2.1, §3.7).
//!
//! The rows of a withheld group are still read and computed on; only the result is held
//! back. If the analyst could choose how much work each row costs, the time a query takes
//! (or whether it runs out of room) would count the rows of groups the answer hides:
//! `length(lpad(zip, 100000000))` over a filter that matches one patient took 0.2 s more
//! than over one that matches none (hostile round 17), and with two such rows in a batch
//! the string array overflowed, an error that fired only when the filter matched. The same
//! held for a LIKE or regular-expression pattern that compiles only when a row reaches it.
//!
//! So every expression below a boundary does work bounded by its input and by a small,
//! fixed amount the query text chooses:
//!
//! | construct | rule |
//! |---|---|
//! | `LIKE` / `ILIKE` | a literal pattern, [`MAX_PATTERN_CHARS`] characters for all of a query's patterns (it compiles on every input), matched against at most one stored value and [`MAX_PATTERN_INPUT_BYTES`] of literal text |
//! | `SIMILAR TO`, `~`, `~*`, `!~`, `!~*` | not on the contract's list (§3.2): refused |
//! | `lpad`, `rpad` | an integer literal length of at most [`MAX_PAD_CHARS`] characters |
//! | `replace` | the replacement no longer (in bytes) than the text it replaces: no string grows |
//! | `translate` | each character maps to one no longer in bytes: no string grows |
//! | `concat`, `concat_ws`, `\|\|` | the query's literal text and padding, together, at most [`MAX_ADDED_BYTES`]; at most [`MAX_JOINED_OPERANDS`] computed operands joined in the whole query |
//! | every string made below a boundary | a [`Width`] of at most [`MAX_ADDED_BYTES`] of text and [`MAX_JOINED_OPERANDS`] stored values, carried through projections and subqueries (`concat(x, x)` over a subquery's `x` is twice `x`: hostile round 18 doubled a string seventeen times within the per-query counts) |
//! | a released value (a column of a subquery above its own boundary) | no function's argument: its length is whatever the analyst made it |
//! | every other allowed function | a result no longer than its inputs, or of fixed size (see [`super::functions`]) |
//!
//! With these, one string made from a row is at most its own values copied
//! [`MAX_JOINED_OPERANDS`] times plus [`MAX_ADDED_BYTES`]: a batch of 8,192 rows stays far
//! from the 2 GiB limit of a string array for any column under 3 KiB.

use datafusion::common::ScalarValue;
use datafusion::logical_expr::Expr;

/// The LIKE / ILIKE patterns of one query below its boundaries, in characters together.
/// A pattern of this length compiles well inside the regular-expression engine's size
/// limit whatever its characters (the test below compiles the worst ones through Arrow's
/// kernel), and matching costs at most pattern × input per row.
pub const MAX_PATTERN_CHARS: usize = 1_000;

/// The longest text a LIKE / ILIKE may run on, beyond one stored value: its literal
/// part, in bytes (see [`Width::fits_pattern`]).
pub const MAX_PATTERN_INPUT_BYTES: u64 = 1_024;

/// The longest result `lpad` / `rpad` may make below a boundary, in characters.
pub const MAX_PAD_CHARS: i64 = 1_000;

/// The literal text (and padding, at 4 bytes a character) that concatenations and pads in
/// one query may add to a row, in bytes.
pub const MAX_ADDED_BYTES: usize = 16 * 1024;

/// How many computed operands (columns, or functions of them) the concatenations of one
/// query may join in all.
pub const MAX_JOINED_OPERANDS: usize = 64;

/// How many calls of functions that can fail on some values (`abs`, `round`, `substr`,
/// `date_part`, ...) one query may hold below its boundaries. Where such a function fails
/// on a row, its guard splits the batch until that row stands alone (`total.rs`): a few
/// more passes over the batch, tens of microseconds, that only a failing row costs.
/// Hostile round 22 repeated a failing expression 50 times to make one hidden row's
/// failure cost 0.4 s; a handful of calls keeps that within the noise of any query.
pub const MAX_GUARDED_CALLS: usize = 16;

/// The text of a string literal (through casts and aliases), if `e` is one.
pub fn literal_text(e: &Expr) -> Option<&str> {
    match e {
        Expr::Literal(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)),
            _,
        ) => Some(s),
        Expr::Cast(c) => literal_text(&c.expr),
        Expr::TryCast(c) => literal_text(&c.expr),
        Expr::Alias(a) => literal_text(&a.expr),
        _ => None,
    }
}

/// The value of an integer literal (through casts and aliases), if `e` is one.
pub fn literal_integer(e: &Expr) -> Option<i64> {
    match e {
        Expr::Literal(v, _) => match v {
            ScalarValue::Int8(Some(n)) => Some(i64::from(*n)),
            ScalarValue::Int16(Some(n)) => Some(i64::from(*n)),
            ScalarValue::Int32(Some(n)) => Some(i64::from(*n)),
            ScalarValue::Int64(Some(n)) => Some(*n),
            ScalarValue::UInt8(Some(n)) => Some(i64::from(*n)),
            ScalarValue::UInt16(Some(n)) => Some(i64::from(*n)),
            ScalarValue::UInt32(Some(n)) => Some(i64::from(*n)),
            ScalarValue::UInt64(Some(n)) => i64::try_from(*n).ok(),
            _ => None,
        },
        Expr::Cast(c) => literal_integer(&c.expr),
        Expr::TryCast(c) => literal_integer(&c.expr),
        Expr::Alias(a) => literal_integer(&a.expr),
        _ => None,
    }
}
/// The characters of a LIKE / ILIKE pattern, if it is a literal short enough to compile
/// on every row.
pub fn pattern_chars(pattern: &Expr) -> Option<usize> {
    literal_text(pattern)
        .map(|p| p.chars().count())
        .filter(|n| *n <= MAX_PATTERN_CHARS)
}

/// The operands a concatenation joins, in the order it writes them: `concat_ws` writes
/// its separator (the first argument) once more between every two of the others.
pub fn joined<'a>(function: &str, args: &'a [Expr]) -> impl Iterator<Item = &'a Expr> {
    let separators = match function {
        "concat_ws" => args.len().saturating_sub(2),
        _ => 0,
    };
    args.iter()
        .chain(args.iter().take(1).cycle().take(separators))
}

/// The characters an `lpad` / `rpad` length argument asks for, if it is allowed.
pub fn pad_chars(length: &Expr) -> Option<i64> {
    literal_integer(length).filter(|n| *n <= MAX_PAD_CHARS)
}

/// Whether `replace(s, from, to)` can make a string longer.
pub fn replace_grows(from: &str, to: &str) -> bool {
    to.len() > from.len()
}

/// Whether `translate(s, from, to)` can make a string longer: a character of `from` is
/// replaced by the character at the same position of `to` (or deleted when `to` is
/// shorter).
pub fn translate_grows(from: &str, to: &str) -> bool {
    from.chars()
        .zip(to.chars())
        .any(|(f, t)| t.len_utf8() > f.len_utf8())
}

/// A bound on the length of a string below a boundary: `text` bytes the query wrote
/// (literals, padding) plus `copies` stored values (a column's value, the owner's data).
/// Carried through projections and subqueries, so that `concat(x, x)` over a subquery's
/// `x` is twice `x`, at every level.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Width {
    pub text: u64,
    pub copies: u64,
}

impl Width {
    /// A stored value of a catalog table (or a number, a date, a boolean).
    pub const STORED: Width = Width { text: 0, copies: 1 };
    /// A value whose length the query does not bound: a released value, which the
    /// analyst may have made as long as they like above another boundary.
    pub const UNKNOWN: Width = Width {
        text: u64::MAX / 4,
        copies: u64::MAX / 4,
    };
    /// A number, date or boolean literal: a few bytes when printed.
    pub const SCALAR: Width = Width {
        text: 40,
        copies: 0,
    };

    pub fn text(bytes: usize) -> Self {
        Width {
            text: u64::try_from(bytes).unwrap_or(u64::MAX),
            copies: 0,
        }
    }

    pub fn plus(self, other: Width) -> Width {
        Width {
            text: self.text.saturating_add(other.text),
            copies: self.copies.saturating_add(other.copies),
        }
    }

    /// Whether a string of this width may be made below a boundary.
    pub fn fits(&self) -> bool {
        self.text <= MAX_ADDED_BYTES as u64 && self.copies <= MAX_JOINED_OPERANDS as u64
    }

    /// Whether a LIKE / ILIKE may run on a string of this width: one stored value and a
    /// little literal text at most.
    pub fn fits_pattern(&self) -> bool {
        self.text <= MAX_PATTERN_INPUT_BYTES && self.copies <= 1
    }
}

/// What the concatenations and pads of one query add to a row, counted as the checker
/// meets them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Growth {
    pub added_bytes: usize,
    pub joined_operands: usize,
    /// The characters of every LIKE / ILIKE pattern.
    pub pattern_chars: usize,
    /// Calls of functions that can fail on some values (`Totality::Guarded`).
    pub guarded_calls: usize,
}

impl Growth {
    /// Counts one operand of a concatenation: literal text by its bytes, anything else
    /// as one computed operand.
    pub fn operand(&mut self, e: &Expr) {
        match literal_text(e) {
            Some(text) => self.added_bytes = self.added_bytes.saturating_add(text.len()),
            None if matches!(e, Expr::Literal(..)) => {
                // A number or date literal prints in a few bytes.
                self.added_bytes = self.added_bytes.saturating_add(64);
            }
            None => self.joined_operands += 1,
        }
    }

    /// Counts a padded result of `chars` characters (at most 4 bytes each).
    pub fn pad(&mut self, chars: i64) {
        let bytes = usize::try_from(chars.max(0)).unwrap_or(usize::MAX);
        self.added_bytes = self.added_bytes.saturating_add(bytes.saturating_mul(4));
    }

    pub fn within_limits(&self) -> bool {
        self.added_bytes <= MAX_ADDED_BYTES
            && self.joined_operands <= MAX_JOINED_OPERANDS
            && self.pattern_chars <= MAX_PATTERN_CHARS
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{BooleanArray, Scalar, StringArray};
    use datafusion::arrow::compute::kernels::comparison::{ilike, like};
    use datafusion::logical_expr::{cast, lit};

    use super::*;

    #[test]
    fn the_longest_allowed_patterns_compile_on_rows() {
        // The costliest characters for the regular expression a pattern becomes: `_` (any
        // one character, a large UTF-8 class) between `%`, and letters with many case
        // variants under ILIKE.
        let rows = StringArray::from(vec!["12183", "Kelvin K ſ", ""]);
        for unit in ["_", "%_", "k", "ſ", "\\_", "%"] {
            let pattern: String = unit.repeat(MAX_PATTERN_CHARS / unit.chars().count());
            assert!(pattern.chars().count() <= MAX_PATTERN_CHARS);
            let p = Scalar::new(StringArray::from(vec![pattern.as_str()]));
            let a: BooleanArray = like(&rows, &p).expect("LIKE compiles");
            assert_eq!(a.len(), 3);
            ilike(&rows, &p).expect("ILIKE compiles");
        }
    }

    #[test]
    fn patterns_are_literals_of_bounded_length() {
        assert_eq!(pattern_chars(&lit("PROMO%")), Some(6));
        assert!(
            pattern_chars(&cast(
                lit("a%"),
                datafusion::arrow::datatypes::DataType::Utf8View
            ))
            .is_some()
        );
        assert!(pattern_chars(&lit("_".repeat(MAX_PATTERN_CHARS))).is_some());
        assert!(pattern_chars(&lit("_".repeat(MAX_PATTERN_CHARS + 1))).is_none());
        assert!(pattern_chars(&datafusion::logical_expr::col("zip")).is_none());
    }

    #[test]
    fn pads_take_small_integer_literals() {
        assert_eq!(pad_chars(&lit(5i64)), Some(5));
        assert_eq!(pad_chars(&lit(MAX_PAD_CHARS)), Some(MAX_PAD_CHARS));
        assert_eq!(pad_chars(&lit(100_000_000i64)), None);
        assert_eq!(pad_chars(&lit(u64::MAX)), None);
        assert_eq!(pad_chars(&lit("5")), None);
        assert_eq!(pad_chars(&(lit(500i64) + lit(500i64))), None);
    }

    #[test]
    fn substitutions_that_grow_are_found() {
        assert!(!replace_grows("-", ""));
        assert!(!replace_grows("ab", "c"));
        assert!(replace_grows("", "x"));
        assert!(replace_grows("1", "0000"));
        assert!(!translate_grows("abc", "xyz"));
        assert!(!translate_grows("abc", "x"));
        assert!(!translate_grows("é", "e"));
        assert!(translate_grows("a", "€"));
    }

    #[test]
    fn widths_add_up_and_doubling_runs_out() {
        let mut w = Width::STORED.plus(Width::text(16_383));
        assert!(w.fits());
        let mut levels = 0;
        while w.fits() {
            w = w.plus(w);
            levels += 1;
        }
        assert_eq!(
            levels, 1,
            "one doubling of 16 KiB of literal text is over the limit"
        );
        let mut w = Width::STORED;
        for _ in 0..6 {
            w = w.plus(w);
        }
        assert_eq!(w.copies, 64);
        assert!(w.fits());
        assert!(!w.plus(w).fits());
        assert!(!Width::UNKNOWN.fits());
        assert!(!Width::UNKNOWN.plus(Width::UNKNOWN).fits());
        assert!(Width::STORED.fits_pattern());
        assert!(!Width::STORED.plus(Width::STORED).fits_pattern());
        assert!(!Width::STORED.plus(Width::text(2_000)).fits_pattern());
    }

    #[test]
    fn growth_counts_literals_pads_and_operands() {
        let mut g = Growth::default();
        g.operand(&lit("-"));
        g.operand(&datafusion::logical_expr::col("zip"));
        g.pad(10);
        assert_eq!(g.added_bytes, 1 + 40);
        assert_eq!(g.joined_operands, 1);
        assert!(g.within_limits());
        g.operand(&lit("x".repeat(MAX_ADDED_BYTES)));
        assert!(!g.within_limits());
        let mut g = Growth::default();
        for _ in 0..=MAX_JOINED_OPERANDS {
            g.operand(&datafusion::logical_expr::col("zip"));
        }
        assert!(!g.within_limits());
    }
}
