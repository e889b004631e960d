//! Import of the generated models: stage counts, kinds, geometry and costs that matter.

use legion_ir::{Ir, PoolOp, Split, StageKind, TensorRef, import};

fn load(name: &str) -> Ir {
    let path = legion_models::test_model(name).unwrap();
    import(&path, None).unwrap()
}

fn count(ir: &Ir, pred: impl Fn(&StageKind) -> bool) -> usize {
    ir.stages.iter().filter(|s| pred(&s.kind)).count()
}

fn conv_macs(ir: &Ir) -> u64 {
    ir.stages
        .iter()
        .filter(|s| matches!(s.kind, StageKind::Conv { .. }))
        .map(|s| s.macs())
        .sum()
}

#[test]
fn vgg16_has_13_convs_5_pools_and_a_barrier_head() {
    let ir = load("vgg16");
    let convs = count(&ir, |k| matches!(k, StageKind::Conv { .. }));
    let pools = count(&ir, |k| {
        matches!(
            k,
            StageKind::Pool {
                pool: PoolOp::Max,
                ..
            }
        )
    });
    assert_eq!((convs, pools), (13, 5));
    let (body, head) = ir.stages.split_at(18);
    assert!(
        body.iter().all(|s| s.split == Split::Rows),
        "conv part must split"
    );
    assert!(
        head.iter().all(|s| !s.is_splittable()),
        "FC head must be barriers"
    );
    assert_eq!(count(&ir, |k| matches!(k, StageKind::MatMul { .. })), 3);
    // 15.35 GMACs = 30.69 GFLOPs in the conv stages at 224x224.
    assert_eq!(conv_macs(&ir), 15_346_630_656);
    let conv_flops: u64 = body
        .iter()
        .filter(|s| matches!(s.kind, StageKind::Conv { .. }))
        .map(|s| s.flops)
        .sum();
    assert_eq!(format!("{:.2}", conv_flops as f64 / 1e9), "30.69");
    let conv1 = &ir.stages[0];
    assert_eq!(conv1.output.shape, vec![1, 64, 224, 224]);
    assert_eq!(conv1.output.h_axis, Some(2));
    assert_eq!(
        conv1.fused,
        vec!["Max".to_string()],
        "conv1_1 fuses its Relu"
    );
    // Kernel, bias and the Relu's scalar 0.
    assert_eq!(conv1.weight_bytes, (64 * 3 * 3 * 3 + 64 + 1) * 4);
    assert_eq!(ir.stages[17].output.shape, vec![1, 512, 7, 7]);
}

#[test]
fn vgg19_conv_part_has_19_51_gmacs() {
    let ir = load("vgg19-conv");
    assert_eq!(count(&ir, |k| matches!(k, StageKind::Conv { .. })), 16);
    assert_eq!(format!("{:.2}", conv_macs(&ir) as f64 / 1e9), "19.51");
    assert!(ir.stages.iter().all(|s| s.is_splittable()));
}

#[test]
fn yolov2_reorg_and_concat_split() {
    let ir = load("yolov2");
    let reorg = ir
        .stages
        .iter()
        .find(|s| s.kind == StageKind::SpaceToDepth { block: 2 })
        .expect("the passthrough reorg is a space-to-depth stage");
    assert!(reorg.is_splittable());
    assert_eq!(reorg.output.shape, vec![1, 256, 13, 13]);
    let concat = ir
        .stages
        .iter()
        .find(|s| matches!(s.kind, StageKind::Concat { axis: 1 }))
        .unwrap();
    assert!(concat.is_splittable());
    assert!(concat.inputs.contains(&TensorRef::Stage(reorg.id)));
    assert_eq!(concat.output.shape, vec![1, 1280, 13, 13]);
    assert!(ir.stages.iter().all(|s| s.is_splittable()));
    assert_eq!(ir.stages.last().unwrap().output.shape, vec![1, 125, 13, 13]);
}

