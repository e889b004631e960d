//! Cost pass: predicts the time of a fused group on a cluster from a `legion`-mode
//! profile and the partition pass's tiles (docs/architecture.md, "Costing a group"). Three predictors:
//!
//! - [`Predictor::Legion`], the paper's formula
//!   `T_d(G) = alpha_in * S_d(in strip alone) + sum_l alpha_l * E_d(l, share) + R_d(out)`,
//!   `T(G) = max_d T_d(G)`, with `alpha_l * E_d(l, share)` replaced by `E_d` at the rows
//!   stage `l` computes wherever its samples reach them (legion mode samples every stage
//!   whole; a stage's time is not proportional to its rows).
//! - [`Predictor::Affine`]: E at the rows each stage really computes in the group, on the
//!   least-squares line through the stage's samples (affine in rows), and transfers that
//!   share the coordinator's link (the network model of `legion_plan::network`), so
//!   scatter cannot beat total bytes / coordinator bandwidth.
//! - [`Predictor::Aofl`]: the prior work's per-device linear regressions over layer
//!   features (Zhou et al., SEC'19), fitted on the same single-stage samples.
//!
//! Barrier stages run whole on one device: their measured time plus the transfers.
//!
//! Transfers follow the transport the plan runs on ([`Transport`]). Through the hub a
//! tile receives its whole input strips and sends its output strips back. When boards
//! run their programs a tile receives only the rows it lacks, from the boards that
//! hold them; a group's cost then depends on how the group before it was split, so the
//! cost is made group-local by an assumption about who produced the group's inputs
//! ([`Producers`]; docs/architecture.md, "Costing a group"). Once the groups
//! are chosen, [`CostModel::shares_holding`] cuts each group again given the rows its
//! devices really hold ([`Holdings`]).

mod aofl;
mod channels;
mod fit;

use fit::line;
pub use fit::{Affine, interpolate, least_squares};

use anyhow::{Result, bail, ensure};
use legion_ir::{Ir, Rows, StageId, TensorRef};
use legion_partition::{
    Group, Held, Reductions, StageInTile, SuffixTiler, TileView, boundary, rebalance,
    strips_from_weights, tile,
};
use legion_plan::network::{StepPart, step_timeline};
use legion_plan::{DeviceId, Link, Profile, ProfileMode, Transport};
use rustc_hash::FxHasher;
use serde::Serialize;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasherDefault;
use std::str::FromStr;
use std::sync::Mutex;

/// Which formula predicts a group's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Predictor {
    /// The paper's formula: E at the rows each stage computes within the samples,
    /// alpha-scaled past them.
    Legion,
    /// E on a line fitted to the samples, at fused row counts, with a shared
    /// coordinator link.
    Affine,
    /// The AOFL baseline: per-device linear regression over layer features.
    Aofl,
}

impl Predictor {
    /// Every predictor, in a stable order.
    pub const ALL: [Predictor; 3] = [Predictor::Legion, Predictor::Affine, Predictor::Aofl];
}

impl fmt::Display for Predictor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Predictor::Legion => "legion",
            Predictor::Affine => "affine",
            Predictor::Aofl => "aofl",
        })
    }
}

impl FromStr for Predictor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Predictor::ALL
            .into_iter()
            .find(|p| p.to_string() == s)
            .ok_or_else(|| format!("unknown predictor {s:?}; valid: legion, affine, aofl"))
    }
}

/// One device's predicted part of a group, µs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DevicePrediction {
    /// The device.
    pub device: DeviceId,
    /// Its strip of the group's last stage.
    pub strip: Rows,
    /// Input strips arriving.
    pub in_us: f64,
    /// Per stage of the group.
    pub compute_us: Vec<(StageId, f64)>,
    /// Output strips coming back.
    pub out_us: f64,
    /// From the step's start to its output's arrival.
    pub total_us: f64,
}

/// A group's predicted time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// The predictor used.
    pub predictor: Predictor,
    /// First stage.
    pub first: StageId,
    /// Last stage.
    pub last: StageId,
    /// Per device with rows.
    pub devices: Vec<DevicePrediction>,
    /// `max` over devices of their totals.
    pub total_us: f64,
}

/// Per device, a stage's samples as (rows or channels, median µs) points.
fn points(samples: &[Vec<legion_plan::Sample>]) -> Vec<Vec<(f64, f64)>> {
    samples
        .iter()
        .map(|per_device| {
            per_device
                .iter()
                .map(|p| (p.rows as f64, p.median_us as f64))
                .collect()
        })
        .collect()
}

