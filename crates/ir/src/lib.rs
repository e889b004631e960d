//! Legion's stage IR: an ONNX model imported with tract and cut into *stages*.
//!
//! A stage is one anchor op (conv, pool, concat, add, upsample, space-to-depth, ...) plus
//! the row-local ops that follow it and read only its output (bias, BatchNorm,
//! activations). Stages are what fused groups are made of. A stage whose output rows
//! cannot be computed from a strip of its input rows is a *barrier* and runs whole.
//!
//! ```no_run
//! let ir = legion_ir::import(std::path::Path::new("vgg16.onnx"), None)?;
//! for stage in &ir.stages {
//!     println!("{} {} {:?}", stage.id, stage.kind.short_name(), stage.output.shape);
//! }
//! # Ok::<(), legion_ir::ImportError>(())
//! ```

mod build;
mod channels;
mod error;
mod load;
mod probe;
mod reduce;
mod rows;
mod stage;

pub use channels::{ConstSlice, RowProduct};
pub use error::ImportError;
pub use rows::Rows;
pub use stage::{
    Channels, Combine, PoolOp, Split, Stage, StageId, StageKind, TensorInfo, TensorRef, Window,
};

use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tract_onnx::prelude::TypedModel;

/// An imported model: stages in topological order, their data-flow graph, and the typed
/// tract model the stages point into (tiles are built from it).
#[derive(Clone)]
pub struct Ir {
    /// sha256 of the ONNX file, lowercase hex.
    pub sha256: String,
    /// Name of the graph input.
    pub input_name: String,
    /// The model input.
    pub input: TensorInfo,
    /// Stages; `stages[i].id == StageId(i)`.
    pub stages: Vec<Stage>,
    /// The model outputs.
    pub outputs: Vec<TensorRef>,
    /// Data flow between stages: node `i` is stage `i`, an edge runs producer -> consumer.
    pub graph: DiGraph<StageId, ()>,
    /// The typed model (right after `into_typed()`), with the concrete input shape;
    /// `None` in an Ir made from its [`Shapes`] alone.
    model: Option<TypedModel>,
}

/// An Ir without its tract model: the stages, their tensors and the outputs. A board
/// given its tiles built needs these and not the model's weights (docs/architecture.md,
/// "Shipped tiles").
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Shapes {
    /// sha256 of the ONNX file the Ir was imported from.
    pub sha256: String,
    /// Name of the graph input.
    pub input_name: String,
    /// The model input.
    pub input: TensorInfo,
    /// The stages, in order.
    pub stages: Vec<Stage>,
    /// The model outputs.
    pub outputs: Vec<TensorRef>,
}

impl std::fmt::Debug for Ir {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Ir")
            .field("sha256", &self.sha256)
            .field("input", &self.input)
            .field("stages", &self.stages.len())
            .field("outputs", &self.outputs)
            .finish()
    }
}

/// Imports an ONNX file. `input_shape` overrides (or fills in) the declared input shape.
pub fn import(path: &Path, input_shape: Option<&[usize]>) -> Result<Ir, ImportError> {
    // tract asserts on some malformed graphs (tests/fuzz.rs found a pad of a conv that
    // panics while typing); such a file gets an error naming it, not a crash.
    std::panic::catch_unwind(|| import_checked(path, input_shape)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(ImportError::Tract {
            path: path.to_owned(),
            detail: format!(
                "tract failed on this graph ({why}); the file is malformed or uses a form \
                 tract does not support"
            ),
        })
    })
}

fn import_checked(path: &Path, input_shape: Option<&[usize]>) -> Result<Ir, ImportError> {
    let loaded = load::load(path, input_shape)?;
    let input = TensorInfo {
        h_axis: guess_h_axis(&loaded.input_shape),
        shape: loaded.input_shape,
    };
    let (stages, outputs) =
        build::stages(&loaded.typed, input.h_axis).map_err(|e| ImportError::Tract {
            path: path.to_owned(),
            detail: format!("{e:#}").replace('\n', " "),
        })?;
    let shapes = Shapes {
        sha256: loaded.sha256,
        input_name: loaded.input_name,
        input,
        stages,
        outputs,
    };
    let mut ir = Ir::from_shapes(shapes).map_err(|detail| ImportError::Tract {
        path: path.to_owned(),
        detail,
    })?;
    ir.model = Some(loaded.typed);
    Ok(ir)
}

