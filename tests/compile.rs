//! `legion compile` and `legion plan validate` on committed profiles: plan snapshots
//! (no timing noise: the profiles are files), the plan a lopsided cluster gets, and the
//! bad-input errors.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn legion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_legion"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap()
}

fn out_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("compile");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn model(name: &str) -> String {
    legion_models::test_model(name)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

/// Compiles `model` for a committed cluster and profile; returns the plan's JSON.
fn compile(model_name: &str, cluster: &str, profile: &str, extra: &[&str]) -> String {
    let plan = out_dir().join(format!("{model_name}-{cluster}.json"));
    let m = model(model_name);
    let cluster = format!("testdata/clusters/{cluster}.toml");
    let profile = format!("testdata/profiles/{profile}.json");
    let mut args = vec!["compile", &m, "--cluster", &cluster, "--profile", &profile];
    args.extend(["-o", plan.to_str().unwrap()]);
    args.extend(extra);
    let out = legion(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("time per pass:"), "{stdout}");
    let validate = legion(&[
        "plan",
        "validate",
        plan.to_str().unwrap(),
        &m,
        "--cluster",
        &cluster,
    ]);
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );
    std::fs::read_to_string(plan).unwrap()
}

fn snapshot(model_name: &str, cluster: &str) {
    let plan = compile(model_name, cluster, &format!("{model_name}-{cluster}"), &[]);
    insta::assert_snapshot!(format!("plan_{model_name}_{cluster}"), plan);
}

#[test]
fn vgg16_on_4_fireflies() {
    snapshot("vgg16", "firefly-x4");
}

#[test]
fn vgg16_on_3f3o() {
    snapshot("vgg16", "3f3o");
}

#[test]
fn yolov2_on_4_fireflies() {
    snapshot("yolov2", "firefly-x4");
}

#[test]
fn yolov2_on_3f3o() {
    snapshot("yolov2", "3f3o");
}

#[test]
fn resnet18_on_4_fireflies() {
    snapshot("resnet18", "firefly-x4");
}

#[test]
fn resnet18_on_3f3o() {
    snapshot("resnet18", "3f3o");
}

