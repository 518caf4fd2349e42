"""A new data scientist's first hour with the demo hospital.

Run the demo server first (`cargo run -- demo`), then:

    pip install './clients/python[pandas,polars]'
    python examples/tutorial.py grpc://127.0.0.1:50051

Set AIRLOCK_BIN to the `airlock` binary if it is not on PATH (the script plays the data
owner for one step, with `airlock approvals approve`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import airlock
from airlock import col, lit, when

url = sys.argv[1] if len(sys.argv) > 1 else "grpc://127.0.0.1:50051"
client = airlock.connect(url, "analyst", "analyst")

# 1. Explore: which tables exist for me, and what may I do with them?
for t in client.tables():
    print(f"{t.name}: {', '.join(t.actions)}")
    print("   columns:", ", ".join(t.schema.names))

patients = client.table("hospital.patients")
visits = client.table("hospital.visits")

# 2. Aggregate, with polars' expression API. Nothing runs until collect()/fetch(); the SQL
#    is there to read.
by_diagnosis = (
    patients.filter(col("age").is_between(18, 99) & col("ward").is_in(["A", "B", "C", "D"]))
    .group_by("diagnosis")
    .agg(
        airlock.len().alias("patients"),
        col("cost").mean().round(2).alias("mean_cost"),
        col("zip").n_unique().alias("zips"),
    )
    .sort("patients", descending=True)
)
print("\nSQL sent to the server:\n ", by_diagnosis.sql())
print(by_diagnosis.collect().to_pandas().head(10))
print("(rare diagnoses are missing: each released row stands for at least 10 patients)")

# Expressions as group keys: date parts, string functions, when/then/otherwise.
per_year = (
    patients.with_columns(
        col("admitted").dt.year().alias("year"),
        when(col("age") >= 65).then(lit("65+")).otherwise(lit("under 65")).alias("age_band"),
    )
    .group_by("year", "age_band")
    .agg(airlock.len().alias("patients"), col("cost").sum().alias("total_cost"))
    .sort("year", "age_band")
)
try:
    print(per_year.collect().to_polars())
except airlock.PolicyViolation as refused:  # the server's policy decides, not the client
    print(f"per-year summary not released: [{refused.code}] {refused.message}")

# 3. The client never decides what is allowed: every method compiles to SQL, and the
#    server's policy accepts it or refuses it with a stable reason code. max() is not on
#    the demo's aggregate allow-list (count, sum, avg, stddev, var).
try:
    patients.group_by("ward").agg(col("cost").max()).collect()
except airlock.PolicyViolation as refused:
    print(f"\nmax(cost) refused: {refused.code}")
    if isinstance(refused, airlock.ApprovalPending):
        # This analyst holds `request`, so the refusal became a request to the owner.
        print(f"  request {refused.request_id} is waiting for the owner: {', '.join(refused.reason_codes)}")

# 4. A per-column summary, k-safe.
print(patients.describe().to_pandas())

# 5. Join (clashing columns get a suffix, as in polars) and keep going from a remote result.
per_department = (
    patients.join(visits, on="patient_id", suffix="_visit")
    .group_by("department")
    .agg(col("cost_visit").sum().alias("spent"), col("patient_id").n_unique().alias("patients"))
    .collect()
)
print(per_department.agg(col("spent").mean().alias("mean_spent")).fetch())

# 6. Ask for rows: the policy says no, but the owner may approve.
oldest = patients.filter(col("age") > 90).select("zip", "age", "diagnosis").limit(5)
print("\nPrivacy explanation:\n", oldest.explain())
try:
    oldest.fetch()
except airlock.ApprovalPending as pending:
    print(f"\nNeeds approval: request {pending.request_id}\n  because {pending.reason}")
    request = pending.request_id


# 7. The data owner approves (here, this script plays the owner with the CLI).
def owner_approves():
    env = dict(os.environ, AIRLOCK_URL=url, AIRLOCK_USER="owner", AIRLOCK_PASSWORD="owner")
    binary = os.environ.get("AIRLOCK_BIN", "airlock")
    subprocess.run([binary, "approvals", "approve", request, "--max-rows", "5"], env=env, check=True,
                   capture_output=True)


threading.Timer(1.0, owner_approves).start()
rows = oldest.fetch(wait=True, timeout=60, progress=True)
print(rows.to_pandas())
client.close()
print("Done.")
