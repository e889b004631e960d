//! One party's tensors during one inference: on the coordinator, the model input and
//! every stage output assembled from the strips devices sent back; on a board running
//! its program, the rows it computed and received. Each tensor records the rows it
//! holds so far; reading rows nobody stored is an error, never zeros. A board keeps of
//! each tensor only the window of rows its program ever holds, not the whole height.

use anyhow::{Context, Result, bail, ensure};
use legion_ir::{Ir, Rows, StageId, TensorRef};
use std::collections::HashMap;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ndarray::{Axis, Slice};

/// Tensors of one inference, assembled from strips.
pub struct Tensors<'a> {
    ir: &'a Ir,
    held: HashMap<TensorRef, Held>,
    /// The rows stored of each tensor with a row axis: given for a board's program,
    /// else the whole height.
    windows: HashMap<TensorRef, Rows>,
}

/// A tensor's window of rows and the parts of it filled so far.
struct Held {
    /// Rows `window` of the tensor, all channels (the whole of a tensor without a row
    /// axis).
    tensor: Tensor,
    window: Rows,
    /// Per range of channels stored (`None`: all of them), the rows filled (sorted,
    /// disjoint; `0..0` for a tensor without rows). Only a tensor computed split by
    /// channels has ranges other than `None`.
    filled: Vec<(Option<Rows>, Vec<Rows>)>,
}

impl Held {
    /// True when `rows` (any, `0..0`, of a tensor without rows) of `channels` (all
    /// of the `count`, for `None`) are filled.
    fn covers(&self, rows: Rows, channels: Option<Rows>, count: usize) -> bool {
        let want = channels.unwrap_or(Rows::new(0, count));
        let mut have: Vec<Rows> = self
            .filled
            .iter()
            .filter(|(_, filled)| {
                filled.iter().any(|f| f.contains(rows)) || (rows.is_empty() && !filled.is_empty())
            })
            .map(|(c, _)| c.unwrap_or(Rows::new(0, count)))
            .collect();
        have.sort_by_key(|c| c.start);
        merge(&have).iter().any(|c| c.contains(want))
    }
}

impl<'a> Tensors<'a> {
    /// Starts an inference of `ir` on `input`, checking its shape.
    pub fn new(ir: &'a Ir, input: Tensor) -> Result<Self> {
        ensure!(
            input.shape() == ir.input.shape.as_slice(),
            "the input has shape {:?}; model input {:?} takes {:?}",
            input.shape(),
            ir.input_name,
            ir.input.shape
        );
        ensure!(
            input.datum_type() == f32::datum_type(),
            "the input is {:?}; the model takes f32",
            input.datum_type()
        );
        let whole = Rows::new(0, ir.input.height().unwrap_or(0));
        let mut held = HashMap::new();
        held.insert(
            TensorRef::Input,
            Held {
                tensor: input,
                window: whole,
                filled: vec![(None, vec![whole])],
            },
        );
        Ok(Tensors {
            ir,
            held,
            windows: HashMap::new(),
        })
    }

    /// No tensors yet: a board's store, filled by its program's steps. Of a tensor in
    /// `windows` only those rows are stored (every row the program puts must be in
    /// them); of any other, the whole height.
    pub fn windowed(ir: &'a Ir, windows: HashMap<TensorRef, Rows>) -> Self {
        Tensors {
            ir,
            held: HashMap::new(),
            windows,
        }
    }

    /// Bytes of the tensors stored now (their windows, filled or not).
    pub fn bytes(&self) -> u64 {
        self.held.values().map(|h| tensor_bytes(&h.tensor)).sum()
    }

    /// Frees tensor `r`.
    pub fn remove(&mut self, r: TensorRef) {
        self.held.remove(&r);
    }

    /// The axis and count of the channels of tensor `r`, when it is computed split by
    /// them.
    fn channel_axis(&self, r: TensorRef) -> Option<(usize, usize)> {
        match r {
            TensorRef::Stage(s) => self.ir.stage(s).channels.map(|c| (c.axis, c.count)),
            TensorRef::Input => None,
        }
    }

    /// Rows `rows` of tensor `r` (all of it when it has no row axis; an empty strip,
    /// held or not, when `rows` is empty).
    pub fn strip(&self, r: TensorRef, rows: Rows) -> Result<Tensor> {
        self.part(r, rows, None)
    }

