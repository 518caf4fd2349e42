"""The privacy contract through the real ADBC driver, on the demo hospital (k = 10).

The demo's analyst holds `aggregate` and `request` on patients and visits: aggregates
come back at once; every attack case of PRIVACY.md section 6 is refused with a code
(as an approval request, since the analyst may ask the owner, with the specific rule's
code in the reason).
"""

from __future__ import annotations

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pytest

K = 10


def connect(server, user):
    return flightsql.connect(server.uri, db_kwargs={"username": user, "password": user})


@pytest.fixture(scope="module")
def analyst(server):
    with connect(server, "analyst") as conn:
        yield conn


@pytest.fixture(scope="module")
def owner(server):
    with connect(server, "owner") as conn:
        yield conn


def rows(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchall()


def refusal(conn, sql) -> str:
    with conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.execute(sql)
            cur.fetchall()
    return str(err.value)


def test_aggregates_of_both_tables(analyst):
    wards = rows(analyst, "SELECT ward, count(*) AS n, avg(cost) FROM hospital.patients GROUP BY ward")
    assert len(wards) == 6 and sum(n for _, n, _ in wards) == 5000
    departments = rows(
        analyst,
        "SELECT department, count(*) AS visits, sum(cost) FROM hospital.visits GROUP BY department",
    )
    assert len(departments) == 8
    joined = rows(
        analyst,
        "SELECT p.diagnosis, count(*) FROM hospital.patients p "
        "JOIN hospital.visits v ON p.patient_id = v.patient_id GROUP BY p.diagnosis",
    )
    assert joined


def test_every_released_group_has_k_patients(analyst, owner):
    released = rows(analyst, "SELECT zip, diagnosis, count(*) FROM hospital.patients GROUP BY zip, diagnosis")
    truth = {
        (z, d): n
        for z, d, n in rows(
            owner,
            "SELECT zip, diagnosis, count(DISTINCT patient_id) FROM hospital.patients GROUP BY zip, diagnosis",
        )
    }
    assert released, "some groups are large enough"
    assert all(truth[(z, d)] >= K for z, d, _ in released)
    small = [key for key, n in truth.items() if n < K]
    assert small, "the demo has rare zip/diagnosis combinations"
    assert not {(z, d) for z, d, _ in released} & set(small)


def test_rare_diagnoses_are_suppressed(analyst, owner):
    released = {d for d, _ in rows(analyst, "SELECT diagnosis, count(*) FROM hospital.patients GROUP BY diagnosis")}
    truth = dict(rows(owner, "SELECT diagnosis, count(DISTINCT patient_id) FROM hospital.patients GROUP BY diagnosis"))
    assert released == {d for d, n in truth.items() if n >= K}
    assert any(n < K for n in truth.values())


@pytest.mark.parametrize(
    "sql, code",
    [
        ("SELECT * FROM hospital.patients", "AGGREGATE_REQUIRED"),
        ("SELECT name FROM hospital.patients LIMIT 1", "AGGREGATE_REQUIRED"),
        ("SELECT max(cost) FROM hospital.patients", "AGGREGATE_NOT_ALLOWED"),
        ("SELECT min(cost) FROM hospital.patients", "AGGREGATE_NOT_ALLOWED"),
        ("SELECT median(cost) FROM hospital.patients", "AGGREGATE_NOT_ALLOWED"),
        ("SELECT array_agg(name) FROM hospital.patients", "AGGREGATE_NOT_ALLOWED"),
        ("SELECT string_agg(name, ',') FROM hospital.patients", "AGGREGATE_NOT_ALLOWED"),
        (
            "SELECT diagnosis, sum(CASE WHEN patient_id = 42 THEN cost ELSE 0 END) "
            "FROM hospital.patients GROUP BY diagnosis",
            "FILTER_NOT_ALLOWED",
        ),
        (
            "SELECT diagnosis, sum(CASE WHEN age > 90 THEN cost ELSE 0 END) "
            "FROM hospital.patients GROUP BY diagnosis",
            "CONDITIONAL_AGGREGATE",
        ),
        (
            "SELECT diagnosis, count(*) FROM hospital.patients WHERE patient_id <> 42 GROUP BY diagnosis",
            "FILTER_NOT_ALLOWED",
        ),
        ("SELECT zip, diagnosis, count(*) FROM hospital.patients GROUP BY ROLLUP (zip, diagnosis)",
         "GROUPING_SETS_NOT_ALLOWED"),
        ("SELECT rank() OVER (ORDER BY cost) FROM hospital.patients", "WINDOW_NOT_ALLOWED"),
        ("SELECT zip FROM hospital.patients EXCEPT SELECT zip FROM hospital.patients WHERE age > 90",
         "SET_OPERATION_NOT_ALLOWED"),
        ("SELECT count(*) FROM hospital.patients WHERE ssn LIKE '123%'", "FILTER_NOT_ALLOWED"),
    ],
)
def test_attack_cases_are_refused_with_a_code(analyst, sql, code):
    message = refusal(analyst, sql)
    assert "[APPROVAL_PENDING]" in message, message
    assert code in message, message


def test_entity_key_groups_release_nothing(analyst):
    assert rows(analyst, "SELECT patient_id, count(*) FROM hospital.patients GROUP BY patient_id") == []


def test_wiped_columns_show_only_the_mask(analyst):
    assert rows(analyst, "SELECT ssn, count(*) FROM hospital.patients GROUP BY ssn") == [(None, 5000)]
    assert rows(analyst, "SELECT length(name), count(*) FROM hospital.patients GROUP BY length(name)") == [(1, 5000)]


def test_set_and_invisible_tables(analyst):
    assert "[STATEMENT_NOT_ALLOWED]" in refusal(analyst, "SET datafusion.execution.batch_size = 1")
    staff = refusal(analyst, "SELECT count(*) FROM hospital.staff")
    missing = refusal(analyst, "SELECT count(*) FROM hospital.nosuch")
    assert staff.replace("staff", "X") == missing.replace("nosuch", "X")


def test_explain_analyze_is_refused(analyst):
    message = refusal(analyst, "EXPLAIN ANALYZE SELECT diagnosis, count(*) FROM hospital.patients GROUP BY diagnosis")
    assert "[EXPLAIN_NOT_ALLOWED]" in message


def test_owner_reads_rows_in_clear(owner):
    [(name, ssn)] = rows(owner, "SELECT name, ssn FROM hospital.patients WHERE patient_id = 1")
    assert name != "*" and ssn is not None and len(ssn) == 11
