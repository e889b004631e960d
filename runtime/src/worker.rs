//! The worker: serves the gRPC protocol of proto/legion.proto on a device. It caches
//! uploaded models on disk by sha256, imports them once, and builds each tile once. It
//! runs single tiles for the coordinator (the hub) or its own program of a plan
//! (`program.rs`).

mod program;
mod turns;

use crate::TileModel;
use crate::emulate::{Emulator, thread_cpu_time};
use crate::proto::worker_server::{Worker as WorkerService, WorkerServer};
use crate::proto::{
    self, F32Tensor, HasModelReply, HealthReply, HealthRequest, InfoReply, InfoRequest,
    LoadPlanReply, LoadPlanRequest, ModelChunk, ModelRef, ProbeReply, ProbeRequest,
    ProfileStageReply, ProfileStageRequest, PushRowsReply, RunProgramReply, RunProgramRequest,
    RunTileReply, RunTileRequest, UploadReply,
};
use crate::wire::{from_wire, hex, is_sha256, to_wire};
use anyhow::Context as _;
use legion_ir::{Ir, TensorRef};
use legion_plan::TileSpec;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};
use tract_onnx::prelude::Tensor;
use turns::ComputeTurns;

/// How a worker presents itself and where it keeps models.
#[derive(Debug)]
pub struct WorkerConfig {
    /// The device name reported by Info.
    pub name: String,
    /// Directory of cached models, `<sha256>.onnx`; created if missing.
    pub cache_dir: PathBuf,
    /// When set, every call must carry `authorization: Bearer <token>`.
    pub token: Option<String>,
    /// When set, the worker serves TLS with this certificate ([`crate::tls`]).
    pub tls: Option<crate::tls::WorkerIdentity>,
    /// What it accepts from whoever reaches its port.
    pub limits: Limits,
    /// How compute is timed: a real device, or an emulated board.
    pub compute: Compute,
}

/// What a worker accepts from whoever reaches its port (`legion worker --max-*`);
/// beyond these a call is refused with RESOURCE_EXHAUSTED naming the limit, and the
/// worker serves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one gRPC message, either way (a model upload is streamed in chunks).
    pub message_bytes: usize,
    /// Bytes of one uploaded model.
    pub upload_bytes: u64,
    /// Bytes of the model cache on disk, an upload in progress included.
    pub cache_bytes: u64,
    /// Weight bytes the tiles kept in memory may hold together (each tile holds its own
    /// copy of its stages' weights; the least recently used go first, the newest always
    /// stays), and the most one program's tiles may hold (LoadPlan refuses more). FSS
    /// profiling runs every group once: 32 YOLOv2 groups of up to 6 stages held about
    /// 3.5 GB per worker, and six workers in one process ran this 24 GB host out of
    /// memory.
    pub tiles_bytes: u64,
    /// Tile runs, programs and profiling calls at once.
    pub runs: usize,
}

impl Default for Limits {
    /// 128 MiB messages (YOLOv2's largest whole map is 22 MB), 2 GiB models (VGG-16 is
    /// 528 MB), an 8 GiB cache, 1 GiB of tiles and 16 runs at once.
    fn default() -> Limits {
        Limits {
            message_bytes: 128 << 20,
            upload_bytes: 2 << 30,
            cache_bytes: 8 << 30,
            tiles_bytes: 1 << 30,
            runs: 16,
        }
    }
}

/// How a worker times its compute.
#[derive(Debug)]
pub enum Compute {
    /// A real device: times are wall-clock; `gflops` is its rate on the device-rate
    /// workload, measured at start ([`crate::emulate::measure_device_gflops`]).
    Real {
        /// GFLOP/s.
        gflops: f64,
    },
    /// An emulated board: compute is serialized on the host and scaled to the board.
    Emulated(Emulator),
}

impl Compute {
    /// Runs `tile` on `inputs`; returns its outputs and how long it took: on the real
    /// clock one run on the wall clock, on the emulated clock the emulator's time for
    /// the tile named `key` ([`Emulator::run_tile`]).
    fn run_tile(
        &self,
        key: &str,
        tile: &TileModel,
        inputs: Vec<Tensor>,
    ) -> Result<(Vec<Tensor>, TileTime), Status> {
        let failed = |e: anyhow::Error| Status::internal(format!("running the tile: {e:#}"));
        match self {
            Compute::Real { .. } => {
                let start = Instant::now();
                let out = tile.run(inputs).map_err(failed)?;
                let took = start.elapsed();
                Ok((
                    out,
                    TileTime {
                        compute: took,
                        host: took,
                        host_gflops: None,
                    },
                ))
            }
            Compute::Emulated(e) => {
                let bytes = tile.weight_bytes()
                    + inputs
                        .iter()
                        .map(|t| (t.len() * t.datum_type().size_of()) as u64)
                        .sum::<u64>();
                let (out, t) = e
                    .run_tile(key, bytes, || {
                        tile.run_timed(inputs.clone(), thread_cpu_time)
                    })
                    .map_err(failed)?;
                Ok((
                    out,
                    TileTime {
                        compute: t.emulated,
                        host: t.host,
                        host_gflops: Some(t.host_gflops),
                    },
                ))
            }
        }
    }

