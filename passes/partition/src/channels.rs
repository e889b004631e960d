//! Channel tiles: a group whose last stage splits by output channels (or neurons), each
//! device computing every row of a range of them from the whole input and its slice of
//! the weights (docs/architecture.md, "Channel splits").

use crate::tiling::{Group, PartitionError, boundary, stage_range, whole_group};
use legion_ir::{Ir, Rows, StageId, TensorRef};
use legion_plan::{Candidate, TileSpec};
use std::collections::HashMap;

/// True when stage `s` is worth splitting by its output channels: it splits so, and its
/// weights outweigh its output. Each device then reads the whole input, so channel
/// splits pay where maps are small and weights heavy (late convs, FC layers); the
/// profiler measures channel tiles of these stages only, and the search offers channel
/// splits of these only.
pub fn worth_channels(ir: &Ir, s: legion_ir::StageId) -> bool {
    let stage = ir.stage(s);
    stage.channels.is_some() && stage.weight_bytes > 4 * stage.output.len() as u64
}

/// Bytes of the weights a tile reads: each stage's, a stage split by channels only its
/// slice of them.
pub fn tile_weight_bytes(ir: &Ir, spec: &TileSpec) -> u64 {
    spec.stages
        .iter()
        .map(|s| match s.channels {
            Some(c) => ir.channel_weight_bytes(s.stage, c),
            None => ir.stage(s.stage).weight_bytes,
        })
        .sum()
}

/// Per board of `candidate`, the bytes of weights its tiles hold together: every tile
/// is a model of its own, so a board running several tiles of a group (sub-strips)
/// holds the group's weights once per tile; a channel tile holds its slice.
pub fn weights_per_board(ir: &Ir, candidate: &Candidate) -> HashMap<String, u64> {
    let mut per_board: HashMap<String, u64> = HashMap::new();
    for t in candidate.groups.iter().flat_map(|g| &g.tiles) {
        *per_board.entry(t.device.clone()).or_default() += tile_weight_bytes(ir, &t.tile);
    }
    per_board
}

/// The stages of channel group `group` computed on their devices' channels only: the
/// last stage, with the depthwise convs chained before it back to the first split
/// stage, each reading the one before it (a MobileNet block's expand conv and its
/// depthwise conv); empty when the last stage does not split by channels.
pub fn split_chain(ir: &Ir, group: Group) -> Vec<StageId> {
    let Some(split) = ir.stage(group.last).channels else {
        return vec![];
    };
    let mut chain = vec![group.last];
    loop {
        let stage = ir.stage(*chain.last().expect("the chain has a stage"));
        let previous = match (stage.channels, &stage.inputs[..]) {
            (Some(c), [TensorRef::Stage(p)]) if c.depthwise && group.contains(*p) => *p,
            _ => break,
        };
        match ir.stage(previous).channels {
            Some(c) if c.count == split.count && c.axis == split.axis => chain.push(previous),
            _ => break,
        }
    }
    chain.reverse();
    chain
}

/// Checks that `first..=last` can split by channels: its last stage splits by output
/// channels, so may the depthwise convs chained before it ([`split_chain`]), and every
/// stage before the chain runs whole on each device of the group (a flatten or a
/// global pool before an FC layer), so it must multiply nothing (no conv, no matmul:
/// that work would be repeated on every device). Only the last stage is read after
/// the group.
pub fn check_channel_group(ir: &Ir, first: usize, last: usize) -> Result<Group, PartitionError> {
    let group = stage_range(ir, first, last)?;
    let stage = ir.stage(group.last);
    if stage.channels.is_none() {
        return Err(PartitionError::NoChannels {
            stage: group.last,
            name: stage.name.clone(),
        });
    }
    let chain = split_chain(ir, group);
    for s in group.stages() {
        if s > chain[0] && !chain.contains(&s) {
            return Err(PartitionError::NotPerChannel {
                stage: s,
                name: ir.stage(s).name.clone(),
            });
        }
        if s < chain[0] && ir.stage(s).macs() > 0 {
            return Err(PartitionError::Replicated {
                stage: s,
                name: ir.stage(s).name.clone(),
            });
        }
    }
    let (_, outputs) = boundary(ir, group);
    if let Some(s) = outputs.iter().find(|s| **s != group.last) {
        return Err(PartitionError::ReadOutside {
            stage: *s,
            name: ir.stage(*s).name.clone(),
        });
    }
    Ok(group)
}

/// The tile of a channel group (see [`check_channel_group`]) computing `channels` of its
/// last stage: the stages before its [`split_chain`] whole, the chain on those channels
/// only, every input whole, and those channels of all its rows sent.
pub fn channel_tile(ir: &Ir, group: Group, channels: Rows) -> TileSpec {
    let chain = split_chain(ir, group);
    let mut spec = whole_group(ir, group);
    for st in &mut spec.stages {
        if chain.contains(&st.stage) {
            st.channels = Some(channels);
        }
    }
    for out in &mut spec.outputs {
        out.channels = Some(channels);
    }
    spec
}

/// The tensor that channel group `group` can multiply in parts, each as its rows arrive
/// ([`legion_plan::TileSpec::parts`]): the group is a flatten of that tensor (which has
/// rows) and the matmul reading it ([`Ir::row_product`]); `None` for any other group.
pub fn product_in_parts(ir: &Ir, group: Group) -> Option<TensorRef> {
    if group.first.index() + 1 != group.last.index()
        || ir.stage(group.last).inputs[..] != [TensorRef::Stage(group.first)]
    {
        return None;
    }
    ir.row_product(group.first, group.last)?;
    let input = *ir.stage(group.first).inputs.first()?;
    ir.tensor(input).height().map(|_| input)
}
