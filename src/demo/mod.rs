//! The demo: a deterministic synthetic hospital, its policy and two users, no setup.
//!
//! `airlock demo` writes Parquet files, the policy files and a users file under
//! `<state-dir>/demo/` (reusing them when they are already there) and serves them through
//! the same code path as any configuration. The data is generated from a fixed seed with
//! a realistic skew, so that some zips and diagnoses are rare: exactly the groups a
//! k-threshold must suppress. Passwords equal user names; this is for the demo only.

mod data;

use std::path::{Path, PathBuf};

use crate::auth::hash_password;
use crate::config::{DatasetConfig, DatasetFormat, Limits, ServiceConfig, TableName};

pub use data::{Sizes, write_hospital};

/// The demo's users: (name, roles). Each one's password is its name.
pub const DEMO_USERS: [(&str, &str); 2] = [("analyst", "analyst"), ("owner", "owner")];

const MODEL: &str = include_str!("../../policies/model.conf");
const POLICY: &str = include_str!("../../policies/policy.csv");
const TABLES: &str = include_str!("../../policies/tables.toml");

/// Writes (or reuses) the demo's files under `state_dir/demo` and returns a configuration
/// serving them on `listen`.
pub fn prepare(
    state_dir: &Path,
    listen: std::net::SocketAddr,
    sizes: Sizes,
) -> std::io::Result<ServiceConfig> {
    let root = state_dir.join("demo");
    let data_dir = root.join("data");
    let tables = write_hospital(&data_dir, sizes)?;

    let policy_dir = root.join("policies");
    std::fs::create_dir_all(&policy_dir)?;
    std::fs::write(policy_dir.join(crate::policy::MODEL_FILE), MODEL)?;
    std::fs::write(policy_dir.join(crate::policy::POLICY_FILE), POLICY)?;
    std::fs::write(policy_dir.join(crate::policy::TABLES_FILE), TABLES)?;

    let users_file = root.join("users.toml");
    let mut users = String::from(
        "# Demo users: each password is the user's name. Never use these outside the demo.\n",
    );
    for (name, role) in DEMO_USERS {
        let hash = hash_password(name).map_err(|e| std::io::Error::other(e.to_string()))?;
        users.push_str(&format!(
            "\n[users.{name}]\npassword_hash = \"{hash}\"\nroles = [\"{role}\"]\n"
        ));
    }
    std::fs::write(&users_file, users)?;

    let datasets = tables
        .into_iter()
        .map(|(name, path)| DatasetConfig {
            name: TableName::parse(&name).expect("demo table names are valid"),
            path,
            format: DatasetFormat::Parquet,
            has_header: true,
            delimiter: b',',
            cache: false,
            origin: None,
        })
        .collect();
    Ok(ServiceConfig {
        listen,
        tls: None,
        datasets,
        policy_dir,
        users_file,
        state_dir: state_dir.to_path_buf(),
        limits: Limits::default(),
        metrics_listen: None,
        otlp_endpoint: None,
        console_listen: None,
        cluster: None,
        state: Default::default(),
    })
}

/// The default demo state directory: one per machine user, under the temp directory.
pub fn default_state_dir() -> PathBuf {
    std::env::temp_dir().join("airlock-demo")
}
