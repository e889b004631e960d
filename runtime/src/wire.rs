//! Conversions between tract tensors and the protocol's f32 tensors and rows, and
//! content hashes.

use crate::proto::{ChannelRange, F32Tensor, Rows as WireRows};
use anyhow::{Context, Result, bail, ensure};
use legion_ir::{Ir, Rows, StageId, TensorRef};
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;

/// Lowercase hex sha256 of `bytes`: a model's content address.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of a digest.
pub(crate) fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` looks like a sha256 content address (64 lowercase hex digits).
pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Encodes an f32 tensor: its shape and little-endian values.
pub fn to_wire(t: &Tensor) -> Result<F32Tensor> {
    let view = t.to_plain_array_view::<f32>()?;
    let data = match view.as_slice() {
        Some(values) => le_bytes(values),
        None => le_bytes(&view.iter().copied().collect::<Vec<f32>>()),
    };
    Ok(F32Tensor {
        shape: t.shape().iter().map(|&d| d as u64).collect(),
        data,
    })
}

/// Decodes an f32 tensor, checking that its bytes fill its shape.
pub fn from_wire(t: &F32Tensor) -> Result<Tensor> {
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let n = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|n| n.checked_mul(4).is_some())
        .ok_or_else(|| anyhow::anyhow!("tensor shape {shape:?} is too large"))?;
    ensure!(
        t.data.len() == n * 4,
        "tensor of shape {shape:?} needs {} bytes, got {}",
        n * 4,
        t.data.len()
    );
    let mut values = vec![0f32; n];
    read_le_bytes(&t.data, &mut values);
    Ok(tract_ndarray::ArrayD::from_shape_vec(shape, values)?.into_tensor())
}

/// Encodes `strip`, rows `rows` (of channels `channels`, when given) of `tensor`, sent
/// by `from` (empty for the coordinator) during inference `inference` to the program
/// `program` (empty for the coordinator).
pub(crate) fn rows_to_wire(
    program: String,
    inference: u64,
    from: &str,
    (tensor, rows, channels): (TensorRef, Rows, Option<Rows>),
    strip: &Tensor,
) -> Result<WireRows> {
    Ok(WireRows {
        program,
        inference,
        from: from.to_string(),
        tensor: match tensor {
            TensorRef::Input => -1,
            TensorRef::Stage(s) => s.index() as i64,
        },
        start: rows.start as u64,
        end: rows.end as u64,
        data: Some(to_wire(strip)?),
        channels: channels.map(|c| ChannelRange {
            start: c.start as u64,
            end: c.end as u64,
        }),
        partial: false,
    })
}

/// A part of a tensor on the wire: the tensor, its rows and, of a tensor computed split
/// by channels, its channels.
pub(crate) type Part = (TensorRef, Rows, Option<Rows>);

/// Decodes rows on the wire for `ir`, checking the tensor and the strip's shape.
pub(crate) fn rows_from_wire(ir: &Ir, m: &WireRows) -> Result<(Part, Tensor)> {
    let tensor = match m.tensor {
        -1 => TensorRef::Input,
        s if s >= 0 && (s as usize) < ir.stages.len() => TensorRef::Stage(StageId(s as u32)),
        s => bail!(
            "rows of tensor {s}: the model has {} stages",
            ir.stages.len()
        ),
    };
    let rows = Rows::new(m.start as usize, m.end as usize);
    let data = m.data.as_ref().context("rows without data")?;
    let mut want = ir.tensor(tensor).strip_shape(rows);
    let channels = match (&m.channels, tensor) {
        (None, _) => None,
        (Some(c), TensorRef::Stage(s)) if ir.stage(s).channels.is_some() => {
            let split = ir.stage(s).channels.expect("checked");
            let c = Rows::new(c.start as usize, c.end as usize);
            ensure!(
                c.start < c.end && c.end <= split.count,
                "channels {c} of {tensor:?}, which has {}",
                split.count
            );
            want[split.axis] = c.len();
            Some(c)
        }
        (Some(_), _) => bail!("channels of {tensor:?}, which is not split by channels"),
    };
    let want: Vec<u64> = want.iter().map(|&d| d as u64).collect();
    ensure!(
        data.shape == want,
        "rows {rows} of {tensor:?}: shape {:?}, expected {want:?}",
        data.shape
    );
    Ok(((tensor, rows, channels), from_wire(data)?))
}

// Strips are megabytes: on little-endian hosts (x86-64, aarch64, armv7) the wire
// format is the memory layout, so encoding and decoding are one copy each.

#[cfg(target_endian = "little")]
fn le_bytes(values: &[f32]) -> Vec<u8> {
    zerocopy::IntoBytes::as_bytes(values).to_vec()
}

#[cfg(target_endian = "little")]
fn read_le_bytes(bytes: &[u8], values: &mut [f32]) {
    zerocopy::IntoBytes::as_mut_bytes(values).copy_from_slice(bytes);
}

#[cfg(target_endian = "big")]
fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(target_endian = "big")]
fn read_le_bytes(bytes: &[u8], values: &mut [f32]) {
    for (v, c) in values.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_survives_the_wire_bit_for_bit() {
        let values: Vec<f32> = (0..2 * 3 * 5)
            .map(|i| (i as f32 - 7.5) * 0.3)
            .chain([f32::MIN_POSITIVE, -0.0])
            .collect();
        let t = Tensor::from_shape(&[2, 4, 4], &values).unwrap();
        let wire = to_wire(&t).unwrap();
        assert_eq!(wire.shape, [2, 4, 4]);
        assert_eq!(&wire.data[4..8], &values[1].to_le_bytes());
        let back = from_wire(&wire).unwrap();
        assert_eq!(back.shape(), [2, 4, 4]);
        let got = back.to_plain_array_view::<f32>().unwrap();
        assert!(
            got.iter()
                .zip(&values)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }

    #[test]
    fn bytes_that_do_not_fill_the_shape_are_refused() {
        let wire = F32Tensor {
            shape: vec![1, 2, 3],
            data: vec![0; 23],
        };
        let e = format!("{:#}", from_wire(&wire).unwrap_err());
        assert!(e.contains("needs 24 bytes, got 23"), "{e}");
    }
}