    /// The compute rate reported by Info, GFLOP/s.
    pub fn gflops(&self) -> f64 {
        match self {
            Compute::Real { gflops } => *gflops,
            Compute::Emulated(e) => e.emulation.gflops,
        }
    }

    fn emulated(&self) -> bool {
        matches!(self, Compute::Emulated(_))
    }
}

/// A tile run's times.
struct TileTime {
    /// On the worker's clock.
    compute: Duration,
    /// As measured on the host.
    host: Duration,
    /// On the emulated clock: the host's rate the time was scaled with, GFLOP/s.
    host_gflops: Option<f64>,
}

/// Tiles a worker keeps built: the tiles of several plans' programs on one device (a
/// recovering coordinator keeps a plan for each board's loss loaded); their weights
/// are bounded apart.
pub const TILE_CACHE: usize = 256;

/// A tile's model uploaded, or found cached by HasModel, this recently is not pruned:
/// the LoadPlan that needs it may be on its way.
const TILE_RECENT: Duration = Duration::from_secs(600);

/// The file in a cache directory whose lock orders prunes and HasModel
/// ([`Worker::tiles_lock`]).
const TILES_LOCK: &str = ".tiles.lock";

/// How [`Worker::tiles_lock`] takes the lock.
#[derive(Clone, Copy)]
enum Lock {
    Shared,
    Exclusive,
}

/// Imported models a worker keeps: a coordinator switching between a few models
/// (benchmarks, FSS) does not import them again, and a long-lived worker that has seen
/// many models does not keep them all (a local cluster grew to 8 GB over a few dozen).
pub const MODEL_CACHE: usize = 4;

/// Weight bytes the kept models may hold together; the newest always stays.
pub const MODEL_CACHE_WEIGHT_BYTES: u64 = 2 << 30;

/// A built tile: its model and the TileSpec's canonical JSON.
type TileKey = (ModelKey, String);

/// A model as imported: sha256 and input shape.
type ModelKey = (String, Vec<usize>);

fn model_key(m: &ModelRef) -> ModelKey {
    let shape = m.input_shape.iter().map(|&d| d as usize).collect();
    (m.sha256.clone(), shape)
}

/// The key of the tile `spec` of model `m`.
fn tile_key(m: &ModelRef, spec: &TileSpec) -> Result<TileKey, Status> {
    let canonical = serde_json::to_string(spec).map_err(|e| Status::internal(e.to_string()))?;
    Ok((model_key(m), canonical))
}

/// A tile's name for the emulator's node times, from its cache key.
fn tile_key_text((model, spec): &TileKey) -> String {
    format!("{} {:?} {spec}", model.0, model.1)
}

/// A least-recently-used cache bounded by a count and a total weight; the newest entry
/// always stays, however heavy.
struct Lru<K, V> {
    /// Key, value and weight; least recently used first.
    entries: Vec<(K, V, u64)>,
    max_len: usize,
    max_weight: u64,
}

impl<K: PartialEq, V: Clone> Lru<K, V> {
    fn new(max_len: usize, max_weight: u64) -> Lru<K, V> {
        Lru {
            entries: vec![],
            max_len,
            max_weight,
        }
    }

    /// The value of `key`, now the most recently used.
    fn get(&mut self, key: &K) -> Option<V> {
        let i = self.entries.iter().position(|(k, _, _)| k == key)?;
        let hit = self.entries.remove(i);
        let value = hit.1.clone();
        self.entries.push(hit);
        Some(value)
    }

    /// Keeps `value` as the most recently used, dropping the least recently used
    /// entries until both bounds hold again (or only this one is left).
    fn insert(&mut self, key: K, value: V, weight: u64) {
        self.entries.retain(|(k, _, _)| *k != key);
        self.entries.push((key, value, weight));
        let mut held: u64 = self.entries.iter().map(|(_, _, w)| w).sum();
        while self.entries.len() > 1
            && (self.entries.len() > self.max_len || held > self.max_weight)
        {
            held -= self.entries.remove(0).2;
        }
    }
}

/// A worker's state: imported models and built tiles.
pub struct Worker {
    config: WorkerConfig,
    /// Imported models, by sha256 and input shape, with their weight bytes, least
    /// recently used first; at most [`MODEL_CACHE`] and [`MODEL_CACHE_WEIGHT_BYTES`].
    models: Mutex<Lru<ModelKey, Arc<Ir>>>,
    /// Built tiles, by model key and the TileSpec's canonical JSON, with their weight
    /// bytes, least recently used first; at most [`TILE_CACHE`] tiles and
    /// [`Limits::tiles_bytes`].
    tiles: Mutex<Lru<TileKey, Arc<TileModel>>>,
    /// Loaded programs by id, least recently used first; at most
    /// [`program::LOADED_PROGRAMS`].
    programs: Mutex<Lru<String, Arc<program::Loaded>>>,
    /// Rows other boards pushed, until their receive step takes them.
    mailbox: Mutex<std::collections::HashMap<program::MailKey, Tensor>>,
    /// Wakes the receive steps when rows arrive.
    arrived: tokio::sync::Notify,
    /// The board's compute, one tile at a time, for the runs of several inferences.
    compute_turns: Arc<ComputeTurns>,
    /// A permit per run in flight, at most [`Limits::runs`].
    runs: Arc<tokio::sync::Semaphore>,
}

