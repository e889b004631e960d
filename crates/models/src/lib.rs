//! Deterministic ONNX test models for Legion, generated in pure Rust.
//!
//! Models (see [`catalog`]): `vgg16`, `vgg19` (224x224, with the FC head) and
//! `vgg16-conv`, `vgg19-conv` (up to `pool5`); `alexnet` (torchvision, 224x224,
//! with the FC head); `yolov2` and `yolov2-tiny` (416x416, darknet VOC layouts,
//! passthrough as Reshape/Transpose/Reshape);
//! `resnet18`, `resnet50` and `mobilenetv2` (torchvision layouts, 224x224);
//! `calibration` (VGG-16 at 112x112, the workload the emulator times to measure a
//! host's rate); today's architectures as their PyTorch exports look at opset 13:
//! `yolov8n` (ultralytics, 640x640, with the DFL head), `convnext-tiny`,
//! `efficientnet-b0` and `shufflenetv2` (torchvision, 224x224); and the tiny
//! models committed under `testdata/models/`: `tiny-cnn`, `tiny-residual`,
//! `tiny-yolo`, `tiny-mobile`, `tiny-nhwc`, `tiny-unknown-op`, `tiny-head`, the
//! miniatures `tiny-yolov8`, `tiny-convnext`, `tiny-effnet`, `tiny-shuffle` and
//! `tiny-focus` (YOLOX's strided-Slice stem), and `tiny-transposed` (a conv
//! after an H/W Transpose). [`dynamic_input_model`], [`value_info_model`] and
//! [`non_f32_model`] are fixtures outside the catalog.
//!
//! Weights are uniform: He-scaled for convs and GEMMs, small non-zero biases,
//! BatchNormalization statistics away from the identity. They come from a
//! ChaCha8 stream keyed by model and tensor name, so the bytes of a model
//! only change with [`GENERATOR_VERSION`]. Models use ONNX IR 8, opset 13,
//! a single input named `input`, and name every node and tensor.
//!
//! Tests get files through [`test_model`] (a stamped cache under `target/`);
//! `cargo xtask gen-models` writes them by hand. [`GraphBuilder`] is public so
//! that other crates' tests can build ad-hoc graphs the same way.

mod builder;
mod files;
mod fixtures;
mod tiny;
mod weights;
mod zoo;

pub use builder::{Conv, GraphBuilder, IR_VERSION, OPSET, Operand, Pool, Value};
pub use files::{cache_dir, committed_dir, ensure, test_model, workspace_root, write};
pub use fixtures::{dynamic_input_model, non_f32_model, value_info_model};

use anyhow::{Result, anyhow};
use prost::Message;
use tract_onnx::pb::ModelProto;

/// Version of the generator; bump it whenever any model's bytes change.
pub const GENERATOR_VERSION: u32 = 2;

/// A model of the catalog.
#[derive(Clone, Copy, Debug)]
pub struct ModelSpec {
    /// Catalog name, also the file stem (`NAME.onnx`).
    pub name: &'static str,
    /// One line on what the model is and what it exercises.
    pub description: &'static str,
    /// The graph input's shape as declared in the ONNX file (NCHW except `tiny-nhwc`).
    pub input_shape: [usize; 4],
    /// Tiny (< 1 MB): committed under `testdata/models/`.
    pub committed: bool,
    /// Adds the layers to the builder, from the input to the output.
    define: fn(&mut GraphBuilder, Value) -> Value,
}

const fn entry(
    name: &'static str,
    description: &'static str,
    input_shape: [usize; 4],
    committed: bool,
    define: fn(&mut GraphBuilder, Value) -> Value,
) -> ModelSpec {
    ModelSpec {
        name,
        description,
        input_shape,
        committed,
        define,
    }
}

const IMAGENET: [usize; 4] = [1, 3, 224, 224];
const DARKNET: [usize; 4] = [1, 3, 416, 416];
const SMALL: [usize; 4] = [1, 3, 32, 32];
const SMALL64: [usize; 4] = [1, 3, 64, 64];

