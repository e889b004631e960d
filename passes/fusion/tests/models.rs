//! egg against the dynamic program on the cost table of every generated model, costed
//! by the paper's predictor from a synthetic legion-mode profile of a mixed 3-device cluster
//! (times from each stage's FLOPs and each device's rate; links from bandwidth and
//! latency), with the transfers of either transport. Both must reach the same optimum,
//! and it is a legal cover.

use legion_cost::{CostModel, Predictor};
use legion_fusion::{
    CostTable, Flc, FlcGroup, GroupCosts, Legality, Placement, balanced_flcs, board_loads,
    search_dp, search_egg,
};
use legion_ir::Ir;
use legion_plan::{
    Clock, DeviceProfile, Link, LinkProbe, PROFILE_VERSION, Profile, ProfileMode, Sample,
    StageProfile, Transport,
};

/// (name, GFLOP/s, Mbit/s): two fast boards on fast links, one slow board.
const DEVICES: [(&str, f64, f64); 3] = [("a", 30.0, 100.0), ("b", 30.0, 100.0), ("c", 12.0, 50.0)];

fn synthetic_profile(ir: &Ir) -> Profile {
    let devices = DEVICES
        .iter()
        .map(|&(name, gflops, mbps)| {
            let link = Link {
                mbps,
                latency_ms: 0.2,
            };
            DeviceProfile {
                name: name.into(),
                class: None,
                gflops,
                link,
                probes: [4u64 << 10, 64 << 10, 1 << 20]
                    .iter()
                    .map(|&bytes| {
                        let us = link.time_us(bytes).round() as u64;
                        LinkProbe {
                            bytes,
                            in_us: us,
                            out_us: us,
                        }
                    })
                    .collect(),
                profiled_with: vec![],
            }
        })
        .collect();
    let stages = ir
        .stages
        .iter()
        .map(|s| {
            let height = s.output.height().unwrap_or(0);
            let barrier = !s.is_splittable() || height == 0;
            let mut rows: Vec<usize> = if barrier {
                vec![height]
            } else {
                vec![1, height / 4, height / 2, height]
            };
            rows.retain(|&r| barrier || r > 0);
            rows.dedup();
            let samples = DEVICES
                .iter()
                .map(|&(_, gflops, _)| {
                    rows.iter()
                        .map(|&r| {
                            let share = if height == 0 {
                                1.0
                            } else {
                                r as f64 / height as f64
                            };
                            let us =
                                (20.0 + s.flops as f64 * share / (gflops * 1e3)).round() as u64;
                            Sample {
                                rows: r,
                                median_us: us,
                                min_us: us,
                                runs: 1,
                            }
                        })
                        .collect()
                })
                .collect();
            // Channel tiles of the stages worth them: time in proportion to channels.
            let channel_samples = match s.channels {
                Some(c) if legion_partition::worth_channels(ir, s.id) => DEVICES
                    .iter()
                    .map(|&(_, gflops, _)| {
                        let mut counts = vec![1, c.count / 4, c.count / 2, c.count];
                        counts.retain(|&n| n > 0);
                        counts.dedup();
                        counts
                            .into_iter()
                            .map(|n| {
                                let share = n as f64 / c.count as f64;
                                let us =
                                    (20.0 + s.flops as f64 * share / (gflops * 1e3)).round() as u64;
                                Sample {
                                    rows: n,
                                    median_us: us,
                                    min_us: us,
                                    runs: 1,
                                }
                            })
                            .collect()
                    })
                    .collect(),
                _ => vec![],
            };
            StageProfile {
                stage: s.id,
                barrier,
                samples,
                channel_samples,
            }
        })
        .collect();
    Profile {
        version: PROFILE_VERSION,
        model_sha256: ir.sha256.clone(),
        input_shape: ir.input.shape.clone(),
        mode: ProfileMode::Legion,
        clock: Clock::Emulated,
        coordinator_mbps: 1000.0,
        devices,
        stages,
        groups: vec![],
        max_group_len: None,
        costed_from: None,
        profiling_us: 0,
        wall_us: 0,
        host_gflops: None,
    }
}

#[test]
fn egg_and_dp_agree_on_every_generated_model() {
    for spec in legion_models::catalog() {
        let path = legion_models::test_model(spec.name).unwrap();
        let ir = legion_ir::import(&path, None).unwrap();
        let profile = synthetic_profile(&ir);
        for transport in [Transport::Programs, Transport::Hub] {
            let model = CostModel::new(&ir, &profile, transport).unwrap();
            let predictor = Predictor::Legion;
            let table =
                CostTable::predicted(&ir, &model, predictor, &profile, &Legality::default())
                    .unwrap();
            let dp = search_dp(&table).unwrap();
            let (egg, _) = search_egg(&table).unwrap();
            let case = format!("{} {predictor} {transport}", spec.name);
            assert_eq!(egg.cost, dp.cost, "{case}: egg {egg}, dp {dp}");
            assert!(egg.is_valid(&table), "{case}: {egg}");
            // Never slower than the whole model on the best single device.
            let one = table.cost(FlcGroup::rows(0, ir.stages.len() - 1, 1));
            assert!(egg.cost <= one, "{case}: {egg} against {one}");
        }
    }
}

