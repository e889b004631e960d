//! Plans (JSON): what `legion compile` emits and `legion run` executes. A plan names
//! the model (sha256 and input shape), the cluster's devices and how group times were
//! costed, and holds one or two candidate fused-layer configurations (the FLC the
//! search extracted and its Wild Card) with the one chosen and why. Each candidate
//! lists its groups (stages, devices, strips, halos, tile programs with their pads,
//! predicted times) and, per device, the ordered program it runs. Deterministic: no
//! timestamps, fields in a fixed order, times in whole microseconds. The format is
//! documented in docs/plan.md.

use crate::tile::{TileInput, TileOutput, TileSpec};
use legion_ir::{Rows, StageId};
use serde::{Deserialize, Serialize};

/// Version of the plan format; readers reject other versions.
pub const PLAN_VERSION: u32 = 2;

/// A compiled plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// [`PLAN_VERSION`].
    pub version: u32,
    /// sha256 of the model's ONNX bytes.
    pub model_sha256: String,
    /// The model's input shape.
    pub input_shape: Vec<usize>,
    /// Number of stages of the model.
    pub stages: usize,
    /// The cluster's device names, in the cluster file's order.
    pub devices: Vec<String>,
    /// What costed the groups: a predictor (`legion`, `affine`, `aofl`) or `fss`
    /// (measured group times).
    pub costed_by: String,
    /// The candidate FLCs: the extracted one first, then its Wild Card if any.
    pub candidates: Vec<Candidate>,
    /// Index of the candidate to run.
    pub chosen: usize,
    /// Why it was chosen.
    pub reason: String,
}

/// One fused-layer configuration, ready to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// `extracted` or `wild-card`.
    pub name: String,
    /// The sum of the groups' predicted times, µs.
    pub predicted_us: u64,
    /// Measured end-to-end latency (median of runs on the cluster), µs, when compile
    /// ran the candidates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_us: Option<u64>,
    /// The groups, in stage order.
    pub groups: Vec<PlanGroup>,
    /// Per device that takes part, its ordered program.
    pub programs: Vec<DeviceProgram>,
}

/// One group of a candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanGroup {
    /// First stage.
    pub first: StageId,
    /// Last stage.
    pub last: StageId,
    /// True when its rows are split over several devices; false when one device runs
    /// its stages whole.
    pub split: bool,
    /// Predicted (or, costed by fss, measured) time of the group, µs.
    pub predicted_us: u64,
    /// Per device, in strip order.
    pub tiles: Vec<PlanTile>,
}

/// One device's part of a group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanTile {
    /// The device's name.
    pub device: String,
    /// Its strip of the last stage's output rows.
    pub strip: Rows,
    /// Rows it computes that another device computes too, summed over the stages.
    pub halo_rows: usize,
    /// Predicted time until its input strips have arrived, µs.
    pub in_us: u64,
    /// Predicted compute time, µs.
    pub compute_us: u64,
    /// Predicted time to get its output strips back, µs.
    pub out_us: u64,
    /// The tile it runs: strips in, stages with rows and pads, strips out.
    pub tile: TileSpec,
}

/// The ordered program of one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceProgram {
    /// The device's name.
    pub device: String,
    /// Steps in order.
    pub steps: Vec<Step>,
}

/// One step of a device's program. `group` indexes the candidate's groups.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Step {
    /// Receive these strips from the coordinator.
    Receive {
        /// The group.
        group: usize,
        /// The strips.
        strips: Vec<TileInput>,
    },
    /// Run the group's tile.
    Run {
        /// The group.
        group: usize,
    },
    /// Send these strips to the coordinator.
    Send {
        /// The group.
        group: usize,
        /// The strips.
        strips: Vec<TileOutput>,
    },
}

impl Plan {
    /// Parses a plan, rejecting other format versions.
    pub fn from_json(text: &str) -> Result<Plan, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not a plan file: {e}"))?;
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(PLAN_VERSION as u64) {
            return Err(format!(
                "plan format version {version:?} is not supported (this build reads \
                 {PLAN_VERSION}); compile the plan again"
            ));
        }
        serde_json::from_value(value).map_err(|e| format!("not a plan file: {e}"))
    }

    /// The plan as pretty JSON (deterministic).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plans serialize") + "\n"
    }

    /// The candidate to run.
    pub fn chosen(&self) -> &Candidate {
        &self.candidates[self.chosen]
    }
}
