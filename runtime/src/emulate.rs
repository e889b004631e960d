//! Emulated boards: a worker on the host that stands in for an edge board.
//!
//! An emulated device has a compute rate ([`Emulation::gflops`]) and a link (bandwidth
//! and latency). Compute times are *measured and scaled*: the worker runs its tiles on
//! the host with tract, times them, and multiplies the measured time by the
//! [`Emulator::slowdown`], the host's rate over the device's. The host rate is
//! measured once at start ([`measure_host_gflops`], on the fixed `calibration` model of
//! legion-models); a board class's rate comes from its published VGG-16 time
//! ([`BOARD_CLASSES`]), so Firefly-class and Odroid-class devices keep their ratio on
//! any host. Link times are *modelled*, not measured: the coordinator accounts them
//! from bytes, [`Emulation::mbps`] and [`Emulation::latency_ms`].
//!
//! Emulated compute is serialized on the host ([`ComputeLock`], an advisory file lock
//! shared by every emulator on the machine), so that N emulated workers on a few cores
//! do not slow each other down and distort their measured times. The measured time is
//! the computing thread's CPU time ([`thread_cpu_time`]), not the wall clock: tract
//! runs a tile on the calling thread, and whatever else the host runs (the coordinator,
//! other workers' decoding, a build) preempts it without adding to its CPU time. With
//! two busy loops on this 2-core host, VGG-16 tiles took 1.4-2x longer on the wall
//! clock and 0-5% longer in CPU time.

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tract_onnx::prelude::*;

/// A class of edge board, defined by how long it takes to run VGG-16.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoardClass {
    /// Name accepted by [`Emulation::from_str`], e.g. `firefly-rk3399`.
    pub name: &'static str,
    /// Milliseconds for one VGG-16 inference (224x224, batch 1, with the FC head).
    pub vgg16_ms: f64,
    /// Link bandwidth, Mbit/s.
    pub mbps: f64,
    /// Link latency, one way, milliseconds.
    pub latency_ms: f64,
    /// Where `vgg16_ms` comes from.
    pub source: &'static str,
}

impl BoardClass {
    /// The class's compute rate in GFLOP/s: [`VGG16_FLOPS`] over `vgg16_ms`.
    pub fn gflops(&self) -> f64 {
        VGG16_FLOPS / (self.vgg16_ms / 1000.0) / 1e9
    }
}

/// The board classes a worker can emulate by name.
pub const BOARD_CLASSES: &[BoardClass] = &[
    BoardClass {
        name: "firefly-rk3399",
        vgg16_ms: 970.0,
        mbps: 100.0,
        latency_ms: 0.2,
        source: "TVM's published ARM CPU benchmark, VGG-16 on Firefly-RK3399",
    },
    BoardClass {
        name: "odroid-xu4",
        vgg16_ms: 1400.0,
        mbps: 100.0,
        latency_ms: 0.2,
        source: "assumption: no published figure",
    },
];

/// FLOPs of one VGG-16 inference as Legion counts them: `legion inspect`'s total, the
/// sum of `Stage::flops` over every stage of the imported `vgg16` model of
/// legion-models. That is 2 per multiply-accumulate of the convs (30,693,261,312) and
/// the FC layers (247,267,328), one per pooled window element (6,121,472) and one per
/// softmax element (1,000); Relus and biases fuse into their stages. Checked against
/// the import in `tests/emulate.rs`.
pub const VGG16_FLOPS: f64 = 30_946_651_112.0;

/// FLOPs of one run of the `calibration` model of legion-models (VGG-16 at 112x112),
/// counted like [`VGG16_FLOPS`]: 2 per conv and FC MAC (3,876,405,248 MACs), window
/// elements for the pools. Checked against the import in `tests/emulate.rs`, so host
/// and board rates are on the same scale.
pub const CALIBRATION_FLOPS: f64 = 7_754_335_208.0;

/// Name of the legion-models model that [`measure_host_gflops`] times.
pub const CALIBRATION_MODEL: &str = "calibration";

/// Untimed runs of the calibration model before the timed ones: in a fresh process the
/// first two or three runs are up to 50% slower (allocation, page faults), so one is
/// not enough.
const WARMUP_RUNS: usize = 3;

