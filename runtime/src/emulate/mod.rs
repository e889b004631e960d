//! Emulated boards: a worker on the host that stands in for an edge board.
//!
//! An emulated device has a compute rate ([`Emulation::gflops`]) and a link (bandwidth
//! and latency). Compute times are *measured and scaled*: the worker runs its tiles on
//! the host with tract, times every node of them, and scales the host time to the
//! device by the host's rate over the device's. A board class's rate comes from its
//! published VGG-16 time ([`BOARD_CLASSES`]) and the host's from timing VGG-16 itself
//! ([`HostRate::calibrate`]), so an emulated board runs VGG-16 in its class's time and
//! Firefly-class and Odroid-class devices keep their ratio on any host. Link times are
//! *modelled*, not measured: the coordinator accounts them from bytes,
//! [`Emulation::mbps`] and [`Emulation::latency_ms`].
//!
//! The host's speed moves (bursts of a neighbour's load, a floor that drifts over
//! minutes; see [`host`]), so a tile's host time is not one measurement: the emulator
//! keeps each node's fastest time over the tile's runs, scaled to the host's rate at
//! calibration by a reference kernel read beside the tiles ([`Emulator::run_tile`]).
//! Identical work then gets the same emulated time, whatever the host did meanwhile.
//!
//! Emulated compute is serialized on the host ([`ComputeLock`], an advisory file lock
//! shared by every emulator on the machine), so that N emulated workers on a few cores
//! do not slow each other down and distort their measured times. The measured time is
//! the computing thread's CPU time ([`thread_cpu_time`]), not the wall clock: tract
//! runs a tile on the calling thread, and whatever else the host runs (the coordinator,
//! other workers' decoding, a build) preempts it without adding to its CPU time.

pub mod cache;
mod clock;
pub mod host;
mod lock;

pub use clock::{run_nodes_timed, thread_cpu_time};
pub use host::{CALIBRATION_MODEL, HostRate, NodeTimes, catalog_model};
pub use legion_plan::{BOARD_CLASSES, BoardClass, Emulation, VGG16_FLOPS};
pub use lock::{COMPUTE_LOCK_ENV, ComputeGuard, ComputeLock};

use anyhow::{Context, Result, ensure};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tract_onnx::prelude::*;

/// FLOPs of one run of the `calibration` model of legion-models (VGG-16 at 112x112),
/// counted like [`VGG16_FLOPS`]: 2 per conv and FC MAC (3,876,405,248 MACs), window
/// elements for the pools. Checked against the import in `tests/emulate.rs`.
pub const DEVICE_RATE_FLOPS: f64 = 7_754_335_208.0;

/// Name of the legion-models model that [`measure_device_gflops`] times: a quarter of
/// VGG-16's work, light enough for a 2 GB board.
pub const DEVICE_RATE_MODEL: &str = "calibration";

/// Untimed runs of the device-rate model before the timed ones: in a fresh process the
/// first two or three runs are up to 50% slower (allocation, page faults).
const WARMUP_RUNS: usize = 3;

/// Timed runs of the device-rate model (after the warm-up runs); the fastest counts.
const DEVICE_RATE_RUNS: usize = 10;

/// `value`, the rate `what`, when it is positive and finite.
fn positive(what: &str, value: f64) -> Result<f64> {
    ensure!(
        value.is_finite() && value > 0.0,
        "{what} = {value} must be a positive finite number"
    );
    Ok(value)
}

/// The rate of a real worker, GFLOP/s: [`DEVICE_RATE_MODEL`] run 3 times to warm up and
/// 10 more times on a fixed input, [`DEVICE_RATE_FLOPS`] over the fastest, on the wall
/// clock as the worker times its tiles. It covers every thread of tract's current
/// default executor.
pub fn measure_device_gflops() -> Result<f64> {
    let (plan, input) = catalog_model(DEVICE_RATE_MODEL)?;
    let input = input.into_tvalue();
    let mut fastest = f64::INFINITY;
    for run in 0..WARMUP_RUNS + DEVICE_RATE_RUNS {
        let start = std::time::Instant::now();
        plan.run(tvec!(input.clone()))
            .context("running the device-rate model")?;
        if run >= WARMUP_RUNS {
            fastest = fastest.min(start.elapsed().as_secs_f64());
        }
    }
    Ok(DEVICE_RATE_FLOPS / fastest / 1e9)
}

