//! Runs tiles on strips of a reference run and compares their outputs with the
//! reference: the correctness check of every split.

use crate::{Reference, TileModel};
use anyhow::{Context, Result};
use legion_ir::{Ir, Rows, TensorRef};
use legion_plan::TileSpec;
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
pub fn check_tile(ir: &Ir, reference: &Reference, spec: &TileSpec) -> Result<Diff> {
    let tile = TileModel::build(ir, spec)?;
    let inputs = spec
        .inputs
        .iter()
        .map(|i| strip(ir, reference, i.tensor, i.rows))
        .collect::<Result<Vec<_>>>()?;
    let outputs = tile.run(inputs)?;
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
