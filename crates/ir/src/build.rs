//! From a typed tract model to stages: which nodes form a stage, what kind it is, its
//! geometry, cost and whether it splits by rows.

use crate::probe::{RowRule, probe_rows};
use crate::stage::{PoolOp, Split, Stage, StageId, StageKind, TensorInfo, TensorRef, Window};
use anyhow::Context;
use std::collections::{HashMap, HashSet};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::{Slice, StridedSlice, TypedConcat};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::cnn::{Conv, MaxPool, PoolSpec, SumPool};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::identity::Identity;
use tract_onnx::tract_core::ops::nn::{Reduce, Softmax};

/// Stages of `model`, in topological order, and the tensors the model outputs.
pub fn stages(
    model: &TypedModel,
    input_h_axis: Option<usize>,
) -> TractResult<(Vec<Stage>, Vec<TensorRef>)> {
    let mut b = Builder {
        model,
        drafts: vec![],
        stage_of_node: HashMap::new(),
        tensors: HashMap::new(),
    };
    let input = model.input_outlets()?[0];
    for id in model.eval_order()? {
        let node = model.node(id);
        if node.inputs.is_empty() && node.outputs.iter().all(|o| o.fact.konst.is_some()) {
            continue;
        }
        if OutletId::new(id, 0) == input {
            let fact = model.outlet_fact(input)?;
            b.tensors
                .insert(input, (TensorRef::Input, input_h_axis, shape_of(fact)?));
            continue;
        }
        if node.outputs.iter().all(|o| o.fact.konst.is_some()) {
            continue; // constant folding material: copied as a constant wherever used
        }
        match b.absorbing_stage(id)? {
            Some(s) => {
                b.drafts[s].nodes.push(id);
                b.drafts[s].tail = OutletId::new(id, 0);
                b.stage_of_node.insert(id, s);
            }
            None => {
                b.stage_of_node.insert(id, b.drafts.len());
                b.drafts.push(Draft {
                    nodes: vec![id],
                    tail: OutletId::new(id, 0),
                });
            }
        }
    }
    let mut stages = vec![];
    for s in 0..b.drafts.len() {
        let stage = b.finish(s)?;
        let tail = b.drafts[s].tail;
        b.tensors.insert(
            tail,
            (
                TensorRef::Stage(stage.id),
                stage.output.h_axis,
                stage.output.shape.clone(),
            ),
        );
        stages.push(stage);
    }
    let outputs = model
        .output_outlets()?
        .iter()
        .map(|o| {
            b.tensors.get(o).map(|t| t.0).with_context(|| {
                format!(
                    "model output {} is not the output of a stage",
                    model.node(o.node).name
                )
            })
        })
        .collect::<TractResult<_>>()?;
    Ok((stages, outputs))
}

/// Nodes of a stage being built; `tail` is the outlet the stage currently outputs.
struct Draft {
    nodes: Vec<usize>,
    tail: OutletId,
}

struct Builder<'a> {
    model: &'a TypedModel,
    drafts: Vec<Draft>,
    stage_of_node: HashMap<usize, usize>,
    /// Finished tensors: producer, H axis, shape.
    tensors: HashMap<OutletId, (TensorRef, Option<usize>, Vec<usize>)>,
}

fn shape_of(fact: &TypedFact) -> TractResult<Vec<usize>> {
    Ok(fact
        .shape
        .as_concrete()
        .with_context(|| format!("shape {:?} is not concrete", fact.shape))?
        .to_vec())
}

