//! `cargo xtask bench accuracy`: every predictor against FSS's measurements. For each
//! emulated cluster and model, profile in `legion` mode and in `fss` mode on a local
//! cluster, then predict every group FSS measured, at the strips FSS ran it with.

use anyhow::{Context, Result, bail};
use legion_cost::{CostModel, Predictor};
use legion_ir::{Ir, Rows};
use legion_partition::Group;
use legion_pipeline::CompileOptions;
use legion_plan::{DeviceId, HostRates, Profile, Transport};
use std::fmt::Write;

/// Clusters of the benchmark (files under testdata/clusters): with [`MODELS`], the 12
/// setups of issue #23.
pub const CLUSTERS: [&str; 6] = [
    "firefly-x2",
    "firefly-x4",
    "firefly-x6",
    "odroid-x3",
    "2f2o",
    "3f3o",
];
/// Models of the benchmark.
pub const MODELS: [&str; 2] = ["vgg16", "yolov2"];
/// The longest YOLOv2 group FSS measures (VGG: all groups).
pub const YOLO_MAX_GROUP_LEN: usize = 6;

/// Group-length buckets of the report: (label, shortest, longest).
const LENGTHS: [(&str, usize, usize); 4] = [
    ("1", 1, 1),
    ("2-3", 2, 3),
    ("4-7", 4, 7),
    ("8+", 8, usize::MAX),
];

/// What to run.
pub struct Options {
    /// Clusters (names under testdata/clusters).
    pub clusters: Vec<String>,
    /// Models.
    pub models: Vec<String>,
    /// Timed runs per measurement.
    pub runs: u32,
    /// Reuse profiles measured earlier (kept under bench/profiles).
    pub reuse: bool,
    /// Skip the setups whose profiles are not kept instead of measuring them.
    pub kept_only: bool,
}

/// How a measured choice ran.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ran {
    /// Whole on one board.
    Whole,
    /// Split by rows.
    Rows,
    /// Split by the last stage's output channels.
    Channels,
}

/// One choice: measured by FSS and predicted.
struct Case {
    setup: String,
    group: Group,
    option: Ran,
    /// The boards it ran on, with "by channels" when split so.
    boards: String,
    /// How many boards it ran on.
    strips: usize,
    measured_us: f64,
    predicted_us: [f64; 3],
    /// A board computes some stage at more rows than it was sampled at
    /// ([`beyond_samples`]).
    beyond: bool,
}

struct Timing {
    setup: String,
    /// [`twin_spreads`] of the setup's fss profile.
    twins: Vec<f64>,
    legion_us: u64,
    fss_us: u64,
    legion_wall_us: u64,
    fss_wall_us: u64,
    /// The legion profile's boards of one class shared their samples out.
    by_class: bool,
    /// The host's rates over both profiles (emulated clock).
    host: Option<HostRates>,
}

/// The options Legion compiles `model` with here, whose cost table FSS measures: the
/// hub (a group measured alone is a hub step), YOLOv2's groups up to
/// [`YOLO_MAX_GROUP_LEN`] stages.
pub(super) fn fss_options(model: &str) -> CompileOptions {
    CompileOptions {
        transport: Transport::Hub,
        max_group_len: (model == "yolov2").then_some(YOLO_MAX_GROUP_LEN),
        ..CompileOptions::legion("the legion profile")
    }
}

/// Profiles `model` on `cluster` in both modes, one after the other (or reads the pair
/// kept earlier); `None` when only kept pairs are wanted and this one is not.
fn profiles(
    cluster_name: &str,
    model: &str,
    opts: &Options,
) -> Result<Option<(Ir, Profile, Profile)>> {
    let ir = super::load(model)?;
    if opts.kept_only && super::kept_pair(cluster_name, model, &ir, &fss_options(model)).is_none() {
        eprintln!("{cluster_name}-{model}: no kept legion and fss profiles; skipped");
        return Ok(None);
    }
    let (legion, fss) = super::profile_pair(
        cluster_name,
        model,
        &ir,
        &fss_options(model),
        opts.runs,
        opts.reuse,
    )?;
    Ok(Some((ir, legion, fss)))
}

