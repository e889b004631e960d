//! `cargo xtask bench transports`: the paper's 42 setups (bench paper's models and
//! clusters) run by both transports. Per setup, `legion compile` on the live cluster
//! chooses a plan for each transport (the hub, and the boards running their own
//! programs), and both run in rounds with the best single board.

use super::load;
use super::paper::{
    fastest, fastest_board, flc_label, host_label, legion_profile, one_board_per_class, setup_args,
    setup_order, short_name, timed_runs,
};
use anyhow::{Context, Result};
use legion_cost::CostModel;
use legion_ir::{Ir, TensorRef};
use legion_partition::{Group, weights_per_board};
use legion_pipeline::{CompileOptions, PassTimes, connect, measure_in_rounds, run_whole};
use legion_plan::{Candidate, Cluster, DeviceId, HostRates, Party, Profile, Step, Transport};
use legion_runtime::check::{Diff, compare, test_input};
use legion_runtime::{Coordinator, LocalCluster, PlanRun, default_cache_dir};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::time::{Duration, Instant};

/// The transports compared, in table order.
const TRANSPORTS: [Transport; 2] = [Transport::Hub, Transport::Programs];

pub struct Options {
    pub clusters: Vec<String>,
    pub models: Vec<String>,
    /// Timed runs per plan (after one warm-up; at least [`super::paper::SINGLE_BOARD_RUNS`] on
    /// a 1-board cluster); the fastest is kept.
    pub runs: u32,
    pub reuse: bool,
    /// Measure nothing: write the table again from the kept rows.
    pub replot: bool,
}

/// One model on one cluster, both transports.
#[derive(Serialize, Deserialize)]
struct Row {
    model: String,
    cluster: String,
    devices: usize,
    /// Best single board: its name and emulated µs (fastest run).
    single: (String, u64),
    /// The whole model on that board as the legion profile predicts it, µs: how far
    /// the emulator has moved since the profile was measured.
    single_predicted_us: u64,
    runs: u32,
    /// Per transport of [`TRANSPORTS`], the plan compile chose for it.
    plans: Vec<Ran>,
    /// Bytes of the model's input and outputs.
    model_io_bytes: u64,
    /// Whether the programs plan's coordinator sends only rows of the model input and
    /// receives only the model's outputs.
    coordinator_io_only: bool,
    /// The cluster whose legion profile was cut down to this one's boards.
    profiled_on: Option<String>,
    wall: Duration,
    host_gflops: Option<HostRates>,
}

/// One transport's plan on one setup.
#[derive(Serialize, Deserialize)]
struct Ran {
    transport: Transport,
    /// The candidate compile chose and its FLC.
    candidate: String,
    flc: String,
    /// Emulated µs: the fastest run, and what the compiler predicted.
    measured_us: u64,
    predicted_us: u64,
    /// Bytes through the coordinator per inference, as measured.
    coordinator_bytes: u64,
    /// Bytes from board to board per inference (the programs' sends).
    board_bytes: u64,
    /// The most bytes of rows one board held at once during an inference.
    held_bytes: u64,
    /// The most bytes of weights one board's tiles load (each tile its own copy).
    weight_bytes: u64,
    /// The largest difference of its outputs from the single board's, relative.
    max_rel: f32,
}

impl Row {
    fn speedup(&self, k: usize) -> f64 {
        self.single.1 as f64 / self.plans[k].measured_us.max(1) as f64
    }

    /// Programs' latency over the hub's.
    fn ratio(&self) -> f64 {
        self.plans[1].measured_us as f64 / self.plans[0].measured_us.max(1) as f64
    }
}

/// The measured rows, kept across runs.
const ROWS: &str = "bench/transports.json";

