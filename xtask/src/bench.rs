//! `cargo xtask bench <what>`: benchmarks whose results are written as tables under bench/.

use anyhow::{Context, Result};
use legion_ir::Ir;
use legion_partition::{Group, candidate_groups, strips_from_weights, tile};
use legion_pipeline::connect;
use legion_plan::{Cluster, Profile, ProfileMode};
use legion_profile::ProfileOptions;
use legion_runtime::{LocalCluster, Reference, TileModel, default_cache_dir};
use std::fmt::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tract_onnx::prelude::Tensor;

mod accuracy;
mod calibration;
mod channels;
mod compile;
mod memory;
mod models;
mod paper;
mod serve;
mod transports;
mod workers;

/// The `legion` binary next to this xtask (built here, in the same profile).
pub(crate) fn legion_binary() -> Result<PathBuf> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--bin", "legion"])
        .status()
        .context("running cargo build --bin legion")?;
    anyhow::ensure!(status.success(), "cargo build --bin legion failed");
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("xtask has a directory")?
        .join(format!("legion{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        bin.exists(),
        "{} not found after building it",
        bin.display()
    );
    Ok(bin)
}

/// Timed runs per measurement unless `--runs` says otherwise.
const DEFAULT_RUNS: u32 = 3;

#[derive(clap::Args)]
pub struct Args {
    /// Which benchmark.
    #[arg(value_enum)]
    what: Bench,
    /// Where to write the table (default bench/<what>.md).
    #[arg(long)]
    out: Option<PathBuf>,
    /// accuracy, channels, models, paper, serve, transports: clusters under testdata/clusters, comma-separated
    /// (default: the benchmark's own list).
    #[arg(long, value_delimiter = ',')]
    clusters: Option<Vec<String>>,
    /// accuracy, channels, models, paper, serve, transports: models, comma-separated (default: the benchmark's own
    /// list).
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// accuracy, channels, models, paper, transports: timed runs per measurement (paper: at least 10 on
    /// 1-board clusters); serve: frames per sub-cluster.
    #[arg(long, default_value_t = DEFAULT_RUNS)]
    runs: u32,
    /// accuracy, channels, compile, paper, serve, transports: reuse the profiles kept under bench/profiles by
    /// an earlier run.
    #[arg(long)]
    reuse: bool,
    /// channels, paper, transports: measure nothing; write bench/<what>.md (and paper's figure)
    /// again from bench/<what>.json.
    #[arg(long)]
    replot: bool,
    /// paper: measure the clusters only and keep the runtime overheads of an earlier
    /// run (those are timed on the host's wall clock and want a quiet host; the
    /// clusters' emulated clock does not).
    #[arg(long, conflicts_with = "overheads_only")]
    keep_overheads: bool,
    /// paper: measure the runtime overheads only and keep the clusters' rows of an
    /// earlier run.
    #[arg(long)]
    overheads_only: bool,
    /// accuracy: with `--reuse`, report the setups whose profiles are kept and skip the
    /// others instead of measuring them.
    #[arg(long, requires = "reuse")]
    kept_only: bool,
    /// calibration: rows of the stability table (separate `legion demo` runs); the
    /// fourth runs beside two busy loops, the fifth during a build.
    #[arg(long, default_value_t = 5)]
    rows: usize,
    /// calibration: minutes from the first row's start to the last's.
    #[arg(long, default_value_t = 30.0)]
    spread_minutes: f64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Bench {
    /// Tiling every candidate group; one strip's tract model against the whole group.
    Partition,
    /// Emulated boards against their classes' VGG-16 times on every run: what moves on
    /// this host, and a stability table of `legion demo` runs over half an hour.
    Calibration,
    /// Predicted against FSS-measured group times on emulated clusters, and the
    /// profiling time of both modes.
    Accuracy,
    /// Compile time given a profile: cost table, egg against the dynamic program,
    /// codegen.
    Compile,
    /// The paper's experiment: Legion, Legion + Wild Card, FSS, no fusion and one fused
    /// block run on the 14 emulated clusters with VGG-16, VGG-19 and YOLOv2.
    Paper,
    /// The paper's 42 setups run by both transports (the hub, and the boards running
    /// their own programs), each with the plan `legion compile` chooses for it.
    Transports,
    /// Plans that may split groups by output channels and combine global pools across
    /// boards against plans split by rows only, on the paper's 6-board clusters (and
    /// EfficientNet-B0), and VGG-16 on boards too small for fc6.
    Channels,
    /// The worker cross-built for aarch64 and armv7: binary size, cold build time, peak
    /// memory under qemu serving VGG-16's first block.
    Workers,
    /// Streams of frames through `legion serve` for serving plans under several latency
    /// budgets: frames per second on the emulated clock, latency, against data parallel.
    Serve,
    /// Each board's peak memory, its worker a process of its own: running its part of
    /// a plan from shipped tiles, and after importing the whole model.
    Memory,
    /// Today's architectures (YOLOv8, ConvNeXt, EfficientNet, ShuffleNetV2) through
    /// `legion split --check`, `legion compile` and `legion run --check` on emulated
    /// clusters: barrier share, errors, speedup, predicted against measured.
    Models,
}

pub fn run(args: &Args) -> Result<()> {
    let (name, table) = match args.what {
        Bench::Partition => ("partition", partition()?),
        Bench::Calibration => (
            "calibration",
            calibration::run(&calibration::Options {
                rows: args.rows,
                spread_minutes: args.spread_minutes,
            })?,
        ),
        Bench::Compile => ("compile", compile::run(args.reuse)?),
        Bench::Workers => ("workers", workers::run()?),
        Bench::Memory => ("memory", memory::run()?),
        Bench::Paper => (
            "paper",
            paper::run(&paper::Options {
                clusters: list(&args.clusters, &paper::CLUSTERS),
                models: list(&args.models, &paper::MODELS),
                runs: args.runs,
                reuse: args.reuse,
                replot: args.replot,
                keep_overheads: args.keep_overheads,
                overheads_only: args.overheads_only,
            })?,
        ),
        Bench::Transports => (
            "transports",
            transports::run(&transports::Options {
                clusters: list(&args.clusters, &paper::CLUSTERS),
                models: list(&args.models, &paper::MODELS),
                runs: args.runs,
                reuse: args.reuse,
                replot: args.replot,
            })?,
        ),
        Bench::Channels => (
            "channels",
            channels::run(&channels::Options {
                clusters: list(&args.clusters, &channels::CLUSTERS),
                models: list(&args.models, &channels::MODELS),
                runs: args.runs,
                reuse: args.reuse,
                replot: args.replot,
            })?,
        ),
        Bench::Models => (
            "models",
            models::run(&models::Options {
                clusters: list(&args.clusters, &models::CLUSTERS),
                models: list(&args.models, &models::MODELS),
                runs: args.runs,
            })?,
        ),
        Bench::Serve => (
            "serve",
            serve::run(&serve::Options {
                clusters: list(&args.clusters, &serve::CLUSTERS),
                models: list(&args.models, &serve::MODELS),
                frames: args.runs,
                reuse: args.reuse,
            })?,
        ),
        Bench::Accuracy => (
            "accuracy",
            accuracy::run(&accuracy::Options {
                clusters: list(&args.clusters, &accuracy::CLUSTERS),
                models: list(&args.models, &accuracy::MODELS),
                runs: args.runs,
                reuse: args.reuse,
                kept_only: args.kept_only,
            })?,
        ),
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("bench/{name}.md")));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &table).with_context(|| format!("writing {}", out.display()))?;
    print!("{table}");
    eprintln!("written {}", out.display());
    Ok(())
}

