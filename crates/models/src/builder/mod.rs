//! A small ONNX graph builder that tracks shapes and counts conv MACs.
//!
//! Every method takes the node's name, which also names its (single) output
//! tensor; parameters are named `NODE.weight`, `NODE.bias`, `NODE.mean`, ...
//! Shapes are computed here, so callers never spell out reshape constants or
//! GEMM input sizes. Misuse (a duplicate name, mismatched shapes) is a bug in
//! the model definition and panics with a message naming the node.

mod params;
mod proto;

pub use params::{Conv, Pool};

use std::collections::HashSet;

use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    ValueInfoProto,
};

use crate::weights::uniform_le;
use params::window_out;
use proto::{attr_float, attr_int, attr_ints, attr_string, value_info};

/// ONNX IR version written in every model.
pub const IR_VERSION: i64 = 8;
/// Default-domain opset written in every model.
pub const OPSET: i64 = 13;
/// BatchNormalization epsilon.
const BN_EPSILON: f32 = 1e-5;

/// A value (tensor) of the graph under construction: its name and static shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    name: String,
    shape: Vec<usize>,
}

impl Value {
    /// The ONNX value name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The static shape, NCHW for 4-D tensors unless the model says otherwise.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn nchw(&self, node: &str) -> [usize; 4] {
        self.shape
            .as_slice()
            .try_into()
            .unwrap_or_else(|_| panic!("{node}: input {} is not 4-D: {:?}", self.name, self.shape))
    }
}

/// Builds one ONNX graph; see the module docs.
pub struct GraphBuilder {
    model: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    names: HashSet<String>,
    conv_macs: u64,
}

impl GraphBuilder {
    /// A builder for model `model`; the name also seeds every weight.
    pub fn new(model: &str) -> Self {
        GraphBuilder {
            model: model.into(),
            nodes: vec![],
            initializers: vec![],
            inputs: vec![],
            names: HashSet::new(),
            conv_macs: 0,
        }
    }

    /// Multiply-accumulates of all convs added so far (batch included).
    pub fn conv_macs(&self) -> u64 {
        self.conv_macs
    }

    fn claim(&mut self, name: &str) {
        assert!(
            self.names.insert(name.into()),
            "duplicate name {name:?} in {}",
            self.model
        );
    }

    /// Declares an f32 graph input.
    pub fn input(&mut self, name: &str, shape: &[usize]) -> Value {
        self.claim(name);
        self.inputs.push(value_info(name, DataType::Float, shape));
        Value {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    fn initializer(&mut self, name: String, data_type: DataType, dims: &[usize], raw: Vec<u8>) {
        self.claim(&name);
        self.initializers.push(TensorProto {
            name,
            data_type: data_type as i32,
            dims: dims.iter().map(|&d| d as i64).collect(),
            raw_data: raw,
            ..Default::default()
        });
    }

    /// A random f32 initializer `NODE.SUFFIX`, uniform in `[lo, hi)`.
    fn random(&mut self, node: &str, suffix: &str, dims: &[usize], lo: f32, hi: f32) -> String {
        let name = format!("{node}.{suffix}");
        let raw = uniform_le(&self.model, &name, dims.iter().product(), lo, hi);
        self.initializer(name.clone(), DataType::Float, dims, raw);
        name
    }

    fn const_f32(&mut self, node: &str, suffix: &str, dims: &[usize], values: &[f32]) -> String {
        let name = format!("{node}.{suffix}");
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name.clone(), DataType::Float, dims, raw);
        name
    }

    fn const_i64(&mut self, node: &str, suffix: &str, values: &[usize]) -> String {
        let name = format!("{node}.{suffix}");
        let raw = values
            .iter()
            .flat_map(|&v| (v as i64).to_le_bytes())
            .collect();
        self.initializer(name.clone(), DataType::Int64, &[values.len()], raw);
        name
    }

    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: Vec<String>,
        attribute: Vec<AttributeProto>,
        shape: Vec<usize>,
    ) -> Value {
        self.claim(name);
        self.nodes.push(NodeProto {
            input: inputs,
            output: vec![name.into()],
            name: name.into(),
            op_type: op.into(),
            attribute,
            ..Default::default()
        });
        Value {
            name: name.into(),
            shape,
        }
    }

    /// An elementwise op with one input and the input's shape.
    fn unary(&mut self, op: &str, name: &str, x: &Value, attrs: Vec<AttributeProto>) -> Value {
        self.node(op, name, vec![x.name.clone()], attrs, x.shape.clone())
    }

