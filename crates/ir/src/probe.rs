//! Row-map discovery for data-movement ops (reshapes, transposes, nearest resize).
//!
//! A chain of such ops is run on a tensor whose every element holds its own row index;
//! the output then tells which input rows each output row copies from. This recognises
//! SpaceToDepth, darknet's reorg written as Reshape/Transpose/Reshape, NHWC <-> NCHW
//! transposes and nearest upsampling however an exporter spelled them, and rejects
//! anything that mixes rows (a Flatten, a linear resize).

use std::collections::HashMap;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};
use tract_onnx::tract_core::ops::change_axes::AxisOp;

/// How output rows read input rows, as discovered by the probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowRule {
    /// Output row r is input row r.
    Same,
    /// Output row r reads input rows `[r*block, (r+1)*block)`.
    Block(usize),
    /// Output row r is input row `r / factor`.
    Repeat(usize),
    /// Output row r is input row `offset + r*step` (a strided slice of the rows).
    Subsample {
        /// Input rows per output row.
        step: usize,
        /// The first input row taken.
        offset: usize,
    },
}

/// Runs `nodes` of `model` on an index tensor fed at `input` (H on `h_axis`) and returns
/// the output's H axis and row rule, or `None` when the rows get mixed or an op cannot be
/// evaluated outside a plan.
pub fn probe_rows(
    model: &TypedModel,
    nodes: &[usize],
    input: OutletId,
    shape: &[usize],
    h_axis: usize,
    output: OutletId,
) -> Option<(usize, RowRule)> {
    let index = ArrayD::from_shape_fn(IxDyn(shape), |ix| ix[h_axis] as f32);
    let mut values: HashMap<OutletId, TValue> = HashMap::new();
    values.insert(input, Tensor::from(index).into_tvalue());
    for &id in nodes {
        let node = model.node(id);
        let inputs = node
            .inputs
            .iter()
            .map(|o| {
                values.get(o).cloned().or_else(|| {
                    let konst = model.outlet_fact(*o).ok()?.konst.clone()?;
                    Some((*konst).clone().into_tvalue())
                })
            })
            .collect::<Option<TVec<TValue>>>()?;
        let outputs = node.op.eval_out_of_plan(inputs).ok()??;
        for (slot, v) in outputs.into_iter().enumerate() {
            values.insert(OutletId::new(id, slot), v);
        }
    }
    // One row holds index 0 everywhere, which the probe cannot follow: follow the axis
    // through the axis ops instead (a transpose of a global pool's output).
    if shape[h_axis] == 1 {
        let followed = nodes.iter().try_fold(h_axis, |axis, n| {
            model.node(*n).op_as::<AxisOp>()?.transform_axis(axis)
        });
        if let Some(axis) = followed {
            return Some((axis, RowRule::Same));
        }
    }
    let out = values.get(&output)?;
    // Rows repeat only where data is copied (a resize) or axes merge (a flatten).
    let may_repeat =
        out.rank() < shape.len() || nodes.iter().any(|n| model.node(*n).op.name() == "Resize");
    classify(
        out.to_plain_array_view::<f32>().ok()?.into_dyn(),
        shape[h_axis],
        h_axis,
        may_repeat,
    )
}

/// Finds the output axis that carries the rows and how. Each rule (same rows, repeated
/// rows, blocks of rows) is tried on the input's H position before any other axis, so a
/// size-1 batch axis or the channels never pass for the rows.
/// A single row holds index 0 everywhere, so any size-1 axis would pass for it: only
/// its own position is tried (`probe_rows` follows it through axis ops first).
fn classify(
    out: ArrayViewD<f32>,
    rows_in: usize,
    prefer: usize,
    may_repeat: bool,
) -> Option<(usize, RowRule)> {
    let axes: Vec<usize> = std::iter::once(prefer)
        .filter(|&a| a < out.ndim())
        .chain((0..out.ndim()).filter(|&a| a != prefer && rows_in > 1))
        .collect();
    let ranges = |axis: usize| -> Vec<(f32, f32)> {
        out.axis_iter(Axis(axis))
            .map(|slice| {
                slice
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                        (lo.min(v), hi.max(v))
                    })
            })
            .collect()
    };
    let rows_of = |axis: usize, rule: RowRule| -> bool {
        let rows_out = out.shape()[axis];
        let expect = |r: usize| match rule {
            RowRule::Same => (r, r),
            RowRule::Repeat(f) => (r / f, r / f),
            RowRule::Block(b) => (r * b, r * b + b - 1),
            RowRule::Subsample { step, offset } => (offset + r * step, offset + r * step),
        };
        let size_ok = match rule {
            RowRule::Same => rows_out == rows_in,
            RowRule::Repeat(f) => may_repeat && f > 1 && rows_out == rows_in * f,
            RowRule::Block(b) => {
                b > 1 && rows_out * b == rows_in && (rows_out > 1 || axis == prefer)
            }
            // Found by `subsample` on the rows' own axis only.
            RowRule::Subsample { .. } => false,
        };
        size_ok
            && ranges(axis).iter().enumerate().all(|(r, &(lo, hi))| {
                let (a, b) = expect(r);
                lo == a as f32 && hi == b as f32
            })
    };
    let candidates = |axis: usize| {
        let rows_out = out.shape()[axis];
        let mut rules = vec![RowRule::Same];
        if rows_out > rows_in && rows_in > 0 && rows_out.is_multiple_of(rows_in) {
            rules.push(RowRule::Repeat(rows_out / rows_in));
        }
        if rows_in > rows_out && rows_out > 0 && rows_in.is_multiple_of(rows_out) {
            rules.push(RowRule::Block(rows_in / rows_out));
        }
        rules
    };
    if let Some(rule) = subsample(&ranges, prefer, out.ndim(), rows_in) {
        return Some((prefer, rule));
    }
    // Rows kept whole on some axis first: a one-channel NHWC -> NCHW transpose puts all
    // the rows in the single slice of the rows' old position, which would pass for one
    // block; then repeats and blocks, on the H position first.
    if let Some(axis) = axes.iter().copied().find(|&a| rows_of(a, RowRule::Same)) {
        return Some((axis, RowRule::Same));
    }
    for &axis in &axes {
        for kind in 1..3 {
            let rule = candidates(axis)
                .into_iter()
                .find(|r| matches!((kind, r), (1, RowRule::Repeat(_)) | (2, RowRule::Block(_))));
            if let Some(rule) = rule
                && rows_of(axis, rule)
            {
                return Some((axis, rule));
            }
        }
    }
    None
}

/// The rows of axis `h` as a strided slice of the input's: each output row holds one
/// input row, `offset + r*step`, and it is not all of them in order (that is `Same`).
fn subsample(
    ranges: &dyn Fn(usize) -> Vec<(f32, f32)>,
    h: usize,
    ndim: usize,
    rows_in: usize,
) -> Option<RowRule> {
    if h >= ndim {
        return None;
    }
    let rows = ranges(h);
    let single: Vec<usize> = rows
        .iter()
        .map(|&(lo, hi)| (lo == hi && lo >= 0.0).then_some(lo as usize))
        .collect::<Option<_>>()?;
    let offset = *single.first()?;
    let step = match single.get(1) {
        Some(&next) if next > offset => next - offset,
        Some(_) => return None,
        None => 1,
    };
    let fits = single
        .iter()
        .enumerate()
        .all(|(r, &row)| row == offset + r * step && row < rows_in);
    let same = step == 1 && offset == 0 && single.len() == rows_in;
    (fits && !same).then_some(RowRule::Subsample { step, offset })
}
