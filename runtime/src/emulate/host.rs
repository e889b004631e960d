//! The host's rate: calibrated once on VGG-16, then followed with a short reference
//! kernel while emulated boards run.
//!
//! On a shared VM the host's speed is not a constant. Two things move, measured with
//! `cargo xtask bench calibration` (bench/calibration.md):
//! - **bursts**: for stretches of a few hundred ms to about 10 s a neighbour slows this
//!   core down (no steal time is reported; thread CPU time grows). A 1 s VGG-16 run took 1.0-2.0 s,
//!   only 6% of runs came within 5% of the fastest. Short kernels are hit less often,
//!   so the emulator times every node of a tile and keeps each node's fastest time
//!   ([`super::Emulator::run_tile`]);
//! - **the floor**, the speed between bursts, which can move over minutes. It is
//!   followed by timing a reference kernel of a few ms ([`HostRate::now`]) beside the
//!   tiles, at most once per [`SAMPLE_EVERY`], the fastest reading of the last
//!   [`WINDOW`] counting.

use super::cache::CacheEvictor;
use super::clock::{run_nodes_timed, thread_cpu_time};
use super::{VGG16_FLOPS, positive};
use anyhow::{Context, Result};
use legion_models::{Conv, GraphBuilder};
use prost::Message;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tract_onnx::prelude::*;

/// The model that defines the board classes' speeds, timed to calibrate the host.
pub const CALIBRATION_MODEL: &str = "vgg16";

/// Timed rounds of the calibration (each a reference reading and a VGG-16 run) at least.
const CALIBRATION_ROUNDS: usize = 6;

/// Timed rounds of the calibration at most.
const MAX_CALIBRATION_ROUNDS: usize = 15;

/// An estimate has converged when a run lowers it by less than this fraction.
pub const CONVERGED: f64 = 0.01;

/// Runs of the reference kernel per reading; the fastest counts.
const REFERENCE_RUNS: usize = 3;

/// The reference kernel is read again before a tile when its last reading is older.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The host's floor is the fastest reading of the reference kernel in this window.
pub const WINDOW: Duration = Duration::from_secs(30);

/// Model `name` of legion-models, optimized and runnable with tract on the current
/// default executor, and the fixed input it is timed on.
pub fn catalog_model(name: &str) -> Result<(Arc<TypedSimplePlan>, Tensor)> {
    let bytes = legion_models::bytes(name)?;
    let plan = runnable(&bytes).with_context(|| format!("building {name} with tract"))?;
    let input = crate::check::test_input(&legion_models::spec(name)?.input_shape);
    Ok((plan, input))
}

/// The ONNX model `bytes`, optimized and runnable with tract.
fn runnable(bytes: &[u8]) -> TractResult<Arc<TypedSimplePlan>> {
    tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])?
        .into_optimized()?
        .into_runnable()
}

/// The emulator's reference kernel: two 3x3 convolutions of 64 channels on a 28x28 map
/// with Relus (0.12 GFLOP, a few ms), built with tract like a tile.
struct ReferenceKernel {
    plan: Arc<TypedSimplePlan>,
    input: Tensor,
}

impl ReferenceKernel {
    fn build() -> Result<ReferenceKernel> {
        let shape = [1, 64, 28, 28];
        let mut b = GraphBuilder::new("legion-reference-kernel");
        let x = b.input("input", &shape);
        let x = b.conv("conv1", &x, Conv::new(64, 3));
        let x = b.relu("relu1", &x);
        let x = b.conv("conv2", &x, Conv::new(64, 3));
        let y = b.relu("relu2", &x);
        let bytes = b
            .finish("the emulator's reference kernel", &[&y])
            .encode_to_vec();
        let plan =
            runnable(&bytes).context("building the emulator's reference kernel with tract")?;
        Ok(ReferenceKernel {
            plan,
            input: crate::check::test_input(&shape),
        })
    }

    /// One reading: the fastest of [`REFERENCE_RUNS`] runs, in thread CPU time.
    fn read(&self) -> Result<Duration> {
        let mut fastest = Duration::MAX;
        for _ in 0..REFERENCE_RUNS {
            let start = thread_cpu_time()?;
            self.plan
                .run(tvec!(self.input.clone().into_tvalue()))
                .context("running the emulator's reference kernel")?;
            fastest = fastest.min(thread_cpu_time()?.saturating_sub(start));
        }
        Ok(fastest)
    }
}

