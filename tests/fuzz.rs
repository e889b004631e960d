//! Bad input never panics: a few cases of every fuzz target of `legion-fuzz` (mutated
//! models, plans, cluster files, profiles and worker requests), from a fixed seed;
//! `cargo xtask fuzz` runs many more and writes bench/fuzz.md. One test, since the
//! targets count panics process-wide.

use legion_fuzz::{Target, fuzz};

#[test]
fn mutated_inputs_are_read_or_refused_without_a_panic() {
    for target in Target::ALL {
        let cases = 140;
        let report = fuzz(target, cases, 0x5eed).unwrap();
        assert_eq!(report.cases, cases);
        assert!(
            report.panics.is_empty(),
            "{}: {} panics: {:?}",
            target.name(),
            report.panics.len(),
            report.panics
        );
    }
}
