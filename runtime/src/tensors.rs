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

/// A tensor's window of rows and the rows of it filled so far (sorted, disjoint).
struct Held {
    /// Rows `window` of the tensor (the whole of a tensor without a row axis).
    tensor: Tensor,
    window: Rows,
    filled: Vec<Rows>,
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
                filled: vec![whole],
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

    /// Rows `rows` of tensor `r` (all of it when it has no row axis; an empty strip,
    /// held or not, when `rows` is empty).
    pub fn strip(&self, r: TensorRef, rows: Rows) -> Result<Tensor> {
        let info = self.ir.tensor(r);
        if info.h_axis.is_some() && rows.is_empty() {
            return Tensor::zero::<f32>(&info.strip_shape(rows));
        }
        let held = self
            .held
            .get(&r)
            .with_context(|| format!("{} has not been computed yet", self.describe(r)))?;
        let Some(h) = info.h_axis else {
            return Ok(held.tensor.clone());
        };
        ensure!(
            held.filled.iter().any(|f| f.contains(rows)),
            "rows {rows} of {} were not all computed (held: {:?})",
            self.describe(r),
            held.filled
        );
        let at = held.window.start;
        held.tensor.slice(h, rows.start - at, rows.end - at)
    }

    /// The whole tensor `r`, if every row of it was computed.
    pub fn whole(&self, r: TensorRef) -> Result<&Tensor> {
        let height = self.ir.tensor(r).height();
        let held = self
            .held
            .get(&r)
            .with_context(|| format!("{} has not been computed", self.describe(r)))?;
        if let Some(height) = height {
            ensure!(
                held.filled == [Rows::new(0, height)],
                "{} is incomplete: rows {:?} of {height} computed",
                self.describe(r),
                held.filled
            );
        }
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
        let info = self.ir.tensor(r);
        let mut want = info.shape.clone();
        if let Some(h) = info.h_axis {
            want[h] = rows.len();
        }
        ensure!(
            strip.shape() == want.as_slice(),
            "a strip of {} rows {rows} has shape {:?}, expected {want:?}",
            self.describe(r),
            strip.shape()
        );
        let Some(h) = info.h_axis else {
            self.held.insert(
                r,
                Held {
                    tensor: strip,
                    window: Rows::new(0, 0),
                    filled: vec![],
                },
            );
            return Ok(());
        };
        if rows.is_empty() {
            return Ok(());
        }
        let name = self.describe(r);
        let window = match self.windows.get(&r) {
            Some(w) => *w,
            None => Rows::new(0, info.shape[h]),
        };
        ensure!(
            window.contains(rows),
            "rows {rows} of {name} are outside rows {window}, the only ones this program keeps"
        );
        let held = self.held.entry(r).or_insert_with(|| Held {
            tensor: Tensor::zero::<f32>(&info.strip_shape(window)).expect("f32 zeros"),
            window,
            filled: vec![],
        });
        if held
            .filled
            .iter()
            .any(|f| f.start < rows.end && rows.start < f.end)
        {
            bail!(
                "rows {rows} of {name} were already computed (held: {:?})",
                held.filled
            );
        }
        let src = strip.to_plain_array_view::<f32>()?;
        let mut dst = held.tensor.to_plain_array_view_mut::<f32>()?;
        let at = window.start;
        dst.slice_axis_mut(Axis(h), Slice::from(rows.start - at..rows.end - at))
            .assign(&src);
        held.filled.push(rows);
        held.filled.sort_by_key(|f| f.start);
        held.filled = merge(&held.filled);
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
