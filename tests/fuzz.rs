//! Bad input never panics: mutated bytes of the committed models, plans, cluster files
//! and profiles go through the functions that read them, and each either reads or
//! fails with an error. Mutations flip, overwrite, insert and delete bytes and cut the
//! file short, from a fixed seed.
//!
//! `PROPTEST_CASES` raises the case count (64 per target here).

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// One edit of a file's bytes, at a position taken modulo its length.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(p, b)| Edit::Flip(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ];
    prop::collection::vec(edit, 1..8)
}

fn mutate(original: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = original.to_vec();
    for e in edits {
        if b.is_empty() {
            break;
        }
        let at = |p: usize| p % b.len();
        match *e {
            Edit::Flip(p, x) => {
                let i = at(p);
                b[i] ^= x;
            }
            Edit::Set(p, x) => {
                let i = at(p);
                b[i] = x;
            }
            Edit::Insert(p, x) => {
                let i = at(p);
                b.insert(i, x);
            }
            Edit::Delete(p) => {
                let i = at(p);
                b.remove(i);
            }
            Edit::Truncate(p) => {
                let i = at(p);
                b.truncate(i);
            }
        }
    }
    b
}

fn runner(seed: u64) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64);
    TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Runs `read` on mutations of `original`, failing on the first panic.
fn no_panics(seed: u64, what: &str, original: &[u8], read: impl Fn(&[u8])) {
    runner(seed)
        .run(&edits(), |edits| {
            let bytes = mutate(original, &edits);
            let outcome = catch_unwind(AssertUnwindSafe(|| read(&bytes)));
            prop_assert!(outcome.is_ok(), "{what}: a panic on {edits:?}");
            Ok(())
        })
        .unwrap();
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn testdata(path: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

#[test]
fn mutated_models_import_or_fail_cleanly() {
    for (seed, model) in [(0x0a, "tiny-cnn"), (0x0b, "tiny-yolo")] {
        let original = testdata(&format!("testdata/models/{model}.onnx"));
        let path = scratch(&format!("{model}.onnx"));
        no_panics(seed, model, &original, |bytes| {
            std::fs::write(&path, bytes).unwrap();
            let _ = legion_ir::import(&path, None);
        });
    }
}

#[test]
fn mutated_plans_parse_and_validate_or_fail_cleanly() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/models/tiny-cnn.onnx");
    let plan_file = scratch("tiny-cnn-plan.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_legion"))
        .arg("compile")
        .arg(&model)
        .args(["--cluster", "testdata/clusters/2f2o.toml"])
        .args(["--profile", "testdata/profiles/tiny-cnn-2f2o.json", "-o"])
        .arg(&plan_file)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = std::fs::read(&plan_file).unwrap();
    let ir = legion_ir::import(&model, None).unwrap();
    let plan = legion_plan::Plan::from_json(&String::from_utf8_lossy(&json)).unwrap();
    legion_codegen::validate(&plan, &ir, None).unwrap();
    // A plan that parses is validated against its model; one that validates is costed.
    no_panics(0x1a, "plan", &json, |bytes| {
        if let Ok(plan) = legion_plan::Plan::from_json(&String::from_utf8_lossy(bytes))
            && legion_codegen::validate(&plan, &ir, None).is_ok()
        {
            let _ = legion_codegen::traffic(&ir, plan.chosen());
        }
    });
}

#[test]
fn mutated_cluster_files_load_or_fail_cleanly() {
    let original = testdata("testdata/clusters/3f3o.toml");
    let path = scratch("cluster.toml");
    no_panics(0x2a, "cluster", &original, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let _ = legion_plan::Cluster::load(&path);
    });
}

#[test]
fn mutated_profiles_parse_or_fail_cleanly() {
    let original = testdata("testdata/profiles/tiny-cnn-2f2o.json");
    no_panics(0x3a, "profile", &original, |bytes| {
        let _ = legion_plan::Profile::from_json(&String::from_utf8_lossy(bytes));
    });
}
