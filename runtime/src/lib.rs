//! Legion's runtime: builds and runs the tract model of a tile (one device's part of a
//! fused group) and runs whole models as the single-device reference.

pub mod check;
mod reference;
mod tile;

pub use reference::Reference;
pub use tile::Tile;
mod client;
pub mod proto;
mod wire;
mod worker;

pub use client::{DEFAULT_TIMEOUT, ModelId, WorkerClient};
pub use wire::sha256_hex;
pub use worker::{Worker, WorkerConfig};

/// Largest gRPC message a worker or client accepts: strips of big layers exceed tonic's
/// 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;
