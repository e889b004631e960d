//! Legion's runtime: builds and runs the tract model of a tile (one device's part of a
//! fused group), the worker that serves tiles over gRPC on a board (emulated or real),
//! the coordinator that drives a cluster of workers, and the single-device reference.

pub mod check;

mod combine;
pub mod emulate;
mod reference;
mod tile;
pub mod tls;

pub use combine::combine;
pub use reference::Reference;
pub use tile::{ShippedTiles, TileModel, export_tile};
mod client;
pub mod process;
pub mod proto;
pub mod serve;
mod wire;
mod worker;

mod coordinator;
mod execute;
mod local;
mod programs;
mod tensors;

pub use client::{DEFAULT_TIMEOUT, ModelId, TileResult, WorkerClient};
pub use coordinator::{COMPUTE_TIMEOUT, ConnectedDevice, Coordinator};
pub use execute::{PlanRun, run_candidate};
pub use local::{LocalCluster, default_cache_dir, local_cluster};
pub use programs::{LoadedPrograms, RECEIVE_TIMEOUT};
pub use tensors::Tensors;
pub use wire::{from_wire, sha256_hex, to_wire};
pub use worker::{Compute, Limits, TILE_CACHE, Worker, WorkerConfig, authorize};

/// Largest gRPC message a worker or client accepts: strips of big layers exceed tonic's
/// 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;
