//! The profiler (the paper's "runtime evaluator"): the compiler driving the runtime to
//! measure a model on a cluster.
//!
//! - [`ProfileMode::Legion`] measures what the cost model needs and no more: every
//!   stage alone on each device at the device's expected share of rows, at
//!   neighbouring row counts (fused groups compute a few halo rows more) and whole,
//!   barrier stages whole, and transfer probes of a few sizes per link. Devices of one
//!   board class share one set of samples out among themselves ([`profiling_sets`]).
//! - [`ProfileMode::Fss`] measures the choices it is given directly on the cluster (the
//!   Full Searching Scheme the paper compares against): every entry of the cost table
//!   Legion searches, each group under each device option at the strips a plan would
//!   run it with ([`FssChoice`]).
//!
//! Both measure in rounds ([`Round`]): a warm-up round, then every measurement once per
//! timed round, so none runs right after itself. Both report the time profiling took
//! on the cluster's clock: in Legion mode devices profile in parallel, so it is the
//! slowest device's total; FSS runs groups one after another on the whole cluster, so
//! it is the sum.
//!
//! The profiler measures through a [`Testbed`]: the runtime's [`Coordinator`] on a
//! connected cluster, or a fake in tests.

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use legion_ir::{Ir, Rows, Split, StageId, TensorRef};
use legion_partition::{
    Group, boundary, channel_tile, strips_from_weights, tile, whole_group, whole_stage,
    worth_channels,
};
use legion_plan::{
    Clock, DeviceId, DeviceProfile, GroupMeasurement, HostRates, LinkProbe, PROFILE_VERSION,
    Profile, ProfileMode, Sample, StageProfile, StepTiming, TileSpec,
};
use legion_runtime::check::test_input;
use legion_runtime::{Coordinator, Tensors};
use std::future::Future;
use std::time::Instant;
use tract_onnx::prelude::Tensor;

/// A tensor made up for a measurement: stage `.0`'s output rows `.1`.
pub type MadeUp = (StageId, Rows, Tensor);

/// What the profiler measures on: a connected cluster whose workers have the model.
pub trait Testbed {
    /// The devices as a profile records them (no probes yet), in cluster order.
    fn devices(&self) -> Vec<DeviceProfile>;
    /// The clock its times are on.
    fn clock(&self) -> Clock;
    /// The coordinator's link, Mbit/s.
    fn coordinator_mbps(&self) -> f64;
    /// sha256 of the model the workers hold.
    fn model_sha256(&self) -> Result<String>;
    /// Runs `spec` on device `d` as `round` says (once untimed to warm up, or once
    /// timed) on inputs the worker makes up: the warm-up time, each timed run's time
    /// (µs) and the host's rates (on the emulated clock).
    fn profile_tile(
        &self,
        d: DeviceId,
        spec: &TileSpec,
        round: Round,
    ) -> impl Future<Output = Result<(u64, Vec<u64>, Option<HostRates>)>>;
    /// Sends `bytes` to device `d` and back.
    fn probe(&self, d: DeviceId, bytes: u64) -> impl Future<Output = Result<LinkProbe>>;
    /// Runs one step of `tiles` (device, tile) of `ir`, its inputs made up: the model's
    /// input and the tensors `inputs`.
    fn run_step(
        &self,
        ir: &Ir,
        inputs: &[MadeUp],
        tiles: &[(DeviceId, TileSpec)],
    ) -> impl Future<Output = Result<StepTiming>>;
}

impl Testbed for Coordinator {
    fn devices(&self) -> Vec<DeviceProfile> {
        Coordinator::devices(self)
            .iter()
            .map(|d| DeviceProfile {
                name: d.name().to_string(),
                class: d.device.board_class().map(str::to_string),
                gflops: d.gflops(),
                link: d.device.link(),
                probes: vec![],
                profiled_with: vec![],
            })
            .collect()
    }

