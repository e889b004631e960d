//! `cargo xtask bench models`: today's architectures through the product as a user runs
//! it. Per model: stages split and barrier (and why), `legion split --check` at 3
//! devices, and on emulated clusters `legion compile` (profiling first, the candidates
//! measured) then `legion run --check`: predicted and measured latency, speedup over the
//! best single board and the end-to-end error.

use super::{host, start_local};
use anyhow::{Context, Result, bail};
use legion_ir::{Ir, Split};
use legion_plan::{HostRates, Plan, RunResults};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::process::Command;

/// Models measured unless `--models` says otherwise.
pub const MODELS: [&str; 10] = [
    "tiny-yolov8",
    "tiny-convnext",
    "tiny-effnet",
    "tiny-shuffle",
    "tiny-focus",
    "yolov8n",
    "convnext-tiny",
    "efficientnet-b0",
    "shufflenetv2",
    "resnet18",
];

/// Clusters under testdata/clusters, unless `--clusters` says otherwise.
pub const CLUSTERS: [&str; 2] = ["firefly-x3", "3f3o"];

/// What to measure.
pub struct Options {
    /// Catalog names.
    pub models: Vec<String>,
    /// Cluster files under testdata/clusters, without `.toml`.
    pub clusters: Vec<String>,
    /// Timed runs of each plan.
    pub runs: u32,
}

/// One model on one cluster, as `legion run --save` measured it.
struct Measured {
    predicted_us: u64,
    median_us: u64,
    single_us: u64,
    check_max_rel: f32,
    /// The range of the host's rates over the runs.
    host: Option<HostRates>,
}

pub fn run(opts: &Options) -> Result<String> {
    let legion = super::legion_binary()?;
    let scratch = legion_models::workspace_root().join("target/bench-models");
    std::fs::create_dir_all(&scratch)?;
    let mut md = String::new();
    writeln!(md, "# Today's architectures through Legion\n")?;
    writeln!(
        md,
        "Measured by `cargo xtask bench models` on {} with the `legion` binary (dev \
         profile, tract at opt-level 3), as a user runs it: `legion split --check` on 3 \
         equal devices (every group and every barrier stage against a single run of the \
         model), then on local emulated clusters (testdata/clusters) `legion compile` \
         (legion-mode profile, the candidates measured, the fastest kept) and `legion run \
         --check --repeat {}`. Times are on the emulated clock; *speedup* is the best \
         single board's median over the plan's, run in turn, flagged where the host's \
         rate moved more than 5% over the runs. *Barrier share* is barrier stages over \
         all stages.\n",
        host(),
        opts.runs
    )?;
    let mut header =
        "| model | input | stages | split | barriers | barrier share | split --check max rel |"
            .to_string();
    let mut rule = "|---|---|---:|---:|---:|---:|---:|".to_string();
    for c in &opts.clusters {
        write!(
            header,
            " {c} predicted ms | {c} measured ms | {c} speedup | {c} check max rel |"
        )?;
        rule.push_str("---:|---:|---:|---:|");
    }
    writeln!(md, "{header}\n{rule}")?;
    let mut reasons_md = String::new();
    for name in &opts.models {
        let path = legion_models::test_model(name)?;
        let ir = legion_ir::import(&path, None).with_context(|| format!("importing {name}"))?;
        let barriers = ir.stages.iter().filter(|s| !s.is_splittable()).count();
        let split_rel = split_check(&legion, &path)?;
        write!(
            md,
            "| {name} | {} | {} | {} | {barriers} | {:.1}% | {split_rel:.1e} |",
            shape(&ir.input.shape),
            ir.stages.len(),
            ir.stages.len() - barriers,
            100.0 * barriers as f64 / ir.stages.len() as f64,
        )?;
        for cluster in &opts.clusters {
            eprintln!("{name} on {cluster}");
            let m = end_to_end(&legion, &scratch, name, &path, cluster, opts.runs)?;
            // A run over which the host's rate moved past the limit is flagged.
            let moved = match m.host {
                Some(h) if h.drifted() => format!(" (host moved {:.0}%)", h.moved() * 100.0),
                _ => String::new(),
            };
            write!(
                md,
                " {:.3} | {:.3} | {:.2}x{moved} | {:.1e} |",
                m.predicted_us as f64 / 1e3,
                m.median_us as f64 / 1e3,
                m.single_us as f64 / m.median_us.max(1) as f64,
                m.check_max_rel
            )?;
        }
        writeln!(md)?;
        writeln!(reasons_md, "- **{name}**: {}", barrier_reasons(&ir))?;
    }
    writeln!(md, "\n## What is still a barrier, and why\n")?;
    md.push_str(&reasons_md);
    Ok(md)
}

