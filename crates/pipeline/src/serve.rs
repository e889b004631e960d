//! Serving a stream of frames (docs/architecture.md, "Serving a stream"): a long-lived
//! coordinator takes frames over gRPC (the `Inference` service), queues them, and each
//! sub-cluster of a serving plan takes the next frame as soon as it is free, running
//! its plan through [`Resilient`]. A frame whose sub-cluster fails it goes back to the
//! front of the queue for another; a full queue refuses a frame at once.

use crate::{BadInput, CompileOptions, Resilient, Started};
use anyhow::{Context, Result};
use legion_ir::Ir;
use legion_plan::{Candidate, Clock, Plan, Profile, ServingPlan};
use legion_runtime::proto::inference_server::{Inference, InferenceServer};
use legion_runtime::proto::{F32Tensor, InferReply, InferRequest};
use legion_runtime::{Coordinator, PlanRun};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tonic::{Request, Response, Status};
use tract_onnx::prelude::Tensor;

/// Sub-clusters a frame is given to before it is answered UNAVAILABLE.
pub const FRAME_ATTEMPTS: u32 = 3;

/// How often the server logs its throughput and latency.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// How a serving coordinator runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Frames waiting at most; one more is refused with RESOURCE_EXHAUSTED.
    pub queue: usize,
    /// The Bearer token callers must present, if any.
    pub token: Option<String>,
    /// Keep a plan for each board's loss loaded in every sub-cluster
    /// ([`Resilient::prepare_standby`]).
    pub standby: bool,
    /// Serve TLS with this certificate and key (callers pin the certificate).
    pub tls: Option<legion_runtime::tls::WorkerIdentity>,
    /// Frames in flight per sub-cluster, instead of the serving plan's: each board
    /// works on every frame in flight, the oldest frame's ready tile first (boards
    /// running their programs); 1 runs one frame after the other.
    pub depth: Option<usize>,
    /// Keep every frame's run in [`Served::runs`] (for the emulated clock's stream
    /// timeline, [`Coordinator::stream_times`]).
    pub keep_runs: bool,
    /// Re-plan a sub-cluster around a board slower than profiled
    /// ([`Resilient::keep_plan_for_stragglers`] when not).
    pub replan_stragglers: bool,
}

/// What a serving coordinator did, when it stops.
#[derive(Clone, Debug, Default)]
pub struct Served {
    /// Frames answered with outputs.
    pub answered: u64,
    /// Frames refused because the queue was full.
    pub refused: u64,
    /// Frames answered UNAVAILABLE after [`FRAME_ATTEMPTS`] sub-clusters failed them.
    pub failed: u64,
    /// Frames given to another sub-cluster after one failed them.
    pub retried: u64,
    /// Wall latency of every answered frame, from arrival to reply, µs.
    pub latencies_us: Vec<u64>,
    /// With [`ServeOptions::keep_runs`]: per sub-cluster, in the order the frames
    /// started, each answered frame's run (outputs dropped) and the candidate it ran.
    pub runs: BTreeMap<String, Vec<KeptRun>>,
}

/// A frame's run, kept by [`ServeOptions::keep_runs`].
#[derive(Clone, Debug)]
pub struct KeptRun {
    /// The candidate whose programs ran it.
    pub candidate: Arc<Candidate>,
    /// Its run, without the outputs.
    pub run: PlanRun,
    /// Whether it started while the frame before it on this sub-cluster was running.
    pub overlapped: bool,
}

impl Served {
    /// The `q` quantile (0..=1) of the answered frames' latencies, µs; 0 with none.
    pub fn latency_quantile_us(&self, q: f64) -> u64 {
        crate::quantile(&self.latencies_us, q).unwrap_or(0)
    }
}

