//! A typed client of CRIU's RPC protocol (`criu swrk`): dump, restore, check, feature check and
//! version, with CRIU's notify messages answered through [`NotifyHandler`], and failures
//! classified from CRIU's log into a [`Cause`] that says what to do.
#![forbid(unsafe_code)]

pub mod classify;
mod client;
pub mod cwd_lock;
mod error;
pub mod image;
pub mod inspect;
mod notify;
mod options;
pub mod rpc;
mod version;

pub use classify::{classify_log, Cause};
pub use client::{Criu, DumpOutcome, FeatureSet, RestoreOutcome, DEFAULT_TIMEOUT};
pub use error::{CriuError, Operation};
pub use notify::{Notify, NotifyHandler, RecordingNotify};
pub use options::{
    ContainerDump, DumpOptions, LogLevel, LogTarget, NetworkLock, RestoreOptions, Shared, SharedOptions,
};
pub use version::{Version, MIN_VERSION};
