//! Which stages split by output channels (convs) or output neurons (matmuls), and which
//! of their constants a channel tile slices (docs/architecture.md, "Channel splits").

use crate::stage::Channels;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;

/// A constant a channel tile slices to its channels: input `slot` of tract node `node`,
/// along the constant's axis `axis`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConstSlice {
    /// The tract node reading the constant.
    pub node: usize,
    /// Which of its inputs.
    pub slot: usize,
    /// The constant's axis that holds one value per output channel.
    pub axis: usize,
}

/// How the stage made of tract nodes `nodes` (anchor first) splits by output channels,
/// and the constants each slice reads a part of; `None` when it does not split so.
///
/// The anchor is a conv with one group, a depthwise conv (one group per channel, one
/// output channel each: its slice reads the same slice of the input's channels), or a
/// matmul with one data input whose output has an axis (the neurons) that only
/// constants carry. Every later node keeps the
/// anchor's output shape and is element-wise: an activation, or a binary op whose
/// constant holds one value per channel (bias, BatchNorm) or is flat along them. A
/// single channel does not split.
pub fn channel_split(model: &TypedModel, nodes: &[usize]) -> Option<(Channels, Vec<ConstSlice>)> {
    let anchor = model.node(*nodes.first()?);
    let is_const = |o: &OutletId| model.outlet_fact(*o).is_ok_and(|f| f.konst.is_some());
    let shape = |o: &OutletId| -> Option<Vec<usize>> {
        model
            .outlet_fact(*o)
            .ok()?
            .shape
            .as_concrete()
            .map(|s| s.to_vec())
    };
    let out_shape = shape(&OutletId::new(anchor.id, 0))?;
    let mut slices = vec![];
    let channels = if let Some(conv) = anchor.op_as::<Conv>() {
        let [data, kernel, rest @ ..] = &anchor.inputs[..] else {
            return None;
        };
        let count = conv.pool_spec.output_channels;
        // One group, or one group per channel with one output channel each (depthwise).
        let depthwise =
            conv.group > 1 && conv.group == count && conv.group == conv.pool_spec.input_channels;
        if (conv.group != 1 && !depthwise)
            || conv.q_params.is_some()
            || is_const(data)
            || !is_const(kernel)
        {
            return None;
        }
        let format = conv.pool_spec.data_format;
        let axis = match (format.has_n(), format.c_is_last()) {
            (_, true) => out_shape.len() - 1,
            (true, false) => 1,
            (false, false) => 0,
        };
        let kernel_rank = shape(kernel)?.len();
        let o_axis = match conv.kernel_fmt {
            KernelFormat::OIHW | KernelFormat::OHWI => 0,
            KernelFormat::HWIO => kernel_rank - 1,
        };
        slices.push(ConstSlice {
            node: anchor.id,
            slot: 1,
            axis: o_axis,
        });
        match rest {
            [] => {}
            [bias] if is_const(bias) => match shape(bias)?[..] {
                [n] if n == count => slices.push(ConstSlice {
                    node: anchor.id,
                    slot: 2,
                    axis: 0,
                }),
                [] | [1] => {}
                _ => return None,
            },
            _ => return None,
        }
        Channels {
            axis,
            count,
            depthwise,
        }
    } else if let Some(einsum) = anchor.op_as::<EinSum>() {
        let data: Vec<usize> = (0..anchor.inputs.len())
            .filter(|&i| !is_const(&anchor.inputs[i]))
            .collect();
        let [data] = data[..] else {
            return None;
        };
        if einsum.q_params.is_some() {
            return None;
        }
        // The neurons: an output axis of more than one element that the data input
        // lacks, so each neuron reads the whole input and its own weights.
        let neurons: Vec<_> = einsum
            .axes
            .iter_all_axes()
            .filter(|a| {
                a.inputs[data].is_empty() && matches!(a.outputs[0][..], [p] if out_shape[p] > 1)
            })
            .collect();
        let [neuron] = neurons[..] else {
            return None;
        };
        let axis = neuron.outputs[0][0];
        let count = out_shape[axis];
        for (slot, positions) in neuron.inputs.iter().enumerate() {
            for &p in positions {
                if shape(&anchor.inputs[slot])?[p] != count {
                    return None;
                }
                slices.push(ConstSlice {
                    node: anchor.id,
                    slot,
                    axis: p,
                });
            }
        }
        Channels {
            axis,
            count,
            depthwise: false,
        }
    } else {
        return None;
    };
    if channels.count < 2 || out_shape.get(channels.axis) != Some(&channels.count) {
        return None;
    }
    for &id in &nodes[1..] {
        let node = model.node(id);
        if shape(&OutletId::new(id, 0))? != out_shape {
            return None;
        }
        if crate::build::is_unary_row_local(node.op.as_ref()) {
            continue;
        }
        if !node.op.is::<TypedBinOp>() {
            return None;
        }
        for (slot, input) in node.inputs.iter().enumerate() {
            let s = shape(input)?;
            if !is_const(input) {
                if s != out_shape {
                    return None;
                }
                continue;
            }
            let offset = out_shape.len().checked_sub(s.len())?;
            let Some(at) = channels.axis.checked_sub(offset) else {
                continue; // the constant is flat along the channels
            };
            match s[at] {
                1 => {}
                n if n == channels.count => slices.push(ConstSlice {
                    node: id,
                    slot,
                    axis: at,
                }),
                _ => return None,
            }
        }
    }
    Some((channels, slices))
}

