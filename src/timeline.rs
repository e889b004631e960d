//! `legion plan show`: a plan's timeline as SVG. One row per device; for every group
//! its receive, compute and send bars at their predicted times (and, with a run's
//! results, the measured ones beside them), or, given the model and the cluster, the
//! programs' predicted timeline: every tile at its time and an arrow per transfer;
//! above, the FLC over the stage list.

use anyhow::{Context, Result, anyhow};
use legion_ir::{Ir, Rows, TensorRef};
use legion_plan::network::programs_timeline;
use legion_plan::{Cluster, Link, Party, Plan, RunResults, Step};
use plotters::prelude::*;
use std::path::Path;

const RECEIVE: RGBColor = RGBColor(90, 140, 210);
const COMPUTE: RGBColor = RGBColor(230, 140, 50);
const SEND: RGBColor = RGBColor(100, 170, 100);

/// One bar: row, from, to (ms), colour.
type Bar = (f64, f64, f64, RGBColor);

/// Bars of the predicted timeline: groups one after another, each device's receive,
/// compute and send inside its group.
fn predicted_bars(plan: &Plan, rows: &[String]) -> (Vec<Bar>, f64) {
    let c = plan.chosen();
    let mut bars = vec![];
    let mut start = 0.0;
    for g in &c.groups {
        for t in &g.tiles {
            let row = rows.iter().position(|r| r == &t.device).unwrap_or(0) as f64;
            let (s, e, r) = (
                t.in_us as f64 / 1e3,
                t.compute_us as f64 / 1e3,
                t.out_us as f64 / 1e3,
            );
            bars.push((row, start, start + s, RECEIVE));
            bars.push((row, start + s, start + s + e, COMPUTE));
            bars.push((row, start + s + e, start + s + e + r, SEND));
        }
        start += g.predicted_us as f64 / 1e3;
    }
    (bars, start)
}

/// The chosen candidate's programs on their predicted timeline: the rows (the devices,
/// then the coordinator), a compute bar per tile run, an arrow per transfer (from the
/// sender's row when the rows leave to the receiver's when it has them, ms), and the
/// end.
pub struct ProgramsTimeline {
    rows: Vec<String>,
    bars: Vec<Bar>,
    arrows: Vec<((f64, f64), (f64, f64))>,
    end: f64,
}

/// Times the chosen candidate's programs as `legion run` does on the emulated clock:
/// each tile its predicted compute, each transfer its bytes (from `ir`) over `cluster`'s
/// links.
pub fn programs(plan: &Plan, ir: &Ir, cluster: &Cluster) -> Result<ProgramsTimeline> {
    let c = plan.chosen();
    let mut rows = plan.devices.clone();
    rows.push("coordinator".into());
    let row_of = |party: &Party| match party {
        Party::Coordinator => Some(rows.len() - 1),
        Party::Device(name) => rows.iter().position(|r| r == name),
    };
    let links: Vec<Link> =
        c.programs
            .iter()
            .map(|p| match &p.party {
                Party::Coordinator => Ok(Link {
                    mbps: cluster.coordinator.mbps,
                    latency_ms: 0.0,
                }),
                Party::Device(name) => cluster.device(name).map(|d| d.link()).with_context(|| {
                    format!("the plan runs on {name}, which is not in the cluster")
                }),
            })
            .collect::<Result<_>>()?;
    let compute =
        |p: usize, k: usize| legion_codegen::run_compute_us(ir, &c.groups, &c.programs[p].steps[k]);
    let bytes = |t: TensorRef, r: Rows, c: Option<Rows>| ir.part_bytes(t, r, c);
    let ends = programs_timeline(&c.programs, &links, bytes, compute).map_err(|e| anyhow!(e))?;
    let mut bars = vec![];
    // When each transfer left: (from, to, tensor, rows, channels) -> ms.
    let mut left = std::collections::HashMap::new();
    for (p, program) in c.programs.iter().enumerate() {
        let row = row_of(&program.party).context("a program's party is not in the plan")?;
        for (k, step) in program.steps.iter().enumerate() {
            let end = ends[p][k] / 1e3;
            match step {
                Step::Run { .. } => {
                    bars.push((row as f64, end - compute(p, k) / 1e3, end, COMPUTE));
                }
                Step::Send {
                    tensor,
                    rows,
                    channels,
                    to,
                } => {
                    let key = (program.party.clone(), to.clone(), *tensor, *rows, *channels);
                    left.insert(key, end);
                }
                _ => {}
            }
        }
    }
    let mut arrows = vec![];
    for (p, program) in c.programs.iter().enumerate() {
        for (k, step) in program.steps.iter().enumerate() {
            if let Step::Receive {
                tensor,
                rows,
                channels,
                from,
            } = step
            {
                let key = (
                    from.clone(),
                    program.party.clone(),
                    *tensor,
                    *rows,
                    *channels,
                );
                if let (Some(&sent), Some(a), Some(b)) =
                    (left.get(&key), row_of(from), row_of(&program.party))
                {
                    arrows.push(((sent, a as f64 + 0.22), (ends[p][k] / 1e3, b as f64 + 0.22)));
                }
            }
        }
    }
    let end = ends.iter().flatten().fold(0.0f64, |a, &b| a.max(b)) / 1e3;
    Ok(ProgramsTimeline {
        rows,
        bars,
        arrows,
        end,
    })
}

