#!/usr/bin/env python3
"""A quick A/B of the TPC-H queries: Airlock (as bench_analyst) against DataFusion in-process,
and optionally a second Airlock build, interleaved round by round (benches/run.py's method,
without the rest of its page). Build first as benches/run.sh does; run with its venv:

    $TARGET/bench-venv/bin/python benches/probe.py <airlock> <rounds> [q1,q3,...]

Environment: HARNESS (default $CARGO_TARGET_DIR/harness/release), BIN2 (a second airlock to
compare), NODF=1 (no in-process DataFusion), PEER=1 (the peer Flight SQL server too),
READER=1 (also as bench_reader, no threshold), ANUSER (another principal than bench_analyst).
"""
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402


def main() -> int:
    binary, rounds = Path(sys.argv[1]), int(sys.argv[2])
    queries = sys.argv[3].split(",") if len(sys.argv) > 3 else R.QUERIES
    sqls = {q: (R.TPCH / "queries" / f"{q}.sql").read_text() for q in queries}
    data = (R.TPCH / "data").resolve()
    target = Path(os.environ.get("CARGO_TARGET_DIR", R.TPCH.parent.parent / "target"))
    harness = Path(os.environ.get("HARNESS", target / "harness" / "release"))
    logdir = Path(tempfile.mkdtemp(prefix="probe-"))
    user = os.environ.get("ANUSER", "bench_analyst")

    class Args:
        airlock = binary

    with ExitStack() as stack:
        runners = {}
        if not os.environ.get("NODF"):
            inproc = R.InProc(harness, data, "parquet", logdir)
            stack.callback(inproc.close)
            runners["df"] = inproc.run
        server = stack.enter_context(R.airlock(Args, "airlock", R.TPCH / "airlock.toml", logdir))
        runners["analyst"] = R.flight_runner(server.uri, user, sqls, stack)
        if os.environ.get("READER"):
            runners["reader"] = R.flight_runner(server.uri, "bench_reader", sqls, stack)
        if os.environ.get("BIN2"):
            class Args2:
                airlock = Path(os.environ["BIN2"])
            second = stack.enter_context(R.airlock(Args2, "airlock2", R.TPCH / "airlock.toml", logdir))
            runners["analyst2"] = R.flight_runner(second.uri, user, sqls, stack)
        if os.environ.get("PEER"):
            peer = stack.enter_context(R.running(
                "peer", [str(harness / "peer"), "--data", str(data)], r"listening on (\S+)", logdir))
            runners["peer"] = R.flight_runner(peer.uri, None, sqls, stack)
        times, _ = R.interleaved(runners, queries, 1, rounds)
        base = "df" if "df" in times else "analyst2" if "analyst2" in times else "analyst"
        totals = {s: 0.0 for s in times}
        print("q      " + " ".join(f"{s:>9}" for s in times) + f"   analyst/{base}")
        for q in queries:
            m = {s: statistics.median(times[s][q]) * 1000 for s in times}
            for s in times:
                totals[s] += m[s]
            print(f"{q:6} " + " ".join(f"{m[s]:9.1f}" for s in times) + f"   {m['analyst'] / m[base]:.3f}")
        print("sum    " + " ".join(f"{totals[s]:9.1f}" for s in times)
              + f"   {totals['analyst'] / totals[base]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
