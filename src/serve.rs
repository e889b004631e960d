//! `legion serve`: a long-lived coordinator that takes frames over gRPC and runs them on
//! the sub-clusters of a serving plan; `legion infer`: one frame sent to it.

use crate::{BadInput, ModelArgs};
use anyhow::{Context, Result};
use legion_pipeline::{CompileOptions, ServeOptions};
use legion_plan::{Cluster, ServingPlan};
use legion_runtime::proto::InferRequest;
use legion_runtime::proto::inference_client::InferenceClient;
use std::fmt::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A serving plan (`legion compile --objective throughput`), or a plan, which runs
    /// as one sub-cluster over its boards.
    plan: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// The cluster file (TOML).
    #[arg(long)]
    cluster: PathBuf,
    /// The profile the plan was compiled from: a sub-cluster whose board fails is
    /// planned again from it (as `legion run --recover-with`).
    #[arg(long)]
    profile: PathBuf,
    /// Address to take frames on.
    #[arg(long, default_value = "127.0.0.1:7080")]
    listen: String,
    /// File holding the token callers must present (first line, trimmed).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve without a token: anyone who reaches the port can send frames. Without
    /// --token-file, serve refuses to start unless this is given.
    #[arg(long)]
    insecure: bool,
    /// Frames waiting at most; more are refused at once with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Keep a plan for each board's loss loaded in every sub-cluster.
    #[arg(long)]
    standby: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let token = match (&args.token_file, args.insecure) {
        (Some(path), _) => Some(legion_runtime::serve::read_token(path)?),
        (None, true) => None,
        (None, false) => {
            return Err(BadInput(
                "legion serve takes frames from anyone who reaches its port: give \
                 --token-file, or --insecure to serve without a token"
                    .into(),
            )
            .into());
        }
    };
    let text = std::fs::read_to_string(&args.plan)
        .with_context(|| format!("reading {}", args.plan.display()))?;
    let plan = legion_pipeline::serving_plan_of(&text)
        .map_err(|e| BadInput(format!("{}: {e}", args.plan.display())))?;
    let ir = args.model.import()?;
    let cluster = Cluster::load(&args.cluster)?;
    let profile = crate::predict::load_profile(&args.profile, &cluster, &args.cluster)?;
    for sub in &plan.sub_clusters {
        legion_codegen::validate(&sub.plan, &ir, Some(&sub.boards)).map_err(|e| {
            BadInput(format!(
                "{}: sub-cluster {}: {e:#}",
                args.plan.display(),
                sub.boards.join(",")
            ))
        })?;
    }
    let onnx = std::fs::read(&args.model.model)
        .with_context(|| format!("reading {}", args.model.model.display()))?;
    let options = ServeOptions {
        queue: args.queue,
        token,
        standby: args.standby,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let served = rt.block_on(async {
        let coord = args.model.connect(&cluster, &args.cluster, &ir).await?;
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        print!("{}", describe(&plan));
        println!(
            "taking frames on {} (queue of {}); SIGINT or SIGTERM stops",
            listener.local_addr()?,
            args.queue
        );
        let compile = CompileOptions::legion(&args.profile.display().to_string());
        legion_pipeline::serve(
            &coord,
            &ir,
            &onnx,
            &plan,
            &profile,
            compile,
            &options,
            listener,
            legion_runtime::serve::shutdown_signal(),
        )
        .await
    })?;
    println!(
        "{} frames answered (latency p50 {:.1} ms, p99 {:.1} ms), {} refused (queue \
         full), {} failed, {} given to another sub-cluster",
        served.answered,
        served.latency_quantile_us(0.5) as f64 / 1e3,
        served.latency_quantile_us(0.99) as f64 / 1e3,
        served.refused,
        served.failed,
        served.retried
    );
    Ok(())
}

/// The sub-clusters of a serving plan and what they predict.
pub fn describe(plan: &ServingPlan) -> String {
    let mut out = String::new();
    let ms = |us: u64| us as f64 / 1e3;
    for sub in &plan.sub_clusters {
        let _ = writeln!(
            out,
            "sub-cluster {}: {:.1} ms per frame, {:.2} frames/s",
            sub.boards.join(","),
            ms(sub.plan.chosen().predicted_us),
            sub.predicted_fps
        );
    }
    if !plan.idle.is_empty() {
        let _ = writeln!(out, "idle: {}", plan.idle.join(","));
    }
    let _ = writeln!(
        out,
        "predicted: {:.2} frames/s, latency {:.1} ms (budget {:.1} ms); one plan over every \
         board: {:.1} ms, {:.2} frames/s; every board on its own frames: {:.2} frames/s",
        plan.predicted_fps,
        ms(plan.predicted_latency_us),
        ms(plan.latency_budget_us),
        ms(plan.single_plan_us),
        1e6 / plan.single_plan_us.max(1) as f64,
        plan.data_parallel_fps
    );
    out
}

#[derive(clap::Args)]
pub struct InferArgs {
    /// The serving coordinator, e.g. 127.0.0.1:7080.
    #[arg(long)]
    server: String,
    /// The input, an f32 .npy of the model's input shape.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the first output (.npy; further outputs beside it).
    #[arg(long)]
    output: Option<PathBuf>,
    /// File holding the server's token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The frame's name, echoed in the reply.
    #[arg(long, default_value = "frame")]
    id: String,
}

pub fn infer(args: &InferArgs) -> Result<()> {
    let array: tract_onnx::prelude::tract_ndarray::ArrayD<f32> = ndarray_npy::read_npy(&args.input)
        .map_err(|e| {
            BadInput(format!(
                "{}: not an f32 .npy file: {e}",
                args.input.display()
            ))
        })?;
    let input = legion_runtime::to_wire(&tract_onnx::prelude::IntoTensor::into_tensor(array))?;
    let token = args
        .token_file
        .as_deref()
        .map(legion_runtime::serve::read_token)
        .transpose()?;
    let rt = tokio::runtime::Runtime::new()?;
    let reply = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.server))
            .map_err(|e| BadInput(format!("--server {}: {e}", args.server)))?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.server))?;
        let bearer: Option<tonic::metadata::MetadataValue<_>> = token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map_err(|_| BadInput("the token holds characters a header cannot".into()))?;
        let mut client =
            InferenceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                if let Some(v) = &bearer {
                    req.metadata_mut().insert("authorization", v.clone());
                }
                Ok(req)
            })
            .max_decoding_message_size(legion_runtime::Limits::default().message_bytes);
        let request = InferRequest {
            id: args.id.clone(),
            input: Some(input),
        };
        client
            .infer(request)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| anyhow::anyhow!("{}: {}", args.server, s.message()))
    })?;
    println!(
        "{}: {} outputs, {:.1} ms from arrival to reply, the run {:.1} ms on the {} clock, on \
         {}{}",
        reply.id,
        reply.outputs.len(),
        reply.latency_us as f64 / 1e3,
        reply.run_us as f64 / 1e3,
        reply.clock,
        reply.sub_cluster,
        match reply.attempts {
            1 => String::new(),
            n => format!(" (sub-clusters tried: {n})"),
        }
    );
    if let Some(path) = &args.output {
        let outputs = reply
            .outputs
            .iter()
            .map(legion_runtime::from_wire)
            .collect::<Result<Vec<_>>>()?;
        crate::run::write_output(path, &outputs)?;
        println!("output written to {}", path.display());
    }
    Ok(())
}