impl Worker {
    /// A worker with an empty state; creates the cache directory.
    pub fn new(config: WorkerConfig) -> anyhow::Result<Worker> {
        std::fs::create_dir_all(&config.cache_dir).map_err(|e| {
            anyhow::anyhow!("creating cache dir {}: {e}", config.cache_dir.display())
        })?;
        Ok(Worker {
            models: Mutex::new(Lru::new(MODEL_CACHE, MODEL_CACHE_WEIGHT_BYTES)),
            tiles: Mutex::new(Lru::new(TILE_CACHE, config.limits.tiles_bytes)),
            programs: Mutex::new(Lru::new(program::LOADED_PROGRAMS, u64::MAX)),
            mailbox: Mutex::default(),
            arrived: tokio::sync::Notify::new(),
            compute_turns: Arc::default(),
            runs: Arc::new(tokio::sync::Semaphore::new(config.limits.runs)),
            config,
        })
    }

    /// A permit for one more run, or RESOURCE_EXHAUSTED when [`Limits::runs`] are in
    /// flight.
    fn run_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.runs.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{}: {} runs are in flight, the most it takes (legion worker --max-runs); \
                 retry when one ends",
                self.config.name, self.config.limits.runs
            ))
        })
    }

    /// Serves on `listener` until `shutdown` completes, then stops gracefully.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let token = self.config.token.clone();
        let limit = self.config.limits.message_bytes;
        let mut builder = tonic::transport::Server::builder();
        if let Some(identity) = &self.config.tls {
            builder = builder
                .tls_config(identity.server_config())
                .context("the worker's certificate and key")?;
        }
        let server = WorkerServer::new(Arc::new(self))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let service = InterceptedService::new(server, move |req: Request<()>| {
            authorize(token.as_deref(), &req)?;
            Ok(req)
        });
        builder
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await?;
        Ok(())
    }

    /// Where the cache keeps an uploaded model (`.onnx`) or a tile's model (`.nnef.tar`).
    fn cached_path(&self, m: &ModelRef) -> PathBuf {
        let extension = if m.tile { "nnef.tar" } else { "onnx" };
        self.config
            .cache_dir
            .join(format!("{}.{extension}", m.sha256))
    }

    /// The imported model, importing it from the cache on first use.
    fn model(&self, m: &ModelRef) -> Result<Arc<Ir>, Status> {
        check_sha(&m.sha256)?;
        let key = model_key(m);
        if let Some(ir) = lock(&self.models).get(&key) {
            return Ok(ir);
        }
        if m.tile {
            return Err(Status::invalid_argument(format!(
                "{} is a tile's model, not a model to import",
                m.sha256
            )));
        }
        let path = self.cached_path(m);
        if !path.exists() {
            return Err(Status::failed_precondition(format!(
                "model {} not uploaded; upload it first",
                m.sha256
            )));
        }
        // Workers in one process (a local cluster) share imports: they are read-only,
        // and a big model imported once per worker would multiply the memory.
        static IMPORTED: Mutex<Vec<(ModelKey, Weak<Ir>)>> = Mutex::new(vec![]);
        let mut imported = lock(&IMPORTED);
        imported.retain(|(_, ir)| ir.strong_count() > 0);
        let shared = imported
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, ir)| ir.upgrade());
        let ir = match shared {
            Some(ir) => ir,
            None => {
                let shape = (!key.1.is_empty()).then_some(&key.1[..]);
                let ir = legion_ir::import(&path, shape).map_err(|e| {
                    Status::invalid_argument(format!("importing model {}: {e}", m.sha256))
                })?;
                let ir = Arc::new(ir);
                imported.push((key.clone(), Arc::downgrade(&ir)));
                ir
            }
        };
        drop(imported);
        let weights = ir.total_weight_bytes();
        lock(&self.models).insert(key, ir.clone(), weights);
        Ok(ir)
    }

    /// The built tile of `spec` (cached under `key`, [`tile_key`]), building it on
    /// first use.
    fn tile(&self, key: &TileKey, ir: &Ir, spec: &TileSpec) -> Result<Arc<TileModel>, Status> {
        if let Some(tile) = lock(&self.tiles).get(key) {
            return Ok(tile);
        }
        let tile = Arc::new(build_tile(ir, spec)?);
        let weights: u64 = spec
            .stages
            .iter()
            .map(|s| ir.stage(s.stage).weight_bytes)
            .sum();
        lock(&self.tiles).insert(key.clone(), tile.clone(), weights);
        Ok(tile)
    }

    /// The tile `spec` shipped built as `model` (cached under `key`), loading it on
    /// first use.
    fn shipped_tile(
        &self,
        key: &TileKey,
        model: &ModelRef,
        spec: &TileSpec,
    ) -> Result<Arc<TileModel>, Status> {
        check_sha(&model.sha256)?;
        if let Some(tile) = lock(&self.tiles).get(key) {
            return Ok(tile);
        }
        let path = self.cached_path(model);
        if !model.tile || !path.exists() {
            return Err(Status::failed_precondition(format!(
                "tile model {} not uploaded; upload it first",
                model.sha256
            )));
        }
        let bytes = std::fs::metadata(&path)
            .map_err(|e| Status::internal(format!("reading {}: {e}", path.display())))?
            .len();
        let tile = TileModel::from_nnef_file(&path, spec)
            .map_err(|e| Status::invalid_argument(format!("tile model {}: {e:#}", model.sha256)))?;
        let tile = Arc::new(tile);
        lock(&self.tiles).insert(key.clone(), tile.clone(), bytes);
        Ok(tile)
    }

    /// Keeps tiles' models within half the cache: beyond that, the oldest that no
    /// program loaded in this process runs and that were not uploaded or asked for in
    /// the last [`TILE_RECENT`] are deleted (a coordinator uploads them again before a
    /// LoadPlan that needs them). Plans come and go on a long-lived worker (re-plans,
    /// recovery), and each brings its own tiles.
    fn prune_tiles(&self) {
        let Some(_pruning) = self.tiles_lock(Lock::Exclusive) else {
            return;
        };
        let budget = self.config.limits.cache_bytes / 2;
        let in_use = program::tiles_in_use();
        let recent = std::time::SystemTime::now() - TILE_RECENT;
        let Ok(dir) = std::fs::read_dir(&self.config.cache_dir) else {
            return;
        };
        // Modified time, bytes, path, and whether a loaded program runs it.
        let mut tiles: Vec<(std::time::SystemTime, u64, PathBuf, bool)> = dir
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                let sha = name.strip_suffix(".nnef.tar")?;
                let meta = e.metadata().ok()?;
                Some((
                    meta.modified().ok()?,
                    meta.len(),
                    e.path(),
                    in_use.contains(sha),
                ))
            })
            .collect();
        tiles.sort();
        let mut held: u64 = tiles.iter().map(|t| t.1).sum();
        for (_, len, path, _) in tiles.into_iter().filter(|t| !t.3 && t.0 < recent) {
            if held <= budget {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                held -= len;
            }
        }
    }

    /// The cache directory's lock on its tiles' models, held until the file drops;
    /// `None` (logged) if it cannot be taken. Workers share a cache directory (a local
    /// cluster's in one process, or several clusters on one host): a prune holds it
    /// exclusively from listing to deleting, HasModel shared while it finds a tile and
    /// marks it recent, so no prune deletes a tile HasModel just called cached.
    fn tiles_lock(&self, lock: Lock) -> Option<std::fs::File> {
        let path = self.config.cache_dir.join(TILES_LOCK);
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path);
        let locked = file.and_then(|f| {
            match lock {
                Lock::Shared => f.lock_shared(),
                Lock::Exclusive => f.lock(),
            }
            .map(|()| f)
        });
        locked
            .inspect_err(|e| tracing::warn!("locking {}: {e}", path.display()))
            .ok()
    }

    /// The model and the checked TileSpec of a RunTile or ProfileStage request.
    fn tile_request(
        &self,
        call: &str,
        model: Option<ModelRef>,
        spec_json: &[u8],
    ) -> Result<(ModelRef, Arc<Ir>, TileSpec), Status> {
        let m = model.ok_or_else(|| Status::invalid_argument(format!("{call} without a model")))?;
        let spec: TileSpec = serde_json::from_slice(spec_json)
            .map_err(|e| Status::invalid_argument(format!("bad TileSpec JSON: {e}")))?;
        let ir = self.model(&m)?;
        validate(&ir, &spec)?;
        if let Some(stage) = spec.partials().next() {
            return Err(Status::invalid_argument(format!(
                "{call}: the tile computes a partial result of stage {stage}, which the boards \
                 of its group combine; it runs only in a program (LoadPlan)"
            )));
        }
        Ok((m, ir, spec))
    }

    /// Builds (once) and runs a tile; blocking, for `spawn_blocking`.
    fn run_tile_blocking(&self, req: RunTileRequest) -> Result<RunTileReply, Status> {
        let (m, ir, spec) = self.tile_request("RunTile", req.model, &req.tile_spec_json)?;
        let inputs = strips(&ir, &spec, &req.inputs)?;
        let key = tile_key(&m, &spec)?;
        let tile = self.tile(&key, &ir, &spec)?;
        let (outputs, time) = self
            .config
            .compute
            .run_tile(&tile_key_text(&key), &tile, inputs)?;
        let outputs = outputs
            .iter()
            .map(to_wire)
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(|e| Status::internal(format!("encoding outputs: {e:#}")))?;
        Ok(RunTileReply {
            outputs,
            compute_us: time.compute.as_micros() as u64,
            host_us: time.host.as_micros() as u64,
            emulated: self.config.compute.emulated(),
            host_gflops: time.host_gflops.unwrap_or(0.0),
        })
    }

    /// Runs a tile `runs` times (after a warm-up run unless skipped) on made-up
    /// inputs; blocking.
    fn profile_blocking(&self, req: ProfileStageRequest) -> Result<ProfileStageReply, Status> {
        if req.runs > 1000 || (req.runs == 0 && req.skip_warmup) {
            return Err(Status::invalid_argument(format!(
                "runs must be 1..=1000, or 0 with the warm-up run, got {}{}",
                req.runs,
                if req.skip_warmup { " without it" } else { "" }
            )));
        }
        let (m, ir, spec) = self.tile_request("ProfileStage", req.model, &req.tile_spec_json)?;
        let inputs: Vec<Tensor> = (0..spec.inputs.len())
            .map(|i| crate::check::test_input(&spec.input_shape(&ir, i)))
            .collect();
        // A profiler measuring in rounds comes back for the same tile once a round:
        // it is kept with the tiles RunTile builds. An emulator keeps the tile's node
        // times all the same: profiling the same work again, or running it in a plan,
        // gets the same time.
        let key = tile_key(&m, &spec)?;
        let tile = self.tile(&key, &ir, &spec)?;
        let key = tile_key_text(&key);
        let compute = &self.config.compute;
        let mut reply = ProfileStageReply {
            emulated: compute.emulated(),
            ..Default::default()
        };
        if !req.skip_warmup {
            let (_, warmup) = compute.run_tile(&key, &tile, inputs.clone())?;
            reply.warmup_us = warmup.compute.as_micros() as u64;
        }
        for _ in 0..req.runs {
            let (_, time) = compute.run_tile(&key, &tile, inputs.clone())?;
            reply.host_us.push(time.host.as_micros() as u64);
            reply.compute_us.push(time.compute.as_micros() as u64);
            reply.host_gflops.extend(time.host_gflops);
        }
        Ok(reply)
    }
}

