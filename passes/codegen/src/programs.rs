//! Per-party programs (docs/plan.md, "programs"): for every tile input, which rows its
//! device already holds (it computed them, or received them for an earlier tile) and
//! which it must receive, and from whom; when each device may free a tensor.
//!
//! Every row of a tensor has one owner: the party whose tile output it (the
//! coordinator owns the model input). A tensor computed split by channels has one owner
//! per range of channels, and moves in parts: rows of one owner's channels. Only owners
//! send (but the relays of a tile in parts, which pass a strip on), so a row crosses
//! the network at most once per receiver. A device sends a consumer its rows right
//! after the tile that produced them, and receives a tile's rows right before running
//! it, so data flows from earlier groups to later ones and no program waits on a later
//! one.

use crate::parts::relays;
use legion_ir::{Ir, Rows, StageId, TensorRef};
use legion_partition::Held;
use legion_plan::{Candidate, Party, PlanGroup, PlanTile, Program, Step};
use std::collections::HashMap;

/// The rows both ranges cover, if any.
fn overlap(a: Rows, b: Rows) -> Option<Rows> {
    let r = Rows::new(a.start.max(b.start), a.end.min(b.end));
    (!r.is_empty()).then_some(r)
}

/// One party's steps, built block by block: the start (the coordinator's sends of the
/// input), then per tile it runs its receives, the run, and the sends of what the run
/// produced (appended as later tiles ask for it), then the end (the coordinator's
/// receives of the model outputs).
#[derive(Default)]
struct Blocks {
    blocks: Vec<Block>,
    /// Rows held, per tensor and owner's channels (`None`: all of them).
    held: HashMap<(TensorRef, Option<Rows>), Held>,
}

/// A party that computed part of a tensor: in which of its blocks, which rows and, for
/// a tensor split by channels, which channels.
#[derive(Clone, Copy)]
struct Owner {
    party: usize,
    block: usize,
    rows: Rows,
    channels: Option<Rows>,
}

#[derive(Default)]
struct Block {
    receives: Vec<Step>,
    /// Rows just received that it passes on to other boards (relays of a strip of a
    /// tile in parts), before its run.
    forwards: Vec<Step>,
    /// The tile it runs: one run step, or the phases of a tile whose group combines
    /// reductions, each followed by the exchange of its partial results.
    run: Vec<Step>,
    sends: Vec<Step>,
    /// Tensors this block's run reads or produces, or its sends send; a tensor is
    /// dropped after the last block that uses it.
    uses: Vec<TensorRef>,
}

