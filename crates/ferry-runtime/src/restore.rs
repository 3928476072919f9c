//! `restore`: recreate a checkpointed tree from the store.
//!
//! Nothing from a damaged checkpoint may run. The structure (every file present, of its size)
//! is checked before CRIU starts; the content hashes are checked on another thread while CRIU
//! restores, and CRIU's pre-resume notification waits for that check: a mismatch makes CRIU
//! abort and kill the tree before it ever runs. So verification costs no extra downtime.

use std::path::PathBuf;
use std::thread::{self, JoinHandle};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_criu::{LogTarget, Notify, NotifyHandler, RestoreOptions};
use ferry_store::{Checkpoint, StoreError};

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
    let mut gate = VerifyGate::start(checkpoint);
    let restored = ctx.criu.restore(&opts, &mut gate);
    // A content mismatch explains a failed restore better than whatever CRIU logged.
    let verdict = gate.verdict();
    let outcome = match (restored, verdict) {
        (_, Err(damage)) => return Err(damage.into()),
        (Err(e), Ok(())) => return Err(e.into()),
        (Ok(o), Ok(())) => o,
    };
    Ok(RestoreReport {
        pid: outcome.pid,
        seconds: started.elapsed().as_secs_f64(),
        log: log.path(),
    })
}

/// Verifies the checkpoint's content beside CRIU and holds the tree before it resumes until the
/// verdict is in.
struct VerifyGate {
    check: Option<JoinHandle<Result<(), StoreError>>>,
    result: Option<Result<(), StoreError>>,
}

impl VerifyGate {
    fn start(checkpoint: Checkpoint) -> VerifyGate {
        let check = thread::Builder::new()
            .name("ferry-verify".into())
            .spawn(move || checkpoint.verify_content());
        match check {
            Ok(handle) => VerifyGate {
                check: Some(handle),
                result: None,
            },
            Err(e) => VerifyGate {
                check: None,
                result: Some(Err(StoreError::Io {
                    action: "cannot start verification of",
                    path: PathBuf::from("the checkpoint"),
                    source: e,
                })),
            },
        }
    }

    /// Waits for the content check (once) and returns its result.
    fn verdict(&mut self) -> Result<(), StoreError> {
        if let Some(handle) = self.check.take() {
            let result = handle.join().unwrap_or_else(|_| {
                Err(StoreError::Io {
                    action: "verification crashed for",
                    path: PathBuf::from("the checkpoint"),
                    source: std::io::Error::other("verify thread panicked"),
                })
            });
            self.result = Some(result);
        }
        match &self.result {
            Some(Err(e)) => Err(clone_damage(e)),
            _ => Ok(()),
        }
    }
}

impl NotifyHandler for VerifyGate {
    fn notify(&mut self, event: &Notify, _pid: Option<i32>) -> Result<(), String> {
        if *event != Notify::PreResume {
            return Ok(());
        }
        self.verdict().map_err(|e| e.to_string())
    }
}

/// StoreError holds an io::Error and is not Clone; the gate reports the verdict twice (to CRIU
/// and to the caller), so rebuild it.
fn clone_damage(e: &StoreError) -> StoreError {
    match e {
        StoreError::Damaged { name, file, detail } => StoreError::Damaged {
            name: name.clone(),
            file: file.clone(),
            detail: detail.clone(),
        },
        other => StoreError::Damaged {
            name: String::new(),
            file: String::new(),
            detail: other.to_string(),
        },
    }
}
