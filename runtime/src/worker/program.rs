//! Programs on a board (docs/plan.md, "programs"): LoadPlan keeps the board's program
//! of a plan's candidate with the tiles it runs and connections to the boards it sends
//! to; RunProgram runs it once per inference; PushRows delivers rows from another
//! board to the receive step waiting for them.

use super::{Worker, check_sha, lock, tile_key, tile_key_text, validate};
use crate::WorkerClient;
use crate::proto::{
    LoadPlanReply, LoadPlanRequest, ModelRef, PushRowsReply, Rows as WireRows, RunProgramReply,
    RunProgramRequest,
};
use crate::tensors::{Tensors, tensor_bytes};
use crate::wire::{Part, hex, rows_from_wire, rows_to_wire};
use legion_ir::{Combine, Ir, Rows, StageId, TensorRef};
use legion_plan::{PLAN_VERSION, Party, Program, Step, TileSpec};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Status;
use tract_onnx::prelude::Tensor;

/// Programs a worker keeps loaded (a plan's candidates, a few plans).
pub(super) const LOADED_PROGRAMS: usize = 16;

/// A board's program of one candidate, ready to run.
pub(super) struct Loaded {
    /// The model's stages and shapes (not its weights: the tiles come built).
    ir: Arc<Ir>,
    /// This board's name in the plan.
    name: String,
    program: Program,
    /// Each tile it runs, by (group, tile), cut into its phases ([`TileSpec::phases`]).
    tiles: HashMap<(usize, usize), Phased>,
    /// The boards it sends to.
    peers: HashMap<String, WorkerClient>,
    /// Per tensor, the rows it ever holds: all that is stored of it.
    windows: HashMap<TensorRef, Rows>,
}

/// Every program loaded in this process: local workers share a cache directory, so a
/// worker pruning it must spare the tiles of the others' programs too.
static LOADED: std::sync::Mutex<Vec<std::sync::Weak<Loaded>>> = std::sync::Mutex::new(vec![]);

