//! The per-party programs codegen derives, run step by step on a simulator of rows and
//! channels: for random FLCs and shares of the test models (residual adds, YOLO's
//! passthrough, barriers, depthwise and squeeze-excitation blocks, groups split by rows
//! or by their last stage's channels), every program runs to its end
//! with no party waiting forever, every tile finds the rows it reads, the coordinator
//! moves only the model's input and outputs and ends with every output whole, every
//! device frees everything it held, and no inference moves more bytes than through the
//! hub; with and without sub-strips.

use legion_codegen::{cut_edges, programs, traffic};
use legion_ir::{Ir, Rows, StageId, TensorRef, import};
use legion_partition::{
    Group, channel_tile, check_channel_group, check_group, strips_from_weights, tile, whole_group,
};
use legion_plan::{Candidate, Party, PlanGroup, PlanTile, Program, Step};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};

const DEVICES: usize = 4;

fn names() -> Vec<String> {
    (0..DEVICES).map(|d| format!("board-{d}")).collect()
}

fn ir(model: &str) -> Ir {
    import(&legion_models::test_model(model).unwrap(), None).unwrap()
}

/// A random FLC of `ir` from `picks`: per group, its length, whether to split it (when
/// legal) and whether by its last stage's channels (when legal), over which devices
/// (first `k` of a rotation) and the strip weights.
fn groups(ir: &Ir, picks: &[Pick]) -> Vec<PlanGroup> {
    let names = names();
    let n = ir.stages.len();
    let mut groups = vec![];
    let mut first = 0;
    for (len, split, by_channels, k, rot, weights) in picks.iter().cycle() {
        if first == n {
            break;
        }
        let last = (first + len).min(n - 1);
        let group = Group::new(first, last);
        let devices: Vec<usize> = (0..*k).map(|i| (rot + i) % DEVICES).collect();
        let w: Vec<f64> = devices.iter().map(|&d| 1.0 + weights[d] as f64).collect();
        if *split && *by_channels && check_channel_group(ir, first, last).is_ok() {
            let count = ir.stage(group.last).channels.unwrap().count;
            let tiles = strips_from_weights(count, &w)
                .into_iter()
                .enumerate()
                .filter(|(_, c)| !c.is_empty())
                .map(|(slot, c)| {
                    PlanTile::unpredicted(&names[devices[slot]], c, channel_tile(ir, group, c))
                })
                .collect();
            groups.push(PlanGroup {
                first: group.first,
                last: group.last,
                split: true,
                channels: true,
                predicted_us: 0,
                tiles,
            });
            first = last + 1;
            continue;
        }
        let tiles: Vec<PlanTile> = if *split && check_group(ir, first, last).is_ok() {
            let height = ir.stage(group.last).output.height().unwrap();
            let tiling = tile(ir, group, &strips_from_weights(height, &w)).unwrap();
            tiling
                .tiles
                .iter()
                .map(|t| PlanTile::unpredicted(&names[devices[t.slot]], t.strip, t.spec()))
                .collect()
        } else {
            let rows = Rows::new(0, ir.stage(group.last).output.height().unwrap_or(0));
            vec![PlanTile::unpredicted(
                &names[devices[0]],
                rows,
                whole_group(ir, group),
            )]
        };
        groups.push(PlanGroup {
            first: group.first,
            last: group.last,
            split: tiles.len() > 1,
            channels: false,
            predicted_us: 0,
            tiles,
        });
        first = last + 1;
    }
    groups
}

/// Cells of a tensor held: (row index, or `usize::MAX` for a tensor without rows;
/// channel index, or 0 for a tensor not split by channels).
type Held = HashMap<TensorRef, HashSet<(usize, usize)>>;

/// The cells of `t` that `rows` (of `channels`, or all of them) stand for.
fn cells(ir: &Ir, t: TensorRef, rows: Rows, channels: Option<Rows>) -> Vec<(usize, usize)> {
    let rows: Vec<usize> = match ir.tensor(t).height() {
        None => vec![usize::MAX],
        Some(_) => rows.range().collect(),
    };
    let count = match t {
        TensorRef::Stage(s) => ir.stage(s).channels.map_or(1, |c| c.count),
        TensorRef::Input => 1,
    };
    let channels: Vec<usize> = channels.map_or(0..count, |c| c.range()).collect();
    rows.iter()
        .flat_map(|&r| channels.iter().map(move |&c| (r, c)))
        .collect()
}

