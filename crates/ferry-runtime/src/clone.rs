//! `clone`: running copies of one checkpoint at the same time. Each copy gets a pid namespace
//! of its own (CRIU makes one for a tree that was the root of its own), the network namespace
//! its caller made for it (with its own address: the tree's own namespace was declared
//! external at the checkpoint) and, where the tree has a UTS namespace of its own, its own host
//! name. Where the copies go (which node, which address) is the caller's business: the lab's
//! nodes for `ferry clone --to`.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use ferry_store::{Checkpoint, StoreError};

use crate::checkpoint::{checkpoint, CheckpointReport, CheckpointRequest};
use crate::restore::{restore_then, RestoreReport, RestoreRequest, NETNS_KEY};
use crate::workload::WorkloadId;
use crate::{Context, Error};

/// At most this many copies in one call: each is a full restore (its own memory).
pub const MAX_REPLICAS: usize = 64;

/// Where a checkpoint's network namespace is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Declared external: each restore is handed a namespace (a clone's own address).
    External,
    /// Dumped with the tree, addresses and all: every copy would come back with the same one.
    Carried,
    /// The host's (not dumped): every copy would share the host's ports.
    Host,
}

/// What the checkpoint's images say of its network namespace: CRIU writes `netns-ID.img` for a
/// namespace it dumps or was told is external, and its devices (`netdev-ID.img`) only for
/// one it dumps.
pub fn network_of(checkpoint: &Checkpoint) -> Network {
    let has = |prefix: &str| checkpoint.manifest.files.iter().any(|f| f.name.starts_with(prefix));
    match (has("netns-"), has("netdev-")) {
        (_, true) => Network::Carried,
        (true, false) => Network::External,
        (false, false) => Network::Host,
    }
}

/// Refuses, before anything is restored, a checkpoint whose copies could not run side by
/// side: a container (clones under a runtime are not done yet), a tree in the host's pid
/// namespace (its PIDs are taken), a network namespace that is not external.
pub fn check_clonable(ctx: &Context, name: &str) -> Result<Checkpoint, Error> {
    let checkpoint = ctx.store.get(name)?;
    let refuse = |why: &str| Error::NotClonable { what: name.to_owned(), why: why.to_owned() };
    if checkpoint.manifest.files.iter().any(|f| f.name == crate::container::record::RECORD_FILE) {
        return Err(refuse(
            "it is of a container; clones of containers under their runtime are not done yet",
        ));
    }
    match network_of(&checkpoint) {
        Network::External => {}
        Network::Carried => {
            return Err(refuse(
                "it carries its network namespace with its address, so every copy would have the same one",
            ))
        }
        Network::Host => {
            return Err(refuse(
                "its processes used the host's network namespace, so the copies would share its ports",
            ))
        }
    }
    if root_pid(ctx, &checkpoint)? != 1 {
        return Err(refuse(
            "its root was not PID 1 of a pid namespace of its own, so every copy would need the same PIDs",
        ));
    }
    Ok(checkpoint)
}

/// The checkpointed root's PID, read from the verified `pstree.img` alone.
fn root_pid(ctx: &Context, checkpoint: &Checkpoint) -> Result<i32, Error> {
    let name = &checkpoint.manifest.name;
    let scratch = ctx.store.scratch(&format!("clone-{name}"))?;
    let dir = scratch.path().join("images");
    std::fs::create_dir(&dir).map_err(|source| StoreError::Io {
        action: "cannot create",
        path: dir.clone(),
        source,
    })?;
    checkpoint.materialize_except(&ctx.store, &dir, &|f| f != "pstree.img")?;
    ferry_criu::inspect::root_pid(&dir).map_err(|e| {
        Error::Store(StoreError::Damaged {
            name: name.clone(),
            file: "pstree.img".into(),
            detail: e.to_string(),
        })
    })
}

/// Checkpoints a live workload for cloning: it keeps running, and its network namespace is
/// declared external so that each copy can get its own. It must be the root of a pid and a
/// network namespace of its own (a lab workload, a pod).
pub fn checkpoint_for_clone(
    ctx: &Context,
    workload: &WorkloadId,
    name: Option<String>,
    tcp_established: bool,
) -> Result<CheckpointReport, Error> {
    let WorkloadId::Pid(pid) = *workload else {
        return Err(Error::NotClonable {
            what: workload.to_string(),
            why: "clones of containers under their runtime are not done yet".into(),
        });
    };
    let refuse = |why: &str| Error::NotClonable { what: workload.to_string(), why: why.to_owned() };
    if !ferry_sys::process_exists(pid) {
        return Err(Error::ProcessNotFound { pid });
    }
    if ns_pids(pid).last() != Some(&1) || ns_pids(pid).len() < 2 {
        return Err(refuse(
            "it is not PID 1 of a pid namespace of its own, so every copy would need its PIDs",
        ));
    }
    let Some(netns) = own_namespace(pid, "net") else {
        return Err(refuse("it uses the host's network namespace, so the copies would share its ports"));
    };
    let req = CheckpointRequest {
        workload: workload.clone(),
        name,
        leave_running: true,
        tcp_established,
        keep: None,
        external: vec![format!("net[{netns}]:{NETNS_KEY}")],
        lazy_pages: None,
        log_level: None,
        volatile: false,
    };
    checkpoint(ctx, &req)
}