impl Builder<'_> {
    fn is_const(&self, o: OutletId) -> bool {
        self.model
            .outlet_fact(o)
            .map(|f| f.konst.is_some())
            .unwrap_or(false)
    }

    fn data_inputs(&self, id: usize) -> Vec<OutletId> {
        self.model
            .node(id)
            .inputs
            .iter()
            .copied()
            .filter(|o| !self.is_const(*o))
            .collect()
    }

    /// True for ops that compute each output row from the same row of their inputs:
    /// activations, per-channel affine ops (bias, BatchNorm), element-wise joins.
    fn is_row_local(&self, id: usize) -> bool {
        let node = self.model.node(id);
        if node.outputs[1..].iter().any(|o| !o.successors.is_empty()) {
            return false;
        }
        let op = &node.op;
        if is_unary_row_local(op.as_ref()) {
            return true;
        }
        let h = self
            .data_inputs(id)
            .first()
            .and_then(|o| self.h_axis_of(*o));
        if let Some(slice) = op.downcast_ref::<Slice>() {
            return h.is_some_and(|h| h != slice.axis);
        }
        if !op.is::<TypedBinOp>() {
            return false;
        }
        // Data operands have the output's rows (they may broadcast along other axes, as
        // a LayerNorm's mean does over channels); constant operands (bias, BN scale)
        // must be flat along rows.
        let out = &node.outputs[0].fact.shape;
        self.data_inputs(id).iter().all(|i| {
            self.model.outlet_fact(*i).is_ok_and(|f| match h {
                Some(h) => f.rank() == out.rank() && f.shape[h] == out[h],
                None => &f.shape == out,
            })
        }) && self.const_operands_fit_rows(id)
    }

    /// Constant operands of `id` fit a strip: flat along the rows of its data input (a
    /// bias, a BN scale), or holding one value per row of the whole tensor (YOLO's anchor
    /// grid), which a tile slices to its rows.
    fn const_operands_fit_rows(&self, id: usize) -> bool {
        let node = self.model.node(id);
        let data = self.data_inputs(id);
        let Some(h) = data.first().and_then(|o| self.h_axis_of(*o)) else {
            // No rows (after a barrier that drops them): nothing to split. Rows moved by
            // reshapes in this stage are unknown: refuse.
            return !data
                .first()
                .is_some_and(|o| self.rows_moved_inside_stage(*o));
        };
        let out = &node.outputs[0].fact.shape;
        let rank = out.rank();
        // A data operand of one row broadcast against a per-row constant is not a strip.
        let data_has_rows = data.iter().all(|o| {
            self.model
                .outlet_fact(*o)
                .is_ok_and(|f| f.rank() != rank || f.shape[h] == out[h])
        });
        data_has_rows
            && node.inputs.iter().filter(|o| self.is_const(**o)).all(|o| {
                let Ok(fact) = self.model.outlet_fact(*o) else {
                    return false;
                };
                let offset = rank.saturating_sub(fact.rank());
                h < offset
                    || fact
                        .shape
                        .get(h - offset)
                        .is_none_or(|d| *d == 1.to_dim() || (offset == 0 && *d == out[h]))
            })
    }

    /// The output axis holding the rows of an einsum whose one data input has its rows
    /// on axis `h`, when they are a free axis of the product (a channels-last Linear:
    /// `[1,H,W,C] x [C,N]`), so each output row reads the same input row.
    fn einsum_row_axis(&self, node: &TypedNode, einsum: &EinSum, h: usize) -> Option<usize> {
        let data: Vec<usize> = (0..node.inputs.len())
            .filter(|&i| !self.is_const(node.inputs[i]))
            .collect();
        let [slot] = data[..] else {
            return None;
        };
        let shapes: Vec<&ShapeFact> = node
            .inputs
            .iter()
            .map(|o| self.model.outlet_fact(*o).map(|f| &f.shape))
            .collect::<TractResult<_>>()
            .ok()?;
        einsum.axes.iter_all_axes().find_map(|axis| {
            // Other inputs lack the axis or broadcast along it.
            let only_data = axis
                .inputs
                .iter()
                .enumerate()
                .all(|(i, pos)| i == slot || pos.iter().all(|p| shapes[i][*p] == 1.to_dim()));
            match (&axis.inputs[slot][..], &axis.outputs[0][..]) {
                ([p], [out]) if *p == h && only_data => Some(*out),
                _ => None,
            }
        })
    }

    /// H axis of a data outlet: finished tensors know it; inside a stage being built it is
    /// the H axis of the anchor's output when the anchor says (windows, row-preserving
    /// ops), and unknown otherwise.
    fn h_axis_of(&self, o: OutletId) -> Option<usize> {
        if let Some(t) = self.tensors.get(&o) {
            return t.1;
        }
        let s = *self.stage_of_node.get(&o.node)?;
        let anchor = self.model.node(self.drafts[s].nodes[0]);
        let anchor_in = self.data_inputs(anchor.id).first().copied();
        if let Some(pool_spec) = pool_spec(anchor) {
            // As `classify` says: a conv's rows may be on its W axis.
            let h = pool_spec.data_format.h_axis();
            let in_h = anchor_in.and_then(|i| self.h_axis_of(i));
            return Some(if anchor.op.is::<Conv>() && in_h == Some(h + 1) {
                h + 1
            } else {
                h
            });
        }
        let in_h = anchor_in.and_then(|i| self.h_axis_of(i))?;
        if let Some(einsum) = anchor.op_as::<EinSum>() {
            return self.einsum_row_axis(anchor, einsum, in_h);
        }
        let op = &anchor.op;
        let keeps_rows = is_unary_row_local(op.as_ref())
            || op.is::<TypedBinOp>()
            || op.is::<TypedConcat>()
            || op.is::<Slice>()
            || op
                .downcast_ref::<Reduce>()
                .is_some_and(|r| !r.axes.contains(&in_h))
            || op
                .downcast_ref::<Softmax>()
                .is_some_and(|s| !s.axes.contains(&in_h));
        keeps_rows.then_some(in_h)
    }

    /// True when the rows of data outlet `o` are unknown because it is inside a stage
    /// of data movement (reshapes, transposes, resizes), which only the probe can map.
    fn rows_moved_inside_stage(&self, o: OutletId) -> bool {
        if self.tensors.contains_key(&o) {
            return false;
        }
        self.stage_of_node.get(&o.node).is_some_and(|&s| {
            let anchor = &self.model.node(self.drafts[s].nodes[0]).op;
            anchor.is::<AxisOp>() || anchor.name() == "Resize"
        })
    }

    /// The stage that node `id` extends, if any: `id` is row-local (or continues a chain of
    /// axis ops), reads only that stage's tensors including its tail, and nothing outside
    /// the stage reads the tail once `id` takes it over.
    fn absorbing_stage(&self, id: usize) -> TractResult<Option<usize>> {
        let inputs = self.data_inputs(id);
        let Some(&s) = inputs.first().and_then(|o| self.stage_of_node.get(&o.node)) else {
            return Ok(None);
        };
        if !inputs
            .iter()
            .all(|o| self.stage_of_node.get(&o.node) == Some(&s))
        {
            return Ok(None);
        }
        let draft = &self.drafts[s];
        if !inputs.contains(&draft.tail) || self.model.output_outlets()?.contains(&draft.tail) {
            return Ok(None);
        }
        let node = self.model.node(id);
        let anchor = self.model.node(draft.nodes[0]);
        let axis_chain = node.op.is::<AxisOp>() && anchor.op.is::<AxisOp>();
        if !axis_chain && !self.is_row_local(id) {
            return Ok(None);
        }
        // Every other reader of the tail must be row-local, read `id` and otherwise only
        // this stage (SiLU's Mul of x and Sigmoid(x)), so that it joins the stage later.
        // Two readers that do not meet again (the halves of a channel Split) cannot both
        // be absorbed: the second would read from inside the stage.
        let tail_readers = &self.model.node(draft.tail.node).outputs[draft.tail.slot].successors;
        let ok = tail_readers.iter().all(|inlet| {
            let inputs = self.data_inputs(inlet.node);
            inlet.node == id
                || (!axis_chain
                    && self.is_row_local(inlet.node)
                    && inputs.iter().any(|o| o.node == id)
                    && inputs
                        .iter()
                        .all(|o| o.node == id || self.stage_of_node.get(&o.node) == Some(&s)))
        });
        Ok(ok.then_some(s))
    }

    /// Turns draft `s` into a stage: kind, geometry, flops, weights, split.
    fn finish(&self, s: usize) -> TractResult<Stage> {
        let draft = &self.drafts[s];
        let model = self.model;
        let anchor = model.node(draft.nodes[0]);
        let inside: HashSet<usize> = draft.nodes.iter().copied().collect();
        let mut inputs = vec![];
        let mut input_shapes = vec![];
        let mut input_outlets = vec![];
        for &n in &draft.nodes {
            for o in self.data_inputs(n) {
                if inside.contains(&o.node) || input_outlets.contains(&o) {
                    continue;
                }
                let (r, h, shape) = self.tensors.get(&o).with_context(|| {
                    format!(
                        "node {} reads {} from inside another stage",
                        model.node(n).name,
                        model.node(o.node).name
                    )
                })?;
                input_outlets.push(o);
                inputs.push(*r);
                input_shapes.push(TensorInfo {
                    shape: shape.clone(),
                    h_axis: *h,
                });
            }
        }
        let out_shape = shape_of(model.outlet_fact(draft.tail)?)?;
        let in_h = input_shapes.first().and_then(|t| t.h_axis);
        let out_elems: u64 = out_shape.iter().product::<usize>() as u64;
        let weight_bytes = draft
            .nodes
            .iter()
            .flat_map(|n| &model.node(*n).inputs)
            .filter_map(|o| model.outlet_fact(*o).ok()?.konst.clone())
            .map(|t| (t.len() * t.datum_type().size_of()) as u64)
            .sum();
        let fused = draft.nodes[1..]
            .iter()
            .map(|n| model.node(*n).op.name().to_string())
            .collect();
        let (kind, flops, out_h, mut split) =
            self.classify(draft, &input_outlets, &input_shapes, &out_shape, out_elems)?;
        let output = TensorInfo {
            shape: out_shape,
            h_axis: out_h,
        };
        if split == Split::Rows {
            if let Some(i) = input_shapes.iter().position(|t| t.h_axis.is_none()) {
                let what = match inputs[i] {
                    TensorRef::Input => "the model input".to_string(),
                    TensorRef::Stage(p) => format!("stage {p}"),
                };
                split = Split::Barrier(format!("{what} has no row axis"));
            } else if out_h.is_none() || in_h.is_none() {
                split = Split::Barrier("output has no row axis".into());
            }
        }
        Ok(Stage {
            id: StageId(s as u32),
            name: anchor.name.clone(),
            kind,
            inputs,
            input_shapes,
            output,
            fused,
            flops,
            weight_bytes,
            nodes: draft.nodes.clone(),
            split,
            channels: crate::channels::channel_split(model, &draft.nodes).map(|(c, _)| c),
            partial: in_h.and_then(|h| crate::reduce::combine_across_rows(model, &draft.nodes, h)),
        })
    }

    /// Kind, flops, output H axis and split of a draft, from its anchor op.
    fn classify(
        &self,
        draft: &Draft,
        input_outlets: &[OutletId],
        input_shapes: &[TensorInfo],
        out_shape: &[usize],
        out_elems: u64,
    ) -> TractResult<(StageKind, u64, Option<usize>, Split)> {
        let anchor = self.model.node(draft.nodes[0]);
        let op = &anchor.op;
        let in_h = input_shapes.first().and_then(|t| t.h_axis);
        let rows = Split::Rows;
        let barrier = |r: &str| Split::Barrier(r.to_string());
        let first_in = input_shapes
            .first()
            .map(|t| t.shape.clone())
            .unwrap_or_default();

        if let Some(conv) = op.downcast_ref::<Conv>() {
            let window = window(&conv.pool_spec, &first_in, false);
            let ps = &conv.pool_spec;
            let macs = out_elems
                * (ps.input_channels / conv.group) as u64
                * (window.kernel[0] * window.kernel[1]) as u64;
            let h = ps.data_format.h_axis();
            // Rows on the W axis (a YOLOv8 DFL conv over anchors): the window is stored
            // with W first, so that index 0 is always the rows' axis.
            let (window, out_h, split) = if in_h == Some(h) {
                (window, Some(h), rows)
            } else if in_h == Some(h + 1) && ps.kernel_shape.len() == 2 {
                (transposed(window), Some(h + 1), rows)
            } else {
                let why = "conv input rows are on neither of its window axes";
                (window, Some(h), barrier(why))
            };
            let kind = StageKind::Conv {
                window,
                group: conv.group,
                in_channels: ps.input_channels,
                out_channels: ps.output_channels,
            };
            return Ok((kind, 2 * macs, out_h, split));
        }
        if let Some((ps, pool)) = op
            .downcast_ref::<MaxPool>()
            .map(|p| (&p.pool_spec, PoolOp::Max))
            .or_else(|| {
                op.downcast_ref::<SumPool>().map(|p| {
                    let pool = if p.normalize {
                        PoolOp::Avg {
                            count_include_pad: p.count_include_pad,
                        }
                    } else {
                        PoolOp::Sum
                    };
                    (&p.pool_spec, pool)
                })
            })
        {
            let ceil = matches!(
                ps.padding,
                tract_onnx::tract_core::ops::cnn::PaddingSpec::ExplicitOnnxPool(_, _, true)
            );
            let window = window(ps, &first_in, ceil);
            let flops = out_elems * (window.kernel[0] * window.kernel[1]) as u64;
            let h = ps.data_format.h_axis();
            let split = if in_h == Some(h) {
                rows
            } else {
                barrier("pool input rows are not on its H axis")
            };
            return Ok((StageKind::Pool { pool, window }, flops, Some(h), split));
        }
        if op.is::<TypedBinOp>() && input_outlets.len() >= 2 {
            let name = op.name().to_string();
            // Inputs may broadcast along any axis but the rows; a one-row input (a
            // squeeze-excitation scale) is read whole by every strip.
            let rows_agree = input_shapes.iter().all(|t| {
                t.h_axis == in_h
                    && t.shape.len() == out_shape.len()
                    && in_h.is_some_and(|h| t.shape[h] == out_shape[h] || t.shape[h] == 1)
            });
            let split = if rows_agree {
                rows
            } else if input_shapes.iter().any(|t| t.h_axis != in_h) {
                barrier(&format!(
                    "{name} reads inputs whose rows are on different axes"
                ))
            } else {
                barrier(&format!("{name} broadcasts one input along rows"))
            };
            return Ok((StageKind::Join { name }, out_elems, in_h, split));
        }
        if op.is::<TypedBinOp>() || is_unary_row_local(op.as_ref()) {
            let kind = StageKind::Elementwise {
                name: op.name().to_string(),
            };
            let split = if in_h.is_none() || self.const_operands_fit_rows(anchor.id) {
                rows // without rows, `finish` makes it a barrier saying so
            } else {
                barrier(&format!(
                    "{} applies a constant that varies along rows",
                    op.name()
                ))
            };
            return Ok((kind, out_elems, in_h, split));
        }
        if let Some(slice) = op.downcast_ref::<Slice>() {
            let split = if in_h == Some(slice.axis) {
                barrier("slices along rows")
            } else {
                rows
            };
            return Ok((StageKind::Slice { axis: slice.axis }, 0, in_h, split));
        }
        if let Some(concat) = op.downcast_ref::<TypedConcat>() {
            let same_rows = input_shapes.iter().all(|t| t.h_axis == in_h);
            let split = if Some(concat.axis) == in_h {
                barrier("concatenates along rows")
            } else if !same_rows {
                barrier("inputs hold rows on different axes")
            } else {
                rows
            };
            return Ok((StageKind::Concat { axis: concat.axis }, 0, in_h, split));
        }
        if let Some(einsum) = op.downcast_ref::<EinSum>() {
            let shapes: Vec<Vec<usize>> = anchor
                .inputs
                .iter()
                .map(|o| shape_of(self.model.outlet_fact(*o)?))
                .collect::<TractResult<_>>()?;
            let macs: u64 = einsum
                .axes
                .iter_all_axes()
                .map(|axis| {
                    axis.inputs
                        .iter()
                        .enumerate()
                        .find_map(|(i, pos)| pos.first().map(|p| shapes[i][*p]))
                        .unwrap_or(1) as u64
                })
                .product();
            let row_axis = in_h.and_then(|h| self.einsum_row_axis(anchor, einsum, h));
            let split = match row_axis {
                Some(_) => rows,
                None => barrier("matrix multiply over whole features"),
            };
            return Ok((StageKind::MatMul { macs }, 2 * macs, row_axis, split));
        }
        if let Some(reduce) = op.downcast_ref::<Reduce>() {
            let axes = reduce.axes.to_vec();
            let flops = first_in.iter().product::<usize>() as u64;
            // tract's Reduce keeps the reduced axes with size 1: a global pool's output
            // keeps a row axis of one row, which later stages can read whole.
            let (out_h, split) = match in_h {
                Some(h) if axes.contains(&h) => {
                    let kept = out_shape.len() == first_in.len() && out_shape[h] == 1;
                    (
                        kept.then_some(h),
                        barrier("reduces over rows (global pooling)"),
                    )
                }
                h => (h, rows),
            };
            return Ok((StageKind::Reduce { axes }, flops, out_h, split));
        }
        if let Some(softmax) = op.downcast_ref::<Softmax>() {
            let axes = softmax.axes.to_vec();
            let split = match in_h {
                Some(h) if axes.contains(&h) => barrier("normalises over rows"),
                _ => rows,
            };
            return Ok((StageKind::Softmax { axes }, out_elems, in_h, split));
        }
        if op.is::<StridedSlice>() && input_outlets.len() == 1 {
            return Ok(self.strided_slice(draft, input_outlets[0], &first_in, out_shape, in_h));
        }
        let movement = op.is::<AxisOp>() || op.name() == "Resize";
        if movement && input_outlets.len() == 1 {
            // Probe the data-movement prefix only: fused affine ops (a BatchNorm) would
            // rescale the row indices. Row-local ops after it keep rows where they are.
            let moves = draft
                .nodes
                .iter()
                .take_while(|n| {
                    let op = &self.model.node(**n).op;
                    op.is::<AxisOp>() || op.name() == "Resize"
                })
                .count();
            let probed = in_h.and_then(|h| {
                probe_rows(
                    self.model,
                    &draft.nodes[..moves],
                    input_outlets[0],
                    &first_in,
                    h,
                    OutletId::new(draft.nodes[moves - 1], 0),
                )
            });
            let (kind, out_h, split) = match probed {
                Some((axis, RowRule::Same)) if op.is::<AxisOp>() => {
                    (StageKind::Layout, Some(axis), rows)
                }
                Some((axis, RowRule::Block(block))) => {
                    (StageKind::SpaceToDepth { block }, Some(axis), rows)
                }
                // Axis ops copy no data: rows "repeated" through them were merged with
                // the axes after them (a flatten), not upsampled.
                Some((axis, RowRule::Repeat(factor))) if op.is::<AxisOp>() => {
                    (StageKind::Flatten { factor }, Some(axis), rows)
                }
                Some((axis, RowRule::Repeat(factor))) => {
                    (StageKind::Upsample { factor }, Some(axis), rows)
                }
                _ if op.is::<AxisOp>() => (
                    StageKind::Reshape,
                    None,
                    barrier("reshape moves data across rows"),
                ),
                _ => (
                    StageKind::Other {
                        name: op.name().to_string(),
                    },
                    None,
                    barrier("Resize is not a nearest integer upsampling along rows"),
                ),
            };
            return Ok((kind, 0, out_h, split));
        }
        let name = op.name().to_string();
        // An op we do not model runs whole; when it keeps the rank, its output's rows are
        // taken on the same axis (perhaps fewer of them, as after a strided slice), so
        // the stages after it can still split: each checks its own row map on that axis.
        let out_h = in_h.filter(|_| out_shape.len() == first_in.len());
        let reason = format!("op {name} is not modelled by Legion");
        Ok((
            StageKind::Other { name },
            out_elems,
            out_h,
            Split::Barrier(reason),
        ))
    }
}

