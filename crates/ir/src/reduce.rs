//! Which reductions over rows a row group can compute across devices: each device
//! reduces its own rows, and the devices combine their partial results
//! (docs/architecture.md, "Reductions across devices").

use crate::stage::Combine;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

/// How the partial results of the stage made of tract nodes `nodes` (anchor first)
/// combine, when its anchor reduces over the rows' axis `h`; `None` when they do not.
///
/// A sum over the rows is the sum of sums over disjoint strips, and stays one through
/// later multiplications and divisions by constants (a global average pool's `1/HW`).
/// A max over the rows is the max of maxes, with nothing after it.
pub fn combine_across_rows(model: &TypedModel, nodes: &[usize], h: usize) -> Option<Combine> {
    let anchor = model.node(*nodes.first()?);
    let reduce = anchor.op_as::<Reduce>()?;
    if !reduce.axes.contains(&h) {
        return None;
    }
    let is_const = |o: &OutletId| model.outlet_fact(*o).is_ok_and(|f| f.konst.is_some());
    match reduce.reducer {
        Reducer::Sum => {
            // Each later node scales the previous one by a constant: x * k, k * x, x / k.
            let linear = nodes.windows(2).all(|pair| {
                let node = model.node(pair[1]);
                let Some(bin) = node.op_as::<TypedBinOp>() else {
                    return false;
                };
                let from = |slot: usize| node.inputs[slot].node == pair[0];
                match (bin.0.name(), &node.inputs[..]) {
                    ("Mul", [a, b]) => (from(0) && is_const(b)) || (from(1) && is_const(a)),
                    ("Div", [_, b]) => from(0) && is_const(b),
                    _ => false,
                }
            });
            linear.then_some(Combine::Sum)
        }
        Reducer::Max => (nodes.len() == 1).then_some(Combine::Max),
        _ => None,
    }
}
