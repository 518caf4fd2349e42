"""The SQL each polars-style method compiles to: pure unit tests, no server.

The client decides nothing about privacy, so these only pin the translation; what the
server makes of it is tested against a real server in test_polars_api.py.
"""

from __future__ import annotations

import datetime as dt

import polars as pl
import pyarrow as pa
import pytest

import airlock
from airlock import col, lit, when
from airlock import RemoteLazyFrame

COLUMNS = ["patient_id", "name", "age", "sex", "zip", "ward", "diagnosis", "admitted", "cost"]


@pytest.fixture
def patients() -> RemoteLazyFrame:
    return RemoteLazyFrame(None, "hospital.patients", COLUMNS, is_table=True)  # type: ignore[arg-type]


def agg_sql(expr: airlock.Expr) -> str:
    """The SELECT item of one aggregate in a group_by("ward")."""
    frame = RemoteLazyFrame(None, "t", ["ward", "x"], is_table=True)  # type: ignore[arg-type]
    sql = frame.group_by("ward").agg(expr).sql()
    prefix, suffix = 'SELECT "ward", ', ' FROM t GROUP BY "ward"'
    assert sql.startswith(prefix) and sql.endswith(suffix), sql
    return sql[len(prefix) : -len(suffix)]


@pytest.mark.parametrize(
    "expr, sql",
    [
        (col("x").sum(), 'sum("x") AS "x_sum"'),
        (col("x").mean(), 'avg("x") AS "x_mean"'),
        (col("x").count(), 'count("x") AS "x_count"'),
        (col("x").len(), 'count(*) AS "x_len"'),
        (airlock.len(), 'count(*) AS "len"'),
        (airlock.count(), 'count(*) AS "rows_count"'),
        (col("x").min(), 'min("x") AS "x_min"'),
        (col("x").max(), 'max("x") AS "x_max"'),
        (col("x").median(), 'median("x") AS "x_median"'),
        (col("x").quantile(0.9), 'percentile_cont("x", 0.9) AS "x_quantile"'),
        (col("x").std(), 'stddev("x") AS "x_std"'),
        (col("x").std(ddof=0), 'stddev_pop("x") AS "x_std"'),
        (col("x").var(), 'var("x") AS "x_var"'),
        (col("x").var(ddof=0), 'var_pop("x") AS "x_var"'),
        (col("x").first(), 'first_value("x") AS "x_first"'),
        (col("x").last(), 'last_value("x") AS "x_last"'),
        (col("x").n_unique(), 'count(DISTINCT "x") AS "x_n_unique"'),
        (col("x").approx_n_unique(), 'approx_distinct("x") AS "x_approx_n_unique"'),
        (col("x").null_count(), '(count(*) - count("x")) AS "x_null_count"'),
        (col("x").max().alias("top"), 'max("x") AS "top"'),
        (airlock.max("x"), 'max("x") AS "x_max"'),
        (airlock.median("x"), 'median("x") AS "x_median"'),
        (col("x").sum() / airlock.len(), '(sum("x") / count(*)) AS "x_sum"'),
    ],
)
def test_aggregates(expr, sql):
    assert agg_sql(expr) == sql