    fn clock(&self) -> Clock {
        Coordinator::clock(self)
    }

    fn coordinator_mbps(&self) -> f64 {
        self.cluster().coordinator.mbps
    }

    fn model_sha256(&self) -> Result<String> {
        Ok(self.model()?.sha256.clone())
    }

    async fn profile_tile(
        &self,
        d: DeviceId,
        spec: &TileSpec,
        round: Round,
    ) -> Result<(u64, Vec<u64>, Option<HostRates>)> {
        let (runs, warm_up) = match round {
            Round::WarmUp => (0, true),
            Round::Timed(_) => (1, false),
        };
        Coordinator::profile_tile(self, d, spec, runs, warm_up).await
    }

    async fn probe(&self, d: DeviceId, bytes: u64) -> Result<LinkProbe> {
        Coordinator::probe(self, d, bytes).await
    }

    async fn run_step(
        &self,
        ir: &Ir,
        inputs: &[MadeUp],
        tiles: &[(DeviceId, TileSpec)],
    ) -> Result<StepTiming> {
        let mut tensors = Tensors::new(ir, test_input(&ir.input.shape))?;
        for (s, rows, t) in inputs {
            tensors.put(*s, *rows, t.clone())?;
        }
        Coordinator::run_step(self, tiles, &mut tensors).await
    }
}

/// One round of a profile. Every measurement runs once per round, the rounds one
/// after the other, so no measurement runs right after itself (its weights still in
/// the caches) unless it is the only one (docs/architecture.md, "Profiling").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// Each tile once, untimed: built, and its weights touched once.
    WarmUp,
    /// Timed round `k` (from 1).
    Timed(u32),
}

impl Round {
    /// The warm-up round, then `runs` timed rounds.
    pub fn all(runs: u32) -> impl Iterator<Item = Round> {
        std::iter::once(Round::WarmUp).chain((1..=runs).map(Round::Timed))
    }
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Round::WarmUp => write!(f, "warm-up round"),
            Round::Timed(k) => write!(f, "round {k}"),
        }
    }
}

/// One choice of a cost table, as FSS measures it: a group under one device option, at
/// the strips a plan would run it with.
#[derive(Clone, Debug, PartialEq)]
pub struct FssChoice {
    /// The group.
    pub group: Group,
    /// Per device, in strip order: its strip of the last stage's output rows (its
    /// channels when `channels` is set); for a group whole on one device, that device
    /// and all rows.
    pub strips: Vec<(DeviceId, Rows)>,
    /// The device option: how many of the fastest devices the choice may use (1 when
    /// one device runs the group whole); devices given no rows are not in `strips`.
    pub option: usize,
    /// One device runs the group whole.
    pub whole: bool,
    /// Split by the last stage's output channels.
    pub channels: bool,
}

/// How to profile.
#[derive(Clone, Debug)]
pub struct ProfileOptions {
    /// Legion (single stages) or FSS (the choices given).
    pub mode: ProfileMode,
    /// Timed rounds (after a warm-up round); each measurement's median is kept.
    pub runs: u32,
    /// FSS: the longest group among the choices, recorded in the profile (all lengths
    /// when `None`).
    pub max_group_len: Option<usize>,
    /// FSS: the choices to measure, every entry of the cost table Legion would search
    /// (`legion_pipeline::fss_choices` makes them).
    pub choices: Vec<FssChoice>,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Legion mode: every device measures all its own samples, rather than devices of
    /// one class sharing theirs ([`profiling_sets`]).
    pub each_board: bool,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        ProfileOptions {
            mode: ProfileMode::Legion,
            runs: 3,
            max_group_len: None,
            choices: vec![],
            progress: false,
            each_board: false,
        }
    }
}

/// Sizes of the transfer probes sent to every device, bytes.
pub const PROBE_BYTES: [u64; 3] = [4 << 10, 64 << 10, 1 << 20];

