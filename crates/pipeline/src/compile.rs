//! Compile: cost every candidate group, search the fused-layer configuration, add its
//! Wild Card, emit the candidates and choose one.

use crate::passes::{Dump, Pass, PassTimes};
use crate::{BadInput, measure_in_rounds};
use anyhow::{Context, Result, ensure};
use legion_codegen::{Chosen, candidate, plan, predict_programs};
use legion_cost::{CostModel, Predictor, Producers};
use legion_fusion::{
    Boards, CostTable, EggStats, Flc, FlcGroup, GroupCosts, Legality, Placement, WildCard, alike,
    balanced_flcs, search_egg, spread, wild_card,
};
use legion_ir::Ir;
use legion_partition::Group;
use legion_plan::network::StreamTimes;
use legion_plan::{Candidate, Cluster, Link, Party, Plan, Profile, ProfileMode, Transport};
use legion_profile::FssChoice;
use legion_runtime::Coordinator;
use legion_runtime::check::test_input;
use serde_json::json;
use std::fmt::Write;

/// How the fused-layer configuration is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    /// Legion: the e-graph search's extracted FLC (and its Wild Card, when asked for).
    Egg,
    /// Baseline: every stage its own group ([`Flc::no_fusion`]).
    NoFusion,
    /// Baseline: each run of splittable stages one group ([`Flc::one_block`]).
    OneBlock,
}

impl Search {
    /// The name of the candidate it finds.
    pub fn name(self) -> &'static str {
        match self {
            Search::Egg => "extracted",
            Search::NoFusion => "no-fusion",
            Search::OneBlock => "one-block",
        }
    }
}

/// What [`compile`] needs besides the model, profile and cluster.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    /// The predictor that costs groups (legion mode).
    pub predictor: Predictor,
    /// Costs predicted from a legion profile, or measured by an fss one.
    pub mode: ProfileMode,
    /// How the FLC is found.
    pub search: Search,
    /// Add the extracted FLC's Wild Card as a second candidate ([`Search::Egg`] only).
    pub wildcard: bool,
    /// The most stages a group may hold; `None` for no limit.
    pub max_group_len: Option<usize>,
    /// Timed runs per candidate when measuring them (after one warm-up round).
    pub runs: u32,
    /// How errors name the profile.
    pub profile_name: String,
    /// Passes whose result is dumped.
    pub dump_after: Vec<Pass>,
    /// Stop after this pass (no plan is made).
    pub stop_after: Option<Pass>,
    /// How candidates run when they are measured (the way `legion run` will run them).
    pub transport: Transport,
    /// Cut boards' strips so that the rows other boards read are computed first
    /// (programs transport only).
    pub sub_strips: bool,
    /// Split groups by rows only, as the paper does (no channel splits, no reductions
    /// combined across boards).
    pub rows_only: bool,
    /// Which FLCs of the search for a stream of frames join the candidates (programs
    /// on predicted costs, [`Search::Egg`] only).
    pub stream_flcs: StreamFlcs,
}

/// The FLCs searched for a stream of frames (`legion_fusion::balanced_flcs`) that join
/// a compile's candidates, as `balanced-k` (the k-th distinct one found). The latency
/// search costs a group as a step on its own, while boards running their programs start
/// a group's rows as their inputs arrive; an FLC that spreads the boards' work more
/// evenly can be faster on that timeline (docs/architecture.md, "FLCs for a stream").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFlcs {
    /// The search does not run.
    Off,
    /// From this many rounds, the one predicted fastest one frame at a time when it is
    /// faster than every other candidate (a latency compile).
    Faster(usize),
    /// Every distinct one from this many rounds, each also spread over alike boards
    /// as `balanced-k-spread` where that moves a group (`legion_fusion::spread`; a
    /// throughput compile predicts each in a stream).
    All(usize),
}

impl StreamFlcs {
    /// Rounds of the search (0 when off).
    pub fn rounds(self) -> usize {
        match self {
            StreamFlcs::Off => 0,
            StreamFlcs::Faster(rounds) | StreamFlcs::All(rounds) => rounds,
        }
    }
}

