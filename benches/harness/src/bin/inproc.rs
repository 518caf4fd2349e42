//! The limit: TPC-H queries in-process in DataFusion, no policy, no transport.
//!
//! Given `--queries`, runs each `--warmup + --runs` times and prints
//! `{"q1": [seconds, ...], ...}` (warm-up runs excluded). Without them it serves
//! `benches/run.py`, which interleaves every system's runs: it prints `ready`, then for
//! each query file path read from standard input runs it once and prints
//! `<seconds> <rows>`.

use std::io::BufRead;
use std::path::{Path, PathBuf};
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
    #[arg(long, num_args = 1..)]
    queries: Vec<PathBuf>,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, value_enum, default_value = "parquet")]
    source: Source,
}

/// Runs one query file to completion: (seconds, rows).
async fn run(ctx: &SessionContext, file: &Path) -> anyhow::Result<(f64, usize)> {
    let sql = std::fs::read_to_string(file)?;
    let started = Instant::now();
    let batches = ctx.sql(&sql).await?.collect().await?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok((elapsed, batches.iter().map(|b| b.num_rows()).sum()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // DataFusion's defaults, unless DATAFUSION_* variables say otherwise.
    let ctx = SessionContext::new_with_config(SessionConfig::from_env()?);
    register_tpch(&ctx, &args.data, args.source).await?;
    if args.queries.is_empty() {
        println!("ready");
        for line in std::io::stdin().lock().lines() {
            let (seconds, rows) = run(&ctx, Path::new(line?.trim())).await?;
            println!("{seconds} {rows}");
        }
        return Ok(());
    }
    let mut out = serde_json::Map::new();
    for file in &args.queries {
        let name = file.file_stem().unwrap().to_string_lossy().to_string();
        let mut times = Vec::new();
        for i in 0..args.warmup + args.runs {
            let (seconds, _) = run(&ctx, file).await?;
            if i >= args.warmup {
                times.push(seconds);
            }
        }
        out.insert(name, times.into());
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
