//! `doctor`: can this host checkpoint and restore? Each finding says what was checked, the
//! verdict and why; only `Fail` findings make checkpoint or restore impossible.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_criu::{Criu, LogTarget, MIN_VERSION};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, with a limit worth knowing.
    Warn,
    /// Checkpoint or restore cannot work until this is fixed.
    Fail,
    /// Information only (optional runtimes).
    Info,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
}

impl Finding {
    fn new(check: &'static str, status: Status, detail: impl Into<String>) -> Finding {
        Finding { check, status, detail: detail.into() }
    }
}

/// True when no finding is a failure.
pub fn can_checkpoint(findings: &[Finding]) -> bool {
    findings.iter().all(|f| f.status != Status::Fail)
}

/// Runs every check. `criu` is what `Criu::locate` found (or its error text); `logs_dir` is
/// where `criu check` may write its log.
pub fn run(criu: Result<Criu, String>, logs_dir: &Path) -> Vec<Finding> {
    let mut out = vec![privileges()];
    out.extend(kernel());
    out.extend(criu_checks(criu, logs_dir));
    out.push(network_lock());
    out.extend(runtimes());
    out
}

fn privileges() -> Finding {
    let uid = ferry_sys::effective_uid();
    if uid == 0 {
        Finding::new("privileges", Status::Ok, "running as root")
    } else {
        Finding::new(
            "privileges",
            Status::Fail,
            format!("effective uid {uid}: checkpoint and restore need root"),
        )
    }
}

fn kernel() -> Vec<Finding> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // Both files exist only with CONFIG_CHECKPOINT_RESTORE.
    let cr = Path::new("/proc/sys/kernel/ns_last_pid").exists() && Path::new("/proc/self/map_files").exists();
    let uffd =
        Path::new("/proc/sys/vm/unprivileged_userfaultfd").exists() || Path::new("/dev/userfaultfd").exists();
    vec![
        Finding::new("kernel", Status::Info, format!("Linux {}", release.trim())),
        if cr {
            Finding::new("CHECKPOINT_RESTORE", Status::Ok, "kernel built with checkpoint/restore support")
        } else {
            Finding::new("CHECKPOINT_RESTORE", Status::Fail, "kernel lacks CONFIG_CHECKPOINT_RESTORE")
        },
        if uffd {
            Finding::new("userfaultfd", Status::Ok, "available (lazy restore, post-copy migration)")
        } else {
            Finding::new("userfaultfd", Status::Warn, "not available: no lazy restore or post-copy migration")
        },
    ]
}

fn criu_checks(criu: Result<Criu, String>, logs_dir: &Path) -> Vec<Finding> {
    let criu = match criu {
        Ok(c) => c,
        Err(why) => return vec![Finding::new("criu", Status::Fail, format!("{why}; run scripts/setup"))],
    };
    let version = match criu.version() {
        Ok(v) => v,
        Err(e) => return vec![Finding::new("criu", Status::Fail, format!("{}: {e}", criu.path().display()))],
    };
    if version < MIN_VERSION {
        return vec![Finding::new(
            "criu",
            Status::Fail,
            format!(
                "{version} at {} is too old (need >= {MIN_VERSION}: older releases fail on this kernel); \
                 run scripts/setup",
                criu.path().display()
            ),
        )];
    }
    let mut out = vec![Finding::new("criu", Status::Ok, format!("{version} at {}", criu.path().display()))];
    let log = LogTarget::new(PathBuf::from(logs_dir), "doctor-criu-check.log");
    out.push(match criu.check(&log) {
        Ok(()) => Finding::new("criu check", Status::Ok, "looks good"),
        Err(e) => Finding::new("criu check", Status::Fail, format!("{e} (log: {})", log.path().display())),
    });
    out.push(match criu.features() {
        Ok(f) if f.mem_track => Finding::new("dirty tracking", Status::Ok, "soft-dirty available"),
        Ok(_) => Finding::new(
            "dirty tracking",
            Status::Warn,
            "no soft-dirty (CONFIG_MEM_SOFT_DIRTY): CRIU's pre-dump cannot work; ferry pre-copies by content",
        ),
        Err(e) => Finding::new("dirty tracking", Status::Warn, format!("feature check failed: {e}")),
    });
    out
}

fn network_lock() -> Finding {
    match tool_version("nft", &["--version"]) {
        Some(v) => {
            Finding::new("nftables", Status::Ok, format!("{v} (holds connections for --tcp-established)"))
        }
        None => {
            Finding::new("nftables", Status::Warn, "nft missing: --tcp-established cannot hold connections")
        }
    }
}

fn runtimes() -> Vec<Finding> {
    [("runc", "--version"), ("podman", "--version"), ("containerd", "--version"), ("docker", "--version")]
        .iter()
        .map(|(bin, arg)| match tool_version(bin, &[arg]) {
            Some(v) => Finding::new(runtime_label(bin), Status::Info, v),
            None => Finding::new(runtime_label(bin), Status::Info, "not installed"),
        })
        .collect()
}

fn runtime_label(bin: &str) -> &'static str {
    match bin {
        "runc" => "runtime runc",
        "podman" => "runtime podman",
        "containerd" => "runtime containerd",
        _ => "runtime docker",
    }
}

/// First line of `bin ARGS`, if it runs and succeeds.
fn tool_version(bin: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(bin).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next().unwrap_or("").trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_blocks_and_warnings_do_not() {
        let ok = Finding::new("a", Status::Ok, "");
        let warn = Finding::new("b", Status::Warn, "");
        let fail = Finding::new("c", Status::Fail, "");
        assert!(can_checkpoint(&[ok.clone(), warn.clone()]));
        assert!(!can_checkpoint(&[ok, warn, fail]));
    }

    #[test]
    fn missing_criu_is_a_failure_with_a_remedy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let f = criu_checks(Err("no criu in $PATH".into()), tmp.path());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].status, Status::Fail);
        assert!(f[0].detail.contains("scripts/setup"));
    }
}
