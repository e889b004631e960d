//! `cargo xtask bench calibration`: does an emulated board run at its class's speed on
//! every run, whatever the host does?
//!
//! Two parts. **What moves**: VGG-16 and the emulator's reference kernel timed in
//! rounds on this host, quiet and beside two busy loops, with the steal time the kernel
//! reports: how far one run strays, and how well the emulator's estimate (each node's
//! fastest time) holds. **Stability**: `legion demo` run several times over half an hour
//! (one run beside two busy loops, one during a cold build); each row gives the
//! emulated boards' VGG-16 time against their class and the demo's predicted and
//! measured latency.

use super::host;
use super::models::legion_cmd;
use anyhow::{Context, Result};
use legion_plan::{HostRates, Plan, RunResults};
use legion_runtime::emulate::{
    BOARD_CLASSES, CALIBRATION_MODEL, HostRate, NodeTimes, catalog_model, run_nodes_timed,
    thread_cpu_time,
};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tract_onnx::prelude::*;

/// How far an emulated VGG-16 time may be from its class's.
const CLASS_TOLERANCE: f64 = 0.05;
/// How far the demo's predicted latency may be from its measured one.
const PREDICTION_TOLERANCE: f64 = 0.10;
/// Rounds of the host study in each condition.
const STUDY_ROUNDS: usize = 20;

/// What the benchmark runs.
pub struct Options {
    /// Rows of the stability table.
    pub rows: usize,
    /// Minutes from the first row's start to the last's.
    pub spread_minutes: f64,
}

pub fn run(opts: &Options) -> Result<String> {
    anyhow::ensure!(opts.rows >= 1, "--rows must be at least 1");
    // A copy, so that a build during the half hour does not swap the binary under it.
    let legion = PathBuf::from("target/calibration-demo/legion");
    std::fs::create_dir_all("target/calibration-demo")?;
    std::fs::copy(super::legion_binary()?, &legion).context("copying the legion binary")?;
    let date = today();
    let load = load_average();
    let study = study_the_host()?;
    let rows = stability(&legion, opts)?;
    render(&date, &load, &study, &rows, opts)
}

/// One condition of the host study.
struct Phase {
    name: &'static str,
    /// VGG-16 whole-run times, ms, in order.
    runs: Vec<f64>,
    /// The emulator's estimate after each round: the sum of each node's fastest time.
    estimates: Vec<f64>,
    /// Reference kernel readings, ms.
    reference: Vec<f64>,
    /// Steal time the kernel reported over the phase, ms.
    steal_ms: f64,
}

/// The host study: calibration, then VGG-16 and the reference kernel in rounds, quiet
/// and beside two busy loops.
struct Study {
    calibration_s: f64,
    base_gflops: f64,
    phases: Vec<Phase>,
}

fn study_the_host() -> Result<Study> {
    eprintln!("calibrating the host (VGG-16 in rounds)...");
    let start = Instant::now();
    let host = HostRate::calibrate()?;
    let calibration_s = start.elapsed().as_secs_f64();
    let (plan, input) = catalog_model(CALIBRATION_MODEL)?;
    let mut phases = vec![];
    for (name, busy) in [("quiet", 0), ("two busy loops", 2)] {
        eprintln!("host study: {STUDY_ROUNDS} rounds, {name}...");
        let load = BusyLoops::start(busy);
        let steal = steal_ms();
        let mut phase = Phase {
            name,
            runs: vec![],
            estimates: vec![],
            reference: vec![],
            steal_ms: 0.0,
        };
        let mut nodes = NodeTimes::default();
        for _ in 0..STUDY_ROUNDS {
            if let Some(r) = host.read_reference()? {
                phase.reference.push(ms(r));
            }
            let (_, times) =
                run_nodes_timed(&plan, tvec!(input.clone().into_tvalue()), thread_cpu_time)?;
            phase.runs.push(ms(times.iter().sum()));
            nodes.merge(&times, 1.0);
            phase.estimates.push(ms(nodes.total()));
        }
        phase.steal_ms = steal_ms() - steal;
        drop(load);
        phases.push(phase);
    }
    Ok(Study {
        calibration_s,
        base_gflops: host.base_gflops(),
        phases,
    })
}

