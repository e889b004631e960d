//! The models under testdata/models are exactly what the generator makes.

use legion_models::{bytes, catalog, committed_dir};

#[test]
fn committed_models_are_fresh() {
    let dir = committed_dir();
    for spec in catalog().iter().filter(|s| s.committed) {
        let path = dir.join(format!("{}.onnx", spec.name));
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes(spec.name).unwrap(),
            "{} is missing or stale: run `cargo xtask gen-models --committed` and commit it",
            path.display()
        );
    }
}
