//! Channel tiles: a group whose last stage splits by output channels (or neurons), each
//! device computing every row of a range of them from the whole input and its slice of
//! the weights (docs/architecture.md, "Channel splits").

use crate::tiling::{Group, PartitionError, boundary, stage_range, whole_group};
use legion_ir::{Ir, Rows};
use legion_plan::TileSpec;

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

/// Checks that `first..=last` can split by channels: its last stage splits by output
/// channels, and every stage before it runs whole on each device of the group (a
/// flatten or a global pool before an FC layer), so it must multiply nothing (no conv,
/// no matmul: that work would be repeated on every device) and be read only inside the
/// group.
pub fn check_channel_group(ir: &Ir, first: usize, last: usize) -> Result<Group, PartitionError> {
    let group = stage_range(ir, first, last)?;
    let stage = ir.stage(group.last);
    if stage.channels.is_none() {
        return Err(PartitionError::NoChannels {
            stage: group.last,
            name: stage.name.clone(),
        });
    }
    if let Some(s) = group
        .stages()
        .find(|s| *s != group.last && ir.stage(*s).macs() > 0)
    {
        return Err(PartitionError::Replicated {
            stage: s,
            name: ir.stage(s).name.clone(),
        });
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
/// last stage: the stages before it whole, the last on its channels only, every input
/// whole, and those channels of all its rows sent.
pub fn channel_tile(ir: &Ir, group: Group, channels: Rows) -> TileSpec {
    let mut spec = whole_group(ir, group);
    let last = spec.stages.last_mut().expect("a group has stages");
    last.channels = Some(channels);
    for out in &mut spec.outputs {
        out.channels = Some(channels);
    }
    spec
}
