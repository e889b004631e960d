//! The worker cross-built for the boards, run under qemu-user: an aarch64 worker
//! (Firefly-RK3399 class) and an armv7 worker (Odroid-XU4 class) serve tiles next to an
//! x86 worker, and groups split across the three equal the x86 single-device run. Then
//! the two ARM workers run their programs of a plan and pass rows to each other, the
//! x86 coordinator only feeding the input and collecting the output.
//!
//! Every worker serves TLS with a certificate of its own and wants a token; the cluster
//! pins the certificates, so the boards' pushes to each other go over TLS too.
//!
//! The workers run on the real clock, as on a board: an emulated worker runs each tile
//! several times until its time settles and reads a reference kernel every second,
//! which under qemu takes minutes per tile.
//!
//! Needs the cross-built workers (`cargo xtask cross aarch64` and `armv7`) and
//! qemu-user-static; `.ci/run` installs both and runs this test with `--ignored`.

mod common;

use common::scratch;
use legion_ir::{Ir, StageId, TensorRef, import};
use legion_partition::{Group, strips_from_weights, tile};
use legion_plan::{
    Candidate, Cluster, CoordinatorLink, Device, DeviceId, Party, PlanGroup, PlanTile, Step,
    TileSpec, Transport,
};
use legion_runtime::check::{compare, test_input};
use legion_runtime::process::WorkerProcess;
use legion_runtime::{Coordinator, Reference, Tensors, run_candidate};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// (target triple, qemu runner, its sysroot, the board's name, arch the worker reports).
const BOARDS: [(&str, &str, &str, &str, &str); 2] = [
    (
        "aarch64-unknown-linux-gnu",
        "qemu-aarch64-static",
        "/usr/aarch64-linux-gnu",
        "firefly-aarch64",
        "aarch64",
    ),
    (
        "armv7-unknown-linux-gnueabihf",
        "qemu-arm-static",
        "/usr/arm-linux-gnueabihf",
        "odroid-armv7",
        "arm",
    ),
];

/// Across architectures the kernels accumulate in other orders (docs/architecture.md, "The runtime").
const REL_TOLERANCE: f32 = 1e-4;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// The token every worker of this test wants.
fn token_file() -> PathBuf {
    let path = scratch("qemu-tls").join("token");
    std::fs::write(&path, "qemu-s3cret\n").unwrap();
    path
}

/// Where worker `name`'s certificate is.
fn cert(name: &str) -> PathBuf {
    scratch("qemu-tls").join(format!("{name}.pem"))
}

/// Makes worker `name` a certificate and has `command` serve TLS with it and want the
/// token: the coordinator and the boards reach each other by pinned certificates.
fn secure(command: &mut Command, name: &str) {
    let identity = legion_runtime::tls::WorkerIdentity::generate(&[name.to_string()]).unwrap();
    let key = scratch("qemu-tls").join(format!("{name}.key"));
    std::fs::write(cert(name), &identity.cert_pem).unwrap();
    std::fs::write(&key, &identity.key_pem).unwrap();
    command
        .arg("--tls-cert")
        .arg(cert(name))
        .arg("--tls-key")
        .arg(key)
        .arg("--token-file")
        .arg(token_file());
}

