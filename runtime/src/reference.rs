//! The single-device run every check compares against: the whole model, once, keeping
//! every stage's output.

use anyhow::{Context, Result};
use legion_ir::{Ir, TensorRef};
use std::collections::BTreeMap;
use tract_onnx::prelude::*;

/// Every tensor of one single-device inference, by reference.
pub struct Reference {
    tensors: BTreeMap<TensorRef, Tensor>,
}

impl Reference {
    /// Runs the whole model on `input` with every stage output kept as a model output.
    pub fn run(ir: &Ir, input: Tensor) -> Result<Reference> {
        let mut model = ir.model().clone();
        let refs: Vec<TensorRef> = ir.stages.iter().map(|s| TensorRef::Stage(s.id)).collect();
        let outlets: Vec<OutletId> = ir.stages.iter().map(|s| s.output_outlet()).collect();
        model.select_output_outlets(&outlets)?;
        let plan = model
            .into_optimized()?
            .into_runnable()
            .context("optimizing the whole model")?;
        let outputs = plan
            .run(tvec!(input.clone().into_tvalue()))
            .context("running the whole model")?;
        let mut tensors: BTreeMap<TensorRef, Tensor> = refs
            .into_iter()
            .zip(outputs)
            .map(|(r, v)| (r, v.into_tensor()))
            .collect();
        tensors.insert(TensorRef::Input, input);
        Ok(Reference { tensors })
    }

    /// The value of a tensor.
    pub fn tensor(&self, r: TensorRef) -> &Tensor {
        &self.tensors[&r]
    }
}