/// Per device, stage `s`'s channel points: its channel samples and, where the device
/// measured the stage whole (`rows` holds a sample at the stage's height, or at 0 rows
/// for an output without rows), that time at all its channels. It is the same work, so
/// a channel share over fewer boards is interpolated up to it rather than extrapolated
/// from the share (docs/profile.md).
fn channel_points(
    ir: &Ir,
    s: StageId,
    mut channels: Vec<Vec<(f64, f64)>>,
    rows: &[Vec<(f64, f64)>],
) -> Vec<Vec<(f64, f64)>> {
    let stage = ir.stage(s);
    let Some(split) = stage.channels else {
        return channels;
    };
    let height = stage.output.height().unwrap_or(0) as f64;
    let all = split.count as f64;
    for (points, rows) in channels.iter_mut().zip(rows) {
        let whole = rows.iter().find(|&&(r, _)| r == height);
        if let Some(&(_, us)) = whole
            && !points.is_empty()
            && points.iter().all(|&(c, _)| c < all)
        {
            points.push((all, us));
        }
    }
    channels
}

impl Prediction {
    /// The prediction of `group` made of its devices' parts: the slowest one's total.
    fn of(predictor: Predictor, group: Group, devices: Vec<DevicePrediction>) -> Prediction {
        let total_us = devices.iter().map(|d| d.total_us).fold(0.0, f64::max);
        Prediction {
            predictor,
            first: group.first,
            last: group.last,
            devices,
            total_us,
        }
    }
}

/// The link a fitted transfer time stands for.
fn fitted_link(a: &Affine) -> Link {
    Link {
        mbps: if a.us_per_byte > 0.0 {
            8.0 / a.us_per_byte
        } else {
            f64::MAX
        },
        latency_ms: a.latency_us / 1e3,
    }
}

/// Who produced a group's inputs, as the group-local costs of programs assume. Neither
/// is right for every FLC; compile searches under both and keeps the FLC predicted
/// faster on the programs' timeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Producers {
    /// The group's own devices, at its own shares (its strips scaled to each input's
    /// height): a device lacks only its halos.
    #[default]
    SameShares,
    /// Every device of the profile, at shares proportional to its speed: a group on
    /// fewer devices also receives what the others made.
    AllDevices,
}

impl Producers {
    /// Both assumptions, in a stable order.
    pub const ALL: [Producers; 2] = [Producers::SameShares, Producers::AllDevices];
}

impl fmt::Display for Producers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Producers::SameShares => "same shares",
            Producers::AllDevices => "all devices",
        })
    }
}

/// The rows of each tensor each device holds at some point of a plan's programs: what
/// it computed or received in the groups before. Of a tensor computed split by channels,
/// a device that computed some holds every row of those channels only.
#[derive(Clone, Debug, Default)]
pub struct Holdings(
    HashMap<(DeviceId, TensorRef), Held>,
    HashMap<(DeviceId, TensorRef), Rows>,
);

impl Holdings {
    /// Device `d` holds `rows` of `tensor` (`0..0`: all of a tensor without rows).
    pub fn insert(&mut self, d: DeviceId, tensor: TensorRef, rows: Rows) {
        self.0.entry((d, tensor)).or_default().insert(rows);
    }

    /// Device `d` computed `channels` (all their rows) of `tensor`.
    pub fn insert_channels(&mut self, d: DeviceId, tensor: TensorRef, channels: Rows) {
        self.1.insert((d, tensor), channels);
    }

    /// Bytes of `want` rows of `tensor` device `d` lacks.
    pub fn lacking_bytes(&self, ir: &Ir, d: DeviceId, tensor: TensorRef, want: Rows) -> u64 {
        let own = self.1.get(&(d, tensor)).copied();
        self.lacking(d, tensor, want)
            .into_iter()
            .map(|rows| {
                // Of rows not held whole, it holds the channels it computed.
                let mine = own.map_or(0, |c| ir.part_bytes(tensor, rows, Some(c)));
                ir.part_bytes(tensor, rows, None) - mine
            })
            .sum()
    }

    /// Records what device `d` holds after running tile `t`: its inputs and its outputs.
    pub fn insert_tile(&mut self, d: DeviceId, t: &TileView) {
        for r in &t.received {
            self.insert(d, r.tensor, r.rows);
        }
        for (s, rows) in t.sent {
            self.insert(d, TensorRef::Stage(*s), *rows);
        }
    }

