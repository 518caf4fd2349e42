"""Column expressions with polars' API, rendered to DataFusion SQL by a small typed builder.

The client mirrors polars (``col``, ``lit``, ``when/then/otherwise``, aggregates such as
``.mean()``, ``.median()``, ``.quantile(q)``, ``.n_unique()``, the ``.str`` and ``.dt``
namespaces, ...) and decides nothing about privacy: every method compiles to SQL, and the
server accepts, rewrites, sends to approval or refuses the query, with a stable reason code
(:class:`airlock.PolicyViolation`). A polars method with no SQL translation here raises
:class:`NotImplementedError` naming it.

Why a builder of our own rather than sqlglot or ibis: the server speaks one dialect
(DataFusion's), and every rendered query must be predictable enough for the data owner to
read in an approval request. A few hundred lines keep that under our control.

Naming follows polars (an expression is named after its leftmost column; ``alias``
renames), with one difference: an aggregate is named ``<column>_<method>`` (``cost_mean``,
``cost_n_unique``) so that several aggregates of one column do not collide.
"""

from __future__ import annotations

import datetime as _dt
import decimal as _decimal
import math
import re
from typing import Any, Iterable, Sequence, Union

from ._compat import missing_attribute

__all__ = ["Expr", "col", "lit", "count", "len", "when", "to_expr"]

ExprLike = Union["Expr", str, int, float, bool, None, _dt.date, _dt.datetime]

_builtin_len = len


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return f"CAST('{value!r}' AS DOUBLE)"
        return repr(value)
    if isinstance(value, _decimal.Decimal):
        return str(value)
    if isinstance(value, _dt.datetime):
        return f"TIMESTAMP '{value.isoformat(sep=' ')}'"
    if isinstance(value, _dt.date):
        return f"DATE '{value.isoformat()}'"
    if isinstance(value, _dt.timedelta):
        return f"INTERVAL '{value.total_seconds()!r} seconds'"
    if isinstance(value, Expr):
        return value.sql()
    return "'" + str(value).replace("'", "''") + "'"


def _expr(value: Any) -> "Expr":
    """An operand: expressions as they are, anything else (strings too) a literal."""
    return value if isinstance(value, Expr) else Lit(value)


def to_expr(value: Any) -> "Expr":
    """An argument that names a column: strings are column names (as in polars)."""
    return Col(value) if isinstance(value, str) else _expr(value)


# -- data types for cast() --------------------------------------------------------------
_SQL_TYPES = {
    "int8": "TINYINT", "int16": "SMALLINT", "int32": "INT", "int64": "BIGINT",
    "uint8": "TINYINT UNSIGNED", "uint16": "SMALLINT UNSIGNED", "uint32": "INT UNSIGNED",
    "uint64": "BIGINT UNSIGNED", "float32": "REAL", "float": "REAL", "float64": "DOUBLE",
    "double": "DOUBLE", "string": "VARCHAR", "utf8": "VARCHAR", "str": "VARCHAR",
    "large_string": "VARCHAR", "large_utf8": "VARCHAR", "boolean": "BOOLEAN", "bool": "BOOLEAN",
    "date": "DATE", "date32": "DATE", "date32[day]": "DATE", "datetime": "TIMESTAMP",
    "timestamp": "TIMESTAMP", "time": "TIME", "int": "BIGINT",
}
_SAFE_SQL_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_ ]*(\(\s*\d+\s*(,\s*\d+\s*)?\))?")


