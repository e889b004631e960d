//! The profiler (the paper's "runtime evaluator"): the compiler driving the runtime to
//! measure a model on a cluster.
//!
//! - [`ProfileMode::Legion`] measures what the cost model needs and no more: every
//!   stage alone on each device at the device's expected share of rows and at
//!   neighbouring row counts (fused groups compute a few halo rows more), barrier
//!   stages whole, and transfer probes of a few sizes per link.
//! - [`ProfileMode::Fss`] measures every candidate group directly across the cluster
//!   (the Full Searching Scheme the paper compares against).
//!
//! Both report the time profiling took on the cluster's clock: in Legion mode devices
//! profile in parallel, so it is the slowest device's total; FSS runs groups one after
//! another on the whole cluster, so it is the sum.
//!
//! The profiler measures through a [`Testbed`]: the runtime's [`Coordinator`] on a
//! connected cluster, or a fake in tests.

use anyhow::{Context, Result, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use legion_ir::{Ir, Rows, Split, StageId, TensorRef};
pub use legion_partition::candidate_groups;
use legion_partition::{
    Group, channel_tile, check_group, strips_from_weights, tile, whole_stage, worth_channels,
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
    /// Runs `spec` on device `d` once to warm up and `runs` times on inputs the worker
    /// makes up: the warm-up time, each run's time (µs) and the host's rates (on the
    /// emulated clock).
    fn profile_tile(
        &self,
        d: DeviceId,
        spec: &TileSpec,
        runs: u32,
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
                class: d
                    .info
                    .emulation
                    .as_ref()
                    .map(|e| e.class.clone())
                    .filter(|c| !c.is_empty()),
                gflops: d.gflops(),
                link: d.device.link(),
                probes: vec![],
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
        runs: u32,
    ) -> Result<(u64, Vec<u64>, Option<HostRates>)> {
        Coordinator::profile_tile(self, d, spec, runs).await
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

/// How to profile.
#[derive(Clone, Debug)]
pub struct ProfileOptions {
    /// Legion (single stages) or FSS (every candidate group).
    pub mode: ProfileMode,
    /// Timed runs per measurement (after one warm-up run); the median is kept.
    pub runs: u32,
    /// FSS: the longest group measured (all lengths when `None`).
    pub max_group_len: Option<usize>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        ProfileOptions {
            mode: ProfileMode::Legion,
            runs: 3,
            max_group_len: None,
            progress: false,
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
/// share, one step below and two above (halo rows of deeper groups), `step = n/4`.
pub fn sample_rows(n: usize, height: usize) -> Vec<usize> {
    if n == 0 {
        return vec![1.min(height), 2.min(height)]
            .into_iter()
            .filter(|&r| r > 0)
            .collect();
    }
    let step = n.div_ceil(4).max(1);
    let mut rows: Vec<usize> = [n.saturating_sub(step), n, n + step, n + 2 * step]
        .into_iter()
        .map(|r| r.clamp(1, height))
        .collect();
    rows.sort_unstable();
    rows.dedup();
    rows
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

async fn legion_mode(
    bed: &impl Testbed,
    ir: &Ir,
    opts: &ProfileOptions,
    profile: &mut Profile,
) -> Result<()> {
    let weights = weights(profile);
    let devices = profile.devices.len();
    // Per stage, per device: the specs to measure and their row counts, then the
    // channel tiles and their channel counts.
    let mut plan: Vec<Vec<Vec<(usize, TileSpec)>>> = vec![];
    let mut channel_plan: Vec<Vec<Vec<(usize, TileSpec)>>> = vec![];
    for stage in &ir.stages {
        let mut per_device = vec![];
        let mut channel_specs = vec![];
        for d in 0..devices {
            if let Some(split) = stage.channels.filter(|_| worth_channels(ir, stage.id)) {
                let shares = strips_from_weights(split.count, &weights);
                let group = Group::new(stage.id.index(), stage.id.index());
                channel_specs.push(
                    sample_rows(shares[d].len(), split.count)
                        .into_iter()
                        .map(|n| {
                            let start = shares[d].start.min(split.count - n);
                            (n, channel_tile(ir, group, Rows::new(start, start + n)))
                        })
                        .collect(),
                );
            }
            let specs = match (&stage.split, stage.output.height()) {
                (Split::Rows, Some(height)) => {
                    let strips = strips_from_weights(height, &weights);
                    sample_rows(strips[d].len(), height)
                        .into_iter()
                        .map(|n| Ok((n, single_stage_spec(ir, stage.id, strips[d].start, n)?)))
                        .collect::<Result<Vec<_>>>()
                        .with_context(|| format!("stage {} ({})", stage.id, stage.name))?
                }
                _ => vec![(
                    stage.output.height().unwrap_or(0),
                    whole_stage(ir, stage.id),
                )],
            };
            per_device.push(specs);
        }
        plan.push(per_device);
        channel_plan.push(channel_specs);
    }
    let total: usize = plan.iter().flatten().map(Vec::len).sum::<usize>()
        + channel_plan.iter().flatten().map(Vec::len).sum::<usize>()
        + devices * PROBE_BYTES.len();
    let bar = progress_bar(opts, total as u64, "profiling");
    // Devices measure in parallel on a real cluster; every device's time counts once.
    let mut device_us = vec![0u64; devices];
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![vec![]; devices]; ir.stages.len()];
    let mut channel_samples: Vec<Vec<Vec<Sample>>> = channel_plan
        .iter()
        .map(|per_device| vec![vec![]; per_device.len()])
        .collect();
    for d in 0..devices {
        let name = profile.devices[d].name.clone();
        let measures = plan
            .iter()
            .enumerate()
            .map(|(s, p)| (s, false, &p[d]))
            .chain(
                channel_plan
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| !p.is_empty())
                    .map(|(s, p)| (s, true, &p[d])),
            );
        for (s, by_channels, specs) in measures {
            let unit = if by_channels { "channels" } else { "rows" };
            bar.set_message(format!("{name}: stage {s}, {unit}"));
            for (n, spec) in specs {
                let (warmup, times, host) = bed
                    .profile_tile(DeviceId(d), spec, opts.runs)
                    .await
                    .with_context(|| format!("profiling stage {s} on {n} {unit}"))?;
                profile.host_gflops = HostRates::union(profile.host_gflops, host);
                device_us[d] += warmup + times.iter().sum::<u64>();
                let kept = if by_channels {
                    &mut channel_samples[s][d]
                } else {
                    &mut samples[s][d]
                };
                kept.push(sample(*n, times));
                bar.inc(1);
            }
        }
        for &bytes in &PROBE_BYTES {
            let probe = bed.probe(DeviceId(d), bytes).await?;
            device_us[d] += probe.in_us + probe.out_us;
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
    let weights = weights(profile);
    let devices = profile.devices.len();
    let groups = candidate_groups(ir, opts.max_group_len);
    let barriers: Vec<StageId> = ir
        .stages
        .iter()
        .filter(|s| check_group(ir, s.id.index(), s.id.index()).is_err())
        .map(|s| s.id)
        .collect();
    let total = groups.len() + barriers.len() * devices;
    let bar = progress_bar(opts, total as u64, "fss");
    let mut profiling_us = 0;
    for group in &groups {
        bar.set_message(format!("group {}..{}", group.first, group.last));
        let height = ir.stage(group.last).output.height().context("splittable")?;
        let strips = strips_from_weights(height, &weights);
        // One strip per device in cluster order, so a tile's slot is its device's id.
        let tiling = tile(ir, *group, &strips)?;
        let tiles: Vec<(DeviceId, TileSpec)> = tiling
            .tiles
            .iter()
            .map(|t| (DeviceId(t.slot), t.spec()))
            .collect();
        let (measured, spent, host) = measure(bed, ir, &tiling.inputs, &tiles, opts.runs)
            .await
            .with_context(|| format!("measuring group {}..{}", group.first, group.last))?;
        profiling_us += spent;
        profile.host_gflops = HostRates::union(profile.host_gflops, host);
        profile.groups.push(GroupMeasurement {
            first: group.first,
            last: group.last,
            strips: tiling
                .tiles
                .iter()
                .map(|t| (profile.devices[t.slot].name.clone(), t.strip))
                .collect(),
            median_us: measured.total_us,
            runs: opts.runs,
            devices: measured.devices,
        });
        bar.inc(1);
    }
    for &s in &barriers {
        let spec = whole_stage(ir, s);
        let inputs: Vec<TensorRef> = ir.stage(s).inputs.clone();
        for d in 0..devices {
            bar.set_message(format!("stage {s} whole"));
            let (measured, spent, host) =
                measure(bed, ir, &inputs, &[(DeviceId(d), spec.clone())], opts.runs)
                    .await
                    .with_context(|| format!("measuring barrier stage {s}"))?;
            profiling_us += spent;
            profile.host_gflops = HostRates::union(profile.host_gflops, host);
            let rows = Rows::new(0, ir.stage(s).output.height().unwrap_or(0));
            profile.groups.push(GroupMeasurement {
                first: s,
                last: s,
                strips: vec![(profile.devices[d].name.clone(), rows)],
                median_us: measured.total_us,
                runs: opts.runs,
                devices: measured.devices,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    profile.max_group_len = opts.max_group_len;
    profile.profiling_us = profiling_us;
    Ok(())
}

/// Runs a step once to warm up and `runs` times more on made-up inputs; returns the
/// median run, the time all runs took on the cluster's clock and the host's rates
/// over them (on the emulated clock).
async fn measure(
    bed: &impl Testbed,
    ir: &Ir,
    inputs: &[TensorRef],
    tiles: &[(DeviceId, TileSpec)],
    runs: u32,
) -> Result<(StepTiming, u64, Option<HostRates>)> {
    // Inputs made up once; every run starts from them with no outputs stored.
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
    let mut timings = vec![];
    let mut spent = 0;
    let mut host = None;
    for run in 0..=runs {
        let t = bed.run_step(ir, &made_up, tiles).await?;
        spent += t.total_us;
        host = HostRates::union(host, HostRates::of_steps([&t]));
        if run > 0 {
            timings.push(t);
        }
    }
    timings.sort_by_key(|t| t.total_us);
    let median = timings.swap_remove(timings.len() / 2);
    Ok((median, spent, host))
}

#[cfg(test)]
mod tests;
