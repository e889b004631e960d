//! Serving plans (JSON): what `legion compile --objective throughput` emits and
//! `legion serve` runs. The cluster is cut into sub-clusters, each running its own plan
//! on its own frames; one plan over every board and one board per frame (data
//! parallel) are the two extremes. Documented in docs/plan.md, "Serving plans".

use crate::plan::Plan;
use serde::{Deserialize, Serialize};

/// Version of the serving plan format; readers reject other versions.
pub const SERVING_VERSION: u32 = 2;

/// A cluster cut into sub-clusters for a stream of frames.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServingPlan {
    /// [`SERVING_VERSION`].
    pub version: u32,
    /// sha256 of the model's ONNX bytes.
    pub model_sha256: String,
    /// The model's input shape.
    pub input_shape: Vec<usize>,
    /// The cluster's device names, in the cluster file's order.
    pub devices: Vec<String>,
    /// No sub-cluster's predicted latency may exceed this, µs.
    pub latency_budget_us: u64,
    /// The sub-clusters, each with its plan; together they hold every board not in
    /// `idle`.
    pub sub_clusters: Vec<SubCluster>,
    /// Boards no sub-cluster uses (alone they miss the budget, and every sub-cluster
    /// they could join would be slower for it).
    pub idle: Vec<String>,
    /// The frames per second the sub-clusters predict together.
    pub predicted_fps: f64,
    /// The slowest sub-cluster's predicted latency in its stream, µs (a frame waits on
    /// the boards for the frames ahead of it, but not in the queue).
    pub predicted_latency_us: u64,
    /// The best plan over every board: its predicted latency, µs.
    pub single_plan_us: u64,
    /// Every board on its own frames: the sum of the predicted rates of the boards
    /// that hold the model alone, frames per second (the data-parallel bound); 0 when
    /// none does. None for a plan served as one sub-cluster ([`ServingPlan::one`]),
    /// which compiled nothing for single boards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_parallel_fps: Option<f64>,
    /// How the cut was chosen.
    pub reason: String,
}

/// Some of the cluster's boards, running one plan on their own frames.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubCluster {
    /// The boards, in the cluster file's order.
    pub boards: Vec<String>,
    /// Frames per second it predicts, `depth` frames in flight.
    pub predicted_fps: f64,
    /// Frames in flight: each board works on every frame in flight, the oldest frame's
    /// ready tile first (1: one frame after the other).
    pub depth: usize,
    /// A frame's predicted latency in the stream, from the coordinator sending its
    /// input to its output, the longest over the frames, µs.
    pub predicted_latency_us: u64,
    /// Its plan (compiled for these boards alone).
    pub plan: Plan,
}

impl ServingPlan {
    /// `plan` over all its boards as the one sub-cluster: a stream run by one plan.
    pub fn one(plan: Plan) -> ServingPlan {
        let latency = plan.chosen().predicted_us.max(1);
        let fps = 1e6 / latency as f64;
        ServingPlan {
            version: SERVING_VERSION,
            model_sha256: plan.model_sha256.clone(),
            input_shape: plan.input_shape.clone(),
            devices: plan.devices.clone(),
            latency_budget_us: latency,
            idle: vec![],
            predicted_fps: fps,
            predicted_latency_us: latency,
            single_plan_us: latency,
            data_parallel_fps: None,
            reason: "one plan over the cluster".into(),
            sub_clusters: vec![SubCluster {
                boards: plan.devices.clone(),
                predicted_fps: fps,
                depth: 1,
                predicted_latency_us: latency,
                plan,
            }],
        }
    }

    /// Reads a serving plan, checking its version and its plans'.
    pub fn from_json(text: &str) -> Result<ServingPlan, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not a serving plan file: {e}"))?;
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(SERVING_VERSION as u64) {
            return Err(format!(
                "serving plan format version {version:?} is not supported (this build reads \
                 {SERVING_VERSION}); compile it again"
            ));
        }
        let plan: ServingPlan =
            serde_json::from_value(value).map_err(|e| format!("not a serving plan file: {e}"))?;
        for sub in &plan.sub_clusters {
            if sub.plan.version != crate::PLAN_VERSION {
                return Err(format!(
                    "the plan of sub-cluster {} is in plan format {} (this build reads {}); \
                     compile it again",
                    sub.boards.join(","),
                    sub.plan.version,
                    crate::PLAN_VERSION
                ));
            }
        }
        Ok(plan)
    }
}
