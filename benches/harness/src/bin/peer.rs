//! The peer: a plain DataFusion Flight SQL server (`datafusion-flight-sql-server`), no
//! policy, no authentication, serving the TPC-H tables from Parquet.

use std::path::PathBuf;

use airlock_bench_harness::{Source, register_tpch};
use clap::Parser;
use datafusion::prelude::SessionContext;
use datafusion_flight_sql_server::service::FlightSqlService;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ctx = SessionContext::new();
    register_tpch(&ctx, &args.data, Source::Parquet).await?;
    let listener = std::net::TcpListener::bind(&args.listen)?;
    listener.set_nonblocking(true)?;
    println!("listening on {}", listener.local_addr()?);
    FlightSqlService::new(ctx.state())
        .serve_with_listener(listener)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
