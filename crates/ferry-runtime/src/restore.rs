//! `restore`: recreate a checkpointed tree from the store.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_criu::{LogTarget, RecordingNotify, RestoreOptions};

use crate::{Context, Error};

#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// Host PID of the restored root; a child of this process (CRIU restores it as our sibling).
    pub pid: i32,
    pub seconds: f64,
    pub log: PathBuf,
}

pub fn restore(ctx: &Context, req: &RestoreRequest) -> Result<RestoreReport, Error> {
    let checkpoint = ctx.store.get(&req.name)?;
    // Nothing reaches CRIU from a checkpoint that is not whole.
    checkpoint.verify()?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let log = LogTarget::new(ctx.store.logs_dir(), format!("restore-{}-{stamp}.log", req.name));
    let opts = RestoreOptions::new(checkpoint.images_dir(), log.clone())
        .tcp_established(checkpoint.meta.tcp_established)
        .restore_sibling(true);
    tracing::info!(name = %req.name, "restoring");
    let started = Instant::now();
    let outcome = ctx.criu.restore(&opts, &mut RecordingNotify::default())?;
    Ok(RestoreReport {
        pid: outcome.pid,
        seconds: started.elapsed().as_secs_f64(),
        log: log.path(),
    })
}
