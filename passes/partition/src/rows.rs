//! The row map of a single stage.

use legion_ir::{Rows, Stage, StageKind, Window};
use serde::{Deserialize, Serialize};

/// Rows of one input a stage needs, plus the padding its tile must apply around them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRows {
    /// Rows of the input tensor read.
    pub rows: Rows,
    /// Padding rows above `rows` (only at the top edge of the tensor).
    pub pad_top: usize,
    /// Padding rows below `rows` (only at the bottom edge of the tensor).
    pub pad_bottom: usize,
}

/// What a stage computes for a wanted range of output rows and what it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageRows {
    /// Output rows computed: the wanted range, widened where the stage can only produce
    /// whole blocks (upsampling computes whole repeats).
    pub computed: Rows,
    /// One entry per data input of the stage, in order.
    pub inputs: Vec<InputRows>,
}

/// The row map of a splittable stage: output rows `want` -> input rows and pads.
///
/// Panics on a barrier stage; callers check splittability first.
pub fn row_map(stage: &Stage, want: Rows) -> StageRows {
    let in_height = |i: usize| {
        stage.input_shapes[i]
            .height()
            .expect("splittable stages have rows")
    };
    let same = |rows: Rows| InputRows {
        rows,
        pad_top: 0,
        pad_bottom: 0,
    };
    match &stage.kind {
        StageKind::Conv { window, .. } | StageKind::Pool { window, .. } => StageRows {
            computed: want,
            inputs: vec![window_rows(window, want, in_height(0))],
        },
        StageKind::Upsample { factor } => {
            let f = *factor;
            let rows = Rows::new(want.start / f, want.end.div_ceil(f));
            StageRows {
                computed: Rows::new(rows.start * f, rows.end * f),
                inputs: vec![same(rows)],
            }
        }
        StageKind::SpaceToDepth { block } => StageRows {
            computed: want,
            inputs: vec![same(Rows::new(want.start * block, want.end * block))],
        },
        _ => StageRows {
            computed: want,
            inputs: stage.inputs.iter().map(|_| same(want)).collect(),
        },
    }
}

/// DESIGN.md section 4: `lo = a*s - p`, `hi = (b-1)*s - p + (k-1)*d + 1`; the tile reads
/// `[max(lo,0), min(hi,H))` and pads `max(0,-lo)` on top and `max(0,hi-H)` below.
pub fn window_rows(w: &Window, want: Rows, height: usize) -> InputRows {
    if want.is_empty() {
        return InputRows {
            rows: Rows::default(),
            pad_top: 0,
            pad_bottom: 0,
        };
    }
    let (k, s, d, p) = (
        w.kernel[0] as i64,
        w.stride[0] as i64,
        w.dilation[0] as i64,
        w.pad_before[0] as i64,
    );
    let (a, b, h) = (want.start as i64, want.end as i64, height as i64);
    let lo = a * s - p;
    let hi = (b - 1) * s - p + (k - 1) * d + 1;
    InputRows {
        rows: Rows::new(lo.clamp(0, h) as usize, hi.clamp(0, h) as usize),
        pad_top: (-lo).max(0) as usize,
        pad_bottom: (hi - h).max(0) as usize,
    }
}
