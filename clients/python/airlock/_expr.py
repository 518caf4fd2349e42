"""Column expressions, rendered to SQL by a small typed builder.

Why a builder of our own rather than sqlglot or ibis: the server speaks one dialect
(DataFusion's), the set of constructs the privacy policy accepts is small and known
(columns, literals, arithmetic, comparisons, IN, IS NULL, a few string and date
functions, and the allow-listed aggregates), and every rendered query must be
predictable enough for the data owner to read in an approval request. A few hundred
lines keep that under our control, with no dependency whose dialect translation could
produce a construct the policy then refuses.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Iterable, Union

__all__ = ["Expr", "col", "lit", "count"]

ExprLike = Union["Expr", str, int, float, bool, None, _dt.date, _dt.datetime]


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, _dt.datetime):
        return f"TIMESTAMP '{value.isoformat(sep=' ')}'"
    if isinstance(value, _dt.date):
        return f"DATE '{value.isoformat()}'"
    return "'" + str(value).replace("'", "''") + "'"


def _expr(value: ExprLike) -> "Expr":
    return value if isinstance(value, Expr) else Lit(value)


class Expr:
    """A column expression. Build with :func:`col`, :func:`lit` and operators."""

    def sql(self) -> str:
        raise NotImplementedError

    def output_name(self) -> str:
        return self.sql()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.sql()}>"

    # naming
    def alias(self, name: str) -> "Expr":
        return Alias(self, name)

    def unaliased(self) -> "Expr":
        """The expression without its alias (as GROUP BY wants it)."""
        return self

    # arithmetic
    def __add__(self, o: ExprLike) -> "Expr":
        return BinOp("+", self, _expr(o))

    def __radd__(self, o: ExprLike) -> "Expr":
        return BinOp("+", _expr(o), self)

    def __sub__(self, o: ExprLike) -> "Expr":
        return BinOp("-", self, _expr(o))

    def __rsub__(self, o: ExprLike) -> "Expr":
        return BinOp("-", _expr(o), self)

    def __mul__(self, o: ExprLike) -> "Expr":
        return BinOp("*", self, _expr(o))

    def __rmul__(self, o: ExprLike) -> "Expr":
        return BinOp("*", _expr(o), self)

    def __truediv__(self, o: ExprLike) -> "Expr":
        return BinOp("/", self, _expr(o))

    def __neg__(self) -> "Expr":
        return Raw(f"(- {self.sql()})")

    # comparisons
    def __eq__(self, o: ExprLike) -> "Expr":  # type: ignore[override]
        return BinOp("=", self, _expr(o))

    def __ne__(self, o: ExprLike) -> "Expr":  # type: ignore[override]
        return BinOp("<>", self, _expr(o))

    def __lt__(self, o: ExprLike) -> "Expr":
        return BinOp("<", self, _expr(o))

    def __le__(self, o: ExprLike) -> "Expr":
        return BinOp("<=", self, _expr(o))

    def __gt__(self, o: ExprLike) -> "Expr":
        return BinOp(">", self, _expr(o))

    def __ge__(self, o: ExprLike) -> "Expr":
        return BinOp(">=", self, _expr(o))

    __hash__ = object.__hash__

    # boolean logic
    def __and__(self, o: ExprLike) -> "Expr":
        return BinOp("AND", self, _expr(o))

    def __or__(self, o: ExprLike) -> "Expr":
        return BinOp("OR", self, _expr(o))

    def __invert__(self) -> "Expr":
        return Raw(f"(NOT {self.sql()})")

    def is_in(self, values: Iterable[Any]) -> "Expr":
        items = ", ".join(_literal(v) for v in values)
        return Raw(f"({self.sql()} IN ({items}))")

    def is_null(self) -> "Expr":
        return Raw(f"({self.sql()} IS NULL)")

    def is_not_null(self) -> "Expr":
        return Raw(f"({self.sql()} IS NOT NULL)")

    # aggregates (the server's default allow-list)
    def count(self) -> "Expr":
        return Agg("count", self)

    def sum(self) -> "Expr":
        return Agg("sum", self)

    def mean(self) -> "Expr":
        return Agg("avg", self)

    def std(self) -> "Expr":
        return Agg("stddev", self)

    def var(self) -> "Expr":
        return Agg("var", self)

    def n_unique(self) -> "Expr":
        return Agg("count", self, distinct=True)

    # helpers
    @property
    def str(self) -> "_StrNamespace":
        return _StrNamespace(self)

    @property
    def dt(self) -> "_DtNamespace":
        return _DtNamespace(self)

    def round(self, digits: int = 0) -> "Expr":
        return Func("round", self, Lit(digits))

    def cast(self, sql_type: str) -> "Expr":
        return Raw(f"CAST({self.sql()} AS {sql_type})")


class Col(Expr):
    def __init__(self, name: str):
        self.name = name

    def sql(self) -> str:
        return _quote_ident(self.name)

    def output_name(self) -> str:
        return self.name


class Lit(Expr):
    def __init__(self, value: Any):
        self.value = value

    def sql(self) -> str:
        return _literal(self.value)


class Raw(Expr):
    def __init__(self, text: str):
        self.text = text

    def sql(self) -> str:
        return self.text


class BinOp(Expr):
    def __init__(self, op: str, left: Expr, right: Expr):
        self.op, self.left, self.right = op, left, right

    def sql(self) -> str:
        return f"({self.left.sql()} {self.op} {self.right.sql()})"


class Func(Expr):
    def __init__(self, name: str, *args: Expr):
        self.name, self.args = name, args

    def sql(self) -> str:
        return f"{self.name}({', '.join(a.sql() for a in self.args)})"


class Agg(Expr):
    def __init__(self, name: str, arg: Expr | None, distinct: bool = False):
        self.name, self.arg, self.distinct = name, arg, distinct

    def sql(self) -> str:
        inner = "*" if self.arg is None else self.arg.sql()
        return f"{self.name}({'DISTINCT ' if self.distinct else ''}{inner})"

    def output_name(self) -> str:
        base = "rows" if self.arg is None else self.arg.output_name()
        suffix = {"avg": "mean", "stddev": "std"}.get(self.name, self.name)
        return f"{base}_{'n_unique' if self.distinct else suffix}"


class Alias(Expr):
    def __init__(self, expr: Expr, name: str):
        self.expr, self.name = expr, name

    def sql(self) -> str:
        return f"{self.expr.sql()} AS {_quote_ident(self.name)}"

    def output_name(self) -> str:
        return self.name

    def unaliased(self) -> "Expr":
        return self.expr


class _StrNamespace:
    def __init__(self, e: Expr):
        self.e = e

    def lower(self) -> Expr:
        return Func("lower", self.e)

    def upper(self) -> Expr:
        return Func("upper", self.e)

    def len(self) -> Expr:
        return Func("character_length", self.e)

    def starts_with(self, prefix: str) -> Expr:
        return Func("starts_with", self.e, Lit(prefix))

    def contains(self, needle: str) -> Expr:
        return Raw(f"(strpos({self.e.sql()}, {_literal(needle)}) > 0)")

    def slice(self, start: int, length: int) -> Expr:
        return Func("substr", self.e, Lit(start + 1), Lit(length))


class _DtNamespace:
    def __init__(self, e: Expr):
        self.e = e

    def year(self) -> Expr:
        return Raw(f"CAST(date_part('year', {self.e.sql()}) AS BIGINT)")

    def month(self) -> Expr:
        return Raw(f"CAST(date_part('month', {self.e.sql()}) AS BIGINT)")

    def truncate(self, unit: str) -> Expr:
        return Func("date_trunc", Lit(unit), self.e)


def col(name: str) -> Expr:
    """A column by name."""
    return Col(name)


def lit(value: Any) -> Expr:
    """A literal value."""
    return Lit(value)


def count() -> Expr:
    """``count(*)``: the number of rows in each group."""
    return Agg("count", None)


def to_expr(value: ExprLike) -> Expr:
    """A column name, or an expression as it is."""
    return Col(value) if isinstance(value, str) else _expr(value)
