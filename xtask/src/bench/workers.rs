//! `cargo xtask bench workers`: the worker cross-built for each board architecture:
//! its binary size, a cold build's time, and its peak memory under qemu-user while it
//! serves VGG-16's first block (conv1_1, conv1_2, pool1) whole.

use crate::cross::{Arch, binary, build, target_dir};
use anyhow::{Context, Result};
use legion_ir::Rows;
use legion_partition::{Group, tile};
use legion_pipeline::connect;
use legion_plan::{Cluster, CoordinatorLink, Device, DeviceId, Emulation};
use legion_runtime::Tensors;
use legion_runtime::check::test_input;
use legion_runtime::process::WorkerProcess;
use std::fmt::Write;
use std::process::Command;
use std::time::{Duration, Instant};

/// Timed runs of the block on each worker.
const RUNS: usize = 3;

struct Row {
    arch: Arch,
    size: u64,
    build: Duration,
    peak_kib: u64,
    idle_kib: u64,
    run: Duration,
}

/// Serves VGG-16's first block on the qemu-run worker at `bin`: (peak RSS before the
/// model arrived, peak RSS after, median wall time of one run of the block).
fn serve_block(arch: Arch, bin: &std::path::Path) -> Result<(u64, u64, Duration)> {
    let (qemu, sysroot) = arch.qemu();
    let cache = target_dir()
        .join("bench-cross")
        .join(format!("cache-{arch}"));
    std::fs::create_dir_all(&cache)?;
    let mut command = Command::new(qemu);
    command
        .args(["-L", sysroot])
        .arg(bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--insecure",
            "--emulate",
            arch.board(),
        ])
        .args(["--host-gflops", "100", "--cache"])
        .arg(&cache);
    let worker = WorkerProcess::spawn(command, &arch.to_string(), Duration::from_secs(120))?;
    let idle = worker.peak_rss_kib()?;
    let cluster = Cluster {
        coordinator: CoordinatorLink::default(),
        token_file: None,
        devices: vec![Device {
            name: arch.board().into(),
            address: worker.addr.clone(),
            emulate: Some(Emulation::class(arch.board())?),
            class: None,
            link_mbps: 100.0,
            latency_ms: 0.2,
            memory_mb: None,
            tls_cert: None,
        }],
    };
    let ir = super::load("vgg16-conv")?;
    let onnx = std::fs::read(legion_models::test_model("vgg16-conv")?)?;
    let group = Group::new(0, 2);
    let height = ir.stage(group.last).output.height().context("rows")?;
    let tiling = tile(&ir, group, &[Rows::new(0, height)])?;
    let tiles: Vec<_> = tiling
        .tiles
        .iter()
        .map(|t| (DeviceId(t.slot), t.spec()))
        .collect();
    let rt = tokio::runtime::Runtime::new()?;
    let mut times = rt.block_on(async {
        let coord = connect(
            &cluster,
            "the cross-built workers",
            &onnx,
            "vgg16-conv",
            &ir,
        )
        .await?;
        let mut times = vec![];
        for _ in 0..RUNS {
            let mut tensors = Tensors::new(&ir, test_input(&ir.input.shape))?;
            let start = Instant::now();
            coord.run_step(&tiles, &mut tensors).await?;
            times.push(start.elapsed());
        }
        anyhow::Ok(times)
    })?;
    times.sort();
    Ok((idle, worker.peak_rss_kib()?, times[RUNS / 2]))
}

pub fn run() -> Result<String> {
    let mut rows = vec![];
    for arch in Arch::ALL {
        // A fresh target directory, so the build is cold.
        let dir = target_dir().join("bench-cross").join(arch.to_string());
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
        }
        let took = build(arch, &dir)?;
        let bin = binary(arch, &dir);
        let size = std::fs::metadata(&bin)
            .with_context(|| format!("{} was not built", bin.display()))?
            .len();
        let (idle_kib, peak_kib, run) = serve_block(arch, &bin)?;
        rows.push(Row {
            arch,
            size,
            build: took,
            peak_kib,
            idle_kib,
            run,
        });
        eprintln!("{arch}: done");
    }
    let mut md = String::new();
    writeln!(md, "# The worker on the boards' architectures\n")?;
    writeln!(
        md,
        "Measured by `cargo xtask bench workers` on {}. *Binary*: `legion-worker` (the \
         worker alone, release profile, not stripped) as `cargo xtask cross` builds it. \
         *Cold build*: from an empty target directory, tract included. *Peak memory*: \
         VmHWM of the qemu-user process running the worker (guest memory plus qemu's own), \
         after it started and after it served VGG-16's first block (conv1_1, conv1_2, \
         pool1; 224x224 input) whole {RUNS} times. *Block run*: median wall time of one \
         step under qemu on this host (not a board's time).\n",
        super::host()
    )?;
    writeln!(
        md,
        "| target | board | binary MiB | cold build s | peak MiB at start | peak MiB serving the block | block run s (qemu) |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|")?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {:.1} | {:.0} | {:.1} | {:.1} | {:.2} |",
            r.arch.triple(),
            r.arch.board(),
            r.size as f64 / (1 << 20) as f64,
            r.build.as_secs_f64(),
            r.idle_kib as f64 / 1024.0,
            r.peak_kib as f64 / 1024.0,
            r.run.as_secs_f64()
        )?;
    }
    Ok(md)
}
