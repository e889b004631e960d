//! `legion split`: tile groups of a model for N devices, print strips, halos, pads and
//! alpha, and optionally check the strips against a single-device run.

use crate::{BadInput, ModelArgs};
use anyhow::{Context, Result, bail};
use legion_ir::{Ir, Rows, Split, StageId, TensorRef};
use legion_partition::{
    Group, Tiling, channel_tile, check_channel_group, check_group, strips_from_weights, tile,
    whole_stage,
};
use legion_plan::TileSpec;
use legion_runtime::{Reference, check};
use serde::Serialize;
use std::fmt::Write;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Number of devices.
    #[arg(long)]
    devices: usize,
    /// Relative device speeds, one per device (default: all equal), e.g. 3,3,2,2.
    #[arg(long, value_delimiter = ',')]
    weights: Option<Vec<f64>>,
    /// One group of stages, e.g. 0..4 (inclusive).
    #[arg(long, conflicts_with = "groups")]
    group: Option<String>,
    /// Several groups, e.g. 0..4,5..9 (default: every run of splittable stages).
    #[arg(long)]
    groups: Option<String>,
    /// Split each group's last stage by output channels (convs) or neurons (matmuls)
    /// instead of rows: each device computes all rows of its channels from the whole
    /// input and its slice of the weights (a depthwise conv: its channels of the input,
    /// also after an expand conv chained before it); stages before those run whole on
    /// every device. Needs --group or --groups.
    #[arg(long)]
    channels: bool,
    /// Run every strip with tract and compare with the single-device run.
    #[arg(long)]
    check: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// Relative error above which `--check` fails.
const TOLERANCE: f32 = 1e-5;

/// What `split` tiles: a group of splittable stages cut over the devices, or a barrier
/// stage that runs whole on one device.
enum Piece {
    Split(Group),
    /// A group whose last stage is split by channels.
    Channels(Group),
    /// The barrier and why it is one.
    Whole(StageId, String),
}

#[derive(Serialize)]
struct GroupReport {
    /// The group's tiles, for a group of splittable stages.
    #[serde(skip_serializing_if = "Option::is_none")]
    tiling: Option<Tiling>,
    /// The barrier stage run whole, for a barrier.
    #[serde(skip_serializing_if = "Option::is_none")]
    whole: Option<WholeReport>,
    /// The group split by channels, with --channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    channels: Option<ChannelReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    check: Option<CheckReport>,
}

/// A barrier stage: it runs whole, on one device, as the model declares it.
#[derive(Serialize)]
struct WholeReport {
    stage: StageId,
    name: String,
    reason: String,
}

/// A group split by channels: each device's channels of the last stage and the bytes
/// of weights its tile reads.
#[derive(Serialize)]
struct ChannelReport {
    group: Group,
    /// The output axis holding the channels, and how many there are.
    axis: usize,
    count: usize,
    devices: Vec<ChannelTile>,
}

#[derive(Serialize)]
struct ChannelTile {
    slot: usize,
    channels: Rows,
    weight_bytes: u64,
}

#[derive(Serialize)]
struct CheckReport {
    max_abs: f32,
    max_rel: f32,
}

