//! egg against the dynamic program: on random cost tables and on the cost tables of
//! every generated model (predicted from a synthetic profile), both reach the same
//! optimum, and every FLC they return is a legal cover of the stages.

use legion_fusion::{Cost, Flc, FlcGroup, GroupCosts, search_dp, search_egg, wild_card};
use proptest::prelude::*;

/// A random table: `stages` stages, `options` device options, each choice split by rows
/// and (2 devices or more) by channels; a cost of 0 marks an illegal choice; option 1
/// of a single stage is always legal so a cover exists.
#[derive(Debug, Clone)]
struct RandomTable {
    stages: usize,
    options: usize,
    costs: Vec<u64>,
}

impl RandomTable {
    /// Choices per group: by rows on 1..=options devices, by channels on 2..=options.
    fn choices(options: usize) -> usize {
        2 * options - 1
    }

    fn at_choice(&self, c: FlcGroup) -> u64 {
        let index = match c.channels {
            false => c.devices - 1,
            true => self.options + c.devices - 2,
        };
        let per_group = RandomTable::choices(self.options);
        self.costs[(c.first * self.stages + c.last) * per_group + index]
    }
}

impl GroupCosts for RandomTable {
    fn stages(&self) -> usize {
        self.stages
    }
    fn options(&self) -> usize {
        self.options
    }
    fn cost(&self, g: FlcGroup) -> Cost {
        let c = self.at_choice(g);
        if c == 0 && !(g.first == g.last && g.devices == 1 && !g.channels) {
            Cost::INFINITY
        } else {
            Cost::from_ns(c)
        }
    }
}

fn tables() -> impl Strategy<Value = RandomTable> {
    (1usize..14, 1usize..5).prop_flat_map(|(stages, options)| {
        // 0 = illegal (a quarter of the time), else a cost in 1..10^6 ns.
        let cost = prop_oneof![1 => Just(0u64), 3 => 1u64..1_000_000];
        let len = stages * stages * RandomTable::choices(options);
        proptest::collection::vec(cost, len).prop_map(move |costs| RandomTable {
            stages,
            options,
            costs,
        })
    })
}

/// The optimum by brute force over every cover (for small tables).
fn brute_force(t: &RandomTable) -> Cost {
    fn best(t: &RandomTable, from: usize) -> Cost {
        if from == t.stages {
            return Cost::ZERO;
        }
        let mut b = Cost::INFINITY;
        for last in from..t.stages {
            for c in FlcGroup::choices(from, last, t.options) {
                b = b.min(t.cost(c) + best(t, last + 1));
            }
        }
        b
    }
    best(t, 0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn egg_and_dp_reach_the_same_optimum(t in tables()) {
        let dp = search_dp(&t).unwrap();
        let (egg, _) = search_egg(&t).unwrap();
        prop_assert_eq!(egg.cost, dp.cost);
        prop_assert!(dp.is_valid(&t), "dp: {}", dp);
        prop_assert!(egg.is_valid(&t), "egg: {}", egg);
        prop_assert_eq!(Flc::new(&t, egg.groups.clone()).cost, egg.cost);
        if t.stages <= 8 {
            prop_assert_eq!(dp.cost, brute_force(&t));
        }
    }

    #[test]
    fn wild_card_merges_one_adjacent_pair(t in tables()) {
        let dp = search_dp(&t).unwrap();
        match wild_card(&t, &dp) {
            Some(w) => {
                prop_assert_eq!(w.flc.groups.len(), dp.groups.len() - 1);
                prop_assert!(w.flc.is_valid(&t));
                prop_assert!(w.flc.cost >= dp.cost, "the optimum cannot be beaten");
                let merged = w.flc.groups[w.merged];
                prop_assert_eq!(merged.first, dp.groups[w.merged].first);
                prop_assert_eq!(merged.last, dp.groups[w.merged + 1].last);
                prop_assert_eq!(Flc::new(&t, w.flc.groups.clone()).cost, w.flc.cost);
            }
            None => {
                // No pair can merge legally.
                for pair in dp.groups.windows(2) {
                    for c in FlcGroup::choices(pair[0].first, pair[1].last, t.options) {
                        prop_assert!(!t.cost(c).is_finite());
                    }
                }
            }
        }
    }
}

#[test]
fn wild_card_picks_the_cheapest_merge() {
    // Singletons cost 10 each; merging 0..1 costs 25 (raise 5), 1..2 costs 22 (raise 2).
    let t = RandomTable {
        stages: 3,
        options: 1,
        costs: {
            let mut c = vec![0; 9];
            c[0] = 10; // 0..0
            c[4] = 10; // 1..1
            c[8] = 10; // 2..2
            c[1] = 25; // 0..1
            c[5] = 22; // 1..2
            c
        },
    };
    let dp = search_dp(&t).unwrap();
    assert_eq!(dp.cost, Cost::from_ns(30));
    let w = wild_card(&t, &dp).unwrap();
    assert_eq!(w.merged, 1);
    assert_eq!(
        w.flc.groups,
        vec![FlcGroup::rows(0, 0, 1), FlcGroup::rows(1, 2, 1)]
    );
    assert_eq!(w.flc.cost, Cost::from_ns(32));
}
