//! Cost tables: the cost of every candidate group under every device option, from the
//! cost pass's predictions ([`CostTable::predicted`]) or from an FSS profile's
//! measurements ([`CostTable::measured`]), with the legality rules applied.

use crate::{Cost, FlcGroup, GroupCosts};
use anyhow::{Context, Result, bail, ensure};
use legion_cost::{CostModel, DevicePrediction, GroupShares, Predictor};
use legion_ir::{Ir, Rows, StageId, TensorRef};
use legion_partition::{
    Group, Reductions, SuffixTiler, TileView, channel_tile, check_channel_group, check_group,
    tile_weight_bytes, whole_group,
};
use legion_plan::{Cluster, DeviceId, DeviceTiming, Profile, ProfileMode, TileSpec};
use std::collections::HashMap;

/// How one group runs under one device option.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Predicted (or measured) time.
    pub cost: Cost,
    /// Per device, in strip order: its strip and time breakdown.
    pub devices: Vec<DeviceCost>,
    /// True when one device runs the stages whole (nothing is split).
    pub whole: bool,
    /// True when the split is by the last stage's output channels: each device's
    /// `strip` is its range of them (docs/architecture.md, "Channel splits").
    pub channels: bool,
}

/// One device's part of an [`Entry`], µs.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceCost {
    /// The device (profile order).
    pub device: DeviceId,
    /// Its strip of the last stage's output rows (of its channels, split by channels).
    pub strip: Rows,
    /// Until its input strips have arrived.
    pub in_us: f64,
    /// Computing.
    pub compute_us: f64,
    /// Getting its output strips back.
    pub out_us: f64,
}

impl From<&DevicePrediction> for DeviceCost {
    fn from(p: &DevicePrediction) -> DeviceCost {
        DeviceCost {
            device: p.device,
            strip: p.strip,
            in_us: p.in_us,
            compute_us: p.compute_us.iter().map(|(_, e)| e).sum(),
            out_us: p.out_us,
        }
    }
}

/// What bounds the legal choices besides geometry.
#[derive(Clone, Debug, Default)]
pub struct Legality {
    /// Per device (profile order): bytes a tile may hold (weights, strips received and
    /// every stage's output rows); `None` for no limit.
    pub memory_bytes: Vec<Option<u64>>,
    /// The most stages a group may hold; `None` for no limit. An fss profile taken with
    /// a group-length limit measured nothing longer, so a search meant to be compared
    /// with it on the same candidates takes the same limit.
    pub max_group_len: Option<usize>,
    /// Split by rows only, as the paper does: no group splits by channels, and no row
    /// group combines a reduction across its boards.
    pub rows_only: bool,
}

impl Legality {
    /// The limits a cluster file sets: each device's `memory_mb`.
    pub fn of_cluster(cluster: &Cluster) -> Legality {
        Legality {
            memory_bytes: cluster
                .devices
                .iter()
                .map(|d| d.memory_mb.map(|mb| mb << 20))
                .collect(),
            max_group_len: None,
            rows_only: false,
        }
    }

    pub(crate) fn fits(&self, ir: &Ir, device: DeviceId, spec: &TileSpec) -> bool {
        match self.memory_bytes.get(device.index()).copied().flatten() {
            Some(limit) => tile_bytes(ir, spec) <= limit,
            None => true,
        }
    }
}

/// Bytes a tile holds at once, counted without reuse: its stages' weights (a stage
/// split by channels, its slice of them), the strips it receives and every stage's
/// computed rows (of its channels).
fn tile_bytes(ir: &Ir, spec: &TileSpec) -> u64 {
    let rows_bytes = |r: TensorRef, rows: Rows| ir.tensor(r).strip_bytes(rows);
    let weights = tile_weight_bytes(ir, spec);
    let received: u64 = spec
        .inputs
        .iter()
        .map(|i| rows_bytes(i.tensor, i.rows))
        .sum();
    let computed: u64 = spec
        .stages
        .iter()
        .map(|s| ir.part_bytes(TensorRef::Stage(s.stage), s.computed, s.channels))
        .sum();
    weights + received + computed
}

/// The profile's devices, fastest first (by measured GFLOP/s, then cluster order).
pub fn device_order(profile: &Profile) -> Vec<DeviceId> {
    let mut order: Vec<DeviceId> = (0..profile.devices.len()).map(DeviceId).collect();
    order.sort_by(|&a, &b| {
        profile.devices[b.index()]
            .gflops
            .total_cmp(&profile.devices[a.index()].gflops)
            .then(a.cmp(&b))
    });
    order
}

/// The cost of every group under every option, as a lookup table.
#[derive(Clone, Debug)]
pub struct CostTable {
    stages: usize,
    /// The devices, in the order option `k` takes the first `k` of.
    order: Vec<DeviceId>,
    entries: HashMap<FlcGroup, Entry>,
}

