"""Airlock's Python client: lazy, privacy-aware remote data frames with polars' API.

    import airlock
    from airlock import col

    client = airlock.connect("grpc://127.0.0.1:50051", "analyst", "analyst")
    patients = client.table("hospital.patients")
    by_ward = patients.group_by("ward").agg(airlock.len(), col("cost").mean(), col("zip").n_unique())
    print(by_ward.sql())
    table = by_ward.collect().fetch()          # or .to_polars(), .to_pandas()

The client compiles every method to SQL and leaves the privacy decision to the server: a
refused query raises :class:`PolicyViolation` with the server's reason code.
"""

from typing import Any as _Any

from ._client import Client, TableInfo, connect
from ._compat import missing_attribute as _missing_attribute
from ._errors import AirlockError, ApprovalDenied, ApprovalPending, PolicyViolation
from ._expr import (
    Expr,
    col,
    count,
    first,
    last,
    len,
    lit,
    max,
    mean,
    median,
    min,
    n_unique,
    std,
    sum,
    var,
    when,
)
from ._frame import GroupBy, RemoteLazyFrame, RemoteResult

__all__ = [
    "AirlockError",
    "ApprovalDenied",
    "ApprovalPending",
    "Client",
    "Expr",
    "GroupBy",
    "PolicyViolation",
    "RemoteLazyFrame",
    "RemoteResult",
    "TableInfo",
    "col",
    "connect",
    "count",
    "first",
    "last",
    "len",
    "lit",
    "max",
    "mean",
    "median",
    "min",
    "n_unique",
    "std",
    "sum",
    "var",
    "when",
]


def __getattr__(name: str) -> _Any:
    """``airlock.<polars function>`` that the client lacks: NotImplementedError naming it."""
    raise _missing_attribute("polars", __import__(__name__), name)
