//! `legion cluster up`: start a cluster of workers on this host and write its file;
//! `legion cluster keygen`: a TLS certificate and key per board of a cluster file.

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
    /// Make a self-signed TLS certificate and key for every board of a cluster file:
    /// each board serves its own (`legion worker --tls-cert --tls-key`), and the cluster
    /// file pins it (`tls_cert` per device).
    Keygen(KeygenArgs),
}

#[derive(clap::Args)]
struct KeygenArgs {
    /// The cluster file.
    cluster: PathBuf,
    /// Directory to write `<board>.pem` and `<board>.key` in (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Replace certificates and keys already there.
    #[arg(long)]
    force: bool,
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
    match &args.command {
        Command::Up(up) => run_up(up),
        Command::Keygen(keygen) => run_keygen(keygen),
    }
}

/// Writes a certificate and key per board; prints the lines that pin them and how to
/// start each worker.
fn run_keygen(args: &KeygenArgs) -> Result<()> {
    use legion_runtime::tls::WorkerIdentity;
    use std::io::Write;
    let cluster = Cluster::load(&args.cluster)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let files = |name: &str| {
        (
            args.out.join(format!("{name}.pem")),
            args.out.join(format!("{name}.key")),
        )
    };
    if !args.force
        && let Some(path) = cluster.devices.iter().find_map(|d| {
            let (cert, key) = files(&d.name);
            [cert, key].into_iter().find(|p| p.exists())
        })
    {
        return Err(BadInput(format!(
            "{} exists; give --force to replace the certificates and keys in {}",
            path.display(),
            args.out.display()
        ))
        .into());
    }
    for d in &cluster.devices {
        let host = d
            .address
            .rsplit_once(':')
            .map_or(&d.address[..], |(h, _)| h);
        let mut names = vec![d.name.clone()];
        if !host.is_empty() && host != "0.0.0.0" {
            names.push(host.trim_matches(['[', ']']).to_string());
        }
        let identity = WorkerIdentity::generate(&names)
            .with_context(|| format!("device {}: making its certificate", d.name))?;
        let (cert, key) = files(&d.name);
        std::fs::write(&cert, &identity.cert_pem)
            .with_context(|| format!("writing {}", cert.display()))?;
        let mut file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&key)
                .with_context(|| format!("writing {}", key.display()))?
        };
        file.write_all(identity.key_pem.as_bytes())
            .with_context(|| format!("writing {}", key.display()))?;
    }
    println!(
        "wrote a certificate and key for {} boards in {}.",
        cluster.devices.len(),
        args.out.display()
    );
    println!(
        "\nPin them in {}, in each [[device]]:",
        args.cluster.display()
    );
    for d in &cluster.devices {
        println!(
            "  {:<20} tls_cert = \"{}\"",
            d.name,
            files(&d.name).0.display()
        );
    }
    println!("\nCopy each board its two files and start it with:");
    println!(
        "  legion worker --tls-cert <board>.pem --tls-key <board>.key --token-file <token> ..."
    );
    println!("Keep the .key files on their boards only.");
    Ok(())
}

fn run_up(up: &UpArgs) -> Result<()> {
    crate::init_logging();
    let cluster = match (&up.file, up.local) {
        (Some(file), _) => {
            let cluster = Cluster::load(file)?;
            if let Some(d) = cluster.devices.iter().find(|d| d.tls_cert.is_some()) {
                return Err(BadInput(format!(
                    "{}: device {} pins a TLS certificate, but `cluster up` serves plain \
                     text on this host; start such boards with `legion worker --tls-cert`",
                    file.display(),
                    d.name
                ))
                .into());
            }
            cluster
        }
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