/// A tile's first runs on a host: it runs at least this often before its time is
/// reported, and more until two runs in a row lower the estimate by less than
/// [`host::CONVERGED`].
pub const FIRST_RUNS: u32 = 3;

/// Runs of a tile after which one run per call is enough.
pub const SETTLED_RUNS: u32 = 8;

/// The emulated time of a tile run, and what it rests on.
#[derive(Clone, Copy, Debug)]
pub struct EmulatedTime {
    /// The tile's time on the emulated board.
    pub emulated: Duration,
    /// This call's last run as measured on the host (thread CPU time over its nodes).
    pub host: Duration,
    /// The host's rate at this call, GFLOP/s ([`HostRate::now`]).
    pub host_gflops: f64,
    /// Runs this call made (more than one while the tile's time settles).
    pub runs: u32,
}

/// An emulated device on this host: its [`Emulation`], the host's rate (shared with
/// the other emulators of the process, with the tiles' host times), and the lock that
/// serializes its compute with every other emulator's.
#[derive(Debug)]
pub struct Emulator {
    /// What is emulated.
    pub emulation: Emulation,
    host: Arc<HostRate>,
    lock: ComputeLock,
}

impl Emulator {
    /// Opens the compute lock (`lock_path`, else [`ComputeLock::default_path`]) and
    /// calibrates the host while holding it, once per process ([`HostRate::shared`]),
    /// so that workers starting together do not disturb each other's measurement.
    pub fn start(emulation: Emulation, lock_path: Option<PathBuf>) -> Result<Emulator> {
        let lock = ComputeLock::open(lock_path.unwrap_or_else(ComputeLock::default_path))?;
        let host = HostRate::shared(&lock)?;
        let emulator = Emulator::with_lock(emulation, host, lock)?;
        tracing::info!(
            "emulating {}: host {:.1} GFLOP/s, slowdown x{:.2}",
            emulator.emulation,
            emulator.host.base_gflops(),
            emulator.slowdown()
        );
        Ok(emulator)
    }

    /// An emulator on a given host rate (shared by the emulators of a local cluster, or
    /// fixed for tests); opens the lock like [`Emulator::start`].
    pub fn new(
        emulation: Emulation,
        host: Arc<HostRate>,
        lock_path: Option<PathBuf>,
    ) -> Result<Emulator> {
        let lock = ComputeLock::open(lock_path.unwrap_or_else(ComputeLock::default_path))?;
        Emulator::with_lock(emulation, host, lock)
    }

