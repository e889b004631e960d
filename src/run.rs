//! `legion run`: execute a plan on a cluster's workers, timed, and compare it with the
//! best single device.

use crate::{BadArgument, ModelArgs};
use anyhow::{Context, Result};
use legion_ir::Ir;
use legion_partition::{Group, whole_group};
use legion_plan::{Cluster, HOST_DRIFT_LIMIT, HostRates, Plan, RunResults, StepTiming};
use legion_runtime::check::{compare, test_input};
use legion_runtime::{Coordinator, PlanRun, Tensors, run_candidate};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tract_onnx::prelude::*;

#[derive(clap::Args)]
pub struct Args {
    /// The plan (`legion compile`).
    plan: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// The cluster file; its workers must be running.
    #[arg(long)]
    cluster: PathBuf,
    /// Input tensor (.npy, f32, the model's input shape); default: a fixed made-up input.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Write the model's output here (.npy).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Compare the output with a single-device run; fail above 1e-5 relative error.
    #[arg(long)]
    check: bool,
    /// Timed runs (after one warm-up), each followed by one of the whole model on the
    /// best single device; the medians are reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Write the measured timings (JSON) for `legion plan show --run`.
    #[arg(long)]
    save: Option<PathBuf>,
}

/// The relative error `--check` accepts.
pub const CHECK_REL: f32 = 1e-5;

