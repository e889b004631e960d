//! `ensure` writes once, detects stale files, and is safe under concurrency.

use std::fs;
use std::path::PathBuf;

use legion_models::{GENERATOR_VERSION, bytes, ensure};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("legion-models-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn ensure_writes_stamp_and_regenerates_stale_files() {
    let dir = TempDir::new("ensure");
    let expected = bytes("tiny-head").unwrap();
    let path = ensure("tiny-head", &dir.0).unwrap();
    assert_eq!(path, dir.0.join("tiny-head.onnx"));
    assert_eq!(fs::read(&path).unwrap(), expected);
    let stamp = dir.0.join("tiny-head.onnx.stamp");
    let stamp_text = fs::read_to_string(&stamp).unwrap();
    assert_eq!(
        stamp_text,
        format!(
            "generator_version {GENERATOR_VERSION}\nbytes {}\n",
            expected.len()
        )
    );

    // fresh: left alone (even a same-length corruption is not re-checked)
    let mut corrupt = expected.clone();
    corrupt[0] ^= 1;
    fs::write(&path, &corrupt).unwrap();
    ensure("tiny-head", &dir.0).unwrap();
    assert_eq!(fs::read(&path).unwrap(), corrupt);

    // wrong length: regenerated
    fs::write(&path, b"truncated").unwrap();
    ensure("tiny-head", &dir.0).unwrap();
    assert_eq!(fs::read(&path).unwrap(), expected);

    // older generator: regenerated
    fs::write(&path, &corrupt).unwrap();
    fs::write(
        &stamp,
        stamp_text.replace(&GENERATOR_VERSION.to_string(), "0"),
    )
    .unwrap();
    ensure("tiny-head", &dir.0).unwrap();
    assert_eq!(fs::read(&path).unwrap(), expected);
    assert_eq!(fs::read_to_string(&stamp).unwrap(), stamp_text);

    // missing stamp: regenerated
    fs::write(&path, &corrupt).unwrap();
    fs::remove_file(&stamp).unwrap();
    ensure("tiny-head", &dir.0).unwrap();
    assert_eq!(fs::read(&path).unwrap(), expected);
}

#[test]
fn concurrent_ensures_agree() {
    let dir = TempDir::new("concurrent");
    let expected = bytes("tiny-yolo").unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let path = ensure("tiny-yolo", &dir.0).unwrap();
                assert_eq!(fs::read(path).unwrap(), expected);
            });
        }
    });
    let names: Vec<_> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "temporary files left behind: {names:?}");
}

#[test]
fn unknown_models_are_rejected_before_writing() {
    let dir = TempDir::new("unknown");
    let err = ensure("vgg17", &dir.0).unwrap_err().to_string();
    assert!(
        err.contains("valid names") && err.contains("vgg16"),
        "{err}"
    );
    assert!(!dir.0.exists());
}