    /// Conv with He-uniform weights (`±sqrt(6 / fan_in)`) and a small bias.
    pub fn conv(&mut self, name: &str, x: &Value, c: Conv) -> Value {
        let [n, cin, h, w] = x.nchw(name);
        assert!(
            cin.is_multiple_of(c.group) && c.out_channels.is_multiple_of(c.group),
            "{name}: group {} does not divide {cin} -> {}",
            c.group,
            c.out_channels
        );
        let [kh, kw] = c.kernel;
        let oh = window_out(
            h,
            kh,
            c.stride[0],
            c.dilation[0],
            (c.pads[0], c.pads[2]),
            false,
        );
        let ow = window_out(
            w,
            kw,
            c.stride[1],
            c.dilation[1],
            (c.pads[1], c.pads[3]),
            false,
        );
        let fan_in = cin / c.group * kh * kw;
        self.conv_macs += (n * c.out_channels * oh * ow * fan_in) as u64;
        let bound = (6.0 / fan_in as f32).sqrt();
        let mut inputs = vec![x.name.clone()];
        inputs.push(self.random(
            name,
            "weight",
            &[c.out_channels, cin / c.group, kh, kw],
            -bound,
            bound,
        ));
        if c.bias {
            inputs.push(self.random(name, "bias", &[c.out_channels], -0.1, 0.1));
        }
        let attrs = vec![
            attr_ints("kernel_shape", &c.kernel),
            attr_ints("strides", &c.stride),
            attr_ints("pads", &c.pads),
            attr_ints("dilations", &c.dilation),
            attr_int("group", c.group as i64),
        ];
        self.node("Conv", name, inputs, attrs, vec![n, c.out_channels, oh, ow])
    }

    /// BatchNormalization (inference) with non-trivial random statistics.
    pub fn batch_norm(&mut self, name: &str, x: &Value) -> Value {
        let c = [x.nchw(name)[1]];
        let inputs = vec![
            x.name.clone(),
            self.random(name, "scale", &c, 0.5, 1.5),
            self.random(name, "bias", &c, -0.1, 0.1),
            self.random(name, "mean", &c, -0.1, 0.1),
            self.random(name, "var", &c, 0.5, 1.5),
        ];
        let attrs = vec![attr_float("epsilon", BN_EPSILON)];
        self.node("BatchNormalization", name, inputs, attrs, x.shape.clone())
    }

    /// Relu.
    pub fn relu(&mut self, name: &str, x: &Value) -> Value {
        self.unary("Relu", name, x, vec![])
    }

    /// LeakyRelu with slope `alpha`.
    pub fn leaky_relu(&mut self, name: &str, x: &Value, alpha: f32) -> Value {
        self.unary("LeakyRelu", name, x, vec![attr_float("alpha", alpha)])
    }

    /// Clip (opset 13: bounds as scalar initializers `NODE.min`, `NODE.max`).
    pub fn clip(&mut self, name: &str, x: &Value, min: f32, max: f32) -> Value {
        let inputs = vec![
            x.name.clone(),
            self.const_f32(name, "min", &[], &[min]),
            self.const_f32(name, "max", &[], &[max]),
        ];
        self.node("Clip", name, inputs, vec![], x.shape.clone())
    }

    /// Sigmoid.
    pub fn sigmoid(&mut self, name: &str, x: &Value) -> Value {
        self.unary("Sigmoid", name, x, vec![])
    }

    /// HardSigmoid as PyTorch exports it (alpha 1/6, beta 0.5).
    pub fn hard_sigmoid(&mut self, name: &str, x: &Value) -> Value {
        let attrs = vec![attr_float("alpha", 1.0 / 6.0), attr_float("beta", 0.5)];
        self.unary("HardSigmoid", name, x, attrs)
    }

    /// SiLU as `Mul(x, Sigmoid(x))`; the Sigmoid node is `NAME.sigmoid`.
    pub fn silu(&mut self, name: &str, x: &Value) -> Value {
        let s = self.sigmoid(&format!("{name}.sigmoid"), x);
        self.node(
            "Mul",
            name,
            vec![x.name.clone(), s.name],
            vec![],
            x.shape.clone(),
        )
    }

    /// LocalResponseNormalization across `size` channels (AlexNet constants).
    pub fn lrn(&mut self, name: &str, x: &Value, size: usize) -> Value {
        let attrs = vec![
            attr_int("size", size as i64),
            attr_float("alpha", 1e-4),
            attr_float("beta", 0.75),
            attr_float("bias", 1.0),
        ];
        self.unary("LRN", name, x, attrs)
    }

