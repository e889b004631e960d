//! `cargo xtask bench paper`: the paper's experiment (section V) on emulated clusters.
//! For every model and cluster: profile in legion mode (kept under
//! bench/profiles), compile, and run on a local emulated cluster the plans
//! Legion, Legion + Wild Card, FSS (where an fss-mode profile is kept), no fusion and
//! one fused block, against the best single board running the whole model.

use super::{kept_profile, load};
use anyhow::{Context, Result};
use legion_ir::Ir;
use legion_pipeline::{
    CompileOptions, Measured, PassTimes, Search, boards_of, connect, measure_in_rounds, run_whole,
};
use legion_plan::{Candidate, Cluster, DeviceId, HostRates, Plan, Profile, ProfileMode, Transport};
use legion_runtime::check::test_input;
use legion_runtime::{LocalCluster, default_cache_dir};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::time::{Duration, Instant};

/// The paper's 14 configurations (Fig. 6), under testdata/clusters.
pub const CLUSTERS: [&str; 14] = legion_plan::PAPER_SETUPS;

/// The paper's models.
pub const MODELS: [&str; 3] = ["vgg16", "vgg19", "yolov2"];

/// The plans compared, in table order. The last is Legion + Wild Card searched over
/// only the groups FSS measured, for setups whose FSS was limited to short groups
/// (YOLOv2's): the two searches compared on the same candidates.
const PLANS: [&str; 6] = [
    "legion",
    "legion+wc",
    "fss",
    "no fusion",
    "one block",
    "legion+wc in fss's groups",
];

/// [`PLANS`] index of Legion + Wild Card in FSS's groups.
const IN_FSS_GROUPS: usize = 5;

pub struct Options {
    pub clusters: Vec<String>,
    pub models: Vec<String>,
    /// Timed runs per plan (after one warm-up; at least [`SINGLE_BOARD_RUNS`] on a
    /// 1-board cluster); the fastest is kept.
    pub runs: u32,
    pub reuse: bool,
    /// Measure nothing: write the table and the figure again from the kept results.
    pub replot: bool,
    /// Measure the clusters only; the overheads of an earlier run stay.
    pub keep_overheads: bool,
    /// Measure the overheads only; the rows of an earlier run stay.
    pub overheads_only: bool,
}

/// One model on one cluster.
#[derive(Serialize, Deserialize)]
struct Row {
    model: String,
    cluster: String,
    devices: usize,
    /// Best single board: its name and emulated µs.
    single: (String, u64),
    /// Timed runs of each plan and of the single board (after one warm-up).
    #[serde(default = "three_runs")]
    runs: u32,
    /// Per plan of [`PLANS`]: measured emulated µs and the FLC, when it was run.
    plans: Vec<Option<(u64, String)>>,
    /// Per plan of [`PLANS`]: the predicted µs of the FLC that ran (FSS's from its
    /// measured group times, the others' from the legion predictor). Empty in rows kept
    /// from before it was recorded.
    #[serde(default)]
    predicted: Vec<Option<u64>>,
    legion_profiling_us: u64,
    /// The cluster whose legion profile was cut down to this one's boards (see
    /// [`legion_profile`]); `None` when this cluster was profiled itself.
    profiled_on: Option<String>,
    fss_profiling_us: Option<u64>,
    /// FSS measured every choice of the cost table this row's Legion plans searched
    /// (`bench accuracy`'s profiles, one sitting); false in rows kept from before, whose
    /// FSS measured only groups across all boards.
    #[serde(default)]
    fss_oracle: bool,
    wall: Duration,
    /// The range of the host's rate the boards scaled with over this row's runs;
    /// `None` in rows kept from before it was recorded.
    #[serde(default)]
    host_gflops: Option<HostRates>,
}

/// Timed runs on a 1-board cluster at least: there every plan that keeps the whole
/// model on the board runs the baseline's own program, and identical runs differ by a
/// few percent on this host, so the fastest of more runs is wanted to compare them.
pub(super) const SINGLE_BOARD_RUNS: u32 = 10;

/// Rows kept before [`Row::runs`] was recorded were all measured with 3 runs.
fn three_runs() -> u32 {
    3
}

impl Row {
    /// Whether `plan` ran the whole model as one group on one board: on a 1-board
    /// cluster, the single board's own program.
    fn runs_single_program(&self, plan: usize) -> bool {
        self.devices == 1
            && self
                .plans
                .get(plan)
                .and_then(Option::as_ref)
                .is_some_and(|(_, flc)| {
                    !flc.contains(' ') && flc.starts_with("0..") && flc.ends_with("/1")
                })
    }