/// Profiles `ir` on the testbed (a connected cluster whose workers have the model).
pub async fn profile(bed: &impl Testbed, ir: &Ir, opts: &ProfileOptions) -> Result<Profile> {
    ensure!(
        opts.runs > 0,
        "profiling needs at least one run per measurement"
    );
    let model = bed.model_sha256()?;
    ensure!(
        model == ir.sha256,
        "the cluster runs model {model} but the profile is for {}",
        ir.sha256
    );
    let started = Instant::now();
    let mut profile = Profile {
        version: PROFILE_VERSION,
        model_sha256: ir.sha256.clone(),
        input_shape: ir.input.shape.clone(),
        mode: opts.mode,
        clock: bed.clock(),
        coordinator_mbps: bed.coordinator_mbps(),
        devices: bed.devices(),
        stages: vec![],
        groups: vec![],
        max_group_len: None,
        costed_from: None,
        profiling_us: 0,
        wall_us: 0,
        host_gflops: None,
    };
    match opts.mode {
        ProfileMode::Legion => legion_mode(bed, ir, opts, &mut profile).await?,
        ProfileMode::Fss => fss_mode(bed, ir, opts, &mut profile).await?,
    }
    profile.wall_us = started.elapsed().as_micros() as u64;
    Ok(profile)
}

/// Relative compute rates of the devices: where strips start.
fn weights(profile: &Profile) -> Vec<f64> {
    profile.devices.iter().map(|d| d.gflops).collect()
}

/// Row counts measured for a device whose share of a stage is `n` of `height` rows: the
/// share, one and two steps above it (halo rows of deeper groups; `step = n/4`), and
/// the whole stage (a group whole on one board, and the shares over fewer boards, are
/// interpolated up to it rather than extrapolated past the share); clamped to
/// `1..=height`. A share of half the stage or more is measured at the share and the
/// whole stage only: every larger count lies between the two. A device with no share
/// samples 1 and 2 rows only (docs/profile.md, "What each mode measures").
pub fn sample_rows(n: usize, height: usize) -> Vec<usize> {
    let step = n.div_ceil(4);
    let mut rows = match n {
        0 => vec![1, 2],
        _ if 2 * n < height => vec![n, n + step, n + 2 * step, height],
        _ => vec![n, height],
    };
    rows.retain_mut(|r| {
        *r = (*r).min(height);
        *r > 0
    });
    rows.dedup();
    rows
}

/// Channel counts measured for a device whose share of a stage is `n` of `count`: the
/// share alone (at least 1). Counts above it are interpolated up to the whole stage,
/// which [`sample_rows`] measures: the same work as all its channels.
pub fn sample_channels(n: usize, count: usize) -> Vec<usize> {
    if count == 0 {
        vec![]
    } else {
        vec![n.clamp(1, count)]
    }
}

/// The tile of stage `s` alone computing `n` rows, placed at `start` (moved up when it
/// would run past the bottom).
fn single_stage_spec(ir: &Ir, s: StageId, start: usize, n: usize) -> Result<TileSpec> {
    let height = ir.stage(s).output.height().context("splittable stage")?;
    let a = start.min(height - n);
    let cut = [
        Rows::new(0, a),
        Rows::new(a, a + n),
        Rows::new(a + n, height),
    ];
    let tiling = tile(ir, Group::new(s.index(), s.index()), &cut)?;
    let t = tiling
        .tiles
        .iter()
        .find(|t| t.slot == 1)
        .context("the middle strip is not empty")?;
    Ok(t.spec())
}

