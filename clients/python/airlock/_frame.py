"""RemoteLazyFrame: a lazy description of a remote query (polars' LazyFrame API), and its
remote result.

Every method compiles to SQL; nothing here decides what the server's privacy policy
allows. A refusal comes back from the server when the query runs, as
:class:`airlock.PolicyViolation` carrying the server's reason code.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pyarrow as pa

from ._compat import missing_attribute
from ._errors import ApprovalDenied, ApprovalPending, PolicyViolation, translate
from ._expr import Agg, Alias, Col, Expr, ExprLike, _flatten, _predicate, _quote_ident, to_expr

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["RemoteLazyFrame", "RemoteResult", "GroupBy"]


def _exprs(items: Iterable[Any], named: dict[str, Any]) -> list[Expr]:
    """polars' positional-and-named expression arguments: lists are flattened, strings
    name columns, keywords name their expression."""
    out = [to_expr(i) for i in _flatten(items)]
    out += [to_expr(v).alias(k) for k, v in named.items()]
    return out


def _item(e: Expr) -> str:
    """A SELECT item that produces the column ``e.output_name()``."""
    if isinstance(e, (Col, Alias)):
        return e.sql()
    return f"{e.sql()} AS {_quote_ident(e.output_name())}"


def _names(es: Sequence[Expr], columns: Sequence[str] | None) -> list[str] | None:
    names: list[str] = []
    for e in es:
        if isinstance(e, Col) and e.column == "*":
            if columns is None:
                return None
            names += columns
        else:
            names.append(e.output_name())
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"the output column {n!r} appears twice: name one with .alias(...)")
        seen.add(n)
    return names


class RemoteLazyFrame:
    """A query against an Airlock server that has not run yet, with polars' LazyFrame API.

    Every method returns a new frame; nothing is sent until :meth:`collect` (or
    :meth:`fetch`, :meth:`describe`, :meth:`explain`). The rows never reach this
    process unless the server's policy releases them.
    """

    def __init__(
        self,
        client: "Client",
        relation: str,
        columns: Sequence[str] | None,
        schema: pa.Schema | None = None,
        *,
        is_table: bool = False,
        ordered: bool = False,
        depth: int = 0,
    ):
        self._client = client
        self._relation = relation  # a table name, or a query
        self._is_table = is_table
        self._ordered = ordered  # the query ends with ORDER BY (LIMIT may follow it)
        self._columns = list(columns) if columns is not None else None
        self._schema = schema
        self._depth = depth  # subquery nesting: names the alias, so the SQL is deterministic

    def __getattr__(self, name: str) -> Any:
        raise missing_attribute("LazyFrame", self, name)

    # -- SQL -------------------------------------------------------------------
    def sql(self) -> str:
        """The SQL this frame sends."""
        return f"SELECT * FROM {self._relation}" if self._is_table else self._relation

    def _from(self, alias: str | None = None) -> str:
        if self._is_table:
            return self._relation if alias is None else f"{self._relation} AS {alias}"
        return f"({self._relation}) AS {alias or f'_t{self._depth}'}"

    def _derive(self, sql: str, columns: Sequence[str] | None, *, ordered: bool = False) -> "RemoteLazyFrame":
        return RemoteLazyFrame(self._client, sql, columns, ordered=ordered, depth=self._depth + 1)

    @property
    def columns(self) -> list[str]:
        """The frame's column names, as far as the client can know them."""
        if self._columns is None:
            raise ValueError("the columns of a raw SQL frame are not known; use select() to name them")
        return list(self._columns)

    # -- relational operations ---------------------------------------------------
    def select(self, *exprs: Any, **named_exprs: Any) -> "RemoteLazyFrame":
        es = _exprs(exprs, named_exprs)
        cols = _names(es, self._columns)
        return self._derive(f"SELECT {', '.join(_item(e) for e in es)} FROM {self._from()}", cols)

    def with_columns(self, *exprs: Any, **named_exprs: Any) -> "RemoteLazyFrame":
        """Adds columns, or replaces those of the same name in place (as polars does)."""
        es = _exprs(exprs, named_exprs)
        new = _names(es, None) or []
        if self._columns is None:
            items = ["*"] + [_item(e) for e in es]
            return self._derive(f"SELECT {', '.join(items)} FROM {self._from()}", None)
        by_name = dict(zip(new, es))
        items = [_item(by_name.pop(c)) if c in by_name else _quote_ident(c) for c in self._columns]
        items += [_item(e) for e in by_name.values()]
        cols = self._columns + [n for n in new if n not in self._columns]
        return self._derive(f"SELECT {', '.join(items)} FROM {self._from()}", cols)

    def filter(self, *predicates: Any, **constraints: Any) -> "RemoteLazyFrame":
        """Rows where every predicate holds (``filter(ward="A")`` means ``col("ward") == "A"``)."""
        predicate = _predicate(predicates, constraints)
        return self._derive(f"SELECT * FROM {self._from()} WHERE {predicate.unaliased().sql()}", self._columns)

    def group_by(self, *by: Any, maintain_order: bool = False, **named_by: Any) -> "GroupBy":
        return GroupBy(self, _exprs(by, named_by))

    def agg(self, *aggs: Any, **named_aggs: Any) -> "RemoteLazyFrame":
        """A global aggregate (one row)."""
        return GroupBy(self, []).agg(*aggs, **named_aggs)

    def join(
        self,
        other: "RemoteLazyFrame",
        on: str | Sequence[str] | None = None,
        how: str = "inner",
        *,
        left_on: str | Sequence[str] | None = None,
        right_on: str | Sequence[str] | None = None,
        suffix: str = "_right",
        validate: str = "m:m",
        coalesce: bool | None = None,
        maintain_order: str | None = None,
    ) -> "RemoteLazyFrame":
        """A join, as polars': ``how`` is inner, left, right, full, semi, anti or cross;
        columns of ``other`` whose names clash get ``suffix``."""
        kinds = {"inner": "JOIN", "left": "LEFT JOIN", "right": "RIGHT JOIN", "full": "FULL JOIN",
                 "outer": "FULL JOIN", "semi": "LEFT SEMI JOIN", "anti": "LEFT ANTI JOIN", "cross": "CROSS JOIN"}
        if how not in kinds:
            raise ValueError(f"how must be one of {', '.join(kinds)}, not {how!r}")
        if how == "outer":
            how = "full"

        def names(keys: Any) -> list[str]:
            keys = [keys] if isinstance(keys, (str, Expr)) else list(keys or [])
            out = []
            for k in keys:
                if isinstance(k, Col):
                    k = k.column
                if not isinstance(k, str):
                    raise NotImplementedError("join keys must be column names")
                out.append(k)
            return out

        if how == "cross":
            if on is not None or left_on is not None or right_on is not None:
                raise ValueError("a cross join takes no keys")
            lk: list[str] = []
            rk: list[str] = []
        elif on is not None:
            lk = rk = names(on)
        else:
            lk, rk = names(left_on), names(right_on)
            if not lk or len(lk) != len(rk):
                raise ValueError("join needs on=, or left_on= and right_on= of the same length")
        coalesce = how != "full" if coalesce is None else coalesce

        if self._columns is None or other._columns is None:
            # Columns unknown: SELECT * (clashing names are left to the server).
            if how == "cross":
                cond = ""
            elif on is not None:
                cond = f" USING ({', '.join(_quote_ident(k) for k in lk)})"
            else:
                cond = " ON " + " AND ".join(f"_l.{_quote_ident(a)} = _r.{_quote_ident(b)}" for a, b in zip(lk, rk))
            return self._derive(f"SELECT * FROM {self._from('_l')} {kinds[how]} {other._from('_r')}{cond}", None)

        items: list[str] = []
        cols: list[str] = []
        for c in self._columns:
            if how == "right" and coalesce and c in lk:
                items.append(f"_r.{_quote_ident(rk[lk.index(c)])} AS {_quote_ident(c)}")
            else:
                items.append(f"_l.{_quote_ident(c)}")
            cols.append(c)
        if how not in ("semi", "anti"):
            for c in other._columns:
                if coalesce and c in rk:
                    continue
                name = c if c not in cols else c + suffix
                items.append(f"_r.{_quote_ident(c)}" + (f" AS {_quote_ident(name)}" if name != c else ""))
                cols.append(name)
        cond = "" if how == "cross" else " ON " + " AND ".join(
            f"_l.{_quote_ident(a)} = _r.{_quote_ident(b)}" for a, b in zip(lk, rk)
        )
        sql = f"SELECT {', '.join(items)} FROM {self._from('_l')} {kinds[how]} {other._from('_r')}{cond}"
        return self._derive(sql, cols)

    def sort(
        self,
        by: Any,
        *more_by: Any,
        descending: bool | Sequence[bool] = False,
        nulls_last: bool | Sequence[bool] = False,
        maintain_order: bool = False,
        multithreaded: bool = True,
    ) -> "RemoteLazyFrame":
        """ORDER BY, with polars' defaults: ascending, nulls first."""
        keys = [to_expr(b).unaliased() for b in _flatten([by, *more_by])]
        desc = [descending] * len(keys) if isinstance(descending, bool) else list(descending)
        nulls = [nulls_last] * len(keys) if isinstance(nulls_last, bool) else list(nulls_last)
        if len(desc) != len(keys) or len(nulls) != len(keys):
            raise ValueError("descending and nulls_last need one flag per sort key")
        order = ", ".join(
            f"{k.sql()}{' DESC' if d else ' ASC'} NULLS {'LAST' if n else 'FIRST'}" for k, d, n in zip(keys, desc, nulls)
        )
        return self._derive(f"SELECT * FROM {self._from()} ORDER BY {order}", self._columns, ordered=True)

    def limit(self, n: int = 5) -> "RemoteLazyFrame":
        if self._ordered:
            # Keep the order: LIMIT belongs to the same SELECT as its ORDER BY.
            return RemoteLazyFrame(self._client, f"{self._relation} LIMIT {int(n)}", self._columns, depth=self._depth)
        return self._derive(f"SELECT * FROM {self._from()} LIMIT {int(n)}", self._columns)

    def head(self, n: int = 5) -> "RemoteLazyFrame":
        return self.limit(n)

    def unique(self, subset: str | Sequence[str] | None = None, *, keep: str = "any",
               maintain_order: bool = False) -> "RemoteLazyFrame":
        """Distinct rows (``subset``: one row per distinct value of those columns)."""
        if keep not in ("any", "first"):
            raise NotImplementedError(f"unique(keep={keep!r}): only 'any' translates to SQL")
        if subset is None:
            return self._derive(f"SELECT DISTINCT * FROM {self._from()}", self._columns)
        keys = [to_expr(s).unaliased().sql() for s in _flatten([subset])]
        return self._derive(f"SELECT DISTINCT ON ({', '.join(keys)}) * FROM {self._from()}", self._columns)

    def distinct(self) -> "RemoteLazyFrame":
        return self.unique()

    def rename(self, mapping: dict[str, str]) -> "RemoteLazyFrame":
        exprs = [to_expr(c).alias(mapping[c]) if c in mapping else to_expr(c) for c in self.columns]
        return self.select(*exprs)

    def drop(self, *columns: Any) -> "RemoteLazyFrame":
        gone = {c.column if isinstance(c, Col) else c for c in _flatten(columns)}
        return self.select(*[c for c in self.columns if c not in gone])

    # -- running -------------------------------------------------------------------
    def explain(self) -> str:
        """The SQL and the server's privacy explanation; nothing runs."""
        return f"SQL:\n  {self.sql()}\n\n{self._client.explain_privacy(self.sql())}"

    def collect(self, epsilon: float | None = None) -> "RemoteResult":
        """Runs the query on the server (planned and checked there) and returns a remote
        result: fetch it (pyarrow), convert it (``to_polars()``, ``to_pandas()``), or keep
        building on it. A refusal raises :class:`airlock.PolicyViolation` here.

        ``epsilon``: for tables in differential-privacy mode, the privacy budget this
        query may spend (at most the table's per-query maximum, which is the default).
        It travels as the ``airlock-epsilon`` call header."""
        result = RemoteResult(
            self._client, self.sql(), self._columns, depth=self._depth, epsilon=epsilon
        )
        result._execute()
        return result

    def fetch(self, wait: bool = False, timeout: float | None = None, progress: bool | None = None) -> pa.Table:
        """Runs the query and downloads what the policy releases."""
        return RemoteResult(self._client, self.sql(), self._columns, depth=self._depth).fetch(
            wait=wait, timeout=timeout, progress=progress
        )

    def describe(self) -> pa.Table:
        """A k-safe summary of each column: count, distinct values and, for numbers,
        mean and standard deviation. Small groups never appear; the whole table is one
        group, so a table with fewer than k entities describes as empty.

        The server decides which statistics it releases: when it refuses the whole
        summary (say, the mean of the entity key), the counts are asked for on their own
        and each column's mean and standard deviation separately; a refused statistic is
        None (and, for an analyst holding `request`, an approval request the owner sees)."""
        schema = self._schema or self._client._schema_of(self)
        counts: list[Expr] = []
        moments: dict[str, list[Expr]] = {}
        for field in schema:
            c = to_expr(field.name)
            counts += [c.count().alias(f"{field.name}__count"), c.n_unique().alias(f"{field.name}__n_unique")]
            if pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or pa.types.is_decimal(field.type):
                moments[field.name] = [c.mean().alias(f"{field.name}__mean"), c.std().alias(f"{field.name}__std")]
        values: dict[str, Any] = {}

        def run(aggs: list[Expr]) -> None:
            row = self.agg(*aggs).fetch()
            for name in row.column_names:
                values[name] = row.column(name)[0].as_py() if row.num_rows else None

        try:
            run(counts + [e for es in moments.values() for e in es])
        except PolicyViolation:
            run(counts)
            for es in moments.values():
                try:
                    run(es)
                except PolicyViolation:
                    pass
        names = ["count", "n_unique"] + (["mean", "std"] if moments else [])
        out: dict[str, list[Any]] = {"statistic": names}
        for field in schema:
            out[field.name] = [values.get(f"{field.name}__{s}") for s in names]
        return pa.table(out)

    def __repr__(self) -> str:
        return f"RemoteLazyFrame({self.sql()!r})"