/// The programs of a candidate's `groups` on `devices` (cluster order): the
/// coordinator's first, then each device that takes part, in cluster order.
pub fn programs(ir: &Ir, devices: &[String], groups: &[PlanGroup]) -> Vec<Program> {
    // Party 0 is the coordinator, party i + 1 device i.
    let mut parties: Vec<Blocks> = (0..=devices.len()).map(|_| Blocks::default()).collect();
    let party_of = |name: &str| {
        1 + devices
            .iter()
            .position(|d| d == name)
            .expect("validated: a tile's device is one of the plan's")
    };
    let party = |p: usize| match p {
        0 => Party::Coordinator,
        p => Party::Device(devices[p - 1].clone()),
    };
    let whole = |t: TensorRef| Rows::new(0, ir.tensor(t).height().unwrap_or(0));
    // Per tensor, its owners.
    let mut owners: HashMap<TensorRef, Vec<Owner>> = HashMap::new();
    parties[0].blocks.push(Block::default());
    parties[0]
        .held
        .entry((TensorRef::Input, None))
        .or_default()
        .insert(whole(TensorRef::Input));
    owners.insert(
        TensorRef::Input,
        vec![Owner {
            party: 0,
            block: 0,
            rows: whole(TensorRef::Input),
            channels: None,
        }],
    );

    // Moves `want` of `tensor` to party `to`, into its block `into`: every owned part
    // it lacks, from its owner, sent from the block that produced it.
    let fetch = |parties: &mut Vec<Blocks>,
                 owners: &HashMap<TensorRef, Vec<Owner>>,
                 tensor: TensorRef,
                 want: Rows,
                 to: usize,
                 into: usize| {
        // A tensor without rows moves whole (`0..0`); an empty strip of one with rows
        // needs nothing.
        let rowless = ir.tensor(tensor).height().is_none();
        for owner in owners.get(&tensor).map_or(&[][..], |o| o) {
            let piece = if rowless {
                want
            } else {
                match overlap(owner.rows, want) {
                    Some(piece) => piece,
                    None => continue,
                }
            };
            if owner.party == to {
                continue;
            }
            let channels = owner.channels;
            let held = parties[to].held.entry((tensor, channels)).or_default();
            for rows in held.lacking(piece) {
                let sender = &mut parties[owner.party].blocks[owner.block];
                sender.sends.push(Step::Send {
                    tensor,
                    rows,
                    channels,
                    to: party(to),
                });
                sender.uses.push(tensor);
                parties[to].blocks[into].receives.push(Step::Receive {
                    tensor,
                    rows,
                    channels,
                    from: party(owner.party),
                });
                parties[to]
                    .held
                    .entry((tensor, channels))
                    .or_default()
                    .insert(rows);
            }
        }
    };

    for (g, group) in groups.iter().enumerate() {
        // A device runs its tiles of a group in the order they are listed (sub-strips:
        // the edges first).
        let order: Vec<usize> = (0..group.tiles.len()).collect();
        // Per reduction the group combines, the devices that own rows of its input, in
        // the group's order.
        let mut contributors: HashMap<StageId, Vec<Party>> = HashMap::new();
        for t in &group.tiles {
            for s in t.tile.partials() {
                contributors
                    .entry(s)
                    .or_default()
                    .push(Party::Device(t.device.clone()));
            }
        }
        // Tiles in parts: which strips of their input reach which boards through
        // another ([`relays`]), and per (party, strip) the block that runs its part.
        let relayed = group_relays(&group.tiles, &owners, &party_of, parties.len());
        let mut part_blocks: HashMap<(usize, Rows), usize> = HashMap::new();
        let mut forwarded: Vec<(usize, usize, Rows, usize)> = vec![];
        // Per tile: (party, block) that runs it.
        let mut block_of = HashMap::new();
        for &k in &order {
            let t = &group.tiles[k];
            let d = party_of(&t.device);
            // A tile in parts runs a phase per part of its input, each in a block of its
            // own right after that part's receives.
            let parts = &t.tile.parts;
            for (phase, &rows) in parts.iter().enumerate() {
                let input = t.tile.inputs[0].tensor;
                let block = parties[d].blocks.len();
                parties[d].blocks.push(Block {
                    run: vec![Step::Run {
                        group: g,
                        tile: k,
                        phase,
                    }],
                    uses: vec![input],
                    ..Block::default()
                });
                part_blocks.insert((d, rows), block);
                let owner = owner_of(&owners, input, rows);
                match owner.and_then(|o| relayed.get(&(d, o))) {
                    Some(&via) => forwarded.push((d, block, rows, via)),
                    None => fetch(&mut parties, &owners, input, rows, d, block),
                }
            }
            let block = parties[d].blocks.len();
            block_of.insert(k, (d, block));
            let mut run = vec![];
            let mut uses = vec![];
            let phases = t.tile.phases(ir).into_iter().enumerate();
            for (phase, p) in phases.skip(parts.len()) {
                if !p.spec.stages.is_empty() {
                    run.push(Step::Run {
                        group: g,
                        tile: k,
                        phase,
                    });
                }
                uses.extend(p.spec.outputs.iter().map(|o| TensorRef::Stage(o.stage)));
                for stage in p.combines {
                    let parts = contributors.get(&stage).cloned().unwrap_or_default();
                    if parts.contains(&party(d)) {
                        for other in &group.tiles {
                            let to = Party::Device(other.device.clone());
                            if to != party(d)
                                && !run.contains(&Step::Share {
                                    stage,
                                    to: to.clone(),
                                })
                            {
                                run.push(Step::Share { stage, to });
                            }
                        }
                    }
                    run.push(Step::Combine { stage, parts });
                    uses.push(TensorRef::Stage(stage));
                }
            }
            parties[d].blocks.push(Block {
                run,
                uses,
                ..Block::default()
            });
            for input in t.tile.inputs.iter().filter(|_| parts.is_empty()) {
                fetch(&mut parties, &owners, input.tensor, input.rows, d, block);
                parties[d].blocks[block].uses.push(input.tensor);
            }
        }
        // Strips passed on: the relay sends them as soon as it has them.
        for (to, block, rows, via) in forwarded {
            let input = group.tiles[0].tile.inputs[0].tensor;
            let from = part_blocks[&(via, rows)];
            let relay = &mut parties[via].blocks[from];
            relay.forwards.push(Step::Send {
                tensor: input,
                rows,
                channels: None,
                to: party(to),
            });
            relay.uses.push(input);
            parties[to].blocks[block].receives.push(Step::Receive {
                tensor: input,
                rows,
                channels: None,
                from: party(via),
            });
            parties[to]
                .held
                .entry((input, None))
                .or_default()
                .insert(rows);
        }
        // Outputs are recorded after every tile of the group has fetched its inputs,
        // so no tile of a group reads another's output of the same group.
        for &k in &order {
            let t = &group.tiles[k];
            let (d, block) = block_of[&k];
            for out in &t.tile.outputs {
                let tensor = TensorRef::Stage(out.stage);
                // Produced rows no later tile reads are freed right after the run.
                parties[d].blocks[block].uses.push(tensor);
                if out.rows.is_empty() && ir.tensor(tensor).height().is_some() {
                    continue;
                }
                parties[d]
                    .held
                    .entry((tensor, out.channels))
                    .or_default()
                    .insert(out.rows);
                owners.entry(tensor).or_default().push(Owner {
                    party: d,
                    block,
                    rows: out.rows,
                    channels: out.channels,
                });
            }
        }
    }
    let end = parties[0].blocks.len();
    parties[0].blocks.push(Block::default());
    for &o in &ir.outputs {
        fetch(&mut parties, &owners, o, whole(o), 0, end);
    }

    let count = parties.len();
    let index_of = |to: &Party| match to {
        Party::Coordinator => 0,
        Party::Device(name) => party_of(name),
    };
    parties
        .into_iter()
        .enumerate()
        .filter_map(|(p, mut blocks)| {
            if p != 0 {
                for block in &mut blocks.blocks {
                    rotate_sends(&mut block.sends, |to| send_rank(p, index_of(to), count));
                }
            }
            let steps = flatten(p != 0, blocks.blocks);
            (p == 0 || !steps.is_empty()).then(|| Program {
                party: party(p),
                steps,
            })
        })
        .collect()
}

