//! Codegen pass: turns a fused-layer configuration (from the fusion pass) and the
//! partition pass's tilings into a [`Candidate`] of a [`Plan`]: per group, each
//! device's strip, halo, tile program (rows and pads) and predicted times; per party
//! (the coordinator and each device), its ordered program ([`programs`]: the rows it
//! receives and from whom, the tiles it runs, the rows it sends on, what it frees).
//! [`validate`] checks a plan against its model and cluster by deriving it again.

mod parts;
mod programs;
mod sub_strips;

pub use parts::in_parts;
pub use programs::{Traffic, programs, traffic};
pub use sub_strips::cut_edges;

use anyhow::{Context, Result, bail, ensure};
use legion_fusion::Placement;
use legion_ir::{Ir, Rows, TensorRef};
use legion_partition::{Group, channel_tile, check_channel_group, check_group, tile, whole_group};
use legion_plan::network::{StreamTimes, group_ends, programs_timeline, stream_timeline};
use legion_plan::{
    Candidate, DeviceId, Link, Plan, PlanGroup, PlanTile, Step, TileSpec, TileStage,
};

/// Rounds a time to whole microseconds for the plan.
fn us(t: f64) -> u64 {
    if t.is_finite() && t > 0.0 {
        t.round() as u64
    } else {
        0
    }
}

/// The candidate named `name` for an FLC placed by the fusion pass; `devices` are the
/// names of the profile's devices, in its order. With `sub_strips`, boards compute the
/// rows other boards read first ([`cut_edges`]; for boards that run their
/// programs).
pub fn candidate(
    ir: &Ir,
    placement: &Placement,
    devices: &[String],
    name: &str,
    sub_strips: bool,
) -> Result<Candidate> {
    let mut groups = vec![];
    for (choice, entry) in &placement.groups {
        let group = Group::new(choice.first, choice.last);
        let specs: Vec<(DeviceId, Rows, usize, legion_plan::TileSpec)> = if entry.whole {
            let d = &entry.devices[0];
            vec![(d.device, d.strip, 0, whole_group(ir, group))]
        } else if entry.channels {
            check_channel_group(ir, choice.first, choice.last)
                .with_context(|| format!("codegen: group {choice}"))?;
            entry
                .devices
                .iter()
                .map(|d| (d.device, d.strip, 0, channel_tile(ir, group, d.strip)))
                .collect()
        } else {
            let cut: Vec<Rows> = entry.devices.iter().map(|d| d.strip).collect();
            let tiling =
                tile(ir, group, &cut).with_context(|| format!("codegen: tiling group {choice}"))?;
            tiling
                .tiles
                .iter()
                .map(|t| {
                    let halo = t.stages.iter().map(|s| s.halo_rows).sum();
                    (entry.devices[t.slot].device, t.strip, halo, t.spec())
                })
                .collect()
        };
        let tiles = specs
            .into_iter()
            .map(|(d, strip, halo_rows, spec)| {
                let cost = entry
                    .devices
                    .iter()
                    .find(|c| c.device == d)
                    .expect("a tiled device has a cost");
                PlanTile {
                    device: devices[d.index()].clone(),
                    strip,
                    halo_rows,
                    in_us: us(cost.in_us),
                    compute_us: us(cost.compute_us),
                    out_us: us(cost.out_us),
                    tile: spec,
                }
            })
            .collect();
        groups.push(PlanGroup {
            first: group.first,
            last: group.last,
            split: !entry.whole,
            channels: entry.channels,
            predicted_us: us(entry.cost.us()),
            tiles,
        });
    }
    if sub_strips {
        sub_strips::cut_edges(ir, &mut groups);
    }
    parts::in_parts(ir, devices, &mut groups);
    let programs = programs(ir, devices, &groups);
    Ok(Candidate {
        name: name.to_string(),
        predicted_us: us(placement.cost.us()),
        measured_us: None,
        groups,
        programs,
    })
}

/// Predicts `candidate` as the emulator times a run of its programs
/// ([`programs_timeline`]): each run takes its tile's predicted compute, each transfer
/// its bytes over `links` (one per program, in order), so transfers overlap compute.
/// Sets the candidate's predicted time and each group's: from the end of the group
/// before to the end of its last tile.
pub fn predict_programs(ir: &Ir, candidate: &mut Candidate, links: &[Link]) -> Result<()> {
    let groups = &candidate.groups;
    let programs = &candidate.programs;
    let compute = |p: usize, k: usize| run_compute_us(ir, groups, &programs[p].steps[k]);
    let bytes = |t: TensorRef, rows: Rows, channels: Option<Rows>| ir.part_bytes(t, rows, channels);
    let ends = programs_timeline(programs, links, bytes, compute).map_err(anyhow::Error::msg)?;
    let group_end = group_ends(programs, &ends, groups.len());
    let mut start = 0.0;
    for (g, end) in candidate.groups.iter_mut().zip(&group_end) {
        g.predicted_us = us(end - start);
        start = *end;
    }
    candidate.predicted_us = us(start);
    Ok(())
}