class GroupBy:
    """``frame.group_by(keys)``: ``.agg(...)``, ``.len()``, or one aggregate of every other
    column (``.mean()``, ``.n_unique()``, ...), as in polars."""

    def __init__(self, frame: RemoteLazyFrame, keys: list[Expr], having: Expr | None = None):
        self._frame, self._keys, self._having = frame, keys, having

    def __getattr__(self, name: str) -> Any:
        raise missing_attribute("GroupBy", self, name)

    def having(self, *predicates: Any) -> "GroupBy":
        """Keeps the groups where the predicates (over aggregates) hold: SQL HAVING."""
        predicate = _predicate(predicates, {})
        if self._having is not None:
            predicate = self._having & predicate
        return GroupBy(self._frame, self._keys, predicate)

    def agg(self, *aggs: Any, **named_aggs: Any) -> RemoteLazyFrame:
        es = _exprs(aggs, named_aggs)
        cols = _names(self._keys + es, None)
        select = [_item(k) for k in self._keys] + [_item(a) for a in es]
        sql = f"SELECT {', '.join(select)} FROM {self._frame._from()}"
        if self._keys:
            sql += f" GROUP BY {', '.join(k.unaliased().sql() for k in self._keys)}"
        if self._having is not None:
            sql += f" HAVING {self._having.unaliased().sql()}"
        return self._frame._derive(sql, cols)

    def len(self, name: str | None = None) -> RemoteLazyFrame:
        """Rows per group, ``count(*)``, in a column ``len`` (or ``name``)."""
        return self.agg(Agg("len", "count", None).alias(name or "len"))

    def count(self) -> RemoteLazyFrame:
        return self.len("count")

    def _each(self, method: str, *args: Any) -> RemoteLazyFrame:
        keys = {k.output_name() for k in self._keys}
        others = [c for c in self._frame.columns if c not in keys]
        return self.agg(*[getattr(Col(c), method)(*args).alias(c) for c in others])

    def sum(self) -> RemoteLazyFrame:
        return self._each("sum")

    def mean(self) -> RemoteLazyFrame:
        return self._each("mean")

    def min(self) -> RemoteLazyFrame:
        return self._each("min")

    def max(self) -> RemoteLazyFrame:
        return self._each("max")

    def median(self) -> RemoteLazyFrame:
        return self._each("median")

    def quantile(self, quantile: float, interpolation: str = "linear") -> RemoteLazyFrame:
        return self._each("quantile", quantile, interpolation)

    def std(self, ddof: int = 1) -> RemoteLazyFrame:
        return self._each("std", ddof)

    def var(self, ddof: int = 1) -> RemoteLazyFrame:
        return self._each("var", ddof)

    def first(self) -> RemoteLazyFrame:
        return self._each("first")

    def last(self) -> RemoteLazyFrame:
        return self._each("last")

    def n_unique(self) -> RemoteLazyFrame:
        return self._each("n_unique")

    def null_count(self) -> RemoteLazyFrame:
        return self._each("null_count")


