//! Channel tiles in parts (docs/architecture.md, "Accumulating as rows arrive"): a
//! channel group that flattens a tensor with rows into a matrix product (VGG's fc6 after
//! pool5) multiplies each board's rows of that tensor as they arrive, its own first,
//! instead of waiting for all of them. The parts are the strips of the row group that
//! produced the tensor.

use crate::programs::send_rank;
use legion_ir::{Ir, Rows, TensorRef};
use legion_partition::{Group, product_in_parts};
use legion_plan::PlanGroup;
use std::collections::HashMap;

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
        let strips: Vec<(usize, Rows)> = pieces.iter().map(|(d, r)| (party(d), *r)).collect();
        let relayed = relays(&strips, &receivers, parties);
        // When `to` has `from`'s strip of `rows` rows, in rows sent before it.
        let place = |from: usize, to: usize, rows: usize| {
            let ahead = receivers.iter().filter(|&&r| {
                r != from
                    && !relayed.contains_key(&(r, from))
                    && send_rank(from, r, parties) <= send_rank(from, to, parties)
            });
            ahead.count() * rows
        };
        let own_rows = |p: usize| {
            strips
                .iter()
                .find(|(d, _)| *d == p)
                .map_or(0, |(_, r)| r.len())
        };
        for t in &mut group.tiles {
            let me = party(&t.device);
            let arrival = |(sender, rows): &(String, Rows)| {
                let from = party(sender);
                let at = match relayed.get(&(me, from)) {
                    _ if from == me => 0,
                    // Forwarded once the relay has it and has sent its own strip.
                    Some(&via) => {
                        let own = own_rows(via) * (receivers.len() - 1);
                        place(from, via, rows.len()).max(own) + rows.len()
                    }
                    None => place(from, me, rows.len()),
                };
                (at, rows.start)
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

/// Which boards forward a strip to which others (docs/architecture.md, "Accumulating as
/// rows arrive"): every board sends its strip to every other, so the board holding the
/// most rows is the last to finish sending. While the board with the most rows to send
/// can hand the last receiver in its queue ([`send_rank`]) to a board earlier in that
/// queue whose own sends would stay below its own, that board forwards the strip on
/// receiving it. `strips` are (sender party, rows), `receivers` the group's parties; the
/// result maps (receiver, sender) to the relay.
pub(crate) fn relays(
    strips: &[(usize, Rows)],
    receivers: &[usize],
    parties: usize,
) -> HashMap<(usize, usize), usize> {
    let mut relayed = HashMap::new();
    // Per sender: its strip's rows, the receivers it sends to itself in queue order.
    let mut queues: Vec<(usize, usize, Vec<usize>)> = strips
        .iter()
        .map(|&(from, rows)| {
            let mut queue: Vec<usize> = receivers.iter().copied().filter(|&r| r != from).collect();
            queue.sort_by_key(|&r| send_rank(from, r, parties));
            (from, rows.len(), queue)
        })
        .collect();
    // Rows each party sends (or forwards).
    let mut load: HashMap<usize, usize> =
        queues.iter().map(|(f, n, q)| (*f, n * q.len())).collect();
    while let Some((k, _)) = queues
        .iter()
        .enumerate()
        .max_by_key(|(_, (from, _, _))| (load[from], std::cmp::Reverse(*from)))
    {
        let (from, rows, queue) = &mut queues[k];
        let Some((&last, direct)) = queue.split_last() else {
            break;
        };
        let relay = direct
            .iter()
            .copied()
            .filter(|b| load.get(b).copied().unwrap_or(0) + *rows < load[from])
            .min_by_key(|b| {
                (
                    load.get(b).copied().unwrap_or(0),
                    send_rank(*from, *b, parties),
                )
            });
        let Some(relay) = relay else {
            break;
        };
        relayed.insert((last, *from), relay);
        *load.get_mut(from).expect("a sender's load") -= *rows;
        *load.entry(relay).or_default() += *rows;
        queue.pop();
    }
    relayed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parties 1..=n each send strip `rows[i]` to all the others.
    fn strips(rows: &[usize]) -> (Vec<(usize, Rows)>, Vec<usize>) {
        let mut start = 0;
        let strips = rows
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                start += n;
                (i + 1, Rows::new(start - n, start))
            })
            .collect();
        (strips, (1..=rows.len()).collect())
    }

    /// Rows each party sends or forwards under `relayed`, checking that every relay
    /// gets the strip it forwards straight from its sender.
    fn loads(
        s: &[(usize, Rows)],
        r: &[usize],
        relayed: &HashMap<(usize, usize), usize>,
    ) -> Vec<usize> {
        let mut load = vec![0; r.len() + 1];
        for &(from, rows) in s {
            for &to in r.iter().filter(|&&to| to != from) {
                match relayed.get(&(to, from)) {
                    Some(&via) => {
                        assert!(
                            !relayed.contains_key(&(via, from)),
                            "{via} relays {from}'s strip it does not get from it"
                        );
                        load[via] += rows.len();
                    }
                    None => load[from] += rows.len(),
                }
            }
        }
        load
    }

    #[test]
    fn the_board_with_the_most_rows_hands_receivers_to_others() {
        // VGG-16's pool5 on 6 boards: one holds 2 of the 7 rows and would send 10 rows
        // against the others' 5; 35 rows over 6 uplinks is 6 at best.
        let (s, r) = strips(&[1, 1, 1, 1, 1, 2]);
        let relayed = relays(&s, &r, 7);
        assert_eq!(
            loads(&s, &r, &relayed).into_iter().max(),
            Some(6),
            "{relayed:?}"
        );
        // The two-row board's last receiver in its queue (ranks from party 6: 5, 4, 3,
        // 2, 1) gets its strip through another board.
        assert!(relayed.contains_key(&(1, 6)), "{relayed:?}");
        // Equal strips: nobody relays.
        let (s, r) = strips(&[2, 2, 2, 2]);
        assert!(relays(&s, &r, 5).is_empty());
        // Three boards of 2 rows and one of 1 (21 rows, 6 per heavy board): no handing
        // over lowers the most any board sends.
        let (s, r) = strips(&[2, 2, 2, 1]);
        let relayed = relays(&s, &r, 5);
        assert_eq!(
            loads(&s, &r, &relayed).into_iter().max(),
            Some(6),
            "{relayed:?}"
        );
    }
}