    /// Rows `rows` of tensor `r`, of its channels `channels` only when given (see
    /// [`Tensors::strip`]).
    pub fn part(&self, r: TensorRef, rows: Rows, channels: Option<Rows>) -> Result<Tensor> {
        let info = self.ir.tensor(r);
        let axis = self.channel_axis(r);
        ensure!(
            channels.is_none() || axis.is_some(),
            "channels {channels:?} of {}, which is not split by channels",
            self.describe(r)
        );
        let mut shape = info.strip_shape(rows);
        if let (Some((a, _)), Some(c)) = (axis, channels) {
            shape[a] = c.len();
        }
        if info.h_axis.is_some() && rows.is_empty() {
            return Tensor::zero::<f32>(&shape);
        }
        let held = self
            .held
            .get(&r)
            .with_context(|| format!("{} has not been computed yet", self.describe(r)))?;
        let count = axis.map_or(0, |(_, n)| n);
        ensure!(
            held.covers(rows, channels, count),
            "rows {rows}{} of {} were not all computed (held: {:?})",
            channels
                .map(|c| format!(" channels {c}"))
                .unwrap_or_default(),
            self.describe(r),
            held.filled
        );
        let mut t = match info.h_axis {
            Some(h) => {
                let at = held.window.start;
                held.tensor.slice(h, rows.start - at, rows.end - at)?
            }
            None => held.tensor.clone(),
        };
        if let (Some((a, _)), Some(c)) = (axis, channels) {
            t = t.slice(a, c.start, c.end)?;
        }
        Ok(t)
    }

    /// The whole tensor `r`, if every row of it was computed.
    pub fn whole(&self, r: TensorRef) -> Result<&Tensor> {
        let rows = Rows::new(0, self.ir.tensor(r).height().unwrap_or(0));
        let held = self
            .held
            .get(&r)
            .with_context(|| format!("{} has not been computed", self.describe(r)))?;
        let count = self.channel_axis(r).map_or(0, |(_, n)| n);
        ensure!(
            held.covers(rows, None, count),
            "{} is incomplete: {:?} of rows {rows} computed",
            self.describe(r),
            held.filled
        );
        Ok(&held.tensor)
    }

    /// The model's outputs, whole, in the model's order.
    pub fn outputs(&self) -> Result<Vec<Tensor>> {
        self.ir
            .outputs
            .iter()
            .map(|r| self.whole(*r).cloned())
            .collect()
    }

    /// Stores `strip`, rows `rows` of stage `s`'s output, checking its shape.
    pub fn put(&mut self, s: StageId, rows: Rows, strip: Tensor) -> Result<()> {
        self.put_rows(TensorRef::Stage(s), rows, strip)
    }

    /// Stores `strip`, rows `rows` of tensor `r`, checking its shape; rows already
    /// held are an error.
    pub fn put_rows(&mut self, r: TensorRef, rows: Rows, strip: Tensor) -> Result<()> {
        self.put_part(r, rows, None, strip)
    }