class RemoteResult(RemoteLazyFrame):
    """A query the server accepted. Fetch its rows, or start further lazy queries from
    it: the server evaluates the combined query against the sources' policies."""

    def __init__(
        self,
        client: "Client",
        sql: str,
        columns: Sequence[str] | None,
        *,
        depth: int = 0,
        epsilon: float | None = None,
    ):
        super().__init__(client, sql, columns, depth=depth)
        self._cursor = None
        self._epsilon = epsilon

    def _execute(self) -> None:
        cur = self._client._conn.cursor()
        try:
            if self._epsilon is not None:
                # The ADBC Flight SQL driver sends statement options with this prefix as
                # call headers on every RPC of the statement.
                cur.adbc_statement.set_options(
                    **{"adbc.flight.sql.rpc.call_header.airlock-epsilon": repr(float(self._epsilon))}
                )
            cur.execute(self._relation)
        except Exception as e:  # the driver's error, carrying the server's code
            cur.close()
            raise translate(e) from None
        self._cursor = cur
        self._client._open_results.add(self)

    def _close(self) -> None:
        """Closes a cursor that was executed but never fetched."""
        cur, self._cursor = self._cursor, None
        self._client._open_results.discard(self)
        if cur is not None:
            cur.close()

    def fetch(self, wait: bool = False, timeout: float | None = None, progress: bool | None = None) -> pa.Table:
        """Downloads the released rows as a pyarrow Table, batch by batch.

        With ``wait=True``, a result that needs the data owner's approval is polled
        until approved (then downloaded), denied (:class:`ApprovalDenied`) or
        ``timeout`` seconds pass (:class:`TimeoutError`).
        """
        show = sys.stderr.isatty() if progress is None else progress
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                if self._cursor is None:
                    self._execute()
                break
            except ApprovalPending as pending:
                if not wait:
                    raise
                self._wait_for_owner(pending, deadline, show)
        cur, self._cursor = self._cursor, None
        self._client._open_results.discard(self)
        try:
            reader = cur.fetch_record_batch()
            batches = []
            rows = 0
            for batch in reader:
                batches.append(batch)
                rows += batch.num_rows
                if show:
                    print(f"\rdownloading: {rows:,} rows", end="", file=sys.stderr, flush=True)
            if show:
                print(file=sys.stderr)
            return pa.Table.from_batches(batches, schema=reader.schema)
        except Exception as e:
            raise translate(e) from None
        finally:
            cur.close()

    def _wait_for_owner(self, pending: ApprovalPending, deadline: float | None, show: bool) -> None:
        started = time.monotonic()
        while True:
            status = self._client.request_status(pending.request_id)
            state = status.get("status")
            if state == "approved" and not status.get("expired"):
                if show:
                    print(file=sys.stderr)
                return
            if state == "denied":
                if show:
                    print(file=sys.stderr)
                raise ApprovalDenied(pending.request_id, status.get("reason", ""))
            if deadline is not None and time.monotonic() >= deadline:
                if show:
                    print(file=sys.stderr)
                raise TimeoutError(f"request {pending.request_id} was not decided in time")
            if show:
                waited = int(time.monotonic() - started)
                print(
                    f"\rwaiting for the data owner to approve request {pending.request_id}: {waited}s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(0.5)

    def to_arrow(self, **fetch_args: Any) -> pa.Table:
        """The released rows as a pyarrow Table (the same as :meth:`fetch`)."""
        return self.fetch(**fetch_args)

    def to_pandas(self, **fetch_args: Any):
        return self.fetch(**fetch_args).to_pandas()

    def to_polars(self, **fetch_args: Any):
        import polars as pl

        return pl.from_arrow(self.fetch(**fetch_args))

    def __repr__(self) -> str:
        return f"RemoteResult({self._relation!r})"
