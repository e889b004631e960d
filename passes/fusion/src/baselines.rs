//! The fused-layer configurations the paper compares Legion with, built on the same
//! cost table as the search so that they are costed and emitted alike.

use crate::{Flc, FlcGroup, GroupCosts};
use legion_ir::Ir;

impl Flc {
    /// No fusion: every stage its own group, split over the most devices the table
    /// allows for it.
    pub fn no_fusion(ir: &Ir, table: &impl GroupCosts) -> Flc {
        let groups = (0..ir.stages.len()).map(|s| widest(table, s, s)).collect();
        Flc::new(table, groups)
    }

    /// One block: each run of splittable stages fused into one group (DeepThings' fused
    /// tile partition), split over the most devices the table allows; every barrier
    /// stage a group of its own.
    pub fn one_block(ir: &Ir, table: &impl GroupCosts) -> Flc {
        let mut groups = vec![];
        let mut s = 0;
        while s < ir.stages.len() {
            let mut last = s;
            if ir.stages[s].is_splittable() {
                while last + 1 < ir.stages.len() && ir.stages[last + 1].is_splittable() {
                    last += 1;
                }
            }
            groups.push(widest(table, s, last));
            s = last + 1;
        }
        Flc::new(table, groups)
    }
}

/// The legal choice for stages `first..=last` with the most devices, split by rows as
/// the paper's baselines are; one device when none is legal (the FLC's cost is then
/// infinite).
fn widest(table: &impl GroupCosts, first: usize, last: usize) -> FlcGroup {
    (1..=table.options())
        .rev()
        .map(|devices| FlcGroup::rows(first, last, devices))
        .find(|c| table.cost(*c).is_finite())
        .unwrap_or(FlcGroup::rows(first, last, 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cost;
    use legion_ir::import;

    /// Every choice legal on up to 3 devices, except stages split by a barrier.
    struct Costs(usize);

    impl GroupCosts for Costs {
        fn stages(&self) -> usize {
            self.0
        }
        fn options(&self) -> usize {
            3
        }
        fn cost(&self, c: FlcGroup) -> Cost {
            match c.channels {
                true => Cost::INFINITY,
                false => Cost::from_us(((c.last - c.first + 1) * 10 / c.devices) as f64),
            }
        }
    }

    #[test]
    fn baselines_cover_the_model_with_the_widest_legal_choices() {
        let ir = import(&legion_models::test_model("tiny-cnn").unwrap(), None).unwrap();
        let n = ir.stages.len();
        let table = Costs(n);
        let none = Flc::no_fusion(&ir, &table);
        assert_eq!(none.groups.len(), n);
        assert!(
            none.groups
                .iter()
                .all(|g| g.first == g.last && g.devices == 3)
        );
        let block = Flc::one_block(&ir, &table);
        assert!(block.is_valid(&table));
        for g in &block.groups {
            let splittable = (g.first..=g.last).all(|s| ir.stages[s].is_splittable());
            assert!(splittable || g.first == g.last, "{g}: a barrier runs alone");
            // A run ends only at a barrier or at the model's end.
            if splittable && g.last + 1 < n {
                assert!(!ir.stages[g.last + 1].is_splittable(), "{g} stops early");
            }
        }
    }
}