/// Threads spinning until dropped.
struct BusyLoops {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoops {
    fn start(n: usize) -> BusyLoops {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        BusyLoops { stop, threads }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What runs beside a row of the stability table.
#[derive(Clone, Copy, PartialEq)]
enum Beside {
    Nothing,
    BusyLoops,
    Build,
}

impl Beside {
    fn of_row(i: usize) -> Beside {
        match i {
            3 => Beside::BusyLoops,
            4 => Beside::Build,
            _ => Beside::Nothing,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Beside::Nothing => "quiet",
            Beside::BusyLoops => "two busy loops",
            Beside::Build => "cold `cargo build --release -p legion-ir`",
        }
    }
}

/// A load that runs beside a row until dropped.
enum Load {
    None,
    Busy { _spinning: BusyLoops },
    Build(Child),
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Load::Build(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_load(beside: Beside) -> Result<Load> {
    Ok(match beside {
        Beside::Nothing => Load::None,
        Beside::BusyLoops => Load::Busy {
            _spinning: BusyLoops::start(2),
        },
        Beside::Build => {
            let dir = PathBuf::from("target/calibration-build");
            let _ = std::fs::remove_dir_all(&dir);
            let child = Command::new(env!("CARGO"))
                .args(["build", "--release", "-p", "legion-ir", "--target-dir"])
                .arg(&dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting a cold build beside the demo")?;
            // Let the build get going before the demo starts.
            std::thread::sleep(Duration::from_secs(10));
            Load::Build(child)
        }
    })
}

/// One `legion demo` run of the stability table.
struct Row {
    /// Minutes after the first row's start.
    at_minutes: f64,
    beside: Beside,
    /// Per class in [`BOARD_CLASSES`] order, the emulated VGG-16 compute times, ms.
    classes: Vec<Vec<f64>>,
    predicted_ms: f64,
    measured_ms: f64,
    speedup: f64,
    host: Option<HostRates>,
    /// Whether the build was still running when the demo finished.
    load_lasted: bool,
}

fn stability(legion: &Path, opts: &Options) -> Result<Vec<Row>> {
    let origin = Instant::now();
    let gap = if opts.rows > 1 {
        opts.spread_minutes * 60.0 / (opts.rows - 1) as f64
    } else {
        0.0
    };
    let mut rows = vec![];
    for i in 0..opts.rows {
        let due = Duration::from_secs_f64(gap * i as f64);
        if let Some(wait) = due.checked_sub(origin.elapsed()) {
            eprintln!(
                "stability row {}: waiting {:.0} s",
                i + 1,
                wait.as_secs_f64()
            );
            std::thread::sleep(wait);
        }
        let beside = Beside::of_row(i);
        let at_minutes = origin.elapsed().as_secs_f64() / 60.0;
        eprintln!("stability row {}: legion demo, {}", i + 1, beside.name());
        let mut load = start_load(beside)?;
        let out = PathBuf::from(format!("target/calibration-demo/row-{}", i + 1));
        let text = legion_cmd(legion, &["demo", "--out", &out.to_string_lossy()])?;
        let load_lasted = match &mut load {
            Load::Build(child) => child.try_wait()?.is_none(),
            _ => true,
        };
        drop(load);
        let row = read_row(&out, at_minutes, beside, load_lasted)
            .with_context(|| format!("reading the demo's files in {}:\n{text}", out.display()))?;
        rows.push(row);
    }
    Ok(rows)
}

fn read_row(out: &Path, at_minutes: f64, beside: Beside, load_lasted: bool) -> Result<Row> {
    let results: RunResults =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json"))?)?;
    let plan = Plan::from_json(&std::fs::read_to_string(out.join("plan.json"))?)
        .map_err(anyhow::Error::msg)?;
    let classes = BOARD_CLASSES
        .iter()
        .map(|c| {
            let stem = c.name.split('-').next().unwrap_or(c.name);
            results
                .devices_alone
                .iter()
                .filter(|(name, _)| name.starts_with(stem))
                .map(|(_, us)| *us as f64 / 1e3)
                .collect()
        })
        .collect();
    let (_, single_us) = results
        .best_single_device
        .clone()
        .context("run.json has no best single device")?;
    Ok(Row {
        at_minutes,
        beside,
        classes,
        predicted_ms: plan.chosen().predicted_us as f64 / 1e3,
        measured_ms: results.median_us as f64 / 1e3,
        speedup: single_us as f64 / results.median_us.max(1) as f64,
        host: results.host_gflops,
        load_lasted,
    })
}

fn render(date: &str, load: &str, study: &Study, rows: &[Row], opts: &Options) -> Result<String> {
    let mut md = String::new();
    writeln!(
        md,
        "# Emulator calibration: do emulated boards keep their class's speed?\n"
    )?;
    writeln!(
        md,
        "Produced by `cargo xtask bench calibration` (dev profile: tract optimized) on \
         {date}, {}, load average {load} at the start.\n",
        host()
    )?;
    writeln!(
        md,
        "An emulated board's compute time is its tiles' host time x (host GFLOP/s / board \
         GFLOP/s). A board class's rate is `VGG16_FLOPS` over its published VGG-16 time; \
         the host's is calibrated on VGG-16 itself (`HostRate::calibrate`: VGG-16 in \
         rounds, every node timed, each node's fastest time summed; this run: {:.2} \
         GFLOP/s, in {:.0} s). A tile's host time is estimated the same way over its runs, \
         and a reference kernel of a few ms, read beside the tiles, follows the host's \
         speed from the calibration on (the fastest reading of the last 30 s counts).\n",
        study.base_gflops, study.calibration_s
    )?;
    writeln!(md, "## What moves on this host\n")?;
    writeln!(
        md,
        "VGG-16 (224x224) run {STUDY_ROUNDS} times on one thread in each condition, in \
         thread CPU time, with a reading of the reference kernel (fastest of 3 runs) \
         before each run. \"Within 5%\" counts the runs within 5% of the condition's \
         fastest. The estimate is the emulator's: each node's fastest time over the \
         runs so far, summed.\n"
    )?;
    writeln!(
        md,
        "| condition | VGG-16 run min / median / max ms | runs within 5% | estimate after 3 / 6 / {STUDY_ROUNDS} runs ms | reference min / median / max ms | steal ms |"
    )?;
    writeln!(md, "|---|---|---:|---|---|---:|")?;
    for p in &study.phases {
        let (min, med, max) = spread(&p.runs);
        let within = p.runs.iter().filter(|&&r| r <= min * 1.05).count();
        let (rmin, rmed, rmax) = spread(&p.reference);
        let est = |k: usize| p.estimates.get(k - 1).copied().unwrap_or(f64::NAN);
        writeln!(
            md,
            "| {} | {min:.0} / {med:.0} / {max:.0} | {within} of {} | {:.0} / {:.0} / {:.0} | {rmin:.2} / {rmed:.2} / {rmax:.2} | {:.0} |",
            p.name,
            p.runs.len(),
            est(3),
            est(6),
            est(STUDY_ROUNDS),
            p.steal_ms
        )?;
    }
    writeln!(
        md,
        "\nVGG-16 runs, ms: {}.\n",
        study
            .phases
            .iter()
            .map(|p| format!("{}: {}", p.name, list(&p.runs)))
            .collect::<Vec<_>>()
            .join("; ")
    )?;

    writeln!(
        md,
        "## Stability: `legion demo`, {} separate runs over {:.0} minutes\n",
        rows.len(),
        opts.spread_minutes
    )?;
    writeln!(
        md,
        "Each row is one `legion demo` (its own process: a new local cluster of 2 \
         emulated Firefly-RK3399 and 2 Odroid-XU4, calibrated at its start; VGG-16 \
         profiled, compiled and run). The class columns are the compute time of each \
         board running VGG-16 whole (`run.json`'s `devices_alone`: once, after a \
         warm-up); the targets are {}. Latency is the plan's median of 3 against its \
         predicted latency; the host column is the range of rates the boards scaled \
         with during the runs.\n",
        BOARD_CLASSES
            .iter()
            .map(|c| format!("{} ms for `{}`", c.vgg16_ms, c.name))
            .collect::<Vec<_>>()
            .join(" and ")
    )?;
    write!(md, "| # | minute | beside |")?;
    for c in BOARD_CLASSES {
        write!(md, " `{}` VGG-16 ms | error |", c.name)?;
    }
    writeln!(
        md,
        " predicted ms | measured ms | error | speedup | host GFLOP/s |"
    )?;
    write!(md, "|---:|---:|---|")?;
    for _ in BOARD_CLASSES {
        write!(md, "---|---:|")?;
    }
    writeln!(md, "---:|---:|---:|---:|---|")?;
    let mut failures = vec![];
    for (i, r) in rows.iter().enumerate() {
        let beside = if r.load_lasted {
            r.beside.name().to_string()
        } else {
            format!("{} (ended before the demo did)", r.beside.name())
        };
        write!(md, "| {} | {:.1} | {beside} |", i + 1, r.at_minutes)?;
        for (c, times) in BOARD_CLASSES.iter().zip(&r.classes) {
            let worst = times
                .iter()
                .map(|t| t / c.vgg16_ms - 1.0)
                .fold(0.0f64, |a, e| if e.abs() > a.abs() { e } else { a });
            if worst.abs() > CLASS_TOLERANCE {
                failures.push(format!(
                    "row {}: `{}` {:+.1}%",
                    i + 1,
                    c.name,
                    worst * 100.0
                ));
            }
            write!(md, " {} | {} |", list(times), pct(worst))?;
        }
        let error = r.predicted_ms / r.measured_ms - 1.0;
        if error.abs() > PREDICTION_TOLERANCE {
            failures.push(format!("row {}: predicted {}", i + 1, pct(error)));
        }
        let host = r.host.map_or("-".to_string(), |h| {
            format!("{:.1}-{:.1} ({:+.1}%)", h.min, h.max, h.moved() * 100.0)
        });
        writeln!(
            md,
            " {:.0} | {:.0} | {} | {:.2}x | {host} |",
            r.predicted_ms,
            r.measured_ms,
            pct(error),
            r.speedup
        )?;
    }
    writeln!(md, "\n## Verdict\n")?;
    if failures.is_empty() {
        writeln!(
            md,
            "Every row holds: each emulated board within ±{:.0}% of its class's VGG-16 \
             time, and the demo's predicted latency within ±{:.0}% of its measured one.",
            CLASS_TOLERANCE * 100.0,
            PREDICTION_TOLERANCE * 100.0
        )?;
    } else {
        writeln!(
            md,
            "**Out of bounds** (±{:.0}% on a class, ±{:.0}% on the prediction): {}.",
            CLASS_TOLERANCE * 100.0,
            PREDICTION_TOLERANCE * 100.0,
            failures.join("; ")
        )?;
    }
    Ok(md)
}

/// Min, median and max.
fn spread(xs: &[f64]) -> (f64, f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => (f64::NAN, f64::NAN, f64::NAN),
        n => (v[0], v[n / 2], v[n - 1]),
    }
}

fn list(xs: &[f64]) -> String {
    xs.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(x: f64) -> String {
    format!("{:+.1}%", x * 100.0)
}

/// Steal time of all CPUs so far, ms (`/proc/stat`, USER_HZ = 100).
fn steal_ms() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(8).map(str::to_string))
        })
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |jiffies| jiffies * 10.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
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
