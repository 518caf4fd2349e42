//! Flight SQL metadata answers: server facts, types, catalogs, schemas, tables, keys.
//!
//! Every answer about tables is computed from the principal's own catalog view, so a
//! table they hold no action on is absent from all of them.

use std::sync::{Arc, LazyLock};

use arrow_flight::sql::metadata::{
    SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder,
};
use arrow_flight::sql::{
    CommandGetDbSchemas, CommandGetTables, Nullable, Searchable, SqlInfo, SqlNullOrdering,
    SqlSupportedCaseSensitivity, SqlSupportedTransaction, XdbcDataType,
};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::TableReference;

use crate::catalog::CATALOG_NAME;
use crate::error::{Error, Result};
use crate::query::output::client_type;
use crate::session::PrincipalSession;

/// Facts about the server, for GetSqlInfo.
pub fn sql_info() -> &'static SqlInfoData {
    static INFO: LazyLock<SqlInfoData> = LazyLock::new(|| {
        let mut b = SqlInfoDataBuilder::new();
        b.append(SqlInfo::FlightSqlServerName, "Airlock");
        b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        b.append(SqlInfo::FlightSqlServerReadOnly, true);
        b.append(SqlInfo::FlightSqlServerSql, true);
        b.append(SqlInfo::FlightSqlServerSubstrait, false);
        b.append(
            SqlInfo::FlightSqlServerTransaction,
            SqlSupportedTransaction::None as i32,
        );
        b.append(SqlInfo::FlightSqlServerCancel, false);
        b.append(SqlInfo::SqlDdlCatalog, false);
        b.append(SqlInfo::SqlDdlSchema, false);
        b.append(SqlInfo::SqlDdlTable, false);
        b.append(
            SqlInfo::SqlIdentifierCase,
            SqlSupportedCaseSensitivity::SqlCaseSensitivityLowercase as i32,
        );
        b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
        b.append(
            SqlInfo::SqlQuotedIdentifierCase,
            SqlSupportedCaseSensitivity::SqlCaseSensitivityCaseInsensitive as i32,
        );
        b.append(SqlInfo::SqlAllTablesAreSelectable, true);
        b.append(
            SqlInfo::SqlNullOrdering,
            SqlNullOrdering::SqlNullsSortedHigh as i32,
        );
        b.append(SqlInfo::SqlTransactionsSupported, false);
        b.append(SqlInfo::SqlSupportsColumnAliasing, true);
        b.append(SqlInfo::SqlNullPlusNullIsNull, true);
        b.append(SqlInfo::SqlSupportsTableCorrelationNames, true);
        b.append(SqlInfo::SqlSupportsDifferentTableCorrelationNames, false);
        b.append(SqlInfo::SqlSupportsExpressionsInOrderBy, true);
        b.append(SqlInfo::SqlSupportsOrderByUnrelated, true);
        b.append(SqlInfo::SqlSupportsLikeEscapeClause, false);
        b.append(SqlInfo::SqlSupportsNonNullableColumns, true);
        b.append(SqlInfo::SqlSupportsIntegrityEnhancementFacility, false);
        b.append(SqlInfo::SqlSchemaTerm, "schema");
        b.append(SqlInfo::SqlProcedureTerm, "procedure");
        b.append(SqlInfo::SqlCatalogTerm, "catalog");
        b.append(SqlInfo::SqlCatalogAtStart, true);
        b.append(SqlInfo::SqlSelectForUpdateSupported, false);
        b.append(SqlInfo::SqlStoredProceduresSupported, false);
        b.append(SqlInfo::SqlCorrelatedSubqueriesSupported, true);
        b.append(SqlInfo::SqlBatchUpdatesSupported, false);
        b.append(SqlInfo::SqlSavepointsSupported, false);
        b.append(SqlInfo::SqlNamedParametersSupported, false);
        b.append(SqlInfo::SqlLocatorsUpdateCopy, false);
        b.append(SqlInfo::SqlStoredFunctionsUsingCallSyntaxSupported, false);
        b.append(SqlInfo::SqlMaxColumnNameLength, 0i64);
        b.append(SqlInfo::SqlMaxStatementLength, 0i64);
        b.append(SqlInfo::SqlMaxStatements, 1i64);
        b.append(
            SqlInfo::SqlKeywords,
            &[
                "ABS", "AVG", "CASE", "CAST", "COUNT", "DISTINCT", "EXPLAIN", "GROUP", "HAVING",
                "JOIN", "LIMIT", "OFFSET", "ORDER", "OVER", "SELECT", "UNION", "VALUES", "WITH",
            ][..],
        );
        b.append(
            SqlInfo::SqlNumericFunctions,
            &[
                "abs", "ceil", "exp", "floor", "ln", "log", "power", "round", "sqrt", "trunc",
            ][..],
        );
        b.append(
            SqlInfo::SqlStringFunctions,
            &[
                "concat", "length", "lower", "ltrim", "replace", "rtrim", "substr", "trim", "upper",
            ][..],
        );
        b.append(
            SqlInfo::SqlDatetimeFunctions,
            &["date_part", "date_trunc", "now", "to_timestamp"][..],
        );
        b.build().expect("static SqlInfo data is valid")
    });
    &INFO
}

