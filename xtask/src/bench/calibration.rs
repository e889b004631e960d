//! `cargo xtask bench calibration`: does the emulator's calibration hold for VGG-16?
//!
//! An emulated board's compute time is the host's measured time x host rate / board
//! rate, the host rate measured on the `calibration` model and the board rate derived
//! from its published VGG-16 time. Running VGG-16 whole on the host and scaling it that
//! way should give back the published time; the gap is how far VGG-16's own FLOP rate
//! on the host is from the calibration model's. VGG-16's stages are also timed one by
//! one, to show which of them the gap comes from.

use anyhow::{Context, Result};
use legion_partition::whole_stage;
use legion_runtime::check::{strip, test_input};
use legion_runtime::emulate::{
    BOARD_CLASSES, CALIBRATION_FLOPS, CALIBRATION_MODEL, ComputeLock, VGG16_FLOPS,
    measure_host_gflops,
};
use legion_runtime::{Reference, Tile};
use std::fmt::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tract_onnx::prelude::{IntoRunnable, IntoTValue, tvec};

/// Untimed runs of a whole model before the timed ones.
const WARMUP_RUNS: usize = 1;
/// Timed runs of a whole model.
const TIMED_RUNS: usize = 5;
/// Timed runs of one stage alone (after one warm-up run); the fastest counts.
const STAGE_RUNS: usize = 5;
/// Largest gap between an emulated VGG-16 time and its target that counts as calibrated.
const TOLERANCE: f64 = 0.05;

/// A whole model timed on the host.
struct WholeRun {
    /// Stages of the import.
    stages: usize,
    /// Sum of the imported stages' FLOPs.
    flops: u64,
    /// The timed runs, in order.
    times: Vec<Duration>,
}

impl WholeRun {
    fn median(&self) -> Duration {
        let mut t = self.times.clone();
        t.sort();
        t[t.len() / 2]
    }

    fn min(&self) -> Duration {
        *self.times.iter().min().expect("timed runs")
    }
}

/// Imports `name` like the worker does (legion-ir's import, tract's optimized typed
/// model), then runs it whole on tract's default (single-threaded) executor: warm-up
/// runs, then timed ones, holding the emulated-compute lock so that emulated workers on
/// this host do not run meanwhile.
fn time_whole(name: &str, lock: &ComputeLock) -> Result<WholeRun> {
    eprintln!("{name}: importing and optimizing...");
    let ir = super::load(name)?;
    let flops = ir.stages.iter().map(|s| s.flops).sum();
    let plan = ir
        .model
        .clone()
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .with_context(|| format!("optimizing {name} with tract"))?;
    let input = test_input(&ir.input.shape).into_tvalue();
    eprintln!("{name}: {WARMUP_RUNS} warm-up + {TIMED_RUNS} timed runs...");
    let _held = lock.hold()?;
    let mut times = vec![];
    for run in 0..WARMUP_RUNS + TIMED_RUNS {
        let start = Instant::now();
        plan.run(tvec!(input.clone()))
            .with_context(|| format!("running {name}"))?;
        if run >= WARMUP_RUNS {
            times.push(start.elapsed());
        }
    }
    Ok(WholeRun {
        stages: ir.stages.len(),
        flops,
        times,
    })
}

/// One stage of a model run alone on the host.
struct StageRun {
    name: String,
    flops: u64,
    weight_bytes: u64,
    min: Duration,
}

/// Every stage of `name` alone (its whole output, inputs from a single-device run) as
/// the worker runs a tile: 1 warm-up + [`STAGE_RUNS`] timed runs, the fastest kept.
fn time_stages(name: &str, lock: &ComputeLock) -> Result<Vec<StageRun>> {
    eprintln!("{name}: every stage alone...");
    let ir = super::load(name)?;
    let reference = Reference::run(&ir, test_input(&ir.input.shape))?;
    let mut runs = vec![];
    for stage in &ir.stages {
        let spec = whole_stage(&ir, stage.id);
        let tile = Tile::build(&ir, &spec)
            .with_context(|| format!("building stage {} ({})", stage.id, stage.name))?;
        let inputs = spec
            .inputs
            .iter()
            .map(|i| strip(&ir, &reference, i.tensor, i.rows))
            .collect::<Result<Vec<_>>>()?;
        let _held = lock.hold()?;
        let mut min = Duration::MAX;
        for run in 0..1 + STAGE_RUNS {
            let start = Instant::now();
            tile.run(inputs.clone())
                .with_context(|| format!("running stage {} ({})", stage.id, stage.name))?;
            if run > 0 {
                min = min.min(start.elapsed());
            }
        }
        runs.push(StageRun {
            name: stage.name.clone(),
            flops: stage.flops,
            weight_bytes: stage.weight_bytes,
            min,
        });
    }
    Ok(runs)
}

