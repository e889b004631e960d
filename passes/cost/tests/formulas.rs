//! The predictors on a hand-made profile of tiny-cnn, with every expected number worked
//! out from the geometry; and properties of alpha.

use legion_cost::{CostModel, Predictor};
use legion_ir::{Ir, Rows, StageId, import};
use legion_partition::{Group, Reductions, SuffixTiler, scale_cut, strips_from_weights, tile};
use legion_plan::network::{StepPart, step_timeline};
use legion_plan::{
    Clock, DeviceId, DeviceProfile, Link, LinkProbe, PROFILE_VERSION, Profile, ProfileMode, Sample,
    StageProfile, Transport,
};
use proptest::prelude::*;

fn tiny(name: &str) -> Ir {
    import(&legion_models::test_model(name).unwrap(), None).unwrap()
}

/// A profile of `ir` where stage `l` takes `per_row(l) * rows` µs on every device and
/// every link is 0.2 ms + 0.08 µs per byte (100 Mbit/s) both ways.
fn linear_profile(ir: &Ir, devices: usize, per_row: impl Fn(usize) -> u64) -> Profile {
    let probes = [1000u64, 100_000]
        .iter()
        .map(|&bytes| {
            let t = 200 + bytes * 8 / 100;
            LinkProbe {
                bytes,
                in_us: t,
                out_us: t,
            }
        })
        .collect::<Vec<_>>();
    Profile {
        version: PROFILE_VERSION,
        model_sha256: ir.sha256.clone(),
        input_shape: ir.input.shape.clone(),
        mode: ProfileMode::Legion,
        clock: Clock::Emulated,
        coordinator_mbps: 1000.0,
        devices: (0..devices)
            .map(|d| DeviceProfile {
                name: format!("dev{d}"),
                class: None,
                gflops: 10.0,
                link: Link {
                    mbps: 100.0,
                    latency_ms: 0.2,
                },
                probes: probes.clone(),
                profiled_with: vec![],
            })
            .collect(),
        stages: ir
            .stages
            .iter()
            .map(|s| {
                let h = s.output.height().unwrap();
                let sample = |rows: usize| Sample {
                    rows,
                    median_us: per_row(s.id.index()) * rows as u64,
                    min_us: per_row(s.id.index()) * rows as u64,
                    runs: 1,
                };
                StageProfile {
                    stage: s.id,
                    barrier: false,
                    samples: vec![vec![sample(1), sample(h)]; devices],
                    channel_samples: vec![],
                }
            })
            .collect(),
        groups: vec![],
        max_group_len: None,
        costed_from: None,
        profiling_us: 0,
        wall_us: 0,
        host_gflops: None,
    }
}

fn close(got: f64, want: f64) {
    assert!((got - want).abs() < 1e-6, "got {got}, want {want}");
}

/// tiny-cnn: conv1 (3x3 s1 p1, 3->8 ch, 48x40) then conv2 (5x5 s2 p2, 8->16 ch, 24x20).
/// Group conv1..conv2 on two devices, conv2's rows cut [0,12) [12,24).
///
/// Device 0: conv2 rows [0,12) read conv1 rows [0,25); conv1 computes them from input
/// rows [0,26). Alone at the same share conv1 computes [0,24) from input [0,25).
/// So alpha(conv1) = 25/24, alpha(conv2) = 1, alpha_in = 26/25.
/// Device 1: conv2 rows [12,24) read conv1 [22,48), from input [21,48); alone conv1
/// computes [24,48) from input [23,48): alpha(conv1) = 26/24, alpha_in = 27/25.
/// An input row is 3 x 40 x 4 = 480 bytes; a conv2 output row 16 x 20 x 4 = 1280.
/// Each stage's time is proportional to its rows here, so E at the rows computed is
/// the paper's alpha * E(share).
#[test]
fn the_three_predictors_on_a_worked_example() {
    let ir = tiny("tiny-cnn");
    // E(conv1) = 100 µs per row, E(conv2) = 300 µs per row
    let profile = linear_profile(&ir, 2, |l| [100, 300, 50, 50, 10, 40, 10][l]);
    let model = CostModel::new(&ir, &profile, Transport::Hub).unwrap();
    let strips = [
        (DeviceId(0), Rows::new(0, 12)),
        (DeviceId(1), Rows::new(12, 24)),
    ];
    let group = Group::new(0, 1);
    let s = |bytes: f64| 200.0 + 0.08 * bytes;

    let legion = model.predict(Predictor::Legion, group, &strips).unwrap();
    let r = s(12.0 * 1280.0); // 12 output rows back: 1428.8
    let d0 = 26.0 / 25.0 * s(25.0 * 480.0) + 25.0 / 24.0 * 2400.0 + 3600.0 + r;
    let d1 = 27.0 / 25.0 * s(25.0 * 480.0) + 26.0 / 24.0 * 2400.0 + 3600.0 + r;
    close(legion.devices[0].total_us, d0); // 8735.2
    close(legion.devices[1].total_us, d1); // 8881.6
    close(legion.total_us, 8881.6);
    close(legion.devices[0].compute_us[0].1, 2500.0);
    close(legion.devices[1].in_us, 1252.8);

    // affine: E at the rows computed; transfers of the fused strips (two 100 Mbit/s
    // flows fit in the 1 Gbit/s coordinator link, so they do not slow each other)
    let affine = model.predict(Predictor::Affine, group, &strips).unwrap();
    close(
        affine.devices[0].total_us,
        s(26.0 * 480.0) + 2500.0 + 3600.0 + r,
    ); // 8727.2
    close(
        affine.devices[1].total_us,
        s(27.0 * 480.0) + 2600.0 + 3600.0 + r,
    ); // 8865.6
    close(affine.total_us, 8865.6);

    // aofl: the same transfers, compute from the fitted regressions
    let aofl = model.predict(Predictor::Aofl, group, &strips).unwrap();
    close(aofl.devices[0].in_us, s(26.0 * 480.0));
    close(aofl.devices[0].out_us, r);
}