/// Timed runs of the calibration model (after the warm-up runs); the fastest counts.
const CALIBRATION_RUNS: usize = 10;

/// What a worker emulates: a compute rate and a link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Emulation {
    /// The board class this came from, if any (`None` for an explicit key list).
    pub class: Option<String>,
    /// The device's compute rate, GFLOP/s (FLOPs counted like [`VGG16_FLOPS`]).
    pub gflops: f64,
    /// Link bandwidth, Mbit/s.
    pub mbps: f64,
    /// Link latency, one way, milliseconds.
    pub latency_ms: f64,
}

/// The syntax accepted by [`Emulation::from_str`], for error messages.
fn syntax() -> String {
    let names: Vec<_> = BOARD_CLASSES.iter().map(|c| c.name).collect();
    format!(
        "expected a board class ({}) or `speed=GFLOPS,mbps=MBITS,latency_ms=MS` \
         (all three keys, any order, positive numbers; speed in GFLOP/s)",
        names.join(", ")
    )
}

/// Checks that `value` (the value of key `key`) is positive and finite.
fn positive(key: &str, value: f64) -> Result<f64> {
    ensure!(
        value.is_finite() && value > 0.0,
        "{key}={value} must be a positive finite number"
    );
    Ok(value)
}

impl Emulation {
    /// The emulation of board class `name` (see [`BOARD_CLASSES`]); the error for an
    /// unknown name lists the valid ones.
    pub fn class(name: &str) -> Result<Emulation> {
        let class = BOARD_CLASSES
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("unknown board class {name:?}; {}", syntax()))?;
        Ok(Emulation {
            class: Some(class.name.to_string()),
            gflops: class.gflops(),
            mbps: class.mbps,
            latency_ms: class.latency_ms,
        })
    }

    /// An emulation with explicit numbers (no class); each must be positive and finite.
    pub fn custom(gflops: f64, mbps: f64, latency_ms: f64) -> Result<Emulation> {
        Ok(Emulation {
            class: None,
            gflops: positive("speed", gflops)?,
            mbps: positive("mbps", mbps)?,
            latency_ms: positive("latency_ms", latency_ms)?,
        })
    }
}

impl FromStr for Emulation {
    type Err = anyhow::Error;

    /// Parses a board class name (`firefly-rk3399`) or a key list
    /// `speed=X,mbps=Y,latency_ms=Z` (speed in GFLOP/s; all three keys required, in
    /// any order, each once, positive and finite).
    fn from_str(s: &str) -> Result<Emulation> {
        let s = s.trim();
        if !s.contains('=') {
            return Emulation::class(s);
        }
        let mut values: [Option<f64>; 3] = [None; 3];
        const KEYS: [&str; 3] = ["speed", "mbps", "latency_ms"];
        for part in s.split(',') {
            let Some((key, value)) = part.split_once('=') else {
                bail!("{part:?} in {s:?} is not KEY=VALUE; {}", syntax());
            };
            let (key, value) = (key.trim(), value.trim());
            let Some(i) = KEYS.iter().position(|k| *k == key) else {
                bail!("unknown key {key:?} in {s:?}; {}", syntax());
            };
            ensure!(
                values[i].is_none(),
                "key {key:?} given twice in {s:?}; {}",
                syntax()
            );
            let number: f64 = value
                .parse()
                .with_context(|| format!("{key}={value:?} in {s:?} is not a number"))?;
            values[i] = Some(positive(key, number)?);
        }
        let missing: Vec<_> = KEYS
            .iter()
            .zip(values)
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| *k)
            .collect();
        ensure!(
            missing.is_empty(),
            "missing {} in {s:?}; {}",
            missing.join(", "),
            syntax()
        );
        let [Some(gflops), Some(mbps), Some(latency_ms)] = values else {
            unreachable!("every key is present");
        };
        Emulation::custom(gflops, mbps, latency_ms)
    }
}

impl fmt::Display for Emulation {
    /// `firefly-rk3399 (31.9 GFLOP/s, 100 Mbit/s, 0.2 ms)`, or without the class name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(class) = &self.class {
            write!(f, "{class} ")?;
        }
        write!(
            f,
            "({:.1} GFLOP/s, {} Mbit/s, {} ms)",
            self.gflops, self.mbps, self.latency_ms
        )
    }
}

