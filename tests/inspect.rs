//! `legion inspect` end to end: JSON snapshots of every generated model, the text table,
//! and one test per bad-input case (exit code 2, one line naming the file).

mod common;

use common::legion;
use std::path::{Path, PathBuf};

fn inspect_json(model: &Path) -> serde_json::Value {
    let out = legion(&["inspect", model.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn json_snapshots_of_every_generated_model() {
    for spec in legion_models::catalog() {
        let path = legion_models::test_model(spec.name).unwrap();
        let json = inspect_json(&path);
        insta::assert_json_snapshot!(format!("inspect_{}", spec.name), json);
    }
}

#[test]
fn table_of_tiny_residual() {
    let path = legion_models::test_model("tiny-residual").unwrap();
    let out = legion(&["inspect", path.to_str().unwrap()]);
    assert!(out.status.success());
    insta::assert_snapshot!(String::from_utf8(out.stdout).unwrap());
}

#[test]
fn input_shape_overrides_the_declared_one() {
    let path = legion_models::test_model("tiny-cnn").unwrap();
    let out = legion(&[
        "inspect",
        path.to_str().unwrap(),
        "--json",
        "--input-shape",
        "1,3,64,32",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["input"]["shape"], serde_json::json!([1, 3, 64, 32]));
    assert_eq!(
        json["stages"][0]["output"]["shape"],
        serde_json::json!([1, 8, 64, 32])
    );
}

/// Runs inspect on `path`, expects exit code 2 and a single stderr line containing `needles`.
fn expect_bad_input(path: &Path, extra: &[&str], needles: &[&str]) {
    let mut args = vec!["inspect", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = legion(&args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    assert!(
        stderr.contains(path.to_str().unwrap()),
        "names the file: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "expected '{n}' in: {stderr}");
    }
}

fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("inspect-errors");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn missing_file() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-such-model.onnx");
    expect_bad_input(&path, &[], &["cannot read", "check the path"]);
}

#[test]
fn not_onnx() {
    let path = scratch("notes.onnx", b"these are my notes, not a model\n");
    expect_bad_input(&path, &[], &["not an ONNX model"]);
}

#[test]
fn truncated_file() {
    let bytes = std::fs::read(legion_models::test_model("tiny-cnn").unwrap()).unwrap();
    let path = scratch("cut.onnx", &bytes[..bytes.len() / 2]);
    expect_bad_input(&path, &[], &["truncated", "export it again"]);
}

#[test]
fn dynamic_input_needs_a_shape() {
    let path = scratch("dynamic.onnx", &legion_models::dynamic_input_model());
    expect_bad_input(&path, &[], &["dynamic shape", "--input-shape"]);
    let out = legion(&[
        "inspect",
        path.to_str().unwrap(),
        "--input-shape",
        "1,3,32,32",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn non_f32_input() {
    let path = scratch("int.onnx", &legion_models::non_f32_model());
    expect_bad_input(&path, &[], &["element type", "float32"]);
}

#[test]
fn input_shape_of_the_wrong_rank() {
    let path = legion_models::test_model("tiny-cnn").unwrap();
    expect_bad_input(
        &path,
        &["--input-shape", "1,3,32"],
        &["--input-shape 1,3,32", "4 dims"],
    );
}
