//! `legion predict` on a committed profile of tiny-cnn measured on the emulated 2F+2O
//! cluster: snapshots of the tables, and the bad-input errors.

mod common;

use common::{fails_with, legion};
use std::process::Output;

const PROFILE: &str = "testdata/profiles/tiny-cnn-2f2o.json";
const CLUSTER: &str = "testdata/clusters/2f2o.toml";

fn predict(model: &str, extra: &[&str]) -> Output {
    let model = legion_models::test_model(model).unwrap();
    let mut args = vec!["predict", model.to_str().unwrap(), "--cluster", CLUSTER];
    args.extend(["--profile", PROFILE]);
    args.extend(extra);
    legion(&args)
}

fn stdout(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The model path differs between machines; the table does not.
    let text = String::from_utf8(out.stdout).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let (_, tail) = first.split_once(" on ").unwrap();
    format!("tiny-cnn.onnx on {tail}\n{rest}")
}

#[test]
fn every_group_with_the_legion_predictor() {
    insta::assert_snapshot!(stdout(predict("tiny-cnn", &["--verbose"])));
}

#[test]
fn one_group_with_each_other_predictor() {
    for p in ["affine", "aofl"] {
        let out = predict(
            "tiny-cnn",
            &["--predictor", p, "--group", "0..3", "--verbose"],
        );
        insta::assert_snapshot!(format!("predict_{p}"), stdout(out));
    }
}

#[test]
fn bad_input_is_named() {
    fails_with(
        predict("tiny-cnn", &["--predictor", "oracle"]),
        "unknown predictor \"oracle\"; valid: legion, affine, aofl",
    );
    fails_with(predict("tiny-residual", &[]), "not of this model");
    let model = legion_models::test_model("tiny-cnn").unwrap();
    let model = model.to_str().unwrap();
    fails_with(
        legion(&[
            "predict",
            model,
            "--cluster",
            "testdata/clusters/1f1o.toml",
            "--profile",
            PROFILE,
        ]),
        "profile this cluster",
    );
    fails_with(
        legion(&[
            "predict",
            model,
            "--cluster",
            CLUSTER,
            "--profile",
            "nope.json",
        ]),
        "nope.json: cannot read the profile",
    );
}

/// Barrier stages are predicted whole on the device predicted fastest for each, as the
/// compiler's one-device option runs them.
#[test]
fn barriers_run_on_the_device_predicted_fastest() {
    let model = legion_models::test_model("vgg16").unwrap();
    let profile_path = "testdata/profiles/vgg16-3f3o.json";
    let out = legion(&[
        "predict",
        model.to_str().unwrap(),
        "--cluster",
        "testdata/clusters/3f3o.toml",
        "--profile",
        profile_path,
    ]);
    let text = common::ok(out);
    let (_, barriers) = text.split_once("barrier stages").unwrap();
    let ir = legion_ir::import(&model, None).unwrap();
    let profile = legion_plan::Profile::from_json(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(profile_path),
        )
        .unwrap(),
    )
    .unwrap();
    let cost =
        legion_cost::CostModel::new(&ir, &profile, legion_plan::Transport::Programs).unwrap();
    let lines: Vec<&str> = barriers.lines().skip(1).collect();
    let want: Vec<legion_ir::StageId> = ir
        .stages
        .iter()
        .filter(|s| !s.is_splittable())
        .map(|s| s.id)
        .collect();
    assert_eq!(lines.len(), want.len(), "{barriers}");
    for (line, s) in lines.iter().zip(want) {
        let group = legion_partition::Group { first: s, last: s };
        let best = (0..profile.devices.len())
            .map(legion_plan::DeviceId)
            .map(|d| cost.predict_one(group, d))
            .min_by(|a, b| a.total_us.total_cmp(&b.total_us))
            .unwrap();
        let name = &profile.devices[best.device.index()].name;
        assert!(line.starts_with(&format!("{s} ")), "{line}");
        assert!(
            line.ends_with(&format!(" on {name}")),
            "{line}: want {name}"
        );
        assert!(
            line.contains(&format!("{:.3}", best.total_us / 1e3)),
            "{line}"
        );
    }
}

/// `--channels` predicts VGG-16's fc6 (after the flatten every board runs) split by
/// neurons over the 4 Fireflies its committed profile measured: the boards' channels
/// cut all 4096 in order; a stage the profile did not measure by channels is named.
#[test]
fn fc6_split_by_neurons() {
    let model = legion_models::test_model("vgg16").unwrap();
    let args = |group: &str| {
        let mut a = vec!["predict", model.to_str().unwrap()];
        a.extend(["--cluster", "testdata/clusters/firefly-x4.toml"]);
        a.extend(["--profile", "testdata/profiles/vgg16-firefly-x4.json"]);
        a.extend(["--channels", "--group", group, "--verbose"]);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |group: &str| {
        let a = args(group);
        legion(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run("18..19");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let cuts: Vec<(usize, usize)> = text
        .lines()
        .filter_map(|l| l.split_once(" channels ")?.1.split_whitespace().next())
        .map(|c| {
            let (a, b) = c.split_once("..").unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(cuts.len(), 4, "{text}");
    assert_eq!(cuts[0].0, 0);
    assert_eq!(cuts[3].1, 4096);
    assert!(cuts.windows(2).all(|w| w[0].1 == w[1].0), "{text}");
    fails_with(run("0..0"), "stage 0 was not measured by channels");
}