/// Measures the host's rate in GFLOP/s: imports the `calibration` model with
/// tract, optimizes it, runs it 3 times to warm up and 10 more times on a fixed input,
/// and divides [`CALIBRATION_FLOPS`] by the fastest of the 10 timed runs, timed in the
/// thread's CPU time like [`Emulator::run`].
///
/// The rate is that of tract's current default executor, single-threaded in the
/// emulating processes (their work happens on the calling thread). Takes a few
/// seconds; callers that share the host should hold the [`ComputeLock`]
/// ([`Emulator::start`] does).
pub fn measure_host_gflops() -> Result<f64> {
    calibration_rate(thread_cpu_time)
}

/// The rate of a real worker, GFLOP/s: [`measure_host_gflops`]'s runs timed on the
/// wall clock, as the worker times its tiles. It covers every thread of tract's
/// current default executor.
pub fn measure_device_gflops() -> Result<f64> {
    let origin = std::time::Instant::now();
    calibration_rate(|| Ok(origin.elapsed()))
}

/// The calibration runs of [`measure_host_gflops`], each timed by two readings of
/// `clock`.
fn calibration_rate(clock: impl Fn() -> Result<Duration>) -> Result<f64> {
    let bytes = legion_models::bytes(CALIBRATION_MODEL)?;
    let shape = legion_models::spec(CALIBRATION_MODEL)?.input_shape;
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .context("building the calibration model with tract")?;
    let input = crate::check::test_input(&shape).into_tvalue();
    let mut times = Vec::with_capacity(CALIBRATION_RUNS);
    for run in 0..WARMUP_RUNS + CALIBRATION_RUNS {
        let start = clock()?;
        plan.run(tvec!(input.clone()))
            .context("running the calibration model")?;
        let took = clock()?.saturating_sub(start);
        if run >= WARMUP_RUNS {
            times.push(took.as_secs_f64());
        }
    }
    // The fastest run: on a shared host, slow runs come in bursts that a median of 5
    // does not always filter out (19-32 GFLOP/s were seen on one host).
    let fastest = times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(CALIBRATION_FLOPS / fastest / 1e9)
}

/// Environment variable that overrides [`ComputeLock::default_path`].
pub const COMPUTE_LOCK_ENV: &str = "LEGION_COMPUTE_LOCK";

/// The host-wide lock that serializes emulated compute: an exclusive advisory lock
/// (`flock`) on a file, plus a mutex for callers sharing one `ComputeLock` in a process.
///
/// A file lock belongs to an open file description, so every `ComputeLock` opens the
/// file itself: two locks on the same path exclude each other whether they live in two
/// processes or in one.
#[derive(Debug)]
pub struct ComputeLock {
    path: PathBuf,
    file: File,
    local: Mutex<()>,
}

/// Holds a [`ComputeLock`] until dropped.
#[must_use = "the lock is released when the guard is dropped"]
pub struct ComputeGuard<'a> {
    file: &'a File,
    _local: MutexGuard<'a, ()>,
}

impl Drop for ComputeGuard<'_> {
    fn drop(&mut self) {
        // Closing the file would release it too; unlocking here frees it for the next
        // holder now. The mutex is released after this body, when the fields drop.
        if let Err(e) = self.file.unlock() {
            tracing::warn!("releasing the emulated-compute lock: {e}");
        }
    }
}

impl ComputeLock {
    /// `$LEGION_COMPUTE_LOCK` if set, else `legion-emulated-compute.lock` in the
    /// system's temporary directory.
    pub fn default_path() -> PathBuf {
        std::env::var_os(COMPUTE_LOCK_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("legion-emulated-compute.lock"))
    }

    /// Opens (creating it if needed) the lock file at `path`; does not lock it.
    pub fn open(path: impl AsRef<Path>) -> Result<ComputeLock> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| {
                format!(
                    "opening the emulated-compute lock {} (set {COMPUTE_LOCK_ENV} to move it)",
                    path.display()
                )
            })?;
        Ok(ComputeLock {
            path,
            file,
            local: Mutex::new(()),
        })
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blocks until this process's thread holds the lock exclusively; released when the
    /// guard drops.
    pub fn hold(&self) -> Result<ComputeGuard<'_>> {
        // The mutex guards no data, so a panic while holding it leaves nothing broken.
        let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        self.file.lock().with_context(|| {
            format!("locking the emulated-compute lock {}", self.path.display())
        })?;
        Ok(ComputeGuard {
            file: &self.file,
            _local: local,
        })
    }
}