impl GroupCosts for CostTable {
    fn stages(&self) -> usize {
        self.stages
    }
    fn options(&self) -> usize {
        self.order.len()
    }
    fn cost(&self, choice: FlcGroup) -> Cost {
        self.entries.get(&choice).map_or(Cost::INFINITY, |e| e.cost)
    }
}

impl CostTable {
    /// How `choice` runs; `None` when it is illegal.
    pub fn entry(&self, choice: FlcGroup) -> Option<&Entry> {
        self.entries.get(&choice)
    }

    /// Every legal choice and how it runs, by first stage, then last, then devices.
    pub fn entries(&self) -> Vec<(FlcGroup, &Entry)> {
        let mut all: Vec<(FlcGroup, &Entry)> = self.entries.iter().map(|(c, e)| (*c, e)).collect();
        all.sort_by_key(|(c, _)| *c);
        all
    }

    /// The devices device option `k` may use: the first `k` of these.
    pub fn device_order(&self) -> &[DeviceId] {
        &self.order
    }

    /// Legal choices in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no choice is legal.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Predicted costs. Option 1 runs the group whole on the device predicted fastest
    /// for it (any run of stages, barriers included). Option `k >= 2` splits a run of
    /// splittable stages over the `k` fastest devices at the predictor's min-max shares;
    /// it is legal when every device's tile fits its memory. Option `k >= 2` by
    /// channels splits the last stage's output channels over the `k` fastest devices at
    /// min-max shares (every device running the stages before it whole), for a channel
    /// group whose last stage the profile measured by channels; legal when every
    /// channel tile fits.
    ///
    /// Halos as deep as a device's own rows are allowed: the predictor charges the
    /// recomputed rows. The founding design's rule "halo smaller than the strip" kept VGG-16 on 6
    /// Fireflies off `0..9/6`, `10..13/6` and `14..17/6`, which FSS measured faster;
    /// without it the plan measured 386 ms instead of 417 ms.
    pub fn predicted(
        ir: &Ir,
        model: &CostModel,
        predictor: Predictor,
        profile: &Profile,
        legality: &Legality,
    ) -> Result<CostTable> {
        let n = ir.stages.len();
        let order = device_order(profile);
        // Groups ending at different stages are independent: spread them over the
        // host's cores, round-robin.
        let threads = std::thread::available_parallelism()
            .map_or(1, |t| t.get())
            .min(n.max(1));
        let rows: Vec<Vec<(FlcGroup, Entry)>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let order = &order;
                    scope.spawn(move || -> Result<Vec<(FlcGroup, Entry)>> {
                        let mut mine = vec![];
                        for last in (t..n).step_by(threads) {
                            mine.extend(entries_to(ir, model, predictor, legality, order, last)?);
                        }
                        Ok(mine)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a cost-table thread panicked"))
                .collect::<Result<_>>()
        })?;
        let entries = rows.into_iter().flatten().collect();
        Ok(CostTable {
            stages: n,
            order,
            entries,
        })
    }

