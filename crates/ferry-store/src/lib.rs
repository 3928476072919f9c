//! ferry's checkpoint store: checkpoints as signed manifests over encrypted, deduplicated,
//! compressed chunks (docs/store-format.md has every format).
//!
//! - `keys`: the node's signing, key-agreement and chunk-hashing keys; recipients.
//! - `seal`: chunk frames (AES-256-GCM, or XChaCha20-Poly1305; zstd), data keys and their slots.
//! - `manifest`: the signed description of a checkpoint.
//! - `packs`: where sealed chunks live.
//! - `pipeline`: CRIU's images to chunks, while CRIU writes them.
//! - `catalog`: the current manifest of each name (rollback detection).
//! - `store`: the whole, as the rest of ferry uses it.
//! - `replica`: a checkpoint copied to another node's store (migration), missing chunks only.
//! - `archive` (`oci`): a checkpoint as one file, to take elsewhere (`ferry export`, `import`).
//! - `progress`: how long operations (here and above) report how far they are.
//! - `working_set`: the pages a lazy restore faulted on, prefetched by the next (a hint).
#![forbid(unsafe_code)]

pub mod archive;
pub mod catalog;
mod error;
mod fsutil;
pub mod keys;
pub mod manifest;
mod name;
mod oci;
pub mod packs;
pub mod pipeline;
pub mod progress;
mod reader;
pub mod replica;
pub mod seal;
mod store;
#[cfg(test)]
mod testutil;
pub mod working_set;

pub use error::StoreError;
pub use manifest::HostInfo;
pub use name::validate_name;
pub use pipeline::IngestStats;
pub use progress::{Progress, SharedProgress, Silent};
pub use reader::{Cursor, ImageReader};
pub use store::{
    rotate_keys, Checkpoint, CheckpointInfo, Committed, Footprint, GcReport, Pending, Store, VerifyReport,
};
