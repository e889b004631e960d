//! FLCs for a stream of frames (docs/architecture.md, "Serving a stream"). When frames
//! overlap on the boards, a plan's rate is bounded by its busiest board, the sum of
//! that board's time over every group, not by the sum of the groups' latencies. Such a
//! bound is not a sum over groups, so it is searched by weights: each board's time in a
//! group is weighed by how loaded the last FLC left that board, and the weights move
//! toward the busiest boards round after round (multiplicative weights).

use crate::table::DeviceCost;
use crate::{Cost, CostTable, Flc, FlcGroup, GroupCosts, search_dp};
use anyhow::Result;

/// A device's time in a group, µs: input, compute and output.
fn busy_us(d: &DeviceCost) -> f64 {
    d.in_us + d.compute_us + d.out_us
}

/// Per device of `table` (profile order), its time in every group of `flc`, µs: input,
/// compute and output, as the table has them.
pub fn board_loads(table: &CostTable, flc: &Flc) -> Vec<f64> {
    let mut loads = vec![0.0; table.device_order().len()];
    for entry in flc.groups.iter().filter_map(|g| table.entry(*g)) {
        for d in &entry.devices {
            loads[d.device.index()] += busy_us(d);
        }
    }
    loads
}

/// The distinct FLCs of `rounds` searches whose group cost is the weighed sum of each
/// board's time in the group; the first round weighs every board alike (the least
/// work in all), each next one raises a board's weight by its load over the busiest
/// board's in the FLC before. Each FLC is costed by `table` (the sum of its groups'
/// latencies). Empty when `rounds` is 0.
pub fn balanced_flcs(table: &CostTable, rounds: usize) -> Result<Vec<Flc>> {
    let mut weights = vec![1.0; table.device_order().len()];
    let mut found: Vec<Flc> = vec![];
    for _ in 0..rounds {
        let weighed = search_dp(&Weighed {
            table,
            weights: &weights,
        })?;
        let flc = Flc::new(table, weighed.groups);
        let loads = board_loads(table, &flc);
        let busiest = loads.iter().cloned().fold(0.0, f64::max);
        if busiest > 0.0 {
            for (w, load) in weights.iter_mut().zip(&loads) {
                *w *= 1.0 + load / busiest;
            }
            let mean = weights.iter().sum::<f64>() / weights.len() as f64;
            weights.iter_mut().for_each(|w| *w /= mean);
        }
        if !found.iter().any(|f| f.groups == flc.groups) {
            found.push(flc);
        }
    }
    Ok(found)
}

/// `table`'s legal choices, each costed as its boards' weighed times.
struct Weighed<'a> {
    table: &'a CostTable,
    weights: &'a [f64],
}

impl GroupCosts for Weighed<'_> {
    fn stages(&self) -> usize {
        self.table.stages()
    }

    fn options(&self) -> usize {
        self.table.options()
    }

    fn cost(&self, choice: FlcGroup) -> Cost {
        match self.table.entry(choice) {
            Some(entry) if entry.cost.is_finite() => Cost::from_us(
                entry
                    .devices
                    .iter()
                    .map(|d| self.weights[d.device.index()] * busy_us(d))
                    .sum(),
            ),
            _ => Cost::INFINITY,
        }
    }
}
