#!/usr/bin/env python3
"""Runs every Airlock benchmark side by side and writes docs/BENCHMARKS.md.

Started by benches/run.sh, which builds the binaries, installs this script's packages
(benches/requirements.txt), generates the TPC-H data and runs the criterion benches
first. Everything talks over loopback; the systems compared run side by side and are
measured interleaved, round by round.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import duckdb
import pyarrow as pa
import pyarrow.flight as flight

ROOT = Path(__file__).resolve().parent.parent
TPCH = ROOT / "benches" / "tpch"
QUERIES = ["q1", "q3", "q5", "q6", "q10", "q12", "q14", "q19"]
TABLES = ["region", "nation", "supplier", "customer", "part", "partsupp", "orders", "lineitem"]

# Small aggregates over protected tables for the concurrency run: each is k-safe and
# reads one table (customer: 150 000 rows at SF 1; orders: 1.5 M).
# DP against threshold mode (issue 11): the same grouped aggregate over lineitem, once
# under the bench policy (k = 5) and once with lineitem in DP mode (policies-dp).
# Each run adds a different no-op bound (`l_quantity < 1000000 + i`), so each is a new
# query: a DP repeat would be served its kept answer without executing (PRIVACY.md §5b).
DP_QUERY = (
    "SELECT l_returnflag, l_linestatus, count(*) AS n, sum(l_quantity) AS q, "
    "avg(l_extendedprice) AS p FROM tpch.lineitem WHERE l_shipdate <= DATE '1998-09-02' "
    "AND l_quantity < {bound} GROUP BY l_returnflag, l_linestatus"
)

SMALL_QUERIES = [
    "SELECT c_mktsegment, count(*) AS n, avg(c_acctbal) AS balance "
    "FROM tpch.customer GROUP BY c_mktsegment",
    "SELECT c_nationkey, count(*) AS n FROM tpch.customer "
    "WHERE c_acctbal > 5000 GROUP BY c_nationkey",
    "SELECT o_orderpriority, count(*) AS n FROM tpch.orders "
    "WHERE o_orderdate >= date '1995-01-01' AND o_orderdate < date '1995-04-01' "
    "GROUP BY o_orderpriority",
]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- servers --------------------------------------------------------------------------


class Server:
    """A child process that prints its address on a line matching `ready`."""

    def __init__(self, name: str, argv: list[str], ready: str, logdir: Path, env=None):
        self.name = name
        started = time.monotonic()
        self.log = open(logdir / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 600
        pattern = re.compile(ready)
        self.addr = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.write(line)
            m = pattern.search(line)
            if m:
                self.addr = m.group(1)
                break
        if self.addr is None:
            self.stop()
            raise RuntimeError(f"{name} did not start; see {self.log.name}")
        self.start_seconds = time.monotonic() - started
        threading.Thread(target=self._drain, daemon=True).start()
        self.uri = f"grpc://{self.addr}"

    def _drain(self):
        for line in self.proc.stdout:
            self.log.write(line)

    def rss_reset(self) -> None:
        """Resets the kernel's peak-RSS counter (VmHWM) of the process."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def rss_peak(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextmanager
def running(*args, **kwargs):
    s = Server(*args, **kwargs)
    try:
        yield s
    finally:
        s.stop()


def airlock(args, name: str, config: Path, logdir: Path, policy_dir: Path | None = None):
    state = Path(tempfile.mkdtemp(prefix=f"airlock-{name}-"))
    policy = ["--policy-dir", str(policy_dir)] if policy_dir else []
    return running(
        name,
        [str(args.airlock), "serve", "--config", str(config), "--listen", "127.0.0.1:0",
         "--state-dir", str(state), *policy],
        r"airlock listening on (\S+)",
        logdir,
    )