/// One copy to restore.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    /// Tells this restore's logs and scratch apart from the others'.
    pub index: usize,
    /// The network namespace it runs in (a bind-mounted namespace file).
    pub netns: PathBuf,
    /// Its host name, set in its own UTS namespace before it runs.
    pub hostname: String,
    /// Let it run before its memory is complete (post-copy from the store, ferry's pager).
    pub lazy: bool,
    /// The checkpoint's pages checked and decrypted once for every copy ([`crate::verify_pages`]);
    /// with `lazy`, the copy runs at once and its pages come from there.
    pub verified: Option<Arc<crate::SharedPages>>,
    /// With `lazy`: the guard program that kills the copy should this process die before its
    /// memory is complete (as `RestoreRequest::guard`).
    pub guard: Option<Vec<String>>,
}

/// Called with a copy's pid and host name (`None`: the host's) as soon as it runs.
pub type OnRunning<'a> = dyn FnMut(i32, Option<&str>) -> Result<(), Error> + 'a;

/// A copy that runs.
#[derive(Debug, Clone)]
pub struct Replica {
    pub report: RestoreReport,
    /// `None`: the tree shares the host's UTS namespace, so it has the host's name.
    pub hostname: Option<String>,
}

/// Restores one copy of `name` (checked by [`check_clonable`]) into `spec.netns`, under its
/// own host name from before it runs; `running` is called with its pid and host name (`None`:
/// the host's) as soon as it runs
/// (with `spec.lazy`, before its memory is complete). A copy that ended at once is returned
/// as it is (`is_running` tells), for the caller to judge.
pub fn restore_replica(
    ctx: &Context,
    name: &str,
    spec: &ReplicaSpec,
    running: &mut OnRunning<'_>,
) -> Result<Replica, Error> {
    validate_hostname(&spec.hostname)?;
    let fd = File::open(&spec.netns).map_err(|source| StoreError::Io {
        action: "cannot open the network namespace",
        path: spec.netns.clone(),
        source,
    })?;
    let req = RestoreRequest {
        name: name.to_owned(),
        netns: Some(Arc::new(OwnedFd::from(fd))),
        instance: Some(format!("clone{}", spec.index)),
        tcp_close: true,
        hostname: Some(spec.hostname.clone()),
        lazy: spec.lazy,
        guard: spec.guard.clone(),
        verified: spec.verified.clone(),
        ..Default::default()
    };
    let mut hostname = None;
    let report = restore_then(ctx, &req, &mut |pid| {
        // Set at post-restore when the tree has a UTS namespace of its own.
        hostname = own_namespace(pid, "uts").map(|_| spec.hostname.clone());
        running(pid, hostname.as_deref())
    })?;
    Ok(Replica { report, hostname })
}

/// Names a restored tree that has a UTS namespace of its own (one in this host's is left
/// alone: renaming it would rename the host).
pub(crate) fn name_tree(pid: i32, name: &str) -> Result<(), Error> {
    match own_namespace(pid, "uts") {
        Some(_) => set_hostname(pid, name),
        None => Ok(()),
    }
}

/// Sets the host name inside `pid`'s UTS namespace (`nsenter` + `hostname`, util-linux and
/// Debian's hostname: no unsafe code for a setns here).
fn set_hostname(pid: i32, name: &str) -> Result<(), Error> {
    validate_hostname(name)?;
    let out = Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--uts", "--", "hostname", name])
        .output()
        .map_err(|e| Error::Internal(format!("cannot run nsenter: {e}")))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "cannot set the host name of pid {pid} to {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A host name as RFC 1123 allows: labels of letters, digits and hyphens, 63 at most each,
/// 253 in all.
pub fn validate_hostname(name: &str) -> Result<(), Error> {
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() <= 253 && name.split('.').all(ok_label) {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "'{name}' is not a valid host name (letters, digits, hyphens; labels of at most 63)"
        )))
    }
}

