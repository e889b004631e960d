//! Reaching a cluster: connect and upload, profile, and profiles cut to some boards.

use crate::{BadInput, CompileOptions};
use anyhow::{Context, Result};
use legion_ir::Ir;
use legion_plan::{Cluster, DeviceId, Profile, ProfileMode};
use legion_profile::ProfileOptions;
use legion_runtime::Coordinator;
use std::time::Duration;

/// How long connecting to each worker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the workers of `cluster` (named `cluster_name` in errors) and uploads the
/// model `onnx` (named `model_name` in messages), whose import is `ir`.
pub async fn connect(
    cluster: &Cluster,
    cluster_name: &str,
    onnx: &[u8],
    model_name: &str,
    ir: &Ir,
) -> Result<Coordinator> {
    let mut coord = Coordinator::connect(cluster, CONNECT_TIMEOUT)
        .await
        .with_context(|| format!("connecting to the cluster {cluster_name}"))?;
    eprintln!(
        "uploading {model_name} ({:.1} MB) to {} devices...",
        onnx.len() as f64 / 1e6,
        coord.devices().len()
    );
    coord.upload(onnx, &ir.input.shape).await?;
    Ok(coord)
}

/// Profiles `ir` on the connected cluster (the profile pass). Profiling imports the
/// whole model on every board, so a board whose `memory_mb` cannot hold its weights is
/// refused before anything runs (it would run out of memory).
pub async fn profile(coord: &Coordinator, ir: &Ir, opts: &ProfileOptions) -> Result<Profile> {
    let weights = ir.total_weight_bytes();
    let small: Vec<String> = coord
        .devices()
        .iter()
        .filter(|d| d.device.memory_mb.is_some_and(|mb| weights > mb << 20))
        .map(|d| format!("{} ({} MiB)", d.name(), d.device.memory_mb.unwrap_or(0)))
        .collect();
    if !small.is_empty() {
        return Err(crate::BadInput(format!(
            "profiling imports the whole model on every board, {} MiB of weights, more than \
             the memory_mb of {}; profile boards of the same classes and names with more \
             memory and compile with that profile (a plan ships each board only its tiles)",
            weights >> 20,
            small.join(", ")
        ))
        .into());
    }
    legion_profile::profile(coord, ir, opts).await
}

/// Profiles `ir` in fss mode on the connected cluster: every choice of the cost table
/// Legion searches from the legion profile `legion` with `options`
/// ([`crate::fss_choices`]), measured through the hub in `runs` timed rounds. The
/// profile names `legion` as the one it was costed from.
pub async fn profile_fss(
    coord: &Coordinator,
    ir: &Ir,
    legion: &Profile,
    options: &CompileOptions,
    runs: u32,
    progress: bool,
) -> Result<Profile> {
    if legion.mode != ProfileMode::Legion {
        return Err(BadInput(format!(
            "{} was measured in {} mode; fss measures the choices costed from a legion-mode \
             profile",
            options.profile_name, legion.mode
        ))
        .into());
    }
    let boards = boards_of(legion, coord.cluster())
        .map_err(|e| BadInput(format!("{}: {e:#}", options.profile_name)))?;
    let choices = crate::fss_choices(ir, &boards, coord.cluster(), options)?;
    let opts = ProfileOptions {
        mode: ProfileMode::Fss,
        runs,
        max_group_len: options.max_group_len,
        choices,
        progress,
        each_board: false,
    };
    let mut fss = profile(coord, ir, &opts).await?;
    fss.costed_from = Some(legion.sha256());
    Ok(fss)
}

/// `profile` cut down to the boards of `cluster`, in the cluster's order. A legion
/// profile holds each board's own samples (single stages, measured on it or on boards
/// of its class) and its link, so a board's part does not depend on the others; an fss
/// profile measured groups across all its boards and cannot be cut.
pub fn boards_of(profile: &Profile, cluster: &Cluster) -> Result<Profile> {
    if profile.mode == ProfileMode::Fss && profile.devices.len() != cluster.devices.len() {
        return Err(BadInput(
            "an fss profile measured groups across all its boards and cannot be cut down \
             to some of them; profile this cluster in fss mode"
                .into(),
        )
        .into());
    }
    let ids: Vec<DeviceId> = cluster
        .devices
        .iter()
        .map(|d| {
            profile.device_id(&d.name).ok_or_else(|| {
                BadInput(format!(
                    "board {} of the cluster is not in the profile; profile it",
                    d.name
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let mut cut = profile.clone();
    cut.devices = ids
        .iter()
        .map(|d| profile.devices[d.index()].clone())
        .collect();
    for stage in &mut cut.stages {
        stage.samples = ids
            .iter()
            .map(|d| stage.samples[d.index()].clone())
            .collect();
        if !stage.channel_samples.is_empty() {
            stage.channel_samples = ids
                .iter()
                .map(|d| stage.channel_samples[d.index()].clone())
                .collect();
        }
    }
    Ok(cut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use legion_plan::{CoordinatorLink, Device};

    fn cluster(names: &[&str]) -> Cluster {
        Cluster {
            coordinator: CoordinatorLink::default(),
            token_file: None,
            devices: names
                .iter()
                .map(|n| Device {
                    name: n.to_string(),
                    address: "127.0.0.1:0".into(),
                    emulate: None,
                    class: None,
                    link_mbps: 100.0,
                    latency_ms: 0.2,
                    memory_mb: None,
                    tls_cert: None,
                })
                .collect(),
        }
    }

    fn fixture() -> Profile {
        let path = legion_models::workspace_root().join("testdata/profiles/tiny-cnn-2f2o.json");
        Profile::from_json(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn a_profile_cut_to_some_boards_keeps_theirs_in_cluster_order() {
        let full = fixture();
        assert!(full.devices.len() >= 3);
        let (last, first) = (&full.devices[full.devices.len() - 1], &full.devices[0]);
        let cut = boards_of(&full, &cluster(&[&last.name, &first.name])).unwrap();
        assert_eq!(cut.devices, [last.clone(), first.clone()]);
        for (stage, whole) in cut.stages.iter().zip(&full.stages) {
            assert_eq!(stage.samples[0], whole.samples[full.devices.len() - 1]);
            assert_eq!(stage.samples[1], whole.samples[0]);
        }
    }

    #[test]
    fn a_board_missing_from_the_profile_is_named() {
        let e = boards_of(&fixture(), &cluster(&["jetson-7"])).unwrap_err();
        assert!(e.to_string().contains("board jetson-7"), "{e}");
        assert!(e.downcast_ref::<BadInput>().is_some());
    }
}
