//! Compiling for throughput (docs/architecture.md, "Serving a stream"): the cluster is
//! cut into sub-clusters, each running its own plan on its own frames. Every subset of
//! the boards gets a plan compiled by prediction, with candidates searched for a stream
//! beside the one for latency; every cut of the boards into subsets (and boards left
//! idle) is scored by the frames per second its plans predict together, at most what
//! the coordinator's link carries, and the best cut whose every plan meets the latency
//! budget is kept.

use crate::{BadInput, CompileOptions, PassTimes, boards_of, compile};
use anyhow::{Context, Result};
use legion_ir::Ir;
use legion_plan::{
    Candidate, Cluster, Plan, Profile, SERVING_VERSION, ServingPlan, SubCluster, Transport,
};

/// The most boards a cluster may have for a throughput compile: every subset is
/// compiled (2^n - 1 plans) and every cut scored (the Bell number of n + 1).
pub const MAX_SERVING_BOARDS: usize = 10;

/// How long a frame may take, on the predicted clock.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LatencyBudget {
    /// Microseconds.
    Absolute(u64),
    /// A multiple of the best plan over every board's predicted latency.
    Relative(f64),
}

impl std::str::FromStr for LatencyBudget {
    type Err = String;

    /// `500` (milliseconds) or `1.5x` (times the best plan over every board).
    fn from_str(s: &str) -> Result<LatencyBudget, String> {
        let bad = || format!("latency budget {s:?}: give milliseconds (500) or a multiple (1.5x)");
        let budget = match s.strip_suffix('x') {
            Some(factor) => LatencyBudget::Relative(factor.parse().map_err(|_| bad())?),
            None => {
                LatencyBudget::Absolute((s.parse::<f64>().map_err(|_| bad())? * 1e3).round() as u64)
            }
        };
        match budget {
            LatencyBudget::Relative(f) if !(f.is_finite() && f > 0.0) => Err(bad()),
            LatencyBudget::Absolute(0) => Err(bad()),
            _ => Ok(budget),
        }
    }
}

/// A subset of the boards (bit i: the cluster's device i) and its plan.
struct Compiled {
    plan: Plan,
    /// Per candidate of the plan, the chosen one first, and per depth (frames in
    /// flight, from 1), the predicted stream.
    streams: Vec<Streamed>,
    /// Seconds of the coordinator's link one frame takes (its input and outputs, or
    /// through the hub every strip).
    coordinator_s: f64,
}

/// A candidate's predicted stream at one depth ([`predict_candidates`]).
#[derive(Clone, Copy, Debug)]
pub struct Streamed {
    /// The plan's candidate streamed (index into its candidates).
    pub candidate: usize,
    /// Frames in flight.
    pub depth: usize,
    /// The longest frame latency in the stream, µs.
    pub latency_us: u64,
    /// Frames per second.
    pub fps: f64,
}

impl Compiled {
    /// The candidate and depth with the most frames per second whose latency is within
    /// `budget_us` (the chosen candidate and the shallower depth of equals).
    fn within(&self, budget_us: u64) -> Option<Streamed> {
        best_within(&self.streams, budget_us)
    }

    /// Of `candidate`'s depths, the one [`Compiled::within`] would choose.
    fn within_candidate(&self, candidate: usize, budget_us: u64) -> Option<Streamed> {
        let streams: Vec<Streamed> = self
            .streams
            .iter()
            .filter(|s| s.candidate == candidate)
            .copied()
            .collect();
        best_within(&streams, budget_us)
    }

    /// One frame after the other: the plan's predicted latency.
    fn alone(&self) -> Streamed {
        self.streams[0]
    }
}

/// Of `streams` (by candidate, then depth), the one with the most frames per second
/// whose latency is within `budget_us`, where a later one must be [`DEPTH_GAIN`]
/// faster than the earlier to be kept (each frame in flight costs latency and the
/// boards' memory; a candidate after the first gives up latency).
pub fn best_within(streams: &[Streamed], budget_us: u64) -> Option<Streamed> {
    streams
        .iter()
        .filter(|s| s.latency_us <= budget_us)
        .fold(None, |best: Option<Streamed>, s| match best {
            Some(b) if s.fps < b.fps * DEPTH_GAIN => Some(b),
            _ => Some(*s),
        })
}

/// How much faster a deeper pipeline, or another candidate, must be than the one before
/// to be chosen.
pub const DEPTH_GAIN: f64 = 1.02;