    /// The parts of `want` of `tensor` that `d` lacks.
    fn lacking(&self, d: DeviceId, tensor: TensorRef, want: Rows) -> Vec<Rows> {
        match self.0.get(&(d, tensor)) {
            Some(held) => held.lacking(want),
            None => vec![want],
        }
    }
}

/// Shares are cached per predictor, group and device subset (a model has one
/// [`Producers`]).
type SharesKey = (Predictor, Group, Vec<DeviceId>);

/// Predicts group times from one profile of one model.
pub struct CostModel<'a> {
    ir: &'a Ir,
    profile: &'a Profile,
    transport: Transport,
    producers: Producers,
    /// Per device: its rows of a tensor of height `h` when every device made it at
    /// shares proportional to speed are `strips_from_weights(h, weights)[slot]`.
    proportional: (Vec<f64>, Vec<usize>),
    link_in: Vec<Affine>,
    link_out: Vec<Affine>,
    aofl: Vec<aofl::Regressions>,
    /// Per stage, per device: the profile's (rows, median µs) samples.
    samples: Vec<Vec<Vec<(f64, f64)>>>,
    /// Per stage, per device: (intercept µs, µs per row) of the line through them.
    lines: Vec<Vec<(f64, f64)>>,
    /// Per stage, per device: the profile's (channels, median µs) channel samples and
    /// the whole stage as all its channels ([`channel_points`]); empty for a stage
    /// without them.
    channel_samples: Vec<Vec<Vec<(f64, f64)>>>,
    shares: Mutex<HashMap<SharesKey, Vec<(DeviceId, Rows)>>>,
}

