//! Split correctness on the generated models: every device's tile, run with tract,
//! equals the single-device run (relative error < 1e-5); plus `legion split` output
//! and its argument errors.

mod common;

use common::legion;
use legion_ir::{Ir, Rows, StageKind, import};
use legion_partition::{
    Group, channel_tile, check_channel_group, product_in_parts, strips_from_weights, tile,
};
use legion_plan::TileSpec;
use legion_runtime::{Reference, check};
use tract_onnx::prelude::Tensor;

fn load(name: &str) -> Ir {
    import(&legion_models::test_model(name).unwrap(), None).unwrap()
}

fn input(ir: &Ir) -> Tensor {
    legion_runtime::check::test_input(&ir.input.shape)
}

/// Tiles `first..=last` for `weights` and checks every device against the reference.
fn assert_split_equal(ir: &Ir, reference: &Reference, first: usize, last: usize, weights: &[f64]) {
    let group = Group::new(first, last);
    let height = ir.stage(group.last).output.height().unwrap();
    let strips = strips_from_weights(height, weights);
    let tiling = tile(ir, group, &strips).unwrap();
    assert_eq!(
        tiling.tiles.len(),
        strips.iter().filter(|s| !s.is_empty()).count()
    );
    for d in &tiling.tiles {
        let diff = check::check_tile(ir, reference, &d.spec()).unwrap();
        assert!(
            diff.max_rel < 1e-5,
            "group {group} on {} devices, device {}: {diff:?}",
            weights.len(),
            d.slot
        );
    }
}

#[test]
fn vgg16_blocks_and_whole_conv_part() {
    let ir = load("vgg16-conv");
    let reference = Reference::run(&ir, input(&ir)).unwrap();
    let blocks = [(0, 2), (3, 5), (6, 9), (10, 13), (14, 17)];
    for (i, &(first, last)) in blocks.iter().enumerate() {
        assert!(
            matches!(ir.stages[last].kind, StageKind::Pool { .. }),
            "blocks end at a pool"
        );
        let devices = 2 + i; // 2..6 devices
        let weights: Vec<f64> = (0..devices).map(|d| 1.0 + (d % 3) as f64).collect();
        assert_split_equal(&ir, &reference, first, last, &weights);
    }
    assert_split_equal(&ir, &reference, 0, 17, &[3.0, 3.0, 2.0, 2.0, 2.0, 1.0]);
    assert_split_equal(&ir, &reference, 0, 17, &[1.0, 1.0]);
}