/// A profile where firefly-0 computes 1000x faster than the others: no split can pay
/// for its transfers, so everything runs whole on firefly-0 as one group.
#[test]
fn a_far_faster_device_gets_everything() {
    let text = std::fs::read_to_string("testdata/profiles/tiny-cnn-2f2o.json").unwrap();
    let mut p: Value = serde_json::from_str(&text).unwrap();
    for stage in p["stages"].as_array_mut().unwrap() {
        for (d, samples) in stage["samples"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .enumerate()
        {
            for s in samples.as_array_mut().unwrap() {
                for key in ["median_us", "min_us"] {
                    let t = s[key].as_u64().unwrap();
                    s[key] = if d == 0 {
                        (t / 1000).into()
                    } else {
                        (t * 1000).into()
                    };
                }
            }
        }
    }
    let path = out_dir().join("lopsided-profile.json");
    std::fs::write(&path, serde_json::to_string(&p).unwrap()).unwrap();
    let plan_path = out_dir().join("lopsided-plan.json");
    let m = model("tiny-cnn");
    let out = legion(&[
        "compile",
        &m,
        "--cluster",
        "testdata/clusters/2f2o.toml",
        "--profile",
        path.to_str().unwrap(),
        "-o",
        plan_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(plan_path).unwrap()).unwrap();
    let extracted = &plan["candidates"][0];
    assert_eq!(extracted["name"], "extracted");
    let groups = extracted["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "one group: {groups:?}");
    assert_eq!(groups[0]["first"], 0);
    assert_eq!(groups[0]["last"], plan["stages"].as_u64().unwrap() - 1);
    assert_eq!(groups[0]["split"], false);
    let tiles = groups[0]["tiles"].as_array().unwrap();
    assert_eq!(tiles.len(), 1);
    assert_eq!(tiles[0]["device"], "firefly-0");
    // A single group has no Wild Card.
    assert_eq!(plan["candidates"].as_array().unwrap().len(), 1);
    assert_eq!(plan["chosen"], 0);
}

fn fails_with(out: Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(want), "{stderr}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let plan = out_dir().join("bad.json");
    let plan = plan.to_str().unwrap();
    let (tiny, residual) = (model("tiny-cnn"), model("tiny-residual"));
    let profile = "testdata/profiles/tiny-cnn-2f2o.json";
    // A profile of another model.
    fails_with(
        legion(&[
            "compile",
            &residual,
            "--cluster",
            "testdata/clusters/2f2o.toml",
            "--profile",
            profile,
            "-o",
            plan,
        ]),
        "the profile is of model",
    );
    // A cluster that does not match the profile.
    fails_with(
        legion(&[
            "compile",
            &tiny,
            "--cluster",
            "testdata/clusters/firefly-x4.toml",
            "--profile",
            profile,
            "-o",
            plan,
        ]),
        "but the profile testdata/profiles/tiny-cnn-2f2o.json was measured on",
    );
    // An empty cluster.
    let empty = out_dir().join("empty.toml");
    std::fs::write(&empty, "[coordinator]\nmbps = 1000.0\n").unwrap();
    fails_with(
        legion(&[
            "compile",
            &tiny,
            "--cluster",
            empty.to_str().unwrap(),
            "--profile",
            profile,
            "-o",
            plan,
        ]),
        "no devices",
    );
    // An unknown predictor.
    fails_with(
        legion(&[
            "compile",
            &tiny,
            "--cluster",
            "testdata/clusters/2f2o.toml",
            "--profile",
            profile,
            "--predictor",
            "oracle",
            "-o",
            plan,
        ]),
        "oracle",
    );
    // A legion profile for --mode fss.
    fails_with(
        legion(&[
            "compile",
            &tiny,
            "--cluster",
            "testdata/clusters/2f2o.toml",
            "--profile",
            profile,
            "--mode",
            "fss",
            "-o",
            plan,
        ]),
        "needs a profile from `legion profile --mode fss`",
    );
}

/// Writes the committed tiny-cnn profile with links 1000x faster (so splitting pays)
/// and returns its path.
fn fast_links_profile() -> PathBuf {
    let text = std::fs::read_to_string("testdata/profiles/tiny-cnn-2f2o.json").unwrap();
    let mut p: Value = serde_json::from_str(&text).unwrap();
    for device in p["devices"].as_array_mut().unwrap() {
        for probe in device["probes"].as_array_mut().unwrap() {
            for key in ["send_us", "recv_us"] {
                probe[key] = (probe[key].as_u64().unwrap() / 1000).into();
            }
        }
    }
    let path = out_dir().join("fast-links-profile.json");
    std::fs::write(&path, serde_json::to_string(&p).unwrap()).unwrap();
    path
}

#[test]
fn validate_rejects_a_tampered_plan() {
    let tiny = model("tiny-cnn");
    let plan_path = out_dir().join("fast-links-plan.json");
    let profile = fast_links_profile();
    let out = legion(&[
        "compile",
        &tiny,
        "--cluster",
        "testdata/clusters/2f2o.toml",
        "--profile",
        profile.to_str().unwrap(),
        "-o",
        plan_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let valid = legion(&["plan", "validate", plan_path.to_str().unwrap(), &tiny]);
    assert!(
        valid.status.success(),
        "{}",
        String::from_utf8_lossy(&valid.stderr)
    );
    let text = std::fs::read_to_string(&plan_path).unwrap();
    let mut plan: Value = serde_json::from_str(&text).unwrap();
    // Move a split group's strip boundary without changing its tiles.
    let c = plan["chosen"].as_u64().unwrap() as usize;
    let groups = plan["candidates"][c]["groups"].as_array_mut().unwrap();
    let split = groups
        .iter_mut()
        .find(|g| g["split"] == true && g["tiles"].as_array().unwrap().len() >= 2)
        .expect("with fast links, tiny-cnn on 2F+2O splits some group");
    let end = split["tiles"][0]["strip"]["end"].as_u64().unwrap();
    split["tiles"][0]["strip"]["end"] = (end + 1).into();
    split["tiles"][1]["strip"]["start"] = (end + 1).into();
    let path = out_dir().join("tampered.json");
    std::fs::write(&path, serde_json::to_string(&plan).unwrap()).unwrap();
    fails_with(
        legion(&["plan", "validate", path.to_str().unwrap(), &tiny]),
        "is not the one its strip",
    );
    // A plan for another model.
    fails_with(
        legion(&[
            "plan",
            "validate",
            path.to_str().unwrap(),
            &model("tiny-residual"),
        ]),
        "the plan is for model",
    );
}

#[test]
fn plan_show_draws_every_device_and_group() {
    let tiny = model("tiny-cnn");
    let dir = out_dir();
    let (plan, svg) = (dir.join("show-plan.json"), dir.join("show.svg"));
    let profile = fast_links_profile();
    let out = legion(&[
        "compile",
        &tiny,
        "--cluster",
        "testdata/clusters/2f2o.toml",
        "--profile",
        profile.to_str().unwrap(),
        "-o",
        plan.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = legion(&[
        "plan",
        "show",
        plan.to_str().unwrap(),
        "-o",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let chosen = &plan["candidates"][plan["chosen"].as_u64().unwrap() as usize];
    for d in ["firefly-0", "firefly-1", "odroid-0", "odroid-1"] {
        assert!(picture.contains(d), "{d} has no row");
    }
    let groups = chosen["groups"].as_array().unwrap();
    for k in 0..groups.len() {
        assert!(
            picture.contains(&format!("g{k}: ")),
            "group {k} is not drawn"
        );
    }
    // Three bars (receive, compute, send) per device and group, at least.
    let tiles: usize = groups
        .iter()
        .map(|g| g["tiles"].as_array().unwrap().len())
        .sum();
    assert!(picture.matches("<rect").count() >= 3 * tiles);
}
