"""RemoteLazyFrame: a lazy description of a remote query, and its remote result."""

from __future__ import annotations

import itertools
import sys
import time
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pyarrow as pa

from ._errors import ApprovalDenied, ApprovalPending, translate
from ._expr import Agg, Expr, ExprLike, to_expr

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["RemoteLazyFrame", "RemoteResult", "GroupBy"]

_aliases = itertools.count(1)


class RemoteLazyFrame:
    """A query against an Airlock server that has not run yet.

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
    ):
        self._client = client
        self._relation = relation  # a table name, or a query
        self._is_table = is_table
        self._ordered = ordered  # the query ends with ORDER BY (LIMIT may follow it)
        self._columns = list(columns) if columns is not None else None
        self._schema = schema

    # -- SQL -------------------------------------------------------------------
    def sql(self) -> str:
        """The SQL this frame sends."""
        return f"SELECT * FROM {self._relation}" if self._is_table else self._relation

    def _from(self) -> str:
        return self._relation if self._is_table else f"({self._relation}) AS _t{next(_aliases)}"

    def _derive(self, sql: str, columns: Sequence[str] | None) -> "RemoteLazyFrame":
        return RemoteLazyFrame(self._client, sql, columns)

    @property
    def columns(self) -> list[str]:
        """The frame's column names, as far as the client can know them."""
        if self._columns is None:
            raise ValueError("the columns of a raw SQL frame are not known; use select() to name them")
        return list(self._columns)

    # -- relational operations ---------------------------------------------------
    def select(self, *exprs: ExprLike) -> "RemoteLazyFrame":
        es = [to_expr(e) for e in exprs]
        return self._derive(f"SELECT {', '.join(e.sql() for e in es)} FROM {self._from()}", [e.output_name() for e in es])

    def with_columns(self, *exprs: Expr) -> "RemoteLazyFrame":
        names = [e.output_name() for e in exprs]
        kept = [c for c in (self._columns or []) if c not in names]
        base = ", ".join(to_expr(c).sql() for c in kept) if self._columns is not None else "*"
        added = ", ".join(e.sql() for e in exprs)
        cols = kept + names if self._columns is not None else None
        return self._derive(f"SELECT {base}, {added} FROM {self._from()}", cols)

    def filter(self, predicate: Expr) -> "RemoteLazyFrame":
        return self._derive(f"SELECT * FROM {self._from()} WHERE {predicate.sql()}", self._columns)

    def group_by(self, *keys: ExprLike) -> "GroupBy":
        return GroupBy(self, [to_expr(k) for k in keys])

    def agg(self, *aggs: Expr) -> "RemoteLazyFrame":
        """A global aggregate (one row)."""
        return GroupBy(self, []).agg(*aggs)

    def join(self, other: "RemoteLazyFrame", on: str | Sequence[str], how: str = "inner") -> "RemoteLazyFrame":
        keys = [on] if isinstance(on, str) else list(on)
        kind = {"inner": "JOIN", "left": "LEFT JOIN", "right": "RIGHT JOIN", "outer": "FULL JOIN", "full": "FULL JOIN"}[how]
        using = ", ".join(to_expr(k).sql() for k in keys)
        cols = None
        if self._columns is not None and other._columns is not None:
            cols = self._columns + [c for c in other._columns if c not in keys]
        return self._derive(f"SELECT * FROM {self._from()} {kind} {other._from()} USING ({using})", cols)

    def sort(self, *by: ExprLike, descending: bool | Sequence[bool] = False) -> "RemoteLazyFrame":
        flags = [descending] * len(by) if isinstance(descending, bool) else list(descending)
        order = ", ".join(f"{to_expr(b).sql()}{' DESC' if d else ''}" for b, d in zip(by, flags))
        frame = self._derive(f"SELECT * FROM {self._from()} ORDER BY {order}", self._columns)
        frame._ordered = True
        return frame

    def limit(self, n: int) -> "RemoteLazyFrame":
        if self._ordered:
            # Keep the order: LIMIT belongs to the same SELECT as its ORDER BY.
            return self._derive(f"{self._relation} LIMIT {int(n)}", self._columns)
        return self._derive(f"SELECT * FROM {self._from()} LIMIT {int(n)}", self._columns)

    def distinct(self) -> "RemoteLazyFrame":
        return self._derive(f"SELECT DISTINCT * FROM {self._from()}", self._columns)

    def rename(self, mapping: dict[str, str]) -> "RemoteLazyFrame":
        exprs = [to_expr(c).alias(mapping[c]) if c in mapping else to_expr(c) for c in self.columns]
        return self.select(*exprs)

    # -- running -------------------------------------------------------------------
    def explain(self) -> str:
        """The SQL and the server's privacy explanation; nothing runs."""
        return f"SQL:\n  {self.sql()}\n\n{self._client.explain_privacy(self.sql())}"

    def collect(self, epsilon: float | None = None) -> "RemoteResult":
        """Runs the query on the server (planned and checked there) and returns a remote
        result: fetch it, or keep building on it.

        ``epsilon``: for tables in differential-privacy mode, the privacy budget this
        query may spend (at most the table's per-query maximum, which is the default).
        It travels as the ``airlock-epsilon`` call header."""
        result = RemoteResult(self._client, self.sql(), self._columns, epsilon=epsilon)
        result._execute()
        return result

    def fetch(self, wait: bool = False, timeout: float | None = None, progress: bool | None = None) -> pa.Table:
        """Runs the query and downloads what the policy releases."""
        return RemoteResult(self._client, self.sql(), self._columns).fetch(wait=wait, timeout=timeout, progress=progress)

    def describe(self) -> pa.Table:
        """A k-safe summary of each column: count, distinct values and, for numbers,
        mean, standard deviation and sum. Small groups never appear; the whole table is
        one group, so a table with fewer than k entities describes as empty."""
        schema = self._schema or self._client._schema_of(self)
        aggs: list[Expr] = []
        stats: list[tuple[str, str]] = []
        for field in schema:
            c = to_expr(field.name)
            aggs.append(c.count().alias(f"{field.name}__count"))
            aggs.append(c.n_unique().alias(f"{field.name}__n_unique"))
            stats += [(field.name, "count"), (field.name, "n_unique")]
            if pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or pa.types.is_decimal(field.type):
                aggs += [c.mean().alias(f"{field.name}__mean"), c.std().alias(f"{field.name}__std")]
                stats += [(field.name, "mean"), (field.name, "std")]
        row = self.agg(*aggs).fetch()
        names = list(dict.fromkeys(s for _, s in stats))
        out: dict[str, list[Any]] = {"statistic": names}
        for field in schema:
            out[field.name] = [
                (row.column(f"{field.name}__{s}")[0].as_py() if row.num_rows and (field.name, s) in stats else None)
                for s in names
            ]
        return pa.table(out)

    def __repr__(self) -> str:
        return f"RemoteLazyFrame({self.sql()!r})"


