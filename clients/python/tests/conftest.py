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


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("airlock-client-state")
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
    yield Server(proc, addr)
    proc.terminate()
    proc.wait(timeout=10)