    fn speedup(&self, plan: usize) -> Option<f64> {
        self.plans
            .get(plan)?
            .as_ref()
            .map(|(us, _)| self.single.1 as f64 / (*us).max(1) as f64)
    }
}

/// Timed runs of plain tract and of the 1-device plan in [`overhead`]: the two differ
/// by a few percent, about what one host-clock run varies by, so more than a plan's.
const OVERHEAD_RUNS: u32 = 10;

/// The runtime's overhead on one model: plain tract running the whole model against a
/// 1-device plan of it run by the coordinator on a local host worker (no emulation),
/// both timed on this host's wall clock, fastest of the runs after a warm-up.
#[derive(Serialize, Deserialize)]
struct Overhead {
    model: String,
    tract_us: u64,
    plan_us: u64,
}

fn overhead(ir: &Ir, onnx_path: &std::path::Path, model: &str, runs: u32) -> Result<Overhead> {
    use tract_onnx::prelude::*;
    let input = test_input(&ir.input.shape);
    let plain = tract_onnx::onnx()
        .model_for_path(onnx_path)?
        .into_optimized()?
        .into_runnable()?;
    let cluster = legion_runtime::local_cluster(1, &[], 0)?;
    let local = LocalCluster::start(&cluster, default_cache_dir())?;
    let onnx = std::fs::read(onnx_path)?;
    let rt = tokio::runtime::Runtime::new()?;
    // Alternated, so that a slow spell of the host falls on both.
    let (tract_times, plan_times) = rt.block_on(async {
        let coord = connect(local.cluster(), "a local host worker", &onnx, model, ir).await?;
        let (mut tract_times, mut plan_times) = (vec![], vec![]);
        for i in 0..=runs {
            let t = Instant::now();
            plain.run(tvec!(input.clone().into_tvalue()))?;
            let tract_us = t.elapsed().as_micros() as u64;
            let t = Instant::now();
            let (_, tensors) = run_whole(&coord, ir, DeviceId(0), &input).await?;
            tensors.outputs()?;
            if i > 0 {
                tract_times.push(tract_us);
                plan_times.push(t.elapsed().as_micros() as u64);
            }
        }
        anyhow::Ok((tract_times, plan_times))
    })?;
    Ok(Overhead {
        model: model.to_string(),
        tract_us: fastest(tract_times),
        plan_us: fastest(plan_times),
    })
}

/// The fastest of the timed runs: interference on this host only ever adds time (on
/// the wall clock the same whole-model run once measured 1.0-1.8 s emulated by turns;
/// the emulated clock now counts CPU time, which leaves a few percent), so the minimum
/// is the repeatable figure, as in the host calibration.
pub(super) fn fastest(v: Vec<u64>) -> u64 {
    v.into_iter().min().expect("at least one timed run")
}

/// Everything measured, kept in [`ROWS`] across runs.
#[derive(Default, Serialize, Deserialize)]
struct Results {
    rows: Vec<Row>,
    overheads: Vec<Overhead>,
}

pub fn run(opts: &Options) -> Result<String> {
    // Results of earlier runs (other models or clusters) are kept; a setup measured
    // again replaces its row.
    let mut results: Results = match std::fs::read_to_string(ROWS) {
        Ok(json) => serde_json::from_str(&json).with_context(|| format!("reading {ROWS}"))?,
        Err(_) => Results::default(),
    };
    let save = |results: &Results| -> Result<()> {
        std::fs::write(ROWS, serde_json::to_string_pretty(results)?)?;
        figure(&results.rows, std::path::Path::new(FIGURE))
    };
    if opts.replot {
        save(&results)?;
        return report(opts, &results);
    }
    // The overheads first, all together: they are on the host's wall clock, so the
    // host should be quiet while they run (the clusters' emulated clock is the
    // computing thread's CPU time, which other work on the host does not inflate).
    // Each model is imported once, for both loops.
    let models: Vec<(&String, Ir, std::path::PathBuf)> = opts
        .models
        .iter()
        .map(|m| Ok((m, load(m)?, legion_models::test_model(m)?)))
        .collect::<Result<_>>()?;
    for (model, ir, onnx_path) in models.iter().filter(|_| !opts.keep_overheads) {
        eprintln!("{model}: runtime overhead against plain tract");
        let o = overhead(ir, onnx_path, model, OVERHEAD_RUNS)?;
        results.overheads.retain(|x| x.model != o.model);
        results.overheads.push(o);
        save(&results)?;
    }
    for (model, ir, onnx_path) in models.iter().filter(|_| !opts.overheads_only) {
        let onnx = std::fs::read(onnx_path)?;
        for cluster in &opts.clusters {
            let row = measure(ir, &onnx, model, cluster, opts)
                .with_context(|| format!("{cluster} {model}"))?;
            eprintln!(
                "{cluster} {model}: single {:.1} ms, legion+wc {:.2}x ({:.0} s)",
                row.single.1 as f64 / 1e3,
                row.speedup(1).unwrap_or(0.0),
                row.wall.as_secs_f64()
            );
            let rows = &mut results.rows;
            rows.retain(|r| !(r.model == row.model && r.cluster == row.cluster));
            rows.push(row);
            rows.sort_by_key(|r| setup_order(&r.model, &r.cluster));
            // Kept after every setup, so a long run can be looked at as it goes.
            save(&results)?;
        }
    }
    report(opts, &results)
}

