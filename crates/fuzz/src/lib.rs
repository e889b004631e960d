//! Fuzz targets: what users and the network hand Legion, mutated, must be read or
//! refused with an error, never panic (docs/architecture.md, "Fuzzing"). Each case
//! takes a valid seed (a committed model, plan, cluster file or profile, or an encoded
//! worker request) and applies 1-8 random edits: flipped, overwritten, inserted and
//! deleted bytes, or a cut. `tests/fuzz.rs` runs a few cases of every target;
//! `cargo xtask fuzz` runs many and writes bench/fuzz.md.

mod requests;

use anyhow::{Context, Result};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

/// What is fuzzed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// ONNX import of mutated bytes of tiny-cnn and tiny-yolo.
    Model,
    /// A plan's JSON, parsed, validated against its model, its traffic counted.
    Plan,
    /// A cluster file's TOML.
    Cluster,
    /// A profile's JSON, parsed, and a plan compiled from it.
    Profile,
    /// Every request type of the worker's gRPC service, its protobuf bytes mutated,
    /// sent to a worker in this process, which must answer Health after all of them.
    Requests,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 5] = [
        Target::Model,
        Target::Plan,
        Target::Cluster,
        Target::Profile,
        Target::Requests,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Target::Model => "onnx import",
            Target::Plan => "plan JSON",
            Target::Cluster => "cluster TOML",
            Target::Profile => "profile JSON",
            Target::Requests => "gRPC requests",
        }
    }
}

/// What a run of one target found.
#[derive(Clone, Debug)]
pub struct Report {
    /// The target.
    pub target: Target,
    /// Cases run.
    pub cases: u64,
    /// Cases whose input was read (or served) without an error.
    pub accepted: u64,
    /// Panics, with their message and place.
    pub panics: Vec<String>,
}

/// Panics caught while a target runs, from any thread (a worker's tasks included).
static PANICS: Mutex<Vec<String>> = Mutex::new(vec![]);

/// Records every panic in [`PANICS`], then hands it to the hook there was before.
fn record_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let what = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            let at = info
                .location()
                .map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
            if let Ok(mut p) = PANICS.lock() {
                p.push(format!("{what}{at}"));
            }
            before(info);
        }));
    });
}

/// Runs `cases` cases of `target` from `seed`.
pub fn fuzz(target: Target, cases: u64, seed: u64) -> Result<Report> {
    record_panics();
    PANICS.lock().map(|mut p| p.clear()).ok();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let accepted = match target {
        Target::Model => model(&mut rng, cases)?,
        Target::Plan => plan(&mut rng, cases)?,
        Target::Cluster => cluster(&mut rng, cases)?,
        Target::Profile => profile(&mut rng, cases)?,
        Target::Requests => requests::fuzz(&mut rng, cases)?,
    };
    let panics = PANICS
        .lock()
        .map(|mut p| p.drain(..).collect())
        .unwrap_or_default();
    Ok(Report {
        target,
        cases,
        accepted,
        panics,
    })
}

/// `bytes` with 1-8 random edits.
pub fn mutate(rng: &mut ChaCha8Rng, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let edits = 1 + rng.next_u64() % 8;
    for _ in 0..edits {
        if b.is_empty() {
            break;
        }
        let at = (rng.next_u64() % b.len() as u64) as usize;
        let byte = rng.next_u64() as u8;
        match rng.next_u64() % 5 {
            0 => b[at] ^= byte | 1,
            1 => b[at] = byte,
            2 => b.insert(at, byte),
            3 => {
                b.remove(at);
            }
            _ => b.truncate(at),
        }
    }
    b
}

/// A file under the repository's testdata/.
fn testdata(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(path)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the seed {}", path.display()))
}

