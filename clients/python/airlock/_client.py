"""Connections: ADBC's Flight SQL driver for queries, pyarrow.flight for Airlock's actions."""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from typing import Any

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pyarrow.flight as flight

from ._errors import translate
from ._frame import RemoteLazyFrame

__all__ = ["Client", "TableInfo", "connect"]


@dataclass
class TableInfo:
    """A table the principal can see, and what they may do with it."""

    name: str
    schema: pa.Schema
    actions: list[str] = field(default_factory=list)


class Client:
    """An authenticated connection to an Airlock server."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None, *,
                 tls_root_certs: bytes | None = None, token: str | None = None):
        db_kwargs: dict[str, str] = {}
        if token:
            db_kwargs["adbc.flight.sql.authorization_header"] = f"Bearer {token}"
        else:
            db_kwargs.update(username=user or "", password=password or "")
        if tls_root_certs:
            db_kwargs["adbc.flight.sql.client_option.tls_root_certs"] = tls_root_certs.decode()
        try:
            self._conn = flightsql.connect(url, db_kwargs=db_kwargs, autocommit=True)
        except Exception as e:
            raise translate(e) from None
        location = url.replace("grpc://", "grpc+tcp://", 1)
        self._flight = flight.FlightClient(location, tls_root_certs=tls_root_certs)
        header = (b"authorization", f"Bearer {token}".encode()) if token else self._flight.authenticate_basic_token(user, password)
        self._options = flight.FlightCallOptions(headers=[header])
        # Results executed by collect() and not fetched yet: close() closes their cursors.
        self._open_results: weakref.WeakSet = weakref.WeakSet()

    # -- catalog -------------------------------------------------------------------
    def tables(self) -> list[TableInfo]:
        """Every table this principal can see, with its schema and allowed actions."""
        answer = self._json_action("MyAccess", b"")
        # Servers before quotas answered with the list of tables alone.
        listed = answer["tables"] if isinstance(answer, dict) else answer
        access = {a["table"]: a["actions"] for a in listed}
        out = []
        for name, actions in sorted(access.items()):
            schema_name, table = name.split(".", 1)
            out.append(TableInfo(name, self._conn.adbc_get_table_schema(table, db_schema_filter=schema_name), actions))
        return out

    def quota(self) -> dict:
        """What is left of this principal's quotas (``None`` where there is no limit)."""
        answer = self._json_action("MyAccess", b"")
        return answer.get("quota", {}) if isinstance(answer, dict) else {}

    def table(self, name: str) -> RemoteLazyFrame:
        """A lazy frame over a table (``schema.table``)."""
        schema_name, table = name.split(".", 1)
        try:
            schema = self._conn.adbc_get_table_schema(table, db_schema_filter=schema_name)
        except Exception as e:
            raise translate(e) from None
        return RemoteLazyFrame(self, name, schema.names, schema, is_table=True)

    def sql(self, query: str) -> RemoteLazyFrame:
        """An escape hatch: a lazy frame over any SQL the server accepts."""
        return RemoteLazyFrame(self, query, None)

    # -- Airlock's actions ----------------------------------------------------------
    def explain_privacy(self, sql: str) -> str:
        return self._action("PrivacyExplain", sql.encode()).decode()

    def request_status(self, request_id: str) -> dict[str, Any]:
        return self._json_action("RequestStatus", json.dumps({"id": request_id}).encode())

    def _action(self, kind: str, body: bytes) -> bytes:
        try:
            results = list(self._flight.do_action(flight.Action(kind, body), self._options))
        except Exception as e:
            raise translate(e) from None
        return b"".join(r.body.to_pybytes() for r in results)

    def _json_action(self, kind: str, body: bytes) -> Any:
        return json.loads(self._action(kind, body) or b"null")

    def _schema_of(self, frame: RemoteLazyFrame) -> pa.Schema:
        if frame._schema is not None:
            return frame._schema
        raise ValueError("describe() needs a frame whose schema is known: start from client.table()")

    def close(self) -> None:
        for result in list(self._open_results):
            result._close()
        self._conn.close()
        self._flight.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str, user: str | None = None, password: str | None = None, *,
            tls_root_certs: bytes | None = None, token: str | None = None) -> Client:
    """Connects to an Airlock server: ``grpc://host:port`` (or ``grpc+tls://``)."""
    return Client(url, user, password, tls_root_certs=tls_root_certs, token=token)
