//! Conversions between tract tensors and the protocol's f32 tensors, and content hashes.

use crate::proto::F32Tensor;
use anyhow::{Result, ensure};
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
    let values = t.to_plain_array_view::<f32>()?;
    Ok(F32Tensor {
        shape: t.shape().iter().map(|&d| d as u64).collect(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
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
    let values: Vec<f32> = t
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Tensor::from_shape(&shape, &values)
}
