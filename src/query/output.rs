//! The result schema clients are promised.
//!
//! DataFusion plans string and binary data as `Utf8View`/`BinaryView` in places; many
//! clients (the Flight SQL JDBC driver, older pyarrow and ADBC builds) cannot read view
//! types. Results therefore always leave as `Utf8`/`Binary` (see docs/DESIGN.md): a final
//! projection casts any view column, so the plan's schema, FlightInfo's schema and every
//! streamed batch agree.

use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::Result;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, cast};
use std::sync::Arc;

/// The client-facing form of a type: views become their plain counterparts.
pub fn client_type(t: &DataType) -> DataType {
    match t {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        DataType::List(f) => DataType::List(client_field(f)),
        DataType::LargeList(f) => DataType::LargeList(client_field(f)),
        DataType::FixedSizeList(f, n) => DataType::FixedSizeList(client_field(f), *n),
        DataType::ListView(f) => DataType::List(client_field(f)),
        DataType::LargeListView(f) => DataType::LargeList(client_field(f)),
        DataType::Struct(fields) => DataType::Struct(fields.iter().map(client_field).collect()),
        DataType::Map(f, sorted) => DataType::Map(client_field(f), *sorted),
        DataType::Dictionary(_, v) => client_type(v),
        other => other.clone(),
    }
}

fn client_field(f: &FieldRef) -> FieldRef {
    Arc::new(
        Field::new(f.name(), client_type(f.data_type()), f.is_nullable())
            .with_metadata(f.metadata().clone()),
    )
}

/// Adds a casting projection when any output column has a view type.
pub fn normalize(plan: LogicalPlan) -> Result<LogicalPlan> {
    let schema = plan.schema();
    let needs = schema
        .fields()
        .iter()
        .any(|f| &client_type(f.data_type()) != f.data_type());
    if !needs {
        return Ok(plan);
    }
    let exprs: Vec<Expr> = schema
        .iter()
        .map(|(qualifier, field)| {
            let column = Expr::Column(datafusion::common::Column::new(
                qualifier.cloned(),
                field.name(),
            ));
            let wanted = client_type(field.data_type());
            if &wanted == field.data_type() {
                column
            } else {
                cast(column, wanted).alias_qualified(qualifier.cloned(), field.name())
            }
        })
        .collect();
    LogicalPlanBuilder::from(plan).project(exprs)?.build()
}