def _sql_type(dtype: Any) -> str:
    """A polars data type (class or instance), a pyarrow type, a Python type or a SQL
    type name, as DataFusion SQL."""
    if dtype is int:
        return "BIGINT"
    if dtype is float:
        return "DOUBLE"
    if dtype is str:
        return "VARCHAR"
    if dtype is bool:
        return "BOOLEAN"
    if dtype is _dt.date:
        return "DATE"
    if dtype is _dt.datetime:
        return "TIMESTAMP"
    if isinstance(dtype, str):
        key = dtype.strip()
        if key.lower() in _SQL_TYPES:
            return _SQL_TYPES[key.lower()]
        if _SAFE_SQL_TYPE.fullmatch(key):
            return key.upper()
        raise ValueError(f"not a data type: {dtype!r}")
    name = getattr(dtype, "__name__", None) or type(dtype).__name__
    module = getattr(dtype, "__module__", "") or type(dtype).__module__
    if module.startswith("pyarrow"):  # pa.int64() -> "int64", pa.timestamp("us") -> "timestamp[us]"
        name = str(dtype).split("[", 1)[0]
    if name.lower() == "decimal":
        precision, scale = getattr(dtype, "precision", None), getattr(dtype, "scale", None)
        if isinstance(precision, int) and isinstance(scale, int):
            return f"DECIMAL({precision}, {scale})"
        return "DECIMAL(38, 9)"
    if name.lower() in _SQL_TYPES:
        return _SQL_TYPES[name.lower()]
    raise NotImplementedError(f"cast to {dtype!r} is not supported by the Airlock client")


