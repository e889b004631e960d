//! Deterministic weights: one ChaCha8 stream per (model, tensor) pair.
//!
//! The stream is keyed by FNV-1a hashes of the model and tensor names, so a
//! tensor's values depend only on those two names and its length: adding a
//! layer does not perturb the weights of the others. The words come straight
//! from `rand_chacha`'s block core (the same stream as `ChaCha8Rng`), 64 at a
//! time, and are turned into floats by hand (24 high bits, scaled), never
//! through `rand`'s distributions, whose values may change between releases.

use rand_chacha::ChaCha8Core;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::rand_core::block::BlockRngCore;
use zerocopy::IntoBytes;

/// Fixed part of every key; change it only together with `GENERATOR_VERSION`.
const BASE_SEED: u64 = 0x4c45_4749_4f4e_0001;

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn stream(model: &str, tensor: &str) -> ChaCha8Core {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&BASE_SEED.to_le_bytes());
    seed[8..16].copy_from_slice(&fnv1a(model).to_le_bytes());
    seed[16..24].copy_from_slice(&fnv1a(tensor).to_le_bytes());
    ChaCha8Core::from_seed(seed)
}

/// `len` floats uniform in `[lo, hi)`, as little-endian f32 bytes (ONNX `raw_data`).
pub(crate) fn uniform_le(model: &str, tensor: &str, len: usize, lo: f32, hi: f32) -> Vec<u8> {
    let mut core = stream(model, tensor);
    let mut block = Default::default();
    let step = (hi - lo) / (1u32 << 24) as f32;
    let mut bytes = vec![0u8; len * 4];
    // VGG's 138 M weights go through here: whole blocks of 64 words, a
    // plain loop, and a memcpy per block keep even an unoptimised build fast.
    for chunk in bytes.chunks_mut(4 * 64) {
        core.generate(&mut block);
        let words = &mut block.as_mut()[..chunk.len() / 4];
        for word in words.iter_mut() {
            *word = (lo + (*word >> 8) as f32 * step).to_bits().to_le();
        }
        chunk.copy_from_slice(words.as_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect()
    }

    #[test]
    fn values_stay_in_range_and_vary() {
        let v = floats(&uniform_le("m", "t", 10_000, -0.5, 1.5));
        assert!(v.iter().all(|x| (-0.5..=1.5).contains(x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn streams_depend_on_both_names() {
        let a = uniform_le("m", "t", 8, 0.0, 1.0);
        assert_eq!(a, uniform_le("m", "t", 8, 0.0, 1.0));
        assert_ne!(a, uniform_le("m", "u", 8, 0.0, 1.0));
        assert_ne!(a, uniform_le("n", "t", 8, 0.0, 1.0));
    }

    /// Pins the stream: if this fails, every model's bytes changed and
    /// `GENERATOR_VERSION` must be bumped (then update the expected values).
    #[test]
    fn stream_is_value_stable() {
        let v = floats(&uniform_le("legion", "weights", 3, 0.0, 1.0));
        assert_eq!(v, PINNED);
    }

    const PINNED: [f32; 3] = [0.720_518_8, 0.856_746_73, 0.693_685_95];
}
