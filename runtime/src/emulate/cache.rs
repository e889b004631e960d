//! Cold caches for timed runs (docs/architecture.md, "The emulated clock").
//!
//! A board's caches are small (the RK3399's L2 is 1 MiB): in a plan, a stage's weights
//! and input come from memory, whatever ran before. This host's last-level cache can be
//! hundreds of MB, so a tile run right after itself finds them cached and runs faster
//! than it does in a plan (VGG-16's fc7 alone: 2.3 ms warm, 4.5-5.1 ms cold). The
//! emulator therefore evicts the host's caches before every timed run of a tile that
//! reads at least [`EVICT_ABOVE`] bytes.

use std::sync::{Mutex, OnceLock};

/// Tiles that read fewer bytes (weights and input strips) run without an eviction
/// before them: what a warm cache saves them is well under what an eviction costs.
pub const EVICT_ABOVE: u64 = 1 << 20;

/// Set (to anything) in a worker's environment, its emulator skips the evictions: for
/// tests that check outputs and not times, where they only cost time.
pub const WARM_CACHES_ENV: &str = "LEGION_WARM_CACHES";

/// The eviction buffer's size when the host does not report its caches.
const FALLBACK_CACHE_BYTES: u64 = 64 << 20;

/// Bytes of the host's largest data cache, from sysfs; `None` where it is not reported.
pub fn last_level_cache_bytes() -> Option<u64> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|entry| {
        let path = entry.ok()?.path();
        let kind = std::fs::read_to_string(path.join("type")).ok()?;
        if kind.trim() == "Instruction" {
            return None;
        }
        parse_cache_size(&std::fs::read_to_string(path.join("size")).ok()?)
    })
    .max()
}

/// A sysfs cache size ("491520K", "32M", "512").
fn parse_cache_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = digits.parse().ok()?;
    match unit {
        "" => Some(n),
        "K" => Some(n << 10),
        "M" => Some(n << 20),
        "G" => Some(n << 30),
        _ => None,
    }
}

/// A buffer as large as the host's largest cache, written line by line before a timed
/// run so that little the last run read is left cached (VGG-16's fc7 ran as cold as
/// with a buffer 1.5 times as large). Allocated on first use.
#[derive(Debug, Default)]
pub struct CacheEvictor {
    buffer: OnceLock<Mutex<Vec<u8>>>,
}

impl CacheEvictor {
    /// Evicts the host's caches when a tile reading `bytes` is about to be timed.
    pub fn before_run(&self, bytes: u64) {
        static WARM: OnceLock<bool> = OnceLock::new();
        if bytes < EVICT_ABOVE || *WARM.get_or_init(|| std::env::var_os(WARM_CACHES_ENV).is_some())
        {
            return;
        }
        let buffer = self.buffer.get_or_init(|| {
            let size = last_level_cache_bytes().unwrap_or(FALLBACK_CACHE_BYTES);
            Mutex::new(vec![0; size as usize])
        });
        let mut buffer = buffer.lock().unwrap_or_else(|e| e.into_inner());
        for line in buffer.chunks_mut(64) {
            line[0] = line[0].wrapping_add(1);
        }
        std::hint::black_box(&*buffer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_cache_sizes_parse() {
        assert_eq!(parse_cache_size("491520K\n"), Some(491_520 << 10));
        assert_eq!(parse_cache_size("32M"), Some(32 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("12Q"), None);
        assert_eq!(parse_cache_size(""), None);
    }

    #[test]
    fn only_tiles_past_the_threshold_evict_with_a_buffer_the_size_of_the_cache() {
        let evictor = CacheEvictor::default();
        evictor.before_run(EVICT_ABOVE - 1);
        assert!(
            evictor.buffer.get().is_none(),
            "a small tile allocated the buffer"
        );
        evictor.before_run(EVICT_ABOVE);
        let buffer = evictor.buffer.get().expect("evicted").lock().unwrap();
        let cache = last_level_cache_bytes().unwrap_or(FALLBACK_CACHE_BYTES);
        assert_eq!(buffer.len() as u64, cache);
        assert!(
            buffer.iter().step_by(64).all(|&b| b == 1),
            "every line written"
        );
    }
}