pub fn run(opts: &Options) -> Result<String> {
    let mut rows: Vec<Row> = match std::fs::read_to_string(ROWS) {
        Ok(json) => serde_json::from_str(&json).with_context(|| format!("reading {ROWS}"))?,
        Err(_) => vec![],
    };
    if opts.replot {
        return report(opts, &rows);
    }
    for model in &opts.models {
        let ir = load(model)?;
        let onnx = std::fs::read(legion_models::test_model(model)?)?;
        for cluster in &opts.clusters {
            let row = measure(&ir, &onnx, model, cluster, opts)
                .with_context(|| format!("{cluster} {model}"))?;
            eprintln!(
                "{cluster} {model}: single {:.1} ms, hub {:.2}x, programs {:.2}x ({:.0} s)",
                row.single.1 as f64 / 1e3,
                row.speedup(0),
                row.speedup(1),
                row.wall.as_secs_f64()
            );
            rows.retain(|r| !(r.model == row.model && r.cluster == row.cluster));
            rows.push(row);
            rows.sort_by_key(|r| setup_order(&r.model, &r.cluster));
            // Kept after every setup, so a long run can be looked at as it goes.
            std::fs::write(ROWS, serde_json::to_string_pretty(&rows)?)?;
        }
    }
    report(opts, &rows)
}

fn measure(ir: &Ir, onnx: &[u8], model: &str, cluster_name: &str, opts: &Options) -> Result<Row> {
    let start = Instant::now();
    let mut cluster = Cluster::load(&cluster_file(cluster_name))?;
    let (profile, profiled_on) = legion_profile(cluster_name, &cluster, model, ir, opts.reuse)?;
    for d in &mut cluster.devices {
        d.address = "127.0.0.1:0".into();
    }
    let local = LocalCluster::start(&cluster, default_cache_dir())?;
    let rt = tokio::runtime::Runtime::new()?;
    let coord = rt.block_on(connect(local.cluster(), cluster_name, onnx, model, ir))?;
    // Each transport's plan as `legion compile --transport T` makes it on the live
    // cluster: its candidates measured by that transport, the fastest kept.
    let chosen: Vec<Candidate> = TRANSPORTS
        .iter()
        .map(|&transport| {
            let options = CompileOptions {
                transport,
                ..CompileOptions::legion("the legion profile")
            };
            compile_live(ir, &profile, &local, &options, &coord, &rt)
        })
        .collect::<Result<_>>()?;
    let input = test_input(&ir.input.shape);
    let runs = timed_runs(opts.runs, cluster.devices.len());
    // One board of each class runs the whole model, and both plans, in rounds.
    let boards = one_board_per_class(&cluster);
    let pairs: Vec<(&Candidate, Transport)> = chosen.iter().zip(TRANSPORTS).collect();
    let measured = rt.block_on(measure_in_rounds(&coord, ir, &input, &boards, &pairs, runs))?;
    let (single_k, single) = fastest_board(&cluster, &boards, &measured)?;
    let (_, reference) = rt.block_on(run_whole(&coord, ir, boards[single_k], &input))?;
    let want = reference.outputs()?;
    let plans = chosen
        .iter()
        .zip(TRANSPORTS)
        .zip(&measured.candidates)
        .map(|((c, transport), runs)| -> Result<Ran> {
            let mut max_rel = Diff::default();
            for run in runs {
                for (got, want) in run.outputs.iter().zip(&want) {
                    max_rel = max_rel.max(compare(got, want, want)?);
                }
            }
            let traffic = legion_codegen::traffic(ir, c);
            Ok(Ran {
                transport,
                candidate: c.name.clone(),
                flc: flc_label(c),
                measured_us: fastest(runs.iter().map(|r| r.total_us).collect()),
                predicted_us: c.predicted_us,
                coordinator_bytes: most(runs, |r| r.coordinator_bytes),
                board_bytes: match transport {
                    Transport::Programs => traffic.boards,
                    Transport::Hub => 0,
                },
                held_bytes: most(runs, |r| {
                    r.held_bytes.iter().map(|(_, b)| *b).max().unwrap_or(0)
                }),
                weight_bytes: weights_per_board(ir, c).into_values().max().unwrap_or(0),
                max_rel: max_rel.max_rel,
            })
        })
        .collect::<Result<_>>()?;
    let coordinator_io_only = chosen[1]
        .programs
        .iter()
        .filter(|p| p.party == Party::Coordinator)
        .flat_map(|p| &p.steps)
        .all(|step| match step {
            Step::Send { tensor, .. } => *tensor == TensorRef::Input,
            Step::Receive { tensor, .. } => ir.outputs.contains(tensor),
            Step::Run { .. } | Step::Share { .. } | Step::Combine { .. } => false,
            Step::Drop { .. } => true,
        });
    let tensor_bytes = |r: TensorRef| ir.tensor(r).len() as u64 * 4;
    let model_io_bytes =
        tensor_bytes(TensorRef::Input) + ir.outputs.iter().map(|r| tensor_bytes(*r)).sum::<u64>();
    let single_predicted_us = whole_on(ir, &profile, &cluster, &single.0)?;
    Ok(Row {
        model: model.to_string(),
        cluster: cluster_name.to_string(),
        devices: cluster.devices.len(),
        single,
        single_predicted_us,
        runs,
        plans,
        model_io_bytes,
        coordinator_io_only,
        profiled_on,
        wall: start.elapsed(),
        host_gflops: measured.host_gflops,
    })
}

