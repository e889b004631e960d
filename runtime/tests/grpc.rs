//! The worker protocol end to end: in-process workers on 127.0.0.1, each on its own
//! tokio runtime (so that shutting one down kills its connections like a dead board).

use legion_ir::{Ir, TensorRef, import};
use legion_partition::{Group, strips_from_weights, tile};
use legion_runtime::emulate::measure_device_gflops;
use legion_runtime::proto::{F32Tensor, RunTileRequest};
use legion_runtime::tls::WorkerIdentity;
use legion_runtime::{
    Compute, Limits, ModelId, Reference, ShippedTiles, Worker, WorkerClient, WorkerConfig, check,
    sha256_hex,
};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tonic::Code;
use tract_onnx::prelude::Tensor;

const TIMEOUT: Duration = Duration::from_secs(3);

/// The host's rate, measured once for every worker of this test binary.
fn host_gflops() -> f64 {
    static RATE: OnceLock<f64> = OnceLock::new();
    *RATE.get_or_init(|| measure_device_gflops().unwrap())
}

/// A worker serving on its own runtime; dropped, it dies like a killed process.
struct TestWorker {
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    rt: Option<Runtime>,
    cache_dir: PathBuf,
}

impl TestWorker {
    fn start(token: Option<&str>) -> TestWorker {
        TestWorker::start_with(token, None, Limits::default())
    }

