//! `legion profile`: measure a model on a cluster and write the profile (JSON).

use crate::{BadInput, ModelArgs, predict::load_profile};
use anyhow::{Context, Result};
use legion_pipeline::{CompileOptions, profile, profile_fss};
use legion_plan::{Cluster, DeviceProfile, ProfileMode, Transport};
use legion_profile::{CLASS_RATE_TOLERANCE, ProfileOptions};
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
    /// Legion: every board measures all of its own samples. By default boards of one
    /// class (`class` or `emulate` in the cluster file) at rates within 5% of each other
    /// share one set of samples out among themselves.
    #[arg(long)]
    each_board: bool,
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
    if args.each_board && mode == ProfileMode::Fss {
        return Err(BadInput("--each-board applies to --mode legion only".into()).into());
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
                    each_board: args.each_board,
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
    for line in class_notes(&profile.devices, args.each_board) {
        println!("{line}");
    }
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

/// What legion mode did with board classes: which boards shared their samples out, and
/// which of a shared class measured alone because their rates were off.
fn class_notes(devices: &[DeviceProfile], each_board: bool) -> Vec<String> {
    let mut notes = vec![];
    for (d, device) in devices.iter().enumerate() {
        let Some(class) = &device.class else { continue };
        let first = devices
            .iter()
            .position(|o| o.class.as_ref() == Some(class))
            .expect("the device itself");
        if !device.profiled_with.is_empty() {
            let index = |name: &String| devices.iter().position(|o| &o.name == name);
            // Once per set, at its first device.
            if device.profiled_with.iter().all(|o| index(o) > Some(d)) {
                notes.push(format!(
                    "{}, {} ({class}): profiled as one, each measuring a share of their samples",
                    device.name,
                    device.profiled_with.join(", ")
                ));
            }
        } else if !each_board && first != d {
            let of = &devices[first];
            notes.push(format!(
                "{} ({class}) measured its own samples: its rate, {:.1} GFLOP/s, is {:.0}% \
                 from {}'s ({:.1}); over {:.0}% a board is not taken for its class",
                device.name,
                device.gflops,
                (device.gflops / of.gflops - 1.0).abs() * 100.0,
                of.name,
                of.gflops,
                CLASS_RATE_TOLERANCE * 100.0
            ));
        }
    }
    notes
}