/// The measured results, as JSON.
const ROWS: &str = "bench/paper.json";

/// Where [`figure`] is drawn.
const FIGURE: &str = "bench/paper.svg";

fn measure(ir: &Ir, onnx: &[u8], model: &str, cluster_name: &str, opts: &Options) -> Result<Row> {
    let start = Instant::now();
    let file = legion_models::workspace_root()
        .join("testdata/clusters")
        .join(format!("{cluster_name}.toml"));
    let mut cluster = Cluster::load(&file)?;
    // Where FSS measured Legion's cost table, Legion compiles from the very profile that
    // table was costed from, so that both search the same choices.
    let kept = super::kept_fss(cluster_name, model, ir);
    let (profile, profiled_on) = match &kept {
        Some((_, legion)) => (legion.clone(), None),
        None => legion_profile(cluster_name, &cluster, model, ir, opts.reuse)?,
    };
    let fss = match kept {
        Some((fss, legion)) => {
            let options = super::accuracy::fss_options(model);
            match super::unmeasured_choice(ir, &legion, &fss, &cluster, &options)? {
                None => Some(fss),
                Some(choice) => {
                    eprintln!(
                        "{cluster_name}-{model}: no FSS in this row: its kept fss profile did \
                         not measure {choice}, a choice Legion now searches (the predictor or \
                         the shares changed since); measure the pair again with `cargo xtask \
                         bench accuracy --clusters {cluster_name} --models {model}`"
                    );
                    None
                }
            }
        }
        None => None,
    };
    for d in &mut cluster.devices {
        d.address = "127.0.0.1:0".into();
    }
    let local = LocalCluster::start(&cluster, default_cache_dir())?;
    let rt = tokio::runtime::Runtime::new()?;
    let coord = rt.block_on(connect(local.cluster(), cluster_name, onnx, model, ir))?;
    // Every plan compiled as `legion compile` compiles it; Legion's with a live cluster,
    // so that its Wild Card is measured against the extracted FLC and the faster kept.
    let compile = |options: &CompileOptions, profile: &Profile, live: bool| -> Result<Plan> {
        let live = live.then_some((&coord, &rt));
        let compiled = legion_pipeline::compile(
            ir,
            profile,
            local.cluster(),
            options,
            live,
            &mut PassTimes::default(),
        )?;
        compiled.plan.context("compile stopped early")
    };
    // The rows are of the paper's runtime, the hub: plans are chosen and timed on it.
    let legion = CompileOptions {
        transport: Transport::Hub,
        ..CompileOptions::legion("the legion profile")
    };
    let baseline = |search| CompileOptions {
        search,
        ..legion.clone()
    };
    // Per plan of PLANS: the candidate run for it.
    let mut candidates: Vec<Option<Candidate>> = vec![None; PLANS.len()];
    let with_wild_card = compile(&legion, &profile, true)?;
    candidates[0] = Some(with_wild_card.candidates[0].clone());
    candidates[1] = Some(with_wild_card.chosen().clone());
    if let Some(fss) = &fss {
        let options = CompileOptions {
            mode: ProfileMode::Fss,
            wildcard: false,
            profile_name: "the fss profile".into(),
            ..legion.clone()
        };
        candidates[2] = Some(compile(&options, fss, false)?.chosen().clone());
    }
    candidates[3] = Some(
        compile(&baseline(Search::NoFusion), &profile, false)?
            .chosen()
            .clone(),
    );
    candidates[4] = Some(
        compile(&baseline(Search::OneBlock), &profile, false)?
            .chosen()
            .clone(),
    );
    if let Some(limit) = fss.as_ref().and_then(|p| p.max_group_len) {
        let options = CompileOptions {
            max_group_len: Some(limit),
            ..legion.clone()
        };
        candidates[IN_FSS_GROUPS] = Some(compile(&options, &profile, true)?.chosen().clone());
    }

    let input = test_input(&ir.input.shape);
    let runs = timed_runs(opts.runs, cluster.devices.len());
    // One board of each class runs the whole model, and every plan, in rounds.
    let boards = one_board_per_class(&cluster);
    // Identical programs run once (the chosen plan is often the extracted FLC).
    let mut ran: Vec<(&Candidate, Transport)> = vec![];
    let slots: Vec<Option<usize>> = candidates
        .iter()
        .map(|c| {
            c.as_ref().map(
                |c| match ran.iter().position(|(r, _)| r.groups == c.groups) {
                    Some(k) => k,
                    None => {
                        ran.push((c, Transport::Hub));
                        ran.len() - 1
                    }
                },
            )
        })
        .collect();
    let measured = rt.block_on(measure_in_rounds(&coord, ir, &input, &boards, &ran, runs))?;
    let (_, single) = fastest_board(&cluster, &boards, &measured)?;
    let times: Vec<u64> = measured
        .candidates
        .iter()
        .map(|runs| fastest(runs.iter().map(|r| r.total_us).collect()))
        .collect();
    let (plans, predicted) = candidates
        .iter()
        .zip(&slots)
        .map(|(c, slot)| match (c, slot) {
            (Some(c), Some(k)) => (Some((times[*k], flc_label(c))), Some(c.predicted_us)),
            _ => (None, None),
        })
        .unzip();
    Ok(Row {
        model: model.to_string(),
        cluster: cluster_name.to_string(),
        devices: cluster.devices.len(),
        single,
        runs,
        plans,
        predicted,
        legion_profiling_us: profile.profiling_us,
        profiled_on,
        fss_profiling_us: fss.as_ref().map(|p| p.profiling_us),
        fss_oracle: fss.is_some(),
        wall: start.elapsed(),
        host_gflops: measured.host_gflops,
    })
}