/// The sha256 of every tile model a program loaded in this process runs.
pub(super) fn tiles_in_use() -> std::collections::HashSet<String> {
    let mut loaded = lock(&LOADED);
    loaded.retain(|l| l.strong_count() > 0);
    loaded
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .flat_map(|l| {
            l.tiles
                .values()
                .flat_map(|t| t.phases.iter().map(|p| p.model.sha256.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A tile and its phases.
struct Phased {
    /// The reducing stages whose partial results the tile computes.
    partials: Vec<StageId>,
    phases: Vec<Phase>,
}

/// A phase of a tile: what it runs, and its model as shipped (NNEF, by sha256).
#[derive(Clone)]
struct Phase {
    spec: TileSpec,
    model: ModelRef,
}

/// Drops a RunProgram call's rows still in the mailbox when the call ends (run,
/// failed or cancelled by its caller): rows that arrive too late are not kept.
struct MailboxCleared<'a> {
    worker: &'a Worker,
    program: &'a str,
    inference: u64,
}

impl Drop for MailboxCleared<'_> {
    fn drop(&mut self) {
        lock(&self.worker.mailbox).retain(|k, _| !(k.0 == self.program && k.1 == self.inference));
    }
}

/// Rows waiting in the mailbox: program, inference, sender, and the part.
pub(super) type MailKey = (String, u64, String, Part);

/// Decodes rows on the wire; bad rows are the caller's error.
fn rows_of(ir: &Ir, m: &WireRows) -> Result<(Part, Tensor), Status> {
    rows_from_wire(ir, m).map_err(|e| Status::invalid_argument(format!("{e:#}")))
}

impl Worker {
    /// LoadPlan: checks the program against the model and the plan version, connects to
    /// the boards it sends to, builds its tiles and runs each once on made-up inputs,
    /// and keeps it under an id.
    pub(super) async fn load_plan(
        self: &Arc<Self>,
        req: LoadPlanRequest,
    ) -> Result<LoadPlanReply, Status> {
        if req.plan_version != PLAN_VERSION {
            return Err(Status::failed_precondition(format!(
                "the program follows plan format {}, this worker runs format {PLAN_VERSION}; \
                 use the same legion version on the coordinator and the boards",
                req.plan_version
            )));
        }
        let model = req
            .model
            .ok_or_else(|| Status::invalid_argument("LoadPlan without a model"))?;
        let shapes: legion_ir::Shapes = serde_json::from_slice(&req.shapes_json)
            .map_err(|e| Status::invalid_argument(format!("bad shapes JSON: {e}")))?;
        if shapes.sha256 != model.sha256 {
            return Err(Status::invalid_argument(format!(
                "the shapes are of model {}, the plan of model {}",
                shapes.sha256, model.sha256
            )));
        }
        let ir = Ir::from_shapes(shapes)
            .map_err(|e| Status::invalid_argument(format!("bad shapes: {e}")))?;
        let ir = Arc::new(ir);
        let program: Program = serde_json::from_slice(&req.program_json)
            .map_err(|e| Status::invalid_argument(format!("bad program JSON: {e}")))?;
        let Party::Device(name) = program.party.clone() else {
            return Err(Status::invalid_argument(
                "a board cannot run the coordinator's program",
            ));
        };
        let tiles: Vec<(usize, usize, TileSpec)> = serde_json::from_slice(&req.tiles_json)
            .map_err(|e| Status::invalid_argument(format!("bad tiles JSON: {e}")))?;
        if req.tile_models.len() != tiles.len() {
            return Err(Status::invalid_argument(format!(
                "{} tiles given with the models of {}",
                tiles.len(),
                req.tile_models.len()
            )));
        }
        let mut phased_tiles = HashMap::new();
        for ((group, tile, spec), models) in tiles.into_iter().zip(req.tile_models) {
            validate(&ir, &spec)?;
            let phases = spec.phases(&ir);
            if models.phases.len() != phases.len() {
                return Err(Status::invalid_argument(format!(
                    "tile {tile} of group {group} has {} phases, {} models given",
                    phases.len(),
                    models.phases.len()
                )));
            }
            for model in &models.phases {
                check_sha(&model.sha256)?;
                if !model.tile {
                    return Err(Status::invalid_argument(format!(
                        "tile {tile} of group {group}: {} is not a tile's model",
                        model.sha256
                    )));
                }
            }
            let phases = phases
                .into_iter()
                .zip(models.phases)
                .map(|(p, model)| Phase {
                    spec: p.spec,
                    model,
                })
                .collect();
            let phased = Phased {
                partials: spec.partials().collect(),
                phases,
            };
            phased_tiles.insert((group, tile), phased);
        }
        let tiles = phased_tiles;
        let addresses: HashMap<&str, &crate::proto::Peer> =
            req.peers.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut peers = HashMap::new();
        for step in &program.steps {
            match step {
                Step::Run { group, tile, phase } => match tiles.get(&(*group, *tile)) {
                    None => {
                        return Err(Status::invalid_argument(format!(
                            "{name}'s program runs tile {tile} of group {group}, which was not \
                             given"
                        )));
                    }
                    Some(t) if *phase >= t.phases.len() => {
                        return Err(Status::invalid_argument(format!(
                            "{name}'s program runs phase {phase} of tile {tile} of group \
                             {group}, which has {} phases",
                            t.phases.len()
                        )));
                    }
                    Some(_) => {}
                },
                Step::Send {
                    to: Party::Device(peer),
                    ..
                }
                | Step::Share {
                    to: Party::Device(peer),
                    ..
                } if !peers.contains_key(peer) => {
                    let to = addresses.get(peer.as_str()).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "{name}'s program sends to {peer}, whose address was not given"
                        ))
                    })?;
                    let pinned = (!to.tls_cert_pem.is_empty()).then_some(&to.tls_cert_pem[..]);
                    let client = WorkerClient::connect(
                        &to.address,
                        self.config.token.as_deref(),
                        pinned,
                        PEER_TIMEOUT,
                    )
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!("{name}: connecting to {peer}: {e:#}"))
                    })?;
                    peers.insert(peer.clone(), client);
                }
                _ => {}
            }
        }
        let windows = windows(&program, &tiles);
        // A board whose memory cannot hold the program's tiles refuses it rather than
        // run out of memory loading them, or load them again on every run.
        let mut phases: Vec<(u64, Phase)> = tiles
            .values()
            .flat_map(|t| &t.phases)
            .map(|p| {
                let size = std::fs::metadata(self.cached_path(&p.model)).map_or(0, |m| m.len());
                (size, p.clone())
            })
            .collect();
        let bytes: u64 = phases.iter().map(|(size, _)| size).sum();
        let limit = self.config.limits.tiles_bytes;
        if bytes > limit {
            return Err(Status::resource_exhausted(format!(
                "{name}: the program's tiles hold {} MiB, more than the {} MiB this board \
                 keeps (legion worker --max-tiles-mb; the cluster file's memory_mb); \
                 compile for more boards or give this one more memory",
                bytes >> 20,
                limit >> 20
            )));
        }
        // Loaded and run once now, so that the program's first run (after a re-plan, the
        // one that recovers an inference) waits for neither; an emulated board's first
        // runs of a tile also settle its time here. The largest first: loading briefly
        // takes a few times a tile's weights, best done while little else is held.
        phases.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
        let phases: Vec<Phase> = phases.into_iter().map(|(_, p)| p).collect();
        let (worker, warm_ir) = (self.clone(), ir.clone());
        tokio::task::spawn_blocking(move || worker.warm_up(&warm_ir, &phases))
            .await
            .map_err(|e| Status::internal(format!("{name}: loading the tiles failed: {e}")))??;
        let mut id = Sha256::new();
        id.update(model.sha256.as_bytes());
        id.update(&req.shapes_json);
        id.update(&req.program_json);
        id.update(&req.tiles_json);
        let mut shipped: Vec<&str> = tiles
            .values()
            .flat_map(|t| t.phases.iter().map(|p| p.model.sha256.as_str()))
            .collect();
        shipped.sort_unstable();
        for sha in shipped {
            id.update(sha.as_bytes());
        }
        let id = hex(&id.finalize())[..16].to_string();
        let loaded = Loaded {
            ir,
            name,
            program,
            tiles,
            peers,
            windows,
        };
        let loaded = Arc::new(loaded);
        lock(&LOADED).push(Arc::downgrade(&loaded));
        lock(&self.programs).insert(id.clone(), loaded, 0);
        Ok(LoadPlanReply { program: id })
    }

    /// PushRows: keeps the rows for the receive step that waits for them.
    pub(super) fn push_rows(&self, m: WireRows) -> Result<PushRowsReply, Status> {
        let loaded = self.loaded(&m.program)?;
        let ((tensor, rows, channels), strip) = rows_of(&loaded.ir, &m)?;
        let from = Party::Device(m.from.clone());
        let expected = loaded.program.steps.iter().any(|s| match s {
            Step::Receive {
                tensor: t,
                rows: r,
                channels: c,
                from: f,
            } => !m.partial && *t == tensor && *r == rows && *c == channels && *f == from,
            Step::Combine { stage, parts } => {
                m.partial
                    && tensor == TensorRef::Stage(*stage)
                    && rows == Rows::new(0, 1)
                    && parts.contains(&from)
            }
            _ => false,
        });
        if !expected {
            let what = if m.partial { "partial result" } else { "rows" };
            return Err(Status::invalid_argument(format!(
                "{}'s program receives no {what} {rows} of {tensor:?} from {}",
                loaded.name, m.from
            )));
        }
        let key = (
            m.program.clone(),
            m.inference,
            m.from.clone(),
            (tensor, rows, channels),
        );
        let mut mailbox = lock(&self.mailbox);
        let mut pending: Vec<u64> = mailbox
            .keys()
            .filter(|k| k.0 == m.program)
            .map(|k| k.1)
            .collect();
        pending.sort_unstable();
        pending.dedup();
        if pending.len() >= MAX_PENDING_INFERENCES && !pending.contains(&m.inference) {
            return Err(Status::resource_exhausted(format!(
                "{} holds rows of {MAX_PENDING_INFERENCES} inferences of program {} that have \
                 not run; refusing rows of inference {}",
                loaded.name, m.program, m.inference
            )));
        }
        if mailbox.insert(key, strip).is_some() {
            return Err(Status::already_exists(format!(
                "rows {rows} of {tensor:?} from {} for inference {} arrived twice",
                m.from, m.inference
            )));
        }
        drop(mailbox);
        self.arrived.notify_waiters();
        Ok(PushRowsReply {})
    }

    /// Loads each tile of `phases`, in order, and runs it once on made-up inputs;
    /// blocking.
    fn warm_up(&self, ir: &Ir, phases: &[Phase]) -> Result<(), Status> {
        for Phase { spec, model } in phases {
            let key = tile_key(model, spec)?;
            let tile = self.shipped_tile(&key, model, spec)?;
            let inputs = (0..spec.inputs.len())
                .map(|i| crate::check::test_input(&spec.input_shape(ir, i)))
                .collect();
            self.config
                .compute
                .run_tile(&tile_key_text(&key), &tile, inputs)?;
        }
        Ok(())
    }

    fn loaded(&self, id: &str) -> Result<Arc<Loaded>, Status> {
        lock(&self.programs)
            .get(&id.to_string())
            .ok_or_else(|| Status::failed_precondition(format!("no program {id}; LoadPlan first")))
    }

    /// Waits for rows from another board until `until`.
    async fn receive(&self, key: MailKey, until: Instant, me: &str) -> Result<Tensor, Status> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(t) = lock(&self.mailbox).remove(&key) {
                return Ok(t);
            }
            if tokio::time::timeout_at(until.into(), arrived)
                .await
                .is_err()
            {
                let (_, inference, from, (tensor, rows, _)) = key;
                return Err(Status::deadline_exceeded(format!(
                    "{me}: rows {rows} of {tensor:?} from {from} did not arrive \
                     (inference {inference})"
                )));
            }
        }
    }

    /// RunProgram: runs the loaded program once. Runs of other inferences may go on
    /// at the same time (a stream of frames): their tiles take turns on the board's
    /// compute ([`super::ComputeTurns`]).
    pub(super) async fn run_program(
        self: &Arc<Self>,
        req: RunProgramRequest,
    ) -> Result<RunProgramReply, Status> {
        let started = Instant::now();
        let loaded = self.loaded(&req.program)?;
        let _cleared = MailboxCleared {
            worker: self,
            program: &req.program,
            inference: req.inference,
        };
        let mut reply = self.run_loaded(&loaded, &req).await?;
        reply.wall_us = started.elapsed().as_micros() as u64;
        Ok(reply)
    }

    async fn run_loaded(
        self: &Arc<Self>,
        loaded: &Loaded,
        req: &RunProgramRequest,
    ) -> Result<RunProgramReply, Status> {
        let ir = &loaded.ir;
        let me = loaded.name.as_str();
        let until = Instant::now() + Duration::from_millis(req.receive_timeout_ms.max(1));
        let mut from_coordinator: HashMap<Part, Tensor> = HashMap::new();
        for m in &req.inputs {
            let (part, strip) = rows_of(ir, m)?;
            from_coordinator.insert(part, strip);
        }
        let stored = |e: anyhow::Error| Status::internal(format!("{me}: {e:#}"));
        let mut tensors = Tensors::windowed(ir, loaded.windows.clone());
        let mut reply = RunProgramReply {
            emulated: self.config.compute.emulated(),
            ..Default::default()
        };
        let mut pushes = tokio::task::JoinSet::new();
        // This board's partial results of reductions, by stage.
        let mut partials: HashMap<StageId, Tensor> = HashMap::new();
        // The partial products of a tile in parts so far, by stage, in phase order.
        let mut products: HashMap<StageId, Vec<Tensor>> = HashMap::new();
        let peer_program = |peer: &str| {
            req.peer_programs.get(peer).cloned().ok_or_else(|| {
                Status::invalid_argument(format!("{me}: no program id of {peer} given"))
            })
        };
        for step in &loaded.program.steps {
            let mut compute_us = 0;
            let mut host_gflops = 0.0;
            match step {
                Step::Receive {
                    tensor,
                    rows,
                    channels,
                    from: Party::Coordinator,
                } => {
                    let part = (*tensor, *rows, *channels);
                    let strip = from_coordinator.remove(&part).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "{me}: the coordinator did not send rows {rows} of {tensor:?}"
                        ))
                    })?;
                    tensors
                        .put_part(*tensor, *rows, *channels, strip)
                        .map_err(stored)?;
                }
                Step::Receive {
                    tensor,
                    rows,
                    channels,
                    from: Party::Device(peer),
                } => {
                    let part = (*tensor, *rows, *channels);
                    let key = (req.program.clone(), req.inference, peer.clone(), part);
                    let strip = self.receive(key, until, me).await?;
                    tensors
                        .put_part(*tensor, *rows, *channels, strip)
                        .map_err(stored)?;
                }
                Step::Run { group, tile, phase } => {
                    let phased = &loaded.tiles[&(*group, *tile)];
                    let Phase { spec, model } = &phased.phases[*phase];
                    let inputs = match spec.stages.iter().find(|s| s.summed) {
                        Some(s) => {
                            let parts = products.remove(&s.stage).unwrap_or_default();
                            vec![crate::combine(Combine::Sum, &parts).map_err(stored)?]
                        }
                        None => spec
                            .inputs
                            .iter()
                            .map(|i| tensors.strip(i.tensor, i.rows))
                            .collect::<anyhow::Result<Vec<_>>>()
                            .map_err(stored)?,
                    };
                    let part = spec.stages.iter().any(|s| s.part.is_some());
                    let key = tile_key(model, spec)?;
                    let tile = self.shipped_tile(&key, model, spec)?;
                    let worker = self.clone();
                    // Held until the tile is done, even if this call is cancelled.
                    let turn = self.compute_turns.take(req.inference).await;
                    let (outputs, time) = tokio::task::spawn_blocking(move || {
                        let _turn = turn;
                        worker
                            .config
                            .compute
                            .run_tile(&tile_key_text(&key), &tile, inputs)
                    })
                    .await
                    .map_err(|e| Status::internal(format!("{me}: the tile task failed: {e}")))??;
                    for (out, strip) in spec.outputs.iter().zip(outputs) {
                        if part {
                            products.entry(out.stage).or_default().push(strip);
                            continue;
                        }
                        if phased.partials.contains(&out.stage) {
                            partials.insert(out.stage, strip);
                            continue;
                        }
                        let t = TensorRef::Stage(out.stage);
                        tensors
                            .put_part(t, out.rows, out.channels, strip)
                            .map_err(stored)?;
                    }
                    compute_us = time.compute.as_micros() as u64;
                    host_gflops = time.host_gflops.unwrap_or(0.0);
                }
                Step::Send {
                    tensor,
                    rows,
                    channels,
                    to,
                } => {
                    let strip = tensors.part(*tensor, *rows, *channels).map_err(stored)?;
                    let part = (*tensor, *rows, *channels);
                    let mut m = rows_to_wire(String::new(), req.inference, me, part, &strip)
                        .map_err(stored)?;
                    match to {
                        Party::Coordinator => reply.outputs.push(m),
                        Party::Device(peer) => {
                            m.program = peer_program(peer)?;
                            let what = format!("{me}: sending rows {rows} of {tensor:?} to {peer}");
                            spawn_push(&mut pushes, loaded.peers[peer].clone(), m, what);
                        }
                    }
                }
                Step::Share { stage, to } => {
                    let Party::Device(peer) = to else {
                        return Err(Status::invalid_argument(format!(
                            "{me}: a partial result goes to a board, not to {to}"
                        )));
                    };
                    let partial = partials.get(stage).ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "{me}: shares a partial result of stage {stage} it did not compute"
                        ))
                    })?;
                    let part = (TensorRef::Stage(*stage), Rows::new(0, 1), None);
                    let mut m = rows_to_wire(peer_program(peer)?, req.inference, me, part, partial)
                        .map_err(stored)?;
                    m.partial = true;
                    let what = format!("{me}: sending its partial of stage {stage} to {peer}");
                    spawn_push(&mut pushes, loaded.peers[peer].clone(), m, what);
                }
                Step::Combine { stage, parts } => {
                    let how = ir.stage(*stage).partial.ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "{me}: stage {stage} is not a reduction whose partials combine"
                        ))
                    })?;
                    let whole = (TensorRef::Stage(*stage), Rows::new(0, 1), None);
                    let mut got = Vec::with_capacity(parts.len());
                    for party in parts {
                        got.push(match party {
                            Party::Device(d) if d == me => {
                                partials.remove(stage).ok_or_else(|| {
                                    Status::invalid_argument(format!(
                                        "{me}: combines its partial of stage {stage}, which it \
                                         did not compute"
                                    ))
                                })?
                            }
                            Party::Device(peer) => {
                                let key = (req.program.clone(), req.inference, peer.clone(), whole);
                                self.receive(key, until, me).await?
                            }
                            Party::Coordinator => {
                                return Err(Status::invalid_argument(format!(
                                    "{me}: the coordinator has no partial results"
                                )));
                            }
                        });
                    }
                    let combined = crate::combine(how, &got).map_err(stored)?;
                    tensors
                        .put_part(whole.0, whole.1, None, combined)
                        .map_err(stored)?;
                }
                Step::Drop { tensor } => tensors.remove(*tensor),
            }
            reply.compute_us.push(compute_us);
            reply.host_gflops.push(host_gflops);
            let waiting: u64 = from_coordinator.values().map(tensor_bytes).sum::<u64>()
                + lock(&self.mailbox)
                    .iter()
                    .filter(|(k, _)| k.0 == req.program && k.1 == req.inference)
                    .map(|(_, t)| tensor_bytes(t))
                    .sum::<u64>();
            reply.peak_held_bytes = reply.peak_held_bytes.max(tensors.bytes() + waiting);
        }
        while let Some(done) = pushes.join_next().await {
            done.map_err(|e| Status::internal(format!("{me}: a send task failed: {e}")))?
                .map_err(Status::unavailable)?;
        }
        Ok(reply)
    }
}

