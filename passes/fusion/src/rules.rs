//! The e-graph search (docs/architecture.md, "The fusion search"). An e-class stands for a run of stages
//! `first..=last` computed in some way; the analysis records that span. The start is
//! the unfused chain `(seq g0 (seq g1 (... g(n-1))))` with every legal device option of
//! every single stage; two one-way rules in suffix form fuse adjacent groups, adding
//! every legal device option of the fused group; extraction reads the cost table.
//!
//! Rules (a fused group gets every device option that makes it legal; a span with none
//! gets the infinite placeholder `x0`, so longer legal groups stay reachable):
//!
//! | name        | law                                              |
//! |-------------|--------------------------------------------------|
//! | `fuse-head` | `(seq ?a (seq ?b ?rest)) => (seq (g a..b) ?rest)` |
//! | `fuse-tail` | `(seq ?a ?b) => (g a..b)`, when `?b` holds a group |
//!
//! The associativity form `(seq a (seq b c)) <=> (seq (seq a b) c)` is never used: it
//! grows O(n^3) nodes.

use crate::{Cost, Flc, FlcGroup, GroupCosts};
use anyhow::{Result, bail};
use egg::{
    Analysis, Applier, CostFunction, DidMerge, EGraph, Extractor, Id, Language, PatternAst,
    RecExpr, Rewrite, Runner, SimpleScheduler, StopReason, Subst, Symbol, Var, define_language,
    rewrite,
};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// An [`FlcGroup`] as an e-graph leaf, written `g3-7x2` (`g3-7x2c` split by channels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Leaf(FlcGroup);

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let c = if self.0.channels { "c" } else { "" };
        write!(f, "g{}-{}x{}{c}", self.0.first, self.0.last, self.0.devices)
    }
}

impl FromStr for Leaf {
    type Err = String;
    fn from_str(s: &str) -> Result<Leaf, String> {
        let bad = || format!("`{s}` is not a group like g3-7x2");
        let rest = s.strip_prefix('g').ok_or_else(bad)?;
        let (span, devices) = rest.split_once('x').ok_or_else(bad)?;
        let (first, last) = span.split_once('-').ok_or_else(bad)?;
        let num = |t: &str| t.parse::<usize>().map_err(|_| bad());
        let (devices, channels) = match devices.strip_suffix('c') {
            Some(d) => (d, true),
            None => (devices, false),
        };
        Ok(Leaf(FlcGroup {
            first: num(first)?,
            last: num(last)?,
            devices: num(devices)?,
            channels,
        }))
    }
}

define_language! {
    /// FLCs as terms: `(seq group rest)` and group leaves.
    enum Fusion {
        "seq" = Seq([Id; 2]),
        Group(Leaf),
    }
}

type FusionGraph = EGraph<Fusion, Spans>;

/// The analysis: every e-class's span of stages, plus the legal choices of every span
/// (a bit per choice, in [`FlcGroup::choices`] order) for the rules' conditions.
#[derive(Default)]
struct Spans {
    /// Device options of the table.
    options: usize,
    /// `legal[first][last - first]`: bit `i` set when choice `i` is legal.
    legal: Vec<Vec<u64>>,
}

impl Spans {
    fn choices(&self, first: usize, last: usize) -> impl Iterator<Item = FlcGroup> + use<> {
        let mask = self.legal[first][last - first];
        FlcGroup::choices(first, last, self.options)
            .enumerate()
            .filter(move |(i, _)| mask & (1 << i) != 0)
            .map(|(_, c)| c)
    }
}

impl Analysis<Fusion> for Spans {
    type Data = (usize, usize);

    fn make(egraph: &mut FusionGraph, enode: &Fusion, _id: Id) -> (usize, usize) {
        match enode {
            Fusion::Group(Leaf(c)) => (c.first, c.last),
            Fusion::Seq([a, b]) => (egraph[*a].data.0, egraph[*b].data.1),
        }
    }

    fn merge(&mut self, to: &mut (usize, usize), from: (usize, usize)) -> DidMerge {
        assert_eq!(*to, from, "only equal spans of stages are ever merged");
        DidMerge(false, false)
    }
}

