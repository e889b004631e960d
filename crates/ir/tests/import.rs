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
    // Every conv splits by its 1x64.. output channels, each FC layer by its neurons;
    // pools, the flatten and the softmax do not (docs/architecture.md, "Channel splits").
    let channels: Vec<Option<(usize, usize)>> = ir
        .stages
        .iter()
        .map(|s| s.channels.map(|c| (c.axis, c.count)))
        .collect();
    assert_eq!(channels[0], Some((1, 64)));
    assert_eq!(channels[17], None, "pool5");
    assert_eq!(
        channels[18..],
        [
            None,
            Some((1, 4096)),
            Some((1, 4096)),
            Some((1, 1000)),
            None
        ]
    );
    // fc6 on a quarter of its neurons reads a quarter of its weights and bias, and
    // its Relu's scalar 0 whole.
    let fc6 = legion_ir::StageId(19);
    assert_eq!(ir.stage(fc6).weight_bytes, (25088 * 4096 + 4096 + 1) * 4);
    assert_eq!(
        ir.channel_weight_bytes(fc6, legion_ir::Rows::new(0, 1024)),
        (25088 * 1024 + 1024 + 1) * 4
    );
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
    // Every conv splits by its output channels; a depthwise one reads the same
    // channels of its input.
    for s in &ir.stages {
        if let StageKind::Conv {
            group,
            out_channels,
            ..
        } = s.kind
        {
            let split = s.channels.unwrap_or_else(|| panic!("stage {}", s.id));
            assert_eq!(
                (split.axis, split.count, split.depthwise),
                (1, out_channels, group > 1),
                "stage {}",
                s.id
            );
        }
    }
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

/// Writes `model` under the test's scratch directory and imports it.
#[allow(clippy::result_large_err)] // the error under test, as `import` returns it
fn import_proto(
    file: &str,
    model: &tract_onnx::pb::ModelProto,
    shape: Option<&[usize]>,
) -> Result<Ir, legion_ir::ImportError> {
    use prost::Message;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(file);
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    import(&path, shape)
}

#[test]
fn a_contrib_quantized_op_is_named_with_what_to_do() {
    use legion_models::{Conv, GraphBuilder};
    use tract_onnx::pb::NodeProto;
    let mut b = GraphBuilder::new("contrib-op");
    let x = b.input("input", &[1, 3, 8, 8]);
    let y = b.conv("conv1", &x, Conv::new(4, 3));
    let mut model = b.finish("an onnxruntime contrib op after a conv", &[&y]);
    let graph = model.graph.as_mut().unwrap();
    graph.node.push(NodeProto {
        name: "lstm1".into(),
        op_type: "DynamicQuantizeLSTM".into(),
        domain: "com.microsoft".into(),
        input: vec![y.name().into()],
        output: vec!["lstm1".into(), "lstm1_h".into(), "lstm1_c".into()],
        ..Default::default()
    });
    graph.output[0].name = "lstm1".into();
    let err = import_proto("contrib-op.onnx", &model, None)
        .expect_err("tract cannot run DynamicQuantizeLSTM")
        .to_string();
    for needle in [
        "contrib-op.onnx",
        "node 'lstm1'",
        "DynamicQuantizeLSTM",
        "com.microsoft",
        "float32 model",
    ] {
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
    }
    assert!(!err.contains("Wrong number of outputs"), "{err}");
}

#[test]
fn an_nhwc_flatten_is_a_flatten_not_an_upsample() {
    use legion_models::{Conv, GraphBuilder};
    let mut b = GraphBuilder::new("nhwc-flatten");
    let x = b.input("input", &[1, 3, 8, 8]);
    let y = b.conv("conv1", &x, Conv::new(4, 3));
    let y = b.transpose("to_nhwc", &y, &[0, 2, 3, 1]);
    let y = b.flatten("flatten", &y);
    let y = b.gemm("fc", &y, 10);
    let model = b.finish("conv, NHWC transpose, flatten, gemm", &[&y]);
    let ir = import_proto("nhwc-flatten.onnx", &model, None).unwrap();
    let kinds: Vec<_> = ir.stages.iter().map(|s| s.kind.short_name()).collect();
    assert_eq!(kinds, ["conv", "flatten", "matmul"], "{kinds:?}");
    // Each of the 8 rows of [1, 8, 8, 4] is 32 consecutive features.
    assert_eq!(ir.stages[1].kind, StageKind::Flatten { factor: 32 });
    assert_eq!(ir.stages[1].output.h_axis, Some(1));
    assert!(
        !ir.stages[2].is_splittable(),
        "the gemm reads every feature"
    );
}