/// Starts the cross-built worker for `triple` under qemu on a free loopback port, as
/// `name`.
fn arm_worker(triple: &str, qemu: &str, sysroot: &str, name: &str) -> WorkerProcess {
    let binary = target_dir()
        .join(triple)
        .join("release")
        .join("legion-worker");
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo xtask cross {}`",
        binary.display(),
        triple.split('-').next().unwrap()
    );
    let mut command = Command::new(qemu);
    command
        .args(["-L", sysroot])
        .arg(&binary)
        .args(["--listen", "127.0.0.1:0", "--name", name])
        // Measuring the device's rate would take minutes under qemu; the rate only
        // feeds profiles, which this test does not make.
        .args(["--host-gflops", "100"])
        .arg("--cache")
        .arg(scratch(&format!("qemu-cache-{triple}")));
    secure(&mut command, name);
    WorkerProcess::spawn(command, triple, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{triple} worker under {qemu}: {e:#}"))
}

fn x86_worker() -> WorkerProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_legion"));
    command
        .args(["worker", "--listen", "127.0.0.1:0", "--name", "x86"])
        .args(["--host-gflops", "100", "--cache"])
        .arg(scratch("qemu-cache-x86"));
    secure(&mut command, "x86");
    WorkerProcess::spawn(command, "x86", Duration::from_secs(60)).unwrap()
}

/// The cluster of real-clock `workers`: (name, process), each pinning its worker's
/// certificate.
fn cluster(workers: &[(&str, &WorkerProcess)]) -> Cluster {
    Cluster {
        coordinator: CoordinatorLink::default(),
        token_file: Some(token_file()),
        devices: workers
            .iter()
            .map(|(name, w)| Device {
                name: name.to_string(),
                address: w.addr.clone(),
                emulate: None,
                class: None,
                link_mbps: 100.0,
                latency_ms: 0.2,
                memory_mb: None,
                tls_cert: Some(cert(name)),
            })
            .collect(),
    }
}

/// Runs `groups` of `model` split in equal strips over the coordinator's devices and
/// returns the worst relative error of each group's last output against the x86 run.
fn split_run(
    rt: &tokio::runtime::Runtime,
    coord: &mut Coordinator,
    model: &str,
    groups: &[(usize, usize)],
) -> f32 {
    let path = legion_models::test_model(model).unwrap();
    let ir: Ir = import(&path, None).unwrap();
    rt.block_on(coord.upload(&std::fs::read(&path).unwrap(), &ir.input.shape))
        .unwrap();
    let input = test_input(&ir.input.shape);
    let reference = Reference::run(&ir, input.clone()).unwrap();
    let mut tensors = Tensors::new(&ir, input).unwrap();
    let devices = coord.devices().len();
    let mut worst = 0.0f32;
    for &(first, last) in groups {
        let group = Group::new(first, last);
        let height = ir.stage(group.last).output.height().unwrap();
        let tiling = tile(
            &ir,
            group,
            &strips_from_weights(height, &vec![1.0; devices]),
        )
        .unwrap();
        assert_eq!(
            tiling.tiles.len(),
            devices,
            "{model} {group}: every device works"
        );
        let tiles: Vec<(DeviceId, TileSpec)> = tiling
            .tiles
            .iter()
            .map(|t| (DeviceId(t.slot), t.spec()))
            .collect();
        rt.block_on(coord.run_step(&tiles, &mut tensors))
            .unwrap_or_else(|e| panic!("{model} group {group}: {e:#}"));
        let r = TensorRef::Stage(StageId(last as u32));
        let diff = compare(
            tensors.whole(r).unwrap(),
            reference.tensor(r),
            reference.tensor(r),
        )
        .unwrap();
        eprintln!(
            "{model} group {group} over aarch64 + armv7 + x86: max abs error {:.3e}, relative {:.3e}",
            diff.max_abs, diff.max_rel
        );
        assert!(
            diff.within(REL_TOLERANCE),
            "{model} group {group}: {diff:?} against the x86 run"
        );
        worst = worst.max(diff.max_rel);
    }
    worst
}

/// Runs `model` (uploaded) as `groups`, each split in equal strips over `boards`, by
/// the boards' programs; returns the relative error of the output against the x86 run
/// and the rows the boards passed to each other.
fn programs_run(
    rt: &tokio::runtime::Runtime,
    coord: &Coordinator,
    model: &str,
    groups: &[(usize, usize)],
    boards: &[&str],
) -> (f32, usize) {
    let path = legion_models::test_model(model).unwrap();
    let ir: Ir = import(&path, None).unwrap();
    let names: Vec<String> = coord
        .devices()
        .iter()
        .map(|d| d.name().to_string())
        .collect();
    let groups: Vec<PlanGroup> = groups
        .iter()
        .map(|&(first, last)| {
            let group = Group::new(first, last);
            let height = ir.stage(group.last).output.height().unwrap();
            let tiling = tile(
                &ir,
                group,
                &strips_from_weights(height, &vec![1.0; boards.len()]),
            )
            .unwrap();
            PlanGroup {
                first: group.first,
                last: group.last,
                split: true,
                channels: false,
                predicted_us: 0,
                tiles: tiling
                    .tiles
                    .iter()
                    .map(|t| PlanTile::unpredicted(boards[t.slot], t.strip, t.spec()))
                    .collect(),
            }
        })
        .collect();
    let programs = legion_codegen::programs(&ir, &names, &groups);
    let passed = programs
        .iter()
        .flat_map(|p| &p.steps)
        .filter(|s| {
            matches!(
                s,
                Step::Send {
                    to: Party::Device(_),
                    ..
                }
            )
        })
        .count();
    let candidate = Candidate {
        name: "qemu".into(),
        predicted_us: 0,
        measured_us: None,
        groups,
        programs,
    };
    let input = test_input(&ir.input.shape);
    let reference = Reference::run(&ir, input.clone()).unwrap();
    let run = rt
        .block_on(run_candidate(
            coord,
            &ir,
            &candidate,
            input,
            Transport::Programs,
        ))
        .unwrap_or_else(|e| panic!("{model} by the boards' programs: {e:#}"));
    let out = ir.outputs[0];
    let diff = compare(
        &run.outputs[0],
        reference.tensor(out),
        reference.tensor(out),
    )
    .unwrap();
    assert!(
        diff.within(REL_TOLERANCE),
        "{model} by the programs of {boards:?}: {diff:?} against the x86 run"
    );
    (diff.max_rel, passed)
}

#[test]
#[ignore = "needs `cargo xtask cross aarch64|armv7` and qemu-user-static; .ci/run runs it"]
fn arm_workers_under_qemu_match_the_x86_run() {
    let arm: Vec<WorkerProcess> = BOARDS
        .iter()
        .map(|&(triple, qemu, sysroot, name, arch)| {
            let w = arm_worker(triple, qemu, sysroot, name);
            assert!(
                w.start_line.contains(&format!("arch=\"{arch}\""))
                    && w.start_line.contains("clock=\"real\""),
                "{triple}: {}",
                w.start_line
            );
            w
        })
        .collect();
    let x86 = x86_worker();
    let cluster = cluster(&[
        (BOARDS[0].3, &arm[0]),
        (BOARDS[1].3, &arm[1]),
        ("x86", &x86),
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut coord = rt
        .block_on(Coordinator::connect(&cluster, Duration::from_secs(60)))
        .unwrap();
    // tiny-cnn whole in two groups; VGG-16's first block (conv1_1, conv1_2, pool1) as one.
    let tiny = split_run(&rt, &mut coord, "tiny-cnn", &[(0, 3), (4, 6)]);
    let vgg = split_run(&rt, &mut coord, "vgg16-conv", &[(0, 2)]);
    eprintln!("worst relative error: tiny-cnn {tiny:.3e}, VGG-16 block 1 {vgg:.3e}");
    // The two ARM boards run tiny-cnn by their programs: the rows between the groups go
    // from one board to the other.
    rt.block_on(
        coord.upload(
            &std::fs::read(legion_models::test_model("tiny-cnn").unwrap()).unwrap(),
            &import(&legion_models::test_model("tiny-cnn").unwrap(), None)
                .unwrap()
                .input
                .shape,
        ),
    )
    .unwrap();
    let (rel, passed) = programs_run(
        &rt,
        &coord,
        "tiny-cnn",
        &[(0, 3), (4, 6)],
        &["firefly-aarch64", "odroid-armv7"],
    );
    assert!(passed > 0, "the boards passed no rows to each other");
    eprintln!(
        "tiny-cnn by the programs of aarch64 + armv7 ({passed} sends between them): \
         relative error {rel:.3e}"
    );
}
