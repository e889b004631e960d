//! `legion compile`: profile (unless given a profile), cost every candidate group,
//! search the fused-layer configuration with egg, add its Wild Card, pick one, and
//! write the plan (JSON).

use crate::{BadArgument, ModelArgs, predict::load_profile};
use anyhow::{Context, Result};
use legion_codegen::{Chosen, candidate, plan};
use legion_cost::{CostModel, Predictor};
use legion_fusion::{CostTable, Flc, GroupCosts, Legality, search_egg, wild_card};
use legion_ir::Ir;
use legion_plan::{Candidate, Cluster, Plan, Profile, ProfileMode};
use legion_profile::{ProfileOptions, profile};
use legion_runtime::{Coordinator, check::test_input, run_candidate};
use std::fmt::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The cluster file (TOML).
    #[arg(long)]
    cluster: PathBuf,
    /// A profile measured on this cluster; without it, compile profiles first (the
    /// cluster's workers must be running).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// legion (the paper's formula), affine (interpolated, shared coordinator link) or
    /// aofl (the prior work's regressions). Ignored with --mode fss.
    #[arg(long, default_value = "legion")]
    predictor: String,
    /// legion: groups costed by the predictor from single-stage profiles; fss: by the
    /// group times an fss profile measured.
    #[arg(long, value_enum, default_value_t = Mode::Legion)]
    mode: Mode,
    /// Emit only the extracted FLC, without its Wild Card.
    #[arg(long)]
    no_wildcard: bool,
    /// Run both candidates on the cluster and keep the faster, even with --profile
    /// (the cluster's workers must be running). Always done when compile profiles.
    #[arg(long)]
    measure: bool,
    /// Runs per candidate when measuring (the median is compared).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Where to write the plan.
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Mode {
    Legion,
    Fss,
}