class GroupBy:
    """``frame.group_by(keys).agg(aggregates)``."""

    def __init__(self, frame: RemoteLazyFrame, keys: list[Expr]):
        self._frame, self._keys = frame, keys

    def agg(self, *aggs: Expr) -> RemoteLazyFrame:
        named = [a if not isinstance(a, Agg) else a.alias(a.output_name()) for a in aggs]
        select = [k.sql() for k in self._keys] + [a.sql() for a in named]
        sql = f"SELECT {', '.join(select)} FROM {self._frame._from()}"
        if self._keys:
            sql += f" GROUP BY {', '.join(k.unaliased().sql() for k in self._keys)}"
        cols = [k.output_name() for k in self._keys] + [a.output_name() for a in named]
        return self._frame._derive(sql, cols)


class RemoteResult(RemoteLazyFrame):
    """A query the server accepted. Fetch its rows, or start further lazy queries from
    it: the server evaluates the combined query against the sources' policies."""

    def __init__(self, client: "Client", sql: str, columns: Sequence[str] | None, epsilon: float | None = None):
        super().__init__(client, sql, columns)
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

    def to_pandas(self, **fetch_args: Any):
        return self.fetch(**fetch_args).to_pandas()

    def to_polars(self, **fetch_args: Any):
        import polars as pl

        return pl.from_arrow(self.fetch(**fetch_args))

    def _derive(self, sql: str, columns: Sequence[str] | None) -> RemoteLazyFrame:
        return RemoteLazyFrame(self._client, sql, columns)

    def __repr__(self) -> str:
        return f"RemoteResult({self._relation!r})"