/// A scratch file for inputs read from disk.
fn scratch(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("legion-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(name))
}

fn model(rng: &mut ChaCha8Rng, cases: u64) -> Result<u64> {
    let seeds = [
        read(&legion_models::test_model("tiny-cnn")?)?,
        read(&legion_models::test_model("tiny-yolo")?)?,
    ];
    let path = scratch("model.onnx")?;
    let mut accepted = 0;
    for case in 0..cases {
        let bytes = mutate(rng, &seeds[case as usize % seeds.len()]);
        std::fs::write(&path, bytes)?;
        accepted += u64::from(legion_ir::import(&path, None).is_ok());
    }
    Ok(accepted)
}

/// The committed tiny-cnn profile of the 2F+2O cluster, its cluster and model.
fn tiny_cnn_setup() -> Result<(legion_ir::Ir, legion_plan::Cluster, Vec<u8>)> {
    let ir = legion_ir::import(&legion_models::test_model("tiny-cnn")?, None)?;
    let cluster = legion_plan::Cluster::load(&testdata("clusters/2f2o.toml"))?;
    let profile = read(&testdata("profiles/tiny-cnn-2f2o.json"))?;
    Ok((ir, cluster, profile))
}

/// Groups of `ir` for `devices`: its splittable prefix split by rows over all of them,
/// the rest whole on the first.
fn seed_groups(ir: &legion_ir::Ir, devices: &[String]) -> Result<Vec<legion_plan::PlanGroup>> {
    use legion_partition::{Group, strips_from_weights, tile, whole_group};
    let n = ir.stages.len();
    let split = ir.stages.iter().take_while(|s| s.is_splittable()).count();
    let tile_of = legion_plan::PlanTile::unpredicted;
    let mut groups = vec![];
    if split > 0 {
        let group = Group::new(0, split - 1);
        let height = ir.stage(group.last).output.height().unwrap_or(1);
        let tiling = tile(
            ir,
            group,
            &strips_from_weights(height, &vec![1.0; devices.len()]),
        )?;
        groups.push(legion_plan::PlanGroup {
            first: group.first,
            last: group.last,
            split: true,
            channels: false,
            predicted_us: 0,
            tiles: tiling
                .tiles
                .iter()
                .map(|t| tile_of(&devices[t.slot], t.strip, t.spec()))
                .collect(),
        });
    }
    if split < n {
        let group = Group::new(split, n - 1);
        let rows = legion_ir::Rows::new(0, ir.stage(group.last).output.height().unwrap_or(0));
        groups.push(legion_plan::PlanGroup {
            first: group.first,
            last: group.last,
            split: false,
            channels: false,
            predicted_us: 0,
            tiles: vec![tile_of(&devices[0], rows, whole_group(ir, group))],
        });
    }
    Ok(groups)
}

/// A plan of `ir` on `devices` ([`seed_groups`]), as JSON.
fn seed_plan(ir: &legion_ir::Ir, devices: &[String]) -> Result<Vec<u8>> {
    let groups = seed_groups(ir, devices)?;
    let candidate = legion_plan::Candidate {
        name: "seed".into(),
        predicted_us: 0,
        measured_us: None,
        programs: legion_codegen::programs(ir, devices, &groups),
        groups,
    };
    let chosen = legion_codegen::Chosen {
        index: 0,
        reason: "the only one".into(),
    };
    let plan = legion_codegen::plan(ir, devices, "fuzz", vec![candidate], chosen);
    legion_codegen::validate(&plan, ir, Some(devices))?;
    Ok(plan.to_json().into_bytes())
}

fn plan(rng: &mut ChaCha8Rng, cases: u64) -> Result<u64> {
    let (ir, cluster, _) = tiny_cnn_setup()?;
    let names: Vec<String> = cluster.devices.iter().map(|d| d.name.clone()).collect();
    let seed = seed_plan(&ir, &names)?;
    let mut accepted = 0;
    for _ in 0..cases {
        let text = String::from_utf8_lossy(&mutate(rng, &seed)).into_owned();
        if let Ok(plan) = legion_plan::Plan::from_json(&text)
            && legion_codegen::validate(&plan, &ir, None).is_ok()
        {
            let _ = legion_codegen::traffic(&ir, plan.chosen());
            accepted += 1;
        }
    }
    Ok(accepted)
}

fn cluster(rng: &mut ChaCha8Rng, cases: u64) -> Result<u64> {
    let seed = read(&testdata("clusters/3f3o.toml"))?;
    let path = scratch("cluster.toml")?;
    let mut accepted = 0;
    for _ in 0..cases {
        std::fs::write(&path, mutate(rng, &seed))?;
        accepted += u64::from(legion_plan::Cluster::load(&path).is_ok());
    }
    Ok(accepted)
}

fn profile(rng: &mut ChaCha8Rng, cases: u64) -> Result<u64> {
    let (_, _, seed) = tiny_cnn_setup()?;
    let mut accepted = 0;
    for _ in 0..cases {
        let text = String::from_utf8_lossy(&mutate(rng, &seed)).into_owned();
        accepted += u64::from(legion_plan::Profile::from_json(&text).is_ok());
    }
    Ok(accepted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_anywhere_is_recorded_even_when_caught() {
        record_panics();
        let caught = std::panic::catch_unwind(|| panic!("fuzz-probe"));
        assert!(caught.is_err());
        let seen = PANICS
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.contains("fuzz-probe"));
        assert!(seen, "the hook records panics");
    }

    #[test]
    fn mutations_edit_and_stay_reproducible() {
        let seed = b"the seed bytes of some file".to_vec();
        let run = |s| {
            let mut rng = ChaCha8Rng::seed_from_u64(s);
            (0..50).map(|_| mutate(&mut rng, &seed)).collect::<Vec<_>>()
        };
        let (a, b) = (run(3), run(3));
        assert_eq!(a, b, "the same seed, the same cases");
        assert!(a.iter().all(|m| *m != seed), "every case is edited");
    }
}
