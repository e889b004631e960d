//! `legion run`: execute a plan on a cluster's workers, timed, and compare it with the
//! best single device.

use crate::{BadInput, ModelArgs};
use anyhow::{Context, Result};
use legion_ir::Ir;
use legion_pipeline::execute;
use legion_plan::{Cluster, Transport};
use legion_runtime::check::test_input;
use std::path::{Path, PathBuf};
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
    /// programs: every board runs its program and passes rows to the next boards;
    /// hub: the coordinator sends every strip and gets every result back (the paper's
    /// runtime).
    #[arg(long, default_value = "programs", value_parser = crate::compile::parse_transport)]
    transport: Transport,
    /// Keep going when boards fail: run --repeat inferences one after another (by
    /// --transport), and when one fails or misses its deadline, mark the boards that do
    /// not answer down, compile a plan for the others from this profile (the one the
    /// plan was compiled from) and run it again; take back boards that answer again,
    /// and plan again around boards that compute 1.5x slower than predicted 3 times in
    /// a row.
    #[arg(long, conflicts_with = "save")]
    recover_with: Option<PathBuf>,
    /// With --recover-with: before the first inference, load on the boards a plan for
    /// each board's loss (each board builds its tiles for up to one plan per board of
    /// the cluster), so that recovering from one board's loss costs a Health round and
    /// one run.
    #[arg(long, requires = "recover_with")]
    standby: bool,
}

pub fn run(args: &Args) -> Result<()> {
    if args.repeat == 0 {
        return Err(BadInput("--repeat must be at least 1".into()).into());
    }
    let plan = crate::plan::load(&args.plan)?;
    let ir = args.model.import()?;
    let cluster = Cluster::load(&args.cluster)?;
    let names: Vec<String> = cluster.devices.iter().map(|d| d.name.clone()).collect();
    legion_codegen::validate(&plan, &ir, Some(&names))
        .map_err(|e| BadInput(format!("{}: {e:#}", args.plan.display())))?;
    let input = match &args.input {
        Some(path) => read_input(path, &ir)?,
        None => test_input(&ir.input.shape),
    };
    let rt = tokio::runtime::Runtime::new()?;
    if let Some(profile) = &args.recover_with {
        return rt.block_on(run_recovering(args, profile, &plan, &ir, &cluster, input));
    }
    let run = rt.block_on(async {
        let coord = args.model.connect(&cluster, &args.cluster, &ir).await?;
        execute(
            &coord,
            &ir,
            &plan,
            input,
            args.repeat,
            args.check,
            args.transport,
        )
        .await
    })?;
    print!("{}", run.report);
    if let Some(path) = &args.output {
        write_output(path, &run.outputs)?;
        println!("output written to {}", path.display());
    }
    if let Some(path) = &args.save {
        std::fs::write(path, serde_json::to_string_pretty(&run.results)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("timings written to {}", path.display());
    }
    Ok(())
}

/// `legion run --recover-with PROFILE`: inference after inference, re-planning around
/// boards that fail; each output checked against this host's run with --check.
async fn run_recovering(
    args: &Args,
    profile_path: &Path,
    plan: &legion_plan::Plan,
    ir: &Ir,
    cluster: &Cluster,
    input: Tensor,
) -> Result<()> {
    use legion_pipeline::{CompileOptions, Resilient};
    let text = std::fs::read_to_string(profile_path)
        .with_context(|| format!("reading the profile {}", profile_path.display()))?;
    let profile = legion_plan::Profile::from_json(&text)
        .map_err(|e| BadInput(format!("{}: {e}", profile_path.display())))?;
    let onnx = std::fs::read(&args.model.model)
        .with_context(|| format!("reading {}", args.model.model.display()))?;
    let reference = match args.check {
        true => Some(legion_runtime::Reference::run(ir, input.clone())?),
        false => None,
    };
    let coord = args.model.connect(cluster, &args.cluster, ir).await?;
    let options = CompileOptions {
        transport: args.transport,
        ..CompileOptions::legion(&profile_path.display().to_string())
    };
    let mut runner = Resilient::new(&coord, ir, &onnx, profile, plan.clone(), options)?;
    if args.standby {
        let start = std::time::Instant::now();
        let loaded = runner.prepare_standby().await?;
        println!(
            "standby: a plan for each of {loaded} boards' loss loaded in {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    let mut last = vec![];
    for i in 0..args.repeat {
        let start = std::time::Instant::now();
        let run = runner.infer(&input).await?;
        let mut line = format!(
            "inference {i}: {:.3} ms on the {} clock, {:.1} ms wall, on {}",
            run.total_us as f64 / 1e3,
            run.clock,
            start.elapsed().as_secs_f64() * 1e3,
            runner.boards().join(",")
        );
        if let Some(reference) = &reference {
            let mut worst = legion_runtime::check::Diff::default();
            for (got, r) in run.outputs.iter().zip(&ir.outputs) {
                let want = reference.tensor(*r);
                worst = worst.max(legion_runtime::check::compare(got, want, want)?);
            }
            anyhow::ensure!(
                worst.within(legion_pipeline::CHECK_REL),
                "inference {i}: the output differs from this host's run by {:.3e} relative",
                worst.max_rel
            );
            line += &format!(", output checked (relative error {:.1e})", worst.max_rel);
        }
        println!("{line}");
        last = run.outputs;
    }
    for r in &runner.recoveries {
        println!(
            "inference {}: {} down ({}); re-planned in {:.0} ms{}, output {:.0} ms after the \
             failure",
            r.inference,
            r.down.join(", "),
            r.reason,
            r.replanned_after.as_secs_f64() * 1e3,
            if r.standby { " (a standby plan)" } else { "" },
            r.recovered_after.as_secs_f64() * 1e3
        );
    }
    for s in &runner.stragglers {
        println!(
            "inference {}: {} computed {:.2}x slower than predicted {} times in a row; its \
             profile was rescaled and the plan compiled again",
            s.inference,
            s.board,
            s.ratio,
            legion_pipeline::STRAGGLER_RUNS
        );
    }
    for (i, board) in &runner.taken_back {
        println!("inference {i}: {board} answers again; taken back");
    }
    println!(
        "{} inferences, {} failures recovered, {} stragglers planned around",
        args.repeat,
        runner.recoveries.len(),
        runner.stragglers.len()
    );
    if let Some(path) = &args.output {
        write_output(path, &last)?;
        println!("output written to {}", path.display());
    }
    Ok(())
}

/// Reads an f32 .npy of the model's input shape.
fn read_input(path: &Path, ir: &Ir) -> Result<Tensor> {
    let array: tract_ndarray::ArrayD<f32> = ndarray_npy::read_npy(path).map_err(|e| {
        BadInput(format!(
            "{}: not an f32 .npy file the model can take: {e}",
            path.display()
        ))
    })?;
    if array.shape() != ir.input.shape.as_slice() {
        return Err(BadInput(format!(
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
pub(crate) fn write_output(path: &Path, outputs: &[Tensor]) -> Result<()> {
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
