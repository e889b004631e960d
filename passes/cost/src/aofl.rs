//! The AOFL baseline (Zhou et al., SEC'19): per device, one linear regression per layer
//! type over layer features, fitted on the single-stage samples of the profile.
//!
//! - conv: `time = a + b * (C_in * W_in * H_in) + c * (k_h * k_w / (s_h * s_w) * filters)`
//! - pool: `time = a + b * input area + c * output area` (areas count channels)
//! - any other splittable stage: `time = a + b * output elements`
//!
//! `H_in` and the areas are those of the rows computed, so a fused tile is predicted
//! from its larger extents.

use crate::fit::least_squares;
use legion_ir::{Ir, Stage, StageKind};
use legion_partition::StageInTile;
use legion_plan::Profile;

/// Which regression a stage uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Conv,
    Pool,
    Other,
}

fn kind(stage: &Stage) -> Kind {
    match stage.kind {
        StageKind::Conv { .. } => Kind::Conv,
        StageKind::Pool { .. } => Kind::Pool,
        _ => Kind::Other,
    }
}

/// The features of `stage` computing `rows` output rows, constant term first.
fn features(stage: &Stage, rows: usize) -> Vec<f64> {
    let out = &stage.output;
    let out_h = out.height().unwrap_or(1).max(1);
    let out_elems = (out.len() / out_h * rows) as f64;
    match &stage.kind {
        StageKind::Conv {
            window,
            in_channels,
            out_channels,
            ..
        } => {
            let input = &stage.input_shapes[0];
            let in_w = input.len() as f64
                / input.height().unwrap_or(1).max(1) as f64
                / *in_channels as f64;
            let in_h = input_rows(window, rows) as f64;
            let k = (window.kernel[0] * window.kernel[1]) as f64;
            let s = (window.stride[0] * window.stride[1]) as f64;
            vec![
                1.0,
                *in_channels as f64 * in_w * in_h,
                k / s * *out_channels as f64,
            ]
        }
        StageKind::Pool { window, .. } => {
            let input = &stage.input_shapes[0];
            let in_row = input.len() as f64 / input.height().unwrap_or(1).max(1) as f64;
            vec![1.0, in_row * input_rows(window, rows) as f64, out_elems]
        }
        _ => vec![1.0, out_elems],
    }
}

/// Input rows a window reads for `rows` output rows (padding included).
fn input_rows(w: &legion_ir::Window, rows: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * w.stride[0] + (w.kernel[0] - 1) * w.dilation[0] + 1
    }
}

/// One device's three regressions.
pub(crate) struct Regressions {
    conv: Vec<f64>,
    pool: Vec<f64>,
    other: Vec<f64>,
}

impl Regressions {
    /// Fits device `d`'s regressions on every splittable stage's samples.
    pub(crate) fn fit(ir: &Ir, profile: &Profile, d: usize) -> Regressions {
        let fit_kind = |want: Kind| {
            let (mut xs, mut ys) = (vec![], vec![]);
            for (stage, p) in ir.stages.iter().zip(&profile.stages) {
                if p.barrier || kind(stage) != want {
                    continue;
                }
                for s in &p.samples[d] {
                    xs.push(features(stage, s.rows));
                    ys.push(s.median_us as f64);
                }
            }
            if xs.is_empty() {
                vec![]
            } else {
                least_squares(&xs, &ys)
            }
        };
        Regressions {
            conv: fit_kind(Kind::Conv),
            pool: fit_kind(Kind::Pool),
            other: fit_kind(Kind::Other),
        }
    }

    /// The predicted time of a stage's tile, µs (never negative).
    pub(crate) fn predict(&self, ir: &Ir, st: &StageInTile) -> f64 {
        if st.computed.is_empty() {
            return 0.0;
        }
        let stage = ir.stage(st.stage);
        let coef = match kind(stage) {
            Kind::Conv => &self.conv,
            Kind::Pool => &self.pool,
            Kind::Other => &self.other,
        };
        features(stage, st.computed.len())
            .iter()
            .zip(coef)
            .map(|(x, c)| x * c)
            .sum::<f64>()
            .max(0.0)
    }
}