    fn pool(
        &mut self,
        op: &str,
        name: &str,
        x: &Value,
        p: Pool,
        extra: Vec<AttributeProto>,
    ) -> Value {
        let [n, c, h, w] = x.nchw(name);
        let oh = window_out(
            h,
            p.kernel[0],
            p.stride[0],
            1,
            (p.pads[0], p.pads[2]),
            p.ceil_mode,
        );
        let ow = window_out(
            w,
            p.kernel[1],
            p.stride[1],
            1,
            (p.pads[1], p.pads[3]),
            p.ceil_mode,
        );
        let mut attrs = vec![
            attr_ints("kernel_shape", &p.kernel),
            attr_ints("strides", &p.stride),
            attr_ints("pads", &p.pads),
            attr_int("ceil_mode", p.ceil_mode.into()),
        ];
        attrs.extend(extra);
        self.node(op, name, vec![x.name.clone()], attrs, vec![n, c, oh, ow])
    }

    /// MaxPool (`count_include_pad` is ignored).
    pub fn max_pool(&mut self, name: &str, x: &Value, p: Pool) -> Value {
        self.pool("MaxPool", name, x, p, vec![])
    }

    /// AveragePool.
    pub fn avg_pool(&mut self, name: &str, x: &Value, p: Pool) -> Value {
        let extra = vec![attr_int("count_include_pad", p.count_include_pad.into())];
        self.pool("AveragePool", name, x, p, extra)
    }

    /// GlobalAveragePool: `[N, C, 1, 1]`.
    pub fn global_average_pool(&mut self, name: &str, x: &Value) -> Value {
        let [n, c, _, _] = x.nchw(name);
        self.node(
            "GlobalAveragePool",
            name,
            vec![x.name.clone()],
            vec![],
            vec![n, c, 1, 1],
        )
    }

    /// Elementwise Add of two tensors of the same shape.
    pub fn add(&mut self, name: &str, a: &Value, b: &Value) -> Value {
        assert_eq!(a.shape, b.shape, "{name}: Add of {} and {}", a.name, b.name);
        self.node(
            "Add",
            name,
            vec![a.name.clone(), b.name.clone()],
            vec![],
            a.shape.clone(),
        )
    }

    /// Concat on the channel axis (1).
    pub fn concat(&mut self, name: &str, parts: &[&Value]) -> Value {
        let mut shape = parts[0].nchw(name);
        shape[1] = 0;
        for p in parts {
            let s = p.nchw(name);
            assert!(
                s[0] == shape[0] && s[2..] == shape[2..],
                "{name}: Concat of {} {s:?} with {shape:?}",
                p.name
            );
            shape[1] += s[1];
        }
        let inputs = parts.iter().map(|p| p.name.clone()).collect();
        self.node(
            "Concat",
            name,
            inputs,
            vec![attr_int("axis", 1)],
            shape.to_vec(),
        )
    }

    /// Transpose with permutation `perm`.
    pub fn transpose(&mut self, name: &str, x: &Value, perm: &[usize]) -> Value {
        assert_eq!(perm.len(), x.shape.len(), "{name}: perm {perm:?}");
        let shape = perm.iter().map(|&p| x.shape[p]).collect();
        self.node(
            "Transpose",
            name,
            vec![x.name.clone()],
            vec![attr_ints("perm", perm)],
            shape,
        )
    }

    fn reshape(&mut self, name: &str, x: &Value, shape: &[usize]) -> Value {
        assert_eq!(
            x.shape.iter().product::<usize>(),
            shape.iter().product::<usize>(),
            "{name}: Reshape {:?} to {shape:?}",
            x.shape
        );
        let target = self.const_i64(name, "shape", shape);
        self.node(
            "Reshape",
            name,
            vec![x.name.clone(), target],
            vec![],
            shape.to_vec(),
        )
    }

    /// ONNX SpaceToDepth with `blocksize = block`.
    pub fn space_to_depth(&mut self, name: &str, x: &Value, block: usize) -> Value {
        let [n, c, h, w] = x.nchw(name);
        assert!(
            h.is_multiple_of(block) && w.is_multiple_of(block),
            "{name}: {h}x{w} not divisible by {block}"
        );
        let attrs = vec![attr_int("blocksize", block as i64)];
        let shape = vec![n, c * block * block, h / block, w / block];
        self.node("SpaceToDepth", name, vec![x.name.clone()], attrs, shape)
    }

    /// Darknet-style reorg (YOLOv2 passthrough) as three nodes:
    /// `NAME.split` Reshape `[N,C,H/b,b,W/b,b]`, `NAME.perm` Transpose
    /// `[0,3,5,1,2,4]`, and `NAME` Reshape `[N,C*b*b,H/b,W/b]`.
    pub fn reorg(&mut self, name: &str, x: &Value, b: usize) -> Value {
        let [n, c, h, w] = x.nchw(name);
        assert!(
            h.is_multiple_of(b) && w.is_multiple_of(b),
            "{name}: {h}x{w} not divisible by {b}"
        );
        let split = self.reshape(&format!("{name}.split"), x, &[n, c, h / b, b, w / b, b]);
        let perm = self.transpose(&format!("{name}.perm"), &split, &[0, 3, 5, 1, 2, 4]);
        self.reshape(name, &perm, &[n, c * b * b, h / b, w / b])
    }

