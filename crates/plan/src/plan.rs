//! Plans (JSON): what `legion compile` emits and `legion run` executes. A plan names
//! the model (sha256 and input shape), the cluster's devices and how group times were
//! costed, and holds one or two candidate fused-layer configurations (the FLC the
//! search extracted and its Wild Card) with the one chosen and why. Each candidate
//! lists its groups (stages, devices, strips, halos, tile programs with their pads,
//! predicted times) and the ordered program of the coordinator and of each device:
//! which rows it receives from whom, the tiles it runs, the rows it sends on, what it
//! frees. Deterministic: no timestamps, fields in a fixed order, times in whole
//! microseconds. The format is documented in docs/plan.md.

use crate::tile::TileSpec;
use legion_ir::{Rows, StageId, TensorRef};
use serde::{Deserialize, Serialize};

/// Version of the plan format; readers reject other versions.
pub const PLAN_VERSION: u32 = 7;

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
    /// The candidate FLCs: the extracted one first, then its Wild Card if any, the
    /// search under the other producers assumption if it differs, and the FLCs searched
    /// for a stream (`balanced-k`): every one in a throughput compile, with each spread
    /// over alike boards (`balanced-k-spread`) where that moves a group; in a latency
    /// compile the fastest when it is predicted faster than the others.
    pub candidates: Vec<Candidate>,
    /// Index of the candidate to run.
    pub chosen: usize,
    /// Why it was chosen.
    pub reason: String,
}

/// One fused-layer configuration, ready to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// `extracted` (or the baseline's name), `wild-card`, `extracted-...` (the other
    /// producers assumption), `balanced-k` or `balanced-k-spread`.
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
    pub programs: Vec<Program>,
}

/// One group of a candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanGroup {
    /// First stage.
    pub first: StageId,
    /// Last stage.
    pub last: StageId,
    /// True when it is split over several devices; false when one device runs its
    /// stages whole.
    pub split: bool,
    /// True when the split is by the last stage's output channels (or neurons), not
    /// by rows: each tile computes every row of its range of channels, which its
    /// `strip` holds (docs/architecture.md, "Channel splits").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub channels: bool,
    /// Predicted (or, costed by fss, measured) time of the group, µs.
    pub predicted_us: u64,
    /// Per device, in strip order; a device's sub-strips are listed together, in the
    /// order it runs them.
    pub tiles: Vec<PlanTile>,
}

impl PlanGroup {
    /// The devices that run its tiles, each once, in the tiles' order.
    pub fn devices(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tiles.iter().map(|t| t.device.as_str()).collect();
        names.dedup();
        names
    }
}

/// One device's part of a group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanTile {
    /// The device's name.
    pub device: String,
    /// Its strip of the last stage's output rows (of its channels, in a group split by
    /// channels).
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

impl PlanTile {
    /// `device` running `tile` for `strip`, with no halo and no predicted times: a tile
    /// of a plan made by hand (tests, fuzz seeds), not by the compiler.
    pub fn unpredicted(device: &str, strip: Rows, tile: TileSpec) -> PlanTile {
        PlanTile {
            device: device.to_string(),
            strip,
            halo_rows: 0,
            in_us: 0,
            compute_us: 0,
            out_us: 0,
            tile,
        }
    }
}

/// Who runs a program, and the other end of a transfer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Party {
    /// The coordinator: it feeds the model input and collects the outputs.
    Coordinator,
    /// A device, by its name in the cluster file.
    Device(String),
}

impl std::fmt::Display for Party {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Party::Coordinator => write!(f, "the coordinator"),
            Party::Device(name) => write!(f, "{name}"),
        }
    }
}

/// The ordered program of one party.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    /// Who runs it.
    pub party: Party,
    /// Steps in order.
    pub steps: Vec<Step>,
}

/// One step of a program. A tensor without a row axis moves whole, rows `0..0`. Of a
/// tensor split by channels, a transfer moves its rows of one owner's channels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Step {
    /// Wait for rows of a tensor from another party.
    Receive {
        /// The tensor.
        tensor: TensorRef,
        /// Its rows.
        rows: Rows,
        /// Its channels, when the tensor was computed split by them; absent for all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channels: Option<Rows>,
        /// The party that sends them (their owner).
        from: Party,
    },
    /// Run a tile of a group; every row it reads is held by then.
    Run {
        /// The group (index into the candidate's groups).
        group: usize,
        /// The tile (index into the group's tiles). A board may run several tiles of
        /// one group, sub-strips of its rows: the edge ones first, so that the rows
        /// its neighbours read leave before the rest is computed.
        tile: usize,
        /// The phase of the tile ([`crate::TileSpec::phases`]): a tile whose devices
        /// combine a reduction runs in phases, split where the combined result is read.
        #[serde(default, skip_serializing_if = "is_zero")]
        phase: usize,
    },
    /// Send this board's partial result of a reduction over its own rows to another
    /// board of the group (docs/plan.md, "programs").
    Share {
        /// The reducing stage.
        stage: StageId,
        /// The receiver.
        to: Party,
    },
    /// Combine the partial results of stage `stage` of the boards `parts` (this board's
    /// own included), in that order, into the stage's whole output; waits for the others.
    Combine {
        /// The reducing stage.
        stage: StageId,
        /// The boards whose partials make up the result, in the order they combine.
        parts: Vec<Party>,
    },
    /// Send rows of a tensor this party owns to another party.
    Send {
        /// The tensor.
        tensor: TensorRef,
        /// Its rows.
        rows: Rows,
        /// Its channels, when the tensor was computed split by them; absent for all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channels: Option<Rows>,
        /// The receiver.
        to: Party,
    },
    /// Free every row of a tensor: no later step reads or sends it.
    Drop {
        /// The tensor.
        tensor: TensorRef,
    },
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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
