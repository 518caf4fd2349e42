"""A hostile analyst against the demo hospital (k = 10), checked against the owner's ground truth.

Every attack is a small program (one SQL query, or a short sequence of them, at most ~30 for the
binary searches) that the harness runs as `analyst`, plus an extraction that turns the released
answers into a guess of a secret of fewer than k patients: one patient's exact cost, diagnosis or
visits, the existence of a rare diagnosis, a count below k, ... The owner's full tables (fetched
once as `owner`) are the ground truth the guesses are compared with.

Outcomes (printed as a table at the end of the module):

- `refused`: every query was refused (PermissionDenied, approval pending, or a generic error
  that does not depend on a protected value) or nothing that was released allowed a guess;
- `released-safe`: something was released, but the guess was wrong and every released grouped
  row that can be recomputed stands for at least k patients;
- `LEAK`: the guess equals the secret (floats: within 1e-6 / 1e-7 relative), or two probes that
  differ only in a protected value got different outcomes (an error oracle), or a released row
  stands for fewer than k patients. The attack's test fails, naming the SQL and the leaked value;
- `info (permitted differencing)`: attacks that only difference two k-safe answers over
  filterable columns, which the contract (PRIVACY.md 3.6, last paragraph) does not promise to
  stop. They are reported, never failed (xfail when they succeed).

The contract is /work/shared/spec/PRIVACY.md (sections 3 and 6). Timing channels are out of scope;
the errors of work the analyst sizes (a pad, a pattern) on hidden rows are class 11, and errors
of the engine's own work on them (decimal arithmetic) class 12.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
from typing import Any, Callable

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pandas as pd
import pytest

from conftest import airlock_binary

K = 10
P = "hospital.patients"
V = "hospital.visits"


# --------------------------------------------------------------------------------------------
# Plumbing: results, findings, the per-attack context
# --------------------------------------------------------------------------------------------


def lit(v: Any) -> str:
    """An SQL literal for a Python/pandas value."""
    if v is None:
        return "NULL"
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if hasattr(v, "isoformat") and not isinstance(v, (int, float)):
        return f"DATE '{v.isoformat()[:10]}'"
    if isinstance(v, float):
        return repr(float(v))
    return str(int(v))


def conj(d: dict[str, Any], prefix: str = "") -> str:
    return " AND ".join(f"{prefix}{c} = {lit(v)}" for c, v in d.items())


CODE_RE = re.compile(r"\[([A-Z][A-Z0-9_]+)\]")
REQ_RE = re.compile(r"\[APPROVAL_PENDING\] request (\S+?):")


@dataclasses.dataclass
class Res:
    sql: str
    params: tuple | None = None
    ok: bool = False
    rows: list | None = None
    columns: list | None = None
    error: str | None = None

    @property
    def code(self) -> str | None:
        if self.ok:
            return None
        m = CODE_RE.search(self.error or "")
        return m.group(1) if m else "ERROR"

    @property
    def released(self) -> bool:
        return self.ok and bool(self.rows)

    @property
    def request_id(self) -> str | None:
        m = REQ_RE.search(self.error or "")
        return m.group(1) if m else None

    def scalar(self):
        """The first column of the single released row, or None (refused / nothing released)."""
        if not self.released:
            return None
        return self.rows[0][0]

    def keyed(self, nkeys: int = 1) -> dict:
        """Released rows as {group key (tuple if nkeys > 1): remaining value (or tuple)}."""
        out = {}
        for r in self.rows or []:
            key = r[0] if nkeys == 1 else tuple(r[:nkeys])
            rest = r[nkeys:]
            out[key] = rest[0] if len(rest) == 1 else tuple(rest)
        return out

    def signature(self, subs: list[tuple[str, str]] = ()) -> tuple:
        """What an observer can tell apart: released or not, the code, the normalized message, rows."""
        msg = self.error or ""
        msg = re.sub(r"request \S+?:", "request <id>:", msg)
        for v in sorted({str(v) for pair in subs for v in pair if v}, key=len, reverse=True):
            msg = msg.replace(v, "<V>")
        msg = re.sub(r"\b[0-9a-f]{16,}\b", "<hex>", msg)
        rows = None
        if self.ok:
            rows = tuple(sorted((tuple(_norm(x) for x in r) for r in self.rows or []), key=repr))  # order is free
        return (self.ok, self.code, msg, rows)

    def short(self) -> str:
        if self.ok:
            return f"released {len(self.rows or [])} row(s)"
        return f"{self.code}: {(self.error or '')[:160]}"


def _norm(x):
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return float(f"{x:.10g}")  # parallel sums differ in the last bits
    return x


def same(guess, secret) -> bool:
    if guess is None or secret is None:
        return False
    if isinstance(secret, (set, frozenset)):
        return isinstance(guess, (set, frozenset)) and set(guess) == set(secret) and len(secret) > 0
    if isinstance(secret, bool) or isinstance(guess, bool):
        return bool(guess) is bool(secret) if isinstance(guess, bool) and isinstance(secret, bool) else False
    if isinstance(secret, (int, float)) and isinstance(guess, (int, float)):
        if isinstance(guess, float) and math.isnan(guess):
            return False
        return math.isclose(float(guess), float(secret), rel_tol=1e-7, abs_tol=1e-6)
    return guess == secret


@dataclasses.dataclass
class Finding:
    kind: str  # guess | oracle | kcheck | interval | info | mask
    what: str
    leak: bool
    detail: str
    info: bool = False


class AttackContext:
    def __init__(self, env: "Env"):
        self.env = env
        self.results: list[Res] = []
        self.findings: list[Finding] = []
        self.notes: list[str] = []

    # -- running queries ------------------------------------------------------------------
    def q(self, sql: str, params: tuple | None = None, user: str = "analyst") -> Res:
        conn = self.env.conn(user)
        res = Res(sql=sql, params=params)
        try:
            with conn.cursor() as cur:
                if params is None:
                    cur.execute(sql)
                else:
                    cur.execute(sql, parameters=params)
                tbl = cur.fetch_arrow_table()
            res.ok = True
            res.columns = tbl.column_names
            res.rows = [tuple(r.values()) for r in tbl.to_pylist()]
        except adbc_driver_manager.Error as e:  # every refusal and failure
            res.error = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - a broken stream is an outcome too
            res.error = f"{type(e).__name__}: {e}"
        if user == "analyst":
            self.results.append(res)
        self.env.check_alive()
        return res

    # -- judging ----------------------------------------------------------------------------
    def guess(self, what: str, guess, secret, via: list[Res] | None = None, info: bool = False):
        leak = same(guess, secret)
        sqls = " | ".join(r.sql for r in (via or []) if r.ok)
        detail = f"guessed {guess!r}, truth {secret!r}" + (f"; via: {sqls}" if sqls else "")
        self.findings.append(Finding("guess", what, leak and not info, detail, info=info and leak))
        return leak

    def interval(self, what: str, lo, hi, secret, width_limit, informative: bool, via=None, info=False):
        """A binary search's result: leaks if it pinned the secret into a narrow interval."""
        leak = (
            informative and lo is not None and hi is not None and lo <= secret <= hi and (hi - lo) <= width_limit
        )
        detail = f"interval [{lo}, {hi}] (limit {width_limit}), truth {secret!r}, informative={informative}"
        self.findings.append(Finding("interval", what, leak and not info, detail, info=info and leak))
        return leak

    def oracle(self, what: str, a: Res, b: Res, subs: list[tuple[str, str]] = (), values_leak: bool = True):
        """Two probes that differ only in a protected value must look the same.

        A different outcome (released or not, error code, message, number of rows) is an oracle.
        Different released *values* are a leak too unless `values_leak` is False: the probe then
        only filters on filterable columns (a predicate that the server made total, e.g.
        `1 / CAST(NOT (...) AS INT) = 1` == `NOT (...)`), so the two answers are k-safe counts
        whose difference is the permitted differencing of PRIVACY.md 3.6 (reported as info).
        """
        sa, sb = a.signature(subs), b.signature(subs)
        shape_a = sa[:3] + (None if sa[3] is None else len(sa[3]),)
        shape_b = sb[:3] + (None if sb[3] is None else len(sb[3]),)
        leak = sa != sb
        info = False
        if leak and shape_a == shape_b and not values_leak:
            leak, info = False, True
        detail = f"true probe -> {a.short()} || false probe -> {b.short()}"
        if leak or info:
            if sa[3] != sb[3]:
                detail += f" || values {list(sa[3] or [])[:3]} vs {list(sb[3] or [])[:3]}"
            detail += f" || SQL(true): {a.sql}"
        self.findings.append(Finding("oracle", what, leak, detail, info=info))
        return leak

    def kcheck(self, res: Res, frame: pd.DataFrame, keys: list[str], entity: str = "patient_id",
               nkeys: int | None = None, what: str = "k per released row"):
        """Every released row's group (same filters, same keys) must have >= k distinct entities.

        `frame` is the owner's rows after the attack's filters (and joins); `keys` its group-key
        columns in the order of the released columns. A released key that the owner cannot find
        in the frame counts as a violation (it came from rows the frame does not have).
        """
        if not res.released:
            return False
        nkeys = len(keys) if nkeys is None else nkeys
        if keys:
            counts = frame.groupby(keys, dropna=False)[entity].nunique()
            table = {}
            for key, n in counts.items():
                kk = key if isinstance(key, tuple) else (key,)
                table[tuple(_kn(x) for x in kk)] = n
        else:
            table = {(): frame[entity].nunique()}
        bad = []
        for r in res.rows:
            key = tuple(_kn(x) for x in r[:nkeys])
            n = table.get(key)
            if n is None or n < K:
                bad.append((key, n))
        leak = bool(bad)
        self.findings.append(
            Finding("kcheck", what, leak, f"rows below k (key, distinct patients): {bad[:5]} of {len(res.rows)}; "
                                          f"SQL: {res.sql}")
        )
        return leak

    def flag(self, what: str, leak: bool, detail: str, info: bool = False):
        self.findings.append(Finding("flag", what, leak and not info, detail, info=info and leak))
        return leak

    def note(self, text: str):
        self.notes.append(text)

    # -- summary --------------------------------------------------------------------------------
    def outcome(self) -> str:
        if any(f.leak for f in self.findings):
            return "LEAK"
        if any(f.info for f in self.findings):
            return "info: differencing reveals"
        if any(r.released for r in self.results):
            return "released-safe"
        if any(r.ok for r in self.results):
            return "released-empty"
        return "refused"


def _kn(x):
    """Normalize a group key value for lookups (numpy/pandas scalars, NaN/NaT as None, dates)."""
    if x is None:
        return None
    try:
        if pd.isna(x):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(x, pd.Timestamp):
        return x.date()
    if hasattr(x, "date") and callable(x.date) and type(x).__name__ == "datetime":
        return x.date()
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


# --------------------------------------------------------------------------------------------
# The environment: connections, ground truth, targets
# --------------------------------------------------------------------------------------------


class Env:
    def __init__(self, server):
        self.server = server
        self._conns: dict[str, Any] = {}
        self.pt: pd.DataFrame = self.owner_frame(f"SELECT * FROM {P}")
        self.vt: pd.DataFrame = self.owner_frame(f"SELECT * FROM {V}")
        self.t = Targets(self.pt, self.vt)

    def conn(self, user: str):
        c = self._conns.get(user)
        if c is None:
            c = flightsql.connect(self.server.uri, db_kwargs={"username": user, "password": user})
            self._conns[user] = c
        return c

    def reset(self, user: str):
        c = self._conns.pop(user, None)
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass

    def owner_frame(self, sql: str) -> pd.DataFrame:
        with self.conn("owner").cursor() as cur:
            cur.execute(sql)
            df = cur.fetch_arrow_table().to_pandas()
        for c in df.columns:
            if str(df[c].dtype).startswith("datetime64") or df[c].dtype == object and len(df) and \
                    type(df[c].iloc[0]).__name__ == "date":
                df[c] = pd.to_datetime(df[c]).dt.date
        return df

    def check_alive(self):
        if self.server.proc.poll() is not None:
            raise AssertionError(f"the airlock server died (exit {self.server.proc.returncode})")

    def cli(self, *args: str, user: str = "owner", timeout: int = 60) -> subprocess.CompletedProcess:
        env = dict(os.environ, AIRLOCK_URL=self.server.uri, AIRLOCK_USER=user, AIRLOCK_PASSWORD=user)
        return subprocess.run([airlock_binary(), *args], env=env, capture_output=True, text=True, timeout=timeout)

    def close(self):
        for u in list(self._conns):
            self.reset(u)