#[test]
fn resnet18_groups_inside_and_at_block_boundaries() {
    let ir = load("resnet18");
    let reference = Reference::run(&ir, input(&ir)).unwrap();
    // Stages: 1 maxpool, 2-3 convs of layer1.0, 4 its Add, 8-11 layer2.0 with downsample.
    assert!(matches!(&ir.stages[4].kind, StageKind::Join { name } if name == "Add"));
    // Ends inside a block: the skip tensor (stage 1) leaves the group too.
    assert_split_equal(&ir, &reference, 1, 3, &[1.0, 1.0, 1.0]);
    // Ends at block boundaries, with the skip branch inside the group.
    assert_split_equal(&ir, &reference, 1, 4, &[2.0, 1.0]);
    assert_split_equal(&ir, &reference, 5, 11, &[3.0, 2.0, 2.0, 1.0]);
    assert_split_equal(&ir, &reference, 0, 28, &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
}

#[test]
fn yolov2_group_spanning_reorg_and_concat() {
    let ir = load("yolov2");
    let reference = Reference::run(&ir, input(&ir)).unwrap();
    let reorg = ir
        .stages
        .iter()
        .position(|s| matches!(s.kind, StageKind::SpaceToDepth { .. }))
        .unwrap();
    let concat = ir
        .stages
        .iter()
        .position(|s| matches!(s.kind, StageKind::Concat { .. }))
        .unwrap();
    assert!(reorg < concat);
    assert_split_equal(&ir, &reference, reorg - 2, concat + 1, &[2.0, 1.0, 1.0]);
    assert_split_equal(
        &ir,
        &reference,
        11,
        ir.stages.len() - 1,
        &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    );
}

#[test]
fn mobilenetv2_depthwise_and_inverted_residuals() {
    let ir = load("mobilenetv2");
    let reference = Reference::run(&ir, input(&ir)).unwrap();
    let last_split = ir.stages.iter().position(|s| !s.is_splittable()).unwrap() - 1;
    assert_split_equal(&ir, &reference, 0, 12, &[1.0, 1.0, 1.0]);
    assert_split_equal(&ir, &reference, 13, last_split, &[2.0, 1.0]);
}

/// MobileNetV2's depthwise convs split by channels, each device reading its channels of
/// the input: alone (the first block's at 112 rows, the last one's at 7), and chained
/// after their block's expand conv, on 2 to 6 devices. The project conv after them
/// would need every device's channels: such a group is refused.
#[test]
fn mobilenetv2_depthwise_convs_split_by_channels() {
    let ir = load("mobilenetv2");
    let reference = Reference::run(&ir, input(&ir)).unwrap();
    let depthwise: Vec<usize> = ir
        .stages
        .iter()
        .filter(|s| s.channels.is_some_and(|c| c.depthwise))
        .map(|s| s.id.index())
        .collect();
    assert_eq!(
        depthwise.len(),
        17,
        "one depthwise conv per inverted residual block"
    );
    let (first, last) = (depthwise[0], *depthwise.last().unwrap());
    assert_eq!(ir.stages[first].output.shape, vec![1, 32, 112, 112]);
    assert_eq!(ir.stages[last].output.shape, vec![1, 960, 7, 7]);
    assert_channels_equal(&ir, &reference, first, first, &[1.0, 1.0]);
    assert_channels_equal(&ir, &reference, last, last, &[3.0, 3.0, 2.0, 2.0, 2.0, 1.0]);
    // The second block's expand conv, then its depthwise conv on the same channels.
    let dw = depthwise[1];
    assert_eq!(
        legion_partition::split_chain(&ir, Group::new(dw - 1, dw)),
        vec![
            legion_ir::StageId((dw - 1) as u32),
            legion_ir::StageId(dw as u32)
        ]
    );
    assert_channels_equal(&ir, &reference, dw - 1, dw, &[2.0, 1.0, 1.0]);
    assert_channels_equal(&ir, &reference, last - 1, last, &[1.0, 1.0, 1.0, 1.0]);
    let project = dw + 1;
    let err = check_channel_group(&ir, dw - 1, project)
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiplies"), "{err}");
}

#[test]
fn split_table_of_vgg16_on_4_devices() {
    let path = legion_models::test_model("vgg16").unwrap();
    let out = legion(&[
        "split",
        path.to_str().unwrap(),
        "--devices",
        "4",
        "--weights",
        "3,3,2,2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    insta::assert_snapshot!(String::from_utf8(out.stdout).unwrap());
}

/// Every committed model, every group and every barrier, on 2 to 6 devices of
/// different speeds.
#[test]
fn split_check_passes_on_every_tiny_model_barriers_included() {
    for spec in legion_models::catalog().iter().filter(|s| s.committed) {
        let name = spec.name;
        let path = legion_models::test_model(name).unwrap();
        for devices in 2..=6 {
            let weights: Vec<String> = (0..devices).map(|d| (1 + d % 3).to_string()).collect();
            let out = legion(&[
                "split",
                path.to_str().unwrap(),
                "--devices",
                &devices.to_string(),
                "--weights",
                &weights.join(","),
                "--check",
            ]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{name} on {devices} devices: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!stdout.contains("MISMATCH"), "{name}: {stdout}");
            let ir = load(name);
            let checked = stdout.matches("(ok)").count();
            let barriers = ir.stages.iter().filter(|s| !s.is_splittable()).count();
            assert!(
                checked > barriers,
                "{name}: {checked} checks for {barriers} barriers: {stdout}"
            );
        }
    }
}

/// Every stage of every committed model run whole on one device, as barriers run, equals
/// the model: whatever axis its input's rows are on (a conv after an H<->W transpose,
/// convs after a Focus of strided slices, the YOLOv8 DFL conv over anchors).
#[test]
fn every_stage_run_whole_matches_the_model() {
    use legion_partition::whole_stage;
    for spec in legion_models::catalog().iter().filter(|s| s.committed) {
        let name = spec.name;
        let ir = load(name);
        let reference = Reference::run(&ir, input(&ir)).unwrap();
        for s in &ir.stages {
            let spec = whole_stage(&ir, s.id);
            let diff = check::check_tile(&ir, &reference, &spec)
                .unwrap_or_else(|e| panic!("{name} stage {} ({}): {e:#}", s.id, s.name));
            assert!(
                diff.within(1e-5),
                "{name} stage {} ({}): {diff:?}",
                s.id,
                s.name
            );
        }
    }
}

/// More devices than a group has rows: the devices beyond them drop out of the group.
#[test]
fn devices_beyond_a_groups_rows_drop_out() {
    let path = legion_models::test_model("tiny-head").unwrap();
    let out = legion(&[
        "split",
        path.to_str().unwrap(),
        "--devices",
        "9",
        "--group",
        "0..1",
        "--check",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // tiny-head's pool outputs 8 rows: 8 devices of one row each.
    assert!(stdout.contains("8 devices"), "{stdout}");
    assert!(stdout.contains("(ok)"), "{stdout}");
}

/// The shares search reads a group's tiles from the walk of the longest group ending at
/// the same stage: every suffix of that walk must be exactly the group tiled alone.
#[test]
fn a_suffix_of_a_walk_is_the_group_tiled_alone() {
    use legion_partition::{Reductions, SuffixTiler};
    for name in ["tiny-residual", "tiny-yolo", "resnet18", "tiny-effnet"] {
        let ir = load(name);
        let mut compared = 0;
        for last in 0..ir.stages.len() {
            if !ir.stages[last].is_splittable() {
                continue;
            }
            let tiler =
                SuffixTiler::new(&ir, legion_ir::StageId(last as u32), Reductions::Combined)
                    .unwrap();
            let height = tiler.height();
            let strips = strips_from_weights(height, &[1.0, 2.0, 1.0]);
            for first in tiler.longest().first.index()..=last {
                let tiling = tile(&ir, Group::new(first, last), &strips).unwrap();
                for alone in &tiling.tiles {
                    let walk = tiler.walk(alone.strip).unwrap();
                    let view = walk.view(&ir, legion_ir::StageId(first as u32), alone.strip);
                    let whole = alone.view();
                    let at = format!("{name} group {first}..{last} strip {:?}", alone.strip);
                    assert_eq!(view.stages, whole.stages, "{at}: stages");
                    assert_eq!(view.received, whole.received, "{at}: received");
                    assert_eq!(view.sent, whole.sent, "{at}: sent");
                    compared += 1;
                }
            }
        }
        assert!(compared > 50, "{name}: only {compared} tiles compared");
    }
}

/// Checks the channel tiles of group `first..=last` (its last stage split by channels,
/// in proportion to `weights`) against the reference, and that the devices' channels
/// cut the stage's in order.
fn assert_channels_equal(
    ir: &Ir,
    reference: &Reference,
    first: usize,
    last: usize,
    weights: &[f64],
) {
    let group = check_channel_group(ir, first, last).unwrap();
    let split = ir.stage(group.last).channels.unwrap();
    let cuts = strips_from_weights(split.count, weights);
    assert_eq!(cuts.first().unwrap().start, 0);
    assert_eq!(cuts.last().unwrap().end, split.count);
    for (slot, c) in cuts.iter().enumerate().filter(|(_, c)| !c.is_empty()) {
        let spec = channel_tile(ir, group, *c);
        assert_eq!(spec.outputs.len(), 1);
        assert_eq!(spec.outputs[0].channels, Some(*c));
        let diff = check::check_tile(ir, reference, &spec).unwrap();
        assert!(
            diff.max_rel < 1e-5,
            "group {group} by channels on {} devices, device {slot} ({c}): {diff:?}",
            weights.len()
        );
    }
}

/// Checks the channel tiles of the flatten-and-matmul group `first..=last` multiplying
/// its input in `parts` (one phase per part, then their sum) against the reference.
fn assert_parts_equal(
    ir: &Ir,
    reference: &Reference,
    first: usize,
    last: usize,
    weights: &[f64],
    parts: &[Rows],
) {
    let group = check_channel_group(ir, first, last).unwrap();
    let input = product_in_parts(ir, group).expect("a flatten and its matmul multiply in parts");
    assert_eq!(input, ir.stage(group.first).inputs[0]);
    let split = ir.stage(group.last).channels.unwrap();
    for c in strips_from_weights(split.count, weights) {
        let spec = TileSpec {
            parts: parts.to_vec(),
            ..channel_tile(ir, group, c)
        };
        let phases = spec.phases(ir);
        assert_eq!(phases.len(), parts.len() + 1);
        for (phase, rows) in phases.iter().zip(parts) {
            assert_eq!(phase.spec.inputs[0].rows, *rows);
            assert_eq!(phase.spec.stages[0].part, Some(*rows));
        }
        assert!(phases.last().unwrap().spec.stages[0].summed);
        let diff = check::check_tile(ir, reference, &spec).unwrap();
        assert!(
            diff.max_rel < 1e-5,
            "group {group} channels {c} in parts {parts:?}: {diff:?}"
        );
    }
}

/// The FC heads split by neurons (the flatten run whole on every device), and late convs
/// split by output channels, on 2 to 6 devices; fc6 also multiplying pool5 in parts.
#[test]
fn channel_splits_equal_the_single_device_run() {
    let vgg = load("vgg16");
    let reference = Reference::run(&vgg, input(&vgg)).unwrap();
    assert_channels_equal(&vgg, &reference, 18, 19, &[3.0, 3.0, 2.0, 2.0, 2.0, 1.0]);
    let parts = [Rows::new(2, 3), Rows::new(3, 7), Rows::new(0, 2)];
    assert_parts_equal(&vgg, &reference, 18, 19, &[3.0, 2.0, 1.0], &parts);
    // fc7 reads fc6 whole: no rows to multiply in parts.
    assert_eq!(product_in_parts(&vgg, Group::new(20, 20)), None);
    assert_channels_equal(&vgg, &reference, 20, 20, &[1.0, 1.0]);
    assert_channels_equal(&vgg, &reference, 21, 21, &[2.0, 1.0, 1.0]);
    assert_channels_equal(&vgg, &reference, 16, 16, &[1.0, 1.0, 1.0, 1.0]);
    let resnet = load("resnet18");
    let reference = Reference::run(&resnet, input(&resnet)).unwrap();
    let fc = resnet.stages.len() - 1;
    assert!(matches!(resnet.stages[fc].kind, StageKind::MatMul { .. }));
    assert_channels_equal(&resnet, &reference, fc - 1, fc, &[2.0, 1.0, 1.0]);
    let yolo = load("yolov2");
    let reference = Reference::run(&yolo, input(&yolo)).unwrap();
    let last = yolo.stages.len() - 1;
    assert_channels_equal(&yolo, &reference, last, last, &[3.0, 2.0, 1.0, 1.0, 1.0]);
}

/// AlexNet's FC head split by neurons: fc1 with the flatten before it run whole on every
/// device, then fc2 and fc3 alone.
#[test]
fn alexnet_head_split_by_neurons_equals_the_single_device_run() {
    let ir = load("alexnet");
    let reference = Reference::run(&ir, input(&ir)).unwrap();
    let fcs: Vec<usize> = (0..ir.stages.len())
        .filter(|&i| matches!(ir.stages[i].kind, StageKind::MatMul { .. }))
        .collect();
    let [fc1, fc2, fc3] = fcs[..] else {
        panic!("AlexNet has 3 FC stages, not {fcs:?}")
    };
    let flatten = fc1 - 1;
    assert!(
        matches!(ir.stages[flatten].kind, StageKind::Reshape),
        "{:?} before fc1",
        ir.stages[flatten].kind
    );
    let uneven = [3.0, 3.0, 2.0, 2.0, 2.0, 1.0];
    assert_channels_equal(&ir, &reference, flatten, fc1, &uneven);
    let height = ir.stages[flatten].input_shapes[0].height().unwrap();
    let parts = [Rows::new(height / 2, height), Rows::new(0, height / 2)];
    assert_parts_equal(&ir, &reference, flatten, fc1, &[1.0, 1.0], &parts);
    assert_channels_equal(&ir, &reference, fc2, fc2, &[1.0, 1.0]);
    assert_channels_equal(&ir, &reference, fc3, fc3, &[2.0, 1.0, 1.0, 1.0]);
}

/// `legion split --channels` prints each device's channels and weights, checks them,
/// and names the stage when it cannot split so.
#[test]
fn split_by_channels_from_the_command_line() {
    let path = legion_models::test_model("tiny-head").unwrap();
    let path = path.to_str().unwrap();
    let out = legion(&[
        "split",
        path,
        "--devices",
        "3",
        "--group",
        "2..3",
        "--channels",
        "--check",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("by channels: 10 matmul on axis 1, 3 devices"),
        "{stdout}"
    );
    for c in ["channels 0..4", "channels 4..7", "channels 7..10", "(ok)"] {
        assert!(stdout.contains(c), "{c}: {stdout}");
    }
    let out = legion(&[
        "split",
        path,
        "--devices",
        "2",
        "--group",
        "1..1",
        "--channels",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("stage 1 (pool1) does not split by output channels"),
        "{stderr}"
    );
    let out = legion(&["split", path, "--devices", "2", "--channels"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--channels needs --group"));
}

/// Groups across squeeze-excitation blocks: every device reduces its own rows of the
/// pooled map, the partials combined in device order equal the global pool, and every
/// device's strips after it equal the single-device run, on 1 to 6 devices.
#[test]
fn squeeze_excitation_inside_row_groups_equals_the_single_device_run() {
    let ir = load("tiny-effnet");
    let reference = Reference::run(&ir, input(&ir)).unwrap();
    let reduces: Vec<usize> = (0..ir.stages.len())
        .filter(|&s| matches!(ir.stages[s].kind, StageKind::Reduce { .. }))
        .collect();
    assert_eq!(reduces.len(), 4, "one global pool per block");
    assert!(reduces.iter().all(|&s| ir.stages[s].partial.is_some()));
    let last = ir.stages.len() - 1;
    let cases: [(usize, usize, &[f64]); 6] = [
        (0, 7, &[1.0, 1.0]),
        (0, 7, &[3.0, 2.0, 2.0, 1.0, 1.0, 1.0]),
        (8, 21, &[2.0, 1.0, 1.0]),
        (1, 14, &[1.0]),
        (0, last, &[1.0, 2.0, 1.0, 1.0]),
        (15, 29, &[1.0, 1.0, 1.0]),
    ];
    for (first, last, weights) in cases {
        let group = Group::new(first, last);
        let height = ir.stage(group.last).output.height().unwrap();
        let strips = strips_from_weights(height, weights);
        let tiling = tile(&ir, group, &strips).unwrap();
        let specs: Vec<_> = tiling.tiles.iter().map(|t| t.spec()).collect();
        assert!(specs.iter().all(|s| s.stages.iter().any(|st| st.partial)));
        for (t, spec) in tiling.tiles.iter().zip(&specs) {
            let diff = check::check_tile(&ir, &reference, spec).unwrap();
            assert!(
                diff.max_rel < 1e-5,
                "group {group}, device {}: {diff:?}",
                t.slot
            );
        }
        let diff = check::check_partials(&ir, &reference, &specs).unwrap();
        assert!(
            diff.max_rel < 1e-5,
            "group {group} partials on {weights:?}: {diff:?}"
        );
    }
    // A reduction read after its group cannot be combined inside it.
    let err = tile(&ir, Group::new(0, reduces[0]), &[Rows::new(0, 1)]).unwrap_err();
    assert!(
        err.to_string()
            .contains("combine it only for stages after it"),
        "{err}"
    );
}