/// Timed runs per plan on a cluster of `devices` boards, `runs` asked for.
pub(super) fn timed_runs(runs: u32, devices: usize) -> u32 {
    match devices {
        1 => runs.max(SINGLE_BOARD_RUNS),
        _ => runs,
    }
}

/// The first board of each class in `cluster` (boards of a class are emulated alike).
pub(super) fn one_board_per_class(cluster: &Cluster) -> Vec<DeviceId> {
    let mut boards: Vec<DeviceId> = vec![];
    for (d, device) in cluster.devices.iter().enumerate() {
        if !boards
            .iter()
            .any(|b| cluster.devices[b.index()].emulate == device.emulate)
        {
            boards.push(DeviceId(d));
        }
    }
    boards
}

/// Of `boards` (as measured in that order), the one with the fastest whole-model run:
/// its index among them, its name and that run's µs.
pub(super) fn fastest_board(
    cluster: &Cluster,
    boards: &[DeviceId],
    measured: &Measured,
) -> Result<(usize, (String, u64))> {
    boards
        .iter()
        .zip(&measured.boards)
        .map(|(&d, steps)| {
            let us = fastest(steps.iter().map(|s| s.total_us).collect());
            (cluster.devices[d.index()].name.clone(), us)
        })
        .enumerate()
        .min_by_key(|(_, (_, us))| *us)
        .context("the cluster has no devices")
}

/// A row's range of host rates, flagged when it moved past the limit; "-" for rows
/// measured before it was recorded.
pub(super) fn host_label(h: Option<HostRates>) -> String {
    h.map_or("-".into(), |h| {
        let flag = if h.drifted() { " **moved**" } else { "" };
        format!(
            "{:.1}-{:.1} ({:+.1}%){flag}",
            h.min,
            h.max,
            h.moved() * 100.0
        )
    })
}

/// Clusters whose kept legion profiles hold every board of the smaller clusters: the
/// boards are named alike and emulated alike in testdata/clusters.
const PROFILED: [&str; 3] = ["firefly-x6", "odroid-x3", "3f3o"];