/// Bars of a measured run, on the rows just below each device's predicted row.
fn measured_bars(results: &RunResults, rows: &[String]) -> (Vec<Bar>, f64) {
    let mut bars = vec![];
    let mut start = 0.0;
    for step in &results.groups {
        for t in &step.devices {
            let row = rows.iter().position(|r| r == &t.device).unwrap_or(0) as f64 + 0.45;
            let arrived = start + t.in_us as f64 / 1e3;
            let computed = arrived + t.compute_us as f64 / 1e3;
            bars.push((row, start, arrived, RECEIVE));
            bars.push((row, arrived, computed, COMPUTE));
            bars.push((row, computed, computed + t.out_us as f64 / 1e3, SEND));
        }
        start += step.total_us as f64 / 1e3;
    }
    (bars, start)
}

/// Draws the timeline of `plan` (and `run`, when given) into the SVG file `out`: the
/// programs' timeline when given, else the groups' bars.
pub fn draw(
    plan: &Plan,
    run: Option<&RunResults>,
    programs: Option<&ProgramsTimeline>,
    out: &Path,
) -> Result<()> {
    let c = plan.chosen();
    let (rows, mut bars, mut end, arrows) = match programs {
        Some(t) => (t.rows.clone(), t.bars.clone(), t.end, t.arrows.clone()),
        None => {
            let (bars, end) = predicted_bars(plan, &plan.devices);
            (plan.devices.clone(), bars, end, vec![])
        }
    };
    if let Some(r) = run {
        let (measured, measured_end) = measured_bars(r, &rows);
        bars.extend(measured);
        end = end.max(measured_end);
    }
    let height = 220 + 50 * rows.len() as u32;
    let root = SVGBackend::new(out, (1200, height)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e:?}", out.display());
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(150);

    // The FLC over the stage list.
    let stages = plan.stages as f64;
    let mut flc = ChartBuilder::on(&top)
        .caption(
            format!(
                "candidate {} ({} groups, predicted {:.1} ms{})",
                c.name,
                c.groups.len(),
                c.predicted_us as f64 / 1e3,
                run.map_or(String::new(), |r| format!(
                    ", measured {:.1} ms on the {} clock{}",
                    r.median_us as f64 / 1e3,
                    r.clock,
                    r.transport
                        .as_ref()
                        .map_or(String::new(), |t| format!(", transport {t}"))
                ))
            ),
            ("sans-serif", 18),
        )
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(140)
        .build_cartesian_2d(0f64..stages, 0f64..1f64)
        .map_err(err)?;
    flc.configure_mesh()
        .disable_mesh()
        .x_desc("stage")
        .y_labels(0)
        .draw()
        .map_err(err)?;
    for (k, g) in c.groups.iter().enumerate() {
        let (a, b) = (g.first.index() as f64, g.last.index() as f64 + 1.0);
        let color = match (g.split, g.channels) {
            (true, true) => SEND,
            (true, false) => COMPUTE,
            (false, _) => RECEIVE,
        };
        flc.draw_series([Rectangle::new(
            [(a, 0.15), (b, 0.85)],
            color.mix(0.35).filled(),
        )])
        .map_err(err)?;
        flc.draw_series([Rectangle::new(
            [(a, 0.15), (b, 0.85)],
            BLACK.stroke_width(1),
        )])
        .map_err(err)?;
        flc.draw_series([Text::new(
            format!(
                "g{k}: {} x{}",
                match (g.split, g.channels) {
                    (true, true) => "channels",
                    (true, false) => "split",
                    (false, _) => "whole",
                },
                g.devices().len()
            ),
            (a + 0.1, 0.6),
            ("sans-serif", 12),
        )])
        .map_err(err)?;
    }

    // One row per device.
    let mut chart = ChartBuilder::on(&bottom)
        .margin(8)
        .x_label_area_size(35)
        .y_label_area_size(140)
        .build_cartesian_2d(0f64..end.max(1e-3) * 1.02, rows.len() as f64..0f64)
        .map_err(err)?;
    let names = rows.clone();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(if programs.is_some() {
            "ms (upper: the programs' predicted tiles, and lines from rows sent to rows received; lower: measured per group)"
        } else {
            "ms (upper bar: predicted; lower bar: measured)"
        })
        .y_labels(rows.len() * 2 + 1)
        .y_label_formatter(&move |y: &f64| {
            let i = y.floor() as usize;
            if (y - y.floor()).abs() < 1e-9 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(err)?;
    chart
        .draw_series(bars.iter().map(|&(row, from, to, color)| {
            Rectangle::new([(from, row + 0.05), (to, row + 0.4)], color.filled())
        }))
        .map_err(err)?;
    chart
        .draw_series(
            arrows
                .iter()
                .map(|&(a, b)| PathElement::new(vec![a, b], SEND.stroke_width(1))),
        )
        .map_err(err)?;
    for (label, color) in [("receive", RECEIVE), ("compute", COMPUTE), ("send", SEND)] {
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