impl CompileOptions {
    /// Legion's defaults: the paper's predictor, the egg search with its Wild Card, 3
    /// runs per candidate, no dumps; with programs, the FLC searched for a stream when
    /// it is predicted faster.
    pub fn legion(profile_name: &str) -> CompileOptions {
        CompileOptions {
            predictor: Predictor::Legion,
            mode: ProfileMode::Legion,
            search: Search::Egg,
            wildcard: true,
            max_group_len: None,
            runs: 3,
            profile_name: profile_name.to_string(),
            dump_after: vec![],
            stop_after: None,
            transport: Transport::default(),
            sub_strips: true,
            rows_only: false,
            stream_flcs: StreamFlcs::Faster(crate::STREAM_ROUNDS),
        }
    }
}

/// What [`compile`] made.
#[derive(Debug)]
pub struct Compiled {
    /// The plan; `None` when compile stopped before choosing.
    pub plan: Option<Plan>,
    /// The FLC table, the candidates and the choice (empty when stopped).
    pub report: String,
    /// The dumps asked for, in pass order.
    pub dumps: Vec<Dump>,
}

/// The cost table of `ir` on `cluster`: predicted from a legion `profile` by
/// `options.predictor` (with programs, assuming `producers` made each group's inputs),
/// or measured by an fss one, under the cluster's memory limits and
/// `options.max_group_len`. Returns it and what costed it.
pub fn cost_table(
    ir: &Ir,
    profile: &Profile,
    cluster: &Cluster,
    options: &CompileOptions,
    producers: Producers,
) -> Result<(CostTable, String)> {
    let bad = |e: anyhow::Error| BadInput(format!("{}: {e:#}", options.profile_name));
    if profile.mode != options.mode {
        return Err(BadInput(format!(
            "{} was measured in {} mode; compiling in {} mode needs a profile from \
             `legion profile --mode {}`",
            options.profile_name, profile.mode, options.mode, options.mode
        ))
        .into());
    }
    match options.mode {
        ProfileMode::Legion => {
            let model = CostModel::new(ir, profile, options.transport)
                .map_err(bad)?
                .assuming(producers);
            let legality = Legality {
                max_group_len: options.max_group_len,
                rows_only: options.rows_only,
                ..Legality::of_cluster(cluster)
            };
            let table = CostTable::predicted(ir, &model, options.predictor, profile, &legality)?;
            Ok((table, options.predictor.to_string()))
        }
        ProfileMode::Fss => {
            let table = CostTable::measured(ir, profile).map_err(bad)?;
            Ok((table, "fss".to_string()))
        }
    }
}

/// The choices an fss profile measures: every entry of the cost table Legion searches
/// when it compiles with `options` from the legion profile `legion` (its boards in the
/// cluster's order), each group under each device option at the table's strips. The
/// measurements run through the hub, so `options` must too: a group measured on its
/// own is one hub step, its inputs from the coordinator and its outputs back.
pub fn fss_choices(
    ir: &Ir,
    legion: &Profile,
    cluster: &Cluster,
    options: &CompileOptions,
) -> Result<Vec<FssChoice>> {
    if options.transport != Transport::Hub {
        return Err(BadInput(format!(
            "fss measures each group as one step through the hub, so the plans it is \
             compared with must be costed for the hub too (not {})",
            options.transport
        ))
        .into());
    }
    let options = CompileOptions {
        mode: ProfileMode::Legion,
        ..options.clone()
    };
    let (table, _) = cost_table(ir, legion, cluster, &options, Producers::SameShares)?;
    Ok(table
        .entries()
        .into_iter()
        .map(|(choice, entry)| FssChoice {
            group: Group::new(choice.first, choice.last),
            strips: entry.devices.iter().map(|d| (d.device, d.strip)).collect(),
            option: choice.devices,
            whole: entry.whole,
            channels: entry.channels,
        })
        .collect())
}

/// The links of `candidate`'s parties, one per program: the coordinator's at the
/// profile's rate, each board's as fitted to its probes.
fn program_links(model: &CostModel, profile: &Profile, candidate: &Candidate) -> Result<Vec<Link>> {
    candidate
        .programs
        .iter()
        .map(|p| match &p.party {
            Party::Coordinator => Ok(Link {
                mbps: profile.coordinator_mbps,
                latency_ms: 0.0,
            }),
            Party::Device(name) => profile
                .device_id(name)
                .map(|d| model.link(d))
                .with_context(|| format!("the plan runs on {name}, which is not in the profile")),
        })
        .collect()
}

