//! `cargo xtask bench serve`: streams of frames through `legion serve`
//! (`legion_pipeline::serve`) on emulated clusters, for one plan over every board (one
//! frame at a time, and pipelined), serving plans compiled under several latency
//! budgets, and no budget; then a load 20% above what the host serves.
//!
//! The emulated boards of a cluster take turns on this host, so sub-clusters that
//! would run side by side on boards run interleaved here, and wall time says nothing
//! of a stream's rate. Each sub-cluster's stream is timed on the emulated clock
//! instead: its frames' runs, each board's compute as measured, composed on the
//! programs' stream timeline at the sub-cluster's depth (`Coordinator::stream_times`;
//! it is never idle while frames wait). A serving plan's rate is the sum of its
//! sub-clusters'.

use super::paper::{host_label, legion_profile};
use super::transports::cluster_file;
use super::{host, load};
use anyhow::{Context, Result, ensure};
use legion_ir::Ir;
use legion_pipeline::{
    CompileOptions, LatencyBudget, MAX_DEPTH, STREAM_ROUNDS, ServeOptions, StreamFlcs, Streamed,
    best_within, compile_serving, connect, predict_candidates, serve,
};
use legion_plan::network::StreamTimes;
use legion_plan::{Cluster, HostRates, ServingPlan, Transport};
use legion_runtime::check::{compare, test_input};
use legion_runtime::proto::inference_client::InferenceClient;
use legion_runtime::{LocalCluster, Reference, default_cache_dir};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Instant;

pub const CLUSTERS: [&str; 2] = ["firefly-x6", "3f3o"];
pub const MODELS: [&str; 2] = ["vgg16", "yolov2"];

pub struct Options {
    pub clusters: Vec<String>,
    pub models: Vec<String>,
    /// Frames per sub-cluster of each serving plan.
    pub frames: u32,
    pub reuse: bool,
}

/// One serving plan's stream.
struct Stream {
    name: String,
    plan: ServingPlan,
    frames: usize,
    /// Per sub-cluster: its depth, the frames it ran, and its stream on the emulated
    /// clock (every frame but its first).
    subs: BTreeMap<String, (usize, usize, StreamTimes)>,
    /// The largest relative difference of an output from one device's.
    worst_rel: f64,
    /// The host's rates over the frames' runs.
    host: Option<HostRates>,
}

impl Stream {
    fn fps(&self) -> f64 {
        self.subs
            .values()
            .map(|(_, _, t)| t.fps().unwrap_or(0.0))
            .sum()
    }

    fn latency_ms(&self, q: f64) -> f64 {
        let all: Vec<u64> = self
            .subs
            .values()
            .flat_map(|(_, _, t)| t.latencies_us())
            .map(|us| us.round() as u64)
            .collect();
        legion_pipeline::quantile(&all, q).map_or(f64::NAN, |us| us as f64 / 1e3)
    }

    fn depths(&self) -> String {
        let depths: Vec<String> = self
            .plan
            .sub_clusters
            .iter()
            .map(|c| c.depth.to_string())
            .collect();
        depths.join("+")
    }
}

/// Frames offered 20% above what the host served in a closed loop.
struct Overload {
    plan: String,
    /// Frames per second on the wall clock, closed loop.
    capacity_fps: f64,
    offered_fps: f64,
    sent: u64,
    answered: u64,
    refused: u64,
    failed: u64,
    queue: usize,
}

struct Setup {
    model: String,
    cluster: String,
    streams: Vec<Stream>,
    overload: Overload,
    wall_s: f64,
}

pub fn run(opts: &Options) -> Result<String> {
    let mut setups = vec![];
    for model in &opts.models {
        let ir = load(model)?;
        let onnx = std::fs::read(legion_models::test_model(model)?)?;
        for cluster in &opts.clusters {
            setups.push(measure(&ir, &onnx, model, cluster, opts)?);
        }
    }
    report(&setups, opts)
}