/// Pushes `m` to a peer in the background; a failure names `what`.
fn spawn_push(
    pushes: &mut tokio::task::JoinSet<Result<(), String>>,
    client: WorkerClient,
    m: WireRows,
    what: String,
) {
    pushes.spawn(async move {
        client
            .push_rows(m)
            .await
            .map_err(|e| format!("{what}: {e:#}"))
    });
}

/// Per tensor, the hull of the rows `program` puts of it (received or computed by its
/// runs): a board stores only those rows.
fn windows(program: &Program, tiles: &HashMap<(usize, usize), Phased>) -> HashMap<TensorRef, Rows> {
    let mut windows: HashMap<TensorRef, Rows> = HashMap::new();
    let mut hold = |t: TensorRef, rows: Rows| {
        if !rows.is_empty() {
            windows
                .entry(t)
                .and_modify(|w| *w = w.hull(rows))
                .or_insert(rows);
        }
    };
    for step in &program.steps {
        match step {
            Step::Receive { tensor, rows, .. } => hold(*tensor, *rows),
            Step::Run { group, tile, phase } => {
                let phased = &tiles[&(*group, *tile)];
                for out in &phased.phases[*phase].spec.outputs {
                    if !phased.partials.contains(&out.stage) {
                        hold(TensorRef::Stage(out.stage), out.rows);
                    }
                }
            }
            Step::Combine { stage, .. } => hold(TensorRef::Stage(*stage), Rows::new(0, 1)),
            Step::Send { .. } | Step::Share { .. } | Step::Drop { .. } => {}
        }
    }
    windows
}

/// Inferences of one program whose rows a board buffers before they run; rows of more
/// are refused, so a peer cannot fill the board's memory.
const MAX_PENDING_INFERENCES: usize = 16;

/// Deadline of a connection to another board and of one PushRows call.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);