# -- expressions --------------------------------------------------------------------------
class Expr:
    """A column expression, as in polars. Build with :func:`col`, :func:`lit`, :func:`when`,
    operators and methods; nothing is evaluated here: :meth:`sql` is what the server gets."""

    def sql(self) -> str:
        raise NotImplementedError

    def output_name(self) -> str:
        """The column name the expression produces (polars' rules, see the module doc)."""
        return "literal"

    def __repr__(self) -> str:
        return f"<airlock.Expr {self.sql()}>"

    def __bool__(self) -> bool:
        raise TypeError(
            "the truth value of an Expr is ambiguous: use & | ~ instead of and/or/not, "
            "and .is_in() instead of `in`"
        )

    def __getattr__(self, name: str) -> Any:
        raise missing_attribute("Expr", self, name)

    __hash__ = object.__hash__

    # naming
    def alias(self, name: str) -> "Expr":
        return Alias(self, name)

    def unaliased(self) -> "Expr":
        """The expression without its alias (as GROUP BY wants it)."""
        return self

    # arithmetic
    def __add__(self, o: Any) -> "Expr":
        return BinOp("+", self, _expr(o))

    def __radd__(self, o: Any) -> "Expr":
        return BinOp("+", _expr(o), self)

    def __sub__(self, o: Any) -> "Expr":
        return BinOp("-", self, _expr(o))

    def __rsub__(self, o: Any) -> "Expr":
        return BinOp("-", _expr(o), self)

    def __mul__(self, o: Any) -> "Expr":
        return BinOp("*", self, _expr(o))

    def __rmul__(self, o: Any) -> "Expr":
        return BinOp("*", _expr(o), self)

    def __truediv__(self, o: Any) -> "Expr":
        # polars' `/` is true division; an integer literal divisor is written as a float so
        # an integer column divides as in polars (two integer columns: cast one to Float64).
        return BinOp("/", self, _true_divisor(o))

    def __rtruediv__(self, o: Any) -> "Expr":
        return BinOp("/", _true_divisor(o), self)

    def __floordiv__(self, o: Any) -> "Expr":
        return Func("floor", BinOp("/", self, _true_divisor(o)))

    def __rfloordiv__(self, o: Any) -> "Expr":
        return Func("floor", BinOp("/", _true_divisor(o), self))

    def __mod__(self, o: Any) -> "Expr":
        return BinOp("%", self, _expr(o))

    def __rmod__(self, o: Any) -> "Expr":
        return BinOp("%", _expr(o), self)

    def __pow__(self, o: Any) -> "Expr":
        return Func("power", self, _expr(o))

    def __rpow__(self, o: Any) -> "Expr":
        return Func("power", _expr(o), self)

    def __neg__(self) -> "Expr":
        return Template("(- {0})", self)

    def __pos__(self) -> "Expr":
        return self

    # polars' named forms of the operators
    def add(self, o: Any) -> "Expr":
        return self + o

    def sub(self, o: Any) -> "Expr":
        return self - o

    def mul(self, o: Any) -> "Expr":
        return self * o

    def truediv(self, o: Any) -> "Expr":
        return self / o

    def floordiv(self, o: Any) -> "Expr":
        return self // o

    def mod(self, o: Any) -> "Expr":
        return self % o

    def pow(self, o: Any) -> "Expr":
        return self**o

    def neg(self) -> "Expr":
        return -self

    # comparisons
    def __eq__(self, o: Any) -> "Expr":  # type: ignore[override]
        return BinOp("=", self, _expr(o))

    def __ne__(self, o: Any) -> "Expr":  # type: ignore[override]
        return BinOp("<>", self, _expr(o))

    def __lt__(self, o: Any) -> "Expr":
        return BinOp("<", self, _expr(o))

    def __le__(self, o: Any) -> "Expr":
        return BinOp("<=", self, _expr(o))

    def __gt__(self, o: Any) -> "Expr":
        return BinOp(">", self, _expr(o))

    def __ge__(self, o: Any) -> "Expr":
        return BinOp(">=", self, _expr(o))

    def eq(self, o: Any) -> "Expr":
        return self == o

    def ne(self, o: Any) -> "Expr":
        return self != o

    def lt(self, o: Any) -> "Expr":
        return self < o

    def le(self, o: Any) -> "Expr":
        return self <= o

    def gt(self, o: Any) -> "Expr":
        return self > o

    def ge(self, o: Any) -> "Expr":
        return self >= o

    def eq_missing(self, o: Any) -> "Expr":
        return BinOp("IS NOT DISTINCT FROM", self, _expr(o))

    def ne_missing(self, o: Any) -> "Expr":
        return BinOp("IS DISTINCT FROM", self, _expr(o))

    # boolean logic
    def __and__(self, o: Any) -> "Expr":
        return BinOp("AND", self, _expr(o))

    def __rand__(self, o: Any) -> "Expr":
        return BinOp("AND", _expr(o), self)

    def __or__(self, o: Any) -> "Expr":
        return BinOp("OR", self, _expr(o))

    def __ror__(self, o: Any) -> "Expr":
        return BinOp("OR", _expr(o), self)

    def __invert__(self) -> "Expr":
        return Template("(NOT {0})", self)

    def and_(self, *others: Any) -> "Expr":
        out: Expr = self
        for o in others:
            out = out & o
        return out

    def or_(self, *others: Any) -> "Expr":
        out: Expr = self
        for o in others:
            out = out | o
        return out

    def not_(self) -> "Expr":
        return ~self

    def is_in(self, values: Iterable[Any]) -> "Expr":
        if isinstance(values, (str, bytes)) or isinstance(values, Expr):
            raise TypeError("is_in() takes a collection of values, e.g. is_in(['A', 'B'])")
        items = [_literal(v) for v in values]
        if not items:
            return Template("({0} IN (NULL))", self)
        return Template("({0} IN (" + ", ".join(i.replace("{", "{{").replace("}", "}}") for i in items) + "))", self)

    def is_between(self, lower_bound: Any, upper_bound: Any, closed: str = "both") -> "Expr":
        lo, hi = to_expr(lower_bound), to_expr(upper_bound)
        if closed == "both":
            return Template("({0} BETWEEN {1} AND {2})", self, lo, hi)
        ops = {"left": (">=", "<"), "right": (">", "<="), "none": (">", "<")}
        if closed not in ops:
            raise ValueError(f"closed must be 'both', 'left', 'right' or 'none', not {closed!r}")
        low_op, high_op = ops[closed]
        return Template(f"({{0}} {low_op} {{1}} AND {{0}} {high_op} {{2}})", self, lo, hi)

    def is_null(self) -> "Expr":
        return Template("({0} IS NULL)", self)

    def is_not_null(self) -> "Expr":
        return Template("({0} IS NOT NULL)", self)

    def is_nan(self) -> "Expr":
        return Func("isnan", self)

    def is_not_nan(self) -> "Expr":
        return Template("(NOT isnan({0}))", self)

    def fill_null(self, value: Any = None) -> "Expr":
        return Func("coalesce", self, _expr(value))

    # aggregates: each is a SQL aggregate function; the server's allow-list decides
    def count(self) -> "Expr":
        return Agg("count", "count", self)

    def len(self) -> "Expr":
        return Agg("len", "count", None, name_from=self)

    def sum(self) -> "Expr":
        return Agg("sum", "sum", self)

    def mean(self) -> "Expr":
        return Agg("mean", "avg", self)

    def min(self) -> "Expr":
        return Agg("min", "min", self)

    def max(self) -> "Expr":
        return Agg("max", "max", self)

    def median(self) -> "Expr":
        return Agg("median", "median", self)

    def quantile(self, quantile: float, interpolation: str = "linear") -> "Expr":
        """The exact ``quantile`` (DataFusion's ``percentile_cont``: linear interpolation;
        polars' default interpolation is ``nearest``, which DataFusion lacks)."""
        if interpolation != "linear":
            raise NotImplementedError(
                f"quantile(interpolation={interpolation!r}): only 'linear' (percentile_cont) translates to SQL"
            )
        if isinstance(quantile, Expr):
            raise NotImplementedError("quantile() takes a number, not an expression")
        return Agg("quantile", "percentile_cont", self, extra=(Lit(float(quantile)),))

    def std(self, ddof: int = 1) -> "Expr":
        return Agg("std", {1: "stddev", 0: "stddev_pop"}.get(ddof) or _ddof(ddof, "std"), self)

    def var(self, ddof: int = 1) -> "Expr":
        return Agg("var", {1: "var", 0: "var_pop"}.get(ddof) or _ddof(ddof, "var"), self)

    def first(self) -> "Expr":
        return Agg("first", "first_value", self)

    def last(self) -> "Expr":
        return Agg("last", "last_value", self)

    def n_unique(self) -> "Expr":
        """Distinct non-null values (``count(DISTINCT x)``; polars also counts null)."""
        return Agg("n_unique", "count", self, distinct=True)

    def approx_n_unique(self) -> "Expr":
        return Agg("approx_n_unique", "approx_distinct", self)

    def null_count(self) -> "Expr":
        return NullCount(self)

    def any(self) -> "Expr":
        return Agg("any", "bool_or", self)

    def all(self) -> "Expr":
        return Agg("all", "bool_and", self)

    # element-wise functions
    def cast(self, dtype: Any, *, strict: bool = True) -> "Expr":
        return Cast(self, _sql_type(dtype), strict)

    def abs(self) -> "Expr":
        return Func("abs", self)

    def round(self, decimals: int = 0) -> "Expr":
        return Func("round", self, Lit(int(decimals)))

    def floor(self) -> "Expr":
        return Func("floor", self)

    def ceil(self) -> "Expr":
        return Func("ceil", self)

    def sqrt(self) -> "Expr":
        return Func("sqrt", self)

    def exp(self) -> "Expr":
        return Func("exp", self)

    def log(self, base: float = math.e) -> "Expr":
        if base == math.e:
            return Func("ln", self)
        return Func("log", Lit(float(base)), self)

    def log10(self) -> "Expr":
        return Func("log10", self)

    def sign(self) -> "Expr":
        return Func("signum", self)

    def clip(self, lower_bound: Any = None, upper_bound: Any = None) -> "Expr":
        out: Expr = self
        if lower_bound is not None:
            out = Func("greatest", out, _expr(lower_bound), name_from=self)
        if upper_bound is not None:
            out = Func("least", out, _expr(upper_bound), name_from=self)
        return out

    # namespaces
    @property
    def str(self) -> "_StrNamespace":
        return _StrNamespace(self)

    @property
    def dt(self) -> "_DtNamespace":
        return _DtNamespace(self)


