"""A new data scientist's first hour with the demo hospital.

Run the demo server first (`cargo run -- demo`), then:

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
from airlock import col

url = sys.argv[1] if len(sys.argv) > 1 else "grpc://127.0.0.1:50051"
client = airlock.connect(url, "analyst", "analyst")

# 1. Explore: which tables exist for me, and what may I do with them?
for t in client.tables():
    print(f"{t.name}: {', '.join(t.actions)}")
    print("   columns:", ", ".join(t.schema.names))

patients = client.table("hospital.patients")
visits = client.table("hospital.visits")

# 2. Aggregate. Nothing runs until collect()/fetch(); the SQL is there to read.
by_diagnosis = (
    patients.group_by("diagnosis")
    .agg(airlock.count().alias("patients"), col("cost").mean().alias("mean_cost"))
    .sort("patients", descending=True)
)
print("\nSQL sent to the server:\n ", by_diagnosis.sql())
print(by_diagnosis.collect().to_pandas().head(10))
print("(rare diagnoses are missing: each released row stands for at least 10 patients)")

# 3. A per-column summary, k-safe.
print(patients.describe().to_pandas())

# 4. Join and keep going from a remote result.
per_department = (
    patients.join(visits.rename({"cost": "visit_cost"}), on="patient_id")
    .group_by("department")
    .agg(col("visit_cost").sum().alias("spent"))
    .collect()
)
print(per_department.agg(col("spent").mean().alias("mean_spent")).fetch())

# 5. Ask for rows: the policy says no, but the owner may approve.
oldest = patients.filter(col("age") > 90).select("zip", "age", "diagnosis").limit(5)
print("\nPrivacy explanation:\n", oldest.explain())
try:
    oldest.fetch()
except airlock.ApprovalPending as pending:
    print(f"\nNeeds approval: request {pending.request_id}\n  because {pending.reason}")
    request = pending.request_id


# 6. The data owner approves (here, this script plays the owner with the CLI).
def owner_approves():
    env = dict(os.environ, AIRLOCK_URL=url, AIRLOCK_USER="owner", AIRLOCK_PASSWORD="owner")
    binary = os.environ.get("AIRLOCK_BIN", "airlock")
    subprocess.run([binary, "approvals", "approve", request, "--max-rows", "5"], env=env, check=True,
                   capture_output=True)


threading.Timer(1.0, owner_approves).start()
rows = oldest.fetch(wait=True, timeout=60, progress=True)
print(rows.to_pandas())
print("Done.")