class Targets:
    """Secrets picked from the owner's data (deterministic: ties broken by patient_id)."""

    def __init__(self, pt: pd.DataFrame, vt: pd.DataFrame):
        self.pt, self.vt = pt, vt
        pt = pt.sort_values("patient_id").reset_index(drop=True)
        self.N = len(pt)
        self.total_cost = float(pt.cost.sum())
        self.total_los = int(pt.length_of_stay.sum())
        dx_counts = pt.diagnosis.value_counts()
        self.dx_counts = dx_counts
        self.common_dx = sorted(d for d, n in dx_counts.items() if n >= 100)
        qi_n = pt.groupby(["zip", "age", "sex"]).patient_id.transform("count")
        zip_n = pt.zip.map(pt.zip.value_counts())
        # U: alone in (zip, age, sex), in a zip of >= 30 patients, with a common diagnosis.
        cand = pt[(qi_n == 1) & (zip_n >= 30) & pt.diagnosis.isin(self.common_dx)]
        self.u = cand.iloc[0]
        self.uq = {"zip": self.u.zip, "age": int(self.u.age), "sex": self.u.sex}
        self.U = conj(self.uq)  # an SQL predicate that isolates U
        self.u_other_dx = next(d for d in self.common_dx if d != self.u.diagnosis)
        # A rare diagnosis (fewer than k patients; prefer exactly one) and its holder(s).
        rare = dx_counts[dx_counts < K]
        assert len(rare) > 0, "the demo has rare diagnoses"
        ones = sorted(d for d, n in rare.items() if n == 1)
        self.rd = ones[0] if ones else sorted(rare.index, key=lambda d: (rare[d], d))[0]
        self.rd_n = int(dx_counts[self.rd])
        self.rd_rows = pt[pt.diagnosis == self.rd]
        self.r = self.rd_rows.iloc[0]
        self.nosuch_dx = "Zz no such diagnosis"
        # Patient 7 and the max-cost patient.
        self.p7 = pt[pt.patient_id == 7].iloc[0]
        self.cost7 = float(self.p7.cost)
        self.mx = pt.loc[pt.cost.idxmax()]
        self.max_cost = float(pt.cost.max())
        self.min_cost = float(pt.cost.min())
        top = pt.cost.sort_values(ascending=False).tolist()
        self.top = top
        # Visits of patient 7.
        v7 = vt[vt.patient_id == 7]
        self.v7_n = len(v7)
        self.v7_cost = float(v7.cost.sum())
        self.v7_depts = sorted(set(v7.department))
        self.depts = sorted(set(vt.department))
        self.v7_no_dept = next((d for d in self.depts if d not in self.v7_depts), None)
        # Groups of exactly 9 and exactly 10 patients over filterable columns.
        self.g9 = self._group_of(9)
        self.g10 = self._group_of(10)
        # A big zip, for padding.
        self.big_zip = pt.zip.value_counts().index[0]
        # The only patient of some zip (the target of the join attacks), if there is one.
        zips = pt.zip.value_counts()
        alone = sorted(z for z, n in zips.items() if n == 1)
        self.lone = pt[pt.zip == alone[0]].iloc[0] if alone else None
        # A ward with an odd number of patients (median is then one patient's value).
        wards = pt.ward.value_counts()
        self.odd_ward = sorted(w for w, n in wards.items() if n % 2 == 1 and n >= K)[0] if any(
            n % 2 == 1 and n >= K for n in wards) else None

    def _group_of(self, n: int) -> dict | None:
        pt = self.pt
        for cols in (["zip"], ["diagnosis"], ["zip", "sex"], ["ward", "diagnosis"], ["zip", "diagnosis"],
                     ["zip", "ward"], ["age", "sex"], ["age"]):
            counts = pt.groupby(cols).patient_id.nunique()
            hits = sorted(k for k, c in counts.items() if c == n)
            if hits:
                key = hits[0] if isinstance(hits[0], tuple) else (hits[0],)
                return {c: (int(v) if c == "age" else v) for c, v in zip(cols, key)}
        return None

    def frame(self, pred: Callable[[pd.DataFrame], pd.Series] | None = None) -> pd.DataFrame:
        return self.pt if pred is None else self.pt[pred(self.pt)]

    def cost_of(self, pid: int) -> float:
        return float(self.pt.loc[self.pt.patient_id == pid, "cost"].iloc[0])

    def sum_cost(self, pids) -> float:
        return float(self.pt.loc[self.pt.patient_id.isin(list(pids)), "cost"].sum())


# --------------------------------------------------------------------------------------------
# The attacks
# --------------------------------------------------------------------------------------------

ATTACKS: dict[str, tuple[str, Callable[[AttackContext, Targets], None]]] = {}


def attack(name: str, cls: str):
    def deco(fn):
        assert name not in ATTACKS, name
        ATTACKS[name] = (cls, fn)
        return fn

    return deco


def total_cost(ctx: AttackContext) -> float | None:
    return ctx.q(f"SELECT sum(cost) FROM {P}").scalar()


def minus(a, b):
    return None if a is None or b is None else a - b


def bsearch(probe: Callable[[float], Res], lo: float, hi: float, steps: int = 22):
    """Binary search for the X where probe(X)'s observable outcome changes.

    probe(lo) and probe(hi) must look different for the search to carry information; returns
    (lo, hi, informative) with the threshold in (lo, hi].
    """

    def sig(x):
        ok, code, msg, rows = probe(x).signature([(repr(x), "")])
        return ok, code, msg, bool(rows)  # released or not, not the released values

    s_lo, s_hi = sig(lo), sig(hi)
    if s_lo == s_hi:
        return lo, hi, False
    for _ in range(steps):
        mid = round((lo + hi) / 2, 6)
        s = sig(mid)
        if s == s_lo:
            lo = mid
        elif s == s_hi:
            hi = mid
        else:
            return lo, hi, False
    return lo, hi, True


# ---- class 1: indicators inside aggregates, without CASE ---------------------------------


@attack("c1_bool_cast_double_qi", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost * CAST(({t.U}) AS DOUBLE)) FROM {P}")
    ctx.guess("cost of the patient alone in (zip, age, sex)", r.scalar(), float(t.u.cost), [r])


@attack("c1_bool_cast_int_qi", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost * CAST({t.U} AS INT)) AS s FROM {P}")
    ctx.guess("cost of U", r.scalar(), float(t.u.cost), [r])