def _ddof(ddof: int, what: str) -> str:
    raise NotImplementedError(f"{what}(ddof={ddof}): only ddof=1 (sample) and ddof=0 (population) translate to SQL")


def _true_divisor(o: Any) -> "Expr":
    """An operand of `/`: an integer literal written as a float, so integers divide as
    floats (polars' true division)."""
    if isinstance(o, int) and not isinstance(o, bool):
        return Lit(float(o))
    return _expr(o)


class Col(Expr):
    def __init__(self, name: str):
        self.column = name

    def sql(self) -> str:
        return "*" if self.column == "*" else _quote_ident(self.column)

    def output_name(self) -> str:
        return self.column


class Lit(Expr):
    def __init__(self, value: Any):
        self.value = value

    def sql(self) -> str:
        return _literal(self.value)


class Template(Expr):
    """SQL with placeholders ``{0}``, ``{1}``, ... for rendered arguments; named after the
    first one."""

    def __init__(self, template: str, *args: Expr):
        self.template, self.args = template, args

    def sql(self) -> str:
        return self.template.format(*(a.sql() for a in self.args))

    def output_name(self) -> str:
        return self.args[0].output_name()


class BinOp(Expr):
    def __init__(self, op: str, left: Expr, right: Expr):
        self.op, self.left, self.right = op, left, right

    def sql(self) -> str:
        return f"({self.left.sql()} {self.op} {self.right.sql()})"

    def output_name(self) -> str:
        return self.left.output_name()


