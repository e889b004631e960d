//! Predicting groups split by channels (docs/architecture.md, "Channel splits"): each
//! device receives the group's inputs whole, runs the stages before the split whole and
//! its channels of the split ones, and sends its part of the output; a matmul over a
//! flatten of rows multiplies them in parts as they arrive.

use crate::{CostModel, DevicePrediction, Holdings, Prediction, Predictor};
use anyhow::{Result, bail, ensure};
use legion_ir::{Rows, StageId, TensorRef};
use legion_partition::{Group, boundary, product_in_parts, rebalance, split_chain};
use legion_plan::{DeviceId, Transport};

impl CostModel<'_> {
    /// True when the profile measured channel tiles of stage `s` on every device, so
    /// groups ending at `s` can be predicted split by channels.
    pub fn splits_channels(&self, s: StageId) -> bool {
        let samples = &self.channel_samples[s.index()];
        samples.len() == self.device_count() && samples.iter().all(|p| !p.is_empty())
    }

    /// E_d(l, channels): stage `s` on all its rows of `n` of its channels, interpolated
    /// through the channel samples (the least-squares line through them for
    /// [`Predictor::Affine`]; AOFL's regressions model rows only, so it interpolates
    /// like Legion).
    fn channel_time(&self, predictor: Predictor, d: DeviceId, s: StageId, n: usize) -> f64 {
        let points = &self.channel_samples[s.index()][d.index()];
        match predictor {
            Predictor::Affine => {
                let (intercept, slope) = crate::fit::line(points);
                (intercept + slope * n as f64).max(0.0)
            }
            Predictor::Legion | Predictor::Aofl => crate::interpolate(points, n as f64),
        }
    }

    /// Bytes of the inputs of `group` device `d` must receive to run a channel tile:
    /// all of each, but what `held` says it holds; without `held`, its share of each
    /// stage output in proportion to its speed among all devices (the model's input
    /// comes whole from the coordinator).
    fn channel_inputs_bytes(&self, d: DeviceId, group: Group, held: Option<&Holdings>) -> u64 {
        let (inputs, _) = boundary(self.ir, group);
        inputs
            .iter()
            .map(|&r| {
                let all = Rows::new(0, self.ir.tensor(r).height().unwrap_or(0));
                let whole = self.ir.part_bytes(r, all, None);
                match (self.transport, held, r) {
                    (Transport::Hub, _, _) | (_, _, TensorRef::Input) => whole,
                    (Transport::Programs, Some(h), _) => h.lacking_bytes(self.ir, d, r, all),
                    (Transport::Programs, None, _) => {
                        let (weights, slot) = &self.proportional;
                        let own = weights[slot[d.index()]] / weights.iter().sum::<f64>();
                        (whole as f64 * (1.0 - own)).round() as u64
                    }
                }
            })
            .sum()
    }

    /// Device `d`'s prediction for computing `channels` of `group`'s last stage, its
    /// transfers alone.
    fn channel_device(
        &self,
        predictor: Predictor,
        d: DeviceId,
        group: Group,
        channels: Rows,
        held: Option<&Holdings>,
    ) -> DevicePrediction {
        let last = TensorRef::Stage(group.last);
        let all = Rows::new(0, self.ir.tensor(last).height().unwrap_or(0));
        let part = self.ir.part_bytes(last, all, Some(channels));
        let out = match self.transport {
            Transport::Hub => part,
            Transport::Programs if self.ir.outputs.contains(&last) => part,
            // Its readers receive it, and pay for it there.
            Transport::Programs => 0,
        };
        let chain = split_chain(self.ir, group);
        let compute_us: Vec<(StageId, f64)> = group
            .stages()
            .map(|s| {
                let rows = self.ir.stage(s).output.height().unwrap_or(0);
                let e = if chain.contains(&s) {
                    self.channel_time(predictor, d, s, channels.len())
                } else {
                    self.stage_time(d, s, rows)
                };
                (s, e)
            })
            .collect();
        let lacking = self.channel_inputs_bytes(d, group, held);
        let in_us = self.link_in[d.index()].time_us(lacking);
        let out_us = self.link_out[d.index()].time_us(out);
        let compute: f64 = compute_us.iter().map(|(_, e)| e).sum();
        let total_us = match (self.transport, product_in_parts(self.ir, group)) {
            // Multiplied in parts as its rows arrive (docs/architecture.md, "Accumulating
            // as rows arrive"): its own rows while the others come, and after the last
            // arrival the last part, taken as large as its own share (one row at least).
            (Transport::Programs, Some(input)) => {
                let height = self.ir.tensor(input).height().unwrap_or(1).max(1);
                let whole = self.ir.part_bytes(input, Rows::new(0, height), None).max(1);
                let own = 1.0 - lacking as f64 / whole as f64;
                let last = compute * own.max(1.0 / height as f64);
                (in_us + last).max(compute) + out_us
            }
            _ => in_us + compute + out_us,
        };
        DevicePrediction {
            device: d,
            strip: channels,
            in_us,
            compute_us,
            out_us,
            total_us,
        }
    }

    /// Min-max shares of the last stage's channels over `devices` (in that order; those
    /// given none are left out), given what `held` says the devices hold.
    pub fn channel_shares(
        &self,
        predictor: Predictor,
        group: Group,
        devices: &[DeviceId],
        held: Option<&Holdings>,
    ) -> Result<Vec<(DeviceId, Rows)>> {
        ensure!(!devices.is_empty(), "a group needs at least one device");
        if let Some(s) = split_chain(self.ir, group)
            .into_iter()
            .find(|s| !self.splits_channels(*s))
        {
            bail!("the profile has no channel samples of stage {s}");
        }
        let count = self.ir.stage(group.last).channels.map_or(0, |c| c.count);
        let cost = |i: usize, c: Rows| {
            if c.is_empty() {
                return 0.0;
            }
            self.channel_device(predictor, devices[i], group, c, held)
                .total_us
        };
        let cut = rebalance(count, devices.len(), cost);
        Ok(devices
            .iter()
            .zip(cut)
            .filter(|(_, c)| !c.is_empty())
            .map(|(d, c)| (*d, c))
            .collect())
    }

    /// The prediction of `group` split by channels at `shares`.
    pub fn predict_channels(
        &self,
        predictor: Predictor,
        group: Group,
        shares: &[(DeviceId, Rows)],
        held: Option<&Holdings>,
    ) -> Prediction {
        let devices = shares
            .iter()
            .map(|(d, c)| self.channel_device(predictor, *d, group, *c, held))
            .collect();
        Prediction::of(predictor, group, devices)
    }
}