    /// Warns when the host is slower than the emulated board.
    fn with_lock(emulation: Emulation, host: Arc<HostRate>, lock: ComputeLock) -> Result<Emulator> {
        positive("emulated speed (GFLOP/s)", emulation.gflops)?;
        let host_gflops = host.base_gflops();
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
            host,
            lock,
        })
    }

    /// The host's rate this emulator scales with.
    pub fn host(&self) -> &HostRate {
        &self.host
    }

    /// Emulated time per host time at the host's base rate: the base rate over the
    /// device's. Above 1 when the emulated board is slower than the host.
    pub fn slowdown(&self) -> f64 {
        self.host.base_gflops() / self.emulation.gflops
    }

    /// The emulated duration of a host time at the base rate: `host x slowdown`.
    pub fn emulated(&self, host: Duration) -> Duration {
        host.mul_f64(self.slowdown())
    }

    /// Runs a tile holding the compute lock, and returns its output and emulated time.
    ///
    /// `run` runs the tile once and returns its output and the host time of each of its
    /// nodes ([`run_nodes_timed`] on [`thread_cpu_time`]); `key` names the tile (the
    /// same work, the same key); `bytes` is what it reads (weights and input strips):
    /// from [`cache::EVICT_ABOVE`] on, the host's caches are evicted before each run, as
    /// a board's would hold none of it in a plan. Each run's node times are scaled to
    /// the host's base rate by the rate at that run ([`HostRate::now`]), and the host
    /// keeps each node's fastest, over the runs of every emulator sharing it:
    /// interference only adds time, and a burst that slows one node does not count
    /// against the others. The emulated time is the sum of those fastest times x
    /// [`Emulator::slowdown`]. A tile runs at least [`FIRST_RUNS`] times on first use,
    /// and until two runs in a row lower its time by less than 1%, up to
    /// [`SETTLED_RUNS`] runs in all; later calls run it once, and again while a run
    /// lowers it by more than 1% (up to [`SETTLED_RUNS`]). The output is the last run's.
    pub fn run_tile<T>(
        &self,
        key: &str,
        bytes: u64,
        mut run: impl FnMut() -> Result<(T, Vec<Duration>)>,
    ) -> Result<(T, EmulatedTime)> {
        let _guard = self.lock.hold()?;
        let mut runs = 0;
        // Slow spells can last seconds: one run that lowers nothing is not enough.
        let mut quiet_runs = 0;
        loop {
            let host_gflops = self.host.now()?;
            self.host.evictor.before_run(bytes);
            let (output, nodes) = run()?;
            runs += 1;
            let mut tiles = self.host.tiles.lock().unwrap_or_else(|e| e.into_inner());
            let times = tiles.entry(key);
            let lowered = times.merge(&nodes, host_gflops / self.host.base_gflops());
            quiet_runs = if lowered <= host::CONVERGED {
                quiet_runs + 1
            } else {
                0
            };
            // A tile whose time has settled before this call needs only this run.
            let settled_before = runs == 1 && times.runs > FIRST_RUNS && lowered <= host::CONVERGED;
            let settled = times.runs >= SETTLED_RUNS
                || settled_before
                || (times.runs >= FIRST_RUNS && quiet_runs >= 2);
            if settled {
                let time = EmulatedTime {
                    emulated: self.emulated(times.total()),
                    host: nodes.iter().sum(),
                    host_gflops,
                    runs,
                };
                return Ok((output, time));
            }
        }
    }

    /// The path of the compute lock this emulator serializes on.
    pub fn lock_path(&self) -> &Path {
        self.lock.path()
    }
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

    /// A run of a made-up tile whose nodes took `ms` milliseconds each.
    fn nodes(ms: &[u64]) -> Result<((), Vec<Duration>)> {
        Ok(((), ms.iter().map(|&m| Duration::from_millis(m)).collect()))
    }

    #[test]
    fn a_tile_time_is_the_sum_of_its_nodes_fastest_times_scaled() {
        let path = lock_path("slowdown");
        let device = Emulation::custom(10.0, 100.0, 0.2).unwrap();
        let host = Arc::new(HostRate::fixed(40.0).unwrap());
        let emulator = Emulator::new(device, host, Some(path.clone())).unwrap();
        assert_eq!(emulator.slowdown(), 4.0);
        assert_eq!(
            emulator.emulated(Duration::from_millis(25)),
            Duration::from_millis(100)
        );
        // First use: the third and fourth runs lower nothing, so the time has settled.
        let mut runs = [vec![10, 20], vec![12, 15], vec![11, 25], vec![10, 16]].into_iter();
        let (_, t) = emulator
            .run_tile("tile", 0, || nodes(&runs.next().unwrap()))
            .unwrap();
        assert_eq!(runs.len(), 0);
        assert_eq!(t.runs, 4);
        assert_eq!(t.emulated, Duration::from_millis(100)); // (10 + 15) x 4
        assert_eq!(t.host, Duration::from_millis(26));
        assert_eq!(t.host_gflops, 40.0);
        // A run that lowers the time by more than 1% is followed by two that do not.
        let mut runs = [vec![9, 30], vec![20, 20], vec![20, 20]].into_iter();
        let (_, t) = emulator
            .run_tile("tile", 0, || nodes(&runs.next().unwrap()))
            .unwrap();
        assert_eq!(runs.len(), 0);
        assert_eq!((t.runs, t.emulated), (3, Duration::from_millis(96)));
        // A slow run changes nothing; another tile has its own times.
        let (_, t) = emulator.run_tile("tile", 0, || nodes(&[50, 50])).unwrap();
        assert_eq!((t.runs, t.emulated), (1, Duration::from_millis(96)));
        let (_, t) = emulator.run_tile("other", 0, || nodes(&[5])).unwrap();
        assert_eq!(t.emulated, Duration::from_millis(20));
        // After SETTLED_RUNS runs, one run per call even when it lowers the time.
        for _ in 0..SETTLED_RUNS {
            emulator.run_tile("other", 0, || nodes(&[5])).unwrap();
        }
        let (_, t) = emulator.run_tile("other", 0, || nodes(&[4])).unwrap();
        assert_eq!((t.runs, t.emulated), (1, Duration::from_millis(16)));

        // A host slower than the board: emulated times are shorter (with a warning).
        let fast = Emulation::class("firefly-rk3399").unwrap();
        let host = Arc::new(HostRate::fixed(fast.gflops / 2.0).unwrap());
        let emulator = Emulator::new(fast, host, Some(path.clone())).unwrap();
        assert_eq!(emulator.slowdown(), 0.5);
        assert_eq!(
            emulator.emulated(Duration::from_millis(100)),
            Duration::from_millis(50)
        );

        let e = HostRate::fixed(0.0).unwrap_err();
        assert!(e.to_string().contains("host rate"), "{e}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn emulators_on_one_host_share_a_tiles_host_time() {
        let path = lock_path("shared-host");
        let host = Arc::new(HostRate::fixed(40.0).unwrap());
        let board = |gflops| Emulation::custom(gflops, 100.0, 0.2).unwrap();
        let fast = Emulator::new(board(20.0), host.clone(), Some(path.clone())).unwrap();
        let slow = Emulator::new(board(10.0), host, Some(path.clone())).unwrap();
        let mut runs = [vec![10], vec![8], vec![9], vec![9]].into_iter();
        let (_, t) = fast
            .run_tile("tile", 0, || nodes(&runs.next().unwrap()))
            .unwrap();
        assert_eq!((t.runs, t.emulated), (4, Duration::from_millis(16))); // 8 x 2
        // The tile's host time is settled: the slower board runs it once, and a slow
        // run does not count against it.
        let (_, t) = slow.run_tile("tile", 0, || nodes(&[30])).unwrap();
        assert_eq!((t.runs, t.emulated), (1, Duration::from_millis(32))); // 8 x 4
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn node_times_scale_with_the_host_rate_of_their_run() {
        let mut times = NodeTimes::default();
        assert_eq!(times.merge(&[Duration::from_millis(100)], 1.0), 1.0);
        // The host ran at half its base rate: 180 ms there is 90 ms at the base rate.
        let lowered = times.merge(&[Duration::from_millis(180)], 0.5);
        assert!((lowered - 0.1).abs() < 1e-9, "{lowered}");
        assert_eq!(times.total(), Duration::from_millis(90));
        assert_eq!(times.runs, 2);
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
            let host = Arc::new(HostRate::fixed(50.0).unwrap());
            let emulator = Emulator::new(device, host, Some(path.clone())).unwrap();
            // Settled: every later call runs the tile once.
            emulator.run_tile("tile", 0, || nodes(&[1])).unwrap();
            Arc::new(emulator)
        };
        let intervals = record_two_threads([emulator(), emulator()], |emulator, f| {
            emulator
                .run_tile("tile", 0, || {
                    f();
                    nodes(&[1])
                })
                .unwrap();
        });
        assert_disjoint(intervals);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn calibrates_the_host_and_follows_it() {
        let host = HostRate::calibrate().unwrap();
        let base = host.base_gflops();
        let now = host.now().unwrap();
        println!("host: {base:.1} GFLOP/s at calibration, {now:.1} now");
        assert!(base.is_finite() && base > 0.0);
        // Right after calibration the floor cannot have moved far.
        assert!(now > base * 0.5 && now < base * 2.0, "{base} then {now}");
    }
}
