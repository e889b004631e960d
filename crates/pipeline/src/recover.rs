//! Inference after inference through board failures (docs/architecture.md, "The
//! driver", Recovery): an inference that fails or misses its deadline has every board
//! of its plan asked for Health; those that do not answer are marked down, the plan is
//! compiled again from the profile for the boards left (milliseconds), and the
//! inference runs again. A board marked down that answers Health again (asked every
//! [`PROBE_EVERY`]) is taken back at the next inference. A board whose compute runs
//! [`STRAGGLER_RATIO`] slower than predicted [`STRAGGLER_RUNS`] inferences in a row has
//! its profile rescaled by that ratio, and the plan is compiled again. No inference is
//! lost or answered wrong without an error: each returns the plan's output or an error
//! naming it. With standby plans ([`Resilient::prepare_standby`]) the plan for each
//! board's loss is loaded on the others in advance, so that recovering costs the Health
//! round and one run.

use crate::{BadInput, CompileOptions, PassTimes, boards_of, compile};
use anyhow::{Context, Result, bail, ensure};
use legion_ir::Ir;
use legion_plan::{Cluster, DeviceId, Plan, Profile, Transport};
use legion_runtime::{Coordinator, PlanRun, run_candidate};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tract_onnx::prelude::Tensor;

/// How long a board has to answer Health before it is marked down.
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(200);

/// How often boards marked down are asked whether they answer again (a stopped board
/// takes [`HEALTH_TIMEOUT`] to not answer, so not before every inference).
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// A board whose compute takes more than this times its prediction ...
pub const STRAGGLER_RATIO: f64 = 1.5;

/// ... this many inferences in a row is a straggler.
pub const STRAGGLER_RUNS: usize = 3;

/// Runs of one inference before it is given up (a run that fails while every board
/// answers Health is retried with twice the deadline).
pub const ATTEMPTS: u32 = 3;

/// A failure and what was done about it.
#[derive(Clone, Debug)]
pub struct Recovery {
    /// The inference (counted from 0 by this runner) that failed.
    pub inference: u64,
    /// The boards marked down.
    pub down: Vec<String>,
    /// What failed: the error, or the deadline missed.
    pub reason: String,
    /// From the failure to the plan for the boards left.
    pub replanned_after: Duration,
    /// From the failure to the inference's output.
    pub recovered_after: Duration,
    /// Whether the plan that recovered it was a standby plan, loaded in advance.
    pub standby: bool,
}

/// A frame's run started by [`Resilient::start`].
pub type Started<'a> = Pin<Box<dyn Future<Output = Result<PlanRun>> + Send + 'a>>;

/// A plan for some of the boards, its programs loaded on them (their tiles built).
struct Standby {
    boards: Vec<DeviceId>,
    plan: Plan,
    coord: Arc<Coordinator>,
}

/// Runs a plan inference after inference, re-planning around boards that fail.
pub struct Resilient<'a> {
    full: &'a Coordinator,
    ir: &'a Ir,
    onnx: &'a [u8],
    /// The profile plans are compiled from, rescaled for stragglers.
    profile: Profile,
    options: CompileOptions,
    /// The boards the current plan runs on.
    up: Vec<DeviceId>,
    /// Their coordinator (shared with the frames started on it, [`Resilient::start`]).
    current: Arc<Coordinator>,
    plan: Plan,
    /// The wall time of the last inference that ran.
    last_wall: Option<Duration>,
    /// When the boards marked down were last asked for Health.
    probed: Instant,
    inferences: u64,
    /// Per board, its measured / predicted compute time in the last inferences in a
    /// row that it ran more than [`STRAGGLER_RATIO`] slower than predicted.
    slow: HashMap<String, Vec<f64>>,
    /// Every failure so far.
    pub recoveries: Vec<Recovery>,
    /// Boards taken back: (inference, board).
    pub taken_back: Vec<(u64, String)>,
    /// Boards found slower than their profile and planned for again.
    pub stragglers: Vec<Straggler>,
    /// Plans loaded for other sets of boards: for each board's loss, once prepared, and
    /// the plans left when others took over.
    standby: Vec<Standby>,
    /// Whether plans for each board's loss are kept loaded, prepared again before the
    /// next inference when the boards up or the profile change.
    keep_standby: bool,
    restock: bool,
    /// Whether boards slower than profiled are planned around.
    replan_stragglers: bool,
}