@attack("c1_bool_cast_groupby_dx", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT diagnosis, sum(CAST({t.U} AS INT)) FROM {P} GROUP BY diagnosis")
    hits = [d for d, s in r.keyed().items() if s == 1]
    ctx.guess("diagnosis of U", hits[0] if len(hits) == 1 else None, t.u.diagnosis, [r])
    ctx.kcheck(r, t.pt, ["diagnosis"])


@attack("c1_signum_abs_pid", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost * (1 - abs(signum(patient_id - 7)))) FROM {P}")
    ctx.guess("cost of patient 7", r.scalar(), t.cost7, [r])


@attack("c1_var_of_product", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT var(cost * CAST(patient_id = 7 AS DOUBLE)), count(*) FROM {P}")
    g = None
    if r.released and r.rows[0][0] is not None:
        v, n = r.rows[0]
        g = math.sqrt(v * n)  # var_samp of one non-zero value c among n: c^2 / n
    ctx.guess("cost of patient 7", g, t.cost7, [r])


@attack("c1_stddev_of_product", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT stddev(cost * CAST({t.U} AS DOUBLE)), count(*) FROM {P}")
    g = None
    if r.released and r.rows[0][0] is not None:
        s, n = r.rows[0]
        g = s * math.sqrt(n)
    ctx.guess("cost of U", g, float(t.u.cost), [r])


@attack("c1_integer_division_pid", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost * (1 / (abs(patient_id - 7) + 1))) FROM {P}")
    ctx.guess("cost of patient 7", r.scalar(), t.cost7, [r])


@attack("c1_integer_division_qi", "1 indicator")
def _(ctx, t):
    u = t.uq
    r = ctx.q(
        f"SELECT sum(cost * (1 / (abs(age - {u['age']}) + 1)) * (1 / (abs(length(zip) - length({lit(u['zip'])})) "
        f"+ 1)) * (1 / (abs(strpos(zip, {lit(u['zip'])}) - 1) + 1)) * (1 / (abs(ascii(sex) - {ord(u['sex'][0])}) + 1))) "
        f"FROM {P}"
    )
    # The zip indicator above is strpos-based (prefix match); pin the guess to the owner's value.
    pt = t.pt
    mask = (pt.age == u["age"]) & (pt.zip.str.startswith(u["zip"])) & (pt.zip.str.len() == len(u["zip"])) & (
        pt.sex.str[0] == u["sex"][0])
    ctx.guess("cost of U (integer-division indicator)", r.scalar(), float(pt[mask].cost.sum()), [r])


@attack("c1_values_weight_join", "1 indicator")
def _(ctx, t):
    # A relation the query makes, joined on a filterable column, weights one person's
    # rows (found by a hostile analyst: the diagnosis of the only patient of a zip in one
    # query, padded past k by a big zip of weight 0).
    if t.lone is None:
        ctx.note("no zip with exactly one patient in this data")
        return
    z, secret = t.lone.zip, t.lone.diagnosis
    vs = [
        ctx.q(f"SELECT p.diagnosis, sum(v.w) FROM {P} p JOIN (VALUES ({lit(z)}, 1000000), ({lit(t.big_zip)}, 0)) "
              f"v(z, w) ON p.zip = v.z GROUP BY p.diagnosis"),
        ctx.q(f"SELECT p.diagnosis, count(v.w) FROM {P} p JOIN (VALUES ({lit(z)}, 1), ({lit(t.big_zip)}, NULL)) "
              f"v(z, w) ON p.zip = v.z GROUP BY p.diagnosis"),
        ctx.q(f"WITH v(z, w) AS (VALUES ({lit(z)}, 1000000.0), ({lit(t.big_zip)}, 0.0)) "
              f"SELECT p.diagnosis, avg(w) FROM {P} p, v WHERE p.zip = v.z GROUP BY p.diagnosis"),
    ]
    for r in vs:
        hits = [d for d, w in r.keyed().items() if w]
        ctx.guess(f"diagnosis of the only patient of zip {z}", hits[0] if len(hits) == 1 else None, secret, [r])


@attack("c1_outer_self_join_marks", "1 indicator")
def _(ctx, t):
    # An outer self-join whose ON clause drops one person from the nullable side: two
    # sums in one k-safe row differ by exactly that person (found by a hostile analyst).
    if t.lone is None:
        ctx.note("no zip with exactly one patient in this data")
        return
    z, who = t.lone.zip, t.lone
    r = ctx.q(f"SELECT count(*) AS n, sum(p.cost) - sum(o.cost) AS d FROM {P} p LEFT JOIN {P} o "
              f"ON p.patient_id = o.patient_id AND p.zip <> {lit(z)}")
    ctx.guess(f"cost of the only patient of zip {z}", r.rows[0][1] if r.released and r.rows else None,
              float(who.cost), [r])
    r2 = ctx.q(f"SELECT p.diagnosis, count(DISTINCT p.patient_id) - count(DISTINCT o.patient_id) FROM {P} p "
               f"LEFT JOIN (SELECT * FROM {P} WHERE zip <> {lit(z)}) o ON p.patient_id = o.patient_id "
               f"GROUP BY p.diagnosis")
    hits = [d for d, n in r2.keyed().items() if n]
    ctx.guess(f"diagnosis of the only patient of zip {z}", hits[0] if len(hits) == 1 else None, who.diagnosis, [r2])


@attack("c1_self_join_multiplicity", "1 indicator")
def _(ctx, t):
    # A self-join on zip repeats each row by its zip's size: a lone patient's rows once,
    # a big zip's 1 000 times; the remainder of one count gives the lone patient's
    # diagnosis away (found by a hostile analyst).
    if t.lone is None:
        ctx.note("no zip with exactly one patient in this data")
        return
    z, big, who = t.lone.zip, t.big_zip, t.lone
    m = int((t.pt.zip == big).sum())
    found = None
    for d in t.common_dx[:3] + [who.diagnosis]:
        r = ctx.q(f"SELECT count(*) FROM {P} p JOIN {P} q ON p.zip = q.zip "
                  f"WHERE p.diagnosis = {lit(d)} AND p.zip IN ({lit(z)}, {lit(big)})")
        if r.released and r.rows and r.rows[0][0] is not None and r.rows[0][0] % m == 1:
            found = d
    ctx.guess(f"diagnosis of the only patient of zip {z}", found, who.diagnosis)


@attack("c1_power_zero", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost * power(0.0, CAST(abs(patient_id - 7) AS DOUBLE))) FROM {P}")
    r2 = ctx.q(f"SELECT sum(cost * power(0, abs(patient_id - 7))) FROM {P}")
    ctx.guess("cost of patient 7 (power float)", r.scalar(), t.cost7, [r])
    ctx.guess("cost of patient 7 (power int)", r2.scalar(), t.cost7, [r2])


@attack("c1_least_greatest", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost * (1 - least(abs(patient_id - 7), 1))) FROM {P}")
    r2 = ctx.q(f"SELECT sum(cost * greatest(1 - abs(patient_id - 7), 0)) FROM {P}")
    ctx.guess("cost of patient 7 (least)", r.scalar(), t.cost7, [r])
    ctx.guess("cost of patient 7 (greatest)", r2.scalar(), t.cost7, [r2])


@attack("c1_coalesce_nullif", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost * coalesce(nullif(patient_id, 7) * 0, 1)) FROM {P}")
    ctx.guess("cost of patient 7", r.scalar(), t.cost7, [r])


@attack("c1_count_nullif_rare", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT count(*) - count(nullif(diagnosis, {lit(t.rd)})) FROM {P}")
    ctx.guess("number of patients with the rare diagnosis (< k)", r.scalar(), t.rd_n, [r])


@attack("c1_bit_xor", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost * (1 - least(patient_id ^ 7, 1))) FROM {P}")
    r2 = ctx.q(f"SELECT sum(cost * (1 - least((patient_id | 7) - (patient_id & 7) , 1))) FROM {P}")
    ctx.guess("cost of patient 7 (xor)", r.scalar(), t.cost7, [r])
    ctx.guess("cost of patient 7 (or-and)", r2.scalar(), t.cost7, [r2])


@attack("c1_filter_clause_pid", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost) FILTER (WHERE patient_id = 7) FROM {P}")
    ctx.guess("cost of patient 7", r.scalar(), t.cost7, [r])


@attack("c1_avg_times_count", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT avg(cost * CAST(patient_id = 7 AS DOUBLE)) * count(*) FROM {P}")
    ctx.guess("cost of patient 7", r.scalar(), t.cost7, [r])


@attack("c1_los_indicator", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(length_of_stay * CAST(patient_id = 7 AS BIGINT)) FROM {P}")
    ctx.guess("length of stay of patient 7", r.scalar(), int(t.p7.length_of_stay), [r])


@attack("c1_visits_indicator", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost * CAST(patient_id = 7 AS DOUBLE)), sum(CAST(patient_id = 7 AS INT)) FROM {V}")
    g1 = r.rows[0][0] if r.released else None
    g2 = r.rows[0][1] if r.released else None
    ctx.guess("visit cost of patient 7", g1, t.v7_cost, [r])
    ctx.guess("number of visits of patient 7", g2, t.v7_n, [r])


@attack("c1_rare_dx_bool_sum", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(CAST(diagnosis = {lit(t.rd)} AS INT)) FROM {P}")
    ctx.guess("count of the rare diagnosis", r.scalar(), t.rd_n, [r])


@attack("c1_cte_wrapped_indicator", "1 indicator")
def _(ctx, t):
    r = ctx.q(f"WITH x AS (SELECT cost * CAST(({t.U}) AS DOUBLE) AS c FROM {P}) SELECT sum(c) FROM x")
    ctx.guess("cost of U", r.scalar(), float(t.u.cost), [r])


@attack("c1_starts_with_indicator", "1 indicator")
def _(ctx, t):
    u = t.uq
    r = ctx.q(f"SELECT sum(cost * CAST(starts_with(zip, {lit(u['zip'])}) AND age = {u['age']} AND "
              f"sex = {lit(u['sex'])} AS DOUBLE)) FROM {P}")
    pt = t.pt
    secret = float(pt[pt.zip.str.startswith(u["zip"]) & (pt.age == u["age"]) & (pt.sex == u["sex"])].cost.sum())
    ctx.guess("cost of U", r.scalar(), secret, [r])


# ---- class 2: excluding one entity without a literal comparison, then total minus answer --


def _exclusion(ctx, t, sql, what="cost of patient 7", secret=None, total_sql=None):
    total = ctx.q(total_sql or f"SELECT sum(cost) FROM {P}").scalar()
    r = ctx.q(sql)
    ctx.guess(what, minus(total, r.scalar()), t.cost7 if secret is None else secret, [r])


@attack("c2_ne_scalar_subquery", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {P} WHERE patient_id <> (SELECT 7)")


@attack("c2_not_in_subquery", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {P} WHERE patient_id NOT IN (SELECT 7)")


@attack("c2_ne_arith_zero_age", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {P} WHERE patient_id <> 7 + 0 * age")


@attack("c2_anti_join_values", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(p.cost) FROM {P} p LEFT JOIN (VALUES (7)) v(id) ON p.patient_id = v.id "
                       f"WHERE v.id IS NULL")


@attack("c2_left_join_values_group", "2 exclusion")
def _(ctx, t):
    total = ctx.q(f"SELECT sum(cost) FROM {P}").scalar()
    r = ctx.q(f"SELECT v.id, sum(p.cost) FROM {P} p LEFT JOIN (VALUES (7)) v(id) ON p.patient_id = v.id GROUP BY v.id")
    ctx.guess("cost of patient 7", minus(total, r.keyed().get(None)), t.cost7, [r])
    ctx.kcheck(r, t.pt.assign(g=t.pt.patient_id.where(t.pt.patient_id == 7)), ["g"])


@attack("c2_except_subquery", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {P} WHERE patient_id IN (SELECT patient_id FROM {P} EXCEPT SELECT 7)")


@attack("c2_not_exists_values", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(p.cost) FROM {P} p WHERE NOT EXISTS "
                       f"(SELECT 1 FROM (VALUES (7)) v(id) WHERE v.id = p.patient_id)")


@attack("c2_not_in_list", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {P} WHERE patient_id NOT IN (7)")


@attack("c2_ranges", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {P} WHERE patient_id < 7 OR patient_id BETWEEN 8 AND 100000000")


@attack("c2_minus_nonzero", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {P} WHERE patient_id - 7 <> 0")


@attack("c2_varchar_cast", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {P} WHERE CAST(patient_id AS VARCHAR) <> '7'")


@attack("c2_is_distinct_from", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {P} WHERE patient_id IS DISTINCT FROM 7")


@attack("c2_cte_renamed_key", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"WITH x AS (SELECT patient_id AS k, cost FROM {P}) SELECT sum(cost) FROM x WHERE k <> 7")


@attack("c2_visits_key", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {V} WHERE patient_id <> (SELECT 7)", what="visit cost of patient 7",
               secret=t.v7_cost, total_sql=f"SELECT sum(cost) FROM {V}")


@attack("c2_generate_series_semijoin", "2 exclusion")
def _(ctx, t):
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {P} WHERE patient_id IN (SELECT value FROM generate_series(1, 6) "
                       f"UNION ALL SELECT value FROM generate_series(8, 1000000))")


@attack("c2_ne_released_count", "2 exclusion")
def _(ctx, t):
    # Compare the entity key with a released aggregate whose value happens to be a patient id.
    zc = t.pt.zip.value_counts()
    z, n = next((z, int(n)) for z, n in sorted(zc.items()) if n >= K and (t.pt.patient_id == n).any())
    _exclusion(ctx, t, f"SELECT sum(cost) FROM {P} WHERE patient_id <> (SELECT count(*) FROM {P} WHERE zip = {lit(z)})",
               what=f"cost of patient {n}", secret=t.cost_of(n))


@attack("c2_param_exclusion", "2 exclusion")
def _(ctx, t):
    total = ctx.q(f"SELECT sum(cost) FROM {P}").scalar()
    r = ctx.q(f"SELECT sum(cost) FROM {P} WHERE patient_id <> $1", params=(7,))
    ctx.guess("cost of patient 7 (bound parameter)", minus(total, r.scalar()), t.cost7, [r])


# Informational: differencing with filterable columns only (the contract permits it).

@attack("info_diff_qi_total_minus_rest", "info differencing")
def _(ctx, t):
    total = ctx.q(f"SELECT sum(cost) FROM {P}").scalar()
    r = ctx.q(f"SELECT sum(cost) FROM {P} WHERE NOT ({t.U})")
    ctx.guess("cost of U by differencing two k-safe sums", minus(total, r.scalar()), float(t.u.cost), [r], info=True)


@attack("info_diff_rare_count", "info differencing")
def _(ctx, t):
    total = ctx.q(f"SELECT count(*) FROM {P}").scalar()
    r = ctx.q(f"SELECT count(*) FROM {P} WHERE diagnosis <> {lit(t.rd)}")
    ctx.guess("rare diagnosis count by differencing", minus(total, r.scalar()), t.rd_n, [r], info=True)


@attack("info_diff_count_distinct_dx", "info differencing")
def _(ctx, t):
    a = ctx.q(f"SELECT count(DISTINCT diagnosis) FROM {P}").scalar()
    b = ctx.q(f"SELECT count(DISTINCT diagnosis) FROM {P} WHERE diagnosis <> {lit(t.rd)}").scalar()
    g = None if a is None or b is None else (a - b == 1)
    ctx.guess("existence of the rare diagnosis (count DISTINCT differencing)", g, True, info=True)


@attack("info_threshold_boundary_search", "info differencing")
def _(ctx, t):
    # Released iff >= k patients have cost > X: a binary search finds the k-th largest cost.
    lo, hi, inf = bsearch(lambda x: ctx.q(f"SELECT count(*) FROM {P} WHERE cost > {x!r}"), t.min_cost, t.max_cost, 24)
    ctx.interval("k-th largest cost via release/suppression of count(cost > X)", lo, hi, t.top[K - 1], 0.05, inf,
                 info=True)


@attack("visit_id_laundering", "differencing")
def _(ctx, t):
    # The entity key equi-joined to a filterable catalog column, then filtered with a literal.
    # Refused since the v2 rewriter (an entity key joins only non-filterable columns of a
    # protected table): a leak here fails the suite.
    a = ctx.q(f"SELECT sum(p.cost) FROM {P} p JOIN {V} v ON p.patient_id = v.visit_id").scalar()
    b = ctx.q(f"SELECT sum(p.cost) FROM {P} p JOIN {V} v ON p.patient_id = v.visit_id WHERE v.visit_id <> 7").scalar()
    ctx.guess("cost of patient 7 via visit_id = patient_id join (filterable literal)", minus(a, b), t.cost7)


# ---- class 3: run-time error oracles below the threshold -----------------------------------


def _dx_oracle(ctx, t, expr_fn, where: str | None = None, what="diagnosis of U"):
    """expr_fn(dx) -> a SELECT list; probe U's true diagnosis against another common one."""
    w = f" WHERE {where}" if where else ""
    a = ctx.q(f"SELECT {expr_fn(t.u.diagnosis)} FROM {P}{w}")
    b = ctx.q(f"SELECT {expr_fn(t.u_other_dx)} FROM {P}{w}")
    ctx.oracle(what, a, b, [(t.u.diagnosis, t.u_other_dx)])


@attack("c3_div_zero_filtered", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"sum(1 / CAST(diagnosis <> {lit(d)} AS INT))", where=t.U)


@attack("c3_div_zero_global", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"sum(1 / CAST(NOT ({t.U} AND diagnosis = {lit(d)}) AS INT))")


@attack("c3_mod_zero", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"sum(age % CAST(diagnosis <> {lit(d)} AS INT))", where=t.U)


@attack("c3_failed_cast", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"sum(CAST(CASE WHEN diagnosis = {lit(d)} THEN 'x' ELSE '1' END AS INT))", where=t.U)


@attack("c3_failed_cast_no_case", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"sum(CAST(concat('1', repeat('x', CAST(diagnosis = {lit(d)} AS INT))) AS INT))",
               where=t.U)


@attack("c3_make_date", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"count(make_date(2020, 1 + 12 * CAST(diagnosis = {lit(d)} AS INT), 1))", where=t.U)


@attack("c3_to_date_bad_string", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"count(to_date(concat('2020-', CAST(1 + 12 * CAST(diagnosis = {lit(d)} AS INT) "
                                 f"AS VARCHAR), '-01')))", where=t.U)


@attack("c3_arrow_cast_overflow_age", "3 error oracle")
def _(ctx, t):
    # With the rare diagnosis isolating its holder(s): arrow_cast(age + 127 - A, 'Int8') fails iff max age > A.
    a_max = int(t.rd_rows.age.max())

    def probe(a):
        return ctx.q(f"SELECT count(arrow_cast(age + {127 - a}, 'Int8')) FROM {P} WHERE diagnosis = {lit(t.rd)}")

    ctx.oracle("max age of the rare-diagnosis patients (> age-1 vs > age)", probe(a_max - 1), probe(a_max),
               [(str(127 - a_max + 1), str(127 - a_max))])


@attack("c3_sqrt_negative", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"sum(sqrt(0.0 - CAST(diagnosis = {lit(d)} AS DOUBLE)))", where=t.U)


@attack("c3_substr_negative_length", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"sum(length(substr(zip, 1, 1 - 2 * CAST(({t.U} AND diagnosis = {lit(d)}) AS INT))))")


@attack("c3_regex_error", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"count(*) FILTER (WHERE regexp_like(zip, repeat('(', CAST(({t.U} AND diagnosis = "
                                 f"{lit(d)}) AS INT))))")


@attack("c3_regex_in_where", "3 error oracle")
def _(ctx, t):
    def probe(d):
        return ctx.q(f"SELECT count(*) FROM {P} WHERE regexp_like(zip, repeat('(', CAST(({t.U} AND diagnosis = "
                     f"{lit(d)}) AS INT)))")

    ctx.oracle("diagnosis of U (regex in WHERE)", probe(t.u.diagnosis), probe(t.u_other_dx),
               [(t.u.diagnosis, t.u_other_dx)], values_leak=False)


@attack("c3_date_trunc_bad_unit", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"count(date_trunc(CASE WHEN diagnosis = {lit(d)} THEN 'bogus' ELSE 'day' END, "
                                 f"admitted))", where=t.U)


@attack("c3_array_index", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"sum(make_array(1, 2)[1 - 5 * CAST(diagnosis = {lit(d)} AS INT)])", where=t.U)


@attack("c3_int_overflow", "3 error oracle")
def _(ctx, t):
    _dx_oracle(ctx, t, lambda d: f"sum(9223372036854775807 + CAST(({t.U} AND diagnosis = {lit(d)}) AS BIGINT))")


@attack("c3_div_zero_in_where", "3 error oracle")
def _(ctx, t):
    a = ctx.q(f"SELECT count(*) FROM {P} WHERE 1 / CAST(NOT ({t.U} AND diagnosis = {lit(t.u.diagnosis)}) AS INT) = 1")
    b = ctx.q(f"SELECT count(*) FROM {P} WHERE 1 / CAST(NOT ({t.U} AND diagnosis = {lit(t.u_other_dx)}) AS INT) = 1")
    ctx.oracle("diagnosis of U (error in WHERE)", a, b, [(t.u.diagnosis, t.u_other_dx)], values_leak=False)


@attack("c3_div_zero_group_key", "3 error oracle")
def _(ctx, t):
    a = ctx.q(f"SELECT 1 / CAST(NOT ({t.U} AND diagnosis = {lit(t.u.diagnosis)}) AS INT) AS g, count(*) FROM {P} "
              f"GROUP BY 1")
    b = ctx.q(f"SELECT 1 / CAST(NOT ({t.U} AND diagnosis = {lit(t.u_other_dx)}) AS INT) AS g, count(*) FROM {P} "
              f"GROUP BY 1")
    # The division is total (NULL on zero): the group key is `NOT (...)` in disguise, over
    # filterable columns only. The two answers are k-safe counts (4999 vs 5000) whose
    # difference is the differencing threshold mode does not promise against (§3.6).
    ctx.oracle("diagnosis of U (error in group key)", a, b, [(t.u.diagnosis, t.u_other_dx)],
               values_leak=False)


@attack("c3_rare_dx_existence", "3 error oracle")
def _(ctx, t):
    a = ctx.q(f"SELECT sum(1 / CAST(diagnosis <> {lit(t.rd)} AS INT)) FROM {P}")
    b = ctx.q(f"SELECT sum(1 / CAST(diagnosis <> {lit(t.nosuch_dx)} AS INT)) FROM {P}")
    ctx.oracle("existence of the rare diagnosis", a, b, [(t.rd, t.nosuch_dx)])


@attack("c3_visits_dept_oracle", "3 error oracle")
def _(ctx, t):
    if not t.v7_depts or t.v7_no_dept is None:
        ctx.note("patient 7 has no visits / visits every department")
        return
    a = ctx.q(f"SELECT count(*) FROM {V} WHERE 1 / CAST(NOT (patient_id = 7 AND department = "
              f"{lit(t.v7_depts[0])}) AS INT) = 1")
    b = ctx.q(f"SELECT count(*) FROM {V} WHERE 1 / CAST(NOT (patient_id = 7 AND department = "
              f"{lit(t.v7_no_dept)}) AS INT) = 1")
    ctx.oracle("whether patient 7 visited a department", a, b, [(t.v7_depts[0], t.v7_no_dept)])


@attack("c3_param_oracle", "3 error oracle")
def _(ctx, t):
    sql = f"SELECT sum(1 / CAST(NOT ({t.U} AND diagnosis = $1) AS INT)) FROM {P}"
    a = ctx.q(sql, params=(t.u.diagnosis,))
    b = ctx.q(sql, params=(t.u_other_dx,))
    ctx.oracle("diagnosis of U (bound parameter)", a, b, [(t.u.diagnosis, t.u_other_dx)])


@attack("c3_cost_binary_search", "3 error oracle")
def _(ctx, t):
    # Error iff U's cost > X: binary search U's cost to a few cents.
    lo, hi, inf = bsearch(lambda x: ctx.q(f"SELECT sum(1 / CAST(NOT ({t.U} AND cost > {x!r}) AS INT)) FROM {P}"),
                          t.min_cost - 1, t.max_cost + 1, 24)
    ctx.interval("cost of U by error binary search", lo, hi, float(t.u.cost), 0.05, inf)


# ---- class 4: errors above released groups, on suppressed groups ---------------------------


@attack("c4_contract_case_15", "4 boundary")
def _(ctx, t):
    c = float(t.u.cost)

    def probe(x):
        return ctx.q(f"SELECT g, s FROM (SELECT CASE WHEN {t.U} THEN 'x' ELSE 'y' END AS g, sum(cost) AS s FROM {P} "
                     f"GROUP BY 1) WHERE 1 / (CASE WHEN g = 'x' AND s > {x!r} THEN 0 ELSE 1 END) = 1")

    ctx.oracle("cost of U > X through an outer WHERE", probe(c - 1.0), probe(c + 1.0), [(repr(c - 1.0), repr(c + 1.0))])


@attack("c4_outer_where_qi_groups", "4 boundary")
def _(ctx, t):
    c = float(t.u.cost)

    def probe(x):
        return ctx.q(f"SELECT zip, age, sex, s FROM (SELECT zip, age, sex, sum(cost) AS s FROM {P} GROUP BY zip, age, "
                     f"sex) WHERE 1 / CAST(NOT ({t.U} AND s > {x!r}) AS INT) = 1")

    ctx.oracle("cost of U > X (QI groups, outer WHERE)", probe(c - 1.0), probe(c + 1.0), [(repr(c - 1.0), repr(c + 1.0))])


@attack("c4_having_error", "4 boundary")
def _(ctx, t):
    c = float(t.u.cost)

    def probe(x):
        return ctx.q(f"SELECT zip, age, sex, count(*) FROM {P} GROUP BY zip, age, sex "
                     f"HAVING 1 / CAST(NOT ({t.U} AND sum(cost) > {x!r}) AS INT) = 1")

    ctx.oracle("cost of U > X (HAVING)", probe(c - 1.0), probe(c + 1.0), [(repr(c - 1.0), repr(c + 1.0))])


@attack("c4_outer_where_dx", "4 boundary")
def _(ctx, t):
    def probe(d):
        return ctx.q(f"SELECT * FROM (SELECT zip, age, sex, diagnosis, count(*) AS c FROM {P} "
                     f"GROUP BY zip, age, sex, diagnosis) WHERE 1 / CAST(NOT ({t.U} AND diagnosis = {lit(d)}) AS INT) = 1")

    ctx.oracle("diagnosis of U (outer WHERE)", probe(t.u.diagnosis), probe(t.u_other_dx),
               [(t.u.diagnosis, t.u_other_dx)])


@attack("c4_outer_projection_error", "4 boundary")
def _(ctx, t):
    def probe(d):
        return ctx.q(f"SELECT 1 / CAST(diagnosis <> {lit(d)} AS INT) FROM (SELECT diagnosis, count(*) AS c FROM {P} "
                     f"GROUP BY diagnosis)")

    ctx.oracle("existence of the rare diagnosis (outer projection)", probe(t.rd), probe(t.nosuch_dx),
               [(t.rd, t.nosuch_dx)])


@attack("c4_outer_filter_suppressed_group", "4 boundary")
def _(ctx, t):
    r = ctx.q(f"SELECT * FROM (SELECT diagnosis, count(*) AS c FROM {P} GROUP BY diagnosis) "
              f"WHERE diagnosis = {lit(t.rd)}")
    ctx.kcheck(r, t.pt, ["diagnosis"])
    b = ctx.q(f"SELECT * FROM (SELECT diagnosis, count(*) AS c FROM {P} GROUP BY diagnosis) "
              f"WHERE diagnosis = {lit(t.nosuch_dx)}")
    ctx.oracle("existence of the rare diagnosis (outer filter, empty vs error)", r, b, [(t.rd, t.nosuch_dx)])


@attack("c4_outer_order_limit", "4 boundary")
def _(ctx, t):
    r = ctx.q(f"SELECT diagnosis, c FROM (SELECT diagnosis, count(*) AS c FROM {P} GROUP BY diagnosis) "
              f"ORDER BY c ASC LIMIT 1")
    ctx.kcheck(r, t.pt, ["diagnosis"])


@attack("c4_outer_binary_search_cost", "4 boundary")
def _(ctx, t):
    lo, hi, inf = bsearch(
        lambda x: ctx.q(f"SELECT count(*) FROM (SELECT zip, age, sex, sum(cost) AS s FROM {P} GROUP BY zip, age, sex) "
                        f"WHERE 1 / CAST(NOT ({t.U} AND s > {x!r}) AS INT) = 1"),
        t.min_cost - 1, t.max_cost + 1, 24)
    ctx.interval("cost of U by outer-WHERE error binary search", lo, hi, float(t.u.cost), 0.05, inf)


# ---- class 5: UNION ALL padding -------------------------------------------------------------


@attack("c5_union_zero_rows_plus_one", "5 padding")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(c) FROM (SELECT 0.0 AS c FROM {P} WHERE zip = {lit(t.big_zip)} "
              f"UNION ALL SELECT cost AS c FROM {P} WHERE {t.U})")
    ctx.guess("cost of U", r.scalar(), float(t.u.cost), [r])


@attack("c5_union_with_entity_key", "5 padding")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost) FROM (SELECT patient_id, cost FROM {P} WHERE {t.U} "
              f"UNION ALL SELECT patient_id, 0.0 AS cost FROM {P})")
    ctx.guess("cost of U", r.scalar(), float(t.u.cost), [r])


@attack("c5_union_values_fake_entities", "5 padding")
def _(ctx, t):
    vals = ", ".join(f"({1000000 + i}, 0.0)" for i in range(12))
    r = ctx.q(f"SELECT sum(cost), count(DISTINCT patient_id) FROM (SELECT patient_id, cost FROM {P} WHERE {t.U} "
              f"UNION ALL SELECT * FROM (VALUES {vals}) v(patient_id, cost))")
    ctx.guess("cost of U", r.scalar(), float(t.u.cost), [r])


@attack("c5_union_count_rare", "5 padding")
def _(ctx, t):
    common = t.common_dx[0]
    n_common = int(t.dx_counts[common])
    r = ctx.q(f"SELECT count(*) FROM (SELECT diagnosis FROM {P} WHERE diagnosis = {lit(t.rd)} "
              f"UNION ALL SELECT diagnosis FROM {P} WHERE diagnosis = {lit(common)})")
    ctx.guess("count of the rare diagnosis", minus(r.scalar(), n_common), t.rd_n, [r])


@attack("c5_union_distinct_visits", "5 padding")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(c) FROM (SELECT cost AS c, 'v' AS src FROM {V} WHERE patient_id = 7 "
              f"UNION SELECT 0.0 AS c, department AS src FROM {V})")
    # UNION de-duplicates; patient 7's visit costs survive unless two are equal.
    ctx.guess("visit cost of patient 7", r.scalar(), float(sum(set(t.vt[t.vt.patient_id == 7].cost))), [r])


@attack("c5_union_group_padding", "5 padding")
def _(ctx, t):
    r = ctx.q(f"SELECT diagnosis, sum(cost) FROM (SELECT diagnosis, cost FROM {P} WHERE diagnosis = {lit(t.rd)} "
              f"UNION ALL SELECT {lit(t.rd)} AS diagnosis, 0.0 AS cost FROM {P} WHERE zip = {lit(t.big_zip)}) "
              f"GROUP BY diagnosis")
    ctx.guess("total cost of the rare-diagnosis patients", r.keyed().get(t.rd), float(t.rd_rows.cost.sum()), [r])


# ---- class 6: approvals must not match edited queries --------------------------------------


def _approve(ctx, res: Res) -> bool:
    rid = res.request_id
    if rid is None:
        ctx.note(f"no approval request: {res.short()}")
        return False
    out = ctx.env.cli("approvals", "approve", rid, "--reusable")
    if out.returncode != 0:
        out = ctx.env.cli("approvals", "approve", rid)
    if out.returncode != 0:
        ctx.note(f"approve {rid} failed: {out.stderr.strip()[:200]}")
        return False
    return True


def _approval_edit(ctx, t, base_sql, edited_sql, base_params=None, edited_params=None, what="cost of patient 7"):
    r0 = ctx.q(base_sql, base_params)
    if not _approve(ctx, r0):
        return
    r1 = ctx.q(base_sql, base_params)
    ctx.note(f"approved query re-run: {r1.short()}")
    r2 = ctx.q(edited_sql, edited_params)
    got = None
    if r2.released:
        for row in r2.rows:
            if row[0] == 7:
                got = row[1]
    ctx.guess(what + " (edited query matched an approval)", got, t.cost7, [r2])


def _pid_cost(pids_sql: str) -> str:
    return f"SELECT p.patient_id, p.cost FROM {P} p {pids_sql} ORDER BY p.patient_id"


@attack("c6_values_seventh_row", "6 approvals")
def _(ctx, t):
    six = ", ".join(f"({i})" for i in range(1, 7))
    seven = ", ".join(f"({i})" for i in range(1, 8))
    _approval_edit(ctx, t, _pid_cost(f"JOIN (VALUES {six}) v(id) ON p.patient_id = v.id"),
                   _pid_cost(f"JOIN (VALUES {seven}) v(id) ON p.patient_id = v.id"))


@attack("c6_values_changed_literal", "6 approvals")
def _(ctx, t):
    a = ", ".join(f"({i})" for i in (1, 2, 3, 4, 5, 6))
    b = ", ".join(f"({i})" for i in (1, 2, 3, 4, 5, 7))
    _approval_edit(ctx, t, _pid_cost(f"JOIN (VALUES {a}) v(id) ON p.patient_id = v.id WHERE p.age >= 0"),
                   _pid_cost(f"JOIN (VALUES {b}) v(id) ON p.patient_id = v.id WHERE p.age >= 0"))


@attack("c6_long_in_list_last_element", "6 approvals")
def _(ctx, t):
    ids = list(range(101, 141))
    a = ", ".join(map(str, ids))
    b = ", ".join(map(str, ids[:-1] + [7]))
    _approval_edit(ctx, t, _pid_cost(f"WHERE p.patient_id IN ({a})"), _pid_cost(f"WHERE p.patient_id IN ({b})"))


@attack("c6_long_string_literal_tail", "6 approvals")
def _(ctx, t):
    pad = "," + ",".join(str(i) for i in range(1000, 1100)) + ","
    a = lit(pad + "1,2,3,")
    b = lit(pad + "1,2,7,")
    f = "WHERE strpos({}, concat(',', CAST(p.patient_id AS VARCHAR), ',')) > 0"
    _approval_edit(ctx, t, _pid_cost(f.format(a)), _pid_cost(f.format(b)))


@attack("c6_parameter_changed", "6 approvals")
def _(ctx, t):
    sql = _pid_cost("WHERE p.patient_id = $1")
    _approval_edit(ctx, t, sql, sql, base_params=(1,), edited_params=(7,))


@attack("c6_pending_reason_oracle", "6 approvals")
def _(ctx, t):
    # The approval-pending reason must not depend on the data (e.g. how many rows would come back).
    a = ctx.q(f"SELECT cost FROM {P} WHERE {t.U}")
    fake = dict(t.uq, age=t.uq["age"] + 300)
    b = ctx.q(f"SELECT cost FROM {P} WHERE {conj(fake)}")
    ctx.oracle("existence of a patient with U's (zip, age, sex) via the pending reason", a, b,
               [(str(t.uq["age"]), str(fake["age"]))])


def _flight(ctx, user):
    import pyarrow.flight as fl

    client = fl.FlightClient(ctx.env.server.uri)
    hdr = client.authenticate_basic_token(user.encode(), user.encode())
    return fl, client, fl.FlightCallOptions(headers=[hdr])


def _action(ctx, user, name, body: bytes) -> str:
    try:
        fl, client, opts = _flight(ctx, user)
    except Exception as e:  # noqa: BLE001
        return f"connect error {type(e).__name__}"
    try:
        return b"".join(r.body.to_pybytes() for r in client.do_action(fl.Action(name, body), opts)).decode(
            "utf-8", "replace")
    except Exception as e:  # noqa: BLE001
        return f"error {type(e).__name__}: {e}"
    finally:
        client.close()


@attack("c6_request_status_oracle", "6 approvals")
def _(ctx, t):
    # What the analyst can read about their own pending requests must not depend on the data.
    fake = dict(t.uq, age=t.uq["age"] + 300)
    a = ctx.q(f"SELECT cost FROM {P} WHERE {conj(t.uq)}")
    b = ctx.q(f"SELECT cost FROM {P} WHERE {conj(fake)}")
    if a.request_id is None or b.request_id is None:
        ctx.note("no pending requests")
        return
    subs = sorted({str(t.uq["age"]), str(fake["age"]), a.request_id, b.request_id}, key=len, reverse=True)

    def norm(text):
        # Times first: an age replaced inside one timestamp (and not the other, a second
        # later) would make two equal answers look different.
        text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z?", "<time>", text)
        text = re.sub(r"\b\d{9,}\b", "<n>", text)
        for v in subs:
            text = text.replace(v, "<V>")
        return text

    for action in ("RequestStatus", "ShowRequest"):
        ta = _action(ctx, "analyst", action, ('{"id": "%s"}' % a.request_id).encode())
        tb = _action(ctx, "analyst", action, ('{"id": "%s"}' % b.request_id).encode())
        ctx.note(f"{action}: {ta[:120]!r}")
        ctx.flag(f"{action} as analyst does not depend on whether U exists", norm(ta) != norm(tb),
                 f"{ta[:300]!r} || {tb[:300]!r}")


@attack("c6_self_approve", "6 approvals")
def _(ctx, t):
    sql = f"SELECT patient_id, cost FROM {P} WHERE patient_id = 7 AND age >= 0"
    r0 = ctx.q(sql)
    if r0.request_id is None:
        ctx.note(f"no request: {r0.short()}")
        return
    out = _action(ctx, "analyst", "ApproveRequest", ('{"id": "%s", "reusable": true}' % r0.request_id).encode())
    cli = ctx.env.cli("approvals", "approve", r0.request_id, user="analyst")
    ctx.note(f"analyst ApproveRequest -> {out[:100]!r}; cli exit {cli.returncode}")
    r1 = ctx.q(sql)
    got = r1.rows[0][1] if r1.released else None
    ctx.guess("cost of patient 7 (analyst approved their own request)", got, t.cost7, [r1])


# ---- class 7: the privacy explanation -------------------------------------------------------


def _forbidden_in_text(t: Targets, text: str, counts: list[int]) -> list[str]:
    bad = []
    if re.search(r"salt", text, re.I):
        bad.append("mentions a salt")
    for s in t.pt.ssn.dropna().astype(str).head(500):
        if s in text:
            bad.append(f"ssn {s}")
            break
    for n in t.pt.name.dropna().astype(str).head(500):
        if len(n) > 3 and n in text:
            bad.append(f"name {n}")
            break
    for c in counts:
        if c >= 100 and re.search(rf"(?<![\d.]){c}(?![\d.])", text):
            bad.append(f"count {c}")
    for c in t.pt.cost.head(200):
        s = f"{c:.2f}"
        if s in text and len(s) > 5:
            bad.append(f"cost value {s}")
            break
    return bad


@attack("c7_cli_explain_content", "7 explain")
def _(ctx, t):
    sql = f"SELECT diagnosis, count(*) AS n, avg(cost) FROM {P} GROUP BY diagnosis"
    out = ctx.env.cli("sql", "--explain", sql, user="analyst")
    text = out.stdout + out.stderr
    ctx.note(f"explain exit {out.returncode}, {len(text)} chars")
    counts = [int(n) for n in t.dx_counts.tolist()] + [t.N]
    bad = _forbidden_in_text(t, text, counts)
    ctx.flag("explanation carries no salt, data value or count", bool(bad), f"{bad}: {text[:300]!r}")


@attack("c7_cli_explain_oracle", "7 explain")
def _(ctx, t):
    outs = []
    for d in (t.rd, t.nosuch_dx):
        out = ctx.env.cli("sql", "--explain", f"SELECT count(*) FROM {P} WHERE diagnosis = {lit(d)}", user="analyst")
        outs.append((out.returncode, (out.stdout + out.stderr).replace(d, "<V>")))
    norm = [(rc, re.sub(r"\b[0-9a-f]{16,}\b", "<hex>", s)) for rc, s in outs]
    ctx.flag("explanation of a suppressed vs an empty group is identical", norm[0] != norm[1],
             f"rare: {norm[0][1][:400]!r} || none: {norm[1][1][:400]!r}")


@attack("c7_sql_explain_statement", "7 explain")
def _(ctx, t):
    a = ctx.q(f"EXPLAIN SELECT count(*) FROM {P} WHERE diagnosis = {lit(t.rd)}")
    text = "\n".join(" ".join(map(str, r)) for r in (a.rows or []))
    bad = _forbidden_in_text(t, text, [t.N] + [int(n) for n in t.dx_counts.tolist()])
    ctx.flag("EXPLAIN for an analyst is refused or carries no data", a.released and bool(bad), f"{bad}")
    b = ctx.q(f"EXPLAIN ANALYZE SELECT count(*) FROM {P} WHERE diagnosis = {lit(t.rd)}")
    c = ctx.q(f"EXPLAIN ANALYZE SELECT count(*) FROM {P} WHERE diagnosis = {lit(t.nosuch_dx)}")

    def norm(r):
        s = "\n".join(" ".join(map(str, x)) for x in (r.rows or []))
        s = s.replace(t.rd, "<V>").replace(t.nosuch_dx, "<V>")
        return r.ok, re.sub(r"[\d.]+(ns|µs|us|ms|s)\b", "<t>", s)

    ctx.flag("EXPLAIN ANALYZE row metrics of the rare diagnosis", b.ok and c.ok and norm(b) != norm(c),
             f"{norm(b)[1][:300]!r}")


@attack("c7_flight_action_explain", "7 explain")
def _(ctx, t):
    try:
        import pyarrow.flight as fl
    except ImportError:  # pragma: no cover
        ctx.note("pyarrow.flight missing")
        return
    client = fl.FlightClient(ctx.env.server.uri)
    try:
        try:
            hdr = client.authenticate_basic_token(b"analyst", b"analyst")
            opts = fl.FlightCallOptions(headers=[hdr])
            names = [a.type for a in client.list_actions(opts)]
        except Exception as e:  # noqa: BLE001
            ctx.note(f"flight: {type(e).__name__}: {e}")
            return
        act = next((n for n in names if "explain" in n.lower()), None)
        if act is None:
            ctx.note(f"no explain action in {names}")
            return
        texts = []
        for d in (t.rd, t.nosuch_dx):
            sql = f"SELECT diagnosis, count(*) FROM {P} WHERE diagnosis = {lit(d)} OR ward IS NOT NULL GROUP BY diagnosis"
            try:
                body = b"".join(r.body.to_pybytes() for r in client.do_action(fl.Action(act, sql.encode()), opts))
                texts.append(body.decode("utf-8", "replace").replace(d, "<V>"))
            except Exception as e:  # noqa: BLE001
                texts.append(f"error {type(e).__name__}: {e}".replace(d, "<V>"))
        counts = [int(n) for n in t.dx_counts.tolist()] + [t.N]
        bad = _forbidden_in_text(t, texts[0], counts)
        ctx.flag(f"{act} carries no salt, data value or count", bool(bad), f"{bad}: {texts[0][:300]!r}")
        ctx.flag(f"{act} identical for rare vs absent literal",
                 re.sub(r"\b[0-9a-f]{16,}\b", "", texts[0]) != re.sub(r"\b[0-9a-f]{16,}\b", "", texts[1]),
                 f"{texts[0][:300]!r} || {texts[1][:300]!r}")
    finally:
        client.close()


@attack("c7_flightinfo_counts", "7 explain")
def _(ctx, t):
    import pyarrow.flight as fl

    def varint(n):
        out = b""
        while True:
            b = n & 0x7F
            n >>= 7
            if n:
                out += bytes([b | 0x80])
            else:
                return out + bytes([b])

    def field(num, data):
        return bytes([(num << 3) | 2]) + varint(len(data)) + data

    def cmd(sql):
        inner = field(1, sql.encode())
        return field(1, b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery") + field(2, inner)

    client = fl.FlightClient(ctx.env.server.uri)
    try:
        try:
            hdr = client.authenticate_basic_token(b"analyst", b"analyst")
            opts = fl.FlightCallOptions(headers=[hdr])
        except Exception as e:  # noqa: BLE001
            ctx.note(f"flight: {type(e).__name__}: {e}")
            return
        got = []
        for d in (t.rd, t.nosuch_dx):
            sql = f"SELECT diagnosis, count(*) FROM {P} WHERE diagnosis = {lit(d)} GROUP BY diagnosis"
            try:
                info = client.get_flight_info(fl.FlightDescriptor.for_command(cmd(sql)), opts)
                got.append((info.total_records, info.total_bytes))
            except Exception as e:  # noqa: BLE001
                got.append(("error", str(e)[:100].replace(d, "<V>")))
        ctx.flag("FlightInfo carries no counts (-1) and does not depend on data",
                 got[0] != got[1] or any(g[0] not in (-1, "error") for g in got), f"{got}")
    finally:
        client.close()


# ---- class 8: group keys over the entity key ------------------------------------------------


@attack("c8_windows_11_minus_10", "8 entity windows")
def _(ctx, t):
    a = ctx.q(f"SELECT (patient_id + 4) / 11 AS g, sum(cost) FROM {P} GROUP BY 1")  # g=1: ids 7..17
    b = ctx.q(f"SELECT (patient_id + 2) / 10 AS g, sum(cost) FROM {P} GROUP BY 1")  # g=1: ids 8..17
    ctx.guess("cost of patient 7", minus(a.keyed().get(1), b.keyed().get(1)), t.cost7, [a, b])
    pt = t.pt.assign(g=(t.pt.patient_id + 4) // 11)
    ctx.kcheck(a, pt, ["g"])


@attack("c8_generate_series_shifts", "8 entity windows")
def _(ctx, t):
    a = ctx.q(f"SELECT s, (patient_id + s) / 10 AS g, sum(cost) FROM {P} "
              f"CROSS JOIN (SELECT value AS s FROM generate_series(0, 9)) sh GROUP BY s, (patient_id + s) / 10")
    b = ctx.q(f"SELECT (patient_id + 4) / 11 AS g, sum(cost) FROM {P} GROUP BY 1")
    ka = a.keyed(2)
    ctx.guess("cost of patient 7", minus(b.keyed().get(1), ka.get((2, 1))), t.cost7, [a, b])
    sh = t.pt.merge(pd.DataFrame({"s": range(10)}), how="cross")
    ctx.kcheck(a, sh.assign(g=(sh.patient_id + sh.s) // 10), ["s", "g"])


@attack("c8_div10_and_shift11", "8 entity windows")
def _(ctx, t):
    a = ctx.q(f"SELECT patient_id / 10 AS g, sum(cost) FROM {P} GROUP BY patient_id / 10")  # g=1: 10..19
    b = ctx.q(f"SELECT (patient_id + 1) / 11 AS g, sum(cost) FROM {P} GROUP BY 1")  # g=1: 10..20
    ctx.guess("cost of patient 20", minus(b.keyed().get(1), a.keyed().get(1)), t.cost_of(20), [a, b])
    ctx.kcheck(a, t.pt.assign(g=t.pt.patient_id // 10), ["g"])


@attack("c8_modulo_blocks", "8 entity windows")
def _(ctx, t):
    a = ctx.q(f"SELECT patient_id % 10 AS r, (patient_id + 3) / 120 AS b, sum(cost) FROM {P} GROUP BY 1, 2")
    b = ctx.q(f"SELECT patient_id % 10 AS r, (patient_id + 83) / 100 AS b, sum(cost) FROM {P} GROUP BY 1, 2")
    ctx.guess("cost of patient 7", minus(a.keyed(2).get((7, 0)), b.keyed(2).get((7, 1))), t.cost7, [a, b])
    ctx.kcheck(a, t.pt.assign(r=t.pt.patient_id % 10, b=(t.pt.patient_id + 3) // 120), ["r", "b"])


@attack("c8_modulo_groups_k", "8 entity windows")
def _(ctx, t):
    a = ctx.q(f"SELECT patient_id % 10 AS r, count(*) FROM {P} GROUP BY patient_id % 10")
    ctx.kcheck(a, t.pt.assign(r=t.pt.patient_id % 10), ["r"])
    b = ctx.q(f"SELECT patient_id % 2500 AS r, count(*) FROM {P} GROUP BY 1")
    ctx.kcheck(b, t.pt.assign(r=t.pt.patient_id % 2500), ["r"])


@attack("c8_window_function_rows", "8 entity windows")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(c) FROM (SELECT cost * CAST(row_number() OVER (ORDER BY patient_id) = 7 AS DOUBLE) AS c "
              f"FROM {P})")
    ctx.guess("cost of the 7th patient by id", r.scalar(), float(t.pt.sort_values("patient_id").cost.iloc[6]), [r])


@attack("visit_id_windows", "differencing")
def _(ctx, t):
    # Entity-key windows laundered through a filterable catalog column (visits.visit_id).
    a = ctx.q(f"SELECT (v.visit_id + 4) / 11 AS g, sum(p.cost) FROM {P} p JOIN {V} v ON p.patient_id = v.visit_id "
              f"GROUP BY 1")
    b = ctx.q(f"SELECT (v.visit_id + 2) / 10 AS g, sum(p.cost) FROM {P} p JOIN {V} v ON p.patient_id = v.visit_id "
              f"GROUP BY 1")
    ctx.guess("cost of patient 7 via visit_id windows", minus(a.keyed().get(1), b.keyed().get(1)), t.cost7)


# ---- class 9: rank selection and order statistics -------------------------------------------


@attack("c9_order_limit_1", "9 rank")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost) FROM (SELECT cost FROM {P} ORDER BY cost DESC LIMIT 1)")
    ctx.guess("max cost", r.scalar(), t.max_cost, [r])


@attack("c9_top11_minus_top10_offset1", "9 rank")
def _(ctx, t):
    a = ctx.q(f"SELECT sum(cost) FROM (SELECT patient_id, cost FROM {P} ORDER BY cost DESC LIMIT 11)")
    b = ctx.q(f"SELECT sum(cost) FROM (SELECT patient_id, cost FROM {P} ORDER BY cost DESC LIMIT 10 OFFSET 1)")
    ctx.guess("max cost", minus(a.scalar(), b.scalar()), t.max_cost, [a, b])


@attack("c9_max_min", "9 rank")
def _(ctx, t):
    a = ctx.q(f"SELECT max(cost) FROM {P}")
    b = ctx.q(f"SELECT min(cost) FROM {P}")
    ctx.guess("max cost", a.scalar(), t.max_cost, [a])
    ctx.guess("min cost", b.scalar(), t.min_cost, [b])


@attack("c9_median_odd_group", "9 rank")
def _(ctx, t):
    if t.odd_ward is None:
        ctx.note("no odd-sized ward")
        return
    r = ctx.q(f"SELECT median(cost) FROM {P} WHERE ward = {lit(t.odd_ward)}")
    ctx.guess("one patient's exact cost (median of an odd group)", r.scalar(),
              float(t.pt[t.pt.ward == t.odd_ward].cost.median()), [r])


@attack("c9_percentiles", "9 rank")
def _(ctx, t):
    a = ctx.q(f"SELECT approx_percentile_cont(cost, 1.0) FROM {P}")
    b = ctx.q(f"SELECT approx_percentile_cont(1.0) WITHIN GROUP (ORDER BY cost) FROM {P}")
    c = ctx.q(f"SELECT percentile_cont(1.0) WITHIN GROUP (ORDER BY cost) FROM {P}")
    for r in (a, b, c):
        ctx.guess("max cost (100th percentile)", r.scalar(), t.max_cost, [r])


@attack("c9_first_last_nth_value", "9 rank")
def _(ctx, t):
    a = ctx.q(f"SELECT first_value(cost ORDER BY cost DESC) FROM {P}")
    b = ctx.q(f"SELECT last_value(cost ORDER BY cost) FROM {P}")
    c = ctx.q(f"SELECT nth_value(cost, 1 ORDER BY cost DESC) FROM {P}")
    for r in (a, b, c):
        ctx.guess("max cost", r.scalar(), t.max_cost, [r])


@attack("c9_array_agg", "9 rank")
def _(ctx, t):
    r = ctx.q(f"SELECT array_agg(cost) FROM {P}")
    v = r.scalar()
    ctx.guess("max cost (array_agg)", max(v) if v else None, t.max_cost, [r])


@attack("c9_string_agg_rare", "9 rank")
def _(ctx, t):
    r = ctx.q(f"SELECT string_agg(diagnosis, '|') FROM {P}")
    v = r.scalar()
    ctx.guess("existence of the rare diagnosis (string_agg)", None if v is None else t.rd in v.split("|"), True, [r])


@attack("c9_bool_or_bit_or", "9 rank")
def _(ctx, t):
    a = ctx.q(f"SELECT bool_or(diagnosis = {lit(t.rd)}) FROM {P}")
    b = ctx.q(f"SELECT bit_or(length_of_stay) FROM {P} WHERE {t.U}")
    ctx.guess("existence of the rare diagnosis (bool_or)", a.scalar(), True, [a])
    ctx.guess("length of stay of U (bit_or over one)", b.scalar(), int(t.u.length_of_stay), [b])


@attack("c9_rank_window", "9 rank")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost) FROM (SELECT cost, rank() OVER (ORDER BY cost DESC) AS rk FROM {P}) WHERE rk = 1")
    ctx.guess("max cost", r.scalar(), t.max_cost, [r])


@attack("c9_having_max_binary_search", "9 rank")
def _(ctx, t):
    ward = t.mx.ward
    lo, hi, inf = bsearch(
        lambda x: ctx.q(f"SELECT ward, count(*) FROM {P} WHERE ward = {lit(ward)} GROUP BY ward "
                        f"HAVING max(cost) > {x!r}"),
        t.min_cost - 1, t.max_cost + 1, 24)
    ctx.interval("max cost via HAVING max(cost) > X", lo, hi, t.max_cost, 0.05, inf)


@attack("c9_scalar_subquery_max", "9 rank")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(cost) FROM {P} WHERE cost >= (SELECT max(cost) FROM {P})")
    ctx.guess("max cost", r.scalar(), t.max_cost, [r])


# ---- class 10: reserved names ---------------------------------------------------------------


@attack("c10_reserved_alias_rare_group", "10 reserved names")
def _(ctx, t):
    for alias in ("__airlock_entities", "airlock_count", "__AIRLOCK_k", "airlock_entity_count"):
        r = ctx.q(f"SELECT diagnosis, count(*) AS {alias} FROM {P} GROUP BY diagnosis")
        ctx.kcheck(r, t.pt, ["diagnosis"], what=f"alias {alias}")


@attack("c10_reserved_column_spoof", "10 reserved names")
def _(ctx, t):
    for col in ("__airlock_entity_count", "__airlock_pid", "airlock_entities"):
        r = ctx.q(f"SELECT diagnosis, count(*) FROM (SELECT diagnosis, 100000 AS {col} FROM {P} "
                  f"WHERE diagnosis = {lit(t.rd)}) GROUP BY diagnosis")
        ctx.kcheck(r, t.pt, ["diagnosis"], what=f"column {col}")
        ctx.guess(f"count of the rare diagnosis (spoofed {col})", r.keyed().get(t.rd), t.rd_n, [r])


@attack("c10_reserved_table_alias", "10 reserved names")
def _(ctx, t):
    r = ctx.q(f"SELECT airlock_t.diagnosis, count(*) FROM {P} AS airlock_t WHERE diagnosis = {lit(t.rd)} "
              f"GROUP BY airlock_t.diagnosis")
    ctx.kcheck(r, t.pt, ["diagnosis"])
    r2 = ctx.q(f"SELECT count(*) FROM (SELECT patient_id AS __airlock_entity, cost FROM {P} WHERE {t.U}) x")
    ctx.guess("existence of U (count 1)", r2.scalar(), 1, [r2])


@attack("c10_reserved_functions_fake_boundary", "10 reserved names")
def _(ctx, t):
    # The rewriter's own marker functions, written by the analyst, must not pass for a boundary.
    a = ctx.q(f"SELECT diagnosis, count(*) FROM {P} GROUP BY diagnosis HAVING airlock_released(count(*) >= 1)")
    ctx.kcheck(a, t.pt, ["diagnosis"], what="analyst-written airlock_released")
    b = ctx.q(f"SELECT diagnosis, count(*), airlock_reaches_k(patient_id) FROM {P} GROUP BY diagnosis")
    ctx.kcheck(b, t.pt, ["diagnosis"], what="analyst-written airlock_reaches_k")
    c = ctx.q(f'SELECT diagnosis, count(*) FROM (SELECT diagnosis, age AS "__airlock_entity#0#10#d#hospital.patients" '
              f"FROM {P}) GROUP BY diagnosis")
    ctx.kcheck(c, t.pt, ["diagnosis"], what="spoofed entity column")


# ---- class 11: the work a hidden row costs (hostile round 17) ----------------------------------
# Rows of withheld groups are still computed on. A pad, a pattern or a concatenation the analyst
# sizes made that work (its time, or an error when it overflowed) count the hidden rows. Timing is
# out of scope here; the errors are not: each probe pair differs only in whether U matches.


def _rows_oracle(ctx, t, select: str, what: str, where_extra: str = "", values_leak: bool = False,
                 beside: bool = True):
    """Probes with U's true diagnosis against another one: U's row alone, or (`beside`) next to
    one other known row, reaches the expression, or only that other row (or none) does."""
    other = f"diagnosis = {lit(t.rd)} OR " if beside else ""

    def probe(d):
        return ctx.q(f"SELECT {select} FROM {P} WHERE ({other}({t.U} AND diagnosis = {lit(d)})){where_extra}")

    ctx.oracle(what, probe(t.u.diagnosis), probe(t.u_other_dx), [(t.u.diagnosis, t.u_other_dx)],
               values_leak=values_leak)


@attack("c11_lpad_offset_overflow", "11 per-row work")
def _(ctx, t):
    # Two padded rows of 1.1e9 characters in one batch overflow a string array; one does not.
    _rows_oracle(ctx, t, "length(lpad(zip, 1100000000)) AS g, count(*)", "diagnosis of U (lpad overflow)",
                 " GROUP BY 1")


@attack("c11_regex_compiles_only_on_rows", "11 per-row work")
def _(ctx, t):
    _rows_oracle(ctx, t, "count(*)", "diagnosis of U (a regex that fails to compile)",
                 " AND zip ~ '(a{1000}){1000}'", beside=False)


@attack("c11_similar_to_compiles_only_on_rows", "11 per-row work")
def _(ctx, t):
    _rows_oracle(ctx, t, "count(*)", "diagnosis of U (SIMILAR TO '(')", " AND zip SIMILAR TO '('", beside=False)


@attack("c11_long_like_pattern", "11 per-row work")
def _(ctx, t):
    pattern = "%" + "_" * 300_000 + "%"
    _rows_oracle(ctx, t, "count(*)", "diagnosis of U (a LIKE pattern too large to compile)",
                 f" AND zip LIKE '{pattern}'", beside=False)


@attack("c11_concat_huge_literal", "11 per-row work")
def _(ctx, t):
    big = "x" * 200_000
    _rows_oracle(ctx, t, "length(concat(zip, '" + big + "', '" + big + "')) AS g, count(*)",
                 "diagnosis of U (concatenated literal text)", " GROUP BY 1")


@attack("c11_replace_grows", "11 per-row work")
def _(ctx, t):
    # Nested, a replacement longer than its pattern multiplies a string's length (kept small
    # here, so that a regression fails this test rather than the machine's memory).
    to = "1" * 1_000
    _rows_oracle(ctx, t, f"length(replace(replace(zip, '1', '{to}'), '1', '{to}')) AS g, count(*)",
                 "diagnosis of U (replace that grows)", " GROUP BY 1")


@attack("c11_nested_doubling_overflow", "11 per-row work")
def _(ctx, t):
    # Hostile round 18: each subquery level doubles a string within every per-query limit
    # (two operands, one 16 KiB literal); after 17 levels one row is over 2^31 bytes.
    sql = f"concat(zip, '{'x' * 16_383}')"
    for level in range(17):
        sql = f"SELECT concat(x{level}, x{level}) AS x{level + 1} FROM (SELECT {sql} AS x{level} FROM {P}" \
            if level == 0 else f"SELECT concat(x{level}, x{level}) AS x{level + 1} FROM ({sql}) s{level}"
        if level == 0:
            sql += " WHERE {where}) s0"
    template = f"SELECT length(x17) AS g, count(*) FROM ({sql}) outermost GROUP BY 1"

    def probe(d):
        return ctx.q(template.replace("{where}", f"{t.U} AND diagnosis = {lit(d)}"))

    ctx.oracle("diagnosis of U (a string doubled through subqueries)", probe(t.u.diagnosis),
               probe(t.u_other_dx), [(t.u.diagnosis, t.u_other_dx)], values_leak=False)


# ---- class 12: what a hidden row makes the engine do (hostile round 19) -----------------------
# Decimal arithmetic failed where a result did not fit its type; a join skipped its other input
# when no hidden row reached it (timing and memory, tested in tests/integration/limits.rs).


@attack("c12_decimal_multiply_overflow", "12 engine work")
def _(ctx, t):
    # Any positive cost times 1e8 at scale 33 is past 1.7e38: the kernel failed on U's row alone.
    _rows_oracle(ctx, t, "CAST(cost AS DECIMAL(38,33)) * 100000000 AS g, count(*)",
                 "diagnosis of U (a decimal product that overflows)", " GROUP BY 1", beside=False)


@attack("c12_decimal_overflow_in_filter", "12 engine work")
def _(ctx, t):
    _rows_oracle(ctx, t, "count(*)", "diagnosis of U (a decimal product that overflows, in WHERE)",
                 " AND CAST(cost AS DECIMAL(38,33)) * 100000000 > 0", beside=False)


@attack("c12_outer_join_with_a_series", "12 engine work")
def _(ctx, t):
    # Hostile round 20: an outer join that keeps a large series looked up every series row only
    # when a hidden row met its condition (0.41 against 0.64 s). Refused before it runs now; the
    # answer (a refusal) is the same for the true and the false probe. The series is small here:
    # the refusal, not the time, is what this checks (timing stays out of tests).
    def probe(d):
        return ctx.q(f"SELECT count(*) FROM {P} p RIGHT JOIN generate_series(1, 1000) g "
                     f"ON p.age = g.value AND {t.U} AND p.diagnosis = {lit(d)}")

    a, b = probe(t.u.diagnosis), probe(t.u_other_dx)
    ctx.oracle("diagnosis of U (an outer join with a series)", a, b, [(t.u.diagnosis, t.u_other_dx)])
    if a.ok:
        ctx.findings.append(Finding("refusal", "an outer join of patients with a series ran", True, a.sql))


# ---- masked columns ---------------------------------------------------------------------------


@attack("m_ssn_ne_oracle", "masked column")
def _(ctx, t):
    real = str(t.p7.ssn)
    fake = "000-00-0000"
    a = ctx.q(f"SELECT count(*) FROM {P} WHERE ssn <> {lit(real)}")
    b = ctx.q(f"SELECT count(*) FROM {P} WHERE ssn <> {lit(fake)}")
    ctx.oracle("whether an SSN belongs to a patient (ssn <> X)", a, b, [(real, fake)])


@attack("m_ssn_like_prefix", "masked column")
def _(ctx, t):
    pre = str(t.p7.ssn)[:3]
    r = ctx.q(f"SELECT count(*) FROM {P} WHERE ssn LIKE {lit(pre + '%')}")
    ctx.guess("number of SSNs with a prefix", r.scalar(), int(t.pt.ssn.astype(str).str.startswith(pre).sum()), [r])


@attack("m_group_by_ssn", "masked column")
def _(ctx, t):
    r = ctx.q(f"SELECT ssn, count(*) FROM {P} GROUP BY ssn")
    real = set(t.pt.ssn.astype(str))
    leaked = [row[0] for row in (r.rows or []) if row[0] is not None and str(row[0]) in real]
    ctx.flag("GROUP BY ssn shows only the mask", bool(leaked), f"real ssns released: {leaked[:3]}")


@attack("m_length_name", "masked column")
def _(ctx, t):
    r = ctx.q(f"SELECT length(name) AS l, count(*) FROM {P} GROUP BY length(name)")
    odd = [row for row in (r.rows or []) if row[0] != 1]
    ctx.flag("length(name) shows only the mask", bool(odd), f"{odd[:5]}")
    r2 = ctx.q(f"SELECT sum(length(name)) FROM {P} WHERE {t.U}")
    ctx.guess("length of U's name", r2.scalar(), len(str(t.u["name"])), [r2])


@attack("m_name_equality_oracle", "masked column")
def _(ctx, t):
    real = str(t.p7["name"])
    a = ctx.q(f"SELECT count(*) FROM {P} WHERE name <> {lit(real)}")
    b = ctx.q(f"SELECT count(*) FROM {P} WHERE name <> {lit('Nobody Nowhere')}")
    ctx.oracle("whether a name belongs to a patient (name <> X)", a, b, [(real, "Nobody Nowhere")])


@attack("m_substr_ssn_group", "masked column")
def _(ctx, t):
    r = ctx.q(f"SELECT substr(ssn, 1, 3) AS p, count(*) FROM {P} GROUP BY 1")
    real = set(t.pt.ssn.astype(str).str[:3])
    leaked = [row for row in (r.rows or []) if row[0] is not None and row[0] in real]
    ctx.flag("substr(ssn) shows only the mask", bool(leaked), f"{leaked[:3]}")


@attack("m_ssn_self_join", "masked column")
def _(ctx, t):
    r = ctx.q(f"SELECT count(*) FROM {P} a JOIN {P} b ON a.ssn = b.ssn")
    ctx.flag("join on the masked ssn sees only NULL masks", r.scalar() not in (None, 0), f"{r.short()} {r.rows}")


# ---- joins that multiply one person, self joins, DISTINCT, subqueries, ... -------------------


@attack("j_cross_generate_series_multiply", "join multiply")
def _(ctx, t):
    r = ctx.q(f"SELECT p.diagnosis, count(*) FROM {P} p CROSS JOIN generate_series(1, 20) GROUP BY p.diagnosis")
    ctx.kcheck(r, t.pt, ["diagnosis"])


@attack("j_values_duplicate_keys", "join multiply")
def _(ctx, t):
    vals = ", ".join([f"({lit(t.rd)})"] * 12)
    r = ctx.q(f"SELECT p.diagnosis, count(*), sum(p.cost) FROM {P} p JOIN (VALUES {vals}) v(d) ON p.diagnosis = v.d "
              f"GROUP BY p.diagnosis")
    ctx.kcheck(r, t.pt, ["diagnosis"])
    g = r.keyed().get(t.rd)
    ctx.guess("total cost of the rare-diagnosis patients (x12)", None if g is None else g[1] / 12,
              float(t.rd_rows.cost.sum()), [r])


@attack("j_visits_fanout", "join multiply")
def _(ctx, t):
    r = ctx.q(f"SELECT p.diagnosis, count(*) FROM {P} p JOIN {V} v ON p.patient_id = v.patient_id GROUP BY p.diagnosis")
    ctx.kcheck(r, t.pt.merge(t.vt[["patient_id"]], on="patient_id"), ["diagnosis"])
    r2 = ctx.q(f"SELECT v.department, count(*) FROM {V} v JOIN {P} p ON v.patient_id = p.patient_id "
               f"WHERE p.diagnosis = {lit(t.rd)} GROUP BY v.department")
    ctx.kcheck(r2, t.vt.merge(t.pt[["patient_id", "diagnosis"]], on="patient_id").pipe(lambda f: f[f.diagnosis == t.rd]),
               ["department"])


@attack("j_outer_join_values_marker", "join multiply")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(p.cost * v.w) FROM {P} p LEFT JOIN (VALUES (7, 1.0)) v(id, w) ON p.patient_id = v.id")
    ctx.guess("cost of patient 7", r.scalar(), t.cost7, [r])
    r2 = ctx.q(f"SELECT count(v.w), sum(v.w) FROM {P} p LEFT JOIN (VALUES ({lit(t.rd)}, 1)) v(d, w) "
               f"ON p.diagnosis = v.d")
    ctx.guess("count of the rare diagnosis (outer-join marker)", r2.scalar(), t.rd_n, [r2])


@attack("j_self_join_zip_of_rare", "join multiply")
def _(ctx, t):
    r = ctx.q(f"SELECT b.zip, count(*) FROM {P} a JOIN {P} b ON a.zip = b.zip WHERE a.diagnosis = {lit(t.rd)} "
              f"GROUP BY b.zip")
    g = set(r.keyed()) if r.released else None
    ctx.guess("zips of the rare-diagnosis patients", g, set(t.rd_rows.zip), [r])


@attack("j_self_join_weighting", "join multiply")
def _(ctx, t):
    # Weight U's row by joining on the QI columns to a relation with 1000 copies of U's QI.
    vals = ", ".join([f"({lit(t.uq['zip'])}, {t.uq['age']}, {lit(t.uq['sex'])})"] * 1000)
    r = ctx.q(f"SELECT sum(p.cost) FROM {P} p JOIN (VALUES {vals}) v(z, a, s) ON p.zip = v.z AND p.age = v.a AND "
              f"p.sex = v.s")
    ctx.guess("cost of U (x1000)", None if r.scalar() is None else r.scalar() / 1000, float(t.u.cost), [r])


@attack("j_count_distinct_bool", "count distinct")
def _(ctx, t):
    a = ctx.q(f"SELECT count(DISTINCT diagnosis = {lit(t.rd)}) FROM {P}")
    ctx.guess("existence of the rare diagnosis", None if a.scalar() is None else a.scalar() == 2, True, [a])


@attack("j_count_distinct_pid_case", "count distinct")
def _(ctx, t):
    r = ctx.q(f"SELECT count(DISTINCT CASE WHEN {t.U} THEN diagnosis END), count(DISTINCT CASE WHEN {t.U} AND "
              f"diagnosis = {lit(t.u.diagnosis)} THEN 1 END) FROM {P}")
    g = None
    if r.released and r.rows[0][0] == 1:
        g = t.u.diagnosis if r.rows[0][1] == 1 else "other"
    ctx.guess("diagnosis of U", g, t.u.diagnosis, [r])


@attack("j_distinct_rows", "distinct")
def _(ctx, t):
    r = ctx.q(f"SELECT DISTINCT diagnosis FROM {P}")
    ctx.kcheck(r, t.pt, ["diagnosis"])
    r2 = ctx.q(f"SELECT DISTINCT zip, age, sex FROM {P} WHERE zip = {lit(t.uq['zip'])}")
    ctx.kcheck(r2, t.pt[t.pt.zip == t.uq["zip"]], ["zip", "age", "sex"])


@attack("j_correlated_exists_rare", "subquery")
def _(ctx, t):
    r = ctx.q(f"SELECT count(*) FROM {P} p WHERE EXISTS (SELECT 1 FROM {P} q WHERE q.patient_id = p.patient_id AND "
              f"q.diagnosis = {lit(t.rd)})")
    ctx.guess("count of the rare diagnosis (correlated EXISTS)", r.scalar(), t.rd_n, [r])


@attack("j_scalar_subquery_in_projection", "subquery")
def _(ctx, t):
    r = ctx.q(f"SELECT count(*), (SELECT sum(q.cost) FROM {P} q WHERE {conj(t.uq, 'q.')}) FROM {P}")
    g = r.rows[0][1] if r.released else None
    ctx.guess("cost of U (scalar subquery over one patient)", g, float(t.u.cost), [r])


@attack("j_scalar_subquery_in_filter", "subquery")
def _(ctx, t):
    c = float(t.u.cost)
    # cost >= (one person's cost) over everyone: count of patients at least as expensive as U.
    r = ctx.q(f"SELECT count(*) FROM {P} WHERE cost >= (SELECT sum(cost) FROM {P} WHERE {t.U})")
    ctx.guess("rank of U's cost", r.scalar(), int((t.pt.cost >= c).sum()), [r])


@attack("j_correlated_qi_count", "subquery")
def _(ctx, t):
    r = ctx.q(f"SELECT count(*) FROM {P} p WHERE p.zip = {lit(t.uq['zip'])} AND (SELECT count(*) FROM {P} q WHERE "
              f"q.zip = p.zip AND q.age = p.age AND q.sex = p.sex) = 1")
    qi = t.pt.groupby(["zip", "age", "sex"]).patient_id.transform("count")
    n = int(((t.pt.zip == t.uq["zip"]) & (qi == 1)).sum())
    if n < K:
        ctx.guess("number of QI-unique patients in U's zip (< k)", r.scalar(), n, [r])
    else:
        ctx.note(f"{n} unique patients in the zip: k-safe")


@attack("j_window_function_in_aggregate", "window")
def _(ctx, t):
    r = ctx.q(f"SELECT sum(d) FROM (SELECT cost - lag(cost) OVER (ORDER BY patient_id) AS d FROM {P} "
              f"WHERE patient_id IN (7, 8))")
    ctx.guess("cost8 - cost7", r.scalar(), t.cost_of(8) - t.cost7, [r])
    r2 = ctx.q(f"SELECT diagnosis, count(*) OVER () FROM {P} GROUP BY diagnosis")
    ctx.kcheck(r2, t.pt, ["diagnosis"], nkeys=1)


@attack("j_grouping_sets_rollup", "grouping sets")
def _(ctx, t):
    for g in ("GROUPING SETS ((diagnosis), ())", "ROLLUP (diagnosis)", "CUBE (diagnosis)"):
        r = ctx.q(f"SELECT diagnosis, count(*) FROM {P} GROUP BY {g}")
        if r.released:
            rows = [x for x in r.rows if x[0] is not None]
            ctx.kcheck(Res(sql=r.sql, ok=True, rows=rows), t.pt, ["diagnosis"], what=g)


@attack("j_recursive_cte_ids", "recursive cte")
def _(ctx, t):
    def q(lo, hi):
        return ctx.q(f"WITH RECURSIVE r(n) AS (SELECT {lo} UNION ALL SELECT n + 1 FROM r WHERE n < {hi}) "
                     f"SELECT sum(p.cost) FROM {P} p JOIN r ON p.patient_id = r.n")

    a, b = q(7, 17), q(8, 17)
    ctx.guess("cost of patient 7", minus(a.scalar(), b.scalar()), t.cost7, [a, b])


@attack("j_having_count_lt_k", "small groups")
def _(ctx, t):
    r = ctx.q(f"SELECT diagnosis, count(*) FROM {P} GROUP BY diagnosis HAVING count(*) < 10")
    ctx.kcheck(r, t.pt, ["diagnosis"])
    r2 = ctx.q(f"SELECT zip, age, sex, count(*) FROM {P} GROUP BY zip, age, sex HAVING count(*) = 1")
    ctx.kcheck(r2, t.pt, ["zip", "age", "sex"])


@attack("j_suppressed_vs_empty", "small groups")
def _(ctx, t):
    a = ctx.q(f"SELECT diagnosis, count(*) FROM {P} WHERE diagnosis = {lit(t.rd)} GROUP BY diagnosis")
    b = ctx.q(f"SELECT diagnosis, count(*) FROM {P} WHERE diagnosis = {lit(t.nosuch_dx)} GROUP BY diagnosis")
    ctx.oracle("suppressed group looks like an empty one", a, b, [(t.rd, t.nosuch_dx)])
    c = ctx.q(f"SELECT count(*) FROM {P} WHERE diagnosis = {lit(t.rd)}")
    d = ctx.q(f"SELECT count(*) FROM {P} WHERE diagnosis = {lit(t.nosuch_dx)}")
    ctx.oracle("suppressed global aggregate looks like an empty table", c, d, [(t.rd, t.nosuch_dx)])


@attack("j_global_count_one", "small groups")
def _(ctx, t):
    r = ctx.q(f"SELECT count(*), sum(cost) FROM {P} WHERE {t.U}")
    ctx.guess("cost of U (global aggregate over one patient)", r.rows[0][1] if r.released else None,
              float(t.u.cost), [r])


@attack("j_boundary_9_vs_10", "small groups")
def _(ctx, t):
    if t.g9 is None or t.g10 is None:
        ctx.note("no group of exactly 9 / 10")
        return
    keys9, keys10 = list(t.g9), list(t.g10)
    r9 = ctx.q(f"SELECT {', '.join(keys9)}, count(*) FROM {P} WHERE {conj(t.g9)} GROUP BY {', '.join(keys9)}")
    r10 = ctx.q(f"SELECT {', '.join(keys10)}, count(*) FROM {P} WHERE {conj(t.g10)} GROUP BY {', '.join(keys10)}")
    ctx.kcheck(r9, t.pt, keys9, what=f"group of exactly 9: {t.g9}")
    ctx.kcheck(r10, t.pt, keys10, what=f"group of exactly 10: {t.g10}")
    ctx.note(f"9-group -> {r9.short()}; 10-group -> {r10.short()}")
    if not r10.released:
        ctx.note("a group of exactly k patients was NOT released (over-suppression)")


@attack("j_boundary_9_patients_many_visits", "small groups")
def _(ctx, t):
    if t.g9 is None:
        return
    keys = list(t.g9)
    sel = ", ".join(f"p.{c}" for c in keys)
    r = ctx.q(f"SELECT {sel}, count(*) FROM {V} v JOIN {P} p ON v.patient_id = p.patient_id "
              f"WHERE {conj(t.g9, 'p.')} GROUP BY {sel}")
    frame = t.vt.merge(t.pt.drop(columns=["cost"]), on="patient_id")
    ctx.kcheck(r, frame, keys, what="9 patients, more visit rows")


@attack("j_group_by_cost_and_pid", "small groups")
def _(ctx, t):
    r = ctx.q(f"SELECT CAST(cost AS BIGINT) AS c, count(*) FROM {P} GROUP BY 1")
    ctx.kcheck(r, t.pt.assign(c=t.pt.cost.astype("int64")), ["c"])
    r2 = ctx.q(f"SELECT patient_id, count(*) FROM {V} GROUP BY patient_id")
    ctx.kcheck(r2, t.vt, ["patient_id"])
    r3 = ctx.q(f"SELECT visit_id, count(*) FROM {V} GROUP BY visit_id")
    ctx.kcheck(r3, t.vt, ["visit_id"])


@attack("j_group_key_entity_indicator", "small groups")
def _(ctx, t):
    r = ctx.q(f"SELECT CAST(patient_id = 7 AS INT) AS g, sum(cost) FROM {P} GROUP BY 1")
    ctx.kcheck(r, t.pt.assign(g=(t.pt.patient_id == 7).astype(int)), ["g"])
    total = ctx.q(f"SELECT sum(cost) FROM {P}").scalar()
    ctx.guess("cost of patient 7 (total minus the big group)", minus(total, r.keyed().get(0)), t.cost7, [r])


@attack("j_dates_and_visits_groups", "small groups")
def _(ctx, t):
    r = ctx.q(f"SELECT date_trunc('month', admitted) AS m, count(*) FROM {P} GROUP BY 1")
    pt = t.pt.assign(m=pd.to_datetime(t.pt.admitted).dt.to_period("M").dt.to_timestamp().dt.date)
    if r.released:
        rows = [(_kn(x[0]) if not hasattr(x[0], "date") else x[0].date(),) + tuple(x[1:]) for x in r.rows]
        ctx.kcheck(Res(sql=r.sql, ok=True, rows=rows), pt, ["m"])
    r2 = ctx.q(f"SELECT department, visit_date, count(*) FROM {V} GROUP BY department, visit_date")
    ctx.kcheck(r2, t.vt, ["department", "visit_date"])


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------

SUMMARY: list[tuple[str, str, str, str]] = []


@pytest.fixture(scope="module")
def env(server):
    e = Env(server)
    yield e
    e.close()
    _write_summary()


def _write_summary():
    out = os.environ.get("HOSTILE_SUMMARY")  # optional: a file to keep the table in
    if out and SUMMARY:
        with open(out, "w") as f:
            f.write("\n".join(_summary_lines()) + "\n")


def _summary_lines() -> list[str]:
    lines = ["hostile analyst summary (attack | class | outcome | detail)", "-" * 100]
    for name, cls, outcome, detail in SUMMARY:
        lines.append(f"{name:40s} | {cls:18s} | {outcome:28s} | {detail}")
    n = len(SUMMARY)
    leaks = sum(1 for s in SUMMARY if s[2] == "LEAK")
    lines.append("-" * 100)
    lines.append(f"{n} attacks, {leaks} LEAK")
    return lines


def test_targets_exist(env):
    t = env.t
    assert t.N >= 1000
    assert t.rd_n < K
    assert (t.pt.groupby(["zip", "age", "sex"]).patient_id.transform("count") == 1).any()
    assert len(ATTACKS) >= 60, len(ATTACKS)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack(env, name):
    cls, fn = ATTACKS[name]
    ctx = AttackContext(env)
    fn(ctx, env.t)
    outcome = ctx.outcome()
    leaks = [f for f in ctx.findings if f.leak]
    infos = [f for f in ctx.findings if f.info]
    if leaks:
        detail = "; ".join(f"{f.what}: {f.detail}" for f in leaks)
    elif infos:
        detail = "; ".join(f"{f.what}: {f.detail}" for f in infos)
    else:
        codes = sorted({r.code or "released" for r in ctx.results})
        detail = ",".join(codes) + ("; " + "; ".join(ctx.notes) if ctx.notes else "")
    SUMMARY.append((name, cls, outcome, detail[:400]))
    assert not leaks, f"{name} ({cls}) LEAKS:\n" + "\n".join(f"- {f.what}: {f.detail}" for f in leaks)
    if infos:
        pytest.xfail("permitted differencing (PRIVACY.md 3.6) reveals: " + "; ".join(f.what for f in infos))


def test_no_attack_leaks(capsys):
    """Prints the summary table (attack | class | outcome | detail) and fails on any LEAK."""
    with capsys.disabled():
        print()
        print("\n".join(_summary_lines()))
    leaks = [s for s in SUMMARY if s[2] == "LEAK"]
    assert not leaks, "\n".join(f"{n} ({c}): {d}" for n, c, _, d in leaks)
