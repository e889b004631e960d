//! `legion compile`: profile (unless given a profile), then the compile passes of
//! [`legion_pipeline::compile`], and write the plan (JSON).

use crate::{BadInput, ModelArgs, predict::load_profile};
use anyhow::{Context, Result};
use legion_cost::Predictor;
use legion_pipeline::{CompileOptions, Pass, PassTimes, Search};
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
    /// Where to write the plan.
    #[arg(short, long, required_unless_present = "stop_after")]
    output: Option<PathBuf>,
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
                max_group_len: None,
                progress: true,
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
    };
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

/// Parses `--transport` (a clap value parser).
pub(crate) fn parse_transport(s: &str) -> Result<Transport, String> {
    s.parse()
}
