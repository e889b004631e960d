//! The profiler against a fake testbed with deterministic times: what it measures, in
//! which order, and what it records.

use super::*;
use legion_ir::import;
use legion_plan::{DeviceTiming, Link};
use std::cell::RefCell;

/// A call the profiler made.
#[derive(Clone, Debug, PartialEq)]
enum Call {
    /// A single tile: its device, its (first) stage, the rows it computes and the round.
    Tile {
        device: DeviceId,
        stage: StageId,
        rows: usize,
        round: Round,
    },
    Probe {
        device: DeviceId,
        bytes: u64,
    },
    /// A step: its devices, the stages its tiles run and, per tile, the rows and
    /// channels of the last stage it computes.
    Step {
        devices: Vec<DeviceId>,
        first: StageId,
        last: StageId,
        parts: Vec<(Rows, Option<Rows>)>,
    },
}

/// Devices of given rates and classes (by default two of no class, the first twice as
/// fast); every call recorded.
struct Fake {
    model: String,
    devices: Vec<(f64, Option<&'static str>)>,
    calls: RefCell<Vec<Call>>,
}

const RATES: [f64; 2] = [20.0, 10.0];

impl Fake {
    fn new(ir: &Ir) -> Fake {
        Fake::with_devices(ir, RATES.iter().map(|&r| (r, None)).collect())
    }

    fn with_devices(ir: &Ir, devices: Vec<(f64, Option<&'static str>)>) -> Fake {
        Fake {
            model: ir.sha256.clone(),
            devices,
            calls: RefCell::default(),
        }
    }

    /// A tile's time in timed round `k`: 100 µs per row at rate 10, then +2 and +1 µs
    /// in the next rounds.
    fn tile_time(&self, device: DeviceId, rows: usize, k: u32) -> u64 {
        let base = (rows as f64 * 1000.0 / self.devices[device.index()].0) as u64 + 1;
        base + [0, 2, 1][(k as usize - 1) % 3]
    }

    fn probe_of(device: DeviceId, bytes: u64) -> LinkProbe {
        LinkProbe {
            bytes,
            in_us: bytes / 1000 + 10 * (device.index() as u64 + 1),
            out_us: bytes / 1000 + 11 * (device.index() as u64 + 1),
        }
    }

    /// A step's time: 1000 µs per tile plus 1 µs per computed row.
    fn step_us(tiles: &[(DeviceId, TileSpec)]) -> u64 {
        tiles
            .iter()
            .map(|(_, t)| {
                1000 + t
                    .stages
                    .iter()
                    .map(|s| s.computed.len() as u64)
                    .sum::<u64>()
            })
            .sum()
    }
}

impl Testbed for Fake {
    fn devices(&self) -> Vec<DeviceProfile> {
        self.devices
            .iter()
            .enumerate()
            .map(|(d, &(gflops, class))| DeviceProfile {
                name: format!("board-{d}"),
                class: class.map(str::to_string),
                gflops,
                link: Link {
                    mbps: 100.0,
                    latency_ms: 0.2,
                },
                probes: vec![],
                profiled_with: vec![],
            })
            .collect()
    }

    fn clock(&self) -> Clock {
        Clock::Emulated
    }

    fn coordinator_mbps(&self) -> f64 {
        1000.0
    }

    fn model_sha256(&self) -> Result<String> {
        Ok(self.model.clone())
    }

    async fn profile_tile(
        &self,
        d: DeviceId,
        spec: &TileSpec,
        round: Round,
    ) -> Result<(u64, Vec<u64>, Option<HostRates>)> {
        let stage = &spec.stages[0];
        let rows = stage.computed.len();
        self.calls.borrow_mut().push(Call::Tile {
            device: d,
            stage: stage.stage,
            rows,
            round,
        });
        Ok(match round {
            Round::WarmUp => (7, vec![], None),
            Round::Timed(k) => (0, vec![self.tile_time(d, rows, k)], None),
        })
    }

