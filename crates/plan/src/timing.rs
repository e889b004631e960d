//! Timings the runtime reports, each on a named clock.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Which clock a time is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Clock {
    /// Wall-clock time measured on real devices and links.
    Real,
    /// Emulated boards: compute measured on the host and scaled to the board's speed,
    /// link times modelled from bytes, bandwidth and latency.
    Emulated,
}

impl fmt::Display for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Clock::Real => "real",
            Clock::Emulated => "emulated",
        })
    }
}

/// One device's part of a step: strips in, tile run, strips out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceTiming {
    /// The device's name.
    pub device: String,
    /// Bytes of input strips sent to it.
    pub bytes_in: u64,
    /// Bytes of output strips it sent back.
    pub bytes_out: u64,
    /// Time until its input strips had arrived, µs from the step's start.
    pub in_us: u64,
    /// Its compute time, µs.
    pub compute_us: u64,
    /// Time its output strips took to come back, µs.
    pub out_us: u64,
    /// When its output had arrived, µs from the step's start.
    pub done_us: u64,
    /// On the emulated clock: the host's rate its compute was scaled with, GFLOP/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_gflops: Option<f64>,
}

/// One step (a fused group across devices, or a barrier stage on one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    /// The clock of every time here.
    pub clock: Clock,
    /// From the first strip sent to the last strip received, µs.
    pub total_us: u64,
    /// Per device, in the order the step listed them.
    pub devices: Vec<DeviceTiming>,
}

/// What `legion run --save` writes: the measured timings of a plan's runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResults {
    /// sha256 of the model the plan is for.
    pub model_sha256: String,
    /// The candidate run (its name in the plan).
    pub candidate: String,
    /// How its rows moved: `programs` or `hub` (absent from runs saved before there
    /// were two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The clock of every time here.
    pub clock: Clock,
    /// End-to-end latency of every run, µs, in order.
    pub runs_us: Vec<u64>,
    /// Their median, µs.
    pub median_us: u64,
    /// Per group of the candidate, the step timings of the median run.
    pub groups: Vec<StepTiming>,
    /// The fastest device running the whole model alone, and its median time, µs, over
    /// as many runs as the plan's, each run after one of the plan's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_single_device: Option<(String, u64)>,
    /// Every device running the whole model alone (once, after a warm-up): its name and
    /// compute time (without the transfers), µs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices_alone: Vec<(String, u64)>,
    /// With `--check`: the largest difference of the median run's outputs from the best
    /// single device's, relative to the largest magnitude of each output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_max_rel: Option<f32>,
    /// On the emulated clock: the range of the host's rate over every run here, the
    /// plan's and the single device's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_gflops: Option<HostRates>,
}

/// How far the host's rate may move during one measurement on the emulated clock
/// before the measurement says so: 5%.
pub const HOST_DRIFT_LIMIT: f64 = 0.05;

/// The range of the host's rate over a measurement on the emulated clock, GFLOP/s.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRates {
    /// The slowest rate seen.
    pub min: f64,
    /// The fastest rate seen.
    pub max: f64,
}

impl HostRates {
    /// The range of `rates`; `None` when there are none (the real clock).
    pub fn of(rates: impl IntoIterator<Item = f64>) -> Option<HostRates> {
        rates.into_iter().fold(None, |range, r| {
            Some(match range {
                None => HostRates { min: r, max: r },
                Some(h) => HostRates {
                    min: h.min.min(r),
                    max: h.max.max(r),
                },
            })
        })
    }

    /// The range of the host rates of every device of `steps`.
    pub fn of_steps<'a>(steps: impl IntoIterator<Item = &'a StepTiming>) -> Option<HostRates> {
        HostRates::of(
            steps
                .into_iter()
                .flat_map(|s| s.devices.iter().filter_map(|d| d.host_gflops)),
        )
    }

    /// Both ranges together.
    pub fn union(a: Option<HostRates>, b: Option<HostRates>) -> Option<HostRates> {
        HostRates::of([a, b].into_iter().flatten().flat_map(|h| [h.min, h.max]))
    }

    /// How far the rate moved: the fastest over the slowest, minus 1.
    pub fn moved(&self) -> f64 {
        self.max / self.min - 1.0
    }

    /// Whether it moved more than [`HOST_DRIFT_LIMIT`].
    pub fn drifted(&self) -> bool {
        self.moved() > HOST_DRIFT_LIMIT
    }

    /// The largest distance of the range from `base` (the rate at calibration),
    /// relative to it: 0.1 when some rate was 10% above or below it.
    pub fn away_from(&self, base: f64) -> f64 {
        (self.min / base - 1.0)
            .abs()
            .max((self.max / base - 1.0).abs())
    }
}

impl fmt::Display for HostRates {
    /// `host 30.1-31.0 GFLOP/s (moved 3.0%)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "host {:.1}-{:.1} GFLOP/s (moved {:.1}%)",
            self.min,
            self.max,
            self.moved() * 100.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_rate_far_from_calibration_is_told_apart_from_a_moving_one() {
        // The transports bench's hour: steady, but 13% under the calibration's rate.
        let steady = HostRates::of([26.5, 27.0]).unwrap();
        assert!(!steady.drifted());
        assert!((steady.away_from(30.5) - (1.0 - 26.5 / 30.5)).abs() < 1e-12);
        assert!(steady.away_from(30.5) > HOST_DRIFT_LIMIT);
        // Above the base counts as well.
        let fast = HostRates::of([31.0, 33.0]).unwrap();
        assert!((fast.away_from(30.0) - 0.1).abs() < 1e-12);
        assert!(HostRates::of([29.5, 30.5]).unwrap().away_from(30.0) < HOST_DRIFT_LIMIT);
    }
}
