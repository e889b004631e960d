//! `cargo xtask chaos`: many inferences on a cluster of emulated worker processes while
//! a random worker is SIGKILLed (then started again at its address) or SIGSTOPped
//! (then SIGCONTed) at random moments, or, where network namespaces can be made (root),
//! its link is cut or slowed. Every inference goes through the coordinator's
//! recovery (`legion_pipeline::Resilient`); every output that returns is compared with
//! this host's single-device run. Writes bench/chaos.md.

use anyhow::{Context, Result, bail};
use legion_pipeline::{CompileOptions, PassTimes, Resilient, compile, connect, profile};
use legion_plan::{Cluster, CoordinatorLink, Device, Emulation};
use legion_profile::ProfileOptions;
use legion_runtime::Reference;
use legion_runtime::check::{compare, test_input};
use legion_runtime::process::WorkerProcess;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// The generated model to run.
    #[arg(long, default_value = "resnet18")]
    model: String,
    /// Inferences to run.
    #[arg(long, default_value_t = 200)]
    inferences: u32,
    /// Seed of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep a plan for each board's loss loaded (`legion run --standby`).
    #[arg(long)]
    standby: bool,
    /// Where to write the report.
    #[arg(long, default_value = "bench/chaos.md")]
    out: PathBuf,
}

/// The boards: two Fireflies and two Odroids.
const CLASSES: [&str; 4] = [
    "firefly-rk3399",
    "firefly-rk3399",
    "odroid-xu4",
    "odroid-xu4",
];

/// One worker process and how to start it again.
struct Board {
    name: String,
    class: &'static str,
    addr: String,
    cache: PathBuf,
    /// The network namespace it runs in, when the links can be faulted.
    netns: Option<String>,
    process: Option<WorkerProcess>,
}

impl Board {
    fn start(&mut self, legion: &Path, host_gflops: Option<f64>) -> Result<()> {
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(legion);
                c
            }
            None => Command::new(legion),
        };
        command
            .args(["worker", "--insecure", "--listen", &self.addr])
            .args(["--name", &self.name, "--emulate", self.class, "--cache"])
            .arg(&self.cache);
        if let Some(g) = host_gflops {
            command.args(["--host-gflops", &g.to_string()]);
        }
        let w = WorkerProcess::spawn(command, &self.name, Duration::from_secs(120))?;
        self.addr = w.addr.clone();
        self.process = Some(w);
        Ok(())
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let pid = self.process.as_ref().context("not running")?.pid();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?
            .success();
        anyhow::ensure!(ok, "kill {sig} {pid} failed");
        Ok(())
    }
}

/// What the fault thread did, in order: (seconds since start, what).
type Events = Arc<Mutex<Vec<(f64, String)>>>;

/// The boards' links as network namespaces on a bridge (10.77.0.0/24, this host at
/// .1, board i at .(10+i)), so that one board's link can be cut or slowed. Removed on
/// drop.
struct Links {
    boards: usize,
}

const BRIDGE: &str = "lgchaos-br";