/// Legion costs a stage at the rows it computes where the stage's samples reach them,
/// and as the paper's `alpha * E(share)` only past them. The same worked example, with
/// conv1 costing 1000 µs plus 100 µs a row: device 0's conv1 computes 25 rows, its
/// share alone 24. Sampled at 1 and 48 rows, E(25) = 1100 + 24 * 100 = 3500 µs; sampled
/// at 1 and 24 rows only, alpha * E(24) = 25/24 * 3400 = 3541.7 µs.
#[test]
fn legion_costs_the_rows_computed_within_the_samples_and_alpha_past_them() {
    let ir = tiny("tiny-cnn");
    let with_intercept = |rows: usize| Sample {
        rows,
        median_us: 1000 + 100 * rows as u64,
        min_us: 1000 + 100 * rows as u64,
        runs: 1,
    };
    let strips = [
        (DeviceId(0), Rows::new(0, 12)),
        (DeviceId(1), Rows::new(12, 24)),
    ];
    let conv1 = |sampled_up_to: usize| {
        let mut profile = linear_profile(&ir, 2, |l| [100, 300, 50, 50, 10, 40, 10][l]);
        profile.stages[0].samples = vec![vec![with_intercept(1), with_intercept(sampled_up_to)]; 2];
        let model = CostModel::new(&ir, &profile, Transport::Hub).unwrap();
        let p = model
            .predict(Predictor::Legion, Group::new(0, 1), &strips)
            .unwrap();
        p.devices[0].compute_us[0].1
    };
    close(conv1(48), 3500.0);
    close(conv1(24), 25.0 / 24.0 * 3400.0);
}

/// A channel share is interpolated between the channel samples and the whole stage, which
/// legion mode measures among the row samples: all its channels are the same work.
/// conv2 (16 channels, 24 rows, 300 µs a row) sampled at 4 channels in 1200 µs and
/// whole in 7200 µs: 8 channels cost 1200 + 6000 * 4/12 = 3200 µs, not 2 x 1200.
#[test]
fn channel_shares_are_interpolated_up_to_the_whole_stage() {
    let ir = tiny("tiny-cnn");
    let mut profile = linear_profile(&ir, 2, |l| [100, 300, 50, 50, 10, 40, 10][l]);
    let four = Sample {
        rows: 4,
        median_us: 1200,
        min_us: 1200,
        runs: 1,
    };
    profile.stages[1].channel_samples = vec![vec![four]; 2];
    let model = CostModel::new(&ir, &profile, Transport::Hub).unwrap();
    let conv2 = |shares: &[(DeviceId, Rows)]| {
        let p = model.predict_channels(Predictor::Legion, Group::new(1, 1), shares, None);
        p.devices
            .iter()
            .map(|d| d.compute_us[0].1)
            .collect::<Vec<_>>()
    };
    let halves = [
        (DeviceId(0), Rows::new(0, 8)),
        (DeviceId(1), Rows::new(8, 16)),
    ];
    assert_eq!(conv2(&halves), [3200.0, 3200.0]);
    assert_eq!(conv2(&[(DeviceId(0), Rows::new(0, 16))]), [7200.0]);
    assert_eq!(conv2(&[(DeviceId(1), Rows::new(0, 2))]), [600.0]);
}

