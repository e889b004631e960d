//! The emulator's clock: a thread's CPU time, read around every node of a tract plan.

use anyhow::{Result, ensure};
use std::sync::Arc;
use std::time::Duration;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::eval;

/// The CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> Result<Duration> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write to, and the clock id is a constant the
    // kernel knows; clock_gettime writes nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    ensure!(
        rc == 0,
        "this system cannot time a thread's CPU use (clock_gettime(CLOCK_THREAD_CPUTIME_ID): \
         {}), which emulated compute is timed on; run the worker without --emulate",
        std::io::Error::last_os_error()
    );
    Ok(Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
}

/// Runs `plan` on `inputs`, reading `clock` around the evaluation of every node: returns
/// the outputs and, per node id, the time its evaluation took. Time outside the nodes
/// (the plan's own bookkeeping) is not counted.
pub fn run_nodes_timed(
    plan: &Arc<TypedSimplePlan>,
    inputs: TVec<TValue>,
    clock: fn() -> Result<Duration>,
) -> Result<(TVec<TValue>, Vec<Duration>)> {
    let mut times = vec![Duration::ZERO; plan.model().nodes.len()];
    let mut state = plan.spawn()?;
    let outputs = state.run_plan_with_eval(inputs, |ctx, op_state, node, input| {
        let start = clock()?;
        let out = eval(ctx, op_state, node, input)?;
        times[node.id] += clock()?.saturating_sub(start);
        anyhow::Ok(out)
    })?;
    Ok((outputs, times))
}
