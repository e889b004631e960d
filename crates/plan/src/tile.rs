//! Tile programs. A [`TileSpec`] is what one device runs for one fused group:
//! everything the partition pass computed, so a worker needs no compiler pass.

use legion_ir::{Rows, StageId, TensorRef};
use serde::{Deserialize, Serialize};

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