#[test]
fn stored_intermediate_shapes_do_not_block_another_input_shape() {
    let bytes = legion_models::value_info_model();
    let model = <tract_onnx::pb::ModelProto as prost::Message>::decode(&bytes[..]).unwrap();
    assert!(!model.graph.as_ref().unwrap().value_info.is_empty());
    // The declared shape has a symbolic batch: a batch of one.
    let ir = import_proto("value-info.onnx", &model, None).unwrap();
    assert_eq!(ir.input.shape, [1, 3, 32, 32]);
    let ir = import_proto("value-info.onnx", &model, Some(&[1, 3, 48, 40])).unwrap();
    assert_eq!(ir.input.shape, [1, 3, 48, 40]);
    let last = ir.stages.last().unwrap();
    assert_eq!(last.output.shape[2..], [24, 20], "{:?}", last.output);
}

/// Today's architectures split almost everywhere: what remains a barrier is named.
#[test]
fn todays_architectures_keep_few_barriers() {
    let barriers = |name: &str| -> Vec<String> {
        load(name)
            .stages
            .iter()
            .filter(|s| !s.is_splittable())
            .map(|s| s.kind.short_name())
            .collect()
    };
    // Channels-last LayerNorm, MatMuls, GELU, layer scale and a Cast: all row-local.
    assert_eq!(barriers("tiny-convnext"), Vec::<String>::new());
    // Channel splits and shuffles.
    assert_eq!(barriers("tiny-shuffle"), Vec::<String>::new());
    // Strided slices of rows and columns.
    assert_eq!(barriers("tiny-focus"), Vec::<String>::new());
    // C2f splits, SPPF, the DFL conv over anchors and the anchor grid split; only the
    // concat of the three scales along the anchors is a barrier.
    assert_eq!(barriers("tiny-yolov8"), ["concat"]);
    // Squeeze-excitation: the global pools remain; their 1x1 convs and the scaling split.
    assert_eq!(barriers("tiny-effnet"), ["reduce"; 4]);
}

/// An Ir's shapes travel to the boards and back unchanged; shapes that do not hold
/// together (a stage reading a later one, a row axis outside its shape, an output that
/// is no stage) are refused, not trusted.
#[test]
fn shapes_round_trip_and_bad_shapes_are_refused() {
    let ir = load("tiny-residual");
    let json = serde_json::to_vec(&ir.shapes()).unwrap();
    let back = Ir::from_shapes(serde_json::from_slice(&json).unwrap()).unwrap();
    assert!(!back.has_model());
    assert_eq!(back.stages, ir.stages);
    assert_eq!(back.outputs, ir.outputs);
    assert_eq!(back.graph.edge_count(), ir.graph.edge_count());

    let mut later = ir.shapes();
    later.stages[0].inputs = vec![TensorRef::Stage(legion_ir::StageId(3))];
    let e = Ir::from_shapes(later).unwrap_err();
    assert!(e.contains("stage 0 reads"), "{e}");

    let mut axis = ir.shapes();
    axis.stages[1].output.h_axis = Some(9);
    let e = Ir::from_shapes(axis).unwrap_err();
    assert!(e.contains("stage 1: an axis lies outside"), "{e}");

    let mut output = ir.shapes();
    output.outputs = vec![TensorRef::Stage(legion_ir::StageId(999))];
    let e = Ir::from_shapes(output).unwrap_err();
    assert!(e.contains("is not one of the"), "{e}");
}