/// True when a board of the choice computes some stage at more rows than the legion
/// profile sampled that stage at on that board, so that its E is extrapolated: whole
/// on one board, the stage's height; split by rows, the board's strip scaled to the
/// stage's height (its rows when the stage runs alone at that share). Barriers are
/// sampled whole and channel splits by channels: never beyond.
fn beyond_samples(
    ir: &Ir,
    legion: &Profile,
    group: Group,
    strips: &[(DeviceId, Rows)],
    option: Ran,
) -> bool {
    let last = ir.stage(group.last).output.height();
    group.stages().any(|s| {
        let stage = &legion.stages[s.index()];
        let Some(height) = ir.stage(s).output.height() else {
            return false;
        };
        if stage.barrier {
            return false;
        }
        strips.iter().any(|&(d, rows)| {
            let share = match (option, last) {
                (Ran::Whole, _) => height,
                (Ran::Rows, Some(last)) if last > 0 => (rows.len() * height + last / 2) / last,
                _ => return false,
            };
            let sampled = stage.samples[d.index()].iter().map(|x| x.rows).max();
            sampled.is_some_and(|most| share > most)
        })
    })
}

/// Shortest compute time of a strip [`twin_spreads`] compares, µs: below it a few µs
/// of timer and scheduling are a large part of the time.
const TWIN_MIN_US: u64 = 2000;

/// The same work measured twice in one step: for every single stage FSS split by rows,
/// every pair of boards of one class given as many rows, how much longer the slower
/// one computed than the faster, % (strips under [`TWIN_MIN_US`] left out). A stage's
/// rows cost alike wherever they lie (padding is computed like any row), so this is the
/// emulated clock's own spread on one piece of work, below which no prediction of a
/// row split can be checked.
fn twin_spreads(fss: &Profile) -> Vec<f64> {
    let class = |name: &str| {
        fss.devices
            .iter()
            .find(|d| d.name == name)
            .and_then(|d| d.class.clone())
    };
    let mut spreads = vec![];
    for g in fss
        .groups
        .iter()
        .filter(|g| g.first == g.last && !g.channels)
    {
        let computed = |name: &str| {
            g.devices
                .iter()
                .find(|t| t.device == name)
                .map(|t| t.compute_us)
        };
        for (i, (a, rows_a)) in g.strips.iter().enumerate() {
            for (b, rows_b) in &g.strips[i + 1..] {
                let twins =
                    rows_a.len() == rows_b.len() && class(a).is_some() && class(a) == class(b);
                let (Some(ta), Some(tb)) = (computed(a), computed(b)) else {
                    continue;
                };
                let (fast, slow) = (ta.min(tb), ta.max(tb));
                if twins && fast >= TWIN_MIN_US {
                    spreads.push((slow as f64 / fast as f64 - 1.0) * 100.0);
                }
            }
        }
    }
    spreads
}

/// Absolute percentage error of predictor `p` on one case, %.
fn ape(c: &Case, p: usize) -> f64 {
    (c.predicted_us[p] - c.measured_us).abs() / c.measured_us * 100.0
}

/// Absolute percentage errors of one predictor.
fn errors(cases: &[Case], p: usize) -> Vec<f64> {
    cases.iter().map(|c| ape(c, p)).collect()
}

/// MAPE of predictor `p` over `cases`, %.
fn mean_ape(cases: &[&Case], p: usize) -> f64 {
    cases.iter().map(|c| ape(c, p)).sum::<f64>() / cases.len().max(1) as f64
}

/// Legion's mean signed error over `cases`, %: positive when it predicts too slow.
fn legion_bias(cases: &[&Case]) -> f64 {
    let signed = |c: &&Case| (c.predicted_us[0] - c.measured_us) / c.measured_us * 100.0;
    cases.iter().map(signed).sum::<f64>() / cases.len().max(1) as f64
}

/// The header of [`mape_row`]'s table, its first column named `what`.
fn mape_header(md: &mut String, what: &str, count: &str) -> Result<()> {
    writeln!(
        md,
        "| {what} | {count} | legion | legion bias | legion p90 | affine | aofl |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|")?;
    Ok(())
}