/// An emulated device on this host: its [`Emulation`], the measured host rate, and the
/// lock that serializes its compute with every other emulator's.
#[derive(Debug)]
pub struct Emulator {
    /// What is emulated.
    pub emulation: Emulation,
    /// The host's rate, GFLOP/s, as measured by [`measure_host_gflops`].
    pub host_gflops: f64,
    lock: ComputeLock,
}

impl Emulator {
    /// Opens the compute lock (`lock_path`, else [`ComputeLock::default_path`]) and
    /// measures the host rate while holding it, so that workers starting together do
    /// not disturb each other's measurement. Warns when the host is slower than the
    /// emulated board.
    pub fn start(emulation: Emulation, lock_path: Option<PathBuf>) -> Result<Emulator> {
        let lock = ComputeLock::open(lock_path.unwrap_or_else(ComputeLock::default_path))?;
        let host_gflops = {
            let _guard = lock.hold()?;
            measure_host_gflops().context("measuring the host's rate")?
        };
        let emulator = Emulator::with_lock(emulation, host_gflops, lock)?;
        tracing::info!(
            "emulating {}: host {:.1} GFLOP/s, slowdown x{:.2}",
            emulator.emulation,
            host_gflops,
            emulator.slowdown()
        );
        Ok(emulator)
    }

    /// An emulator with a given host rate instead of a measured one (for tests, or to
    /// reuse a rate measured earlier); opens the lock like [`Emulator::start`]. Warns
    /// when the host is slower than the emulated board.
    pub fn with_host_rate(
        emulation: Emulation,
        host_gflops: f64,
        lock_path: Option<PathBuf>,
    ) -> Result<Emulator> {
        let lock = ComputeLock::open(lock_path.unwrap_or_else(ComputeLock::default_path))?;
        Emulator::with_lock(emulation, host_gflops, lock)
    }

    fn with_lock(emulation: Emulation, host_gflops: f64, lock: ComputeLock) -> Result<Emulator> {
        positive("host rate (GFLOP/s)", host_gflops)?;
        positive("emulated speed (GFLOP/s)", emulation.gflops)?;
        if host_gflops < emulation.gflops {
            tracing::warn!(
                "this host ({host_gflops:.1} GFLOP/s) is SLOWER than the emulated board {} \
                 ({:.1} GFLOP/s): emulated compute times will be SHORTER than the measured \
                 ones (scaled by host/device = x{:.2}), and every emulated result rests on \
                 that extrapolation",
                emulation.class.as_deref().unwrap_or("(custom)"),
                emulation.gflops,
                host_gflops / emulation.gflops
            );
        }
        Ok(Emulator {
            emulation,
            host_gflops,
            lock,
        })
    }

    /// Emulated time per host time: the host rate over the device's. Above 1 when the
    /// emulated board is slower than the host.
    pub fn slowdown(&self) -> f64 {
        self.host_gflops / self.emulation.gflops
    }

    /// The emulated duration of a host-measured one: `measured x slowdown`.
    pub fn emulated(&self, measured: Duration) -> Duration {
        measured.mul_f64(self.slowdown())
    }

    /// Runs `f` while holding the compute lock and returns its result, the measured host
    /// time (this thread's CPU time, [`thread_cpu_time`]), and the emulated time
    /// (measured x [`Emulator::slowdown`]).
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<(T, Duration, Duration)> {
        let guard = self.lock.hold()?;
        let start = thread_cpu_time()?;
        let out = f();
        let measured = thread_cpu_time()?.saturating_sub(start);
        drop(guard);
        Ok((out, measured, self.emulated(measured)))
    }

    /// The path of the compute lock this emulator serializes on.
    pub fn lock_path(&self) -> &Path {
        self.lock.path()
    }
}

