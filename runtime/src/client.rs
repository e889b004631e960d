//! The coordinator's side of the protocol: one connection to one worker, every call
//! bounded by a deadline so that a dead worker gives an error naming its address.

use crate::MAX_MESSAGE_BYTES;
use crate::proto::worker_client::WorkerClient as Raw;
use crate::proto::{
    HealthRequest, InfoReply, InfoRequest, LoadPlanRequest, ModelChunk, ModelRef, Peer,
    ProbeRequest, ProfileStageReply, ProfileStageRequest, Rows as WireRows, RunProgramReply,
    RunProgramRequest, RunTileRequest, TileModels,
};
use crate::tile::ShippedTiles;
use crate::wire::{from_wire, sha256_hex, to_wire};
use anyhow::{Context, Result, anyhow};
use legion_plan::{PLAN_VERSION, Program, TileSpec};
use std::future::Future;
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};
use tract_onnx::prelude::Tensor;

/// Deadline of a call when none is configured.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Size of the chunks a model is uploaded in.
const CHUNK_BYTES: usize = 1 << 20;

/// Adds the bearer token, if any, to every call.
#[derive(Clone)]
struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A connection to one worker.
#[derive(Clone)]
pub struct WorkerClient {
    addr: String,
    raw: Raw<InterceptedService<Channel, Auth>>,
    timeout: Duration,
    /// Deadline of one tile run (RunTile, and each run of ProfileStage).
    compute_timeout: Duration,
}

/// The result of one RunTile call.
#[derive(Debug)]
pub struct TileResult {
    /// Output strips in [`TileSpec::outputs`] order.
    pub outputs: Vec<Tensor>,
    /// Compute time on the worker's clock, µs.
    pub compute_us: u64,
    /// The same run as measured on the worker's host, µs.
    pub host_us: u64,
    /// Whether `compute_us` is on the emulated clock.
    pub emulated: bool,
    /// On the emulated clock: the host's rate `compute_us` was scaled with, GFLOP/s.
    pub host_gflops: Option<f64>,
}

/// A model as a worker knows it: content address and input shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelId {
    /// Lowercase hex sha256 of the ONNX bytes.
    pub sha256: String,
    /// The input shape to import it with (empty: the one the file declares).
    pub input_shape: Vec<usize>,
}

impl ModelId {
    fn to_proto(&self) -> ModelRef {
        ModelRef {
            sha256: self.sha256.clone(),
            input_shape: self.input_shape.iter().map(|&d| d as u64).collect(),
            tile: false,
        }
    }
}

impl WorkerClient {
    /// Connects to the worker at `addr` (`host:port`), sending `token` with every call,
    /// over TLS when `cert_pem` pins the worker's certificate ([`crate::tls`]); every
    /// call, the connection included, fails after `timeout`.
    pub async fn connect(
        addr: &str,
        token: Option<&str>,
        cert_pem: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Self> {
        let scheme = if cert_pem.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .with_context(|| format!("bad worker address {addr:?}"))?
            .connect_timeout(timeout);
        if let Some(pem) = cert_pem {
            endpoint = endpoint
                .tls_config(crate::tls::pinned(pem))
                .with_context(|| format!("worker {addr}: the pinned certificate"))?;
        }
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| anyhow!("worker {addr}: no connection after {timeout:?}"))?
            .with_context(|| format!("worker {addr}: connecting"))?;
        let auth = match token {
            Some(t) => Some(
                MetadataValue::try_from(format!("Bearer {t}"))
                    .context("the token is not valid metadata")?,
            ),
            None => None,
        };
        let raw = Raw::with_interceptor(channel, Auth(auth))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(WorkerClient {
            addr: addr.to_string(),
            raw,
            timeout,
            compute_timeout: timeout,
        })
    }

    /// Sets the deadline of one tile run (the connection's timeout by default).
    pub fn with_compute_timeout(mut self, timeout: Duration) -> Self {
        self.compute_timeout = timeout;
        self
    }

