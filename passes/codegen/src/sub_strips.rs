//! Sub-strips (docs/plan.md, "Sub-strips"): a board's strip of a split group cut so
//! that the rows other boards read in later groups (the halos of their next tiles)
//! are computed first and leave while the board computes the rest. A board's strip
//! `[a, b)` whose top `t` rows and bottom `u` rows are read elsewhere becomes
//! `[a, a+t)`, `[a+t, b-u)`, `[b-u, b)`, listed (and so run) in the order top,
//! bottom, middle.

use legion_ir::{Ir, Rows, TensorRef};
use legion_partition::{Group, tile};
use legion_plan::{PlanGroup, PlanTile};

/// The rows of `t`'s strip that other devices read in `later` groups, as (top, bottom)
/// counts: the deepest read reaching each edge of the strip.
fn edges(t: &PlanTile, tensor: TensorRef, later: &[PlanGroup]) -> (usize, usize) {
    let (a, b) = (t.strip.start, t.strip.end);
    let (mut top, mut bottom) = (0, 0);
    let reads = later
        .iter()
        .flat_map(|g| &g.tiles)
        .filter(|other| other.device != t.device)
        .flat_map(|other| &other.tile.inputs)
        .filter(|i| i.tensor == tensor);
    for read in reads {
        let (lo, hi) = (read.rows.start.max(a), read.rows.end.min(b));
        if lo >= hi {
            continue;
        }
        if lo == a {
            top = top.max(hi - a);
        }
        if hi == b {
            bottom = bottom.max(b - lo);
        }
    }
    (top, bottom)
}

/// Cuts the strips of every split group of `groups` into sub-strips where other
/// devices read its edges later and something is left between them. A group whose
/// sub-strips the partition pass cannot tile keeps its strips. The predicted times of
/// a tile are shared out: its compute in proportion to rows, its inputs on the tile
/// that runs first, its outputs on the one that runs last.
pub fn cut_edges(ir: &Ir, groups: &mut [PlanGroup]) {
    for g in 0..groups.len() {
        let (done, later) = groups.split_at_mut(g + 1);
        let group = &mut done[g];
        // A group that combines reductions keeps one tile per device: each owns its
        // rows of the reduced tensor once.
        let combines = group
            .tiles
            .iter()
            .any(|t| t.tile.stages.iter().any(|s| s.partial));
        if !group.split || group.channels || combines {
            continue;
        }
        let tensor = TensorRef::Stage(group.last);
        // Per new tile, in row order: the old tile it comes from, its strip and whether
        // it runs first or last of the old tile's parts.
        let mut cut: Vec<(usize, Rows, bool, bool)> = vec![];
        // The new tiles' indices into `cut`, in run order.
        let mut order: Vec<usize> = vec![];
        for (k, t) in group.tiles.iter().enumerate() {
            let (a, b) = (t.strip.start, t.strip.end);
            let (top, bottom) = edges(t, tensor, later);
            if top == 0 && bottom == 0 || top + bottom >= b - a {
                order.push(cut.len());
                cut.push((k, t.strip, true, true));
                continue;
            }
            // In row order, with each part's place in the run order.
            let parts = [
                (Rows::new(a, a + top), 0),
                (Rows::new(a + top, b - bottom), 2),
                (Rows::new(b - bottom, b), 1),
            ];
            let parts: Vec<(Rows, usize)> =
                parts.into_iter().filter(|(r, _)| !r.is_empty()).collect();
            let first = parts.iter().map(|(_, o)| *o).min().unwrap_or(0);
            let last = parts.iter().map(|(_, o)| *o).max().unwrap_or(0);
            let base = cut.len();
            for (r, o) in &parts {
                cut.push((k, *r, *o == first, *o == last));
            }
            let mut run: Vec<usize> = (0..parts.len()).collect();
            run.sort_by_key(|&i| parts[i].1);
            order.extend(run.into_iter().map(|i| base + i));
        }
        if cut.len() == group.tiles.len() {
            continue;
        }
        let strips: Vec<Rows> = cut.iter().map(|(_, r, _, _)| *r).collect();
        let Ok(tiling) = tile(
            ir,
            Group {
                first: group.first,
                last: group.last,
            },
            &strips,
        ) else {
            continue;
        };
        if tiling.tiles.len() != cut.len() {
            continue;
        }
        let tiles = order
            .iter()
            .map(|&slot| {
                let t = &tiling.tiles[slot];
                debug_assert_eq!(t.slot, slot);
                let (k, strip, first, last) = cut[slot];
                let old = &group.tiles[k];
                let share = strip.len() as f64 / old.strip.len().max(1) as f64;
                PlanTile {
                    device: old.device.clone(),
                    strip,
                    halo_rows: t.stages.iter().map(|s| s.halo_rows).sum(),
                    in_us: if first { old.in_us } else { 0 },
                    compute_us: (old.compute_us as f64 * share).round() as u64,
                    out_us: if last { old.out_us } else { 0 },
                    tile: t.spec(),
                }
            })
            .collect();
        group.tiles = tiles;
    }
}
