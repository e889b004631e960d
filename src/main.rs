//! `legion`: compile a CNN into a plan that runs one inference across several edge boards.

mod cluster;
mod compile;
mod demo;
mod inspect;
mod plan;
mod predict;
mod profile;
mod run;
mod serve;
mod split;
mod timeline;

use clap::{Parser, Subcommand};
use legion_runtime::serve::init_logging;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "legion",
    version,
    about = "Split one CNN inference across heterogeneous edge boards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List a model's stages: shapes, geometry, FLOPs, weights, and which split by rows.
    Inspect(inspect::Args),
    /// Tile groups of stages for N devices: strips, halos, pads, alpha; --check runs them.
    Split(split::Args),
    /// Serve tiles over gRPC on this board until SIGINT or SIGTERM.
    Worker(legion_runtime::serve::WorkerArgs),
    /// Start a cluster of workers on this host (`cluster up`), or make the boards' TLS
    /// certificates (`cluster keygen`).
    Cluster(cluster::Args),
    /// Measure a model on a cluster: single stages (legion) or every group (fss).
    Profile(profile::Args),
    /// Predicted times of candidate groups from a profile.
    Predict(predict::Args),
    /// Pick the fused groups and their devices, and write the plan (JSON).
    Compile(compile::Args),
    /// Work with plans: `plan validate`, `plan show`.
    Plan(plan::Args),
    /// Execute a plan on the cluster: per-group timings, latency, speedup, --check.
    Run(run::Args),
    /// Take frames over gRPC and run them on the sub-clusters of a serving plan (or on
    /// one plan), re-planning around boards that fail.
    Serve(serve::Args),
    /// Send one frame to `legion serve` and print (or save) its outputs.
    Infer(serve::InferArgs),
    /// The whole job on an emulated local cluster of 4 boards, no setup needed.
    Demo(demo::Args),
}

/// Exit code for bad input (a model that cannot be imported, a bad argument).
const EXIT_BAD_INPUT: u8 = 2;

/// A command-line argument that does not fit the model (reported with exit code 2).
use legion_pipeline::BadInput;

fn is_bad_input(e: &anyhow::Error) -> bool {
    e.downcast_ref::<legion_ir::ImportError>().is_some()
        || e.downcast_ref::<legion_partition::PartitionError>()
            .is_some()
        || e.downcast_ref::<BadInput>().is_some()
        || e.downcast_ref::<legion_plan::ClusterError>().is_some()
        || e.downcast_ref::<legion_runtime::serve::BadWorkerOption>()
            .is_some()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(&args),
        Command::Split(args) => split::run(&args),
        Command::Worker(args) => {
            init_logging();
            legion_runtime::serve::run_worker(&args)
        }
        Command::Cluster(args) => cluster::run(&args),
        Command::Profile(args) => profile::run(&args),
        Command::Predict(args) => predict::run(&args),
        Command::Compile(args) => compile::run(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Serve(args) => {
            init_logging();
            serve::run(&args)
        }
        Command::Infer(args) => serve::infer(&args),
        Command::Demo(args) => demo::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_bad_input(&e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A concrete input shape, as `--input-shape 1,3,224,224` gives it.
#[derive(Clone, Debug)]
struct Shape(Vec<usize>);

fn parse_shape(s: &str) -> Result<Shape, String> {
    s.split(',')
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map(Shape)
        .map_err(|_| {
            format!("'{s}' is not a shape: expected comma-separated sizes such as 1,3,224,224")
        })
}

/// A model path plus the optional input-shape override, shared by the commands that import.
#[derive(clap::Args)]
struct ModelArgs {
    /// The ONNX model.
    model: PathBuf,
    /// Concrete input shape, e.g. 1,3,224,224 (required when the model's input is dynamic).
    #[arg(long, value_parser = parse_shape)]
    input_shape: Option<Shape>,
}

impl ModelArgs {
    fn import(&self) -> anyhow::Result<legion_ir::Ir> {
        Ok(legion_ir::import(
            &self.model,
            self.input_shape.as_ref().map(|s| &s.0[..]),
        )?)
    }

    /// Connects to `cluster` (read from `cluster_file`) and uploads this model, whose
    /// import is `ir`.
    async fn connect(
        &self,
        cluster: &legion_plan::Cluster,
        cluster_file: &std::path::Path,
        ir: &legion_ir::Ir,
    ) -> anyhow::Result<legion_runtime::Coordinator> {
        use anyhow::Context;
        let onnx = std::fs::read(&self.model)
            .with_context(|| format!("reading {}", self.model.display()))?;
        let (cluster_name, model_name) = (cluster_file.display(), self.model.display());
        legion_pipeline::connect(
            cluster,
            &cluster_name.to_string(),
            &onnx,
            &model_name.to_string(),
            ir,
        )
        .await
    }
}