/// The predicted stream of `frames` frames through `candidate`'s programs, `depth` in
/// flight: its tiles' predicted compute and the profile's links
/// ([`legion_codegen::predict_stream`]).
pub fn predict_stream(
    ir: &Ir,
    profile: &Profile,
    candidate: &Candidate,
    frames: usize,
    depth: usize,
) -> Result<StreamTimes> {
    let model = CostModel::new(ir, profile, Transport::Programs)?;
    let links = program_links(&model, profile, candidate)?;
    legion_codegen::predict_stream(ir, candidate, &links, frames, depth)
}

/// One search of a cost table: the assumption the table was costed under, the table,
/// what costed it, the FLC found and the e-graph's statistics.
struct Searched {
    producers: Producers,
    table: CostTable,
    costed_by: String,
    flc: Flc,
    stats: Option<EggStats>,
}

/// Of the searches (one per input assumption), keeps the FLC predicted fastest on the
/// programs' timeline (`build` places and predicts one), or the whole model on the best
/// board when that is predicted faster still; returns it and the other search's FLC
/// when it differs, which stays a candidate (predictions on small strips can miss).
fn keep_fastest(
    ir: &Ir,
    mut searched: Vec<Searched>,
    build: &dyn Fn(&CostTable, &Flc, &str) -> Result<Candidate>,
    times: &mut PassTimes,
) -> Result<(Searched, Option<Searched>)> {
    if searched.len() < 2 {
        return Ok((searched.remove(0), None));
    }
    // Choosing the FLC is the fusion pass's, though it places and predicts them.
    let predicted = times.time("fusion", || {
        searched
            .iter()
            .map(|s| build(&s.table, &s.flc, "").map(|c| c.predicted_us))
            .collect::<Result<Vec<u64>>>()
    })?;
    let best = (0..predicted.len())
        .min_by_key(|&i| predicted[i])
        .expect("two searches");
    let each: Vec<String> = searched
        .iter()
        .zip(&predicted)
        .map(|(s, us)| format!("{} {:.3} ms", s.producers, *us as f64 / 1e3))
        .collect();
    times.note(format!(
        "FLCs searched with inputs made by {}; kept {}",
        each.join(", "),
        searched[best].producers
    ));
    let mut kept = searched.remove(best);
    let other = searched.remove(0);
    let n = ir.stages.len();
    let one = Flc::new(&kept.table, vec![FlcGroup::rows(0, n - 1, 1)]);
    if one.cost.is_finite() && build(&kept.table, &one, "")?.predicted_us < predicted[best] {
        times.note("kept the whole model on one board: predicted faster than the FLCs".into());
        kept.flc = one;
    }
    let other = (other.flc.groups != kept.flc.groups).then_some(other);
    Ok((kept, other))
}