fn progress_bar(opts: &ProfileOptions, total: u64, what: &str) -> ProgressBar {
    let bar = if opts.progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed} {wide_msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// How far a device's calibrated rate may be from that of the first device of its class
/// for the two to be profiled as one (a board that runs hot, or is loaded, is not).
pub const CLASS_RATE_TOLERANCE: f64 = 0.05;

/// The sets of devices legion mode profiles as one, each in cluster order: with
/// `by_class`, devices of one board class whose rates are within
/// [`CLASS_RATE_TOLERANCE`] of the set's first device; every other device alone. A set's
/// samples are measured at its first device's shares.
pub fn profiling_sets(devices: &[DeviceProfile], by_class: bool) -> Vec<Vec<usize>> {
    let mut sets: Vec<Vec<usize>> = vec![];
    for (d, device) in devices.iter().enumerate() {
        let joins = match &device.class {
            Some(class) if by_class => sets.iter().position(|set| {
                let first = &devices[set[0]];
                first.class.as_ref() == Some(class)
                    && (device.gflops / first.gflops - 1.0).abs() <= CLASS_RATE_TOLERANCE
            }),
            _ => None,
        };
        match joins {
            Some(k) => sets[k].push(d),
            None => sets.push(vec![d]),
        }
    }
    sets
}

/// Splits measurements of estimated `costs` among `devices`: the costliest first, each
/// to the device with the least so far. Each device's part is in the original order.
fn share_out(costs: &[f64], devices: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]));
    let mut load = vec![0.0f64; devices];
    let mut parts = vec![vec![]; devices];
    for k in order {
        let least = (0..devices)
            .min_by(|&x, &y| load[x].total_cmp(&load[y]))
            .expect("a set has a device");
        load[least] += costs[k];
        parts[least].push(k);
    }
    for part in &mut parts {
        part.sort_unstable();
    }
    parts
}

/// A measurement's estimated cost: its stage's FLOPs, in proportion to the rows (or
/// channels) it computes.
fn estimated_flops(ir: &Ir, s: usize, by_channels: bool, n: usize) -> f64 {
    let stage = &ir.stages[s];
    let fraction = match (by_channels, stage.channels, stage.output.height()) {
        (true, Some(split), _) => n as f64 / split.count as f64,
        (false, _, Some(height)) if height > 0 => n as f64 / height as f64,
        _ => 1.0,
    };
    stage.flops.max(1) as f64 * fraction
}

