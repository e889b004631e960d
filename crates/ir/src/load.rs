//! Reading an ONNX file into a typed tract model, with the checks that give users clear errors.

use crate::error::ImportError;
use prost::Message;
use std::path::Path;
use tract_onnx::pb::{self, tensor_proto::DataType, tensor_shape_proto::dimension, type_proto};
use tract_onnx::prelude::*;

/// A model read from disk and typed by tract at a concrete input shape.
pub struct LoadedModel {
    /// The typed model, analysed right after `into_typed()` and constant propagation
    /// (no declutter: it would turn 1x1 convs into matmuls).
    pub typed: TypedModel,
    /// The concrete input shape it was typed with.
    pub input_shape: Vec<usize>,
    /// Name of the graph input.
    pub input_name: String,
    /// sha256 of the file's bytes, lowercase hex.
    pub sha256: String,
}

/// Reads `path`, checks its single f32 input, fixes the input shape (the declared one, or
/// `input_shape` when given) and types the graph with tract.
pub fn load(path: &Path, input_shape: Option<&[usize]>) -> Result<LoadedModel, ImportError> {
    let bytes = std::fs::read(path).map_err(|source| ImportError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    let mut proto = decode(path, &bytes)?;
    forget_stored_shapes(&mut proto);
    let graph = proto.graph.as_ref().expect("decode checks the graph");
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    let [input] = inputs[..] else {
        return Err(ImportError::InputCount {
            path: path.to_owned(),
            count: inputs.len(),
        });
    };
    let (elem_type, dims) = declared_input(input);
    if elem_type != DataType::Float as i32 {
        let found = DataType::try_from(elem_type)
            .map(|t| t.as_str_name().to_owned())
            .unwrap_or_else(|_| format!("code {elem_type}"));
        return Err(ImportError::NotF32 {
            path: path.to_owned(),
            input: input.name.clone(),
            found,
        });
    }
    let shape = resolve_shape(path, &input.name, &dims, input_shape)?;
    let tract_err = |e: TractError| ImportError::Tract {
        path: path.to_owned(),
        detail: format!("{e:#}").replace('\n', " "),
    };
    let dir = path.parent().and_then(|p| p.to_str());
    let parsed = tract_onnx::onnx().parse(&proto, dir).map_err(tract_err)?;
    unsupported_ops(path, &proto, &parsed.model)?;
    let typed = parsed
        .model
        .with_input_fact(0, f32::fact(&shape).into())
        .and_then(|m| m.into_typed())
        .and_then(|mut m| {
            // Folds constant subgraphs (a Cast on a bias) into Const nodes; unlike
            // declutter it keeps Conv ops as they are.
            m.prop_consts()?;
            Ok(m)
        })
        .map_err(tract_err)?;
    Ok(LoadedModel {
        typed,
        input_shape: shape,
        input_name: input.name.clone(),
        sha256: sha256_hex(&bytes),
    })
}

fn decode(path: &Path, bytes: &[u8]) -> Result<pb::ModelProto, ImportError> {
    let proto = pb::ModelProto::decode(bytes).map_err(|e| {
        let detail = e.to_string();
        // A file that starts like an ONNX model (field 1, ir_version) and then runs out in
        // the middle of a field or a number was cut short.
        let cut = detail.contains("buffer underflow") || detail.contains("invalid varint");
        if cut && bytes.first() == Some(&0x08) {
            ImportError::Truncated {
                path: path.to_owned(),
                detail,
            }
        } else {
            ImportError::NotOnnx {
                path: path.to_owned(),
                detail,
            }
        }
    })?;
    match &proto.graph {
        Some(g) if !g.node.is_empty() => Ok(proto),
        _ if proto.ir_version > 0 && !bytes.is_empty() => Err(ImportError::Truncated {
            path: path.to_owned(),
            detail: "the graph holds no nodes".into(),
        }),
        _ => Err(ImportError::NotOnnx {
            path: path.to_owned(),
            detail: "no graph in the protobuf".into(),
        }),
    }
}

/// Drops the shapes the file stores for intermediate values and outputs (ONNX shape
/// inference writes them into `value_info`): they were derived for the exported input
/// shape and a symbolic batch, so they contradict any other input shape. tract derives
/// every shape again from the input; element types are kept.
fn forget_stored_shapes(proto: &mut pb::ModelProto) {
    let graph = proto.graph.as_mut().expect("decode checks the graph");
    graph.value_info.clear();
    for output in &mut graph.output {
        if let Some(type_proto::Value::TensorType(t)) =
            output.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            t.shape = None;
        }
    }
}

