//! `legion cluster up`: start a cluster of workers on this host and write its file.

use crate::BadInput;
use anyhow::{Context, Result};
use legion_plan::Cluster;
use legion_runtime::emulate::{ComputeLock, HostRate};
use legion_runtime::{LocalCluster, default_cache_dir, local_cluster};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Start workers on 127.0.0.1 and stay in the foreground until interrupted.
    Up(UpArgs),
}

#[derive(clap::Args)]
struct UpArgs {
    /// Number of workers to start.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    local: Option<usize>,
    /// Board classes to emulate, one for all or one per worker, comma-separated
    /// (firefly-rk3399, odroid-xu4, or speed=GFLOPS,mbps=MBITS,latency_ms=MS; separate
    /// key lists with `;`). Without it the workers run at this host's own speed.
    #[arg(long, requires = "local")]
    emulate: Option<String>,
    /// First port; worker i listens on PORT+i (0: any free port).
    #[arg(long, default_value_t = 50051, requires = "local")]
    port: u16,
    /// Start the workers a cluster file lists instead (its addresses must be local).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Write the cluster file here (default: print it).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Model cache shared by the workers.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// The host's rate, GFLOP/s, from an earlier calibration (`legion worker` and
    /// `legion profile` print it): emulated workers start from it instead of
    /// calibrating (10-30 s), and still follow the host from there.
    #[arg(long)]
    host_gflops: Option<f64>,
}

pub fn run(args: &Args) -> Result<()> {
    let Command::Up(up) = &args.command;
    crate::init_logging();
    let cluster = match (&up.file, up.local) {
        (Some(file), _) => Cluster::load(file)?,
        (None, Some(n)) => {
            let emulate = parse_emulate(up.emulate.as_deref());
            local_cluster(n, &emulate, up.port).map_err(|e| BadInput(format!("{e:#}")))?
        }
        (None, None) => unreachable!("clap requires --local or --file"),
    };
    let cache = up.cache.clone().unwrap_or_else(default_cache_dir);
    let host = match up.host_gflops {
        Some(g) if !(g.is_finite() && g > 0.0) => {
            return Err(BadInput(format!(
                "--host-gflops {g}: give the positive rate an earlier start printed"
            ))
            .into());
        }
        Some(g) => {
            let lock = ComputeLock::open(ComputeLock::default_path())?;
            Some(Arc::new(HostRate::from_rate(g, &lock)?))
        }
        None => None,
    };
    eprintln!(
        "starting {} workers{}...",
        cluster.devices.len(),
        if host.is_some() {
            ""
        } else {
            " (emulated workers measure the host first)"
        }
    );
    let local = LocalCluster::start_on(&cluster, cache, host)?;
    let text = local.cluster().to_toml();
    match &up.out {
        Some(path) => {
            std::fs::write(path, &text)
                .with_context(|| format!("writing the cluster file {}", path.display()))?;
            eprintln!("cluster file written to {}", path.display());
        }
        None => print!("{text}"),
    }
    for d in &local.cluster().devices {
        eprintln!(
            "  {:<20} {:<21} {}",
            d.name,
            d.address,
            d.emulate
                .as_ref()
                .map_or("real (this host)".to_string(), |e| e.spec())
        );
    }
    eprintln!("serving; press Ctrl-C to stop");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(legion_runtime::serve::shutdown_signal());
    local.stop();
    Ok(())
}

/// `a,b` or `speed=..,mbps=..,latency_ms=..;speed=..`: key lists hold commas, so a list
/// with `=` is split on `;`.
fn parse_emulate(s: Option<&str>) -> Vec<String> {
    let Some(s) = s else { return vec![] };
    let sep = if s.contains('=') { ';' } else { ',' };
    s.split(sep).map(|p| p.trim().to_string()).collect()
}
