//! The row map of a single stage.

use legion_ir::{Rows, Stage, StageKind, Window};
use serde::{Deserialize, Serialize};
use smallvec::{SmallVec, smallvec};

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
    /// One entry per data input of the stage, in order (inline: the walk over a group
    /// maps every stage for every strip the shares search tries).
    pub inputs: SmallVec<[InputRows; 2]>,
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
            inputs: smallvec![window_rows(window, want, in_height(0))],
        },
        StageKind::Upsample { factor } | StageKind::Flatten { factor } => {
            let f = *factor;
            let rows = Rows::new(want.start / f, want.end.div_ceil(f));
            StageRows {
                computed: Rows::new(rows.start * f, rows.end * f),
                inputs: smallvec![same(rows)],
            }
        }
        StageKind::Subsample { step, offset } => StageRows {
            computed: want,
            inputs: smallvec![same(if want.is_empty() {
                Rows::default()
            } else {
                Rows::new(
                    offset + want.start * step,
                    offset + (want.end - 1) * step + 1,
                )
            })],
        },
        StageKind::SpaceToDepth { block } => StageRows {
            computed: want,
            inputs: smallvec![same(Rows::new(want.start * block, want.end * block))],
        },
        // A one-row input broadcast along the rows (a squeeze-excitation scale) is read
        // whole by every strip.
        _ => StageRows {
            computed: want,
            inputs: (0..stage.inputs.len())
                .map(|i| match in_height(i) {
                    1 if stage.output.height() != Some(1) => same(Rows::new(0, 1)),
                    _ => same(want),
                })
                .collect(),
        },
    }
}

/// docs/architecture.md, "Row maps and halos": `lo = a*s - p`, `hi = (b-1)*s - p + (k-1)*d + 1`; the tile reads
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
    // With ceil_mode the last window may hang below the declared bottom pad; that
    // overhang is not padding (an average pool must not count it), the tile's own
    // ceil_mode produces that row, exactly as the whole model does.
    let overhang = (hi - h).max(0) as usize;
    let pad_bottom = if w.ceil_mode {
        overhang.min(w.pad_after[0])
    } else {
        overhang
    };
    InputRows {
        rows: Rows::new(lo.clamp(0, h) as usize, hi.clamp(0, h) as usize),
        pad_top: (-lo).max(0) as usize,
        pad_bottom,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn win(k: usize, s: usize, p: usize, d: usize, ceil_mode: bool) -> Window {
        Window {
            kernel: [k, k],
            stride: [s, s],
            dilation: [d, d],
            pad_before: [p, p],
            pad_after: [p, p],
            ceil_mode,
        }
    }

    fn need(w: &Window, a: usize, b: usize, h: usize) -> (Rows, usize, usize) {
        let r = window_rows(w, Rows::new(a, b), h);
        (r.rows, r.pad_top, r.pad_bottom)
    }

    #[test]
    fn conv3x3_s1_p1_at_strip_boundaries() {
        let w = win(3, 1, 1, 1, false);
        // Interior strip: one halo row each side, no padding.
        assert_eq!(need(&w, 3, 6, 10), (Rows::new(2, 7), 0, 0));
        // Top strip keeps the top pad, bottom strip the bottom pad.
        assert_eq!(need(&w, 0, 3, 10), (Rows::new(0, 4), 1, 0));
        assert_eq!(need(&w, 6, 10, 10), (Rows::new(5, 10), 0, 1));
        // The whole tensor: exactly the model's own pads.
        assert_eq!(need(&w, 0, 10, 10), (Rows::new(0, 10), 1, 1));
    }

    #[test]
    fn conv3x3_s2_p1() {
        let w = win(3, 2, 1, 1, false);
        assert_eq!(need(&w, 2, 4, 10), (Rows::new(3, 8), 0, 0));
        assert_eq!(need(&w, 0, 1, 10), (Rows::new(0, 2), 1, 0));
        // H=10: the last output row reads rows 7..10, no bottom pad needed.
        assert_eq!(need(&w, 4, 5, 10), (Rows::new(7, 10), 0, 0));
        // H=9 (still 5 output rows): the last window hangs one row below.
        assert_eq!(need(&w, 4, 5, 9), (Rows::new(7, 9), 0, 1));
    }

    #[test]
    fn pool2x2_s2() {
        let w = win(2, 2, 0, 1, false);
        assert_eq!(need(&w, 1, 3, 8), (Rows::new(2, 6), 0, 0));
        assert_eq!(need(&w, 0, 4, 8), (Rows::new(0, 8), 0, 0));
    }

    #[test]
    fn dilation_2() {
        let w = win(3, 1, 2, 2, false);
        assert_eq!(need(&w, 0, 2, 10), (Rows::new(0, 4), 2, 0));
        assert_eq!(need(&w, 5, 10, 10), (Rows::new(3, 10), 0, 2));
        assert_eq!(need(&w, 4, 5, 10), (Rows::new(2, 7), 0, 0));
    }

    #[test]
    fn ceil_mode_pool_at_the_bottom_edge() {
        // k3 s2 on 8 rows with ceil_mode: ceil((8-3)/2)+1 = 4 output rows; the last
        // window starts at row 6 and hangs one row below the tensor. That row is not
        // padding: the tile's ceil_mode makes the last row, as in the whole model.
        let w = win(3, 2, 0, 1, true);
        assert_eq!(need(&w, 3, 4, 8), (Rows::new(6, 8), 0, 0));
        assert_eq!(need(&w, 0, 3, 8), (Rows::new(0, 7), 0, 0));
    }

    #[test]
    fn rows_hull_and_contains() {
        assert_eq!(Rows::new(2, 5).hull(Rows::new(4, 9)), Rows::new(2, 9));
        assert_eq!(Rows::default().hull(Rows::new(4, 9)), Rows::new(4, 9));
        assert!(Rows::new(2, 9).contains(Rows::new(3, 4)));
        assert!(!Rows::new(2, 9).contains(Rows::new(1, 4)));
    }
}
