//! Flight SQL calls built from fuzz input and sent to the demo server over loopback.
//!
//! Each input is a short session: up to four calls as the analyst or the owner. A call
//! carries a command, ticket, action body or parameter batch that is either well formed
//! with fuzzed fields (so the service's own handling is reached) or raw bytes (so the
//! decoding is). Tickets and prepared-statement handles can be real ones, taken from an
//! earlier answer in the same input or made at start-up, so the fuzzer gets past the
//! handle lookup into binding and execution.

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, CommandGetCatalogs,
    CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandGetXdbcTypeInfo, CommandPreparedStatementQuery, CommandPreparedStatementUpdate,
    CommandStatementQuery, CommandStatementUpdate, ProstMessageExt, TicketStatementQuery,
};
use arrow_flight::{Action, Criteria, Empty, FlightData, FlightDescriptor, Ticket};
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, NullArray, RecordBatch,
    StringArray,
};
use datafusion::arrow::datatypes::{Field, Schema};
use futures::StreamExt;
use prost::Message;
use tonic::transport::Channel;

use crate::sql::Statement;

#[derive(Arbitrary, Debug)]
pub struct Session {
    calls: Vec<(Who, Call)>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Who {
    Analyst,
    Owner,
    Nobody,
}

#[derive(Arbitrary, Debug)]
enum Call {
    GetFlightInfo(Command),
    GetSchema(Command),
    PollFlightInfo(Command),
    DoGet(TicketBody),
    DoAction(ActionBody),
    DoPut(Command, Vec<Data>),
    ListFlights(Vec<u8>),
    ListActions,
}

#[derive(Arbitrary, Debug)]
enum Sql {
    Demo(u8),
    Generated(Statement),
    Text(String),
}

/// Queries that plan, bind parameters or are refused, for the calls to carry.
const DEMO_SQL: [&str; 6] = [
    "SELECT ward, count(*), avg(cost) FROM hospital.patients GROUP BY ward",
    "SELECT diagnosis, count(*) FROM hospital.patients WHERE age > $1 GROUP BY diagnosis",
    "SELECT name, cost FROM hospital.patients",
    "SELECT kind, count(*), sum(amount) FROM hospital.claims GROUP BY kind",
    "SELECT zip, count(*) FROM hospital.patients WHERE sex = $1 AND age BETWEEN $2 AND $3 GROUP BY zip",
    "SELECT * FROM hospital.staff",
];

impl Sql {
    fn text(&self) -> String {
        match self {
            Sql::Demo(i) => DEMO_SQL[*i as usize % DEMO_SQL.len()].to_string(),
            Sql::Generated(s) => s.to_sql(),
            Sql::Text(t) => t.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Handle {
    /// A prepared statement made at start-up (two parameters' worth of query).
    Prepared,
    /// The handle of the last statement this input prepared.
    Last,
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Command {
    Statement(Sql, Option<Vec<u8>>),
    Prepared(Handle),
    Tables {
        catalog: Option<String>,
        schema: Option<String>,
        table: Option<String>,
        types: Vec<String>,
        include_schema: bool,
    },
    Schemas(Option<String>, Option<String>),
    Catalogs,
    SqlInfo(Vec<u32>),
    XdbcTypeInfo(Option<i32>),
    PrimaryKeys(Option<String>, Option<String>, String),
    ExportedKeys(Option<String>, Option<String>, String),
    ImportedKeys(Option<String>, Option<String>, String),
    CrossReference(String, String),
    TableTypes,
    Update(Sql),
    PreparedUpdate(Handle),
    Any(TypeUrl, Vec<u8>),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum TypeUrl {
    Known(u8),
    Text(String),
}

const TYPE_URLS: [&str; 8] = [
    "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandPreparedStatementQuery",
    "type.googleapis.com/arrow.flight.protocol.sql.TicketStatementQuery",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandGetTables",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementSubstraitPlan",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementIngest",
    "type.googleapis.com/arrow.flight.protocol.sql.ActionCreatePreparedStatementRequest",
    "type.googleapis.com/arrow.flight.protocol.sql.DoPutPreparedStatementResult",
];

#[derive(Arbitrary, Debug)]
enum TicketBody {
    /// The ticket of the last FlightInfo this input received.
    Last,
    Statement(Vec<u8>),
    Command(Command),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum ActionBody {
    CreatePrepared(Sql, Option<Vec<u8>>),
    ClosePrepared(Handle),
    PrivacyExplain(Sql),
    ReloadPolicy,
    MyAccess,
    /// An approval action (list, show, approve, deny, status) on a request id.
    Approval(u8, Id),
    /// A budget action (list, show, grant).
    Budget(u8, String, f64),
    Named(String, Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Id {
    Last,
    Text(String),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Data {
    Params(Vec<Param>),
    /// Well-formed parameters with some bytes of the encoded messages overwritten.
    Mutated(Vec<Param>, Vec<(u16, u8)>),
    Raw {
        header: Vec<u8>,
        body: Vec<u8>,
        app: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
enum Param {
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
    Date(i32),
    Null,
}

/// A bearer token per demo user, and the handle prepared at start-up.
struct Fixture {
    channel: Channel,
    analyst: String,
    owner: String,
    prepared: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let server = crate::server();
        crate::runtime().block_on(async {
            let channel = Channel::from_shared(format!("http://{}", server.addr))
                .unwrap()
                .connect()
                .await
                .expect("connect");
            let mut analyst = FlightSqlServiceClient::new(channel.clone());
            analyst
                .handshake("analyst", "analyst")
                .await
                .expect("login");
            let mut owner = FlightSqlServiceClient::new(channel.clone());
            owner.handshake("owner", "owner").await.expect("login");
            let analyst = analyst.token().cloned().expect("token");
            // The client keeps a prepared statement's handle private: prepare by hand.
            let create = ActionBody::CreatePrepared(Sql::Demo(1), None);
            let mut memory = Memory::default();
            let mut client = FlightServiceClient::new(channel.clone());
            Call::DoAction(create)
                .send_action(&mut client, Some(&analyst), &mut memory)
                .await;
            Fixture {
                analyst,
                owner: owner.token().cloned().expect("token"),
                prepared: memory.prepared.expect("the demo statement prepares"),
                channel,
            }
        })
    })
}

/// What earlier calls of the same input returned.
#[derive(Default)]
struct Memory {
    ticket: Option<Ticket>,
    prepared: Option<Vec<u8>>,
    request: Option<String>,
}

impl Session {
    /// Sends every call; errors are answers, a panic (in the server) aborts the process.
    pub fn run(&self) {
        let fx = fixture();
        crate::runtime().block_on(async {
            let mut memory = Memory::default();
            for (who, call) in self.calls.iter().take(4) {
                let mut client = FlightServiceClient::new(fx.channel.clone());
                let token = match who {
                    Who::Analyst => Some(fx.analyst.as_str()),
                    Who::Owner => Some(fx.owner.as_str()),
                    Who::Nobody => None,
                };
                call.send(&mut client, token, fx, &mut memory).await;
            }
        });
    }
}

fn request<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

impl Call {
    async fn send(
        &self,
        client: &mut FlightServiceClient<Channel>,
        token: Option<&str>,
        fx: &Fixture,
        memory: &mut Memory,
    ) {
        match self {
            Call::GetFlightInfo(c) => {
                let d = FlightDescriptor::new_cmd(c.encode(Some(fx), memory));
                if let Ok(info) = client.get_flight_info(request(d, token)).await {
                    memory.ticket = info
                        .into_inner()
                        .endpoint
                        .first()
                        .and_then(|e| e.ticket.clone());
                }
            }
            Call::GetSchema(c) => {
                let d = FlightDescriptor::new_cmd(c.encode(Some(fx), memory));
                let _ = client.get_schema(request(d, token)).await;
            }
            Call::PollFlightInfo(c) => {
                let d = FlightDescriptor::new_cmd(c.encode(Some(fx), memory));
                let _ = client.poll_flight_info(request(d, token)).await;
            }
            Call::DoGet(t) => {
                let ticket = match t {
                    TicketBody::Last => memory.ticket.clone().unwrap_or(Ticket::new(vec![])),
                    TicketBody::Statement(h) => Ticket::new(
                        TicketStatementQuery {
                            statement_handle: h.clone().into(),
                        }
                        .as_any()
                        .encode_to_vec(),
                    ),
                    TicketBody::Command(c) => Ticket::new(c.encode(Some(fx), memory)),
                    TicketBody::Raw(b) => Ticket::new(b.clone()),
                };
                if let Ok(r) = client.do_get(request(ticket, token)).await {
                    drain(r.into_inner()).await;
                }
            }
            Call::DoAction(a) => {
                let action = a.encode(Some(fx), memory);
                do_action(client, action, token, memory).await;
            }
            Call::DoPut(c, data) => {
                let mut messages = Vec::new();
                for d in data.iter().take(3) {
                    messages.extend(d.encode());
                }
                if let Some(first) = messages.first_mut() {
                    first.flight_descriptor =
                        Some(FlightDescriptor::new_cmd(c.encode(Some(fx), memory)));
                } else {
                    messages
                        .push(FlightData::new().with_descriptor(FlightDescriptor::new_cmd(
                            c.encode(Some(fx), memory),
                        )));
                }
                let stream = futures::stream::iter(messages);
                if let Ok(r) = client.do_put(request(stream, token)).await {
                    drain(r.into_inner()).await;
                }
            }
            Call::ListFlights(b) => {
                let criteria = Criteria {
                    expression: b.clone().into(),
                };
                if let Ok(r) = client.list_flights(request(criteria, token)).await {
                    drain(r.into_inner()).await;
                }
            }
            Call::ListActions => {
                if let Ok(r) = client.list_actions(request(Empty {}, token)).await {
                    drain(r.into_inner()).await;
                }
            }
        }
    }
}

impl Call {
    /// An action before the fixture exists (only [`ActionBody::CreatePrepared`] needs none).
    async fn send_action(
        &self,
        client: &mut FlightServiceClient<Channel>,
        token: Option<&str>,
        memory: &mut Memory,
    ) {
        if let Call::DoAction(a) = self {
            do_action(client, a.encode(None, memory), token, memory).await;
        }
    }
}

async fn do_action(
    client: &mut FlightServiceClient<Channel>,
    action: Action,
    token: Option<&str>,
    memory: &mut Memory,
) {
    if let Ok(r) = client.do_action(request(action, token)).await {
        let mut stream = r.into_inner();
        while let Some(Ok(result)) = stream.next().await {
            remember(&result.body, memory);
        }
    }
}

async fn drain<T>(mut stream: tonic::Streaming<T>) {
    while let Some(Ok(_)) = stream.next().await {}
}

/// Keeps a prepared-statement handle or a request id an action returned.
fn remember(body: &[u8], memory: &mut Memory) {
    if let Ok(any) = arrow_flight::sql::Any::decode(body)
        && let Ok(Some(r)) = any.unpack::<arrow_flight::sql::ActionCreatePreparedStatementResult>()
    {
        memory.prepared = Some(r.prepared_statement_handle.to_vec());
        return;
    }
    if let Ok(text) = std::str::from_utf8(body)
        && let Some(at) = text.find("\"id\":\"")
    {
        let rest = &text[at + 6..];
        if let Some(end) = rest.find('"') {
            memory.request = Some(rest[..end].to_string());
        }
    }
}

impl Handle {
    fn bytes(&self, fx: Option<&Fixture>, memory: &Memory) -> Vec<u8> {
        match self {
            Handle::Prepared => fx.map(|f| f.prepared.clone()).unwrap_or_default(),
            Handle::Last => memory.prepared.clone().unwrap_or_default(),
            Handle::Bytes(b) => b.clone(),
        }
    }
}

impl Command {
    fn encode(&self, fx: Option<&Fixture>, memory: &Memory) -> Vec<u8> {
        match self {
            Command::Statement(sql, txn) => CommandStatementQuery {
                query: sql.text(),
                transaction_id: txn.clone().map(Into::into),
            }
            .as_any()
            .encode_to_vec(),
            Command::Prepared(h) => CommandPreparedStatementQuery {
                prepared_statement_handle: h.bytes(fx, memory).into(),
            }
            .as_any()
            .encode_to_vec(),
            Command::Tables {
                catalog,
                schema,
                table,
                types,
                include_schema,
            } => CommandGetTables {
                catalog: catalog.clone(),
                db_schema_filter_pattern: schema.clone(),
                table_name_filter_pattern: table.clone(),
                table_types: types.clone(),
                include_schema: *include_schema,
            }
            .as_any()
            .encode_to_vec(),
            Command::Schemas(catalog, pattern) => CommandGetDbSchemas {
                catalog: catalog.clone(),
                db_schema_filter_pattern: pattern.clone(),
            }
            .as_any()
            .encode_to_vec(),
            Command::Catalogs => CommandGetCatalogs {}.as_any().encode_to_vec(),
            Command::SqlInfo(ids) => CommandGetSqlInfo { info: ids.clone() }
                .as_any()
                .encode_to_vec(),
            Command::XdbcTypeInfo(t) => CommandGetXdbcTypeInfo { data_type: *t }
                .as_any()
                .encode_to_vec(),
            Command::PrimaryKeys(c, s, t) => CommandGetPrimaryKeys {
                catalog: c.clone(),
                db_schema: s.clone(),
                table: t.clone(),
            }
            .as_any()
            .encode_to_vec(),
            Command::ExportedKeys(c, s, t) => CommandGetExportedKeys {
                catalog: c.clone(),
                db_schema: s.clone(),
                table: t.clone(),
            }
            .as_any()
            .encode_to_vec(),
            Command::ImportedKeys(c, s, t) => CommandGetImportedKeys {
                catalog: c.clone(),
                db_schema: s.clone(),
                table: t.clone(),
            }
            .as_any()
            .encode_to_vec(),
            Command::CrossReference(a, b) => CommandGetCrossReference {
                pk_catalog: None,
                pk_db_schema: None,
                pk_table: a.clone(),
                fk_catalog: None,
                fk_db_schema: None,
                fk_table: b.clone(),
            }
            .as_any()
            .encode_to_vec(),
            Command::TableTypes => CommandGetTableTypes {}.as_any().encode_to_vec(),
            Command::Update(sql) => CommandStatementUpdate {
                query: sql.text(),
                transaction_id: None,
            }
            .as_any()
            .encode_to_vec(),
            Command::PreparedUpdate(h) => CommandPreparedStatementUpdate {
                prepared_statement_handle: h.bytes(fx, memory).into(),
            }
            .as_any()
            .encode_to_vec(),
            Command::Any(url, value) => arrow_flight::sql::Any {
                type_url: match url {
                    TypeUrl::Known(i) => TYPE_URLS[*i as usize % TYPE_URLS.len()].to_string(),
                    TypeUrl::Text(t) => t.clone(),
                },
                value: value.clone().into(),
            }
            .encode_to_vec(),
            Command::Raw(b) => b.clone(),
        }
    }
}

impl ActionBody {
    fn encode(&self, fx: Option<&Fixture>, memory: &Memory) -> Action {
        let (kind, body): (&str, Vec<u8>) = match self {
            ActionBody::CreatePrepared(sql, txn) => (
                "CreatePreparedStatement",
                ActionCreatePreparedStatementRequest {
                    query: sql.text(),
                    transaction_id: txn.clone().map(Into::into),
                }
                .as_any()
                .encode_to_vec(),
            ),
            ActionBody::ClosePrepared(h) => (
                "ClosePreparedStatement",
                ActionClosePreparedStatementRequest {
                    prepared_statement_handle: h.bytes(fx, memory).into(),
                }
                .as_any()
                .encode_to_vec(),
            ),
            ActionBody::PrivacyExplain(sql) => ("PrivacyExplain", sql.text().into_bytes()),
            ActionBody::ReloadPolicy => ("ReloadPolicy", vec![]),
            ActionBody::MyAccess => ("MyAccess", vec![]),
            ActionBody::Approval(k, id) => {
                let kinds = [
                    "ListRequests",
                    "ShowRequest",
                    "ApproveRequest",
                    "DenyRequest",
                    "RequestStatus",
                ];
                let id = match id {
                    Id::Last => memory.request.clone().unwrap_or_default(),
                    Id::Text(t) => t.clone(),
                    Id::Raw(b) => return Action::new(kinds[*k as usize % 5], b.clone()),
                };
                let body = format!(
                    "{{\"id\": {}, \"reason\": \"fuzz\", \"max_rows\": 5}}",
                    json_string(&id)
                );
                (kinds[*k as usize % kinds.len()], body.into_bytes())
            }
            ActionBody::Budget(k, principal, epsilon) => {
                let kinds = ["ListBudgets", "ShowBudget", "GrantBudget"];
                let body = format!(
                    "{{\"principal\": {}, \"dataset\": \"hospital\", \"epsilon\": {}}}",
                    json_string(principal),
                    if epsilon.is_finite() { *epsilon } else { 1.0 }
                );
                (kinds[*k as usize % kinds.len()], body.into_bytes())
            }
            ActionBody::Named(kind, body) => return Action::new(kind.clone(), body.clone()),
        };
        Action::new(kind, body)
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Data {
    fn encode(&self) -> Vec<FlightData> {
        match self {
            Data::Params(p) => params(p),
            Data::Mutated(p, flips) => {
                let mut messages = params(p);
                for (at, byte) in flips.iter().take(8) {
                    let n = messages.len().max(1);
                    let Some(m) = messages.get_mut(*at as usize % n) else {
                        break;
                    };
                    let mut header = m.data_header.to_vec();
                    let mut body = m.data_body.to_vec();
                    let at = *at as usize;
                    if !header.is_empty() && at.is_multiple_of(2) {
                        let n = header.len();
                        header[at / 2 % n] = *byte;
                    } else if !body.is_empty() {
                        let n = body.len();
                        body[at / 2 % n] = *byte;
                    }
                    m.data_header = header.into();
                    m.data_body = body.into();
                }
                messages
            }
            Data::Raw { header, body, app } => vec![FlightData {
                flight_descriptor: None,
                data_header: header.clone().into(),
                app_metadata: app.clone().into(),
                data_body: body.clone().into(),
            }],
        }
    }
}

/// One row of parameters as Flight data (schema message, then the batch).
fn params(p: &[Param]) -> Vec<FlightData> {
    let (fields, columns): (Vec<Field>, Vec<ArrayRef>) = p
        .iter()
        .take(6)
        .enumerate()
        .map(|(i, p)| {
            let column: ArrayRef = match p {
                Param::Int(v) => Arc::new(Int64Array::from(vec![*v])),
                Param::Float(v) => Arc::new(Float64Array::from(vec![*v])),
                Param::Text(v) => Arc::new(StringArray::from(vec![v.as_str()])),
                Param::Bool(v) => Arc::new(BooleanArray::from(vec![*v])),
                Param::Date(v) => Arc::new(Date32Array::from(vec![*v])),
                Param::Null => Arc::new(NullArray::new(1)),
            };
            (
                Field::new(format!("${}", i + 1), column.data_type().clone(), true),
                column,
            )
        })
        .unzip();
    let schema = Arc::new(Schema::new(fields));
    let batch = if columns.is_empty() {
        RecordBatch::new_empty(Arc::clone(&schema))
    } else {
        match RecordBatch::try_new(Arc::clone(&schema), columns) {
            Ok(b) => b,
            Err(_) => return vec![],
        }
    };
    arrow_flight::utils::batches_to_flight_data(&schema, vec![batch]).unwrap_or_default()
}
