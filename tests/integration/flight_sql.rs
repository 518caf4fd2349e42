//! The Flight SQL surface through arrow-rs's FlightSqlServiceClient, and bad input.

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{CommandGetDbSchemas, CommandGetPrimaryKeys, CommandGetTables, SqlInfo};
use arrow_flight::{FlightDescriptor, Ticket};
use datafusion::arrow::array::{Array, BinaryArray, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::ipc::convert::try_schema_from_ipc_buffer;
use std::sync::Arc;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn aggregate_query_streams_in_the_promised_schema() {
    let server = start().await;
    let mut c = analyst(&server).await;
    let batches = query(
        &mut c,
        "SELECT ward, count(*) AS n FROM hospital.patients GROUP BY ward ORDER BY ward",
    )
    .await
    .unwrap();
    assert_eq!(rows(&batches), 6);
    let schema = batches[0].schema();
    assert_eq!(
        schema.field(0).data_type(),
        &DataType::Utf8,
        "strings leave as Utf8, never Utf8View"
    );
    let n: i64 = batches
        .iter()
        .flat_map(|b| {
            b.column(1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec()
        })
        .sum();
    assert_eq!(n, 3_000);
}

#[tokio::test]
async fn empty_results_still_carry_the_schema() {
    let server = start().await;
    let mut c = analyst(&server).await;
    let info = c
        .execute(
            "SELECT ward FROM hospital.patients WHERE age > 1000 GROUP BY ward".into(),
            None,
        )
        .await
        .unwrap();
    let (schema, batches) = fetch(&mut c, info).await.unwrap();
    assert_eq!(rows(&batches), 0);
    assert_eq!(schema.fields().len(), 1);
}

#[tokio::test]
async fn basic_credentials_on_each_call_work_without_handshake() {
    let server = start().await;
    let mut c = FlightSqlServiceClient::new(channel(&server).await);
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode("owner:owner");
    c.set_header("authorization", format!("Basic {basic}"));
    let b = query(&mut c, "SELECT count(*) FROM hospital.staff")
        .await
        .unwrap();
    assert_eq!(rows(&b), 1);
}

#[tokio::test]
async fn bad_credentials_are_unauthenticated_and_the_server_keeps_serving() {
    let server = start().await;
    for (user, password) in [("analyst", "wrong"), ("nobody", "analyst"), ("analyst", "")] {
        let err = raw_handshake(&server, Some((user, password)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{user}");
        assert!(
            !err.message().contains(password) || password.is_empty(),
            "no password echoed"
        );
    }
    assert_eq!(
        raw_handshake(&server, None).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let mut anon = FlightSqlServiceClient::new(channel(&server).await);
    let err = anon.execute("SELECT 1".into(), None).await.unwrap_err();
    assert_eq!(status(err).code(), Code::Unauthenticated);

    let mut forged = FlightSqlServiceClient::new(channel(&server).await);
    forged.set_token("not-a-token".into());
    let err = forged.execute("SELECT 1".into(), None).await.unwrap_err();
    assert_eq!(status(err).code(), Code::Unauthenticated);

    let mut c = analyst(&server).await;
    assert_eq!(rows(&query(&mut c, "SELECT 1").await.unwrap()), 1);
}

async fn raw_handshake(
    server: &airlock::server::Running,
    creds: Option<(&str, &str)>,
) -> Result<(), tonic::Status> {
    use base64::Engine;
    let mut raw = FlightServiceClient::new(channel(server).await);
    let mut req = tonic::Request::new(futures::stream::iter(vec![
        arrow_flight::HandshakeRequest::default(),
    ]));
    if let Some((u, p)) = creds {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        req.metadata_mut()
            .insert("authorization", format!("Basic {basic}").parse().unwrap());
    }
    raw.handshake(req).await.map(|_| ())
}

#[tokio::test]
async fn handshake_returns_the_token_in_header_and_payload() {
    let server = start().await;
    let mut c = FlightSqlServiceClient::new(channel(&server).await);
    let payload = c.handshake("analyst", "analyst").await.unwrap();
    assert_eq!(c.token().map(String::as_bytes), Some(payload.as_ref()));
    assert!(payload.len() >= 40, "a long random token");
}

#[tokio::test]
async fn malformed_and_foreign_tickets_fail_cleanly() {
    let server = start().await;
    let mut owner = owner(&server).await;
    let mut analyst = analyst(&server).await;

    // A ticket that is not a protobuf at all, and one with an unknown handle.
    let mut raw = FlightServiceClient::new(channel(&server).await);
    let req = with_token(
        Ticket::new(vec![0xff, 0x00, 0x13]),
        analyst.token().unwrap(),
    );
    let err = raw.do_get(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // The owner's ticket presented by the analyst fails like an unknown one.
    let info = owner
        .execute("SELECT count(*) FROM hospital.patients".into(), None)
        .await
        .unwrap();
    let t = ticket(&info);
    let foreign = refused(analyst.do_get(t.clone()).await);
    let unknown_handle = {
        use arrow_flight::sql::{ProstMessageExt, TicketStatementQuery};
        use prost::Message;
        let cmd = TicketStatementQuery {
            statement_handle: vec![7u8; 16].into(),
        };
        Ticket::new(cmd.as_any().encode_to_vec())
    };
    let unknown = refused(analyst.do_get(unknown_handle).await);
    assert_eq!(foreign.code(), Code::InvalidArgument);
    assert_eq!(
        foreign.message(),
        unknown.message(),
        "a foreign ticket looks unknown"
    );

    // The owner can still use it, once.
    assert_eq!(rows(&fetch(&mut owner, info.clone()).await.unwrap().1), 1);
    assert!(
        owner.do_get(t).await.is_err(),
        "statement tickets are single use"
    );
}

#[tokio::test]
async fn syntax_errors_and_unknown_tables_are_invalid_argument() {
    let server = start().await;
    let mut c = analyst(&server).await;
    let err = query(&mut c, "SELEC 1").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The planner reports several problems at once as a collection: still a client error.
    let err = query(
        &mut c,
        "SELECT upper(x.ward), count(*) FROM hospital.patients p GROUP BY upper(x.ward)",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("x.ward"), "{err:?}");
    let missing = query(&mut c, "SELECT count(*) FROM hospital.nosuch")
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(missing.message().contains("not found"), "{missing:?}");
    // A forbidden table fails exactly like a missing one.
    let forbidden = query(&mut c, "SELECT count(*) FROM hospital.staff")
        .await
        .unwrap_err();
    assert_eq!(forbidden.code(), missing.code());
    assert_eq!(
        forbidden.message().replace("staff", "X"),
        missing.message().replace("nosuch", "X")
    );
}

#[tokio::test]
async fn every_non_query_statement_is_refused() {
    let server = start().await;
    let mut c = owner(&server).await;
    for sql in [
        "CREATE TABLE t AS SELECT 1",
        "CREATE VIEW v AS SELECT * FROM hospital.patients",
        "DROP TABLE hospital.patients",
        "INSERT INTO hospital.staff VALUES (1, 'x', 'A', 1.0)",
        "UPDATE hospital.staff SET salary = 0",
        "DELETE FROM hospital.staff",
        "COPY hospital.patients TO '/tmp/leak.csv'",
        "SET datafusion.execution.batch_size = 1",
        "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
        "CREATE FUNCTION f(a INT) RETURNS INT RETURN a",
        "BEGIN TRANSACTION",
        "PREPARE p AS SELECT 1",
    ] {
        assert_refused(query(&mut c, sql).await, "STATEMENT_NOT_ALLOWED");
    }
    // URL tables and file-reading table functions do not exist.
    for sql in [
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM 'file:///etc/hosts'",
        "SELECT * FROM read_parquet('/tmp/x.parquet')",
        "SELECT * FROM read_csv('/etc/passwd')",
    ] {
        let err = query(&mut c, sql).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
    }
    // The server is still serving.
    assert_eq!(rows(&query(&mut c, "SELECT 1").await.unwrap()), 1);
}

#[tokio::test]
async fn explain_is_for_admins_only() {
    let server = start().await;
    let mut a = analyst(&server).await;
    for sql in [
        "EXPLAIN SELECT ward, count(*) FROM hospital.patients GROUP BY ward",
        "EXPLAIN ANALYZE SELECT ward, count(*) FROM hospital.patients GROUP BY ward",
    ] {
        assert_refused(query(&mut a, sql).await, "EXPLAIN_NOT_ALLOWED");
    }
    let mut o = owner(&server).await;
    let plan = query(
        &mut o,
        "EXPLAIN SELECT ward, count(*) FROM hospital.patients GROUP BY ward",
    )
    .await
    .unwrap();
    assert!(rows(&plan) >= 1);
}

#[tokio::test]
async fn substrait_is_refused() {
    use arrow_flight::sql::{CommandStatementSubstraitPlan, ProstMessageExt, SubstraitPlan};
    use prost::Message;
    let server = start().await;
    let c = owner(&server).await;
    let cmd = CommandStatementSubstraitPlan {
        plan: Some(SubstraitPlan {
            plan: vec![1, 2, 3].into(),
            version: "0.1".into(),
        }),
        transaction_id: None,
    };
    let mut raw = FlightServiceClient::new(channel(&server).await);
    let req = with_token(
        FlightDescriptor::new_cmd(cmd.as_any().encode_to_vec()),
        c.token().unwrap(),
    );
    assert_refused(raw.get_flight_info(req).await, "SUBSTRAIT_NOT_ALLOWED");
}

#[tokio::test]
async fn deep_nesting_fails_cleanly_and_the_server_survives() {
    let server = start().await;
    let mut c = owner(&server).await;
    let nested = format!("SELECT {}1{}", "(".repeat(5_000), ")".repeat(5_000));
    let err = query(&mut c, &nested).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let chain = format!("SELECT {}", vec!["1"; 5_000].join(" + "));
    let _ = query(&mut c, &chain).await; // may run or be refused; must not crash
    let calls = format!("SELECT {}1{}", "abs(".repeat(5_000), ")".repeat(5_000));
    let err = query(&mut c, &calls).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(rows(&query(&mut c, "SELECT 1").await.unwrap()), 1);
}

#[tokio::test]
async fn metadata_lists_only_visible_tables() {
    let server = start().await;
    let mut a = analyst(&server).await;
    let mut o = owner(&server).await;

    let tables = |include_schema| CommandGetTables {
        catalog: None,
        db_schema_filter_pattern: None,
        table_name_filter_pattern: None,
        table_types: vec![],
        include_schema,
    };
    let info = a.get_tables(tables(true)).await.unwrap();
    let (_, b) = fetch(&mut a, info).await.unwrap();
    let names = string_column(&b, "table_name");
    assert_eq!(names, vec!["claims", "patients", "visits"]);
    let schemas = b[0]
        .column_by_name("table_schema")
        .unwrap()
        .as_any()
        .downcast_ref::<BinaryArray>()
        .unwrap()
        .clone();
    // Rows are claims, patients, visits: patients is the second.
    let patients = try_schema_from_ipc_buffer(schemas.value(1)).unwrap();
    assert!(patients.field_with_name("patient_id").is_ok());
    assert_eq!(
        patients.field_with_name("diagnosis").unwrap().data_type(),
        &DataType::Utf8
    );
    // ssn is declared NOT NULL, but the analyst's mask makes it NULL: the metadata says so.
    assert!(patients.field_with_name("ssn").unwrap().is_nullable());
    assert!(
        !patients
            .field_with_name("patient_id")
            .unwrap()
            .is_nullable()
    );

    let info = o.get_tables(tables(false)).await.unwrap();
    let (_, b) = fetch(&mut o, info).await.unwrap();
    assert_eq!(
        string_column(&b, "table_name"),
        vec!["claims", "patients", "staff", "visits"]
    );

    let info = a.get_catalogs().await.unwrap();
    assert_eq!(
        string_column(&fetch(&mut a, info).await.unwrap().1, "catalog_name"),
        vec!["airlock"]
    );
    let info = a
        .get_db_schemas(CommandGetDbSchemas {
            catalog: None,
            db_schema_filter_pattern: None,
        })
        .await
        .unwrap();
    assert_eq!(
        string_column(&fetch(&mut a, info).await.unwrap().1, "db_schema_name"),
        vec!["hospital"]
    );
    let info = a.get_table_types().await.unwrap();
    assert_eq!(
        string_column(&fetch(&mut a, info).await.unwrap().1, "table_type"),
        vec!["TABLE"]
    );

    // information_schema is the same view.
    let b = query(&mut a, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'hospital' ORDER BY 1")
        .await
        .unwrap();
    assert_eq!(
        string_column(&b, "table_name"),
        vec!["claims", "patients", "visits"]
    );
    let b = query(
        &mut a,
        "SELECT count(*) AS n FROM information_schema.columns WHERE table_name = 'staff'",
    )
    .await
    .unwrap();
    assert_eq!(pretty(&b).matches(" 0 ").count(), 1, "{}", pretty(&b));
}

#[tokio::test]
async fn sql_info_type_info_and_keys() {
    let server = start().await;
    let mut c = analyst(&server).await;
    let info = c
        .get_sql_info(vec![
            SqlInfo::FlightSqlServerName,
            SqlInfo::FlightSqlServerReadOnly,
            SqlInfo::FlightSqlServerTransaction,
        ])
        .await
        .unwrap();
    let (_, b) = fetch(&mut c, info).await.unwrap();
    assert_eq!(rows(&b), 3);
    assert!(pretty(&b).contains("Airlock"));

    let info = c
        .get_xdbc_type_info(arrow_flight::sql::CommandGetXdbcTypeInfo { data_type: None })
        .await
        .unwrap();
    let (_, b) = fetch(&mut c, info).await.unwrap();
    assert!(string_column(&b, "type_name").contains(&"VARCHAR".to_string()));

    let info = c
        .get_primary_keys(CommandGetPrimaryKeys {
            catalog: None,
            db_schema: Some("hospital".into()),
            table: "patients".into(),
        })
        .await
        .unwrap();
    assert_eq!(rows(&fetch(&mut c, info).await.unwrap().1), 0);
    let info = c
        .get_exported_keys(arrow_flight::sql::CommandGetExportedKeys {
            catalog: None,
            db_schema: Some("hospital".into()),
            table: "patients".into(),
        })
        .await
        .unwrap();
    assert_eq!(rows(&fetch(&mut c, info).await.unwrap().1), 0);
}

#[tokio::test]
async fn prepared_statements_bind_parameters() {
    let server = start().await;
    let mut c = owner(&server).await;
    let mut stmt = c
        .prepare(
            "SELECT count(*) AS n FROM hospital.patients WHERE age >= ? AND ward = ?".into(),
            None,
        )
        .await
        .unwrap();
    let params = stmt.parameter_schema().unwrap().clone();
    assert_eq!(params.fields().len(), 2);
    assert_eq!(stmt.dataset_schema().unwrap().field(0).name(), "n");
    let bind = |age: i64, ward: &str| {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("$1", DataType::Int64, true),
                Field::new("$2", DataType::Utf8, true),
            ])),
            vec![
                Arc::new(Int64Array::from(vec![age])),
                Arc::new(StringArray::from(vec![ward])),
            ],
        )
        .unwrap()
    };
    stmt.set_parameters(bind(0, "A")).unwrap();
    let info = stmt.execute().await.unwrap();
    let all_a = first_i64(&fetch(&mut c, info).await.unwrap().1);
    stmt.set_parameters(bind(60, "A")).unwrap();
    let info = stmt.execute().await.unwrap();
    let old_a = first_i64(&fetch(&mut c, info).await.unwrap().1);
    assert!(all_a > old_a && old_a > 0, "{all_a} {old_a}");

    let direct = query(
        &mut c,
        "SELECT count(*) FROM hospital.patients WHERE age >= 60 AND ward = 'A'",
    )
    .await
    .unwrap();
    assert_eq!(first_i64(&direct), old_a);
    stmt.close().await.unwrap();

    // Hostile round 12: the audit record of a prepared statement's release names its
    // bound values, or the trail could not tell whose rows a `WHERE id = ?` released.
    let trail =
        std::fs::read_to_string(airlock::audit::path_in(&server.airlock.config.state_dir)).unwrap();
    let released: Vec<&str> = trail
        .lines()
        .filter(|l| l.contains("\"decision\":\"released\"") && l.contains("age >= ?"))
        .collect();
    assert_eq!(released.len(), 2, "{trail}");
    assert!(
        released[1].contains(r#""params":"[[\"Int64\",\"60\"],[\"Utf8\",\"A\"]]""#),
        "{}",
        released[1]
    );
}

#[tokio::test]
async fn prepared_statements_are_bound_to_their_principal() {
    use arrow_flight::sql::{
        ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any,
        CommandPreparedStatementQuery, ProstMessageExt,
    };
    use prost::Message;
    let server = start().await;
    let o = owner(&server).await;
    let a = analyst(&server).await;
    let mut raw = FlightServiceClient::new(channel(&server).await);
    let create = ActionCreatePreparedStatementRequest {
        query: "SELECT count(*) FROM hospital.patients".into(),
        transaction_id: None,
    };
    let action =
        arrow_flight::Action::new("CreatePreparedStatement", create.as_any().encode_to_vec());
    let mut results = raw
        .do_action(with_token(action, o.token().unwrap()))
        .await
        .unwrap()
        .into_inner();
    let body = results.message().await.unwrap().unwrap().body;
    let created: ActionCreatePreparedStatementResult =
        Any::decode(body).unwrap().unpack().unwrap().unwrap();
    let cmd = CommandPreparedStatementQuery {
        prepared_statement_handle: created.prepared_statement_handle.clone(),
    };
    let descriptor = FlightDescriptor::new_cmd(cmd.as_any().encode_to_vec());

    let err = raw
        .get_flight_info(with_token(descriptor.clone(), a.token().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "another principal's handle looks unknown"
    );
    let info = raw
        .get_flight_info(with_token(descriptor, o.token().unwrap()))
        .await
        .unwrap();
    assert_eq!(
        info.into_inner().endpoint.len(),
        1,
        "the owner can use their handle"
    );
}

fn refused<T>(r: Result<T, arrow_flight::error::FlightError>) -> tonic::Status {
    match r {
        Ok(_) => panic!("expected the call to fail"),
        Err(e) => status(e),
    }
}

fn string_column(batches: &[RecordBatch], name: &str) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let col = b
                .column_by_name(name)
                .unwrap_or_else(|| panic!("no column {name}"));
            let s = col.as_any().downcast_ref::<StringArray>().unwrap().clone();
            (0..s.len())
                .map(move |i| s.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn first_i64(batches: &[RecordBatch]) -> i64 {
    batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0)
}

#[tokio::test]
async fn runtime_failures_never_echo_data_values() {
    let server = start().await;
    let mut c = analyst(&server).await;
    // Below the release boundary nothing may fail (PRIVACY.md §3.2.1): a cast inside an
    // aggregate is not even planned.
    let err = query(
        &mut c,
        "SELECT ward, sum(CAST(diagnosis AS INT)) FROM hospital.patients GROUP BY ward",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("EXPRESSION_NOT_ALLOWED"), "{err:?}");
    // Above the boundary, released values may fail: a failed cast of a released group
    // key would carry the value in DataFusion's message.
    let err = query(
        &mut c,
        "SELECT CAST(diagnosis AS INT) FROM (SELECT diagnosis, count(*) AS n FROM hospital.patients GROUP BY diagnosis) g",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message()
            .starts_with("query failed during execution (request id "),
        "{err:?}"
    );
    for value in ["hypertension", "influenza", "asthma", "diabetes"] {
        assert!(!err.message().contains(value), "{err:?}");
    }
    // Division by zero inside a protected computation is just as generic.
    let err = query(
        &mut c,
        "SELECT ward, 1 / (count(*) - count(*)) FROM hospital.patients GROUP BY ward",
    )
    .await
    .unwrap_err();
    assert!(
        err.message().starts_with("query failed during execution"),
        "{err:?}"
    );
}
