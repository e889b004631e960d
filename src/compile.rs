//! `legion compile`: profile (unless given a profile), then the compile passes of
//! [`legion_pipeline::compile`], and write the plan (JSON).

use crate::{BadInput, ModelArgs, predict::load_profile};
use anyhow::{Context, Result};
use legion_cost::Predictor;
use legion_pipeline::{CompileOptions, Pass, PassTimes, Search, StreamFlcs};
use legion_plan::{Cluster, Profile, ProfileMode, Transport};
use legion_profile::ProfileOptions;
use std::path::PathBuf;

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
    /// egg: Legion's search; no-fusion or one-block: the paper's baselines, costed the
    /// same way.
    #[arg(long, value_enum, default_value_t = SearchArg::Egg)]
    search: SearchArg,
    /// Emit only the extracted FLC, without its Wild Card.
    #[arg(long)]
    no_wildcard: bool,
    /// Run the candidates on the cluster and keep the fastest, even with --profile
    /// (the cluster's workers must be running). Always done when compile profiles.
    #[arg(long)]
    measure: bool,
    /// Runs per candidate when measuring (the median is compared).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// How the plan will run, which the costs follow and candidates are measured on:
    /// programs (boards pass rows to each other) or hub (every strip through the
    /// coordinator).
    #[arg(long, default_value = "programs", value_parser = parse_transport)]
    transport: Transport,
    /// Run each board's strip of a group as one tile, instead of computing first the
    /// rows other boards read (sub-strips; programs transport only).
    #[arg(long)]
    no_sub_strips: bool,
    /// Split groups by rows only, as the paper does: never by a stage's output
    /// channels or neurons, and every reduction over rows (a global pool) a barrier.
    #[arg(long)]
    rows_only: bool,
    /// Print what a pass attached: partition, cost, fusion or codegen (repeatable).
    #[arg(long, value_parser = parse_pass)]
    dump_after: Vec<Pass>,
    /// Print the dumps as JSON (one document per line) instead of text.
    #[arg(long)]
    json: bool,
    /// Stop after this pass (partition, cost, fusion or codegen); no plan is written.
    #[arg(long, value_parser = parse_pass)]
    stop_after: Option<Pass>,
    /// latency: one plan over the boards, for the fastest inference; throughput: the
    /// cluster cut into sub-clusters with a plan each, each on its own frames with up
    /// to 4 in flight, for the most frames per second within --latency-budget (a
    /// serving plan, for `legion serve`; plans by prediction).
    #[arg(long, value_enum, default_value_t = Objective::Latency)]
    objective: Objective,
    /// With --objective throughput: the longest a frame may take on the predicted
    /// clock (in its stream, frames ahead of it included), in milliseconds (500) or as
    /// a multiple of the best plan over every board (1.5x).
    #[arg(long, default_value = "2x")]
    latency_budget: legion_pipeline::LatencyBudget,
    /// Rounds of the search for FLCs that suit a stream (the busiest board's work, not
    /// the sum of the groups' latencies), boards running their programs. With
    /// --objective throughput each subset's plan carries the distinct FLCs found as
    /// candidates; with latency, the one predicted fastest joins the candidates when it
    /// beats them. 0 keeps the latency search's candidates alone.
    #[arg(long, default_value_t = legion_pipeline::STREAM_ROUNDS)]
    stream_rounds: usize,
    /// Where to write the plan.
    #[arg(short, long, required_unless_present = "stop_after")]
    output: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Objective {
    Latency,
    Throughput,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Mode {
    Legion,
    Fss,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum SearchArg {
    Egg,
    NoFusion,
    OneBlock,
}

fn parse_pass(s: &str) -> Result<Pass, String> {
    s.parse()
}

pub fn run(args: &Args) -> Result<()> {
    let predictor: Predictor = args.predictor.parse().map_err(BadInput)?;
    if args.runs == 0 {
        return Err(BadInput("--runs must be at least 1".into()).into());
    }
    let mode = match args.mode {
        Mode::Legion => ProfileMode::Legion,
        Mode::Fss => ProfileMode::Fss,
    };
    if mode == ProfileMode::Fss && args.profile.is_none() {
        return Err(BadInput(
            "--mode fss compiles from an fss profile: measure one with `legion profile --mode \
             fss --legion-profile LEGION.json` and give it with --profile"
                .into(),
        )
        .into());
    }
    let throughput = args.objective == Objective::Throughput;
    if throughput && (args.measure || args.stop_after.is_some() || !args.dump_after.is_empty()) {
        return Err(BadInput(
            "--objective throughput compiles a plan per subset of the boards by prediction; \
             --measure, --stop-after and --dump-after apply to one plan (--objective latency)"
                .into(),
        )
        .into());
    }
    let cluster = Cluster::load(&args.cluster)?;
    let mut times = PassTimes::default();
    let ir = times.time("import", || args.model.import())?;
    let live = args.stop_after.is_none() && (args.profile.is_none() || args.measure);
    let rt = tokio::runtime::Runtime::new()?;
    let connect_now = || rt.block_on(args.model.connect(&cluster, &args.cluster, &ir));
    let (coord, profile): (_, Profile) = match &args.profile {
        Some(path) => {
            let profile = load_profile(path, &cluster, &args.cluster)?;
            (live.then(connect_now).transpose()?, profile)
        }
        None => {
            let coord = connect_now()?;
            let opts = ProfileOptions {
                mode,
                runs: 3,
                progress: true,
                ..ProfileOptions::default()
            };
            eprintln!("no --profile given: profiling in {mode} mode first");
            let p = times.time("profile", || {
                rt.block_on(legion_pipeline::profile(&coord, &ir, &opts))
            })?;
            times.note(format!(
                "{:.3} s on the {} clock",
                p.profiling_us as f64 / 1e6,
                p.clock
            ));
            (Some(coord).filter(|_| live), p)
        }
    };
    let options = CompileOptions {
        predictor,
        mode,
        search: match args.search {
            SearchArg::Egg => Search::Egg,
            SearchArg::NoFusion => Search::NoFusion,
            SearchArg::OneBlock => Search::OneBlock,
        },
        wildcard: !args.no_wildcard,
        max_group_len: None,
        runs: args.runs,
        profile_name: args
            .profile
            .as_ref()
            .map_or("the profile".to_string(), |p| p.display().to_string()),
        dump_after: args.dump_after.clone(),
        stop_after: args.stop_after,
        transport: args.transport,
        sub_strips: !args.no_sub_strips,
        rows_only: args.rows_only,
        stream_flcs: match (args.stream_rounds, throughput) {
            (0, _) => StreamFlcs::Off,
            (rounds, true) => StreamFlcs::All(rounds),
            (rounds, false) => StreamFlcs::Faster(rounds),
        },
    };
    if throughput {
        let output = args.output.as_ref().expect("required without --stop-after");
        return compile_serving(
            &ir,
            &profile,
            &cluster,
            &options,
            args.latency_budget,
            output,
        );
    }
    let live = coord.as_ref().map(|c| (c, &rt));
    let compiled = legion_pipeline::compile(&ir, &profile, &cluster, &options, live, &mut times)?;
    for dump in &compiled.dumps {
        if args.json {
            println!(
                "{}",
                serde_json::json!({"pass": dump.pass.name(), "dump": dump.json})
            );
        } else {
            print!("{}", dump.text);
        }
    }
    match (&compiled.plan, &args.output) {
        (Some(plan), Some(output)) => {
            std::fs::write(output, plan.to_json())
                .with_context(|| format!("writing {}", output.display()))?;
            print!("{}{}", compiled.report, times.report());
            println!("plan written to {}", output.display());
        }
        _ => {
            let pass = args
                .stop_after
                .expect("compile stops early only when asked");
            eprint!("{}", times.report());
            eprintln!("stopped after {pass}: no plan written");
        }
    }
    Ok(())
}

/// `legion compile --objective throughput`: a plan for every subset of the boards, the
/// best cut into sub-clusters, written as a serving plan.
fn compile_serving(
    ir: &legion_ir::Ir,
    profile: &Profile,
    cluster: &Cluster,
    options: &CompileOptions,
    budget: legion_pipeline::LatencyBudget,
    output: &std::path::Path,
) -> Result<()> {
    let subsets = (1u64 << cluster.devices.len().min(63)) - 1;
    let bar = indicatif::ProgressBar::new(subsets);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("sub-clusters");
    let plan =
        legion_pipeline::compile_serving(ir, profile, cluster, options, budget, |done, _| {
            bar.set_position(done as u64)
        });
    bar.finish_and_clear();
    let plan = plan?;
    std::fs::write(output, serde_json::to_string_pretty(&plan)? + "\n")
        .with_context(|| format!("writing {}", output.display()))?;
    print!("{}", crate::serve::describe(&plan));
    println!("serving plan written to {}", output.display());
    Ok(())
}

/// Parses `--transport` (a clap value parser).
pub(crate) fn parse_transport(s: &str) -> Result<Transport, String> {
    s.parse()
}