/// Wall time of each pass, printed at the end.
#[derive(Default)]
pub(crate) struct PassTimes(Vec<(&'static str, Duration, String)>);

impl PassTimes {
    /// One line per pass, like `-time-passes`.
    pub(crate) fn report(&self) -> String {
        let mut out = String::from("time per pass:\n");
        for (pass, t, note) in &self.0 {
            out += &format!("  {pass:<8} {:>10.3} ms  {note}\n", t.as_secs_f64() * 1e3);
        }
        out
    }

    pub(crate) fn time<T>(
        &mut self,
        pass: &'static str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let r = f()?;
        self.0.push((pass, start.elapsed(), String::new()));
        Ok(r)
    }

    pub(crate) fn note(&mut self, note: String) {
        if let Some(last) = self.0.last_mut() {
            last.2 = note;
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let predictor: Predictor = args.predictor.parse().map_err(BadArgument)?;
    if args.runs == 0 {
        return Err(BadArgument("--runs must be at least 1".into()).into());
    }
    let profile_mode = match args.mode {
        Mode::Legion => ProfileMode::Legion,
        Mode::Fss => ProfileMode::Fss,
    };
    let cluster = Cluster::load(&args.cluster)?;
    let mut times = PassTimes::default();
    let ir = times.time("import", || args.model.import())?;
    let live = args.profile.is_none() || args.measure;
    let rt = tokio::runtime::Runtime::new()?;
    let coord = if live {
        Some(rt.block_on(connect(args, &cluster, &ir))?)
    } else {
        None
    };
    let profile: Profile = match &args.profile {
        Some(path) => load_profile(path, &cluster, &args.cluster)?,
        None => {
            let coord = coord.as_ref().expect("connected");
            let opts = ProfileOptions {
                mode: profile_mode,
                runs: 3,
                max_group_len: None,
                progress: true,
            };
            eprintln!("no --profile given: profiling in {profile_mode:?} mode first");
            let p = times.time("profile", || rt.block_on(profile(coord, &ir, &opts)))?;
            times.note(format!(
                "{:.3} s on the {} clock",
                p.profiling_us as f64 / 1e6,
                p.clock
            ));
            p
        }
    };
    if profile.mode != profile_mode {
        let name = |m: ProfileMode| match m {
            ProfileMode::Legion => "legion",
            ProfileMode::Fss => "fss",
        };
        return Err(BadArgument(format!(
            "the profile was measured in {} mode; --mode {} needs a profile from \
             `legion profile --mode {}`",
            name(profile.mode),
            name(profile_mode),
            name(profile_mode)
        ))
        .into());
    }
    let profile_name = args
        .profile
        .as_ref()
        .map_or("the profile".to_string(), |p| p.display().to_string());
    let options = PlanOptions {
        predictor,
        mode: profile_mode,
        wildcard: !args.no_wildcard,
        runs: args.runs,
        profile_name,
    };
    let (plan, report) = build_plan(
        &ir,
        &profile,
        &cluster,
        &options,
        coord.as_ref().map(|c| (c, &rt)),
        &mut times,
    )?;
    std::fs::write(&args.output, plan.to_json())
        .with_context(|| format!("writing {}", args.output.display()))?;
    print!("{report}{}", times.report());
    println!("plan written to {}", args.output.display());
    Ok(())
}

/// What [`build_plan`] needs besides the model, profile and cluster.
pub(crate) struct PlanOptions {
    pub predictor: Predictor,
    pub mode: ProfileMode,
    pub wildcard: bool,
    /// Runs per candidate when measuring them.
    pub runs: u32,
    /// How errors name the profile.
    pub profile_name: String,
}

/// Costs, searches, adds the Wild Card, emits the candidates and chooses one (by
/// measuring both on `live` when given). Returns the plan and the FLC report.
pub(crate) fn build_plan(
    ir: &Ir,
    profile: &Profile,
    cluster: &Cluster,
    options: &PlanOptions,
    live: Option<(&Coordinator, &tokio::runtime::Runtime)>,
    times: &mut PassTimes,
) -> Result<(Plan, String)> {
    let (predictor, profile_mode) = (options.predictor, options.mode);
    let profile_name = || options.profile_name.clone();
    let names: Vec<String> = profile.devices.iter().map(|d| d.name.clone()).collect();
    let (table, costed_by) = times.time("cost", || match profile_mode {
        ProfileMode::Legion => {
            let model = CostModel::new(ir, profile)
                .map_err(|e| BadArgument(format!("{}: {e:#}", profile_name())))?;
            let legality = Legality::of_cluster(cluster);
            let table = CostTable::predicted(ir, &model, predictor, profile, &legality)?;
            Ok((table, predictor.to_string()))
        }
        ProfileMode::Fss => {
            let table = CostTable::measured(ir, profile)
                .map_err(|e| BadArgument(format!("{}: {e:#}", profile_name())))?;
            Ok((table, "fss".to_string()))
        }
    })?;
    times.note(format!("{} legal choices", table.len()));
    let (flc, stats) = times.time("fusion", || search_egg(&table))?;
    let wild = options.wildcard.then(|| wild_card(&table, &flc)).flatten();
    times.note(format!(
        "egg: {} iterations, {} e-nodes, {} e-classes",
        stats.iterations, stats.nodes, stats.classes
    ));
    let mut candidates = times.time("codegen", || {
        let mut c = vec![candidate(ir, &table, &names, "extracted", &flc)?];
        if let Some(w) = &wild {
            c.push(candidate(ir, &table, &names, "wild-card", &w.flc)?);
        }
        Ok(c)
    })?;
    let chosen = match (live, candidates.len()) {
        (Some((coord, rt)), 2) => {
            let c = times.time("measure", || {
                rt.block_on(measure(coord, ir, &mut candidates, options.runs))
            })?;
            times.note(format!("{} runs per candidate", options.runs));
            c
        }
        (_, 2) => Chosen {
            index: usize::from(candidates[1].predicted_us < candidates[0].predicted_us),
            reason: "predicted faster (no cluster to measure on; pass --measure to run \
                     both candidates)"
                .into(),
        },
        _ => Chosen {
            index: 0,
            reason: if !options.wildcard {
                "the only candidate (--no-wildcard)".into()
            } else if flc.groups.len() == 1 {
                "the only candidate (one group: nothing for Wild Card to merge)".into()
            } else {
                "the only candidate (no two adjacent groups can merge legally)".into()
            },
        },
    };
    let plan = plan(ir, &names, &costed_by, candidates, chosen);
    let report = report(ir, &plan, &table, &flc, wild.map(|w| w.merged))?;
    Ok((plan, report))
}

/// Connects to the cluster and uploads the model.
async fn connect(args: &Args, cluster: &Cluster, ir: &Ir) -> Result<Coordinator> {
    let onnx = std::fs::read(&args.model.model)
        .with_context(|| format!("reading {}", args.model.model.display()))?;
    let mut coord = Coordinator::connect(cluster, Duration::from_secs(10))
        .await
        .with_context(|| format!("connecting to the cluster {}", args.cluster.display()))?;
    eprintln!(
        "uploading {} ({:.1} MB) to {} devices...",
        args.model.model.display(),
        onnx.len() as f64 / 1e6,
        coord.devices().len()
    );
    coord.upload(&onnx, &ir.input.shape).await?;
    Ok(coord)
}

/// Runs every candidate `runs` times (after one warm-up) and chooses the faster median.
async fn measure(
    coord: &Coordinator,
    ir: &Ir,
    candidates: &mut [Candidate],
    runs: u32,
) -> Result<Chosen> {
    for c in candidates.iter_mut() {
        let mut totals = vec![];
        for run in 0..=runs {
            let r = run_candidate(coord, ir, c, test_input(&ir.input.shape))
                .await
                .with_context(|| format!("running candidate {}", c.name))?;
            if run > 0 {
                totals.push(r.total_us);
            }
        }
        totals.sort();
        c.measured_us = Some(totals[totals.len() / 2]);
        eprintln!(
            "candidate {}: {:.3} ms measured on the {} clock (median of {runs}), {:.3} ms predicted",
            c.name,
            totals[totals.len() / 2] as f64 / 1e3,
            coord.clock(),
            c.predicted_us as f64 / 1e3
        );
    }
    let index = usize::from(candidates[1].measured_us < candidates[0].measured_us);
    Ok(Chosen {
        index,
        reason: format!(
            "measured faster on the {} clock (median of {runs} runs each)",
            coord.clock()
        ),
    })
}

/// The FLC table, the candidates and the time per pass.
fn report(
    ir: &Ir,
    plan: &Plan,
    table: &CostTable,
    flc: &Flc,
    merged: Option<usize>,
) -> Result<String> {
    let mut out = String::new();
    let chosen = plan.chosen();
    writeln!(
        out,
        "fused-layer configuration ({}, costed by {}):",
        chosen.name, plan.costed_by
    )?;
    writeln!(
        out,
        "{:<8} {:<32} {:<6} {:<40} {:>12}",
        "group", "stages", "split", "devices", "predicted ms"
    )?;
    for g in &chosen.groups {
        let names = if g.first == g.last {
            ir.stage(g.first).name.clone()
        } else {
            format!("{} .. {}", ir.stage(g.first).name, ir.stage(g.last).name)
        };
        let devices: Vec<&str> = g.tiles.iter().map(|t| t.device.as_str()).collect();
        writeln!(
            out,
            "{:<8} {:<32} {:<6} {:<40} {:>12.3}",
            group_label(g),
            truncate(&names, 32),
            if g.split { "yes" } else { "no" },
            truncate(&devices.join(","), 40),
            g.predicted_us as f64 / 1e3
        )?;
    }
    for c in &plan.candidates {
        write!(
            out,
            "candidate {:<10} {} groups, predicted {:.3} ms",
            c.name,
            c.groups.len(),
            c.predicted_us as f64 / 1e3
        )?;
        if let Some(m) = c.measured_us {
            write!(out, ", measured {:.3} ms", m as f64 / 1e3)?;
        }
        writeln!(out)?;
    }
    if let Some(i) = merged {
        writeln!(
            out,
            "wild card: groups {} and {} of the extracted FLC merged",
            i,
            i + 1
        )?;
    }
    let one = table.cost(0, ir.stages.len() - 1, 1);
    if one.is_finite() {
        writeln!(
            out,
            "whole model on the best single device: {:.3} ms predicted ({:.2}x)",
            one.us() / 1e3,
            one.us() / flc.cost.us()
        )?;
    }
    writeln!(out, "chosen: {} ({})", chosen.name, plan.reason)?;
    Ok(out)
}

/// `3..7`, or `3` for a one-stage group.
pub(crate) fn group_label(g: &legion_plan::PlanGroup) -> String {
    if g.first == g.last {
        g.first.index().to_string()
    } else {
        format!("{}..{}", g.first.index(), g.last.index())
    }
}

pub(crate) fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('~');
        t
    }
}
