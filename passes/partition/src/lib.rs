//! Partition pass: for a fused group of stages and a cut of its output rows into
//! per-device strips, what every device computes, receives and sends
//! (docs/architecture.md, "Row maps and halos"). Pure geometry: no profiling, no tract.

mod channels;
mod held;
mod rows;
mod shares;
mod tiling;

pub use channels::{
    channel_tile, check_channel_group, product_in_parts, split_chain, tile_weight_bytes,
    weights_per_board, worth_channels,
};
pub use held::Held;
pub use legion_ir::Rows;
pub use rows::{InputRows, StageRows, row_map, window_rows};
pub use shares::{cut, rebalance, strips_from_weights};
pub use tiling::{
    Group, GroupTiler, PartitionError, Received, Reductions, StageInTile, SuffixTiler, Tile,
    TileView, Tiling, Walk, boundary, candidate_groups, check_group, combinable, combined_inside,
    scale_cut, tile, whole_group, whole_stage,
};
