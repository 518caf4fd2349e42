"""Starts a real `airlock demo` server on 127.0.0.1:0 for the Python client tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def airlock_binary() -> str:
    explicit = os.environ.get("AIRLOCK_BIN")
    if explicit:
        return explicit
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return str(target / "debug" / "airlock")


class Server:
    def __init__(self, proc: subprocess.Popen, addr: str, console: str | None = None,
                 state_dir: Path | None = None):
        self.proc = proc
        # The demo's state directory (its data, policies and users under demo/).
        self.state_dir = state_dir
        self.addr = addr
        # The owner console's base URL (http://host:port), when it is served.
        self.console = console
        self.uri = f"grpc://{addr}"
        host, port = addr.rsplit(":", 1)
        self.host = host
        self.port = int(port)


def start_server(state_dir: Path, patients: int = 5000, console: bool = True,
                 extra: list[str] | None = None) -> Server:
    """`airlock demo` (or, when `extra` starts with "serve", those arguments) on 127.0.0.1:0."""
    if extra and extra[0] == "serve":
        args = [airlock_binary(), *extra]
        console = False
    else:
        args = [airlock_binary(), "demo", "--listen", "127.0.0.1:0", "--state-dir", str(state_dir),
                "--patients", str(patients),
                "--console-listen", "127.0.0.1:0" if console else "off", *(extra or [])]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
    )
    assert proc.stdout is not None
    addr = None
    console_url = None
    for line in proc.stdout:
        m = re.match(r"airlock listening on (\S+)", line)
        if m:
            addr = m.group(1)
            if not console:
                break
        m = re.match(r"console listening on (\S+?)/?$", line.strip())
        if m:
            console_url = m.group(1)
            break
    if addr is None or (console and console_url is None):
        proc.kill()
        raise RuntimeError(f"airlock demo did not start (exit {proc.wait()})")
    # Keep draining stdout so the server never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return Server(proc, addr, console_url, state_dir)


def stop_server(srv: Server) -> None:
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        srv.proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    srv = start_server(tmp_path_factory.mktemp("airlock-state"))
    yield srv
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