/// Runs the compile passes: cost (with partition), fusion, codegen, then the choice of
/// a candidate: by measuring them on `live` when given, else by prediction. Times each
/// pass into `times`; debug builds validate the FLC and the plan between passes.
pub fn compile(
    ir: &Ir,
    profile: &Profile,
    cluster: &Cluster,
    options: &CompileOptions,
    live: Option<(&Coordinator, &tokio::runtime::Runtime)>,
    times: &mut PassTimes,
) -> Result<Compiled> {
    ensure!(
        options.runs > 0,
        "measuring candidates takes at least 1 run"
    );
    let names: Vec<String> = profile.devices.iter().map(|d| d.name.clone()).collect();
    let mut dumps = vec![];
    let stopped = |dumps| Compiled {
        plan: None,
        report: String::new(),
        dumps,
    };

    // Boards running their programs on predicted costs: each group is costed under
    // both assumptions about who made its inputs, each table searched, and the FLC
    // predicted faster on the programs' timeline kept; its groups are placed over what
    // the boards hold.
    let predicted_programs =
        options.mode == ProfileMode::Legion && options.transport == Transport::Programs;
    let assumptions: &[Producers] = if predicted_programs {
        &Producers::ALL
    } else {
        &[Producers::SameShares]
    };

    let mut tables = vec![];
    for &producers in assumptions {
        let (table, costed_by) = times.time("cost", || {
            cost_table(ir, profile, cluster, options, producers)
        })?;
        times.note(format!("{} legal choices", table.len()));
        tables.push((producers, table, costed_by));
    }
    // The partition and cost dumps show the kept table (the first, when compile stops
    // before the searches).
    let table_dumps = |dumps: &mut Vec<Dump>, producers: Producers, table: &CostTable| {
        for pass in [Pass::Partition, Pass::Cost] {
            if options.dump_after.contains(&pass) {
                let mut dump = dump_table(pass, ir, table, &names);
                if predicted_programs {
                    dump.text =
                        dump.text
                            .replacen('\n', &format!("; inputs made by {producers}\n"), 1);
                }
                dumps.push(dump);
            }
        }
    };
    if matches!(options.stop_after, Some(Pass::Partition | Pass::Cost)) {
        table_dumps(&mut dumps, tables[0].0, &tables[0].1);
        return Ok(stopped(dumps));
    }
    let programs = predicted_programs
        .then(|| CostModel::new(ir, profile, options.transport))
        .transpose()?;
    let sub_strips = options.sub_strips && options.transport == Transport::Programs;
    let legality = Legality {
        max_group_len: options.max_group_len,
        rows_only: options.rows_only,
        ..Legality::of_cluster(cluster)
    };
    let build_on = |table: &CostTable, flc: &Flc, boards: Option<&Boards>, name: &str| {
        let placed = match &programs {
            Some(model) => {
                Placement::holding(ir, model, options.predictor, &legality, table, flc, boards)?
            }
            None => Placement::from_table(table, flc)?,
        };
        let mut c = candidate(ir, &placed, &names, name, sub_strips)?;
        if let Some(model) = &programs {
            let links = program_links(model, profile, &c)?;
            predict_programs(ir, &mut c, &links)?;
        }
        Ok::<_, anyhow::Error>(c)
    };
    let build = |table: &CostTable, flc: &Flc, name: &str| build_on(table, flc, None, name);

    let mut searched = vec![];
    for (producers, table, costed_by) in tables {
        let (flc, stats) = times.time("fusion", || match options.search {
            Search::Egg => search_egg(&table).map(|(flc, stats)| (flc, Some(stats))),
            Search::NoFusion => Ok((Flc::no_fusion(ir, &table), None)),
            Search::OneBlock => Ok((Flc::one_block(ir, &table), None)),
        })?;
        if cfg!(debug_assertions) {
            ensure!(flc.is_valid(&table), "fusion made an invalid FLC: {flc}");
        }
        let inputs = if predicted_programs {
            format!(" (inputs made by {producers})")
        } else {
            String::new()
        };
        match &stats {
            Some(s) => times.note(format!(
                "egg{inputs}: {} iterations, {} e-nodes, {} e-classes",
                s.iterations, s.nodes, s.classes
            )),
            None => times.note(format!("{} baseline{inputs}", options.search.name())),
        }
        searched.push(Searched {
            producers,
            table,
            costed_by,
            flc,
            stats,
        });
    }
    let (kept, runner_up) = keep_fastest(ir, searched, &build, times)?;
    let Searched {
        producers,
        table,
        costed_by,
        flc,
        stats,
    } = kept;
    table_dumps(&mut dumps, producers, &table);
    let wild = (options.wildcard && options.search == Search::Egg)
        .then(|| wild_card(&table, &flc))
        .flatten();
    // A baseline stays the paper's: its FLC alone.
    let rounds = match options.search {
        Search::Egg => options.stream_flcs.rounds(),
        Search::NoFusion | Search::OneBlock => 0,
    };
    let streamed = match predicted_programs && rounds > 0 {
        true => {
            let found = times.time("fusion", || balanced_flcs(&table, rounds))?;
            times.note(format!(
                "search for a stream: {} distinct FLCs in {rounds} rounds",
                found.len()
            ));
            found
        }
        false => vec![],
    };
    let streamed: Vec<Flc> = streamed
        .into_iter()
        .filter(|b| {
            b.groups != flc.groups && wild.as_ref().is_none_or(|w| w.flc.groups != b.groups)
        })
        .collect();
    if options.dump_after.contains(&Pass::Fusion) {
        dumps.push(dump_fusion(&flc, stats.as_ref(), wild.as_ref()));
    }
    if options.stop_after == Some(Pass::Fusion) {
        return Ok(stopped(dumps));
    }

    let mut candidates = times.time("codegen", || {
        let mut c = vec![build(&table, &flc, options.search.name())?];
        if let Some(w) = &wild {
            c.push(build(&table, &w.flc, "wild-card")?);
        }
        if let Some(other) = &runner_up {
            let name = format!(
                "{}-{}",
                options.search.name(),
                other.producers.to_string().replace(' ', "-")
            );
            c.push(build(&other.table, &other.flc, &name)?);
        }
        let fastest_before = c.iter().map(|c| c.predicted_us).min();
        let mut balanced = vec![];
        let alike = alike(profile);
        for (k, b) in streamed.iter().enumerate() {
            balanced.push(build(&table, b, &format!("balanced-{}", k + 1))?);
            if let (StreamFlcs::All(_), Some(boards)) =
                (options.stream_flcs, spread(&table, b, &alike))
            {
                let name = format!("balanced-{}-spread", k + 1);
                balanced.push(build_on(&table, b, Some(&boards), &name)?);
            }
        }
        if let StreamFlcs::Faster(_) = options.stream_flcs {
            balanced.sort_by_key(|b| b.predicted_us);
            balanced.truncate(1);
            balanced.retain(|b| fastest_before.is_none_or(|f| b.predicted_us < f));
        }
        c.extend(balanced);
        Ok::<_, anyhow::Error>(c)
    })?;
    if options.dump_after.contains(&Pass::Codegen) {
        dumps.push(dump_codegen(&candidates)?);
    }
    if options.stop_after == Some(Pass::Codegen) {
        return Ok(stopped(dumps));
    }
    // A board holds every tile it runs at once; the table checked each tile alone.
    let over: Vec<String> = candidates
        .iter()
        .filter_map(|c| over_memory(ir, cluster, c).map(|why| format!("{}: {why}", c.name)))
        .collect();
    candidates.retain(|c| over_memory(ir, cluster, c).is_none());
    if candidates.is_empty() {
        let strips = match sub_strips {
            true => {
                ", or compile with --no-sub-strips (each of a board's sub-strips of a \
                     group holds the group's weights again)"
            }
            false => "",
        };
        return Err(BadInput(format!(
            "no candidate fits the boards' memory ({}); give those boards more memory_mb \
             in the cluster file, add boards{strips}",
            over.join("; ")
        ))
        .into());
    }
    if !over.is_empty() {
        times.note(format!("dropped {}", over.join("; ")));
    }

    let chosen = match (live, candidates.len()) {
        (Some((coord, rt)), 2..) => {
            let c = times.time("measure", || {
                rt.block_on(measure(
                    coord,
                    ir,
                    &mut candidates,
                    options.runs,
                    options.transport,
                ))
            })?;
            times.note(format!("{} runs per candidate, in rounds", options.runs));
            c
        }
        (_, 2..) => Chosen {
            index: (0..candidates.len())
                .min_by_key(|&k| candidates[k].predicted_us)
                .expect("candidates"),
            reason: "predicted fastest (no cluster to measure on; pass --measure to run \
                     the candidates)"
                .into(),
        },
        _ => Chosen {
            index: 0,
            reason: if options.search != Search::Egg {
                format!(
                    "the only candidate (the {} baseline)",
                    options.search.name()
                )
            } else if !options.wildcard {
                "the only candidate (--no-wildcard)".into()
            } else if flc.groups.len() == 1 {
                "the only candidate (one group: nothing for Wild Card to merge)".into()
            } else {
                "the only candidate (no two adjacent groups can merge legally)".into()
            },
        },
    };
    let plan = plan(ir, &names, &costed_by, candidates, chosen);
    if cfg!(debug_assertions) {
        legion_codegen::validate(&plan, ir, Some(&names))?;
    }
    let mut report = report(ir, &plan, &table, wild.map(|w| w.merged))?;
    report += &memory_report(ir, cluster, plan.chosen())?;
    Ok(Compiled {
        plan: Some(plan),
        report,
        dumps,
    })
}

