//! `legion worker` as a process: it listens, answers, and stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn worker_serves_and_stops_on_sigterm() {
    let cache = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("worker-cli-cache");
    let token_file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("worker-cli-token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_legion"))
        .args([
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "board-a",
            "--cache",
        ])
        .arg(&cache)
        .arg("--token-file")
        .arg(&token_file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let listening = lines.next().unwrap().unwrap();
    assert!(listening.contains("legion worker listening"), "{listening}");
    assert!(listening.contains("auth=\"token\""), "{listening}");
    let addr = listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("the start line names the address")
        .to_string();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let timeout = Duration::from_secs(5);
        let client = legion_runtime::WorkerClient::connect(&addr, Some("s3cret"), timeout)
            .await
            .unwrap();
        assert_eq!(client.info().await.unwrap().name, "board-a");
        let wrong = legion_runtime::WorkerClient::connect(&addr, Some("nope"), timeout)
            .await
            .unwrap();
        assert!(wrong.health().await.is_err(), "a wrong token is refused");
    });

    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.0.wait().unwrap();
    assert!(exit.success(), "worker exits 0 on SIGTERM: {exit:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("SIGTERM received")),
        "{rest:?}"
    );
}

/// Kills the worker if the test fails before it stops it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
