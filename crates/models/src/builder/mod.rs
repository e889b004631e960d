//! A small ONNX graph builder that tracks shapes and counts conv MACs.
//!
//! Every method takes the node's name, which also names its (single) output
//! tensor; parameters are named `NODE.weight`, `NODE.bias`, `NODE.mean`, ...
//! Shapes are computed here, so callers never spell out reshape constants or
//! GEMM input sizes. Misuse (a duplicate name, mismatched shapes) is a bug in
//! the model definition and panics with a message naming the node.

mod params;
mod proto;

pub use params::{Conv, Operand, Pool};
pub(crate) use proto::value_info;

use std::collections::HashSet;

use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    ValueInfoProto,
};

use crate::weights::uniform_le;
use params::window_out;
use proto::{attr_float, attr_int, attr_ints, attr_string};

/// ONNX IR version written in every model.
pub const IR_VERSION: i64 = 8;
/// Default-domain opset written in every model.
pub const OPSET: i64 = 13;
/// BatchNormalization epsilon.
const BN_EPSILON: f32 = 1e-5;
/// The divisor of GELU's Erf argument, as PyTorch exports it.
const SQRT_2: f32 = std::f32::consts::SQRT_2;

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

    fn const_i64(&mut self, node: &str, suffix: &str, values: &[i64]) -> String {
        let name = format!("{node}.{suffix}");
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
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
        self.conv_weighted(name, x, c, None)
    }

    /// Conv whose weight `NAME.weight` holds the given values (row-major
    /// `[out, in / group, kh, kw]`), such as YOLOv8's DFL `0..16` projection;
    /// a bias, if `c` has one, is random as in [`GraphBuilder::conv`].
    pub fn conv_with_weight(&mut self, name: &str, x: &Value, c: Conv, weight: &[f32]) -> Value {
        self.conv_weighted(name, x, c, Some(weight))
    }

    fn conv_weighted(&mut self, name: &str, x: &Value, c: Conv, weight: Option<&[f32]>) -> Value {
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
        let dims = [c.out_channels, cin / c.group, kh, kw];
        let weight = match weight {
            Some(values) => {
                assert_eq!(
                    values.len(),
                    dims.iter().product::<usize>(),
                    "{name}: weight values for {dims:?}"
                );
                self.const_f32(name, "weight", &dims, values)
            }
            None => {
                let bound = (6.0 / fan_in as f32).sqrt();
                self.random(name, "weight", &dims, -bound, bound)
            }
        };
        let mut inputs = vec![x.name.clone(), weight];
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

    /// An elementwise op of two inputs with numpy broadcasting.
    fn binary(&mut self, op: &str, name: &str, a: &Value, b: &Value) -> Value {
        let shape = broadcast(&a.shape, &b.shape).unwrap_or_else(|| {
            panic!(
                "{name}: {op} of {} {:?} and {} {:?}",
                a.name, a.shape, b.name, b.shape
            )
        });
        self.node(
            op,
            name,
            vec![a.name.clone(), b.name.clone()],
            vec![],
            shape,
        )
    }

    /// Elementwise Add (numpy broadcasting).
    pub fn add(&mut self, name: &str, a: &Value, b: &Value) -> Value {
        self.binary("Add", name, a, b)
    }

    /// Elementwise Sub `a - b` (numpy broadcasting).
    pub fn sub(&mut self, name: &str, a: &Value, b: &Value) -> Value {
        self.binary("Sub", name, a, b)
    }

    /// Elementwise Mul (numpy broadcasting).
    pub fn mul(&mut self, name: &str, a: &Value, b: &Value) -> Value {
        self.binary("Mul", name, a, b)
    }

    /// Elementwise Div `a / b` (numpy broadcasting).
    pub fn div(&mut self, name: &str, a: &Value, b: &Value) -> Value {
        self.binary("Div", name, a, b)
    }

    /// An f32 initializer `name` with the given values, usable as an operand.
    pub fn constant(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Value {
        assert_eq!(
            values.len(),
            shape.iter().product::<usize>(),
            "constant {name}: values for {shape:?}"
        );
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name.into(), DataType::Float, shape, raw);
        Value {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// `op(x, c)` with a constant `c` stored as `NAME.value` (a scalar) or
    /// `NAME.{learned}` (learned values).
    fn binary_const(
        &mut self,
        op: &str,
        name: &str,
        x: &Value,
        c: Operand,
        learned: &str,
    ) -> Value {
        let (suffix, shape, raw) = match c {
            Operand::Scalar(v) => ("value", vec![], v.to_le_bytes().to_vec()),
            Operand::Learned { shape, lo, hi } => {
                let tensor = format!("{name}.{learned}");
                let len = shape.iter().product();
                (
                    learned,
                    shape.to_vec(),
                    uniform_le(&self.model, &tensor, len, lo, hi),
                )
            }
        };
        let c = Value {
            name: format!("{name}.{suffix}"),
            shape,
        };
        self.initializer(c.name.clone(), DataType::Float, &c.shape, raw);
        self.binary(op, name, x, &c)
    }

    /// Add of a constant: a scalar, or a learned bias `NAME.bias`.
    pub fn add_const(&mut self, name: &str, x: &Value, c: Operand) -> Value {
        self.binary_const("Add", name, x, c, "bias")
    }

    /// Mul by a constant: a scalar, or a learned scale `NAME.weight` (a
    /// LayerNorm gamma, a ConvNeXt layer scale).
    pub fn mul_const(&mut self, name: &str, x: &Value, c: Operand) -> Value {
        self.binary_const("Mul", name, x, c, "weight")
    }

    /// Div by a constant: a scalar, or learned values `NAME.weight`.
    pub fn div_const(&mut self, name: &str, x: &Value, c: Operand) -> Value {
        self.binary_const("Div", name, x, c, "weight")
    }

    /// Pow by the scalar `exponent`, stored as `NAME.value`.
    pub fn pow(&mut self, name: &str, x: &Value, exponent: f32) -> Value {
        let exponent = self.constant(&format!("{name}.value"), &[], &[exponent]);
        self.binary("Pow", name, x, &exponent)
    }

    /// Sqrt.
    pub fn sqrt(&mut self, name: &str, x: &Value) -> Value {
        self.unary("Sqrt", name, x, vec![])
    }

    /// Erf.
    pub fn erf(&mut self, name: &str, x: &Value) -> Value {
        self.unary("Erf", name, x, vec![])
    }

    /// Exact GELU as PyTorch exports it, `x * 0.5 * (1 + Erf(x / sqrt(2)))`,
    /// in nodes `NAME.div`, `NAME.erf`, `NAME.add`, `NAME.mul` and `NAME`
    /// (the Mul by 0.5).
    pub fn gelu(&mut self, name: &str, x: &Value) -> Value {
        let y = self.div_const(&format!("{name}.div"), x, Operand::Scalar(SQRT_2));
        let y = self.erf(&format!("{name}.erf"), &y);
        let y = self.add_const(&format!("{name}.add"), &y, Operand::Scalar(1.0));
        let y = self.mul(&format!("{name}.mul"), x, &y);
        self.mul_const(name, &y, Operand::Scalar(0.5))
    }

    /// ReduceMean over `axes` (opset 13: an attribute).
    pub fn reduce_mean(&mut self, name: &str, x: &Value, axes: &[usize], keepdims: bool) -> Value {
        assert!(
            axes.iter().all(|&a| a < x.shape.len()),
            "{name}: axes {axes:?} of {:?}",
            x.shape
        );
        let shape = (0..x.shape.len())
            .filter_map(|a| match (axes.contains(&a), keepdims) {
                (false, _) => Some(x.shape[a]),
                (true, true) => Some(1),
                (true, false) => None,
            })
            .collect();
        let attrs = vec![
            attr_ints("axes", axes),
            attr_int("keepdims", keepdims.into()),
        ];
        self.node("ReduceMean", name, vec![x.name.clone()], attrs, shape)
    }

    /// LayerNorm over the last axis as opset-13 exporters decompose it:
    /// `NAME.mean` ReduceMean, `NAME.sub`, `NAME.pow` (2), `NAME.var`
    /// ReduceMean, `NAME.add_eps`, `NAME.sqrt`, `NAME.div`, `NAME.mul` (learned
    /// gamma `NAME.mul.weight`) and `NAME` (learned beta `NAME.bias`).
    pub fn layer_norm(&mut self, name: &str, x: &Value, eps: f32) -> Value {
        let last = x.shape.len() - 1;
        let c = [x.shape[last]];
        let mean = self.reduce_mean(&format!("{name}.mean"), x, &[last], true);
        let centred = self.sub(&format!("{name}.sub"), x, &mean);
        let square = self.pow(&format!("{name}.pow"), &centred, 2.0);
        let var = self.reduce_mean(&format!("{name}.var"), &square, &[last], true);
        let var = self.add_const(&format!("{name}.add_eps"), &var, Operand::Scalar(eps));
        let std = self.sqrt(&format!("{name}.sqrt"), &var);
        let y = self.div(&format!("{name}.div"), &centred, &std);
        let gamma = Operand::Learned {
            shape: &c,
            lo: 0.5,
            hi: 1.5,
        };
        let y = self.mul_const(&format!("{name}.mul"), &y, gamma);
        let beta = Operand::Learned {
            shape: &c,
            lo: -0.1,
            hi: 0.1,
        };
        self.add_const(name, &y, beta)
    }

    /// A channels-last Linear: MatMul of `x` (`[..., K]`) by a He-uniform
    /// weight `NAME.weight` `[K, N]`, then, with `bias`, an Add of
    /// `NAME.bias` `[N]`. The MatMul node is `NAME.matmul` with a bias, `NAME`
    /// without.
    pub fn matmul(&mut self, name: &str, x: &Value, out_features: usize, bias: bool) -> Value {
        let k = *x
            .shape
            .last()
            .unwrap_or_else(|| panic!("{name}: MatMul of a scalar"));
        let bound = (6.0 / k as f32).sqrt();
        let weight = self.random(name, "weight", &[k, out_features], -bound, bound);
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("rank >= 1") = out_features;
        let matmul = if bias {
            format!("{name}.matmul")
        } else {
            name.into()
        };
        let y = self.node(
            "MatMul",
            &matmul,
            vec![x.name.clone(), weight],
            vec![],
            shape,
        );
        if !bias {
            return y;
        }
        let bias = Operand::Learned {
            shape: &[out_features],
            lo: -0.1,
            hi: 0.1,
        };
        self.add_const(name, &y, bias)
    }

    /// Cast to FLOAT (a no-op on f32, as mixed-precision exports emit before a LayerNorm).
    pub fn cast(&mut self, name: &str, x: &Value) -> Value {
        let to = attr_int("to", DataType::Float as i64);
        self.unary("Cast", name, x, vec![to])
    }

    /// Concat on the channel axis (1).
    pub fn concat(&mut self, name: &str, parts: &[&Value]) -> Value {
        self.concat_on(name, parts, 1)
    }

    /// Concat on `axis`; every other dim must match.
    pub fn concat_on(&mut self, name: &str, parts: &[&Value], axis: usize) -> Value {
        let mut shape = parts[0].shape.clone();
        assert!(
            axis < shape.len(),
            "{name}: Concat axis {axis} of {shape:?}"
        );
        shape[axis] = 0;
        for p in parts {
            let same_rank = p.shape.len() == shape.len();
            assert!(
                same_rank && (0..shape.len()).all(|a| a == axis || p.shape[a] == shape[a]),
                "{name}: Concat of {} {:?} with {shape:?} on axis {axis}",
                p.name,
                p.shape
            );
            shape[axis] += p.shape[axis];
        }
        let inputs = parts.iter().map(|p| p.name.clone()).collect();
        let attrs = vec![attr_int("axis", axis as i64)];
        self.node("Concat", name, inputs, attrs, shape)
    }

    /// Slice `start..end` (to the end with `None`, written as `i64::MAX` as
    /// PyTorch does) with `step` along `axis`; `starts`, `ends`, `axes` and
    /// `steps` are int64 initializers `NAME.starts`, ...
    pub fn slice(
        &mut self,
        name: &str,
        x: &Value,
        axis: usize,
        start: usize,
        end: Option<usize>,
        step: usize,
    ) -> Value {
        assert!(
            axis < x.shape.len(),
            "{name}: Slice axis {axis} of {:?}",
            x.shape
        );
        let dim = x.shape[axis];
        let stop = end.unwrap_or(dim).min(dim);
        assert!(
            step > 0 && start < stop,
            "{name}: Slice {start}..{stop} step {step} of {dim}"
        );
        let mut shape = x.shape.clone();
        shape[axis] = (stop - start).div_ceil(step);
        let end = end.map_or(i64::MAX, |e| e as i64);
        let inputs = vec![
            x.name.clone(),
            self.const_i64(name, "starts", &[start as i64]),
            self.const_i64(name, "ends", &[end]),
            self.const_i64(name, "axes", &[axis as i64]),
            self.const_i64(name, "steps", &[step as i64]),
        ];
        self.node("Slice", name, inputs, vec![], shape)
    }

    /// Split along `axis` into parts of the given sizes (opset 13: the sizes
    /// are the int64 input `NAME.split`); the outputs are `NAME.0`, `NAME.1`, ...
    pub fn split(&mut self, name: &str, x: &Value, axis: usize, sizes: &[usize]) -> Vec<Value> {
        assert!(
            axis < x.shape.len() && sizes.iter().sum::<usize>() == x.shape[axis],
            "{name}: Split {:?} into {sizes:?} on axis {axis}",
            x.shape
        );
        let split = self.const_i64(name, "split", &as_i64(sizes));
        self.claim(name);
        let parts: Vec<Value> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let mut shape = x.shape.clone();
                shape[axis] = size;
                let part = Value {
                    name: format!("{name}.{i}"),
                    shape,
                };
                self.claim(&part.name);
                part
            })
            .collect();
        self.nodes.push(NodeProto {
            input: vec![x.name.clone(), split],
            output: parts.iter().map(|p| p.name.clone()).collect(),
            name: name.into(),
            op_type: "Split".into(),
            attribute: vec![attr_int("axis", axis as i64)],
            ..Default::default()
        });
        parts
    }

    /// `torch.chunk`: Split along `axis` into `parts` equal parts.
    pub fn chunk(&mut self, name: &str, x: &Value, axis: usize, parts: usize) -> Vec<Value> {
        let dim = x.shape[axis];
        assert!(
            dim.is_multiple_of(parts),
            "{name}: {dim} does not split into {parts} equal parts"
        );
        self.split(name, x, axis, &vec![dim / parts; parts])
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

    /// Reshape to `shape` (the int64 initializer `NAME.shape`).
    pub fn reshape(&mut self, name: &str, x: &Value, shape: &[usize]) -> Value {
        assert_eq!(
            x.shape.iter().product::<usize>(),
            shape.iter().product::<usize>(),
            "{name}: Reshape {:?} to {shape:?}",
            x.shape
        );
        let target = self.const_i64(name, "shape", &as_i64(shape));
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
        self.softmax_on(name, x, x.shape.len() - 1)
    }

    /// Softmax over `axis` (opset 13: that axis alone).
    pub fn softmax_on(&mut self, name: &str, x: &Value, axis: usize) -> Value {
        assert!(
            axis < x.shape.len(),
            "{name}: Softmax axis {axis} of {:?}",
            x.shape
        );
        self.unary("Softmax", name, x, vec![attr_int("axis", axis as i64)])
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

/// `usize` dims as ONNX int64 values.
fn as_i64(values: &[usize]) -> Vec<i64> {
    values.iter().map(|&v| v as i64).collect()
}

/// The numpy broadcast of two shapes, or `None` if they do not broadcast.
fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| (i + s.len()).checked_sub(rank).map_or(1, |j| s[j]);
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y || y == 1 => Some(x),
            (1, y) => Some(y),
            _ => None,
        })
        .collect()
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

    fn ops(b: GraphBuilder, y: &Value) -> Vec<(String, String)> {
        let graph = b.finish("", &[y]).graph.unwrap();
        graph
            .node
            .into_iter()
            .map(|n| (n.name, n.op_type))
            .collect()
    }

    #[test]
    fn broadcast_follows_numpy() {
        assert_eq!(
            broadcast(&[1, 16, 8, 8], &[1, 16, 1, 1]),
            Some(vec![1, 16, 8, 8])
        );
        assert_eq!(broadcast(&[1, 4, 80], &[1, 80]), Some(vec![1, 4, 80]));
        assert_eq!(broadcast(&[1, 8, 8, 16], &[16]), Some(vec![1, 8, 8, 16]));
        assert_eq!(broadcast(&[1, 1, 4], &[]), Some(vec![1, 1, 4]));
        assert_eq!(broadcast(&[1, 16, 8, 8], &[1, 8, 8, 8]), None);
    }

    #[test]
    fn layer_norm_and_gelu_decompose_as_exported() {
        let mut b = GraphBuilder::new("t");
        let x = b.input("x", &[1, 4, 4, 8]);
        let y = b.layer_norm("ln", &x, 1e-6);
        let y = b.gelu("gelu", &y);
        assert_eq!(y.shape(), [1, 4, 4, 8]);
        let ops = ops(b, &y);
        let expected = [
            ("ln.mean", "ReduceMean"),
            ("ln.sub", "Sub"),
            ("ln.pow", "Pow"),
            ("ln.var", "ReduceMean"),
            ("ln.add_eps", "Add"),
            ("ln.sqrt", "Sqrt"),
            ("ln.div", "Div"),
            ("ln.mul", "Mul"),
            ("ln", "Add"),
            ("gelu.div", "Div"),
            ("gelu.erf", "Erf"),
            ("gelu.add", "Add"),
            ("gelu.mul", "Mul"),
            ("gelu", "Mul"),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|&(n, o)| (n.to_string(), o.to_string()))
            .collect();
        assert_eq!(ops, expected);
    }

    #[test]
    fn slice_split_and_reduce_shapes() {
        let mut b = GraphBuilder::new("t");
        let x = b.input("x", &[1, 12, 7, 8]);
        assert_eq!(
            b.slice("odd_rows", &x, 2, 1, None, 2).shape(),
            [1, 12, 3, 8]
        );
        assert_eq!(
            b.slice("even_rows", &x, 2, 0, None, 2).shape(),
            [1, 12, 4, 8]
        );
        assert_eq!(b.slice("head", &x, 1, 0, Some(5), 1).shape(), [1, 5, 7, 8]);
        let parts = b.split("split", &x, 1, &[4, 8]);
        let names: Vec<_> = parts.iter().map(|p| (p.name(), p.shape())).collect();
        assert_eq!(
            names,
            [
                ("split.0", &[1, 4, 7, 8][..]),
                ("split.1", &[1, 8, 7, 8][..])
            ]
        );
        assert_eq!(b.chunk("chunk", &x, 1, 3)[2].shape(), [1, 4, 7, 8]);
        assert_eq!(b.reduce_mean("m", &x, &[2, 3], false).shape(), [1, 12]);
        assert_eq!(b.reduce_mean("k", &x, &[1], true).shape(), [1, 1, 7, 8]);
        let y = b.matmul("fc", &x, 3, true);
        assert_eq!(y.shape(), [1, 12, 7, 3]);
        let ops = ops(b, &y);
        assert_eq!(
            ops[ops.len() - 2..],
            [
                ("fc.matmul".to_string(), "MatMul".to_string()),
                ("fc".to_string(), "Add".to_string())
            ]
        );
    }

    #[test]
    #[should_panic(expected = "concat: Concat of b")]
    fn concat_of_mismatched_shapes_panics_naming_the_node() {
        let mut b = GraphBuilder::new("t");
        let x = b.input("a", &[1, 3, 8, 8]);
        let y = b.input("b", &[1, 3, 4, 8]);
        b.concat("concat", &[&x, &y]);
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