/// The party that computed `rows` of `tensor` (the first row's owner).
fn owner_of(
    owners: &HashMap<TensorRef, Vec<Owner>>,
    tensor: TensorRef,
    rows: Rows,
) -> Option<usize> {
    owners
        .get(&tensor)?
        .iter()
        .find(|o| o.rows.start <= rows.start && rows.start < o.rows.end)
        .map(|o| o.party)
}

/// The relays of a group whose tiles are in parts ([`relays`]), keyed by (receiver
/// party, sender party); none for other groups.
fn group_relays(
    tiles: &[PlanTile],
    owners: &HashMap<TensorRef, Vec<Owner>>,
    party_of: &impl Fn(&str) -> usize,
    parties: usize,
) -> HashMap<(usize, usize), usize> {
    let Some(first) = tiles.iter().find(|t| !t.tile.parts.is_empty()) else {
        return HashMap::new();
    };
    let input = first.tile.inputs[0].tensor;
    let strips: Option<Vec<(usize, Rows)>> = first
        .tile
        .parts
        .iter()
        .map(|&rows| owner_of(owners, input, rows).map(|o| (o, rows)))
        .collect();
    let receivers: Vec<usize> = tiles.iter().map(|t| party_of(&t.device)).collect();
    strips.map_or_else(HashMap::new, |s| relays(&s, &receivers, parties))
}