def hot_config(base: Path, data: Path, out: Path, budget: str) -> Path:
    """The bench configuration with every dataset `cache = true`, paths made absolute."""
    text = base.read_text()
    text = re.sub(r'^(policy_dir|users_file) = "([^"]+)"',
                  lambda m: f'{m.group(1)} = "{(base.parent / m.group(2)).resolve()}"',
                  text, flags=re.M)
    text = re.sub(r'^path = "data/([^"]+)"',
                  lambda m: f'path = "{(data / m.group(1)).resolve()}"\ncache = true',
                  text, flags=re.M)
    text = text.replace("[limits]\n", f'[limits]\ncache_memory = "{budget}"\n', 1)
    out.write_text(text)
    return out


# ---- clients --------------------------------------------------------------------------


def connect(uri: str, user: str | None):
    kwargs = {"username": user, "password": user} if user else {}
    return flightsql.connect(uri, db_kwargs=kwargs, autocommit=True)


def adbc_query(conn, sql: str) -> pa.Table:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table()


class InProc:
    """The harness's `inproc` serving queries one at a time (DataFusion, no transport)."""

    def __init__(self, harness: Path, data: Path, source: str, logdir: Path):
        self.proc = subprocess.Popen(
            [str(harness / "inproc"), "--data", str(data), "--source", source],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(logdir / f"inproc-{source}.log", "w"), text=True,
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"inproc ({source}) did not start; see {logdir}")

    def run(self, query: str) -> tuple[float, int]:
        self.proc.stdin.write(f"{TPCH / 'queries' / query}.sql\n")
        self.proc.stdin.flush()
        seconds, rows = self.proc.stdout.readline().split()
        return float(seconds), int(rows)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def flight_runner(uri: str, user: str | None, sqls: dict, stack: ExitStack):
    conn = connect(uri, user)
    stack.callback(conn.close)

    def run(query: str) -> tuple[float, int]:
        started = time.perf_counter()
        table = adbc_query(conn, sqls[query])
        return time.perf_counter() - started, table.num_rows

    return run


def varying_runner(uri: str, user: str | None, template: str, stack: ExitStack):
    """Runs `template` with a new `{bound}` each time (a new query for the DP ledger)."""
    conn = connect(uri, user)
    stack.callback(conn.close)
    count = iter(range(1_000_000, 2_000_000))

    def run(query: str) -> tuple[float, int]:
        sql = template.format(bound=next(count))
        started = time.perf_counter()
        table = adbc_query(conn, sql)
        return time.perf_counter() - started, table.num_rows

    return run


def duckdb_runner(data: Path, sqls: dict, stack: ExitStack):
    con = duckdb.connect()
    stack.callback(con.close)
    con.execute("CREATE SCHEMA tpch")
    for t in TABLES:
        con.execute(f"CREATE VIEW tpch.{t} AS SELECT * FROM read_parquet('{data / t}.parquet')")

    def run(query: str) -> tuple[float, int]:
        started = time.perf_counter()
        table = con.sql(sqls[query]).to_arrow_table()
        return time.perf_counter() - started, table.num_rows

    return run


def interleaved(runners: dict, items: list, warmup: int, runs: int):
    """Every system runs every item once per round, systems in a rotating order, so a
    slow moment of the machine falls on all of them alike. Round 0..warmup-1 is warm-up.
    Returns ({system: {item: [seconds]}}, {system: {item: last answer}})."""
    times = {s: {i: [] for i in items} for s in runners}
    answers = {s: {} for s in runners}
    names = list(runners)
    for round_ in range(warmup + runs):
        shift = round_ % len(names)
        order = names[shift:] + names[:shift]
        for item in items:
            for s in order:
                seconds, answer = runners[s](item)
                answers[s][item] = answer
                if round_ >= warmup:
                    times[s][item].append(seconds)
    return times, answers


def transfer_runner(server: Server, user: str | None, sql: str, peaks: list, stack: ExitStack):
    """One download of `sql` into pyarrow: (seconds, (bytes, rows)); the server's peak
    RSS during it is appended to `peaks`."""
    conn = connect(server.uri, user)
    stack.callback(conn.close)

    def run(_item) -> tuple[float, tuple[int, int]]:
        server.rss_reset()
        started = time.perf_counter()
        table = adbc_query(conn, sql)
        elapsed = time.perf_counter() - started
        peaks.append(server.rss_peak())
        return elapsed, (table.nbytes, table.num_rows)

    return run