impl<'a> CostModel<'a> {
    /// Checks that `profile` is a `legion`-mode profile of `ir` and fits the links and
    /// the AOFL regressions; transfers are costed as `transport` moves them.
    pub fn new(ir: &'a Ir, profile: &'a Profile, transport: Transport) -> Result<CostModel<'a>> {
        if profile.model_sha256 != ir.sha256 {
            bail!(
                "the profile is of model {}, not of this model ({}); profile this model",
                profile.model_sha256,
                ir.sha256
            );
        }
        ensure!(
            profile.mode == ProfileMode::Legion,
            "predictions need a legion-mode profile (this one is {:?}); run `legion profile \
             --mode legion`",
            profile.mode
        );
        ensure!(!profile.devices.is_empty(), "the profile has no devices");
        ensure!(
            profile.stages.len() == ir.stages.len()
                && profile
                    .stages
                    .iter()
                    .all(|s| s.samples.len() == profile.devices.len()),
            "the profile's stages do not match the model's {} stages on {} devices",
            ir.stages.len(),
            profile.devices.len()
        );
        if let Some(dev) = profile.devices.iter().find(|d| d.probes.is_empty()) {
            bail!("device {} has no transfer probes in the profile", dev.name);
        }
        let fit = |f: fn(&legion_plan::LinkProbe) -> u64| -> Vec<Affine> {
            profile
                .devices
                .iter()
                .map(|d| Affine::fit(&d.probes.iter().map(|p| (p.bytes, f(p))).collect::<Vec<_>>()))
                .collect()
        };
        let link_in = fit(|p| p.in_us);
        let link_out = fit(|p| p.out_us);
        let aofl = (0..profile.devices.len())
            .map(|d| aofl::Regressions::fit(ir, profile, d))
            .collect();
        let samples: Vec<Vec<Vec<(f64, f64)>>> =
            profile.stages.iter().map(|s| points(&s.samples)).collect();
        let lines = samples
            .iter()
            .map(|per_device| per_device.iter().map(|p| line(p)).collect())
            .collect();
        let channel_samples = profile
            .stages
            .iter()
            .zip(&samples)
            .map(|(s, rows)| channel_points(ir, s.stage, points(&s.channel_samples), rows))
            .collect();
        let mut order: Vec<usize> = (0..profile.devices.len()).collect();
        order.sort_by(|&a, &b| {
            profile.devices[b]
                .gflops
                .total_cmp(&profile.devices[a].gflops)
                .then(a.cmp(&b))
        });
        let weights = order.iter().map(|&d| profile.devices[d].gflops).collect();
        let mut slot = vec![0; order.len()];
        for (k, &d) in order.iter().enumerate() {
            slot[d] = k;
        }
        Ok(CostModel {
            ir,
            profile,
            transport,
            producers: Producers::default(),
            proportional: (weights, slot),
            link_in,
            link_out,
            aofl,
            samples,
            lines,
            channel_samples,
            shares: Mutex::default(),
        })
    }

    /// Device `d`'s link as fitted to its probes (sending to it), for timelines.
    pub fn link(&self, d: DeviceId) -> Link {
        fitted_link(&self.link_in[d.index()])
    }

    /// The model with `producers` assumed for the inputs of groups (programs only).
    pub fn assuming(mut self, producers: Producers) -> CostModel<'a> {
        self.producers = producers;
        self
    }

    /// The transport whose transfers are costed.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The profile's devices.
    pub fn device_count(&self) -> usize {
        self.profile.devices.len()
    }

    /// The devices' names.
    pub fn device_name(&self, d: DeviceId) -> &str {
        &self.profile.devices[d.index()].name
    }

    /// E_d(l, rows): the single-stage time interpolated at `rows` output rows.
    pub fn stage_time(&self, d: DeviceId, s: StageId, rows: usize) -> f64 {
        interpolate(&self.samples[s.index()][d.index()], rows as f64)
    }

    /// E_d(l, rows) on the least-squares line through the stage's samples: what
    /// [`Predictor::Affine`] uses, since fused row counts often lie past the samples,
    /// where the last segment's noisy slope would be extended.
    fn stage_time_fitted(&self, d: DeviceId, s: StageId, rows: usize) -> f64 {
        let (intercept, slope) = self.lines[s.index()][d.index()];
        (intercept + slope * rows as f64).max(0.0)
    }

    /// Which reductions this model's transport lets a row group's boards combine:
    /// only boards that run their own programs exchange partial results.
    pub fn reductions(&self) -> Reductions {
        match self.transport {
            Transport::Programs => Reductions::Combined,
            Transport::Hub => Reductions::Barriers,
        }
    }

    /// Bytes of `rows` of tensor `r` (all of it without a row axis).
    fn bytes(&self, r: TensorRef, rows: Rows) -> u64 {
        self.ir.tensor(r).strip_bytes(rows)
    }

    /// The predicted time of `group` with `strips`: per device (index into the
    /// profile), its strip of the last stage's output, in order and covering it.
    pub fn predict(
        &self,
        predictor: Predictor,
        group: Group,
        strips: &[(DeviceId, Rows)],
    ) -> Result<Prediction> {
        self.predict_at(predictor, group, strips, None)
    }

    /// [`CostModel::predict`] when the devices hold the rows `held` lists (programs
    /// transport; the hub ignores it).
    pub fn predict_holding(
        &self,
        predictor: Predictor,
        group: Group,
        strips: &[(DeviceId, Rows)],
        held: &Holdings,
    ) -> Result<Prediction> {
        self.predict_at(predictor, group, strips, Some(held))
    }

    /// Tiles `group` at `strips` and predicts it, with what the devices hold if given.
    fn predict_at(
        &self,
        predictor: Predictor,
        group: Group,
        strips: &[(DeviceId, Rows)],
        held: Option<&Holdings>,
    ) -> Result<Prediction> {
        let cut: Vec<Rows> = strips.iter().map(|(_, r)| *r).collect();
        let tiling = tile(self.ir, group, &cut)?;
        let views: Vec<(DeviceId, TileView)> = tiling
            .tiles
            .iter()
            .map(|t| (strips[t.slot].0, t.view()))
            .collect();
        Ok(self.predict_views(predictor, group, &views, held))
    }

    /// [`CostModel::predict`] of the tiles of `group`, per device (profile index).
    fn predict_views(
        &self,
        predictor: Predictor,
        group: Group,
        tiles: &[(DeviceId, TileView)],
        held: Option<&Holdings>,
    ) -> Prediction {
        let mut devices: Vec<DevicePrediction> = tiles
            .iter()
            .map(|(d, t)| self.device_alone(predictor, *d, t, held))
            .collect();
        if predictor == Predictor::Affine && self.transport == Transport::Hub {
            self.share_the_hub(tiles, &mut devices);
        }
        let phased = self.exchange_partials(group, tiles, &mut devices);
        let mut prediction = Prediction::of(predictor, group, devices);
        if let Some(total_us) = phased {
            prediction.total_us = prediction.total_us.max(total_us);
        }
        prediction
    }

    /// For a group whose devices combine reductions (docs/architecture.md, "Reductions
    /// across devices"): adds to each device's input time the partial results it
    /// receives from the other contributors, and returns the group's time with the
    /// devices in step at every combine: per phase, the slowest device's compute, then
    /// the slowest exchange. `None` without combined reductions.
    fn exchange_partials(
        &self,
        group: Group,
        tiles: &[(DeviceId, TileView)],
        devices: &mut [DevicePrediction],
    ) -> Option<f64> {
        let (_, first) = tiles.first()?;
        if !first.stages.iter().any(|st| st.partial) {
            return None;
        }
        let phases = self.ir.phases(group.first, group.last);
        let count = phases.iter().max().map_or(1, |m| m + 1);
        // Per phase: the slowest device's compute (inputs first, outputs last), and the
        // slowest device's exchange of that phase's partials.
        let mut compute = vec![0.0f64; count];
        let mut exchange = vec![0.0f64; count];
        for ((d, t), p) in tiles.iter().zip(devices.iter_mut()) {
            let mut mine = vec![0.0f64; count];
            mine[0] += p.in_us;
            mine[count - 1] += p.out_us;
            let mut received = vec![0u64; count];
            for (st, (_, e)) in t.stages.iter().zip(&p.compute_us) {
                let k = phases[st.stage.index() - group.first.index()];
                mine[k] += e;
                if st.partial {
                    let others = tiles
                        .iter()
                        .filter(|(o, ot)| {
                            o != d
                                && ot
                                    .stages
                                    .iter()
                                    .find(|x| x.stage == st.stage)
                                    .and_then(|x| x.inputs.first())
                                    .is_some_and(|i| !i.rows.is_empty())
                        })
                        .count() as u64;
                    received[k] += others * self.ir.stage(st.stage).output.len() as u64 * 4;
                }
            }
            let mut exchange_us = 0.0;
            for k in 0..count {
                compute[k] = compute[k].max(mine[k]);
                let us = self.link_in[d.index()].time_us(received[k]);
                exchange[k] = exchange[k].max(us);
                exchange_us += us;
            }
            p.in_us += exchange_us;
            p.total_us += exchange_us;
        }
        Some(compute.iter().sum::<f64>() + exchange.iter().sum::<f64>())
    }

    /// Bytes of the rows a tile lacks when boards run their programs: the rows of each
    /// input outside the device's own share of it (by [`Producers`]: its strip of the
    /// group's last stage scaled to the input's height, or its proportional share of
    /// the input), and all of the model's input, which the coordinator sends.
    /// With `held`, the rows each input lacks are those `held` does not list for `d`.
    fn lacking_bytes(&self, d: DeviceId, t: &TileView, held: Option<&Holdings>) -> u64 {
        if let Some(held) = held {
            return t
                .received
                .iter()
                .filter(|r| !r.rows.is_empty() || self.ir.tensor(r.tensor).height().is_none())
                .map(|r| held.lacking_bytes(self.ir, d, r.tensor, r.rows))
                .sum();
        }
        let last_height = t
            .stages
            .last()
            .and_then(|s| self.ir.stage(s.stage).output.height())
            .unwrap_or(0);
        t.received
            .iter()
            .map(|r| {
                let height = self.ir.tensor(r.tensor).height();
                match (r.tensor, height) {
                    (TensorRef::Stage(_), Some(h)) if last_height > 0 => {
                        let own = match self.producers {
                            Producers::SameShares => {
                                let scale = |row: usize| (row * h + last_height / 2) / last_height;
                                Rows::new(scale(t.strip.start), scale(t.strip.end))
                            }
                            Producers::AllDevices => {
                                let (weights, slot) = &self.proportional;
                                strips_from_weights(h, weights)[slot[d.index()]]
                            }
                        };
                        let above =
                            Rows::new(r.rows.start, r.rows.end.min(own.start).max(r.rows.start));
                        let below =
                            Rows::new(own.end.max(r.rows.start).min(r.rows.end), r.rows.end);
                        self.bytes(r.tensor, above) + self.bytes(r.tensor, below)
                    }
                    _ => self.bytes(r.tensor, r.rows),
                }
            })
            .sum()
    }

    /// A device's prediction as if its transfers had their links to themselves; under
    /// programs, with the rows `held` lists as held (else with the same-shares
    /// assumption).
    fn device_alone(
        &self,
        predictor: Predictor,
        d: DeviceId,
        t: &TileView,
        held: Option<&Holdings>,
    ) -> DevicePrediction {
        let (fused_in, out): (u64, u64) = match self.transport {
            Transport::Hub => (
                t.received
                    .iter()
                    .map(|r| self.bytes(r.tensor, r.rows))
                    .sum(),
                t.sent
                    .iter()
                    .map(|(s, r)| self.bytes(TensorRef::Stage(*s), *r))
                    .sum(),
            ),
            // A transfer between boards is costed once, at its receiver: the sender's
            // uplink works while its receivers' downlinks do. Only the model's outputs
            // go back to the coordinator.
            Transport::Programs => (
                self.lacking_bytes(d, t, held),
                t.sent
                    .iter()
                    .filter(|(s, _)| self.ir.outputs.contains(&TensorRef::Stage(*s)))
                    .map(|(s, r)| self.bytes(TensorRef::Stage(*s), *r))
                    .sum(),
            ),
        };
        let (in_us, compute_us): (f64, Vec<(StageId, f64)>) = match predictor {
            Predictor::Legion if self.transport == Transport::Programs => {
                // S_d: the rows d lacks, from their holders.
                let compute = t
                    .stages
                    .iter()
                    .map(|st| (st.stage, self.legion_stage_time(d, st)))
                    .collect();
                (self.link_in[d.index()].time_us(fused_in), compute)
            }
            Predictor::Legion => {
                // alpha_in * S(the strip the first reader would receive alone)
                let alone_in: f64 = t
                    .received
                    .iter()
                    .map(|r| match r.alpha_in {
                        Some(a) if a > 0.0 => self.bytes(r.tensor, r.rows) as f64 / a,
                        _ => 0.0,
                    })
                    .sum();
                let alpha_in = if alone_in > 0.0 {
                    fused_in as f64 / alone_in
                } else {
                    1.0
                };
                let inputs_in = alpha_in * self.link_in[d.index()].time_us(alone_in.round() as u64);
                let compute = t
                    .stages
                    .iter()
                    .map(|st| (st.stage, self.legion_stage_time(d, st)))
                    .collect();
                (inputs_in, compute)
            }
            Predictor::Affine => {
                let compute = t
                    .stages
                    .iter()
                    .map(|st| {
                        let e = if st.computed.is_empty() {
                            0.0
                        } else {
                            self.stage_time_fitted(d, st.stage, st.computed.len())
                        };
                        (st.stage, e)
                    })
                    .collect();
                (self.link_in[d.index()].time_us(fused_in), compute)
            }
            Predictor::Aofl => {
                let compute = t
                    .stages
                    .iter()
                    .map(|st| (st.stage, self.aofl[d.index()].predict(self.ir, st)))
                    .collect();
                (self.link_in[d.index()].time_us(fused_in), compute)
            }
        };
        // A combined reduction reads only the device's own rows of its input: its
        // measured (whole) time at that fraction.
        let compute_us: Vec<(StageId, f64)> = compute_us
            .into_iter()
            .zip(t.stages)
            .map(|((s, e), st)| match (st.partial, st.inputs.first()) {
                (true, Some(input)) => {
                    let height = self.ir.stage(s).input_shapes[0].height().unwrap_or(1);
                    (s, e * input.rows.len() as f64 / height.max(1) as f64)
                }
                _ => (s, e),
            })
            .collect();
        let out_us = self.link_out[d.index()].time_us(out);
        let total_us = in_us + compute_us.iter().map(|(_, e)| e).sum::<f64>() + out_us;
        DevicePrediction {
            device: d,
            strip: t.strip,
            in_us,
            compute_us,
            out_us,
            total_us,
        }
    }

    /// Legion's `E_d(l)` of one stage of a tile: E at the rows the stage computes where
    /// the stage's samples reach that far (legion mode samples every stage whole), and
    /// the paper's `alpha * E_d(l, share)` past them (docs/architecture.md, "Costing a
    /// group").
    fn legion_stage_time(&self, d: DeviceId, st: &StageInTile) -> f64 {
        let sampled_up_to = self.samples[st.stage.index()][d.index()]
            .iter()
            .fold(0.0, |most, &(rows, _)| f64::max(most, rows));
        match st.alpha {
            _ if st.computed.is_empty() => 0.0,
            Some(alpha) if st.computed.len() as f64 > sampled_up_to => {
                alpha * self.stage_time(d, st.stage, st.alone.len())
            }
            // Within the samples, or owns no rows of this stage alone.
            _ => self.stage_time(d, st.stage, st.computed.len()),
        }
    }

    /// Affine: the step timeline the emulated coordinator uses ([`step_timeline`]), on
    /// the fitted links.
    fn share_the_hub(&self, tiles: &[(DeviceId, TileView)], devices: &mut [DevicePrediction]) {
        let hub = self.profile.coordinator_mbps;
        let link = fitted_link;
        let bytes_in: Vec<u64> = tiles
            .iter()
            .map(|(_, t)| {
                t.received
                    .iter()
                    .map(|r| self.bytes(r.tensor, r.rows))
                    .sum()
            })
            .collect();
        let bytes_out: Vec<u64> = tiles
            .iter()
            .map(|(_, t)| {
                t.sent
                    .iter()
                    .map(|(s, r)| self.bytes(TensorRef::Stage(*s), *r))
                    .sum()
            })
            .collect();
        let parts: Vec<StepPart> = tiles
            .iter()
            .zip(devices.iter())
            .enumerate()
            .map(|(k, ((d, _), p))| StepPart {
                bytes_in: bytes_in[k],
                link_in: link(&self.link_in[d.index()]),
                compute_us: p.compute_us.iter().map(|(_, e)| e).sum::<f64>(),
                bytes_out: bytes_out[k],
                link_out: link(&self.link_out[d.index()]),
            })
            .collect();
        let timeline = step_timeline(&parts, hub);
        for (p, t) in devices.iter_mut().zip(timeline) {
            p.in_us = t.inputs_in_us;
            p.out_us = t.done_us - t.computed_us;
            p.total_us = t.done_us;
        }
    }

    /// The predicted time of the stages of `group` run whole on device `d` (barriers
    /// allowed: nothing is split): each stage's measured whole-stage time (interpolated
    /// at its height for a splittable stage), the tensors entering the group sent whole
    /// and the tensors leaving it received whole. The same for every predictor and both
    /// transports (the device holds none of its input rows, and sends every output
    /// whole to its readers).
    pub fn predict_one(&self, group: Group, d: DeviceId) -> DevicePrediction {
        self.one(group, d, None)
    }

    /// [`CostModel::predict_one`] when the devices hold the rows `held` lists, under
    /// programs: the device receives the input rows it lacks, and sends back only the
    /// model's outputs (its other outputs are costed where they are received).
    pub fn predict_one_holding(
        &self,
        group: Group,
        d: DeviceId,
        held: &Holdings,
    ) -> DevicePrediction {
        self.one(
            group,
            d,
            Some(held).filter(|_| self.transport == Transport::Programs),
        )
    }

    fn one(&self, group: Group, d: DeviceId, held: Option<&Holdings>) -> DevicePrediction {
        let all = |r: TensorRef| Rows::new(0, self.ir.tensor(r).height().unwrap_or(0));
        let (inputs, outputs) = boundary(self.ir, group);
        let bytes_in: u64 = inputs
            .iter()
            .map(|r| match held {
                Some(h) => h.lacking_bytes(self.ir, d, *r, all(*r)),
                None => self.bytes(*r, all(*r)),
            })
            .sum();
        let bytes_out: u64 = outputs
            .iter()
            .map(|s| TensorRef::Stage(*s))
            .filter(|r| held.is_none() || self.ir.outputs.contains(r))
            .map(|r| self.bytes(r, all(r)))
            .sum();
        let compute_us: Vec<(StageId, f64)> = group
            .stages()
            .map(|s| {
                let rows = self.ir.stage(s).output.height().unwrap_or(0);
                (s, self.stage_time(d, s, rows))
            })
            .collect();
        let in_us = self.link_in[d.index()].time_us(bytes_in);
        let out_us = self.link_out[d.index()].time_us(bytes_out);
        let total_us = in_us + compute_us.iter().map(|(_, e)| e).sum::<f64>() + out_us;
        DevicePrediction {
            device: d,
            strip: all(TensorRef::Stage(group.last)),
            in_us,
            compute_us,
            out_us,
            total_us,
        }
    }

    /// Min-max shares of `group` over `devices` for `predictor` (docs/architecture.md, "Min-max shares"):
    /// strips that minimise the slowest device's predicted time, each device's time
    /// taken as if its transfers were alone. Devices that only slow the group get no
    /// rows and are left out. Cached per (predictor, group, devices).
    pub fn shares(
        &self,
        predictor: Predictor,
        group: Group,
        devices: &[DeviceId],
    ) -> Result<Vec<(DeviceId, Rows)>> {
        let tiler = SuffixTiler::new(self.ir, group.last, self.reductions())?;
        GroupShares::new(self, &tiler, predictor, group)?.over(devices)
    }

    /// [`CostModel::shares`] when the devices hold the rows `held` lists: strips that
    /// line up with what each device holds cost less (programs transport). Not cached.
    pub fn shares_holding(
        &self,
        predictor: Predictor,
        group: Group,
        devices: &[DeviceId],
        held: &Holdings,
    ) -> Result<Vec<(DeviceId, Rows)>> {
        let tiler = SuffixTiler::new(self.ir, group.last, self.reductions())?;
        let mut search = GroupShares::new(self, &tiler, predictor, group)?;
        search.held = Some(held);
        search.over(devices)
    }

    /// The group's predicted time at its min-max shares over `devices`.
    pub fn group(
        &self,
        predictor: Predictor,
        group: Group,
        devices: &[DeviceId],
    ) -> Result<Prediction> {
        let shares = self.shares(predictor, group, devices)?;
        self.predict(predictor, group, &shares)
    }
}