/// The data flow between `stages`: node `i` is stage `i`, an edge runs producer -> consumer.
fn stage_graph(stages: &[Stage]) -> DiGraph<StageId, ()> {
    let mut graph = DiGraph::new();
    for s in stages {
        graph.add_node(s.id);
    }
    for s in stages {
        for r in &s.inputs {
            if let TensorRef::Stage(p) = r {
                graph.add_edge(NodeIndex::new(p.index()), NodeIndex::new(s.id.index()), ());
            }
        }
    }
    graph
}

impl Ir {
    /// An Ir of `shapes` without a model: everything but [`Ir::model`] (and what reads
    /// it: building tiles, the constants of a channel split) works. Shapes from elsewhere
    /// (a coordinator's LoadPlan) are checked: stage `i` is numbered `i` and reads only
    /// the input and stages before it, its channel axis and every row axis lie within
    /// their shapes, and the outputs are stages.
    pub fn from_shapes(shapes: Shapes) -> Result<Ir, String> {
        let n = shapes.stages.len();
        let axes_fit = |t: &TensorInfo| t.h_axis.is_none_or(|h| h < t.shape.len());
        if !axes_fit(&shapes.input) {
            return Err(format!(
                "the input's row axis lies outside {:?}",
                shapes.input.shape
            ));
        }
        for (i, s) in shapes.stages.iter().enumerate() {
            if s.id.index() != i {
                return Err(format!("stage {i} is numbered {}", s.id));
            }
            let channels_fit = s.channels.is_none_or(|c| c.axis < s.output.shape.len());
            if !axes_fit(&s.output) || !s.input_shapes.iter().all(axes_fit) || !channels_fit {
                return Err(format!(
                    "stage {i}: an axis lies outside its tensor's shape"
                ));
            }
            if let Some(r) = s.inputs.iter().find(|r| match r {
                TensorRef::Stage(p) => p.index() >= i,
                TensorRef::Input => false,
            }) {
                return Err(format!("stage {i} reads {r:?}, not an earlier stage"));
            }
        }
        if let Some(r) = shapes.outputs.iter().find(|r| match r {
            TensorRef::Stage(p) => p.index() >= n,
            TensorRef::Input => false,
        }) {
            return Err(format!("output {r:?} is not one of the {n} stages"));
        }
        Ok(Ir {
            graph: stage_graph(&shapes.stages),
            sha256: shapes.sha256,
            input_name: shapes.input_name,
            input: shapes.input,
            stages: shapes.stages,
            outputs: shapes.outputs,
            model: None,
        })
    }

    /// The Ir without its model, to send to a board.
    pub fn shapes(&self) -> Shapes {
        Shapes {
            sha256: self.sha256.clone(),
            input_name: self.input_name.clone(),
            input: self.input.clone(),
            stages: self.stages.clone(),
            outputs: self.outputs.clone(),
        }
    }

    /// Whether the Ir holds its tract model (it was imported, not made from [`Shapes`]).
    pub fn has_model(&self) -> bool {
        self.model.is_some()
    }

    /// The typed tract model (right after `into_typed()`), with the concrete input
    /// shape. Only an imported Ir has it; callers that may hold one made from
    /// [`Shapes`] check [`Ir::has_model`] first.
    pub fn model(&self) -> &TypedModel {
        self.model
            .as_ref()
            .expect("an Ir made from its shapes alone has no model to build tiles from")
    }

    /// The stage with this id.
    #[inline]
    pub fn stage(&self, id: StageId) -> &Stage {
        &self.stages[id.index()]
    }