/// Rounds of the search for a stream ([`legion_fusion::balanced_flcs`]) a throughput
/// compile runs per subset of the boards unless told otherwise
/// ([`crate::StreamFlcs::All`]), and a latency compile by default
/// ([`crate::StreamFlcs::Faster`]).
pub const STREAM_ROUNDS: usize = 6;

/// Frames in flight a throughput compile tries per sub-cluster (1 to this): VGG-16's
/// plan over 6 Fireflies predicts its most frames per second from depth 4 on (5.52 at
/// 4, 5.34 at 3 over 256 frames); every frame in flight costs latency and a board's
/// memory for its tensors.
pub const MAX_DEPTH: usize = 4;

/// Frames of a predicted stream ([`legion_plan::network::StreamTimes::fps`]: over 16
/// frames, 0.3-1.3% below the rate of 256 frames on the bench's plans at depths 2-3).
const PREDICTED_FRAMES: usize = 16;

/// Cuts `cluster` into sub-clusters for the most predicted frames per second within
/// `budget`, each with a plan compiled by prediction from `profile` with `options`
/// (with [`crate::StreamFlcs::All`], every FLC searched for a stream is predicted in a
/// stream), the candidate it runs and the
/// number of frames it keeps in flight (up to [`MAX_DEPTH`] when its boards run
/// their programs, so frames overlap on them; the budget bounds a frame's latency in
/// the stream).
/// `progress` is called after each subset's plan with (done, total).
pub fn compile_serving(
    ir: &Ir,
    profile: &Profile,
    cluster: &Cluster,
    options: &CompileOptions,
    budget: LatencyBudget,
    mut progress: impl FnMut(usize, usize),
) -> Result<ServingPlan> {
    let n = cluster.devices.len();
    if n > MAX_SERVING_BOARDS {
        return Err(BadInput(format!(
            "a throughput compile tries every subset of the boards; {n} boards are more than \
             {MAX_SERVING_BOARDS}"
        ))
        .into());
    }
    let total = (1usize << n) - 1;
    let mut plans: Vec<Option<Compiled>> = (0..=total).map(|_| None).collect();
    for (done, mask) in (1..=total).enumerate() {
        let mut sub = cluster.clone();
        sub.devices = (0..n)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| cluster.devices[i].clone())
            .collect();
        let names: Vec<&str> = sub.devices.iter().map(|d| d.name.as_str()).collect();
        let cut = boards_of(profile, &sub)?;
        let compiled = compile(ir, &cut, &sub, options, None, &mut PassTimes::default())
            .with_context(|| format!("compiling for {}", names.join(",")));
        let plan = match compiled {
            Ok(compiled) => compiled
                .plan
                .ok_or_else(|| BadInput("compile stopped before making a plan".into()))?,
            // These boards have no plan (the model fits none of their tiles in memory):
            // no sub-cluster of them; the whole cluster's plan is needed.
            Err(e) if mask != total => {
                tracing::info!("no sub-cluster of {}: {e:#}", names.join(","));
                progress(done + 1, total);
                continue;
            }
            Err(e) => return Err(e),
        };
        let traffic = legion_codegen::traffic(ir, plan.chosen());
        let bytes = match options.transport {
            Transport::Programs => traffic.coordinator,
            Transport::Hub => traffic.hub,
        };
        let streams = predict_candidates(ir, &cut, &plan, options.transport)
            .with_context(|| format!("predicting a stream on {}", names.join(",")))?;
        plans[mask] = Some(Compiled {
            streams,
            coordinator_s: bytes as f64 * 8.0 / (cluster.coordinator.mbps * 1e6),
            plan,
        });
        progress(done + 1, total);
    }
    let single_plan_us = plans[total]
        .as_ref()
        .map_or(u64::MAX, |c| c.alone().latency_us);
    let budget_us = match budget {
        LatencyBudget::Absolute(us) => us,
        LatencyBudget::Relative(f) => (single_plan_us as f64 * f).round() as u64,
    };
    // Every board on its own frames, each at its best depth.
    let data_parallel_fps: f64 = (0..n)
        .filter_map(|i| plans[1 << i].as_ref()?.within(u64::MAX))
        .map(|s| s.fps)
        .sum();
    // Per subset, its best stream within the budget; boards without a plan, or whose
    // plan misses the budget, never make a block.
    let chosen: Vec<Option<Streamed>> = plans
        .iter()
        .map(|c| c.as_ref().and_then(|c| c.within(budget_us)))
        .collect();
    let latency = |mask: usize| chosen[mask].map_or(u64::MAX, |s| s.latency_us);
    let rate = |mask: usize| chosen[mask].map_or(0.0, |s| s.fps);
    let coordinator = |mask: usize| plans[mask].as_ref().map_or(0.0, |c| c.coordinator_s);
    let best = best_cut(n, &latency, &rate, &coordinator, budget_us).ok_or_else(|| {
        BadInput(format!(
            "no sub-cluster meets the latency budget of {:.1} ms: the best plan over every \
             board predicts {:.1} ms",
            budget_us as f64 / 1e3,
            single_plan_us as f64 / 1e3
        ))
    })?;
    let names = |mask: usize| -> Vec<String> {
        (0..n)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| cluster.devices[i].name.clone())
            .collect()
    };
    let idle_mask = total & !best.blocks.iter().fold(0, |a, b| a | b);
    let predicted_latency_us = best.blocks.iter().map(|&m| latency(m)).max().unwrap_or(0);
    let mut sub_clusters = vec![];
    for &mask in &best.blocks {
        let mut compiled = plans[mask].take().expect("compiled once");
        let stream = chosen[mask].expect("within the budget");
        if stream.candidate != compiled.plan.chosen {
            let fastest = &compiled.plan.chosen().name;
            let its_fps = compiled.within_candidate(compiled.plan.chosen, budget_us);
            compiled.plan.reason = format!(
                "the most frames per second within the budget: {:.2} predicted at {} in \
                 flight, against {:.2} for {fastest}, the fastest one frame at a time",
                stream.fps,
                stream.depth,
                its_fps.map_or(0.0, |s| s.fps),
            );
            compiled.plan.chosen = stream.candidate;
        }
        sub_clusters.push(SubCluster {
            boards: names(mask),
            predicted_fps: stream.fps,
            depth: stream.depth,
            predicted_latency_us: stream.latency_us,
            plan: compiled.plan,
        });
    }
    Ok(ServingPlan {
        version: SERVING_VERSION,
        model_sha256: sub_clusters[0].plan.model_sha256.clone(),
        input_shape: ir.input.shape.clone(),
        devices: names(total),
        latency_budget_us: budget_us,
        idle: names(idle_mask),
        predicted_fps: best.fps,
        predicted_latency_us,
        single_plan_us,
        data_parallel_fps: Some(data_parallel_fps),
        reason: format!(
            "of {} cuts of {n} boards into sub-clusters, the most frames per second with \
             every plan within {:.1} ms",
            best.considered,
            budget_us as f64 / 1e3
        ),
        sub_clusters,
    })
}

