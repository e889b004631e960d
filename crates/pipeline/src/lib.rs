//! The driver: the pipeline that joins the passes (docs/architecture.md, "The driver").
//!
//! - [`connect`]: connect to a cluster's workers and upload the model.
//! - [`profile`]: measure the model on them; [`profile_fss`] measures every choice of
//!   Legion's cost table (the FSS oracle); [`boards_of`] cuts a profile down to some
//!   of its boards.
//! - [`compile`]: cost every candidate group, search the fused-layer configuration,
//!   add its Wild Card, emit the candidates, and choose one, by measuring both on a live
//!   cluster or by prediction; with per-pass timings, dumps and `stop_after`.
//! - [`execute`]: run a plan against the best single device, in turns.
//! - [`Resilient`]: run a plan inference after inference, re-planning around boards
//!   that fail.
//! - [`serve`]: take frames over gRPC and run them on the sub-clusters of a serving
//!   plan.
//! - [`compile_serving`]: cut the cluster into sub-clusters with a plan each, for the
//!   most frames per second within a latency budget.
//!
//! The `legion` CLI, `legion demo` and every `cargo xtask bench` go through here, so
//! that a benchmark measures what users run.

mod compile;
mod passes;
mod recover;
mod run;
mod serve;
mod serving;
mod session;

pub use compile::{CompileOptions, Compiled, Search, StreamFlcs, compile, cost_table, fss_choices};
pub use passes::{Dump, Pass, PassTimes};
pub use recover::{
    ATTEMPTS, HEALTH_TIMEOUT, PROBE_EVERY, Recovery, Resilient, STRAGGLER_RATIO, STRAGGLER_RUNS,
    Started, Straggler,
};
pub use run::{
    Alone, CHECK_REL, Executed, Measured, every_device_alone, execute, measure_in_rounds, quantile,
    run_whole,
};
pub use serve::{
    FRAME_ATTEMPTS, KeptRun, Offered, REPORT_EVERY, ServeOptions, Served, closed_loop, offer,
    serve, serving_plan_of,
};
pub use serving::{
    DEPTH_GAIN, LatencyBudget, MAX_DEPTH, MAX_SERVING_BOARDS, STREAM_ROUNDS, Streamed, best_within,
    compile_serving, predict_candidates,
};
pub use session::{boards_of, connect, profile, profile_fss};

/// Input that does not fit (a profile of another model or cluster, a bad option): the
/// CLI reports it with exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);
