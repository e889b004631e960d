//! Stage types: what the import pass produces and every later pass reads.

use crate::Rows;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Index of a stage in [`crate::Ir::stages`]; stages are numbered in topological order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageId(pub u32);

impl StageId {
    /// The stage's position in [`crate::Ir::stages`].
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Debug for StageId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

impl fmt::Display for StageId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a stage input comes from: the model input or another stage's output.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorRef {
    /// The model's (single) input tensor.
    Input,
    /// Output of a stage.
    Stage(StageId),
}

impl fmt::Debug for TensorRef {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            TensorRef::Input => write!(f, "input"),
            TensorRef::Stage(s) => write!(f, "{s:?}"),
        }
    }
}

/// Shape of a tensor and which axis holds its rows (H), if it has rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// Concrete shape.
    pub shape: Vec<usize>,
    /// Index of the H axis in `shape`; `None` once rows are gone (after a flatten, a global pool).
    pub h_axis: Option<usize>,
}

impl TensorInfo {
    /// Number of rows (the size of the H axis), if the tensor has an H axis.
    #[inline]
    pub fn height(&self) -> Option<usize> {
        self.h_axis.map(|h| self.shape[h])
    }

    /// Number of f32 elements.
    #[inline]
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape of `rows` of this tensor: the H axis cut to `rows.len()`; the whole
    /// shape when the tensor has no H axis (it always travels whole).
    pub fn strip_shape(&self, rows: Rows) -> Vec<usize> {
        let mut shape = self.shape.clone();
        if let Some(h) = self.h_axis {
            shape[h] = rows.len();
        }
        shape
    }

    /// Bytes (f32) of `rows` of this tensor, as [`TensorInfo::strip_shape`] counts them.
    pub fn strip_bytes(&self, rows: Rows) -> u64 {
        self.strip_shape(rows).iter().product::<usize>() as u64 * 4
    }
}

/// Geometry of a sliding window (conv or pool): index 0 along the rows' axis, index 1
/// along the other spatial axis. That is H then W, except for a conv whose rows are on
/// its W axis (a YOLOv8 DFL conv over anchors), where it is W then H.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Kernel size `[h, w]`.
    pub kernel: [usize; 2],
    /// Stride `[h, w]`.
    pub stride: [usize; 2],
    /// Dilation `[h, w]`.
    pub dilation: [usize; 2],
    /// Padding before (`[top, left]`), as declared or derived from auto_pad.
    pub pad_before: [usize; 2],
    /// Padding after (`[bottom, right]`), as declared or derived from auto_pad.
    pub pad_after: [usize; 2],
    /// ONNX pool ceil_mode: the output height rounds up (the bottom pad may grow).
    pub ceil_mode: bool,
}

/// Which pooling reduction a pool stage applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolOp {
    /// Max over the window; padding acts as -inf.
    Max,
    /// Average over the window.
    Avg {
        /// Whether padded cells count in the divisor.
        count_include_pad: bool,
    },
    /// Sum over the window (no division).
    Sum,
}

/// The anchor op of a stage: one closed set of kinds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum StageKind {
    /// Convolution (grouped and depthwise included).
    Conv {
        /// Window geometry.
        window: Window,
        /// Group count (`== in_channels` for depthwise).
        group: usize,
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
    },
    /// Max, average or sum pooling over a window.
    Pool {
        /// Reduction.
        pool: PoolOp,
        /// Window geometry.
        window: Window,
    },
    /// Element-wise ops with no anchor before them in the stage (an activation on a branch).
    Elementwise {
        /// tract name of the first op.
        name: String,
    },
    /// Element-wise join of two equally shaped tensors (residual Add, Mul of branches).
    Join {
        /// tract name of the binary op (Add, Mul, ...).
        name: String,
    },
    /// Concatenation along a non-H axis (channels).
    Concat {
        /// Axis of the concatenation.
        axis: usize,
    },
    /// Nearest-neighbour upsampling by an integer factor along H.
    Upsample {
        /// Output rows per input row.
        factor: usize,
    },
    /// A reshape that merges the rows with the axes after them (row-major, e.g. NCHW
    /// `[1, C, H, W] -> [1, C, H*W]` or an NHWC flatten): input row r becomes positions
    /// `[r*factor, (r+1)*factor)` of the output's row axis.
    Flatten {
        /// Output positions per input row.
        factor: usize,
    },
    /// A strided slice of the rows alone (a YOLOX Focus takes every other row): output
    /// row r is input row `offset + r*step`.
    Subsample {
        /// Input rows per output row.
        step: usize,
        /// The first input row taken.
        offset: usize,
    },
    /// A slice along a non-row axis (a channel split): rows stay where they are.
    Slice {
        /// The sliced axis.
        axis: usize,
    },
    /// Space-to-depth (also darknet's reorg): each output row reads `block` input rows.
    SpaceToDepth {
        /// Block size along H.
        block: usize,
    },
    /// Reshapes and transposes that keep every row where it is (NHWC <-> NCHW, for one).
    Layout,
    /// Reshapes and transposes that move data across rows (Flatten, for one).
    Reshape,
    /// Matrix multiplication (Gemm, MatMul; convs never appear here).
    MatMul {
        /// Multiply-accumulates per inference.
        macs: u64,
    },
    /// Reduction over some axes (global pooling is a reduction over H and W).
    Reduce {
        /// Reduced axes.
        axes: Vec<usize>,
    },
    /// Softmax over some axes.
    Softmax {
        /// Normalised axes.
        axes: Vec<usize>,
    },
    /// An op Legion does not model; always a barrier.
    Other {
        /// tract name of the op.
        name: String,
    },
}