/// The min-max shares search of one group under one predictor (see
/// [`CostModel::shares`]). A device's predicted time for a strip does not depend on
/// which other devices share the group, so the searches over the `k` fastest devices
/// for every `k` ask many of the same questions; the answers are kept here. The tiles
/// come from a [`SuffixTiler`] shared by every group ending at the same stage.
pub struct GroupShares<'m, 'a> {
    model: &'m CostModel<'a>,
    tiler: &'m SuffixTiler<'a>,
    predictor: Predictor,
    group: Group,
    /// What the devices hold, when the shares follow it (not cached in the model).
    held: Option<&'m Holdings>,
    /// (device, strip) -> predicted µs with its transfers alone.
    memo: RefCell<HashMap<(DeviceId, Rows), f64, BuildHasherDefault<FxHasher>>>,
}

impl<'m, 'a> GroupShares<'m, 'a> {
    /// The search for `group`, which must end at `tiler`'s last stage and lie in its
    /// longest group.
    pub fn new(
        model: &'m CostModel<'a>,
        tiler: &'m SuffixTiler<'a>,
        predictor: Predictor,
        group: Group,
    ) -> Result<GroupShares<'m, 'a>> {
        let longest = tiler.longest();
        ensure!(
            group.last == longest.last && group.first >= longest.first,
            "group {group} is not a suffix of {longest}"
        );
        Ok(GroupShares {
            model,
            tiler,
            predictor,
            group,
            held: None,
            memo: RefCell::default(),
        })
    }