/// How the host's rate is followed after calibration.
struct Tracker {
    kernel: ReferenceKernel,
    /// The reference kernel's time when the host ran at the base rate.
    base: Duration,
    /// Recent readings, oldest first: when, and the time.
    readings: Mutex<VecDeque<(Instant, Duration)>>,
}

/// The host's rate in GFLOP/s (FLOPs counted like [`VGG16_FLOPS`]), as emulated boards
/// scale their compute with: a base rate, and, unless fixed, a reference kernel that
/// follows the host's speed from there; and the host times of the tiles run on it.
/// Shared by the emulators of a process.
pub struct HostRate {
    base_gflops: f64,
    tracker: Option<Tracker>,
    /// The fastest node times of the tiles run on this host, at the base rate, by tile
    /// key: a tile's host time does not depend on the board it is scaled to, so every
    /// emulator sharing this host adds to the same estimate.
    pub(super) tiles: Mutex<TileTimes>,
    /// Evicts the host's caches before timed runs, one buffer for the process.
    pub(super) evictor: CacheEvictor,
}

impl std::fmt::Debug for HostRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRate")
            .field("base_gflops", &self.base_gflops)
            .field("tracked", &self.tracker.is_some())
            .finish()
    }
}

impl HostRate {
    /// This process's calibration ([`HostRate::calibrate`]), made on first use while
    /// holding `lock`, and shared by every emulator of the process after that.
    pub fn shared(lock: &super::ComputeLock) -> Result<Arc<HostRate>> {
        static SHARED: Mutex<Option<Arc<HostRate>>> = Mutex::new(None);
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(host) = &*shared {
            return Ok(host.clone());
        }
        let host = {
            let _held = lock.hold()?;
            Arc::new(HostRate::calibrate().context("calibrating the host")?)
        };
        Ok(shared.insert(host).clone())
    }

    /// Calibrates on this host: VGG-16 (224x224, with its FC head; the workload that
    /// defines the board classes) runs in rounds with readings of the reference
    /// kernel, each node timed; its time is the sum of each node's fastest time, the
    /// rounds going on (6 to 15) until two rounds in a row lower it by less than 0.5%.
    /// The base rate is [`VGG16_FLOPS`] over that time. Takes 10-30 s and about 1.5 GB
    /// for a while; callers that share the host should hold the
    /// [`super::ComputeLock`] ([`HostRate::shared`] does).
    pub fn calibrate() -> Result<HostRate> {
        let kernel = ReferenceKernel::build()?;
        let (plan, input) = catalog_model(CALIBRATION_MODEL)?;
        // Each run starts with cold caches, as every tile's does.
        let evictor = CacheEvictor::default();
        let run = || {
            evictor.before_run(u64::MAX);
            run_nodes_timed(&plan, tvec!(input.clone().into_tvalue()), thread_cpu_time)
                .context("running VGG-16 to calibrate the host")
        };
        run()?;
        kernel.read()?;
        let mut nodes = NodeTimes::default();
        let mut reference = Duration::MAX;
        let mut settled_rounds = 0;
        for round in 1..=MAX_CALIBRATION_ROUNDS {
            reference = reference.min(kernel.read()?);
            let (_, times) = run()?;
            let lowered = nodes.merge(&times, 1.0);
            settled_rounds = if lowered < CONVERGED / 2.0 {
                settled_rounds + 1
            } else {
                0
            };
            // Slow spells can last seconds: two rounds in a row must lower nothing.
            if round >= CALIBRATION_ROUNDS && settled_rounds >= 2 {
                break;
            }
        }
        let vgg16 = nodes.total();
        let base_gflops = VGG16_FLOPS / vgg16.as_secs_f64() / 1e9;
        tracing::info!(
            "calibrated: VGG-16 {:.1} ms ({base_gflops:.2} GFLOP/s) in {} rounds, reference \
             kernel {:.3} ms",
            vgg16.as_secs_f64() * 1e3,
            nodes.runs,
            reference.as_secs_f64() * 1e3
        );
        Ok(HostRate {
            base_gflops,
            tracker: Some(Tracker::new(kernel, reference)),
            tiles: Mutex::default(),
            evictor,
        })
    }

