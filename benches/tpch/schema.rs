//! The eight TPC-H tables' Arrow schemas (as tpchgen writes them), for benchmarks that
//! plan without data.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

fn schema(fields: &[(&str, DataType)]) -> SchemaRef {
    Arc::new(Schema::new(
        fields
            .iter()
            .map(|(n, t)| Field::new(*n, t.clone(), false))
            .collect::<Vec<_>>(),
    ))
}

/// (table name, schema) for every TPC-H table.
pub fn tables() -> Vec<(&'static str, SchemaRef)> {
    use DataType::*;
    let money = Decimal128(15, 2);
    vec![
        (
            "region",
            schema(&[
                ("r_regionkey", Int64),
                ("r_name", Utf8),
                ("r_comment", Utf8),
            ]),
        ),
        (
            "nation",
            schema(&[
                ("n_nationkey", Int64),
                ("n_name", Utf8),
                ("n_regionkey", Int64),
                ("n_comment", Utf8),
            ]),
        ),
        (
            "supplier",
            schema(&[
                ("s_suppkey", Int64),
                ("s_name", Utf8),
                ("s_address", Utf8),
                ("s_nationkey", Int64),
                ("s_phone", Utf8),
                ("s_acctbal", money.clone()),
                ("s_comment", Utf8),
            ]),
        ),
        (
            "customer",
            schema(&[
                ("c_custkey", Int64),
                ("c_name", Utf8),
                ("c_address", Utf8),
                ("c_nationkey", Int64),
                ("c_phone", Utf8),
                ("c_acctbal", money.clone()),
                ("c_mktsegment", Utf8),
                ("c_comment", Utf8),
            ]),
        ),
        (
            "part",
            schema(&[
                ("p_partkey", Int64),
                ("p_name", Utf8),
                ("p_mfgr", Utf8),
                ("p_brand", Utf8),
                ("p_type", Utf8),
                ("p_size", Int32),
                ("p_container", Utf8),
                ("p_retailprice", money.clone()),
                ("p_comment", Utf8),
            ]),
        ),
        (
            "partsupp",
            schema(&[
                ("ps_partkey", Int64),
                ("ps_suppkey", Int64),
                ("ps_availqty", Int32),
                ("ps_supplycost", money.clone()),
                ("ps_comment", Utf8),
            ]),
        ),
        (
            "orders",
            schema(&[
                ("o_orderkey", Int64),
                ("o_custkey", Int64),
                ("o_orderstatus", Utf8),
                ("o_totalprice", money.clone()),
                ("o_orderdate", Date32),
                ("o_orderpriority", Utf8),
                ("o_clerk", Utf8),
                ("o_shippriority", Int32),
                ("o_comment", Utf8),
            ]),
        ),
        (
            "lineitem",
            schema(&[
                ("l_orderkey", Int64),
                ("l_partkey", Int64),
                ("l_suppkey", Int64),
                ("l_linenumber", Int32),
                ("l_quantity", money.clone()),
                ("l_extendedprice", money.clone()),
                ("l_discount", money.clone()),
                ("l_tax", money.clone()),
                ("l_returnflag", Utf8),
                ("l_linestatus", Utf8),
                ("l_shipdate", Date32),
                ("l_commitdate", Date32),
                ("l_receiptdate", Date32),
                ("l_shipinstruct", Utf8),
                ("l_shipmode", Utf8),
                ("l_comment", Utf8),
            ]),
        ),
    ]
}

/// The benchmark's TPC-H queries: (name, SQL).
pub fn queries() -> Vec<(&'static str, &'static str)> {
    vec![
        ("q1", include_str!("queries/q1.sql")),
        ("q3", include_str!("queries/q3.sql")),
        ("q5", include_str!("queries/q5.sql")),
        ("q6", include_str!("queries/q6.sql")),
        ("q10", include_str!("queries/q10.sql")),
        ("q12", include_str!("queries/q12.sql")),
        ("q14", include_str!("queries/q14.sql")),
        ("q19", include_str!("queries/q19.sql")),
    ]
}
