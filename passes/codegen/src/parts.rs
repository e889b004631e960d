//! Channel tiles in parts (docs/architecture.md, "Accumulating as rows arrive"): a
//! channel group that flattens a tensor with rows into a matrix product (VGG's fc6 after
//! pool5) multiplies each board's rows of that tensor as they arrive, its own first,
//! instead of waiting for all of them. The parts are the strips of the row group that
//! produced the tensor.

use crate::programs::send_rank;
use legion_ir::{Ir, Rows, TensorRef};
use legion_partition::{Group, product_in_parts};
use legion_plan::PlanGroup;

/// Sets [`legion_plan::TileSpec::parts`] on every tile of every channel group of
/// `groups` (on `devices`, cluster order) that can multiply its input in parts, when
/// more than one board computed that input's rows (by rows, each row once): per tile,
/// the rows its own board computed first, then the others' strips in the order they
/// should arrive. Every sender sends its strip to the group's boards one after the
/// other ([`send_rank`]), so a strip should arrive after as many strips' worth of
/// its sender's rows as the receiver has places in that sender's queue.
pub fn in_parts(ir: &Ir, devices: &[String], groups: &mut [PlanGroup]) {
    let party = |name: &str| 1 + devices.iter().position(|d| d == name).unwrap_or(0);
    let parties = devices.len() + 1;
    for g in 0..groups.len() {
        let (before, rest) = groups.split_at_mut(g);
        let group = &mut rest[0];
        if !group.channels {
            continue;
        }
        let range = Group::new(group.first.index(), group.last.index());
        let Some(input) = product_in_parts(ir, range) else {
            continue;
        };
        let Some(pieces) = strips_of(ir, before, input) else {
            continue;
        };
        let receivers: Vec<usize> = group.tiles.iter().map(|t| party(&t.device)).collect();
        for t in &mut group.tiles {
            let me = party(&t.device);
            let arrival = |(sender, rows): &(String, Rows)| {
                let from = party(sender);
                if from == me {
                    return (0, rows.start);
                }
                let place = receivers
                    .iter()
                    .filter(|&&r| {
                        r != from && send_rank(from, r, parties) <= send_rank(from, me, parties)
                    })
                    .count();
                (place * rows.len(), rows.start)
            };
            let mut order = pieces.clone();
            order.sort_by_key(arrival);
            t.tile.parts = order.into_iter().map(|(_, rows)| rows).collect();
        }
    }
}

/// Who computed which rows of `input` in `before`: one strip per board in row order
/// (a board's sub-strips merged), when at least two boards did, each row once, all
/// rows, none split by channels.
fn strips_of(ir: &Ir, before: &[PlanGroup], input: TensorRef) -> Option<Vec<(String, Rows)>> {
    let TensorRef::Stage(stage) = input else {
        return None;
    };
    let mut pieces: Vec<(String, Rows)> = vec![];
    for t in before.iter().flat_map(|g| &g.tiles) {
        for out in t.tile.outputs.iter().filter(|o| o.stage == stage) {
            if out.channels.is_some() {
                return None;
            }
            if !out.rows.is_empty() {
                pieces.push((t.device.clone(), out.rows));
            }
        }
    }
    pieces.sort_by_key(|(_, rows)| rows.start);
    let mut strips: Vec<(String, Rows)> = vec![];
    let mut next = 0;
    for (device, rows) in pieces {
        if rows.start != next {
            return None;
        }
        next = rows.end;
        match strips.last_mut() {
            Some((d, r)) if *d == device => r.end = rows.end,
            _ => strips.push((device, rows)),
        }
    }
    let height = ir.tensor(input).height()?;
    let boards = {
        let mut names: Vec<&String> = strips.iter().map(|(d, _)| d).collect();
        names.sort();
        names.dedup();
        names.len()
    };
    (next == height && boards == strips.len() && boards > 1).then_some(strips)
}