impl Builder<'_> {
    /// A strided slice (ONNX Slice with steps), probed on its rows: rows untouched (it
    /// slices other axes), a strided slice of the rows alone, or a barrier.
    fn strided_slice(
        &self,
        draft: &Draft,
        input: OutletId,
        first_in: &[usize],
        out_shape: &[usize],
        in_h: Option<usize>,
    ) -> (StageKind, u64, Option<usize>, Split) {
        let anchor = draft.nodes[0];
        let same_rank = out_shape.len() == first_in.len();
        let probed = in_h.filter(|_| same_rank).and_then(|h| {
            let rule = probe_rows(
                self.model,
                &[anchor],
                input,
                first_in,
                h,
                OutletId::new(anchor, 0),
            )?;
            (rule.0 == h).then_some((h, rule.1))
        });
        let sliced: Vec<usize> = (0..out_shape.len())
            .filter(|&a| same_rank && out_shape[a] != first_in[a])
            .collect();
        match (probed, &sliced[..]) {
            // Rows untouched: the slice is along the first axis that shrank (none when
            // it keeps everything).
            (Some((h, RowRule::Same)), _) => {
                let axis = sliced.first().copied().unwrap_or(h);
                (StageKind::Slice { axis }, 0, Some(h), Split::Rows)
            }
            (Some((h, RowRule::Subsample { step, offset })), [axis]) if *axis == h => (
                StageKind::Subsample { step, offset },
                0,
                Some(h),
                Split::Rows,
            ),
            _ => (
                StageKind::Other {
                    name: "StridedSlice".into(),
                },
                0,
                in_h.filter(|_| same_rank),
                Split::Barrier("strided slice of the rows and other axes at once".into()),
            ),
        }
    }
}