/// `plan` served alone at its best candidate and depth above one frame at a time, as
/// the throughput compile picks them (`legion_pipeline::best_within`, no budget).
fn pipelined(
    ir: &Ir,
    profile: &legion_plan::Profile,
    mut plan: ServingPlan,
) -> Result<ServingPlan> {
    let sub = &plan.sub_clusters[0];
    let streams: Vec<Streamed> = predict_candidates(ir, profile, &sub.plan, Transport::Programs)?
        .into_iter()
        .filter(|s| s.depth > 1)
        .collect();
    let best = best_within(&streams, u64::MAX).context("no depth above 1")?;
    let sub = &mut plan.sub_clusters[0];
    (sub.depth, sub.predicted_fps, sub.predicted_latency_us) =
        (best.depth, best.fps, best.latency_us);
    sub.plan.chosen = best.candidate;
    (plan.predicted_fps, plan.predicted_latency_us) = (best.fps, best.latency_us);
    Ok(plan)
}

fn measure(ir: &Ir, onnx: &[u8], model: &str, cluster_name: &str, opts: &Options) -> Result<Setup> {
    let start = Instant::now();
    let mut cluster = Cluster::load(&cluster_file(cluster_name))?;
    let (profile, _) = legion_profile(cluster_name, &cluster, model, ir, opts.reuse)?;
    for d in &mut cluster.devices {
        d.address = "127.0.0.1:0".into();
    }
    let local = LocalCluster::start(&cluster, default_cache_dir())?;
    let rt = tokio::runtime::Runtime::new()?;
    let coord = rt.block_on(connect(local.cluster(), cluster_name, onnx, model, ir))?;
    let options = CompileOptions {
        stream_flcs: StreamFlcs::All(STREAM_ROUNDS),
        ..CompileOptions::legion("the legion profile")
    };
    let reference = Reference::run(ir, test_input(&ir.input.shape))?;
    let compiled = |budget: LatencyBudget| {
        compile_serving(ir, &profile, local.cluster(), &options, budget, |_, _| {})
    };
    let everyone = compiled(LatencyBudget::Relative(1e9))?;
    // One plan over every board, as `legion compile` makes it by prediction; pipelined,
    // with the candidates searched for a stream beside it.
    let single = |stream_flcs| -> Result<ServingPlan> {
        let options = CompileOptions {
            stream_flcs,
            ..options.clone()
        };
        let plan = legion_pipeline::compile(
            ir,
            &profile,
            local.cluster(),
            &options,
            None,
            &mut legion_pipeline::PassTimes::default(),
        )?
        .plan
        .context("compile made no plan")?;
        let mut single = ServingPlan::one(plan);
        single.data_parallel_fps = everyone.data_parallel_fps;
        Ok(single)
    };
    let mut plans = vec![
        (
            "one plan, one at a time".to_string(),
            single(StreamFlcs::Faster(STREAM_ROUNDS))?,
        ),
        (
            "one plan, pipelined".to_string(),
            pipelined(ir, &profile, single(StreamFlcs::All(STREAM_ROUNDS))?)?,
        ),
    ];
    for factor in [1.0, 1.5, 2.0] {
        plans.push((
            format!("budget {factor}x"),
            compiled(LatencyBudget::Relative(factor))?,
        ));
    }
    plans.push(("no budget".to_string(), everyone));
    let measure = Measure {
        rt: &rt,
        coord: &coord,
        ir,
        onnx,
        profile: &profile,
        options: &options,
    };
    let mut streams = vec![];
    for (name, plan) in &plans {
        eprintln!(
            "{model} on {cluster_name}, {name}: {} sub-clusters",
            plan.sub_clusters.len()
        );
        let stream = measure.stream(&reference, name, plan.clone(), opts.frames)?;
        eprintln!(
            "  depth {}: {:.2} frames/s measured, {:.2} predicted",
            stream.depths(),
            stream.fps(),
            plan.predicted_fps
        );
        streams.push(stream);
    }
    let (name, plan) = &plans[plans.len() - 2];
    let overload = measure.overload(name, plan)?;
    Ok(Setup {
        model: model.to_string(),
        cluster: cluster_name.to_string(),
        streams,
        overload,
        wall_s: start.elapsed().as_secs_f64(),
    })
}

/// What every stream of a setup is served with.
struct Measure<'a> {
    rt: &'a tokio::runtime::Runtime,
    coord: &'a legion_runtime::Coordinator,
    ir: &'a Ir,
    onnx: &'a [u8],
    profile: &'a legion_plan::Profile,
    options: &'a CompileOptions,
}

