//! `legion-worker`: the worker alone, for the boards (no compiler passes, no plotting).
//! The same options as `legion worker`.

use clap::Parser;
use legion_runtime::serve::{BadWorkerOption, WorkerArgs, init_logging, run_worker};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "legion-worker",
    version,
    about = "Serve Legion tiles over gRPC on this board until SIGINT or SIGTERM"
)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run_worker(&cli.worker) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<BadWorkerOption>().is_some() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