    fn start_with(token: Option<&str>, tls: Option<WorkerIdentity>, limits: Limits) -> TestWorker {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let cache_dir =
            std::env::temp_dir().join(format!("legion-grpc-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache_dir);
        let config = WorkerConfig {
            name: format!("worker{n}"),
            cache_dir: cache_dir.clone(),
            token: token.map(str::to_string),
            tls,
            limits,
            compute: Compute::Real {
                gflops: host_gflops(),
            },
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = {
            let _in_rt = rt.enter();
            tokio::net::TcpListener::from_std(listener).unwrap()
        };
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        let worker = Worker::new(config).unwrap();
        let done = rt.spawn(worker.serve(listener, async {
            let _ = stopped.await;
        }));
        TestWorker {
            addr,
            stop: Some(stop),
            done: Some(done),
            rt: Some(rt),
            cache_dir,
        }
    }

    async fn client(&self, token: Option<&str>) -> WorkerClient {
        WorkerClient::connect(&self.addr, token, None, TIMEOUT)
            .await
            .unwrap()
    }

    /// Kills the worker: its runtime, the connections included, goes away at once.
    fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.cache_dir);
    }
}

fn model_bytes() -> (Vec<u8>, PathBuf) {
    let path = legion_models::test_model("tiny-cnn").unwrap();
    (std::fs::read(&path).unwrap(), path)
}

fn input(ir: &Ir) -> Tensor {
    legion_runtime::check::test_input(&ir.input.shape)
}

/// The first tile of the longest splittable prefix of tiny-cnn, for 3 devices.
fn three_tiles(ir: &Ir) -> Vec<legion_plan::TileSpec> {
    let last = ir.stages.iter().take_while(|s| s.is_splittable()).count() - 1;
    let group = Group::new(0, last);
    let height = ir.stage(group.last).output.height().unwrap();
    let strips = strips_from_weights(height, &[1.0, 2.0, 1.0]);
    let tiling = tile(ir, group, &strips).unwrap();
    assert_eq!(tiling.tiles.len(), 3);
    tiling.tiles.iter().map(|d| d.spec()).collect()
}

fn status(e: &anyhow::Error) -> &tonic::Status {
    e.downcast_ref::<tonic::Status>()
        .unwrap_or_else(|| panic!("not a worker status: {e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_split_over_three_workers_equals_reference() {
    let (bytes, path) = model_bytes();
    let ir = import(&path, None).unwrap();
    let reference = Reference::run(&ir, input(&ir)).unwrap();
    let workers: Vec<TestWorker> = (0..3).map(|_| TestWorker::start(None)).collect();
    for (w, spec) in workers.iter().zip(three_tiles(&ir)) {
        let client = w.client(None).await;
        let (model, sent) = client.upload_model(&bytes, &ir.input.shape).await.unwrap();
        assert!(sent);
        assert_eq!(model.sha256, ir.sha256);
        let inputs: Vec<Tensor> = spec
            .inputs
            .iter()
            .map(|i| check::strip(&ir, &reference, i.tensor, i.rows).unwrap())
            .collect();
        for _ in 0..2 {
            let run = client.run_tile(&model, &spec, &inputs).await.unwrap();
            assert!(run.compute_us > 0);
            assert_eq!(
                run.compute_us, run.host_us,
                "a real worker's clock is the host's"
            );
            assert!(!run.emulated);
            let outputs = run.outputs;
            assert_eq!(outputs.len(), spec.outputs.len());
            for (out, got) in spec.outputs.iter().zip(&outputs) {
                let want =
                    check::strip(&ir, &reference, TensorRef::Stage(out.stage), out.rows).unwrap();
                assert_eq!(got.shape(), want.shape());
                let (got, want) = (
                    got.to_plain_array_view::<f32>().unwrap(),
                    want.to_plain_array_view::<f32>().unwrap(),
                );
                let scale = want.iter().fold(f32::MIN_POSITIVE, |m, v| m.max(v.abs()));
                let err = got
                    .iter()
                    .zip(want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err / scale < 1e-5,
                    "worker {}: relative error {}",
                    w.addr,
                    err / scale
                );
            }
        }
    }
}

#[tokio::test]
async fn info_health_and_probe() {
    let w = TestWorker::start(None);
    let client = w.client(None).await;
    client.health().await.unwrap();
    let info = client.info().await.unwrap();
    assert!(info.name.starts_with("worker"));
    assert_eq!(info.arch, std::env::consts::ARCH);
    assert!(info.cores >= 1);
    client.probe_transfer(3 << 20).await.unwrap();
}

#[tokio::test]
async fn second_upload_is_skipped() {
    let (bytes, path) = model_bytes();
    let ir = import(&path, None).unwrap();
    let w = TestWorker::start(None);
    let client = w.client(None).await;
    let (_, sent) = client.upload_model(&bytes, &ir.input.shape).await.unwrap();
    assert!(sent);
    let (_, sent) = client.upload_model(&bytes, &ir.input.shape).await.unwrap();
    assert!(!sent, "the cached model was sent again");
    // A forced re-upload is answered from the cache too.
    let id = ModelId {
        sha256: sha256_hex(&bytes),
        input_shape: vec![],
    };
    assert_eq!(client.upload_as(&id, &bytes).await.unwrap(), 0);
}

#[tokio::test]
async fn wrong_hash_is_rejected_and_the_worker_serves_on() {
    let (bytes, _) = model_bytes();
    let w = TestWorker::start(None);
    let client = w.client(None).await;
    let id = ModelId {
        sha256: sha256_hex(b"something else"),
        input_shape: vec![],
    };
    let e = client.upload_as(&id, &bytes).await.unwrap_err();
    assert_eq!(status(&e).code(), Code::InvalidArgument, "{e:#}");
    assert!(format!("{e:#}").contains(&id.sha256), "{e:#}");
    assert!(format!("{e:#}").contains(&w.addr), "{e:#}");
    // Not cached under the wrong name, and the right upload still works.
    let (_, sent) = client.upload_model(&bytes, &[]).await.unwrap();
    assert!(sent);
}

#[tokio::test]
async fn run_tile_errors_name_the_problem() {
    let (bytes, path) = model_bytes();
    let ir = import(&path, None).unwrap();
    let reference = Reference::run(&ir, input(&ir)).unwrap();
    let spec = three_tiles(&ir).remove(1);
    let inputs: Vec<Tensor> = spec
        .inputs
        .iter()
        .map(|i| check::strip(&ir, &reference, i.tensor, i.rows).unwrap())
        .collect();
    let w = TestWorker::start(None);
    let client = w.client(None).await;
    let model = ModelId {
        sha256: ir.sha256.clone(),
        input_shape: ir.input.shape.clone(),
    };

    let e = client.run_tile(&model, &spec, &inputs).await.unwrap_err();
    assert_eq!(status(&e).code(), Code::FailedPrecondition);
    assert!(
        status(&e)
            .message()
            .contains("not uploaded; upload it first"),
        "{e:#}"
    );

    client.upload_model(&bytes, &ir.input.shape).await.unwrap();
    let wrong = Tensor::zero::<f32>(&[1, 1, 1, 1]).unwrap();
    let e = client.run_tile(&model, &spec, &[wrong]).await.unwrap_err();
    assert_eq!(status(&e).code(), Code::InvalidArgument);
    let msg = status(&e).message();
    assert!(
        msg.contains("expected shape") && msg.contains("got [1, 1, 1, 1]"),
        "{msg}"
    );

    let short = RunTileRequest {
        model: Some(legion_runtime::proto::ModelRef {
            sha256: model.sha256.clone(),
            input_shape: vec![],
            tile: false,
        }),
        tile_spec_json: serde_json::to_vec(&spec).unwrap(),
        inputs: vec![F32Tensor {
            shape: inputs[0].shape().iter().map(|&d| d as u64).collect(),
            data: vec![0; 12],
        }],
    };
    let e = client.run_tile_raw(short).await.unwrap_err();
    assert_eq!(status(&e).code(), Code::InvalidArgument);
    assert!(status(&e).message().contains("bytes"), "{e:#}");

    let garbage = RunTileRequest {
        model: Some(legion_runtime::proto::ModelRef {
            sha256: model.sha256.clone(),
            input_shape: vec![],
            tile: false,
        }),
        tile_spec_json: b"{not json".to_vec(),
        inputs: vec![],
    };
    let e = client.run_tile_raw(garbage).await.unwrap_err();
    assert_eq!(status(&e).code(), Code::InvalidArgument);
    assert!(status(&e).message().contains("bad TileSpec JSON"), "{e:#}");

    let mut alien = spec.clone();
    alien.stages[0].stage = legion_ir::StageId(999);
    let e = client.run_tile(&model, &alien, &inputs).await.unwrap_err();
    assert_eq!(status(&e).code(), Code::InvalidArgument);
    assert!(status(&e).message().contains("999"), "{e:#}");

    // After all that, the worker still runs the tile.
    let run = client.run_tile(&model, &spec, &inputs).await.unwrap();
    assert_eq!(run.outputs.len(), spec.outputs.len());
}

#[tokio::test]
async fn token_is_required_when_the_worker_has_one() {
    let w = TestWorker::start(Some("s3cret"));
    let e = w.client(None).await.health().await.unwrap_err();
    assert_eq!(status(&e).code(), Code::Unauthenticated);
    assert!(status(&e).message().contains("missing"), "{e:#}");
    let e = w.client(Some("guess")).await.info().await.unwrap_err();
    assert_eq!(status(&e).code(), Code::Unauthenticated);
    assert!(status(&e).message().contains("wrong token"), "{e:#}");
    // The right token with more after it is wrong too.
    let e = w.client(Some("s3cret2")).await.health().await.unwrap_err();
    assert!(status(&e).message().contains("wrong token"), "{e:#}");
    w.client(Some("s3cret")).await.health().await.unwrap();
}

/// A message over the worker's limit, a model over its upload limit and one its cache
/// has no room for are refused, each naming its limit, and the worker serves on.
#[tokio::test]
async fn limits_refuse_oversized_messages_and_uploads_and_the_worker_serves_on() {
    let (bytes, path) = model_bytes();
    let ir = import(&path, None).unwrap();
    let model = bytes.len() as u64;
    let limits = Limits {
        message_bytes: 1 << 20,
        upload_bytes: model - 1,
        ..Limits::default()
    };
    let w = TestWorker::start_with(None, None, limits);
    let client = w.client(None).await;
    let e = client.probe_transfer(3 << 20).await.unwrap_err();
    assert!(
        status(&e).message().contains("too large"),
        "a 3 MiB message against a 1 MiB limit: {e:#}"
    );
    client.probe_transfer(512 << 10).await.unwrap();
    let e = client
        .upload_model(&bytes, &ir.input.shape)
        .await
        .unwrap_err();
    assert_eq!(status(&e).code(), Code::ResourceExhausted, "{e:#}");
    assert!(status(&e).message().contains("--max-upload-mb"), "{e:#}");
    client.health().await.unwrap();
    // Nothing of the refused upload stays in the cache.
    assert_eq!(std::fs::read_dir(&w.cache_dir).unwrap().count(), 0);

    let cache = Limits {
        cache_bytes: model - 1,
        ..Limits::default()
    };
    let w = TestWorker::start_with(None, None, cache);
    let client = w.client(None).await;
    let e = client
        .upload_model(&bytes, &ir.input.shape)
        .await
        .unwrap_err();
    assert_eq!(status(&e).code(), Code::ResourceExhausted, "{e:#}");
    assert!(status(&e).message().contains("--max-cache-mb"), "{e:#}");
    client.health().await.unwrap();
}

/// A worker serving TLS answers a client pinning its certificate with the token, and
/// refuses one without the token, a plain-text one and one pinning another certificate.
#[tokio::test]
async fn a_tls_worker_answers_only_clients_that_pin_its_certificate() {
    let mine = WorkerIdentity::generate(&["board".into()]).unwrap();
    let other = WorkerIdentity::generate(&["board".into()]).unwrap();
    let w = TestWorker::start_with(Some("s3cret"), Some(mine.clone()), Limits::default());
    let connect = |token: Option<&'static str>, pem: Option<String>| {
        let addr = w.addr.clone();
        async move {
            let client =
                WorkerClient::connect(&addr, token, pem.as_ref().map(|p| p.as_bytes()), TIMEOUT)
                    .await?;
            client.info().await
        }
    };
    let info = connect(Some("s3cret"), Some(mine.cert_pem.clone()))
        .await
        .unwrap();
    assert!(info.name.starts_with("worker"));
    let e = connect(None, Some(mine.cert_pem.clone()))
        .await
        .unwrap_err();
    assert_eq!(status(&e).code(), Code::Unauthenticated, "{e:#}");
    assert!(connect(Some("s3cret"), None).await.is_err(), "plain text");
    assert!(
        connect(Some("s3cret"), Some(other.cert_pem.clone()))
            .await
            .is_err(),
        "another certificate"
    );
    // It still serves the pinned client.
    connect(Some("s3cret"), Some(mine.cert_pem)).await.unwrap();
}

#[tokio::test]
async fn garbage_on_the_port_does_not_stop_the_worker() {
    use tokio::io::AsyncWriteExt;
    let w = TestWorker::start(None);
    let mut s = tokio::net::TcpStream::connect(&w.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xff garbage \x13\x37")
        .await
        .unwrap();
    drop(s);
    w.client(None).await.health().await.unwrap();
}

#[tokio::test]
async fn killed_worker_gives_a_timely_error_naming_it() {
    let mut w = TestWorker::start(None);
    let client = w.client(None).await;
    client.health().await.unwrap();
    w.kill();
    let start = Instant::now();
    let e = client.health().await.unwrap_err();
    assert!(start.elapsed() < TIMEOUT + Duration::from_secs(1));
    assert!(format!("{e:#}").contains(&w.addr), "{e:#}");
}

#[tokio::test]
async fn hung_worker_times_out_naming_it() {
    // Accepts connections (the kernel's backlog) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let timeout = Duration::from_millis(500);
    let start = Instant::now();
    let e = match WorkerClient::connect(&addr, None, None, timeout).await {
        Err(e) => e,
        Ok(client) => client.health().await.unwrap_err(),
    };
    assert!(start.elapsed() < 2 * timeout + Duration::from_secs(1));
    assert!(format!("{e:#}").contains(&addr), "{e:#}");
}

#[tokio::test]
async fn graceful_shutdown_ends_serve() {
    let mut w = TestWorker::start(None);
    w.client(None).await.health().await.unwrap();
    w.stop.take().unwrap().send(()).unwrap();
    w.done.take().unwrap().await.unwrap().unwrap();
}

#[tokio::test]
async fn rows_that_never_come_fail_the_program_naming_sender_tensor_and_rows() {
    use legion_plan::{Party, Program, Step};
    let (bytes, path) = model_bytes();
    let ir = import(&path, None).unwrap();
    let w = TestWorker::start(None);
    let client = w.client(None).await;
    let (model, _) = client.upload_model(&bytes, &ir.input.shape).await.unwrap();
    let spec = three_tiles(&ir)[1].clone();
    let wanted = spec.inputs[0];
    // The middle tile's input rows come from a board that never sends them.
    let program = Program {
        party: Party::Device("middle".into()),
        steps: vec![
            Step::Receive {
                tensor: wanted.tensor,
                rows: wanted.rows,
                channels: None,
                from: Party::Device("ghost".into()),
            },
            Step::Run {
                group: 0,
                tile: 0,
                phase: 0,
            },
        ],
    };
    // A program that runs a group it has no tile of is refused at load.
    let shapes = serde_json::to_vec(&ir.shapes()).unwrap();
    let none = ShippedTiles::build(&ir, vec![]).unwrap();
    let err = client
        .load_plan(&model, &shapes, &program, &none, vec![])
        .await
        .unwrap_err();
    assert!(
        status(&err)
            .message()
            .contains("runs tile 0 of group 0, which was not given"),
        "{err:#}"
    );
    let tiles = ShippedTiles::build(&ir, vec![(0, 0, spec.clone())]).unwrap();
    let id = client
        .load_plan(&model, &shapes, &program, &tiles, vec![])
        .await
        .unwrap();
    let started = Instant::now();
    let req = legion_runtime::proto::RunProgramRequest {
        program: id.clone(),
        inference: 7,
        inputs: vec![],
        receive_timeout_ms: 300,
        peer_programs: Default::default(),
    };
    let err = client
        .run_program(req, 1, Duration::from_secs(5))
        .await
        .unwrap_err();
    let s = status(&err);
    assert_eq!(s.code(), Code::DeadlineExceeded, "{err:#}");
    let want = format!(
        "middle: rows {} of input from ghost did not arrive",
        wanted.rows
    );
    assert!(s.message().contains(&want), "{}", s.message());
    assert!(started.elapsed() < Duration::from_secs(3));

    // Pushed rows are taken only where the program receives them, for a bounded
    // number of inferences that have not run.
    assert_eq!(wanted.tensor, TensorRef::Input);
    let mut shape: Vec<u64> = ir.input.shape.iter().map(|&d| d as u64).collect();
    shape[2] = wanted.rows.len() as u64;
    let elements: u64 = shape.iter().product();
    let push = |from: &str, inference: u64, end: usize| legion_runtime::proto::Rows {
        program: id.clone(),
        inference,
        from: from.into(),
        tensor: -1,
        start: wanted.rows.start as u64,
        end: end as u64,
        channels: None,
        partial: false,
        data: Some(F32Tensor {
            shape: {
                let mut s = shape.clone();
                s[2] = (end - wanted.rows.start) as u64;
                s
            },
            data: vec![0; (elements / shape[2] * (end - wanted.rows.start) as u64 * 4) as usize],
        }),
    };
    let err = client
        .push_rows(push("nobody", 1, wanted.rows.end))
        .await
        .unwrap_err();
    assert_eq!(status(&err).code(), Code::InvalidArgument, "{err:#}");
    assert!(
        status(&err).message().contains("receives no rows")
            && status(&err).message().contains("nobody"),
        "{err:#}"
    );
    let err = client
        .push_rows(push("ghost", 1, wanted.rows.end - 1))
        .await
        .unwrap_err();
    assert_eq!(status(&err).code(), Code::InvalidArgument, "{err:#}");
    for inference in 0..16 {
        client
            .push_rows(push("ghost", inference, wanted.rows.end))
            .await
            .unwrap();
    }
    let err = client
        .push_rows(push("ghost", 16, wanted.rows.end))
        .await
        .unwrap_err();
    assert_eq!(status(&err).code(), Code::ResourceExhausted, "{err:#}");

    // An inference whose rows are waiting runs; the board held its input rows and the
    // tile's output rows, and only those rows of each tensor.
    let reply = client
        .run_program(
            legion_runtime::proto::RunProgramRequest {
                program: id.clone(),
                inference: 3,
                inputs: vec![],
                receive_timeout_ms: 300,
                peer_programs: Default::default(),
            },
            1,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let held = ir.tensor(wanted.tensor).strip_bytes(wanted.rows)
        + spec
            .outputs
            .iter()
            .map(|o| ir.tensor(TensorRef::Stage(o.stage)).strip_bytes(o.rows))
            .sum::<u64>();
    assert_eq!(reply.peak_held_bytes, held);
    assert!(reply.outputs.is_empty());

    // In a stream, runs of several inferences go on at once: inference 20, whose rows
    // have not come, waits for them while inference 6 (its rows waiting) runs.
    let run = |inference, timeout_ms| legion_runtime::proto::RunProgramRequest {
        program: id.clone(),
        inference,
        inputs: vec![],
        receive_timeout_ms: timeout_ms,
        peer_programs: Default::default(),
    };
    let waiting = tokio::spawn({
        let client = client.clone();
        let req = run(20, 5000);
        async move { client.run_program(req, 1, Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let six = client
        .run_program(run(6, 300), 1, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(six.peak_held_bytes, held);
    assert!(!waiting.is_finished(), "inference 20 ran without its rows");
    client
        .push_rows(push("ghost", 20, wanted.rows.end))
        .await
        .unwrap();
    let twenty = waiting.await.unwrap().unwrap();
    assert_eq!(twenty.peak_held_bytes, held);
}

/// ProfileStage in rounds: a warm-up call runs the tile once untimed (no times back),
/// a timed call without a warm-up returns exactly its runs; a call that would run
/// nothing is refused.
#[tokio::test]
async fn profile_stage_warms_up_or_times_as_asked() {
    let (bytes, path) = model_bytes();
    let ir = import(&path, None).unwrap();
    let spec = three_tiles(&ir).remove(1);
    let w = TestWorker::start(None);
    let client = w.client(None).await;
    let (model, _) = client.upload_model(&bytes, &ir.input.shape).await.unwrap();

    let warm = client.profile_stage(&model, &spec, 0, true).await.unwrap();
    assert!(warm.compute_us.is_empty() && warm.host_us.is_empty());
    assert!(warm.warmup_us > 0);
    let timed = client.profile_stage(&model, &spec, 2, false).await.unwrap();
    assert_eq!((timed.compute_us.len(), timed.host_us.len()), (2, 2));
    assert_eq!(timed.warmup_us, 0);
    assert!(timed.compute_us.iter().all(|&us| us > 0));

    let e = client
        .profile_stage(&model, &spec, 0, false)
        .await
        .unwrap_err();
    assert_eq!(status(&e).code(), Code::InvalidArgument);
    assert!(
        status(&e).message().contains("or 0 with the warm-up run"),
        "{e:#}"
    );
}

/// A board runs its program from the tiles the coordinator built and shipped (NNEF):
/// the model itself never reaches it, and the outputs are exactly those of the tile
/// built from the model. tiny-cnn's max pool in ceil mode goes out as explicit pads.
/// A board keeping less than the program's tiles refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_runs_shipped_tiles_without_the_model() {
    use legion_plan::{Party, Program, Step};
    let (_, path) = model_bytes();
    let ir = import(&path, None).unwrap();
    let spec = three_tiles(&ir)[1].clone();
    assert!(
        spec.stages
            .iter()
            .any(|s| ir.stage(s.stage).name == "pool1"),
        "the tile holds the ceil-mode pool"
    );
    let w = TestWorker::start(None);
    let client = w.client(None).await;
    let model = ModelId {
        sha256: ir.sha256.clone(),
        input_shape: ir.input.shape.clone(),
    };
    let wanted = spec.inputs[0];
    let out = spec.outputs[0];
    let program = Program {
        party: Party::Device("middle".into()),
        steps: vec![
            Step::Receive {
                tensor: wanted.tensor,
                rows: wanted.rows,
                channels: None,
                from: Party::Coordinator,
            },
            Step::Run {
                group: 0,
                tile: 0,
                phase: 0,
            },
            Step::Send {
                tensor: TensorRef::Stage(out.stage),
                rows: out.rows,
                channels: None,
                to: Party::Coordinator,
            },
        ],
    };
    let shapes = serde_json::to_vec(&ir.shapes()).unwrap();
    let tiles = ShippedTiles::build(&ir, vec![(0, 0, spec.clone())]).unwrap();
    let id = client
        .load_plan(&model, &shapes, &program, &tiles, vec![])
        .await
        .unwrap();
    // The board's cache holds the tile's model and not the model (and the lock its
    // prunes take).
    let mut cached: Vec<String> = std::fs::read_dir(&w.cache_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name != ".tiles.lock")
        .collect();
    cached.sort();
    let tile_sha = sha256_hex(&tiles.phases[0][0]);
    assert_eq!(cached, vec![format!("{tile_sha}.nnef.tar")]);

    let reference = Reference::run(&ir, input(&ir)).unwrap();
    let strip = check::strip(&ir, &reference, wanted.tensor, wanted.rows).unwrap();
    let rows = legion_runtime::proto::Rows {
        program: id.clone(),
        inference: 1,
        from: String::new(),
        tensor: -1,
        start: wanted.rows.start as u64,
        end: wanted.rows.end as u64,
        channels: None,
        partial: false,
        data: Some(legion_runtime::to_wire(&strip).unwrap()),
    };
    let reply = client
        .run_program(
            legion_runtime::proto::RunProgramRequest {
                program: id,
                inference: 1,
                inputs: vec![rows],
                receive_timeout_ms: 1000,
                peer_programs: Default::default(),
            },
            1,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(reply.outputs.len(), 1);
    let got = legion_runtime::from_wire(reply.outputs[0].data.as_ref().unwrap()).unwrap();
    let built = legion_runtime::TileModel::build(&ir, &spec)
        .unwrap()
        .run(vec![strip])
        .unwrap();
    assert_eq!(got, built[0]);

    // A board that keeps fewer bytes of tiles than the program's refuses it.
    let small = Limits {
        tiles_bytes: 1024,
        ..Limits::default()
    };
    let w = TestWorker::start_with(None, None, small);
    let err = w
        .client(None)
        .await
        .load_plan(&model, &shapes, &program, &tiles, vec![])
        .await
        .unwrap_err();
    assert_eq!(status(&err).code(), Code::ResourceExhausted, "{err:#}");
    assert!(status(&err).message().contains("--max-tiles-mb"), "{err:#}");
}