#[tonic::async_trait]
impl WorkerService for Arc<Worker> {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoReply>, Status> {
        Ok(Response::new(InfoReply {
            name: self.config.name.clone(),
            arch: std::env::consts::ARCH.to_string(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            version: env!("CARGO_PKG_VERSION").to_string(),
            gflops: self.config.compute.gflops(),
            emulation: match &self.config.compute {
                Compute::Real { .. } => None,
                Compute::Emulated(e) => Some(proto::Emulation {
                    class: e.emulation.class.clone().unwrap_or_default(),
                    gflops: e.emulation.gflops,
                    mbps: e.emulation.mbps,
                    latency_ms: e.emulation.latency_ms,
                    host_gflops: e.host().base_gflops(),
                }),
            },
        }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthReply>, Status> {
        Ok(Response::new(HealthReply {}))
    }

    async fn has_model(&self, req: Request<ModelRef>) -> Result<Response<HasModelReply>, Status> {
        let sha = &req.get_ref().sha256;
        check_sha(sha)?;
        let path = self.cached_path(req.get_ref());
        let _finding = req.get_ref().tile.then(|| self.tiles_lock(Lock::Shared));
        let cached = path.exists();
        if cached && req.get_ref().tile {
            // Asked for now: not pruned before the LoadPlan that follows.
            let _ = std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        }
        Ok(Response::new(HasModelReply { cached }))
    }

    async fn upload_model(
        &self,
        req: Request<Streaming<ModelChunk>>,
    ) -> Result<Response<UploadReply>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty upload"))?;
        let model = first.model.clone().ok_or_else(|| {
            Status::invalid_argument("the first chunk must carry the model's sha256")
        })?;
        let sha = model.sha256.clone();
        check_sha(&sha)?;
        let path = self.cached_path(&model);
        if path.exists() {
            return Ok(Response::new(UploadReply { bytes: 0 }));
        }
        if model.tile {
            self.prune_tiles();
        }
        // Unique in the process: local workers share a cache directory.
        static UPLOADS: AtomicU64 = AtomicU64::new(0);
        let n = UPLOADS.fetch_add(1, Ordering::Relaxed);
        let part = path.with_extension(format!("part{n}.{}", std::process::id()));
        let room = Room {
            upload: self.config.limits.upload_bytes,
            cache: self
                .config
                .limits
                .cache_bytes
                .saturating_sub(cache_bytes(&self.config.cache_dir)),
        };
        let result = receive(&part, first.data, &mut stream, room).await;
        let (bytes, digest) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(e);
            }
        };
        if digest != sha {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(Status::invalid_argument(format!(
                "model bytes hash to {digest}, not the announced {sha}"
            )));
        }
        tokio::fs::rename(&part, &path)
            .await
            .map_err(|e| Status::internal(format!("caching the model: {e}")))?;
        Ok(Response::new(UploadReply { bytes }))
    }