/// A board that ran slower than predicted [`STRAGGLER_RUNS`] inferences in a row: its
/// profile was rescaled by the measured ratio and the plan compiled again.
#[derive(Clone, Debug)]
pub struct Straggler {
    /// The inference (counted from 0 by this runner) after which it was rescaled.
    pub inference: u64,
    /// The board.
    pub board: String,
    /// Its measured / predicted compute time, the median over those inferences.
    pub ratio: f64,
}

impl<'a> Resilient<'a> {
    /// Starts with `plan` on every board of `full` (the model uploaded as `onnx`);
    /// later plans are compiled from `profile` with `options`.
    pub fn new(
        full: &'a Coordinator,
        ir: &'a Ir,
        onnx: &'a [u8],
        profile: Profile,
        plan: Plan,
        options: CompileOptions,
    ) -> Result<Resilient<'a>> {
        let up: Vec<DeviceId> = full.ids().collect();
        Ok(Resilient {
            current: Arc::new(full.only(&up)?),
            full,
            ir,
            onnx,
            profile,
            options,
            up,
            plan,
            last_wall: None,
            probed: Instant::now(),
            inferences: 0,
            slow: HashMap::new(),
            recoveries: vec![],
            taken_back: vec![],
            stragglers: vec![],
            standby: vec![],
            keep_standby: false,
            restock: false,
            replan_stragglers: true,
        })
    }

    /// Loads the plan running now and, for each of its boards, a plan for the others,
    /// on their boards (each board builds its tiles), and keeps doing so whenever the
    /// boards up or the profile change; returns the number of standby plans. Each board
    /// then holds up to one plan per board of the cluster (its worker bounds the weights
    /// it keeps built, rebuilding what it dropped at the next run).
    pub async fn prepare_standby(&mut self) -> Result<usize> {
        self.keep_standby = true;
        self.restock = false;
        let programs = self.options.transport == Transport::Programs;
        self.load().await?;
        // Kept: plans for one board fewer or one more than the boards up (the next loss,
        // or a board taken back).
        let up = self.up.clone();
        self.standby.retain(|s| {
            let gone = s.boards.iter().filter(|b| !up.contains(b)).count();
            let new = up.iter().filter(|b| !s.boards.contains(b)).count();
            gone + new <= 1
        });
        if up.len() < 2 {
            return Ok(0);
        }
        for &lost in &up {
            let boards: Vec<DeviceId> = up.iter().copied().filter(|&b| b != lost).collect();
            if self.standby.iter().any(|s| s.boards == boards) {
                continue;
            }
            let plan = self.compile_for(&boards)?;
            let coord = Arc::new(self.full.only(&boards)?);
            if programs {
                coord
                    .loaded_programs(self.ir, plan.chosen())
                    .await
                    .with_context(|| format!("loading the plan without {}", self.name(lost)))?;
            }
            self.standby.push(Standby {
                boards,
                plan,
                coord,
            });
        }
        Ok(self
            .standby
            .iter()
            .filter(|s| s.boards.len() + 1 == up.len())
            .count())
    }

    /// The plan running now.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The boards the plan runs on now.
    pub fn boards(&self) -> Vec<String> {
        self.current
            .devices()
            .iter()
            .map(|d| d.name().to_string())
            .collect()
    }

    /// One inference on `input` (by the options' transport), re-planned and run again when
    /// a board fails.
    pub async fn infer(&mut self, input: &Tensor) -> Result<PlanRun> {
        let n = self.inferences;
        self.inferences += 1;
        self.before_inference(n).await?;
        let mut stretch = 1;
        let mut failed_at: Option<(Instant, Recovery)> = None;
        let mut last_reason = String::new();
        for _ in 0..ATTEMPTS {
            let deadline = self.deadline() * stretch;
            let start = Instant::now();
            let candidate = self.plan.chosen();
            let run = tokio::time::timeout(
                deadline,
                run_candidate(
                    &self.current,
                    self.ir,
                    candidate,
                    input.clone(),
                    self.options.transport,
                ),
            )
            .await;
            let reason = match run {
                Ok(Ok(run)) => {
                    self.last_wall = Some(start.elapsed());
                    self.watch_stragglers(n, &run)
                        .with_context(|| format!("inference {n}: re-planning for a straggler"))?;
                    if let Some((at, mut r)) = failed_at {
                        r.recovered_after = at.elapsed();
                        tracing::warn!(
                            inference = n,
                            down = r.down.join(","),
                            replanned_ms = r.replanned_after.as_millis() as u64,
                            recovered_ms = r.recovered_after.as_millis() as u64,
                            boards = self.boards().join(","),
                            "recovered"
                        );
                        self.recoveries.push(r);
                    }
                    return Ok(run);
                }
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => format!("no output within the deadline of {deadline:?}"),
            };
            let at = failed_at.as_ref().map_or_else(Instant::now, |(t, _)| *t);
            let down = self.unhealthy(&self.up).await;
            self.probed = Instant::now();
            tracing::warn!(inference = n, reason, down = ?down, "an inference failed");
            last_reason.clone_from(&reason);
            if down.is_empty() {
                // Every board answers: a slow run, or a board that restarted and lost
                // the programs it held. Load them again, with a longer deadline.
                // A board failing meanwhile shows in the next run.
                stretch *= 2;
                let mut current = self.full.only(&self.up)?;
                if let Err(e) = current.upload(self.onnx, &self.ir.input.shape).await {
                    tracing::warn!(inference = n, "uploading the model again: {e:#}");
                }
                self.current = Arc::new(current);
                continue;
            }
            let names: Vec<String> = down.iter().map(|d| self.name(*d)).collect();
            self.up.retain(|d| !down.contains(d));
            if self.up.is_empty() {
                bail!("inference {n}: every board is down ({})", names.join(", "));
            }
            let standby = self
                .replan()
                .with_context(|| format!("inference {n}: re-planning without {names:?}"))?;
            let recovery = match failed_at.take() {
                Some((_, mut r)) => {
                    r.down.extend(names);
                    r.replanned_after = at.elapsed();
                    r.standby = standby;
                    r
                }
                None => Recovery {
                    inference: n,
                    down: names,
                    reason,
                    replanned_after: at.elapsed(),
                    recovered_after: Duration::ZERO,
                    standby,
                },
            };
            failed_at = Some((at, recovery));
        }
        bail!(
            "inference {n} failed {ATTEMPTS} times; the last plan ran on {}: {last_reason}",
            self.boards().join(", ")
        )
    }

    /// Loads the current plan's programs on its boards (their tiles built and run once),
    /// so that the first inference pays none of it; nothing to do through the hub.
    pub async fn load(&self) -> Result<()> {
        if self.options.transport == Transport::Programs {
            self.current
                .loaded_programs(self.ir, self.plan.chosen())
                .await
                .context("loading the plan's programs")?;
        }
        Ok(())
    }

    /// Loads the current plan and runs it once on made-up input, with no deadline but
    /// the boards' own: its wall time sets the first deadlines (an emulated cluster's
    /// first run takes many times its emulated time on this host).
    pub async fn warm_up(&mut self) -> Result<()> {
        self.load().await?;
        let input = legion_runtime::check::test_input(&self.ir.input.shape);
        let start = Instant::now();
        run_candidate(
            &self.current,
            self.ir,
            self.plan.chosen(),
            input,
            self.options.transport,
        )
        .await
        .context("a warm-up run of the plan")?;
        self.last_wall = Some(start.elapsed());
        Ok(())
    }

    /// Before inference `n`: takes back the boards that answer again, and loads the
    /// standby plans when the boards up changed.
    async fn before_inference(&mut self, n: u64) -> Result<()> {
        self.take_back(n).await?;
        if self.up.is_empty() {
            bail!("inference {n}: every board is down");
        }
        if self.restock {
            // A board failing meanwhile shows in the run; the inference goes on.
            match self.prepare_standby().await {
                Ok(loaded) => tracing::info!(inference = n, loaded, "standby plans loaded"),
                Err(e) => tracing::warn!(inference = n, "loading standby plans: {e:#}"),
            }
        }
        Ok(())
    }

    /// Keeps the plan when boards run slower than profiled (a benchmark of the plan);
    /// failed boards are still planned around.
    pub fn keep_plan_for_stragglers(&mut self) {
        self.replan_stragglers = false;
    }

    /// Whether frames can be started without waiting ([`Resilient::start`]): boards
    /// running their programs, not the hub.
    pub fn pipelines(&self) -> bool {
        self.options.transport == Transport::Programs
    }

    /// Starts one inference on `input` with the current plan and returns its number
    /// (counted from 0 by this runner) and the run, to be awaited; `ahead` frames
    /// started before it are still running. Frames overlap on the boards (a stream):
    /// each board runs its part of every frame in flight, computing their tiles one
    /// at a time, the oldest frame's first of those ready. Nothing is recovered here:
    /// a frame whose run fails runs again through [`Resilient::infer`] once the frames
    /// ahead of it are done. Boards marked down are asked whether they answer again
    /// first, and standby plans loaded, as by `infer`.
    pub async fn start(&mut self, input: Tensor, ahead: usize) -> Result<(u64, Started<'a>)> {
        ensure!(
            self.pipelines(),
            "frames start without waiting only on boards running their programs"
        );
        let n = self.inferences;
        self.inferences += 1;
        self.before_inference(n).await?;
        let coord = self.current.clone();
        let candidate = self.plan.chosen().clone();
        let inference = coord.next_inference();
        let deadline = self.deadline() * (1 + ahead as u32);
        let ir = self.ir;
        let run = async move {
            let loaded = coord.loaded_programs(ir, &candidate).await?;
            tokio::time::timeout(
                deadline,
                coord.run_programs(ir, &candidate, &loaded, input, inference),
            )
            .await
            .map_err(|_| anyhow::anyhow!("no output within the deadline of {deadline:?}"))?
        };
        Ok((n, Box::pin(run)))
    }

    /// Takes the run of frame `n`, started by [`Resilient::start`] with `ahead` frames
    /// ahead of it, into account: `wall` from its start to its output sets the next
    /// deadlines (shared by the frames in flight), and boards slower than profiled are
    /// planned around as after `infer`.
    pub fn finished(&mut self, n: u64, run: &PlanRun, wall: Duration, ahead: usize) -> Result<()> {
        self.last_wall = Some(wall / (1 + ahead as u32));
        self.watch_stragglers(n, run)
            .with_context(|| format!("inference {n}: re-planning for a straggler"))
    }

    /// Compares each board's compute in `run` with the plan's prediction; a board
    /// [`STRAGGLER_RATIO`] slower [`STRAGGLER_RUNS`] times in a row has its profile
    /// rescaled by the median ratio, and the plan is compiled again.
    fn watch_stragglers(&mut self, n: u64, run: &PlanRun) -> Result<()> {
        if !self.replan_stragglers {
            return Ok(());
        }
        let candidate = self.plan.chosen();
        let mut found = vec![];
        for board in self.boards() {
            let predicted: u64 = candidate
                .groups
                .iter()
                .flat_map(|g| &g.tiles)
                .filter(|t| t.device == board)
                .map(|t| t.compute_us)
                .sum();
            let measured: u64 = run
                .groups
                .iter()
                .flat_map(|g| &g.devices)
                .filter(|d| d.device == board)
                .map(|d| d.compute_us)
                .sum();
            let ratio = measured as f64 / predicted.max(1) as f64;
            let ratios = self.slow.entry(board.clone()).or_default();
            if predicted == 0 || ratio <= STRAGGLER_RATIO {
                ratios.clear();
                continue;
            }
            ratios.push(ratio);
            if ratios.len() >= STRAGGLER_RUNS {
                ratios.sort_by(f64::total_cmp);
                found.push((board, ratios[ratios.len() / 2]));
                ratios.clear();
            }
        }
        if found.is_empty() {
            return Ok(());
        }
        for (board, ratio) in found {
            tracing::warn!(
                inference = n,
                board,
                ratio,
                "a board runs slower than profiled"
            );
            self.profile.scale_device(&board, ratio);
            self.stragglers.push(Straggler {
                inference: n,
                board,
                ratio,
            });
        }
        // Plans compiled from the profile before are stale.
        self.standby.clear();
        self.replan().map(|_| ())
    }

    /// 3x the last inference's wall time, or the plan's prediction when longer, plus 1 s.
    fn deadline(&self) -> Duration {
        let predicted = Duration::from_micros(self.plan.chosen().predicted_us);
        3 * self.last_wall.unwrap_or(predicted).max(predicted) + Duration::from_secs(1)
    }

    fn name(&self, d: DeviceId) -> String {
        self.full
            .device(d)
            .map_or_else(|_| d.to_string(), |c| c.name().to_string())
    }

    /// The boards of `boards` that do not answer Health within [`HEALTH_TIMEOUT`], all
    /// asked at once.
    async fn unhealthy(&self, boards: &[DeviceId]) -> Vec<DeviceId> {
        let mut asked = tokio::task::JoinSet::new();
        for &d in boards {
            let Ok(device) = self.full.device(d) else {
                continue;
            };
            let client = device.client().clone();
            asked.spawn(async move {
                let answer = tokio::time::timeout(HEALTH_TIMEOUT, client.health()).await;
                (d, matches!(answer, Ok(Ok(()))))
            });
        }
        let mut down: Vec<DeviceId> = asked
            .join_all()
            .await
            .into_iter()
            .filter(|(_, up)| !up)
            .map(|(d, _)| d)
            .collect();
        down.sort();
        down
    }

    /// Asks the boards marked down whether they answer again (when [`PROBE_EVERY`] has
    /// passed since the last time), taking back those that do; returns the number of
    /// boards up.
    pub async fn probe_down(&mut self) -> Result<usize> {
        self.take_back(self.inferences).await?;
        Ok(self.up.len())
    }

    /// Takes back the boards marked down that answer Health again, uploading the model
    /// where they lost it, and plans for them.
    async fn take_back(&mut self, n: u64) -> Result<()> {
        let down: Vec<DeviceId> = self.full.ids().filter(|d| !self.up.contains(d)).collect();
        if down.is_empty() || self.probed.elapsed() < PROBE_EVERY {
            return Ok(());
        }
        let still = self.unhealthy(&down).await;
        self.probed = Instant::now();
        let back: Vec<DeviceId> = down.into_iter().filter(|d| !still.contains(d)).collect();
        if back.is_empty() {
            return Ok(());
        }
        // The model first: a board that fails to take it stays down.
        let mut returning = self.full.only(&back)?;
        if let Err(e) = returning.upload(self.onnx, &self.ir.input.shape).await {
            tracing::warn!(inference = n, "not taken back: {e:#}");
            return Ok(());
        }
        let mut up: Vec<DeviceId> = self.full.ids().filter(|d| !still.contains(d)).collect();
        up.sort();
        self.up = up;
        self.replan()?;
        // A board that restarted lost the programs it held: every board gets its program
        // again (a board that kept it has its tiles built, so this is quick for it).
        self.current = Arc::new(self.full.only(&self.up)?);
        if self.options.transport == Transport::Programs
            && let Err(e) = self
                .current
                .loaded_programs(self.ir, self.plan.chosen())
                .await
        {
            tracing::warn!(
                inference = n,
                "loading the programs of the boards back: {e:#}"
            );
        }
        for d in back {
            let name = self.name(d);
            tracing::info!(
                inference = n,
                board = name,
                "a board answers again; taken back"
            );
            self.taken_back.push((n, name));
        }
        Ok(())
    }

    /// Moves to a plan for the boards up: a standby plan for them, or one compiled by
    /// prediction from the profile; true for a standby plan. The plan left becomes a
    /// standby plan.
    fn replan(&mut self) -> Result<bool> {
        let (plan, coord, standby) = match self.standby.iter().position(|s| s.boards == self.up) {
            Some(i) => {
                let s = self.standby.swap_remove(i);
                (s.plan, s.coord, true)
            }
            None => (
                self.compile_for(&self.up)?,
                Arc::new(self.full.only(&self.up)?),
                false,
            ),
        };
        let boards: Vec<DeviceId> = self
            .current
            .devices()
            .iter()
            .filter_map(|d| self.full.id_of(d.name()))
            .collect();
        let left = Standby {
            boards,
            plan: std::mem::replace(&mut self.plan, plan),
            coord: std::mem::replace(&mut self.current, coord),
        };
        self.standby.retain(|s| s.boards != left.boards);
        self.standby.push(left);
        self.restock = self.keep_standby;
        Ok(standby)
    }

    /// A plan for `boards`, compiled by prediction from the profile.
    fn compile_for(&self, boards: &[DeviceId]) -> Result<Plan> {
        let mut cluster: Cluster = self.full.cluster().clone();
        cluster.devices = boards
            .iter()
            .map(|d| self.full.cluster().devices[d.index()].clone())
            .collect();
        let profile = boards_of(&self.profile, &cluster)?;
        let compiled = compile(
            self.ir,
            &profile,
            &cluster,
            &self.options,
            None,
            &mut PassTimes::default(),
        )?;
        Ok(compiled
            .plan
            .ok_or_else(|| BadInput("compile stopped before making a plan".into()))?)
    }
}
