//! Project automation: `cargo xtask <task>` (see `cargo xtask --help`).

mod bench;
mod chaos;
mod cross;
mod fuzz;
mod gen_models;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Legion project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Generate the ONNX test models (legion-models).
    GenModels(gen_models::Args),
    /// Run a benchmark and write its table under bench/.
    Bench(bench::Args),
    /// Cross-build the worker for a board: aarch64 (Firefly) or armv7 (Odroid).
    Cross(cross::Args),
    /// Kill and stop workers at random while inferences run; writes bench/chaos.md.
    Chaos(chaos::Args),
    /// Mutated models, plans, cluster files, profiles and worker requests; writes
    /// bench/fuzz.md.
    Fuzz(fuzz::Args),
}

fn main() -> Result<()> {
    // Warnings of the runs a task drives (re-plans, failed frames) on stderr.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().task {
        Task::GenModels(args) => gen_models::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Cross(args) => cross::run(&args),
        Task::Chaos(args) => chaos::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
    }
}