/// What is done to a link.
#[derive(Clone, Copy)]
enum LinkFault {
    /// Down: nothing crosses.
    Cut,
    /// 10 Mbit/s instead of the board's 100.
    Slow,
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Links {
    fn namespace(i: usize) -> String {
        format!("lgchaos{i}")
    }

    /// The host side of board i's link, where its faults go.
    fn veth(i: usize) -> String {
        format!("lgchaos{i}h")
    }

    fn address(i: usize) -> String {
        format!("10.77.0.{}:7070", 10 + i)
    }

    /// Makes the bridge and a namespace per board; fails where the host does not
    /// allow it (not root, no `ip`).
    fn make(boards: usize) -> Result<Links> {
        let links = Links { boards };
        links.remove();
        let made = (|| {
            sh(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
            sh(&["ip", "addr", "add", "10.77.0.1/24", "dev", BRIDGE])?;
            sh(&["ip", "link", "set", BRIDGE, "up"])?;
            for i in 0..boards {
                let (ns, host, inner) = (Self::namespace(i), Self::veth(i), format!("lgchaos{i}b"));
                let ip = format!("10.77.0.{}/24", 10 + i);
                sh(&["ip", "netns", "add", &ns])?;
                sh(&[
                    "ip", "link", "add", &host, "type", "veth", "peer", "name", &inner,
                ])?;
                sh(&["ip", "link", "set", &inner, "netns", &ns])?;
                sh(&["ip", "link", "set", &host, "master", BRIDGE])?;
                sh(&["ip", "link", "set", &host, "up"])?;
                for args in [
                    vec!["ip", "addr", "add", &ip, "dev", &inner],
                    vec!["ip", "link", "set", &inner, "up"],
                    vec!["ip", "link", "set", "lo", "up"],
                ] {
                    let mut all = vec!["ip", "netns", "exec", &ns];
                    all.extend(args);
                    sh(&all)?;
                }
            }
            Ok(())
        })();
        made.map(|()| links)
    }

    /// Cuts board i's link (the host side of its veth down), slows it to 10 Mbit/s
    /// (`tc tbf`), or, with `None`, restores it. (`tc netem` would add loss and delay,
    /// but this host's kernel lacks it.)
    fn fault(i: usize, fault: Option<LinkFault>) -> Result<()> {
        let dev = Self::veth(i);
        let _ = sh(&["tc", "qdisc", "del", "dev", &dev, "root"]);
        sh(&["ip", "link", "set", &dev, "up"])?;
        match fault {
            None => Ok(()),
            Some(LinkFault::Cut) => sh(&["ip", "link", "set", &dev, "down"]),
            Some(LinkFault::Slow) => sh(&[
                "tc", "qdisc", "add", "dev", &dev, "root", "tbf", "rate", "10mbit", "burst",
                "32kbit", "latency", "400ms",
            ]),
        }
    }

    fn remove(&self) {
        for i in 0..self.boards {
            let _ = sh(&["ip", "netns", "del", &Self::namespace(i)]);
            let _ = sh(&["ip", "link", "del", &Self::veth(i)]);
        }
        let _ = sh(&["ip", "link", "del", BRIDGE]);
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.remove();
    }
}

pub fn run(args: &Args) -> Result<()> {
    // The runner logs each failure, recovery and board taken back.
    legion_runtime::serve::init_logging();
    let legion = crate::bench::legion_binary()?;
    let dir = crate::cross::target_dir().join("chaos");
    std::fs::create_dir_all(&dir)?;
    let links = match Links::make(CLASSES.len()) {
        Ok(links) => Some(links),
        Err(e) => {
            eprintln!("no link faults: network namespaces cannot be made here ({e:#})");
            None
        }
    };
    let mut boards: Vec<Board> = CLASSES
        .iter()
        .enumerate()
        .map(|(i, class)| Board {
            name: format!("{class}-{i}"),
            class,
            addr: match links {
                Some(_) => Links::address(i),
                None => "127.0.0.1:0".into(),
            },
            cache: dir.join(format!("cache{i}")),
            netns: links.as_ref().map(|_| Links::namespace(i)),
            process: None,
        })
        .collect();
    // The first worker calibrates the host; the others start from its rate.
    eprintln!("starting 4 emulated workers (the first calibrates the host)...");
    boards[0].start(&legion, None)?;
    let start_line = boards[0]
        .process
        .as_ref()
        .expect("started")
        .start_line
        .clone();
    let host: f64 = start_line
        .split("host_gflops=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .context("the worker's start line names its host rate")?;
    for b in &mut boards[1..] {
        b.start(&legion, Some(host))?;
    }
    let cluster = Cluster {
        coordinator: CoordinatorLink::default(),
        token_file: None,
        devices: boards
            .iter()
            .map(|b| {
                Ok(Device {
                    name: b.name.clone(),
                    address: b.addr.clone(),
                    emulate: Some(b.class.parse::<Emulation>().map_err(anyhow::Error::msg)?),
                    class: None,
                    link_mbps: 100.0,
                    latency_ms: 0.2,
                    memory_mb: None,
                    tls_cert: None,
                })
            })
            .collect::<Result<_>>()?,
    };
    let path = legion_models::test_model(&args.model)?;
    let ir = legion_ir::import(&path, None)?;
    let onnx = std::fs::read(&path)?;
    let input = test_input(&ir.input.shape);
    let reference = Reference::run(&ir, input.clone())?;
    let rt = tokio::runtime::Runtime::new()?;
    let coord = rt.block_on(connect(&cluster, "chaos", &onnx, &args.model, &ir))?;
    eprintln!("profiling {} on the 4 boards...", args.model);
    let prof = rt.block_on(profile(&coord, &ir, &ProfileOptions::default()))?;
    let options = CompileOptions::legion("chaos");
    let plan = compile(
        &ir,
        &prof,
        &cluster,
        &options,
        None,
        &mut PassTimes::default(),
    )?
    .plan
    .context("compile made no plan")?;
    let predicted_all = plan.chosen().predicted_us;
    let mut runner = Resilient::new(&coord, &ir, &onnx, prof, plan, options)?;
    if args.standby {
        let loaded = rt.block_on(runner.prepare_standby())?;
        eprintln!("{loaded} standby plans loaded");
    }

    // Faults: every 2-6 s one board of those up (never the last two) is killed or
    // stopped, and 2-5 s later started again or continued.
    let events: Events = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let faults = {
        let (events, done, legion) = (events.clone(), done.clone(), legion.clone());
        let with_links = links.is_some();
        let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
        std::thread::spawn(move || -> Result<Vec<Board>> {
            let between = |rng: &mut ChaCha8Rng, lo: u64, hi: u64| {
                Duration::from_millis(lo + rng.next_u64() % (hi - lo))
            };
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(between(&mut rng, 2000, 6000));
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let i = (rng.next_u64() % boards.len() as u64) as usize;
                // Kill, stop, and with namespaces cut or degrade the link.
                let kinds = if with_links { 4 } else { 2 };
                let kind = rng.next_u64() % kinds;
                let log = |what: String| {
                    let at = t0.elapsed().as_secs_f64();
                    eprintln!("[chaos {at:.1} s] {what}");
                    events.lock().expect("events").push((at, what));
                };
                let name = boards[i].name.clone();
                match kind {
                    0 => {
                        boards[i].signal("-KILL")?;
                        // Reaped, its port free for the restart.
                        drop(boards[i].process.take());
                        log(format!("killed {name}"));
                    }
                    1 => {
                        boards[i].signal("-STOP")?;
                        log(format!("stopped {name}"));
                    }
                    2 => {
                        Links::fault(i, Some(LinkFault::Cut))?;
                        log(format!("cut the link of {name}"));
                    }
                    _ => {
                        Links::fault(i, Some(LinkFault::Slow))?;
                        log(format!("degraded the link of {name} to 10 Mbit/s"));
                    }
                }
                std::thread::sleep(between(&mut rng, 2000, 5000));
                match kind {
                    0 => {
                        boards[i].start(&legion, Some(host))?;
                        log(format!("restarted {name}"));
                    }
                    1 => {
                        boards[i].signal("-CONT")?;
                        log(format!("continued {name}"));
                    }
                    _ => {
                        Links::fault(i, None)?;
                        log(format!("restored the link of {name}"));
                    }
                }
            }
            Ok(boards)
        })
    };

    struct Done {
        emulated_us: u64,
        predicted_us: u64,
        boards: usize,
        recovering: bool,
    }
    let mut runs: Vec<Done> = vec![];
    let (mut wrong, mut failed) = (0, vec![]);
    for i in 0..args.inferences {
        let predicted_us = runner.plan().chosen().predicted_us;
        let recoveries = runner.recoveries.len();
        match rt.block_on(runner.infer(&input)) {
            Ok(run) => {
                let mut ok = true;
                for (got, r) in run.outputs.iter().zip(&ir.outputs) {
                    let want = reference.tensor(*r);
                    ok &= compare(got, want, want)?.within(legion_pipeline::CHECK_REL);
                }
                wrong += usize::from(!ok);
                let recovering = runner.recoveries.len() > recoveries;
                runs.push(Done {
                    emulated_us: run.total_us,
                    predicted_us: if recovering {
                        runner.plan().chosen().predicted_us
                    } else {
                        predicted_us
                    },
                    boards: runner.boards().len(),
                    recovering,
                });
            }
            Err(e) => failed.push(format!("inference {i}: {e:#}")),
        }
        if i % 20 == 19 {
            eprintln!(
                "{} inferences, {} recoveries, {} wrong, {} failed",
                i + 1,
                runner.recoveries.len(),
                wrong,
                failed.len()
            );
        }
    }
    let elapsed = t0.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut boards = faults
        .join()
        .map_err(|_| anyhow::anyhow!("the fault thread panicked"))??;
    for b in &mut boards {
        let _ = b.signal("-CONT");
    }
    drop(boards);
    let events = events.lock().expect("events").clone();
    let count = |what: &str| events.iter().filter(|(_, e)| e.starts_with(what)).count();

    let recovery_ms: Vec<f64> = runner
        .recoveries
        .iter()
        .map(|r| r.recovered_after.as_secs_f64() * 1e3)
        .collect();
    let pct = |v: &[f64], q: f64| legion_pipeline::quantile(v, q).unwrap_or(f64::NAN);
    let ratio = |filter: &dyn Fn(&Done) -> bool| {
        let r: Vec<f64> = runs
            .iter()
            .filter(|d| filter(d))
            .map(|d| d.emulated_us as f64 / d.predicted_us.max(1) as f64)
            .collect();
        (r.len(), r.iter().sum::<f64>() / r.len().max(1) as f64)
    };
    let (healthy_n, healthy) = ratio(&|d| d.boards == CLASSES.len() && !d.recovering);
    let (degraded_n, degraded) = ratio(&|d| d.boards < CLASSES.len() && !d.recovering);
    let median_us = |filter: &dyn Fn(&Done) -> bool| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|d| filter(d))
            .map(|d| d.emulated_us as f64)
            .collect();
        pct(&v, 0.5) / 1e3
    };

