"""Mutual TLS through the real clients: ADBC (Go Flight SQL driver) and pyarrow.flight.

The server (`airlock serve`) serves the session demo's data with `[tls] client_ca` set;
certificates come from `pki.py` (a CA made for this test run with `cryptography`).
`etl` logs in with its certificate alone; `analyst` with a password over any certificate
of the CA. No certificate, one from another CA and an expired one are refused in the TLS
handshake.
"""

from __future__ import annotations

from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow.flight as flight
import pytest
from adbc_driver_flightsql import DatabaseOptions

import pki
from conftest import start_server, stop_server

GROUPED = "SELECT ward, count(*) AS n FROM hospital.patients GROUP BY ward"


@pytest.fixture(scope="module")
def mtls(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("mtls")
    certs = pki.write(root / "pki")
    demo = Path(server.state_dir) / "demo"
    users = (demo / "users.toml").read_text() + (
        '\n[users.etl]\nlogin = "certificate"\ncertificate = "CN=etl"\nroles = ["analyst"]\n'
    )
    (root / "users.toml").write_text(users)
    datasets = "".join(
        f'\n[[datasets]]\nname = "{p.parent.name}.{p.stem}"\npath = "{p}"\n'
        for p in sorted((demo / "data").rglob("*.parquet"))
    )
    (root / "airlock.toml").write_text(
        f'listen = "127.0.0.1:0"\npolicy_dir = "{demo / "policies"}"\n'
        f'users_file = "{root / "users.toml"}"\nstate_dir = "{root / "state"}"\n'
        f'[tls]\ncert = "{certs / "server.pem"}"\nkey = "{certs / "server.key"}"\n'
        f'client_ca = "{certs / "ca.pem"}"\n{datasets}'
    )
    srv = start_server(root, extra=["serve", "--config", str(root / "airlock.toml")])
    srv.certs = certs
    yield srv
    stop_server(srv)


def _pem(srv, name: str) -> str:
    return (srv.certs / name).read_text()


def adbc(srv, client: str | None, user: str | None = None):
    kwargs = {DatabaseOptions.TLS_ROOT_CERTS.value: _pem(srv, "ca.pem")}
    if client:
        kwargs[DatabaseOptions.MTLS_CERT_CHAIN.value] = _pem(srv, f"{client}.pem")
        kwargs[DatabaseOptions.MTLS_PRIVATE_KEY.value] = _pem(srv, f"{client}.key")
    if user:
        kwargs["username"] = user
        kwargs["password"] = user
    return flightsql.connect(f"grpc+tls://localhost:{srv.port}", db_kwargs=kwargs)


def pyarrow_client(srv, client: str | None) -> flight.FlightClient:
    extra = {}
    if client:
        extra = {"cert_chain": (srv.certs / f"{client}.pem").read_bytes(),
                 "private_key": (srv.certs / f"{client}.key").read_bytes()}
    return flight.FlightClient(
        f"grpc+tls://localhost:{srv.port}", tls_root_certs=(srv.certs / "ca.pem").read_bytes(), **extra
    )


def test_adbc_certificate_only_login(mtls):
    with adbc(mtls, "etl") as conn, conn.cursor() as cur:
        cur.execute(GROUPED)
        table = cur.fetch_arrow_table()
    assert table.num_rows > 0 and sum(table.column("n").to_pylist()) > 0


def test_adbc_password_over_a_client_certificate(mtls):
    with adbc(mtls, "analyst", user="analyst") as conn, conn.cursor() as cur:
        cur.execute(GROUPED)
        assert cur.fetch_arrow_table().num_rows > 0


def test_pyarrow_flight_with_client_certificates(mtls):
    from test_pyarrow_flight import statement_query

    descriptor = flight.FlightDescriptor.for_command(statement_query(GROUPED))
    # Certificate only: no handshake, no header.
    c = pyarrow_client(mtls, "etl")
    info = c.get_flight_info(descriptor)
    assert c.do_get(info.endpoints[0].ticket).read_all().num_rows > 0
    # Password users over any certificate of the CA.
    c = pyarrow_client(mtls, "analyst")
    options = flight.FlightCallOptions(headers=[c.authenticate_basic_token("analyst", "analyst")])
    info = c.get_flight_info(descriptor, options)
    assert c.do_get(info.endpoints[0].ticket, options).read_all().num_rows > 0
    # A certificate naming no certificate user, without credentials: unauthenticated.
    c = pyarrow_client(mtls, "analyst")
    with pytest.raises(flight.FlightUnauthenticatedError):
        c.get_flight_info(descriptor)


@pytest.mark.parametrize("client", [None, "other-ca", "expired"])
def test_connections_without_a_valid_certificate_are_refused(mtls, client):
    from test_pyarrow_flight import statement_query

    c = pyarrow_client(mtls, client)
    with pytest.raises(flight.FlightError):
        c.authenticate_basic_token("analyst", "analyst")
    with pytest.raises(flight.FlightError):
        c.get_flight_info(flight.FlightDescriptor.for_command(statement_query("SELECT 1")))
    with pytest.raises(Exception):
        with adbc(mtls, client, user="analyst") as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetch_arrow_table()