    async fn run_tile(
        &self,
        req: Request<RunTileRequest>,
    ) -> Result<Response<RunTileReply>, Status> {
        let permit = self.run_permit()?;
        let worker = self.clone();
        let req = req.into_inner();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            worker.run_tile_blocking(req)
        })
        .await
        .map_err(|e| Status::internal(format!("the tile task failed: {e}")))?
        .map(Response::new)
    }

    async fn profile_stage(
        &self,
        req: Request<ProfileStageRequest>,
    ) -> Result<Response<ProfileStageReply>, Status> {
        let permit = self.run_permit()?;
        let worker = self.clone();
        let req = req.into_inner();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            worker.profile_blocking(req)
        })
        .await
        .map_err(|e| Status::internal(format!("the profiling task failed: {e}")))?
        .map(Response::new)
    }

    async fn probe_transfer(
        &self,
        req: Request<ProbeRequest>,
    ) -> Result<Response<ProbeReply>, Status> {
        Ok(Response::new(ProbeReply {
            payload: req.into_inner().payload,
        }))
    }

    async fn load_plan(
        &self,
        req: Request<LoadPlanRequest>,
    ) -> Result<Response<LoadPlanReply>, Status> {
        Worker::load_plan(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn run_program(
        &self,
        req: Request<RunProgramRequest>,
    ) -> Result<Response<RunProgramReply>, Status> {
        let _permit = self.run_permit()?;
        Worker::run_program(self, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn push_rows(
        &self,
        req: Request<proto::Rows>,
    ) -> Result<Response<PushRowsReply>, Status> {
        Worker::push_rows(self, req.into_inner()).map(Response::new)
    }
}

/// Bytes an upload may take: by [`Limits::upload_bytes`], and what the model cache has
/// left of [`Limits::cache_bytes`].
#[derive(Clone, Copy)]
struct Room {
    upload: u64,
    cache: u64,
}

/// Bytes of the files in the model cache `dir` (models and uploads in progress).
fn cache_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Writes the upload's chunks to `part`; returns the byte count and their sha256.
/// Refuses an upload that outgrows `room`.
async fn receive(
    part: &std::path::Path,
    first: Vec<u8>,
    stream: &mut Streaming<ModelChunk>,
    room: Room,
) -> Result<(u64, String), Status> {
    let io = |e: std::io::Error| Status::internal(format!("writing {}: {e}", part.display()));
    let mut file = tokio::fs::File::create(part).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut chunk = first;
    let mib = |b: u64| b >> 20;
    loop {
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        if bytes > room.upload {
            return Err(Status::resource_exhausted(format!(
                "the model is over {} MiB, the most this worker takes \
                 (legion worker --max-upload-mb)",
                mib(room.upload)
            )));
        }
        if bytes > room.cache {
            return Err(Status::resource_exhausted(format!(
                "the model cache {} has {} MiB left and the model is larger; delete models \
                 from it or raise legion worker --max-cache-mb",
                part.parent()
                    .map_or(String::new(), |d| d.display().to_string()),
                mib(room.cache)
            )));
        }
        file.write_all(&chunk).await.map_err(io)?;
        match stream.message().await? {
            Some(c) => chunk = c.data,
            None => break,
        }
    }
    file.flush().await.map_err(io)?;
    Ok((bytes, hex(&hasher.finalize())))
}

/// Checks the bearer token of a call against `token` (the worker's, or a serving
/// coordinator's); any call passes without one.
pub fn authorize(token: Option<&str>, req: &Request<()>) -> Result<(), Status> {
    let Some(token) = token else { return Ok(()) };
    let got = req
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization metadata (Bearer token)"))?;
    let got = got
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("authorization metadata is not `Bearer <token>`"))?;
    // In constant time over the tokens' digests, so that neither the time to a
    // mismatch nor the token's length shows.
    let digest = |t: &str| Sha256::digest(t.as_bytes());
    if !bool::from(digest(got).as_slice().ct_eq(digest(token).as_slice())) {
        return Err(Status::unauthenticated("wrong token"));
    }
    Ok(())
}

fn check_sha(sha: &str) -> Result<(), Status> {
    if is_sha256(sha) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{sha:?} is not a sha256 (64 lowercase hex digits)"
        )))
    }
}

