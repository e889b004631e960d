//! Local clusters: workers started in this process on 127.0.0.1, emulating boards or
//! not. `legion cluster up --local N`, the demo and the tests use them; each worker is
//! the same [`Worker`] a board runs, reached over gRPC on loopback.

use crate::emulate::{ComputeLock, Emulation, Emulator, HostRate};
use crate::worker::{Compute, Worker, WorkerConfig};
use anyhow::{Context, Result, bail};
use legion_plan::{Cluster, CoordinatorLink, Device};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

/// The cluster file of `n` local workers on ports `base_port..` (0: any free port),
/// emulating `emulate[i]` (one entry for all, or one per worker; none for real
/// host workers). Devices are named after their class and index.
pub fn local_cluster(n: usize, emulate: &[String], base_port: u16) -> Result<Cluster> {
    if n == 0 {
        bail!("a local cluster needs at least one worker");
    }
    if !(emulate.is_empty() || emulate.len() == 1 || emulate.len() == n) {
        bail!(
            "{} emulation classes for {n} workers; give one for all or one per worker",
            emulate.len()
        );
    }
    let devices = (0..n)
        .map(|i| {
            let port = if base_port == 0 {
                0
            } else {
                base_port
                    .checked_add(i as u16)
                    .context("the ports run past 65535; pick a lower --port")?
            };
            let address = format!("127.0.0.1:{port}");
            let Some(spec) = emulate.get(i).or(emulate.first()) else {
                return Ok(Device {
                    name: format!("local-{i}"),
                    address,
                    emulate: None,
                    class: None,
                    link_mbps: 1000.0,
                    latency_ms: 0.0,
                    memory_mb: None,
                    tls_cert: None,
                });
            };
            let e: Emulation = spec.parse()?;
            let stem = e.class.clone().unwrap_or_else(|| "emulated".to_string());
            Ok(Device {
                name: format!("{stem}-{i}"),
                address,
                link_mbps: e.mbps,
                latency_ms: e.latency_ms,
                emulate: Some(e),
                class: None,
                memory_mb: None,
                tls_cert: None,
            })
        })
        .collect::<Result<Vec<Device>>>()?;
    let cluster = Cluster {
        coordinator: CoordinatorLink::default(),
        token_file: None,
        devices,
    };
    // Ports of 0 are only filled in when the workers bind.
    if base_port != 0 {
        cluster.validate().map_err(anyhow::Error::msg)?;
    }
    Ok(cluster)
}

/// Workers running in this process, one per device of a cluster.
pub struct LocalCluster {
    cluster: Cluster,
    workers: Vec<Option<Running>>,
}

/// One worker: its own runtime, so that stopping it also drops its connections.
struct Running {
    stop: oneshot::Sender<()>,
    rt: Runtime,
}

impl LocalCluster {
    /// Starts a worker for every device of `cluster`, which must all be on this host
    /// (127.0.0.1 or localhost). A port of 0 is replaced by the port bound. The host is
    /// calibrated first ([`HostRate::calibrate`]), once for all workers. Models are
    /// cached in `cache_dir` (shared: it is content-addressed).
    pub fn start(cluster: &Cluster, cache_dir: PathBuf) -> Result<LocalCluster> {
        LocalCluster::start_on(cluster, cache_dir, None)
    }

    /// [`LocalCluster::start`] on a given host rate (for tests that need times
    /// independent of the host: [`HostRate::fixed`]) instead of a calibration.
    pub fn start_on(
        cluster: &Cluster,
        cache_dir: PathBuf,
        host: Option<Arc<HostRate>>,
    ) -> Result<LocalCluster> {
        let mut started = LocalCluster {
            cluster: cluster.clone(),
            workers: vec![],
        };
        // The host is calibrated once for all workers, so that emulated boards of one
        // class keep exactly the same speed, and followed by one tracker.
        let mut host_rate = host;
        for i in 0..started.cluster.devices.len() {
            let device = &started.cluster.devices[i];
            let host = device.address.rsplit_once(':').map(|(h, _)| h);
            if !matches!(host, Some("127.0.0.1" | "localhost")) {
                bail!(
                    "device {}: {} is not a local address; a local cluster binds 127.0.0.1",
                    device.name,
                    device.address
                );
            }
            let host = match &host_rate {
                Some(h) => h.clone(),
                None => host_rate
                    .insert(HostRate::shared(&ComputeLock::open(
                        ComputeLock::default_path(),
                    )?)?)
                    .clone(),
            };
            let compute = match &device.emulate {
                Some(emulation) => {
                    let emulator = Emulator::new(emulation.clone(), host, None)
                        .with_context(|| format!("device {}", device.name))?;
                    tracing::info!(
                        device = %device.name,
                        "emulating {}: host {:.1} GFLOP/s, slowdown x{:.2}",
                        emulator.emulation,
                        emulator.host().base_gflops(),
                        emulator.slowdown()
                    );
                    Compute::Emulated(emulator)
                }
                None => Compute::Real {
                    gflops: host.base_gflops(),
                },
            };
            let worker = Worker::new(WorkerConfig {
                name: device.name.clone(),
                cache_dir: cache_dir.clone(),
                // On loopback, in this process.
                token: None,
                tls: None,
                // An emulated board keeps no more tiles than the cluster file gives it.
                limits: crate::Limits {
                    tiles_bytes: device
                        .memory_mb
                        .map_or(crate::Limits::default().tiles_bytes, |mb| mb << 20),
                    ..crate::Limits::default()
                },
                compute,
            })?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(format!("legion-{}", device.name))
                .enable_all()
                .build()
                .context("starting a local worker's runtime")?;
            let listener = {
                let _in_rt = rt.enter();
                let std_listener =
                    std::net::TcpListener::bind(&device.address).with_context(|| {
                        format!("device {}: binding {}", device.name, device.address)
                    })?;
                std_listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(std_listener)?
            };
            let address = listener.local_addr()?.to_string();
            let (stop, stopped) = oneshot::channel::<()>();
            rt.spawn(worker.serve(listener, async {
                let _ = stopped.await;
            }));
            started.cluster.devices[i].address = address;
            started.workers.push(Some(Running { stop, rt }));
        }
        Ok(started)
    }

    /// The cluster file of the running workers (ports filled in).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Stops worker `i` at once, connections and all, as if its board died.
    pub fn kill(&mut self, i: usize) {
        if let Some(w) = self.workers.get_mut(i).and_then(Option::take) {
            w.rt.shutdown_background();
        }
    }

    /// Stops every worker: each finishes the calls in progress, for up to 2 s.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        for w in self.workers.drain(..).flatten() {
            let _ = w.stop.send(());
            w.rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The model cache local workers share by default.
pub fn default_cache_dir() -> PathBuf {
    std::env::temp_dir().join("legion-worker-cache")
}
