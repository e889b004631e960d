//! Legion's file formats: the tile program a worker runs ([`TileSpec`]), the cluster
//! file that names the devices ([`Cluster`]), the profile measured on them
//! ([`Profile`]), the plan compiled for them ([`Plan`]), the cut of the cluster into
//! sub-clusters for a stream ([`ServingPlan`]) and the timings the runtime reports
//! ([`StepTiming`]).

mod cluster;
mod emulation;
pub mod network;
mod plan;
mod profile;
mod serving;
mod tile;
mod timing;
mod transport;

pub use cluster::{Cluster, ClusterError, CoordinatorLink, Device, DeviceId, Link, PAPER_SETUPS};
pub use emulation::{BOARD_CLASSES, BadEmulation, BoardClass, Emulation, VGG16_FLOPS};
pub use plan::{Candidate, PLAN_VERSION, Party, Plan, PlanGroup, PlanTile, Program, Step};
pub use profile::{
    DeviceProfile, GroupMeasurement, LinkProbe, PROFILE_VERSION, Profile, ProfileMode, Sample,
    StageProfile,
};
pub use serving::{SERVING_VERSION, ServingPlan, SubCluster};
pub use tile::{Phase, TileInput, TileOutput, TileRead, TileSpec, TileStage};
pub use timing::{Clock, DeviceTiming, HOST_DRIFT_LIMIT, HostRates, RunResults, StepTiming};
pub use transport::Transport;
