//! Tile programs. A [`TileSpec`] is what one device runs for one fused group:
//! everything the partition pass computed, so a worker needs no compiler pass.

use legion_ir::{Ir, Rows, StageId, TensorRef};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One device's program for one fused group: receive strips, run the stages, send strips.
///
/// A tensor without a row axis (past a Flatten) always moves whole; its rows are
/// written `0..0`. A stage split by channels computes all its rows of a range of its
/// output channels (its `channels`), and sends that range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileSpec {
    /// Strips received, one per tensor entering the group, in this order.
    pub inputs: Vec<TileInput>,
    /// Stages run, in topological order (stages with nothing to compute are left out).
    pub stages: Vec<TileStage>,
    /// Strips sent, one per tensor leaving the group of which the tile computes rows,
    /// in this order.
    pub outputs: Vec<TileOutput>,
    /// For a channel tile that flattens a tensor with rows into a matrix product (an FC
    /// head after its last pool): that tensor's rows in parts, in the order the device
    /// multiplies them, each as soon as it has arrived; the partial products are summed
    /// before the rest of the stage runs (docs/architecture.md, "Accumulating as rows
    /// arrive"). Empty: the tile runs once its whole input has arrived.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Rows>,
}

/// A strip entering the tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileInput {
    /// The tensor.
    pub tensor: TensorRef,
    /// Its rows received, halo included.
    pub rows: Rows,
}

/// One stage of the tile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileStage {
    /// The stage.
    pub stage: StageId,
    /// Output rows computed.
    pub computed: Rows,
    /// Per data input of the stage: rows read and the padding applied around them.
    pub reads: Vec<TileRead>,
    /// The output channels computed, when the stage is split by channels (its
    /// constants sliced to them); absent for all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Rows>,
    /// True for a reduction over rows that the group's devices combine: the device
    /// reduces the rows it reads (its own) into a partial result, and the stages after it
    /// read the partials combined.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// In a phase of a tile in parts ([`TileSpec::parts`]): the rows of the flattened
    /// tensor this phase multiplies; the stage computes its anchor's partial product
    /// from them alone (its matrix's matching rows), and none of its later ops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<Rows>,
    /// In the last phase of a tile in parts: the stage's anchor is not run; its output
    /// is the sum of the parts' partial products, the phase's input, and the stage's
    /// later ops (bias, activation) run on it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub summed: bool,
}

impl TileStage {
    /// True for a partial stage that reduces rows of its own (see [`TileStage::partial`]).
    pub fn contributes(&self) -> bool {
        self.partial && self.reads.iter().any(|r| !r.rows.is_empty())
    }
}

/// Rows a stage reads from one input, with its tile-local padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileRead {
    /// Rows of the input tensor read.
    pub rows: Rows,
    /// Padding rows above (the tensor's top edge only).
    pub pad_top: usize,
    /// Padding rows below (the tensor's bottom edge only).
    pub pad_bottom: usize,
}

/// A strip leaving the tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileOutput {
    /// The stage whose output it is.
    pub stage: StageId,
    /// Its rows sent.
    pub rows: Rows,
    /// Its channels sent, when the stage was split by channels; absent for all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Rows>,
}

impl TileSpec {
    /// The shape of input `i`: its strip of rows, and for the summed partial products
    /// of a tile in parts ([`TileStage::summed`]) only the tile's channels of them.
    pub fn input_shape(&self, ir: &Ir, i: usize) -> Vec<usize> {
        let input = self.inputs[i];
        let mut shape = ir.tensor(input.tensor).strip_shape(input.rows);
        let summed = self.summed(input.tensor);
        if let Some((split, c)) = summed.and_then(|st| ir.stage(st.stage).channels.zip(st.channels))
        {
            shape[split.axis] = c.len();
        }
        shape
    }

    /// The stage whose summed partial products input `tensor` is
    /// ([`TileStage::summed`]), if it is such an input.
    pub fn summed(&self, tensor: TensorRef) -> Option<&TileStage> {
        self.stages
            .iter()
            .find(|st| st.summed && TensorRef::Stage(st.stage) == tensor)
    }