    /// Min-max shares over `devices`, in that order; devices given no rows are left
    /// out. Cached in the cost model per (predictor, group, devices).
    pub fn over(&self, devices: &[DeviceId]) -> Result<Vec<(DeviceId, Rows)>> {
        ensure!(!devices.is_empty(), "a group needs at least one device");
        let model = self.model;
        let key = (self.predictor, self.group, devices.to_vec());
        if self.held.is_none()
            && let Some(s) = model.shares.lock().expect("shares cache").get(&key)
        {
            return Ok(s.clone());
        }
        let cost = |i: usize, strip: Rows| -> f64 {
            let d = devices[i];
            if let Some(c) = self.memo.borrow().get(&(d, strip)) {
                return *c;
            }
            let c = match self.tiler.walk(strip) {
                Ok(walk) => {
                    let t = walk.view(model.ir, self.group.first, strip);
                    model
                        .device_alone(self.predictor, d, &t, self.held)
                        .total_us
                }
                Err(_) => f64::INFINITY,
            };
            self.memo.borrow_mut().insert((d, strip), c);
            c
        };
        let strips = rebalance(self.tiler.height(), devices.len(), cost);
        let shares: Vec<(DeviceId, Rows)> = devices
            .iter()
            .zip(strips)
            .filter(|(_, r)| !r.is_empty())
            .map(|(d, r)| (*d, r))
            .collect();
        if self.held.is_none() {
            model
                .shares
                .lock()
                .expect("shares cache")
                .insert(key, shares.clone());
        }
        Ok(shares)
    }

    /// [`CostModel::predict`] at `shares` (from [`GroupShares::over`]), from the kept
    /// walks; `None` when `legal` rejects a device's tile (device, tile).
    pub fn predict_if(
        &self,
        shares: &[(DeviceId, Rows)],
        legal: impl Fn(DeviceId, &TileView) -> bool,
    ) -> Result<Option<Prediction>> {
        let walks = shares
            .iter()
            .map(|(_, strip)| self.tiler.walk(*strip))
            .collect::<Result<Vec<_>, _>>()?;
        let views: Vec<(DeviceId, TileView)> = shares
            .iter()
            .zip(&walks)
            .map(|((d, strip), w)| (*d, w.view(self.model.ir, self.group.first, *strip)))
            .collect();
        if !views.iter().all(|(d, t)| legal(*d, t)) {
            return Ok(None);
        }
        Ok(Some(self.model.predict_views(
            self.predictor,
            self.group,
            &views,
            self.held,
        )))
    }
}
