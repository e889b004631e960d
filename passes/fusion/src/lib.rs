//! Fusion pass: picks the fused-layer configuration (FLC) of a model on a cluster
//! (docs/architecture.md, "The fusion search").
//!
//! On entry: a [`GroupCosts`] table, the cost of every candidate group `first..=last`
//! for every device option (1 = the best single device, which may run barrier stages
//! and whole runs of stages; `k >= 2` = the `k` fastest devices splitting the group's
//! rows, or its last stage's output channels), with [`Cost::INFINITY`] for an illegal
//! choice. [`CostTable`] builds one from
//! the cost pass's predictions or from an FSS profile's measurements.
//!
//! On exit: an [`Flc`], groups covering the stages in order, each with its device
//! option, and its total cost. [`search_egg`] finds it with an e-graph (the rules are in
//! `rules.rs`), [`search_dp`] with a shortest-path dynamic program over the same costs;
//! both reach the same optimum. [`wild_card`] merges the adjacent pair of groups that
//! raises the cost least. [`Flc::no_fusion`] and [`Flc::one_block`] build the paper's
//! baselines on the same table. [`Placement`] makes an FLC concrete: the strips each
//! group runs, cut again in order when boards run their programs. [`balanced_flcs`]
//! searches FLCs for a stream of frames, where the busiest board bounds the rate, and
//! [`spread`] moves their groups onto alike boards so that every board works.

mod balance;
mod baselines;
mod cost;
mod dp;
mod place;
mod rules;
mod table;
mod wildcard;

pub use balance::{Boards, alike, balanced_flcs, board_loads, spread};
pub use cost::Cost;
pub use dp::search_dp;
pub use place::Placement;
pub use rules::{EggStats, search_egg};
pub use table::{CostTable, DeviceCost, Entry, Legality, device_order};
pub use wildcard::{WildCard, wild_card};

use std::fmt;

/// The cost of every candidate group under every device option.
pub trait GroupCosts {
    /// Stages of the model, in topological order.
    fn stages(&self) -> usize;
    /// Device options: 1 ..= this.
    fn options(&self) -> usize;
    /// The cost of `choice`; [`Cost::INFINITY`] when illegal.
    fn cost(&self, choice: FlcGroup) -> Cost;
}

/// One group of an FLC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlcGroup {
    /// First stage.
    pub first: usize,
    /// Last stage.
    pub last: usize,
    /// Device option: 1 = the best single device, `k` = the `k` fastest.
    pub devices: usize,
    /// With `k >= 2` devices: split by the last stage's output channels rather than
    /// by rows.
    pub channels: bool,
}

impl FlcGroup {
    /// Stages `first..=last` under option `devices`, split by rows (or run whole).
    pub fn rows(first: usize, last: usize, devices: usize) -> FlcGroup {
        FlcGroup {
            first,
            last,
            devices,
            channels: false,
        }
    }

    /// Every choice for stages `first..=last` with `options` device options: each
    /// option by rows (option 1: whole), then options `2..` by channels.
    pub fn choices(first: usize, last: usize, options: usize) -> impl Iterator<Item = FlcGroup> {
        let rows = (1..=options).map(move |k| FlcGroup::rows(first, last, k));
        let channels = (2..=options).map(move |k| FlcGroup {
            channels: true,
            ..FlcGroup::rows(first, last, k)
        });
        rows.chain(channels)
    }
}

impl fmt::Display for FlcGroup {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}..{} x{}", self.first, self.last, self.devices)?;
        if self.channels {
            write!(f, " by channels")?;
        }
        Ok(())
    }
}

/// A fused-layer configuration: groups covering stages `0..n` in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flc {
    /// The groups, in stage order.
    pub groups: Vec<FlcGroup>,
    /// The sum of their costs.
    pub cost: Cost,
}

impl Flc {
    /// Builds an FLC from its groups, costed by `table`.
    pub fn new(table: &impl GroupCosts, groups: Vec<FlcGroup>) -> Flc {
        let cost = groups
            .iter()
            .fold(Cost::ZERO, |sum, g| sum + table.cost(*g));
        Flc { groups, cost }
    }

    /// True when the groups cover `0..stages` in order with legal choices.
    pub fn is_valid(&self, table: &impl GroupCosts) -> bool {
        let mut next = 0;
        for g in &self.groups {
            if g.first != next
                || g.last < g.first
                || g.devices == 0
                || g.devices > table.options()
                || (g.channels && g.devices < 2)
            {
                return false;
            }
            next = g.last + 1;
        }
        next == table.stages() && self.cost.is_finite()
    }
}

impl fmt::Display for Flc {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let groups: Vec<String> = self.groups.iter().map(FlcGroup::to_string).collect();
        write!(f, "[{}] {}", groups.join(", "), self.cost)
    }
}
