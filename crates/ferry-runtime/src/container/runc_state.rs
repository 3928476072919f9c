//! What a dump of a runc-run container needs, read from runc's own state of it
//! (`<runc root>/<id>/state.json`) and from the container's mount table.
//!
//! All four runtimes run their containers through runc here, and each restores through
//! `runc restore`, which hands CRIU the mounts, namespaces and cgroups of the container's
//! *new* configuration under keys of runc's choosing. A dump must therefore mark the same
//! resources external under the same keys as `runc checkpoint` would (runc 1.1's
//! `Checkpoint`): bind mounts, cgroup v1 hierarchies and devices by their destination, masked
//! files as `/dev/null`, and namespaces that have a path as `extRoot<Type>NS`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ferry_criu::ContainerDump;
use serde::Deserialize;

use super::record::read_capped;
use crate::Error;

/// Largest state file read (runc's are a few KiB).
const MAX_STATE: u64 = 16 << 20;
/// Largest mount table read.
const MAX_MOUNTINFO: u64 = 16 << 20;

/// Key of a network namespace declared external, as runc names it on restore.
pub const NETNS_KEY: &str = "extRootNetNS";
pub const PIDNS_KEY: &str = "extRootPidNS";

#[derive(Debug, Deserialize)]
struct State {
    init_process_pid: i32,
    #[serde(default)]
    init_process_start: u64,
    config: Config,
    #[serde(default)]
    external_descriptors: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Config {
    rootfs: String,
    #[serde(default)]
    mounts: Vec<Mount>,
    #[serde(default)]
    devices: Option<Vec<Device>>,
    #[serde(default)]
    mask_paths: Option<Vec<String>>,
    #[serde(default)]
    namespaces: Vec<Namespace>,
}

#[derive(Debug, Deserialize)]
struct Mount {
    #[serde(default)]
    device: String,
    destination: String,
}

#[derive(Debug, Deserialize)]
struct Device {
    path: String,
}

#[derive(Debug, Deserialize)]
struct Namespace {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

/// How to dump one container, as runc would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpPlan {
    pub init_pid: i32,
    pub dump: ContainerDump,
    /// CRIU `--external` entries (namespaces with a path).
    pub external: Vec<String>,
    /// The network namespace's path, when it has one.
    pub netns_path: Option<PathBuf>,
    /// `descriptors.json`: what fds 0-2 of the init process were.
    pub descriptors: Vec<String>,
    /// Mount points inside the container (their content is not the root filesystem's).
    pub mount_points: Vec<String>,
    /// The root filesystem's overlay, if it is one.
    pub overlay: Option<Overlay>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
}

/// Reads runc's state of container `id` under `runc_root`.
pub fn dump_plan(runc_root: &Path, id: &str) -> Result<DumpPlan, Error> {
    let path = runc_root.join(id).join("state.json");
    let bytes = read_capped(&path, MAX_STATE).map_err(|e| {
        Error::Container(format!("cannot read runc's state of container {id} ({}): {e}", path.display()))
    })?;
    let state: State = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Container(format!("runc's state {} is not what ferry reads: {e}", path.display()))
    })?;
    let pid = state.init_process_pid;
    if pid <= 1 || !ferry_sys::process_exists(pid) {
        return Err(Error::ContainerNotRunning { workload: id.to_owned(), state: "stopped".into() });
    }
    if state.init_process_start != 0 && start_time(pid) != Some(state.init_process_start) {
        return Err(Error::ContainerNotRunning { workload: id.to_owned(), state: "stopped".into() });
    }
    let mountinfo = read_capped(Path::new(&format!("/proc/{pid}/mountinfo")), MAX_MOUNTINFO)
        .map_err(|e| Error::Container(format!("cannot read the mounts of pid {pid}: {e}")))?;
    let mounts = parse_mountinfo(&String::from_utf8_lossy(&mountinfo));
    plan_from(&state, &mounts, stat_inode, |p| is_file_in(pid, p))
}

