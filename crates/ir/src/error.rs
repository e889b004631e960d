//! Import failures a caller can match on (the CLI maps all of them to exit code 2).

use std::path::PathBuf;

/// Why a model could not be imported. Every message names the file (and the input or
/// node where that helps) and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file does not exist or cannot be read.
    #[error("{path}: cannot read the model file ({source}); check the path")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The bytes are not an ONNX protobuf at all.
    #[error("{path}: not an ONNX model ({detail}); pass a .onnx file exported by a framework")]
    NotOnnx {
        /// The file.
        path: PathBuf,
        /// What the decoder saw.
        detail: String,
    },
    /// The protobuf ends early: the file was cut short.
    #[error("{path}: the ONNX file is truncated ({detail}); copy or export it again")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What the decoder saw.
        detail: String,
    },
    /// The input has symbolic or missing dimensions and none were given.
    #[error(
        "{path}: input '{input}' has a dynamic shape [{dims}]; give a concrete one with --input-shape, e.g. --input-shape {example}"
    )]
    DynamicInput {
        /// The file.
        path: PathBuf,
        /// Name of the graph input.
        input: String,
        /// The declared dims, symbols included.
        dims: String,
        /// A concrete shape to suggest.
        example: String,
    },
    /// The input is not f32.
    #[error(
        "{path}: input '{input}' has element type {found}; Legion runs f32 models only, export the model in float32"
    )]
    NotF32 {
        /// The file.
        path: PathBuf,
        /// Name of the graph input.
        input: String,
        /// The declared ONNX element type.
        found: String,
    },
    /// The model has no input, or more than one.
    #[error("{path}: the graph has {count} inputs; Legion needs exactly one image input")]
    InputCount {
        /// The file.
        path: PathBuf,
        /// Number of non-initializer inputs.
        count: usize,
    },
    /// `--input-shape` does not fit the model.
    #[error("{path}: --input-shape {given} does not fit input '{input}' [{dims}]: {why}")]
    BadInputShape {
        /// The file.
        path: PathBuf,
        /// Name of the graph input.
        input: String,
        /// What the user gave.
        given: String,
        /// The declared dims.
        dims: String,
        /// What is wrong.
        why: String,
    },
    /// A node's op has no implementation in tract (a contrib or quantized op).
    #[error(
        "{path}: node '{node}' is a {op} op (domain {domain}), which tract cannot run; {}",
        unsupported_hint(.op, .domain)
    )]
    UnsupportedOp {
        /// The file.
        path: PathBuf,
        /// Name of the node.
        node: String,
        /// Its ONNX op type.
        op: String,
        /// Its ONNX domain (`ai.onnx` for the default one).
        domain: String,
    },
    /// tract rejected the model (inconsistent shapes, an attribute it does not take).
    #[error("{path}: tract cannot load the model: {detail}")]
    Tract {
        /// The file.
        path: PathBuf,
        /// tract's error chain, one line.
        detail: String,
    },
}

/// What to do about an op tract cannot run.
fn unsupported_hint(op: &str, domain: &str) -> String {
    let quantized = op.contains("Quantize") || op.starts_with("QLinear") || op.contains("Integer");
    if quantized {
        "it is a quantized op: give Legion the float32 model (before quantization)".into()
    } else if domain != "ai.onnx" {
        format!(
            "ops of the {domain} domain are runtime-specific contrib ops: export the model \
             with standard ONNX ops only (save an onnxruntime-optimized model before its \
             optimizations)"
        )
    } else {
        "export the model at another opset, or replace the op with standard ones tract \
         supports"
            .into()
    }
}