@pytest.mark.parametrize(
    "expr, sql",
    [
        (col("a") + 1, '("a" + 1)'),
        (1 + col("a"), '(1 + "a")'),
        (col("a") - col("b"), '("a" - "b")'),
        (col("a") * 2.5, '("a" * 2.5)'),
        (col("a") / 10, '("a" / 10.0)'),  # true division, as in polars
        (col("a") / col("b"), '("a" / "b")'),
        (col("a") // 2, 'floor(("a" / 2.0))'),
        (col("a") % 7, '("a" % 7)'),
        (col("a") ** 2, 'power("a", 2)'),
        (-col("a"), '(- "a")'),
        (col("a") == "x", "(\"a\" = 'x')"),
        (col("a") != 1, '("a" <> 1)'),
        (col("a") < 1, '("a" < 1)'),
        (col("a") <= 1, '("a" <= 1)'),
        (col("a") > 1, '("a" > 1)'),
        (col("a") >= 1, '("a" >= 1)'),
        (col("a") > col("b"), '("a" > "b")'),
        ((col("a") > 1) & (col("b") < 2), '(("a" > 1) AND ("b" < 2))'),
        ((col("a") > 1) | (col("b") < 2), '(("a" > 1) OR ("b" < 2))'),
        (~(col("a") > 1), '(NOT ("a" > 1))'),
        (col("a").is_null(), '("a" IS NULL)'),
        (col("a").is_not_null(), '("a" IS NOT NULL)'),
        (col("a").is_in(["A", "B"]), "(\"a\" IN ('A', 'B'))"),
        (col("a").is_in([1, 2, 3]), '("a" IN (1, 2, 3))'),
        (col("a").is_in([]), '("a" IN (NULL))'),
        (col("a").is_between(18, 65), '("a" BETWEEN 18 AND 65)'),
        (col("a").is_between(18, 65, closed="left"), '("a" >= 18 AND "a" < 65)'),
        (col("a").is_between(lit(1), col("b"), closed="none"), '("a" > 1 AND "a" < "b")'),
        (col("a").cast(pl.Int64), 'CAST("a" AS BIGINT)'),
        (col("a").cast(pl.Float64), 'CAST("a" AS DOUBLE)'),
        (col("a").cast(pl.Utf8), 'CAST("a" AS VARCHAR)'),
        (col("a").cast(pl.String), 'CAST("a" AS VARCHAR)'),
        (col("a").cast(pl.Date), 'CAST("a" AS DATE)'),
        (col("a").cast(pl.Datetime("us")), 'CAST("a" AS TIMESTAMP)'),
        (col("a").cast(pl.Boolean), 'CAST("a" AS BOOLEAN)'),
        (col("a").cast(pl.Decimal(12, 2)), 'CAST("a" AS DECIMAL(12, 2))'),
        (col("a").cast(pa.int32()), 'CAST("a" AS INT)'),
        (col("a").cast(float), 'CAST("a" AS DOUBLE)'),
        (col("a").cast("bigint"), 'CAST("a" AS BIGINT)'),
        (col("a").cast(pl.Int32, strict=False), 'TRY_CAST("a" AS INT)'),
        (col("a").abs(), 'abs("a")'),
        (col("a").round(2), 'round("a", 2)'),
        (col("a").round(), 'round("a", 0)'),
        (col("a").floor(), 'floor("a")'),
        (col("a").ceil(), 'ceil("a")'),
        (col("a").fill_null(0), 'coalesce("a", 0)'),
        (col("s").str.to_lowercase(), 'lower("s")'),
        (col("s").str.to_uppercase(), 'upper("s")'),
        (col("s").str.len_chars(), 'character_length("s")'),
        (col("s").str.starts_with("hyp"), "starts_with(\"s\", 'hyp')"),
        (col("s").str.ends_with("ia"), "ends_with(\"s\", 'ia')"),
        (col("s").str.contains("flu", literal=True), "(\"s\" LIKE '%flu%')"),
        (col("s").str.contains("flu"), "(\"s\" LIKE '%flu%')"),  # a regex without special characters
        (col("s").str.contains("50%_off", literal=True), "(\"s\" LIKE '%50\\%\\_off%' ESCAPE '\\')"),
        (col("s").str.contains("^hyp"), "regexp_like(\"s\", '^hyp')"),
        (col("s").str.contains("it's", literal=True), "(\"s\" LIKE '%it''s%')"),
        (col("s").str.slice(0, 3), 'substr("s", 1, 3)'),
        (col("d").dt.year(), "date_part('year', \"d\")"),
        (col("d").dt.month(), "date_part('month', \"d\")"),
        (col("d").dt.weekday(), "date_part('isodow', \"d\")"),
        (col("d").dt.truncate("1mo"), "date_trunc('month', \"d\")"),
        (col("d").dt.truncate("1y"), "date_trunc('year', \"d\")"),
        (col("d").dt.truncate("1d"), "date_trunc('day', \"d\")"),
        (col("d").dt.truncate("1w"), "date_trunc('week', \"d\")"),
        (col("d").dt.truncate("month"), "date_trunc('month', \"d\")"),
        (when(col("a") > 1).then(lit("big")).otherwise(lit("small")), "CASE WHEN (\"a\" > 1) THEN 'big' ELSE 'small' END"),
        (when(col("a") > 1).then(1), 'CASE WHEN ("a" > 1) THEN 1 END'),
        (
            when(col("a") > 9).then(lit(2)).when(col("a") > 1).then(lit(1)).otherwise(lit(0)),
            'CASE WHEN ("a" > 9) THEN 2 WHEN ("a" > 1) THEN 1 ELSE 0 END',
        ),
        (when(a=1).then("b").otherwise("c"), 'CASE WHEN ("a" = 1) THEN "b" ELSE "c" END'),  # strings name columns
        (lit(None), "NULL"),
        (lit(True), "TRUE"),
        (lit("O'Brien"), "'O''Brien'"),
        (lit(dt.date(2024, 1, 31)), "DATE '2024-01-31'"),
        (lit(dt.datetime(2024, 1, 31, 12, 30)), "TIMESTAMP '2024-01-31 12:30:00'"),
        (lit(3, dtype=pl.Float64), "CAST(3 AS DOUBLE)"),
        (col('we"ird'), '"we""ird"'),
    ],
)
def test_expressions(expr, sql):
    assert expr.sql() == sql


@pytest.mark.parametrize(
    "expr, name",
    [
        (col("cost"), "cost"),
        (col("cost") * 2, "cost"),
        (lit(2) * col("cost"), "literal"),
        (col("diagnosis").str.to_lowercase(), "diagnosis"),
        (col("admitted").dt.year(), "admitted"),
        (col("cost").cast(pl.Int64), "cost"),
        (col("cost").mean(), "cost_mean"),
        (col("cost").mean().alias("m"), "m"),
        (when(col("a") > 1).then(col("b")).otherwise(0), "b"),
    ],
)
def test_output_names_follow_polars(expr, name):
    assert expr.output_name() == name


def test_frame_methods(patients):
    assert patients.sql() == "SELECT * FROM hospital.patients"
    assert patients.filter(col("age") > 40).sql() == 'SELECT * FROM hospital.patients WHERE ("age" > 40)'
    assert (
        patients.filter(col("age") > 40, ward="A").sql()
        == "SELECT * FROM hospital.patients WHERE ((\"age\" > 40) AND (\"ward\" = 'A'))"
    )
    assert (
        patients.select("ward", col("cost") / 1000, k=col("age") + 1).sql()
        == 'SELECT "ward", ("cost" / 1000.0) AS "cost", ("age" + 1) AS "k" FROM hospital.patients'
    )
    # with_columns replaces a column of the same name in place and appends new ones
    wc = patients.with_columns(col("cost") * 2, col("age").alias("age2"))
    assert wc.columns == COLUMNS + ["age2"]
    assert '("cost" * 2) AS "cost"' in wc.sql() and wc.sql().count('"cost"') == 2
    lf = patients.group_by("ward", "sex").agg(col("cost").mean(), n=airlock.len())
    assert lf.sql() == (
        'SELECT "ward", "sex", avg("cost") AS "cost_mean", count(*) AS "n" '
        'FROM hospital.patients GROUP BY "ward", "sex"'
    )
    assert lf.columns == ["ward", "sex", "cost_mean", "n"]
    keyed = patients.group_by(col("admitted").dt.year().alias("year")).agg(airlock.len())
    assert keyed.sql() == (
        "SELECT date_part('year', \"admitted\") AS \"year\", count(*) AS \"len\" "
        "FROM hospital.patients GROUP BY date_part('year', \"admitted\")"
    )
    assert patients.group_by("ward").having(airlock.len() > 20).agg(col("cost").sum()).sql() == (
        'SELECT "ward", sum("cost") AS "cost_sum" FROM hospital.patients GROUP BY "ward" HAVING (count(*) > 20)'
    )
    assert patients.group_by("ward").len().sql() == 'SELECT "ward", count(*) AS "len" FROM hospital.patients GROUP BY "ward"'
    means = patients.select("ward", "age", "cost").group_by("ward").mean()
    assert means.columns == ["ward", "age", "cost"]
    assert 'avg("age") AS "age", avg("cost") AS "cost"' in means.sql()
    assert (
        patients.sort("ward", "age", descending=[True, False]).head(3).sql()
        == 'SELECT * FROM hospital.patients ORDER BY "ward" DESC NULLS FIRST, "age" ASC NULLS FIRST LIMIT 3'
    )
    assert patients.sort("age", nulls_last=True).limit(2).sql().endswith('ORDER BY "age" ASC NULLS LAST LIMIT 2')
    assert patients.limit().sql() == "SELECT * FROM hospital.patients LIMIT 5"
    assert patients.unique().sql() == "SELECT DISTINCT * FROM hospital.patients"
    assert patients.unique(subset=["ward"]).sql() == 'SELECT DISTINCT ON ("ward") * FROM hospital.patients'
    assert patients.select("ward").drop("ward").columns == []
    assert patients.agg(col("cost").sum()).sql() == 'SELECT sum("cost") AS "cost_sum" FROM hospital.patients'
    assert patients.select(col("cost").median()).sql() == 'SELECT median("cost") AS "cost_median" FROM hospital.patients'


def test_nested_frames_get_deterministic_aliases(patients):
    def build():
        return patients.filter(col("age") > 1).select("ward", "cost").group_by("ward").agg(col("cost").sum())

    sql = build().sql()
    assert sql == build().sql(), "the same chain renders the same SQL (approvals match on it)"
    assert sql == (
        'SELECT "ward", sum("cost") AS "cost_sum" FROM (SELECT "ward", "cost" FROM '
        '(SELECT * FROM hospital.patients WHERE ("age" > 1)) AS _t1) AS _t2 GROUP BY "ward"'
    )


def test_joins(patients):
    visits = RemoteLazyFrame(None, "hospital.visits", ["visit_id", "patient_id", "department", "cost"], is_table=True)  # type: ignore[arg-type]
    joined = patients.select("patient_id", "ward", "cost").join(visits, on="patient_id")
    assert joined.columns == ["patient_id", "ward", "cost", "visit_id", "department", "cost_right"]
    assert joined.sql() == (
        'SELECT _l."patient_id", _l."ward", _l."cost", _r."visit_id", _r."department", _r."cost" AS "cost_right" '
        'FROM (SELECT "patient_id", "ward", "cost" FROM hospital.patients) AS _l '
        'JOIN hospital.visits AS _r ON _l."patient_id" = _r."patient_id"'
    )
    left = patients.select("patient_id").join(visits, left_on="patient_id", right_on="patient_id", how="left", suffix="_v")
    assert " LEFT JOIN hospital.visits AS _r ON " in left.sql() and left.columns == ["patient_id", "visit_id", "department", "cost"]
    full = patients.select("patient_id").join(visits.select("patient_id"), on="patient_id", how="full")
    assert full.columns == ["patient_id", "patient_id_right"] and " FULL JOIN " in full.sql()
    semi = patients.join(visits, on="patient_id", how="semi")
    assert semi.columns == COLUMNS and " LEFT SEMI JOIN " in semi.sql()
    assert " LEFT ANTI JOIN " in patients.join(visits, on="patient_id", how="anti").sql()
    cross = patients.select("ward").join(visits.select("department"), how="cross")
    assert cross.sql().endswith("CROSS JOIN (SELECT \"department\" FROM hospital.visits) AS _r")
    raw = RemoteLazyFrame(None, "SELECT 1 AS patient_id", None)  # type: ignore[arg-type]
    assert patients.join(raw, on="patient_id").sql() == (
        'SELECT * FROM hospital.patients AS _l JOIN (SELECT 1 AS patient_id) AS _r USING ("patient_id")'
    )


def test_the_client_refuses_nothing_for_privacy(patients):
    """Aggregates off any allow-list, predicates on the entity key, CASE inside a sum: the
    client compiles them all; the server decides."""
    lf = patients.group_by("ward").agg(
        col("cost").max(),
        col("cost").min(),
        col("cost").median(),
        col("cost").quantile(0.5).alias("q"),
        col("cost").first(),
        when(col("patient_id") == 7).then(col("cost")).otherwise(0).sum().alias("s"),
    )
    sql = lf.sql()
    assert 'max("cost")' in sql and "percentile_cont" in sql and 'WHEN ("patient_id" = 7)' in sql


def test_unsupported_polars_methods_raise_not_implemented(patients):
    for attempt, name in [
        (lambda: col("x").rolling_mean(3), "rolling_mean"),
        (lambda: col("x").over("ward"), "over"),
        (lambda: col("x").str.extract(r"(\d+)"), "extract"),
        (lambda: col("x").dt.offset_by("1d"), "offset_by"),
        (lambda: patients.tail(3), "tail"),
        (lambda: patients.pivot("ward"), "pivot"),
        (lambda: patients.group_by("ward").map_groups(print, None), "map_groups"),
        (lambda: airlock.concat_str, "concat_str"),
        (lambda: col("x").quantile(0.5, "nearest"), "quantile"),
        (lambda: col("x").std(ddof=2), "std"),
        (lambda: col("d").dt.truncate("3mo"), "truncate"),
    ]:
        with pytest.raises(NotImplementedError, match=name):
            attempt()
    # Anything that is not polars' API stays an AttributeError (hasattr and probes work).
    assert not hasattr(col("x"), "no_such_method")
    assert not hasattr(patients, "_repr_html_")
    assert not hasattr(col("x"), "__array__")


def test_expressions_have_no_truth_value():
    with pytest.raises(TypeError, match="ambiguous"):
        bool(col("a") == 1)
    with pytest.raises(TypeError):
        col("a").is_in("AB")


def test_duplicate_output_names_are_reported(patients):
    with pytest.raises(ValueError, match="appears twice"):
        patients.select(col("cost"), col("cost") * 2)
    with pytest.raises(ValueError, match="appears twice"):
        patients.group_by("ward").agg(col("cost").quantile(0.1), col("cost").quantile(0.9))


def test_reason_codes_come_from_the_message_or_the_header():
    from airlock._errors import translate

    e = translate(RuntimeError("PermissionDenied: [AGGREGATE_NOT_ALLOWED] aggregate max is not allowed (PermissionDenied; ...)"))
    assert isinstance(e, airlock.PolicyViolation) and e.code == "AGGREGATE_NOT_ALLOWED"
    assert e.message == "aggregate max is not allowed"

    class DriverError(Exception):
        # as the ADBC driver reports response headers: (bytes, bytes) pairs
        details = [(b"airlock-request-id", b"0123abcd"), (b"airlock-reason-code", b"EXPRESSION_NOT_ALLOWED"), (b"date", b"...")]

    e = translate(DriverError("[EXPRESSION_NOT_ALLOWED] cast of a comparison inside sum(...)"))
    assert e.code == "EXPRESSION_NOT_ALLOWED" and e.server_request_id == "0123abcd"
    e = translate(DriverError("permission denied"))  # the header alone is enough
    assert isinstance(e, airlock.PolicyViolation) and e.code == "EXPRESSION_NOT_ALLOWED"

    pending = translate(RuntimeError(
        "[APPROVAL_PENDING] request r42: AGGREGATE_NOT_ALLOWED: aggregate max ...; AGGREGATE_REQUIRED: rows of t"
    ))
    assert isinstance(pending, airlock.ApprovalPending) and pending.code == "APPROVAL_PENDING"
    assert pending.request_id == "r42"
    assert pending.reason_codes == ["AGGREGATE_NOT_ALLOWED", "AGGREGATE_REQUIRED"]
    other = translate(RuntimeError("connection refused"))
    assert type(other) is airlock.AirlockError
