//! Prints the SQL a `sql_analyzer` input decodes to (what `cargo fuzz fmt` shows, without
//! libFuzzer): `cargo run --example sql -- artifacts/sql_analyzer/crash-...`.

use arbitrary::{Arbitrary, Unstructured};

fn main() {
    for path in std::env::args().skip(1) {
        let bytes = std::fs::read(&path).expect("readable input");
        match airlock_fuzz::sql::Statement::arbitrary_take_rest(Unstructured::new(&bytes)) {
            Ok(s) => println!("{}", s.to_sql()),
            Err(e) => eprintln!("{path}: does not decode: {e}"),
        }
    }
}
