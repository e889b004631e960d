//! Writing models to disk: the stamped cache for tests, plain files for
//! `testdata/`, and where both live.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

use crate::{GENERATOR_VERSION, bytes, spec};

/// Writes `contents` to a fresh temporary file next to `path`, then renames
/// it over `path`, so a concurrent reader sees the old file or the new one.
fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .context("file name")?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{file}.tmp.{}.{n}", std::process::id()));
    let written = fs::write(&tmp, contents).and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing {} (through {})", path.display(), tmp.display()))
}

fn stamp_text(len: u64) -> String {
    format!("generator_version {GENERATOR_VERSION}\nbytes {len}\n")
}

fn is_fresh(model: &Path, stamp: &Path) -> bool {
    match (fs::read_to_string(stamp), fs::metadata(model)) {
        (Ok(text), Ok(meta)) => text == stamp_text(meta.len()),
        _ => false,
    }
}

fn model_path(name: &str, dir: &Path) -> Result<PathBuf> {
    spec(name)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.join(format!("{name}.onnx")))
}

/// Writes `DIR/NAME.onnx` if it is missing or stale and returns its path.
///
/// Freshness is judged by the sidecar `DIR/NAME.onnx.stamp`, which holds
/// [`GENERATOR_VERSION`] and the model's byte length. Both files are written
/// through a temporary file and a rename, so concurrent tests are safe.
pub fn ensure(name: &str, dir: &Path) -> Result<PathBuf> {
    let path = model_path(name, dir)?;
    let stamp = dir.join(format!("{name}.onnx.stamp"));
    if !is_fresh(&path, &stamp) {
        let contents = bytes(name)?;
        write_atomic(&path, &contents)?;
        write_atomic(&stamp, stamp_text(contents.len() as u64).as_bytes())?;
    }
    Ok(path)
}

/// Regenerates `DIR/NAME.onnx` (no stamp) and returns its path and whether
/// the file changed; an identical file is left untouched.
pub fn write(name: &str, dir: &Path) -> Result<(PathBuf, bool)> {
    let path = model_path(name, dir)?;
    let contents = bytes(name)?;
    let same = fs::metadata(&path).is_ok_and(|m| m.len() == contents.len() as u64)
        && fs::read(&path).is_ok_and(|old| old == contents);
    if !same {
        write_atomic(&path, &contents)?;
    }
    Ok((path, !same))
}

/// The workspace root: the outermost ancestor of this crate whose
/// `Cargo.toml` declares `[workspace]`.
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .filter(|dir| {
            fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| t.contains("[workspace]"))
        })
        .last()
        .unwrap_or(here)
        .to_path_buf()
}

/// Where the committed tiny models live: `<workspace>/testdata/models`.
pub fn committed_dir() -> PathBuf {
    workspace_root().join("testdata").join("models")
}

/// The test-model cache: `<target>/legion-models`, where `<target>` is
/// `CARGO_TARGET_DIR` (relative to the workspace root) or `<workspace>/target`.
pub fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || workspace_root().join("target"),
        |dir| workspace_root().join(dir),
    );
    target.join("legion-models")
}

/// [`ensure`]s model `name` in [`cache_dir`] and returns its path (for tests).
pub fn test_model(name: &str) -> Result<PathBuf> {
    ensure(name, &cache_dir())
}
