//! `inspect`: what a checkpoint holds, read from its verified images in a private tmpfs.

use ferry_criu::inspect::{summarize, Summary};
use ferry_store::{Checkpoint, Footprint, StoreError};

use crate::{Context, Error};

#[derive(Debug, Clone)]
pub struct Inspection {
    pub checkpoint: Checkpoint,
    pub footprint: Footprint,
    pub summary: Summary,
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
    Ok(Inspection { checkpoint, footprint, summary })
}