fn plan_from(
    state: &State,
    mounts: &[MountEntry],
    inode_of: impl Fn(&str) -> Option<u64>,
    is_file: impl Fn(&str) -> bool,
) -> Result<DumpPlan, Error> {
    let c = &state.config;
    let mut ext: Vec<(String, String)> = Vec::new();
    let mut add = |key: &str, val: &str| {
        let pair = (clean(key), val.to_owned());
        if !ext.contains(&pair) {
            ext.push(pair);
        }
    };
    for m in &c.mounts {
        match m.device.as_str() {
            "bind" => add(&m.destination, &clean(&m.destination)),
            // Without a cgroup namespace runc bind-mounts each v1 hierarchy of the host.
            "cgroup" if !has_ns(c, "NEWCGROUP") => {
                let under = format!("{}/", clean(&m.destination));
                for e in mounts.iter().filter(|e| e.fstype == "cgroup" && e.mount_point.starts_with(&under)) {
                    add(&e.mount_point, &e.mount_point);
                }
            }
            _ => {}
        }
    }
    for p in c.mask_paths.iter().flatten() {
        if is_file(p) {
            add(p, "/dev/null");
        }
    }
    for d in c.devices.iter().flatten() {
        add(&d.path, &clean(&d.path));
    }
    let mut external = Vec::new();
    let mut netns_path = None;
    for (ns, crit, key) in [("NEWNET", "net", NETNS_KEY), ("NEWPID", "pid", PIDNS_KEY)] {
        let Some(path) = c.namespaces.iter().find(|n| n.kind == ns && !n.path.is_empty()).map(|n| &n.path)
        else {
            continue;
        };
        let ino = inode_of(path)
            .ok_or_else(|| Error::Container(format!("the container's {crit} namespace {path} is gone")))?;
        external.push(format!("{crit}[{ino}]:{key}"));
        if ns == "NEWNET" {
            netns_path = Some(PathBuf::from(path));
        }
    }
    let overlay = mounts.iter().find(|e| e.mount_point == "/" && e.fstype == "overlay").and_then(|e| {
        let opt = |k: &str| e.super_options.split(',').find_map(|o| o.strip_prefix(k)).map(str::to_owned);
        let upper = PathBuf::from(opt("upperdir=")?);
        let lower = opt("lowerdir=")?.split(':').map(PathBuf::from).collect();
        Some(Overlay { lower, upper })
    });
    Ok(DumpPlan {
        init_pid: state.init_process_pid,
        dump: ContainerDump {
            root: PathBuf::from(&c.rootfs),
            ext_mounts: ext,
            // Not runc's cgroup freezer: CRIU polls it every 100 ms, and the first poll finds it
            // still freezing, which costs a tenth of a second of downtime. CRIU's ptrace seizing
            // (as for process trees) stops the tree in about a millisecond.
            freeze_cgroup: None,
        },
        external,
        netns_path,
        descriptors: state.external_descriptors.clone(),
        mount_points: mounts.iter().map(|e| e.mount_point.clone()).filter(|m| m != "/").collect(),
        overlay,
    })
}

fn has_ns(c: &Config, kind: &str) -> bool {
    c.namespaces.iter().any(|n| n.kind == kind)
}

/// runc's form of a destination: absolute, without `.`/`..` or doubled slashes.
fn clean(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    format!("/{}", parts.join("/"))
}

fn stat_inode(p: &str) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.ino())
}

/// True if `path` inside the container of `pid` is a file (masked files get /dev/null over
/// them, masked directories a tmpfs).
fn is_file_in(pid: i32, path: &str) -> bool {
    std::fs::metadata(format!("/proc/{pid}/root/{}", path.trim_start_matches('/'))).is_ok_and(|m| !m.is_dir())
}

/// Start time of `pid` in clock ticks since boot (field 22 of its stat), as runc records it.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// One line of `/proc/PID/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: String,
    pub fstype: String,
    pub super_options: String,
}