#[test]
fn resnet18_has_8_residual_adds() {
    let ir = load("resnet18");
    let adds: Vec<_> = ir
        .stages
        .iter()
        .filter(|s| matches!(&s.kind, StageKind::Join { name } if name == "Add"))
        .collect();
    assert_eq!(adds.len(), 8);
    for add in adds {
        assert!(add.is_splittable());
        assert_eq!(add.inputs.len(), 2);
        assert_eq!(
            add.fused,
            vec!["Max".to_string()],
            "the Relu after the Add is fused"
        );
    }
    // Global pool, flatten and the classifier are barriers.
    assert_eq!(ir.stages.iter().filter(|s| !s.is_splittable()).count(), 3);
}

#[test]
fn mobilenetv2_marks_depthwise_groups() {
    let ir = load("mobilenetv2");
    let depthwise: Vec<_> = ir
        .stages
        .iter()
        .filter_map(|s| match s.kind {
            StageKind::Conv {
                group,
                in_channels,
                out_channels,
                ..
            } if group > 1 => Some((group, in_channels, out_channels)),
            _ => None,
        })
        .collect();
    assert_eq!(depthwise.len(), 17);
    assert!(depthwise.iter().all(|&(g, i, o)| g == i && i == o));
    assert_eq!(depthwise[0], (32, 32, 32));
    // ReLU6 (Clip) is fused into each conv stage.
    let first = &ir.stages[0];
    assert!(
        first.fused.len() >= 2,
        "BN and Clip fuse into conv: {:?}",
        first.fused
    );
}

#[test]
fn tiny_cnn_geometry() {
    let ir = load("tiny-cnn");
    let windows: Vec<_> = ir
        .stages
        .iter()
        .filter_map(|s| s.kind.window().cloned())
        .collect();
    assert!(windows.iter().any(|w| w.dilation == [2, 2]));
    assert!(windows.iter().any(|w| w.ceil_mode));
    assert!(
        windows.iter().any(|w| w.pad_before != w.pad_after),
        "asymmetric pads"
    );
    assert!(ir.stages.iter().any(|s| matches!(
        s.kind,
        StageKind::Pool {
            pool: PoolOp::Avg {
                count_include_pad: false
            },
            ..
        }
    )));
    assert!(ir.stages.iter().all(|s| s.is_splittable()));
}

#[test]
fn nhwc_input_keeps_rows_through_transposes() {
    let ir = load("tiny-nhwc");
    assert_eq!(ir.input.h_axis, Some(1));
    assert_eq!(ir.stages[0].kind, StageKind::Layout);
    assert_eq!(ir.stages[0].output.h_axis, Some(2));
    let last = ir.stages.last().unwrap();
    assert_eq!(last.kind, StageKind::Layout);
    assert_eq!(last.output.h_axis, Some(1));
    assert!(ir.stages.iter().all(|s| s.is_splittable()));
}

#[test]
fn unknown_op_is_a_barrier_naming_the_op() {
    let ir = load("tiny-unknown-op");
    let lrn = ir.stages.iter().find(|s| !s.is_splittable()).unwrap();
    assert_eq!(lrn.kind, StageKind::Other { name: "Lrn".into() });
    assert_eq!(
        lrn.split,
        Split::Barrier("op Lrn is not modelled by Legion".into())
    );
    // Rows survive the unknown op, so the stages after it still split.
    assert!(
        ir.stages[lrn.id.index() + 1..]
            .iter()
            .all(|s| s.is_splittable())
    );
}

#[test]
fn tiny_yolo_upsample_s2d_and_concat() {
    let ir = load("tiny-yolo");
    assert_eq!(
        count(&ir, |k| *k == StageKind::SpaceToDepth { block: 2 }),
        2
    );
    assert_eq!(count(&ir, |k| *k == StageKind::Upsample { factor: 2 }), 1);
    assert!(count(&ir, |k| matches!(k, StageKind::Concat { .. })) >= 2);
}

#[test]
fn stages_are_topologically_ordered() {
    for name in ["resnet18", "tiny-residual", "tiny-yolo", "tiny-mobile"] {
        let ir = load(name);
        for s in &ir.stages {
            for r in &s.inputs {
                if let TensorRef::Stage(p) = r {
                    assert!(p < &s.id, "{name}: stage {} reads later stage {}", s.id, p);
                }
            }
        }
        assert!(!petgraph::algo::is_cyclic_directed(&ir.graph));
    }
}