/// The legion-mode profile of `cluster`: kept or measured for it, or, when `reuse` is
/// set and it is not kept, the kept profile of a cluster in [`PROFILED`] holding all its
/// boards (same names, emulation and links), cut down to them. A legion profile holds
/// each board's own samples (single stages, measured on it or on boards of its class)
/// and its link, so a board's part does not depend on the other boards; profiling all
/// 42 setups would take hours here.
pub(super) fn legion_profile(
    name: &str,
    cluster: &Cluster,
    model: &str,
    ir: &Ir,
    reuse: bool,
) -> Result<(Profile, Option<String>)> {
    let kept = |c: &str| super::kept_dir().join(format!("{c}-{model}-legion.json"));
    if reuse && !kept(name).exists() {
        for big in PROFILED {
            let file = legion_models::workspace_root()
                .join("testdata/clusters")
                .join(format!("{big}.toml"));
            let holder = Cluster::load(&file)?;
            let holds = holder.coordinator.mbps == cluster.coordinator.mbps
                && cluster.devices.iter().all(|d| {
                    holder.devices.iter().any(|h| {
                        h.name == d.name
                            && h.emulate == d.emulate
                            && h.link_mbps == d.link_mbps
                            && h.latency_ms == d.latency_ms
                    })
                });
            if holds && kept(big).exists() {
                let full = kept_profile(big, model, ir, 3, true)?;
                return Ok((boards_of(&full, cluster)?, Some(big.to_string())));
            }
        }
    }
    let profile = kept_profile(name, model, ir, 3, reuse)?;
    Ok((profile, None))
}

