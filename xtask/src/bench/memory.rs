//! `cargo xtask bench memory`: each board's peak memory, with its worker in a process
//! of its own: idle, after running its part of a plan from the tiles the coordinator
//! shipped it, and after running the whole model alone (which imports the model, as
//! every board did before tiles were shipped, and as profiling and the hub still do).

use super::channels::flc_text;
use super::load;
use anyhow::{Context, Result, ensure};
use legion_partition::weights_per_board;
use legion_pipeline::{CHECK_REL, CompileOptions, PassTimes, compile, connect, run_whole};
use legion_plan::{Cluster, DeviceId, Profile, Transport};
use legion_runtime::check::{compare, test_input};
use legion_runtime::process::WorkerProcess;
use legion_runtime::{Reference, run_candidate};
use std::fmt::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The setups: model, cluster file (under testdata/), committed profile (under
/// testdata/profiles/). VGG-16 on four 300 MB Fireflies is the case of a layer that
/// fits no board (fc6, 411 MB of weights).
const SETUPS: [(&str, &str, &str); 3] = [
    (
        "vgg16",
        "memory/firefly-x4-300mb.toml",
        "vgg16-firefly-x4.json",
    ),
    ("vgg16", "clusters/3f3o.toml", "vgg16-3f3o.json"),
    ("yolov2", "clusters/3f3o.toml", "yolov2-3f3o.json"),
];

/// Inferences of the plan run before its peak is read.
const RUNS: usize = 3;

/// One board of one setup.
struct Board {
    name: String,
    class: String,
    memory_mb: Option<u64>,
    /// Bytes of weights its tiles load.
    weights: u64,
    /// VmHWM, KiB: when it listened, after the plan ran, after the whole model ran.
    idle_kib: u64,
    plan_kib: u64,
    whole_kib: u64,
    /// VmRSS after the plan ran, KiB: what it keeps between inferences.
    resident_kib: u64,
}

struct Setup {
    model: String,
    cluster: String,
    flc: String,
    max_rel: f32,
    boards: Vec<Board>,
}

/// Starts one emulated worker process per device of `cluster`, with its own cache.
fn start_workers(cluster: &mut Cluster, tag: &str) -> Result<Vec<WorkerProcess>> {
    let legion = super::legion_binary()?;
    let root = legion_models::workspace_root().join("target/bench-memory");
    let mut workers = vec![];
    for d in &mut cluster.devices {
        let cache: PathBuf = root.join(format!("{tag}-{}", d.name));
        if cache.exists() {
            std::fs::remove_dir_all(&cache)
                .with_context(|| format!("emptying {}", cache.display()))?;
        }
        let class = d
            .emulate
            .as_ref()
            .and_then(|e| e.class.clone())
            .with_context(|| format!("{}: the bench emulates boards of a class", d.name))?;
        let mut command = Command::new(&legion);
        command
            .args(["worker", "--insecure", "--listen", "127.0.0.1:0"])
            .args(["--name", &d.name, "--emulate", &class])
            // The emulated speed does not matter here; a given host rate skips the
            // calibration run, whose model would count in the peak.
            .args(["--host-gflops", "30", "--cache"])
            .arg(&cache);
        let w = WorkerProcess::spawn(command, &d.name, Duration::from_secs(120))?;
        d.address = w.addr.clone();
        workers.push(w);
    }
    Ok(workers)
}

fn measure(model: &str, cluster_file: &str, profile_file: &str) -> Result<Setup> {
    let root = legion_models::workspace_root();
    let ir = load(model)?;
    let onnx = std::fs::read(legion_models::test_model(model)?)?;
    let mut cluster = Cluster::load(&root.join("testdata").join(cluster_file))?;
    let profile_path = root.join("testdata/profiles").join(profile_file);
    let profile = Profile::from_json(&std::fs::read_to_string(&profile_path)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", profile_path.display()))?;
    let tag = format!("{model}-{}", cluster_file.replace(['/', '.'], "-"));
    let workers = start_workers(&mut cluster, &tag)?;
    let idle: Vec<u64> = workers
        .iter()
        .map(WorkerProcess::peak_rss_kib)
        .collect::<Result<_>>()?;
    let options = CompileOptions::legion(profile_file);
    let compiled = compile(
        &ir,
        &profile,
        &cluster,
        &options,
        None,
        &mut PassTimes::default(),
    )?;
    let plan = compiled.plan.context("compile made no plan")?;
    let candidate = plan.chosen();
    let input = test_input(&ir.input.shape);
    let reference = Reference::run(&ir, input.clone())?;
    let want: Vec<_> = ir
        .outputs
        .iter()
        .map(|&o| reference.tensor(o).clone())
        .collect();
    let rt = tokio::runtime::Runtime::new()?;
    let coord = rt.block_on(connect(&cluster, cluster_file, &onnx, model, &ir))?;
    let mut max_rel = 0f32;
    for _ in 0..RUNS {
        let run = rt.block_on(run_candidate(
            &coord,
            &ir,
            candidate,
            input.clone(),
            Transport::Programs,
        ))?;
        for (got, want) in run.outputs.iter().zip(&want) {
            max_rel = max_rel.max(compare(got, want, want)?.max_rel);
        }
    }
    ensure!(
        max_rel < CHECK_REL,
        "{model} on {cluster_file}: relative error {max_rel}"
    );
    let after_plan: Vec<u64> = workers
        .iter()
        .map(WorkerProcess::peak_rss_kib)
        .collect::<Result<_>>()?;
    let resident: Vec<u64> = workers
        .iter()
        .map(WorkerProcess::rss_kib)
        .collect::<Result<_>>()?;
    for d in 0..cluster.devices.len() {
        rt.block_on(run_whole(&coord, &ir, DeviceId(d), &input))?;
    }
    let weights = weights_per_board(&ir, candidate);
    let mut boards = vec![];
    for (d, (device, w)) in cluster.devices.iter().zip(&workers).enumerate() {
        boards.push(Board {
            name: device.name.clone(),
            class: device
                .emulate
                .as_ref()
                .and_then(|e| e.class.clone())
                .unwrap_or_default(),
            memory_mb: device.memory_mb,
            weights: weights.get(&device.name).copied().unwrap_or(0),
            idle_kib: idle[d],
            plan_kib: after_plan[d],
            resident_kib: resident[d],
            whole_kib: w.peak_rss_kib()?,
        });
    }
    Ok(Setup {
        model: model.to_string(),
        cluster: cluster_file.to_string(),
        flc: flc_text(candidate),
        max_rel,
        boards,
    })
}

pub fn run() -> Result<String> {
    let mut setups = vec![];
    for (model, cluster, profile) in SETUPS {
        eprintln!("{model} on {cluster}");
        setups.push(measure(model, cluster, profile)?);
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut md = String::new();
    writeln!(md, "# Each board's memory\n")?;
    writeln!(
        md,
        "Measured by `cargo xtask bench memory` on {}. Every board is an emulated worker \
         (`legion worker --emulate CLASS`) in a process of its own; *peak* is its resident \
         set's high-water mark (`VmHWM`). The plan is compiled from the committed profile \
         under testdata/profiles (by prediction) and run {RUNS} times by the boards' \
         programs: each board loads only the tiles the coordinator built and shipped it \
         (docs/architecture.md, \"Shipped tiles\"). Then the whole model runs alone on each \
         board (`RunTile`), which imports the model on the board: what every board held \
         before tiles were shipped, and what profiling and the hub transport still take. \
         *tile weights*: the bytes of weights the board's tiles hold (a group's weights \
         once per tile; a channel tile its slice). *resident*: its resident set \
         after the plan's runs, what it keeps between inferences. *memory_mb*: the \
         cluster file's memory for Legion on the board, which the compile keeps every \
         tile's weights under.\n",
        super::host()
    )?;
    for s in &setups {
        writeln!(
            md,
            "## {} on {}\n\nFLC `{}`; outputs against one device: relative error {:.1e}.\n",
            s.model, s.cluster, s.flc, s.max_rel
        )?;
        writeln!(
            md,
            "| board | class | memory_mb | tile weights MiB | peak MiB idle | peak MiB running its tiles | resident MiB after | peak MiB after the whole model alone |"
        )?;
        writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|")?;
        for b in &s.boards {
            writeln!(
                md,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                b.name,
                b.class,
                b.memory_mb.map_or("-".into(), |m| m.to_string()),
                b.weights as f64 / (1 << 20) as f64,
                mib(b.idle_kib),
                mib(b.plan_kib),
                mib(b.resident_kib),
                mib(b.whole_kib)
            )?;
        }
        writeln!(md)?;
    }
    Ok(md)
}
