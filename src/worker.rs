//! `legion worker`: serve tiles over gRPC on a board until SIGINT or SIGTERM.

use crate::BadArgument;
use anyhow::{Context, Result};
use legion_runtime::emulate::{Emulation, Emulator, measure_host_gflops};
use legion_runtime::{Compute, Worker, WorkerConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on, e.g. 0.0.0.0:7070.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Device name reported to the coordinator (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Directory for uploaded models (content-addressed by sha256).
    #[arg(long, default_value = "legion-cache")]
    cache: PathBuf,
    /// File holding the token the coordinator must present (first line, trimmed).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Emulate a board: a class (firefly-rk3399, odroid-xu4) or
    /// `speed=GFLOPS,mbps=MBITS,latency_ms=MS`. Compute is measured on this host and
    /// scaled to the board; emulated workers on one host take turns computing.
    #[arg(long)]
    emulate: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    crate::init_logging();
    let token = match &args.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                BadArgument(format!(
                    "{}: cannot read the token file ({e})",
                    path.display()
                ))
            })?;
            let token = text.lines().next().unwrap_or("").trim().to_string();
            if token.is_empty() {
                return Err(
                    BadArgument(format!("{}: the token file is empty", path.display())).into(),
                );
            }
            Some(token)
        }
        None => None,
    };
    let name = args.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into())
    });
    let compute = match &args.emulate {
        Some(spec) => {
            let emulation: Emulation = spec
                .parse()
                .map_err(|e| BadArgument(format!("--emulate {spec}: {e:#}")))?;
            tracing::info!(%emulation, "measuring the host's rate (holding the compute lock)");
            Compute::Emulated(Emulator::start(emulation, None)?)
        }
        None => {
            tracing::info!("measuring this device's rate on the calibration workload");
            Compute::Real {
                gflops: measure_host_gflops()?,
            }
        }
    };
    let (clock, gflops, host_gflops) = match &compute {
        Compute::Real { gflops } => ("real", *gflops, *gflops),
        Compute::Emulated(e) => ("emulated", e.emulation.gflops, e.host_gflops),
    };
    let worker = Worker::new(WorkerConfig {
        name: name.clone(),
        cache_dir: args.cache.clone(),
        token: token.clone(),
        compute,
    })?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|e| BadArgument(format!("cannot listen on {}: {e}", args.listen)))?;
        let addr = listener.local_addr()?;
        tracing::info!(
            %addr,
            name,
            cache = %args.cache.display(),
            auth = if token.is_some() { "token" } else { "none" },
            clock,
            gflops = format!("{gflops:.1}"),
            host_gflops = format!("{host_gflops:.1}"),
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