def pyarrow_flight_runner(uri: str):
    client = flight.FlightClient(uri)

    def run(_item) -> tuple[float, tuple[int, int]]:
        started = time.perf_counter()
        table = client.do_get(flight.Ticket(b"all")).read_all()
        return time.perf_counter() - started, (table.nbytes, table.num_rows)

    return run


def concurrency(uri: str, user: str, clients: int, seconds: float):
    conns = [connect(uri, user) for _ in range(clients)]
    for c in conns:  # every connection authenticated and warm before the clock starts
        adbc_query(c, SMALL_QUERIES[0])
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    deadline = [0.0]

    def worker(i: int):
        barrier.wait()
        n = i
        while time.monotonic() < deadline[0]:
            sql = SMALL_QUERIES[n % len(SMALL_QUERIES)]
            n += 1
            started = time.perf_counter()
            try:
                adbc_query(conns[i], sql)
                latencies[i].append(time.perf_counter() - started)
            except Exception as e:  # counted and reported, never hidden
                errors[i].append(str(e)[:200])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + seconds
    started = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    for c in conns:
        c.close()
    all_lat = sorted(x for l in latencies for x in l)
    all_err = [e for l in errors for e in l]
    return {
        "clients": clients,
        "seconds": wall,
        "queries": len(all_lat),
        "qps": len(all_lat) / wall,
        "p50": percentile(all_lat, 50),
        "p99": percentile(all_lat, 99),
        "errors": len(all_err),
        "first_error": all_err[0] if all_err else None,
    }


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


# ---- criterion ------------------------------------------------------------------------


def criterion_medians(criterion: Path, group: str) -> dict[str, float]:
    """`{bench id: median seconds}` from criterion's estimates."""
    out = {}
    for est in sorted((criterion / group).glob("*/new/estimates.json")):
        out[est.parent.parent.name] = json.loads(est.read_text())["median"]["point_estimate"] / 1e9
    return out


# ---- the report -----------------------------------------------------------------------


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem / 1024 / 1024,
        "os": f"{platform.system()} {platform.release()}",
        "rustc": rustc,
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "pyarrow": pa.__version__,
        "commit": commit,
    }


def med(xs) -> float:
    return statistics.median(xs)


def ms(x: float) -> str:
    return f"{x * 1000:,.0f}" if x >= 0.1 else f"{x * 1000:,.1f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×"


def mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


CLUSTER_BEGIN = "<!-- cluster: written by benches/cluster.py -->"
CLUSTER_END = "<!-- cluster: end -->"


STATE_BEGIN = "<!-- state: written by benches/state.py -->"
STATE_END = "<!-- state: end -->"


