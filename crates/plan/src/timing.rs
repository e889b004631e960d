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
    /// With `--check`: the largest difference of the median run's outputs from the best
    /// single device's, relative to the largest magnitude of each output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_max_rel: Option<f32>,
}