    /// Measured costs from an FSS profile: each measurement is the entry of its group
    /// under the device option it records (split by channels when it was; option 1 runs
    /// the group whole; older profiles: as many devices as it ran on); of two
    /// measurements of one choice the faster counts. FSS measures every choice of the
    /// table Legion searches (`legion_profile::FssChoice`), so both search the same
    /// space; nothing FSS did not measure is legal.
    pub fn measured(ir: &Ir, profile: &Profile) -> Result<CostTable> {
        ensure!(
            profile.mode == ProfileMode::Fss,
            "searching measured costs needs an fss-mode profile (this one is {:?}); run \
             `legion profile --mode fss`",
            profile.mode
        );
        if profile.model_sha256 != ir.sha256 {
            bail!(
                "the profile is of model {}, not of this model ({}); profile this model",
                profile.model_sha256,
                ir.sha256
            );
        }
        let index = |name: &str| -> Result<DeviceId> {
            profile
                .device_id(name)
                .with_context(|| format!("device {name} of a measurement is not in the profile"))
        };
        let mut entries: HashMap<FlcGroup, Entry> = HashMap::new();
        for g in &profile.groups {
            let (first, last) = (g.first.index(), g.last.index());
            ensure!(
                first <= last && last < ir.stages.len(),
                "the profile measured group {first}..{last}, which is not in this model"
            );
            ensure!(
                !g.strips.is_empty(),
                "the profile measured group {first}..{last} on no device"
            );
            let devices = g
                .strips
                .iter()
                .map(|(name, strip)| {
                    let timing = g.devices.iter().find(|t| &t.device == name);
                    let us = |f: fn(&DeviceTiming) -> u64| timing.map_or(0.0, |t| f(t) as f64);
                    Ok(DeviceCost {
                        device: index(name)?,
                        strip: *strip,
                        in_us: us(|t| t.in_us),
                        compute_us: us(|t| t.compute_us),
                        out_us: us(|t| t.out_us),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let option = g.option.unwrap_or(devices.len());
            let whole = option == 1;
            let channels = g.channels && !whole;
            let choice = FlcGroup {
                channels,
                ..FlcGroup::rows(first, last, option)
            };
            let entry = Entry {
                cost: Cost::from_us(g.median_us as f64),
                devices,
                whole,
                channels,
            };
            if entries.get(&choice).is_none_or(|e| entry.cost < e.cost) {
                entries.insert(choice, entry);
            }
        }
        Ok(CostTable {
            stages: ir.stages.len(),
            order: device_order(profile),
            entries,
        })
    }
}

/// The entries of `group` split by its last stage's channels over the `k` fastest
/// devices, for every `k >= 2` whose channel tiles fit (none when the group cannot split
/// so or the profile has no channel samples of its last stage).
fn channel_entries(
    ir: &Ir,
    model: &CostModel,
    predictor: Predictor,
    legality: &Legality,
    order: &[DeviceId],
    group: Group,
) -> Result<Vec<(FlcGroup, Entry)>> {
    let (first, last) = (group.first.index(), group.last.index());
    if legality.rows_only
        || !model.splits_channels(group.last)
        || check_channel_group(ir, first, last).is_err()
    {
        return Ok(vec![]);
    }
    let mut entries = vec![];
    for k in 2..=order.len() {
        let shares = model
            .channel_shares(predictor, group, &order[..k], None)
            .with_context(|| format!("channel shares of group {group} on {k} devices"))?;
        let fits = shares
            .iter()
            .all(|(d, c)| legality.fits(ir, *d, &channel_tile(ir, group, *c)));
        if !fits {
            continue;
        }
        let p = model.predict_channels(predictor, group, &shares, None);
        entries.push((
            FlcGroup {
                channels: true,
                ..FlcGroup::rows(first, last, k)
            },
            Entry {
                cost: Cost::from_us(p.total_us),
                devices: p.devices.iter().map(DeviceCost::from).collect(),
                whole: false,
                channels: true,
            },
        ));
    }
    Ok(entries)
}

/// The legal entries of every group ending at stage `last` (see
/// [`CostTable::predicted`]). The groups share one [`SuffixTiler`].
fn entries_to(
    ir: &Ir,
    model: &CostModel,
    predictor: Predictor,
    legality: &Legality,
    order: &[DeviceId],
    last: usize,
) -> Result<Vec<(FlcGroup, Entry)>> {
    let mut entries = vec![];
    // The paper's space keeps every reduction over rows a barrier.
    let reductions = match legality.rows_only {
        true => Reductions::Barriers,
        false => model.reductions(),
    };
    let tiler = match check_group(ir, last, last) {
        Ok(_) => Some(SuffixTiler::new(ir, StageId(last as u32), reductions)?),
        Err(_) => None,
    };
    let shortest_first = legality
        .max_group_len
        .map_or(0, |len| (last + 1).saturating_sub(len.max(1)));
    for first in shortest_first..=last {
        let group = Group::new(first, last);
        let whole = whole_group(ir, group);
        let best_one = (0..order.len())
            .map(DeviceId)
            .filter(|&d| legality.fits(ir, d, &whole))
            .map(|d| model.predict_one(group, d))
            .min_by(|a, b| a.total_us.total_cmp(&b.total_us));
        if let Some(p) = best_one {
            entries.push((
                FlcGroup::rows(first, last, 1),
                Entry {
                    cost: Cost::from_us(p.total_us),
                    devices: vec![DeviceCost::from(&p)],
                    whole: true,
                    channels: false,
                },
            ));
        }
        entries.extend(channel_entries(
            ir, model, predictor, legality, order, group,
        )?);
        let Some(tiler) = tiler.as_ref().filter(|t| t.longest().first <= group.first) else {
            continue;
        };
        let search = GroupShares::new(model, tiler, predictor, group)?;
        for k in 2..=order.len() {
            let shares = search
                .over(&order[..k])
                .with_context(|| format!("shares of group {group} on {k} devices"))?;
            let legal = |device: DeviceId, t: &TileView| legality.fits(ir, device, &t.spec());
            let Some(prediction) = search.predict_if(&shares, legal)? else {
                continue;
            };
            entries.push((
                FlcGroup::rows(first, last, k),
                Entry {
                    cost: Cost::from_us(prediction.total_us),
                    devices: prediction.devices.iter().map(DeviceCost::from).collect(),
                    whole: false,
                    channels: false,
                },
            ));
        }
    }
    Ok(entries)
}
