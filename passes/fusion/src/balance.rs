//! FLCs for a stream of frames (docs/architecture.md, "Serving a stream"). When frames
//! overlap on the boards, a plan's rate is bounded by its busiest board, the sum of
//! that board's time over every group, not by the sum of the groups' latencies. Such a
//! bound is not a sum over groups, so it is searched by weights: each board's time in a
//! group is weighed by how loaded the last FLC left that board, and the weights move
//! toward the busiest boards round after round (multiplicative weights). The table
//! puts every group on its option's fastest boards; [`spread`] moves groups onto other
//! boards of the same class, which the table costs alike, so that every board works.

use crate::table::DeviceCost;
use crate::{Cost, CostTable, Flc, FlcGroup, GroupCosts, search_dp};
use anyhow::Result;
use legion_plan::{DeviceId, Profile};

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

/// Per device of `profile` (profile order), its class of alike devices: devices
/// profiled as one (each in the other's `profiled_with`) of one class, rate and link
/// share a class, and the cost table costs them alike. Numbered from 0 by first device.
pub fn alike(profile: &Profile) -> Vec<usize> {
    let devices = &profile.devices;
    let mut classes: Vec<usize> = vec![];
    for (i, d) in devices.iter().enumerate() {
        let same = devices[..i].iter().position(|e| {
            d.class.is_some()
                && e.class == d.class
                && e.gflops == d.gflops
                && e.link == d.link
                && d.profiled_with.contains(&e.name)
                && e.profiled_with.contains(&d.name)
        });
        let class = match same {
            Some(j) => classes[j],
            None => classes.iter().max().map_or(0, |m| m + 1),
        };
        classes.push(class);
    }
    classes
}

/// Which board runs each device's part of each group of an FLC. The cost table places
/// a group on its option's fastest devices; boards alike ([`alike`]) are
/// interchangeable there.
#[derive(Clone, Debug, PartialEq)]
pub struct Boards(Vec<Vec<DeviceId>>);

impl Boards {
    /// The board that runs device `d`'s part of group `g` (the `g`-th of the FLC).
    pub fn board(&self, g: usize, d: DeviceId) -> DeviceId {
        self.0.get(g).map_or(d, |boards| boards[d.index()])
    }
}

/// `flc`'s groups spread over alike boards (`alike`, per device of `table`'s profile):
/// in group order, the devices of each class a group uses (a split group's option's,
/// even those the table's strips left out) move to as many of the least loaded boards
/// of that class (its own on a tie), in the same order, so that strips keep their
/// neighbours and a stream's work lands on every board of a class rather than on the
/// first `k` of them. `None` when nothing moves.
pub fn spread(table: &CostTable, flc: &Flc, alike: &[usize]) -> Option<Boards> {
    let n = table.device_order().len();
    let mut loads = vec![0.0f64; n];
    let mut boards = vec![];
    let mut moved = false;
    for choice in &flc.groups {
        let mut on: Vec<DeviceId> = (0..n).map(DeviceId).collect();
        if let Some(entry) = table.entry(*choice) {
            let mut devices: Vec<usize> = match entry.whole {
                true => entry.devices.iter().map(|p| p.device.index()).collect(),
                false => table.device_order()[..choice.devices]
                    .iter()
                    .map(|d| d.index())
                    .collect(),
            };
            devices.sort_unstable();
            let mut classes: Vec<usize> = devices.iter().map(|&d| alike[d]).collect();
            classes.dedup();
            for class in classes {
                let own: Vec<usize> = devices
                    .iter()
                    .copied()
                    .filter(|&d| alike[d] == class)
                    .collect();
                let mut free: Vec<usize> = (0..n).filter(|&b| alike[b] == class).collect();
                free.sort_by(|&x, &y| {
                    loads[x]
                        .total_cmp(&loads[y])
                        .then(own.contains(&y).cmp(&own.contains(&x)))
                        .then(x.cmp(&y))
                });
                free.truncate(own.len());
                free.sort_unstable();
                for (&d, &b) in own.iter().zip(&free) {
                    on[d] = DeviceId(b);
                    moved |= b != d;
                }
            }
            for p in &entry.devices {
                loads[on[p.device.index()].index()] += busy_us(p);
            }
        }
        boards.push(on);
    }
    moved.then_some(Boards(boards))
}
