//! Running a plan's candidate on the cluster, by one of two transports: the boards run
//! their programs and pass rows to each other (`programs.rs`), or the coordinator runs
//! the groups in order as the hub, each a step whose tiles run on their devices at
//! once, every strip through the coordinator; the model's outputs are assembled at the
//! end.

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

/// How a candidate's rows move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Transport {
    /// Every board runs its program and sends rows straight to the boards that read
    /// them; the coordinator only feeds the input and collects the outputs.
    #[default]
    Programs,
    /// The coordinator runs the groups in order, cutting every strip out and pasting
    /// every result back (the paper's runtime).
    Hub,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Transport, String> {
        match s {
            "programs" => Ok(Transport::Programs),
            "hub" => Ok(Transport::Hub),
            _ => Err(format!("unknown transport {s:?}; valid: programs, hub")),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Programs => "programs",
            Transport::Hub => "hub",
        })
    }
}

/// Runs `candidate` (of a plan for `ir`, already checked against it) on `input` by
/// `transport`. The model must have been uploaded to the cluster; the programs are
/// loaded on the boards on first use.
pub async fn run_candidate(
    coord: &Coordinator,
    ir: &Ir,
    candidate: &Candidate,
    input: Tensor,
    transport: Transport,
) -> Result<PlanRun> {
    match transport {
        Transport::Programs => {
            let loaded = coord.loaded_programs(candidate).await?;
            coord
                .run_programs(ir, candidate, &loaded, input, coord.next_inference())
                .await
        }
        Transport::Hub => run_hub(coord, ir, candidate, input).await,
    }
}

/// The hub: the groups in order, each a step of the coordinator.
async fn run_hub(
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
