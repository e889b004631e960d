//! Running a plan's candidate by its programs (docs/plan.md, "programs"): every board
//! gets its program once (LoadPlan); per inference the coordinator sends each board the
//! input rows its program receives from the coordinator, the boards pass rows to each
//! other, and the coordinator assembles the model's outputs from the rows sent to it.

use crate::execute::PlanRun;
use crate::proto::{Peer, Rows as WireRows, RunProgramReply, RunProgramRequest};
use crate::tensors::tensor_bytes;
use crate::wire::{rows_from_wire, rows_to_wire};
use crate::{Coordinator, Tensors};
use anyhow::{Context, Result, bail, ensure};
use legion_ir::{Ir, Rows, TensorRef};
use legion_plan::network::{StreamTimes, group_ends, programs_timeline, stream_timeline};
use legion_plan::{
    Candidate, Clock, DeviceId, DeviceTiming, Link, Party, Program, Step, StepTiming,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tract_onnx::prelude::Tensor;

/// How long a board's receive may wait for rows from another board.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// A candidate's programs, loaded on its boards.
pub struct LoadedPrograms {
    /// Per board's program (in the candidate's order): its device and program id.
    boards: Vec<(usize, DeviceId, String)>,
    /// Every board's program id, by name.
    ids: HashMap<String, String>,
}

impl Coordinator {
    /// Gives every board of `candidate` (of a plan for `ir`, checked against it) its
    /// program, its tiles built here (the boards never import the model) and the
    /// addresses of the boards it sends to, all boards at once; each loads its tiles
    /// before it answers.
    pub async fn load_programs(&self, ir: &Ir, candidate: &Candidate) -> Result<LoadedPrograms> {
        let model = self.model()?;
        let shapes_json = std::sync::Arc::new(serde_json::to_vec(&ir.shapes())?);
        let mut loading = tokio::task::JoinSet::new();
        for (p, program) in candidate.programs.iter().enumerate() {
            let Party::Device(name) = &program.party else {
                continue;
            };
            let d = self
                .id_of(name)
                .with_context(|| format!("the plan runs on {name}, which is not in the cluster"))?;
            let tiles: Vec<(usize, usize, legion_plan::TileSpec)> = candidate
                .groups
                .iter()
                .enumerate()
                .flat_map(|(g, group)| {
                    group
                        .tiles
                        .iter()
                        .enumerate()
                        .filter(|(_, t)| &t.device == name)
                        .map(move |(k, t)| (g, k, t.tile.clone()))
                })
                .collect();
            let mut peers: Vec<Peer> = vec![];
            for step in &program.steps {
                if let Step::Send {
                    to: Party::Device(peer),
                    ..
                }
                | Step::Share {
                    to: Party::Device(peer),
                    ..
                } = step
                    && !peers.iter().any(|p: &Peer| &p.name == peer)
                {
                    let to = self
                        .id_of(peer)
                        .and_then(|id| self.device(id).ok())
                        .with_context(|| format!("{name} sends to {peer}, not in the cluster"))?;
                    peers.push(Peer {
                        name: peer.clone(),
                        address: to.device.address.clone(),
                        tls_cert_pem: to.tls_cert.clone().unwrap_or_default(),
                    });
                }
            }
            let tiles = crate::ShippedTiles::build(ir, tiles)
                .with_context(|| format!("building {name}'s tiles"))?;
            let client = self.device(d)?.client().clone();
            let (model, program, name) = (model.clone(), program.clone(), name.clone());
            let shapes_json = shapes_json.clone();
            loading.spawn(async move {
                let id = client
                    .load_plan(&model, &shapes_json, &program, &tiles, peers)
                    .await
                    .with_context(|| format!("loading {name}'s program"));
                (p, d, name, id)
            });
        }
        let mut boards = vec![];
        let mut ids = HashMap::new();
        for (p, d, name, id) in loading.join_all().await {
            let id = id?;
            ids.insert(name, id.clone());
            boards.push((p, d, id));
        }
        boards.sort();
        Ok(LoadedPrograms { boards, ids })
    }

    /// Runs `candidate` (loaded by [`Coordinator::load_programs`]) once on `input`,
    /// as inference number `inference`. Runs of several inferences may go on at once
    /// (a stream): each board computes their tiles one at a time, the lowest
    /// inference's first of those ready.
    pub async fn run_programs(
        &self,
        ir: &Ir,
        candidate: &Candidate,
        loaded: &LoadedPrograms,
        input: Tensor,
        inference: u64,
    ) -> Result<PlanRun> {
        let mut tensors = Tensors::new(ir, input)?;
        let coordinator = candidate
            .programs
            .iter()
            .find(|p| p.party == Party::Coordinator)
            .context("the candidate has no coordinator program")?;
        // The rows the coordinator sends, per board.
        let mut coordinator_bytes = 0;
        let mut inputs: HashMap<&str, Vec<WireRows>> = HashMap::new();
        for step in &coordinator.steps {
            if let Step::Send {
                tensor,
                rows,
                channels,
                to: Party::Device(name),
            } = step
            {
                let strip = tensors.part(*tensor, *rows, *channels)?;
                coordinator_bytes += tensor_bytes(&strip);
                let program = loaded.ids[name].clone();
                let part = (*tensor, *rows, *channels);
                let m = rows_to_wire(program, inference, "", part, &strip)?;
                inputs.entry(name).or_default().push(m);
            }
        }
        let started = Instant::now();
        let mut pending = tokio::task::JoinSet::new();
        for (p, d, id) in &loaded.boards {
            let device = self.device(*d)?;
            let name = device.name().to_string();
            let runs = candidate.programs[*p]
                .steps
                .iter()
                .filter(|s| matches!(s, Step::Run { .. }))
                .count() as u32;
            let req = RunProgramRequest {
                program: id.clone(),
                inference,
                inputs: inputs.remove(name.as_str()).unwrap_or_default(),
                receive_timeout_ms: RECEIVE_TIMEOUT.as_millis() as u64,
                peer_programs: loaded.ids.clone(),
            };
            let (client, p) = (device.client().clone(), *p);
            pending.spawn(async move {
                let r = client
                    .run_program(req, runs, RECEIVE_TIMEOUT)
                    .await
                    .with_context(|| format!("{name}: running its program"));
                (p, r)
            });
        }
        let mut replies: HashMap<usize, RunProgramReply> = HashMap::new();
        while let Some(joined) = pending.join_next().await {
            let (p, r) = joined.context("a program task failed")?;
            replies.insert(p, r?);
        }
        let wall = started.elapsed();
        for reply in replies.values() {
            if reply.emulated != (self.clock() == Clock::Emulated) {
                bail!("a board answered on another clock than the cluster's");
            }
            for m in &reply.outputs {
                let ((tensor, rows, channels), strip) =
                    rows_from_wire(ir, m).with_context(|| format!("rows from {}", m.from))?;
                coordinator_bytes += tensor_bytes(&strip);
                tensors
                    .put_part(tensor, rows, channels, strip)
                    .with_context(|| format!("storing rows {rows} from {}", m.from))?;
            }
        }
        let outputs = tensors.outputs()?;
        let (groups, total_us) = self.program_timings(ir, candidate, &replies, wall)?;
        let held_bytes = loaded
            .boards
            .iter()
            .map(|(p, d, _)| {
                let held = replies.get(p).map_or(0, |r| r.peak_held_bytes);
                Ok((self.device(*d)?.name().to_string(), held))
            })
            .collect::<Result<_>>()?;
        let compute_us = candidate
            .programs
            .iter()
            .enumerate()
            .map(|(p, program)| match replies.get(&p) {
                Some(r) => r.compute_us.clone(),
                None => vec![0; program.steps.len()],
            })
            .collect();
        Ok(PlanRun {
            outputs,
            groups,
            total_us,
            clock: self.clock(),
            coordinator_bytes,
            held_bytes,
            compute_us,
        })
    }

    /// The links of the parties of `programs`, in order: the coordinator's and each
    /// board's as the cluster file gives them.
    fn program_links(&self, programs: &[Program]) -> Result<Vec<Link>> {
        programs
            .iter()
            .map(|prog| match &prog.party {
                Party::Coordinator => Ok(Link {
                    mbps: self.cluster().coordinator.mbps,
                    latency_ms: 0.0,
                }),
                Party::Device(name) => Ok(self
                    .cluster()
                    .device(name)
                    .with_context(|| format!("{name} is not in the cluster"))?
                    .link()),
            })
            .collect()
    }

    /// The emulated timeline of `runs`, runs of `candidate`'s programs one after the
    /// other, as a stream with `depth` frames in flight ([`stream_timeline`]): each
    /// board works on every frame in flight, each run step taking the compute time its
    /// run measured.
    pub fn stream_times(
        &self,
        ir: &Ir,
        candidate: &Candidate,
        runs: &[&PlanRun],
        depth: usize,
    ) -> Result<StreamTimes> {
        let programs = &candidate.programs;
        for run in runs {
            ensure!(
                run.compute_us.len() == programs.len()
                    && run
                        .compute_us
                        .iter()
                        .zip(programs)
                        .all(|(c, p)| c.len() == p.steps.len()),
                "a run of another candidate's programs (or through the hub) is not in the stream"
            );
        }
        let links = self.program_links(programs)?;
        let bytes =
            |t: TensorRef, rows: Rows, channels: Option<Rows>| ir.part_bytes(t, rows, channels);
        let compute = |f: usize, p: usize, k: usize| runs[f].compute_us[p][k] as f64;
        stream_timeline(programs, &links, bytes, compute, runs.len(), depth)
            .map_err(anyhow::Error::msg)
    }

    /// Per group, its step's timing, and the end-to-end time. On the emulated clock the
    /// programs' timeline ([`programs_timeline`]) over the boards' compute times and the
    /// links of the cluster file; a group's time runs from the end of the previous
    /// group's last tile to the end of its own (the last group's to the coordinator's
    /// last receive). On the real clock the end-to-end time is the wall clock, and a
    /// group's time is its slowest tile's compute (transfers overlap the tiles).
    fn program_timings(
        &self,
        ir: &Ir,
        candidate: &Candidate,
        replies: &HashMap<usize, RunProgramReply>,
        wall: Duration,
    ) -> Result<(Vec<StepTiming>, u64)> {
        let programs = &candidate.programs;
        let bytes =
            |t: TensorRef, rows: Rows, channels: Option<Rows>| ir.part_bytes(t, rows, channels);
        let compute = |p: usize, k: usize| -> u64 {
            replies
                .get(&p)
                .and_then(|r| r.compute_us.get(k).copied())
                .unwrap_or(0)
        };
        let host_gflops = |p: usize, k: usize| -> Option<f64> {
            replies
                .get(&p)
                .and_then(|r| r.host_gflops.get(k).copied())
                .filter(|g| *g > 0.0)
        };
        let links = self.program_links(programs)?;
        let ends = programs_timeline(programs, &links, bytes, |p, k| compute(p, k) as f64)
            .map_err(anyhow::Error::msg)?;
        let group_end = group_ends(programs, &ends, candidate.groups.len());
        // Per group: (party, step) of each of its runs.
        let mut runs: Vec<Vec<(usize, usize)>> = vec![vec![]; candidate.groups.len()];
        for (p, prog) in programs.iter().enumerate() {
            for (k, step) in prog.steps.iter().enumerate() {
                if let Step::Run { group, .. } = step {
                    runs[*group].push((p, k));
                }
            }
        }
        let end_of_all = ends.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
        let mut group_start = 0.0f64;
        let mut timings = vec![];
        for (g, group_runs) in runs.iter().enumerate() {
            // One timing per device: its sub-strips' runs summed, from the start of
            // its first to the end of its last.
            let mut devices: Vec<DeviceTiming> = vec![];
            for &(p, k) in group_runs {
                let c = compute(p, k);
                let end = ends[p][k];
                let (bytes_in, bytes_out) = step_bytes(&programs[p], k, &bytes);
                let Party::Device(name) = &programs[p].party else {
                    bail!("the coordinator runs group {g}");
                };
                let in_us = ((end - c as f64) - group_start).max(0.0).round() as u64;
                let done_us = (end - group_start).max(0.0).round() as u64;
                match devices.iter_mut().find(|d| &d.device == name) {
                    Some(d) => {
                        d.bytes_in += bytes_in;
                        d.bytes_out += bytes_out;
                        d.in_us = d.in_us.min(in_us);
                        d.compute_us += c;
                        d.done_us = d.done_us.max(done_us);
                        d.host_gflops = d.host_gflops.or(host_gflops(p, k));
                    }
                    None => devices.push(DeviceTiming {
                        device: name.clone(),
                        bytes_in,
                        bytes_out,
                        in_us,
                        compute_us: c,
                        out_us: 0,
                        done_us,
                        host_gflops: host_gflops(p, k),
                    }),
                }
            }
            let total_us = match self.clock() {
                Clock::Emulated => (group_end[g] - group_start).round() as u64,
                Clock::Real => devices.iter().map(|d| d.compute_us).max().unwrap_or(0),
            };
            timings.push(StepTiming {
                clock: self.clock(),
                total_us,
                devices,
            });
            group_start = group_end[g];
        }
        let total_us = match self.clock() {
            Clock::Emulated => end_of_all.round() as u64,
            Clock::Real => wall.as_micros() as u64,
        };
        Ok((timings, total_us))
    }
}

/// Bytes a board received for its run at step `k` (since its previous run) and sent
/// after it (until its next run).
fn step_bytes(
    program: &Program,
    k: usize,
    bytes: &impl Fn(TensorRef, Rows, Option<Rows>) -> u64,
) -> (u64, u64) {
    let is_run = |s: &Step| matches!(s, Step::Run { .. });
    let before = program.steps[..k]
        .iter()
        .rev()
        .take_while(|s| !is_run(s))
        .map(|s| match s {
            Step::Receive {
                tensor,
                rows,
                channels,
                ..
            } => bytes(*tensor, *rows, *channels),
            _ => 0,
        })
        .sum();
    let after = program.steps[k + 1..]
        .iter()
        .take_while(|s| !is_run(s))
        .map(|s| match s {
            Step::Send {
                tensor,
                rows,
                channels,
                ..
            } => bytes(*tensor, *rows, *channels),
            _ => 0,
        })
        .sum();
    (before, after)
}
