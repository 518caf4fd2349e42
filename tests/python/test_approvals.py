"""The approval workflow through the real ADBC driver and the `airlock approvals` CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pytest

from conftest import airlock_binary


def connect(server, user):
    return flightsql.connect(server.uri, db_kwargs={"username": user, "password": user})


def owner_cli(server, *args):
    env = dict(os.environ, AIRLOCK_URL=server.uri, AIRLOCK_USER="owner", AIRLOCK_PASSWORD="owner")
    out = subprocess.run([airlock_binary(), "approvals", *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def pending_request(conn, sql) -> str:
    with conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.execute(sql)
            cur.fetchall()
    m = re.search(r"\[APPROVAL_PENDING\] request (\w+): (.*)", str(err.value))
    assert m, str(err.value)
    return m.group(1)


def test_pending_approve_rerun(server):
    sql = "SELECT name, zip, age FROM hospital.patients WHERE age > 88 ORDER BY zip LIMIT 4"
    with connect(server, "analyst") as conn:
        request = pending_request(conn, sql)
        listed = owner_cli(server, "list")
        assert request in {r["id"] for r in listed}
        shown = owner_cli(server, "show", request)
        assert shown["sql"] == sql and shown["would_release_rows"] == 4
        owner_cli(server, "approve", request, "--max-rows", "3")
        with conn.cursor() as cur:
            cur.execute(sql)
            rows = cur.fetchall()
        assert len(rows) == 3
        assert all(name == "*" for name, _, _ in rows), "masks still apply"
        # Single use: asking again is a new request.
        assert pending_request(conn, sql) != request


def test_deny_reaches_the_analyst_with_the_reason(server):
    sql = "SELECT ssn FROM hospital.patients LIMIT 2"
    with connect(server, "analyst") as conn:
        request = pending_request(conn, sql)
        owner_cli(server, "deny", request, "--reason", "no identifiers")
        with conn.cursor() as cur:
            with pytest.raises(adbc_driver_manager.Error) as err:
                cur.execute(sql)
        assert f"[APPROVAL_DENIED] request {request}: no identifiers" in str(err.value)
