//! The `airlock` command: a thin layer over the library.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use airlock::client::{ConnectArgs, Format};
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
        /// Multiplies the demo's size (patients, their visits and claims, staff): 10 is a
        /// million patients, for soak and load runs.
        #[arg(long, env = "AIRLOCK_DEMO_SCALE", default_value_t = 1.0, value_parser = positive_scale)]
        scale: f64,
        /// Serve the owner console (web pages) at this address (port 0 picks a free port;
        /// `off` disables it).
        #[arg(
            long,
            env = "AIRLOCK_CONSOLE_LISTEN",
            value_name = "ADDR",
            default_value = "127.0.0.1:8080"
        )]
        console_listen: airlock::config::ConsoleListen,
        #[command(flatten)]
        tls: airlock::config::TlsArgs,
        #[command(flatten)]
        limits: airlock::config::LimitArgs,
        #[command(flatten)]
        telemetry: airlock::config::TelemetryArgs,
        #[command(flatten)]
        cluster: airlock::config::ClusterArgs,
        #[command(flatten)]
        state: airlock::config::StateArgs,
    },
    /// Serve stages of queries for the front ends of a cluster. A worker holds no policy
    /// and no dataset list (plans name their files, which it must be able to read at the
    /// same paths); it answers only callers that prove the cluster secret.
    Worker {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, env = "AIRLOCK_WORKER_LISTEN", default_value = "127.0.0.1:50061")]
        listen: SocketAddr,
        /// File with the cluster's shared secret (the front ends' --cluster-secret-file).
        #[arg(long, env = "AIRLOCK_CLUSTER_SECRET_FILE", value_name = "FILE")]
        cluster_secret_file: PathBuf,
        /// Memory the stages running on this worker may hold together (e.g. 4GiB); a stage
        /// over it fails (nothing spills to disk).
        #[arg(
            long,
            env = "AIRLOCK_WORKER_MEMORY",
            value_name = "BYTES",
            default_value = "4GiB"
        )]
        memory: bytesize::ByteSize,
        #[command(flatten)]
        tls: airlock::config::ClusterTlsArgs,
    },
    /// Validate configuration, users, datasets and policies without serving.
    Check(ConfigArgs),
    /// The data owner's approval workflow: list, show, approve and deny requests.
    Approvals {
        #[command(flatten)]
        connect: ConnectArgs,
        #[command(subcommand)]
        command: ApprovalsCommand,
    },
    /// The data owner's privacy budgets (DP tables): list charges, show what is left,
    /// grant more.
    Budget {
        #[command(flatten)]
        connect: ConnectArgs,
        #[command(subcommand)]
        command: BudgetCommand,
    },
    /// The audit trail: verify its hash chain, or read its last records.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// User administration.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Run one SQL query against a server and print the result (or, with --explain, how
    /// the privacy policy treats it).
    Sql {
        #[command(flatten)]
        connect: ConnectArgs,
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
enum BudgetCommand {
    /// Every principal and dataset with charges or grants: charges, ε and δ spent.
    List,
    /// What is left of one principal's budget on a dataset.
    Show {
        principal: String,
        dataset: String,
        /// The principal's roles (budgets may be given per role).
        #[arg(long = "role")]
        roles: Vec<String>,
    },
    /// Add ε (and δ) to a principal's budget on a dataset.
    Grant {
        principal: String,
        dataset: String,
        #[arg(long)]
        epsilon: f64,
        #[arg(long, default_value_t = 0.0)]
        delta: f64,
    },
}

#[derive(Debug, Subcommand)]
enum ApprovalsCommand {
    /// List the requests you may decide (pending ones unless --all).
    List {
        /// Include decided requests.
        #[arg(long)]
        all: bool,
    },
    /// Show one request: who, when, the SQL, the rewritten plan, why, and how many rows
    /// approving it would release.
    Show { id: String },
    /// Approve a request.
    Approve {
        id: String,
        /// Release at most this many rows.
        #[arg(long)]
        max_rows: Option<u64>,
        /// How long the approval holds (e.g. 24h, 30m).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        expires: std::time::Duration,
        /// Let the analyst run the query more than once while the approval holds.
        #[arg(long)]
        reusable: bool,
    },
    /// Deny a request, with a reason the analyst will see.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain; exits non-zero naming the first bad record.
    Verify {
        /// The server's state directory.
        #[arg(long, env = "AIRLOCK_STATE_DIR", default_value = "state")]
        state_dir: PathBuf,
        #[command(flatten)]
        state: airlock::config::StateArgs,
    },
    /// Print the last records (JSON lines).
    Tail {
        /// The server's state directory.
        #[arg(long, env = "AIRLOCK_STATE_DIR", default_value = "state")]
        state_dir: PathBuf,
        #[command(flatten)]
        state: airlock::config::StateArgs,
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Print an argon2id hash of a password read from standard input.
    Hash,
}

static LOG: std::sync::OnceLock<(String, bool)> = std::sync::OnceLock::new();

fn log_filter() -> String {
    LOG.get()
        .map(|l| l.0.clone())
        .unwrap_or_else(|| "info".into())
}

fn log_json() -> bool {
    LOG.get().is_some_and(|l| l.1)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = LOG.set((cli.log.clone(), cli.log_json));
    // Serving may export spans: it installs its own subscriber once the config is known.
    let serving = matches!(cli.command, Command::Serve(_) | Command::Demo { .. });
    if !serving {
        airlock::telemetry::init(&cli.log, cli.log_json);
    }
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

fn positive_scale(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1000.0 => Ok(v),
        _ => Err(format!("{s:?} is not a scale between 0 and 1000")),
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
            scale,
            tls,
            limits,
            console_listen,
            telemetry,
            cluster,
            state,
        } => {
            let state_dir = state_dir.unwrap_or_else(airlock::demo::default_state_dir);
            let sizes = airlock::demo::Sizes {
                patients,
                ..Default::default()
            }
            .scaled(scale);
            let patients = sizes.patients;
            let mut config = airlock::demo::prepare(&state_dir, listen, sizes)
                .context("writing the demo's files")?;
            limits.apply(&mut config.limits);
            tls.apply(&mut config.tls).map_err(anyhow::Error::msg)?;
            config.metrics_listen = telemetry.metrics_listen;
            config.otlp_endpoint = telemetry.otlp_endpoint;
            config.console_listen = console_listen.0;
            config.cluster = cluster.resolve(None).map_err(anyhow::Error::msg)?;
            config.state = state
                .resolve(Default::default())
                .map_err(anyhow::Error::msg)?;
            println!(
                "Airlock demo: a synthetic hospital ({patients} patients) in {}",
                state_dir.display()
            );
            println!(
                "  users: analyst / analyst (aggregates of patients and visits), owner / owner (everything)"
            );
            if let Some(a) = config.console_listen {
                println!("  console: sign in at http://{a}/ (port 0: see the line below)");
            }
            serve(config).await?;
        }
        Command::Worker {
            listen,
            cluster_secret_file,
            memory,
            tls,
        } => {
            let secret = airlock::cluster::auth::ClusterSecret::load(&cluster_secret_file)
                .map_err(anyhow::Error::msg)?;
            let tls = tls
                .resolve([None, None, None])
                .and_then(|f| {
                    f.as_ref()
                        .map(airlock::cluster::tls::ClusterTls::load)
                        .transpose()
                })
                .map_err(anyhow::Error::msg)?;
            // Without TLS, rows a stage produces cross the network in clear.
            if tls.is_none() && !listen.ip().is_loopback() {
                anyhow::bail!(
                    "a worker listening beyond this machine ({listen}) needs cluster TLS (--cluster-tls-cert, --cluster-tls-key, --cluster-tls-ca)"
                );
            }
            let worker = airlock::cluster::worker::start(
                listen,
                std::sync::Arc::new(secret),
                usize::try_from(memory.as_u64()).unwrap_or(usize::MAX),
                tls,
            )
            .await?;
            // The first stdout line names the address (tests read it with port 0).
            println!("airlock worker listening on {}", worker.addr);
            tokio::select! {
                r = worker.wait() => r?,
                _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
            }
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
        Command::Audit {
            command: AuditCommand::Verify { state_dir, state },
        } => {
            let state = state
                .resolve(Default::default())
                .map_err(anyhow::Error::msg)?;
            let key_file = state.key_file(&state_dir);
            let (place, verified) = match &state.url {
                None => (
                    airlock::audit::path_in(&state_dir).display().to_string(),
                    airlock::audit::verify_with_key(&state_dir, &key_file),
                ),
                Some(url) => {
                    let key = airlock::audit::load_key_at(&key_file, false)?;
                    let reader = airlock::state::postgres::PgState::reader(
                        url,
                        state.ca_file.as_deref(),
                        key,
                        Some(&state_dir),
                    )?;
                    let place = match reader.anchor() {
                        Some(seq) => format!(
                            "the PostgreSQL state (and the anchor in {}, record {seq})",
                            state_dir.display()
                        ),
                        None => format!(
                            "the PostgreSQL state (no front-end anchor in {}: pass a front end's --state-dir to check that none of its records was cut off the end)",
                            state_dir.display()
                        ),
                    };
                    (place, reader.verify().await)
                }
            };
            match verified {
                Ok((n, _)) => println!("{place}: {n} records, chain intact and anchored"),
                Err(e) => {
                    eprintln!("{place}: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Command::Audit {
            command:
                AuditCommand::Tail {
                    state_dir,
                    state,
                    lines,
                },
        } => {
            let state = state
                .resolve(Default::default())
                .map_err(anyhow::Error::msg)?;
            let lines = match &state.url {
                None => airlock::audit::tail(&airlock::audit::path_in(&state_dir), lines)?,
                Some(url) => {
                    let key = airlock::audit::load_key_at(&state.key_file(&state_dir), false)?;
                    airlock::state::postgres::PgState::reader(
                        url,
                        state.ca_file.as_deref(),
                        key,
                        None,
                    )?
                    .tail(lines)
                    .await?
                }
            };
            for line in lines {
                println!("{line}");
            }
        }
        Command::Budget { connect, command } => {
            let result = budget(&connect, command).await;
            if let Err(e) = result {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(if e.reason_code().is_some() {
                    3
                } else {
                    1
                }));
            }
        }
        Command::Approvals { connect, command } => {
            let result = approvals(&connect, command).await;
            if let Err(e) = result {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(if e.reason_code().is_some() {
                    3
                } else {
                    1
                }));
            }
        }
        Command::Sql {
            connect,
            format,
            explain,
            sql,
        } => {
            let result = async {
                let mut client = connect.connect().await?;
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

async fn budget(
    connect: &ConnectArgs,
    command: BudgetCommand,
) -> Result<(), airlock::client::Error> {
    use airlock::flight::budget as b;
    use serde_json::json;
    let mut client = connect.connect().await?;
    let answer = match command {
        BudgetCommand::List => client.json_action(b::LIST, json!({})).await?,
        BudgetCommand::Show {
            principal,
            dataset,
            roles,
        } => {
            client
                .json_action(b::SHOW, json!({ "principal": principal, "dataset": dataset, "roles": roles }))
                .await?
        }
        BudgetCommand::Grant {
            principal,
            dataset,
            epsilon,
            delta,
        } => {
            client
                .json_action(
                    b::GRANT,
                    json!({ "principal": principal, "dataset": dataset, "epsilon": epsilon, "delta": delta }),
                )
                .await?
        }
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&answer).unwrap_or_default()
    );
    Ok(())
}

async fn approvals(
    connect: &ConnectArgs,
    command: ApprovalsCommand,
) -> Result<(), airlock::client::Error> {
    use airlock::flight::approvals as a;
    use serde_json::json;
    let mut client = connect.connect().await?;
    let answer = match command {
        ApprovalsCommand::List { all } => client.json_action(a::LIST, json!({ "pending": !all })).await?,
        ApprovalsCommand::Show { id } => client.json_action(a::SHOW, json!({ "id": id })).await?,
        ApprovalsCommand::Approve {
            id,
            max_rows,
            expires,
            reusable,
        } => {
            client
                .json_action(
                    a::APPROVE,
                    json!({ "id": id, "max_rows": max_rows, "expires_in_secs": expires.as_secs(), "reusable": reusable }),
                )
                .await?
        }
        ApprovalsCommand::Deny { id, reason } => client.json_action(a::DENY, json!({ "id": id, "reason": reason })).await?,
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&answer).unwrap_or_default()
    );
    Ok(())
}

async fn serve(config: ServiceConfig) -> anyhow::Result<()> {
    // A no-op when logging was already installed.
    let _telemetry = airlock::telemetry::init_with_otlp(
        &log_filter(),
        log_json(),
        config.otlp_endpoint.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let mut running = Airlock::build(config).await?.start().await?;
    // The first stdout line after start names the address (tests read it with port 0).
    println!("airlock listening on {}", running.addr);
    if let Some(m) = running.metrics_addr {
        println!("metrics on http://{m}/metrics");
    }
    if let Some(c) = running.console_addr {
        let scheme = if running.airlock.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        println!("console listening on {scheme}://{c}/");
    }
    tokio::signal::ctrl_c().await.ok();
    tracing::info!("shutting down");
    running.shutdown();
    running.wait().await?;
    Ok(())
}
