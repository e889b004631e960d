//! egg against the dynamic program on the cost table of every generated model, costed
//! by the paper's predictor from a synthetic legion-mode profile of a mixed 3-device cluster
//! (times from each stage's FLOPs and each device's rate; links from bandwidth and
//! latency). Both must reach the same optimum, and it is a legal cover.

use legion_cost::{CostModel, Predictor};
use legion_fusion::{CostTable, GroupCosts, Legality, search_dp, search_egg};
use legion_ir::Ir;
use legion_plan::{
    Clock, DeviceProfile, Link, LinkProbe, PROFILE_VERSION, Profile, ProfileMode, Sample,
    StageProfile,
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
            StageProfile {
                stage: s.id,
                barrier,
                samples,
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
        let model = CostModel::new(&ir, &profile).unwrap();
        let predictor = Predictor::Legion;
        let table =
            CostTable::predicted(&ir, &model, predictor, &profile, &Legality::default()).unwrap();
        let dp = search_dp(&table).unwrap();
        let (egg, _) = search_egg(&table).unwrap();
        assert_eq!(
            egg.cost, dp.cost,
            "{} {predictor}: egg {egg}, dp {dp}",
            spec.name
        );
        assert!(egg.is_valid(&table), "{} {predictor}: {egg}", spec.name);
        // Never slower than the whole model on the best single device.
        let one = table.cost(0, ir.stages.len() - 1, 1);
        assert!(
            egg.cost <= one,
            "{} {predictor}: {egg} against {one}",
            spec.name
        );
    }
}

#[test]
fn a_group_length_limit_keeps_exactly_the_short_groups() {
    let path = legion_models::test_model("tiny-yolo").unwrap();
    let ir = legion_ir::import(&path, None).unwrap();
    let profile = synthetic_profile(&ir);
    let model = CostModel::new(&ir, &profile).unwrap();
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
            for devices in 1..=all.options() {
                let (full, limited) = (
                    all.cost(first, last, devices),
                    short.cost(first, last, devices),
                );
                if last - first < 3 {
                    assert_eq!(limited, full, "{first}..{last}/{devices}");
                    kept += usize::from(full.is_finite());
                } else {
                    assert!(
                        !limited.is_finite(),
                        "{first}..{last}/{devices} is too long"
                    );
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