pub fn run(args: &Args) -> Result<()> {
    if args.repeat == 0 {
        return Err(BadArgument("--repeat must be at least 1".into()).into());
    }
    let plan = crate::plan::load(&args.plan)?;
    let ir = args.model.import()?;
    let cluster = Cluster::load(&args.cluster)?;
    let names: Vec<String> = cluster.devices.iter().map(|d| d.name.clone()).collect();
    legion_codegen::validate(&plan, &ir, Some(&names))
        .map_err(|e| BadArgument(format!("{}: {e:#}", args.plan.display())))?;
    let input = match &args.input {
        Some(path) => read_input(path, &ir)?,
        None => test_input(&ir.input.shape),
    };
    let onnx = std::fs::read(&args.model.model)
        .with_context(|| format!("reading {}", args.model.model.display()))?;
    let rt = tokio::runtime::Runtime::new()?;
    let (results, report) = rt.block_on(async {
        let mut coord = Coordinator::connect(&cluster, Duration::from_secs(10))
            .await
            .with_context(|| format!("connecting to the cluster {}", args.cluster.display()))?;
        coord.upload(&onnx, &ir.input.shape).await?;
        execute(&coord, &ir, &plan, input, args.repeat, args.check).await
    })?;
    print!("{report}");
    if let Some(path) = &args.output {
        write_output(path, &results.1)?;
        println!("output written to {}", path.display());
    }
    if let Some(path) = &args.save {
        std::fs::write(path, serde_json::to_string_pretty(&results.0)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("timings written to {}", path.display());
    }
    Ok(())
}

/// Runs the whole model on every device (once after a warm-up) and picks the fastest, then
/// runs the plan's chosen candidate `repeat` times after a warm-up, each run followed by
/// one of the whole model on that device, so both medians see the same spells of the
/// host. Returns the results, the model's outputs and the report. With `check`, fails
/// when the output differs from the best single device's by more than [`CHECK_REL`].
pub(crate) async fn execute(
    coord: &Coordinator,
    ir: &Ir,
    plan: &Plan,
    input: Tensor,
    repeat: u32,
    check: bool,
) -> Result<((RunResults, Vec<Tensor>), String)> {
    let candidate = plan.chosen();
    let alone = every_device_alone(coord, ir, &input).await?;
    let (single, single_out) = (alone.best, alone.outputs);
    let single_name = coord.devices()[single].name().to_string();
    let mut host = alone.host_gflops;
    let mut runs: Vec<PlanRun> = vec![];
    let mut single_runs: Vec<u64> = vec![];
    for i in 0..=repeat {
        let r = run_candidate(coord, ir, candidate, input.clone()).await?;
        if i > 0 {
            host = HostRates::union(host, HostRates::of_steps(&r.groups));
            runs.push(r);
            let (step, _) = run_whole(coord, ir, single, &input).await?;
            host = HostRates::union(host, HostRates::of_steps([&step]));
            single_runs.push(step.total_us);
        }
    }
    runs.sort_by_key(|r| r.total_us);
    single_runs.sort_unstable();
    let runs_us: Vec<u64> = runs.iter().map(|r| r.total_us).collect();
    let median = runs.swap_remove(runs.len() / 2);
    let single_us = single_runs[single_runs.len() / 2];
    let clock = median.clock;
    let mut out = String::new();
    writeln!(
        out,
        "{} (candidate {}) on {} devices, times on the {clock} clock",
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
        let devices: Vec<&str> = g.tiles.iter().map(|t| t.device.as_str()).collect();
        writeln!(
            out,
            "{:<8} {:<40} {:>13.3} {:>12.3}",
            crate::compile::group_label(g),
            crate::compile::truncate(&devices.join(","), 40),
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
    writeln!(
        out,
        "best single device: {single_name}, {:.3} ms (median of {repeat}, run in turn with \
         the plan); speedup {:.2}x",
        single_us as f64 / 1e3,
        single_us as f64 / median.total_us.max(1) as f64
    )?;
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
    }
    let mut checked = None;
    if check {
        let mut worst = legion_runtime::check::Diff::default();
        for (got, want) in median.outputs.iter().zip(&single_out) {
            worst = worst.max(compare(got, want, want)?);
        }
        writeln!(
            out,
            "check against {single_name} alone: max abs error {:.3e}, relative {:.3e}",
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
        clock,
        runs_us,
        median_us: median.total_us,
        groups: median.groups,
        best_single_device: Some((single_name, single_us)),
        devices_alone: alone.times,
        check_max_rel: checked,
        host_gflops: host,
    };
    Ok(((results, median.outputs), out))
}

/// Every device running the whole model alone.
struct Alone {
    /// The fastest device's index.
    best: usize,
    /// Its outputs.
    outputs: Vec<Tensor>,
    /// Per device, its name and compute time, µs.
    times: Vec<(String, u64)>,
    /// On the emulated clock: the host's rates over these runs.
    host_gflops: Option<HostRates>,
}

/// Runs the whole model on every device: a warm-up on each, then once timed on each.
async fn every_device_alone(coord: &Coordinator, ir: &Ir, input: &Tensor) -> Result<Alone> {
    let mut best: Option<(usize, u64, Tensors)> = None;
    let mut times = vec![];
    let mut host = None;
    // Every warm-up first: emulated boards sharing a host then all time the model
    // with the host's estimate of it refined by every warm-up.
    for d in 0..coord.devices().len() {
        run_whole(coord, ir, d, input).await?;
    }
    for d in 0..coord.devices().len() {
        let (step, tensors) = run_whole(coord, ir, d, input).await?;
        host = HostRates::union(host, HostRates::of_steps([&step]));
        let us = step.total_us;
        let compute = step.devices.iter().map(|t| t.compute_us).sum();
        times.push((coord.devices()[d].name().to_string(), compute));
        if best.as_ref().is_none_or(|b| us < b.1) {
            best = Some((d, us, tensors));
        }
    }
    let (d, _, tensors) = best.context("the cluster has no devices")?;
    let outputs = ir
        .outputs
        .iter()
        .map(|r| tensors.whole(*r).cloned())
        .collect::<Result<Vec<_>>>()?;
    Ok(Alone {
        best: d,
        outputs,
        times,
        host_gflops: host,
    })
}

/// Runs the whole model on device `d` once: its step's timing and the tensors it left.
async fn run_whole<'a>(
    coord: &Coordinator,
    ir: &'a Ir,
    d: usize,
    input: &Tensor,
) -> Result<(StepTiming, Tensors<'a>)> {
    let spec = whole_group(ir, Group::new(0, ir.stages.len() - 1));
    let mut tensors = Tensors::new(ir, input.clone())?;
    let step = coord
        .run_step(&[(d, spec)], &mut tensors)
        .await
        .with_context(|| format!("running the whole model on {}", coord.devices()[d].name()))?;
    Ok((step, tensors))
}

/// Reads an f32 .npy of the model's input shape.
fn read_input(path: &Path, ir: &Ir) -> Result<Tensor> {
    let array: tract_ndarray::ArrayD<f32> = ndarray_npy::read_npy(path).map_err(|e| {
        BadArgument(format!(
            "{}: not an f32 .npy file the model can take: {e}",
            path.display()
        ))
    })?;
    if array.shape() != ir.input.shape.as_slice() {
        return Err(BadArgument(format!(
            "{}: shape {:?}, but model input {:?} takes {:?}",
            path.display(),
            array.shape(),
            ir.input_name,
            ir.input.shape
        ))
        .into());
    }
    Ok(array.into_tensor())
}

/// Writes the first output to `path` and any further ones to `path.1.npy`, ...
fn write_output(path: &Path, outputs: &[Tensor]) -> Result<()> {
    for (k, t) in outputs.iter().enumerate() {
        let file = if k == 0 {
            path.to_path_buf()
        } else {
            path.with_extension(format!("{k}.npy"))
        };
        let view = t.to_plain_array_view::<f32>()?;
        ndarray_npy::write_npy(&file, &view)
            .with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(())
}
