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

/// How output rows read input rows, as discovered by the probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowRule {
    /// Output row r is input row r.
    Same,
    /// Output row r reads input rows `[r*block, (r+1)*block)`.
    Block(usize),
    /// Output row r is input row `r / factor`.
    Repeat(usize),
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
    let out = values.get(&output)?;
    classify(
        out.to_plain_array_view::<f32>().ok()?.into_dyn(),
        shape[h_axis],
        h_axis,
    )
}

/// Finds the output axis that carries the rows and how. Every rule (same rows, repeated
/// rows, blocks of rows) is tried on the input's H position before any other axis, so a
/// size-1 batch axis or the channels never pass for the rows.
/// A single row (a global pool's output) would pass for the rows on any size-1 axis: it
/// only stays on its own position.
fn classify(out: ArrayViewD<f32>, rows_in: usize, prefer: usize) -> Option<(usize, RowRule)> {
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
        };
        let size_ok = match rule {
            RowRule::Same => rows_out == rows_in,
            RowRule::Repeat(f) => f > 1 && rows_out == rows_in * f,
            RowRule::Block(b) => {
                b > 1 && rows_out * b == rows_in && (rows_out > 1 || axis == prefer)
            }
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
    for &axis in &axes {
        for kind in 0..3 {
            let rule = candidates(axis).into_iter().find(|r| {
                matches!(
                    (kind, r),
                    (0, RowRule::Same) | (1, RowRule::Repeat(_)) | (2, RowRule::Block(_))
                )
            });
            if let Some(rule) = rule
                && rows_of(axis, rule)
            {
                return Some((axis, rule));
            }
        }
    }
    None
}
