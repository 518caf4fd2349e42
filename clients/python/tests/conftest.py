"""A real `airlock demo` server on 127.0.0.1:0 for the client's tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def airlock_binary() -> str:
    explicit = os.environ.get("AIRLOCK_BIN")
    if explicit:
        return explicit
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return str(target / "debug" / "airlock")


class Server:
    def __init__(self, proc, addr):
        self.proc, self.addr = proc, addr
        self.uri = f"grpc://{addr}"


def start_demo(state: Path):
    proc = subprocess.Popen(
        [airlock_binary(), "demo", "--listen", "127.0.0.1:0", "--state-dir", str(state), "--patients", "5000",
         "--console-listen", "off"],
        stdout=subprocess.PIPE, stderr=sys.stderr, text=True,
    )
    addr = None
    for line in proc.stdout:
        m = re.match(r"airlock listening on (\S+)", line)
        if m:
            addr = m.group(1)
            break
    assert addr, "airlock demo did not start"
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return Server(proc, addr)


def stop(server: Server) -> None:
    server.proc.terminate()
    server.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = start_demo(tmp_path_factory.mktemp("airlock-client-state"))
    yield srv
    stop(srv)


@pytest.fixture(scope="session")
def strict_server(tmp_path_factory):
    """A demo whose analyst holds `aggregate` but not `request`: what the automatic rules
    do not release is refused with its own reason code instead of going to approval."""
    import airlock

    state = tmp_path_factory.mktemp("airlock-strict-state")
    srv = start_demo(state)
    try:
        policy = state / "demo" / "policies" / "policy.csv"
        kept = [l for l in policy.read_text().splitlines() if not re.fullmatch(r"p,\s*analyst,.*,\s*request\s*", l)]
        policy.write_text("\n".join(kept) + "\n")
        with airlock.connect(srv.uri, "owner", "owner") as owner:
            owner._action("ReloadPolicy", b"")
        with airlock.connect(srv.uri, "analyst", "analyst") as analyst:
            actions = {t.name: t.actions for t in analyst.tables()}
        assert actions and all(a == ["aggregate"] for a in actions.values()), actions
    except BaseException:
        stop(srv)
        raise
    yield srv
    stop(srv)