static CATALOG: [ModelSpec; 28] = [
    entry(
        "vgg16",
        "VGG-16 with the FC head, 15.35 G conv MACs",
        IMAGENET,
        false,
        zoo::vgg16,
    ),
    entry(
        "vgg19",
        "VGG-19 with the FC head, 19.51 G conv MACs",
        IMAGENET,
        false,
        zoo::vgg19,
    ),
    entry(
        "vgg16-conv",
        "VGG-16 up to pool5",
        IMAGENET,
        false,
        zoo::vgg16_conv,
    ),
    entry(
        "vgg19-conv",
        "VGG-19 up to pool5",
        IMAGENET,
        false,
        zoo::vgg19_conv,
    ),
    entry(
        "alexnet",
        "torchvision AlexNet with the FC head, 0.66 G conv MACs",
        IMAGENET,
        false,
        zoo::alexnet,
    ),
    entry(
        "yolov2",
        "YOLOv2 VOC (darknet), passthrough reorg",
        DARKNET,
        false,
        zoo::yolov2,
    ),
    entry(
        "yolov2-tiny",
        "YOLOv2-tiny VOC (darknet)",
        DARKNET,
        false,
        zoo::yolov2_tiny,
    ),
    entry(
        "resnet18",
        "torchvision ResNet-18",
        IMAGENET,
        false,
        zoo::resnet18,
    ),
    entry(
        "resnet50",
        "torchvision ResNet-50",
        IMAGENET,
        false,
        zoo::resnet50,
    ),
    entry(
        "mobilenetv2",
        "torchvision MobileNetV2",
        IMAGENET,
        false,
        zoo::mobilenetv2,
    ),
    entry(
        "yolov8n",
        "ultralytics YOLOv8n (80 classes), three scales, export-time DFL head",
        [1, 3, 640, 640],
        false,
        zoo::yolov8n,
    ),
    entry(
        "convnext-tiny",
        "torchvision ConvNeXt-Tiny, LayerNorm and GELU decomposed as at opset 13",
        IMAGENET,
        false,
        zoo::convnext_tiny,
    ),
    entry(
        "efficientnet-b0",
        "torchvision EfficientNet-B0: MBConv, SiLU, squeeze-excitation",
        IMAGENET,
        false,
        zoo::efficientnet_b0,
    ),
    entry(
        "shufflenetv2",
        "torchvision ShuffleNetV2 x1.0: channel Split, Concat, shuffle",
        IMAGENET,
        false,
        zoo::shufflenetv2,
    ),
    entry(
        "calibration",
        "the emulator's fixed workload for a host's rate: VGG-16 at 112x112",
        [1, 3, 112, 112],
        false,
        zoo::calibration,
    ),
    entry(
        "tiny-cnn",
        "kernels 1/3/5, strides, dilation, asymmetric pads, ceil-mode and padded pools",
        [1, 3, 48, 40],
        true,
        tiny::tiny_cnn,
    ),
    entry(
        "tiny-residual",
        "identity and projected residual Adds, Inception-like Concat",
        SMALL,
        true,
        tiny::tiny_residual,
    ),
    entry(
        "tiny-yolo",
        "LeakyRelu, SpaceToDepth, reorg, Concat, nearest Resize x2",
        SMALL,
        true,
        tiny::tiny_yolo,
    ),
    entry(
        "tiny-mobile",
        "depthwise and grouped convs, Clip, HardSigmoid, SiLU, inverted residual, Softmax head",
        SMALL,
        true,
        tiny::tiny_mobile,
    ),
    entry(
        "tiny-nhwc",
        "NHWC input with Transposes around the convs (tf2onnx style)",
        [1, 32, 32, 3],
        true,
        tiny::tiny_nhwc,
    ),
    entry(
        "tiny-unknown-op",
        "an LRN between convs: loadable by tract, not modelled by Legion",
        SMALL,
        true,
        tiny::tiny_unknown_op,
    ),
    entry(
        "tiny-head",
        "conv, pool, Flatten, Gemm, Dropout, Identity, Softmax",
        [1, 3, 16, 16],
        true,
        tiny::tiny_head,
    ),
    entry(
        "tiny-yolov8",
        "YOLOv8 miniature: C2f Split, SPPF, Resize FPN, two scales, DFL head",
        SMALL64,
        true,
        tiny::tiny_yolov8,
    ),
    entry(
        "tiny-convnext",
        "ConvNeXt miniature: 7x7 depthwise, Cast, LayerNorm, MatMul, GELU (Erf)",
        SMALL64,
        true,
        tiny::tiny_convnext,
    ),
    entry(
        "tiny-effnet",
        "EfficientNet miniature: MBConv, SiLU, squeeze-excitation Mul",
        SMALL64,
        true,
        tiny::tiny_effnet,
    ),
    entry(
        "tiny-shuffle",
        "ShuffleNetV2 miniature: channel Split, Concat, 5-D Reshape/Transpose shuffle",
        SMALL64,
        true,
        tiny::tiny_shuffle,
    ),
    entry(
        "tiny-focus",
        "YOLOX Focus stem: four stride-2 Slice pairs on H and W, Concat",
        SMALL64,
        true,
        tiny::tiny_focus,
    ),
    entry(
        "tiny-transposed",
        "convs and a pool after a Transpose that swaps H and W of a non-square map",
        [1, 3, 24, 40],
        true,
        tiny::tiny_transposed,
    ),
];

