//! The coordinator: connects to every device of a cluster, uploads the model, and runs
//! steps (a fused group split over devices, or a stage whole on one device): scatter
//! the input strips, run the tiles, gather and assemble the output strips, and report
//! per-device timings on the cluster's clock.
//!
//! On the emulated clock, compute times come from the workers (measured on the host,
//! scaled to the board) and link times are modelled from the bytes that really moved
//! ([`legion_plan::network`]). On the real clock, everything is wall time.

use crate::client::{ModelId, TileResult, WorkerClient};
use crate::programs::LoadedPrograms;
use crate::proto::InfoReply;
use crate::tensors::{Tensors, tensor_bytes};
use crate::wire::sha256_hex;
use anyhow::{Context, Result, anyhow, bail, ensure};
use legion_ir::Ir;
use legion_plan::network::{Flow, StepPart, arrival_times, step_timeline};
use legion_plan::{
    Candidate, Clock, Cluster, Device, DeviceId, DeviceTiming, HostRates, LinkProbe, StepTiming,
    TileSpec,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tract_onnx::prelude::Tensor;

/// Deadline of a tile run or a profiling call on one device.
pub const COMPUTE_TIMEOUT: Duration = Duration::from_secs(120);

/// A device of the cluster, connected.
#[derive(Clone)]
pub struct ConnectedDevice {
    /// As the cluster file gives it.
    pub device: Device,
    /// What the worker said about itself.
    pub info: InfoReply,
    /// Its worker's certificate (PEM) as the cluster file pins it; `None`: plain text.
    pub tls_cert: Option<Vec<u8>>,
    client: WorkerClient,
}

impl ConnectedDevice {
    /// Its name in the cluster file.
    pub fn name(&self) -> &str {
        &self.device.name
    }

    /// Its compute rate on the calibration workload, GFLOP/s.
    pub fn gflops(&self) -> f64 {
        self.info.gflops
    }

    /// The connection.
    pub fn client(&self) -> &WorkerClient {
        &self.client
    }
}

/// A cluster, connected and checked against its file.
pub struct Coordinator {
    cluster: Cluster,
    devices: Vec<ConnectedDevice>,
    clock: Clock,
    model: Option<ModelId>,
    /// Candidates whose programs the boards hold, by the programs' hash.
    loaded: tokio::sync::Mutex<Vec<(String, Arc<LoadedPrograms>)>>,
    /// The next inference's number, shared with the coordinators made by
    /// [`Coordinator::only`]: the boards key rows in flight by program and inference, so
    /// no two runs on the same boards may share a number.
    inferences: Arc<AtomicU64>,
}

impl Coordinator {
    /// Connects to every device (concurrently), reads its Info and checks that it runs
    /// what the cluster file says: the same emulation, or none for a real board. The
    /// connections live on the tokio runtime that ran this: use the coordinator there.
    pub async fn connect(cluster: &Cluster, timeout: Duration) -> Result<Coordinator> {
        cluster
            .validate()
            .map_err(|e| anyhow!("bad cluster: {e}"))?;
        let token = match &cluster.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let mut pending = tokio::task::JoinSet::new();
        for (i, d) in cluster.devices.iter().enumerate() {
            let (d, token) = (d.clone(), token.clone());
            pending.spawn(async move {
                let connect = async {
                    let tls_cert = match &d.tls_cert {
                        Some(path) => Some(std::fs::read(path).with_context(|| {
                            format!("reading its pinned certificate {}", path.display())
                        })?),
                        None => None,
                    };
                    let client = WorkerClient::connect(
                        &d.address,
                        token.as_deref(),
                        tls_cert.as_deref(),
                        timeout,
                    )
                    .await?
                    .with_compute_timeout(COMPUTE_TIMEOUT);
                    let info = client.info().await?;
                    check_emulation(&d, &info)?;
                    Ok::<_, anyhow::Error>(ConnectedDevice {
                        device: d.clone(),
                        info,
                        tls_cert,
                        client,
                    })
                };
                let r = connect.await.with_context(|| format!("device {}", d.name));
                (i, r)
            });
        }
        let mut devices: Vec<Option<ConnectedDevice>> = vec![None; cluster.devices.len()];
        while let Some(joined) = pending.join_next().await {
            let (i, r) = joined.context("a connection task failed")?;
            devices[i] = Some(r?);
        }
        let clock = if cluster.is_emulated() {
            Clock::Emulated
        } else {
            Clock::Real
        };
        Ok(Coordinator {
            cluster: cluster.clone(),
            devices: devices.into_iter().map(|d| d.expect("joined")).collect(),
            clock,
            model: None,
            loaded: tokio::sync::Mutex::default(),
            inferences: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A coordinator of the devices `keep` alone (in that order), on the same
    /// connections and with the same model: what a plan for the boards left runs on
    /// when others are down.
    pub fn only(&self, keep: &[DeviceId]) -> Result<Coordinator> {
        let devices = keep
            .iter()
            .map(|d| self.device(*d).cloned())
            .collect::<Result<Vec<_>>>()?;
        let mut cluster = self.cluster.clone();
        cluster.devices = devices.iter().map(|d| d.device.clone()).collect();
        Ok(Coordinator {
            cluster,
            devices,
            clock: self.clock,
            model: self.model.clone(),
            loaded: tokio::sync::Mutex::default(),
            inferences: self.inferences.clone(),
        })
    }

    /// The devices, in the cluster file's order (a [`DeviceId`] indexes them).
    pub fn devices(&self) -> &[ConnectedDevice] {
        &self.devices
    }

    /// Every device's id, in the cluster file's order.
    pub fn ids(&self) -> impl Iterator<Item = DeviceId> + use<> {
        (0..self.devices.len()).map(DeviceId)
    }

    /// The id of the device named `name` in the cluster file.
    pub fn id_of(&self, name: &str) -> Option<DeviceId> {
        self.devices
            .iter()
            .position(|d| d.name() == name)
            .map(DeviceId)
    }

    /// Device `d`; an error when the cluster has no such device.
    pub fn device(&self, d: DeviceId) -> Result<&ConnectedDevice> {
        self.devices
            .get(d.index())
            .with_context(|| format!("{d}: the cluster has {} devices", self.devices.len()))
    }

    /// The programs of `candidate` (of a plan for `ir`), loaded on its boards on first
    /// use (and again after another model is uploaded).
    pub async fn loaded_programs(
        &self,
        ir: &Ir,
        candidate: &Candidate,
    ) -> Result<Arc<LoadedPrograms>> {
        let key = format!(
            "{} {}",
            self.model()?.sha256,
            sha256_hex(&serde_json::to_vec(&candidate.programs)?)
        );
        let mut loaded = self.loaded.lock().await;
        if let Some((_, l)) = loaded.iter().find(|(k, _)| *k == key) {
            return Ok(l.clone());
        }
        let l = Arc::new(self.load_programs(ir, candidate).await?);
        loaded.push((key, l.clone()));
        Ok(l)
    }

    /// A fresh inference number.
    pub fn next_inference(&self) -> u64 {
        self.inferences.fetch_add(1, Ordering::Relaxed)
    }

    /// The clock every reported time is on.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The cluster file.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Uploads the model to every device that does not have it cached (concurrently);
    /// later steps run this model. Returns the bytes sent per device.
    pub async fn upload(&mut self, onnx: &[u8], input_shape: &[usize]) -> Result<Vec<u64>> {
        let onnx = std::sync::Arc::new(onnx.to_vec());
        let mut pending = tokio::task::JoinSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            let (client, name, onnx) = (d.client.clone(), d.device.name.clone(), onnx.clone());
            let shape = input_shape.to_vec();
            pending.spawn(async move {
                let r = client
                    .upload_model(&onnx, &shape)
                    .await
                    .with_context(|| format!("device {name}: uploading the model"));
                (i, r)
            });
        }
        let mut sent = vec![0; self.devices.len()];
        let mut id = None;
        while let Some(joined) = pending.join_next().await {
            let (i, r) = joined.context("an upload task failed")?;
            let (model, uploaded) = r?;
            sent[i] = if uploaded { onnx.len() as u64 } else { 0 };
            id = Some(model);
        }
        self.model = id;
        Ok(sent)
    }

    /// The model uploaded last.
    pub fn model(&self) -> Result<&ModelId> {
        self.model
            .as_ref()
            .ok_or_else(|| anyhow!("no model uploaded to the cluster yet"))
    }

    /// Runs one step: every device's tile (a device with the tile program it runs) at
    /// once, strips cut from `tensors`, output strips stored back into `tensors`.
    /// Returns the step's timing on the cluster's clock.
    pub async fn run_step(
        &self,
        tiles: &[(DeviceId, TileSpec)],
        tensors: &mut Tensors<'_>,
    ) -> Result<StepTiming> {
        let model = self.model()?.clone();
        ensure!(!tiles.is_empty(), "a step needs at least one device");
        if let Some(stage) = tiles.iter().find_map(|(_, spec)| spec.partials().next()) {
            bail!(
                "the group reduces stage {stage} across its boards, which only the boards' own \
                 programs can do; run the plan without the hub transport"
            );
        }
        let mut pending = tokio::task::JoinSet::new();
        let mut bytes_in = vec![];
        for (k, (d, spec)) in tiles.iter().enumerate() {
            let device = self.device(*d)?;
            let inputs = spec
                .inputs
                .iter()
                .map(|i| tensors.strip(i.tensor, i.rows))
                .collect::<Result<Vec<Tensor>>>()
                .with_context(|| format!("cutting the strips for device {}", device.name()))?;
            bytes_in.push(inputs.iter().map(tensor_bytes).sum::<u64>());
            let (client, spec, model) = (device.client.clone(), spec.clone(), model.clone());
            let name = device.name().to_string();
            pending.spawn(async move {
                let start = Instant::now();
                let r = client
                    .run_tile(&model, &spec, &inputs)
                    .await
                    .with_context(|| format!("device {name}: running its tile"));
                (k, r, start.elapsed())
            });
        }
        let started = Instant::now();
        let mut runs: Vec<Option<(TileResult, Duration)>> =
            (0..tiles.len()).map(|_| None).collect();
        while let Some(joined) = pending.join_next().await {
            let (k, r, wall) = joined.context("a tile task failed")?;
            runs[k] = Some((r?, wall));
        }
        let wall = started.elapsed();
        let runs: Vec<(TileResult, Duration)> =
            runs.into_iter().map(|r| r.expect("joined")).collect();
        for ((d, spec), (run, _)) in tiles.iter().zip(&runs) {
            if run.emulated != (self.clock == Clock::Emulated) {
                bail!(
                    "device {} answered on the {} clock, the cluster is on the {} clock",
                    self.devices[d.index()].name(),
                    if run.emulated { "emulated" } else { "real" },
                    self.clock
                );
            }
            ensure!(
                run.outputs.len() == spec.outputs.len(),
                "device {} returned {} strips for {} outputs",
                self.devices[d.index()].name(),
                run.outputs.len(),
                spec.outputs.len()
            );
        }
        let mut bytes_out = vec![];
        for ((d, spec), (run, _)) in tiles.iter().zip(runs.iter()) {
            bytes_out.push(run.outputs.iter().map(tensor_bytes).sum::<u64>());
            for (out, strip) in spec.outputs.iter().zip(&run.outputs) {
                let t = legion_ir::TensorRef::Stage(out.stage);
                tensors
                    .put_part(t, out.rows, out.channels, strip.clone())
                    .with_context(|| {
                        format!(
                            "storing the output of device {}",
                            self.devices[d.index()].name()
                        )
                    })?;
            }
        }
        let devices: Vec<DeviceTiming> = match self.clock {
            Clock::Emulated => self.emulated_timings(tiles, &runs, &bytes_in, &bytes_out),
            Clock::Real => tiles
                .iter()
                .zip(&runs)
                .zip(bytes_in.iter().zip(&bytes_out))
                .map(|(((d, _), (run, wall)), (&bin, &bout))| {
                    real_timing(self.devices[d.index()].name(), run, *wall, bin, bout)
                })
                .collect(),
        };
        let total_us = match self.clock {
            Clock::Emulated => devices.iter().map(|t| t.done_us).max().unwrap_or(0),
            Clock::Real => wall.as_micros() as u64,
        };
        Ok(StepTiming {
            clock: self.clock,
            total_us,
            devices,
        })
    }

    /// Emulated step: the timeline of [`step_timeline`] on the bytes that moved and the
    /// emulated compute times.
    fn emulated_timings(
        &self,
        tiles: &[(DeviceId, TileSpec)],
        runs: &[(TileResult, Duration)],
        bytes_in: &[u64],
        bytes_out: &[u64],
    ) -> Vec<DeviceTiming> {
        let parts: Vec<StepPart> = (0..tiles.len())
            .map(|k| {
                let link = self.devices[tiles[k].0.index()].device.link();
                StepPart {
                    bytes_in: bytes_in[k],
                    link_in: link,
                    compute_us: runs[k].0.compute_us as f64,
                    bytes_out: bytes_out[k],
                    link_out: link,
                }
            })
            .collect();
        step_timeline(&parts, self.cluster.coordinator.mbps)
            .iter()
            .enumerate()
            .map(|(k, t)| DeviceTiming {
                device: self.devices[tiles[k].0.index()].name().to_string(),
                bytes_in: bytes_in[k],
                bytes_out: bytes_out[k],
                in_us: t.inputs_in_us.round() as u64,
                compute_us: runs[k].0.compute_us,
                out_us: (t.done_us - t.computed_us).round() as u64,
                done_us: t.done_us.round() as u64,
                host_gflops: runs[k].0.host_gflops,
            })
            .collect()
    }

    /// Runs `spec` on device `d` once to warm up if `warm_up`, then `runs` times, on
    /// inputs the worker makes up; returns the warm-up time and the run times on the
    /// cluster's clock, µs, and on the emulated clock the range of the host's rates
    /// they were scaled with.
    pub async fn profile_tile(
        &self,
        d: DeviceId,
        spec: &TileSpec,
        runs: u32,
        warm_up: bool,
    ) -> Result<(u64, Vec<u64>, Option<HostRates>)> {
        let device = self.device(d)?;
        let reply = device
            .client
            .profile_stage(self.model()?, spec, runs, warm_up)
            .await
            .with_context(|| format!("device {}: profiling", device.name()))?;
        ensure!(
            reply.compute_us.len() == runs as usize,
            "device {}: {} times for {runs} runs",
            device.name(),
            reply.compute_us.len()
        );
        let host = HostRates::of(reply.host_gflops.iter().copied());
        Ok((reply.warmup_us, reply.compute_us, host))
    }

    /// Sends `bytes` to device `d` and back. The bytes really travel; on the emulated
    /// clock the times are the link model's, on the real clock half the round trip each.
    pub async fn probe(&self, d: DeviceId, bytes: u64) -> Result<LinkProbe> {
        let device = self.device(d)?;
        let rtt = device
            .client
            .probe_transfer(bytes as usize)
            .await
            .with_context(|| format!("device {}: transfer probe", device.name()))?;
        let (in_us, out_us) = match self.clock {
            Clock::Emulated => {
                let flow = Flow {
                    start_us: 0.0,
                    bytes,
                    link: device.device.link(),
                };
                let t = arrival_times(&[flow], self.cluster.coordinator.mbps)[0].round() as u64;
                (t, t)
            }
            Clock::Real => {
                let half = rtt.as_micros() as u64 / 2;
                (half, half)
            }
        };
        Ok(LinkProbe {
            bytes,
            in_us,
            out_us,
        })
    }
}

/// Real step: the call's wall time minus the compute is the transfer time, split
/// between in and out by bytes.
fn real_timing(name: &str, run: &TileResult, wall: Duration, bin: u64, bout: u64) -> DeviceTiming {
    let wall_us = wall.as_micros() as u64;
    let transfer = wall_us.saturating_sub(run.compute_us);
    let in_us = if bin + bout == 0 {
        transfer / 2
    } else {
        (transfer as f64 * bin as f64 / (bin + bout) as f64).round() as u64
    };
    DeviceTiming {
        device: name.to_string(),
        bytes_in: bin,
        bytes_out: bout,
        in_us,
        compute_us: run.compute_us,
        out_us: transfer - in_us,
        done_us: wall_us,
        host_gflops: None,
    }
}

/// Checks that the worker runs the emulation the cluster file gives the device, and
/// that the file's link is the emulated board's.
fn check_emulation(d: &Device, info: &InfoReply) -> Result<()> {
    let start_with = |e: &str| format!("start it with `legion worker --emulate {e}`");
    match (&d.emulate, &info.emulation) {
        (None, None) => Ok(()),
        (None, Some(e)) => bail!(
            "the cluster file lists a real board but the worker at {} emulates {}; remove \
             --emulate from the worker or add `emulate` to the device",
            d.address,
            describe(e.class.as_str(), e.gflops)
        ),
        (Some(want_e), None) => bail!(
            "the cluster file says it emulates {} but the worker at {} is a real board; {}",
            want_e.spec(),
            d.address,
            start_with(&want_e.spec())
        ),
        (Some(want_e), Some(got)) => {
            let want = want_e.spec();
            let same = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
            let matches = want_e.class.clone().unwrap_or_default() == got.class
                && same(want_e.gflops, got.gflops)
                && same(want_e.mbps, got.mbps)
                && same(want_e.latency_ms, got.latency_ms);
            if !matches {
                bail!(
                    "the cluster file says it emulates {want} but the worker at {} emulates {} \
                     ({} Mbit/s, {} ms); {}",
                    d.address,
                    describe(got.class.as_str(), got.gflops),
                    got.mbps,
                    got.latency_ms,
                    start_with(&want)
                );
            }
            if !same(d.link_mbps, want_e.mbps) || !same(d.latency_ms, want_e.latency_ms) {
                bail!(
                    "its link in the cluster file ({} Mbit/s, {} ms) differs from the emulated \
                     board's ({} Mbit/s, {} ms); make them agree",
                    d.link_mbps,
                    d.latency_ms,
                    want_e.mbps,
                    want_e.latency_ms
                );
            }
            Ok(())
        }
    }
}

fn describe(class: &str, gflops: f64) -> String {
    if class.is_empty() {
        format!("a {gflops:.1} GFLOP/s board")
    } else {
        class.to_string()
    }
}
