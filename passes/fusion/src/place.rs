//! Placement: an FLC made concrete, each group with the strips it will run and their
//! predicted times (docs/architecture.md, "Placement").
//!
//! Through the hub a group's cost does not depend on the groups before it, so the cost
//! table's strips are the plan's. When boards run their programs, a tile receives only
//! the rows its device lacks, and the table costed each group as if its inputs had been
//! produced at its own shares. [`Placement::holding`] walks the FLC in order instead,
//! tracking the rows every device holds, and cuts each split group again so that its
//! strips line up with them; its predictions are the plan's.

use crate::{Boards, Cost, CostTable, DeviceCost, Entry, Flc, FlcGroup, Legality};
use anyhow::{Context, Result};
use legion_cost::{CostModel, Holdings, Predictor};
use legion_ir::{Ir, Rows, TensorRef};
use legion_partition::{Group, boundary, channel_tile, tile};
use legion_plan::DeviceId;

/// The groups of an FLC with how each runs, and their total.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Per group, in order: the choice and how it runs.
    pub groups: Vec<(FlcGroup, Entry)>,
    /// The sum of the groups' costs.
    pub cost: Cost,
}

impl Placement {
    /// The table's entries for `flc`'s groups.
    pub fn from_table(table: &CostTable, flc: &Flc) -> Result<Placement> {
        let groups = flc
            .groups
            .iter()
            .map(|choice| {
                let entry = table
                    .entry(*choice)
                    .with_context(|| format!("group {choice} is not a legal choice"))?;
                Ok((*choice, entry.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Placement::new(groups))
    }

    /// `flc` placed when boards run their programs (`model`'s transport): in order,
    /// each split group's min-max shares over its option's devices, given the
    /// rows every device holds after the groups before it; each whole group on the
    /// table's device, receiving what that device lacks. A split group keeps the
    /// table's strips when they are predicted no slower given what the devices hold, or
    /// when the new tiles would not fit `legality`. With `boards`, each group runs on
    /// the boards it gives in place of the table's devices ([`crate::spread`]).
    pub fn holding(
        ir: &Ir,
        model: &CostModel,
        predictor: Predictor,
        legality: &Legality,
        table: &CostTable,
        flc: &Flc,
        boards: Option<&Boards>,
    ) -> Result<Placement> {
        let mut held = Holdings::default();
        let mut groups = vec![];
        for (g, (choice, mut entry)) in Placement::from_table(table, flc)?
            .groups
            .into_iter()
            .enumerate()
        {
            let on = |d: DeviceId| boards.map_or(d, |b| b.board(g, d));
            entry
                .devices
                .iter_mut()
                .for_each(|d| d.device = on(d.device));
            let devices: Vec<DeviceId> = table.device_order()[..choice.devices]
                .iter()
                .map(|&d| on(d))
                .collect();
            let group = Group::new(choice.first, choice.last);
            if entry.whole {
                let d = entry.devices[0].device;
                let p = model.predict_one_holding(group, d, &held);
                let (inputs, outputs) = boundary(ir, group);
                let all = |r: TensorRef| Rows::new(0, ir.tensor(r).height().unwrap_or(0));
                for r in inputs {
                    held.insert(d, r, all(r));
                }
                for s in outputs {
                    held.insert(d, TensorRef::Stage(s), all(TensorRef::Stage(s)));
                }
                let placed = Entry {
                    cost: Cost::from_us(p.total_us),
                    devices: vec![DeviceCost::from(&p)],
                    whole: true,
                    channels: false,
                };
                groups.push((choice, placed));
                continue;
            }
            if entry.channels {
                groups.push((
                    choice,
                    place_channels(
                        ir, model, predictor, legality, &devices, &mut held, choice, &entry,
                    )?,
                ));
                continue;
            }
            let table_strips: Vec<_> = entry.devices.iter().map(|d| (d.device, d.strip)).collect();
            let shares = model
                .shares_holding(predictor, group, &devices, &held)
                .with_context(|| format!("placing group {choice}"))?;
            let cut =
                |strips: &[(DeviceId, Rows)]| strips.iter().map(|(_, r)| *r).collect::<Vec<_>>();
            let tiling = tile(ir, group, &cut(&shares))
                .with_context(|| format!("placing group {choice}"))?;
            let fits = tiling
                .tiles
                .iter()
                .all(|t| legality.fits(ir, shares[t.slot].0, &t.view().spec()));
            let at_table = model.predict_holding(predictor, group, &table_strips, &held)?;
            let at_shares = if fits {
                Some(model.predict_holding(predictor, group, &shares, &held)?)
            } else {
                None
            };
            // The min-max search is a heuristic: keep the table's strips when they are
            // predicted no slower given what the devices hold.
            let (strips, tiling, p) = match at_shares {
                Some(p) if p.total_us < at_table.total_us => (shares, tiling, p),
                _ => (
                    table_strips.clone(),
                    tile(ir, group, &cut(&table_strips))?,
                    at_table,
                ),
            };
            for t in &tiling.tiles {
                held.insert_tile(strips[t.slot].0, &t.view());
            }
            let placed = Entry {
                cost: Cost::from_us(p.total_us),
                devices: p.devices.iter().map(DeviceCost::from).collect(),
                whole: false,
                channels: false,
            };
            groups.push((choice, placed));
        }
        Ok(Placement::new(groups))
    }

    fn new(groups: Vec<(FlcGroup, Entry)>) -> Placement {
        let cost = groups.iter().fold(Cost::ZERO, |sum, (_, e)| sum + e.cost);
        Placement { groups, cost }
    }
}

/// A group split by channels placed given what the devices hold (`held`, updated with
/// what they hold after it): min-max channel shares over its option's `devices`, or
/// the table's when those are predicted no slower or the new tiles would not fit.
#[allow(clippy::too_many_arguments)]
fn place_channels(
    ir: &Ir,
    model: &CostModel,
    predictor: Predictor,
    legality: &Legality,
    devices: &[DeviceId],
    held: &mut Holdings,
    choice: FlcGroup,
    entry: &Entry,
) -> Result<Entry> {
    let group = Group::new(choice.first, choice.last);
    let table_shares: Vec<(DeviceId, Rows)> =
        entry.devices.iter().map(|d| (d.device, d.strip)).collect();
    let shares = model
        .channel_shares(predictor, group, devices, Some(held))
        .with_context(|| format!("placing group {choice}"))?;
    let fits = shares
        .iter()
        .all(|(d, c)| legality.fits(ir, *d, &channel_tile(ir, group, *c)));
    let at_table = model.predict_channels(predictor, group, &table_shares, Some(held));
    let at_shares = fits.then(|| model.predict_channels(predictor, group, &shares, Some(held)));
    let (shares, p) = match at_shares {
        Some(p) if p.total_us < at_table.total_us => (shares, p),
        _ => (table_shares, at_table),
    };
    let (inputs, _) = boundary(ir, group);
    for (d, c) in &shares {
        for &r in &inputs {
            held.insert(*d, r, Rows::new(0, ir.tensor(r).height().unwrap_or(0)));
        }
        held.insert_channels(*d, TensorRef::Stage(group.last), *c);
    }
    Ok(Entry {
        cost: Cost::from_us(p.total_us),
        devices: p.devices.iter().map(DeviceCost::from).collect(),
        whole: false,
        channels: true,
    })
}
