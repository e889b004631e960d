//! Wild Card (the paper's hedge against prediction error): from the extracted FLC,
//! merge the adjacent pair of groups whose merge raises the cost least.

use crate::{Cost, Flc, FlcGroup, GroupCosts};

/// The Wild Card FLC and the merge that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WildCard {
    /// Index (in the extracted FLC) of the first group of the merged pair.
    pub merged: usize,
    /// The FLC with that pair merged into one group under its cheapest device option.
    pub flc: Flc,
}

/// The cheapest legal merge of two adjacent groups of `flc`; `None` when `flc` has one
/// group or no adjacent pair can legally merge.
pub fn wild_card(table: &impl GroupCosts, flc: &Flc) -> Option<WildCard> {
    let mut best: Option<(Cost, usize, FlcGroup)> = None;
    for (i, pair) in flc.groups.windows(2).enumerate() {
        let (first, last) = (pair[0].first, pair[1].last);
        let merged = FlcGroup::choices(first, last, table.options())
            .min_by_key(|c| (table.cost(*c), c.devices, c.channels))
            .expect("at least one device option");
        let cost = table.cost(merged);
        if !cost.is_finite() {
            continue;
        }
        // Total after the merge: the others are unchanged, so compare merged costs.
        let others = flc
            .groups
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != i && *k != i + 1)
            .fold(Cost::ZERO, |s, (_, g)| s + table.cost(*g));
        let total = others + cost;
        if best.is_none_or(|(b, _, _)| total < b) {
            best = Some((total, i, merged));
        }
    }
    let (cost, merged, choice) = best?;
    let mut groups = flc.groups.clone();
    groups.splice(merged..merged + 2, [choice]);
    Some(WildCard {
        merged,
        flc: Flc { groups, cost },
    })
}