/// Parses a mount table (fields decoded from the kernel's octal escapes).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = unescape(left.split(' ').nth(4)?);
            let mut r = right.split(' ');
            let fstype = r.next()?.to_owned();
            let _source = r.next()?;
            let super_options = unescape(r.next().unwrap_or(""));
            Some(MountEntry { mount_point, fstype, super_options })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
600 500 0:90 / / rw,relatime - overlay overlay rw,lowerdir=/img/a:/img/b,upperdir=/b/upper,workdir=/b/work
601 600 0:91 / /proc rw - proc proc rw
602 600 0:92 / /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct
603 600 0:93 / /sys/fs/cgroup/unified ro - cgroup2 cgroup2 rw
604 600 8:1 /srv/data /data rw - ext4 /dev/vda rw
605 600 8:1 /x /with\\040space rw - ext4 /dev/vda rw
";

    fn state() -> State {
        serde_json::from_value(serde_json::json!({
            "init_process_pid": 4242,
            "init_process_start": 99,
            "config": {
                "rootfs": "/b/rootfs",
                "mounts": [
                    {"device": "proc", "destination": "/proc", "source": "proc"},
                    {"device": "bind", "destination": "/data/", "source": "/srv/data"},
                    {"device": "cgroup", "destination": "/sys/fs/cgroup", "source": "cgroup"}
                ],
                "devices": [{"path": "/dev/null"}, {"path": "/dev/zero"}],
                "mask_paths": ["/proc/kcore", "/sys/firmware"],
                "namespaces": [{"type": "NEWPID", "path": ""}, {"type": "NEWNET", "path": "/run/netns/w1"}]
            },
            "cgroup_paths": {"freezer": "/sys/fs/cgroup/freezer/web", "memory": "/sys/fs/cgroup/memory/web"},
            "external_descriptors": ["pipe:[1]", "pipe:[2]", "pipe:[2]"]
        }))
        .expect("state")
    }

    #[test]
    fn plans_the_dump_runc_would_make() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts[5].mount_point, "/with space");
        let plan = plan_from(&state(), &mounts, |_| Some(4026532000), |p| p == "/proc/kcore").expect("plan");
        assert_eq!(
            plan.dump.ext_mounts,
            vec![
                ("/data".to_owned(), "/data".to_owned()),
                ("/sys/fs/cgroup/cpu,cpuacct".to_owned(), "/sys/fs/cgroup/cpu,cpuacct".to_owned()),
                ("/proc/kcore".to_owned(), "/dev/null".to_owned()),
                ("/dev/null".to_owned(), "/dev/null".to_owned()),
                ("/dev/zero".to_owned(), "/dev/zero".to_owned()),
            ]
        );
        assert_eq!(plan.external, vec!["net[4026532000]:extRootNetNS".to_owned()]);
        assert_eq!(plan.netns_path, Some(PathBuf::from("/run/netns/w1")));
        assert_eq!(plan.dump.freeze_cgroup, None, "CRIU's ptrace seizing, not the v1 freezer");
        assert_eq!(plan.dump.root, PathBuf::from("/b/rootfs"));
        assert_eq!(plan.descriptors.len(), 3);
        let overlay = plan.overlay.expect("overlay");
        assert_eq!(overlay.upper, PathBuf::from("/b/upper"));
        assert_eq!(overlay.lower, vec![PathBuf::from("/img/a"), PathBuf::from("/img/b")]);
        assert!(plan.mount_points.contains(&"/data".to_owned()));
    }

    #[test]
    fn a_netns_path_that_is_gone_is_an_error() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert!(plan_from(&state(), &mounts, |_| None, |_| false).is_err());
    }

    #[test]
    fn cleans_destinations_as_runc_does() {
        assert_eq!(clean("/a//b/./c/"), "/a/b/c");
        assert_eq!(clean("/a/../../b"), "/b");
    }
}