    /// A host rate of `base_gflops` now (an earlier calibration's figure), followed from
    /// here with the reference kernel, whose time now is taken as the base. The base is
    /// read holding `lock`, so that other emulators' compute does not slow it.
    pub fn from_rate(base_gflops: f64, lock: &super::ComputeLock) -> Result<HostRate> {
        positive("host rate (GFLOP/s)", base_gflops)?;
        let kernel = ReferenceKernel::build()?;
        let base = {
            let _held = lock.hold()?;
            kernel.read()?;
            kernel.read()?.min(kernel.read()?)
        };
        Ok(HostRate {
            base_gflops,
            tracker: Some(Tracker::new(kernel, base)),
            tiles: Mutex::default(),
            evictor: CacheEvictor::default(),
        })
    }

    /// A host rate that never moves (for tests, where the times must not depend on the
    /// host).
    pub fn fixed(gflops: f64) -> Result<HostRate> {
        Ok(HostRate {
            base_gflops: positive("host rate (GFLOP/s)", gflops)?,
            tracker: None,
            tiles: Mutex::default(),
            evictor: CacheEvictor::default(),
        })
    }

    /// One reading of the reference kernel now (the fastest of 3 runs), outside the
    /// readings [`HostRate::now`] keeps; `None` for a fixed rate.
    pub fn read_reference(&self) -> Result<Option<Duration>> {
        self.tracker.as_ref().map(|t| t.kernel.read()).transpose()
    }

    /// The rate at calibration, GFLOP/s.
    pub fn base_gflops(&self) -> f64 {
        self.base_gflops
    }

    /// The host's rate now, GFLOP/s: the base rate x the reference kernel's base time /
    /// its fastest time over the last [`WINDOW`], reading it first if the last reading
    /// is older than [`SAMPLE_EVERY`]. Call it holding the compute lock.
    pub fn now(&self) -> Result<f64> {
        let Some(tracker) = &self.tracker else {
            return Ok(self.base_gflops);
        };
        let floor = tracker.floor()?;
        Ok(self.base_gflops * tracker.base.as_secs_f64() / floor.as_secs_f64())
    }
}

impl Tracker {
    fn new(kernel: ReferenceKernel, base: Duration) -> Tracker {
        Tracker {
            kernel,
            base,
            readings: Mutex::new(VecDeque::from([(Instant::now(), base)])),
        }
    }

    /// The fastest reading of the window, reading the kernel first if due.
    fn floor(&self) -> Result<Duration> {
        let mut readings = self.readings.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if readings
            .back()
            .is_none_or(|(at, _)| now.duration_since(*at) >= SAMPLE_EVERY)
        {
            readings.push_back((now, self.kernel.read()?));
        }
        while readings.len() > 1
            && readings
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > WINDOW)
        {
            readings.pop_front();
        }
        Ok(readings
            .iter()
            .map(|(_, t)| *t)
            .min()
            .expect("the last reading is kept"))
    }
}

/// Tiles whose node times a host keeps; the oldest go first.
pub const KEPT_TILE_TIMES: usize = 4096;

/// Node times by tile key, with the keys in insertion order for eviction.
#[derive(Debug, Default)]
pub(super) struct TileTimes {
    nodes: HashMap<String, NodeTimes>,
    order: VecDeque<String>,
}

impl TileTimes {
    pub(super) fn entry(&mut self, key: &str) -> &mut NodeTimes {
        if !self.nodes.contains_key(key) {
            if self.order.len() >= KEPT_TILE_TIMES
                && let Some(oldest) = self.order.pop_front()
            {
                self.nodes.remove(&oldest);
            }
            self.order.push_back(key.to_string());
        }
        self.nodes.entry(key.to_string()).or_default()
    }
}

/// The fastest time seen of every node of one tract plan, over its runs, in host time
/// at the base rate.
#[derive(Clone, Debug, Default)]
pub struct NodeTimes {
    fastest: Vec<Duration>,
    /// Runs merged so far.
    pub runs: u32,
}

impl NodeTimes {
    /// Merges one run's node times, each multiplied by `scale` (the host's rate then
    /// over the base rate: a run on a slowed host counts as shorter); returns the
    /// fraction by which the total went down (1 for the first run).
    pub fn merge(&mut self, times: &[Duration], scale: f64) -> f64 {
        let before = self.total();
        if self.fastest.len() != times.len() {
            self.fastest = vec![Duration::MAX; times.len()];
        }
        for (fastest, t) in self.fastest.iter_mut().zip(times) {
            *fastest = (*fastest).min(t.mul_f64(scale));
        }
        self.runs += 1;
        if self.runs == 1 {
            return 1.0;
        }
        1.0 - self.total().as_secs_f64() / before.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// The sum of the nodes' fastest times.
    pub fn total(&self) -> Duration {
        self.fastest.iter().sum()
    }
}