/// A matmul that multiplies a row-major flatten of a tensor with rows (VGG's fc6 after
/// pool5): each row of that tensor meets its own rows of the weights, so the product
/// is a sum of products over parts of the rows (docs/architecture.md, "Accumulating as
/// rows arrive"). The weights are input `slot` of the anchor `node`; their axis `axis`
/// runs over the flattened elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowProduct {
    /// The matmul's tract node.
    pub node: usize,
    /// Its weights' input slot.
    pub slot: usize,
    /// The weights' axis over the flattened elements.
    pub axis: usize,
}

/// The [`RowProduct`] of the matmul stage made of `product` (anchor first) reading the
/// output of the stage made of `flatten`, when `flatten` only reshapes (no transpose:
/// the flattened order is the tensor's own) and the matmul contracts that one axis with
/// constant weights of rank 2.
pub fn row_product(model: &TypedModel, flatten: &[usize], product: &[usize]) -> Option<RowProduct> {
    let only_reshapes = flatten.iter().all(|&id| {
        matches!(
            model.node(id).op_as::<AxisOp>(),
            Some(AxisOp::Reshape(..) | AxisOp::Add(_) | AxisOp::Rm(_))
        )
    });
    let anchor = model.node(*product.first()?);
    let einsum = anchor.op_as::<EinSum>()?;
    let is_const = |o: &OutletId| model.outlet_fact(*o).is_ok_and(|f| f.konst.is_some());
    let data = (0..anchor.inputs.len()).find(|&i| !is_const(&anchor.inputs[i]))?;
    let slot = (0..anchor.inputs.len()).find(|&i| is_const(&anchor.inputs[i]))?;
    if !only_reshapes
        || anchor.inputs.len() != 2
        || anchor.inputs[data] != OutletId::new(*flatten.last()?, 0)
        || model.outlet_fact(anchor.inputs[slot]).ok()?.rank() != 2
    {
        return None;
    }
    // The one axis the data and the weights share and the output lacks.
    let contracted: Vec<_> = einsum
        .axes
        .iter_all_axes()
        .filter(|a| a.outputs[0].is_empty() && !a.inputs[data].is_empty())
        .collect();
    let [k] = contracted[..] else {
        return None;
    };
    let [axis] = k.inputs[slot][..] else {
        return None;
    };
    Some(RowProduct {
        node: anchor.id,
        slot,
        axis,
    })
}
