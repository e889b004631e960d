//! `legion demo`: the whole job on an emulated local cluster, with no setup: generate
//! VGG-16, start 2 Firefly + 2 Odroid workers at 100 Mbit/s in this process, profile,
//! compile, run, check against one device, and report.

use anyhow::{Context, Result};
use legion_pipeline::{CompileOptions, PassTimes, compile, connect, execute, profile};
use legion_plan::{ProfileMode, Transport};
use legion_profile::ProfileOptions;
use legion_runtime::check::test_input;
use legion_runtime::{LocalCluster, default_cache_dir, local_cluster};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Where the demo writes its model, cluster, profile, plan, timings and timeline.
    #[arg(long, default_value = "legion-demo")]
    out: std::path::PathBuf,
}

const CLASSES: [&str; 4] = [
    "firefly-rk3399",
    "firefly-rk3399",
    "odroid-xu4",
    "odroid-xu4",
];
const STEPS: usize = 6;

pub fn run(args: &Args) -> Result<()> {
    let start = Instant::now();
    let step = |n: usize, what: &str| {
        eprintln!(
            "[{n}/{STEPS}] {what} ({:.0} s elapsed)",
            start.elapsed().as_secs_f64()
        );
    };
    let out_dir = &args.out;
    std::fs::create_dir_all(out_dir).with_context(|| {
        format!(
            "creating the demo's directory {}; pass another with --out",
            out_dir.display()
        )
    })?;

    step(1, "generating VGG-16 (224x224, with its FC head)");
    let model = legion_models::ensure("vgg16", out_dir)?;
    let ir = legion_ir::import(&model, None)?;
    let onnx = std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;

    step(
        2,
        "starting 2 emulated Firefly-RK3399 + 2 Odroid-XU4 workers at 100 Mbit/s",
    );
    let classes: Vec<String> = CLASSES.iter().map(|c| c.to_string()).collect();
    let cluster = local_cluster(CLASSES.len(), &classes, 0)?;
    let local = LocalCluster::start(&cluster, default_cache_dir())?;
    let cluster_file = out_dir.join("cluster.toml");
    std::fs::write(&cluster_file, local.cluster().to_toml())?;
    let rt = tokio::runtime::Runtime::new()?;
    let coord = rt.block_on(connect(
        local.cluster(),
        "the demo's local cluster",
        &onnx,
        "VGG-16",
        &ir,
    ))?;

    step(3, "profiling single stages and links (legion mode)");
    let mut times = PassTimes::default();
    let opts = ProfileOptions {
        mode: ProfileMode::Legion,
        runs: 3,
        progress: true,
        ..ProfileOptions::default()
    };
    let measured = times.time("profile", || rt.block_on(profile(&coord, &ir, &opts)))?;
    times.note(format!(
        "{:.3} s on the {} clock",
        measured.profiling_us as f64 / 1e6,
        measured.clock
    ));
    std::fs::write(out_dir.join("profile.json"), measured.to_json())?;

    step(
        4,
        "compiling: cost, egg search, Wild Card, the candidates run",
    );
    let compiled = compile(
        &ir,
        &measured,
        local.cluster(),
        &CompileOptions::legion("the demo's profile"),
        Some((&coord, &rt)),
        &mut times,
    )?;
    let plan = compiled
        .plan
        .context("compile made no plan (the demo stops after no pass)")?;
    let plan_file = out_dir.join("plan.json");
    std::fs::write(&plan_file, plan.to_json())?;

    step(
        5,
        "running the plan and every device alone; checking the output",
    );
    let input = test_input(&ir.input.shape);
    let run = rt.block_on(execute(
        &coord,
        &ir,
        &plan,
        input,
        3,
        true,
        Transport::Programs,
    ))?;
    let results = run.results;
    let results_file = out_dir.join("run.json");
    std::fs::write(
        &results_file,
        serde_json::to_string_pretty(&results)? + "\n",
    )?;

    let picture = out_dir.join("timeline.svg");
    let programs = crate::timeline::programs(&plan, &ir, local.cluster())?;
    crate::timeline::draw(&plan, Some(&results), Some(&programs), &picture)?;

    step(6, "done");
    drop(coord);
    local.stop();
    println!("{}", compiled.report);
    print!("{}", run.report);
    print!("{}", times.report());
    println!("files in {}:", out_dir.display());
    for f in [
        &model,
        &cluster_file,
        &out_dir.join("profile.json"),
        &plan_file,
        &results_file,
        &picture,
    ] {
        println!("  {}", f.display());
    }
    println!("demo finished in {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}
