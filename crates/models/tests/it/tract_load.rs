//! Every catalog model loads in tract with the expected output shape; all but
//! three big ones also run on zeros.

use legion_models::{bytes, catalog, spec, test_model};
use tract_onnx::prelude::*;

/// Expected output shape of every catalog model.
fn expected_output(name: &str) -> &'static [usize] {
    match name {
        "vgg16" | "vgg19" | "alexnet" | "resnet18" | "resnet50" | "mobilenetv2" => &[1, 1000],
        "convnext-tiny" | "efficientnet-b0" | "shufflenetv2" => &[1, 1000],
        "yolov8n" => &[1, 84, 8400],
        "vgg16-conv" | "vgg19-conv" => &[1, 512, 7, 7],
        "calibration" => &[1, 1000],
        "yolov2" | "yolov2-tiny" => &[1, 125, 13, 13],
        "tiny-cnn" => &[1, 24, 6, 5],
        "tiny-residual" => &[1, 32, 16, 16],
        "tiny-yolo" => &[1, 18, 16, 16],
        "tiny-mobile" | "tiny-head" => &[1, 10],
        "tiny-nhwc" => &[1, 16, 16, 8],
        "tiny-unknown-op" => &[1, 16, 16, 16],
        "tiny-yolov8" => &[1, 8, 80],
        "tiny-convnext" => &[1, 32, 8, 8],
        "tiny-effnet" => &[1, 64, 8, 8],
        "tiny-shuffle" => &[1, 64, 4, 4],
        "tiny-focus" => &[1, 32, 16, 16],
        "tiny-transposed" => &[1, 16, 10, 6],
        other => panic!("no expected output shape for {other}"),
    }
}

fn typed(model: InferenceModel, name: &str) -> TypedModel {
    let typed = model
        .into_typed()
        .unwrap_or_else(|e| panic!("{name}: into_typed: {e:?}"));
    let fact = typed.output_fact(0).unwrap();
    assert_eq!(fact.datum_type, f32::datum_type(), "{name}");
    assert_eq!(
        fact.shape.as_concrete(),
        Some(expected_output(name)),
        "{name}"
    );
    typed
}

/// Optimizes, runs on zeros, and checks the output's shape and finiteness.
fn run_on_zeros(typed: TypedModel, name: &str, input: &[usize]) {
    let runnable = typed.into_optimized().unwrap().into_runnable().unwrap();
    let zeros = Tensor::zero::<f32>(input).unwrap();
    let out = runnable
        .run(tvec!(zeros.into()))
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    assert_eq!(out[0].shape(), expected_output(name), "{name}");
    let values = out[0].to_plain_array_view::<f32>().unwrap();
    assert!(
        values.iter().all(|v| v.is_finite()),
        "{name}: non-finite output"
    );
    let first = values.iter().next().copied();
    assert!(
        values.iter().any(|&v| Some(v) != first),
        "{name}: constant output"
    );
}

#[test]
fn tiny_models_run_on_zeros() {
    for spec in catalog().iter().filter(|s| s.committed) {
        let onnx = bytes(spec.name).unwrap();
        let model = tract_onnx::onnx()
            .model_for_read(&mut onnx.as_slice())
            .unwrap();
        run_on_zeros(typed(model, spec.name), spec.name, &spec.input_shape);
    }
}

fn load(name: &str) -> TypedModel {
    let path = test_model(name).unwrap();
    typed(tract_onnx::onnx().model_for_path(path).unwrap(), name)
}

/// Full-size models that also run (a few seconds each, weights optimised).
const RUN: [&str; 10] = [
    "vgg16",
    "yolov2",
    "yolov2-tiny",
    "resnet18",
    "mobilenetv2",
    "calibration",
    "yolov8n",
    "convnext-tiny",
    "efficientnet-b0",
    "shufflenetv2",
];

#[test]
fn big_models_run_on_zeros() {
    for name in RUN {
        let spec = spec(name).unwrap();
        run_on_zeros(load(name), name, &spec.input_shape);
    }
}

#[test]
fn other_big_models_type_check() {
    for spec in catalog()
        .iter()
        .filter(|s| !s.committed && !RUN.contains(&s.name))
    {
        load(spec.name);
    }
}