/// Every candidate of `plan`'s predicted streams at depths 1 to [`MAX_DEPTH`], the chosen
/// candidate's first so that it wins ties ([`best_within`]).
pub fn predict_candidates(
    ir: &Ir,
    profile: &Profile,
    plan: &Plan,
    transport: Transport,
) -> Result<Vec<Streamed>> {
    let order = std::iter::once(plan.chosen)
        .chain((0..plan.candidates.len()).filter(|&c| c != plan.chosen));
    let mut streams = vec![];
    for c in order {
        let mut each = predict_depths(ir, profile, &plan.candidates[c], transport)
            .with_context(|| format!("candidate {}", plan.candidates[c].name))?;
        each.iter_mut().for_each(|s| s.candidate = c);
        streams.extend(each);
    }
    Ok(streams)
}

/// `candidate`'s predicted streams at depths 1 to [`MAX_DEPTH`] (through the hub, where
/// frames do not overlap, depth 1 alone): its own prediction one frame after the
/// other, the programs' stream timeline beyond. Each is marked candidate 0.
fn predict_depths(
    ir: &Ir,
    profile: &Profile,
    candidate: &Candidate,
    transport: Transport,
) -> Result<Vec<Streamed>> {
    let latency_us = candidate.predicted_us.max(1);
    let mut streams = vec![Streamed {
        candidate: 0,
        depth: 1,
        latency_us,
        fps: 1e6 / latency_us as f64,
    }];
    if transport == Transport::Programs {
        for depth in 2..=MAX_DEPTH {
            let times =
                crate::compile::predict_stream(ir, profile, candidate, PREDICTED_FRAMES, depth)?;
            let latency = times.latencies_us().into_iter().fold(0.0f64, f64::max);
            streams.push(Streamed {
                candidate: 0,
                depth,
                latency_us: latency.round() as u64,
                fps: times.fps().unwrap_or(0.0),
            });
        }
    }
    Ok(streams)
}