/// The SQL types results can have, for GetXdbcTypeInfo.
pub fn xdbc_type_info() -> &'static XdbcTypeInfoData {
    static INFO: LazyLock<XdbcTypeInfoData> = LazyLock::new(|| {
        let mut b = XdbcTypeInfoDataBuilder::new();
        let t = |name: &str,
                 data_type: XdbcDataType,
                 size: Option<i32>,
                 prefix: Option<&str>,
                 radix: Option<i32>| XdbcTypeInfo {
            type_name: name.to_string(),
            data_type,
            column_size: size,
            literal_prefix: prefix.map(str::to_string),
            literal_suffix: prefix.map(str::to_string),
            create_params: None,
            nullable: Nullable::NullabilityNullable,
            case_sensitive: prefix.is_some(),
            searchable: Searchable::Full,
            unsigned_attribute: radix.map(|_| false),
            fixed_prec_scale: false,
            auto_increment: radix.map(|_| false),
            local_type_name: Some(name.to_string()),
            minimum_scale: None,
            maximum_scale: None,
            sql_data_type: data_type,
            datetime_subcode: None,
            num_prec_radix: radix,
            interval_precision: None,
        };
        // Ordered by data type code, as JDBC's getTypeInfo expects.
        b.append(t(
            "BIGINT",
            XdbcDataType::XdbcBigint,
            Some(19),
            None,
            Some(10),
        ));
        b.append(t(
            "TINYINT",
            XdbcDataType::XdbcTinyint,
            Some(3),
            None,
            Some(10),
        ));
        b.append(t("BOOLEAN", XdbcDataType::XdbcBit, Some(1), None, None));
        b.append(t(
            "VARBINARY",
            XdbcDataType::XdbcVarbinary,
            None,
            Some("'"),
            None,
        ));
        b.append(t(
            "VARCHAR",
            XdbcDataType::XdbcVarchar,
            None,
            Some("'"),
            None,
        ));
        b.append(t(
            "DECIMAL",
            XdbcDataType::XdbcDecimal,
            Some(38),
            None,
            Some(10),
        ));
        b.append(t(
            "INTEGER",
            XdbcDataType::XdbcInteger,
            Some(10),
            None,
            Some(10),
        ));
        b.append(t(
            "SMALLINT",
            XdbcDataType::XdbcSmallint,
            Some(5),
            None,
            Some(10),
        ));
        b.append(t("FLOAT", XdbcDataType::XdbcFloat, Some(24), None, Some(2)));
        b.append(t(
            "DOUBLE",
            XdbcDataType::XdbcDouble,
            Some(53),
            None,
            Some(2),
        ));
        b.append(t("DATE", XdbcDataType::XdbcDate, Some(10), Some("'"), None));
        b.append(t(
            "TIMESTAMP",
            XdbcDataType::XdbcTimestamp,
            Some(29),
            Some("'"),
            None,
        ));
        b.build().expect("static type info is valid")
    });
    &INFO
}