/// Adds every legal option of `first..=last` into one e-class. A span no option makes
/// legal gets the placeholder `x0` instead, which costs infinity: it is never
/// extracted, but longer legal groups built from it stay reachable (legality is not
/// monotone: a memory limit can fail for a short group and pass for a longer one
/// whose shares differ).
fn add_group(egraph: &mut FusionGraph, first: usize, last: usize) -> Id {
    let mut choices: Vec<FlcGroup> = egraph.analysis.choices(first, last).collect();
    if choices.is_empty() {
        choices.push(FlcGroup::rows(first, last, 0));
    }
    let mut class: Option<Id> = None;
    for choice in choices {
        let id = egraph.add(Fusion::Group(Leaf(choice)));
        class = Some(match class {
            Some(c) => {
                egraph.union(c, id);
                egraph.find(c)
            }
            None => id,
        });
    }
    class.expect("at least one node")
}

/// `fuse-head`: `(seq ?a (seq ?b ?rest)) => (seq (g a..b) ?rest)`.
struct FuseHead {
    a: Var,
    b: Var,
    rest: Var,
}

impl Applier<Fusion, Spans> for FuseHead {
    fn apply_one(
        &self,
        egraph: &mut FusionGraph,
        matched: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Fusion>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (first, last) = (egraph[subst[self.a]].data.0, egraph[subst[self.b]].data.1);
        let group = add_group(egraph, first, last);
        let seq = egraph.add(Fusion::Seq([group, subst[self.rest]]));
        if egraph.union(matched, seq) {
            vec![seq]
        } else {
            vec![]
        }
    }
}

/// `fuse-tail`: `(seq ?a ?b) => (g a..b)` when `?b` holds a group.
struct FuseTail {
    a: Var,
    b: Var,
}

impl Applier<Fusion, Spans> for FuseTail {
    fn apply_one(
        &self,
        egraph: &mut FusionGraph,
        matched: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Fusion>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let holds_group = egraph[subst[self.b]]
            .nodes
            .iter()
            .any(|n| matches!(n, Fusion::Group(_)));
        if !holds_group {
            return vec![];
        }
        let (first, last) = (egraph[subst[self.a]].data.0, egraph[subst[self.b]].data.1);
        let group = add_group(egraph, first, last);
        if egraph.union(matched, group) {
            vec![group]
        } else {
            vec![]
        }
    }
}

fn var(name: &str) -> Var {
    name.parse().expect("a pattern variable")
}

/// The rules, one way each.
fn rules() -> Vec<Rewrite<Fusion, Spans>> {
    let (a, b, rest) = (var("?a"), var("?b"), var("?rest"));
    vec![
        rewrite!("fuse-head"; "(seq ?a (seq ?b ?rest))" => { FuseHead { a, b, rest } }),
        rewrite!("fuse-tail"; "(seq ?a ?b)"             => { FuseTail { a, b } }),
    ]
}

/// Extraction cost: a group's cost from the table; a sequence adds its parts.
struct TableCost<'a, T>(&'a T);

impl<T: GroupCosts> CostFunction<Fusion> for TableCost<'_, T> {
    type Cost = Cost;
    fn cost<C>(&mut self, enode: &Fusion, mut costs: C) -> Cost
    where
        C: FnMut(Id) -> Cost,
    {
        match enode {
            Fusion::Seq([a, b]) => costs(*a) + costs(*b),
            Fusion::Group(Leaf(c)) if c.devices == 0 => Cost::INFINITY,
            Fusion::Group(Leaf(c)) => self.0.cost(*c),
        }
    }
}

/// What the e-graph search did.
#[derive(Clone, Debug)]
pub struct EggStats {
    /// Rule iterations until saturation.
    pub iterations: usize,
    /// E-nodes at the end.
    pub nodes: usize,
    /// E-classes at the end.
    pub classes: usize,
}

/// Limits raised well above egg's defaults (10k nodes): the suffix form holds
/// O(n^2 * options) nodes.
const NODE_LIMIT: usize = 5_000_000;
const ITER_LIMIT: usize = 100_000;
const TIME_LIMIT: Duration = Duration::from_secs(600);