impl CheckReport {
    fn diff(&self) -> check::Diff {
        check::Diff {
            max_abs: self.max_abs,
            max_rel: self.max_rel,
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let ir = args.model.import()?;
    let weights = args
        .weights
        .clone()
        .unwrap_or_else(|| vec![1.0; args.devices]);
    let bad = |msg: String| Err(BadInput(msg).into());
    if args.devices == 0 {
        return bad("--devices must be at least 1".into());
    }
    if weights.len() != args.devices {
        return bad(format!(
            "--weights gives {} speeds for {} devices",
            weights.len(),
            args.devices
        ));
    }
    if weights.iter().any(|w| !w.is_finite() || *w <= 0.0) {
        return bad(format!(
            "--weights must be positive numbers, got {weights:?}"
        ));
    }
    let pieces = match (&args.group, &args.groups) {
        (Some(g), _) | (None, Some(g)) if args.channels => parse_channel_groups(&ir, g)?
            .into_iter()
            .map(Piece::Channels)
            .collect(),
        (Some(g), _) | (None, Some(g)) => parse_groups(&ir, g)?
            .into_iter()
            .map(Piece::Split)
            .collect(),
        (None, None) if args.channels => {
            return bad("--channels needs --group or --groups: which stages to split".into());
        }
        (None, None) => default_pieces(&ir),
    };
    let reference = if args.check {
        Some(Reference::run(&ir, check::test_input(&ir.input.shape))?)
    } else {
        None
    };
    let mut reports = vec![];
    for piece in pieces {
        let mut channels = None;
        let (specs, tiling, whole) = match piece {
            Piece::Channels(group) => {
                let split = ir.stage(group.last).channels.expect("checked by the parse");
                let cuts = strips_from_weights(split.count, &weights);
                let mut specs = vec![];
                let mut devices = vec![];
                for (slot, c) in cuts.into_iter().enumerate().filter(|(_, c)| !c.is_empty()) {
                    specs.push((
                        format!("group {group} by channels, device {slot}"),
                        channel_tile(&ir, group, c),
                    ));
                    devices.push(ChannelTile {
                        slot,
                        channels: c,
                        weight_bytes: group
                            .stages()
                            .map(|s| match s == group.last {
                                true => ir.channel_weight_bytes(s, c),
                                false => ir.stage(s).weight_bytes,
                            })
                            .sum(),
                    });
                }
                channels = Some(ChannelReport {
                    group,
                    axis: split.axis,
                    count: split.count,
                    devices,
                });
                (specs, None, None)
            }
            Piece::Split(group) => {
                let height = ir
                    .stage(group.last)
                    .output
                    .height()
                    .context("group output has no rows")?;
                // Devices beyond the group's rows get empty strips and drop out.
                let tiling = tile(&ir, group, &strips_from_weights(height, &weights))?;
                let specs = tiling
                    .tiles
                    .iter()
                    .map(|d| (format!("group {group}, device {}", d.slot), d.spec()))
                    .collect::<Vec<_>>();
                (specs, Some(tiling), None)
            }
            Piece::Whole(s, reason) => {
                let whole = WholeReport {
                    stage: s,
                    name: ir.stage(s).name.clone(),
                    reason,
                };
                let spec = whole_stage(&ir, s);
                (
                    vec![(format!("barrier stage {s}"), spec)],
                    None,
                    Some(whole),
                )
            }
        };
        let check = match &reference {
            Some(reference) => {
                let mut diff = check::Diff::default();
                for (what, spec) in &specs {
                    let got =
                        check::check_tile(&ir, reference, spec).with_context(|| what.clone())?;
                    diff = diff.max(got);
                }
                // Reductions the devices combine: their partials against the whole.
                let tiles: Vec<TileSpec> = specs.iter().map(|(_, spec)| spec.clone()).collect();
                if tiles.iter().any(|t| t.partials().next().is_some()) {
                    let got = check::check_partials(&ir, reference, &tiles)
                        .context("combining the devices' partial results")?;
                    diff = diff.max(got);
                }
                Some(CheckReport {
                    max_abs: diff.max_abs,
                    max_rel: diff.max_rel,
                })
            }
            None => None,
        };
        reports.push(GroupReport {
            tiling,
            whole,
            channels,
            check,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print!("{}", group_table(&ir, r));
        }
    }
    let worst = reports
        .iter()
        .filter_map(|r| r.check.as_ref())
        .filter(|c| !c.diff().within(TOLERANCE))
        .map(|c| c.max_rel)
        .fold(0f32, f32::max);
    if worst > 0.0 {
        bail!(
            "split outputs differ from the single-device run: max relative error {worst:e} > {TOLERANCE:e}"
        );
    }
    Ok(())
}

/// Parses `A..B` or `A..B,C..D` (inclusive stage ranges).
pub(crate) fn parse_groups(ir: &Ir, text: &str) -> Result<Vec<Group>> {
    text.split(',')
        .map(|g| {
            let malformed =
                || BadInput(format!("'{g}' is not a stage range: write A..B, e.g. 0..4"));
            let (a, b) = g.trim().split_once("..").ok_or_else(malformed)?;
            let parse = |s: &str| s.trim().parse::<usize>().map_err(|_| malformed());
            Ok(check_group(ir, parse(a)?, parse(b)?)?)
        })
        .collect()
}

/// Parses groups like [`parse_groups`], each to be split by channels.
pub(crate) fn parse_channel_groups(ir: &Ir, text: &str) -> Result<Vec<Group>> {
    text.split(',')
        .map(|g| {
            let malformed = || {
                BadInput(format!(
                    "'{g}' is not a stage range: write A..B, e.g. 18..19"
                ))
            };
            let (a, b) = g.trim().split_once("..").ok_or_else(malformed)?;
            let parse = |s: &str| s.trim().parse::<usize>().map_err(|_| malformed());
            Ok(check_channel_group(ir, parse(a)?, parse(b)?)?)
        })
        .collect()
}

/// Every maximal run of splittable stages, as groups, and every barrier stage on its
/// own, in stage order.
fn default_pieces(ir: &Ir) -> Vec<Piece> {
    let mut pieces = vec![];
    let mut start = None;
    for s in &ir.stages {
        match (&s.split, start) {
            (Split::Rows, None) => start = Some(s.id.index()),
            (Split::Barrier(reason), _) => {
                if let Some(a) = start.take() {
                    pieces.push(Piece::Split(Group::new(a, s.id.index() - 1)));
                }
                pieces.push(Piece::Whole(s.id, reason.clone()));
            }
            (Split::Rows, Some(_)) => {}
        }
    }
    if let Some(a) = start {
        pieces.push(Piece::Split(Group::new(a, ir.stages.len() - 1)));
    }
    pieces
}

fn tensor_name(r: TensorRef) -> String {
    match r {
        TensorRef::Input => "input".into(),
        TensorRef::Stage(s) => format!("s{s}"),
    }
}

fn alpha(a: Option<f64>) -> String {
    a.map(|a| format!("{a:.2}")).unwrap_or_else(|| "-".into())
}

fn group_table(ir: &Ir, report: &GroupReport) -> String {
    let mut out = String::new();
    if let Some(c) = &report.channels {
        let last = ir.stage(c.group.last);
        let _ = writeln!(
            out,
            "group {} ({} .. {}) by channels: {} {} on axis {}, {} devices; inputs whole",
            c.group,
            ir.stage(c.group.first).name,
            last.name,
            c.count,
            last.kind.short_name(),
            c.axis,
            c.devices.len()
        );
        for d in &c.devices {
            let _ = writeln!(
                out,
                "  device {}  channels {}  weights {:.1} MiB",
                d.slot,
                d.channels,
                d.weight_bytes as f64 / (1024.0 * 1024.0)
            );
        }
        push_check(&mut out, report);
        out.push('\n');
        return out;
    }
    let Some(t) = &report.tiling else {
        if let Some(w) = &report.whole {
            let stage = ir.stage(w.stage);
            let _ = writeln!(
                out,
                "stage {} ({}, {}): barrier, runs whole on one device: {}",
                w.stage,
                w.name,
                stage.kind.short_name(),
                w.reason
            );
        }
        push_check(&mut out, report);
        out.push('\n');
        return out;
    };
    let first = ir.stage(t.group.first);
    let last = ir.stage(t.group.last);
    let _ = writeln!(
        out,
        "group {} ({} .. {}), {} devices; inputs {}; outputs {}",
        t.group,
        first.name,
        last.name,
        t.tiles.len(),
        t.inputs
            .iter()
            .map(|r| tensor_name(*r))
            .collect::<Vec<_>>()
            .join(","),
        t.outputs
            .iter()
            .map(|s| format!("s{s}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut rows: Vec<Vec<String>> = vec![];
    let mut header = vec!["".to_string()];
    header.extend(t.tiles.iter().map(|d| format!("device {}", d.slot)));
    rows.push(header);
    let mut line = vec!["strip".to_string()];
    line.extend(t.tiles.iter().map(|d| d.strip.to_string()));
    rows.push(line);
    for (i, input) in t.inputs.iter().enumerate() {
        let mut line = vec![format!("recv {}", tensor_name(*input))];
        line.extend(t.tiles.iter().map(|d| {
            let r = &d.received[i];
            format!("{} a_in {}", r.rows, alpha(r.alpha_in))
        }));
        rows.push(line);
    }
    for s in t.group.stages() {
        let stage = ir.stage(s);
        let mut line = vec![format!("s{s} {}", stage.kind.short_name())];
        line.extend(t.tiles.iter().map(|d| {
            let st = d.stage(s);
            let pads = st
                .inputs
                .iter()
                .filter(|i| i.pad_top + i.pad_bottom > 0)
                .map(|i| format!(" pad {}/{}", i.pad_top, i.pad_bottom))
                .next()
                .unwrap_or_default();
            if st.partial {
                // A reduction the devices combine: each reduces the rows it owns.
                let owned = st.inputs.first().map(|i| i.rows).unwrap_or_default();
                return format!("partial of rows {owned}, combined");
            }
            format!(
                "{} halo {} a {}{pads}",
                st.computed,
                st.halo_rows,
                alpha(st.alpha)
            )
        }));
        rows.push(line);
    }
    for (i, o) in t.outputs.iter().enumerate() {
        let mut line = vec![format!("send s{o}")];
        line.extend(t.tiles.iter().map(|d| d.sent[i].1.to_string()));
        rows.push(line);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    }
    push_check(&mut out, report);
    out.push('\n');
    out
}

/// The `check:` line of a report that was checked.
fn push_check(out: &mut String, report: &GroupReport) {
    if let Some(c) = &report.check {
        let verdict = if c.diff().within(TOLERANCE) {
            "ok"
        } else {
            "MISMATCH"
        };
        let _ = writeln!(
            out,
            "  check: max abs {:e}, max rel {:e} ({verdict})",
            c.max_abs, c.max_rel
        );
    }
}
