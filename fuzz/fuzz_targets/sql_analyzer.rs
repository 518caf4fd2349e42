//! SQL text → parse → plan → privacy analyzer → optimizer → verifier → execution, as the
//! demo analyst. A panic anywhere is a crash; so is a plan the service would release that
//! the verifier, run again on its own, refuses.

#![no_main]

use std::sync::Arc;

use airlock_fuzz::sql::Statement;
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|statement: Statement| {
    let sql = statement.to_sql();
    let session = airlock_fuzz::analyst_session();
    let sessions = airlock_fuzz::sessions();
    let rt = airlock_fuzz::runtime();
    // Spawned, so planning runs on a worker thread with the server's stack size.
    rt.block_on(rt.spawn(async move {
        let Ok(planned) = airlock::query::plan(Arc::clone(&session), &sql, None).await else {
            return;
        };
        if let Err(refusal) = airlock::rewrite::verify::verify(&planned.plan, &session.privacy) {
            panic!("the verifier refuses a plan the service would release: {refusal}\n{sql}");
        }
        if let Ok(mut stream) = airlock::query::execute(&planned, &sessions).await {
            while let Some(Ok(_)) = stream.next().await {}
        }
    }))
    .expect("the check task ends");
});