/// The best cut found: its blocks (board masks), its frames per second, and how many
/// cuts were scored.
#[derive(Debug, PartialEq)]
struct Cut {
    blocks: Vec<usize>,
    fps: f64,
    considered: usize,
}

/// Among every cut of `n` boards into blocks and idle boards whose every block's
/// `latency` (µs) is within `budget_us`, the one with the most frames per second (the
/// sum of the blocks' `rate`s); ties go to the lower slowest block, then to fewer
/// blocks. None when no block fits. A block's frame takes `coordinator` seconds of the
/// coordinator's link; when the blocks' rates would need more than all of it, every
/// rate is scaled down to fit.
fn best_cut(
    n: usize,
    latency: &dyn Fn(usize) -> u64,
    rate: &dyn Fn(usize) -> f64,
    coordinator: &dyn Fn(usize) -> f64,
    budget_us: u64,
) -> Option<Cut> {
    // Restricted growth strings over the boards, label 0 meaning idle: board i joins
    // an existing block or opens the next one.
    let mut best: Option<(f64, u64, usize, Vec<usize>)> = None;
    let mut considered = 0;
    let mut labels = vec![0usize; n];
    fn walk(
        i: usize,
        opened: usize,
        labels: &mut Vec<usize>,
        visit: &mut dyn FnMut(&[usize], usize),
    ) {
        if i == labels.len() {
            visit(labels, opened);
            return;
        }
        for label in 0..=opened + 1 {
            labels[i] = label;
            walk(i + 1, opened.max(label), labels, visit);
        }
    }
    walk(0, 0, &mut labels, &mut |labels, opened| {
        considered += 1;
        let mut blocks = vec![0usize; opened];
        for (i, &label) in labels.iter().enumerate() {
            if label > 0 {
                blocks[label - 1] |= 1 << i;
            }
        }
        if blocks.is_empty() {
            return;
        }
        let latencies: Vec<u64> = blocks.iter().map(|&b| latency(b)).collect();
        let slowest = *latencies.iter().max().expect("a block");
        if slowest > budget_us {
            return;
        }
        let rates: Vec<f64> = blocks.iter().map(|&b| rate(b)).collect();
        let link: f64 = blocks
            .iter()
            .zip(&rates)
            .map(|(&b, r)| r * coordinator(b))
            .sum();
        let fps = rates.iter().sum::<f64>() / link.max(1.0);
        let better = match &best {
            None => true,
            Some((f, s, k, _)) => {
                fps > f * (1.0 + 1e-9)
                    || (fps >= f * (1.0 - 1e-9) && (slowest, blocks.len()) < (*s, *k))
            }
        };
        if better {
            best = Some((fps, slowest, blocks.len(), blocks));
        }
    });
    best.map(|(fps, _, _, blocks)| Cut {
        blocks,
        fps,
        considered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_as_milliseconds_or_multiples() {
        assert_eq!("500".parse(), Ok(LatencyBudget::Absolute(500_000)));
        assert_eq!("1.5x".parse(), Ok(LatencyBudget::Relative(1.5)));
        for bad in ["", "x", "0", "-2x", "fast", "0x"] {
            assert!(bad.parse::<LatencyBudget>().is_err(), "{bad}");
        }
    }

    /// Four boards, each alone 1100 µs; any k boards together 1000 / k + 100 µs.
    fn even(mask: usize) -> u64 {
        let k = mask.count_ones() as u64;
        1000 / k + 100
    }

    /// A coordinator link that costs nothing.
    fn no_link(_: usize) -> f64 {
        0.0
    }

    /// One frame after the other: the rate of a block of latency `latency`.
    fn rate_of(latency: impl Fn(usize) -> u64) -> impl Fn(usize) -> f64 {
        move |mask| 1e6 / latency(mask) as f64
    }

    #[test]
    fn the_deepest_pipeline_within_the_budget_wins() {
        let stream = |depth, latency_us, fps| Streamed {
            candidate: 0,
            depth,
            latency_us,
            fps,
        };
        // Two frames in flight: 1.3x the rate, 1.6x the latency; three: 1% faster
        // still, not enough to be worth a third frame.
        let streams = [
            stream(1, 1000, 1000.0),
            stream(2, 1600, 1300.0),
            stream(3, 2400, 1313.0),
        ];
        assert_eq!(best_within(&streams, 1000).unwrap().depth, 1);
        assert_eq!(best_within(&streams, 1599).unwrap().depth, 1);
        assert_eq!(best_within(&streams, 1600).unwrap().depth, 2);
        assert_eq!(best_within(&streams, u64::MAX).unwrap().depth, 2);
        assert!(best_within(&streams, 999).is_none());
    }

    #[test]
    fn another_candidate_must_be_faster_by_the_depth_gain() {
        let stream = |candidate, depth, latency_us, fps| Streamed {
            candidate,
            depth,
            latency_us,
            fps,
        };
        // The latency's candidate (1) first, then a candidate for a stream (0): 1% more
        // frames per second at depth 2 does not pay for its latency, 5% does.
        let mut streams = vec![
            stream(1, 1, 1000, 1000.0),
            stream(1, 2, 1800, 1200.0),
            stream(0, 1, 1100, 909.0),
            stream(0, 2, 1700, 1212.0),
        ];
        let best = best_within(&streams, u64::MAX).unwrap();
        assert_eq!((best.candidate, best.depth), (1, 2));
        streams[3].fps = 1260.0;
        let best = best_within(&streams, u64::MAX).unwrap();
        assert_eq!((best.candidate, best.depth), (0, 2));
        // Within 1.75 ms only the candidate for a stream reaches depth 2.
        let best = best_within(&streams, 1750).unwrap();
        assert_eq!((best.candidate, best.depth), (0, 2));
        let best = best_within(&streams, 1650).unwrap();
        assert_eq!((best.candidate, best.depth), (1, 1));
    }

    #[test]
    fn a_loose_budget_gives_every_board_its_own_frames() {
        let cut = best_cut(4, &even, &rate_of(even), &no_link, 1100).unwrap();
        assert_eq!(cut.blocks, [1, 2, 4, 8]);
        assert!((cut.fps - 4e6 / 1100.0).abs() < 1e-6);
        // Bell(5): every cut of 4 boards with an idle block.
        assert_eq!(cut.considered, 52);
    }

    #[test]
    fn a_tight_budget_gives_one_plan_over_every_board() {
        // All four: 350 µs; any three: 433 µs.
        let cut = best_cut(4, &even, &rate_of(even), &no_link, 350).unwrap();
        assert_eq!(cut.blocks, [15]);
    }

    #[test]
    fn a_middle_budget_pairs_the_boards() {
        // Pairs: 600 µs each, 2 pairs 3333 fps; a triple and a board alone miss 600.
        let cut = best_cut(4, &even, &rate_of(even), &no_link, 600).unwrap();
        assert_eq!(cut.blocks.len(), 2);
        assert!(cut.blocks.iter().all(|b| b.count_ones() == 2));
    }

    #[test]
    fn a_board_that_slows_every_plan_it_joins_idles() {
        // Board 3 is so slow that any plan with it takes 10 ms.
        let latency = |mask: usize| if mask & 8 != 0 { 10_000 } else { even(mask) };
        let cut = best_cut(4, &latency, &rate_of(latency), &no_link, 1100).unwrap();
        assert_eq!(cut.blocks, [1, 2, 4]);
        assert!(best_cut(4, &latency, &rate_of(latency), &no_link, 200).is_none());
    }

    #[test]
    fn a_busy_coordinator_link_caps_the_rate() {
        // Each frame takes 0.5 ms of the coordinator's link: four boards alone would
        // need 4 x 909 x 0.0005 = 1.8 s of it per second; the rate is capped at 2000.
        let cut = best_cut(4, &even, &rate_of(even), &|_| 0.0005, 1100).unwrap();
        assert!((cut.fps - 2000.0).abs() < 1e-6, "{cut:?}");
    }

    #[test]
    fn boards_without_a_plan_alone_are_paired() {
        // No board holds the model alone (no plan: latency u64::MAX); pairs do.
        let latency = |mask: usize| match mask.count_ones() {
            1 => u64::MAX,
            _ => even(mask),
        };
        let cut = best_cut(4, &latency, &rate_of(latency), &no_link, 10_000).unwrap();
        assert_eq!(cut.blocks.len(), 2, "{cut:?}");
        assert!(cut.blocks.iter().all(|b| b.count_ones() == 2));
    }
}