/// The cheapest FLC found by saturating the e-graph and extracting once.
pub fn search_egg(table: &impl GroupCosts) -> Result<(Flc, EggStats)> {
    let n = table.stages();
    if n == 0 {
        bail!("the model has no stages");
    }
    if 2 * table.options() > 64 {
        bail!("at most 32 devices are supported");
    }
    let legal = (0..n)
        .map(|first| {
            (first..n)
                .map(|last| {
                    FlcGroup::choices(first, last, table.options())
                        .enumerate()
                        .filter(|(_, c)| table.cost(*c).is_finite())
                        .fold(0u64, |m, (i, _)| m | 1 << i)
                })
                .collect()
        })
        .collect();
    let options = table.options();
    let mut egraph = FusionGraph::new(Spans { options, legal });
    let mut chain: Option<Id> = None;
    for s in (0..n).rev() {
        if egraph.analysis.choices(s, s).next().is_none() {
            bail!("stage {s} fits no device under any option");
        }
        let group = add_group(&mut egraph, s, s);
        chain = Some(match chain {
            None => group,
            Some(rest) => egraph.add(Fusion::Seq([group, rest])),
        });
    }
    let root = chain.expect("at least one stage");
    egraph.rebuild();
    let runner = Runner::default()
        .with_egraph(egraph)
        .with_node_limit(NODE_LIMIT)
        .with_iter_limit(ITER_LIMIT)
        .with_time_limit(TIME_LIMIT)
        .with_scheduler(SimpleScheduler)
        .run(&rules());
    match &runner.stop_reason {
        Some(StopReason::Saturated) => {}
        other => bail!("the e-graph search stopped before saturating: {other:?}"),
    }
    let stats = EggStats {
        iterations: runner.iterations.len(),
        nodes: runner.egraph.total_number_of_nodes(),
        classes: runner.egraph.number_of_classes(),
    };
    let extractor = Extractor::new(&runner.egraph, TableCost(table));
    let (cost, expr) = extractor.find_best(root);
    if !cost.is_finite() {
        bail!("no legal fused-layer configuration");
    }
    let flc = Flc {
        groups: groups_of(&expr),
        cost,
    };
    Ok((flc, stats))
}

