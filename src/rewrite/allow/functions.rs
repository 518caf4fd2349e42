//! The scalar functions that may stand below a release boundary (PRIVACY.md §3.2.1), and
//! why each is total.
//!
//! This table is the whole list: a function that is not here is refused below the
//! boundary (`FUNCTION_NOT_ALLOWED`), however harmless it looks. Each entry says how the
//! function behaves on every input, NULL included:
//!
//! - [`Totality::Total`]: DataFusion's implementation returns a value (possibly NULL) for
//!   every input of the types its signature accepts; the `why` says why.
//! - [`Totality::Guarded`]: the function can fail on some inputs (the `why` says which);
//!   below the boundary it runs inside [`super::super::total::Guard`], which turns a
//!   failure on a row into NULL for that row, so no error can depend on a protected value.
//!
//! [`Shape::Conditional`] marks functions that choose between their arguments (COALESCE,
//! NULLIF, ...): CASE in disguise, but with branches decided by NULLs and comparisons of
//! values, which the boundary cannot count as it counts CASE's. In filters and group keys
//! they are ordinary total functions; inside an aggregate argument they are refused.
//!
//! Some functions need some arguments to be literals ([`FunctionRule::literal_args`]):
//! a pattern, a unit, a format. A literal chosen by the analyst is not protected data,
//! while a column there would let one row's value decide how another is computed.
//!
//! [`Size`] says how long a string result can be: most results are no longer than their
//! inputs; the few functions that can make longer ones are held to the limits of
//! [`super::sizes`], so the analyst cannot choose how much work a hidden row costs.

/// Whether a function can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Totality {
    /// Never raises an error.
    Total,
    /// May raise an error on some inputs: runs guarded (NULL on failure).
    Guarded,
}

/// Whether a function computes from its arguments or chooses among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Computes a value from its arguments.
    Computed,
    /// Returns one of its arguments depending on a condition (CASE in disguise).
    Conditional,
}

/// How long a function's result can be (limits in [`super::sizes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// No longer than its arguments together, or of a fixed size (a number, a date, a
    /// hash): nothing to count.
    Bounded,
    /// Its arguments joined: literal text and computed operands count towards the
    /// query's [`super::sizes::Growth`].
    Joins,
    /// As many characters as the literal length argument at this position says.
    Pads(usize),
    /// Replaces the literal at `.0` by the literal at `.1`, as whole strings.
    Replaces(usize, usize),
    /// Maps the characters of the literal at `.0` to those of the literal at `.1`.
    Translates(usize, usize),
}

/// One allowed function.
#[derive(Debug, Clone, Copy)]
pub struct FunctionRule {
    /// DataFusion's name of the function (aliases resolve to it).
    pub name: &'static str,
    pub totality: Totality,
    pub shape: Shape,
    /// Argument positions that must be literals (or parameters).
    pub literal_args: &'static [usize],
    pub size: Size,
    /// Why the function is total, or what the guard catches.
    pub why: &'static str,
}

const fn total(name: &'static str, why: &'static str) -> FunctionRule {
    FunctionRule {
        name,
        totality: Totality::Total,
        shape: Shape::Computed,
        literal_args: &[],
        size: Size::Bounded,
        why,
    }
}

const fn guarded(name: &'static str, why: &'static str) -> FunctionRule {
    FunctionRule {
        name,
        totality: Totality::Guarded,
        shape: Shape::Computed,
        literal_args: &[],
        size: Size::Bounded,
        why,
    }
}

const fn conditional(name: &'static str, why: &'static str) -> FunctionRule {
    FunctionRule {
        name,
        totality: Totality::Total,
        shape: Shape::Conditional,
        literal_args: &[],
        size: Size::Bounded,
        why,
    }
}

const fn literal(mut rule: FunctionRule, positions: &'static [usize]) -> FunctionRule {
    rule.literal_args = positions;
    rule
}

const fn sized(mut rule: FunctionRule, size: Size) -> FunctionRule {
    rule.size = size;
    rule
}

