//! The worker as a program: `legion worker` and the worker-only `legion-worker` binary
//! (what a board runs, built without the compiler passes) share these options and
//! this entry point.

use crate::emulate::{ComputeLock, Emulation, Emulator, HostRate, measure_device_gflops};
use crate::tls::WorkerIdentity;
use crate::{Compute, Limits, Worker, WorkerConfig};
use anyhow::{Context, Result};
use std::path::PathBuf;
use tract_linalg::multithread::{Executor, set_default_executor};

/// An option that cannot be used as given (the CLI reports it as bad input).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadWorkerOption(pub String);

/// Options of a worker.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// Address to listen on, e.g. 0.0.0.0:7070 (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Device name reported to the coordinator (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Directory for uploaded models (content-addressed by sha256).
    #[arg(long, default_value = "legion-cache")]
    pub cache: PathBuf,
    /// File holding the token the coordinator must present (first line, trimmed).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Serve without a token: anyone who reaches the port can upload models and run
    /// them. Without --token-file the worker refuses to start unless this is given.
    #[arg(long)]
    pub insecure: bool,
    /// This worker's certificate (PEM, from `legion cluster keygen`): serve TLS, so the
    /// token and the tensors travel encrypted. Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM). Needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The largest gRPC message accepted or sent, MiB (model uploads are streamed in
    /// chunks; tensors are not).
    #[arg(long, default_value_t = Limits::default().message_bytes >> 20)]
    pub max_message_mb: usize,
    /// The largest model accepted, MiB.
    #[arg(long, default_value_t = Limits::default().upload_bytes >> 20)]
    pub max_upload_mb: u64,
    /// Disk the model cache may use, MiB; an upload beyond it is refused.
    #[arg(long, default_value_t = Limits::default().cache_bytes >> 20)]
    pub max_cache_mb: u64,
    /// Memory the tiles kept built may hold, MiB (their weights): the least recently
    /// used beyond it are dropped, and a plan whose own tiles hold more is refused.
    /// Give a small board its memory for Legion (the cluster file's memory_mb).
    #[arg(long, default_value_t = Limits::default().tiles_bytes >> 20)]
    pub max_tiles_mb: u64,
    /// Tile runs, programs and profiling calls served at once; more are refused.
    #[arg(long, default_value_t = Limits::default().runs)]
    pub max_runs: usize,
    /// Emulate a board: a class (firefly-rk3399, odroid-xu4) or
    /// `speed=GFLOPS,mbps=MBITS,latency_ms=MS`. Compute is measured on this host and
    /// scaled to the board; emulated workers on one host take turns computing.
    #[arg(long)]
    pub emulate: Option<String>,
    /// This machine's rate, GFLOP/s, as an earlier start printed it (with the same
    /// --threads): a real worker's rate on the device-rate workload, or an emulating
    /// host's calibrated rate on VGG-16 (followed from there as the host moves). Skips
    /// the measurement at start (several seconds).
    #[arg(long)]
    pub host_gflops: Option<f64>,
    /// Threads tract computes with (default: every core of this machine). An emulated
    /// worker computes on one: its times are the computing thread's CPU time.
    #[arg(long)]
    pub threads: Option<usize>,
}

/// The threads a worker computes with: `--threads`, else every core; one when
/// emulating, where time is the computing thread's CPU time.
fn compute_threads(args: &WorkerArgs) -> Result<usize, BadWorkerOption> {
    match (args.threads, &args.emulate) {
        (Some(0), _) => Err(BadWorkerOption(
            "--threads 0: give at least 1 thread".into(),
        )),
        (Some(n), Some(_)) if n > 1 => Err(BadWorkerOption(format!(
            "--threads {n} with --emulate: an emulated worker computes on one thread, \
             since its times are that thread's CPU time; drop --threads"
        ))),
        (_, Some(_)) => Ok(1),
        (Some(n), None) => Ok(n),
        (None, None) => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

/// Logs to stderr with tracing, at `info` unless RUST_LOG says otherwise.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The token in the first line of `path`, trimmed; an error naming the file when it
/// cannot be read or is empty.
pub fn read_token(path: &std::path::Path) -> Result<String, BadWorkerOption> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        BadWorkerOption(format!(
            "{}: cannot read the token file ({e})",
            path.display()
        ))
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(BadWorkerOption(format!(
            "{}: the token file is empty",
            path.display()
        )));
    }
    Ok(token)
}

