//! Profiles (JSON): what `legion profile` measured on a cluster for one model. In
//! `legion` mode, single stages at a few row counts per device and link probes (what
//! the cost model needs); in `fss` mode, every candidate group run whole across the
//! cluster. The format is documented in docs/profile.md.

use crate::DeviceId;
use crate::timing::{Clock, DeviceTiming, HostRates};
use legion_ir::{Rows, StageId};
use serde::{Deserialize, Serialize};

/// Version of the profile format; readers reject other versions.
pub const PROFILE_VERSION: u32 = 2;

/// How the profile was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileMode {
    /// Single stages and link probes (the paper's profiler).
    Legion,
    /// Every candidate group measured directly (the Full Searching Scheme baseline).
    Fss,
}

impl std::fmt::Display for ProfileMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProfileMode::Legion => "legion",
            ProfileMode::Fss => "fss",
        })
    }
}

/// A profile of one model on one cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// [`PROFILE_VERSION`].
    pub version: u32,
    /// sha256 of the model's ONNX bytes.
    pub model_sha256: String,
    /// The model's input shape.
    pub input_shape: Vec<usize>,
    /// How it was measured.
    pub mode: ProfileMode,
    /// The clock of every time in the file.
    pub clock: Clock,
    /// The coordinator's link bandwidth, Mbit/s.
    pub coordinator_mbps: f64,
    /// The devices, in the cluster file's order.
    pub devices: Vec<DeviceProfile>,
    /// `legion` mode: single-stage times, one entry per stage in stage order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageProfile>,
    /// `fss` mode: measured groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupMeasurement>,
    /// `fss` mode: the longest group measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_group_len: Option<usize>,
    /// `fss` mode: sha256 ([`Profile::sha256`]) of the legion profile whose cost table's
    /// choices were measured (absent in profiles that measured every group across all
    /// boards at shares proportional to their rates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub costed_from: Option<String>,
    /// Time the profiling took on `clock`, µs (devices measured in parallel count once).
    pub profiling_us: u64,
    /// Wall time the profiling took on the host, µs.
    pub wall_us: u64,
    /// On the emulated clock: the range of the host's rates the measurements were
    /// scaled with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_gflops: Option<HostRates>,
}

/// One device as profiled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceProfile {
    /// Its name in the cluster file.
    pub name: String,
    /// Its board class, if any: the cluster file's `class`, else the one it emulates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Its compute rate on the calibration workload, GFLOP/s (the emulated rate for an
    /// emulated board); shares start proportional to it.
    pub gflops: f64,
    /// Its link as the cluster file gives it.
    pub link: crate::Link,
    /// Transfer probes: bytes each way and the times measured.
    pub probes: Vec<LinkProbe>,
    /// The other devices of its class it was profiled with (legion mode): each measured
    /// part of the class's samples, and all of them hold all of those samples. Empty
    /// when it measured its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiled_with: Vec<String>,
}

/// One transfer probe to a device and back.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkProbe {
    /// Bytes sent and echoed.
    pub bytes: u64,
    /// Into the device (from the coordinator), µs.
    pub in_us: u64,
    /// Out of the device (back to the coordinator), µs.
    pub out_us: u64,
}

/// Single-stage times of one stage on every device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageProfile {
    /// The stage.
    pub stage: StageId,
    /// Whether it runs whole on one device (a barrier); its samples then cover every row.
    pub barrier: bool,
    /// Per device (cluster order): the row counts measured, ascending.
    pub samples: Vec<Vec<Sample>>,
    /// For a stage worth splitting by output channels (docs/architecture.md, "Channel
    /// splits"), per device: its time on all rows of a number of its channels (the
    /// samples' `rows`), from its whole inputs, ascending. Empty for other stages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channel_samples: Vec<Vec<Sample>>,
}

/// The time of a stage run alone on a number of its output rows (or channels).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Output rows computed (output channels, in `channel_samples`).
    pub rows: usize,
    /// Median over the runs, µs.
    pub median_us: u64,
    /// Fastest run, µs.
    pub min_us: u64,
    /// Runs measured.
    pub runs: u32,
}

/// A group measured under one device option (FSS): whole on one device, or split over
/// several.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupMeasurement {
    /// First stage of the group.
    pub first: StageId,
    /// Last stage of the group.
    pub last: StageId,
    /// Each device's strip of the last stage's output rows (devices with no rows are
    /// left out); of its output channels when `channels` is set.
    pub strips: Vec<(String, Rows)>,
    /// The device option measured: how many of the fastest devices the choice could
    /// use, 1 for a group whole on one device. Absent in fss profiles without
    /// `costed_from`, whose option is the number of strips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option: Option<usize>,
    /// The group was split by its last stage's output channels.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub channels: bool,
    /// Median over the runs of the group's time, µs.
    pub median_us: u64,
    /// Runs measured.
    pub runs: u32,
    /// The per-device breakdown of the median run.
    pub devices: Vec<DeviceTiming>,
}

impl Profile {
    /// Scales every compute time measured on device `name` by `factor` (its stage and
    /// channel samples; its rate by the inverse), as when the board runs that much
    /// slower than profiled. Links and group measurements stay. False when the profile
    /// has no such device.
    pub fn scale_device(&mut self, name: &str, factor: f64) -> bool {
        let Some(d) = self.device_id(name) else {
            return false;
        };
        let scale = |us: &mut u64| *us = (*us as f64 * factor).round() as u64;
        for stage in &mut self.stages {
            for sample in stage
                .samples
                .get_mut(d.index())
                .into_iter()
                .chain(stage.channel_samples.get_mut(d.index()))
                .flatten()
            {
                scale(&mut sample.median_us);
                scale(&mut sample.min_us);
            }
        }
        self.devices[d.index()].gflops /= factor;
        true
    }

    /// The id of the device named `name` in the profile.
    pub fn device_id(&self, name: &str) -> Option<DeviceId> {
        self.devices
            .iter()
            .position(|d| d.name == name)
            .map(DeviceId)
    }

    /// Parses a profile, rejecting other format versions.
    pub fn from_json(text: &str) -> Result<Profile, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not a profile: {e}"))?;
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(PROFILE_VERSION as u64) {
            return Err(format!(
                "profile format version {version:?} is not supported (this legion reads \
                 version {PROFILE_VERSION}); profile the cluster again"
            ));
        }
        serde_json::from_value(value).map_err(|e| format!("not a profile: {e}"))
    }

    /// The profile as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a profile serializes")
    }

    /// sha256 of [`Profile::to_json`], lowercase hex: names the profile an fss one was
    /// costed from.
    pub fn sha256(&self) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(self.to_json().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}
