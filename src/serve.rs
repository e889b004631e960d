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
    /// Frames in flight per sub-cluster, instead of the serving plan's (which the
    /// compiler chose within the latency budget; 1 for a plain plan): each board works
    /// on every frame in flight, the oldest frame's ready tile first, computing the
    /// next frame while one waits for rows. 1 runs one frame after the other (all the
    /// hub does).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=16))]
    pipeline: Option<u16>,
    /// Serve TLS with this certificate (PEM, as `legion cluster keygen` writes one), so
    /// that the token and the frames travel encrypted; callers pin it (`legion infer
    /// --tls-cert`). Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM). Needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
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
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            legion_runtime::tls::WorkerIdentity::read(cert, key)
                .map_err(|e| BadInput(format!("{e:#}")))?,
        ),
        _ => None,
    };
    let options = ServeOptions {
        queue: args.queue,
        token,
        standby: args.standby,
        tls,
        depth: args.pipeline.map(usize::from),
        keep_runs: false,
        replan_stragglers: true,
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

/// A serving coordinator and how to reach it.
struct Target<'a> {
    server: &'a str,
    token: Option<String>,
    /// Its certificate, PEM, when it serves TLS.
    pinned: Option<Vec<u8>>,
}

/// Connects to the serving coordinator.
async fn connect(target: &Target<'_>) -> Result<Client> {
    let server = target.server;
    let scheme = if target.pinned.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{server}"))
        .map_err(|e| BadInput(format!("--server {server}: {e}")))?;
    if let Some(pem) = &target.pinned {
        endpoint = endpoint
            .tls_config(legion_runtime::tls::pinned(pem))
            .context("the server's certificate")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {server}"))?;
    let bearer = target
        .token
        .clone()
        .map(|t| format!("Bearer {t}").parse())
        .transpose()
        .map_err(|_| BadInput("the token holds characters a header cannot".into()))?;
    Ok(InferenceClient::with_interceptor(channel, Bearer(bearer))
        .max_decoding_message_size(legion_runtime::Limits::default().message_bytes))
}

/// `legion infer --rate R --duration S`: frames sent on time, whatever the replies.
async fn load(
    args: &InferArgs,
    target: &Target<'_>,
    input: legion_runtime::proto::F32Tensor,
    rate: f64,
    duration: f64,
) -> Result<()> {
    if !(rate > 0.0 && rate.is_finite() && duration > 0.0 && duration.is_finite()) {
        return Err(BadInput("--rate and --duration must be positive".into()).into());
    }
    let client = connect(target).await?;
    let infer = |request| {
        let mut client = client.clone();
        async move { client.infer(request).await.map(|r| r.into_inner()) }
    };
    let offered = legion_pipeline::offer(infer, input, &args.id, rate, duration).await;
    let elapsed = offered.elapsed.as_secs_f64();
    let latencies = &offered.latencies_us;
    let q = |q: f64| legion_pipeline::quantile(latencies, q).unwrap_or(0) as f64 / 1e3;
    println!(
        "{} frames sent at {rate} frames/s: {} answered ({:.2} frames/s over {elapsed:.1} \
         s; latency p50 {:.1} ms, p99 {:.1} ms), {} refused (queue full), {} failed",
        offered.sent,
        latencies.len(),
        latencies.len() as f64 / elapsed,
        q(0.5),
        q(0.99),
        offered.refused,
        offered.failed.len()
    );
    let failed = &offered.failed;
    for f in failed.iter().take(5) {
        println!("failed: {f}");
    }
    Ok(())
}

/// The sub-clusters of a serving plan and what they predict.
pub fn describe(plan: &ServingPlan) -> String {
    let mut out = String::new();
    let ms = |us: u64| us as f64 / 1e3;
    for sub in &plan.sub_clusters {
        let _ = writeln!(
            out,
            "sub-cluster {}: {} ({} groups), {:.1} ms per frame alone, {} in flight: {:.1} ms, \
             {:.2} frames/s",
            sub.boards.join(","),
            sub.plan.chosen().name,
            sub.plan.chosen().groups.len(),
            ms(sub.plan.chosen().predicted_us),
            sub.depth,
            ms(sub.predicted_latency_us),
            sub.predicted_fps
        );
    }
    if !plan.idle.is_empty() {
        let _ = writeln!(out, "idle: {}", plan.idle.join(","));
    }
    let alone = match plan.data_parallel_fps {
        Some(fps) if fps > 0.0 => format!("; every board on its own frames: {fps:.2} frames/s"),
        Some(_) => "; no board holds the model alone".to_string(),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "predicted: {:.2} frames/s, latency {:.1} ms (budget {:.1} ms); one plan over every \
         board: {:.1} ms, {:.2} frames/s{alone}",
        plan.predicted_fps,
        ms(plan.predicted_latency_us),
        ms(plan.latency_budget_us),
        ms(plan.single_plan_us),
        1e6 / plan.single_plan_us.max(1) as f64,
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
    /// A load generator: send the frame this many times per second (open loop: on
    /// time, whatever the replies) for --duration seconds, then print how many were
    /// answered, refused (queue full) and failed, and the latency quantiles.
    #[arg(long, requires = "duration", conflicts_with = "output")]
    rate: Option<f64>,
    /// With --rate: seconds to send for.
    #[arg(long, requires = "rate")]
    duration: Option<f64>,
    /// The server's certificate (PEM): connect over TLS, trusting it alone.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
}

/// An `Inference` client that presents a token.
type Client = InferenceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// Puts `authorization: Bearer <token>` on every call, when there is a token.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
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
    let pinned = args
        .tls_cert
        .as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|e| {
                BadInput(format!(
                    "{}: cannot read the certificate ({e})",
                    path.display()
                ))
            })
        })
        .transpose()?;
    let target = Target {
        server: &args.server,
        token,
        pinned,
    };
    if let (Some(rate), Some(duration)) = (args.rate, args.duration) {
        return rt.block_on(load(args, &target, input, rate, duration));
    }
    let reply = rt.block_on(async {
        let mut client = connect(&target).await?;
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
