//! Legion's runtime: builds and runs the tract model of a tile (one device's part of a
//! fused group) and runs whole models as the single-device reference.

pub mod check;
mod reference;
mod tile;

pub use reference::Reference;
pub use tile::Tile;
