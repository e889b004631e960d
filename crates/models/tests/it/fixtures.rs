//! The error-case fixtures decode and say what they claim to.

use legion_models::{dynamic_input_model, non_f32_model, value_info_model};
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

fn dims(value: &ValueInfoProto) -> Vec<Value> {
    let shape = tensor_type(value).shape.clone().unwrap();
    shape.dim.into_iter().map(|d| d.value.unwrap()).collect()
}

#[test]
fn value_info_lists_every_intermediate_with_a_symbolic_batch() {
    let graph = ModelProto::decode(value_info_model().as_slice())
        .unwrap()
        .graph
        .unwrap();
    let node_outputs: Vec<_> = graph.node.iter().map(|n| n.output[0].as_str()).collect();
    let listed: Vec<_> = graph.value_info.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(node_outputs, ["conv1", "relu1", "conv2", "relu2", "pool"]);
    assert_eq!(listed, node_outputs[..4]);
    let batch = || Value::DimParam("batch".into());
    let sized = |c, hw| {
        vec![
            batch(),
            Value::DimValue(c),
            Value::DimValue(hw),
            Value::DimValue(hw),
        ]
    };
    assert_eq!(dims(&graph.input[0]), sized(3, 32));
    for value in &graph.value_info {
        let channels = if value.name.ends_with('1') { 8 } else { 16 };
        assert_eq!(dims(value), sized(channels, 32), "{}", value.name);
    }
    assert_eq!(dims(&graph.output[0]), sized(16, 16));
}

#[test]
fn non_f32_input_is_float16() {
    assert_eq!(input(&non_f32_model()).elem_type, DataType::Float16 as i32);
}

#[test]
fn fixtures_load_in_tract() {
    for onnx in [dynamic_input_model(), non_f32_model(), value_info_model()] {
        tract_onnx::onnx()
            .model_for_read(&mut onnx.as_slice())
            .unwrap();
    }
}
