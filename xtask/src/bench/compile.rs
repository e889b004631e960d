//! `cargo xtask bench compile`: how long `legion compile` takes given a profile, per
//! pass, with the e-graph search against the dynamic program over the same costs.

use super::{host, kept_profile, load, median, ms};
use anyhow::{Result, ensure};
use legion_cost::Producers;
use legion_fusion::{search_dp, search_egg};
use legion_pipeline::{CompileOptions, cost_table};
use legion_plan::Cluster;
use std::fmt::Write;

/// (cluster, model) pairs measured: 6 devices each.
const SETUPS: [(&str, &str); 4] = [
    ("firefly-x6", "vgg16"),
    ("3f3o", "vgg16"),
    ("firefly-x6", "resnet50"),
    ("3f3o", "resnet50"),
];
const RUNS: usize = 5;

pub fn run(reuse: bool) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "# Compile time given a profile\n")?;
    writeln!(
        md,
        "Measured by `cargo xtask bench compile` on {} (dev profile; Legion's passes \
         built with opt-level 3). Legion-mode profiles measured on local emulated \
         clusters (kept under bench/profiles; `--reuse` reads them back). Each \
         time is the median of {RUNS} runs. *Table*: every candidate group under every \
         device option costed by the `legion` predictor at min-max shares (spread over \
         the host's cores), with the \
         legality checks. *egg*: saturate the e-graph and extract. *DP*: the dynamic \
         program over the same table. Targets (issue #6, whole compile given a \
         profile): VGG-16 < 50 ms, ResNet-50 < 500 ms.\n",
        host()
    )?;
    writeln!(
        md,
        "| cluster | model | stages | legal choices | table ms | egg ms | e-nodes | DP ms | same optimum | table + egg ms |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---|---:|")?;
    for (cluster, model) in SETUPS {
        let ir = load(model)?;
        let profile = kept_profile(cluster, model, &ir, 3, reuse)?;
        let devices = Cluster::load(
            &legion_models::workspace_root()
                .join("testdata/clusters")
                .join(format!("{cluster}.toml")),
        )?;
        let options = CompileOptions::legion("the kept profile");
        // Each run builds a fresh cost model (the min-max shares are cached inside it).
        // One table, as through the hub (compile for programs builds one per
        // assumption about who made a group's inputs).
        let build =
            || cost_table(&ir, &profile, &devices, &options, Producers::SameShares).map(|(t, _)| t);
        let t_table = median(RUNS, || build().map(|_| ()))?;
        let table = build()?;
        let (egg, stats) = search_egg(&table)?;
        let dp = search_dp(&table)?;
        ensure!(
            egg.cost == dp.cost,
            "{cluster} {model}: egg {egg} against dp {dp}"
        );
        let t_egg = median(RUNS, || search_egg(&table).map(|_| ()))?;
        let t_dp = median(RUNS, || search_dp(&table).map(|_| ()))?;
        writeln!(
            md,
            "| {cluster} | {model} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ir.stages.len(),
            table.len(),
            ms(t_table),
            ms(t_egg),
            stats.nodes,
            ms(t_dp),
            if egg.cost == dp.cost { "yes" } else { "no" },
            ms(t_table + t_egg)
        )?;
        eprintln!("{cluster} {model}: done");
    }
    Ok(md)
}
