//! The error-case fixtures decode and say what they claim to.

use legion_models::{dynamic_input_model, non_f32_model};
use prost::Message;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension::Value;
use tract_onnx::pb::{ModelProto, ValueInfoProto, type_proto};
use tract_onnx::prelude::Framework;

fn tensor_type(value: &ValueInfoProto) -> &type_proto::Tensor {
    match value.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => t,
        None => panic!("{} has no tensor type", value.name),
    }
}

fn input(onnx: &[u8]) -> type_proto::Tensor {
    let model = ModelProto::decode(onnx).unwrap();
    tensor_type(&model.graph.unwrap().input[0]).clone()
}

#[test]
fn dynamic_input_has_symbolic_dims() {
    let dims: Vec<_> = input(&dynamic_input_model())
        .shape
        .unwrap()
        .dim
        .into_iter()
        .map(|d| d.value.unwrap())
        .collect();
    let expected = [
        Value::DimParam("N".into()),
        Value::DimValue(3),
        Value::DimParam("H".into()),
        Value::DimParam("W".into()),
    ];
    assert_eq!(dims, expected);
}

#[test]
fn non_f32_input_is_float16() {
    assert_eq!(input(&non_f32_model()).elem_type, DataType::Float16 as i32);
}

#[test]
fn fixtures_load_in_tract() {
    for onnx in [dynamic_input_model(), non_f32_model()] {
        tract_onnx::onnx()
            .model_for_read(&mut onnx.as_slice())
            .unwrap();
    }
}
