//! Running plans: every device alone, plans and single boards in rounds, and
//! `legion run`'s policy (the plan against the best single device, in turns).

use crate::compile::{group_label, truncate};
use anyhow::{Context, Result};
use legion_ir::Ir;
use legion_partition::{Group, whole_group};
use legion_plan::{DeviceId, HOST_DRIFT_LIMIT, HostRates, Plan, RunResults, StepTiming, Transport};
use legion_runtime::check::{Diff, compare};
use legion_runtime::{Coordinator, PlanRun, Reference, Tensors, run_candidate};
use std::fmt::Write;
use tract_onnx::prelude::Tensor;

/// The relative error a checked run accepts against the single device.
pub const CHECK_REL: f32 = 1e-5;

/// Runs the whole model on device `d` once: its step's timing and the tensors it left.
pub async fn run_whole<'a>(
    coord: &Coordinator,
    ir: &'a Ir,
    d: DeviceId,
    input: &Tensor,
) -> Result<(StepTiming, Tensors<'a>)> {
    let name = coord.device(d)?.name();
    let spec = whole_group(ir, Group::new(0, ir.stages.len() - 1));
    let mut tensors = Tensors::new(ir, input.clone())?;
    let step = coord
        .run_step(&[(d, spec)], &mut tensors)
        .await
        .with_context(|| format!("running the whole model on {name}"))?;
    Ok((step, tensors))
}

/// Every device running the whole model alone.
pub struct Alone {
    /// The fastest device and its outputs; `None` when no board can hold the model.
    pub best: Option<(DeviceId, Vec<Tensor>)>,
    /// Per device run, its name and compute time, µs.
    pub times: Vec<(String, u64)>,
    /// The boards not run: the whole model's weights are more than their `memory_mb`.
    pub too_small: Vec<String>,
    /// On the emulated clock: the host's rates over these runs.
    pub host_gflops: Option<HostRates>,
}

/// Runs the whole model on every device that can hold its weights (by the cluster
/// file's `memory_mb`): a warm-up on each, then once timed on each.
pub async fn every_device_alone(coord: &Coordinator, ir: &Ir, input: &Tensor) -> Result<Alone> {
    let weights = ir.total_weight_bytes();
    let mut fits = vec![];
    let mut too_small = vec![];
    for d in coord.ids() {
        let device = &coord.device(d)?.device;
        match device.memory_mb {
            Some(mb) if weights > mb << 20 => too_small.push(device.name.clone()),
            _ => fits.push(d),
        }
    }
    let mut best: Option<(DeviceId, u64, Tensors)> = None;
    let mut times = vec![];
    let mut host = None;
    // Every warm-up first: emulated boards sharing a host then all time the model
    // with the host's estimate of it refined by every warm-up.
    for &d in &fits {
        run_whole(coord, ir, d, input).await?;
    }
    for &d in &fits {
        let (step, tensors) = run_whole(coord, ir, d, input).await?;
        host = HostRates::union(host, HostRates::of_steps([&step]));
        let us = step.total_us;
        let compute = step.devices.iter().map(|t| t.compute_us).sum();
        times.push((coord.device(d)?.name().to_string(), compute));
        if best.as_ref().is_none_or(|b| us < b.1) {
            best = Some((d, us, tensors));
        }
    }
    let best = match best {
        Some((d, _, tensors)) => Some((d, tensors.outputs()?)),
        None => None,
    };
    Ok(Alone {
        best,
        times,
        too_small,
        host_gflops: host,
    })
}

/// What [`measure_in_rounds`] measured.
pub struct Measured {
    /// Per board asked for, the whole model's step in each timed round.
    pub boards: Vec<Vec<StepTiming>>,
    /// Per candidate asked for, its run in each timed round.
    pub candidates: Vec<Vec<PlanRun>>,
    /// On the emulated clock: the host's rates over every run.
    pub host_gflops: Option<HostRates>,
}

impl Measured {
    /// The median end-to-end time of board `k` (in the order asked for), µs.
    pub fn board_median(&self, k: usize) -> u64 {
        median(self.boards[k].iter().map(|s| s.total_us).collect())
    }

    /// The median end-to-end time of candidate `k`, µs.
    pub fn candidate_median(&self, k: usize) -> u64 {
        median(self.candidates[k].iter().map(|r| r.total_us).collect())
    }
}