async fn legion_mode(
    bed: &impl Testbed,
    ir: &Ir,
    opts: &ProfileOptions,
    profile: &mut Profile,
) -> Result<()> {
    let weights = weights(profile);
    let devices = profile.devices.len();
    let sets = profiling_sets(&profile.devices, !opts.each_board);
    // Per set, at its first device's shares: every measurement (stage, by channels, rows
    // or channels, tile), in stage order, rows first.
    let mut measures: Vec<Vec<(usize, bool, usize, TileSpec)>> = vec![];
    for set in &sets {
        let d = set[0];
        let mut rows = vec![];
        let mut channels = vec![];
        for stage in &ir.stages {
            let s = stage.id.index();
            if let Some(split) = stage.channels.filter(|_| worth_channels(ir, stage.id)) {
                let shares = strips_from_weights(split.count, &weights);
                let group = Group::new(s, s);
                for n in sample_channels(shares[d].len(), split.count) {
                    let start = shares[d].start.min(split.count - n);
                    channels.push((
                        s,
                        true,
                        n,
                        channel_tile(ir, group, Rows::new(start, start + n)),
                    ));
                }
            }
            match (&stage.split, stage.output.height()) {
                (Split::Rows, Some(height)) => {
                    let strips = strips_from_weights(height, &weights);
                    for n in sample_rows(strips[d].len(), height) {
                        let spec = single_stage_spec(ir, stage.id, strips[d].start, n)
                            .with_context(|| format!("stage {} ({})", stage.id, stage.name))?;
                        rows.push((s, false, n, spec));
                    }
                }
                _ => rows.push((
                    s,
                    false,
                    stage.output.height().unwrap_or(0),
                    whole_stage(ir, stage.id),
                )),
            }
        }
        rows.extend(channels);
        measures.push(rows);
    }
    let cases: usize = measures.iter().map(Vec::len).sum();
    let total = cases * (opts.runs as usize + 1) + devices * PROBE_BYTES.len();
    let bar = progress_bar(opts, total as u64, "profiling");
    // Devices measure in parallel on a real cluster; every device's time counts once.
    let mut device_us = vec![0u64; devices];
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![vec![]; devices]; ir.stages.len()];
    let mut channel_samples: Vec<Vec<Vec<Sample>>> = ir
        .stages
        .iter()
        .map(|stage| {
            let by_channels = stage.channels.filter(|_| worth_channels(ir, stage.id));
            match by_channels {
                Some(_) => vec![vec![]; devices],
                None => vec![],
            }
        })
        .collect();
    for (set, measures) in sets.iter().zip(&measures) {
        let costs: Vec<f64> = measures
            .iter()
            .map(|&(s, by_channels, n, _)| estimated_flops(ir, s, by_channels, n))
            .collect();
        let mut times: Vec<Vec<u64>> = vec![vec![]; measures.len()];
        for (&d, part) in set.iter().zip(share_out(&costs, set.len())) {
            let name = &profile.devices[d].name;
            for round in Round::all(opts.runs) {
                for &k in &part {
                    let (s, by_channels, n, ref spec) = measures[k];
                    let unit = if by_channels { "channels" } else { "rows" };
                    bar.set_message(format!("{name}: {round}, stage {s}, {unit}"));
                    let (warmup, got, host) = bed
                        .profile_tile(DeviceId(d), spec, round)
                        .await
                        .with_context(|| {
                            format!("profiling stage {s} on {n} {unit} ({round}) on {name}")
                        })?;
                    profile.host_gflops = HostRates::union(profile.host_gflops, host);
                    device_us[d] += warmup + got.iter().sum::<u64>();
                    times[k].extend(got);
                    bar.inc(1);
                }
            }
        }
        for (&(s, by_channels, n, _), times) in measures.iter().zip(times) {
            let measured = sample(n, times);
            let kept = if by_channels {
                &mut channel_samples[s]
            } else {
                &mut samples[s]
            };
            for &d in set {
                kept[d].push(measured);
            }
        }
        for &d in set {
            profile.devices[d].profiled_with = set
                .iter()
                .filter(|&&other| other != d)
                .map(|&other| profile.devices[other].name.clone())
                .collect();
        }
    }
    for (d, device_us) in device_us.iter_mut().enumerate() {
        for &bytes in &PROBE_BYTES {
            let probe = bed.probe(DeviceId(d), bytes).await?;
            *device_us += probe.in_us + probe.out_us;
            profile.devices[d].probes.push(probe);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    profile.stages = ir
        .stages
        .iter()
        .zip(samples)
        .zip(channel_samples)
        .map(|((stage, samples), channel_samples)| StageProfile {
            stage: stage.id,
            barrier: !matches!(stage.split, Split::Rows) || stage.output.height().is_none(),
            samples,
            channel_samples,
        })
        .collect();
    profile.profiling_us = device_us.into_iter().max().unwrap_or(0);
    Ok(())
}

fn sample(rows: usize, mut times: Vec<u64>) -> Sample {
    times.sort_unstable();
    Sample {
        rows,
        median_us: times[times.len() / 2],
        min_us: times[0],
        runs: times.len() as u32,
    }
}

async fn fss_mode(
    bed: &impl Testbed,
    ir: &Ir,
    opts: &ProfileOptions,
    profile: &mut Profile,
) -> Result<()> {
    ensure!(
        !opts.choices.is_empty(),
        "fss mode measures the choices of a cost table, and none were given"
    );
    let name = |d: DeviceId| -> Result<String> {
        profile
            .devices
            .get(d.index())
            .map(|p| p.name.clone())
            .with_context(|| format!("a choice runs on device {d}, which the cluster lacks"))
    };
    let mut cases: Vec<Case> = vec![];
    for choice in &opts.choices {
        let group = choice.group;
        let strips = choice
            .strips
            .iter()
            .map(|&(d, rows)| Ok((name(d)?, rows)))
            .collect::<Result<Vec<_>>>()?;
        let (inputs, tiles) = if choice.whole {
            let [(d, _)] = choice.strips[..] else {
                bail!("group {group} runs whole on {} devices", strips.len());
            };
            (boundary(ir, group).0, vec![(d, whole_group(ir, group))])
        } else if choice.channels {
            let tiles = choice
                .strips
                .iter()
                .map(|&(d, c)| (d, channel_tile(ir, group, c)))
                .collect();
            (boundary(ir, group).0, tiles)
        } else {
            let cut: Vec<Rows> = choice.strips.iter().map(|(_, r)| *r).collect();
            let tiling = tile(ir, group, &cut).with_context(|| format!("group {group}"))?;
            let tiles = tiling
                .tiles
                .iter()
                .map(|t| (choice.strips[t.slot].0, t.spec()))
                .collect();
            (tiling.inputs, tiles)
        };
        cases.push(Case {
            group,
            strips,
            option: choice.option,
            channels: choice.channels && !choice.whole,
            inputs,
            tiles,
        });
    }
    let total = cases.len() * (opts.runs as usize + 1);
    let bar = progress_bar(opts, total as u64, "fss");
    let mut profiling_us = 0;
    let mut timings: Vec<Vec<StepTiming>> = vec![vec![]; cases.len()];
    for round in Round::all(opts.runs) {
        for (case, timings) in cases.iter().zip(&mut timings) {
            let what = format!("group {} on {} devices", case.group, case.tiles.len());
            bar.set_message(format!("{round}, {what}"));
            let t = run_made_up(bed, ir, &case.inputs, &case.tiles)
                .await
                .with_context(|| format!("measuring {what} ({round})"))?;
            profiling_us += t.total_us;
            profile.host_gflops = HostRates::union(profile.host_gflops, HostRates::of_steps([&t]));
            if round != Round::WarmUp {
                timings.push(t);
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    for (case, mut timings) in cases.into_iter().zip(timings) {
        timings.sort_by_key(|t| t.total_us);
        let median = timings.swap_remove(timings.len() / 2);
        profile.groups.push(GroupMeasurement {
            first: case.group.first,
            last: case.group.last,
            strips: case.strips,
            option: Some(case.option),
            channels: case.channels,
            median_us: median.total_us,
            runs: opts.runs,
            devices: median.devices,
        });
    }
    profile.max_group_len = opts.max_group_len;
    profile.profiling_us = profiling_us;
    Ok(())
}

/// One FSS measurement: a group's tiles across its devices (or the group whole on
/// one), the tensors it reads and the strips it records.
struct Case {
    group: Group,
    strips: Vec<(String, Rows)>,
    option: usize,
    channels: bool,
    inputs: Vec<TensorRef>,
    tiles: Vec<(DeviceId, TileSpec)>,
}

/// Runs a step once on made-up inputs (made up again for every run, so that a
/// profile's rounds do not hold every case's inputs at once).
async fn run_made_up(
    bed: &impl Testbed,
    ir: &Ir,
    inputs: &[TensorRef],
    tiles: &[(DeviceId, TileSpec)],
) -> Result<StepTiming> {
    let made_up: Vec<MadeUp> = inputs
        .iter()
        .filter_map(|r| match r {
            TensorRef::Stage(s) => {
                let info = ir.tensor(*r);
                Some((
                    *s,
                    Rows::new(0, info.height().unwrap_or(0)),
                    test_input(&info.shape),
                ))
            }
            TensorRef::Input => None,
        })
        .collect();
    bed.run_step(ir, &made_up, tiles).await
}

#[cfg(test)]
mod tests;
