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
    /// Strips sent, one per tensor leaving the group, in this order.
    pub outputs: Vec<TileOutput>,
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
    /// has the same ones (some may run no stage). A tile without partials is one phase:
    /// itself.
    pub fn phases(&self, ir: &Ir) -> Vec<Phase> {
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
                    },
                    combines,
                }
            })
            .collect()
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
