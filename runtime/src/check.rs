//! Runs tiles on strips of a reference run and compares their outputs with the
//! reference: the correctness check of every split.

use crate::{Reference, TileModel};
use anyhow::{Context, Result};
use legion_ir::{Ir, Rows, StageId, TensorRef};
use legion_plan::TileSpec;
use std::collections::HashMap;
use tract_onnx::prelude::*;

/// Largest differences between tile outputs and the single-device run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Diff {
    /// Largest absolute difference.
    pub max_abs: f32,
    /// Largest absolute difference over the largest magnitude of the reference tensor.
    pub max_rel: f32,
}

impl Diff {
    /// True when the strips match the single-device run: error at most `rel` relative
    /// to the largest magnitude of the reference tensor. There is no absolute floor: an
    /// output whose values are all about 1e-9 (an untrained head) is judged on its own
    /// scale, so garbage of that size fails.
    pub fn within(self, rel: f32) -> bool {
        self.max_rel <= rel
    }

    /// The worse of two diffs.
    pub fn max(self, other: Diff) -> Diff {
        Diff {
            max_abs: self.max_abs.max(other.max_abs),
            max_rel: self.max_rel.max(other.max_rel),
        }
    }
}

/// A deterministic input with values spread over [-1, 1], for checks and benchmarks.
pub fn test_input(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    Tensor::from_shape(shape, &values).expect("shape and length agree")
}

/// Rows `rows` of tensor `r` of the reference run (all of it without a row axis).
pub fn strip(ir: &Ir, reference: &Reference, r: TensorRef, rows: Rows) -> Result<Tensor> {
    match ir.tensor(r).h_axis {
        Some(h) => reference.tensor(r).slice(h, rows.start, rows.end),
        None => Ok(reference.tensor(r).clone()),
    }
}

/// Builds and runs `spec` on strips of the reference and compares every output strip.
/// A tile that computes partial results of a reduction runs in its phases, reading the
/// combined results from the reference ([`check_partials`] checks the partials).
pub fn check_tile(ir: &Ir, reference: &Reference, spec: &TileSpec) -> Result<Diff> {
    let (outputs, _) = run_phases(ir, reference, spec)?;
    let mut diff = Diff::default();
    for (out, got) in spec.outputs.iter().zip(outputs) {
        let r = TensorRef::Stage(out.stage);
        let mut want = strip(ir, reference, r, out.rows)?;
        if let Some(channels) = out.channels {
            let axis = ir
                .stage(out.stage)
                .channels
                .context("channels sent of a stage that does not split by them")?
                .axis;
            want = want.slice(axis, channels.start, channels.end)?;
        }
        diff = diff.max(compare(&got, &want, reference.tensor(r))?);
    }
    Ok(diff)
}

/// Runs the tiles of one group (`specs`, one per device in the group's order), combines
/// the partial results of each reduction in that order, and compares them with the
/// reference: the check of [`TileStage::partial`](legion_plan::TileStage::partial).
pub fn check_partials(ir: &Ir, reference: &Reference, specs: &[TileSpec]) -> Result<Diff> {
    let mut parts: HashMap<StageId, Vec<Tensor>> = HashMap::new();
    for spec in specs {
        for (stage, partial) in run_phases(ir, reference, spec)?.1 {
            parts.entry(stage).or_default().push(partial);
        }
    }
    let mut diff = Diff::default();
    for (stage, parts) in parts {
        let how = ir
            .stage(stage)
            .partial
            .context("a partial of a stage that does not combine")?;
        let r = TensorRef::Stage(stage);
        let got = crate::combine(how, &parts)?;
        diff = diff.max(compare(&got, reference.tensor(r), reference.tensor(r))?);
    }
    Ok(diff)
}

/// A tile's outputs (in [`TileSpec::outputs`] order) and its partial results.
type PhaseOutputs = (Vec<Tensor>, Vec<(StageId, Tensor)>);