/// The names given, or the benchmark's own list.
fn list(given: &Option<Vec<String>>, default: &[&str]) -> Vec<String> {
    given
        .clone()
        .unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect())
}

/// True when `ir` has stages worth splitting by channels and `profile` measured none
/// of them so.
fn lacks_channel_samples(profile: &Profile, ir: &Ir) -> bool {
    let worth = ir
        .stages
        .iter()
        .any(|s| legion_partition::worth_channels(ir, s.id));
    worth && profile.stages.iter().all(|s| s.channel_samples.is_empty())
}

/// Where the benchmarks keep the profiles they measured: in the repository, so that a
/// table can be written again with `--reuse` on a fresh clone.
pub(crate) fn kept_dir() -> PathBuf {
    legion_models::workspace_root().join("bench/profiles")
}

/// Where a profile of `model` on the testdata cluster `cluster_name` is kept.
fn kept_path(cluster_name: &str, model: &str, mode: ProfileMode) -> PathBuf {
    kept_dir().join(format!("{cluster_name}-{model}-{mode}.json"))
}

/// A kept profile, when it can be read and is of `ir`'s model.
fn read_kept(path: &std::path::Path, setup: &str, ir: &Ir) -> Option<Profile> {
    if !path.exists() {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    match Profile::from_json(&text) {
        Ok(p) if p.model_sha256 == ir.sha256 => Some(p),
        Ok(_) => {
            eprintln!("{setup}: {} is of another model", path.display());
            None
        }
        Err(e) => {
            eprintln!("{setup}: not reusing {}: {e}", path.display());
            None
        }
    }
}

/// A legion-mode profile of `model` on the testdata cluster `cluster_name`, measured on
/// a local emulated cluster started here, or read back from bench/profiles when
/// `reuse` is set and a profile of this model is kept there.
fn kept_profile(
    cluster_name: &str,
    model: &str,
    ir: &Ir,
    runs: u32,
    reuse: bool,
) -> Result<Profile> {
    let setup = format!("{cluster_name}-{model}");
    let path = kept_path(cluster_name, model, ProfileMode::Legion);
    if reuse && let Some(p) = read_kept(&path, &setup, ir) {
        // Profiles from before channel samples would hide every channel split.
        if !lacks_channel_samples(&p, ir) {
            eprintln!("{setup}: reusing {}", path.display());
            return Ok(p);
        }
        eprintln!("{setup}: {} has no channel samples", path.display());
    }
    let profile = on_local_cluster(cluster_name, model, ir, |coord| async move {
        eprintln!("{setup}: profiling in legion mode");
        let opts = ProfileOptions {
            runs,
            progress: true,
            ..ProfileOptions::default()
        };
        legion_pipeline::profile(&coord, ir, &opts).await
    })?;
    std::fs::create_dir_all(path.parent().expect("a directory"))?;
    std::fs::write(&path, profile.to_json())?;
    Ok(profile)
}

/// The FSS oracle's profile of `model` on `cluster_name` and the legion profile whose
/// cost table's choices it measured, as kept under bench/profiles; `None` when
/// no fss profile costed from the kept legion profile is there.
fn kept_fss(cluster_name: &str, model: &str, ir: &Ir) -> Option<(Profile, Profile)> {
    let setup = format!("{cluster_name}-{model}");
    let legion = read_kept(
        &kept_path(cluster_name, model, ProfileMode::Legion),
        &setup,
        ir,
    );
    let fss = read_kept(
        &kept_path(cluster_name, model, ProfileMode::Fss),
        &setup,
        ir,
    );
    match (fss, legion) {
        (Some(fss), Some(legion)) if fss.costed_from == Some(legion.sha256()) => {
            Some((fss, legion))
        }
        (Some(fss), Some(_)) if fss.costed_from.is_some() => {
            eprintln!(
                "{setup}: not using {}: it measured the choices of another legion profile \
                 than {}; measure the pair again with `cargo xtask bench accuracy \
                 --clusters {cluster_name} --models {model}`",
                kept_path(cluster_name, model, ProfileMode::Fss).display(),
                kept_path(cluster_name, model, ProfileMode::Legion).display()
            );
            None
        }
        _ => None,
    }
}

/// A setup's legion and fss profiles as kept, when the fss one measured the cost table
/// Legion searches with `options` from the legion one.
fn kept_pair(
    cluster_name: &str,
    model: &str,
    ir: &Ir,
    options: &legion_pipeline::CompileOptions,
) -> Option<(Profile, Profile)> {
    kept_fss(cluster_name, model, ir)
        .filter(|(fss, _)| fss.max_group_len == options.max_group_len)
        .map(|(fss, legion)| (legion, fss))
}

/// The first choice of the cost table Legion now searches with `options` from `legion`
/// that `fss` did not measure at the same strips, described; `None` when it measured
/// them all. A kept pair goes stale when the predictor or the shares change after it
/// was measured: FSS then measured other strips than Legion's plans run, and is no
/// longer an oracle over Legion's choices (docs/architecture.md, "The FSS oracle").
fn unmeasured_choice(
    ir: &Ir,
    legion: &Profile,
    fss: &Profile,
    cluster: &Cluster,
    options: &legion_pipeline::CompileOptions,
) -> Result<Option<String>> {
    let measured: std::collections::HashSet<_> = fss
        .groups
        .iter()
        .map(|g| {
            let option = g.option.unwrap_or(g.strips.len());
            (
                g.first.index(),
                g.last.index(),
                option,
                g.channels,
                g.strips.clone(),
            )
        })
        .collect();
    for choice in legion_pipeline::fss_choices(ir, legion, cluster, options)? {
        let strips: Vec<(String, legion_ir::Rows)> = choice
            .strips
            .iter()
            .map(|(d, rows)| (legion.devices[d.index()].name.clone(), *rows))
            .collect();
        let (first, last) = (choice.group.first.index(), choice.group.last.index());
        let key = (first, last, choice.option, choice.channels, strips);
        if !measured.contains(&key) {
            let at: Vec<String> = key
                .4
                .iter()
                .map(|(name, rows)| format!("{name} {}..{}", rows.start, rows.end))
                .collect();
            return Ok(Some(format!(
                "{first}..{last} over {} board(s){} at {}",
                choice.option,
                if choice.channels { " by channels" } else { "" },
                at.join(", ")
            )));
        }
    }
    Ok(None)
}

/// A setup's legion and fss profiles measured in one sitting (docs/architecture.md,
/// "The FSS oracle"): the legion profile, then right after it, on the same local
/// cluster, every choice of the cost table Legion searches with `options` from it. With
/// `reuse`, a pair kept earlier is read back instead.
fn profile_pair(
    cluster_name: &str,
    model: &str,
    ir: &Ir,
    options: &legion_pipeline::CompileOptions,
    runs: u32,
    reuse: bool,
) -> Result<(Profile, Profile)> {
    let setup = format!("{cluster_name}-{model}");
    if reuse && let Some(pair) = kept_pair(cluster_name, model, ir, options) {
        eprintln!("{setup}: reusing its kept legion and fss profiles");
        return Ok(pair);
    }
    let (legion, fss) = on_local_cluster(cluster_name, model, ir, |coord| async move {
        eprintln!("{setup}: profiling in legion mode, then in fss mode");
        let opts = ProfileOptions {
            runs,
            progress: true,
            ..ProfileOptions::default()
        };
        let legion = legion_pipeline::profile(&coord, ir, &opts).await?;
        let fss = legion_pipeline::profile_fss(&coord, ir, &legion, options, runs, true).await?;
        Ok((legion, fss))
    })?;
    for (mode, p) in [(ProfileMode::Legion, &legion), (ProfileMode::Fss, &fss)] {
        let path = kept_path(cluster_name, model, mode);
        std::fs::create_dir_all(path.parent().expect("a directory"))?;
        // Compact: FSS profiles of 6 boards pass 1 MB pretty-printed.
        std::fs::write(&path, serde_json::to_string(p)?)?;
    }
    Ok((legion, fss))
}

/// Runs `work` on a local emulated cluster of the testdata file `cluster_name` that
/// holds `model`.
fn on_local_cluster<T, F>(
    cluster_name: &str,
    model: &str,
    ir: &Ir,
    work: impl FnOnce(legion_runtime::Coordinator) -> F,
) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    let local = start_local(cluster_name)?;
    let onnx = std::fs::read(legion_models::test_model(model)?)?;
    let rt = tokio::runtime::Runtime::new()?;
    let out = rt.block_on(async {
        let coord = connect(local.cluster(), cluster_name, &onnx, model, ir).await?;
        work(coord).await
    })?;
    drop(local);
    Ok(out)
}

