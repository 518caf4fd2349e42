//! The one integration test binary: every server-level test links DataFusion once.

mod approvals;
mod audit;
mod catalog;
mod cli;
mod cluster;
mod console;
mod dp;
mod entity_columns;
mod flight_sql;
mod fuzz_regressions;
mod limits;
mod mtls;
mod policy_slt;
mod property;
mod quotas;
mod reload;
mod resilience;
mod state_postgres;
mod support;
mod telemetry;
mod totality;