/// On VGG-16 over the three devices, the search for a stream finds legal FLCs: the
/// first, every board weighed alike, holds the least work in all (less than the
/// latency's FLC, whose halos and idle boards cost work), and the busiest board of the
/// best of them works less than under the latency's FLC, which none beats on latency.
#[test]
fn balanced_flcs_lighten_the_busiest_board() {
    let path = legion_models::test_model("vgg16").unwrap();
    let ir = legion_ir::import(&path, None).unwrap();
    let profile = synthetic_profile(&ir);
    let model = CostModel::new(&ir, &profile, Transport::Programs).unwrap();
    let table = CostTable::predicted(
        &ir,
        &model,
        Predictor::Legion,
        &profile,
        &Legality::default(),
    )
    .unwrap();
    let latency = search_dp(&table).unwrap();
    let busiest = |flc: &Flc| board_loads(&table, flc).into_iter().fold(0.0, f64::max);
    let work = |flc: &Flc| board_loads(&table, flc).into_iter().sum::<f64>();
    let balanced = balanced_flcs(&table, 6).unwrap();
    assert!(!balanced.is_empty() && balanced.len() <= 6);
    for flc in &balanced {
        assert!(flc.is_valid(&table), "{flc}");
        assert!(
            flc.cost >= latency.cost,
            "{flc} beats the latency's {latency}"
        );
    }
    // Each device's time is rounded to a nanosecond per group in the search.
    assert!(
        work(&balanced[0]) <= work(&latency) + 1e-3 * latency.groups.len() as f64 * 3.0,
        "{} against {}",
        work(&balanced[0]),
        work(&latency)
    );
    let lightest = balanced.iter().map(busiest).fold(f64::INFINITY, f64::min);
    assert!(
        lightest < busiest(&latency),
        "busiest board {lightest:.0} µs against {:.0} under {latency}",
        busiest(&latency)
    );
}

#[test]
fn a_group_length_limit_keeps_exactly_the_short_groups() {
    let path = legion_models::test_model("tiny-yolo").unwrap();
    let ir = legion_ir::import(&path, None).unwrap();
    let profile = synthetic_profile(&ir);
    let model = CostModel::new(&ir, &profile, Transport::Programs).unwrap();
    let table = |max_group_len| {
        let legality = Legality {
            max_group_len,
            ..Legality::default()
        };
        CostTable::predicted(&ir, &model, Predictor::Legion, &profile, &legality).unwrap()
    };
    let (all, short) = (table(None), table(Some(3)));
    let n = ir.stages.len();
    let mut kept = 0;
    for first in 0..n {
        for last in first..n {
            for c in FlcGroup::choices(first, last, all.options()) {
                let (full, limited) = (all.cost(c), short.cost(c));
                if last - first < 3 {
                    assert_eq!(limited, full, "{c}");
                    kept += usize::from(full.is_finite());
                } else {
                    assert!(!limited.is_finite(), "{c} is too long");
                }
            }
        }
    }
    assert_eq!(short.len(), kept);
    assert!(
        kept < all.len(),
        "tiny-yolo has groups longer than 3 stages"
    );
    // The limited search still covers the model, at no lower cost.
    let (limited, _) = search_egg(&short).unwrap();
    assert!(limited.is_valid(&short));
    assert!(limited.cost >= search_egg(&all).unwrap().0.cost);
}

/// Placement for programs on tiny-yolo over the three devices: conv0 split three ways,
/// then its 2x2 pool split three ways. Cut again given what each device holds, the
/// pool's strips line up with conv0's: no device lacks more than one conv0 row (the
/// one a strip boundary at an odd conv0 row leaves), and every other group keeps its
/// table entry's devices and covers its rows.
#[test]
fn placement_lines_strips_up_with_the_rows_the_devices_hold() {
    let path = legion_models::test_model("tiny-yolo").unwrap();
    let ir = legion_ir::import(&path, None).unwrap();
    let profile = synthetic_profile(&ir);
    let model = CostModel::new(&ir, &profile, Transport::Programs).unwrap();
    let legality = Legality::default();
    let table = CostTable::predicted(&ir, &model, Predictor::Legion, &profile, &legality).unwrap();
    let n = ir.stages.len();
    let flc = Flc::new(
        &table,
        vec![
            FlcGroup::rows(0, 0, 3),
            FlcGroup::rows(1, 1, 3),
            FlcGroup::rows(2, n - 1, 1),
        ],
    );
    assert!(flc.is_valid(&table), "{flc}");
    let placed = Placement::holding(
        &ir,
        &model,
        Predictor::Legion,
        &legality,
        &table,
        &flc,
        None,
    )
    .unwrap();
    assert_eq!(
        placed.groups.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        flc.groups
    );
    let conv0_row = 16 * 32 * 4;
    let (_, pool) = &placed.groups[1];
    assert!(!pool.whole);
    assert_eq!(pool.devices.len(), 3, "{pool:?}");
    for d in &pool.devices {
        let (_, _, mbps) = DEVICES[d.device.index()];
        let one_row = Link {
            mbps,
            latency_ms: 0.2,
        }
        .time_us(conv0_row);
        assert!(
            d.in_us <= one_row + 1.0,
            "{} lacks more than a row: {pool:?}",
            d.device
        );
    }
    let mut next = 0;
    for (choice, entry) in &placed.groups {
        let height = ir.stages[choice.last].output.height().unwrap_or(0);
        let covered: usize = entry.devices.iter().map(|d| d.strip.len()).sum();
        assert_eq!(covered, height, "{choice}");
        for d in &entry.devices {
            assert_eq!(d.strip.start, next % height.max(1), "{choice}");
            next = d.strip.end;
        }
        next = 0;
    }
    let total = placed
        .groups
        .iter()
        .fold(legion_fusion::Cost::ZERO, |sum, (_, e)| sum + e.cost);
    assert_eq!(placed.cost, total);
}