/// Runs (an ended child of ours stays a zombie until it is waited for).
pub fn is_running(pid: i32) -> bool {
    matches!(ferry_sys::process_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// `NSpid` of /proc/PID/status: the PID in each pid namespace, outermost first.
fn ns_pids(pid: i32) -> Vec<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| v.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// The inode of `pid`'s namespace of `kind` if it is not this process's.
fn own_namespace(pid: i32, kind: &str) -> Option<u64> {
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/{kind}")).ok()?;
    let ours = std::fs::metadata(Path::new("/proc/self/ns").join(kind)).ok()?;
    (theirs.ino() != ours.ino() || theirs.dev() != ours.dev()).then_some(theirs.ino())
}

/// The clones `ferry clone` made from this store (`STORE/clones.json`), so that `ferry list`
/// shows them with their origin. Written by ferry, but read with the same caps as anything
/// else: a version, a size and a count.
pub const CLONES_FILE: &str = "clones.json";
const CLONES_VERSION: u32 = 1;
const MAX_CLONES_BYTES: u64 = 1 << 20;
const MAX_CLONES: usize = 4096;

/// One running copy, as `ferry list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CloneRecord {
    pub name: String,
    /// The checkpoint it was restored from.
    pub origin: String,
    pub node: String,
    pub ip: String,
    pub pid: i32,
    /// The root's start time (clock ticks since boot): a PID reused later is not this clone.
    pub start_time: u64,
    pub hostname: Option<String>,
    pub created: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ClonesFile {
    version: u32,
    clones: Vec<CloneRecord>,
}

/// Parses `clones.json`; a file of another version or over the caps is refused.
pub fn parse_clones(data: &[u8]) -> Result<Vec<CloneRecord>, String> {
    if data.len() as u64 > MAX_CLONES_BYTES {
        return Err(format!("{} bytes, over the cap of {MAX_CLONES_BYTES}", data.len()));
    }
    let file: ClonesFile = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    if file.version != CLONES_VERSION {
        return Err(format!("version {} (this ferry reads {CLONES_VERSION})", file.version));
    }
    if file.clones.len() > MAX_CLONES {
        return Err(format!("{} clones, over the cap of {MAX_CLONES}", file.clones.len()));
    }
    Ok(file.clones)
}

/// The recorded clones that still run (their PID with the recorded start time).
pub fn live_clones(store_root: &Path) -> Result<Vec<CloneRecord>, Error> {
    let path = store_root.join(CLONES_FILE);
    let data = match std::fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StoreError::Io { action: "cannot read", path, source }.into()),
    };
    let all = parse_clones(&data).map_err(|detail| {
        Error::Store(StoreError::Damaged { name: "clones".into(), file: CLONES_FILE.into(), detail })
    })?;
    Ok(all.into_iter().filter(|c| ferry_sys::process_start_time(c.pid) == Some(c.start_time)).collect())
}

/// Adds `new` to the recorded clones (dropping those that no longer run), atomically.
pub fn record_clones(store_root: &Path, new: &[CloneRecord]) -> Result<(), Error> {
    let mut clones = live_clones(store_root).unwrap_or_default();
    clones.extend_from_slice(new);
    let keep_from = clones.len().saturating_sub(MAX_CLONES);
    let file = ClonesFile { version: CLONES_VERSION, clones: clones.split_off(keep_from) };
    let body = serde_json::to_vec_pretty(&file).map_err(|e| Error::Internal(e.to_string()))?;
    let path = store_root.join(CLONES_FILE);
    let tmp = store_root.join(format!("{CLONES_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, body)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| StoreError::Io { action: "cannot write", path, source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        for good in ["redis-1", "a", "clone-3.lab", &"x".repeat(63)] {
            assert!(validate_hostname(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "a..b", "a_b", "ä", &"x".repeat(64), "a/b"] {
            assert!(validate_hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn clones_file_round_trip_and_caps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = std::process::id() as i32;
        let rec = |name: &str, pid: i32, start_time: u64| CloneRecord {
            name: name.into(),
            origin: "redis-ck".into(),
            node: "node2".into(),
            ip: "198.19.0.34".into(),
            pid,
            start_time,
            hostname: Some(name.into()),
            created: 1,
        };
        let alive = rec("redis-ck-1", me, ferry_sys::process_start_time(me).expect("own start time"));
        // A PID that is ours but with another start time: a reused PID, not the clone.
        let gone = rec("redis-ck-2", me, 1);
        record_clones(dir.path(), &[alive.clone(), gone]).expect("record");
        assert_eq!(live_clones(dir.path()).expect("read"), vec![alive]);

        let other_version = br#"{"version": 2, "clones": []}"#;
        assert!(parse_clones(other_version).expect_err("other version").contains("version 2"));
        let huge = vec![b' '; (MAX_CLONES_BYTES + 1) as usize];
        assert!(parse_clones(&huge).expect_err("over the cap").contains("cap"));
        assert!(parse_clones(b"{").is_err());
    }
}