def write_between(out: Path, begin: str, end: str, section: str) -> None:
    """Puts `section` (which starts with `begin` and ends with `end`) in place of the
    page's section between those markers, or at the end of the page."""
    text = out.read_text() if out.exists() else ""
    start, finish = text.find(begin), text.find(end)
    if 0 <= start < finish:
        text = text[:start] + section + text[finish + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    out.write_text(text)


def kept_sections(out: Path) -> str:
    """The sections other scripts write into the page (benches/cluster.py,
    benches/state.py), kept as they are."""
    if not out.exists():
        return ""
    text = out.read_text()
    kept = ""
    for begin, finish in [(CLUSTER_BEGIN, CLUSTER_END), (STATE_BEGIN, STATE_END)]:
        start, end = text.find(begin), text.find(finish)
        if 0 <= start < end:
            kept += "\n" + text[start:end + len(finish)] + "\n"
    return kept


def report(r: dict) -> str:
    m = r["machine"]
    t = r["tpch"]
    systems = ["datafusion", "airlock", "peer", "duckdb", "airlock_hot", "datafusion_memory"]
    medians = {s: {q: med(t[s][q]) for q in QUERIES} for s in systems}
    sums = {s: sum(medians[s].values()) for s in systems}
    lines = [
        "# Benchmarks",
        "",
        "Written by `benches/run.sh` (one command: builds, generates the data, runs everything",
        "below and rewrites this page). Benchmarks run on demand, never as tests.",
        "",
        f"- **Date**: {r['date']} · commit `{m['commit']}`",
        f"- **Machine**: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB, {m['os']}",
        f"- **Software**: {m['rustc']}, release profile; Python {m['python']}, pyarrow {m['pyarrow']},",
        f"  ADBC Flight SQL driver {flightsql_version()}, DuckDB {m['duckdb']}",
        f"- **Data**: TPC-H scale factor {r['scale']} (`tpchgen-cli`), one Parquet file per table",
        f"- **Method**: {r['warmup']} warm-up round, then the median of {r['runs']} rounds. All systems",
        "  are up together and interleaved: each round runs every query on every system, in an",
        "  order that rotates from round to round, so a slow moment of this shared machine",
        "  falls on all of them alike. Clients run on the same machine, over loopback.",
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    tr = r["transfer"]
    a_mbs = tr["airlock"]["bytes"] / 1e6 / med(tr["airlock"]["times"])
    hot_mbs = tr["airlock_hot"]["bytes"] / 1e6 / med(tr["airlock_hot"]["times"])
    raw_mbs = tr["raw"]["bytes"] / 1e6 / med(tr["raw"]["times"])
    rw = r["rewrite"]
    rewrite_max = max(v for k, v in rw.items() if k.endswith("_airlock")) if rw else float("nan")
    lines += [
        f"| TPC-H sum through Airlock ≤ 1.15× in-process DataFusion | {ratio(sums['airlock'], sums['datafusion'])} | {mark(sums['airlock'] <= 1.15 * sums['datafusion'])} |",
        f"| … and no slower than the peer server | {ratio(sums['airlock'], sums['peer'])} of the peer | {mark(sums['airlock'] <= sums['peer'])} |",
        f"| Transfer ≥ 80 % of raw Flight DoGet, both from memory (hot `orders`) | {hot_mbs / raw_mbs:.0%} ({hot_mbs:,.0f} vs {raw_mbs:,.0f} MB/s) | {mark(hot_mbs >= 0.8 * raw_mbs)} |",
        f"| … and with Airlock reading the Parquet file (raw still from memory) | {a_mbs / raw_mbs:.0%} ({a_mbs:,.0f} MB/s) | {mark(a_mbs >= 0.8 * raw_mbs)} |",
        f"| Peak server RSS during the {tr['airlock']['rows']:,}-row download ≤ 512 MiB | {tr['airlock']['peak_rss'] / 2**20:,.0f} MiB | {mark(tr['airlock']['peak_rss'] <= 512 * 2**20)} |",
        (f"| Rewrite median < 1 ms per query | {rewrite_max * 1e3:.2f} ms (slowest query, whole analyzer) | {mark(rewrite_max < 1e-3)} |"
         if rw else "| Rewrite median < 1 ms per query | not measured in this run (`--no-criterion`) | |"),
        f"| Stretch: cached Airlock sum ≤ DuckDB in-process | {ratio(sums['airlock_hot'], sums['duckdb'])} of DuckDB | {mark(sums['airlock_hot'] <= sums['duckdb'])} |",
        *([f"| DP query ≤ 1.3× the same query in threshold mode | {ratio(med(r['dp']['dp']['times']), med(r['dp']['threshold']['times']))} ({ms(med(r['dp']['dp']['times']))} vs {ms(med(r['dp']['threshold']['times']))} ms) | {mark(med(r['dp']['dp']['times']) <= 1.3 * med(r['dp']['threshold']['times']))} |"] if "dp" in r else []),
        f"| Concurrency: errors must be zero | {r['concurrency']['errors']} errors | {mark(r['concurrency']['errors'] == 0)} |",
        "",
        "## TPC-H through Flight SQL (`bench_analyst`, ADBC Python driver)",
        "",
        "Median milliseconds per query. **DataFusion** is the same SQL in-process with no",
        "policy and no transport, reading the same Parquet files (the limit). **Airlock** runs",
        "it as `bench_analyst` under the bench policy (k = 5 on customers, orders, line items),",
        "so every result is rewritten, thresholded and sent over Flight. **Peer** is a plain",
        "DataFusion Flight SQL server (`datafusion-flight-sql-server`) without policy or",
        "authentication. **DuckDB** reads the same Parquet files in-process. **Airlock hot**",
        "holds every table in memory (`cache = true`); **DataFusion in memory** is its limit.",
        "",
        "| query | DataFusion | Airlock | Peer | DuckDB | Airlock hot | DataFusion in memory | Airlock ÷ DataFusion | Airlock ÷ peer | hot ÷ DuckDB | rows (Airlock / peer) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = r["rows"]
    for q in QUERIES:
        d = {s: medians[s][q] for s in systems}
        lines.append(
            f"| {q} | {ms(d['datafusion'])} | {ms(d['airlock'])} | {ms(d['peer'])} | {ms(d['duckdb'])} "
            f"| {ms(d['airlock_hot'])} | {ms(d['datafusion_memory'])} | {ratio(d['airlock'], d['datafusion'])} "
            f"| {ratio(d['airlock'], d['peer'])} | {ratio(d['airlock_hot'], d['duckdb'])} "
            f"| {rows['airlock'][q]} / {rows['peer'][q]} |"
        )
    s = sums
    lines += [
        f"| **sum** | **{ms(s['datafusion'])}** | **{ms(s['airlock'])}** | **{ms(s['peer'])}** | **{ms(s['duckdb'])}** "
        f"| **{ms(s['airlock_hot'])}** | **{ms(s['datafusion_memory'])}** | **{ratio(s['airlock'], s['datafusion'])}** "
        f"| **{ratio(s['airlock'], s['peer'])}** | **{ratio(s['airlock_hot'], s['duckdb'])}** | |",
        "",
        f"Airlock hot loaded all eight tables into memory in {r.get('hot_start_seconds', float('nan')):.1f} s at start.",
        "",
        "Rows differ where the policy suppresses groups: q3 and q10 group by an order or a",
        "customer (one entity per group), so under k = 5 every group is withheld; q5 and q19",
        "are not affected. The work of computing them is still done and measured.",
        "",
        "## Transfer",
        "",
        f"`SELECT * FROM tpch.orders` ({tr['airlock']['rows']:,} rows, {tr['airlock']['bytes'] / 1e6:,.0f} MB",
        "as decoded Arrow) into a pyarrow table with the ADBC driver. The raw server is a bare",
        "`arrow-flight` service streaming the same batches (the same Utf8 schema) from memory:",
        "no SQL, no policy, no file reading. Peak RSS is the kernel's high-water mark of the",
        "server process, reset before each download.",
        "",
        "| source | client | median s | MB/s | of raw | peak server RSS |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, label, client in [("airlock", "Airlock as `bench_reader` (Parquet file)", "ADBC"),
                               ("airlock_hot", "Airlock as `bench_reader` (hot, in memory)", "ADBC"),
                               ("peer", "peer server (Parquet file; sends Utf8View)", "ADBC"),
                               ("raw", "raw DoGet from memory", "ADBC"),
                               ("raw_pyarrow", "raw DoGet from memory", "pyarrow.flight")]:
        x = tr[key]
        mbs = x["bytes"] / 1e6 / med(x["times"])
        rss = f"{x['peak_rss'] / 2**20:,.0f} MiB" if "peak_rss" in x else "—"
        lines.append(f"| {label} | {client} | {med(x['times']):.3f} | {mbs:,.0f} | {mbs / raw_mbs:.0%} | {rss} |")
    lines += [
        "",
        "MB/s counts the decoded Arrow bytes the client holds. The peer sends Utf8View",
        f"columns, {tr['peer']['bytes'] / 1e6:,.0f} MB for the same rows, so compare its seconds, not its MB/s.",
    ]
    c = r["concurrency"]
    lines += [
        "",
        "## Concurrency",
        "",
        f"{c['clients']} ADBC clients, each on its own connection as `bench_analyst`, running small",
        f"aggregate queries over `tpch.customer` and `tpch.orders` in turn for {c['seconds']:.0f} s",
        "(every query planned, rewritten, thresholded and audited).",
        "",
        "| clients | queries | queries/s | p50 ms | p99 ms | errors |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {c['clients']} | {c['queries']:,} | {c['qps']:.1f} | {c['p50'] * 1e3:.0f} | {c['p99'] * 1e3:.0f} | {c['errors']} |",
    ]
    if c["first_error"]:
        lines += ["", f"First error: `{c['first_error']}`"]
    lines += [
        "",
        "## Privacy rewrite (`cargo bench --bench rewrite`)",
        "",
        "Criterion medians, µs. The analyzer with Airlock's policy rules against DataFusion's",
        "default analyzer on the same TPC-H logical plan (principal `bench_analyst`); \"rewrite\"",
        "is the difference: the policy rules' own time.",
        "",
        "| query | analyzer with policy | DataFusion analyzer | rewrite |",
        "|---|---:|---:|---:|",
    ]
    if not rw:
        lines.append("| (not measured in this run: `benches/run.sh --no-criterion`) | | | |")
    for q in QUERIES:
        a, d = rw.get(f"{q}_airlock"), rw.get(f"{q}_datafusion")
        if a is not None and d is not None:
            lines.append(f"| {q} | {a * 1e6:,.0f} | {d * 1e6:,.0f} | {(a - d) * 1e6:,.0f} |")
    lines += [
        "",
        "## Planning (`cargo bench --bench planning`)",
        "",
        "Criterion medians, µs: the whole `query::plan` (parse, SQL to logical plan, policy",
        "analyzer, DataFusion's optimizer) as the demo's analyst over the demo's tables.",
        "",
        "| query | plan |",
        "|---|---:|",
    ]
    for k, v in r["planning"].items():
        lines.append(f"| `{k}` | {v * 1e6:,.0f} |")
    lines += ["", r.get("notes", "").rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def flightsql_version() -> str:
    try:
        from importlib.metadata import version
        return version("adbc-driver-flightsql")
    except Exception:
        return "?"


# ---- main -----------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--airlock", type=Path, help="the release airlock binary")
    p.add_argument("--harness", type=Path, help="directory of the harness binaries")
    p.add_argument("--criterion", type=Path,
                   help="criterion's output directory (without it, no rewrite/planning figures)")
    p.add_argument("--report-only", type=Path, metavar="JSON",
                   help="rewrite the report from the figures of an earlier run (--json)")
    p.add_argument("--data", type=Path, default=TPCH / "data")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--cache-memory", default="8GiB")
    p.add_argument("--notes", type=Path, default=ROOT / "benches" / "NOTES.md",
                   help="appended to the report (analysis that numbers alone do not say)")
    args = p.parse_args()
    if args.report_only:
        r = json.loads(args.report_only.read_text())
        r["notes"] = args.notes.read_text() if args.notes.exists() else ""
        args.out.write_text(report(r) + kept_sections(args.out))
        log(f"wrote {args.out} from {args.report_only}")
        return 0
    if not (args.airlock and args.harness):
        p.error("--airlock and --harness are needed to measure")
    data = args.data.resolve()
    if not (data / "lineitem.parquet").exists():
        sys.exit(f"no TPC-H data under {data}: run benches/tpch/generate.sh")
    scale = (data / "SCALE").read_text().strip() if (data / "SCALE").exists() else "?"
    logdir = Path(tempfile.mkdtemp(prefix="airlock-bench-"))
    log(f"logs in {logdir}")
    sqls = {q: (TPCH / "queries" / f"{q}.sql").read_text() for q in QUERIES}
    w, n = args.warmup, args.runs
    r: dict = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "scale": scale, "runs": n, "warmup": w,
        "tpch": {}, "rows": {}, "transfer": {},
    }

    config = TPCH / "airlock.toml"
    hot = hot_config(config, data, logdir / "airlock-hot.toml", args.cache_memory)
    orders = "SELECT * FROM tpch.orders"
    with ExitStack() as stack:
        log("starting: DataFusion in-process (Parquet, memory), DuckDB, peer, Airlock, Airlock hot, raw")
        inproc = InProc(args.harness, data, "parquet", logdir)
        stack.callback(inproc.close)
        inmem = InProc(args.harness, data, "memory", logdir)
        stack.callback(inmem.close)
        peer = stack.enter_context(running("peer", [str(args.harness / "peer"), "--data", str(data)],
                                           r"listening on (\S+)", logdir))
        server = stack.enter_context(airlock(args, "airlock", config, logdir))
        hot_server = stack.enter_context(airlock(args, "airlock_hot", hot, logdir))
        r["hot_start_seconds"] = hot_server.start_seconds
        raw = stack.enter_context(running(
            "raw", [str(args.harness / "raw_flight"), "--file", str(data / "orders.parquet")],
            r"listening on (\S+)", logdir))

        log(f"TPC-H: {w} warm-up + {n} interleaved rounds of 8 queries on 6 systems")
        r["tpch"], r["rows"] = interleaved({
            "datafusion": inproc.run,
            "datafusion_memory": inmem.run,
            "duckdb": duckdb_runner(data, sqls, stack),
            "peer": flight_runner(peer.uri, None, sqls, stack),
            "airlock": flight_runner(server.uri, "bench_analyst", sqls, stack),
            "airlock_hot": flight_runner(hot_server.uri, "bench_analyst", sqls, stack),
        }, QUERIES, w, n)

        log(f"transfer: {w} warm-up + {n} interleaved rounds")
        peak_rss = {s: [] for s in ["airlock", "airlock_hot", "peer", "raw"]}
        times, answers = interleaved({
            "airlock": transfer_runner(server, "bench_reader", orders, peak_rss["airlock"], stack),
            "airlock_hot": transfer_runner(hot_server, "bench_reader", orders, peak_rss["airlock_hot"], stack),
            "peer": transfer_runner(peer, None, orders, peak_rss["peer"], stack),
            "raw": transfer_runner(raw, None, orders, peak_rss["raw"], stack),
            "raw_pyarrow": pyarrow_flight_runner(raw.uri),
        }, ["orders"], w, n)
        for s, t in times.items():
            nbytes, nrows = answers[s]["orders"]
            r["transfer"][s] = {"times": t["orders"], "bytes": nbytes, "rows": nrows}
            if peak_rss.get(s):  # the highest of every download, warm-up included
                r["transfer"][s]["peak_rss"] = max(peak_rss[s])

        log(f"DP vs threshold: {w} warm-up + {n} interleaved rounds")
        dp_server = stack.enter_context(
            airlock(args, "airlock_dp", config, logdir, TPCH / "policies-dp"))
        dp_times, dp_rows = interleaved({
            "threshold": varying_runner(server.uri, "bench_analyst", DP_QUERY, stack),
            "dp": varying_runner(dp_server.uri, "bench_analyst", DP_QUERY, stack),
        }, ["dp"], w, n)
        r["dp"] = {s: {"times": dp_times[s]["dp"], "rows": dp_rows[s]["dp"]} for s in dp_times}

        log(f"concurrency: {args.clients} clients for {args.seconds:.0f} s (the other servers idle)")
        r["concurrency"] = concurrency(server.uri, "bench_analyst", args.clients, args.seconds)

    r["rewrite"] = criterion_medians(args.criterion, "rewrite") if args.criterion else {}
    r["planning"] = criterion_medians(args.criterion, "plan") if args.criterion else {}
    if args.notes.exists():
        r["notes"] = args.notes.read_text()
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    args.out.write_text(report(r) + kept_sections(args.out))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
