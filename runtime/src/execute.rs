//! Running a plan's candidate on the cluster: its groups in order, each a step whose
//! tiles run on their devices at once; the model's outputs assembled at the end.

use crate::{Coordinator, Tensors};
use anyhow::{Context, Result};
use legion_ir::Ir;
use legion_plan::{Candidate, Clock, StepTiming};
use tract_onnx::prelude::Tensor;

/// One run of a candidate.
pub struct PlanRun {
    /// The model's outputs, in the model's order.
    pub outputs: Vec<Tensor>,
    /// Per group, its step's timing.
    pub groups: Vec<StepTiming>,
    /// End to end: the groups run one after another, µs on `clock`.
    pub total_us: u64,
    /// The clock of every time here.
    pub clock: Clock,
}

/// Runs `candidate` (of a plan for `ir`, already checked against it) on `input`. The
/// model must have been uploaded to the cluster.
pub async fn run_candidate(
    coord: &Coordinator,
    ir: &Ir,
    candidate: &Candidate,
    input: Tensor,
) -> Result<PlanRun> {
    let mut tensors = Tensors::new(ir, input)?;
    let mut groups = vec![];
    for (g, group) in candidate.groups.iter().enumerate() {
        let tiles = group
            .tiles
            .iter()
            .map(|t| {
                let d = coord.id_of(&t.device).with_context(|| {
                    format!(
                        "group {g} runs on {}, which is not in the cluster",
                        t.device
                    )
                })?;
                Ok((d, t.tile.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        let timing = coord
            .run_step(&tiles, &mut tensors)
            .await
            .with_context(|| format!("running group {g} ({}..{})", group.first, group.last))?;
        groups.push(timing);
    }
    let outputs = tensors.outputs()?;
    Ok(PlanRun {
        outputs,
        total_us: groups.iter().map(|t| t.total_us).sum(),
        groups,
        clock: coord.clock(),
    })
}