    /// The reducing stages whose partial results this tile computes: those of which it
    /// owns rows (a device may own none of a short tensor's rows).
    pub fn partials(&self) -> impl Iterator<Item = StageId> + '_ {
        self.stages
            .iter()
            .filter(|s| s.contributes())
            .map(|s| s.stage)
    }

    /// The tile cut into phases where partial results are combined
    /// (docs/architecture.md, "Reductions across devices"). Phase k runs the stages that
    /// read k combined results one after the other, then its device combines the
    /// partials of [`Phase::combines`]. It outputs its partials, the tensors later phases
    /// read (all rows computed) and the tile's outputs it computes. Later phases read
    /// earlier phases' outputs and the combined results (a partial stage's whole output)
    /// as inputs. Phases are numbered from the model's stages, so every tile of a group
    /// has the same ones (some may run no stage). A tile in parts ([`TileSpec::parts`])
    /// has a phase per part and one summing them. Any other tile is one phase: itself.
    pub fn phases(&self, ir: &Ir) -> Vec<Phase> {
        if let Some(phases) = self.part_phases() {
            return phases;
        }
        if !self.stages.iter().any(|s| s.partial) {
            return vec![Phase {
                spec: self.clone(),
                combines: vec![],
            }];
        }
        let first = self.stages.iter().map(|s| s.stage).min().expect("a stage");
        let last = self.stages.iter().map(|s| s.stage).max().expect("a stage");
        let phase: HashMap<StageId, usize> = (first.0..=last.0)
            .map(StageId)
            .zip(ir.phases(first, last))
            .collect();
        let at: HashMap<StageId, &TileStage> = self.stages.iter().map(|s| (s.stage, s)).collect();
        let count = phase.values().max().map_or(1, |m| m + 1);
        let read_later = |q: StageId, k: usize| {
            self.stages.iter().any(|st| {
                phase[&st.stage] > k && ir.stage(st.stage).inputs.contains(&TensorRef::Stage(q))
            })
        };
        let phase = &phase;
        (0..count)
            .map(|k| {
                let stages: Vec<TileStage> = self
                    .stages
                    .iter()
                    .filter(|st| phase[&st.stage] == k && (!st.partial || st.contributes()))
                    .cloned()
                    .collect();
                let mut inputs: Vec<TileInput> = vec![];
                for st in &stages {
                    for r in &ir.stage(st.stage).inputs {
                        let input = match r {
                            // Computed in this phase.
                            TensorRef::Stage(q)
                                if at.contains_key(q) && phase[q] == k && !at[q].partial =>
                            {
                                continue;
                            }
                            TensorRef::Stage(q) if at.contains_key(q) => TileInput {
                                tensor: *r,
                                rows: at[q].computed,
                            },
                            _ => *self
                                .inputs
                                .iter()
                                .find(|i| i.tensor == *r)
                                .expect("a tile receives what it reads from outside"),
                        };
                        if !inputs.iter().any(|i| i.tensor == input.tensor) {
                            inputs.push(input);
                        }
                    }
                }
                let mut outputs: Vec<TileOutput> = vec![];
                for st in &stages {
                    if st.partial || read_later(st.stage, k) {
                        outputs.push(TileOutput {
                            stage: st.stage,
                            rows: st.computed,
                            channels: None,
                        });
                    } else {
                        outputs.extend(self.outputs.iter().filter(|o| o.stage == st.stage));
                    }
                }
                let combines = self
                    .stages
                    .iter()
                    .filter(|st| st.partial && phase[&st.stage] == k)
                    .map(|st| st.stage)
                    .collect();
                Phase {
                    spec: TileSpec {
                        inputs,
                        stages,
                        outputs,
                        parts: vec![],
                    },
                    combines,
                }
            })
            .collect()
    }

    /// The phases of a tile in parts: one per part, each multiplying its rows of the
    /// flattened input into a partial product of the tile's channels, then one summing
    /// them (its input, the stage's own output) and running the rest of the stage. The
    /// flatten itself runs in each part's phase (it moves no data). `None` for a tile
    /// without parts (or without the one input and the product a tile in parts has).
    fn part_phases(&self) -> Option<Vec<Phase>> {
        let (false, product, [input]) =
            (self.parts.is_empty(), self.stages.last()?, &self.inputs[..])
        else {
            return None;
        };
        let input = input.tensor;
        let mut phases: Vec<Phase> = self
            .parts
            .iter()
            .map(|&rows| Phase {
                spec: TileSpec {
                    inputs: vec![TileInput {
                        tensor: input,
                        rows,
                    }],
                    stages: vec![TileStage {
                        reads: vec![TileRead {
                            rows,
                            pad_top: 0,
                            pad_bottom: 0,
                        }],
                        part: Some(rows),
                        ..product.clone()
                    }],
                    outputs: vec![TileOutput {
                        stage: product.stage,
                        rows: product.computed,
                        channels: product.channels,
                    }],
                    parts: vec![],
                },
                combines: vec![],
            })
            .collect();
        phases.push(Phase {
            spec: TileSpec {
                inputs: vec![TileInput {
                    tensor: TensorRef::Stage(product.stage),
                    rows: product.computed,
                }],
                stages: vec![TileStage {
                    summed: true,
                    ..product.clone()
                }],
                outputs: self.outputs.clone(),
                parts: vec![],
            },
            combines: vec![],
        });
        Some(phases)
    }
}

/// One phase of a tile ([`TileSpec::phases`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Phase {
    /// What the device runs; no stages when it has nothing to compute in this phase.
    pub spec: TileSpec,
    /// The reductions whose partials the group's devices combine after this phase.
    pub combines: Vec<StageId>,
}