/// Fails on the first node tract has no implementation for, naming it, its op and
/// domain, and what to do.
fn unsupported_ops(
    path: &Path,
    proto: &pb::ModelProto,
    model: &InferenceModel,
) -> Result<(), ImportError> {
    let graph = proto.graph.as_ref().expect("decode checks the graph");
    for node in model.nodes() {
        let name = node.op.name();
        let Some(op) = name
            .strip_prefix("Unimplemented(")
            .and_then(|n| n.strip_suffix(')'))
        else {
            continue;
        };
        // tract names unnamed nodes itself: then the first node of that op says.
        let domain = graph
            .node
            .iter()
            .find(|n| n.name == node.name && n.op_type == op)
            .or_else(|| graph.node.iter().find(|n| n.op_type == op))
            .map(|n| n.domain.clone())
            .unwrap_or_default();
        return Err(ImportError::UnsupportedOp {
            path: path.to_owned(),
            node: node.name.clone(),
            op: op.to_owned(),
            domain: if domain.is_empty() {
                "ai.onnx".into()
            } else {
                domain
            },
        });
    }
    Ok(())
}

/// A declared dimension: a size, a symbol, or nothing.
enum Dim {
    Fixed(usize),
    Symbol(String),
}

fn declared_input(input: &pb::ValueInfoProto) -> (i32, Vec<Dim>) {
    let Some(type_proto::Value::TensorType(t)) =
        input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return (DataType::Undefined as i32, vec![]);
    };
    let dims = t
        .shape
        .iter()
        .flat_map(|s| &s.dim)
        .map(|d| match &d.value {
            Some(dimension::Value::DimValue(v)) if *v > 0 => Dim::Fixed(*v as usize),
            Some(dimension::Value::DimParam(p)) if !p.is_empty() => Dim::Symbol(p.clone()),
            _ => Dim::Symbol("?".into()),
        })
        .collect();
    (t.elem_type, dims)
}

fn resolve_shape(
    path: &Path,
    input: &str,
    dims: &[Dim],
    given: Option<&[usize]>,
) -> Result<Vec<usize>, ImportError> {
    let declared = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => v.to_string(),
            Dim::Symbol(s) => s.clone(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let Some(given) = given else {
        if dims.is_empty() {
            return Err(ImportError::DynamicInput {
                path: path.to_owned(),
                input: input.into(),
                dims: "no shape declared".into(),
                example: "1,3,224,224".into(),
            });
        }
        // A symbolic batch alone is a batch of one: Legion runs one inference at a time.
        return dims
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Fixed(v) => Some(*v),
                Dim::Symbol(_) if i == 0 && dims.len() == 4 => Some(1),
                Dim::Symbol(_) => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ImportError::DynamicInput {
                path: path.to_owned(),
                input: input.into(),
                dims: declared.clone(),
                example: suggest(dims),
            });
    };
    let bad = |why: String| ImportError::BadInputShape {
        path: path.to_owned(),
        input: input.into(),
        given: given
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(","),
        dims: declared.clone(),
        why,
    };
    if !dims.is_empty() && dims.len() != given.len() {
        return Err(bad(format!(
            "the model declares {} dims, {} given",
            dims.len(),
            given.len()
        )));
    }
    if given.contains(&0) {
        return Err(bad("every dim must be at least 1".into()));
    }
    Ok(given.to_vec())
}

/// A concrete shape to suggest: fixed dims kept, batch 1, channels 3, spatial 224.
fn suggest(dims: &[Dim]) -> String {
    let channels_last = matches!(dims.get(3), Some(Dim::Fixed(c)) if *c <= 4);
    dims.iter()
        .enumerate()
        .map(|(i, d)| match d {
            Dim::Fixed(v) => v.to_string(),
            Dim::Symbol(_) if i == 0 => "1".into(),
            Dim::Symbol(_) if (i == 1 && !channels_last) || (i == 3 && channels_last) => "3".into(),
            Dim::Symbol(_) => "224".into(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