    async fn probe(&self, d: DeviceId, bytes: u64) -> Result<LinkProbe> {
        self.calls
            .borrow_mut()
            .push(Call::Probe { device: d, bytes });
        Ok(Fake::probe_of(d, bytes))
    }

    async fn run_step(
        &self,
        _ir: &Ir,
        _inputs: &[MadeUp],
        tiles: &[(DeviceId, TileSpec)],
    ) -> Result<StepTiming> {
        let spec = &tiles[0].1;
        let last = |t: &TileSpec| t.stages[t.stages.len() - 1].clone();
        self.calls.borrow_mut().push(Call::Step {
            devices: tiles.iter().map(|(d, _)| *d).collect(),
            first: spec.stages[0].stage,
            last: last(spec).stage,
            parts: tiles
                .iter()
                .map(|(_, t)| (last(t).computed, last(t).channels))
                .collect(),
        });
        let total_us = Fake::step_us(tiles);
        Ok(StepTiming {
            clock: Clock::Emulated,
            total_us,
            devices: tiles
                .iter()
                .map(|(d, _)| DeviceTiming {
                    device: format!("board-{}", d.index()),
                    bytes_in: 0,
                    bytes_out: 0,
                    in_us: 0,
                    compute_us: total_us,
                    out_us: 0,
                    done_us: total_us,
                    host_gflops: None,
                })
                .collect(),
        })
    }
}

fn tiny_head() -> Ir {
    import(&legion_models::test_model("tiny-head").unwrap(), None).unwrap()
}

fn run(fake: &Fake, ir: &Ir, opts: &ProfileOptions) -> Result<Profile> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(profile(fake, ir, opts))
}

/// The share, the steps above it, then the whole stage; channels only the share.
#[test]
fn samples_reach_from_the_share_to_the_whole_stage() {
    assert_eq!(sample_rows(3, 13), [3, 4, 5, 13]);
    assert_eq!(sample_rows(104, 416), [104, 130, 156, 416]);
    // half the stage or more: the share and the whole stage
    assert_eq!(sample_rows(7, 13), [7, 13]);
    assert_eq!(sample_rows(208, 416), [208, 416]);
    assert_eq!(sample_rows(6, 13), [6, 8, 10, 13]);
    assert_eq!(sample_rows(0, 13), [1, 2]);
    assert_eq!(sample_rows(0, 1), [1]);
    assert_eq!(sample_rows(1, 1), [1]);
    assert_eq!(sample_channels(3, 13), [3]);
    assert_eq!(sample_channels(0, 1), [1]);
    assert!(sample_channels(0, 0).is_empty());
}

/// Device `d`'s measurements at its shares among devices of `rates`, in stage order:
/// (stage, rows the fake sees, rows or channels sampled, by channels).
fn measures_of(ir: &Ir, rates: &[f64], d: usize) -> Vec<(StageId, usize, usize, bool)> {
    let mut measures = vec![];
    for stage in &ir.stages {
        let rows = match (&stage.split, stage.output.height()) {
            (Split::Rows, Some(height)) => {
                let strips = strips_from_weights(height, rates);
                sample_rows(strips[d].len(), height)
            }
            _ => vec![stage.output.height().unwrap_or(0)],
        };
        measures.extend(rows.into_iter().map(|n| (stage.id, n, n, false)));
    }
    // Then the channel tiles of the stages worth them (tiny-head's FC layer), at the
    // device's share of the channels; the fake sees their rows (none: the FC output has
    // no row axis).
    for stage in ir.stages.iter().filter(|s| worth_channels(ir, s.id)) {
        let count = stage.channels.unwrap().count;
        let shares = strips_from_weights(count, rates);
        let rows = stage.output.height().unwrap_or(0);
        for n in sample_channels(shares[d].len(), count) {
            measures.push((stage.id, rows, n, true));
        }
    }
    measures
}

#[test]
fn legion_mode_measures_every_stage_in_rounds_device_by_device_then_the_links() {
    let ir = tiny_head();
    let fake = Fake::new(&ir);
    let p = run(&fake, &ir, &ProfileOptions::default()).unwrap();

    let mut want = vec![];
    let mut probes = vec![];
    let mut device_us = [0u64; 2];
    for (d, device_us) in device_us.iter_mut().enumerate() {
        let measures = measures_of(&ir, &RATES, d);
        // A warm-up round, then 3 timed rounds, each over every measurement: none runs
        // right after itself.
        for round in Round::all(3) {
            for &(stage, rows, _, _) in &measures {
                want.push(Call::Tile {
                    device: DeviceId(d),
                    stage,
                    rows,
                    round,
                });
            }
        }
        let mut k_of: std::collections::HashMap<(StageId, bool), usize> = Default::default();
        for &(stage, rows, n, by_channels) in &measures {
            let times: Vec<u64> = (1..=3)
                .map(|k| fake.tile_time(DeviceId(d), rows, k))
                .collect();
            *device_us += 7 + times.iter().sum::<u64>();
            let k = k_of.entry((stage, by_channels)).or_default();
            let s = &p.stages[stage.index()];
            let sample = match by_channels {
                false => &s.samples[d][*k],
                true => &s.channel_samples[d][*k],
            };
            *k += 1;
            // The median and the fastest of the 3 rounds are kept.
            assert_eq!((sample.rows, sample.runs), (n, 3));
            assert_eq!((sample.median_us, sample.min_us), (times[0] + 1, times[0]));
        }
        for bytes in PROBE_BYTES {
            probes.push(Call::Probe {
                device: DeviceId(d),
                bytes,
            });
            let probe = Fake::probe_of(DeviceId(d), bytes);
            *device_us += probe.in_us + probe.out_us;
        }
        assert_eq!(
            p.devices[d].probes,
            PROBE_BYTES.map(|b| Fake::probe_of(DeviceId(d), b)).to_vec()
        );
        // Devices of no class measure their own samples.
        assert!(p.devices[d].profiled_with.is_empty());
    }
    want.extend(probes);
    assert_eq!(*fake.calls.borrow(), want);
    // Devices profile in parallel: the slower device's total.
    assert_eq!(p.profiling_us, device_us[0].max(device_us[1]));
    for (stage, s) in ir.stages.iter().zip(&p.stages) {
        assert_eq!(s.barrier, !stage.is_splittable(), "{}", stage.name);
        let by_channels = usize::from(worth_channels(&ir, stage.id)) * 2;
        assert_eq!(s.channel_samples.len(), by_channels, "{}", stage.name);
    }
    assert!(worth_channels(&ir, StageId(3)), "tiny-head's FC layer");
    assert!(p.groups.is_empty());
    assert_eq!((p.mode, p.clock), (ProfileMode::Legion, Clock::Emulated));
}

/// Devices of one class with rates within the tolerance share out one set of samples
/// (at the first one's shares), each measured once a round on one of them, and all hold
/// every sample; a device of the class whose rate is off, and a device of another
/// class, measure their own. `each_board` turns sharing off.
#[test]
fn legion_mode_profiles_a_class_as_one() {
    let ir = tiny_head();
    let devices = vec![
        (10.0, Some("firefly")),
        (10.3, Some("firefly")),
        (20.0, Some("odroid")),
        (11.0, Some("firefly")),
    ];
    let fake = Fake::with_devices(&ir, devices.clone());
    let p = run(&fake, &ir, &ProfileOptions::default()).unwrap();
    assert_eq!(
        profiling_sets(&p.devices, true),
        [vec![0, 1], vec![2], vec![3]]
    );
    assert_eq!(profiling_sets(&p.devices, false), [[0], [1], [2], [3]]);
    let names = |ds: &[&str]| ds.iter().map(|d| d.to_string()).collect::<Vec<_>>();
    assert_eq!(p.devices[0].profiled_with, names(&["board-1"]));
    assert_eq!(p.devices[1].profiled_with, names(&["board-0"]));
    assert!(p.devices[2].profiled_with.is_empty() && p.devices[3].profiled_with.is_empty());

    // The timed calls of round 1 per device: (stage, rows the fake sees).
    let calls = fake.calls.borrow();
    let round1 = |d: usize| -> Vec<(StageId, usize)> {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::Tile {
                    device,
                    stage,
                    rows,
                    round: Round::Timed(1),
                } if device.index() == d => Some((*stage, *rows)),
                _ => None,
            })
            .collect()
    };
    let (first, second) = (round1(0), round1(1));
    assert!(
        !first.is_empty() && !second.is_empty(),
        "both share the work"
    );
    let mut shared: Vec<_> = first.iter().chain(&second).copied().collect();
    shared.sort();
    // Together, once each, what board 0 would measure alone at its shares.
    let rates: Vec<f64> = devices.iter().map(|d| d.0).collect();
    let alone_at_shares = |d: usize| {
        let mut want: Vec<_> = measures_of(&ir, &rates, d)
            .into_iter()
            .map(|(stage, rows, _, _)| (stage, rows))
            .collect();
        want.sort();
        want
    };
    assert_eq!(shared, alone_at_shares(0));
    let mut alone = round1(3);
    alone.sort();
    assert_eq!(alone, alone_at_shares(3));
    for (stage, s) in ir.stages.iter().zip(&p.stages) {
        assert_eq!(s.samples[0], s.samples[1], "{}", stage.name);
        if !s.channel_samples.is_empty() {
            assert_eq!(s.channel_samples[0], s.channel_samples[1], "{}", stage.name);
        }
    }
    // Sharing halves the pair's work: the slowest device is board 3, measuring alone.
    let spent = |d: usize| {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::Tile {
                    device,
                    rows,
                    round,
                    ..
                } if device.index() == d => Some(match round {
                    Round::WarmUp => 7,
                    Round::Timed(k) => fake.tile_time(*device, *rows, *k),
                }),
                _ => None,
            })
            .sum::<u64>()
            + PROBE_BYTES
                .iter()
                .map(|&b| {
                    let probe = Fake::probe_of(DeviceId(d), b);
                    probe.in_us + probe.out_us
                })
                .sum::<u64>()
    };
    assert!(spent(0) < spent(3) && spent(1) < spent(3));
    assert_eq!(p.profiling_us, (0..4).map(spent).max().unwrap());
    drop(calls);

    let each = Fake::with_devices(&ir, devices);
    let opts = ProfileOptions {
        each_board: true,
        ..ProfileOptions::default()
    };
    let p = run(&each, &ir, &opts).unwrap();
    assert!(p.devices.iter().all(|d| d.profiled_with.is_empty()));
    let calls = each.calls.borrow();
    let timed = |d: usize| {
        calls
            .iter()
            .filter(|c| matches!(c, Call::Tile { device, round: Round::Timed(1), .. } if device.index() == d))
            .count()
    };
    assert_eq!(timed(0), shared.len());
    assert_eq!(timed(1), measures_of(&ir, &rates, 1).len());
}