impl Measure<'_> {
    /// Serves `plan` with a queue of `queue` frames while `client` (given the server's
    /// address) runs on its own thread; returns what both did.
    fn serve<T: Send + 'static>(
        &self,
        plan: &ServingPlan,
        queue: usize,
        client: impl FnOnce(String) -> Result<T> + Send + 'static,
    ) -> Result<(legion_pipeline::Served, T)> {
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let address = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let client = std::thread::spawn(move || {
            let done = client(address);
            let _ = stop.send(());
            done
        });
        let served = self.rt.block_on(serve(
            self.coord,
            self.ir,
            self.onnx,
            plan,
            self.profile,
            self.options.clone(),
            &ServeOptions {
                queue,
                token: None,
                standby: false,
                tls: None,
                depth: None,
                keep_runs: true,
                // The plans as compiled are what is measured.
                replan_stragglers: false,
            },
            listener,
            async {
                let _ = stopped.await;
            },
        ))?;
        let done = client
            .join()
            .map_err(|_| anyhow::anyhow!("the client panicked"))??;
        Ok((served, done))
    }

    /// Serves `frames` frames per sub-cluster of `plan` and checks every output against
    /// `reference`. The client keeps as many frames in flight as the deepest
    /// sub-cluster holds, so that its frames overlap on the wall clock too, but not
    /// enough to keep every sub-cluster busy at once: the emulated clock composes each
    /// sub-cluster's frames as if it always had the next one waiting, and fewer frames
    /// at once keep this host's rate, which the emulated boards' speed follows, from
    /// sagging (it fell from 26.5 to 15.8 GFLOP/s with 12 frames in flight).
    fn stream(
        &self,
        reference: &Reference,
        name: &str,
        plan: ServingPlan,
        frames: u32,
    ) -> Result<Stream> {
        let total = frames as usize * plan.sub_clusters.len();
        let in_flight = plan.sub_clusters.iter().map(|c| c.depth).max().unwrap_or(1);
        let input = legion_runtime::to_wire(&test_input(&self.ir.input.shape))?;
        let (served, replies) = self.serve(&plan, total, move |address| {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let client = connected(&address).await;
                let infer = |request| {
                    let mut client = client.clone();
                    async move { client.infer(request).await.map(|r| r.into_inner()) }
                };
                legion_pipeline::closed_loop(infer, input, "frame", total, in_flight, |_| {})
                    .await
                    .into_iter()
                    .map(|r| r.map_err(|s| anyhow::anyhow!("{}", s.message())))
                    .collect::<Result<Vec<_>>>()
            })
        })?;
        ensure!(
            served.answered as usize == total && replies.len() == total,
            "{name}: {} of {total} frames answered",
            served.answered
        );
        let mut worst_rel: f64 = 0.0;
        for reply in &replies {
            ensure!(
                reply.clock == "emulated",
                "{name}: frames ran on the {} clock",
                reply.clock
            );
            let got = legion_runtime::from_wire(&reply.outputs[0])?;
            let want = reference.tensor(self.ir.outputs[0]);
            worst_rel = worst_rel.max(compare(&got, want, want)?.max_rel as f64);
        }
        let mut subs = BTreeMap::new();
        for sub in &plan.sub_clusters {
            let key = sub.boards.join(",");
            let runs = served.runs.get(&key).map_or(&[][..], |r| r.as_slice());
            ensure!(
                runs.len() >= 3,
                "{name}: {key} ran {} frames, too few to time a stream (give more --runs)",
                runs.len()
            );
            let first = &runs[0];
            ensure!(
                runs.iter()
                    .all(|r| r.candidate.programs == first.candidate.programs),
                "{name}: {key} changed plans during the stream (a board failed)"
            );
            // A new plan's first frame is slower on the emulator, whose tile times are
            // their fastest over the runs so far: not counted, unless it is the only one.
            let counted: Vec<&legion_runtime::PlanRun> = runs
                .iter()
                .skip(usize::from(runs.len() > 2))
                .map(|r| &r.run)
                .collect();
            let times = self
                .coord
                .stream_times(self.ir, &first.candidate, &counted, sub.depth)?;
            subs.insert(key, (sub.depth, runs.len(), times));
        }
        let host = HostRates::of_steps(served.runs.values().flatten().flat_map(|r| &r.run.groups));
        Ok(Stream {
            name: name.to_string(),
            plan,
            frames: total,
            subs,
            worst_rel,
            host,
        })
    }

    /// Serves `plan` to a closed loop for its capacity on the wall clock, then offers
    /// 20% more for 20 s with a queue as deep as the frames the sub-clusters hold:
    /// every frame must be answered or refused with RESOURCE_EXHAUSTED.
    fn overload(&self, name: &str, plan: &ServingPlan) -> Result<Overload> {
        let in_flight: usize = plan.sub_clusters.iter().map(|c| c.depth + 1).sum();
        let input = legion_runtime::to_wire(&test_input(&self.ir.input.shape))?;
        let closed = 4 * in_flight;
        let for_closed = input.clone();
        let (_, capacity_fps) = self.serve(plan, closed, move |address| {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let client = connected(&address).await;
                let infer = |request| {
                    let mut client = client.clone();
                    async move { client.infer(request).await.map(|r| r.into_inner()) }
                };
                // One round to warm the sub-clusters up, then one timed.
                let mut rate = 0.0;
                for _ in 0..2 {
                    let start = Instant::now();
                    let round = legion_pipeline::closed_loop(
                        &infer,
                        for_closed.clone(),
                        "closed",
                        closed,
                        closed,
                        |_| {},
                    )
                    .await;
                    for r in round {
                        r.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
                    }
                    rate = closed as f64 / start.elapsed().as_secs_f64();
                }
                Ok(rate)
            })
        })?;
        let offered_fps = 1.2 * capacity_fps;
        let queue = in_flight;
        let (served, offered) = self.serve(plan, queue, move |address| {
            let rt = tokio::runtime::Runtime::new()?;
            Ok(rt.block_on(async {
                let client = connected(&address).await;
                let infer = |request| {
                    let mut client = client.clone();
                    async move { client.infer(request).await.map(|r| r.into_inner()) }
                };
                legion_pipeline::offer(infer, input, "over", offered_fps, OVERLOAD_S).await
            }))
        })?;
        ensure!(
            offered.latencies_us.len() as u64 + offered.refused + offered.failed.len() as u64
                == offered.sent,
            "{name} under overload: {} frames sent, {} came back",
            offered.sent,
            offered.latencies_us.len() as u64 + offered.refused + offered.failed.len() as u64
        );
        Ok(Overload {
            plan: name.to_string(),
            capacity_fps,
            offered_fps,
            sent: offered.sent,
            answered: served.answered,
            refused: served.refused,
            failed: served.failed + offered.failed.len() as u64,
            queue,
        })
    }
}