    /// Nearest-neighbour upsampling by an integer `factor` via Resize with a
    /// `scales` input `NAME.scales` (as PyTorch's `nn.Upsample` exports it).
    pub fn upsample(&mut self, name: &str, x: &Value, factor: usize) -> Value {
        let [n, c, h, w] = x.nchw(name);
        let f = factor as f32;
        let scales = self.const_f32(name, "scales", &[4], &[1.0, 1.0, f, f]);
        let attrs = vec![
            attr_string("mode", "nearest"),
            attr_string("coordinate_transformation_mode", "asymmetric"),
            attr_string("nearest_mode", "floor"),
        ];
        let inputs = vec![x.name.clone(), String::new(), scales];
        self.node(
            "Resize",
            name,
            inputs,
            attrs,
            vec![n, c, h * factor, w * factor],
        )
    }

    /// Flatten (axis 1): `[N, rest]`.
    pub fn flatten(&mut self, name: &str, x: &Value) -> Value {
        let shape = vec![x.shape[0], x.shape[1..].iter().product()];
        self.node(
            "Flatten",
            name,
            vec![x.name.clone()],
            vec![attr_int("axis", 1)],
            shape,
        )
    }

    /// Gemm `x * W^T + b` (transB = 1) with He-uniform weights; `x` is `[N, K]`.
    pub fn gemm(&mut self, name: &str, x: &Value, out_features: usize) -> Value {
        let [n, k] = x.shape[..] else {
            panic!("{name}: Gemm input {:?} is not 2-D", x.shape)
        };
        let bound = (6.0 / k as f32).sqrt();
        let inputs = vec![
            x.name.clone(),
            self.random(name, "weight", &[out_features, k], -bound, bound),
            self.random(name, "bias", &[out_features], -0.1, 0.1),
        ];
        self.node(
            "Gemm",
            name,
            inputs,
            vec![attr_int("transB", 1)],
            vec![n, out_features],
        )
    }

    /// Identity.
    pub fn identity(&mut self, name: &str, x: &Value) -> Value {
        self.unary("Identity", name, x, vec![])
    }

    /// Dropout (a no-op at inference; default ratio).
    pub fn dropout(&mut self, name: &str, x: &Value) -> Value {
        self.unary("Dropout", name, x, vec![])
    }

    /// Softmax over the last axis.
    pub fn softmax(&mut self, name: &str, x: &Value) -> Value {
        let axis = attr_int("axis", x.shape.len() as i64 - 1);
        self.unary("Softmax", name, x, vec![axis])
    }

    /// The finished model; `outputs` become the graph outputs.
    pub fn finish(self, doc: &str, outputs: &[&Value]) -> ModelProto {
        let output = outputs
            .iter()
            .map(|t| value_info(&t.name, DataType::Float, &t.shape))
            .collect();
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "legion-models".into(),
            producer_version: crate::GENERATOR_VERSION.to_string(),
            doc_string: doc.into(),
            graph: Some(GraphProto {
                name: self.model,
                node: self.nodes,
                initializer: self.initializers,
                input: self.inputs,
                output,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reorg_shapes_and_names() {
        let mut b = GraphBuilder::new("t");
        let x = b.input("x", &[1, 64, 26, 26]);
        let y = b.reorg("reorg", &x, 2);
        assert_eq!(y.shape(), [1, 256, 13, 13]);
        let m = b.finish("", &[&y]);
        let g = m.graph.unwrap();
        let ops: Vec<_> = g
            .node
            .iter()
            .map(|n| (n.name.as_str(), n.op_type.as_str()))
            .collect();
        assert_eq!(
            ops,
            [
                ("reorg.split", "Reshape"),
                ("reorg.perm", "Transpose"),
                ("reorg", "Reshape")
            ]
        );
        assert_eq!(g.initializer[0].name, "reorg.split.shape");
        assert_eq!(g.initializer[0].raw_data.len(), 6 * 8);
    }

    #[test]
    #[should_panic(expected = "duplicate name")]
    fn duplicate_names_panic() {
        let mut b = GraphBuilder::new("t");
        let x = b.input("x", &[1, 3, 8, 8]);
        b.relu("r", &x);
        b.relu("r", &x);
    }
}
