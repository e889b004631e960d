//! Running a plan's candidate on the cluster, by one of two transports: the boards run
//! their programs and pass rows to each other (`programs.rs`), or the coordinator runs
//! the groups in order as the hub, each a step whose tiles run on their devices at
//! once, every strip through the coordinator; the model's outputs are assembled at the
//! end.

use crate::{Coordinator, Tensors};
use anyhow::{Context, Result, bail};
use legion_ir::Ir;
use legion_plan::{Candidate, Clock, StepTiming, Transport};
use tract_onnx::prelude::Tensor;

/// One run of a candidate.
#[derive(Clone, Debug)]
pub struct PlanRun {
    /// The model's outputs, in the model's order.
    pub outputs: Vec<Tensor>,
    /// Per group, its step's timing.
    pub groups: Vec<StepTiming>,
    /// End to end: the groups run one after another, µs on `clock`.
    pub total_us: u64,
    /// The clock of every time here.
    pub clock: Clock,
    /// Bytes of rows that crossed the coordinator's link, both ways.
    pub coordinator_bytes: u64,
    /// Per board that ran a tile, the most bytes of rows it held at once: through the
    /// hub, one tile's strips in and out; running its program, the rows it computed,
    /// received and kept (tiles' weights and their scratch are in neither).
    pub held_bytes: Vec<(String, u64)>,
    /// Running its programs: per program of the candidate, per step, a run step's
    /// compute time on `clock`, µs (0 for other steps); empty through the hub.
    pub compute_us: Vec<Vec<u64>>,
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
            let loaded = coord.loaded_programs(ir, candidate).await?;
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
        let mut devices: Vec<&str> = group.tiles.iter().map(|t| t.device.as_str()).collect();
        devices.dedup();
        if devices.len() < group.tiles.len() {
            bail!(
                "candidate {} runs sub-strips of group {g} (several tiles on one board), \
                 which only boards running their programs do; run it with --transport \
                 programs, or compile with --transport hub",
                candidate.name
            );
        }
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
    let mut held_bytes: Vec<(String, u64)> = vec![];
    let mut coordinator_bytes = 0;
    for d in groups.iter().flat_map(|g| &g.devices) {
        coordinator_bytes += d.bytes_in + d.bytes_out;
        let held = d.bytes_in + d.bytes_out;
        match held_bytes.iter_mut().find(|(name, _)| *name == d.device) {
            Some((_, most)) => *most = (*most).max(held),
            None => held_bytes.push((d.device.clone(), held)),
        }
    }
    Ok(PlanRun {
        outputs,
        total_us: groups.iter().map(|t| t.total_us).sum(),
        groups,
        clock: coord.clock(),
        coordinator_bytes,
        held_bytes,
        compute_us: vec![],
    })
}
