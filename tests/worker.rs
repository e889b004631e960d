//! `legion worker`, `legion cluster up` and `legion profile` as processes: workers
//! listen, answer and stop cleanly; a cluster started from the command line is profiled
//! from the command line; bad arguments exit 2 naming the problem.

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
            "--emulate",
            "odroid-xu4",
            "--host-gflops",
            "30",
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
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("legion worker listening"))
        .expect("the worker announces its address");
    assert!(listening.contains("auth=\"token\""), "{listening}");
    assert!(listening.contains("clock=\"emulated\""), "{listening}");
    let addr = listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("the start line names the address")
        .to_string();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let timeout = Duration::from_secs(5);
        let client = legion_runtime::WorkerClient::connect(&addr, Some("s3cret"), None, timeout)
            .await
            .unwrap();
        let info = client.info().await.unwrap();
        assert_eq!(info.name, "board-a");
        let emulation = info.emulation.expect("an emulated worker says so");
        assert_eq!(emulation.class, "odroid-xu4");
        assert_eq!(info.gflops, emulation.gflops);
        assert_eq!(emulation.host_gflops, 30.0, "the rate it was given");
        let wrong = legion_runtime::WorkerClient::connect(&addr, Some("nope"), None, timeout)
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

#[test]
fn a_cluster_started_from_the_command_line_is_profiled_from_it() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cluster-cli");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster_file = dir.join("cluster.toml");
    let child = Command::new(env!("CARGO_BIN_EXE_legion"))
        .args(["cluster", "up", "--local", "2", "--port", "0"])
        .args(["--emulate", "firefly-rk3399,odroid-xu4", "--out"])
        .arg(&cluster_file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("serving; press Ctrl-C"))
        .expect("the cluster comes up");
    let cluster = legion_plan::Cluster::load(&cluster_file).unwrap();
    assert_eq!(cluster.devices.len(), 2);
    let emulated = cluster.devices[1].emulate.as_ref().map(|e| e.spec());
    assert_eq!(emulated.as_deref(), Some("odroid-xu4"));

    let model = legion_models::test_model("tiny-cnn").unwrap();
    // `legion profile` on the cluster with `args`, into `file`: its stdout and the profile.
    let profile_into = |args: &[&str], file: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_legion"))
            .arg("profile")
            .arg(&model)
            .arg("--cluster")
            .arg(&cluster_file)
            .args(args)
            .arg("-o")
            .arg(file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let profile =
            legion_plan::Profile::from_json(&std::fs::read_to_string(file).unwrap()).unwrap();
        (stdout, profile)
    };
    let profile_file = dir.join("profile.json");
    let (stdout, profile) = profile_into(&[], &profile_file);
    assert!(stdout.contains("on the emulated clock"), "{stdout}");
    assert_eq!(profile.devices.len(), 2);
    assert_eq!(profile.devices[0].class.as_deref(), Some("firefly-rk3399"));

    // The FSS oracle from that profile: every choice of its hub cost table, one round.
    let legion_profile = profile_file.to_str().unwrap();
    let fss_args = [
        "--mode",
        "fss",
        "--runs",
        "1",
        "--legion-profile",
        legion_profile,
    ];
    let (stdout, fss) = profile_into(&fss_args, &dir.join("fss.json"));
    assert_eq!(fss.costed_from, Some(profile.sha256()));
    assert!(
        stdout.contains(&format!("{} measurements", fss.groups.len())),
        "{stdout}"
    );
    let ir = legion_ir::import(&model, None).unwrap();
    let stages = ir.stages.len();
    // Every group of the model whole on one board, each splittable one over both by
    // rows, and the channel splits.
    let count = |option: usize, channels: bool| {
        fss.groups
            .iter()
            .filter(|g| g.option == Some(option) && g.channels == channels)
            .count()
    };
    assert_eq!(count(1, false), stages * (stages + 1) / 2, "{stdout}");
    assert_eq!(
        count(2, false),
        legion_partition::candidate_groups(&ir, None).len()
    );
    assert_eq!(
        count(1, false) + count(2, false) + count(2, true),
        fss.groups.len()
    );

    // Bad arguments: exit 2 with the reason.
    let bad = |args: &[&str], want: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_legion"))
            .arg("profile")
            .arg(&model)
            .args(args)
            .arg("-o")
            .arg(dir.join("unused.json"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    };
    let cluster_arg = cluster_file.to_str().unwrap();
    bad(
        &["--cluster", cluster_arg, "--max-group-len", "3"],
        "--max-group-len applies to --mode fss only",
    );
    bad(
        &["--cluster", cluster_arg, "--mode", "fss"],
        "give it with --legion-profile",
    );
    bad(
        &["--cluster", "/nonexistent/c.toml"],
        "/nonexistent/c.toml: cannot read the cluster file",
    );

    let status = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        child.0.wait().unwrap().success(),
        "cluster up exits 0 on Ctrl-C"
    );
}