/// Starts the workers of the testdata cluster `cluster_name` in this process, on ports
/// the system picks.
fn start_local(cluster_name: &str) -> Result<LocalCluster> {
    let file = legion_models::workspace_root()
        .join("testdata/clusters")
        .join(format!("{cluster_name}.toml"));
    let mut cluster = Cluster::load(&file)?;
    for d in &mut cluster.devices {
        d.address = "127.0.0.1:0".into();
    }
    LocalCluster::start(&cluster, default_cache_dir())
}

fn load(name: &str) -> Result<Ir> {
    Ok(legion_ir::import(&legion_models::test_model(name)?, None)?)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// Median of `n` timed runs of `f`.
fn median(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut times = (0..n)
        .map(|_| {
            let t = Instant::now();
            f().map(|_| t.elapsed())
        })
        .collect::<Result<Vec<_>>>()?;
    times.sort();
    Ok(times[n / 2])
}

fn partition() -> Result<String> {
    let devices = 6;
    let mut out = String::new();
    writeln!(out, "# Partition pass benchmark\n")?;
    writeln!(
        out,
        "Produced by `cargo xtask bench partition` (dev profile: tract optimized, Legion's crates not) on {}.\n",
        host()
    )?;
    writeln!(
        out,
        "## Tiling every candidate group on {devices} equal devices\n"
    )?;
    writeln!(
        out,
        "| model | stages | candidate groups | total | per group |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for name in ["vgg16", "resnet50"] {
        let ir = load(name)?;
        let groups = candidate_groups(&ir, None);
        let total = median(3, || {
            for g in &groups {
                let height = ir.stage(g.last).output.height().context("rows")?;
                tile(&ir, *g, &strips_from_weights(height, &vec![1.0; devices]))?;
            }
            Ok(())
        })?;
        writeln!(
            out,
            "| {name} | {} | {} | {} ms | {:.1} us |",
            ir.stages.len(),
            groups.len(),
            ms(total),
            total.as_secs_f64() * 1e6 / groups.len() as f64
        )?;
    }
    writeln!(
        out,
        "\n## One strip's tract model against the same stages whole (VGG-16)\n"
    )?;
    writeln!(
        out,
        "Device 0's strip of {devices} equal strips; build = sub-model construction + `into_optimized`, run = median of 5.\n"
    )?;
    writeln!(
        out,
        "| group | build strip | run strip | build whole | run whole | strip / whole run |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    let ir = load("vgg16")?;
    let input = legion_runtime::check::test_input(&ir.input.shape);
    let reference = Reference::run(&ir, input)?;
    for (first, last) in [(0, 2), (6, 9), (14, 17), (0, 17)] {
        let group = Group::new(first, last);
        let height = ir.stage(group.last).output.height().context("rows")?;
        let mut row = format!(
            "| {group} ({} .. {}) ",
            ir.stage(group.first).name,
            ir.stage(group.last).name
        );
        let mut runs = vec![];
        for n in [devices, 1] {
            let tiling = tile(&ir, group, &strips_from_weights(height, &vec![1.0; n]))?;
            let spec = tiling.tiles[0].spec();
            let t = Instant::now();
            let built = TileModel::build(&ir, &spec)?;
            let build = t.elapsed();
            let inputs: Vec<Tensor> = spec
                .inputs
                .iter()
                .map(|i| legion_runtime::check::strip(&ir, &reference, i.tensor, i.rows))
                .collect::<Result<_>>()?;
            let run = median(5, || built.run(inputs.clone()).map(|_| ()))?;
            write!(row, "| {} ms | {} ms ", ms(build), ms(run))?;
            runs.push(run);
        }
        writeln!(
            row,
            "| {:.2} |",
            runs[0].as_secs_f64() / runs[1].as_secs_f64()
        )?;
        out.push_str(&row);
    }
    writeln!(
        out,
        "\nWith 6 equal strips a device would ideally run 1/6 = 0.17 of the whole; the excess is the halo rows it recomputes."
    )?;
    Ok(out)
}

/// The host's CPU model and core count.
pub(crate) fn host() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores")
}