    let mut md = String::new();
    writeln!(
        md,
        "# Chaos: boards killed and stopped while inferences run\n"
    )?;
    writeln!(
        md,
        "Measured by `cargo xtask chaos --model {} --inferences {} --seed {}{}` on {}, in {:.0} \
         s. \
         Four emulated workers as processes (2 Firefly-RK3399, 2 Odroid-XU4 class, 100 \
         Mbit/s), profiled in legion mode, the plan compiled by prediction; `legion run \
         --recover-with`'s recovery (`Resilient`, docs/architecture.md, \"The driver\") runs \
         the inferences one after another{}. Every 2-6 s a random worker is SIGKILLed (and \
         started again at its address 2-5 s later) or SIGSTOPped (and SIGCONTed 2-5 s \
         later){}. Times are on the emulated clock except recovery, which is wall time \
         from the failure seen (an error, or the deadline passed) to the inference's \
         output.\n",
        args.model,
        args.inferences,
        args.seed,
        if args.standby { " --standby" } else { "" },
        crate::bench::host(),
        elapsed.as_secs_f64(),
        if args.standby {
            ", with a plan for each board's loss loaded in advance (`--standby`)"
        } else {
            ""
        },
        match links {
            Some(_) => {
                ", or its link, a veth into its own network namespace, is cut (set down) or \
                 slowed to 10 Mbit/s (`tc tbf`; this host's kernel has no `netem`) for 2-5 s"
            }
            None => "; no link faults: network namespaces could not be made on this host",
        }
    )?;
    writeln!(md, "| what | value |\n|---|---|")?;
    writeln!(md, "| inferences run | {} |", args.inferences)?;
    writeln!(
        md,
        "| boards killed / restarted | {} / {} |",
        count("killed"),
        count("restarted")
    )?;
    writeln!(
        md,
        "| boards stopped / continued | {} / {} |",
        count("stopped"),
        count("continued")
    )?;
    writeln!(
        md,
        "| links cut / degraded / restored | {} / {} / {} |",
        count("cut"),
        count("degraded"),
        count("restored")
    )?;
    writeln!(md, "| outputs checked | {} |", runs.len())?;
    writeln!(md, "| outputs wrong (goal 0) | {wrong} |")?;
    writeln!(
        md,
        "| inferences lost: failed with an error (goal 0) | {} |",
        failed.len()
    )?;
    writeln!(md, "| failures recovered | {} |", runner.recoveries.len())?;
    writeln!(md, "| boards taken back | {} |", runner.taken_back.len())?;
    writeln!(
        md,
        "| stragglers re-planned | {} |",
        runner.stragglers.len()
    )?;
    writeln!(
        md,
        "| recovery, failure to output, p50 / max | {:.0} / {:.0} ms |",
        pct(&recovery_ms, 0.5),
        pct(&recovery_ms, 1.0)
    )?;
    writeln!(
        md,
        "| latency on 4 boards, median (predicted {:.1} ms) | {:.1} ms |",
        predicted_all as f64 / 1e3,
        median_us(&|d| d.boards == CLASSES.len() && !d.recovering)
    )?;
    writeln!(
        md,
        "| measured / predicted, 4 boards ({healthy_n} inferences) | {healthy:.2} |"
    )?;
    writeln!(
        md,
        "| measured / predicted for the smaller cluster's plan, degraded ({degraded_n} \
         inferences) | {degraded:.2} |"
    )?;
    writeln!(md, "\nThe faults, in order (seconds from the start):\n")?;
    for (at, what) in &events {
        writeln!(md, "- {at:.1} s: {what}")?;
    }
    writeln!(md, "\nThe recoveries:\n")?;
    for r in &runner.recoveries {
        writeln!(
            md,
            "- inference {}: {} down ({}); new plan{} after {:.0} ms, output after {:.0} ms",
            r.inference,
            r.down.join(", "),
            r.reason.chars().take(120).collect::<String>(),
            if r.standby { " (standby)" } else { "" },
            r.replanned_after.as_secs_f64() * 1e3,
            r.recovered_after.as_secs_f64() * 1e3
        )?;
    }
    if !runner.stragglers.is_empty() {
        writeln!(md, "\nThe stragglers:\n")?;
        for s in &runner.stragglers {
            writeln!(
                md,
                "- after inference {}: {} computed {:.2}x its prediction {} inferences in a \
                 row; its profile rescaled, the plan compiled again",
                s.inference,
                s.board,
                s.ratio,
                legion_pipeline::STRAGGLER_RUNS
            )?;
        }
    }
    if !failed.is_empty() {
        writeln!(md, "\nInferences that failed:\n")?;
        for f in &failed {
            writeln!(md, "- {}", f.chars().take(300).collect::<String>())?;
        }
    }
    std::fs::write(&args.out, &md).with_context(|| format!("writing {}", args.out.display()))?;
    print!("{md}");
    if wrong > 0 {
        bail!("{wrong} outputs were wrong");
    }
    Ok(())
}
