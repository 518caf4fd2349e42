//! A grammar of SELECT statements over the demo hospital, generated with `arbitrary`.
//!
//! Raw bytes rarely parse, let alone bind to the demo's columns, so the fuzzer would
//! spend its time in the SQL parser. This grammar is typed: every expression is built for
//! the type its place wants (a number, a string, a date or a condition) from the columns
//! in scope, so most statements plan and reach the privacy analyzer, the optimizer and
//! the verifier. It covers what the analyst can write and what the contract refuses:
//! aggregates and their arguments, casts that can fail, functions that may error on one
//! value, windows, joins on and off the privacy unit, subqueries in FROM and WHERE, set
//! operations, ORDER BY and LIMIT. [`Statement::Raw`] keeps some inputs free-form for the
//! parser itself.

// Variant names mirror SQL (`CastNum`, `ArrayAgg`), not the enum they are in.
#![allow(clippy::enum_variant_names)]

use std::fmt::Write;

use arbitrary::Arbitrary;

/// The deepest an expression may nest; deeper shapes render as a column or a literal.
const MAX_DEPTH: usize = 6;

#[derive(Arbitrary, Debug)]
pub enum Statement {
    Query(Query),
    Raw(String),
}

impl Statement {
    pub fn to_sql(&self) -> String {
        match self {
            Statement::Query(q) => q.render(0).0,
            Statement::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Num,
    Str,
    Date,
}

/// The demo's tables as the analyst sees them: name, alias and typed columns.
const PATIENTS: (&str, &str, &[(&str, Ty)]) = (
    "hospital.patients",
    "p",
    &[
        ("patient_id", Ty::Num),
        ("name", Ty::Str),
        ("ssn", Ty::Str),
        ("age", Ty::Num),
        ("sex", Ty::Str),
        ("zip", Ty::Str),
        ("ward", Ty::Str),
        ("diagnosis", Ty::Str),
        ("admitted", Ty::Date),
        ("length_of_stay", Ty::Num),
        ("cost", Ty::Num),
    ],
);
const VISITS: (&str, &str, &[(&str, Ty)]) = (
    "hospital.visits",
    "v",
    &[
        ("visit_id", Ty::Num),
        ("patient_id", Ty::Num),
        ("visit_date", Ty::Date),
        ("department", Ty::Str),
        ("cost", Ty::Num),
    ],
);
const CLAIMS: (&str, &str, &[(&str, Ty)]) = (
    "hospital.claims",
    "c",
    &[
        ("claim_id", Ty::Num),
        ("patient_id", Ty::Num),
        ("claim_date", Ty::Date),
        ("kind", Ty::Str),
        ("amount", Ty::Num),
    ],
);
const STAFF: (&str, &str, &[(&str, Ty)]) = (
    "hospital.staff",
    "s",
    &[
        ("staff_id", Ty::Num),
        ("name", Ty::Str),
        ("ward", Ty::Str),
        ("salary", Ty::Num),
    ],
);

/// The columns a query can name: qualified names with their types.
#[derive(Debug, Default, Clone)]
struct Scope {
    columns: Vec<(String, Ty)>,
}

impl Scope {
    fn add(&mut self, (_, alias, cols): (&str, &str, &[(&str, Ty)])) {
        self.columns
            .extend(cols.iter().map(|(c, t)| (format!("{alias}.{c}"), *t)));
    }

    fn pick(&self, ty: Ty, i: u8) -> Option<&str> {
        let of: Vec<&str> = self
            .columns
            .iter()
            .filter(|(_, t)| *t == ty)
            .map(|(c, _)| c.as_str())
            .collect();
        (!of.is_empty()).then(|| of[i as usize % of.len()])
    }
}

#[derive(Arbitrary, Debug)]
pub enum Source {
    Patients,
    Visits,
    Claims,
    Staff,
    /// Joined on the privacy unit.
    PatientsVisits,
    PatientsClaims,
    LeftPatientsVisits,
    /// Joined on something else than the unit.
    VisitsOnVisitId,
    PatientsStaffOnWard,
    CrossPatientsStaff,
    Subquery(Box<Query>),
}

impl Source {
    fn render(&self, depth: usize) -> (String, Scope) {
        let mut scope = Scope::default();
        let table = |t: (&str, &str, &[(&str, Ty)])| format!("{} {}", t.0, t.1);
        let sql = match self {
            Source::Patients => {
                scope.add(PATIENTS);
                table(PATIENTS)
            }
            Source::Visits => {
                scope.add(VISITS);
                table(VISITS)
            }
            Source::Claims => {
                scope.add(CLAIMS);
                table(CLAIMS)
            }
            Source::Staff => {
                scope.add(STAFF);
                table(STAFF)
            }
            Source::PatientsVisits | Source::LeftPatientsVisits => {
                scope.add(PATIENTS);
                scope.add(VISITS);
                let kind = if matches!(self, Source::LeftPatientsVisits) {
                    "LEFT JOIN"
                } else {
                    "JOIN"
                };
                format!(
                    "{} {kind} {} ON p.patient_id = v.patient_id",
                    table(PATIENTS),
                    table(VISITS)
                )
            }
            Source::PatientsClaims => {
                scope.add(PATIENTS);
                scope.add(CLAIMS);
                format!(
                    "{} JOIN {} ON p.patient_id = c.patient_id",
                    table(PATIENTS),
                    table(CLAIMS)
                )
            }
            Source::VisitsOnVisitId => {
                scope.add(PATIENTS);
                scope.add(VISITS);
                format!(
                    "{} JOIN {} ON v.visit_id = p.patient_id",
                    table(VISITS),
                    table(PATIENTS)
                )
            }
            Source::PatientsStaffOnWard => {
                scope.add(PATIENTS);
                scope.add(STAFF);
                format!(
                    "{} JOIN {} ON p.ward = s.ward",
                    table(PATIENTS),
                    table(STAFF)
                )
            }
            Source::CrossPatientsStaff => {
                scope.add(PATIENTS);
                scope.add(STAFF);
                format!("{} CROSS JOIN {}", table(PATIENTS), table(STAFF))
            }
            Source::Subquery(q) if depth < MAX_DEPTH => {
                let (sql, columns) = q.render(depth + 1);
                scope.columns = columns
                    .into_iter()
                    .map(|(c, t)| (format!("q.{c}"), t))
                    .collect();
                format!("({sql}) q")
            }
            Source::Subquery(_) => {
                scope.add(PATIENTS);
                table(PATIENTS)
            }
        };
        (sql, scope)
    }
}

#[derive(Arbitrary, Debug)]
pub struct Query {
    from: Source,
    items: Vec<Item>,
    filter: Option<Cond>,
    group_by: Vec<Expr>,
    having: Option<(Agg, CmpOp, i16)>,
    distinct: bool,
    order_by_first: Option<bool>,
    limit: Option<u8>,
    set_op: Option<(SetOp, Box<Query>)>,
}

#[derive(Arbitrary, Debug)]
enum Item {
    /// A grouping key (or, without GROUP BY, a plain expression).
    Expr(Expr),
    Agg(Agg),
    Window(Window),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum SetOp {
    Union,
    UnionAll,
    Except,
    Intersect,
}

/// An expression of some type.
#[derive(Arbitrary, Debug)]
enum Expr {
    Num(Num),
    Str(Str),
    Date(Date),
    Cond(Cond),
}

#[derive(Arbitrary, Debug)]
enum Num {
    Col(u8),
    Int(i16),
    Float(i16, u8),
    Big,
    Arith(Box<Num>, Arith, Box<Num>),
    Neg(Box<Num>),
    Fn1(NumFn1, Box<Num>),
    Fn2(NumFn2, Box<Num>, Box<Num>),
    Length(Box<Str>),
    StrFn(StrToNum, Box<Str>),
    Part(DatePart, Box<Date>),
    CastStr(CastKind, NumType, Box<Str>),
    CastNum(CastKind, NumType, Box<Num>),
    CastCond(NumType, Box<Cond>),
    Case(Box<Cond>, Box<Num>, Box<Num>),
    Coalesce(Box<Num>, Box<Num>),
    Scalar(Box<Query>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum NumFn1 {
    Abs,
    Round,
    Floor,
    Ceil,
    Sqrt,
    Ln,
    Exp,
    Signum,
    Trunc,
    Cbrt,
    Log10,
    Factorial,
    Random,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum NumFn2 {
    Power,
    Log,
    Greatest,
    Least,
    Nullif,
    Atan2,
    Gcd,
    RoundTo,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum StrToNum {
    Ascii,
    CharLength,
    OctetLength,
    BitLength,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum CastKind {
    Cast,
    TryCast,
    Postgres,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum NumType {
    SmallInt,
    Int,
    BigInt,
    Double,
    Decimal,
    TinyInt,
}

#[derive(Arbitrary, Debug)]
enum Str {
    Col(u8),
    Lit(Word),
    Upper(Box<Str>),
    Lower(Box<Str>),
    Trim(Box<Str>),
    Reverse(Box<Str>),
    Md5(Box<Str>),
    Substr(Box<Str>, i8, i8),
    Left(Box<Str>, i8),
    Concat(Box<Str>, Box<Str>),
    Replace(Box<Str>, Word, Word),
    SplitPart(Box<Str>, Word, i8),
    Lpad(Box<Str>, i8, Word),
    Chr(Box<Num>),
    ToHex(Box<Num>),
    RegexpReplace(Box<Str>, Word, Word),
    CastNum(Box<Num>),
    CastDate(Box<Date>),
    Case(Box<Cond>, Box<Str>, Box<Str>),
    Coalesce(Box<Str>, Box<Str>),
    Nullif(Box<Str>, Box<Str>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Word {
    Empty,
    F,
    M,
    Cardiology,
    Zip,
    Percent,
    Underscore,
    Digits,
    Dot,
    Pattern,
}

impl Word {
    fn text(self) -> &'static str {
        match self {
            Word::Empty => "",
            Word::F => "F",
            Word::M => "M",
            Word::Cardiology => "cardiology",
            Word::Zip => "10001",
            Word::Percent => "%",
            Word::Underscore => "_",
            Word::Digits => "123",
            Word::Dot => ".",
            Word::Pattern => "^(a|b)+$",
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Date {
    Col(u8),
    Lit(u16),
    Trunc(DatePart, Box<Date>),
    PlusDays(Box<Date>, i16),
    CastStr(CastKind, Box<Str>),
    Case(Box<Cond>, Box<Date>, Box<Date>),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum DatePart {
    Year,
    Month,
    Day,
    Dow,
    Week,
    Quarter,
}

#[derive(Arbitrary, Debug)]
enum Cond {
    Num(Box<Num>, CmpOp, Box<Num>),
    Str(Box<Str>, CmpOp, Box<Str>),
    Date(Box<Date>, CmpOp, Box<Date>),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
    IsNull(Box<Num>),
    InList(Box<Str>, Vec<Word>),
    Between(Box<Num>, i16, i16),
    Like(Box<Str>, Word, Word),
    RegexpLike(Box<Str>, Word),
    InSubquery(Box<Num>, Box<Query>),
    Exists(Box<Query>),
    Bool(bool),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Distinct,
}

#[derive(Arbitrary, Debug)]
enum Agg {
    CountStar,
    Count(Expr),
    CountDistinct(Expr),
    Sum(Num),
    Avg(Num),
    Min(Expr),
    Max(Expr),
    Stddev(Num),
    Median(Num),
    ApproxDistinct(Str),
    BoolAnd(Cond),
    ArrayAgg(Str),
    StringAgg(Str),
    Filtered(Box<Agg>, Cond),
}

#[derive(Arbitrary, Debug)]
enum Window {
    RowNumber(Str, Num),
    Rank(Str, Num),
    Lag(Num, Num),
    RunningSum(Num, Str, Num),
    CountOver(Str),
}

fn nest<T>(depth: usize, boxed: &T, f: impl FnOnce(&T) -> String, leaf: &str) -> String {
    if depth >= MAX_DEPTH {
        leaf.to_string()
    } else {
        f(boxed)
    }
}

impl Query {
    /// The statement's text and its output columns (`c0`, `c1`, ...) with their types.
    fn render(&self, depth: usize) -> (String, Vec<(String, Ty)>) {
        let (from, scope) = self.from.render(depth);
        let r = Renderer {
            scope: &scope,
            depth,
        };
        let grouped =
            !self.group_by.is_empty() || self.items.iter().any(|i| matches!(i, Item::Agg(_)));
        let keys: Vec<(String, Ty)> = self.group_by.iter().take(3).map(|e| r.expr(e)).collect();
        let mut select = Vec::new();
        let mut columns = Vec::new();
        for (i, item) in self.items.iter().take(4).enumerate() {
            let (sql, ty) = match item {
                Item::Expr(e) if grouped => match keys.get(i % keys.len().max(1)) {
                    Some(k) => k.clone(),
                    None => {
                        let (sql, ty) = r.expr(e);
                        (format!("min({sql})"), ty)
                    }
                },
                Item::Expr(e) => r.expr(e),
                Item::Agg(a) => r.agg(a),
                Item::Window(w) if !grouped => r.window(w),
                Item::Window(_) => ("count(*)".into(), Ty::Num),
            };
            let name = format!("c{i}");
            select.push(format!("{sql} AS {name}"));
            columns.push((name, ty));
        }
        if select.is_empty() {
            select.push("count(*) AS c0".into());
            columns.push(("c0".into(), Ty::Num));
        }
        let mut sql = format!(
            "SELECT {}{} FROM {from}",
            if self.distinct { "DISTINCT " } else { "" },
            select.join(", ")
        );
        if let Some(c) = &self.filter {
            let _ = write!(sql, " WHERE {}", r.cond(c));
        }
        if !keys.is_empty() {
            let keys: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
            let _ = write!(sql, " GROUP BY {}", keys.join(", "));
        }
        if let Some((agg, op, n)) = &self.having {
            let _ = write!(sql, " HAVING {} {} {n}", r.agg(agg).0, op.sql());
        }
        if let Some((op, other)) = &self.set_op
            && depth < MAX_DEPTH
        {
            let (right, right_columns) = other.render(depth + 1);
            if right_columns.len() == columns.len() {
                let op = match op {
                    SetOp::Union => "UNION",
                    SetOp::UnionAll => "UNION ALL",
                    SetOp::Except => "EXCEPT",
                    SetOp::Intersect => "INTERSECT",
                };
                sql = format!("{sql} {op} {right}");
            }
        }
        if let Some(desc) = self.order_by_first {
            let _ = write!(sql, " ORDER BY 1{}", if desc { " DESC" } else { "" });
        }
        if let Some(n) = self.limit {
            let _ = write!(sql, " LIMIT {n}");
        }
        (sql, columns)
    }
}

struct Renderer<'a> {
    scope: &'a Scope,
    depth: usize,
}

impl Renderer<'_> {
    fn deeper(&self) -> Renderer<'_> {
        Renderer {
            scope: self.scope,
            depth: self.depth + 1,
        }
    }

    fn expr(&self, e: &Expr) -> (String, Ty) {
        match e {
            Expr::Num(n) => (self.num(n), Ty::Num),
            Expr::Str(s) => (self.str(s), Ty::Str),
            Expr::Date(d) => (self.date(d), Ty::Date),
            // A condition as a value: a number, so it can be summed or grouped.
            Expr::Cond(c) => (
                format!("CASE WHEN {} THEN 1 ELSE 0 END", self.cond(c)),
                Ty::Num,
            ),
        }
    }

    fn num(&self, n: &Num) -> String {
        let leaf = self.scope.pick(Ty::Num, 0).unwrap_or("1").to_string();
        if self.depth >= MAX_DEPTH {
            return leaf;
        }
        let d = self.deeper();
        match n {
            Num::Col(i) => self.scope.pick(Ty::Num, *i).unwrap_or("1").to_string(),
            Num::Int(i) => i.to_string(),
            Num::Float(i, f) => format!("{i}.{f}"),
            Num::Big => "9223372036854775807".into(),
            Num::Arith(a, op, b) => {
                let op = match op {
                    Arith::Add => "+",
                    Arith::Sub => "-",
                    Arith::Mul => "*",
                    Arith::Div => "/",
                    Arith::Mod => "%",
                };
                format!("({} {op} {})", d.num(a), d.num(b))
            }
            Num::Neg(a) => format!("(-{})", d.num(a)),
            Num::Fn1(f, a) => {
                let name = match f {
                    NumFn1::Abs => "abs",
                    NumFn1::Round => "round",
                    NumFn1::Floor => "floor",
                    NumFn1::Ceil => "ceil",
                    NumFn1::Sqrt => "sqrt",
                    NumFn1::Ln => "ln",
                    NumFn1::Exp => "exp",
                    NumFn1::Signum => "signum",
                    NumFn1::Trunc => "trunc",
                    NumFn1::Cbrt => "cbrt",
                    NumFn1::Log10 => "log10",
                    NumFn1::Factorial => "factorial",
                    NumFn1::Random => return format!("(random() * {})", d.num(a)),
                };
                format!("{name}({})", d.num(a))
            }
            Num::Fn2(f, a, b) => {
                let name = match f {
                    NumFn2::Power => "power",
                    NumFn2::Log => "log",
                    NumFn2::Greatest => "greatest",
                    NumFn2::Least => "least",
                    NumFn2::Nullif => "nullif",
                    NumFn2::Atan2 => "atan2",
                    NumFn2::Gcd => "gcd",
                    NumFn2::RoundTo => "round",
                };
                format!("{name}({}, {})", d.num(a), d.num(b))
            }
            Num::Length(s) => format!("length({})", d.str(s)),
            Num::StrFn(f, s) => {
                let name = match f {
                    StrToNum::Ascii => "ascii",
                    StrToNum::CharLength => "char_length",
                    StrToNum::OctetLength => "octet_length",
                    StrToNum::BitLength => "bit_length",
                };
                format!("{name}({})", d.str(s))
            }
            Num::Part(p, x) => format!("date_part('{}', {})", p.name(), d.date(x)),
            Num::CastStr(k, t, s) => k.render(&d.str(s), t.sql()),
            Num::CastNum(k, t, x) => k.render(&d.num(x), t.sql()),
            Num::CastCond(t, c) => format!("CAST(({}) AS {})", d.cond(c), t.sql()),
            Num::Case(c, a, b) => format!(
                "CASE WHEN {} THEN {} ELSE {} END",
                d.cond(c),
                d.num(a),
                d.num(b)
            ),
            Num::Coalesce(a, b) => format!("coalesce({}, {})", d.num(a), d.num(b)),
            Num::Scalar(q) => nest(
                self.depth,
                q.as_ref(),
                |q| {
                    let (sql, columns) = q.render(self.depth + 1);
                    match columns.first() {
                        Some((_, Ty::Num)) if columns.len() == 1 => format!("({sql})"),
                        _ => leaf.clone(),
                    }
                },
                &leaf,
            ),
        }
    }

    fn str(&self, s: &Str) -> String {
        let leaf = self.scope.pick(Ty::Str, 0).unwrap_or("'x'").to_string();
        if self.depth >= MAX_DEPTH {
            return leaf;
        }
        let d = self.deeper();
        match s {
            Str::Col(i) => self.scope.pick(Ty::Str, *i).unwrap_or("'x'").to_string(),
            Str::Lit(w) => format!("'{}'", w.text()),
            Str::Upper(a) => format!("upper({})", d.str(a)),
            Str::Lower(a) => format!("lower({})", d.str(a)),
            Str::Trim(a) => format!("trim({})", d.str(a)),
            Str::Reverse(a) => format!("reverse({})", d.str(a)),
            Str::Md5(a) => format!("md5({})", d.str(a)),
            Str::Substr(a, from, len) => format!("substr({}, {from}, {len})", d.str(a)),
            Str::Left(a, n) => format!("left({}, {n})", d.str(a)),
            Str::Concat(a, b) => format!("({} || {})", d.str(a), d.str(b)),
            Str::Replace(a, x, y) => {
                format!("replace({}, '{}', '{}')", d.str(a), x.text(), y.text())
            }
            Str::SplitPart(a, x, n) => format!("split_part({}, '{}', {n})", d.str(a), x.text()),
            Str::Lpad(a, n, w) => format!("lpad({}, {n}, '{}')", d.str(a), w.text()),
            Str::Chr(n) => format!("chr({})", d.num(n)),
            Str::ToHex(n) => format!("to_hex({})", d.num(n)),
            Str::RegexpReplace(a, x, y) => format!(
                "regexp_replace({}, '{}', '{}')",
                d.str(a),
                x.text(),
                y.text()
            ),
            Str::CastNum(n) => format!("CAST({} AS VARCHAR)", d.num(n)),
            Str::CastDate(x) => format!("CAST({} AS VARCHAR)", d.date(x)),
            Str::Case(c, a, b) => format!(
                "CASE WHEN {} THEN {} ELSE {} END",
                d.cond(c),
                d.str(a),
                d.str(b)
            ),
            Str::Coalesce(a, b) => format!("coalesce({}, {})", d.str(a), d.str(b)),
            Str::Nullif(a, b) => format!("nullif({}, {})", d.str(a), d.str(b)),
        }
    }

    fn date(&self, x: &Date) -> String {
        let leaf = self
            .scope
            .pick(Ty::Date, 0)
            .unwrap_or("DATE '2024-01-01'")
            .to_string();
        if self.depth >= MAX_DEPTH {
            return leaf;
        }
        let d = self.deeper();
        match x {
            Date::Col(i) => self
                .scope
                .pick(Ty::Date, *i)
                .unwrap_or("DATE '2024-01-01'")
                .to_string(),
            Date::Lit(n) => format!(
                "DATE '{:04}-{:02}-{:02}'",
                1990 + n % 40,
                1 + n % 12,
                1 + n % 28
            ),
            Date::Trunc(p, a) => format!("date_trunc('{}', {})", p.name(), d.date(a)),
            Date::PlusDays(a, n) => format!("({} + INTERVAL '{n} days')", d.date(a)),
            Date::CastStr(k, s) => k.render(&d.str(s), "DATE"),
            Date::Case(c, a, b) => format!(
                "CASE WHEN {} THEN {} ELSE {} END",
                d.cond(c),
                d.date(a),
                d.date(b)
            ),
        }
    }

    fn cond(&self, c: &Cond) -> String {
        if self.depth >= MAX_DEPTH {
            return "TRUE".into();
        }
        let d = self.deeper();
        match c {
            Cond::Num(a, op, b) => format!("{} {} {}", d.num(a), op.sql(), d.num(b)),
            Cond::Str(a, op, b) => format!("{} {} {}", d.str(a), op.sql(), d.str(b)),
            Cond::Date(a, op, b) => format!("{} {} {}", d.date(a), op.sql(), d.date(b)),
            Cond::And(a, b) => format!("({} AND {})", d.cond(a), d.cond(b)),
            Cond::Or(a, b) => format!("({} OR {})", d.cond(a), d.cond(b)),
            Cond::Not(a) => format!("(NOT {})", d.cond(a)),
            Cond::IsNull(a) => format!("{} IS NULL", d.num(a)),
            Cond::InList(a, words) => {
                let list: Vec<String> = words
                    .iter()
                    .take(4)
                    .map(|w| format!("'{}'", w.text()))
                    .collect();
                if list.is_empty() {
                    format!("{} IN ('F')", d.str(a))
                } else {
                    format!("{} IN ({})", d.str(a), list.join(", "))
                }
            }
            Cond::Between(a, lo, hi) => format!("{} BETWEEN {lo} AND {hi}", d.num(a)),
            Cond::Like(a, x, y) => format!("{} LIKE '{}{}'", d.str(a), x.text(), y.text()),
            Cond::RegexpLike(a, w) => format!("regexp_like({}, '{}')", d.str(a), w.text()),
            Cond::InSubquery(a, q) => {
                let (sql, columns) = q.render(self.depth + 1);
                match columns.as_slice() {
                    [(_, Ty::Num)] => format!("{} IN ({sql})", d.num(a)),
                    _ => "TRUE".into(),
                }
            }
            Cond::Exists(q) => format!("EXISTS ({})", q.render(self.depth + 1).0),
            Cond::Bool(b) => b.to_string(),
        }
    }

    fn agg(&self, a: &Agg) -> (String, Ty) {
        let d = self.deeper();
        match a {
            Agg::CountStar => ("count(*)".into(), Ty::Num),
            Agg::Count(e) => (format!("count({})", d.expr(e).0), Ty::Num),
            Agg::CountDistinct(e) => (format!("count(DISTINCT {})", d.expr(e).0), Ty::Num),
            Agg::Sum(n) => (format!("sum({})", d.num(n)), Ty::Num),
            Agg::Avg(n) => (format!("avg({})", d.num(n)), Ty::Num),
            Agg::Min(e) => {
                let (sql, ty) = d.expr(e);
                (format!("min({sql})"), ty)
            }
            Agg::Max(e) => {
                let (sql, ty) = d.expr(e);
                (format!("max({sql})"), ty)
            }
            Agg::Stddev(n) => (format!("stddev({})", d.num(n)), Ty::Num),
            Agg::Median(n) => (format!("median({})", d.num(n)), Ty::Num),
            Agg::ApproxDistinct(s) => (format!("approx_distinct({})", d.str(s)), Ty::Num),
            Agg::BoolAnd(c) => (
                format!("CASE WHEN bool_and({}) THEN 1 ELSE 0 END", d.cond(c)),
                Ty::Num,
            ),
            Agg::ArrayAgg(s) => (
                format!("array_to_string(array_agg({}), ',')", d.str(s)),
                Ty::Str,
            ),
            Agg::StringAgg(s) => (format!("string_agg({}, ',')", d.str(s)), Ty::Str),
            Agg::Filtered(inner, c) if self.depth < MAX_DEPTH => {
                let (sql, ty) = d.agg(inner);
                (format!("{sql} FILTER (WHERE {})", d.cond(c)), ty)
            }
            Agg::Filtered(..) => ("count(*)".into(), Ty::Num),
        }
    }

    fn window(&self, w: &Window) -> (String, Ty) {
        let d = self.deeper();
        match w {
            Window::RowNumber(p, o) => (
                format!(
                    "row_number() OVER (PARTITION BY {} ORDER BY {})",
                    d.str(p),
                    d.num(o)
                ),
                Ty::Num,
            ),
            Window::Rank(p, o) => (
                format!(
                    "rank() OVER (PARTITION BY {} ORDER BY {})",
                    d.str(p),
                    d.num(o)
                ),
                Ty::Num,
            ),
            Window::Lag(x, o) => (
                format!("lag({}) OVER (ORDER BY {})", d.num(x), d.num(o)),
                Ty::Num,
            ),
            Window::RunningSum(x, p, o) => (
                format!(
                    "sum({}) OVER (PARTITION BY {} ORDER BY {})",
                    d.num(x),
                    d.str(p),
                    d.num(o)
                ),
                Ty::Num,
            ),
            Window::CountOver(p) => (
                format!("count(*) OVER (PARTITION BY {})", d.str(p)),
                Ty::Num,
            ),
        }
    }
}

impl CmpOp {
    fn sql(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Distinct => "IS DISTINCT FROM",
        }
    }
}

impl DatePart {
    fn name(self) -> &'static str {
        match self {
            DatePart::Year => "year",
            DatePart::Month => "month",
            DatePart::Day => "day",
            DatePart::Dow => "dow",
            DatePart::Week => "week",
            DatePart::Quarter => "quarter",
        }
    }
}

impl NumType {
    fn sql(self) -> &'static str {
        match self {
            NumType::SmallInt => "SMALLINT",
            NumType::Int => "INT",
            NumType::BigInt => "BIGINT",
            NumType::Double => "DOUBLE",
            NumType::Decimal => "DECIMAL(10, 2)",
            NumType::TinyInt => "TINYINT",
        }
    }
}

impl CastKind {
    fn render(self, value: &str, ty: &str) -> String {
        match self {
            CastKind::Cast => format!("CAST({value} AS {ty})"),
            CastKind::TryCast => format!("TRY_CAST({value} AS {ty})"),
            CastKind::Postgres => format!("({value})::{ty}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbitrary::Unstructured;

    /// The grammar renders something for any bytes, and mostly SQL that parses.
    #[test]
    fn renders() {
        let mut seed = 1u64;
        for _ in 0..200 {
            let bytes: Vec<u8> = (0..512)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 33) as u8
                })
                .collect();
            if let Ok(s) = Statement::arbitrary(&mut Unstructured::new(&bytes)) {
                let _ = s.to_sql();
            }
        }
    }
}