class Func(Expr):
    """``name(args)``, named after ``name_from`` or its first non-literal argument."""

    def __init__(self, name: str, *args: Expr, name_from: Expr | None = None):
        self.function, self.args, self.name_from = name, args, name_from

    def sql(self) -> str:
        return f"{self.function}({', '.join(a.sql() for a in self.args)})"

    def output_name(self) -> str:
        if self.name_from is not None:
            return self.name_from.output_name()
        for a in self.args:
            if not isinstance(a, Lit):
                return a.output_name()
        return "literal"


class Cast(Expr):
    def __init__(self, expr: Expr, sql_type: str, strict: bool):
        self.expr, self.sql_type, self.strict = expr, sql_type, strict

    def sql(self) -> str:
        return f"{'CAST' if self.strict else 'TRY_CAST'}({self.expr.sql()} AS {self.sql_type})"

    def output_name(self) -> str:
        return self.expr.output_name()


class Agg(Expr):
    """An aggregate: polars ``method``, SQL ``function``."""

    def __init__(self, method: str, function: str, arg: Expr | None, distinct: bool = False,
                 extra: Sequence[Expr] = (), name_from: Expr | None = None):
        self.method, self.function, self.arg, self.distinct = method, function, arg, distinct
        self.extra, self.name_from = tuple(extra), name_from

    def sql(self) -> str:
        args = ["*" if self.arg is None else self.arg.sql()] + [e.sql() for e in self.extra]
        return f"{self.function}({'DISTINCT ' if self.distinct else ''}{', '.join(args)})"

    def output_name(self) -> str:
        source = self.arg if self.arg is not None else self.name_from
        if source is None:
            return "len" if self.method == "len" else "rows_count"
        return f"{source.output_name()}_{self.method}"


class NullCount(Agg):
    """``null_count()``: rows minus non-null values, ``count(*) - count(x)``."""

    def __init__(self, arg: Expr):
        super().__init__("null_count", "count", arg)

    def sql(self) -> str:
        assert self.arg is not None
        return f"(count(*) - count({self.arg.sql()}))"


class Alias(Expr):
    def __init__(self, expr: Expr, name: str):
        self.expr, self.new_name = expr, name

    def sql(self) -> str:
        return f"{self.expr.sql()} AS {_quote_ident(self.new_name)}"

    def output_name(self) -> str:
        return self.new_name

    def unaliased(self) -> "Expr":
        return self.expr


class Case(Expr):
    """``when(...).then(...)[.when(...).then(...)].otherwise(...)``: a SQL CASE."""

    def __init__(self, branches: Sequence[tuple[Expr, Expr]], otherwise: Expr | None = None):
        self.branches, self.otherwise_value = tuple(branches), otherwise

    def sql(self) -> str:
        parts = ["CASE"] + [f"WHEN {c.sql()} THEN {v.sql()}" for c, v in self.branches]
        if self.otherwise_value is not None:
            parts.append(f"ELSE {self.otherwise_value.sql()}")
        return " ".join(parts + ["END"])

    def output_name(self) -> str:
        return self.branches[0][1].output_name()

    def when(self, *predicates: Any, **constraints: Any) -> "_When":
        if self.otherwise_value is not None:
            raise TypeError("when() after otherwise()")
        return _When(_predicate(predicates, constraints), self.branches)

    def otherwise(self, statement: Any) -> Expr:
        if self.otherwise_value is not None:
            raise TypeError("otherwise() given twice")
        return Case(self.branches, to_expr(statement))