/// When boards run their programs a tile receives only the rows it lacks: its input
/// rows outside its own share of the input (its strip scaled to the input's height),
/// as if the group before had the same devices at the same shares. The model's input
/// all comes from the coordinator, and only the model's outputs go back.
///
/// conv2 alone, cut [0,12) [12,24): device 0 reads conv1 rows [0,25) and holds [0,24),
/// so it lacks one 1280-byte row; device 1 reads [22,48), holds [24,48), lacks two.
/// conv1..conv2 from the model's input: device 0 receives input rows [0,26) in full.
#[test]
fn with_programs_a_tile_receives_only_the_rows_it_lacks() {
    let ir = tiny("tiny-cnn");
    let profile = linear_profile(&ir, 2, |l| [100, 300, 50, 50, 10, 40, 10][l]);
    let model = CostModel::new(&ir, &profile, Transport::Programs).unwrap();
    let strips = [
        (DeviceId(0), Rows::new(0, 12)),
        (DeviceId(1), Rows::new(12, 24)),
    ];
    let s = |bytes: f64| 200.0 + 0.08 * bytes;
    for predictor in Predictor::ALL {
        let p = model.predict(predictor, Group::new(1, 1), &strips).unwrap();
        close(p.devices[0].in_us, s(1280.0));
        close(p.devices[1].in_us, s(2560.0));
        close(p.devices[0].out_us, 0.0);
    }
    let legion = model
        .predict(Predictor::Legion, Group::new(1, 1), &strips)
        .unwrap();
    close(legion.devices[1].total_us, s(2560.0) + 3600.0);

    let legion = model
        .predict(Predictor::Legion, Group::new(0, 1), &strips)
        .unwrap();
    close(legion.devices[0].in_us, s(26.0 * 480.0));
    close(
        legion.devices[0].total_us,
        s(26.0 * 480.0) + 25.0 / 24.0 * 2400.0 + 3600.0,
    );
}

/// tiny-effnet's first squeeze-excitation block, 1..7 (dwconv 1, global pool 2, fc1 3,
/// fc2 4, scale 5, conv 6, add 7; every stage 10 µs a row, 32 rows high) on two
/// devices with [0,16) and [16,32). Each device pools its own 16 rows (half of the
/// pool's 10 µs), receives the other's 8-channel partial sum (32 bytes) and runs phase
/// 1 (stages 3..7) once both have combined. Device 0 is 3x slower on the dwconv (phase
/// 0), device 1 on the conv (phase 1): in step at the combine, the group takes the
/// slower phase 0 plus the exchange plus the slower phase 1, more than either device.
/// Each device lacks one 1024-byte row of stage 0 (the dwconv's halo).
#[test]
fn a_combined_reduction_costs_its_exchange_and_keeps_the_devices_in_step() {
    let ir = tiny("tiny-effnet");
    let mut profile = linear_profile(&ir, 2, |_| 10);
    let slower = |samples: &mut Vec<Sample>| {
        for s in samples {
            s.median_us *= 3;
            s.min_us *= 3;
        }
    };
    slower(&mut profile.stages[1].samples[0]);
    slower(&mut profile.stages[6].samples[1]);
    let model = CostModel::new(&ir, &profile, Transport::Programs).unwrap();
    let strips = [
        (DeviceId(0), Rows::new(0, 16)),
        (DeviceId(1), Rows::new(16, 32)),
    ];
    let p = model
        .predict(Predictor::Legion, Group::new(1, 7), &strips)
        .unwrap();
    let s = |bytes: f64| 200.0 + 0.08 * bytes;
    let (halo, exchange) = (s(1024.0), s(32.0));
    for d in &p.devices {
        close(d.in_us, halo + exchange);
        let pool = d.compute_us.iter().find(|(s, _)| *s == StageId(2)).unwrap();
        close(pool.1, 5.0);
    }
    // Phase 0: dwconv + half the pool; phase 1: fc1, fc2 (one row each) and three
    // 16-row stages.
    let (phase0, phase1) = ([480.0 + 5.0, 160.0 + 5.0], [20.0 + 480.0, 20.0 + 800.0]);
    close(
        p.devices[0].total_us,
        halo + exchange + phase0[0] + phase1[0],
    );
    close(
        p.devices[1].total_us,
        halo + exchange + phase0[1] + phase1[1],
    );
    close(p.total_us, halo + phase0[0] + exchange + phase1[1]);

    // Only boards that run their own programs combine: the hub's groups stop at the pool.
    let longest = |reductions| {
        SuffixTiler::new(&ir, StageId(7), reductions)
            .unwrap()
            .longest()
    };
    assert_eq!(model.reductions(), Reductions::Combined);
    assert_eq!(longest(Reductions::Combined), Group::new(0, 7));
    let hub = CostModel::new(&ir, &profile, Transport::Hub).unwrap();
    assert_eq!(hub.reductions(), Reductions::Barriers);
    assert_eq!(longest(Reductions::Barriers), Group::new(3, 7));
}

