//! End to end on a local emulated cluster started from the command line: compile
//! (profiling first and running the candidates), then `legion run --check`, whose
//! output must match a single device's (relative error < 1e-5), with the boards
//! running their programs and (tiny models) through the hub. And the .npy input
//! errors.

mod common;

use common::{HOST_GFLOPS, legion, ok};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Kills the cluster when the test ends, however it ends.
struct Cluster {
    child: std::process::Child,
    file: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("run")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 1 Firefly + 2 Odroids on 127.0.0.1, ports chosen by the system.
fn cluster_up(dir: &Path) -> Cluster {
    let file = dir.join("cluster.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_legion"))
        .args(["cluster", "up", "--local", "3", "--port", "0"])
        .args(["--emulate", "firefly-rk3399,odroid-xu4,odroid-xu4"])
        .args(["--host-gflops", &HOST_GFLOPS.to_string(), "--out"])
        .arg(&file)
        // Outputs are checked here, not times: no cache evictions.
        .env(legion_runtime::emulate::cache::WARM_CACHES_ENV, "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("serving; press Ctrl-C"))
        .expect("the cluster comes up");
    // Keep draining the workers' logs so they never block on a full pipe.
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    Cluster { child, file }
}

/// Compiles `model` for a fresh cluster (profiling it) and runs the plan with --check
/// by the boards' programs (with sub-strips), or without sub-strips by the programs and
/// through the hub when `hub`.
fn compile_and_run(model: &str, hub: bool) {
    let dir = dir(model);
    let cluster = cluster_up(&dir);
    let path = legion_models::test_model(model).unwrap();
    let (m, c) = (path.to_str().unwrap(), cluster.file.to_str().unwrap());
    let plan = dir.join("plan.json");
    let mut args = vec!["compile", m, "--cluster", c, "--runs", "1"];
    // The hub runs one tile per board and group: no sub-strips.
    if hub {
        args.push("--no-sub-strips");
    }
    args.extend(["-o", plan.to_str().unwrap()]);
    let compiled = ok(legion(&args));
    assert!(compiled.contains("fused-layer configuration"), "{compiled}");
    let validated = ok(legion(&[
        "plan",
        "validate",
        plan.to_str().unwrap(),
        m,
        "--cluster",
        c,
        "--run",
    ]));
    assert!(
        validated.contains("every tile matches the single-device run"),
        "{validated}"
    );
    let run = |extra: &[&str]| {
        let mut args = vec!["run", plan.to_str().unwrap(), m, "--cluster", c];
        args.extend(["--check", "--repeat", "1"]);
        args.extend(extra);
        ok(legion(&args))
    };
    // The bytes the coordinator moved per inference, as the run counted them on the
    // wire, are those `plan validate` counts in the plan.
    let after = |text: &str, key: &str| -> String {
        let at = text
            .find(key)
            .unwrap_or_else(|| panic!("no {key:?} in {text}"))
            + key.len();
        text[at..].split_whitespace().next().unwrap().to_string()
    };
    let moved = |ran: &str| after(ran, "per inference: ");
    if hub {
        let ran = run(&["--transport", "hub"]);
        assert!(ran.contains("transport hub"), "{ran}");
        assert!(ran.contains("check against"), "{ran}");
        assert_eq!(moved(&ran), after(&validated, "bytes per inference: "));
    }
    let out = dir.join("out.npy");
    let results = dir.join("run.json");
    let ran = run(&[
        "--output",
        out.to_str().unwrap(),
        "--save",
        results.to_str().unwrap(),
    ]);
    assert!(ran.contains("transport programs"), "{ran}");
    assert!(ran.contains("check against"), "{ran}");
    assert_eq!(moved(&ran), after(&validated, "under the programs "));
    assert!(ran.contains("emulated clock"), "{ran}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    assert_eq!(saved["transport"], "programs");
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let chosen = plan["chosen"].as_u64().unwrap() as usize;
    assert_eq!(
        saved["groups"].as_array().unwrap().len(),
        plan["candidates"][chosen]["groups"]
            .as_array()
            .unwrap()
            .len()
    );
    let written: tract_onnx::prelude::tract_ndarray::ArrayD<f32> =
        ndarray_npy::read_npy(&out).unwrap();
    assert!(!written.is_empty());
}

#[test]
fn tiny_models_match_one_device() {
    for model in ["tiny-cnn", "tiny-residual", "tiny-yolo"] {
        compile_and_run(model, true);
    }
}

/// Today's architectures at small sizes: C2f channel splits, SPPF and a DFL head over
/// anchors (YOLOv8), 7x7 depthwise convs with channels-last LayerNorm and MatMuls
/// (ConvNeXt), squeeze-excitation (EfficientNet), channel split and shuffle
/// (ShuffleNetV2), a Focus of strided slices (YOLOX), a conv after an H<->W transpose.
#[test]
fn todays_architectures_match_one_device() {
    for model in [
        "tiny-yolov8",
        "tiny-convnext",
        "tiny-effnet",
        "tiny-shuffle",
        "tiny-focus",
        "tiny-transposed",
    ] {
        compile_and_run(model, false);
    }
}

#[test]
fn resnet18_matches_one_device() {
    compile_and_run("resnet18", false);
}

#[test]
fn yolov2_matches_one_device() {
    compile_and_run("yolov2", false);
}

#[test]
fn a_bad_npy_input_gets_a_clear_error() {
    let dir = dir("bad-input");
    let cluster = cluster_up(&dir);
    let path = legion_models::test_model("tiny-cnn").unwrap();
    let (m, c) = (path.to_str().unwrap(), cluster.file.to_str().unwrap());
    // A plan for this cluster (compile profiles it first).
    let plan = dir.join("plan.json");
    ok(legion(&[
        "compile",
        m,
        "--cluster",
        c,
        "--no-wildcard",
        "-o",
        plan.to_str().unwrap(),
    ]));
    let wrong_shape = dir.join("wrong-shape.npy");
    ndarray_npy::write_npy(
        &wrong_shape,
        &tract_onnx::prelude::tract_ndarray::ArrayD::<f32>::zeros(vec![1, 3, 8, 8]),
    )
    .unwrap();
    let wrong_type = dir.join("wrong-type.npy");
    ndarray_npy::write_npy(
        &wrong_type,
        &tract_onnx::prelude::tract_ndarray::ArrayD::<i64>::zeros(vec![1, 3, 48, 40]),
    )
    .unwrap();
    for (file, want) in [
        (&wrong_shape, "shape [1, 3, 8, 8]"),
        (&wrong_type, "not an f32 .npy"),
    ] {
        let out = legion(&[
            "run",
            plan.to_str().unwrap(),
            m,
            "--cluster",
            c,
            "--input",
            file.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(want), "{stderr}");
        assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
    }
}
