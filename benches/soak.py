#!/usr/bin/env python3
"""Soak: many concurrent ADBC clients against the demo for minutes, with one SIGKILL and
restart in the middle (issue 15). Started by `benches/run.sh --soak`; prints a Markdown
report (and writes --json) for docs/RELIABILITY.md.

Clients (default 64) each loop over a weighted mix:
- aggregates as `analyst` (k-thresholded, hospital.patients / hospital.visits),
- queries the policy refuses (STATEMENT_NOT_ALLOWED, EXPRESSION_NOT_ALLOWED, ...),
- approval requests (a row-level query as `analyst`: APPROVAL_PENDING creates or finds
  the request),
- downloads as `owner` (rows of hospital.visits; the demo has no separate reader).

A refusal with an expected code counts as a success of its kind. Anything else is an
error; errors are reported separately inside and outside the restart window (from the
kill until the server listens again, plus a few seconds for clients to reconnect).
RSS and open file descriptors of the server are sampled every few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql

AGGREGATES = [
    "SELECT ward, count(*) AS n, avg(cost) AS c FROM hospital.patients GROUP BY ward",
    "SELECT diagnosis, count(*) AS n FROM hospital.patients GROUP BY diagnosis",
    "SELECT sex, avg(age) AS a FROM hospital.patients WHERE age > 40 GROUP BY sex",
    "SELECT count(*) AS n, avg(cost) AS c FROM hospital.visits",
]
REFUSED = [
    ("DROP TABLE hospital.patients", "STATEMENT_NOT_ALLOWED"),
    # The analyst holds `request`, so an expression the allow-list refuses becomes a request.
    ("SELECT sum(cost * CAST(age = 67 AS DOUBLE)) FROM hospital.patients", "APPROVAL_PENDING"),
    ("SELECT count(*) AS __airlock_x FROM hospital.patients", "RESERVED_NAME"),
]
REQUESTS = [
    "SELECT patient_id, cost FROM hospital.patients WHERE cost > 190000",
]
DOWNLOAD = "SELECT * FROM hospital.visits LIMIT 20000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, binary: str, state: Path, port: int, scale: float, log: Path):
        self.argv = [binary, "demo", "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
                     "--scale", str(scale), "--console-listen", "off"]
        self.log = open(log, "a")
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        started = time.time()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self.log, text=True)
        for line in self.proc.stdout:
            if re.match(r"airlock listening on (\S+)", line):
                break
        else:
            raise RuntimeError(f"demo did not start (exit {self.proc.wait()})")
        threading.Thread(target=lambda p=self.proc: [None for _ in p.stdout], daemon=True).start()
        return time.time() - started

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def sample(self) -> tuple[int, int]:
        """(RSS bytes, open file descriptors) of the running server."""
        pid = self.proc.pid
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))


def code_of(e: Exception) -> str | None:
    m = re.search(r"\[([A-Z_]+)\]", str(e))
    return m.group(1) if m else None


class Stats:
    def __init__(self):
        # When the server was killed: a connection opened before it holds a bearer token
        # the new process does not know (tokens live in memory), so its first call after
        # the restart is UNAUTHENTICATED; the client reconnects. Counted apart.
        self.killed_at: float | None = None
        self.stale = 0
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, float, str | None]] = []  # (t, kind, seconds, error)

    def add(self, kind: str, seconds: float, error: str | None = None):
        with self.lock:
            self.events.append((time.time(), kind, seconds, error))


def client(i: int, uri: str, deadline: float, stats: Stats, seed: int):
    rnd = random.Random(seed + i)
    conns: dict[str, tuple[object, float]] = {}

    def conn(user: str):
        if user not in conns:
            c = flightsql.connect(uri, db_kwargs={"username": user, "password": user})
            conns[user] = (c, time.time())
        return conns[user][0]

    def drop(user: str):
        c = conns.pop(user, None)
        if c is not None:
            try:
                c[0].close()
            except Exception:
                pass

    def stale(user: str, e: Exception) -> bool:
        opened = conns.get(user, (None, time.time()))[1]
        return ("UNAUTHENTICATED" in str(e) and stats.killed_at is not None
                and opened < stats.killed_at)

    while time.time() < deadline:
        r = rnd.random()
        if r < 0.6:
            kind, user, sql, expect = "aggregate", "analyst", rnd.choice(AGGREGATES), None
        elif r < 0.75:
            kind, user = "refused", "analyst"
            sql, expect = rnd.choice(REFUSED)
        elif r < 0.85:
            kind, user, sql, expect = "request", "analyst", rnd.choice(REQUESTS), "APPROVAL_PENDING"
        else:
            kind, user, sql, expect = "download", "owner", DOWNLOAD, None
        started = time.perf_counter()
        cur = None
        try:
            cur = conn(user).cursor()
            cur.execute(sql)
            cur.fetch_arrow_table()
            elapsed = time.perf_counter() - started
            if expect:
                stats.add(kind, elapsed, f"expected a refusal ({expect}), got rows")
            else:
                stats.add(kind, elapsed)
        except Exception as e:  # noqa: BLE001 - every failure is classified below
            elapsed = time.perf_counter() - started
            code = code_of(e)
            # A cursor is closed before its connection (ADBC refuses the other order).
            try:
                cur.close()
            except Exception:
                pass
            cur = None
            if expect and code == expect:
                stats.add(kind, elapsed)
            elif stale(user, e):
                with stats.lock:
                    stats.stale += 1
                drop(user)
            else:
                stats.add(kind, elapsed, f"{type(e).__name__}: {str(e)[:200]}")
                drop(user)
                time.sleep(0.2)
        finally:
            if cur is not None:
                try:
                    cur.close()
                except Exception:
                    pass
    for u in list(conns):
        drop(u)


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--airlock", required=True, help="the (release) airlock binary")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--scale", type=float, default=1.0, help="demo scale (1 = 100 000 patients)")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds after the restart still counted in the restart window")
    p.add_argument("--json", type=Path)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    state = Path(tempfile.mkdtemp(prefix="airlock-soak-"))
    port = free_port()
    demo = Demo(args.airlock, state, port, args.scale, state / "server.log")
    print(f"[soak] state and log in {state}", file=sys.stderr)
    first_start = demo.start()
    uri = f"grpc://127.0.0.1:{port}"
    stats = Stats()
    t0 = time.time()
    deadline = t0 + args.seconds
    threads = [threading.Thread(target=client, args=(i, uri, deadline, stats, args.seed))
               for i in range(args.clients)]
    for t in threads:
        t.start()

    samples: list[tuple[float, int, int]] = []
    window = None
    killed = False
    while time.time() < deadline:
        now = time.time()
        try:
            rss, fds = demo.sample()
            samples.append((now - t0, rss, fds))
        except (FileNotFoundError, ProcessLookupError):
            pass
        if not killed and now - t0 >= args.seconds / 2:
            print("[soak] SIGKILL", file=sys.stderr)
            kill_at = time.time()
            stats.killed_at = kill_at
            demo.kill()
            restart = demo.start()
            window = (kill_at, time.time() + args.grace)
            killed = True
            print(f"[soak] restarted in {restart:.1f} s", file=sys.stderr)
        time.sleep(args.sample_every)
    for t in threads:
        t.join()
    demo.stop()

    ev = stats.events
    inside = [e for e in ev if window and window[0] <= e[0] <= window[1]]
    outside = [e for e in ev if not (window and window[0] <= e[0] <= window[1])]
    errors_out = [e for e in outside if e[3]]
    errors_in = [e for e in inside if e[3]]
    ok = [e for e in ev if not e[3]]
    by_kind = {}
    for kind in ["aggregate", "refused", "request", "download"]:
        xs = [e[2] for e in ok if e[1] == kind]
        by_kind[kind] = {"n": len(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99)}
    lat = [e[2] for e in ok]
    # RSS growth: the second half of the run after the restart (warm) against its start.
    after = [s for s in samples if window and s[0] + t0 > window[1] + 30]
    r = {
        "clients": args.clients, "seconds": args.seconds, "scale": args.scale,
        "first_start_seconds": first_start,
        "restart_window_seconds": (window[1] - window[0]) if window else None,
        "requests": len(ev), "ok": len(ok),
        "throughput_per_s": len(ok) / args.seconds,
        "p50": percentile(lat, 50), "p99": percentile(lat, 99), "by_kind": by_kind,
        "errors_outside_restart": len(errors_out), "errors_in_restart": len(errors_in),
        "stale_tokens": stats.stale,
        "error_examples": sorted({e[3] for e in errors_out})[:10],
        "rss_max": max((s[1] for s in samples), default=0),
        "rss_after_restart_first": after[0][1] if after else None,
        "rss_after_restart_last": after[-1][1] if after else None,
        "fds_max": max((s[2] for s in samples), default=0),
        "fds_last": samples[-1][2] if samples else None,
        "samples": samples,
    }
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    mib = lambda b: f"{b / 2**20:,.0f} MiB" if b else "n/a"  # noqa: E731
    print(f"""| figure | value |
