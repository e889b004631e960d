//! `legion worker`: serve tiles over gRPC on a board until SIGINT or SIGTERM.

use crate::BadArgument;
use anyhow::{Context, Result};
use legion_runtime::{Worker, WorkerConfig};
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
}

pub fn run(args: &Args) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
    let worker = Worker::new(WorkerConfig {
        name: name.clone(),
        cache_dir: args.cache.clone(),
        token: token.clone(),
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
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
}