#[test]
fn a_real_worker_computes_on_several_threads_and_matches_one() {
    let cache = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("worker-threads-cache");
    let mut command = Command::new(env!("CARGO_BIN_EXE_legion"));
    command
        .args([
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "host",
            "--insecure",
        ])
        .args(["--threads", "2", "--host-gflops", "30", "--cache"])
        .arg(&cache);
    let worker =
        legion_runtime::process::WorkerProcess::spawn(command, "threads", Duration::from_secs(60))
            .unwrap();
    assert!(
        worker.start_line.contains("threads=2"),
        "{}",
        worker.start_line
    );
    assert!(
        worker.start_line.contains("clock=\"real\""),
        "{}",
        worker.start_line
    );
    let cluster = legion_plan::Cluster {
        coordinator: legion_plan::CoordinatorLink::default(),
        token_file: None,
        devices: vec![legion_plan::Device {
            name: "host".into(),
            address: worker.addr.clone(),
            emulate: None,
            class: None,
            link_mbps: 100.0,
            latency_ms: 0.2,
            memory_mb: None,
            tls_cert: None,
        }],
    };
    // VGG-16's first block (conv1_1, conv1_2, pool1) at 224x224: matrix products large
    // enough for tract to share them out over the threads.
    let path = legion_models::test_model("vgg16-conv").unwrap();
    let ir = legion_ir::import(&path, None).unwrap();
    let input = legion_runtime::check::test_input(&ir.input.shape);
    let reference = legion_runtime::Reference::run(&ir, input.clone()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut tensors = legion_runtime::Tensors::new(&ir, input).unwrap();
    rt.block_on(async {
        let mut coord = legion_runtime::Coordinator::connect(&cluster, Duration::from_secs(10))
            .await
            .unwrap();
        coord
            .upload(&std::fs::read(&path).unwrap(), &ir.input.shape)
            .await
            .unwrap();
        let spec = legion_partition::whole_group(&ir, legion_partition::Group::new(0, 2));
        coord
            .run_step(&[(legion_plan::DeviceId(0), spec)], &mut tensors)
            .await
            .unwrap();
    });
    let block1 = legion_ir::TensorRef::Stage(legion_ir::StageId(2));
    let diff = legion_runtime::check::compare(
        tensors.whole(block1).unwrap(),
        reference.tensor(block1),
        reference.tensor(block1),
    )
    .unwrap();
    assert!(
        diff.within(1e-5),
        "2 threads against this process's 1: {diff:?}"
    );

    // Bad thread counts: exit 2 with the reason.
    let bad = |args: &[&str], want: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_legion"))
            .arg("worker")
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    };
    bad(&["--threads", "0"], "--threads 0: give at least 1 thread");
    bad(&["--max-runs", "0"], "--max-runs 0: give at least 1");
    bad(&[], "no --token-file");
    bad(&["--tls-cert", "x.pem"], "--tls-key");
    bad(
        &["--threads", "2", "--emulate", "odroid-xu4"],
        "an emulated worker computes on one thread",
    );
}

/// `legion cluster keygen` makes a certificate per board; a worker started with its own
/// serves TLS: a client pinning that certificate with the token gets through, a
/// plain-text client, one pinning another board's certificate and one without the
/// token do not.
#[test]
fn keygen_certificates_make_a_worker_serve_tls() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("worker-tls");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cluster_file = dir.join("cluster.toml");
    std::fs::write(
        &cluster_file,
        "token_file = \"token\"\n\
         [[device]]\nname = \"board-a\"\naddress = \"10.0.0.7:7070\"\nlink_mbps = 100\nlatency_ms = 0.2\n\
         [[device]]\nname = \"board-b\"\naddress = \"10.0.0.8:7070\"\nlink_mbps = 100\nlatency_ms = 0.2\n",
    )
    .unwrap();
    std::fs::write(dir.join("token"), "s3cret\n").unwrap();
    let certs = dir.join("certs");
    let keygen = || {
        Command::new(env!("CARGO_BIN_EXE_legion"))
            .args(["cluster", "keygen"])
            .arg(&cluster_file)
            .arg("--out")
            .arg(&certs)
            .output()
            .unwrap()
    };
    let out = keygen();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("board-b"), "{stdout}");
    assert!(stdout.contains("tls_cert = "), "{stdout}");
    let key = certs.join("board-a.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Run again, it keeps what is there.
    let again = keygen();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let mut command = Command::new(env!("CARGO_BIN_EXE_legion"));
    command
        .args(["worker", "--listen", "127.0.0.1:0", "--name", "board-a"])
        .args(["--host-gflops", "30", "--cache"])
        .arg(dir.join("cache"))
        .arg("--token-file")
        .arg(dir.join("token"))
        .arg("--tls-cert")
        .arg(certs.join("board-a.pem"))
        .arg("--tls-key")
        .arg(&key);
    let worker =
        legion_runtime::process::WorkerProcess::spawn(command, "tls", Duration::from_secs(60))
            .unwrap();
    assert!(
        worker.start_line.contains("tls=true"),
        "{}",
        worker.start_line
    );
    let pem = |name: &str| std::fs::read(certs.join(format!("{name}.pem"))).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let timeout = Duration::from_secs(5);
        let connect = |token: Option<&'static str>, cert: Option<Vec<u8>>| {
            let addr = worker.addr.clone();
            async move {
                legion_runtime::WorkerClient::connect(&addr, token, cert.as_deref(), timeout).await
            }
        };
        let pinned = connect(Some("s3cret"), Some(pem("board-a"))).await.unwrap();
        assert_eq!(pinned.info().await.unwrap().name, "board-a");
        // Plain text against TLS: no answer.
        let plain = match connect(Some("s3cret"), None).await {
            Ok(c) => c.health().await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(plain.is_err(), "a plain-text client is refused");
        // Another board's certificate: the handshake fails.
        let other = match connect(Some("s3cret"), Some(pem("board-b"))).await {
            Ok(c) => c.health().await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(
            other.is_err(),
            "a client pinning another certificate is refused"
        );
        // The right certificate without the token.
        let e = connect(None, Some(pem("board-a")))
            .await
            .unwrap()
            .health()
            .await
            .unwrap_err();
        let status = e.downcast_ref::<tonic::Status>().expect("a worker status");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{e:#}");
    });
}

