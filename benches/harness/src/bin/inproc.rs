//! The limit: each TPC-H query in-process in DataFusion, no policy, no transport.
//! Prints `{"q1": [seconds, ...], ...}` (warm-up runs excluded).

use std::path::PathBuf;
use std::time::Instant;

use airlock_bench_harness::{Source, register_tpch};
use clap::Parser;
use datafusion::prelude::{SessionConfig, SessionContext};

#[derive(Parser)]
struct Args {
    /// Directory holding `<table>.parquet`.
    #[arg(long)]
    data: PathBuf,
    /// Query files (`q1.sql`, ...), run in the order given.
    #[arg(long, num_args = 1.., required = true)]
    queries: Vec<PathBuf>,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, value_enum, default_value = "parquet")]
    source: Source,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // DataFusion's defaults, unless DATAFUSION_* variables say otherwise.
    let ctx = SessionContext::new_with_config(SessionConfig::from_env()?);
    register_tpch(&ctx, &args.data, args.source).await?;
    let mut out = serde_json::Map::new();
    for file in &args.queries {
        let name = file.file_stem().unwrap().to_string_lossy().to_string();
        let sql = std::fs::read_to_string(file)?;
        let mut times = Vec::new();
        for run in 0..args.warmup + args.runs {
            let started = Instant::now();
            let batches = ctx.sql(&sql).await?.collect().await?;
            let elapsed = started.elapsed().as_secs_f64();
            std::hint::black_box(batches);
            if run >= args.warmup {
                times.push(elapsed);
            }
        }
        out.insert(name, times.into());
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
