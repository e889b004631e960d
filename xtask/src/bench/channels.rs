//! `cargo xtask bench channels`: plans that may split groups by output channels and
//! combine global pools across a row group's boards, against plans split by rows only
//! (the paper's space, `legion compile --rows-only`), on the same live clusters,
//! profiles and rounds; and VGG-16 on boards whose memory holds no whole fc6.

use super::load;
use super::paper::{
    fastest, fastest_board, host_label, legion_profile, one_board_per_class, short_name, timed_runs,
};
use super::transports::{cluster_file, compile_live};
use anyhow::{Context, Result};
use legion_ir::Ir;
use legion_partition::weights_per_board;
use legion_pipeline::{CompileOptions, connect, measure_in_rounds, run_whole};
use legion_plan::{Candidate, Cluster, HostRates, Transport};
use legion_runtime::check::{Diff, compare, test_input};
use legion_runtime::{LocalCluster, PlanRun, default_cache_dir};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::time::{Duration, Instant};

/// The setups: the paper's 6-board clusters with its three models, and EfficientNet-B0
/// for its squeeze-excitation blocks.
pub const CLUSTERS: [&str; 2] = ["firefly-x6", "3f3o"];
pub const MODELS: [&str; 4] = ["vgg16", "vgg19", "yolov2", "efficientnet-b0"];
/// VGG-16 on four Fireflies with 300 MB each (testdata/memory): fc6 (411 MB) fits no
/// board.
const MEMORY_SETUP: (&str, &str) = ("vgg16", "firefly-x4-300mb");
/// Its profile is the Firefly x4 one: the same boards and links.
const MEMORY_PROFILED_ON: &str = "firefly-x4";

/// The setups, runs and reuse, as bench transports takes them.
pub use super::transports::Options;

/// One model on one cluster: the plan split by rows only and the plan that may split
/// by channels, run in the same rounds.
#[derive(Serialize, Deserialize)]
struct Row {
    model: String,
    cluster: String,
    /// Best single board: its name and emulated µs (fastest run).
    single: (String, u64),
    /// The plan split by rows only; `None` when no such plan fits the boards.
    rows_only: Option<Ran>,
    /// The plan that may split by channels.
    channels: Ran,
    runs: u32,
    wall: Duration,
    host_gflops: Option<HostRates>,
}

/// One plan on one setup.
#[derive(Serialize, Deserialize)]
struct Ran {
    /// Its FLC, channel groups marked `c`.
    flc: String,
    measured_us: u64,
    predicted_us: u64,
    /// Emulated µs of the groups from the first stage that cannot split by rows to
    /// the end (VGG's flatten and FC layers; none in YOLOv2), in the fastest run.
    head_us: Option<u64>,
    /// The most bytes of weights one board's tiles load.
    weight_bytes: u64,
    /// The most bytes of rows one board held at once during an inference.
    held_bytes: u64,
    /// Emulated µs of the groups run whole on one board, in the fastest run (not
    /// recorded before reductions were combined).
    #[serde(default)]
    whole_us: Option<u64>,
    /// Reductions over rows (global pools) its row groups combine across boards.
    #[serde(default)]
    combined: Option<usize>,
    /// The largest difference of its outputs from the single board's, relative.
    max_rel: f32,
}

/// The measured rows, kept across runs.
const ROWS: &str = "bench/channels.json";