pub(super) fn flc_label(c: &Candidate) -> String {
    c.groups
        .iter()
        .map(|g| format!("{}..{}/{}", g.first, g.last, g.devices().len()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn report(opts: &Options, results: &Results) -> Result<String> {
    let rows = &results.rows;
    let mut md = String::new();
    writeln!(md, "# The paper's experiment on emulated clusters\n")?;
    let mut run_counts: Vec<u32> = rows.iter().map(|r| r.runs).collect();
    run_counts.sort_unstable();
    run_counts.dedup();
    let more_runs: Vec<String> = rows
        .iter()
        .filter(|r| r.runs != run_counts[0])
        .map(|r| format!("{} on {}: {}", r.model, r.cluster, r.runs))
        .collect();
    let runs = if more_runs.is_empty() {
        format!("{} times", run_counts.first().copied().unwrap_or(opts.runs))
    } else {
        format!(
            "{} times (other counts: {})",
            run_counts[0],
            more_runs.join(", ")
        )
    };
    writeln!(
        md,
        "Measured by `cargo xtask bench paper` on {}; rows are kept in {ROWS} across \
         runs, and this file was last written by `cargo xtask bench paper{}`. Every time is on the emulated \
         clock (docs/architecture.md, \"The emulated clock\"): compute scaled from this host to the board class, \
         links at the cluster file's rates. Every plan here runs through the hub, the \
         paper's runtime (`transports.md` runs the same setups by both transports). \
         Each plan ran once to warm up, then {runs}, \
         in rounds over all plans and the single board (so that a slow spell of \
         the host falls on all); the fastest run is kept, since interference on this \
         host only adds time (emulated compute is the computing thread's CPU time, \
         which leaves cache and memory contention). *single*: the whole model on the \
         fastest board of the cluster, measured the same way. Speedup = single / plan. *legion*: the FLC egg \
         extracts from the legion predictor's table. *legion+wc*: the plan `legion \
         compile` makes on the live cluster: that FLC and its Wild Card measured (median \
         of 3 runs each, in rounds), the faster kept. Every plan is compiled by the \
         same driver as `legion compile`. *fss*: the same search over FSS-measured times, \
         where an fss profile is kept ({} of the {} setups; {} of them older ones that \
         measured only groups across all boards at proportional shares, barriers whole \
         on each board): `cargo xtask bench accuracy` measures every choice of the cost table Legion searches (each group \
         whole on one board, split by rows over the k fastest boards at the table's \
         shares, split by channels), in one sitting with the legion profile, and the \
         legion plans of that row are compiled from that very profile (docs/\
         architecture.md, \"The FSS oracle\"). *legion+wc in fss's groups*: where \
         FSS measured only groups up to a length (YOLOv2's), Legion + Wild Card searched \
         over groups up to that length too, so that the two searches are compared on \
         the same candidates. *no \
         fusion*: every stage its own group. *one block*: every run of splittable \
         stages one group (DeepThings). Both split over the most devices the legality \
         rules allow. Profiling times are emulated. Where a cluster was not profiled \
         itself, its boards' part of the profile of a larger cluster holding them is \
         used (*cut from*): a legion profile holds each board's own samples. *host \
         GFLOP/s*: the range of the host's rate the emulated boards scaled with over the \
         row's runs (**moved** past 5%; \"-\": measured before the emulator followed the \
         host).\n",
        super::host(),
        args_label(opts),
        rows.iter().filter(|r| r.fss_profiling_us.is_some()).count(),
        rows.len(),
        rows.iter()
            .filter(|r| r.fss_profiling_us.is_some() && !r.fss_oracle)
            .count()
    )?;
    write!(md, "| model | cluster | boards | single ms |")?;
    for p in PLANS {
        write!(md, " {p} ms (x) |")?;
    }
    writeln!(md, " legion profiling s | fss profiling s | host GFLOP/s |")?;
    writeln!(
        md,
        "|---|---|---:|---:|{}---:|---:|---|",
        "---:|".repeat(PLANS.len())
    )?;
    for r in rows {
        write!(
            md,
            "| {} | {} | {} | {:.1} |",
            r.model,
            r.cluster,
            r.devices,
            r.single.1 as f64 / 1e3
        )?;
        for p in 0..PLANS.len() {
            match r.plans.get(p).and_then(Option::as_ref) {
                Some((us, _)) => write!(
                    md,
                    " {:.1} ({:.2}x) |",
                    *us as f64 / 1e3,
                    r.speedup(p).unwrap_or(0.0)
                )?,
                None => write!(md, " - |")?,
            }
        }
        let legion = match &r.profiled_on {
            None => format!("{:.1}", r.legion_profiling_us as f64 / 1e6),
            Some(big) => format!("cut from {big}"),
        };
        let host = host_label(r.host_gflops);
        writeln!(
            md,
            " {legion} | {} | {host} |",
            r.fss_profiling_us
                .map_or("-".into(), |us| format!("{:.1}", us as f64 / 1e6))
        )?;
    }
    writeln!(md, "\n## Against the targets\n")?;
    // Against FSS on the choices FSS measured: where FSS was limited to short groups,
    // Legion + Wild Card searched within the same limit.
    // The latency gap, %, and whether both ran the same FLC.
    let gap = |r: &Row, plan: usize| -> Option<(f64, bool)> {
        let (legion, legion_flc) = r.plans.get(plan)?.as_ref()?;
        let (fss, fss_flc) = r.plans[2].as_ref()?;
        Some((
            (*legion as f64 / *fss as f64 - 1.0) * 100.0,
            legion_flc == fss_flc,
        ))
    };
    let same_choices: Vec<(&Row, (f64, bool))> = rows
        .iter()
        .filter(|r| r.fss_oracle)
        .filter_map(|r| Some((r, gap(r, IN_FSS_GROUPS).or_else(|| gap(r, 1))?)))
        .collect();
    let setup_gap = |r: &Row, (g, same): (f64, bool)| {
        let flc = if same { " same FLC" } else { "" };
        format!("{} {} {g:+.1}%{flc}", r.model, short_name(&r.cluster))
    };
    let older = rows
        .iter()
        .filter(|r| !r.fss_oracle && r.plans[2].is_some())
        .count();
    if !same_choices.is_empty() {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let gaps: Vec<f64> = same_choices.iter().map(|(_, (g, _))| *g).collect();
        let (worst, (worst_gap, _)) = same_choices
            .iter()
            .max_by(|a, b| a.1.0.total_cmp(&b.1.0))
            .expect("not empty");
        writeln!(
            md,
            "- Legion + Wild Card against FSS over the same choices, latency, mean over the \
             {} setups where FSS measured Legion's cost table: {:+.2}%, worst {:+.2}% ({} \
             on {}) (paper: +3.4%; goal: within +1% on average, never worse than +3%). Per \
             setup: {}.",
            gaps.len(),
            mean(&gaps),
            worst_gap,
            worst.model,
            worst.cluster,
            same_choices
                .iter()
                .map(|(r, g)| setup_gap(r, *g))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        let same_flc = same_choices.iter().filter(|(_, (_, same))| *same).count();
        if same_flc > 0 {
            writeln!(
                md,
                "- In {same_flc} of them Legion + Wild Card ran FSS's own FLC: there the \
                 difference is two measurements of one plan."
            )?;
        }
        let ahead: Vec<String> = same_choices
            .iter()
            .filter(|(_, (g, same))| *g < 0.0 && !same)
            .map(|(r, g)| setup_gap(r, *g))
            .collect();
        if !ahead.is_empty() {
            writeln!(
                md,
                "- Legion is ahead of the oracle with another FLC in {} of them ({}): see \
                 \"Predicted against measured\" below for how far FSS's sum of measured \
                 groups is from its plan's measured latency; an oracle over the same choices \
                 loses only by that and by run-to-run noise.",
                ahead.len(),
                ahead.join(", ")
            )?;
        }
    }
    if older > 0 {
        writeln!(
            md,
            "- {older} rows kept from before compare with an FSS that measured only groups \
             across all boards (not Legion's choices); they are left out of the line above."
        )?;
    }
    if let Some(r) = rows
        .iter()
        .find(|r| r.model == "vgg16" && r.cluster == "firefly-x6")
    {
        writeln!(
            md,
            "- VGG-16 on 6 Fireflies, Legion + Wild Card: {:.2}x (paper 2.4; goal ≥ 2.8).",
            r.speedup(1).unwrap_or(0.0)
        )?;
    }
    let (own, other): (Vec<&Row>, Vec<&Row>) = rows
        .iter()
        .filter(|r| r.speedup(1).is_some())
        .partition(|r| r.runs_single_program(1));
    if let Some((r, s)) = other
        .iter()
        .filter_map(|r| Some((r, r.speedup(1)?)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
    {
        writeln!(
            md,
            "- Lowest Legion + Wild Card speedup where its plan is not the single \
             board's own program: {s:.3}x ({} on {}); target ≥ 1.0 everywhere.",
            r.model, r.cluster
        )?;
    }
    if !own.is_empty() {
        let speedups: Vec<f64> = own.iter().filter_map(|r| r.speedup(1)).collect();
        writeln!(
            md,
            "- Where Legion + Wild Card's plan is the whole model on the single board \
             (1-board setups), it runs the same tile on the same board as *single*, in \
             turn with it, so the ratio measures how much identical runs differ: {} \
             (mean {:.3}x).",
            own.iter()
                .zip(&speedups)
                .map(|(r, s)| format!("{} {} {s:.3}x", r.model, short_name(&r.cluster)))
                .collect::<Vec<_>>()
                .join(", "),
            speedups.iter().sum::<f64>() / speedups.len() as f64
        )?;
    }
    for o in &results.overheads {
        writeln!(
            md,
            "- Runtime overhead, {}: a 1-device plan on a local host worker (no \
             emulation) {:.1} ms against plain tract {:.1} ms, wall clock, fastest of {}: \
             {:+.2}% (target ≤ 3%).",
            o.model,
            o.plan_us as f64 / 1e3,
            o.tract_us as f64 / 1e3,
            OVERHEAD_RUNS,
            (o.plan_us as f64 / o.tract_us as f64 - 1.0) * 100.0
        )?;
    }
    predicted_against_measured(&mut md, rows)?;
    if let Some(section) = super::channels::paper_section()? {
        md.push_str(&section);
    }
    writeln!(md, "\n## FLCs run\n")?;
    writeln!(
        md,
        "`a..b/k`: stages a to b on k boards. Wall time is this host's, per setup.\n"
    )?;
    for r in rows {
        writeln!(
            md,
            "- {} {} ({:.0} s wall):",
            r.model,
            r.cluster,
            r.wall.as_secs_f64()
        )?;
        for (p, plan) in PLANS.iter().enumerate() {
            if let Some((_, flc)) = r.plans.get(p).and_then(Option::as_ref) {
                writeln!(md, "  - {plan}: {flc}")?;
            }
        }
    }
    Ok(md)
}

/// How far each plan's predicted latency was from its measured one, per plan of
/// [`PLANS`], over the rows that recorded it.
fn predicted_against_measured(md: &mut String, rows: &[Row]) -> Result<()> {
    let errors = |p: usize| -> Vec<f64> {
        rows.iter()
            .filter_map(|r| {
                let predicted = (*r.predicted.get(p)?)? as f64;
                let (measured, _) = r.plans.get(p)?.as_ref()?;
                Some((predicted / (*measured).max(1) as f64 - 1.0) * 100.0)
            })
            .collect()
    };
    let per_plan: Vec<Vec<f64>> = (0..PLANS.len()).map(errors).collect();
    if per_plan.iter().all(Vec::is_empty) {
        return Ok(());
    }
    writeln!(md, "\n## Predicted against measured\n")?;
    writeln!(
        md,
        "Each plan's latency as the search predicted it (FSS from its measured group \
         times, the others from the legion predictor's table), against the measured \
         latency above. Error = predicted / measured - 1: negative is under-predicted.\n"
    )?;
    writeln!(
        md,
        "| plan | setups | mean abs error % | mean error % | min % | max % |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
    for (plan, e) in PLANS.iter().zip(per_plan) {
        if e.is_empty() {
            continue;
        }
        let n = e.len() as f64;
        writeln!(
            md,
            "| {plan} | {} | {:.2} | {:+.2} | {:+.1} | {:+.1} |",
            e.len(),
            e.iter().map(|x| x.abs()).sum::<f64>() / n,
            e.iter().sum::<f64>() / n,
            e.iter().copied().fold(f64::INFINITY, f64::min),
            e.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        )?;
    }
    let oracle: Vec<&Row> = rows.iter().filter(|r| r.fss_oracle).collect();
    if oracle.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "\nPer setup where FSS measured Legion's choices, predicted / measured ms (the \
         plan Legion + Wild Card ran: within FSS's group limit where it had one):\n"
    )?;
    writeln!(md, "| model | cluster | legion+wc | fss |")?;
    writeln!(md, "|---|---|---|---|")?;
    let cell = |r: &Row, p: usize| match (r.predicted.get(p).copied().flatten(), r.plans.get(p)) {
        (Some(predicted), Some(Some((measured, _)))) => format!(
            "{:.1} / {:.1}",
            predicted as f64 / 1e3,
            *measured as f64 / 1e3
        ),
        _ => "-".into(),
    };
    for r in oracle {
        let legion = match r.plans.get(IN_FSS_GROUPS) {
            Some(Some(_)) => IN_FSS_GROUPS,
            _ => 1,
        };
        writeln!(
            md,
            "| {} | {} | {} | {} |",
            r.model,
            r.cluster,
            cell(r, legion),
            cell(r, 2)
        )?;
    }
    Ok(())
}

/// Where a setup's row goes: models, then clusters, in the paper's order.
pub(super) fn setup_order(model: &str, cluster: &str) -> (Option<usize>, Option<usize>) {
    let at = |list: &[&str], x: &str| list.iter().position(|y| *y == x);
    (at(&MODELS, model), at(&CLUSTERS, cluster))
}

/// The options shared by `bench paper` and `bench transports` that differ from their
/// defaults, as command-line flags.
pub(super) fn setup_args(models: &[String], clusters: &[String], runs: u32, reuse: bool) -> String {
    let mut s = String::new();
    if models != MODELS {
        s += &format!(" --models {}", models.join(","));
    }
    if clusters != CLUSTERS {
        s += &format!(" --clusters {}", clusters.join(","));
    }
    if runs != super::DEFAULT_RUNS {
        s += &format!(" --runs {runs}");
    }
    if reuse {
        s += " --reuse";
    }
    s
}

fn args_label(opts: &Options) -> String {
    let mut s = setup_args(&opts.models, &opts.clusters, opts.runs, opts.reuse);
    if opts.keep_overheads {
        s += " --keep-overheads";
    }
    if opts.overheads_only {
        s += " --overheads-only";
    }
    if opts.replot {
        s += " --replot";
    }
    s
}

/// `firefly-x3` -> `F3`, `odroid-x2` -> `O2`, `2f1o` -> `2F1O`.
pub(super) fn short_name(cluster: &str) -> String {
    match cluster.split_once("-x") {
        Some((class, n)) => format!("{}{n}", class[..1].to_uppercase()),
        None => cluster.to_uppercase(),
    }
}

/// Speedup bars per configuration, one panel per model side by side, one bar per plan
/// (the paper's Fig. 6 layout), as SVG.
fn figure(rows: &[Row], out: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let models: Vec<&str> = MODELS
        .iter()
        .copied()
        .filter(|m| rows.iter().any(|r| r.model == *m))
        .collect();
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e:?}", out.display());
    let root = SVGBackend::new(out, (560 * models.len().max(1) as u32, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    for (panel, model) in root
        .split_evenly((1, models.len().max(1)))
        .iter()
        .zip(&models)
    {
        let mine: Vec<&Row> = rows.iter().filter(|r| r.model == *model).collect();
        let top = mine
            .iter()
            .flat_map(|r| (0..PLANS.len()).filter_map(|p| r.speedup(p)))
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(*model, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..mine.len() as f64, 0f64..top * 1.8)
            .map_err(err)?;
        let labels: Vec<String> = mine.iter().map(|r| short_name(&r.cluster)).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(mine.len() * 2 + 1)
            .x_label_formatter(&|x: &f64| {
                let k = (x - 0.5).round();
                if (x - 0.5 - k).abs() < 1e-6 && k >= 0.0 {
                    labels.get(k as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_label_style(("sans-serif", 11))
            .x_desc("boards (F: Firefly, O: Odroid)")
            .y_desc("speedup over one board")
            .draw()
            .map_err(err)?;
        let width = 0.8 / PLANS.len() as f64;
        for (p, name) in PLANS.iter().enumerate() {
            let color = colors[p % colors.len()];
            chart
                .draw_series(mine.iter().enumerate().filter_map(|(k, r)| {
                    let x = k as f64 + 0.1 + p as f64 * width;
                    let s = r.speedup(p)?;
                    Some(Rectangle::new([(x, 0.0), (x + width, s)], color.filled()))
                }))
                .map_err(err)?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .draw_series(LineSeries::new(
                [(0.0, 1.0), (mine.len() as f64, 1.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(err)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