/// The `q` quantile (0..=1) of `values` by nearest rank, the values sorted first;
/// None when there are none.
pub fn quantile<T: Copy + PartialOrd>(values: &[T], q: f64) -> Option<T> {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[(last as f64 * q.clamp(0.0, 1.0)).round() as usize])
}

/// The middle value (the upper one of an even count).
fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Runs, in `rounds` timed rounds after one warm-up round, the whole model on each of
/// `boards` and then each of `candidates` (each by its transport), so that a slow spell
/// of the host falls on all of them alike.
pub async fn measure_in_rounds(
    coord: &Coordinator,
    ir: &Ir,
    input: &Tensor,
    boards: &[DeviceId],
    candidates: &[(&legion_plan::Candidate, Transport)],
    rounds: u32,
) -> Result<Measured> {
    anyhow::ensure!(rounds > 0, "measuring takes at least 1 round");
    let mut measured = Measured {
        boards: vec![vec![]; boards.len()],
        candidates: candidates.iter().map(|_| vec![]).collect(),
        host_gflops: None,
    };
    for round in 0..=rounds {
        for (k, &d) in boards.iter().enumerate() {
            let (step, _) = run_whole(coord, ir, d, input).await?;
            if round > 0 {
                measured.host_gflops =
                    HostRates::union(measured.host_gflops, HostRates::of_steps([&step]));
                measured.boards[k].push(step);
            }
        }
        for (k, &(c, transport)) in candidates.iter().enumerate() {
            let run = run_candidate(coord, ir, c, input.clone(), transport)
                .await
                .with_context(|| format!("running candidate {}", c.name))?;
            if round > 0 {
                measured.host_gflops =
                    HostRates::union(measured.host_gflops, HostRates::of_steps(&run.groups));
                measured.candidates[k].push(run);
            }
        }
    }
    Ok(measured)
}

/// What [`execute`] measured.
pub struct Executed {
    /// The timings, as `legion run --save` writes them.
    pub results: RunResults,
    /// The model's outputs from the median run.
    pub outputs: Vec<Tensor>,
    /// The per-group table, latency, speedup and check, as `legion run` prints them.
    pub report: String,
}