#[test]
fn a_shared_coordinator_link_slows_the_affine_scatter() {
    let ir = tiny("tiny-cnn");
    let mut profile = linear_profile(&ir, 2, |_| 100);
    profile.coordinator_mbps = 100.0;
    let model = CostModel::new(&ir, &profile, Transport::Hub).unwrap();
    let strips = [
        (DeviceId(0), Rows::new(0, 24)),
        (DeviceId(1), Rows::new(24, 48)),
    ];
    let p = model
        .predict(Predictor::Affine, Group::new(0, 0), &strips)
        .unwrap();
    // Both devices receive 25 input rows (12000 bytes) through one 100 Mbit/s link:
    // 24000 bytes at 0.08 µs/byte = 1920 µs, plus 200 µs latency.
    close(p.devices[0].in_us, 2120.0);
    close(p.devices[1].in_us, 2120.0);
}

/// The affine predictor times a step with the emulated coordinator's timeline
/// (`step_timeline`): fed the same bytes, compute and links, it gives the same times,
/// here with the four flows contending for a 100 Mbit/s coordinator link.
#[test]
fn the_affine_predictor_follows_the_emulated_step_timeline() {
    let ir = tiny("tiny-cnn");
    let mut profile = linear_profile(&ir, 2, |l| [100, 300, 50, 50, 10, 40, 10][l]);
    profile.coordinator_mbps = 100.0;
    let model = CostModel::new(&ir, &profile, Transport::Hub).unwrap();
    // The worked example's group and cut: device 0 receives 26 input rows and computes
    // 25 conv1 + 12 conv2 rows; device 1 receives 27 and computes 26 + 12; each sends
    // 12 conv2 rows (1280 bytes each) back.
    let strips = [
        (DeviceId(0), Rows::new(0, 12)),
        (DeviceId(1), Rows::new(12, 24)),
    ];
    let p = model
        .predict(Predictor::Affine, Group::new(0, 1), &strips)
        .unwrap();
    let link = Link {
        mbps: 100.0,
        latency_ms: 0.2,
    };
    let part = |rows_in: u64, compute_us: f64| StepPart {
        bytes_in: rows_in * 480,
        link_in: link,
        compute_us,
        bytes_out: 12 * 1280,
        link_out: link,
    };
    let want = step_timeline(
        &[part(26, 2500.0 + 3600.0), part(27, 2600.0 + 3600.0)],
        100.0,
    );
    for (d, t) in p.devices.iter().zip(&want) {
        close(d.in_us, t.inputs_in_us);
        close(d.out_us, t.done_us - t.computed_us);
        close(d.total_us, t.done_us);
    }
}

#[test]
fn aofl_recovers_a_conv_regression_it_was_fitted_on() {
    let ir = tiny("tiny-cnn");
    // Samples that follow AOFL's conv model exactly:
    // t = 50 + 0.001 * (C_in W_in H_in) + 2 * (k^2 / s^2 * filters)
    let mut profile = linear_profile(&ir, 1, |_| 1);
    let aofl = |l: usize, rows: usize| -> u64 {
        let (c_in, w_in, k, s, f) = match l {
            0 => (3.0, 40.0, 9.0, 1.0, 8.0),
            1 => (8.0, 40.0, 25.0, 4.0, 16.0),
            2 => (16.0, 20.0, 9.0, 1.0, 16.0),
            3 => (16.0, 20.0, 1.0, 1.0, 16.0),
            _ => (16.0, 10.0, 9.0, 4.0, 24.0),
        };
        let (kh, stride, dil) = [
            (3, 1, 1),
            (5, 2, 1),
            (3, 1, 2),
            (1, 1, 1),
            (0, 0, 0),
            (3, 2, 1),
        ][l];
        let h_in = ((rows - 1) * stride + (kh - 1) * dil + 1) as f64;
        (50.0 + 0.001 * c_in * w_in * h_in * 1000.0 + 2.0 * k / s * f).round() as u64
    };
    for l in [0, 1, 2, 3, 5] {
        let h = ir.stage(StageId(l as u32)).output.height().unwrap();
        profile.stages[l].samples[0] = [1, h / 2, h]
            .iter()
            .map(|&rows| Sample {
                rows,
                median_us: aofl(l, rows),
                min_us: aofl(l, rows),
                runs: 1,
            })
            .collect();
    }
    let model = CostModel::new(&ir, &profile, Transport::Hub).unwrap();
    let p = model
        .predict(
            Predictor::Aofl,
            Group::new(0, 0),
            &[(DeviceId(0), Rows::new(0, 48))],
        )
        .unwrap();
    assert!(
        (p.devices[0].compute_us[0].1 - aofl(0, 48) as f64).abs() < 1.0,
        "{p:?}"
    );
}