/// `legion run --recover-with`: the board a plan runs on is SIGSTOPped mid-stream. The
/// inference in flight misses its deadline, the board does not answer Health and is
/// marked down, the plan is compiled again for the others and the inference runs
/// again; once SIGCONTed, the board is taken back. Every output is checked.
#[test]
fn a_stopped_board_is_detected_by_its_deadline_and_taken_back() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("worker-recover");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let workers: Vec<legion_runtime::process::WorkerProcess> = (0..3)
        .map(|i| {
            let mut command = Command::new(env!("CARGO_BIN_EXE_legion"));
            command
                .args(["worker", "--listen", "127.0.0.1:0", "--insecure"])
                .args(["--name", &format!("b{i}"), "--threads", "1"])
                .args(["--host-gflops", "30", "--cache"])
                .arg(dir.join(format!("cache{i}")));
            legion_runtime::process::WorkerProcess::spawn(command, "b", Duration::from_secs(60))
                .unwrap()
        })
        .collect();
    let mut toml = String::new();
    for (i, w) in workers.iter().enumerate() {
        toml += &format!(
            "[[device]]\nname = \"b{i}\"\naddress = \"{}\"\nlink_mbps = 100.0\nlatency_ms = 0.2\n",
            w.addr
        );
    }
    let cluster = dir.join("cluster.toml");
    std::fs::write(&cluster, toml).unwrap();
    let model = legion_models::test_model("tiny-cnn").unwrap();
    let (profile, plan) = (dir.join("profile.json"), dir.join("plan.json"));
    let legion = |args: &[&std::ffi::OsStr]| {
        let out = Command::new(env!("CARGO_BIN_EXE_legion"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    legion(&[
        &os("profile"),
        model.as_os_str(),
        &os("--cluster"),
        cluster.as_os_str(),
        &os("-o"),
        profile.as_os_str(),
    ]);
    legion(&[
        &os("compile"),
        model.as_os_str(),
        &os("--cluster"),
        cluster.as_os_str(),
        &os("--profile"),
        profile.as_os_str(),
        &os("-o"),
        plan.as_os_str(),
    ]);
    // The board the plan's first group runs on.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let chosen = json["chosen"].as_u64().unwrap() as usize;
    let board = json["candidates"][chosen]["groups"][0]["tiles"][0]["device"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = workers[board[1..].parse::<usize>().unwrap()].pid();
    let mut run = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_legion"))
            .arg("run")
            .arg(&plan)
            .arg(&model)
            .arg("--cluster")
            .arg(&cluster)
            .arg("--recover-with")
            .arg(&profile)
            .args(["--repeat", "100000", "--check"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    // Each line: one inference, its output checked, and the boards of its plan.
    let mut lines = BufReader::new(run.0.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let mut seen = vec![];
    let mut next = |what: &str, pred: &dyn Fn(&str) -> bool| {
        for line in lines.by_ref() {
            assert!(line.contains("output checked"), "{line}");
            seen.push(line.clone());
            if pred(&line) {
                return;
            }
        }
        panic!("the run ended before {what}: {seen:?}");
    };
    let on_board = |line: &str| {
        line.split(", on ")
            .nth(1)
            .is_some_and(|b| b.contains(&board))
    };
    next("ten inferences", &|l| l.starts_with("inference 10:"));
    signal("-STOP");
    next("a plan without the stopped board", &|l| !on_board(l));
    signal("-CONT");
    next("the board taken back", &on_board);
    drop(run);
}