/// A serving plan, or a plan for the whole cluster as the one sub-cluster of one.
pub fn serving_plan_of(text: &str) -> Result<ServingPlan, String> {
    if let Ok(plan) = ServingPlan::from_json(text) {
        return Ok(plan);
    }
    let plan =
        Plan::from_json(text).map_err(|e| format!("neither a serving plan nor a plan: {e}"))?;
    Ok(ServingPlan::one(plan))
}

/// A frame waiting for, or held by, a sub-cluster.
struct Frame {
    id: String,
    input: Tensor,
    arrived: Instant,
    /// Sub-clusters that failed it so far.
    failures: u32,
    reply: oneshot::Sender<Result<InferReply, Status>>,
}

/// The frames waiting, in order; retried frames go first.
struct Queue {
    frames: Mutex<VecDeque<Frame>>,
    ready: Notify,
    capacity: usize,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Frame>> {
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a new frame; false (the frame dropped) when the queue is full.
    fn push(&self, frame: Frame) -> bool {
        let mut frames = self.lock();
        if frames.len() >= self.capacity {
            return false;
        }
        frames.push_back(frame);
        drop(frames);
        self.ready.notify_one();
        true
    }

    /// Puts a frame a sub-cluster failed back at the front.
    fn retry(&self, frame: Frame) {
        self.lock().push_front(frame);
        self.ready.notify_one();
    }

    /// The next frame, if one waits.
    fn try_pop(&self) -> Option<Frame> {
        self.lock().pop_front()
    }

    async fn pop(&self) -> Frame {
        loop {
            let ready = self.ready.notified();
            if let Some(frame) = self.lock().pop_front() {
                return frame;
            }
            ready.await;
        }
    }
}

/// The gRPC face: checks a frame and queues it.
struct Frontend {
    queue: Arc<Queue>,
    input_shape: Vec<usize>,
    served: Arc<Mutex<Served>>,
}

#[tonic::async_trait]
impl Inference for Frontend {
    async fn infer(&self, req: Request<InferRequest>) -> Result<Response<InferReply>, Status> {
        let req = req.into_inner();
        let input = req
            .input
            .as_ref()
            .ok_or_else(|| Status::invalid_argument(format!("frame {}: no input", req.id)))?;
        let input = legion_runtime::from_wire(input)
            .map_err(|e| Status::invalid_argument(format!("frame {}: {e:#}", req.id)))?;
        if input.shape() != self.input_shape.as_slice() {
            return Err(Status::invalid_argument(format!(
                "frame {}: input of shape {:?}, but the model takes {:?}",
                req.id,
                input.shape(),
                self.input_shape
            )));
        }
        let (reply, answer) = oneshot::channel();
        let frame = Frame {
            id: req.id.clone(),
            input,
            arrived: Instant::now(),
            failures: 0,
            reply,
        };
        if !self.queue.push(frame) {
            lock(&self.served).refused += 1;
            return Err(Status::resource_exhausted(format!(
                "frame {}: {} frames are waiting already; send it again later",
                req.id, self.queue.capacity
            )));
        }
        match answer.await {
            Ok(reply) => reply.map(Response::new),
            Err(_) => Err(Status::unavailable(
                "the server stopped before the frame ran",
            )),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves frames on `listener` until `shutdown` resolves: each sub-cluster of `plan`
/// (its boards on `coord`, the model uploaded as `onnx`) runs the frames it takes
/// through its own [`Resilient`], re-planned from `profile` when boards fail. Frames
/// still waiting at shutdown are answered UNAVAILABLE.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    coord: &Coordinator,
    ir: &Ir,
    onnx: &[u8],
    plan: &ServingPlan,
    profile: &Profile,
    compile: CompileOptions,
    options: &ServeOptions,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<Served> {
    if options.queue == 0 {
        return Err(BadInput("the queue must hold at least 1 frame".into()).into());
    }
    if plan.input_shape != ir.input.shape {
        return Err(BadInput(format!(
            "the serving plan is for input shape {:?}, the model takes {:?}",
            plan.input_shape, ir.input.shape
        ))
        .into());
    }
    let mut runners = vec![];
    for sub in &plan.sub_clusters {
        let ids = sub
            .boards
            .iter()
            .map(|b| {
                coord.id_of(b).ok_or_else(|| {
                    BadInput(format!("sub-cluster board {b} is not in the cluster file"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sub_coord = coord.only(&ids)?;
        let cut = crate::boards_of(profile, sub_coord.cluster())?;
        let depth = options.depth.unwrap_or(sub.depth);
        runners.push((
            sub.boards.join(","),
            sub_coord,
            cut,
            sub.plan.clone(),
            depth,
        ));
    }
    let queue = Arc::new(Queue {
        frames: Mutex::new(VecDeque::new()),
        ready: Notify::new(),
        capacity: options.queue,
    });
    let served = Arc::new(Mutex::new(Served::default()));
    let frontend = Frontend {
        queue: queue.clone(),
        input_shape: ir.input.shape.clone(),
        served: served.clone(),
    };
    let token = options.token.clone();
    let service = tonic::service::interceptor::InterceptedService::new(
        InferenceServer::new(frontend)
            .max_decoding_message_size(legion_runtime::Limits::default().message_bytes)
            .max_encoding_message_size(legion_runtime::Limits::default().message_bytes),
        move |req: Request<()>| {
            legion_runtime::authorize(token.as_deref(), &req)?;
            Ok(req)
        },
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = &options.tls {
        builder = builder
            .tls_config(identity.server_config())
            .context("the serving coordinator's certificate and key")?;
    }
    let server = builder.add_service(service).serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        shutdown,
    );
    // Every sub-cluster warms up before any takes a frame: a frame run beside the
    // warm-ups of the others would wait behind them.
    let warm = tokio::sync::Barrier::new(runners.len());
    let mut drains = vec![];
    for (name, sub_coord, cut, sub_plan, depth) in &runners {
        let mut runner = Resilient::new(
            sub_coord,
            ir,
            onnx,
            cut.clone(),
            sub_plan.clone(),
            compile.clone(),
        )?;
        if !options.replan_stragglers {
            runner.keep_plan_for_stragglers();
        }
        drains.push(drain(runner, name, *depth, options, &warm, &queue, &served));
    }
    // The sub-clusters take frames until the server has answered every call it
    // accepted (a graceful shutdown waits for them); then they are dropped.
    tokio::select! {
        result = server => result.context("serving frames")?,
        result = futures_util::future::try_join_all(drains) => {
            result?;
        }
        () = report_every(served.clone()) => {}
    }
    for frame in lock(&queue.frames).drain(..) {
        let _ = frame.reply.send(Err(Status::unavailable(
            "the server stopped before the frame ran",
        )));
    }
    let served = lock(&served).clone();
    Ok(served)
}

/// One sub-cluster: loads its plan (and its standby plans) and runs it once on made-up
/// input, waits at `warm` for the other sub-clusters to do so, then takes the next
/// frame whenever it has room for one, up to `depth` in flight; returns only on an
/// error loading its standby plans.
#[allow(clippy::too_many_arguments)]
async fn drain(
    mut runner: Resilient<'_>,
    name: &str,
    depth: usize,
    options: &ServeOptions,
    warm: &tokio::sync::Barrier,
    queue: &Queue,
    served: &Mutex<Served>,
) -> Result<()> {
    let loaded = if options.standby {
        runner
            .prepare_standby()
            .await
            .with_context(|| format!("loading standby plans on {name}"))
            .map(|_| ())
    } else {
        Ok(())
    };
    if loaded.is_ok()
        && let Err(e) = runner.warm_up().await
    {
        // The first frame finds out what is wrong, and recovers.
        tracing::warn!(sub_cluster = name, "{e:#}");
    }
    warm.wait().await;
    loaded?;
    let keep = options.keep_runs;
    let depth = if runner.pipelines() { depth } else { 1 };
    if depth <= 1 {
        loop {
            let frame = queue.pop().await;
            run_frame(&mut runner, name, frame, queue, served, keep).await;
        }
    }
    // Frames in flight, oldest first.
    let mut window: VecDeque<InFlight<'_>> = VecDeque::new();
    loop {
        let mut failed = None;
        if window.is_empty() {
            let frame = queue.pop().await;
            failed = start_frame(&mut runner, name, frame, &mut window, 0).await;
        }
        while failed.is_none() && window.len() < depth {
            let Some(frame) = queue.try_pop() else { break };
            let ahead = window.len();
            failed = start_frame(&mut runner, name, frame, &mut window, ahead).await;
        }
        if let Some(frame) = failed {
            recover_stream(
                &mut runner,
                name,
                vec![frame],
                &mut window,
                queue,
                served,
                keep,
            )
            .await;
            continue;
        }
        let Some(mut oldest) = window.pop_front() else {
            continue;
        };
        // While the oldest runs, a frame that arrives joins if there is room.
        let result = loop {
            let ahead = window.len() + 1;
            if ahead >= depth {
                break (&mut oldest.run).await;
            }
            tokio::select! {
                result = &mut oldest.run => break result,
                next = queue.pop() => {
                    if let Some(frame) =
                        start_frame(&mut runner, name, next, &mut window, ahead).await
                    {
                        failed = Some(frame);
                        break (&mut oldest.run).await;
                    }
                }
            }
        };
        let mut failures = vec![];
        match result {
            Ok(run) => oldest.answer(run, &mut runner, name, served, keep),
            Err(e) => {
                tracing::warn!(
                    frame = oldest.frame.id,
                    sub_cluster = name,
                    "the frame failed in the stream: {e:#}"
                );
                failures.push(oldest.frame);
            }
        }
        failures.extend(failed);
        if !failures.is_empty() {
            recover_stream(
                &mut runner,
                name,
                failures,
                &mut window,
                queue,
                served,
                keep,
            )
            .await;
        }
    }
}

/// After `failed` frames (oldest first) failed in a sub-cluster's stream: the frames
/// still in flight finish or fail; those that finished are answered. The oldest that
/// failed runs again with recovery ([`run_frame`]); the others go back to the front of
/// the queue first, so that they do not wait on this sub-cluster while it recovers (or,
/// its boards all down, waits for one to answer again).
async fn recover_stream<'a>(
    runner: &mut Resilient<'a>,
    name: &str,
    mut failed: Vec<Frame>,
    window: &mut VecDeque<InFlight<'a>>,
    queue: &Queue,
    served: &Mutex<Served>,
    keep: bool,
) {
    while let Some(mut next) = window.pop_front() {
        match (&mut next.run).await {
            Ok(run) => next.answer(run, runner, name, served, keep),
            Err(_) => failed.push(next.frame),
        }
    }
    let mut failed = failed.into_iter();
    let Some(first) = failed.next() else { return };
    for frame in failed.rev() {
        give_back(
            frame,
            queue,
            served,
            &format!("it failed in flight on {name}"),
        );
    }
    run_frame(runner, name, first, queue, served, keep).await;
}

/// A frame started on a sub-cluster.
struct InFlight<'a> {
    frame: Frame,
    /// Its number by the sub-cluster's runner.
    n: u64,
    candidate: Arc<Candidate>,
    /// Frames in flight ahead of it when it started, and when.
    ahead: usize,
    started: Instant,
    run: Started<'a>,
}

impl InFlight<'_> {
    /// Answers the frame with its run, after the runner took the run into account.
    fn answer(
        self,
        run: PlanRun,
        runner: &mut Resilient<'_>,
        name: &str,
        served: &Mutex<Served>,
        keep: bool,
    ) {
        let wall = self.started.elapsed();
        if let Err(e) = runner.finished(self.n, &run, wall, self.ahead) {
            tracing::warn!(sub_cluster = name, "{e:#}");
        }
        answer(
            self.frame,
            run,
            name,
            self.candidate,
            self.ahead > 0,
            served,
            keep,
        );
    }
}

/// Starts `frame` on the sub-cluster's current plan, `ahead` frames in flight before
/// it, and puts it at the end of `window`; returns the frame if it cannot start.
async fn start_frame<'a>(
    runner: &mut Resilient<'a>,
    name: &str,
    frame: Frame,
    window: &mut VecDeque<InFlight<'a>>,
    ahead: usize,
) -> Option<Frame> {
    match runner.start(frame.input.clone(), ahead).await {
        Ok((n, run)) => {
            window.push_back(InFlight {
                frame,
                n,
                // The plan it started on.
                candidate: Arc::new(runner.plan().chosen().clone()),
                ahead,
                started: Instant::now(),
                run,
            });
            None
        }
        Err(e) => {
            tracing::warn!(
                sub_cluster = name,
                frame = frame.id,
                "starting a frame: {e:#}"
            );
            Some(frame)
        }
    }
}

/// Answers `frame` with the outputs of `run`.
fn answer(
    frame: Frame,
    mut run: PlanRun,
    name: &str,
    candidate: Arc<Candidate>,
    overlapped: bool,
    served: &Mutex<Served>,
    keep: bool,
) {
    let outputs = run
        .outputs
        .iter()
        .map(legion_runtime::to_wire)
        .collect::<Result<Vec<_>>>();
    let latency = frame.arrived.elapsed();
    let reply = outputs
        .map(|outputs| InferReply {
            id: frame.id.clone(),
            outputs,
            latency_us: latency.as_micros() as u64,
            run_us: run.total_us,
            clock: match run.clock {
                Clock::Real => "real".into(),
                Clock::Emulated => "emulated".into(),
            },
            sub_cluster: name.to_string(),
            attempts: frame.failures + 1,
        })
        .map_err(|e| Status::internal(format!("frame {}: {e:#}", frame.id)));
    let mut s = lock(served);
    s.answered += 1;
    s.latencies_us.push(latency.as_micros() as u64);
    if keep {
        run.outputs.clear();
        s.runs.entry(name.to_string()).or_default().push(KeptRun {
            candidate,
            run,
            overlapped,
        });
    }
    drop(s);
    let _ = frame.reply.send(reply);
}

/// Runs one frame on a sub-cluster, recovering from failed boards, and answers it, or
/// puts it back for another.
async fn run_frame(
    runner: &mut Resilient<'_>,
    name: &str,
    frame: Frame,
    queue: &Queue,
    served: &Mutex<Served>,
    keep: bool,
) {
    match runner.infer(&frame.input).await {
        Ok(run) => {
            let candidate = Arc::new(runner.plan().chosen().clone());
            answer(frame, run, name, candidate, false, served, keep);
        }
        Err(e) => {
            tracing::warn!(
                frame = frame.id,
                sub_cluster = name,
                "the frame failed: {e:#}"
            );
            give_back(frame, queue, served, &format!("{e:#}"));
            // Until a board of this sub-cluster answers again, it takes no frame.
            while !matches!(runner.probe_down().await, Ok(n) if n > 0) {
                tokio::time::sleep(crate::PROBE_EVERY).await;
            }
        }
    }
}

/// Counts a sub-cluster's failed attempt at `frame` and puts it back at the front of
/// the queue for another, or answers it UNAVAILABLE after [`FRAME_ATTEMPTS`];
/// `reason` is why the last attempt failed.
fn give_back(mut frame: Frame, queue: &Queue, served: &Mutex<Served>, reason: &str) {
    frame.failures += 1;
    if frame.failures < FRAME_ATTEMPTS {
        lock(served).retried += 1;
        queue.retry(frame);
    } else {
        lock(served).failed += 1;
        let _ = frame.reply.send(Err(Status::unavailable(format!(
            "frame {} failed on {} sub-clusters; the last: {reason}",
            frame.id, FRAME_ATTEMPTS
        ))));
    }
}

/// What frames offered at a fixed rate got back ([`offer`]).
#[derive(Clone, Debug, Default)]
pub struct Offered {
    /// Frames sent.
    pub sent: u64,
    /// Per frame answered, its latency as the server measured it, µs.
    pub latencies_us: Vec<u64>,
    /// Frames refused with RESOURCE_EXHAUSTED (the queue was full).
    pub refused: u64,
    /// Every other error, its message.
    pub failed: Vec<String>,
    /// From the first frame sent to the last reply.
    pub elapsed: Duration,
}

/// Sends `rate` frames per second for `duration` seconds through `infer` (a client's
/// call; an open loop: each frame on time, whatever the replies, ids `{id}-{i}`), and
/// waits for every reply.
pub async fn offer<Reply>(
    infer: impl Fn(InferRequest) -> Reply,
    input: F32Tensor,
    id: &str,
    rate: f64,
    duration: f64,
) -> Offered
where
    Reply: std::future::Future<Output = Result<InferReply, Status>> + Send + 'static,
{
    let sent = (rate * duration).ceil() as u64;
    let start = tokio::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..sent {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        calls.spawn(infer(InferRequest {
            id: format!("{id}-{i}"),
            input: Some(input.clone()),
        }));
    }
    let mut offered = Offered {
        sent,
        ..Offered::default()
    };
    for result in calls.join_all().await {
        match result {
            Ok(reply) => offered.latencies_us.push(reply.latency_us),
            Err(s) if s.code() == tonic::Code::ResourceExhausted => offered.refused += 1,
            Err(s) => offered.failed.push(s.message().to_string()),
        }
    }
    offered.elapsed = start.elapsed();
    offered
}

/// Sends `frames` frames through `infer` (a client's call, ids `{id}-{i}`) with at most
/// `in_flight` awaiting their replies (a closed loop), calling `before_send` with the
/// number of replies so far before each frame; returns the replies as they came.
pub async fn closed_loop<Reply>(
    infer: impl Fn(InferRequest) -> Reply,
    input: F32Tensor,
    id: &str,
    frames: usize,
    in_flight: usize,
    mut before_send: impl FnMut(usize),
) -> Vec<Result<InferReply, Status>>
where
    Reply: std::future::Future<Output = Result<InferReply, Status>> + Send + 'static,
{
    let mut calls = tokio::task::JoinSet::new();
    let mut replies = vec![];
    for i in 0..frames {
        if calls.len() >= in_flight.max(1)
            && let Some(reply) = calls.join_next().await
        {
            replies.push(reply.unwrap_or_else(|e| Err(Status::internal(e.to_string()))));
        }
        before_send(replies.len());
        calls.spawn(infer(InferRequest {
            id: format!("{id}-{i}"),
            input: Some(input.clone()),
        }));
    }
    replies.extend(calls.join_all().await);
    replies
}

/// Logs the frames answered, the rate and the latency quantiles every
/// [`REPORT_EVERY`]; never returns.
async fn report_every(served: Arc<Mutex<Served>>) {
    let mut last = 0;
    loop {
        tokio::time::sleep(REPORT_EVERY).await;
        let s = lock(&served).clone();
        let recent = &s.latencies_us[last..];
        let q = |q: f64| crate::quantile(recent, q).unwrap_or(0) as f64 / 1e3;
        tracing::info!(
            answered = s.answered,
            refused = s.refused,
            failed = s.failed,
            fps = recent.len() as f64 / REPORT_EVERY.as_secs_f64(),
            p50_ms = q(0.5),
            p99_ms = q(0.99),
            "serving"
        );
        last = s.latencies_us.len();
    }
}