/// The CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> Result<Duration> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write to, and the clock id is a constant the
    // kernel knows; clock_gettime writes nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    ensure!(
        rc == 0,
        "this system cannot time a thread's CPU use (clock_gettime(CLOCK_THREAD_CPUTIME_ID): \
         {}), which emulated compute is timed on; run the worker without --emulate",
        std::io::Error::last_os_error()
    );
    Ok(Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};
    use std::thread;
    use std::time::Instant;

    /// A lock path unique to this test process and `name`.
    fn lock_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "legion-emulate-test-{}-{name}.lock",
            std::process::id()
        ))
    }

    fn err(s: &str) -> String {
        format!("{:#}", s.parse::<Emulation>().unwrap_err())
    }

    #[test]
    fn parses_class_names() {
        let e: Emulation = "firefly-rk3399".parse().unwrap();
        assert_eq!(e.class.as_deref(), Some("firefly-rk3399"));
        assert_eq!((e.mbps, e.latency_ms), (100.0, 0.2));
        assert_eq!(e.gflops, VGG16_FLOPS / 0.97 / 1e9);
        assert_eq!(e, Emulation::class("firefly-rk3399").unwrap());
        let o: Emulation = " odroid-xu4 ".parse().unwrap();
        assert_eq!(o.class.as_deref(), Some("odroid-xu4"));
        assert_eq!(o.gflops, VGG16_FLOPS / 1.4 / 1e9);
    }

    #[test]
    fn parses_key_lists_in_any_order() {
        let want = Emulation {
            class: None,
            gflops: 12.5,
            mbps: 100.0,
            latency_ms: 0.5,
        };
        assert_eq!(
            "speed=12.5,mbps=100,latency_ms=0.5"
                .parse::<Emulation>()
                .unwrap(),
            want
        );
        assert_eq!(
            "latency_ms=0.5, speed = 12.5 ,mbps=1e2"
                .parse::<Emulation>()
                .unwrap(),
            want
        );
    }

    #[test]
    fn errors_name_the_problem_and_the_syntax() {
        let syntax = [
            "firefly-rk3399, odroid-xu4",
            "speed=",
            "mbps=",
            "latency_ms=",
        ];
        for (input, what) in [
            ("raspberry-pi", "unknown board class \"raspberry-pi\""),
            ("", "unknown board class \"\""),
            ("speed=10,mbps=100", "missing latency_ms"),
            ("mbps=100", "missing speed, latency_ms"),
            (
                "speed=10,mbps=100,latency_ms=1,gpu=1",
                "unknown key \"gpu\"",
            ),
            (
                "speed=10,speed=20,mbps=1,latency_ms=1",
                "key \"speed\" given twice",
            ),
            ("speed=10,mbps=100,latency_ms", "\"latency_ms\" in"),
        ] {
            let e = err(input);
            assert!(e.contains(what), "{input:?}: {e}");
            for s in syntax {
                assert!(e.contains(s), "{input:?} does not mention {s:?}: {e}");
            }
        }
        assert!(err("speed=fast,mbps=1,latency_ms=1").contains("speed=\"fast\""));
        for bad in ["0", "-1", "inf", "NaN"] {
            let e = err(&format!("speed=10,mbps={bad},latency_ms=1"));
            assert!(e.contains("positive finite"), "{bad}: {e}");
        }
    }

    #[test]
    fn class_rates_keep_the_published_ratio() {
        let firefly = Emulation::class("firefly-rk3399").unwrap();
        let odroid = Emulation::class("odroid-xu4").unwrap();
        let ratio = firefly.gflops / odroid.gflops;
        assert!((ratio - 1400.0 / 970.0).abs() < 1e-12, "{ratio}");
        for class in BOARD_CLASSES {
            assert_eq!(Emulation::class(class.name).unwrap().gflops, class.gflops());
        }
    }

    #[test]
    fn serde_round_trip() {
        let e = Emulation::class("odroid-xu4").unwrap();
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Emulation>(&json).unwrap(), e);
        assert_eq!(
            e.to_string(),
            "odroid-xu4 (22.1 GFLOP/s, 100 Mbit/s, 0.2 ms)"
        );
    }

    #[test]
    fn slowdown_scales_measured_times() {
        let path = lock_path("slowdown");
        let device = Emulation::custom(10.0, 100.0, 0.2).unwrap();
        let emulator = Emulator::with_host_rate(device, 40.0, Some(path.clone())).unwrap();
        assert_eq!(emulator.slowdown(), 4.0);
        assert_eq!(
            emulator.emulated(Duration::from_millis(25)),
            Duration::from_millis(100)
        );
        let (value, measured, emulated) = emulator.run(|| 7).unwrap();
        assert_eq!(value, 7);
        assert_eq!(emulated, measured.mul_f64(4.0));

        // A host slower than the board: emulated times are shorter (with a warning).
        let fast = Emulation::class("firefly-rk3399").unwrap();
        let host = fast.gflops / 2.0;
        let emulator = Emulator::with_host_rate(fast, host, Some(path.clone())).unwrap();
        assert_eq!(emulator.slowdown(), 0.5);
        assert_eq!(
            emulator.emulated(Duration::from_millis(100)),
            Duration::from_millis(50)
        );

        let device = Emulation::custom(10.0, 100.0, 0.2).unwrap();
        let e = Emulator::with_host_rate(device, 0.0, Some(path.clone())).unwrap_err();
        assert!(e.to_string().contains("host rate"), "{e}");
        std::fs::remove_file(path).unwrap();
    }

    /// Asserts that no two of `intervals` overlap.
    fn assert_disjoint(mut intervals: Vec<(Instant, Instant)>) {
        intervals.sort();
        for pair in intervals.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "overlapping holds: {pair:?}");
        }
    }

    /// Runs `hold` `ROUNDS` times on each of two threads, recording the held intervals.
    fn record_two_threads<L: Send + Sync + 'static>(
        locks: [Arc<L>; 2],
        hold: fn(&L, &mut dyn FnMut()),
    ) -> Vec<(Instant, Instant)> {
        const ROUNDS: usize = 20;
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = locks
            .into_iter()
            .map(|lock| {
                let barrier = barrier.clone();
                thread::spawn(move || {
                    barrier.wait();
                    let mut intervals = vec![];
                    for _ in 0..ROUNDS {
                        hold(&lock, &mut || {
                            let start = Instant::now();
                            thread::sleep(Duration::from_millis(2));
                            intervals.push((start, Instant::now()));
                        });
                    }
                    intervals
                })
            })
            .collect();
        let intervals: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(intervals.len(), 2 * ROUNDS);
        intervals
    }

    #[test]
    fn two_locks_on_one_path_never_overlap() {
        let path = lock_path("two-locks");
        let locks = [
            Arc::new(ComputeLock::open(&path).unwrap()),
            Arc::new(ComputeLock::open(&path).unwrap()),
        ];
        let intervals = record_two_threads(locks, |lock, f| {
            let _guard = lock.hold().unwrap();
            f();
        });
        assert_disjoint(intervals);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn one_lock_shared_by_two_threads_never_overlaps() {
        let path = lock_path("shared-lock");
        let lock = Arc::new(ComputeLock::open(&path).unwrap());
        let intervals = record_two_threads([lock.clone(), lock], |lock, f| {
            let _guard = lock.hold().unwrap();
            f();
        });
        assert_disjoint(intervals);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn two_emulators_never_run_at_once() {
        let path = lock_path("emulators");
        let emulator = || {
            let device = Emulation::class("odroid-xu4").unwrap();
            Arc::new(Emulator::with_host_rate(device, 50.0, Some(path.clone())).unwrap())
        };
        let intervals = record_two_threads([emulator(), emulator()], |emulator, f| {
            emulator.run(f).unwrap();
        });
        assert_disjoint(intervals);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn measures_the_host_rate() {
        let path = lock_path("measure");
        let emulator = Emulator::start(
            Emulation::class("firefly-rk3399").unwrap(),
            Some(path.clone()),
        )
        .unwrap();
        println!(
            "host: {:.1} GFLOP/s; emulating {}: slowdown x{:.2}",
            emulator.host_gflops,
            emulator.emulation,
            emulator.slowdown()
        );
        assert!(emulator.host_gflops.is_finite() && emulator.host_gflops > 0.0);
        std::fs::remove_file(path).unwrap();
    }
}
