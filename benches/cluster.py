#!/usr/bin/env python3
"""TPC-H through one Airlock process against the same through a cluster (issue 13).

Started by `benches/run.sh --cluster`. On this one machine the cluster is one front end
and two `airlock worker`s on loopback, all sharing its cores, so the figure is the
overhead of distribution (planning stages, Arrow IPC over gRPC, the extra hops), never a
speed-up. Besides time, it measures what crosses the network per query, from the kernel's
per-process I/O counters (/proc/<pid>/io): workers never write files, so what they write
is what they send (shuffles to each other and results to the front end), and what the
front end reads beyond its own files comes from the workers.

The figures go between the cluster markers of docs/BENCHMARKS.md (benches/run.py keeps
them when it rewrites the rest of the page).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402


def worker(args, name: str, secret: Path, logdir: Path):
    return bench.running(
        name,
        [str(args.airlock), "worker", "--listen", "127.0.0.1:0", "--cluster-secret-file",
         str(secret), "--memory", args.worker_memory],
        r"airlock worker listening on (\S+)",
        logdir,
    )


def front_end(args, workers: list, secret: Path, logdir: Path):
    state = Path(tempfile.mkdtemp(prefix="airlock-cluster-"))
    urls = ",".join(f"http://{w.addr}" for w in workers)
    return bench.running(
        "frontend",
        [str(args.airlock), "serve", "--config", str(bench.TPCH / "airlock.toml"),
         "--listen", "127.0.0.1:0", "--state-dir", str(state), "--workers", urls,
         "--cluster-secret-file", str(secret)],
        r"airlock listening on (\S+)",
        logdir,
    )


def io(server) -> dict:
    out = {}
    for line in Path(f"/proc/{server.proc.pid}/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def answers_equal(a, b) -> bool:
    """Same rows, in any order; floats equal to 1e-9 relative (sums in another order)."""
    import math

    def rows(t):
        return sorted((tuple(r.values()) for r in t.to_pylist()), key=repr)

    ra, rb = rows(a), rows(b)
    if a.schema.names != b.schema.names or len(ra) != len(rb):
        return False
    return all(
        math.isclose(u, v, rel_tol=1e-9) if isinstance(u, float) and isinstance(v, float)
        else u == v
        for x, y in zip(ra, rb) for u, v in zip(x, y)
    )


def report(r: dict) -> str:
    t = r["times"]
    rows = []
    total = {"single": 0.0, "cluster": 0.0}
    for q in bench.QUERIES:
        s, c = bench.med(t["single"][q]), bench.med(t["cluster"][q])
        total["single"] += s
        total["cluster"] += c
        n = r["network"][q]
        rows.append(f"| {q} | {bench.ms(s)} | {bench.ms(c)} | {c / s:.2f}× | "
                    f"{n['sent_by_workers'] / 1e6:,.2f} | {n['read_by_workers'] / 1e6:,.0f} | "
                    f"{'yes' if r['same'][q] else '**no**'} |")
    lines = [
        bench.CLUSTER_BEGIN,
        "## TPC-H through a cluster (issue 13)",
        "",
        f"Written by `benches/run.sh --cluster` ({r['date']}, commit `{r['commit']}`, "
        f"{r['runs']} interleaved runs after {r['warmup']} warm-up, median per query). The same",
        "queries as above, as `bench_analyst` under the bench policy, through one Airlock",
        "process and through one front end with two `airlock worker`s (the `single` and",
        "`cluster` columns). All three processes share this machine's 2 cores, so this shows",
        "what distribution costs, not what it gains. The MB columns come from the workers'",
        "kernel I/O counters for one run of each query: bytes they wrote (every stage's output",
        "that crosses the network: shuffles to each other and results to the front end;",
        "workers write no files) and bytes they read (Parquet, and shuffles from each other).",
        "",
        "| query | single | cluster | ratio | MB sent by workers | MB read by workers | same answer |",
        "|---|---:|---:|---:|---:|---:|---|",
        *rows,
        f"| **sum** | **{bench.ms(total['single'])}** | **{bench.ms(total['cluster'])}** | "
        f"**{total['cluster'] / total['single']:.2f}×** | | | |",
        "",
        *r.get("notes", []),
        bench.CLUSTER_END,
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--airlock", type=Path, required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--worker-memory", default="3GiB")
    p.add_argument("--out", type=Path, default=bench.ROOT / "docs" / "BENCHMARKS.md")
    p.add_argument("--json", type=Path)
    p.add_argument("--notes", type=Path, default=bench.ROOT / "benches" / "CLUSTER_NOTES.md",
                   help="markdown appended under the table (the reading of the figures)")
    args = p.parse_args()
    sqls = {q: (bench.TPCH / "queries" / f"{q}.sql").read_text() for q in bench.QUERIES}
    logdir = Path(tempfile.mkdtemp(prefix="airlock-cluster-bench-"))
    secret = logdir / "cluster.secret"
    secret.write_text(__import__("secrets").token_hex(32))
    secret.chmod(0o600)
    r = {"date": dt.date.today().isoformat(), "commit": bench.machine()["commit"],
         "runs": args.runs, "warmup": args.warmup}
    with ExitStack() as stack:
        single = stack.enter_context(bench.airlock(args, "single", bench.TPCH / "airlock.toml", logdir))
        workers = [stack.enter_context(worker(args, f"worker{i}", secret, logdir)) for i in (1, 2)]
        front = stack.enter_context(front_end(args, workers, secret, logdir))
        bench.log(f"single {single.uri}, cluster {front.uri} over {[w.addr for w in workers]}")
        # Same answers first, and what crosses the network, one query at a time.
        conns = {n: bench.connect(s.uri, "bench_analyst") for n, s in
                 [("single", single), ("cluster", front)]}
        for c in conns.values():
            stack.callback(c.close)
        r["same"], r["network"] = {}, {}
        for q in bench.QUERIES:
            expected = bench.adbc_query(conns["single"], sqls[q])
            before = [io(w) for w in workers], io(front)
            got = bench.adbc_query(conns["cluster"], sqls[q])
            after = [io(w) for w in workers], io(front)
            sent = sum(a["wchar"] - b["wchar"] for a, b in zip(after[0], before[0]))
            read = sum(a["rchar"] - b["rchar"] for a, b in zip(after[0], before[0]))
            r["same"][q] = answers_equal(expected, got)
            r["network"][q] = {"sent_by_workers": sent, "read_by_workers": read}
            bench.log(f"{q}: same={r['same'][q]} {r['network'][q]}")
        times, _ = bench.interleaved({
            "single": bench.flight_runner(single.uri, "bench_analyst", sqls, stack),
            "cluster": bench.flight_runner(front.uri, "bench_analyst", sqls, stack),
        }, bench.QUERIES, args.warmup, args.runs)
        r["times"] = times
    if args.notes.exists():
        r["notes"] = args.notes.read_text().rstrip("\n").splitlines()
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    bench.write_between(args.out, bench.CLUSTER_BEGIN, bench.CLUSTER_END, report(r))
    bench.log(f"wrote {args.out}")
    return 0 if all(r["same"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