/// The groups of an extracted term, in stage order.
fn groups_of(expr: &RecExpr<Fusion>) -> Vec<FlcGroup> {
    fn walk(expr: &RecExpr<Fusion>, id: Id, out: &mut Vec<FlcGroup>) {
        match &expr[id] {
            Fusion::Group(Leaf(c)) => out.push(*c),
            node => node.for_each(|child| walk(expr, child, out)),
        }
    }
    let mut out = vec![];
    let root = Id::from(expr.as_ref().len() - 1);
    walk(expr, root, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cost table from a closure over (first, last, devices); no channel splits.
    struct Table<F>(usize, usize, F);
    impl<F: Fn(usize, usize, usize) -> Cost> GroupCosts for Table<F> {
        fn stages(&self) -> usize {
            self.0
        }
        fn options(&self) -> usize {
            self.1
        }
        fn cost(&self, c: FlcGroup) -> Cost {
            match c.channels {
                true => Cost::INFINITY,
                false => (self.2)(c.first, c.last, c.devices),
            }
        }
    }

    /// A cost table from a closure over whole choices.
    struct Choices<F>(usize, usize, F);
    impl<F: Fn(FlcGroup) -> Cost> GroupCosts for Choices<F> {
        fn stages(&self) -> usize {
            self.0
        }
        fn options(&self) -> usize {
            self.1
        }
        fn cost(&self, c: FlcGroup) -> Cost {
            (self.2)(c)
        }
    }

    fn c(first: usize, last: usize, devices: usize) -> FlcGroup {
        FlcGroup::rows(first, last, devices)
    }

    #[test]
    fn groups_print_and_parse() {
        let g: Leaf = "g3-7x2".parse().unwrap();
        assert_eq!(g.0, c(3, 7, 2));
        assert_eq!(g.to_string(), "g3-7x2");
        let by_channels: Leaf = "g3-3x4c".parse().unwrap();
        assert_eq!(
            by_channels.0,
            FlcGroup {
                channels: true,
                ..c(3, 3, 4)
            }
        );
        assert_eq!(by_channels.to_string(), "g3-3x4c");
        assert!("g3x2".parse::<Leaf>().is_err());
        assert!("h3-7x2".parse::<Leaf>().is_err());
    }

    /// fuse-head: `(seq g0 (seq g1 g2))` reaches `(seq g0-1 g2)` when fusing is cheaper.
    #[test]
    fn fuse_head_fuses_a_cheap_pair() {
        let t = Table(3, 1, |f, l, _| match (f, l) {
            (0, 1) => Cost::from_us(1.0),
            (a, b) if a == b => Cost::from_us(10.0),
            _ => Cost::INFINITY,
        });
        let (flc, stats) = search_egg(&t).unwrap();
        assert_eq!(flc.groups, vec![c(0, 1, 1), c(2, 2, 1)]);
        assert_eq!(flc.cost, Cost::from_us(11.0));
        assert!(stats.iterations >= 1);
    }

    /// fuse-tail: `(seq g1 g2)` reaches `(g 1-2)`.
    #[test]
    fn fuse_tail_fuses_the_last_pair() {
        let t = Table(3, 1, |f, l, _| match (f, l) {
            (1, 2) => Cost::from_us(1.0),
            (a, b) if a == b => Cost::from_us(10.0),
            _ => Cost::INFINITY,
        });
        let (flc, _) = search_egg(&t).unwrap();
        assert_eq!(flc.groups, vec![c(0, 0, 1), c(1, 2, 1)]);
    }

    /// An illegal fusion is never produced, however cheap it would be: stage 1 is a
    /// barrier, so nothing spanning it is legal with 2 devices, and only option 1 exists
    /// for it.
    #[test]
    fn illegal_fusions_are_never_found() {
        let t = Table(3, 2, |f, l, k| {
            let spans_barrier = f <= 1 && 1 <= l;
            match (spans_barrier, k) {
                (true, 2) => Cost::INFINITY,
                (_, 2) => Cost::from_us(2.0),
                (_, _) => Cost::from_us(5.0 * (l - f + 1) as f64),
            }
        });
        let (flc, stats) = search_egg(&t).unwrap();
        assert_eq!(flc.groups, vec![c(0, 0, 2), c(1, 1, 1), c(2, 2, 2)]);
        assert_eq!(flc.cost, Cost::from_us(9.0));
        assert!(stats.nodes > 0);
    }

    /// A legal group whose sub-groups are all illegal is still reached (through the
    /// `x0` placeholders).
    #[test]
    fn a_legal_group_of_illegal_parts_is_reached() {
        let t = Table(3, 1, |f, l, _| match (f, l) {
            (0, 2) => Cost::from_us(1.0),
            (a, b) if a == b => Cost::from_us(10.0),
            _ => Cost::INFINITY,
        });
        let (flc, _) = search_egg(&t).unwrap();
        assert_eq!(flc.groups, vec![c(0, 2, 1)]);
    }

    /// Channel splits are choices beside the row splits, and both searches take one
    /// where it is cheapest: stage 2 (an FC layer) by channels on 3 devices.
    #[test]
    fn a_channel_split_is_chosen_where_it_is_cheapest() {
        let t = Choices(3, 3, |g: FlcGroup| {
            match (g.first, g.last, g.devices, g.channels) {
                (0, 1, 3, false) => Cost::from_us(10.0),
                (2, 2, 3, true) => Cost::from_us(4.0),
                (2, 2, 2, true) => Cost::from_us(6.0),
                (2, 2, 1, false) => Cost::from_us(9.0),
                (a, b, 1, false) => Cost::from_us(20.0 * (b - a + 1) as f64),
                _ => Cost::INFINITY,
            }
        });
        let (flc, _) = search_egg(&t).unwrap();
        let by_channels = FlcGroup {
            channels: true,
            ..c(2, 2, 3)
        };
        assert_eq!(flc.groups, vec![c(0, 1, 3), by_channels]);
        assert_eq!(flc.cost, Cost::from_us(14.0));
        assert_eq!(crate::search_dp(&t).unwrap(), flc);
    }

    /// A stage with no legal option is an error naming the stage.
    #[test]
    fn a_stage_that_fits_nowhere_is_an_error() {
        let t = Table(2, 1, |f, _, _| {
            if f == 1 {
                Cost::INFINITY
            } else {
                Cost::from_us(1.0)
            }
        });
        let err = search_egg(&t).unwrap_err().to_string();
        assert!(err.contains("stage 1 fits no device"), "{err}");
    }
}