/// A row of errors by predictor: its label, how many cases, legion's MAPE, mean signed
/// error and p90, then the other predictors' MAPE.
fn mape_row(md: &mut String, label: &str, cases: &[&Case]) -> Result<()> {
    let mut e: Vec<f64> = cases.iter().map(|c| ape(c, 0)).collect();
    e.sort_by(f64::total_cmp);
    writeln!(
        md,
        "| {label} | {} | {:.2} | {:+.2} | {:.2} | {:.2} | {:.2} |",
        cases.len(),
        mean_ape(cases, 0),
        legion_bias(cases),
        quantile(&e, 0.9),
        mean_ape(cases, 1),
        mean_ape(cases, 2)
    )?;
    Ok(())
}

/// A row of [`twin_spreads`]: label, pairs, median, p90 and max.
fn twin_row(md: &mut String, label: &str, spreads: &[f64]) -> Result<()> {
    if spreads.is_empty() {
        return Ok(());
    }
    let mut sorted = spreads.to_vec();
    sorted.sort_by(f64::total_cmp);
    writeln!(
        md,
        "| {label} | {} | {:.1} | {:.1} | {:.1} |",
        sorted.len(),
        quantile(&sorted, 0.5),
        quantile(&sorted, 0.9),
        sorted.last().copied().unwrap_or(f64::NAN)
    )?;
    Ok(())
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// Runs the benchmark and returns the markdown.
pub fn run(opts: &Options) -> Result<String> {
    let mut cases: Vec<Case> = vec![];
    let mut timings: Vec<Timing> = vec![];
    for cluster in &opts.clusters {
        for model in &opts.models {
            let setup = format!("{cluster}-{model}");
            let Some((ir, legion, fss)) = profiles(cluster, model, opts)? else {
                continue;
            };
            // FSS measured each choice as one hub step: predict the hub's transfers.
            let cost = CostModel::new(&ir, &legion, Transport::Hub)?;
            for g in &fss.groups {
                let group = Group::new(g.first.index(), g.last.index());
                let strips = g
                    .strips
                    .iter()
                    .map(|(name, rows)| {
                        let d = legion
                            .device_id(name)
                            .with_context(|| format!("{setup}: device {name} not profiled"))?;
                        Ok((d, *rows))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let option = match (strips.len(), g.channels) {
                    (1, _) => Ran::Whole,
                    (_, true) => Ran::Channels,
                    (_, false) => Ran::Rows,
                };
                let mut predicted_us = [0.0; 3];
                for (i, &p) in Predictor::ALL.iter().enumerate() {
                    predicted_us[i] = match option {
                        Ran::Whole => cost.predict_one(group, strips[0].0).total_us,
                        Ran::Channels => cost.predict_channels(p, group, &strips, None).total_us,
                        Ran::Rows => cost.predict(p, group, &strips)?.total_us,
                    };
                }
                cases.push(Case {
                    setup: setup.clone(),
                    group,
                    option,
                    boards: match option {
                        Ran::Channels => format!("{} by channels", strips.len()),
                        _ => strips.len().to_string(),
                    },
                    strips: strips.len(),
                    measured_us: g.median_us as f64,
                    predicted_us,
                    beyond: beyond_samples(&ir, &legion, group, &strips, option),
                });
            }
            timings.push(Timing {
                twins: twin_spreads(&fss),
                setup,
                legion_us: legion.profiling_us,
                fss_us: fss.profiling_us,
                legion_wall_us: legion.wall_us,
                fss_wall_us: fss.wall_us,
                by_class: legion.devices.iter().any(|d| !d.profiled_with.is_empty()),
                host: HostRates::union(legion.host_gflops, fss.host_gflops),
            });
        }
    }
    if cases.is_empty() {
        bail!("no groups were measured");
    }
    report(opts, &cases, &timings)
}

fn report(opts: &Options, cases: &[Case], timings: &[Timing]) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "# Predicted vs measured group times\n")?;
    writeln!(
        md,
        "Measured by `cargo xtask bench accuracy --clusters {} --models {}{}{}` (timed rounds \
         per profile: {}, after a warm-up round, every measurement once a round; profiles \
         kept under bench/profiles), on emulated \
         clusters started in-process (testdata/clusters; compute measured on this host \
         and scaled to the boards, links modelled). A setup's legion and fss profiles are \
         measured in one sitting, the fss one right after the legion one on the same \
         cluster. FSS measures every choice of the cost table Legion searches through the \
         hub (docs/architecture.md, \"The FSS oracle\"): every group whole on the board the \
         table picked (runs with barriers included), split by rows over the k fastest \
         boards at the table's min-max shares, and split by channels where the table \
         does. Each choice is predicted from the legion-mode profile at the strips FSS ran \
         it with. YOLOv2: groups up to {YOLO_MAX_GROUP_LEN} stages; VGG: all groups. \
         Errors are |predicted - measured| / measured. Goal (#23): legion's MAPE 2.5% or \
         less, p90 5% or less.\n",
        opts.clusters.join(","),
        opts.models.join(","),
        if opts.reuse { " --reuse" } else { "" },
        if opts.kept_only { " --kept-only" } else { "" },
        opts.runs
    )?;
    writeln!(md, "Host: {}\n", super::host())?;
    writeln!(md, "## Accuracy over all {} choices\n", cases.len())?;
    writeln!(
        md,
        "| predictor | MAPE % | median APE % | p90 APE % | max APE % |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|")?;
    for (i, p) in Predictor::ALL.iter().enumerate() {
        let mut e = errors(cases, i);
        e.sort_by(f64::total_cmp);
        let mape = e.iter().sum::<f64>() / e.len() as f64;
        writeln!(
            md,
            "| {p} | {mape:.2} | {:.2} | {:.2} | {:.2} |",
            quantile(&e, 0.5),
            quantile(&e, 0.9),
            e.last().copied().unwrap_or(f64::NAN)
        )?;
    }
    writeln!(md, "\n## Per setup (%)\n")?;
    writeln!(
        md,
        "*host GFLOP/s*: the range of the host's rates the emulated times of both \
         profiles were scaled with, flagged where it moved more than 5% (profiles \
         measured in one run of the command are one after the other).\n"
    )?;
    writeln!(
        md,
        "| setup | choices | legion | legion bias | legion p90 | affine | aofl | host GFLOP/s |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|")?;
    for t in timings {
        let mine: Vec<&Case> = cases.iter().filter(|c| c.setup == t.setup).collect();
        let mut row = String::new();
        mape_row(&mut row, &t.setup, &mine)?;
        writeln!(
            md,
            "{} {} |",
            row.trim_end(),
            super::paper::host_label(t.host)
        )?;
    }
    writeln!(md, "\n## By group length (%)\n")?;
    writeln!(
        md,
        "Single-stage groups involve no fusion: legion predicts them from the samples of \
         that very stage, so its error there is the repeatability of two measurements of \
         the same work on this host. *legion bias*: the mean of (predicted - measured) / \
         measured, positive where legion predicts too slow; near zero where its errors \
         are noise rather than a missing term.\n"
    )?;
    mape_header(&mut md, "stages", "groups")?;
    for (label, lo, hi) in LENGTHS {
        let mine: Vec<&Case> = cases
            .iter()
            .filter(|c| (lo..=hi).contains(&c.group.stages().count()))
            .collect();
        if mine.is_empty() {
            continue;
        }
        mape_row(&mut md, label, &mine)?;
    }
    writeln!(md, "\n## By device option (%)\n")?;
    mape_header(&mut md, "option", "choices")?;
    for (label, ran) in [
        ("whole on one board", Ran::Whole),
        ("split by rows", Ran::Rows),
        ("split by channels", Ran::Channels),
    ] {
        let mine: Vec<&Case> = cases.iter().filter(|c| c.option == ran).collect();
        if mine.is_empty() {
            continue;
        }
        mape_row(&mut md, label, &mine)?;
        if ran == Ran::Rows {
            let most = mine.iter().map(|c| c.strips).max().unwrap_or(0);
            for k in 2..=most {
                let over: Vec<&Case> = mine.iter().copied().filter(|c| c.strips == k).collect();
                if !over.is_empty() {
                    mape_row(&mut md, &format!("split by rows, {k} boards"), &over)?;
                }
            }
        }
    }
    writeln!(md, "\n## Within and beyond the sampled rows\n")?;
    writeln!(
        md,
        "A choice is *beyond the samples* when one of its boards computes a stage at more \
         rows than the legion profile sampled that stage at on that board (whole on one \
         board: the stage's height; split by rows: the board's strip scaled to the \
         stage's height). Its E is then extrapolated past the samples \
         (docs/architecture.md, \"Costing a group\"). Split by channels counts as \
         within.\n"
    )?;
    writeln!(
        md,
        "| rows | choices | legion MAPE % | legion p90 % | affine MAPE % | affine p90 % | aofl MAPE % |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|")?;
    for (label, beyond) in [("within the samples", false), ("beyond the samples", true)] {
        let mine: Vec<&Case> = cases.iter().filter(|c| c.beyond == beyond).collect();
        if mine.is_empty() {
            continue;
        }
        let p90 = |i: usize| {
            let mut e: Vec<f64> = mine.iter().map(|c| ape(c, i)).collect();
            e.sort_by(f64::total_cmp);
            quantile(&e, 0.9)
        };
        writeln!(
            md,
            "| {label} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            mine.len(),
            mean_ape(&mine, 0),
            p90(0),
            mean_ape(&mine, 1),
            p90(1),
            mean_ape(&mine, 2)
        )?;
    }
    writeln!(md, "\n## The same work measured twice\n")?;
    writeln!(
        md,
        "In FSS's steps that split one stage by rows, every pair of boards of one class \
         given as many rows: how much longer the slower of the two computed, on the \
         emulated clock (strips under {:.0} ms left out). The rows of a stage cost alike \
         wherever they lie, so this is the emulated clock's own spread on one piece of \
         work measured at one time, a floor under the errors of predicted row splits \
         (a step's time is its slowest board's).\n",
        TWIN_MIN_US as f64 / 1e3
    )?;
    writeln!(md, "| setup | pairs | median % | p90 % | max % |")?;
    writeln!(md, "|---|---:|---:|---:|---:|")?;
    let mut all = vec![];
    for t in timings {
        twin_row(&mut md, &t.setup, &t.twins)?;
        all.extend(&t.twins);
    }
    twin_row(&mut md, "all", &all)?;
    for (i, p) in Predictor::ALL.iter().enumerate() {
        writeln!(md, "\n## Ten worst choices, {p}\n")?;
        writeln!(
            md,
            "| setup | group | boards | measured ms | predicted ms | APE % |"
        )?;
        writeln!(md, "|---|---|---|---:|---:|---:|")?;
        let mut order: Vec<usize> = (0..cases.len()).collect();
        let e = errors(cases, i);
        order.sort_by(|&a, &b| e[b].total_cmp(&e[a]));
        for &k in order.iter().take(10) {
            let c = &cases[k];
            writeln!(
                md,
                "| {} | {} | {} | {:.2} | {:.2} | {:.1} |",
                c.setup,
                c.group,
                c.boards,
                c.measured_us / 1e3,
                c.predicted_us[i] / 1e3,
                e[k]
            )?;
        }
    }
    writeln!(md, "\n## Profiling time, legion mode against fss mode\n")?;
    writeln!(
        md,
        "Emulated clock: legion mode counts the slowest device's runs (devices profile in \
         parallel) plus its link probes; fss counts every run of every choice. Wall: this \
         host, where all emulated devices share the cores: how long measuring the setup's \
         profiles took. *legion sampled*: by class where boards of one class shared \
         their samples out (docs/profile.md, \"Boards of one class\"), each board where \
         every board measured all of its own (profiles from before that). Goal (#23): fss \
         / legion at least 100.\n"
    )?;
    writeln!(
        md,
        "| setup | legion sampled | legion s (emulated) | fss s (emulated) | fss / legion | legion wall s | fss wall s |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|")?;
    for t in timings {
        writeln!(
            md,
            "| {} | {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} |",
            t.setup,
            if t.by_class { "by class" } else { "each board" },
            t.legion_us as f64 / 1e6,
            t.fss_us as f64 / 1e6,
            t.fss_us as f64 / t.legion_us.max(1) as f64,
            t.legion_wall_us as f64 / 1e6,
            t.fss_wall_us as f64 / 1e6
        )?;
    }
    Ok(md)
}
