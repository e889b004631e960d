//! `legion inspect`: the stage table of a model, as text or JSON.

use crate::ModelArgs;
use legion_ir::{Ir, Split, Stage, StageKind, TensorInfo, TensorRef};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON (field names documented in docs/inspect-json.md) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let ir = args.model.import()?;
    let file = args
        .model
        .model
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Report::new(&ir, &file))?
        );
    } else {
        print!("{}", table(&ir, &file));
    }
    Ok(())
}

/// The JSON form of `legion inspect`; see docs/inspect-json.md.
#[derive(Serialize)]
struct Report<'a> {
    model: &'a str,
    sha256: &'a str,
    input: InputReport<'a>,
    stages: &'a [Stage],
    outputs: &'a [TensorRef],
    totals: Totals,
}

#[derive(Serialize)]
struct InputReport<'a> {
    name: &'a str,
    #[serde(flatten)]
    tensor: &'a TensorInfo,
}

#[derive(Serialize)]
struct Totals {
    stages: usize,
    splittable: usize,
    barriers: usize,
    channel_splittable: usize,
    flops: u64,
    macs: u64,
    weight_bytes: u64,
}

impl<'a> Report<'a> {
    fn new(ir: &'a Ir, file: &'a str) -> Self {
        Report {
            model: file,
            sha256: &ir.sha256,
            input: InputReport {
                name: &ir.input_name,
                tensor: &ir.input,
            },
            stages: &ir.stages,
            outputs: &ir.outputs,
            totals: totals(ir),
        }
    }
}

fn totals(ir: &Ir) -> Totals {
    let splittable = ir.stages.iter().filter(|s| s.is_splittable()).count();
    Totals {
        stages: ir.stages.len(),
        splittable,
        barriers: ir.stages.len() - splittable,
        channel_splittable: ir.stages.iter().filter(|s| s.channels.is_some()).count(),
        flops: ir.total_flops(),
        macs: ir.stages.iter().map(|s| s.macs()).sum(),
        weight_bytes: ir.total_weight_bytes(),
    }
}

fn table(ir: &Ir, file: &str) -> String {
    let header = [
        "#",
        "name",
        "kind",
        "inputs",
        "output",
        "k",
        "s",
        "pads t,b,l,r",
        "d",
        "MFLOPs",
        "KiB",
        "channels",
        "split",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for s in &ir.stages {
        let w = s.kind.window();
        let pair = |v: [usize; 2]| {
            if v[0] == v[1] {
                v[0].to_string()
            } else {
                format!("{}x{}", v[0], v[1])
            }
        };
        rows.push(vec![
            s.id.to_string(),
            s.name.clone(),
            kind_label(&s.kind),
            s.inputs
                .iter()
                .map(|r| match r {
                    TensorRef::Input => "in".to_string(),
                    TensorRef::Stage(p) => p.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            shape(&s.output),
            w.map(|w| format!("{}x{}", w.kernel[0], w.kernel[1]))
                .unwrap_or_default(),
            w.map(|w| pair(w.stride)).unwrap_or_default(),
            w.map(|w| {
                format!(
                    "{},{},{},{}",
                    w.pad_before[0], w.pad_after[0], w.pad_before[1], w.pad_after[1]
                )
            })
            .unwrap_or_default(),
            w.map(|w| pair(w.dilation)).unwrap_or_default(),
            format!("{:.1}", s.flops as f64 / 1e6),
            format!("{:.0}", s.weight_bytes as f64 / 1024.0),
            s.channels
                .map(|c| format!("{} (axis {})", c.count, c.axis))
                .unwrap_or_else(|| "-".into()),
            match &s.split {
                Split::Rows => "split".to_string(),
                Split::Barrier(reason) => match s.partial {
                    Some(how) if legion_partition::combinable(ir, s.id) => format!(
                        "barrier: {reason}; combined across a row group's boards ({})",
                        match how {
                            legion_ir::Combine::Sum => "sum",
                            legion_ir::Combine::Max => "max",
                        }
                    ),
                    _ => format!("barrier: {reason}"),
                },
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = format!(
        "{file}  sha256 {}\ninput '{}' {}\n\n",
        &ir.sha256[..16],
        ir.input_name,
        shape(&ir.input)
    );
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                if (9..=10).contains(&c) || c == 0 {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let t = totals(ir);
    out.push_str(&format!(
        "\n{} stages: {} split, {} barriers, {} split by channels; {:.2} GFLOPs ({:.2} GMACs in convs and matmuls); weights {:.1} MiB\n",
        t.stages,
        t.splittable,
        t.barriers,
        t.channel_splittable,
        t.flops as f64 / 1e9,
        t.macs as f64 / 1e9,
        t.weight_bytes as f64 / (1024.0 * 1024.0)
    ));
    out
}

/// Kind with its distinguishing parameter (group count, factor, block).
fn kind_label(kind: &StageKind) -> String {
    match kind {
        StageKind::Conv { group, .. } if *group > 1 => format!("{} g{group}", kind.short_name()),
        StageKind::Upsample { factor } => format!("upsample x{factor}"),
        StageKind::Flatten { factor } => format!("flatten rows x{factor}"),
        StageKind::Slice { axis } => format!("slice axis {axis}"),
        StageKind::Subsample { step, offset } => format!("rows {offset}::{step}"),
        StageKind::SpaceToDepth { block } => format!("space2depth {block}"),
        StageKind::Pool { window, .. } if window.ceil_mode => format!("{} ceil", kind.short_name()),
        _ => kind.short_name(),
    }
}

fn shape(t: &TensorInfo) -> String {
    t.shape
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if Some(i) == t.h_axis {
                format!("{d}h")
            } else {
                d.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("x")
}