pub fn run(opts: &Options) -> Result<String> {
    let mut rows: Vec<Row> = match std::fs::read_to_string(ROWS) {
        Ok(json) => serde_json::from_str(&json).with_context(|| format!("reading {ROWS}"))?,
        Err(_) => vec![],
    };
    if opts.replot {
        return report(&rows);
    }
    let mut setups: Vec<(String, String)> = vec![];
    for model in &opts.models {
        for cluster in &opts.clusters {
            setups.push((model.clone(), cluster.clone()));
        }
    }
    let memory = (MEMORY_SETUP.0.to_string(), MEMORY_SETUP.1.to_string());
    if opts.models.contains(&memory.0) && !setups.contains(&memory) {
        setups.push(memory);
    }
    for (model, cluster) in setups {
        let ir = load(&model)?;
        let onnx = std::fs::read(legion_models::test_model(&model)?)?;
        let row = measure(&ir, &onnx, &model, &cluster, opts)
            .with_context(|| format!("{cluster} {model}"))?;
        eprintln!(
            "{cluster} {model}: single {:.1} ms, rows only {}, channels {:.1} ms ({:.0} s)",
            row.single.1 as f64 / 1e3,
            row.rows_only.as_ref().map_or("no plan".into(), |r| format!(
                "{:.1} ms",
                r.measured_us as f64 / 1e3
            )),
            row.channels.measured_us as f64 / 1e3,
            row.wall.as_secs_f64()
        );
        rows.retain(|r| !(r.model == row.model && r.cluster == row.cluster));
        rows.push(row);
        rows.sort_by_key(|r| order(&r.model, &r.cluster));
        std::fs::write(ROWS, serde_json::to_string_pretty(&rows)?)?;
    }
    report(&rows)
}

/// Table order: models, then clusters, the memory setup last.
fn order(model: &str, cluster: &str) -> (bool, Option<usize>, Option<usize>) {
    let at = |list: &[&str], x: &str| list.iter().position(|y| *y == x);
    let memory = (model, cluster) == MEMORY_SETUP;
    (memory, at(&MODELS, model), at(&CLUSTERS, cluster))
}

fn measure(ir: &Ir, onnx: &[u8], model: &str, cluster_name: &str, opts: &Options) -> Result<Row> {
    let start = Instant::now();
    let (file, profiled_on) = match cluster_name {
        c if c == MEMORY_SETUP.1 => (
            legion_models::workspace_root().join(format!("testdata/memory/{c}.toml")),
            MEMORY_PROFILED_ON,
        ),
        c => (cluster_file(c), c),
    };
    let mut cluster = Cluster::load(&file)?;
    let boards_of = Cluster::load(&cluster_file(profiled_on))?;
    let (profile, _) = legion_profile(profiled_on, &boards_of, model, ir, opts.reuse)?;
    for d in &mut cluster.devices {
        d.address = "127.0.0.1:0".into();
    }
    let local = LocalCluster::start(&cluster, default_cache_dir())?;
    let rt = tokio::runtime::Runtime::new()?;
    let coord = rt.block_on(connect(local.cluster(), cluster_name, onnx, model, ir))?;
    // Each plan as `legion compile` makes it on the live cluster (its candidates
    // measured, the fastest kept), with and without `--rows-only`.
    let compile = |rows_only: bool| {
        let options = CompileOptions {
            rows_only,
            ..CompileOptions::legion("the legion profile")
        };
        compile_live(ir, &profile, &local, &options, &coord, &rt)
    };
    // Rows only finds no plan where a stage fits no board whole or split by rows.
    let rows_only = compile(true).ok();
    let channels = compile(false)?;
    let mut plans: Vec<&Candidate> = rows_only.iter().collect();
    plans.push(&channels);
    let pairs: Vec<(&Candidate, Transport)> =
        plans.iter().map(|c| (*c, Transport::Programs)).collect();
    let input = test_input(&ir.input.shape);
    let runs = timed_runs(opts.runs, cluster.devices.len());
    let boards = one_board_per_class(&cluster);
    let measured = rt.block_on(measure_in_rounds(&coord, ir, &input, &boards, &pairs, runs))?;
    let (single_k, single) = fastest_board(&cluster, &boards, &measured)?;
    let (_, reference) = rt.block_on(run_whole(&coord, ir, boards[single_k], &input))?;
    let want = reference.outputs()?;
    let mut ran = plans
        .iter()
        .zip(&measured.candidates)
        .map(|(c, runs)| ran(ir, c, runs, &want))
        .collect::<Result<Vec<Ran>>>()?;
    let channels = ran.pop().expect("the channels plan ran");
    Ok(Row {
        model: model.to_string(),
        cluster: cluster_name.to_string(),
        single,
        rows_only: ran.pop(),
        channels,
        runs,
        wall: start.elapsed(),
        host_gflops: measured.host_gflops,
    })
}

