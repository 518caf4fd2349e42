"""Airlock's Python client: lazy, privacy-aware remote data frames.

    import airlock
    from airlock import col

    client = airlock.connect("grpc://127.0.0.1:50051", "analyst", "analyst")
    patients = client.table("hospital.patients")
    by_ward = patients.group_by("ward").agg(airlock.count().alias("n"), col("cost").mean())
    print(by_ward.sql())
    table = by_ward.collect().fetch()
"""

from ._client import Client, TableInfo, connect
from ._errors import AirlockError, ApprovalDenied, ApprovalPending, PolicyViolation
from ._expr import Expr, col, count, lit
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
    "lit",
]