/// Runs `spec` phase by phase on strips of the reference: the tile's outputs and its
/// partial results. Later phases read the tile's own earlier outputs, and the combined
/// results from the reference.
fn run_phases(ir: &Ir, reference: &Reference, spec: &TileSpec) -> Result<PhaseOutputs> {
    let partial: Vec<StageId> = spec
        .stages
        .iter()
        .filter(|s| s.partial)
        .map(|s| s.stage)
        .collect();
    let mut computed: HashMap<StageId, (Rows, Tensor)> = HashMap::new();
    let mut partials = vec![];
    let mut outputs: HashMap<(StageId, Rows), Tensor> = HashMap::new();
    // A tile in parts: its partial products so far.
    let mut products = vec![];
    for phase in spec.phases(ir).into_iter().map(|p| p.spec) {
        if phase.stages.is_empty() {
            continue;
        }
        let tile = TileModel::build(ir, &phase)?;
        if phase.stages.iter().any(|s| s.part.is_some()) {
            let input = phase.inputs[0];
            let got = tile.run(vec![strip(ir, reference, input.tensor, input.rows)?])?;
            products.extend(got);
            continue;
        }
        let summed = phase.stages.iter().any(|s| s.summed);
        let inputs = phase
            .inputs
            .iter()
            .map(|i| match i.tensor {
                _ if summed => crate::combine(legion_ir::Combine::Sum, &products),
                TensorRef::Stage(q) if !partial.contains(&q) && computed.contains_key(&q) => {
                    let (rows, t) = &computed[&q];
                    anyhow::ensure!(
                        *rows == i.rows,
                        "{q:?}: rows {} read, {rows} computed",
                        i.rows
                    );
                    Ok(t.clone())
                }
                r => strip(ir, reference, r, i.rows),
            })
            .collect::<Result<Vec<_>>>()?;
        for (out, got) in phase.outputs.iter().zip(tile.run(inputs)?) {
            if partial.contains(&out.stage) {
                partials.push((out.stage, got));
            } else {
                outputs.insert((out.stage, out.rows), got.clone());
                computed.insert(out.stage, (out.rows, got));
            }
        }
    }
    let outputs = spec
        .outputs
        .iter()
        .map(|o| match outputs.get(&(o.stage, o.rows)) {
            Some(t) => Ok(t.clone()),
            // A phase output all rows computed of a stage later phases read.
            None => {
                let (rows, t) = computed
                    .get(&o.stage)
                    .context("an output the tile did not compute")?;
                let h = ir
                    .tensor(TensorRef::Stage(o.stage))
                    .h_axis
                    .context("rows of a stage without rows")?;
                Ok(t.slice(h, o.rows.start - rows.start, o.rows.end - rows.start)?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((outputs, partials))
}

/// The difference of `got` from `want`, relative to the largest magnitude in `whole`
/// (the tensor `want` is a strip of).
pub fn compare(got: &Tensor, want: &Tensor, whole: &Tensor) -> Result<Diff> {
    anyhow::ensure!(
        got.shape() == want.shape(),
        "strip shape {:?}, expected {:?}",
        got.shape(),
        want.shape()
    );
    let got = got.to_plain_array_view::<f32>()?;
    let want = want.to_plain_array_view::<f32>()?;
    let scale = whole
        .to_plain_array_view::<f32>()?
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let max_abs = got
        .iter()
        .zip(want.iter())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    Ok(Diff {
        max_abs,
        max_rel: max_abs / scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_outputs_are_judged_on_their_own_scale() {
        let want = Tensor::from_shape(&[4], &[1e-9f32, -2e-9, 3e-9, 0.0]).unwrap();
        let garbage = Tensor::from_shape(&[4], &[-1e-9f32, 2e-9, 0.0, 3e-9]).unwrap();
        let diff = compare(&garbage, &want, &want).unwrap();
        assert!(diff.max_abs < 1e-6, "{diff:?}");
        assert!(
            !diff.within(1e-5),
            "garbage of the output's size passed: {diff:?}"
        );
        let close = Tensor::from_shape(&[4], &[1e-9f32, -2e-9, 3.00001e-9, 0.0]).unwrap();
        assert!(compare(&close, &want, &want).unwrap().within(1e-5));
    }
}
