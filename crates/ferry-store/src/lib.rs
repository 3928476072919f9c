//! ferry's checkpoint store. For now each checkpoint is a directory of CRIU images plus a
//! versioned `meta.json`; the secure, content-addressed format replaces it behind the same API.
//!
//! Layout under the store root (all directories mode 0700):
//! ```text
//! checkpoints/NAME/meta.json      versioned description, written last
//! checkpoints/NAME/images/        CRIU's image files (flat)
//! logs/                           CRIU logs of every operation, kept for diagnosis
//! tmp/                            checkpoints being written; never listed
//! ```
#![forbid(unsafe_code)]

mod error;
mod ingest;
mod meta;
mod name;
pub mod packs;
mod store;

pub use error::StoreError;
pub use ingest::Ingest;
pub use meta::{CheckpointMeta, FileEntry, HostFacts, FORMAT_VERSION, MAX_META_BYTES};
pub use name::validate_name;
pub use store::{Checkpoint, Pending, Store};