    /// Stores `part`, rows `rows` of tensor `r` and, when given, of its channels
    /// `channels` only, checking its shape; parts already held are an error.
    pub fn put_part(
        &mut self,
        r: TensorRef,
        rows: Rows,
        channels: Option<Rows>,
        part: Tensor,
    ) -> Result<()> {
        let info = self.ir.tensor(r);
        let axis = self.channel_axis(r);
        let name = self.describe(r);
        let mut want = info.strip_shape(rows);
        match (axis, channels) {
            (Some((a, count)), Some(c)) => {
                ensure!(
                    c.end <= count && !c.is_empty(),
                    "channels {c} of {name}, which has {count}"
                );
                want[a] = c.len();
            }
            (None, Some(c)) => bail!("channels {c} of {name}, which is not split by channels"),
            _ => {}
        }
        ensure!(
            part.shape() == want.as_slice(),
            "a part of {name} rows {rows}{} has shape {:?}, expected {want:?}",
            channels
                .map(|c| format!(" channels {c}"))
                .unwrap_or_default(),
            part.shape()
        );
        if info.h_axis.is_some() && rows.is_empty() {
            return Ok(());
        }
        let window = match (info.h_axis, self.windows.get(&r)) {
            (None, _) => Rows::new(0, 0),
            (Some(_), Some(w)) => *w,
            (Some(h), None) => Rows::new(0, info.shape[h]),
        };
        ensure!(
            info.h_axis.is_none() || window.contains(rows),
            "rows {rows} of {name} are outside rows {window}, the only ones this program keeps"
        );
        let held = self.held.entry(r).or_insert_with(|| Held {
            tensor: Tensor::zero::<f32>(&info.strip_shape(window)).expect("f32 zeros"),
            window,
            filled: vec![],
        });
        let meets = |a: Rows, b: Rows| a.start < b.end && b.start < a.end;
        let clash = held.filled.iter().any(|(c, filled)| {
            let same_channels = match (c, channels) {
                (Some(a), Some(b)) => meets(*a, b),
                _ => true,
            };
            same_channels
                && filled
                    .iter()
                    .any(|f| meets(*f, rows) || (rows.is_empty() && f.is_empty()))
        });
        if clash {
            bail!(
                "rows {rows}{} of {name} were already computed (held: {:?})",
                channels
                    .map(|c| format!(" channels {c}"))
                    .unwrap_or_default(),
                held.filled
            );
        }
        let src = part.to_plain_array_view::<f32>()?;
        let mut dst = held.tensor.to_plain_array_view_mut::<f32>()?;
        let mut dst = dst.view_mut();
        if let Some(h) = info.h_axis {
            let at = window.start;
            dst.slice_axis_inplace(Axis(h), Slice::from(rows.start - at..rows.end - at));
        }
        if let (Some((a, _)), Some(c)) = (axis, channels) {
            dst.slice_axis_inplace(Axis(a), Slice::from(c.start..c.end));
        }
        dst.assign(&src);
        match held.filled.iter_mut().find(|(c, _)| *c == channels) {
            Some((_, filled)) => {
                filled.push(rows);
                filled.sort_by_key(|f| f.start);
                *filled = merge(filled);
            }
            None => held.filled.push((channels, vec![rows])),
        }
        Ok(())
    }

    fn describe(&self, r: TensorRef) -> String {
        match r {
            TensorRef::Input => "the model input".to_string(),
            TensorRef::Stage(s) => format!("stage {s} ({})", self.ir.stage(s).name),
        }
    }
}

/// Payload bytes of an f32 tensor (on the wire or in memory).
pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    t.len() as u64 * 4
}

/// Joins touching ranges of a sorted list.
fn merge(sorted: &[Rows]) -> Vec<Rows> {
    let mut out: Vec<Rows> = vec![];
    for &r in sorted {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ir() -> Ir {
        let path = legion_models::test_model("tiny-cnn").unwrap();
        legion_ir::import(&path, None).unwrap()
    }

    /// A strip of `rows` of tensor `r` whose every value is its row's index.
    fn rows_strip(ir: &Ir, r: TensorRef, rows: Rows) -> Tensor {
        let info = ir.tensor(r);
        let h = info.h_axis.unwrap();
        let shape = info.strip_shape(rows);
        let mut a = tract_ndarray::ArrayD::<f32>::zeros(shape);
        for (i, mut row) in a.axis_iter_mut(Axis(h)).enumerate() {
            row.fill((rows.start + i) as f32);
        }
        a.into_tensor()
    }

    #[test]
    fn a_board_stores_only_its_window_of_rows() {
        let ir = ir();
        let t = TensorRef::Stage(StageId(0));
        let info = ir.tensor(t);
        let (h, height) = (info.h_axis.unwrap(), info.height().unwrap());
        let window = Rows::new(3, 9);
        let mut tensors = Tensors::windowed(&ir, HashMap::from([(t, window)]));
        tensors
            .put_rows(t, Rows::new(5, 9), rows_strip(&ir, t, Rows::new(5, 9)))
            .unwrap();
        tensors
            .put_rows(t, Rows::new(3, 5), rows_strip(&ir, t, Rows::new(3, 5)))
            .unwrap();
        assert_eq!(tensors.bytes(), info.strip_bytes(window));
        assert!(info.strip_bytes(window) < info.strip_bytes(Rows::new(0, height)));
        let got = tensors.strip(t, Rows::new(4, 7)).unwrap();
        let got = got.to_plain_array_view::<f32>().unwrap();
        let firsts: Vec<f32> = got
            .axis_iter(Axis(h))
            .map(|row| row.iter().copied().next().unwrap())
            .collect();
        assert_eq!(firsts, [4.0, 5.0, 6.0]);
        let e = tensors
            .put_rows(t, Rows::new(9, 10), rows_strip(&ir, t, Rows::new(9, 10)))
            .unwrap_err();
        assert!(format!("{e:#}").contains("outside rows 3..9"), "{e:#}");
        tensors.remove(t);
        assert_eq!(tensors.bytes(), 0);
    }
}