class _When:
    """``when(condition)``, waiting for its ``then``."""

    def __init__(self, condition: Expr, branches: Sequence[tuple[Expr, Expr]] = ()):
        self._condition, self._branches = condition, tuple(branches)

    def then(self, statement: Any) -> Case:
        return Case(self._branches + ((self._condition, to_expr(statement)),))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        raise NotImplementedError(f"when(...).{name}: a when() needs .then(...) first")


def _predicate(predicates: Sequence[Any], constraints: dict[str, Any]) -> Expr:
    parts: list[Expr] = []
    for p in _flatten(predicates):
        parts.append(to_expr(p))
    parts += [Col(k) == v for k, v in constraints.items()]
    if not parts:
        raise TypeError("at least one predicate is needed")
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out


def _flatten(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for i in items:
        if isinstance(i, (list, tuple)):
            out += _flatten(i)
        else:
            out.append(i)
    return out


_REGEX_SPECIAL = re.compile(r"[\\^$.|?*+()\[\]{}]")
_TRUNCATE_UNITS = {
    "y": "year", "q": "quarter", "mo": "month", "w": "week", "d": "day", "h": "hour",
    "m": "minute", "s": "second", "ms": "millisecond", "us": "microsecond",
}


class _StrNamespace:
    """polars' ``Expr.str``."""

    def __init__(self, e: Expr):
        self._e = e

    def __getattr__(self, name: str) -> Any:
        raise missing_attribute("Expr.str", self, name)

    def to_lowercase(self) -> Expr:
        return Func("lower", self._e)

    def to_uppercase(self) -> Expr:
        return Func("upper", self._e)

    def to_titlecase(self) -> Expr:
        return Func("initcap", self._e)

    def len_chars(self) -> Expr:
        return Func("character_length", self._e)

    def len_bytes(self) -> Expr:
        return Func("octet_length", self._e)

    def starts_with(self, prefix: Any) -> Expr:
        return Func("starts_with", self._e, _expr(prefix))

    def ends_with(self, suffix: Any) -> Expr:
        return Func("ends_with", self._e, _expr(suffix))

    def contains(self, pattern: Any, *, literal: bool = False, strict: bool = True) -> Expr:
        """``LIKE '%pattern%'`` for a literal (or a regex without special characters),
        else ``regexp_like``."""
        if isinstance(pattern, Expr):
            if literal:
                return Template("(strpos({0}, {1}) > 0)", self._e, pattern)
            return Func("regexp_like", self._e, pattern)
        text = str(pattern)
        if literal or not _REGEX_SPECIAL.search(text):
            escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            like = _literal(f"%{escaped}%").replace("{", "{{").replace("}", "}}")
            suffix = " ESCAPE '\\'" if escaped != text else ""
            return Template(f"({{0}} LIKE {like}{suffix})", self._e)
        return Func("regexp_like", self._e, Lit(text))

    def slice(self, offset: int, length: int | None = None) -> Expr:
        if offset < 0:
            raise NotImplementedError("str.slice with a negative offset")
        if length is None:
            return Func("substr", self._e, Lit(offset + 1))
        return Func("substr", self._e, Lit(offset + 1), Lit(length))

    def head(self, n: int) -> Expr:
        return Func("left", self._e, Lit(n))

    def tail(self, n: int) -> Expr:
        return Func("right", self._e, Lit(n))

    def strip_chars(self, characters: str | None = None) -> Expr:
        return Func("btrim", self._e) if characters is None else Func("btrim", self._e, Lit(characters))

    def replace_all(self, pattern: str, value: str, *, literal: bool = False) -> Expr:
        if literal or not _REGEX_SPECIAL.search(pattern):
            return Func("replace", self._e, Lit(pattern), Lit(value))
        return Func("regexp_replace", self._e, Lit(pattern), Lit(value), Lit("g"))

    # earlier names of this client, kept
    def lower(self) -> Expr:
        return self.to_lowercase()

    def upper(self) -> Expr:
        return self.to_uppercase()

    def len(self) -> Expr:
        return self.len_chars()


class _DtNamespace:
    """polars' ``Expr.dt``."""

    def __init__(self, e: Expr):
        self._e = e

    def __getattr__(self, name: str) -> Any:
        raise missing_attribute("Expr.dt", self, name)

    def _part(self, part: str) -> Expr:
        return Func("date_part", Lit(part), self._e)

    def year(self) -> Expr:
        return self._part("year")

    def quarter(self) -> Expr:
        return self._part("quarter")

    def month(self) -> Expr:
        return self._part("month")

    def week(self) -> Expr:
        return self._part("week")

    def day(self) -> Expr:
        return self._part("day")

    def ordinal_day(self) -> Expr:
        return self._part("doy")

    def weekday(self) -> Expr:
        """Monday = 1 ... Sunday = 7, as in polars."""
        return self._part("isodow")

    def hour(self) -> Expr:
        return self._part("hour")

    def minute(self) -> Expr:
        return self._part("minute")

    def second(self) -> Expr:
        return self._part("second")

    def date(self) -> Expr:
        return Cast(self._e, "DATE", True)

    def truncate(self, every: str) -> Expr:
        """``date_trunc``: polars' ``"1y"``, ``"1q"``, ``"1mo"``, ``"1w"``, ``"1d"``, ``"1h"``,
        ``"1m"``, ``"1s"`` (or a SQL unit such as ``"month"``)."""
        m = re.fullmatch(r"(\d*)(mo|ms|us|[yqwdhms])", every.strip())
        if m:
            if m.group(1) not in ("", "1"):
                raise NotImplementedError(f"dt.truncate({every!r}): only single units translate to SQL (date_trunc)")
            unit = _TRUNCATE_UNITS[m.group(2)]
        elif every.strip().lower() in set(_TRUNCATE_UNITS.values()):
            unit = every.strip().lower()
        else:
            raise ValueError(f"dt.truncate({every!r}): not a duration such as '1mo', '1y', '1d'")
        return Func("date_trunc", Lit(unit), self._e)


def col(name: str, *more_names: str) -> Expr:
    """A column by name (``col("*")``: every column)."""
    if more_names:
        raise NotImplementedError("col() with several names: select them one by one")
    return Col(name)


def lit(value: Any, dtype: Any = None) -> Expr:
    """A literal value (cast to ``dtype`` when given)."""
    e = Lit(value)
    return e if dtype is None else e.cast(dtype)


def count(*columns: str) -> Expr:
    """``count(*)``: the number of rows (or, given a column, its non-null values)."""
    if columns:
        if _builtin_len(columns) > 1:
            raise NotImplementedError("count() of several columns: count them one by one")
        return Col(columns[0]).count()
    return Agg("count", "count", None)


def len() -> Expr:  # noqa: A001 - polars' name
    """``pl.len()``: the number of rows, ``count(*)``, named ``len``."""
    return Agg("len", "count", None)


def when(*predicates: Any, **constraints: Any) -> _When:
    """``when(cond).then(a).otherwise(b)``, as in polars (a SQL CASE)."""
    return _When(_predicate(predicates, constraints))


def _aggregate_function(method: str):
    def f(*columns: str) -> Expr:
        if _builtin_len(columns) != 1:
            raise NotImplementedError(f"{method}() of {_builtin_len(columns)} columns: use col(name).{method}()")
        return getattr(Col(columns[0]), method)()

    f.__name__ = method
    f.__doc__ = f"``col(name).{method}()``, as polars' ``pl.{method}(name)``."
    return f


sum = _aggregate_function("sum")  # noqa: A001
min = _aggregate_function("min")  # noqa: A001
max = _aggregate_function("max")  # noqa: A001
mean = _aggregate_function("mean")
median = _aggregate_function("median")
first = _aggregate_function("first")
last = _aggregate_function("last")
n_unique = _aggregate_function("n_unique")
std = _aggregate_function("std")
var = _aggregate_function("var")