/// Why `candidate` does not fit `cluster`: the first board whose tiles together hold
/// more weights than its `memory_mb`.
fn over_memory(ir: &Ir, cluster: &Cluster, candidate: &Candidate) -> Option<String> {
    let held = legion_partition::weights_per_board(ir, candidate);
    cluster.devices.iter().find_map(|d| {
        let limit = d.memory_mb?;
        let bytes = *held.get(&d.name)?;
        (bytes > limit << 20).then(|| {
            format!(
                "{}'s tiles hold {} MiB of weights, above its memory_mb {limit}",
                d.name,
                bytes >> 20
            )
        })
    })
}

/// Runs the candidates in `runs` rounds (after a warm-up round) and chooses the fastest
/// median (the first on a tie); records each candidate's median in `measured_us`.
async fn measure(
    coord: &Coordinator,
    ir: &Ir,
    candidates: &mut [Candidate],
    runs: u32,
    transport: Transport,
) -> Result<Chosen> {
    let input = test_input(&ir.input.shape);
    let all: Vec<(&Candidate, Transport)> = candidates.iter().map(|c| (c, transport)).collect();
    let measured = measure_in_rounds(coord, ir, &input, &[], &all, runs).await?;
    for (c, k) in candidates.iter_mut().zip(0..) {
        let median = measured.candidate_median(k);
        c.measured_us = Some(median);
        eprintln!(
            "candidate {}: {:.3} ms measured on the {} clock (median of {runs}), {:.3} ms predicted",
            c.name,
            median as f64 / 1e3,
            coord.clock(),
            c.predicted_us as f64 / 1e3
        );
    }
    let index = (0..candidates.len())
        .min_by_key(|&k| candidates[k].measured_us)
        .expect("candidates");
    Ok(Chosen {
        index,
        reason: format!(
            "measured fastest on the {} clock (median of {runs} runs each, in rounds)",
            coord.clock()
        ),
    })
}