/// Runs the programs until none can go on; fails on a step that cannot be right.
fn simulate(ir: &Ir, groups: &[PlanGroup], programs: &[Program]) -> Result<(), String> {
    let whole = |t: TensorRef| {
        cells(
            ir,
            t,
            Rows::new(0, ir.tensor(t).height().unwrap_or(0)),
            None,
        )
    };
    let mut held: Vec<Held> = vec![Held::new(); programs.len()];
    let coordinator = programs
        .iter()
        .position(|p| p.party == Party::Coordinator)
        .ok_or("no coordinator program")?;
    held[coordinator].insert(
        TensorRef::Input,
        whole(TensorRef::Input).into_iter().collect(),
    );
    let mut pc = vec![0; programs.len()];
    let mut in_flight: Vec<(Party, Party, TensorRef, Rows, Option<Rows>)> = vec![];
    let mut ran: Vec<(usize, usize)> = vec![];
    // Per party, the partial results it computed; partials sent and not yet combined.
    let mut own_partials: Vec<Vec<StageId>> = vec![vec![]; programs.len()];
    let mut partials_in_flight: Vec<(Party, Party, StageId)> = vec![];
    loop {
        let mut moved = false;
        for (p, program) in programs.iter().enumerate() {
            while let Some(step) = program.steps.get(pc[p]) {
                let me = &program.party;
                match step {
                    Step::Send {
                        tensor,
                        rows,
                        channels,
                        to,
                    } => {
                        let have = held[p].get(tensor).cloned().unwrap_or_default();
                        let sent = cells(ir, *tensor, *rows, *channels);
                        if !sent.iter().all(|c| have.contains(c)) {
                            return Err(format!(
                                "{me} sends {tensor:?} {rows} {channels:?} it does not hold"
                            ));
                        }
                        in_flight.push((me.clone(), to.clone(), *tensor, *rows, *channels));
                    }
                    Step::Receive {
                        tensor,
                        rows,
                        channels,
                        from,
                    } => {
                        let Some(k) = in_flight.iter().position(|m| {
                            (&m.0, &m.1, m.2, m.3, m.4) == (from, me, *tensor, *rows, *channels)
                        }) else {
                            break;
                        };
                        in_flight.remove(k);
                        let set = held[p].entry(*tensor).or_default();
                        for c in cells(ir, *tensor, *rows, *channels) {
                            if !set.insert(c) {
                                return Err(format!(
                                    "{me} receives cell {c:?} of {tensor:?} twice"
                                ));
                            }
                        }
                    }
                    Step::Run { group, tile, phase } => {
                        let Party::Device(name) = me else {
                            return Err("the coordinator runs a tile".into());
                        };
                        let t = groups[*group]
                            .tiles
                            .get(*tile)
                            .filter(|t| &t.device == name)
                            .ok_or(format!("{name} runs tile {tile} of group {group}, not its"))?;
                        let partials: Vec<StageId> = t.tile.partials().collect();
                        let spec = t
                            .tile
                            .phases(ir)
                            .get(*phase)
                            .ok_or(format!("{name} runs phase {phase} of group {group}"))?
                            .spec
                            .clone();
                        for input in &spec.inputs {
                            let have = held[p].get(&input.tensor).cloned().unwrap_or_default();
                            if !cells(ir, input.tensor, input.rows, None)
                                .iter()
                                .all(|c| have.contains(c))
                            {
                                return Err(format!(
                                    "{name} runs group {group} without rows {} of {:?}",
                                    input.rows, input.tensor
                                ));
                            }
                        }
                        for out in &spec.outputs {
                            let r = TensorRef::Stage(out.stage);
                            if partials.contains(&out.stage) {
                                own_partials[p].push(out.stage);
                                continue;
                            }
                            let set = held[p].entry(r).or_default();
                            set.extend(cells(ir, r, out.rows, out.channels));
                        }
                        if !ran.contains(&(*group, *tile)) {
                            ran.push((*group, *tile));
                        }
                    }
                    Step::Share { stage, to } => {
                        if !own_partials[p].contains(stage) {
                            return Err(format!("{me} shares a partial of {stage} it lacks"));
                        }
                        partials_in_flight.push((me.clone(), to.clone(), *stage));
                    }
                    Step::Combine { stage, parts } => {
                        let waiting = parts.iter().any(|from| {
                            from != me
                                && !partials_in_flight.contains(&(from.clone(), me.clone(), *stage))
                        });
                        if waiting {
                            break;
                        }
                        for from in parts {
                            if from == me {
                                if !own_partials[p].contains(stage) {
                                    return Err(format!(
                                        "{me} combines its partial of {stage}, which it lacks"
                                    ));
                                }
                                continue;
                            }
                            let k = partials_in_flight
                                .iter()
                                .position(|m| *m == (from.clone(), me.clone(), *stage))
                                .expect("checked above");
                            partials_in_flight.remove(k);
                        }
                        let r = TensorRef::Stage(*stage);
                        held[p]
                            .entry(r)
                            .or_default()
                            .extend(cells(ir, r, Rows::new(0, 1), None));
                    }
                    Step::Drop { tensor } => {
                        held[p].remove(tensor);
                    }
                }
                pc[p] += 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    for (p, program) in programs.iter().enumerate() {
        if pc[p] < program.steps.len() {
            return Err(format!(
                "{} waits forever at step {}: {:?}",
                program.party, pc[p], program.steps[pc[p]]
            ));
        }
    }
    if !in_flight.is_empty() || !partials_in_flight.is_empty() {
        return Err(format!(
            "sent and never received: {in_flight:?} {partials_in_flight:?}"
        ));
    }
    let mut want: Vec<(usize, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, group)| (0..group.tiles.len()).map(move |k| (g, k)))
        .collect();
    want.sort();
    ran.sort();
    if ran != want {
        return Err(format!("tiles run {ran:?}, the groups have {want:?}"));
    }
    for &o in &ir.outputs {
        let have = held[coordinator].get(&o).cloned().unwrap_or_default();
        if !whole(o).iter().all(|r| have.contains(r)) {
            return Err(format!("the coordinator ends without all of output {o:?}"));
        }
    }
    for step in &programs[coordinator].steps {
        let tensor = match step {
            Step::Send { tensor, .. } | Step::Receive { tensor, .. } => *tensor,
            other => return Err(format!("the coordinator has a step {other:?}")),
        };
        if tensor != TensorRef::Input && !ir.outputs.contains(&tensor) {
            return Err(format!(
                "the coordinator moves {tensor:?}, not an input or output"
            ));
        }
    }
    for (p, program) in programs.iter().enumerate() {
        if p != coordinator && !held[p].is_empty() {
            return Err(format!(
                "{} ends holding {:?}",
                program.party,
                held[p].keys()
            ));
        }
    }
    Ok(())
}

/// A group's length, whether to split it, whether by channels, its device count, the
/// rotation its devices start at, and the strip weights.
type Pick = (usize, bool, bool, usize, usize, [u8; DEVICES]);

fn pick() -> impl Strategy<Value = Pick> {
    (
        0usize..6,
        any::<bool>(),
        any::<bool>(),
        1usize..=DEVICES,
        0usize..DEVICES,
        any::<[u8; DEVICES]>(),
    )
}

/// 1024 cases from a fixed seed (both overridable by `PROPTEST_CASES` and
/// `PROPTEST_RNG_SEED`); a failure is printed, not kept in a file.
fn config() -> ProptestConfig {
    let env = ProptestConfig::default();
    let set = |var: &str| std::env::var_os(var).is_some();
    ProptestConfig {
        cases: if set("PROPTEST_CASES") {
            env.cases
        } else {
            1024
        },
        rng_seed: if set("PROPTEST_RNG_SEED") {
            env.rng_seed
        } else {
            proptest::test_runner::RngSeed::Fixed(0x5eed_0021)
        },
        failure_persistence: None,
        ..env
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn programs_run_to_the_end_and_move_every_row_a_tile_reads(
        model in prop::sample::select(vec![
            "tiny-cnn", "tiny-residual", "tiny-yolo", "tiny-mobile", "tiny-head",
            "tiny-effnet", "tiny-yolov8", "tiny-shuffle",
        ]),
        picks in prop::collection::vec(pick(), 1..8),
        sub_strips in any::<bool>(),
    ) {
        let ir = ir(model);
        let mut groups = groups(&ir, &picks);
        if sub_strips {
            cut_edges(&ir, &mut groups);
        }
        let programs = programs(&ir, &names(), &groups);
        if let Err(e) = simulate(&ir, &groups, &programs) {
            let flc: Vec<String> = groups
                .iter()
                .map(|g| {
                    let c = if g.channels { "c" } else { "" };
                    format!("{}..{}/{}{c}", g.first, g.last, g.tiles.len())
                })
                .collect();
            return Err(TestCaseError::fail(format!("{model} {}: {e}", flc.join(" "))));
        }
        let candidate = Candidate {
            name: "random".into(),
            predicted_us: 0,
            measured_us: None,
            groups,
            programs,
        };
        let t = traffic(&ir, &candidate);
        let whole = |r: TensorRef| {
            ir.tensor(r).strip_bytes(Rows::new(0, ir.tensor(r).height().unwrap_or(0)))
        };
        let ends = whole(TensorRef::Input) + ir.outputs.iter().map(|&o| whole(o)).sum::<u64>();
        // Every row of the input and outputs, and input rows two first tiles read twice.
        prop_assert!(t.coordinator >= ends, "{:?}, input and outputs {}", t, ends);
        prop_assert!(t.coordinator + t.boards <= t.hub, "{:?}", t);
    }
}

/// Two devices splitting two groups in a row keep their own rows: each receives only
/// the halo it lacks from its neighbour, and nothing goes through the coordinator
/// between the groups.
/// A tile reads an empty range of a tensor with rows when its strip needs none of it
/// (tiny-shuffle's stride-2 branch, on a board with one row of the branch's input):
/// nothing is moved for it. The simulator once took such a range for a whole tensor.
#[test]
fn an_empty_strip_reads_nothing() {
    let ir = ir("tiny-shuffle");
    let groups = groups(&ir, &[(1, true, false, 3, 1, [0, 20, 0, 92])]);
    let programs = programs(&ir, &names(), &groups);
    simulate(&ir, &groups, &programs).unwrap();
}

#[test]
fn a_device_keeps_its_rows_and_receives_only_the_halo_between_split_groups() {
    let ir = ir("tiny-cnn");
    let n = ir.stages.len();
    // The longest run of splittable stages from the start, cut into two groups.
    let mut last = 0;
    while last + 1 < n && check_group(&ir, 0, last + 1).is_ok() {
        last += 1;
    }
    assert!(last >= 1, "tiny-cnn starts with two splittable stages");
    let picks = [
        (0, true, false, 2, 0, [0; DEVICES]),
        (last - 1, true, false, 2, 0, [0; DEVICES]),
    ];
    let groups = groups(&ir, &picks);
    let programs = programs(&ir, &names(), &groups);
    simulate(&ir, &groups, &programs).unwrap();
    let first_out = TensorRef::Stage(groups[0].last);
    let second = &groups[1];
    for t in &second.tiles {
        let program = programs
            .iter()
            .find(|p| p.party == Party::Device(t.device.clone()))
            .unwrap();
        let own = groups[0]
            .tiles
            .iter()
            .find(|o| o.device == t.device)
            .unwrap()
            .strip;
        let wanted = t
            .tile
            .inputs
            .iter()
            .find(|i| i.tensor == first_out)
            .unwrap()
            .rows;
        let received: Vec<Rows> = program
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Receive {
                    tensor, rows, from, ..
                } if *tensor == first_out => {
                    assert_ne!(*from, Party::Coordinator);
                    Some(*rows)
                }
                _ => None,
            })
            .collect();
        let kept = Rows::new(wanted.start.max(own.start), wanted.end.min(own.end));
        let halo = wanted.len() - kept.len();
        assert_eq!(
            received.iter().map(|r| r.len()).sum::<usize>(),
            halo,
            "{}: wants {wanted}, owns {own}, received {received:?}",
            t.device
        );
    }
    let coordinator = &programs[0];
    assert_eq!(coordinator.party, Party::Coordinator);
    assert!(coordinator.steps.iter().all(|s| match s {
        Step::Send { tensor, .. } => *tensor == TensorRef::Input,
        Step::Receive { tensor, .. } => ir.outputs.contains(tensor),
        _ => false,
    }));
}

/// A conv split by channels, read by a row split over the same boards: each board keeps
/// its own channels and receives, from each other board, that board's channels of the
/// rows its strip reads, and nothing else.
#[test]
fn a_row_split_after_a_channel_split_receives_the_other_boards_channels() {
    let ir = ir("tiny-cnn");
    let weights = [3, 1, 4, 1];
    let groups = groups(
        &ir,
        &[
            (0, true, true, 4, 0, weights),
            (1, true, false, 4, 0, weights),
        ],
    );
    assert!(groups[0].channels && !groups[1].channels);
    let programs = programs(&ir, &names(), &groups);
    simulate(&ir, &groups, &programs).unwrap();
    let conv = TensorRef::Stage(groups[0].last);
    let count = ir.stage(groups[0].last).channels.unwrap().count;
    for t in &groups[1].tiles {
        let own = groups[0]
            .tiles
            .iter()
            .find(|o| o.device == t.device)
            .map_or(0, |o| o.strip.len());
        let wanted = t
            .tile
            .inputs
            .iter()
            .find(|i| i.tensor == conv)
            .unwrap()
            .rows;
        let program = programs
            .iter()
            .find(|p| p.party == Party::Device(t.device.clone()))
            .unwrap();
        let mut cells = 0;
        for step in &program.steps {
            if let Step::Receive {
                tensor,
                rows,
                channels,
                from,
            } = step
                && *tensor == conv
            {
                assert_ne!(*from, Party::Coordinator);
                assert_eq!(*rows, wanted, "{}", t.device);
                cells += rows.len() * channels.expect("a part of a channel split").len();
            }
        }
        assert_eq!(cells, wanted.len() * (count - own), "{}", t.device);
    }
}
