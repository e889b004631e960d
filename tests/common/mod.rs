//! Helpers the integration tests share: running the `legion` binary, test models,
//! scratch directories, and the host rate that local emulated clusters start from.
// Each test binary compiles this module and uses some of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The host rate, GFLOP/s, that emulated workers in tests start from instead of
/// calibrating (10-30 s each under the host-wide compute lock). It scales emulated
/// times only; the tests check outputs, rows and shapes, not speeds.
pub const HOST_GFLOPS: f64 = 30.0;

/// Runs `legion` with `args` from the workspace root.
pub fn legion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_legion"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap()
}

/// The stdout of a run that must succeed (its stderr in the panic otherwise).
pub fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Asserts a run failed as bad input (exit code 2) with `want` in its error.
pub fn fails_with(out: Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(want), "{stderr}");
}

/// The path of the generated test model `name`.
pub fn model(name: &str) -> String {
    legion_models::test_model(name)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

/// A directory `name` under the tests' scratch space, created if missing.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
