//! `legion plan show`: a plan's timeline as SVG. One row per device; for every group
//! its receive, compute and send bars at their predicted times (and, with a run's
//! results, the measured ones beside them); above, the FLC over the stage list.

use anyhow::{Context, Result, anyhow};
use legion_plan::{Plan, RunResults};
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

/// Draws the timeline of `plan` (and `run`, when given) into the SVG file `out`.
pub fn draw(plan: &Plan, run: Option<&RunResults>, out: &Path) -> Result<()> {
    let c = plan.chosen();
    let rows: Vec<String> = plan.devices.clone();
    let (mut bars, mut end) = predicted_bars(plan, &rows);
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
        let color = if g.split { COMPUTE } else { RECEIVE };
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
                if g.split { "split" } else { "whole" },
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
        .x_desc("ms (upper bar: predicted; lower bar: measured)")
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
