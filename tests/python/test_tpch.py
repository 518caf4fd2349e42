"""TPC-H 1, 3, 5, 6, 10, 12, 14 and 19 still run under the privacy rewriter v2.

The bench policy (benches/tpch/policies) protects customers, orders and line items
(k = 5) and sets both owner opt-ins, `arithmetic_aggregates` (sum(l_extendedprice *
(1 - l_discount))) and `conditional_aggregates` (the CASE sums of Q12 and Q14), as the
contract says it does. A small scale factor is generated with tpchgen-cli; each query
runs through a real `airlock serve` over ADBC, as `bench_analyst` (aggregate only) and as
`bench_reader` (read: no threshold). Where every group is large, both must agree.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import pytest

from conftest import ROOT, airlock_binary

QUERIES = ["q1", "q3", "q5", "q6", "q10", "q12", "q14", "q19"]
# Queries whose every released group is far above k at this scale: the analyst's answer
# equals the reader's.
SAME_AS_READER = {"q1", "q5", "q6", "q12", "q14"}
# Q19 selects few line items at this scale (fewer than k orders): withheld or exact.
WITHHELD_OR_EXACT = {"q19"}


@pytest.fixture(scope="module")
def tpch_root(tmp_path_factory):
    """SF 0.01 with the bench policy and users, and an `airlock.toml` for them."""
    root = tmp_path_factory.mktemp("tpch")
    data = root / "data"
    data.mkdir()
    cli = shutil.which("tpchgen-cli") or str(Path(sys.executable).parent / "tpchgen-cli")
    subprocess.run([cli, "parquet", "-s", "0.01", "--output-dir", str(data)], check=True,
                   stdout=subprocess.DEVNULL)
    bench = ROOT / "benches" / "tpch"
    shutil.copytree(bench / "policies", root / "policies")
    shutil.copy(bench / "users.toml", root / "users.toml")
    config = (bench / "airlock.toml").read_text()
    config = config.replace('listen = "127.0.0.1:50052"', 'listen = "127.0.0.1:0"')
    config = config.replace('state_dir = "../../target/tpch-state"', 'state_dir = "state"')
    (root / "airlock.toml").write_text(config)
    return root


def start(argv: list[str], ready: str, cwd: Path) -> tuple[subprocess.Popen, str]:
    """Starts an airlock process and returns it with the address of its ready line."""
    proc = subprocess.Popen([airlock_binary(), *argv], stdout=subprocess.PIPE,
                            stderr=sys.stderr, text=True, cwd=cwd)
    addr = None
    for line in proc.stdout:
        m = re.match(ready, line)
        if m:
            addr = m.group(1)
            break
    if addr is None:
        proc.kill()
        raise RuntimeError(f"airlock {argv[0]} did not start (exit {proc.wait()})")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, addr


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tpch(tpch_root):
    proc, addr = start(["serve", "--config", str(tpch_root / "airlock.toml")],
                       r"airlock listening on (\S+)", tpch_root)
    yield f"grpc://{addr}"
    stop(proc)


@pytest.fixture(scope="module")
def tpch_cluster(tpch_root):
    """The same configuration as a cluster: one front end and three `airlock worker`s,
    every scan split over them. Yields the front end's URI and the workers' processes."""
    secret = tpch_root / "cluster.secret"
    secret.write_text("0123456789abcdef" * 4)
    secret.chmod(0o600)
    workers = [start(["worker", "--listen", "127.0.0.1:0", "--cluster-secret-file", str(secret)],
                     r"airlock worker listening on (\S+)", tpch_root) for _ in range(3)]
    urls = ",".join(f"http://{addr}" for _, addr in workers)
    front, addr = start(["serve", "--config", str(tpch_root / "airlock.toml"),
                         "--state-dir", str(tpch_root / "cluster-state"), "--workers", urls,
                         "--cluster-secret-file", str(secret),
                         "--cluster-scan-partition-bytes", "64KiB"],
                        r"airlock listening on (\S+)", tpch_root)
    yield f"grpc://{addr}", [p for p, _ in workers]
    stop(front)
    for p, _ in workers:
        stop(p)


def run(uri: str, user: str, sql: str):
    with flightsql.connect(uri, db_kwargs={"username": user, "password": user}) as conn:
        cur = conn.cursor()
        cur.execute(sql)
        table = cur.fetch_arrow_table()
        cur.close()
        return table


@pytest.mark.parametrize("name", QUERIES)
def test_tpch_query_runs_under_the_bench_policy(tpch, name):
    sql = (ROOT / "benches" / "tpch" / "queries" / f"{name}.sql").read_text()
    analyst = run(tpch, "bench_analyst", sql)
    reader = run(tpch, "bench_reader", sql)
    assert analyst.schema.names == reader.schema.names
    if name in SAME_AS_READER:
        assert analyst.num_rows == reader.num_rows > 0, name
        a = analyst.to_pylist()
        r = reader.to_pylist()
        for x, y in zip(a, r):
            for k in x:
                if isinstance(x[k], float):
                    assert x[k] == pytest.approx(y[k], rel=1e-9), (name, k)
                else:
                    assert x[k] == y[k], (name, k)
    elif name in WITHHELD_OR_EXACT:
        assert analyst.num_rows == 0 or analyst.to_pylist() == reader.to_pylist(), name
    else:
        # Q3 and Q10 group by an entity key (an order, a customer): one entity per
        # group, so the k rule withholds every row. They run, and release nothing.
        assert analyst.num_rows == 0, name


def _richest(tpch):
    """The one customer a hostile analyst picked: the richest HOUSEHOLD customer of a
    nation (the owner's view finds them; the analyst knew them from outside)."""
    rows = run(tpch, "bench_reader",
               "SELECT c_nationkey, c_acctbal FROM tpch.customer WHERE c_mktsegment = 'HOUSEHOLD' "
               "ORDER BY c_acctbal DESC LIMIT 1").to_pylist()
    return rows[0]["c_nationkey"], rows[0]["c_acctbal"]


def _who(tpch):
    """A predicate that holds for that one customer only."""
    nation, balance = _richest(tpch)
    return f"c.c_nationkey = {nation} AND c.c_mktsegment = 'HOUSEHOLD' AND c.c_acctbal >= {balance}"


ORDERS = "FROM tpch.orders o JOIN tpch.customer c ON o.o_custkey = c.c_custkey"


def test_a_case_that_picks_one_customer_out_of_all_orders_releases_nothing(tpch):
    # A hostile analyst's one-query leak (conditional_aggregates is on in the bench
    # policy): the group is every order, the CASE branch one customer's. Each branch is
    # now held to k on its own rows.
    sql = f"SELECT count(*) AS n, sum(CASE WHEN {_who(tpch)} THEN o.o_totalprice ELSE 0 END) AS total {ORDERS}"
    assert run(tpch, "bench_reader", sql).num_rows == 1
    assert run(tpch, "bench_analyst", sql).num_rows == 0
    # A broad branch still releases, with the reader's answer.
    broad = f"SELECT sum(CASE WHEN c.c_mktsegment = 'HOUSEHOLD' THEN o.o_totalprice ELSE 0 END) AS t {ORDERS}"
    a, r = run(tpch, "bench_analyst", broad).to_pylist(), run(tpch, "bench_reader", broad).to_pylist()
    assert a[0]["t"] == pytest.approx(r[0]["t"], rel=1e-9)


def test_an_outer_join_that_marks_one_customer_is_refused_inside_aggregates(tpch):
    # The same customer marked by a LEFT JOIN's condition, counted through the nullable
    # side: refused whatever the opt-ins.
    _, balance = _richest(tpch)
    sql = (f"SELECT count(n.n_name) AS marked {ORDERS} "
           f"LEFT JOIN tpch.nation n ON c.c_nationkey = n.n_nationkey AND c.c_acctbal >= {balance}")
    with pytest.raises(Exception, match=r"CONDITIONAL_AGGREGATE.*no count holds"):
        run(tpch, "bench_analyst", sql)


def test_two_cases_multiplied_are_refused(tpch):
    # A hostile analyst's next step: each CASE's branches are large, their product is
    # non-zero only where both hold (one customer). A CASE may not be a term of arithmetic.
    nation, balance = _richest(tpch)
    sql = (f"SELECT sum(CASE WHEN c.c_nationkey = {nation} THEN 1 ELSE 0 END * "
           f"CASE WHEN c.c_acctbal >= {balance} AND c.c_mktsegment = 'HOUSEHOLD' THEN o.o_totalprice ELSE 0 END) AS t "
           f"{ORDERS}")
    with pytest.raises(Exception, match=r"CONDITIONAL_AGGREGATE.*a CASE inside arithmetic"):
        run(tpch, "bench_analyst", sql)


def test_a_zero_branch_for_one_customer_is_counted_too(tpch):
    # `sum(x)` next to `sum(CASE WHEN <one customer> THEN 0 ELSE x END)` is that
    # customer's x by subtraction: the zero branch is a region like any other.
    sql = f"SELECT sum(o.o_totalprice) AS a, sum(CASE WHEN {_who(tpch)} THEN 0 ELSE o.o_totalprice END) AS b {ORDERS}"
    assert run(tpch, "bench_analyst", sql).num_rows == 0


@pytest.mark.parametrize("above", ["20000", "{balance} - 0.01"])
def test_a_comparison_the_optimizer_mistyped_runs_the_same_whoever_reaches_it(tpch, above):
    # DataFusion folded `c_acctbal * 0` to a decimal of another scale, and the comparison
    # then failed at run time, only if a row reached it: an oracle on whether anyone
    # matches the CASE's condition. The verifier refused it (UNCLASSIFIED_PLAN). Decimal
    # arithmetic below a boundary is now guarded (hostile round 19), so nothing is folded
    # to another type: the query runs, and whether one customer or none reaches the
    # comparison, the answer is the same, withheld.
    _, balance = _richest(tpch)
    above = above.format(balance=balance)
    sql = (f"SELECT sum(CASE WHEN c.c_acctbal > {above} THEN CASE WHEN c.c_acctbal * 0 + c.c_nationkey = 21 "
           "THEN 1 ELSE 0 END ELSE 0 END) AS s FROM tpch.customer c")
    assert run(tpch, "bench_analyst", sql).num_rows == 0


def _sent(proc: subprocess.Popen) -> int:
    """Bytes a worker has written: workers write no files, so this is what they sent."""
    for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar")


def _same(a, b) -> bool:
    def rows(t):
        return sorted((tuple(v for v in r.values()) for r in t.to_pylist()), key=repr)
    ra, rb = rows(a), rows(b)
    if a.schema.names != b.schema.names or len(ra) != len(rb):
        return False
    for x, y in zip(ra, rb):
        for u, v in zip(x, y):
            if isinstance(u, float) and isinstance(v, float):
                if not math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-9):
                    return False
            elif u != v:
                return False
    return True


@pytest.mark.parametrize("user", ["bench_analyst", "bench_reader"])
def test_tpch_gives_the_same_answers_through_a_cluster(tpch, tpch_cluster, user):
    """Issue 13: every query, suppressed groups included, answers through one front end
    and three workers exactly as through one process; the workers did the scanning."""
    front, workers = tpch_cluster
    before = [_sent(p) for p in workers]
    for name in QUERIES:
        sql = (ROOT / "benches" / "tpch" / "queries" / f"{name}.sql").read_text()
        single, cluster = run(tpch, user, sql), run(front, user, sql)
        assert _same(single, cluster), f"{name} as {user}:\n{single}\n!=\n{cluster}"
    sent = [_sent(p) - b for p, b in zip(workers, before)]
    assert sum(1 for s in sent if s > 10_000) >= 2, f"bytes sent per worker: {sent}"