/// The predicted compute of program step `step` of a candidate with `groups`, µs: its
/// tile's, or its phase's share of it; 0 for a step that does not compute.
pub fn run_compute_us(ir: &Ir, groups: &[PlanGroup], step: &Step) -> f64 {
    match *step {
        Step::Run { group, tile, phase } => {
            let t = &groups[group].tiles[tile];
            t.compute_us as f64 * phase_share(ir, &t.tile, phase)
        }
        _ => 0.0,
    }
}

/// Predicts a stream of `frames` frames through `candidate`'s programs with `depth` in
/// flight ([`stream_timeline`]): each run takes its tile's predicted compute, each
/// transfer its bytes over `links` (one per program, in order).
pub fn predict_stream(
    ir: &Ir,
    candidate: &Candidate,
    links: &[Link],
    frames: usize,
    depth: usize,
) -> Result<StreamTimes> {
    let groups = &candidate.groups;
    let programs = &candidate.programs;
    let compute = |_: usize, p: usize, k: usize| run_compute_us(ir, groups, &programs[p].steps[k]);
    let bytes = |t: TensorRef, rows: Rows, channels: Option<Rows>| ir.part_bytes(t, rows, channels);
    stream_timeline(programs, links, bytes, compute, frames, depth).map_err(anyhow::Error::msg)
}

/// The share of a tile's compute that its phase `phase` takes ([`TileSpec::phases`]):
/// the FLOPs of the rows its stages compute (of the rows a partial reduces), over the
/// tile's. 1 for a tile of one phase.
fn phase_share(ir: &Ir, spec: &TileSpec, phase: usize) -> f64 {
    // The height of the tensor a tile in parts multiplies in parts.
    let parts_of = spec
        .inputs
        .first()
        .and_then(|i| ir.tensor(i.tensor).height());
    let flops = |stages: &[TileStage]| -> f64 {
        stages
            .iter()
            .map(|st| {
                let stage = ir.stage(st.stage);
                if st.summed {
                    return 0.0;
                }
                let (rows, height) = match (st.part, st.partial, stage.input_shapes.first()) {
                    (Some(part), _, _) => (part.len(), parts_of),
                    (None, true, Some(input)) => (st.reads[0].rows.len(), input.height()),
                    _ => (st.computed.len(), stage.output.height()),
                };
                let fraction = height.map_or(1.0, |h| rows as f64 / h.max(1) as f64);
                stage.flops.max(1) as f64 * fraction
            })
            .sum()
    };
    let phases = spec.phases(ir);
    if phases.len() == 1 {
        return 1.0;
    }
    let all = flops(&spec.stages);
    phases
        .get(phase)
        .map_or(0.0, |p| flops(&p.spec.stages) / all.max(f64::MIN_POSITIVE))
}

/// Checks `plan` against `ir` and, when given, the cluster's device names: the model's
/// hash, input shape and stage count; that every candidate's groups cover the stages in
/// order; that every tile is exactly what the partition pass derives for its strips;
/// that every device's program matches its tiles.
pub fn validate(plan: &Plan, ir: &Ir, cluster_devices: Option<&[String]>) -> Result<()> {
    ensure!(
        plan.model_sha256 == ir.sha256,
        "the plan is for model {}, not for this model ({}); compile this model",
        plan.model_sha256,
        ir.sha256
    );
    ensure!(
        plan.input_shape == ir.input.shape,
        "the plan is for input shape {:?}, the model's is {:?}",
        plan.input_shape,
        ir.input.shape
    );
    ensure!(
        plan.stages == ir.stages.len(),
        "the plan covers {} stages, the model has {}",
        plan.stages,
        ir.stages.len()
    );
    if let Some(names) = cluster_devices {
        ensure!(
            plan.devices == names,
            "the plan is for devices {:?}, the cluster file has {:?}; compile for this cluster",
            plan.devices,
            names
        );
    }
    ensure!(!plan.candidates.is_empty(), "the plan has no candidates");
    ensure!(
        plan.chosen < plan.candidates.len(),
        "the plan chooses candidate {} of {}",
        plan.chosen,
        plan.candidates.len()
    );
    for c in &plan.candidates {
        validate_candidate(plan, ir, c).with_context(|| format!("candidate {}", c.name))?;
    }
    Ok(())
}

