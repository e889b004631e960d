//! Cost pass: predicts the time of a fused group on a cluster from a `legion`-mode
//! profile and the partition pass's tiles (docs/architecture.md, "Costing a group"). Three predictors:
//!
//! - [`Predictor::Legion`], the paper's formula as written:
//!   `T_d(G) = alpha_in * S_d(in strip alone) + sum_l alpha_l * E_d(l, share) + R_d(out)`,
//!   `T(G) = max_d T_d(G)`.
//! - [`Predictor::Affine`]: E at the rows each stage really computes in the group, on the
//!   least-squares line through the stage's samples (affine in rows), and transfers that
//!   share the coordinator's link (the network model of `legion_plan::network`), so
//!   scatter cannot beat total bytes / coordinator bandwidth.
//! - [`Predictor::Aofl`]: the prior work's per-device linear regressions over layer
//!   features (Zhou et al., SEC'19), fitted on the same single-stage samples.
//!
//! Barrier stages run whole on one device: their measured time plus the transfers.

mod aofl;
mod fit;

use fit::line;
pub use fit::{Affine, interpolate, least_squares};

use anyhow::{Result, bail, ensure};
use legion_ir::{Ir, Rows, StageId, TensorRef};
use legion_partition::{Group, SuffixTiler, TileView, boundary, rebalance, tile};
use legion_plan::network::{StepPart, step_timeline};
use legion_plan::{DeviceId, Link, Profile, ProfileMode};
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
    /// The paper's alpha-scaled formula.
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

/// Shares are cached per predictor, group and device subset.
type SharesKey = (Predictor, Group, Vec<DeviceId>);

/// Predicts group times from one profile of one model.
pub struct CostModel<'a> {
    ir: &'a Ir,
    profile: &'a Profile,
    link_in: Vec<Affine>,
    link_out: Vec<Affine>,
    aofl: Vec<aofl::Regressions>,
    /// Per stage, per device: the profile's (rows, median µs) samples.
    samples: Vec<Vec<Vec<(f64, f64)>>>,
    /// Per stage, per device: (intercept µs, µs per row) of the line through them.
    lines: Vec<Vec<(f64, f64)>>,
    shares: Mutex<HashMap<SharesKey, Vec<(DeviceId, Rows)>>>,
}

impl<'a> CostModel<'a> {
    /// Checks that `profile` is a `legion`-mode profile of `ir` and fits the links and
    /// the AOFL regressions.
    pub fn new(ir: &'a Ir, profile: &'a Profile) -> Result<CostModel<'a>> {
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
        let samples: Vec<Vec<Vec<(f64, f64)>>> = profile
            .stages
            .iter()
            .map(|s| {
                s.samples
                    .iter()
                    .map(|points| {
                        points
                            .iter()
                            .map(|p| (p.rows as f64, p.median_us as f64))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let lines = samples
            .iter()
            .map(|per_device| per_device.iter().map(|p| line(p)).collect())
            .collect();
        Ok(CostModel {
            ir,
            profile,
            link_in,
            link_out,
            aofl,
            samples,
            lines,
            shares: Mutex::default(),
        })
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
        let cut: Vec<Rows> = strips.iter().map(|(_, r)| *r).collect();
        let tiling = tile(self.ir, group, &cut)?;
        let views: Vec<(DeviceId, TileView)> = tiling
            .tiles
            .iter()
            .map(|t| (strips[t.slot].0, t.view()))
            .collect();
        Ok(self.predict_views(predictor, group, &views))
    }

    /// [`CostModel::predict`] of the tiles of `group`, per device (profile index).
    fn predict_views(
        &self,
        predictor: Predictor,
        group: Group,
        tiles: &[(DeviceId, TileView)],
    ) -> Prediction {
        let mut devices: Vec<DevicePrediction> = tiles
            .iter()
            .map(|(d, t)| self.device_alone(predictor, *d, t))
            .collect();
        if predictor == Predictor::Affine {
            self.share_the_hub(tiles, &mut devices);
        }
        let total_us = devices.iter().map(|d| d.total_us).fold(0.0, f64::max);
        Prediction {
            predictor,
            first: group.first,
            last: group.last,
            devices,
            total_us,
        }
    }

    /// A device's prediction as if its transfers had the coordinator to themselves.
    fn device_alone(&self, predictor: Predictor, d: DeviceId, t: &TileView) -> DevicePrediction {
        let fused_in: u64 = t
            .received
            .iter()
            .map(|r| self.bytes(r.tensor, r.rows))
            .sum();
        let out: u64 = t
            .sent
            .iter()
            .map(|(s, r)| self.bytes(TensorRef::Stage(*s), *r))
            .sum();
        let (in_us, compute_us): (f64, Vec<(StageId, f64)>) = match predictor {
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
                    .map(|st| {
                        let e = match st.alpha {
                            Some(alpha) => alpha * self.stage_time(d, st.stage, st.alone.len()),
                            // Owns no rows of this stage alone: E at the rows computed.
                            None if st.computed.is_empty() => 0.0,
                            None => self.stage_time(d, st.stage, st.computed.len()),
                        };
                        (st.stage, e)
                    })
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

    /// Affine: the step timeline the emulated coordinator uses ([`step_timeline`]), on
    /// the fitted links.
    fn share_the_hub(&self, tiles: &[(DeviceId, TileView)], devices: &mut [DevicePrediction]) {
        let hub = self.profile.coordinator_mbps;
        let link = |a: &Affine| Link {
            mbps: if a.us_per_byte > 0.0 {
                8.0 / a.us_per_byte
            } else {
                f64::MAX
            },
            latency_ms: a.latency_us / 1e3,
        };
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
    /// and the tensors leaving it received whole. The same for every predictor.
    pub fn predict_one(&self, group: Group, d: DeviceId) -> DevicePrediction {
        let all = |r: TensorRef| Rows::new(0, self.ir.tensor(r).height().unwrap_or(0));
        let (inputs, outputs) = boundary(self.ir, group);
        let bytes_in: u64 = inputs.iter().map(|r| self.bytes(*r, all(*r))).sum();
        let bytes_out: u64 = outputs
            .iter()
            .map(|s| {
                let r = TensorRef::Stage(*s);
                self.bytes(r, all(r))
            })
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
        let tiler = SuffixTiler::new(self.ir, group.last)?;
        GroupShares::new(self, &tiler, predictor, group)?.over(devices)
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
            memo: RefCell::default(),
        })
    }

    /// Min-max shares over `devices`, in that order; devices given no rows are left
    /// out. Cached in the cost model per (predictor, group, devices).
    pub fn over(&self, devices: &[DeviceId]) -> Result<Vec<(DeviceId, Rows)>> {
        ensure!(!devices.is_empty(), "a group needs at least one device");
        let model = self.model;
        let key = (self.predictor, self.group, devices.to_vec());
        if let Some(s) = model.shares.lock().expect("shares cache").get(&key) {
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
                    model.device_alone(self.predictor, d, &t).total_us
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
        model
            .shares
            .lock()
            .expect("shares cache")
            .insert(key, shares.clone());
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
        )))
    }
}
