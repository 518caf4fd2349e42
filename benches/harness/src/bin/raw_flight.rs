//! The transport's limit: a bare `arrow-flight` server whose DoGet streams batches held
//! in memory (the rows of one Parquet file, read once at start, as Utf8 like Airlock's
//! output), whatever the ticket. Nothing is planned, checked or filtered. GetFlightInfo
//! answers any Flight SQL statement (whatever its text) with one endpoint on this server,
//! so a Flight SQL client (the ADBC driver) downloads from it exactly as from Airlock;
//! other Flight SQL commands (SqlInfo, catalogs) are unimplemented.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::{Any, CommandStatementQuery};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use clap::Parser;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::{Stream, StreamExt, TryStreamExt, stream};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

#[derive(Parser)]
struct Args {
    /// The Parquet file whose rows DoGet streams.
    #[arg(long)]
    file: PathBuf,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
}

struct Raw {
    schema: SchemaRef,
    batches: Arc<Vec<RecordBatch>>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("raw DoGet server: only DoGet"))
}

#[tonic::async_trait]
impl FlightService for Raw {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;
    type DoExchangeStream = BoxStream<FlightData>;

    async fn do_get(&self, _: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let batches = Arc::clone(&self.batches);
        let source = stream::iter((0..batches.len()).map(move |i| Ok(batches[i].clone())));
        let flight = FlightDataEncoderBuilder::new()
            .with_schema(Arc::clone(&self.schema))
            .build(source)
            .map_err(|e| Status::internal(e.to_string()));
        Ok(Response::new(flight.boxed()))
    }

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        unimplemented()
    }
    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        unimplemented()
    }
    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let any = Any::decode(request.get_ref().cmd.as_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !any.is::<CommandStatementQuery>() {
            return unimplemented();
        }
        let info = FlightInfo::new()
            .try_with_schema(&self.schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_descriptor(request.into_inner())
            .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new("all")))
            .with_total_records(self.batches.iter().map(|b| b.num_rows() as i64).sum());
        Ok(Response::new(info))
    }
    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        unimplemented()
    }
    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        unimplemented()
    }
    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        unimplemented()
    }
    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        unimplemented()
    }
    async fn do_action(
        &self,
        _: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        unimplemented()
    }
    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        unimplemented()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ctx = SessionContext::new();
    let df = ctx
        .read_parquet(
            args.file.to_string_lossy().as_ref(),
            ParquetReadOptions::default(),
        )
        .await?;
    // Utf8, not Utf8View: what Airlock sends, so both move the same bytes.
    let schema = Arc::new(Schema::new(
        df.schema()
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Utf8View => f.as_ref().clone().with_data_type(DataType::Utf8),
                _ => f.as_ref().clone(),
            })
            .collect::<Vec<_>>(),
    ));
    let batches = df
        .collect()
        .await?
        .into_iter()
        .map(|b| {
            let columns = b
                .columns()
                .iter()
                .zip(schema.fields())
                .map(|(c, f)| cast(c, f.data_type()))
                .collect::<Result<Vec<_>, _>>()?;
            RecordBatch::try_new(Arc::clone(&schema), columns)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("listening on {} ({rows} rows)", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(FlightServiceServer::new(Raw {
            schema,
            batches: Arc::new(batches),
        }))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