fn validate_candidate(plan: &Plan, ir: &Ir, c: &Candidate) -> Result<()> {
    let mut next = 0;
    for (g, group) in c.groups.iter().enumerate() {
        let (first, last) = (group.first.index(), group.last.index());
        ensure!(
            first == next && first <= last && last < ir.stages.len(),
            "group {g} ({first}..{last}) does not start where the previous one ended ({next})"
        );
        next = last + 1;
        let range = Group::new(first, last);
        for t in &group.tiles {
            ensure!(
                plan.devices.contains(&t.device),
                "group {g} runs on device {}, which is not in the plan's devices",
                t.device
            );
        }
        // A device's tiles (sub-strips) are listed together.
        let mut names: Vec<&String> = group.tiles.iter().map(|t| &t.device).collect();
        names.dedup();
        let listed = names.len();
        names.sort();
        names.dedup();
        ensure!(
            names.len() == listed,
            "group {g} lists the tiles of a device apart"
        );
        if group.channels {
            check_channel_group(ir, first, last).with_context(|| format!("group {g}"))?;
            let count = ir.stage(range.last).channels.map_or(0, |c| c.count);
            let mut next = 0;
            for t in &group.tiles {
                ensure!(
                    t.strip.start == next && !t.strip.is_empty(),
                    "group {g}: device {} computes channels {}, but the next ones to cut start \
                     at {next}",
                    t.device,
                    t.strip
                );
                next = t.strip.end;
                let whole = TileSpec {
                    parts: vec![],
                    ..t.tile.clone()
                };
                ensure!(
                    whole == channel_tile(ir, range, t.strip),
                    "group {g}: the tile of device {} is not the one its channels {} need",
                    t.device,
                    t.strip
                );
            }
            ensure!(
                next == count,
                "group {g}: the devices' channels end at {next}, stage {} has {count}",
                range.last
            );
        } else if group.split {
            check_group(ir, first, last).with_context(|| format!("group {g}"))?;
            // The cut in row order; a device's sub-strips are listed in run order.
            let mut by_rows: Vec<&PlanTile> = group.tiles.iter().collect();
            by_rows.sort_by_key(|t| t.strip.start);
            let cut: Vec<Rows> = by_rows.iter().map(|t| t.strip).collect();
            let tiling = tile(ir, range, &cut).with_context(|| format!("group {g}"))?;
            ensure!(
                tiling.tiles.len() == group.tiles.len(),
                "group {g}: a device has an empty strip"
            );
            for (t, want) in by_rows.into_iter().zip(&tiling.tiles) {
                if t.tile != want.spec() {
                    bail!(
                        "group {g}: the tile of device {} is not the one its strip {} needs",
                        t.device,
                        t.strip
                    );
                }
            }
        } else {
            ensure!(
                group.tiles.len() == 1,
                "group {g} runs whole, so on exactly one device, not {}",
                group.tiles.len()
            );
            ensure!(
                group.tiles[0].tile == whole_group(ir, range),
                "group {g}: the tile on device {} is not the group run whole",
                group.tiles[0].device
            );
        }
    }
    ensure!(
        next == ir.stages.len(),
        "the groups end at stage {next}, the model has {} stages",
        ir.stages.len()
    );
    // Tiles in parts: each board's strip of the input, its own first.
    let mut derived = c.groups.clone();
    for t in derived.iter_mut().flat_map(|g| &mut g.tiles) {
        t.tile.parts.clear();
    }
    in_parts(ir, &plan.devices, &mut derived);
    for (g, (group, want)) in c.groups.iter().zip(&derived).enumerate() {
        for (t, w) in group.tiles.iter().zip(&want.tiles) {
            ensure!(
                t.tile.parts == w.tile.parts,
                "group {g}: device {} takes its input in parts {:?}, where the boards that \
                 computed it give {:?}",
                t.device,
                t.tile.parts,
                w.tile.parts
            );
        }
    }
    ensure!(
        c.programs == programs(ir, &plan.devices, &c.groups),
        "the programs do not match the groups' tiles"
    );
    Ok(())
}

/// The choice of a candidate, as the plan records it.
pub struct Chosen {
    /// Index into the candidates.
    pub index: usize,
    /// Why.
    pub reason: String,
}

/// Assembles a plan.
pub fn plan(
    ir: &Ir,
    devices: &[String],
    costed_by: &str,
    candidates: Vec<Candidate>,
    chosen: Chosen,
) -> Plan {
    Plan {
        version: legion_plan::PLAN_VERSION,
        model_sha256: ir.sha256.clone(),
        input_shape: ir.input.shape.clone(),
        stages: ir.stages.len(),
        devices: devices.to_vec(),
        costed_by: costed_by.to_string(),
        candidates,
        chosen: chosen.index,
        reason: chosen.reason,
    }
}
