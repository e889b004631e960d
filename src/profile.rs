//! `legion profile`: measure a model on a cluster and write the profile (JSON).

use crate::{BadInput, ModelArgs, predict::load_profile};
use anyhow::{Context, Result};
use legion_pipeline::{CompileOptions, profile, profile_fss};
use legion_plan::{Cluster, ProfileMode, Transport};
use legion_profile::ProfileOptions;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The cluster file (TOML).
    #[arg(long)]
    cluster: PathBuf,
    /// Where to write the profile.
    #[arg(short, long)]
    output: PathBuf,
    /// legion: single stages and links (what the cost model needs); fss: every choice
    /// of the cost table Legion searches, run on the cluster (the oracle baseline).
    #[arg(long, value_enum, default_value_t = Mode::Legion)]
    mode: Mode,
    /// FSS: the legion-mode profile whose cost table's choices to measure (the plans
    /// it is compared with are compiled from it, `--transport hub`).
    #[arg(long, value_name = "PROFILE")]
    legion_profile: Option<PathBuf>,
    /// FSS: the longest group to measure (compile with the same limit to compare).
    #[arg(long)]
    max_group_len: Option<usize>,
    /// Timed rounds, after a warm-up round; every measurement runs once a round, and its
    /// median is kept.
    #[arg(long, default_value_t = 3)]
    runs: u32,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Mode {
    Legion,
    Fss,
}

pub fn run(args: &Args) -> Result<()> {
    let mode = match args.mode {
        Mode::Legion => ProfileMode::Legion,
        Mode::Fss => ProfileMode::Fss,
    };
    if args.max_group_len.is_some() && mode == ProfileMode::Legion {
        return Err(BadInput("--max-group-len applies to --mode fss only".into()).into());
    }
    if args.legion_profile.is_some() != (mode == ProfileMode::Fss) {
        return Err(BadInput(
            "--mode fss measures the choices costed from a legion profile: give it with \
             --legion-profile (and only with --mode fss)"
                .into(),
        )
        .into());
    }
    if args.runs == 0 || args.max_group_len == Some(0) {
        return Err(BadInput("--runs and --max-group-len must be at least 1".into()).into());
    }
    let cluster = Cluster::load(&args.cluster)?;
    let ir = args.model.import()?;
    let rt = tokio::runtime::Runtime::new()?;
    let legion = match &args.legion_profile {
        Some(path) => Some(load_profile(path, &cluster, &args.cluster)?),
        None => None,
    };
    let profile = rt.block_on(async {
        let coord = args.model.connect(&cluster, &args.cluster, &ir).await?;
        match (&legion, &args.legion_profile) {
            (Some(legion), Some(path)) => {
                let options = CompileOptions {
                    transport: Transport::Hub,
                    max_group_len: args.max_group_len,
                    ..CompileOptions::legion(&path.display().to_string())
                };
                profile_fss(&coord, &ir, legion, &options, args.runs, true).await
            }
            _ => {
                let opts = ProfileOptions {
                    mode,
                    runs: args.runs,
                    progress: true,
                    ..ProfileOptions::default()
                };
                profile(&coord, &ir, &opts).await
            }
        }
    })?;
    std::fs::write(&args.output, profile.to_json())
        .with_context(|| format!("writing {}", args.output.display()))?;
    let measurements = match mode {
        ProfileMode::Legion => profile
            .stages
            .iter()
            .flat_map(|s| &s.samples)
            .map(Vec::len)
            .sum::<usize>(),
        ProfileMode::Fss => profile.groups.len(),
    };
    println!(
        "profiled {} stages on {} devices ({:?} mode): {measurements} measurements",
        ir.stages.len(),
        profile.devices.len(),
        mode
    );
    println!(
        "profiling time: {:.3} s on the {} clock ({:.1} s wall on this host)",
        profile.profiling_us as f64 / 1e6,
        profile.clock,
        profile.wall_us as f64 / 1e6
    );
    if let Some(h) = profile.host_gflops {
        println!("emulated clock: {h} over the measurements");
        if h.drifted() {
            println!(
                "warning: the host's rate moved more than {:.0}% while profiling; the emulator \
                 scales by the rate it follows, but profile again on a quieter host if the \
                 plan's predictions miss",
                legion_plan::HOST_DRIFT_LIMIT * 100.0
            );
        }
    }
    println!("profile written to {}", args.output.display());
    Ok(())
}
