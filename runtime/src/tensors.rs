//! One party's tensors during one inference: on the coordinator, the model input and
//! every stage output assembled from the strips devices sent back; on a board running
//! its program, the rows it computed and received. Each tensor records the rows it
//! holds so far; reading rows nobody stored is an error, never zeros.

use anyhow::{Context, Result, bail, ensure};
use legion_ir::{Ir, Rows, StageId, TensorRef};
use std::collections::HashMap;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ndarray::{Axis, Slice};

/// Tensors of one inference, assembled from strips.
pub struct Tensors<'a> {
    ir: &'a Ir,
    held: HashMap<TensorRef, Held>,
}

/// A tensor and the rows of it filled so far (sorted, disjoint).
struct Held {
    tensor: Tensor,
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
        let filled = vec![Rows::new(0, ir.input.height().unwrap_or(0))];
        let mut held = HashMap::new();
        held.insert(
            TensorRef::Input,
            Held {
                tensor: input,
                filled,
            },
        );
        Ok(Tensors { ir, held })
    }

    /// No tensors yet (a board's store, filled by its program's steps).
    pub fn empty(ir: &'a Ir) -> Self {
        Tensors {
            ir,
            held: HashMap::new(),
        }
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
        held.tensor.slice(h, rows.start, rows.end)
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
                    filled: vec![],
                },
            );
            return Ok(());
        };
        if rows.is_empty() {
            return Ok(());
        }
        let name = self.describe(r);
        let held = self.held.entry(r).or_insert_with(|| Held {
            tensor: Tensor::zero::<f32>(&info.shape).expect("f32 zeros"),
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
        dst.slice_axis_mut(Axis(h), Slice::from(rows.start..rows.end))
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