/// The limits the options give, each at least 1.
fn limits(args: &WorkerArgs) -> Result<Limits, BadWorkerOption> {
    let positive = |name: &str, v: u64| match v {
        0 => Err(BadWorkerOption(format!("--{name} 0: give at least 1"))),
        _ => Ok(v),
    };
    Ok(Limits {
        message_bytes: (positive("max-message-mb", args.max_message_mb as u64)? as usize) << 20,
        upload_bytes: positive("max-upload-mb", args.max_upload_mb)? << 20,
        cache_bytes: positive("max-cache-mb", args.max_cache_mb)? << 20,
        tiles_bytes: positive("max-tiles-mb", args.max_tiles_mb)? << 20,
        runs: positive("max-runs", args.max_runs as u64)? as usize,
    })
}

/// Makes glibc give blocks of 1 MiB and more back to the system when freed. By
/// default its threshold for that grows to the largest block freed (up to 32 MiB), so
/// the buffers of loading a tile's weights stay resident after it: a board would keep
/// more than its tiles' weights. Not glibc: nothing to do.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt sets an allocator parameter (under glibc's arena locks).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Serves tiles until SIGINT or SIGTERM.
pub fn run_worker(args: &WorkerArgs) -> Result<()> {
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(WorkerIdentity::read(cert, key).map_err(|e| BadWorkerOption(format!("{e:#}")))?)
        }
        _ => None,
    };
    let limits = limits(args)?;
    let name = args.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into())
    });
    if let Some(g) = args.host_gflops
        && !(g.is_finite() && g > 0.0)
    {
        return Err(BadWorkerOption(format!(
            "--host-gflops {g}: give the positive rate an earlier start printed"
        ))
        .into());
    }
    let threads = compute_threads(args)?;
    if token.is_none() && !args.insecure {
        return Err(BadWorkerOption(
            "no --token-file: anyone who reaches the port could upload and run models. Give \
             --token-file (the cluster file's token_file), or --insecure to serve without one"
                .into(),
        )
        .into());
    }
    return_freed_memory();
    if threads > 1 {
        // Set before the rate is measured, so that the rate is this executor's.
        set_default_executor(Executor::multithread(threads));
    }
    let compute = match &args.emulate {
        Some(spec) => {
            let emulation: Emulation = spec
                .parse()
                .map_err(|e| BadWorkerOption(format!("--emulate {spec}: {e:#}")))?;
            match args.host_gflops {
                Some(host) => Compute::Emulated(Emulator::new(
                    emulation,
                    std::sync::Arc::new(HostRate::from_rate(
                        host,
                        &ComputeLock::open(ComputeLock::default_path())?,
                    )?),
                    None,
                )?),
                None => {
                    tracing::info!(
                        %emulation,
                        "measuring the host's rate (holding the compute lock)"
                    );
                    Compute::Emulated(Emulator::start(emulation, None)?)
                }
            }
        }
        None => Compute::Real {
            gflops: match args.host_gflops {
                Some(g) => g,
                None => {
                    tracing::info!(
                        threads,
                        "measuring this device's rate on the calibration workload"
                    );
                    measure_device_gflops()?
                }
            },
        },
    };
    let (clock, gflops, host_gflops) = match &compute {
        Compute::Real { gflops } => ("real", *gflops, *gflops),
        Compute::Emulated(e) => ("emulated", e.emulation.gflops, e.host().base_gflops()),
    };
    let worker = Worker::new(WorkerConfig {
        name: name.clone(),
        cache_dir: args.cache.clone(),
        token: token.clone(),
        tls: tls.clone(),
        limits,
        compute,
    })?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|e| BadWorkerOption(format!("cannot listen on {}: {e}", args.listen)))?;
        let addr = listener.local_addr()?;
        if token.is_some() && tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "the token crosses the network in clear text; give --tls-cert and --tls-key"
            );
        }
        tracing::info!(
            %addr,
            name,
            cache = %args.cache.display(),
            auth = if token.is_some() { "token" } else { "none" },
            tls = tls.is_some(),
            clock,
            gflops = format!("{gflops:.1}"),
            host_gflops = format!("{host_gflops:.1}"),
            threads,
            arch = std::env::consts::ARCH,
            version = env!("CARGO_PKG_VERSION"),
            "legion worker listening"
        );
        worker
            .serve(listener, shutdown_signal())
            .await
            .context("serving")?;
        tracing::info!("legion worker stopped");
        Ok(())
    })
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (systemd stop).
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
}