/// Every model, in a stable order.
pub fn catalog() -> &'static [ModelSpec] {
    &CATALOG
}

/// The catalog entry `name`; the error for an unknown name lists the valid ones.
pub fn spec(name: &str) -> Result<&'static ModelSpec> {
    CATALOG.iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<_> = CATALOG.iter().map(|s| s.name).collect();
        anyhow!("unknown model {name:?}; valid names: {}", names.join(", "))
    })
}

/// Builds model `name`; the error for an unknown name lists the valid ones.
pub fn build(name: &str) -> Result<ModelProto> {
    let spec = spec(name)?;
    let mut b = GraphBuilder::new(spec.name);
    let x = b.input("input", &spec.input_shape);
    let y = (spec.define)(&mut b, x);
    Ok(b.finish(spec.description, &[&y]))
}

/// The encoded ONNX bytes of model `name`.
pub fn bytes(name: &str) -> Result<Vec<u8>> {
    Ok(build(name)?.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_name_lists_valid_ones() {
        let err = build("vgg17").unwrap_err().to_string();
        assert!(err.contains("vgg17") && err.contains("vgg16, vgg19") && err.contains("tiny-head"));
    }

    #[test]
    fn names_are_unique_and_tiny_models_are_committed() {
        for (i, s) in CATALOG.iter().enumerate() {
            assert!(CATALOG[..i].iter().all(|t| t.name != s.name), "{}", s.name);
            assert_eq!(s.committed, s.name.starts_with("tiny-"), "{}", s.name);
        }
    }

    #[test]
    fn tiny_models_are_deterministic_and_small() {
        for s in CATALOG.iter().filter(|s| s.committed) {
            let a = bytes(s.name).unwrap();
            assert_eq!(a, bytes(s.name).unwrap(), "{}", s.name);
            assert!(a.len() < 1 << 20, "{} is {} bytes", s.name, a.len());
        }
    }

    #[test]
    fn models_carry_metadata_and_name_everything() {
        let model = build("tiny-yolo").unwrap();
        assert_eq!((model.ir_version, model.opset_import[0].version), (8, 13));
        assert_eq!(model.producer_name, "legion-models");
        let graph = model.graph.unwrap();
        assert!(
            graph
                .node
                .iter()
                .all(|n| !n.name.is_empty() && n.output == [n.name.clone()])
        );
        assert!(
            graph
                .initializer
                .iter()
                .all(|t| !t.name.is_empty() && !t.raw_data.is_empty())
        );
        let names: Vec<_> = graph.node.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names[..4], ["conv0", "bn0", "leaky0", "pool1"]);
    }

    #[test]
    fn big_model_is_deterministic() {
        assert_eq!(bytes("resnet18").unwrap(), bytes("resnet18").unwrap());
    }
}