impl StageKind {
    /// Short display name ("conv", "maxpool", "concat", ...).
    pub fn short_name(&self) -> String {
        match self {
            StageKind::Conv {
                group, in_channels, ..
            } if *group > 1 && group == in_channels => "dwconv".into(),
            StageKind::Conv { group, .. } if *group > 1 => "gconv".into(),
            StageKind::Conv { .. } => "conv".into(),
            StageKind::Pool {
                pool: PoolOp::Max, ..
            } => "maxpool".into(),
            StageKind::Pool {
                pool: PoolOp::Avg { .. },
                ..
            } => "avgpool".into(),
            StageKind::Pool {
                pool: PoolOp::Sum, ..
            } => "sumpool".into(),
            StageKind::Elementwise { name } => format!("eltwise:{}", name.to_lowercase()),
            StageKind::Join { name } => name.to_lowercase(),
            StageKind::Concat { .. } => "concat".into(),
            StageKind::Upsample { .. } => "upsample".into(),
            StageKind::Flatten { .. } => "flatten".into(),
            StageKind::Slice { .. } => "slice".into(),
            StageKind::Subsample { .. } => "subsample".into(),
            StageKind::SpaceToDepth { .. } => "space2depth".into(),
            StageKind::Layout => "layout".into(),
            StageKind::Reshape => "reshape".into(),
            StageKind::MatMul { .. } => "matmul".into(),
            StageKind::Reduce { .. } => "reduce".into(),
            StageKind::Softmax { .. } => "softmax".into(),
            StageKind::Other { name } => format!("other:{name}"),
        }
    }

    /// The sliding window of a conv or pool stage.
    pub fn window(&self) -> Option<&Window> {
        match self {
            StageKind::Conv { window, .. } | StageKind::Pool { window, .. } => Some(window),
            _ => None,
        }
    }
}

/// Whether a stage's rows can be computed from a strip of its inputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", content = "reason", rename_all = "snake_case")]
pub enum Split {
    /// Rows can be split across devices.
    Rows,
    /// The stage runs whole, on one device; the reason says why.
    Barrier(String),
}

/// How a stage splits by its second axis: output channels (a conv) or output neurons (a
/// matmul). A device computes every row of a slice of `axis` from the stage's whole
/// inputs and the matching slice of its weights; a depthwise conv reads only the same
/// slice of its input's channels (docs/architecture.md, "Channel splits").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channels {
    /// The output axis holding the channels.
    pub axis: usize,
    /// How many there are.
    pub count: usize,
    /// True when output channel `c` reads input channel `c` alone (a depthwise conv):
    /// a channel tile reads its own slice of the input's channels, on the same axis.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub depthwise: bool,
}

/// How partial results of a reduction over rows, each over one device's rows, combine
/// into the whole result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// Element-wise sum.
    Sum,
    /// Element-wise max.
    Max,
}

/// One stage: an anchor op plus the row-local ops that follow it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// Position in topological order.
    pub id: StageId,
    /// Name of the anchor node (display only; not stable for unnamed ONNX nodes).
    pub name: String,
    /// Anchor op and its geometry.
    pub kind: StageKind,
    /// Data inputs in the anchor's input order.
    pub inputs: Vec<TensorRef>,
    /// Shapes of the data inputs, same order as `inputs`.
    pub input_shapes: Vec<TensorInfo>,
    /// The stage's output.
    pub output: TensorInfo,
    /// Names of the row-local ops fused after the anchor (bias, BN, activations).
    pub fused: Vec<String>,
    /// FLOPs of the anchor op: 2 per multiply-accumulate for convs and matmuls, one per
    /// window element for pools, one per element otherwise. Fused row-local ops are not counted.
    pub flops: u64,
    /// Bytes of constant tensors (weights, bias, BN parameters) the stage reads.
    pub weight_bytes: u64,
    /// tract node ids covered, in evaluation order (anchor first).
    pub nodes: Vec<usize>,
    /// Splittable by rows, or a barrier with its reason.
    pub split: Split,
    /// Splittable by output channels or neurons, independently of `split`.
    pub channels: Option<Channels>,
    /// For a reduction over the rows (a barrier when alone): how the devices of a row
    /// group combine their partial results over their own rows, when they can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<Combine>,
}

impl Stage {
    /// True when the stage can be split by rows.
    pub fn is_splittable(&self) -> bool {
        self.split == Split::Rows
    }

    /// True for a reduction over rows the devices of a row group combine
    /// (docs/architecture.md, "Reductions across devices").
    pub fn is_combined(&self) -> bool {
        self.partial.is_some() && !self.is_splittable()
    }

    /// The tract outlet holding the stage's output in [`crate::Ir::model`].
    pub fn output_outlet(&self) -> tract_onnx::prelude::OutletId {
        tract_onnx::prelude::OutletId::new(*self.nodes.last().expect("a stage has nodes"), 0)
    }

    /// Multiply-accumulates of the anchor op (convs and matmuls), 0 otherwise.
    pub fn macs(&self) -> u64 {
        match self.kind {
            StageKind::Conv { .. } | StageKind::MatMul { .. } => self.flops / 2,
            _ => 0,
        }
    }
}