/// `legion run`: runs the whole model on every device that can hold it (after a
/// warm-up each) and picks the fastest, then the plan's chosen candidate (by
/// `transport`) and that device in `repeat` rounds after a warm-up round
/// ([`measure_in_rounds`]); the medians are compared. With `check`, fails when the
/// output differs from the best single device's (this host's run when no board can
/// hold the model) by more than [`CHECK_REL`].
pub async fn execute(
    coord: &Coordinator,
    ir: &Ir,
    plan: &Plan,
    input: Tensor,
    repeat: u32,
    check: bool,
    transport: Transport,
) -> Result<Executed> {
    let candidate = plan.chosen();
    let alone = every_device_alone(coord, ir, &input).await?;
    let single: Vec<DeviceId> = alone.best.iter().map(|(d, _)| *d).collect();
    let measured = measure_in_rounds(
        coord,
        ir,
        &input,
        &single,
        &[(candidate, transport)],
        repeat,
    )
    .await?;
    let host = HostRates::union(alone.host_gflops, measured.host_gflops);
    let single = match single.first() {
        Some(&d) => Some((
            coord.device(d)?.name().to_string(),
            measured.board_median(0),
        )),
        None => None,
    };
    let mut runs = measured
        .candidates
        .into_iter()
        .next()
        .expect("one candidate");
    runs.sort_by_key(|r| r.total_us);
    let runs_us: Vec<u64> = runs.iter().map(|r| r.total_us).collect();
    let median = runs.swap_remove(runs.len() / 2);
    let clock = median.clock;
    let mut out = String::new();
    writeln!(
        out,
        "{} (candidate {}) on {} devices, transport {transport}, times on the {clock} clock",
        plan.model_sha256.get(..16).unwrap_or(&plan.model_sha256),
        candidate.name,
        coord.devices().len()
    )?;
    writeln!(
        out,
        "{:<8} {:<40} {:>13} {:>12}",
        "group", "devices", "predicted ms", "measured ms"
    )?;
    for (g, t) in candidate.groups.iter().zip(&median.groups) {
        let devices = g.devices();
        writeln!(
            out,
            "{:<8} {:<40} {:>13.3} {:>12.3}",
            group_label(g),
            truncate(&devices.join(","), 40),
            g.predicted_us as f64 / 1e3,
            t.total_us as f64 / 1e3
        )?;
    }
    writeln!(
        out,
        "latency: {:.3} ms measured (median of {repeat}), {:.3} ms predicted",
        median.total_us as f64 / 1e3,
        candidate.predicted_us as f64 / 1e3
    )?;
    match &single {
        Some((name, us)) => writeln!(
            out,
            "best single device: {name}, {:.3} ms (median of {repeat}, run in turn with the \
             plan); speedup {:.2}x",
            *us as f64 / 1e3,
            *us as f64 / median.total_us.max(1) as f64
        )?,
        None => writeln!(
            out,
            "best single device: none, no board's memory_mb holds the whole model ({} MiB \
             of weights): no speedup to report",
            ir.total_weight_bytes() >> 20
        )?,
    }
    if !alone.times.is_empty() {
        let alone_list: Vec<String> = alone
            .times
            .iter()
            .map(|(name, us)| format!("{name} {:.1}", *us as f64 / 1e3))
            .collect();
        writeln!(
            out,
            "every device alone, compute ms (one run after a warm-up): {}",
            alone_list.join(", ")
        )?;
    }
    if !alone.too_small.is_empty() {
        writeln!(
            out,
            "not run alone (the whole model's weights are above their memory_mb): {}",
            alone.too_small.join(", ")
        )?;
    }
    if let Some(h) = host {
        writeln!(out, "emulated clock: {h} over these runs")?;
        if h.drifted() {
            writeln!(
                out,
                "warning: the host's rate moved more than {:.0}% during these runs; the \
                 emulator scales by the rate it follows, but compare these times with care \
                 and run again on a quieter host",
                HOST_DRIFT_LIMIT * 100.0
            )?;
        }
        // The rate at the workers' calibration: far from it, the emulated boards have
        // been seen to run off their class's speed (bench/README.md, transports.md).
        let base = coord
            .devices()
            .iter()
            .filter_map(|d| d.info.emulation.as_ref().map(|e| e.host_gflops))
            .fold(0.0, f64::max);
        if base > 0.0 && h.away_from(base) > HOST_DRIFT_LIMIT {
            writeln!(
                out,
                "warning: the host ran {:.0}% away from its rate when the emulator calibrated \
                 ({base:.1} GFLOP/s); the emulated boards follow it by a reference kernel, \
                 which can misjudge a host slowed unevenly, so their times may be off their \
                 class's; compare these times with care",
                h.away_from(base) * 100.0
            )?;
        }
    }
    if let Some((board, held)) = median.held_bytes.iter().max_by_key(|(_, b)| *b) {
        writeln!(
            out,
            "per inference: {:.2} MB through the coordinator; at most {:.2} MB of rows held \
             at once by one board ({board})",
            median.coordinator_bytes as f64 / 1e6,
            *held as f64 / 1e6
        )?;
    }
    let mut checked = None;
    if check {
        // Against the best board's run, or this host's when no board can hold the model.
        let (against, want) = match (&single, alone.best) {
            (Some((name, _)), Some((_, outputs))) => (format!("{name} alone"), outputs),
            _ => {
                let reference = Reference::run(ir, input)?;
                let outputs = ir.outputs.iter().map(|&o| reference.tensor(o).clone());
                ("this host's run".to_string(), outputs.collect())
            }
        };
        let mut worst = Diff::default();
        for (got, want) in median.outputs.iter().zip(&want) {
            worst = worst.max(compare(got, want, want)?);
        }
        writeln!(
            out,
            "check against {against}: max abs error {:.3e}, relative {:.3e}",
            worst.max_abs, worst.max_rel
        )?;
        anyhow::ensure!(
            worst.within(CHECK_REL),
            "{out}the distributed output differs from the single-device output by {:.3e} \
             relative (limit {CHECK_REL:e})",
            worst.max_rel
        );
        checked = Some(worst.max_rel);
    }
    let results = RunResults {
        model_sha256: plan.model_sha256.clone(),
        candidate: candidate.name.clone(),
        transport: Some(transport.to_string()),
        clock,
        runs_us,
        median_us: median.total_us,
        groups: median.groups,
        best_single_device: single,
        devices_alone: alone.times,
        check_max_rel: checked,
        host_gflops: host,
    };
    Ok(Executed {
        results,
        outputs: median.outputs,
        report: out,
    })
}