/// Rejects a spec naming stages or tensors the model does not have.
fn validate(ir: &Ir, spec: &TileSpec) -> Result<(), Status> {
    let n = ir.stages.len();
    let bad = |what: String| Err(Status::invalid_argument(format!("bad TileSpec: {what}")));
    let known = |r: TensorRef| match r {
        TensorRef::Input => true,
        TensorRef::Stage(s) => s.index() < n,
    };
    if let Some(i) = spec.inputs.iter().find(|i| !known(i.tensor)) {
        return bad(format!(
            "input {:?} is not in the model ({n} stages)",
            i.tensor
        ));
    }
    if let Some(s) = spec.stages.iter().find(|s| s.stage.index() >= n) {
        return bad(format!(
            "stage {} is not in the model ({n} stages)",
            s.stage
        ));
    }
    if let Some(s) = spec
        .stages
        .iter()
        .find(|s| s.partial && ir.stage(s.stage).partial.is_none())
    {
        return bad(format!(
            "stage {} is not a reduction whose partial results combine",
            s.stage
        ));
    }
    if let Some(o) = spec.outputs.iter().find(|o| o.stage.index() >= n) {
        return bad(format!(
            "output stage {} is not in the model ({n} stages)",
            o.stage
        ));
    }
    if let Some(s) = spec.stages.iter().find(|s| s.part.is_some() || s.summed) {
        return bad(format!(
            "stage {} is given as a phase of a tile in parts; give the tile's parts",
            s.stage
        ));
    }
    if !spec.parts.is_empty() {
        let height = match spec.inputs[..] {
            [input] => ir.tensor(input.tensor).height(),
            _ => None,
        };
        let Some(height) = height else {
            return bad("a tile in parts takes one input, with rows".into());
        };
        if spec.stages.last().is_none_or(|s| s.channels.is_none()) {
            return bad("a tile in parts ends with a stage split by channels".into());
        }
        let mut parts = spec.parts.clone();
        parts.sort_by_key(|r| r.start);
        let mut next = 0;
        for r in &parts {
            if r.start != next || r.is_empty() {
                return bad(format!(
                    "parts {:?} do not cut rows 0..{height} of its input",
                    spec.parts
                ));
            }
            next = r.end;
        }
        if next != height {
            return bad(format!(
                "parts {:?} do not cut rows 0..{height} of its input",
                spec.parts
            ));
        }
    }
    Ok(())
}