/// The allow-list. Sorted by kind, then name.
pub const FUNCTIONS: &[FunctionRule] = &[
    // Strings.
    total("lower", "maps every string to a string, NULL to NULL"),
    total("upper", "maps every string to a string, NULL to NULL"),
    total("initcap", "maps every string to a string, NULL to NULL"),
    total(
        "btrim",
        "removes characters; every string has a (possibly empty) result",
    ),
    total(
        "ltrim",
        "removes characters; every string has a (possibly empty) result",
    ),
    total(
        "rtrim",
        "removes characters; every string has a (possibly empty) result",
    ),
    total("character_length", "every string has a length"),
    total("octet_length", "every string has a byte length"),
    total("bit_length", "every string has a bit length"),
    sized(
        total("concat", "joins strings; NULL arguments are skipped"),
        Size::Joins,
    ),
    sized(
        literal(
            total(
                "concat_ws",
                "joins strings with a literal separator; NULL arguments are skipped",
            ),
            &[0],
        ),
        Size::Joins,
    ),
    total("reverse", "every string has a reverse"),
    total("starts_with", "a comparison of prefixes, NULL on NULL"),
    total("ends_with", "a comparison of suffixes, NULL on NULL"),
    total("strpos", "a position or 0, NULL on NULL"),
    literal(
        guarded(
            "substr",
            "fails on a negative length; positions and length must be literals",
        ),
        &[1, 2],
    ),
    literal(
        guarded(
            "left",
            "takes a literal number of characters; guarded for huge counts",
        ),
        &[1],
    ),
    literal(
        guarded(
            "right",
            "takes a literal number of characters; guarded for huge counts",
        ),
        &[1],
    ),
    sized(
        literal(
            total(
                "replace",
                "replaces a literal substring by one no longer; every string has a result",
            ),
            &[1, 2],
        ),
        Size::Replaces(1, 2),
    ),
    literal(
        guarded(
            "split_part",
            "fails on a zero field position; delimiter and position must be literals",
        ),
        &[1, 2],
    ),
    sized(
        literal(
            guarded(
                "lpad",
                "pads or cuts to a literal length of at most 1,000 characters; guarded",
            ),
            &[1, 2],
        ),
        Size::Pads(1),
    ),
    sized(
        literal(
            guarded(
                "rpad",
                "pads or cuts to a literal length of at most 1,000 characters; guarded",
            ),
            &[1, 2],
        ),
        Size::Pads(1),
    ),
    sized(
        literal(
            total(
                "translate",
                "maps characters through literal lists, each to one no longer",
            ),
            &[1, 2],
        ),
        Size::Translates(1, 2),
    ),
    total("md5", "hashes every string"),
    total("sha256", "hashes every string or binary value"),
    // Numbers. Integer +, -, * wrap in DataFusion (they never raise); / and % are
    // operators, made total by the guard (see total.rs). DataFusion's math kernels raise
    // on some inputs (sqrt of a negative number, the smallest integer's abs, an integer
    // power that overflows) and the property test (tests/integration/totality.rs) found
    // the first of these: every math function runs guarded.
    guarded(
        "abs",
        "fails on the smallest integer of its type (no positive counterpart)",
    ),
    guarded(
        "ceil",
        "rounds every float; guarded for decimal and integer inputs",
    ),
    guarded(
        "floor",
        "rounds every float; guarded for decimal and integer inputs",
    ),
    literal(
        guarded(
            "round",
            "rounds to a literal number of digits; fails on extreme digit counts",
        ),
        &[1],
    ),
    literal(
        guarded(
            "trunc",
            "truncates to a literal number of digits; fails on extreme digit counts",
        ),
        &[1],
    ),
    guarded(
        "signum",
        "-1, 0 or 1 for floats; guarded for the other numeric types",
    ),
    guarded("sqrt", "fails on a negative number in DataFusion 55"),
    guarded(
        "cbrt",
        "defined for every float; guarded for the other numeric types",
    ),
    guarded(
        "exp",
        "infinity on overflow for floats; guarded for decimals",
    ),
    guarded("ln", "may fail outside its domain"),
    guarded("log2", "may fail outside its domain"),
    guarded("log10", "may fail outside its domain"),
    guarded(
        "power",
        "integer powers fail on overflow or negative exponents",
    ),
    guarded(
        "isnan",
        "a test on every float; guarded for the other numeric types",
    ),
    guarded("iszero", "a test on every number; guarded for decimals"),
    guarded(
        "sin",
        "defined for every float; guarded for the other numeric types",
    ),
    guarded(
        "cos",
        "defined for every float; guarded for the other numeric types",
    ),
    guarded(
        "tan",
        "defined for every float; guarded for the other numeric types",
    ),
    guarded(
        "degrees",
        "scales every float; guarded for the other numeric types",
    ),
    guarded(
        "radians",
        "scales every float; guarded for the other numeric types",
    ),
    // Dates and times.
    literal(
        guarded(
            "date_trunc",
            "a literal unit; fails on timestamps at the ends of the nanosecond range, so guarded",
        ),
        &[0],
    ),
    literal(
        guarded(
            "date_part",
            "a literal part; guarded for parts a type does not have",
        ),
        &[0],
    ),
    // Choosing among arguments: CASE in disguise.
    conditional("coalesce", "the first non-NULL argument"),
    conditional(
        "nullif",
        "NULL when both arguments are equal, else the first",
    ),
    conditional("nvl", "the second argument when the first is NULL"),
    conditional(
        "nvl2",
        "the second or third argument depending on the first's NULL-ness",
    ),
    conditional("greatest", "the largest argument, NULLs skipped"),
    conditional("least", "the smallest argument, NULLs skipped"),
];

/// The rule of a function, by DataFusion's name.
pub fn rule(name: &str) -> Option<&'static FunctionRule> {
    FUNCTIONS.iter().find(|f| f.name == name)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use datafusion::execution::SessionStateDefaults;

    use super::*;

    #[test]
    fn every_entry_is_a_datafusion_function() {
        let names: BTreeSet<String> = SessionStateDefaults::default_scalar_functions()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        for f in FUNCTIONS {
            assert!(
                names.contains(f.name),
                "{} is not a default function",
                f.name
            );
        }
    }

    #[test]
    fn entries_are_unique_and_explained() {
        let mut seen = BTreeSet::new();
        for f in FUNCTIONS {
            assert!(seen.insert(f.name), "{} listed twice", f.name);
            assert!(f.why.len() > 10, "{} needs a reason", f.name);
        }
    }

    #[test]
    fn every_other_default_function_is_refused() {
        // The functions that can fail or leak and are deliberately absent.
        for name in [
            "arrow_cast",
            "make_date",
            "to_date",
            "to_timestamp",
            "regexp_replace",
            "random",
            "uuid",
            "chr",
            "factorial",
            "gcd",
            "repeat",
            "get_field",
            "to_char",
            "from_unixtime",
        ] {
            assert!(rule(name).is_none(), "{name} must not be allowed");
        }
        let allowed: BTreeSet<&str> = FUNCTIONS.iter().map(|f| f.name).collect();
        let refused = SessionStateDefaults::default_scalar_functions()
            .iter()
            .filter(|f| !allowed.contains(f.name()))
            .count();
        assert!(refused > 100, "most default functions are off the list");
    }
}
