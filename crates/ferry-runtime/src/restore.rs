//! `restore`: recreate a checkpointed tree from the store.
//!
//! Nothing from a checkpoint reaches CRIU unverified: the manifest's signature and catalog
//! entry are checked when it is opened, and every chunk's tag and hash while the images are
//! written into a private tmpfs; only then does CRIU read them. The tmpfs is gone when this
//! returns, on every path.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use std::path::Path;

use ferry_criu::{LogTarget, RecordingNotify, RestoreOptions, SharedOptions};

use crate::container::{ContainerRecord, CriuConfig, RestoreSpec, Restored};
use crate::{Context, Error};

#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    pub name: String,
    /// A container's name under its runtime (default: the name it had).
    pub new_name: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// Host PID of the restored root; for a process tree, a child of this process (CRIU
    /// restores it as our sibling); a container's belongs to its runtime.
    pub pid: i32,
    /// The restored container (`KIND:NAME`), if the checkpoint is of one.
    pub container: Option<String>,
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
    if let Some(record) = ContainerRecord::read_from(&images)? {
        let work_dir = ctx.store.logs_dir().join(format!("restore-{}-{stamp}", req.name));
        let restored = restore_container(
            ctx,
            &ContainerRestore {
                record: &record,
                images: &images,
                name: req.new_name.as_deref(),
                netns: None,
                work_dir: &work_dir,
                lazy: false,
                tcp_established: checkpoint.manifest.tcp_established,
            },
        )?;
        drop(scratch);
        return Ok(RestoreReport {
            pid: restored.pid,
            container: Some(format!("{}:{}", record.kind, restored.name)),
            verify_seconds,
            seconds: started.elapsed().as_secs_f64(),
            log: work_dir.join(crate::container::criu_conf::LOG_FILE),
        });
    }
    if req.new_name.is_some() {
        return Err(Error::InvalidWorkload {
            input: req.name.clone(),
            why: "--name renames containers; this checkpoint is of a process tree".into(),
        });
    }
    let log = LogTarget::new(ctx.store.logs_dir(), format!("restore-{}-{stamp}.log", req.name));
    let opts = RestoreOptions::new(&images, log.clone())
        .tcp_established(checkpoint.manifest.tcp_established)
        .restore_sibling(true);
    tracing::info!(name = %req.name, "restoring");
    let outcome = ctx.criu.restore(&opts, &mut RecordingNotify::default())?;
    drop(scratch);
    Ok(RestoreReport {
        pid: outcome.pid,
        container: None,
        verify_seconds,
        seconds: started.elapsed().as_secs_f64(),
        log: log.path(),
    })
}

/// A container's restore under its runtime, from verified images.
#[derive(Debug, Clone)]
pub struct ContainerRestore<'a> {
    pub record: &'a ContainerRecord,
    /// The verified images, in a private tmpfs that outlives the restore.
    pub images: &'a Path,
    /// Its name under the runtime (default: the recorded one).
    pub name: Option<&'a str>,
    /// The network namespace it joins (default: the recorded one).
    pub netns: Option<&'a Path>,
    /// ferry's directory for this restore: CRIU's configuration and log (and, for a lazy
    /// restore, the socket of ferry's pager).
    pub work_dir: &'a Path,
    pub lazy: bool,
    pub tcp_established: bool,
}

/// Recreates a container under its runtime and restores it; a failure leaves nothing behind.
pub fn restore_container(ctx: &Context, r: &ContainerRestore<'_>) -> Result<Restored, Error> {
    let t0 = Instant::now();
    let name = r.name.unwrap_or(&r.record.name);
    crate::container::record::validate_name("name", name, false)?;
    let rt = crate::container::open(&r.record.kind, &ctx.endpoints)?;
    let workload = format!("{}:{name}", r.record.kind);
    crate::container::preflight(&ctx.endpoints, r.record, name)?;
    std::fs::create_dir_all(r.work_dir)
        .map_err(|e| Error::Container(format!("cannot create {}: {e}", r.work_dir.display())))?;
    let conf = CriuConfig {
        images_dir: r.images.to_path_buf(),
        work_dir: r.work_dir.to_path_buf(),
        lazy_pages: r.lazy,
        tcp_established: r.tcp_established,
    };
    let conf_path = r.work_dir.join("criu.conf");
    conf.write(&conf_path)?;
    let spec = RestoreSpec {
        record: r.record,
        name,
        images: r.images,
        criu_config: &conf_path,
        log: &conf.log_path(),
        scratch: r.work_dir,
        netns: r.netns,
    };
    let t_checked = t0.elapsed();
    tracing::info!(%workload, "restoring a container");
    let restored = rt.restore(&spec).inspect_err(|e| {
        tracing::warn!(%workload, error = %e, "the restore failed: removing what it created");
        rt.discard(name);
    });
    // The spec keeps naming the file for the container's whole life, and runc hands it to every
    // later CRIU run (a `runc checkpoint`, a runtime's own checkpoint): gone, CRIU reads it as
    // empty, instead of pointing such a run at this restore's images.
    let _ = std::fs::remove_file(&conf_path);
    // Where a container's restore spends its time: ferry's checks, the runtime's restore, and
    // within it CRIU's (its log's last timestamp).
    tracing::info!(
        %workload,
        checks_s = t_checked.as_secs_f64(),
        runtime_s = (t0.elapsed() - t_checked).as_secs_f64(),
        criu_s = criu_log_seconds(&conf.log_path()).unwrap_or(-1.0),
        "container restore steps"
    );
    restored
}

/// The last timestamp of a CRIU log (`(SS.UUUUUU)` at the start of its lines): how long CRIU ran.
fn criu_log_seconds(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|l| l.strip_prefix('(')?.split_once(')')?.0.trim().parse().ok())
}