/// Decodes the input strips, checking each against the shape the spec gives it.
fn strips(ir: &Ir, spec: &TileSpec, inputs: &[F32Tensor]) -> Result<Vec<Tensor>, Status> {
    if inputs.len() != spec.inputs.len() {
        return Err(Status::invalid_argument(format!(
            "the tile takes {} input strips, {} given",
            spec.inputs.len(),
            inputs.len()
        )));
    }
    spec.inputs
        .iter()
        .zip(inputs)
        .enumerate()
        .map(|(i, (want, got))| {
            let shape: Vec<u64> = ir
                .tensor(want.tensor)
                .strip_shape(want.rows)
                .into_iter()
                .map(|d| d as u64)
                .collect();
            if got.shape != shape {
                return Err(Status::invalid_argument(format!(
                    "input strip {i} ({:?} rows {}): expected shape {shape:?}, got {:?}",
                    want.tensor, want.rows, got.shape
                )));
            }
            from_wire(got).map_err(|e| Status::invalid_argument(format!("input strip {i}: {e:#}")))
        })
        .collect()
}

fn build_tile(ir: &Ir, spec: &TileSpec) -> Result<TileModel, Status> {
    TileModel::build(ir, spec)
        .map_err(|e| Status::invalid_argument(format!("building the tile: {e:#}")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use legion_ir::Rows;

    /// A worker for tests, computing on this host, with its cache in `dir`.
    fn test_worker(name: &str, dir: &std::path::Path, limits: Limits) -> Worker {
        Worker::new(WorkerConfig {
            name: name.into(),
            cache_dir: dir.to_path_buf(),
            token: None,
            tls: None,
            limits,
            compute: Compute::Real { gflops: 1.0 },
        })
        .unwrap()
    }

    /// A tile in parts whose parts do not cut its input's rows, or which gives a
    /// phase's fields itself, is refused before `TileSpec::phases` reads it.
    #[test]
    fn tiles_in_parts_must_cut_their_input() {
        let path = legion_models::test_model("tiny-head").unwrap();
        let ir = legion_ir::import(&path, None).unwrap();
        let (flatten, fc) = (legion_ir::StageId(2), legion_ir::StageId(3));
        let group = legion_partition::Group::new(flatten.index(), fc.index());
        let whole = legion_partition::channel_tile(&ir, group, Rows::new(0, 5));
        let with = |parts: &[Rows]| TileSpec {
            parts: parts.to_vec(),
            ..whole.clone()
        };
        assert!(validate(&ir, &with(&[Rows::new(4, 8), Rows::new(0, 4)])).is_ok());
        for parts in [
            &[Rows::new(0, 4), Rows::new(5, 8)][..],
            &[Rows::new(0, 4), Rows::new(2, 8)],
            &[Rows::new(0, 9)],
            &[Rows::new(0, 0), Rows::new(0, 8)],
        ] {
            let refused = validate(&ir, &with(parts)).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument);
            assert!(
                refused.message().contains("do not cut rows 0..8"),
                "{refused:?}"
            );
        }
        let mut phase = with(&[Rows::new(0, 8)]).phases(&ir).remove(0).spec;
        phase.parts = vec![Rows::new(0, 8)];
        let refused = validate(&ir, &phase).unwrap_err();
        assert!(
            refused.message().contains("phase of a tile in parts"),
            "{refused:?}"
        );
        let no_input = TileSpec {
            inputs: vec![],
            ..with(&[Rows::new(0, 8)])
        };
        let refused = validate(&ir, &no_input).unwrap_err();
        assert!(refused.message().contains("one input"), "{refused:?}");
    }

    #[test]
    fn a_worker_refuses_runs_beyond_its_limit_until_one_ends() {
        let dir = std::env::temp_dir().join(format!("legion-run-limit-{}", std::process::id()));
        let worker = test_worker(
            "busy",
            &dir,
            Limits {
                runs: 2,
                ..Limits::default()
            },
        );
        let first = worker.run_permit().unwrap();
        let _second = worker.run_permit().unwrap();
        let refused = worker.run_permit().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--max-runs"), "{refused:?}");
        drop(first);
        let _third = worker.run_permit().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_worker_keeps_a_bounded_number_of_imported_models() {
        let dir = std::env::temp_dir().join(format!("legion-model-lru-{}", std::process::id()));
        let worker = test_worker("lru", &dir, Limits::default());
        let onnx = legion_models::bytes("tiny-cnn").unwrap();
        let sha = hex(&Sha256::digest(&onnx));
        let model = |side| ModelRef {
            sha256: sha.clone(),
            input_shape: vec![1, 3, side, side],
            tile: false,
        };
        std::fs::write(worker.cached_path(&model(32)), &onnx).unwrap();
        // The same file imported at another input shape is another model to keep.
        let sizes = 32..32 + MODEL_CACHE as u64 + 3;
        for side in sizes.clone() {
            let m = model(side);
            assert_eq!(worker.model(&m).unwrap().input.shape[2], side as usize);
        }
        let kept: Vec<u64> = lock(&worker.models)
            .entries
            .iter()
            .map(|(k, _, _)| k.1[2] as u64)
            .collect();
        let newest: Vec<u64> = sizes.skip(3).collect();
        assert_eq!(kept, newest);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn old_tile_models_go_when_tiles_pass_half_the_cache() {
        let dir = std::env::temp_dir().join(format!("legion-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let worker = test_worker(
            "prune",
            &dir,
            Limits {
                cache_bytes: 1000,
                ..Limits::default()
            },
        );
        let start = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let write = |name: &str, age: u64| {
            let path = dir.join(name);
            std::fs::write(&path, [0u8; 400]).unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(start + Duration::from_secs(age)).unwrap();
        };
        write("a.nnef.tar", 1);
        write("b.nnef.tar", 2);
        write("c.nnef.tar", 3);
        write("m.onnx", 0);
        worker.prune_tiles();
        // 1200 bytes of tiles against 500: the two oldest go; the model stays.
        assert_eq!(cached_files(&dir), ["c.nnef.tar", "m.onnx"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The cache's files but its lock, sorted.
    fn cached_files(dir: &std::path::Path) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name != TILES_LOCK)
            .collect();
        files.sort();
        files
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prune_waits_for_has_model_and_keeps_the_tile_it_found() {
        let dir = std::env::temp_dir().join(format!("legion-prune-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let limits = Limits {
            cache_bytes: 1000,
            ..Limits::default()
        };
        // Two workers on one cache directory, as in a local cluster.
        let asking = Arc::new(test_worker("asking", &dir, limits));
        let pruning = test_worker("pruning", &dir, limits);
        let sha = "ab".repeat(32);
        let tile = ModelRef {
            sha256: sha.clone(),
            input_shape: vec![],
            tile: true,
        };
        let path = asking.cached_path(&tile);
        let cache_old_tile = || {
            std::fs::write(&path, [0u8; 800]).unwrap();
            let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(old).unwrap();
        };
        cache_old_tile();
        // A prune that holds the lock past HasModel's arrival: HasModel waits, then
        // finds the tile gone and says so (the coordinator uploads it again).
        let held = pruning.tiles_lock(Lock::Exclusive).unwrap();
        let ask = {
            let asking = asking.clone();
            let tile = tile.clone();
            tokio::spawn(async move { asking.has_model(Request::new(tile)).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!ask.is_finished(), "HasModel must wait for the prune");
        std::fs::remove_file(&path).unwrap();
        drop(held);
        assert!(!ask.await.unwrap().unwrap().into_inner().cached);
        // HasModel first: the tile it found cached is recent and survives the prune.
        cache_old_tile();
        assert!(
            asking
                .has_model(Request::new(tile))
                .await
                .unwrap()
                .into_inner()
                .cached
        );
        pruning.prune_tiles();
        assert_eq!(cached_files(&dir), [format!("{sha}.nnef.tar")]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn keys(lru: &Lru<&'static str, u32>) -> Vec<&'static str> {
        lru.entries.iter().map(|(k, _, _)| *k).collect()
    }

    #[test]
    fn the_least_recently_used_go_first_when_the_count_is_full() {
        let mut lru = Lru::new(2, u64::MAX);
        lru.insert("a", 1, 0);
        lru.insert("b", 2, 0);
        assert_eq!(lru.get(&"a"), Some(1));
        lru.insert("c", 3, 0);
        assert_eq!(keys(&lru), ["a", "c"]);
        assert_eq!(lru.get(&"b"), None);
    }

    #[test]
    fn heavy_entries_are_dropped_down_to_the_weight_bound() {
        let mut lru = Lru::new(32, 100);
        lru.insert("a", 1, 40);
        lru.insert("b", 2, 40);
        lru.insert("c", 3, 40);
        assert_eq!(keys(&lru), ["b", "c"]);
        // One entry over the bound on its own stays: the tile is in use.
        lru.insert("huge", 4, 500);
        assert_eq!(keys(&lru), ["huge"]);
        assert_eq!(lru.get(&"huge"), Some(4));
        // Inserting a key again replaces it rather than counting it twice.
        lru.insert("huge", 5, 60);
        lru.insert("d", 6, 30);
        assert_eq!(keys(&lru), ["huge", "d"]);
        assert_eq!(lru.get(&"huge"), Some(5));
    }
}
