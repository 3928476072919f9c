//! `restore`: recreate a checkpointed tree from the store.
//!
//! Nothing from a checkpoint reaches CRIU unverified: the manifest's signature and catalog
//! entry are checked when it is opened, and every chunk's tag and hash while the images are
//! written into a private tmpfs; only then does CRIU read them. The tmpfs is gone when this
//! returns, on every path.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_criu::{LogTarget, RecordingNotify, RestoreOptions, SharedOptions};

use crate::{Context, Error};

#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// Host PID of the restored root; a child of this process (CRIU restores it as our sibling).
    pub pid: i32,
    /// Time to verify and decrypt the images.
    pub verify_seconds: f64,
    pub seconds: f64,
    pub log: PathBuf,
}

pub fn restore(ctx: &Context, req: &RestoreRequest) -> Result<RestoreReport, Error> {
    let checkpoint = ctx.store.get(&req.name)?;
    let started = Instant::now();
    let scratch = ctx.store.scratch(&format!("restore-{}", req.name))?;
    let images = scratch.path().join("images");
    std::fs::create_dir(&images).map_err(|source| ferry_store::StoreError::Io {
        action: "cannot create",
        path: images.clone(),
        source,
    })?;
    checkpoint.materialize(&ctx.store, &images)?;
    let verify_seconds = started.elapsed().as_secs_f64();

    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let log = LogTarget::new(ctx.store.logs_dir(), format!("restore-{}-{stamp}.log", req.name));
    let opts = RestoreOptions::new(&images, log.clone())
        .tcp_established(checkpoint.manifest.tcp_established)
        .restore_sibling(true);
    tracing::info!(name = %req.name, "restoring");
    let outcome = ctx.criu.restore(&opts, &mut RecordingNotify::default())?;
    drop(scratch);
    Ok(RestoreReport {
        pid: outcome.pid,
        verify_seconds,
        seconds: started.elapsed().as_secs_f64(),
        log: log.path(),
    })
}