#[test]
fn fss_mode_measures_each_choice_given_once_a_round() {
    let ir = tiny_head();
    let fake = Fake::new(&ir);
    let runs = 2;
    let rows_of = |s: u32| ir.stage(StageId(s)).output.height().unwrap();
    let fc = ir
        .stage(StageId(3))
        .channels
        .expect("tiny-head's FC layer")
        .count;
    let (pool1, last) = (rows_of(1), StageId(ir.stages.len() as u32 - 1));
    let all = |s: StageId| Rows::new(0, ir.stage(s).output.height().unwrap_or(0));
    let choices = vec![
        // Split by rows, the slower board on top.
        FssChoice {
            group: Group::new(0, 1),
            strips: vec![
                (DeviceId(1), Rows::new(0, 3)),
                (DeviceId(0), Rows::new(3, pool1)),
            ],
            option: 2,
            whole: false,
            channels: false,
        },
        // The whole model on the slower board.
        FssChoice {
            group: Group::new(0, last.index()),
            strips: vec![(DeviceId(1), all(last))],
            option: 1,
            whole: true,
            channels: false,
        },
        // The FC layer split by its output channels.
        FssChoice {
            group: Group::new(2, 3),
            strips: vec![
                (DeviceId(0), Rows::new(0, fc / 2)),
                (DeviceId(1), Rows::new(fc / 2, fc)),
            ],
            option: 2,
            whole: false,
            channels: true,
        },
    ];
    let opts = ProfileOptions {
        mode: ProfileMode::Fss,
        runs,
        max_group_len: Some(6),
        choices: choices.clone(),
        ..ProfileOptions::default()
    };
    let p = run(&fake, &ir, &opts).unwrap();

    let round = vec![
        Call::Step {
            devices: vec![DeviceId(1), DeviceId(0)],
            first: StageId(0),
            last: StageId(1),
            parts: vec![(Rows::new(0, 3), None), (Rows::new(3, pool1), None)],
        },
        Call::Step {
            devices: vec![DeviceId(1)],
            first: StageId(0),
            last,
            parts: vec![(all(last), None)],
        },
        Call::Step {
            devices: vec![DeviceId(0), DeviceId(1)],
            first: StageId(2),
            last: StageId(3),
            parts: vec![
                (all(StageId(3)), Some(Rows::new(0, fc / 2))),
                (all(StageId(3)), Some(Rows::new(fc / 2, fc))),
            ],
        },
    ];
    // A warm-up round, then the timed rounds, each over every choice in order.
    let want: Vec<Call> = (0..=runs).flat_map(|_| round.clone()).collect();
    assert_eq!(*fake.calls.borrow(), want);
    let recorded: Vec<_> = p
        .groups
        .iter()
        .map(|g| (g.first.0, g.last.0, g.strips.clone(), g.option, g.channels))
        .collect();
    let board = |d: usize| format!("board-{d}");
    let split =
        |a: usize, b: usize, top: Rows, bottom: Rows| vec![(board(a), top), (board(b), bottom)];
    assert_eq!(
        recorded,
        vec![
            (
                0,
                1,
                split(1, 0, Rows::new(0, 3), Rows::new(3, pool1)),
                Some(2),
                false
            ),
            (0, last.0, vec![(board(1), all(last))], Some(1), false),
            (
                2,
                3,
                split(0, 1, Rows::new(0, fc / 2), Rows::new(fc / 2, fc)),
                Some(2),
                true
            ),
        ]
    );
    assert_eq!(p.max_group_len, Some(6));
    // Choices run one after another: every run counts, warm-ups included.
    let spent: u64 = p
        .groups
        .iter()
        .map(|g| g.median_us * u64::from(runs + 1))
        .sum();
    assert_eq!(p.profiling_us, spent);
    assert!(p.stages.is_empty());

    let none = ProfileOptions {
        choices: vec![],
        ..opts
    };
    let e = run(&fake, &ir, &none).unwrap_err();
    assert!(e.to_string().contains("none were given"), "{e}");
}

#[test]
fn a_cluster_holding_another_model_is_refused() {
    let ir = tiny_head();
    let fake = Fake {
        model: "0".repeat(64),
        ..Fake::new(&ir)
    };
    let e = run(&fake, &ir, &ProfileOptions::default()).unwrap_err();
    assert!(e.to_string().contains("the cluster runs model 0000"), "{e}");
    assert!(fake.calls.borrow().is_empty());
}
