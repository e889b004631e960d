//! The worker's gRPC requests, mutated: each request type's valid protobuf bytes (for
//! tiny-cnn, uploaded first) get random edits and go, as they are, to the method's path
//! on a worker serving in this process, which decodes them itself; every 16th case
//! writes random bytes, or the HTTP/2 preface and random bytes, on a new connection to
//! its port instead. The worker must answer Health after all of them.

use crate::mutate;
use anyhow::{Context, Result};
use bytes::{Buf, BufMut};
use legion_plan::{Party, TileSpec};
use legion_runtime::proto::{
    self, F32Tensor, LoadPlanRequest, ModelChunk, ModelRef, ProbeRequest, ProfileStageRequest,
    RunProgramRequest, RunTileRequest,
};
use legion_runtime::{Compute, Limits, Worker, WorkerClient, WorkerConfig, sha256_hex};
use prost::Message;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::RngCore;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// How long one mutated call may take before the next is sent.
const CALL: Duration = Duration::from_secs(3);

/// The seeds: each request type's valid message.
struct Seeds {
    upload: ModelChunk,
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
            tile: false,
        };
        debug_assert_eq!(model.sha256, sha256_hex(&onnx));
        let seeds = seeds(&ir, model, &client).await?;
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .context("connecting to the worker")?;
        let mut accepted = 0;
        for case in 0..cases {
            accepted += u64::from(match case % 16 {
                15 => garbage(&addr, rng).await,
                _ => one(&channel, &seeds, rng, case).await,
            });
        }
        client
            .health()
            .await
            .context("the worker no longer answers Health after the fuzzed requests")?;
        Ok::<_, anyhow::Error>(accepted)
    });
    let _ = stop.send(());
    let _ = rt.block_on(served);
    result
}

/// Sends case `case`'s request (the seeds in turn), mutated, as raw bytes to its
/// method; true when the worker served it.
async fn one(channel: &Channel, seeds: &Seeds, rng: &mut ChaCha8Rng, case: u64) -> bool {
    let (method, seed) = match case % 8 {
        0 => ("HasModel", seeds.has_model.encode_to_vec()),
        1 => ("RunTile", seeds.run_tile.encode_to_vec()),
        2 => ("ProfileStage", seeds.profile.encode_to_vec()),
        3 => ("LoadPlan", seeds.load_plan.encode_to_vec()),
        4 => ("RunProgram", seeds.run_program.encode_to_vec()),
        5 => ("PushRows", seeds.push_rows.encode_to_vec()),
        6 => ("UploadModel", seeds.upload.encode_to_vec()),
        _ => ("ProbeTransfer", seeds.probe.encode_to_vec()),
    };
    let body = mutate(rng, &seed);
    let path =
        PathAndQuery::try_from(format!("/legion.v1.Worker/{method}")).expect("a method's path");
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let call = async {
        grpc.ready().await.ok()?;
        match method {
            "UploadModel" => {
                let chunks = tonic::codegen::tokio_stream::iter([body]);
                let request = tonic::Request::new(chunks);
                grpc.client_streaming(request, path, RawBytes).await.ok()
            }
            _ => grpc
                .unary(tonic::Request::new(body), path, RawBytes)
                .await
                .ok(),
        }
    };
    matches!(tokio::time::timeout(CALL, call).await, Ok(Some(_)))
}

/// Writes random bytes, or the HTTP/2 preface and random bytes, on a new connection to
/// `addr`, and reads what comes back for a moment; never served.
async fn garbage(addr: &str, rng: &mut ChaCha8Rng) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut bytes = match rng.next_u32() % 2 {
        0 => PREFACE.to_vec(),
        _ => vec![],
    };
    let mut tail = vec![0; 1 + (rng.next_u32() % 4096) as usize];
    rng.fill_bytes(&mut tail);
    bytes.extend(tail);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(&bytes).await.ok()?;
        let mut reply = [0; 1024];
        let _ = stream.read(&mut reply).await;
        Some(())
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), exchange).await;
    false
}

/// A request body sent and a reply received as bytes: the worker decodes them itself.
#[derive(Clone, Copy)]
struct RawBytes;

impl Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
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
    let tiles = legion_runtime::ShippedTiles::build(ir, tiles)?;
    let id = legion_runtime::ModelId {
        sha256: model.sha256.clone(),
        input_shape: ir.input.shape.clone(),
    };
    let shapes = serde_json::to_vec(&ir.shapes())?;
    let load_plan = client
        .plan_request(&id, &shapes, program, &tiles, vec![])
        .await?;
    let id = client
        .load_plan(&id, &shapes, program, &tiles, vec![])
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
    let onnx = legion_models::bytes("tiny-cnn")?;
    Ok(Seeds {
        upload: ModelChunk {
            model: Some(model.clone()),
            data: onnx[..onnx.len().min(4096)].to_vec(),
        },
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
