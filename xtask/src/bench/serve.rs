//! `cargo xtask bench serve`: streams of frames through `legion serve`
//! (`legion_pipeline::serve`) on emulated clusters, for serving plans compiled under
//! several latency budgets, one plan over every board, and no budget.
//!
//! The emulated boards of a cluster take turns on this host, so sub-clusters that
//! would run side by side on boards run interleaved here, and wall time says nothing
//! of a stream's rate. Each sub-cluster's rate is measured on the emulated clock
//! instead: the frames it ran over the sum of their emulated run times (it is never
//! idle while frames wait). A serving plan's rate is the sum of its sub-clusters'.

use super::paper::legion_profile;
use super::transports::cluster_file;
use super::{host, load};
use anyhow::{Context, Result, ensure};
use legion_ir::Ir;
use legion_pipeline::{
    CompileOptions, LatencyBudget, ServeOptions, compile_serving, connect, serve,
};
use legion_plan::{Cluster, ServingPlan};
use legion_runtime::check::{compare, test_input};
use legion_runtime::proto::InferRequest;
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
    /// Per sub-cluster, the emulated run times of its frames, µs.
    runs: BTreeMap<String, Vec<u64>>,
    /// The largest relative difference of an output from one device's.
    worst_rel: f64,
}

impl Stream {
    /// A sub-cluster's runs but its first (a new plan's first frame is slower on the
    /// emulator, whose tile times are their fastest over the runs so far), unless it
    /// ran only one.
    fn counted(runs: &[u64]) -> &[u64] {
        if runs.len() > 1 { &runs[1..] } else { runs }
    }

    fn fps(&self) -> f64 {
        self.runs
            .values()
            .map(|r| Stream::counted(r))
            .map(|r| r.len() as f64 * 1e6 / r.iter().sum::<u64>().max(1) as f64)
            .sum()
    }

    fn latency_ms(&self, q: f64) -> f64 {
        let all: Vec<u64> = self
            .runs
            .values()
            .flat_map(|r| Stream::counted(r))
            .copied()
            .collect();
        legion_pipeline::quantile(&all, q).map_or(f64::NAN, |us| us as f64 / 1e3)
    }
}

struct Setup {
    model: String,
    cluster: String,
    streams: Vec<Stream>,
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
    let options = CompileOptions::legion("the legion profile");
    let reference = Reference::run(ir, test_input(&ir.input.shape))?;
    let compiled = |budget: LatencyBudget| {
        compile_serving(ir, &profile, local.cluster(), &options, budget, |_, _| {})
    };
    let everyone = compiled(LatencyBudget::Relative(1e9))?;
    // One plan over every board, as `legion compile` makes it by prediction.
    let single = legion_pipeline::compile(
        ir,
        &profile,
        local.cluster(),
        &options,
        None,
        &mut legion_pipeline::PassTimes::default(),
    )?
    .plan
    .context("compile made no plan")?;
    let mut single = ServingPlan::one(single);
    single.data_parallel_fps = everyone.data_parallel_fps;
    let mut plans = vec![("one plan".to_string(), single)];
    for factor in [1.0, 1.5, 2.0] {
        plans.push((
            format!("budget {factor}x"),
            compiled(LatencyBudget::Relative(factor))?,
        ));
    }
    plans.push(("no budget".to_string(), everyone));
    let mut streams = vec![];
    for (name, plan) in plans {
        eprintln!(
            "{model} on {cluster_name}, {name}: {} sub-clusters",
            plan.sub_clusters.len()
        );
        let served = stream(
            &rt,
            &coord,
            ir,
            onnx,
            &profile,
            &options,
            &reference,
            name,
            plan,
            opts.frames,
        )?;
        streams.push(served);
    }
    Ok(Setup {
        model: model.to_string(),
        cluster: cluster_name.to_string(),
        streams,
        wall_s: start.elapsed().as_secs_f64(),
    })
}