/// The candidate `legion compile` chooses with `options` on the live cluster `local`
/// (its candidates measured, the fastest kept).
pub(super) fn compile_live(
    ir: &Ir,
    profile: &Profile,
    local: &LocalCluster,
    options: &CompileOptions,
    coord: &Coordinator,
    rt: &tokio::runtime::Runtime,
) -> Result<Candidate> {
    let compiled = legion_pipeline::compile(
        ir,
        profile,
        local.cluster(),
        options,
        Some((coord, rt)),
        &mut PassTimes::default(),
    )?;
    Ok(compiled
        .plan
        .context("compile stopped early")?
        .chosen()
        .clone())
}

pub(super) fn cluster_file(name: &str) -> std::path::PathBuf {
    legion_models::workspace_root()
        .join("testdata/clusters")
        .join(format!("{name}.toml"))
}

/// The whole model on the board named `board`, as `profile` predicts it, µs.
fn whole_on(ir: &Ir, profile: &Profile, cluster: &Cluster, board: &str) -> Result<u64> {
    let d = cluster
        .devices
        .iter()
        .position(|d| d.name == board)
        .with_context(|| format!("{board} is not in the cluster"))?;
    let model = CostModel::new(ir, profile, Transport::Programs)?;
    let whole = Group::new(0, ir.stages.len() - 1);
    Ok(model.predict_one(whole, DeviceId(d)).total_us.round() as u64)
}

/// The largest of `f` over the runs.
fn most(runs: &[PlanRun], f: impl Fn(&PlanRun) -> u64) -> u64 {
    runs.iter().map(f).max().unwrap_or(0)
}

fn report(opts: &Options, rows: &[Row]) -> Result<String> {
    let mb = |b: u64| b as f64 / 1e6;
    let mut md = String::new();
    writeln!(md, "# The paper's setups by both transports\n")?;
    writeln!(
        md,
        "Measured by `cargo xtask bench transports` on {1}; rows are kept in {ROWS} \
         across runs, and this file was last written by `cargo xtask bench \
         transports{0}`. The models and the 14 clusters of `bench/paper.md`, times on the \
         emulated clock. Per setup, `legion compile` on the live cluster made a plan for \
         each transport (`--transport hub`: the coordinator runs the groups in order, \
         every strip through it; `--transport programs`, the default: the boards run \
         their own programs and pass rows to each other), each choosing among its \
         candidates by measuring them by that transport. Both plans and the whole model \
         on one board of each class then ran once to warm up and {2} times in rounds \
         (10 on 1-board clusters); the fastest run is kept. *single*: the fastest board \
         alone. *predicted*: the compiler's prediction of the programs plan, error = \
         predicted / measured - 1. *coordinator MB*: rows through the coordinator per \
         inference, counted on the wire. *held MB*: the most bytes of rows one board \
         held at once (hub: one tile's strips in and out; programs: rows computed, \
         received and kept until their last use); *weights MB*: the most bytes of \
         weights one board's tiles load (every sub-strip is its own model with its own \
         copy). Neither counts tract's scratch inside a tile. *rel error*: the largest \
         difference of either plan's outputs from the single board's, relative to the \
         output's largest magnitude.\n",
        args_label(opts),
        super::host(),
        rows.iter()
            .filter(|r| r.devices > 1)
            .map(|r| r.runs)
            .min()
            .unwrap_or(opts.runs)
    )?;
    writeln!(
        md,
        "| model | cluster | boards | single ms | single predicted ms (error) | hub ms (x) | programs ms (x) | programs / hub | predicted ms (error) | coordinator MB hub / programs | board to board MB | held MB hub / programs | weights MB hub / programs | rel error | host GFLOP/s |"
    )?;
    writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )?;
    for r in rows {
        let (hub, programs) = (&r.plans[0], &r.plans[1]);
        let host = host_label(r.host_gflops);
        writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1} ({:+.1}%) | {:.1} ({:.2}x) | {:.1} ({:.2}x) | {:.3} | {:.1} ({:+.1}%) | {:.2} / {:.2} | {:.2} | {:.1} / {:.1} | {:.0} / {:.0} | {:.1e} | {host} |",
            r.model,
            r.cluster,
            r.devices,
            r.single.1 as f64 / 1e3,
            r.single_predicted_us as f64 / 1e3,
            r.single_error() * 100.0,
            hub.measured_us as f64 / 1e3,
            r.speedup(0),
            programs.measured_us as f64 / 1e3,
            r.speedup(1),
            r.ratio(),
            programs.predicted_us as f64 / 1e3,
            error(programs) * 100.0,
            mb(hub.coordinator_bytes),
            mb(programs.coordinator_bytes),
            mb(programs.board_bytes),
            mb(hub.held_bytes),
            mb(programs.held_bytes),
            mb(hub.weight_bytes),
            mb(programs.weight_bytes),
            hub.max_rel.max(programs.max_rel),
        )?;
    }
    targets(&mut md, rows)?;
    writeln!(md, "\n## Plans run\n")?;
    writeln!(
        md,
        "`a..b/k`: stages a to b on k boards; the candidate compile chose. Wall time is \
         this host's, per setup.\n"
    )?;
    for r in rows {
        writeln!(
            md,
            "- {} {} ({:.0} s wall):",
            r.model,
            r.cluster,
            r.wall.as_secs_f64()
        )?;
        for p in &r.plans {
            writeln!(md, "  - {} ({}): {}", p.transport, p.candidate, p.flc)?;
        }
    }
    Ok(md)
}