    /// The phase of each stage of `first..=last` (in order) when its devices combine
    /// the reductions in it ([`Stage::is_combined`]): the most combined results on a
    /// path to the stage from inside the range (docs/architecture.md, "Reductions
    /// across devices").
    pub fn phases(&self, first: StageId, last: StageId) -> Vec<usize> {
        let mut phase: Vec<usize> = Vec::with_capacity(last.index() + 1 - first.index());
        for id in first.index()..=last.index() {
            let p = self.stages[id]
                .inputs
                .iter()
                .filter_map(|r| match r {
                    TensorRef::Stage(q) if *q >= first => Some(
                        phase[q.index() - first.index()]
                            + usize::from(self.stage(*q).is_combined()),
                    ),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            phase.push(p);
        }
        phase
    }

    /// How matmul stage `product` multiplies the flatten `flatten` of a tensor with
    /// rows, when it is such a product ([`RowProduct`]); `None` without the model.
    pub fn row_product(&self, flatten: StageId, product: StageId) -> Option<RowProduct> {
        let f = self.stage(flatten);
        let input = f.input_shapes.first()?;
        let batch_first = input.shape.first() == Some(&1) && input.h_axis.is_some_and(|h| h > 0);
        let flat = f.output.shape[..] == [1, input.len()];
        if !self.has_model() || !batch_first || !flat || f.inputs.len() != 1 {
            return None;
        }
        channels::row_product(self.model(), &f.nodes, &self.stage(product).nodes)
    }

    /// The constants a channel tile of stage `id` slices to its channels; empty when
    /// the stage does not split by channels.
    pub fn channel_consts(&self, id: StageId) -> Vec<ConstSlice> {
        match channels::channel_split(self.model(), &self.stage(id).nodes) {
            Some((_, slices)) if self.stage(id).channels.is_some() => slices,
            _ => vec![],
        }
    }

    /// Bytes of the constants stage `id` reads when it computes `channels` of its
    /// output channels: the sliced ones at that fraction, the others whole.
    pub fn channel_weight_bytes(&self, id: StageId, channels: Rows) -> u64 {
        let stage = self.stage(id);
        let Some(split) = stage.channels else {
            return stage.weight_bytes;
        };
        let sliced = self.channel_consts(id);
        let mut bytes = 0;
        for &node in &stage.nodes {
            for (slot, o) in self.model().node(node).inputs.iter().enumerate() {
                let Some(k) = self
                    .model()
                    .outlet_fact(*o)
                    .ok()
                    .and_then(|f| f.konst.clone())
                else {
                    continue;
                };
                let whole = (k.len() * k.datum_type().size_of()) as u64;
                bytes += if sliced.iter().any(|c| c.node == node && c.slot == slot) {
                    whole * channels.len() as u64 / split.count as u64
                } else {
                    whole
                };
            }
        }
        bytes
    }

    /// Bytes (f32) of `rows` of tensor `r` and, when given, of `channels` of it only
    /// (a tensor computed split by channels travels in such parts).
    pub fn part_bytes(&self, r: TensorRef, rows: Rows, channels: Option<Rows>) -> u64 {
        let whole = self.tensor(r).strip_bytes(rows);
        match (channels, r) {
            (Some(c), TensorRef::Stage(s)) => match self.stage(s).channels {
                Some(split) => whole * c.len() as u64 / split.count as u64,
                None => whole,
            },
            _ => whole,
        }
    }

    /// Shape and row axis of a tensor.
    #[inline]
    pub fn tensor(&self, r: TensorRef) -> &TensorInfo {
        match r {
            TensorRef::Input => &self.input,
            TensorRef::Stage(s) => &self.stage(s).output,
        }
    }

    /// Stages that read the output of `id`, in topological order.
    pub fn consumers(&self, id: StageId) -> Vec<StageId> {
        let mut c: Vec<StageId> = self
            .graph
            .neighbors(NodeIndex::new(id.index()))
            .map(|n| self.graph[n])
            .collect();
        c.sort();
        c.dedup();
        c
    }

    /// Total FLOPs over all stages.
    pub fn total_flops(&self) -> u64 {
        self.stages.iter().map(|s| s.flops).sum()
    }

    /// Total weight bytes over all stages.
    pub fn total_weight_bytes(&self) -> u64 {
        self.stages.iter().map(|s| s.weight_bytes).sum()
    }
}

/// H axis of a model input: rank-4 inputs are NCHW unless the last axis looks like
/// channels (at most 4) and axis 1 does not (NHWC, as tf2onnx exports).
fn guess_h_axis(shape: &[usize]) -> Option<usize> {
    match shape {
        [_, c, _, last] if *last <= 4 && *c > 4 => Some(1),
        [_, _, _, _] => Some(2),
        [_, _, _] => Some(1),
        _ => None,
    }
}