#[test]
fn min_max_shares_follow_device_speed() {
    let ir = tiny("tiny-cnn");
    let mut profile = linear_profile(&ir, 2, |_| 100);
    // device 1 computes three times slower
    for s in &mut profile.stages {
        for sample in &mut s.samples[1] {
            sample.median_us *= 3;
        }
    }
    let model = CostModel::new(&ir, &profile, Transport::Hub).unwrap();
    let group = Group::new(0, 0);
    let shares = model
        .shares(Predictor::Legion, group, &[DeviceId(0), DeviceId(1)])
        .unwrap();
    assert_eq!(shares.len(), 2);
    let fast = shares[0].1.len();
    assert!(fast > 48 - fast, "{shares:?}");
    // Min-max: moving the cut one row either way does not lower the slowest device.
    let worst = |cut: usize| {
        let strips = [
            (DeviceId(0), Rows::new(0, cut)),
            (DeviceId(1), Rows::new(cut, 48)),
        ];
        model
            .predict(Predictor::Legion, group, &strips)
            .unwrap()
            .total_us
    };
    let best = worst(fast);
    assert!(
        worst(fast - 1) >= best && worst(fast + 1) >= best,
        "{shares:?}"
    );
    close(
        model
            .group(Predictor::Legion, group, &[DeviceId(0), DeviceId(1)])
            .unwrap()
            .total_us,
        best,
    );
}

#[test]
fn profiles_of_other_models_are_refused() {
    let ir = tiny("tiny-cnn");
    let mut profile = linear_profile(&ir, 1, |_| 1);
    profile.model_sha256 = "0".repeat(64);
    let err = CostModel::new(&ir, &profile, Transport::Hub)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not of this model"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// alpha of a group's last stage is 1, and alpha of a stage never decreases as its
    /// group grows by later stages. The cut is the same, scaled to each stage; where
    /// scaling through a smaller height rounds a device's own rows of a stage
    /// differently, the shares differ and the alphas are not comparable, so only stages
    /// with the same own rows in both groups are compared.
    #[test]
    fn alpha_is_one_at_the_end_and_grows_with_the_group(
        model in prop::sample::select(vec!["tiny-cnn", "tiny-yolo", "tiny-residual", "tiny-mobile"]),
        weights in prop::collection::vec(1.0f64..4.0, 2..5),
        first in 0usize..100,
        len in 1usize..8,
    ) {
        let ir = tiny(model);
        let n = ir.stages.len();
        let first = first % n;
        let mut last = first;
        while last + 1 < n && last + 1 < first + len
            && legion_partition::check_group(&ir, first, last + 1).is_ok() {
            last += 1;
        }
        prop_assume!(legion_partition::check_group(&ir, first, last).is_ok());
        let h_last = ir.stage(StageId(last as u32)).output.height().unwrap();
        let strips = strips_from_weights(h_last, &weights);
        let big = tile(&ir, Group::new(first, last), &strips).unwrap();
        for t in &big.tiles {
            prop_assert_eq!(t.stage(StageId(last as u32)).alpha, Some(1.0));
        }
        for j in first..last {
            let h_j = ir.stage(StageId(j as u32)).output.height().unwrap();
            let small = tile(&ir, Group::new(first, j), &scale_cut(&strips, h_last, h_j)).unwrap();
            for t in &small.tiles {
                let Some(b) = big.tiles.iter().find(|b| b.slot == t.slot) else { continue };
                for st in &t.stages {
                    let wide = b.stage(st.stage);
                    if wide.alone != st.alone {
                        continue;
                    }
                    prop_assert!(wide.computed.contains(st.computed) || st.computed.is_empty());
                    if let (Some(a_small), Some(a_big)) = (st.alpha, wide.alpha) {
                        prop_assert!(
                            a_big >= a_small - 1e-12,
                            "{} stage {} slot {}: alpha {} in {}..={} < {} in {}..={}",
                            model, st.stage, t.slot, a_big, first, last, a_small, first, j
                        );
                    }
                }
            }
        }
    }
}
