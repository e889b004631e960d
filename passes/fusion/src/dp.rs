//! The plain dynamic program over the same costs as the e-graph: with additive group
//! costs the best FLC is a shortest path over the stage boundaries.

use crate::{Cost, Flc, FlcGroup, GroupCosts};
use anyhow::{Result, bail};

/// The cheapest FLC: `best[j + 1] = min over i <= j and choices c of best[i] + cost(i, j, c)`.
pub fn search_dp(table: &impl GroupCosts) -> Result<Flc> {
    let n = table.stages();
    if n == 0 {
        bail!("the model has no stages");
    }
    let mut best: Vec<(Cost, Option<FlcGroup>)> = vec![(Cost::INFINITY, None); n + 1];
    best[0].0 = Cost::ZERO;
    for last in 0..n {
        for first in 0..=last {
            if !best[first].0.is_finite() {
                continue;
            }
            for choice in FlcGroup::choices(first, last, table.options()) {
                let c = best[first].0 + table.cost(choice);
                if c < best[last + 1].0 {
                    best[last + 1] = (c, Some(choice));
                }
            }
        }
    }
    if !best[n].0.is_finite() {
        bail!("no legal fused-layer configuration: some stage fits no device");
    }
    let mut groups = vec![];
    let mut end = n;
    while end > 0 {
        let choice = best[end].1.expect("a finite cost has a choice");
        groups.push(choice);
        end = choice.first;
    }
    groups.reverse();
    Ok(Flc {
        groups,
        cost: best[n].0,
    })
}