/// Serves `frames` frames per sub-cluster of `plan`, twice as many in flight as it has
/// sub-clusters, and checks every output against `reference`.
#[allow(clippy::too_many_arguments)]
fn stream(
    rt: &tokio::runtime::Runtime,
    coord: &legion_runtime::Coordinator,
    ir: &Ir,
    onnx: &[u8],
    profile: &legion_plan::Profile,
    options: &CompileOptions,
    reference: &Reference,
    name: String,
    plan: ServingPlan,
    frames: u32,
) -> Result<Stream> {
    let total = frames as usize * plan.sub_clusters.len();
    let in_flight = 2 * plan.sub_clusters.len();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let address = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let input = legion_runtime::to_wire(&test_input(&ir.input.shape))?;
    let client = std::thread::spawn(move || -> Result<Vec<legion_runtime::proto::InferReply>> {
        let rt = tokio::runtime::Runtime::new()?;
        let replies = rt.block_on(async {
            // The server loads every sub-cluster's programs before it answers.
            let client = loop {
                if let Ok(c) = InferenceClient::connect(address.clone()).await {
                    break c.max_decoding_message_size(1 << 30);
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            let mut calls = tokio::task::JoinSet::new();
            let mut replies = vec![];
            for i in 0..total {
                if calls.len() == in_flight {
                    replies.push(calls.join_next().await.expect("a call")?);
                }
                let mut client = client.clone();
                let request = InferRequest {
                    id: format!("frame-{i}"),
                    input: Some(input.clone()),
                };
                calls.spawn(async move { client.infer(request).await.map(|r| r.into_inner()) });
            }
            replies.extend(calls.join_all().await);
            replies
                .into_iter()
                .map(|r| r.map_err(|s| anyhow::anyhow!("{}", s.message())))
                .collect()
        });
        let _ = stop.send(());
        replies
    });
    let served = rt.block_on(serve(
        coord,
        ir,
        onnx,
        &plan,
        profile,
        options.clone(),
        &ServeOptions {
            queue: total,
            token: None,
            standby: false,
            tls: None,
            depth: 1,
            keep_runs: true,
        },
        listener,
        async {
            let _ = stopped.await;
        },
    ))?;
    let replies = client
        .join()
        .map_err(|_| anyhow::anyhow!("the client panicked"))??;
    ensure!(
        served.answered as usize == total && replies.len() == total,
        "{name}: {} of {total} frames answered",
        served.answered
    );
    let mut runs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut worst_rel: f64 = 0.0;
    // In the order the frames were sent, so that a sub-cluster's first is first.
    let mut replies = replies;
    replies.sort_by_key(|r| {
        r.id.trim_start_matches("frame-")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    for reply in &replies {
        ensure!(
            reply.clock == "emulated",
            "{name}: frames ran on the {} clock",
            reply.clock
        );
        let got = legion_runtime::from_wire(&reply.outputs[0])?;
        let want = reference.tensor(ir.outputs[0]);
        worst_rel = worst_rel.max(compare(&got, want, want)?.max_rel as f64);
        runs.entry(reply.sub_cluster.clone())
            .or_default()
            .push(reply.run_us);
    }
    Ok(Stream {
        name,
        plan,
        frames: total,
        runs,
        worst_rel,
    })
}

fn report(setups: &[Setup], opts: &Options) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "# Serving a stream: throughput against latency\n")?;
    writeln!(
        md,
        "Measured by `cargo xtask bench serve --runs {}{}` on {}. Per setup, serving plans \
         compiled by prediction from the setup's legion profile (`legion compile \
         --objective throughput`): one plan over every board, the best cut within 1.0x, \
         1.5x and 2x that plan's predicted latency, and with no budget; each serves {} \
         frames per sub-cluster through `legion serve` (in process, twice as many frames \
         in flight as sub-clusters, every output checked against one device's). The \
         emulated boards take turns on this host, so each sub-cluster's rate is measured \
         on the emulated clock, as the frames it ran over the sum of their run times, and \
         a plan's rate is the sum of its sub-clusters' (each is never idle while frames \
         wait); a sub-cluster's first frame is not counted when it ran more than one. Latency is a frame's run on the emulated clock, not counting the queue. \
         *of DP*: the rate as a fraction of every board on its own frames, predicted from \
         the same profile.\n",
        opts.frames,
        if opts.reuse { " --reuse" } else { "" },
        host(),
        opts.frames
    )?;
    writeln!(
        md,
        "| model | cluster | plan | sub-clusters | predicted frames/s | measured frames/s | measured / predicted | of DP | latency p50 / p99 ms | max rel |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
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
                "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0}% | {:.1} / {:.1} | {:.1e} |",
                s.model,
                s.cluster,
                st.name,
                subs.join("+"),
                st.plan.predicted_fps,
                st.fps(),
                st.fps() / st.plan.predicted_fps,
                100.0 * st.fps() / st.plan.data_parallel_fps.unwrap_or(f64::NAN),
                st.latency_ms(0.5),
                st.latency_ms(0.99),
                st.worst_rel
            )?;
        }
    }
    writeln!(md, "\nThe sub-clusters (boards, frames run):\n")?;
    for s in setups {
        writeln!(
            md,
            "- **{} on {}** ({:.0} s of wall time):",
            s.model, s.cluster, s.wall_s
        )?;
        for st in &s.streams {
            let runs: Vec<String> = st
                .runs
                .iter()
                .map(|(b, r)| format!("{b} ({})", r.len()))
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