/// A candidate's FLC: `a..b/k` a group on k boards, `c` when split by channels.
pub(super) fn flc_text(c: &Candidate) -> String {
    c.groups
        .iter()
        .map(|g| {
            let axis = if g.channels { "c" } else { "" };
            format!("{}..{}/{}{axis}", g.first, g.last, g.devices().len())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn ran(
    ir: &Ir,
    c: &Candidate,
    runs: &[PlanRun],
    want: &[tract_onnx::prelude::Tensor],
) -> Result<Ran> {
    let mut diff = Diff::default();
    for run in runs {
        for (got, want) in run.outputs.iter().zip(want) {
            diff = diff.max(compare(got, want, want)?);
        }
    }
    let best = runs
        .iter()
        .min_by_key(|r| r.total_us)
        .context("no timed run")?;
    // A reduction the boards can combine is not the head (EfficientNet's pools).
    let head_start = ir
        .stages
        .iter()
        .position(|s| !s.is_splittable() && !legion_partition::combinable(ir, s.id));
    let head_us = head_start.map(|h| {
        c.groups
            .iter()
            .zip(&best.groups)
            .filter(|(g, _)| g.last.index() >= h)
            .map(|(_, t)| t.total_us)
            .sum()
    });
    Ok(Ran {
        flc: flc_text(c),
        measured_us: fastest(runs.iter().map(|r| r.total_us).collect()),
        predicted_us: c.predicted_us,
        head_us,
        weight_bytes: weights_per_board(ir, c).into_values().max().unwrap_or(0),
        held_bytes: runs
            .iter()
            .flat_map(|r| r.held_bytes.iter().map(|(_, b)| *b))
            .max()
            .unwrap_or(0),
        max_rel: diff.max_rel,
        whole_us: Some(
            c.groups
                .iter()
                .zip(&best.groups)
                .filter(|(g, _)| !g.split)
                .map(|(_, t)| t.total_us)
                .sum(),
        ),
        combined: Some(
            c.groups
                .iter()
                .filter(|g| g.split && !g.channels)
                .flat_map(|g| g.first.index()..=g.last.index())
                .filter(|&s| ir.stages[s].is_combined())
                .count(),
        ),
    })
}

fn report(rows: &[Row]) -> Result<String> {
    let ms = |us: u64| format!("{:.1}", us as f64 / 1e3);
    let mb = |b: u64| format!("{:.0}", b as f64 / 1e6);
    let mut md = String::new();
    writeln!(md, "# Channel splits against rows only\n")?;
    writeln!(
        md,
        "Measured by `cargo xtask bench channels` on {}; rows are kept in {ROWS} across \
         runs. Times on the emulated clock. Per setup, `legion compile` on the live \
         cluster made two plans from the same legion profile (with channel samples): \
         *rows only* (`--rows-only`, the space the paper and the earlier stops searched) \
         and *channels* (the default: each group may also split its last stage by output \
         channels or neurons; docs/architecture.md, \"Channel splits\"), each choosing \
         among its candidates by measuring them. Both plans and the whole model on one \
         board of each class then ran once to warm up and in rounds; the fastest run of \
         each is kept. *head*: the groups from the first stage that cannot split by rows \
         and is no reduction the boards combine (VGG's flatten) to the end, in that run. \
         *whole*: the share of that run in groups run whole on one board. *pools \
         combined*: global pools (squeeze-excitation) inside row groups, each board \
         pooling its own rows and the boards exchanging partial sums \
         (docs/architecture.md, \"Reductions across devices\"; the default, never with \
         `--rows-only`). *weights MB*: the most weights one \
         board's tiles load. *rel err*: the largest difference of either plan's outputs \
         from the single board's. In the FLCs, `a..b/k` is a group on k boards, `c` \
         split by channels.\n",
        super::host()
    )?;
    writeln!(
        md,
        "| setup | single ms | rows only ms | speedup | head ms | whole | channels ms | \
         speedup | predicted ms | head ms | whole | pools combined | weights MB rows / \
         channels | rel err | host GFLOP/s |"
    )?;
    writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )?;
    for r in rows {
        let speedup = |us: u64| format!("{:.2}x", r.single.1 as f64 / us.max(1) as f64);
        let head = |p: &Ran| p.head_us.map_or("-".into(), ms);
        let whole = |p: &Ran| {
            p.whole_us.map_or("-".into(), |w| {
                format!("{:.1}%", 100.0 * w as f64 / p.measured_us.max(1) as f64)
            })
        };
        let c = &r.channels;
        let (rows_ms, rows_speedup, rows_head, rows_whole, rows_weights, rel) = match &r.rows_only {
            Some(p) => (
                ms(p.measured_us),
                speedup(p.measured_us),
                head(p),
                whole(p),
                mb(p.weight_bytes),
                p.max_rel.max(c.max_rel),
            ),
            None => (
                "no plan".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                c.max_rel,
            ),
        };
        writeln!(
            md,
            "| {} {} | {} | {rows_ms} | {rows_speedup} | {rows_head} | {rows_whole} | {} | {} | \
             {} | {} | {} | {} | {rows_weights} / {} | {rel:.1e} | {} |",
            r.model,
            short_name(&r.cluster),
            ms(r.single.1),
            ms(c.measured_us),
            speedup(c.measured_us),
            ms(c.predicted_us),
            head(c),
            whole(c),
            c.combined.map_or("-".into(), |n| n.to_string()),
            mb(c.weight_bytes),
            host_label(r.host_gflops)
        )?;
    }
    writeln!(md, "\nThe FLCs chosen:\n")?;
    for r in rows {
        writeln!(md, "- {} {}:", r.model, r.cluster)?;
        if let Some(p) = &r.rows_only {
            writeln!(md, "  - rows only: `{}`", p.flc)?;
        }
        writeln!(md, "  - channels: `{}`", r.channels.flc)?;
    }
    Ok(md)
}

/// The setup `bench paper` reports beyond the paper's runtime.
const PAPER_SETUP: (&str, &str) = ("vgg16", "firefly-x6");

/// For `bench paper` (bench/paper.md): VGG-16 on 6 Fireflies split by rows only and
/// with channel splits, as this bench last measured it (bench/channels.json): end to
/// end, the FC head, and the FLCs; `None` before it has measured that setup.
pub(super) fn paper_section() -> Result<Option<String>> {
    let Ok(json) = std::fs::read_to_string(ROWS) else {
        return Ok(None);
    };
    let rows: Vec<Row> = serde_json::from_str(&json).with_context(|| format!("reading {ROWS}"))?;
    let Some(r) = rows
        .iter()
        .find(|r| (r.model.as_str(), r.cluster.as_str()) == PAPER_SETUP)
    else {
        return Ok(None);
    };
    let ms = |us: u64| format!("{:.1}", us as f64 / 1e3);
    let mut md = String::new();
    writeln!(
        md,
        "\n## Beyond the paper: the head split by neurons, VGG-16 on 6 Fireflies\n\n\
         Measured by `cargo xtask bench channels` (bench/channels.md, kept in {ROWS}), \
         not by this command: boards run their own programs and pass rows to each other \
         (not the hub of the table above), one profile, both plans and the single board \
         run in rounds, fastest run kept. *head*: the groups from VGG's flatten to the \
         end (fc6, fc7, fc8, softmax). Goals (issue 22): head under 15 ms, end to end at \
         least 4x.\n"
    )?;
    writeln!(md, "| plan | ms | speedup | head ms | FLC |")?;
    writeln!(md, "|---|---:|---:|---:|---|")?;
    writeln!(
        md,
        "| single board ({}) | {} | 1.00x | - | - |",
        r.single.0,
        ms(r.single.1)
    )?;
    let plans = [
        ("rows only (the paper's space)", r.rows_only.as_ref()),
        ("channels", Some(&r.channels)),
    ];
    for (name, p) in plans {
        let Some(p) = p else { continue };
        writeln!(
            md,
            "| {name} | {} | {:.2}x | {} | `{}` |",
            ms(p.measured_us),
            r.single.1 as f64 / p.measured_us.max(1) as f64,
            p.head_us.map_or("-".into(), ms),
            p.flc
        )?;
    }
    Ok(Some(md))
}
