//! Workloads ferry can move, and the verbs that move them: one file per verb
//! (`checkpoint.rs`, `restore.rs`), one module per kind of workload (`process.rs`; container
//! runtimes follow), `doctor.rs`, which says whether this host can do any of it, and `check/`,
//! which says whether a given workload will survive a checkpoint.
#![forbid(unsafe_code)]

pub mod archive;
pub mod check;
mod checkpoint;
pub mod clone;
pub mod container;
mod context;
pub mod doctor;
mod error;
mod host;
mod inspect;
mod netlock;
mod paged;
mod paged_dump;
mod process;
mod remove;
mod restore;
mod workload;

pub use checkpoint::{
    checkpoint, checkpoint_with, CheckpointReport, CheckpointRequest, NoPostDump, PostDump,
};
pub use context::{require_root, Context};
pub use error::Error;
pub use ferry_store::progress::{Joint, Progress, SharedProgress, Silent};
pub use host::host_facts;
pub use inspect::{inspect, ContainerChanges, Inspection};
pub use paged::{
    verify_pages, write_images_for_pager, PagePlan, PagedRestore, PushFirst, SharedPages, VerifiedPages,
};
pub use process::ProcessRuntime;
pub use remove::{remove, RemoveReport};
pub use restore::{
    restore, restore_container, restore_then, ContainerRestore, RestoreReport, RestoreRequest, NETNS_KEY,
};
pub use workload::{Runtime, TreeRoot, WorkloadId};
