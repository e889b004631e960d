//! Error-case fixtures: small models the importer must reject cleanly.

use prost::Message;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::dimension::Value;
use tract_onnx::pb::{ModelProto, ValueInfoProto, type_proto};
use tract_onnx::prelude::f16;

use crate::builder::{Conv, GraphBuilder, Pool, value_info};

/// Conv 3x3 (3 -> 8 channels) + Relu on a `[1, 3, 8, 8]` input.
fn conv_relu(name: &str, doc: &str) -> ModelProto {
    let mut b = GraphBuilder::new(name);
    let x = b.input("input", &[1, 3, 8, 8]);
    let y = b.conv("conv1", &x, Conv::new(8, 3));
    let y = b.relu("relu1", &y);
    b.finish(doc, &[&y])
}

fn tensor_type(value: &mut ValueInfoProto) -> &mut type_proto::Tensor {
    match value.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        Some(type_proto::Value::TensorType(t)) => t,
        None => unreachable!("the builder types every graph input and output"),
    }
}

/// Rewrites the given dims of `value`'s shape into symbols (`None` keeps a dim).
fn symbolize(value: &mut ValueInfoProto, symbols: [Option<&str>; 4]) {
    let shape = tensor_type(value)
        .shape
        .as_mut()
        .expect("builder shapes are set");
    for (dim, symbol) in shape.dim.iter_mut().zip(symbols) {
        if let Some(symbol) = symbol {
            dim.value = Some(Value::DimParam(symbol.into()));
        }
    }
}

/// Conv + Relu whose input is `[N, 3, H, W]` and output `[N, 8, H, W]`, with
/// `N`, `H`, `W` as `dim_param` symbols.
pub fn dynamic_input_model() -> Vec<u8> {
    let mut model = conv_relu("dynamic-input", "Fixture: symbolic N, H, W input dims.");
    let graph = model.graph.as_mut().expect("graph");
    symbolize(&mut graph.input[0], [Some("N"), None, Some("H"), Some("W")]);
    symbolize(
        &mut graph.output[0],
        [Some("N"), None, Some("H"), Some("W")],
    );
    model.encode_to_vec()
}

/// Conv + Relu + Conv + Relu + MaxPool on a `[batch, 3, 32, 32]` input whose
/// `graph.value_info` lists every intermediate tensor with its shape, as ONNX
/// shape inference writes it (`batch` symbolic, the rest for 32x32). It checks
/// that stored intermediate shapes do not block an import at another input
/// shape.
pub fn value_info_model() -> Vec<u8> {
    let mut b = GraphBuilder::new("value-info");
    let x = b.input("input", &[1, 3, 32, 32]);
    let conv1 = b.conv("conv1", &x, Conv::new(8, 3));
    let relu1 = b.relu("relu1", &conv1);
    let conv2 = b.conv("conv2", &relu1, Conv::new(16, 3));
    let relu2 = b.relu("relu2", &conv2);
    let y = b.max_pool("pool", &relu2, Pool::new(2, 2));
    let doc = "Fixture: symbolic batch, inferred intermediate shapes in value_info.";
    let mut model = b.finish(doc, &[&y]);
    let graph = model.graph.as_mut().expect("graph");
    graph.value_info = [&conv1, &relu1, &conv2, &relu2]
        .iter()
        .map(|v| value_info(v.name(), DataType::Float, v.shape()))
        .collect();
    let batch = [Some("batch"), None, None, None];
    let values = graph.input.iter_mut().chain(&mut graph.output);
    for value in values.chain(&mut graph.value_info) {
        symbolize(value, batch);
    }
    model.encode_to_vec()
}

/// Conv + Relu entirely in float16: input, weights, bias and output.
pub fn non_f32_model() -> Vec<u8> {
    let mut model = conv_relu("non-f32", "Fixture: float16 input and weights.");
    let graph = model.graph.as_mut().expect("graph");
    for init in &mut graph.initializer {
        init.data_type = DataType::Float16 as i32;
        init.raw_data = init
            .raw_data
            .chunks_exact(4)
            .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .flat_map(|v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
    }
    for value in graph.input.iter_mut().chain(&mut graph.output) {
        tensor_type(value).elem_type = DataType::Float16 as i32;
    }
    model.encode_to_vec()
}