/// The principal's visible tables as (schema, table, client-facing schema).
async fn visible_tables(session: &PrincipalSession) -> Vec<(String, String, Schema)> {
    let Some(catalog) = session.state.catalog_list().catalog(CATALOG_NAME) else {
        return vec![];
    };
    let mut out = Vec::new();
    for schema_name in catalog.schema_names() {
        if schema_name == "information_schema" {
            continue;
        }
        let Some(schema) = catalog.schema(&schema_name) else {
            continue;
        };
        let mut names = schema.table_names();
        names.sort();
        for table in names {
            let provider = schema.table(&table).await.ok().flatten();
            if let Some(provider) = provider {
                let rules = session
                    .privacy
                    .rules(&TableReference::partial(
                        schema_name.as_str(),
                        table.as_str(),
                    ))
                    .map(|(_, rules)| rules)
                    .filter(|rules| !rules.unmasked);
                // A masked column can come out NULL (the `null` mask, or a mask whose
                // text the column's type cannot hold), whatever the table declares.
                let masked = |f: &Field| {
                    rules.is_some_and(|r| r.policy.mask_for(f.name(), f.data_type()).is_some())
                };
                let fields: Vec<Field> = provider
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| {
                        let nullable = f.is_nullable() || masked(f);
                        Field::new(f.name(), client_type(f.data_type()), nullable)
                    })
                    .collect();
                out.push((schema_name.clone(), table, Schema::new(fields)));
            }
        }
    }
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

pub fn catalogs() -> Result<RecordBatch> {
    let mut b = arrow_flight::sql::metadata::GetCatalogsBuilder::new();
    b.append(CATALOG_NAME);
    b.build().map_err(arrow_err)
}

pub async fn db_schemas(
    session: &PrincipalSession,
    cmd: CommandGetDbSchemas,
) -> Result<RecordBatch> {
    let mut b = cmd.into_builder();
    let mut schemas: Vec<String> = visible_tables(session)
        .await
        .into_iter()
        .map(|(s, _, _)| s)
        .collect();
    schemas.dedup();
    for s in schemas {
        b.append(CATALOG_NAME, s);
    }
    b.build().map_err(arrow_err)
}

pub async fn tables(session: &PrincipalSession, cmd: CommandGetTables) -> Result<RecordBatch> {
    let mut b = cmd.into_builder();
    for (schema, table, fields) in visible_tables(session).await {
        b.append(CATALOG_NAME, schema, table, "TABLE", &fields)
            .map_err(arrow_err)?;
    }
    b.build().map_err(arrow_err)
}

pub fn tables_schema(cmd: CommandGetTables) -> SchemaRef {
    cmd.into_builder().schema()
}

pub fn table_types() -> Result<RecordBatch> {
    let mut b = arrow_flight::sql::CommandGetTableTypes::default().into_builder();
    b.append("TABLE");
    b.build().map_err(arrow_err)
}

/// Schema of GetPrimaryKeys answers (always empty: datasets declare no keys).
pub fn primary_keys_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            Field::new("catalog_name", DataType::Utf8, true),
            Field::new("db_schema_name", DataType::Utf8, true),
            Field::new("table_name", DataType::Utf8, false),
            Field::new("column_name", DataType::Utf8, false),
            Field::new("key_name", DataType::Utf8, true),
            Field::new("key_sequence", DataType::Int32, false),
        ]))
    });
    Arc::clone(&SCHEMA)
}

/// Schema of GetExportedKeys, GetImportedKeys and GetCrossReference answers (always empty).
pub fn foreign_keys_schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(vec![
            Field::new("pk_catalog_name", DataType::Utf8, true),
            Field::new("pk_db_schema_name", DataType::Utf8, true),
            Field::new("pk_table_name", DataType::Utf8, false),
            Field::new("pk_column_name", DataType::Utf8, false),
            Field::new("fk_catalog_name", DataType::Utf8, true),
            Field::new("fk_db_schema_name", DataType::Utf8, true),
            Field::new("fk_table_name", DataType::Utf8, false),
            Field::new("fk_column_name", DataType::Utf8, false),
            Field::new("key_sequence", DataType::Int32, false),
            Field::new("fk_key_name", DataType::Utf8, true),
            Field::new("pk_key_name", DataType::Utf8, true),
            Field::new("update_rule", DataType::UInt8, false),
            Field::new("delete_rule", DataType::UInt8, false),
        ]))
    });
    Arc::clone(&SCHEMA)
}

fn arrow_err(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("building a metadata answer: {e}"))
}