    /// The worker's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs one call under the deadline, naming the worker and the call in errors. A
    /// worker's refusal stays downcastable to [`Status`].
    async fn call<T>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(timeout, f).await {
            Err(_) => Err(anyhow!(
                "worker {}: {what} got no answer within {timeout:?}",
                self.addr
            )),
            Ok(Err(status)) => {
                Err(anyhow::Error::new(status)
                    .context(format!("worker {}: {what} failed", self.addr)))
            }
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    /// Device name, arch, cores and version.
    pub async fn info(&self) -> Result<InfoReply> {
        let mut raw = self.raw.clone();
        self.call("Info", self.timeout, raw.info(InfoRequest {}))
            .await
    }

    /// Succeeds when the worker serves.
    pub async fn health(&self) -> Result<()> {
        let mut raw = self.raw.clone();
        self.call("Health", self.timeout, raw.health(HealthRequest {}))
            .await
            .map(|_| ())
    }

    /// Uploads an ONNX model unless the worker has it cached; returns its id and whether
    /// bytes were sent. The deadline grows with the model (at least 50 MB/s).
    pub async fn upload_model(
        &self,
        bytes: &[u8],
        input_shape: &[usize],
    ) -> Result<(ModelId, bool)> {
        let id = ModelId {
            sha256: sha256_hex(bytes),
            input_shape: input_shape.to_vec(),
        };
        let mut raw = self.raw.clone();
        let cached = self
            .call("HasModel", self.timeout, raw.has_model(id.to_proto()))
            .await?
            .cached;
        if cached {
            return Ok((id, false));
        }
        self.upload_as(&id, bytes).await?;
        Ok((id, true))
    }

    /// Streams `bytes` announced as model `id`, cached or not (the worker verifies).
    pub async fn upload_as(&self, id: &ModelId, bytes: &[u8]) -> Result<u64> {
        self.upload_ref(id.to_proto(), bytes).await
    }

    /// Uploads a tile's model (NNEF, [`crate::export_tile`]) unless the worker has it
    /// cached; returns its reference.
    async fn upload_tile(&self, bytes: &[u8]) -> Result<ModelRef> {
        let tile = ModelRef {
            sha256: sha256_hex(bytes),
            input_shape: vec![],
            tile: true,
        };
        let mut raw = self.raw.clone();
        let cached = self
            .call("HasModel", self.timeout, raw.has_model(tile.clone()))
            .await?
            .cached;
        if !cached {
            self.upload_ref(tile.clone(), bytes).await?;
        }
        Ok(tile)
    }

    /// Streams `bytes` announced as `model`.
    async fn upload_ref(&self, model: ModelRef, bytes: &[u8]) -> Result<u64> {
        let chunks: Vec<ModelChunk> = bytes
            .chunks(CHUNK_BYTES)
            .enumerate()
            .map(|(i, c)| ModelChunk {
                model: (i == 0).then(|| model.clone()),
                data: c.to_vec(),
            })
            .collect();
        let chunks = if chunks.is_empty() {
            vec![ModelChunk {
                model: Some(model),
                data: vec![],
            }]
        } else {
            chunks
        };
        let timeout = self.timeout + Duration::from_secs_f64(bytes.len() as f64 / 50e6);
        let mut raw = self.raw.clone();
        let mut req = Request::new(tokio_stream::iter(chunks));
        req.set_timeout(timeout);
        let reply = self
            .call("UploadModel", timeout, raw.upload_model(req))
            .await?;
        Ok(reply.bytes)
    }

    /// Runs `spec` of `model` on input strips; returns the output strips and the compute
    /// time the worker measured.
    pub async fn run_tile(
        &self,
        model: &ModelId,
        spec: &TileSpec,
        inputs: &[Tensor],
    ) -> Result<TileResult> {
        let req = RunTileRequest {
            model: Some(model.to_proto()),
            tile_spec_json: serde_json::to_vec(spec)?,
            inputs: inputs.iter().map(to_wire).collect::<Result<_>>()?,
        };
        self.run_tile_raw(req).await
    }

    /// Sends a RunTile request as built by the caller.
    pub async fn run_tile_raw(&self, req: RunTileRequest) -> Result<TileResult> {
        let mut raw = self.raw.clone();
        let reply = self
            .call("RunTile", self.compute_timeout, raw.run_tile(req))
            .await?;
        let outputs = reply
            .outputs
            .iter()
            .map(from_wire)
            .collect::<Result<_>>()
            .with_context(|| format!("worker {}: decoding RunTile outputs", self.addr))?;
        Ok(TileResult {
            outputs,
            compute_us: reply.compute_us,
            host_us: reply.host_us,
            emulated: reply.emulated,
            host_gflops: (reply.emulated && reply.host_gflops > 0.0).then_some(reply.host_gflops),
        })
    }

    /// Runs `spec` of `model` `runs` times on inputs the worker makes up, after an
    /// untimed warm-up run if `warm_up`; returns the times. The deadline allows
    /// `runs + 1` runs, each within the compute timeout.
    pub async fn profile_stage(
        &self,
        model: &ModelId,
        spec: &TileSpec,
        runs: u32,
        warm_up: bool,
    ) -> Result<ProfileStageReply> {
        let req = ProfileStageRequest {
            model: Some(model.to_proto()),
            tile_spec_json: serde_json::to_vec(spec)?,
            runs,
            skip_warmup: !warm_up,
        };
        let timeout = self.compute_timeout * (runs + 1);
        let mut raw = self.raw.clone();
        let mut req = Request::new(req);
        req.set_timeout(timeout);
        self.call("ProfileStage", timeout, raw.profile_stage(req))
            .await
    }

    /// Gives the worker its `program` of a candidate of a plan for `model` (whose
    /// [`legion_ir::Shapes`] are `shapes_json`), the `tiles` it runs, built (each
    /// phase's model uploaded first unless cached), and how to reach the `peers` it
    /// sends to (name, `host:port`, pinned certificate); returns the program's id.
    pub async fn load_plan(
        &self,
        model: &ModelId,
        shapes_json: &[u8],
        program: &Program,
        tiles: &ShippedTiles,
        peers: Vec<Peer>,
    ) -> Result<String> {
        let req = self
            .plan_request(model, shapes_json, program, tiles, peers)
            .await?;
        // The board loads the tiles and runs each once before it answers.
        let timeout = self.timeout + self.compute_timeout * tiles.tiles.len() as u32;
        let mut raw = self.raw.clone();
        Ok(self
            .call("LoadPlan", timeout, raw.load_plan(req))
            .await?
            .program)
    }

    /// The LoadPlan request of [`WorkerClient::load_plan`], with the tiles' models
    /// uploaded.
    pub async fn plan_request(
        &self,
        model: &ModelId,
        shapes_json: &[u8],
        program: &Program,
        tiles: &ShippedTiles,
        peers: Vec<Peer>,
    ) -> Result<LoadPlanRequest> {
        let mut tile_models = vec![];
        for (phases, (group, tile, _)) in tiles.phases.iter().zip(&tiles.tiles) {
            let mut refs = vec![];
            for bytes in phases {
                refs.push(self.upload_tile(bytes).await.with_context(|| {
                    format!("uploading the model of tile {tile} of group {group}")
                })?);
            }
            tile_models.push(TileModels { phases: refs });
        }
        Ok(LoadPlanRequest {
            model: Some(model.to_proto()),
            plan_version: PLAN_VERSION,
            program_json: serde_json::to_vec(program)?,
            tiles_json: serde_json::to_vec(&tiles.tiles)?,
            peers,
            shapes_json: shapes_json.to_vec(),
            tile_models,
        })
    }

    /// Runs a loaded program once; the deadline allows its receives to wait `wait` and
    /// its tiles to run within the compute timeout each.
    pub async fn run_program(
        &self,
        req: RunProgramRequest,
        runs: u32,
        wait: Duration,
    ) -> Result<RunProgramReply> {
        let timeout = self.compute_timeout * runs.max(1) + wait;
        let mut raw = self.raw.clone();
        let mut req = Request::new(req);
        req.set_timeout(timeout);
        self.call("RunProgram", timeout, raw.run_program(req)).await
    }

    /// Pushes rows to the worker (a board passing rows to the next).
    pub async fn push_rows(&self, rows: WireRows) -> Result<()> {
        let mut raw = self.raw.clone();
        self.call("PushRows", self.timeout, raw.push_rows(rows))
            .await
            .map(|_| ())
    }

    /// Sends `n` bytes and gets them back; returns the round-trip time.
    pub async fn probe_transfer(&self, n: usize) -> Result<Duration> {
        let mut raw = self.raw.clone();
        let start = std::time::Instant::now();
        let reply = self
            .call(
                "ProbeTransfer",
                self.timeout,
                raw.probe_transfer(ProbeRequest {
                    payload: vec![0x5a; n],
                }),
            )
            .await?;
        anyhow::ensure!(
            reply.payload.len() == n,
            "worker {}: ProbeTransfer echoed {} bytes of {n}",
            self.addr,
            reply.payload.len()
        );
        Ok(start.elapsed())
    }
}