/// Where party `to` comes among the receivers of rows that party `from` sends to
/// several (of `parties`): the party just before it first, then on down, wrapping
/// round. So when every board sends its rows to every other (the input of a channel
/// group), each receiver is near the front of one sender's queue and near the back of
/// another's, and not last everywhere.
pub(crate) fn send_rank(from: usize, to: usize, parties: usize) -> usize {
    (from + parties - to) % parties
}

/// Orders each run of sends of the same rows to several receivers by `rank`; runs of
/// other rows keep their order (that of the groups that read them).
fn rotate_sends(sends: &mut [Step], rank: impl Fn(&Party) -> usize) {
    let what = |s: &Step| match s {
        Step::Send {
            tensor,
            rows,
            channels,
            ..
        } => Some((*tensor, *rows, *channels)),
        _ => None,
    };
    let mut start = 0;
    while start < sends.len() {
        let mut end = start + 1;
        while end < sends.len() && what(&sends[end]) == what(&sends[start]) {
            end += 1;
        }
        sends[start..end].sort_by_key(|s| match s {
            Step::Send { to, .. } => rank(to),
            _ => 0,
        });
        start = end;
    }
}

/// A party's blocks in order, with a drop after the last block that uses each tensor
/// (`drops` false for the coordinator, which keeps the input and returns the outputs).
fn flatten(drops: bool, blocks: Vec<Block>) -> Vec<Step> {
    let mut last_use: HashMap<TensorRef, usize> = HashMap::new();
    for (b, block) in blocks.iter().enumerate() {
        for &t in &block.uses {
            last_use.insert(t, b);
        }
    }
    let mut steps = vec![];
    for (b, block) in blocks.into_iter().enumerate() {
        steps.extend(block.receives);
        steps.extend(block.forwards);
        steps.extend(block.run);
        let mut done: Vec<TensorRef> = block
            .uses
            .iter()
            .copied()
            .filter(|t| last_use[t] == b)
            .collect();
        steps.extend(block.sends);
        if drops {
            done.sort();
            done.dedup();
            steps.extend(done.into_iter().map(|tensor| Step::Drop { tensor }));
        }
    }
    steps
}

/// Bytes one inference of a candidate moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Traffic {
    /// Through the coordinator when it runs the groups as the hub: every tile's input
    /// strips out, its output strips back.
    pub hub: u64,
    /// Under the programs: to and from the coordinator (the model's input and outputs).
    pub coordinator: u64,
    /// Under the programs: from board to board (rows, and partial results shared).
    pub boards: u64,
}

/// What one inference of `candidate` (of a plan for `ir`) moves, both ways of running it.
pub fn traffic(ir: &Ir, candidate: &Candidate) -> Traffic {
    let bytes = |t: TensorRef, rows: Rows, channels: Option<Rows>| ir.part_bytes(t, rows, channels);
    let hub = candidate
        .groups
        .iter()
        .flat_map(|g| &g.tiles)
        .map(|t| {
            let inputs: u64 = t
                .tile
                .inputs
                .iter()
                .map(|i| bytes(i.tensor, i.rows, None))
                .sum();
            let outputs: u64 = t
                .tile
                .outputs
                .iter()
                .map(|o| bytes(TensorRef::Stage(o.stage), o.rows, o.channels))
                .sum();
            inputs + outputs
        })
        .sum();
    let mut traffic = Traffic {
        hub,
        coordinator: 0,
        boards: 0,
    };
    for program in &candidate.programs {
        for step in &program.steps {
            match step {
                Step::Send {
                    tensor,
                    rows,
                    channels,
                    to,
                } => {
                    let b = bytes(*tensor, *rows, *channels);
                    if program.party == Party::Coordinator || *to == Party::Coordinator {
                        traffic.coordinator += b;
                    } else {
                        traffic.boards += b;
                    }
                }
                // A partial result: the reduction's whole (one-row) output.
                Step::Share { stage, .. } => {
                    traffic.boards += bytes(TensorRef::Stage(*stage), Rows::new(0, 1), None);
                }
                _ => {}
            }
        }
    }
    traffic
}
