//! Combining partial results of a reduction over rows, one per device, into the whole
//! result (docs/architecture.md, "Reductions across devices").

use anyhow::{Context, Result, ensure};
use legion_ir::Combine;
use tract_onnx::prelude::*;

/// Combines `parts` (equal shapes, f32) element-wise, in order: the same order on every
/// device, so all of them compute the same bits.
pub fn combine(how: Combine, parts: &[Tensor]) -> Result<Tensor> {
    let (first, rest) = parts
        .split_first()
        .context("no partial results to combine")?;
    let mut out = first.clone().into_plain_array::<f32>()?;
    for part in rest {
        ensure!(
            part.shape() == out.shape(),
            "partial results of shapes {:?} and {:?}",
            out.shape(),
            part.shape()
        );
        let part = part.to_plain_array_view::<f32>()?;
        match how {
            Combine::Sum => out.zip_mut_with(&part, |a, b| *a += b),
            Combine::Max => out.zip_mut_with(&part, |a, b| *a = a.max(*b)),
        }
    }
    Ok(out.into_tensor())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_and_maxes_in_order() {
        let a = tensor1(&[1f32, -2.0, 3.0]);
        let b = tensor1(&[0.5f32, 4.0, -1.0]);
        let sum = combine(Combine::Sum, &[a.clone(), b.clone()]).unwrap();
        assert_eq!(sum, tensor1(&[1.5f32, 2.0, 2.0]));
        let max = combine(Combine::Max, &[a, b]).unwrap();
        assert_eq!(max, tensor1(&[1f32, 4.0, 3.0]));
        assert!(combine(Combine::Sum, &[]).is_err());
        assert!(combine(Combine::Sum, &[tensor1(&[1f32]), tensor1(&[1f32, 2.0])]).is_err());
    }
}
