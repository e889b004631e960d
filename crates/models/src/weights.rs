//! Deterministic weights: one ChaCha8 stream per (model, tensor) pair.
//!
//! The stream is keyed by FNV-1a hashes of the model and tensor names, so a
//! tensor's values depend only on those two names and its length: adding a
//! layer does not perturb the weights of the others. Floats are made from the
//! raw 32-bit words by hand (24 high bits, scaled), never through `rand`'s
//! distributions, whose values may change between releases.

use chacha20::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// Fixed part of every key; change it only together with `GENERATOR_VERSION`.
const BASE_SEED: u64 = 0x4c45_4749_4f4e_0001;

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn stream(model: &str, tensor: &str) -> ChaCha8Rng {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&BASE_SEED.to_le_bytes());
    seed[8..16].copy_from_slice(&fnv1a(model).to_le_bytes());
    seed[16..24].copy_from_slice(&fnv1a(tensor).to_le_bytes());
    ChaCha8Rng::from_seed(seed)
}

/// `len` floats uniform in `[lo, hi)`, as little-endian f32 bytes (ONNX `raw_data`).
pub(crate) fn uniform_le(model: &str, tensor: &str, len: usize, lo: f32, hi: f32) -> Vec<u8> {
    let mut bytes = vec![0u8; len * 4];
    stream(model, tensor).fill_bytes(&mut bytes);
    let step = (hi - lo) / (1u32 << 24) as f32;
    // The hot loop of VGG generation (138 M values): keep it plain so that an
    // unoptimised build of this crate stays fast.
    for word in bytes.chunks_exact_mut(4) {
        let bits = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        let value = lo + (bits >> 8) as f32 * step;
        word.copy_from_slice(&value.to_le_bytes());
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
#[cfg(test)]
mod perf_tmp {
    use super::*;
    #[test]
    fn perf_tmp() {
        let n = 10_000_000;
        let t = std::time::Instant::now();
        let mut bytes = vec![0u8; n * 4];
        stream("a", "b").fill_bytes(&mut bytes);
        eprintln!("fill {:?}", t.elapsed());
        let t = std::time::Instant::now();
        let v = uniform_le("a", "b", n, -1.0, 1.0);
        eprintln!("uniform {:?} {}", t.elapsed(), v.len());
    }
}
