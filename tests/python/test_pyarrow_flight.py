"""Raw pyarrow.flight against the server: handshake, FlightInfo, DoGet."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.flight as flight
import pytest


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def statement_query(sql: str) -> bytes:
    """Any{CommandStatementQuery{query}} encoded by hand: pyarrow has no Flight SQL protos."""
    inner = _field(1, sql.encode())
    type_url = b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
    return _field(1, type_url) + _field(2, inner)


def client(server, user):
    c = flight.FlightClient(f"grpc+tcp://{server.addr}")
    header = c.authenticate_basic_token(user, user)
    return c, flight.FlightCallOptions(headers=[header])


def test_basic_token_handshake_and_doget(server):
    c, options = client(server, "analyst")
    descriptor = flight.FlightDescriptor.for_command(
        statement_query("SELECT sex, count(*) AS n FROM hospital.patients GROUP BY sex ORDER BY sex")
    )
    info = c.get_flight_info(descriptor, options)
    assert info.total_records == -1 and info.total_bytes == -1
    reader = c.do_get(info.endpoints[0].ticket, options)
    table = reader.read_all()
    assert table.schema == info.schema, "FlightInfo's schema is the stream's schema"
    assert table.column("sex").to_pylist() == ["F", "M"]
    assert sum(table.column("n").to_pylist()) == 5000


def test_tickets_are_bound_to_their_principal(server):
    owner, owner_opts = client(server, "owner")
    analyst, analyst_opts = client(server, "analyst")
    info = owner.get_flight_info(
        flight.FlightDescriptor.for_command(statement_query("SELECT count(*) FROM hospital.staff")), owner_opts
    )
    # INVALID_ARGUMENT surfaces in pyarrow as ArrowInvalid; a foreign ticket and garbage
    # get the same answer.
    with pytest.raises(pa.ArrowInvalid, match="unknown or expired ticket"):
        analyst.do_get(info.endpoints[0].ticket, analyst_opts).read_all()
    with pytest.raises(pa.ArrowInvalid):
        analyst.do_get(flight.Ticket(b"garbage"), analyst_opts).read_all()
    assert owner.do_get(info.endpoints[0].ticket, owner_opts).read_all().num_rows == 1


def test_no_credentials_is_unauthenticated(server):
    c = flight.FlightClient(f"grpc+tcp://{server.addr}")
    with pytest.raises(flight.FlightUnauthenticatedError):
        c.get_flight_info(flight.FlightDescriptor.for_command(statement_query("SELECT 1")))
    with pytest.raises(flight.FlightUnauthenticatedError):
        c.authenticate_basic_token("analyst", "wrong")