|---|---|
| clients, duration, demo scale | {args.clients}, {args.seconds:.0f} s, {args.scale} ({int(100000 * args.scale):,} patients) |
| answered (incl. expected refusals) | {len(ok):,} ({len(ok) / args.seconds:,.1f}/s) |
| latency p50 / p99, all kinds | {r['p50'] * 1e3:,.0f} / {r['p99'] * 1e3:,.0f} ms |
| aggregates p50 / p99 (n) | {by_kind['aggregate']['p50'] * 1e3:,.0f} / {by_kind['aggregate']['p99'] * 1e3:,.0f} ms ({by_kind['aggregate']['n']:,}) |
| refusals p50 / p99 (n) | {by_kind['refused']['p50'] * 1e3:,.0f} / {by_kind['refused']['p99'] * 1e3:,.0f} ms ({by_kind['refused']['n']:,}) |
| approval requests p50 / p99 (n) | {by_kind['request']['p50'] * 1e3:,.0f} / {by_kind['request']['p99'] * 1e3:,.0f} ms ({by_kind['request']['n']:,}) |
| downloads (20 000 rows) p50 / p99 (n) | {by_kind['download']['p50'] * 1e3:,.0f} / {by_kind['download']['p99'] * 1e3:,.0f} ms ({by_kind['download']['n']:,}) |
| SIGKILL → listening again, + {args.grace:.0f} s grace | {r['restart_window_seconds']:.1f} s window |
| errors outside the restart window | **{len(errors_out)}** |
| errors inside the restart window (reconnects) | {len(errors_in)} |
| connections whose token died with the process (re-authenticated) | {stats.stale} |
| server RSS: max; after restart, first → last sample | {mib(r['rss_max'])}; {mib(r['rss_after_restart_first'])} → {mib(r['rss_after_restart_last'])} |
| open file descriptors: max, last | {r['fds_max']}, {r['fds_last']} |""")
    for e in r["error_examples"]:
        print(f"- error: {e}")
    return 0 if not errors_out else 1


if __name__ == "__main__":
    sys.exit(main())
