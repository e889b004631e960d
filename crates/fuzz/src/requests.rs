//! The worker's gRPC requests, mutated: each request type's valid protobuf bytes (for
//! tiny-cnn, uploaded first) get random edits; those that still decode go to a worker
//! serving in this process, which must answer Health after all of them.

use crate::mutate;
use anyhow::{Context, Result};
use legion_plan::{Party, TileSpec};
use legion_runtime::proto::worker_client::WorkerClient as Raw;
use legion_runtime::proto::{
    self, F32Tensor, HealthRequest, LoadPlanRequest, ModelRef, ProbeRequest, ProfileStageRequest,
    RunProgramRequest, RunTileRequest,
};
use legion_runtime::{Compute, Limits, Worker, WorkerClient, WorkerConfig, sha256_hex};
use prost::Message;
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// How long one mutated call may take before the next is sent.
const CALL: Duration = Duration::from_secs(3);

/// The seeds: each request type's valid message.
struct Seeds {
    has_model: ModelRef,
    run_tile: RunTileRequest,
    profile: ProfileStageRequest,
    load_plan: LoadPlanRequest,
    run_program: RunProgramRequest,
    push_rows: proto::Rows,
    probe: ProbeRequest,
}

pub(crate) fn fuzz(rng: &mut ChaCha8Rng, cases: u64) -> Result<u64> {
    let rt = tokio::runtime::Runtime::new()?;
    let onnx = legion_models::bytes("tiny-cnn")?;
    let model_path = legion_models::test_model("tiny-cnn")?;
    let ir = legion_ir::import(&model_path, None)?;
    let cache = crate::scratch("worker-cache")?;
    let worker = Worker::new(WorkerConfig {
        name: "fuzz".into(),
        cache_dir: cache,
        token: None,
        tls: None,
        limits: Limits::default(),
        compute: Compute::Real { gflops: 1.0 },
    })?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = rt.spawn(worker.serve(listener, async {
        let _ = stopped.await;
    }));
    let result = rt.block_on(async {
        let client = WorkerClient::connect(&addr, None, None, CALL).await?;
        let (id, _) = client.upload_model(&onnx, &ir.input.shape).await?;
        let model = ModelRef {
            sha256: id.sha256.clone(),
            input_shape: ir.input.shape.iter().map(|&d| d as u64).collect(),
        };
        debug_assert_eq!(model.sha256, sha256_hex(&onnx));
        let seeds = seeds(&ir, model, &client).await?;
        let mut raw = Raw::connect(format!("http://{addr}"))
            .await
            .context("connecting to the worker")?
            .max_decoding_message_size(1 << 30);
        let mut accepted = 0;
        for case in 0..cases {
            accepted += u64::from(one(&mut raw, &seeds, rng, case).await);
        }
        raw.health(HealthRequest {})
            .await
            .context("the worker no longer answers Health after the fuzzed requests")?;
        Ok::<_, anyhow::Error>(accepted)
    });
    let _ = stop.send(());
    let _ = rt.block_on(served);
    result
}

/// Sends case `case`'s request (the seeds in turn), mutated; true when it decoded and
/// the worker served it.
async fn one(
    raw: &mut Raw<tonic::transport::Channel>,
    seeds: &Seeds,
    rng: &mut ChaCha8Rng,
    case: u64,
) -> bool {
    macro_rules! send {
        ($seed:expr, $ty:ty, $call:ident) => {{
            let bytes = mutate(rng, &$seed.encode_to_vec());
            match <$ty>::decode(&bytes[..]) {
                Ok(req) => matches!(tokio::time::timeout(CALL, raw.$call(req)).await, Ok(Ok(_))),
                Err(_) => false,
            }
        }};
    }
    match case % 7 {
        0 => send!(seeds.has_model, ModelRef, has_model),
        1 => send!(seeds.run_tile, RunTileRequest, run_tile),
        2 => send!(seeds.profile, ProfileStageRequest, profile_stage),
        3 => send!(seeds.load_plan, LoadPlanRequest, load_plan),
        4 => send!(seeds.run_program, RunProgramRequest, run_program),
        5 => send!(seeds.push_rows, proto::Rows, push_rows),
        _ => send!(seeds.probe, ProbeRequest, probe_transfer),
    }
}

/// The zeros of `shape` as the wire carries them.
fn zeros(shape: &[usize]) -> F32Tensor {
    F32Tensor {
        shape: shape.iter().map(|&d| d as u64).collect(),
        data: vec![0; 4 * shape.iter().product::<usize>()],
    }
}

async fn seeds(ir: &legion_ir::Ir, model: ModelRef, client: &WorkerClient) -> Result<Seeds> {
    let first = legion_partition::whole_group(ir, legion_partition::Group::new(0, 0));
    let spec_json = serde_json::to_vec(&first)?;
    let devices = vec!["fuzz".to_string()];
    let groups = crate::seed_groups(ir, &devices)?;
    let programs = legion_codegen::programs(ir, &devices, &groups);
    let program = programs
        .iter()
        .find(|p| p.party == Party::Device("fuzz".into()))
        .context("a program for the board")?;
    let tiles: Vec<(usize, usize, TileSpec)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, group)| {
            group
                .tiles
                .iter()
                .enumerate()
                .map(move |(k, t)| (g, k, t.tile.clone()))
        })
        .collect();
    let load_plan = LoadPlanRequest {
        model: Some(model.clone()),
        plan_version: legion_plan::PLAN_VERSION,
        program_json: serde_json::to_vec(program)?,
        tiles_json: serde_json::to_vec(&tiles)?,
        peers: vec![],
    };
    let id = client
        .load_plan(
            &legion_runtime::ModelId {
                sha256: model.sha256.clone(),
                input_shape: ir.input.shape.clone(),
            },
            program,
            &tiles,
            vec![],
        )
        .await?;
    let input_rows = proto::Rows {
        program: String::new(),
        inference: 1,
        from: String::new(),
        tensor: -1,
        start: 0,
        end: ir.input.height().unwrap_or(1) as u64,
        data: Some(zeros(&ir.input.shape)),
        channels: None,
        partial: false,
    };
    Ok(Seeds {
        has_model: model.clone(),
        run_tile: RunTileRequest {
            model: Some(model.clone()),
            tile_spec_json: spec_json.clone(),
            inputs: vec![zeros(&ir.input.shape)],
        },
        profile: ProfileStageRequest {
            model: Some(model),
            tile_spec_json: spec_json,
            runs: 1,
            skip_warmup: false,
        },
        load_plan,
        run_program: RunProgramRequest {
            program: id.clone(),
            inference: 1,
            inputs: vec![input_rows.clone()],
            receive_timeout_ms: 200,
            peer_programs: Default::default(),
        },
        push_rows: proto::Rows {
            program: id,
            ..input_rows
        },
        probe: ProbeRequest {
            payload: vec![7; 1024],
        },
    })
}
