//! Flight SQL messages (commands, tickets, actions, prepared-statement parameter
//! batches) sent to the demo server as the analyst, the owner or nobody. A panic in the
//! server is a crash (libFuzzer's panic hook aborts the process on any thread).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|session: airlock_fuzz::flight::Session| {
    session.run();
});
