//! Timing printout for schema compilation and validation throughput (no timed assertions).
//!
//! `cargo test -p fhirmesh-fhir --all-features --test validate_timing -- --ignored --nocapture`

#![cfg(feature = "examples")]

use std::time::Instant;

use fhirmesh_fhir::examples::spec_examples;
use fhirmesh_fhir::validate::{validate_resource, warm_up};

#[test]
#[ignore = "timing printout; run explicitly"]
fn print_schema_compile_time_and_validation_rate() {
    let started = Instant::now();
    warm_up();
    let compile = started.elapsed();
    let examples: Vec<_> = spec_examples().collect();
    let bytes: usize = examples.iter().map(|e| e.to_string().len()).sum();
    let rounds = 5;
    let started = Instant::now();
    let mut issues = 0;
    for _ in 0..rounds {
        issues += examples.iter().map(|e| validate_resource(e).len()).sum::<usize>();
    }
    let elapsed = started.elapsed();
    let validations = (examples.len() * rounds) as f64;
    println!("schema compile (incl. parse): {compile:?}");
    println!(
        "validated {} resources ({:.1} MB) x{rounds} in {elapsed:?}: {:.0} validations/s, {:.1} MB/s ({issues} issues)",
        examples.len(),
        bytes as f64 / 1e6,
        validations / elapsed.as_secs_f64(),
        (bytes * rounds) as f64 / 1e6 / elapsed.as_secs_f64()
    );
}
