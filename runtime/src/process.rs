//! Workers started as child processes (a `legion worker` or `legion-worker` binary,
//! possibly under qemu-user): spawned, waited for until they announce their address,
//! killed when dropped.

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running worker process.
pub struct WorkerProcess {
    child: Child,
    /// The address it listens on, `host:port`.
    pub addr: String,
    /// Its start line ("legion worker listening ..."), as logged.
    pub start_line: String,
}

impl WorkerProcess {
    /// Spawns `command` (a worker with `--listen host:0` or a fixed port) and waits up to
    /// `timeout` for its start line. Later log lines go to this process's stderr,
    /// prefixed with `label`.
    pub fn spawn(mut command: Command, label: &str, timeout: Duration) -> Result<WorkerProcess> {
        let shown = format!("{command:?}");
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {shown}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        let label = label.to_string();
        std::thread::spawn(move || {
            let mut announced = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !announced && line.contains("legion worker listening") {
                    announced = true;
                    let _ = tx.send(line);
                } else {
                    eprintln!("[{label}] {line}");
                }
            }
        });
        let start_line = match rx.recv_timeout(timeout) {
            Ok(line) => line,
            Err(_) => {
                let status = child.try_wait().ok().flatten();
                let _ = child.kill();
                let _ = child.wait();
                match status {
                    Some(s) => bail!("{shown} exited ({s}) before listening; its log is above"),
                    None => bail!("{shown} did not start listening within {timeout:?}"),
                }
            }
        };
        let addr = start_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .with_context(|| format!("no addr= in the start line {start_line:?}"))?
            .to_string();
        Ok(WorkerProcess {
            child,
            addr,
            start_line,
        })
    }

    /// The process id (of qemu, when the worker runs under it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far, KiB (`VmHWM` in /proc/PID/status).
    pub fn peak_rss_kib(&self) -> Result<u64> {
        self.status_kib("VmHWM")
    }

    /// Resident memory now, KiB (`VmRSS` in /proc/PID/status).
    pub fn rss_kib(&self) -> Result<u64> {
        self.status_kib("VmRSS")
    }

    /// A `field: N kB` line of /proc/PID/status.
    fn status_kib(&self, field: &str) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in {path}"))
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