/// `first .. last` stage names of a group.
fn stage_names(ir: &Ir, first: usize, last: usize) -> String {
    if first == last {
        ir.stages[first].name.clone()
    } else {
        format!("{} .. {}", ir.stages[first].name, ir.stages[last].name)
    }
}

/// The partition or cost pass's dump: every legal choice in the table, with its strips
/// (partition) or its predicted times (cost).
fn dump_table(pass: Pass, ir: &Ir, table: &CostTable, names: &[String]) -> Dump {
    let ms = |us: f64| us / 1e3;
    let mut text = match pass {
        Pass::Partition => format!(
            "partition: {} legal choices (group x devices) and each device's strip of the \
             group's last output rows\n",
            table.len()
        ),
        _ => format!(
            "cost: {} legal choices (group x devices), predicted ms; per device: in, \
             compute, out ms\n",
            table.len()
        ),
    };
    let mut json = vec![];
    for (choice, entry) in table.entries() {
        let label = format!("{choice}");
        let stages = stage_names(ir, choice.first, choice.last);
        let parts: Vec<String> = entry
            .devices
            .iter()
            .map(|d| match pass {
                Pass::Partition => format!("{} {}", names[d.device.index()], d.strip),
                _ => format!(
                    "{} {:.3}/{:.3}/{:.3}",
                    names[d.device.index()],
                    ms(d.in_us),
                    ms(d.compute_us),
                    ms(d.out_us)
                ),
            })
            .collect();
        let how = if entry.whole { "whole" } else { "split" };
        let _ = match pass {
            Pass::Partition => writeln!(
                text,
                "  {label:<12} {stages:<32} {how:<5} {}",
                parts.join("  ")
            ),
            _ => writeln!(
                text,
                "  {label:<12} {:>10.3}  {stages:<32} {}",
                ms(entry.cost.us()),
                parts.join("  ")
            ),
        };
        let devices: Vec<serde_json::Value> = entry
            .devices
            .iter()
            .map(|d| match pass {
                Pass::Partition => json!({"device": names[d.device.index()], "strip": d.strip}),
                _ => json!({
                    "device": names[d.device.index()],
                    "strip": d.strip,
                    "in_us": d.in_us,
                    "compute_us": d.compute_us,
                    "out_us": d.out_us,
                }),
            })
            .collect();
        let mut value = json!({
            "first": choice.first,
            "last": choice.last,
            "devices": choice.devices,
            "whole": entry.whole,
            "tiles": devices,
        });
        if pass == Pass::Cost {
            value["cost_us"] = json!(entry.cost.us());
        }
        json.push(value);
    }
    Dump {
        pass,
        text,
        json: serde_json::Value::Array(json),
    }
}

