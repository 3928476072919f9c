//! `inspect`: what a checkpoint holds, read from its verified images in a private tmpfs.

use ferry_criu::inspect::{summarize, Summary};
use ferry_store::{Checkpoint, Footprint, StoreError};

use crate::{Context, Error};

#[derive(Debug, Clone)]
pub struct Inspection {
    pub checkpoint: Checkpoint,
    pub footprint: Footprint,
    pub summary: Summary,
    /// The container it holds, if it is of one.
    pub container: Option<ContainerChanges>,
}

/// A checkpointed container and the changes to its root filesystem it carries.
#[derive(Debug, Clone)]
pub struct ContainerChanges {
    pub record: crate::container::ContainerRecord,
    /// Bytes of `rootfs-diff.tar` (added and changed files).
    pub rootfs_diff_bytes: u64,
    /// Paths deleted since it started.
    pub deleted: Vec<String>,
}

pub fn inspect(ctx: &Context, name: &str) -> Result<Inspection, Error> {
    let checkpoint = ctx.store.get(name)?;
    let (all, _) = ctx.store.list()?;
    let footprint = checkpoint.footprint(&ctx.store, &all)?;
    let scratch = ctx.store.scratch(&format!("inspect-{name}"))?;
    let images = scratch.path().join("images");
    std::fs::create_dir(&images).map_err(|source| StoreError::Io {
        action: "cannot create",
        path: images.clone(),
        source,
    })?;
    checkpoint.materialize(&ctx.store, &images)?;
    let summary = summarize(&images).map_err(|e| StoreError::Damaged {
        name: name.to_owned(),
        file: "images".into(),
        detail: e.to_string(),
    })?;
    let container = match crate::container::ContainerRecord::read_from(&images)? {
        Some(record) => {
            let diff = images.join(crate::container::record::ROOTFS_DIFF_FILE);
            let deleted = images.join(crate::container::record::DELETED_FILES_FILE);
            Some(ContainerChanges {
                record,
                rootfs_diff_bytes: std::fs::metadata(&diff).map(|m| m.len()).unwrap_or(0),
                deleted: if deleted.exists() {
                    crate::container::rootfs::read_deleted(&deleted)?
                } else {
                    Vec::new()
                },
            })
        }
        None => None,
    };
    Ok(Inspection { checkpoint, footprint, summary, container })
}
