//! `legion plan validate`: check a plan against its model and cluster.

use crate::{BadInput, ModelArgs};
use anyhow::Result;
use legion_plan::{Cluster, Plan};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check a plan against its model (hash, shape, every tile derived again) and,
    /// with --cluster, the cluster's devices.
    Validate(ValidateArgs),
    /// Draw the plan's timeline (SVG): devices' receive / compute / send bars per group,
    /// the FLC over the stages, and a run's measured bars with --run; with --model and
    /// --cluster, the boards' programs: each tile at its predicted time and an arrow
    /// per transfer between parties.
    Show(ShowArgs),
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// The plan (JSON).
    plan: PathBuf,
    /// Measured timings from `legion run --save`, drawn beside the predicted ones.
    #[arg(long)]
    run: Option<PathBuf>,
    /// The model the plan is for: with --cluster, draw the programs' timeline (the
    /// model gives the bytes of each transfer).
    #[arg(long, requires = "cluster")]
    model: Option<PathBuf>,
    /// The cluster file whose links time the programs' transfers (with --model).
    #[arg(long, requires = "model")]
    cluster: Option<PathBuf>,
    /// Where to write the picture.
    #[arg(short, long, default_value = "timeline.svg")]
    output: PathBuf,
}

#[derive(clap::Args)]
pub struct ValidateArgs {
    /// The plan (JSON).
    plan: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// The cluster file the plan should run on.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Also run every tile of every candidate locally, barriers included, and compare
    /// its output strips with a single run of the whole model.
    #[arg(long)]
    run: bool,
}

/// Relative error above which `plan validate --run` fails.
const RUN_TOLERANCE: f32 = 1e-5;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

/// Reads a plan file; errors name the file.
pub(crate) fn load(path: &std::path::Path) -> Result<Plan> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("{}: cannot read the plan: {e}", path.display())))?;
    Ok(Plan::from_json(&text).map_err(|e| BadInput(format!("{}: {e}", path.display())))?)
}

pub fn run(args: &Args) -> Result<()> {
    match &args.command {
        Command::Validate(a) => validate(a),
        Command::Show(a) => show(a),
    }
}

fn show(args: &ShowArgs) -> Result<()> {
    let plan = load(&args.plan)?;
    let run = match &args.run {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                BadInput(format!(
                    "{}: cannot read the run's timings: {e}",
                    path.display()
                ))
            })?;
            let r: legion_plan::RunResults = serde_json::from_str(&text).map_err(|e| {
                BadInput(format!(
                    "{}: not a `legion run --save` file: {e}",
                    path.display()
                ))
            })?;
            if r.model_sha256 != plan.model_sha256 {
                return Err(BadInput(format!(
                    "{} was measured for model {}, the plan is for {}",
                    path.display(),
                    r.model_sha256,
                    plan.model_sha256
                ))
                .into());
            }
            Some(r)
        }
        None => None,
    };
    let programs = match (&args.model, &args.cluster) {
        (Some(model), Some(cluster_file)) => {
            let ir = legion_ir::import(model, Some(&plan.input_shape))?;
            if ir.sha256 != plan.model_sha256 {
                return Err(BadInput(format!(
                    "{} is not the plan's model (the plan is for {})",
                    model.display(),
                    plan.model_sha256
                ))
                .into());
            }
            let cluster = Cluster::load(cluster_file)?;
            Some(
                crate::timeline::programs(&plan, &ir, &cluster)
                    .map_err(|e| BadInput(format!("{}: {e:#}", args.plan.display())))?,
            )
        }
        _ => None,
    };
    crate::timeline::draw(&plan, run.as_ref(), programs.as_ref(), &args.output)?;
    println!("timeline written to {}", args.output.display());
    Ok(())
}

fn validate(args: &ValidateArgs) -> Result<()> {
    let plan = load(&args.plan)?;
    let ir = args.model.import()?;
    let names = match &args.cluster {
        Some(path) => Some(
            Cluster::load(path)?
                .devices
                .iter()
                .map(|d| d.name.clone())
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    legion_codegen::validate(&plan, &ir, names.as_deref())
        .map_err(|e| BadInput(format!("{}: {e:#}", args.plan.display())))?;
    if args.run {
        run_tiles(&plan, &ir).map_err(|e| BadInput(format!("{}: {e:#}", args.plan.display())))?;
    }
    let c = plan.chosen();
    println!(
        "{}: valid plan for {} on {} devices; {} candidates, chosen {} ({} groups, predicted {:.3} ms)",
        args.plan.display(),
        args.model.model.display(),
        plan.devices.len(),
        plan.candidates.len(),
        c.name,
        c.groups.len(),
        c.predicted_us as f64 / 1e3
    );
    let t = legion_codegen::traffic(&ir, c);
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "bytes per inference: {:.2} MB through the coordinator as the hub runs the groups; \
         under the programs {:.2} MB through the coordinator (input and outputs) and \
         {:.2} MB board to board",
        mb(t.hub),
        mb(t.coordinator),
        mb(t.boards)
    );
    Ok(())
}

/// Runs every tile of every candidate on strips of a single-device run of the model and
/// fails on the first one whose outputs differ from it.
fn run_tiles(plan: &Plan, ir: &legion_ir::Ir) -> Result<()> {
    use anyhow::Context;
    use legion_runtime::{Reference, check};
    let reference = Reference::run(ir, check::test_input(&ir.input.shape))?;
    let total: usize = plan
        .candidates
        .iter()
        .flat_map(|c| &c.groups)
        .map(|g| g.tiles.len())
        .sum();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("tiles");
    for c in &plan.candidates {
        let mut worst = check::Diff::default();
        for g in &c.groups {
            for t in &g.tiles {
                let what = || {
                    format!(
                        "candidate {}, group {}..{}, device {}",
                        c.name, g.first, g.last, t.device
                    )
                };
                let diff = check::check_tile(ir, &reference, &t.tile).with_context(what)?;
                anyhow::ensure!(
                    diff.within(RUN_TOLERANCE),
                    "{}: the tile's output differs from the single-device run (max abs {:e}, max rel {:e} > {RUN_TOLERANCE:e})",
                    what(),
                    diff.max_abs,
                    diff.max_rel
                );
                worst = worst.max(diff);
                bar.inc(1);
            }
        }
        bar.suspend(|| {
            println!(
                "candidate {}: {} groups run, every tile matches the single-device run (max rel {:e})",
                c.name,
                c.groups.len(),
                worst.max_rel
            )
        });
    }
    bar.finish_and_clear();
    Ok(())
}