/// The fusion pass's dump: the FLC it found, the e-graph's size, and the Wild Card.
fn dump_fusion(flc: &Flc, stats: Option<&EggStats>, wild: Option<&WildCard>) -> Dump {
    let groups = |flc: &Flc| -> serde_json::Value {
        flc.groups
            .iter()
            .map(|g| json!({"first": g.first, "last": g.last, "devices": g.devices}))
            .collect()
    };
    let mut text = format!("fusion: FLC {flc}\n");
    if let Some(s) = stats {
        let _ = writeln!(
            text,
            "  egg: {} iterations, {} e-nodes, {} e-classes",
            s.iterations, s.nodes, s.classes
        );
    }
    match wild {
        Some(w) => {
            let _ = writeln!(
                text,
                "  wild card: groups {} and {} merged: {}",
                w.merged,
                w.merged + 1,
                w.flc
            );
        }
        None => text += "  wild card: none\n",
    }
    Dump {
        pass: Pass::Fusion,
        text,
        json: json!({
            "groups": groups(flc),
            "cost_us": flc.cost.us(),
            "egg": stats.map(|s| json!({
                "iterations": s.iterations, "nodes": s.nodes, "classes": s.classes,
            })),
            "wild_card": wild.map(|w| json!({
                "merged": w.merged, "groups": groups(&w.flc), "cost_us": w.flc.cost.us(),
            })),
        }),
    }
}

/// The codegen pass's dump: every candidate's groups and tiles.
fn dump_codegen(candidates: &[Candidate]) -> Result<Dump> {
    let mut text =
        String::from("codegen: candidates, each group's tiles (device, strip, halo rows)\n");
    for c in candidates {
        writeln!(
            text,
            "  candidate {}: {} groups, predicted {:.3} ms",
            c.name,
            c.groups.len(),
            c.predicted_us as f64 / 1e3
        )?;
        for g in &c.groups {
            let tiles: Vec<String> = g
                .tiles
                .iter()
                .map(|t| format!("{} {} (+{})", t.device, t.strip, t.halo_rows))
                .collect();
            writeln!(text, "    {:<8} {}", group_label(g), tiles.join("  "))?;
        }
    }
    Ok(Dump {
        pass: Pass::Codegen,
        text,
        json: serde_json::to_value(candidates)?,
    })
}

/// The FLC table, the candidates and the choice.
fn report(ir: &Ir, plan: &Plan, table: &CostTable, merged: Option<usize>) -> Result<String> {
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
        let names = stage_names(ir, g.first.index(), g.last.index());
        let devices = g.devices();
        writeln!(
            out,
            "{:<8} {:<32} {:<6} {:<40} {:>12.3}",
            group_label(g),
            truncate(&names, 32),
            match (g.split, g.channels) {
                (true, true) => "chan",
                (true, false) => "yes",
                (false, _) => "no",
            },
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
    let one = table.cost(FlcGroup::rows(0, ir.stages.len() - 1, 1));
    if one.is_finite() {
        writeln!(
            out,
            "whole model on the best single device: {:.3} ms predicted ({:.2}x)",
            one.us() / 1e3,
            one.us() / chosen.predicted_us as f64
        )?;
    }
    writeln!(out, "chosen: {} ({})", chosen.name, plan.reason)?;
    Ok(out)
}

/// Where the cluster gives boards `memory_mb`: each board's tiles' weights against it,
/// and the stages that fit no board whole and how the plan splits them.
fn memory_report(ir: &Ir, cluster: &Cluster, chosen: &Candidate) -> Result<String> {
    let mut out = String::new();
    let limits: Vec<(&str, u64)> = cluster
        .devices
        .iter()
        .filter_map(|d| Some((d.name.as_str(), d.memory_mb?)))
        .collect();
    let Some(&largest) = limits.iter().map(|(_, mb)| mb).max() else {
        return Ok(out);
    };
    let held = legion_partition::weights_per_board(ir, chosen);
    let boards: Vec<String> = limits
        .iter()
        .map(|(name, mb)| {
            let weights = held.get(*name).copied().unwrap_or(0) >> 20;
            format!("{name} {weights} of {mb} MiB")
        })
        .collect();
    writeln!(
        out,
        "memory, tiles' weights per board: {}",
        boards.join(", ")
    )?;
    let unlimited = cluster.devices.iter().any(|d| d.memory_mb.is_none());
    for s in ir.stages.iter().filter(|_| !unlimited) {
        if s.weight_bytes <= largest << 20 {
            continue;
        }
        let how = match chosen
            .groups
            .iter()
            .find(|g| g.first <= s.id && s.id <= g.last)
        {
            Some(g) if g.channels => format!("split by channels over {}", g.devices().len()),
            _ => "not split by channels".into(),
        };
        writeln!(
            out,
            "{} ({} MiB of weights) fits no board whole: {how}",
            s.name,
            s.weight_bytes >> 20
        )?;
    }
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

/// `s` cut to `n` characters, the last one `~` when cut.
pub(crate) fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('~');
        t
    }
}
