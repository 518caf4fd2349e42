//! Shared setup of the fuzz targets: the demo hospital, small, on this process's runtime.

pub mod flight;
pub mod sql;

use std::sync::{Arc, OnceLock};

use airlock::auth::Principal;
use airlock::server::{Airlock, Running, WORKER_STACK};
use airlock::session::PrincipalSession;

/// The demo's data at a small scale (planning and execution stay quick per input).
const SIZES: airlock::demo::Sizes = airlock::demo::Sizes {
    patients: 2_000,
    staff: 40,
};

/// A runtime whose threads have the server's stack size: planning runs there, as in the
/// server, so a deep expression is judged by the same limits.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_stack_size(WORKER_STACK)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn config() -> airlock::config::ServiceConfig {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    airlock::demo::prepare(dir.path(), "127.0.0.1:0".parse().unwrap(), SIZES).expect("demo files")
}

/// The demo analyst's session, planned against the demo's policy.
pub fn analyst_session() -> Arc<PrincipalSession> {
    static SESSION: OnceLock<Arc<PrincipalSession>> = OnceLock::new();
    SESSION
        .get_or_init(|| {
            let airlock = runtime()
                .block_on(Airlock::build(config()))
                .expect("demo builds");
            let principal = Arc::new(Principal {
                name: "analyst".into(),
                roles: vec!["analyst".into()],
            });
            let session = airlock.sessions.session_for(&principal);
            SESSIONS.set(Arc::clone(&airlock.sessions)).ok();
            session
        })
        .clone()
}

static SESSIONS: OnceLock<Arc<airlock::session::Sessions>> = OnceLock::new();

/// The sessions behind [`analyst_session`] (for execution).
pub fn sessions() -> Arc<airlock::session::Sessions> {
    analyst_session();
    Arc::clone(SESSIONS.get().expect("set with the session"))
}

/// The demo served on a loopback port, for the Flight target.
pub fn server() -> &'static Running {
    static SERVER: OnceLock<Running> = OnceLock::new();
    SERVER.get_or_init(|| {
        runtime().block_on(async {
            Airlock::build(config())
                .await
                .expect("demo builds")
                .start()
                .await
                .expect("server starts")
        })
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arbitrary::{Arbitrary, Unstructured};
    use futures::StreamExt;

    use crate::sql::Statement;

    /// The committed seeds decode (as libFuzzer hands them to the target) to the free
    /// text variant carrying their SQL: four bytes choose it, the rest is the text.
    #[test]
    fn seeds_decode_to_their_sql() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/sql_analyzer");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            // The hand-written seeds; libFuzzer's minimized inputs (named by their hash)
            // are any statement of the grammar.
            if !path.file_name().unwrap().to_string_lossy().starts_with("seed-") {
                continue;
            }
            let bytes = std::fs::read(path).unwrap();
            let s = Statement::arbitrary_take_rest(Unstructured::new(&bytes)).unwrap();
            assert_eq!(s.to_sql().as_bytes(), &bytes[4..]);
            n += 1;
        }
        assert!(n > 50, "{n} seeds");
    }

    /// The sql_analyzer target's body on pseudo-random inputs (without libFuzzer): no
    /// panic, every released plan passes the verifier, and most statements get past
    /// the SQL planner to the privacy rules (the grammar's purpose).
    #[test]
    fn generated_statements_reach_the_privacy_rules() {
        let session = crate::analyst_session();
        let sessions = crate::sessions();
        let mut seed = 7u64;
        let (mut released, mut refused, mut other) = (0, 0, 0);
        for _ in 0..300 {
            let bytes: Vec<u8> = (0..256)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 33) as u8
                })
                .collect();
            let Ok(statement) = Statement::arbitrary(&mut Unstructured::new(&bytes)) else {
                continue;
            };
            let sql = statement.to_sql();
            let (session, sessions) = (Arc::clone(&session), Arc::clone(&sessions));
            let rt = crate::runtime();
            let outcome = rt
                .block_on(rt.spawn(async move {
                    match airlock::query::plan(Arc::clone(&session), &sql, None).await {
                        Ok(planned) => {
                            airlock::rewrite::verify::verify(&planned.plan, &session.privacy)
                                .unwrap_or_else(|r| panic!("verifier: {r}\n{sql}"));
                            if let Ok(mut s) = airlock::query::execute(&planned, &sessions).await {
                                while let Some(Ok(_)) = s.next().await {}
                            }
                            0
                        }
                        Err(airlock::error::Error::Refused(_)) => 1,
                        Err(e) => {
                            if std::env::var("SHOW").is_ok() {
                                eprintln!("{e}\n  {sql}");
                            }
                            2
                        }
                    }
                }))
                .unwrap();
            match outcome {
                0 => released += 1,
                1 => refused += 1,
                _ => other += 1,
            }
        }
        eprintln!("released {released}, refused by policy {refused}, other errors {other}");
        // Half the inputs are free text and some name hospital.staff (which the analyst
        // may not see): those end in the parser or the catalog. The fixed seed makes
        // 77 of 300 reach the privacy rules today.
        assert!(
            released + refused >= 50,
            "{released} released, {refused} refused, {other} other"
        );
    }
}