/// A window read with its two spatial axes swapped.
fn transposed(w: Window) -> Window {
    let swap = |v: [usize; 2]| [v[1], v[0]];
    Window {
        kernel: swap(w.kernel),
        stride: swap(w.stride),
        dilation: swap(w.dilation),
        pad_before: swap(w.pad_before),
        pad_after: swap(w.pad_after),
        ceil_mode: w.ceil_mode,
    }
}

/// Unary ops that map each element to itself: activations, casts, Identity, inference Dropout.
pub(crate) fn is_unary_row_local(op: &dyn TypedOp) -> bool {
    op.is::<ElementWiseOp>() || op.is::<Identity>() || op.is::<Cast>() || op.name() == "Dropout"
}

fn pool_spec(node: &TypedNode) -> Option<&PoolSpec> {
    node.op_as::<Conv>()
        .map(|c| &c.pool_spec)
        .or_else(|| node.op_as::<MaxPool>().map(|p| &p.pool_spec))
        .or_else(|| node.op_as::<SumPool>().map(|p| &p.pool_spec))
}

/// Window geometry along H and W, pads resolved against the input size.
fn window(ps: &PoolSpec, input_shape: &[usize], ceil_mode: bool) -> Window {
    let hw: Vec<usize> = ps
        .data_format
        .shape(input_shape.to_vec())
        .map(|s| s.hw_dims().to_vec())
        .unwrap_or_default();
    let strides = ps.strides();
    let dilations = ps.dilations();
    let padded = ps
        .padding
        .compute(&hw, &ps.kernel_shape, &dilations, &strides);
    let pair = |v: &[usize]| [v[0], *v.get(1).unwrap_or(&1)];
    let before: Vec<usize> = padded.iter().map(|p| p.pad_before).collect();
    let after: Vec<usize> = padded.iter().map(|p| p.pad_after).collect();
    Window {
        kernel: pair(&ps.kernel_shape),
        stride: pair(&strides),
        dilation: pair(&dilations),
        pad_before: pair(&before),
        pad_after: pair(&after),
        ceil_mode,
    }
}