/// Runs `legion ARGS`, failing with its output when it fails.
pub(super) fn legion_cmd(legion: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(legion).args(args).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "legion {} failed:\n{stdout}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// `legion split MODEL --devices 3 --check --json`: the largest relative error of any
/// group or barrier.
fn split_check(legion: &Path, model: &Path) -> Result<f32> {
    let json = legion_cmd(
        legion,
        &[
            "split",
            &model.to_string_lossy(),
            "--devices",
            "3",
            "--check",
            "--json",
        ],
    )?;
    let reports: Vec<serde_json::Value> = serde_json::from_str(&json)?;
    reports
        .iter()
        .map(|r| {
            r["check"]["max_rel"]
                .as_f64()
                .map(|v| v as f32)
                .context("a split report without its check")
        })
        .try_fold(0f32, |worst, rel| Ok(worst.max(rel?)))
}

/// Starts the cluster's workers here, compiles the model on them with `legion compile`
/// and runs the plan with `legion run --check`.
fn end_to_end(
    legion: &Path,
    scratch: &Path,
    name: &str,
    model: &Path,
    cluster_name: &str,
    runs: u32,
) -> Result<Measured> {
    let local = start_local(cluster_name)?;
    let setup = format!("{name}-{cluster_name}");
    let cluster_file = scratch.join(format!("{setup}.toml"));
    std::fs::write(&cluster_file, local.cluster().to_toml())?;
    let plan_file = scratch.join(format!("{setup}-plan.json"));
    let run_file = scratch.join(format!("{setup}-run.json"));
    let (model, cluster_arg) = (model.to_string_lossy(), cluster_file.to_string_lossy());
    legion_cmd(
        legion,
        &[
            "compile",
            &model,
            "--cluster",
            &cluster_arg,
            "-o",
            &plan_file.to_string_lossy(),
        ],
    )?;
    legion_cmd(
        legion,
        &[
            "run",
            &plan_file.to_string_lossy(),
            &model,
            "--cluster",
            &cluster_arg,
            "--check",
            "--repeat",
            &runs.to_string(),
            "--save",
            &run_file.to_string_lossy(),
        ],
    )?;
    local.stop();
    let plan =
        Plan::from_json(&std::fs::read_to_string(&plan_file)?).map_err(anyhow::Error::msg)?;
    let results: RunResults = serde_json::from_str(&std::fs::read_to_string(&run_file)?)?;
    Ok(Measured {
        predicted_us: plan.chosen().predicted_us,
        median_us: results.median_us,
        single_us: results
            .best_single_device
            .context("legion run measured no single device")?
            .1,
        check_max_rel: results
            .check_max_rel
            .context("legion run --check recorded no error")?,
        host: results.host_gflops,
    })
}

fn shape(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// Barrier stages grouped by kind and reason, most frequent first.
fn barrier_reasons(ir: &Ir) -> String {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for s in &ir.stages {
        if let Split::Barrier(reason) = &s.split {
            *counts
                .entry((s.kind.short_name(), reason.clone()))
                .or_default() += 1;
        }
    }
    if counts.is_empty() {
        return "none".into();
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    counts
        .iter()
        .map(|((kind, reason), n)| format!("{n} x {kind} ({reason})"))
        .collect::<Vec<_>>()
        .join("; ")
}