/// Predicted over measured, minus 1.
fn error(p: &Ran) -> f64 {
    p.predicted_us as f64 / p.measured_us.max(1) as f64 - 1.0
}

impl Row {
    /// The single board's predicted over measured time, minus 1: how far the emulator
    /// moved between the profile's sitting and this one.
    fn single_error(&self) -> f64 {
        self.single_predicted_us as f64 / self.single.1.max(1) as f64 - 1.0
    }

    /// Plan `k`'s error relative to the single board's: the cost model's own miss,
    /// with the emulator's move since the profile taken out.
    fn relative_error(&self, k: usize) -> f64 {
        (1.0 + error(&self.plans[k])) / (1.0 + self.single_error()) - 1.0
    }
}

/// The acceptance figures of issue #21 over the kept rows.
fn targets(md: &mut String, rows: &[Row]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(md, "\n## Against the targets\n")?;
    for (model, goal) in [
        ("vgg16", "at least 3.5x, goal 4x"),
        ("yolov2", "at least 3.0x"),
    ] {
        if let Some(r) = rows
            .iter()
            .find(|r| r.model == model && r.cluster == "firefly-x6")
        {
            writeln!(
                md,
                "- {model} on 6 Fireflies, programs: {:.2}x ({goal}); the hub: {:.2}x.",
                r.speedup(1),
                r.speedup(0)
            )?;
        }
    }
    // Noise: on 1-board clusters both plans run the whole model on the board, the
    // same tile, so their ratio is what identical work differs by.
    let alike: Vec<f64> = rows
        .iter()
        .filter(|r| r.devices == 1)
        .map(|r| (r.ratio() - 1.0).abs())
        .collect();
    let noise = alike.iter().copied().fold(0.0, f64::max);
    let slower: Vec<String> = rows
        .iter()
        .filter(|r| r.devices > 1 && r.ratio() - 1.0 > noise)
        .map(|r| format!("{} {} {:.3}", r.model, short_name(&r.cluster), r.ratio()))
        .collect();
    let multi: Vec<f64> = rows
        .iter()
        .filter(|r| r.devices > 1)
        .map(Row::ratio)
        .collect();
    if !multi.is_empty() {
        writeln!(
            md,
            "- Programs over hub latency on the {} setups with several boards: mean {:.3}, \
             from {:.3} to {:.3}. Slower than the hub beyond noise ({:.1}%, the largest \
             difference of the two transports on the {} 1-board setups, where both run \
             the same tile): {}.",
            multi.len(),
            multi.iter().sum::<f64>() / multi.len() as f64,
            multi.iter().copied().fold(f64::INFINITY, f64::min),
            multi.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            noise * 100.0,
            alike.len(),
            if slower.is_empty() {
                "none".to_string()
            } else {
                slower.join(", ")
            }
        )?;
    }
    let off: Vec<String> = rows
        .iter()
        .filter(|r| !r.coordinator_io_only)
        .map(|r| format!("{} {}", r.model, short_name(&r.cluster)))
        .collect();
    let sum = |f: &dyn Fn(&Row) -> u64| rows.iter().map(f).sum::<u64>() as f64;
    writeln!(
        md,
        "- Coordinator bytes per inference under the programs: its program sends only \
         rows of the model input and receives only the model's outputs on {} of {} \
         setups{}. Over all setups it moved {:.2}x the bytes of the model's input and \
         outputs (the input rows in a halo go to two boards), against {:.1}x through \
         the hub.",
        rows.len() - off.len(),
        rows.len(),
        if off.is_empty() {
            String::new()
        } else {
            format!("; not on {}", off.join(", "))
        },
        sum(&|r| r.plans[1].coordinator_bytes) / sum(&|r| r.model_io_bytes),
        sum(&|r| r.plans[0].coordinator_bytes) / sum(&|r| r.model_io_bytes),
    )?;
    let peak = |k: usize, f: fn(&Ran) -> u64| {
        rows.iter()
            .map(|r| (f(&r.plans[k]), r))
            .max_by_key(|(b, _)| *b)
            .map(|(b, r)| {
                format!(
                    "{:.1} MB ({} {})",
                    b as f64 / 1e6,
                    r.model,
                    short_name(&r.cluster)
                )
            })
            .unwrap_or_default()
    };
    writeln!(
        md,
        "- Peak worker memory, the largest over the setups. Rows held: hub {}, programs \
         {}. Weights loaded: hub {}, programs {}.",
        peak(0, |p| p.held_bytes),
        peak(1, |p| p.held_bytes),
        peak(0, |p| p.weight_bytes),
        peak(1, |p| p.weight_bytes)
    )?;
    let spread = |e: &[f64]| {
        format!(
            "MAPE {:.1}% over {} setups (mean error {:+.1}%, from {:+.1}% to {:+.1}%)",
            e.iter().map(|x| x.abs()).sum::<f64>() / e.len() as f64,
            e.len(),
            e.iter().sum::<f64>() / e.len() as f64,
            e.iter().copied().fold(f64::INFINITY, f64::min),
            e.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        )
    };
    let singles: Vec<f64> = rows.iter().map(|r| r.single_error() * 100.0).collect();
    writeln!(
        md,
        "- The whole model on the single board, predicted from the kept profile against \
         measured here: {}. The profiles were measured in other sittings; this is how far \
         the emulated boards moved since.",
        spread(&singles)
    )?;
    for (k, transport) in TRANSPORTS.iter().enumerate() {
        let e: Vec<f64> = rows.iter().map(|r| error(&r.plans[k]) * 100.0).collect();
        let relative: Vec<f64> = rows
            .iter()
            .filter(|r| r.devices > 1)
            .map(|r| r.relative_error(k) * 100.0)
            .collect();
        write!(
            md,
            "- Predicted against measured, {transport}: {}",
            spread(&e)
        )?;
        if !relative.is_empty() {
            write!(
                md,
                "; relative to the single board's error, on the setups with several \
                 boards: {}",
                spread(&relative)
            )?;
        }
        writeln!(md, ".")?;
    }
    let worst = rows
        .iter()
        .flat_map(|r| r.plans.iter().map(move |p| (p.max_rel, r)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((rel, r)) = worst {
        writeln!(
            md,
            "- Outputs against the single board: largest relative difference {rel:.1e} \
             ({} {}), limit 1e-5.",
            r.model,
            short_name(&r.cluster)
        )?;
    }
    Ok(())
}

fn args_label(opts: &Options) -> String {
    let mut s = setup_args(&opts.models, &opts.clusters, opts.runs, opts.reuse);
    if opts.replot {
        s += " --replot";
    }
    s
}
