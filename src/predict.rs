//! `legion predict`: predicted group times from a profile, without running anything.

use crate::{BadInput, ModelArgs};
use anyhow::{Context, Result};
use legion_cost::{CostModel, DevicePrediction, Predictor};
use legion_ir::StageId;
use legion_partition::{Group, candidate_groups};
use legion_plan::{Cluster, DeviceId, Profile, Transport};
use std::fmt::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The cluster file the profile was measured on.
    #[arg(long)]
    cluster: PathBuf,
    /// The profile (`legion profile --mode legion`).
    #[arg(long)]
    profile: PathBuf,
    /// legion (the paper's formula), affine (interpolated, shared coordinator link) or
    /// aofl (the prior work's regressions).
    #[arg(long, default_value = "legion")]
    predictor: String,
    /// How rows move: programs (boards pass rows to each other) or hub (every strip
    /// through the coordinator).
    #[arg(long, default_value = "programs", value_parser = crate::compile::parse_transport)]
    transport: Transport,
    /// Only this group, e.g. 0..4 (default: every candidate group and every barrier).
    #[arg(long)]
    group: Option<String>,
    /// Predict groups split by their last stage's output channels or neurons instead
    /// (`--group`, or every stage the profile measured by channels, alone); each
    /// device's strip is then its channels.
    #[arg(long)]
    channels: bool,
    /// Add each device's strip and its in (inputs arriving) / compute / out times.
    #[arg(long)]
    verbose: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let predictor: Predictor = args.predictor.parse().map_err(BadInput)?;
    let cluster = Cluster::load(&args.cluster)?;
    let profile = load_profile(&args.profile, &cluster, &args.cluster)?;
    let ir = args.model.import()?;
    let model = CostModel::new(&ir, &profile, args.transport)
        .map_err(|e| BadInput(format!("{}: {e:#}", args.profile.display())))?;
    // Strips are cut over the devices fastest first, as the compiler cuts them.
    let all = legion_fusion::device_order(&profile);
    let groups = match (&args.group, args.channels) {
        (Some(g), true) => crate::split::parse_channel_groups(&ir, g)?,
        (None, true) => ir
            .stages
            .iter()
            .filter(|s| model.splits_channels(s.id))
            .map(|s| Group {
                first: s.id,
                last: s.id,
            })
            .collect(),
        (Some(g), false) => crate::split::parse_groups(&ir, g)?,
        (None, false) => candidate_groups(&ir, None),
    };
    if let Some(g) = groups
        .iter()
        .find(|g| args.channels && !model.splits_channels(g.last))
    {
        return Err(BadInput(format!(
            "{}: stage {} was not measured by channels (profile it again with this legion; \
             only stages whose weights outweigh their output are)",
            args.profile.display(),
            g.last
        ))
        .into());
    }
    let mut out = String::new();
    writeln!(
        out,
        "{} on {} devices, {} clock profile, predictor {predictor}, transport {}",
        args.model.model.display(),
        all.len(),
        profile.clock,
        args.transport
    )?;
    writeln!(
        out,
        "{:<10} {:>6} {:>8} {:>13}",
        "group", "stages", "devices", "predicted ms"
    )?;
    for group in groups {
        let p = match args.channels {
            true => model
                .channel_shares(predictor, group, &all, None)
                .map(|shares| model.predict_channels(predictor, group, &shares, None)),
            false => model.group(predictor, group, &all),
        }
        .with_context(|| format!("predicting group {group}"))?;
        writeln!(
            out,
            "{:<10} {:>6} {:>8} {:>13.3}",
            group.to_string(),
            group.last.index() - group.first.index() + 1,
            p.devices.len(),
            p.total_us / 1e3
        )?;
        if args.verbose {
            for d in &p.devices {
                device_line(&mut out, &model, d, args.channels)?;
            }
        }
    }
    if args.group.is_none() && !args.channels {
        let barriers: Vec<StageId> = ir
            .stages
            .iter()
            .filter(|s| !s.is_splittable())
            .map(|s| s.id)
            .collect();
        if !barriers.is_empty() {
            writeln!(
                out,
                "barrier stages, whole on the device predicted fastest for each (as compile \
                 runs them):"
            )?;
            for s in barriers {
                let d = (0..model.device_count())
                    .map(DeviceId)
                    .map(|d| model.predict_one(Group { first: s, last: s }, d))
                    .min_by(|a, b| a.total_us.total_cmp(&b.total_us))
                    .expect("a profile has devices");
                writeln!(
                    out,
                    "{:<10} {:>6} {:>8} {:>13.3}  on {}",
                    format!("{s} {}", ir.stage(s).kind.short_name()),
                    1,
                    1,
                    d.total_us / 1e3,
                    model.device_name(d.device)
                )?;
                if args.verbose {
                    device_line(&mut out, &model, &d, false)?;
                }
            }
        }
    }
    print!("{out}");
    Ok(())
}

fn device_line(
    out: &mut String,
    model: &CostModel,
    d: &DevicePrediction,
    channels: bool,
) -> Result<()> {
    let compute: f64 = d.compute_us.iter().map(|(_, e)| e).sum();
    let unit = if channels { "channels" } else { "rows" };
    writeln!(
        out,
        "    {:<18} {unit} {:<9} in {:>9.3}  compute {:>9.3}  out {:>9.3}  total {:>9.3} ms",
        model.device_name(d.device),
        d.strip.to_string(),
        d.in_us / 1e3,
        compute / 1e3,
        d.out_us / 1e3,
        d.total_us / 1e3
    )?;
    Ok(())
}

/// Reads a profile and checks it was measured on `cluster`'s devices.
pub(crate) fn load_profile(path: &Path, cluster: &Cluster, cluster_path: &Path) -> Result<Profile> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("{}: cannot read the profile: {e}", path.display())))?;
    let profile =
        Profile::from_json(&text).map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
    let names: Vec<&str> = cluster.devices.iter().map(|d| d.name.as_str()).collect();
    let profiled: Vec<&str> = profile.devices.iter().map(|d| d.name.as_str()).collect();
    if names != profiled {
        return Err(BadInput(format!(
            "{} lists devices {names:?} but the profile {} was measured on {profiled:?}; \
             profile this cluster",
            cluster_path.display(),
            path.display()
        ))
        .into());
    }
    Ok(profile)
}