/// Seconds of the overload.
const OVERLOAD_S: f64 = 60.0;

/// A client of the server at `address`, once it answers (it loads every sub-cluster's
/// programs first).
async fn connected(address: &str) -> InferenceClient<tonic::transport::Channel> {
    loop {
        if let Ok(c) = InferenceClient::connect(address.to_string()).await {
            return c.max_decoding_message_size(1 << 30);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn report(setups: &[Setup], opts: &Options) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "# Serving a stream: throughput against latency\n")?;
    writeln!(
        md,
        "Measured by `cargo xtask bench serve --runs {}{}` on {}. Per setup, from the \
         setup's legion profile: one plan over every board (`legion compile` by \
         prediction) served one frame at a time (as `legion run --repeat`) and pipelined \
         (at the candidate and depth predicted fastest, up to {MAX_DEPTH} frames in flight: \
         each board works on every frame in flight, the oldest frame's ready tile first; \
         the candidates are the latency's and {STREAM_ROUNDS} rounds of the search for a \
         stream, `legion_fusion::balanced_flcs`); serving plans compiled by \
         prediction (`legion compile --objective throughput`) within 1.0x, 1.5x and 2x \
         that plan's predicted latency, and with no budget. Each serves {} frames per \
         sub-cluster through `legion serve` (in process, every output checked against one \
         device's; the client keeps as many frames in flight as the deepest sub-cluster \
         holds, so that fewer frames share this host at once; no re-planning for boards \
         slower than profiled, so that the plans measured are the plans compiled). The emulated boards take turns on this host, so each sub-cluster's \
         stream is timed on the emulated clock: the compute each frame's run measured, \
         composed on the programs' stream timeline at the sub-cluster's depth \
         (`Coordinator::stream_times`; docs/architecture.md, \"Serving a stream\"), \
         without its first frame; its rate is its frames over the stream's time from the \
         first input sent, filling the pipeline included (`StreamTimes::fps`); a plan's \
         rate is the sum of its sub-clusters'. Latency \
         is a frame's in the stream, from its input leaving the coordinator to its output, \
         not counting the queue. *depth*: frames in flight per sub-cluster. *of DP*: the \
         rate as a fraction of every board on its own frames, predicted from the same \
         profile. *host*: the host's rates over the runs (GFLOP/s).\n",
        opts.frames,
        if opts.reuse { " --reuse" } else { "" },
        host(),
        opts.frames
    )?;
    writeln!(
        md,
        "| model | cluster | plan | sub-clusters | depth | predicted frames/s | measured frames/s | measured / predicted | of DP | latency p50 / p99 ms | max rel | host |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for s in setups {
        for st in &s.streams {
            let subs: Vec<String> = st
                .plan
                .sub_clusters
                .iter()
                .map(|c| c.boards.len().to_string())
                .collect();
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0}% | {:.1} / {:.1} | {:.1e} | {} |",
                s.model,
                s.cluster,
                st.name,
                subs.join("+"),
                st.depths(),
                st.plan.predicted_fps,
                st.fps(),
                st.fps() / st.plan.predicted_fps,
                100.0 * st.fps() / st.plan.data_parallel_fps.unwrap_or(f64::NAN),
                st.latency_ms(0.5),
                st.latency_ms(0.99),
                st.worst_rel,
                host_label(st.host)
            )?;
        }
    }
    writeln!(
        md,
        "\nPipelining one plan, measured frames/s over one frame at a time (the plan \
         over every board searched for latency, as `legion run --repeat` runs it; the \
         pipelined plan is the same compile's candidate and depth predicted fastest in a \
         stream, which may be an FLC searched for a stream). *At most*: every board on its \
         own frames (the of-DP rate, predicted) over one frame at a time, measured; a \
         pipelined plan beats it only where its strips run faster than the whole model \
         on one board or the prediction misses:\n"
    )?;
    for s in setups {
        let stream = |name: &str| s.streams.iter().find(|st| st.name == name);
        let rate = |name: &str| stream(name).map_or(f64::NAN, Stream::fps);
        let one = rate("one plan, one at a time");
        let every_board = stream("one plan, one at a time")
            .and_then(|st| st.plan.data_parallel_fps)
            .unwrap_or(f64::NAN);
        writeln!(
            md,
            "- {} on {}: {:.2}x (at most {:.2}x)",
            s.model,
            s.cluster,
            rate("one plan, pipelined") / one,
            every_board / one
        )?;
    }
    writeln!(
        md,
        "\nOverload (wall clock): the plan served to a closed loop for its rate on this \
         host (the emulated boards share its 2 cores), then offered 20% more frames per \
         second for {OVERLOAD_S:.0} s, open loop (`legion_pipeline::offer`, as `legion infer \
         --rate`), with a queue as deep as the frames its sub-clusters hold. Every frame \
         must come back answered or refused with RESOURCE_EXHAUSTED.\n"
    )?;
    writeln!(
        md,
        "| model | cluster | plan | capacity frames/s | offered frames/s | queue | sent | answered | refused | failed | lost |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    for s in setups {
        let o = &s.overload;
        writeln!(
            md,
            "| {} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} |",
            s.model,
            s.cluster,
            o.plan,
            o.capacity_fps,
            o.offered_fps,
            o.queue,
            o.sent,
            o.answered,
            o.refused,
            o.failed,
            o.sent - (o.answered + o.refused + o.failed).min(o.sent)
        )?;
    }
    writeln!(
        md,
        "\nThe sub-clusters (boards, depth, frames run, candidate: `extracted` the FLC \
         searched for latency, `wild-card` its Wild Card, `extracted-...` the search under \
         the other producers assumption, `balanced-k` the k-th FLC searched for a stream, \
         `balanced-k-spread` it on other boards of the same class):\n"
    )?;
    for s in setups {
        writeln!(
            md,
            "- **{} on {}** ({:.0} s of wall time):",
            s.model, s.cluster, s.wall_s
        )?;
        for st in &s.streams {
            let candidate = |boards: &str| {
                st.plan
                    .sub_clusters
                    .iter()
                    .find(|c| c.boards.join(",") == boards)
                    .map_or("?", |c| c.plan.chosen().name.as_str())
            };
            let runs: Vec<String> = st
                .subs
                .iter()
                .map(|(b, (depth, n, _))| format!("{b} (depth {depth}, {n}, {})", candidate(b)))
                .collect();
            writeln!(
                md,
                "  - {} ({} frames): {}",
                st.name,
                st.frames,
                runs.join("; ")
            )?;
        }
    }
    Ok(md)
}
