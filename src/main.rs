//! The `airlock` command: a thin layer over the library.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use airlock::client::{Client, Format};
use airlock::config::{ConfigArgs, ServiceConfig};
use airlock::server::Airlock;
use anyhow::Context;
use clap::{Parser, Subcommand};

/// Airlock: privacy-enforcing Arrow Flight SQL over DataFusion.
#[derive(Debug, Parser)]
#[command(name = "airlock", version, about)]
struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. info or airlock=debug.
    #[arg(long, env = "AIRLOCK_LOG", default_value = "info", global = true)]
    log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "AIRLOCK_LOG_JSON", global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the datasets and policies of a configuration.
    Serve(ConfigArgs),
    /// Serve a synthetic hospital with its policy and two users; no setup needed.
    Demo {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, env = "AIRLOCK_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Directory for the demo's data, policy and state.
        #[arg(long, env = "AIRLOCK_STATE_DIR", value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Number of patients to generate.
        #[arg(long, env = "AIRLOCK_DEMO_PATIENTS", default_value_t = 100_000)]
        patients: usize,
    },
    /// Validate configuration, users, datasets and policies without serving.
    Check(ConfigArgs),
    /// User administration.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Run one SQL query against a server and print the result (or, with --explain, how
    /// the privacy policy treats it).
    Sql {
        /// Server URL, e.g. grpc://127.0.0.1:50051 (grpc+tls:// for TLS).
        #[arg(long, env = "AIRLOCK_URL", default_value = "grpc://127.0.0.1:50051")]
        url: String,
        /// User name.
        #[arg(long, env = "AIRLOCK_USER")]
        user: String,
        /// Password (prefer the environment variable over the flag).
        #[arg(long, env = "AIRLOCK_PASSWORD", hide_env_values = true)]
        password: String,
        /// CA certificate (PEM) to trust for grpc+tls:// URLs.
        #[arg(long, env = "AIRLOCK_TLS_CA", value_name = "FILE")]
        tls_ca: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Explain how the privacy policy treats the query instead of running it.
        #[arg(long)]
        explain: bool,
        /// The query.
        sql: String,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Print an argon2id hash of a password read from standard input.
    Hash,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    airlock::telemetry::init(&cli.log, cli.log_json);
    // The server runs on a runtime of its own (see airlock::server); this one only drives
    // the command line: the client, signals, waiting.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => {
            let config = ServiceConfig::load(&args)?;
            serve(config).await?;
        }
        Command::Demo {
            listen,
            state_dir,
            patients,
        } => {
            let state_dir = state_dir.unwrap_or_else(airlock::demo::default_state_dir);
            let sizes = airlock::demo::Sizes {
                patients,
                ..Default::default()
            };
            let config = airlock::demo::prepare(&state_dir, listen, sizes)
                .context("writing the demo's files")?;
            println!(
                "Airlock demo: a synthetic hospital ({patients} patients) in {}",
                state_dir.display()
            );
            println!(
                "  users: analyst / analyst (aggregates of patients and visits), owner / owner (everything)"
            );
            serve(config).await?;
        }
        Command::Check(args) => {
            let config = ServiceConfig::load(&args)?;
            Airlock::check(config).await?;
            println!("configuration, users, datasets and policies are valid");
        }
        Command::User {
            command: UserCommand::Hash,
        } => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password")?;
            let password = password.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(!password.is_empty(), "empty password on standard input");
            println!(
                "{}",
                airlock::auth::hash_password(password).map_err(|e| anyhow::anyhow!("{e}"))?
            );
        }
        Command::Sql {
            url,
            user,
            password,
            tls_ca,
            format,
            explain,
            sql,
        } => {
            let result = async {
                let mut client = Client::connect(&url, &user, &password, tls_ca.as_deref()).await?;
                if explain {
                    print!("{}", client.explain(&sql).await?);
                    return Ok(0);
                }
                airlock::client::run_sql(&mut client, &sql, format, &mut std::io::stdout().lock())
                    .await
            }
            .await;
            if let Err(e) = result {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(if e.reason_code().is_some() {
                    3
                } else {
                    1
                }));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: ServiceConfig) -> anyhow::Result<()> {
    let mut running = Airlock::build(config).await?.start().await?;
    // The first stdout line after start names the address (tests read it with port 0).
    println!("airlock listening on {}", running.addr);
    tokio::signal::ctrl_c().await.ok();
    tracing::info!("shutting down");
    running.shutdown();
    running.wait().await?;
    Ok(())
}
