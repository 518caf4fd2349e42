//! Airlock: a privacy-enforcing Arrow Flight SQL service over DataFusion.
//!
//! Analysts send SQL; the server plans it for them and releases only what the data
//! owner's policy allows. A request travels the modules in this order:
//!
//! ```text
//! flight::request_id   a request id and a span for every RPC
//! auth                 credentials → Principal (Basic → bearer token, client certificates)
//! quota                per-principal queries per minute, at once, rows and bytes per day
//! session              Principal → locked-down SessionState over their catalog view
//! query::parse         only SELECT / WITH / VALUES (EXPLAIN for admins) get through
//! query (plan)         SQL → logical plan → rewrite (policy analyzer rules) → optimized plan
//! query::execute       batches streamed under the time, memory and concurrency limits
//! flight               the Flight SQL surface; no policy logic lives there
//! error                the one mapping from errors to gRPC statuses
//! ```
//!
//! Around them: `config` (flags and files → `ServiceConfig`), `catalog` (datasets →
//! DataFusion tables), `policy` (casbin + tables.toml, hot-swappable snapshots),
//! `server` (wiring and serving), `console` (the owners' and analysts' web pages),
//! `demo` (the synthetic hospital), `client` (the `airlock sql` client) and `telemetry`.

pub mod approval;
pub mod audit;
pub mod auth;
pub mod catalog;
pub mod client;
pub mod cluster;
pub mod config;
pub mod console;
pub mod demo;
pub mod dp;
pub mod error;
pub mod flight;
pub mod ingest;
pub mod policy;
pub mod query;
pub mod quota;
pub mod rewrite;
pub mod server;
pub mod session;
pub mod state;
pub mod telemetry;

pub use error::{Error, Result};