fn host_rate(lock: &ComputeLock) -> Result<f64> {
    eprintln!("measuring the host rate on the {CALIBRATION_MODEL} model...");
    let _held = lock.hold()?;
    measure_host_gflops()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn gflops(flops: f64, d: Duration) -> f64 {
    flops / d.as_secs_f64() / 1e9
}

fn pct(x: f64) -> String {
    format!("{:+.1}%", x * 100.0)
}

pub fn calibration() -> Result<String> {
    let calibration_spec = legion_models::spec(CALIBRATION_MODEL)?;
    let lock = ComputeLock::open(ComputeLock::default_path())?;
    let load = load_average();
    let host = host_rate(&lock)?;
    let vgg = time_whole("vgg16", &lock)?;
    let conv = time_whole("vgg16-conv", &lock)?;
    let stages = time_stages("vgg16", &lock)?;
    let host_after = host_rate(&lock)?;
    anyhow::ensure!(
        vgg.flops as f64 == VGG16_FLOPS,
        "the imported vgg16 counts {} FLOPs, VGG16_FLOPS says {VGG16_FLOPS}",
        vgg.flops
    );

    let mut out = String::new();
    writeln!(
        out,
        "# Emulator calibration: VGG-16 on this host against the board classes\n"
    )?;
    writeln!(
        out,
        "Produced by `cargo xtask bench calibration` (dev profile: tract optimized) on {}, {} \
         (load average {load} at the start).\n",
        today(),
        super::host()
    )?;
    writeln!(
        out,
        "An emulated board's compute time is the time measured on the host x (host GFLOP/s / \
         board GFLOP/s). The host rate is `measure_host_gflops()` on the `{CALIBRATION_MODEL}` \
         model ({}; input {:?}; {:.3} GFLOP): 3 warm-up runs, the fastest of 10. A board \
         class's rate is `VGG16_FLOPS` ({:.3} GFLOP, Legion's count) over its VGG-16 time. \
         Scaling the host's own VGG-16 time that way should give back each class's VGG-16 \
         time.\n",
        calibration_spec.description,
        calibration_spec.input_shape,
        CALIBRATION_FLOPS / 1e9,
        VGG16_FLOPS / 1e9
    )?;
    writeln!(out, "## Host\n")?;
    writeln!(
        out,
        "Whole models imported like the worker does (legion-ir, tract's optimized typed model), \
         run single-threaded on a fixed input: {WARMUP_RUNS} warm-up + {TIMED_RUNS} timed \
         runs. Every measurement holds the emulated-compute lock.\n"
    )?;
    writeln!(
        out,
        "| workload | GFLOP | median ms | min ms | GFLOP/s (min) |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    writeln!(
        out,
        "| `calibration` (host rate, `measure_host_gflops`) | {:.3} | | {:.1} | **{host:.2}** |",
        CALIBRATION_FLOPS / 1e9,
        CALIBRATION_FLOPS / host / 1e6
    )?;
    for (label, run) in [
        ("`vgg16` whole (224x224, with the FC head)", &vgg),
        ("`vgg16-conv` (convs and pools, up to pool5)", &conv),
    ] {
        writeln!(
            out,
            "| {label} | {:.3} | {:.1} | {:.1} | {:.2} |",
            run.flops as f64 / 1e9,
            ms(run.median()),
            ms(run.min()),
            gflops(run.flops as f64, run.min())
        )?;
    }
    let head_flops = (vgg.flops - conv.flops) as f64;
    let head_min = vgg.min().saturating_sub(conv.min());
    // A difference of two noisy times: the medians' can come out negative.
    let head_median_ms = ms(vgg.median()) - ms(conv.median());
    writeln!(
        out,
        "| FC head (`vgg16` - `vgg16-conv`) | {:.3} | {head_median_ms:.1} | {:.1} | {} |",
        head_flops / 1e9,
        ms(vgg.min()) - ms(conv.min()),
        if head_min.is_zero() {
            "n/a".to_string()
        } else {
            format!("{:.2}", gflops(head_flops, head_min))
        }
    )?;
    writeln!(
        out,
        "\nTimed runs, ms: `vgg16` {}; `vgg16-conv` {}. The host rate measured again after \
         them: {host_after:.2} GFLOP/s ({} from the first).\n",
        list_ms(&vgg.times),
        list_ms(&conv.times),
        pct(host_after / host - 1.0)
    )?;
    if (host_after / host - 1.0).abs() > TOLERANCE {
        writeln!(
            out,
            "**The host rate moved by {} during the run: something else ran on the host. The \
             numbers below are not reliable; run again on a quiet host.**\n",
            pct(host_after / host - 1.0)
        )?;
    }

    writeln!(out, "## Board classes\n")?;
    writeln!(
        out,
        "Emulated VGG-16 = host VGG-16 ms x (host GFLOP/s / class GFLOP/s), from the fastest \
         host run (the host rate is a fastest run too) and from the median.\n"
    )?;
    writeln!(
        out,
        "| class | target VGG-16 ms | class GFLOP/s | host / class | emulated ms (min) | error | emulated ms (median) | error |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut worst: f64 = 0.0;
    for class in BOARD_CLASSES {
        let slowdown = host / class.gflops();
        let from_min = ms(vgg.min()) * slowdown;
        let from_median = ms(vgg.median()) * slowdown;
        let err_min = from_min / class.vgg16_ms - 1.0;
        let err_median = from_median / class.vgg16_ms - 1.0;
        worst = worst.max(err_min.abs());
        writeln!(
            out,
            "| `{}` | {:.0} | {:.2} | {slowdown:.3} | {from_min:.0} | {} | {from_median:.0} | {} |",
            class.name,
            class.vgg16_ms,
            class.gflops(),
            pct(err_min),
            pct(err_median)
        )?;
    }
    let vgg_rate = gflops(VGG16_FLOPS, vgg.min());
    let conv_rate = gflops(conv.flops as f64, conv.min());
    let head_rate = gflops(head_flops, head_min);
    writeln!(
        out,
        "\nCheck: the error is the same for every class, since emulated / target = host \
         GFLOP/s / VGG-16's effective GFLOP/s on the host = {host:.2} / {vgg_rate:.2} \
         (`VGG16_FLOPS` / fastest host run) = {:.3}.\n",
        host / vgg_rate
    )?;

    writeln!(out, "## Verdict\n")?;
    if worst > TOLERANCE {
        writeln!(
            out,
            "**The emulated VGG-16 misses its target by more than {:.0}%: {} on every class** \
             ({:.0} ms emulated against {:.0} ms for `{}`). Emulated boards run VGG-16 {} \
             than the classes' published times say.\n",
            TOLERANCE * 100.0,
            pct(host / vgg_rate - 1.0),
            ms(vgg.min()) * host / BOARD_CLASSES[0].gflops(),
            BOARD_CLASSES[0].vgg16_ms,
            BOARD_CLASSES[0].name,
            if host > vgg_rate { "slower" } else { "faster" }
        )?;
    } else {
        writeln!(
            out,
            "The emulated VGG-16 is within {:.0}% of its target on every class ({}).\n",
            TOLERANCE * 100.0,
            pct(host / vgg_rate - 1.0)
        )?;
    }
    // Per stage: the time above what the calibration rate predicts for its FLOPs.
    let excess = |r: &StageRun| ms(r.min) - r.flops as f64 / host / 1e6;
    let (body, head) = stages.split_at(conv.stages.min(stages.len()));
    let sum_ms = |rs: &[StageRun]| rs.iter().map(|r| ms(r.min)).sum::<f64>();
    let sum_excess = |rs: &[StageRun]| rs.iter().map(excess).sum::<f64>();
    let mut worst_convs: Vec<&StageRun> = body.iter().collect();
    worst_convs.sort_by(|a, b| excess(b).total_cmp(&excess(a)));
    let named = |rs: &[&StageRun]| {
        rs.iter()
            .map(|r| {
                format!(
                    "{} ({:.1} GFLOP/s, {:+.0} ms)",
                    r.name,
                    gflops(r.flops as f64, r.min),
                    excess(r)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        out,
        "Where the gap comes from: emulated / target = host rate / VGG-16's own rate on the \
         host, so the gap is how much slower (or faster) per FLOP VGG-16 at 224x224 runs than \
         the `{CALIBRATION_MODEL}` model. Run whole, VGG-16's conv part (`vgg16-conv`) reaches \
         {conv_rate:.2} GFLOP/s ({} against the host rate of {host:.2}); its FC head ({:.1}% \
         of the FLOPs) reaches {head_rate:.2} GFLOP/s and takes {:.1}% of the time ({:.0} of \
         {:.0} ms). The FC layers are matrix-vector products at batch 1: each of their {:.0} \
         MB of weights is read once per inference for one multiply-add, so they are bound by \
         memory bandwidth, not by the FLOP rate of convs. Scaled the same way, `vgg16-conv` \
         alone comes out {} off the time its FLOPs take at a class's rate. Stage by stage \
         (below), the stages furthest above the time the host rate gives them: {}.\n",
        pct(conv_rate / host - 1.0),
        head_flops / VGG16_FLOPS * 100.0,
        ms(head_min) / ms(vgg.min()) * 100.0,
        ms(head_min),
        ms(vgg.min()),
        head.iter().map(|r| r.weight_bytes).sum::<u64>() as f64 / 1e6,
        pct(host / conv_rate - 1.0),
        named(&worst_convs[..3.min(worst_convs.len())]),
    )?;

    writeln!(
        out,
        "## VGG-16 stage by stage
"
    )?;
    writeln!(
        out,
        "Each stage alone over its whole output, as a worker runs a tile (its own optimized \
         tract model, inputs from a single-device run): 1 warm-up + {STAGE_RUNS} timed runs, \
         the fastest. \"Above calibration\" is its time minus its FLOPs at the host rate \
         ({host:.2} GFLOP/s).\n"
    )?;
    writeln!(
        out,
        "| # | stage | GFLOP | weights MB | min ms | GFLOP/s | above calibration ms |"
    )?;
    writeln!(out, "|---:|---|---:|---:|---:|---:|---:|")?;
    for (i, r) in stages.iter().enumerate() {
        writeln!(
            out,
            "| {i} | {} | {:.3} | {:.1} | {:.1} | {:.2} | {:+.1} |",
            r.name,
            r.flops as f64 / 1e9,
            r.weight_bytes as f64 / 1e6,
            ms(r.min),
            gflops(r.flops as f64, r.min),
            excess(r)
        )?;
    }
    for (label, rs) in [
        ("conv part", body),
        ("FC head", head),
        ("all stages", &stages[..]),
    ] {
        let flops: u64 = rs.iter().map(|r| r.flops).sum();
        writeln!(
            out,
            "| | **{label}** | {:.3} | {:.1} | {:.1} | {:.2} | {:+.1} |",
            flops as f64 / 1e9,
            rs.iter().map(|r| r.weight_bytes).sum::<u64>() as f64 / 1e6,
            sum_ms(rs),
            flops as f64 / sum_ms(rs) / 1e6,
            sum_excess(rs)
        )?;
    }
    writeln!(
        out,
        "\nThe stages alone add up to {:.0} ms against {:.0} ms for the whole model's fastest \
         run.",
        sum_ms(&stages),
        ms(vgg.min())
    )?;
    Ok(out)
}

/// The 1-minute load average, as /proc/loadavg gives it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn list_ms(times: &[Duration]) -> String {
    times
        .iter()
        .map(|t| format!("{:.1}", ms(*t)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Today's date (UTC), `YYYY-MM-DD`.
fn today() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
    }
}
