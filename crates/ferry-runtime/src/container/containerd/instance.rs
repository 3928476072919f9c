//! ferry's private containerd instances (one per lab node): a daemon with its own root, state,
//! temporary directories and sockets under the instance's directories, run in the node's
//! network namespace, its CRI plugin off. Its containers get a runc root of its own (through
//! their runtime options), cgroups under the instance's cgroup parent, and log files of its
//! own for their output: nothing another instance on the host could share.
//!
//! `DIRS.run/containerd/`: `containerd.sock` (+ `.ttrpc`, `debug.sock`), `config.toml`,
//! `containerd.pid`, `containerd.log`, `ferry-instance.json` (what a client of the socket needs
//! to know: runc root, cgroup parent, log directory), `state/`, `tmp/`, `xdg/`, `runc/`,
//! `stdio/`. `DIRS.data/containerd/root/`: content, snapshots, metadata.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::super::record::read_capped;
use super::super::{runc_state, InstanceDirs};
use super::api::Api;
use super::{io_err, KIND};
use crate::Error;

const INFO_FILE: &str = "ferry-instance.json";
/// Where containerd 1.6 puts its shims' sockets, whatever its configuration says.
const SHIM_SOCKETS: &str = "/run/containerd/s";
const START_LIMIT: Duration = Duration::from_secs(30);
/// Plugins an instance does without: CRI (it would want CNI and its own streaming server),
/// `opt` (it would create /opt/containerd), snapshotters this host has no use for, tracing.
/// (`io.containerd.runtime.v1.linux` must stay: 1.6's tasks service does not load without it.)
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
];

/// What ferry's clients of an instance need beyond its socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct InstanceInfo {
    pub runc_root: PathBuf,
    pub cgroup_parent: String,
    pub stdio_dir: PathBuf,
    /// Scratch space on disk (image layers being imported).
    pub tmp_dir: PathBuf,
}

impl InstanceInfo {
    /// The description beside `socket`, if it is a socket of ferry's instances.
    pub fn read_beside(socket: &Path) -> Option<InstanceInfo> {
        let bytes = read_capped(&socket.parent()?.join(INFO_FILE), 64 << 10).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

struct Layout {
    run: PathBuf,
    data: PathBuf,
}

impl Layout {
    fn new(dirs: &InstanceDirs) -> Layout {
        Layout { run: dirs.run.join("containerd"), data: dirs.data.join("containerd") }
    }

    fn socket(&self) -> PathBuf {
        self.run.join("containerd.sock")
    }

    fn config(&self) -> PathBuf {
        self.run.join("config.toml")
    }

    fn pid_file(&self) -> PathBuf {
        self.run.join("containerd.pid")
    }

    fn info(&self, dirs: &InstanceDirs) -> InstanceInfo {
        InstanceInfo {
            runc_root: self.run.join("runc"),
            cgroup_parent: dirs.cgroup_parent.clone(),
            stdio_dir: self.run.join("stdio"),
            tmp_dir: self.data.join("tmp"),
        }
    }
}

pub(super) fn endpoint(dirs: &InstanceDirs) -> PathBuf {
    Layout::new(dirs).socket()
}

/// containerd's configuration for an instance (version 2).
fn config_text(l: &Layout) -> Result<String, Error> {
    let q = |p: &Path| -> Result<String, Error> {
        let s = p.to_str().ok_or_else(|| Error::Container(format!("{} is not UTF-8", p.display())))?;
        serde_json::to_string(s).map_err(|e| Error::Internal(e.to_string()))
    };
    let socket = l.socket();
    let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| format!("\"{p}\"")).collect();
    Ok(format!(
        "version = 2\nroot = {}\nstate = {}\ntemp = {}\nplugin_dir = \"\"\ndisabled_plugins = [{}]\n\n\
         [grpc]\n  address = {}\n\n[ttrpc]\n  address = {}\n\n[debug]\n  address = {}\n  level = \"info\"\n\n\
         [metrics]\n  address = \"\"\n",
        q(&l.data.join("root"))?,
        q(&l.run.join("state"))?,
        q(&l.run.join("tmp"))?,
        disabled.join(", "),
        q(&socket)?,
        q(&PathBuf::from(format!("{}.ttrpc", socket.display())))?,
        q(&l.run.join("debug.sock"))?,
    ))
}

/// Starts the instance's daemon unless it answers, and waits until it does.
pub(super) fn start(dirs: &InstanceDirs) -> Result<(), Error> {
    let l = Layout::new(dirs);
    let socket = l.socket();
    let info = l.info(dirs);
    if Api::connect(&socket).is_ok() {
        return write_info(&l, &info);
    }
    if l.run.exists() {
        // A daemon of ours that died, or hangs: what it left goes first.
        tracing::info!(dir = %l.run.display(), "containerd instance does not answer: cleaning it up");
        stop(dirs);
    }
    for d in [
        l.run.join("state"),
        l.run.join("tmp"),
        l.run.join("xdg"),
        info.runc_root.clone(),
        info.stdio_dir.clone(),
    ]
    .iter()
    .chain([l.data.join("root"), info.tmp_dir.clone()].iter())
    {
        fs::create_dir_all(d).map_err(|e| io_err("create", d, e))?;
    }
    let config = l.config();
    fs::write(&config, config_text(&l)?).map_err(|e| io_err("write", &config, e))?;
    write_info(&l, &info)?;
    let log_path = l.run.join("containerd.log");
    let log = fs::File::create(&log_path).map_err(|e| io_err("create", &log_path, e))?;
    let log2 = log.try_clone().map_err(|e| io_err("open", &log_path, e))?;
    // `setsid` (not a group leader here, so it does not fork) and `nsenter` exec in place:
    // the child's pid is containerd's.
    let mut cmd = Command::new("setsid");
    if let Some(netns) = &dirs.netns {
        cmd.arg("nsenter").arg(format!("--net={}", netns.display()));
    }
    cmd.arg("containerd").arg("--config").arg(&config);
    // The shim runs runc, runc runs criu: the one ferry uses comes first.
    let criu_dir = ferry_criu::Criu::locate(None).ok().and_then(|c| c.path().parent().map(Path::to_path_buf));
    let mut path = criu_dir.map(|d| format!("{}:", d.display())).unwrap_or_default();
    path.push_str("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    cmd.env("PATH", path)
        // A restore from a checkpoint in the content store unpacks it into
        // MkdirTemp($XDG_RUNTIME_DIR) and never removes it: keep that private too.
        .env("XDG_RUNTIME_DIR", l.run.join("xdg"))
        .env("TMPDIR", l.run.join("tmp"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2));
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::runtime_unavailable(KIND, &socket, format!("cannot run containerd: {e}")))?;
    let pid = child.id();
    fs::write(l.pid_file(), format!("{pid}\n")).map_err(|e| io_err("write", &l.pid_file(), e))?;
    // Reaped whenever it ends, so that it never lingers as a zombie of a long-lived caller.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    loop {
        if let Ok(status) = rx.try_recv() {
            let detail = format!(
                "containerd exited ({}) at start: {}",
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                log_tail(&log_path)
            );
            stop(dirs);
            return Err(Error::runtime_unavailable(KIND, &socket, detail));
        }
        if socket.exists() && Api::connect(&socket).is_ok() {
            tracing::info!(%pid, ms = started.elapsed().as_millis() as u64, socket = %socket.display(), "containerd instance up");
            return Ok(());
        }
        if started.elapsed() > START_LIMIT {
            stop(dirs);
            return Err(Error::runtime_unavailable(
                KIND,
                &socket,
                format!(
                    "containerd did not answer within {} s: {}",
                    START_LIMIT.as_secs(),
                    log_tail(&log_path)
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_info(l: &Layout, info: &InstanceInfo) -> Result<(), Error> {
    let path = l.run.join(INFO_FILE);
    let bytes = serde_json::to_vec_pretty(info).map_err(|e| Error::Internal(e.to_string()))?;
    fs::write(&path, bytes).map_err(|e| io_err("write", &path, e))
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Stops the instance: its containers, shims and daemon, what they left mounted, their
/// cgroups, the shims' sockets, and its directories. Idempotent.
pub(super) fn stop(dirs: &InstanceDirs) {
    let l = Layout::new(dirs);
    let socket = l.socket();
    let address = socket.to_string_lossy().into_owned();
    let mut containers: Vec<(String, String)> = Vec::new();
    if socket.exists() {
        if let Ok(api) = Api::connect(&socket) {
            remove_all(&api, &mut containers);
        }
    }
    for (pid, ns, id) in shims_of(&address) {
        let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
        containers.push((ns, id));
    }
    stop_daemon(&l);
    let ours = format!("{}/containerd", dirs.cgroup_parent.trim_end_matches('/'));
    kill_cgroup_tree(&ours);
    // The tasks containerd knew (their bundles), for their shims' sockets.
    let tasks = l.run.join("state").join("io.containerd.runtime.v2.task");
    for ns in fs::read_dir(&tasks).into_iter().flatten().flatten() {
        for id in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            containers.push((
                ns.file_name().to_string_lossy().into_owned(),
                id.file_name().to_string_lossy().into_owned(),
            ));
        }
    }
    containers.sort();
    containers.dedup();
    for (ns, id) in &containers {
        let s = shim_socket(&address, ns, id);
        if s.exists() {
            let _ = fs::remove_file(&s);
        }
    }
    unmount_under(&[&l.run, &l.data]);
    remove_cgroup_tree(&ours, &dirs.cgroup_parent);
    for d in [&l.run, &l.data] {
        if d.exists() {
            if let Err(e) = fs::remove_dir_all(d) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot remove a containerd instance's directory");
            }
        }
    }
}

/// Kills and deletes every task, container and snapshot the daemon knows.
fn remove_all(api: &Api, seen: &mut Vec<(String, String)>) {
    let Ok(namespaces) = api.namespaces() else { return };
    for ns in namespaces {
        for t in api.tasks(&ns).unwrap_or_default() {
            seen.push((ns.clone(), t.id.clone()));
            let _ = api.kill(&ns, &t.id, 9);
            super::wait_not_running(api, &ns, &t.id, Duration::from_secs(5));
            if let Err(s) = api.delete_task(&ns, &t.id) {
                tracing::debug!(task = %t.id, error = %s.message(), "tasks.Delete at instance stop");
            }
        }
        for c in api.containers(&ns).unwrap_or_default() {
            seen.push((ns.clone(), c.id.clone()));
            let _ = api.delete_container(&ns, &c.id);
        }
    }
}

/// The shims serving the daemon at `address` (they outlive it): pid, namespace, container.
fn shims_of(address: &str) -> Vec<(i32, String, String)> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(raw) = fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if let Some((ns, id)) = shim_args(&args, address) {
            out.push((pid, ns, id));
        }
    }
    out
}

/// `containerd-shim-runc-v2 -namespace NS -id ID -address ADDRESS`: (NS, ID) if ADDRESS is ours.
fn shim_args(args: &[String], address: &str) -> Option<(String, String)> {
    let prog = Path::new(args.first()?).file_name()?.to_str()?;
    if !prog.starts_with("containerd-shim") {
        return None;
    }
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    if value("-address")? != address {
        return None;
    }
    Some((value("-namespace")?, value("-id")?))
}

/// Where containerd 1.6's shim for `ns/id` of the daemon at `address` listens.
fn shim_socket(address: &str, ns: &str, id: &str) -> PathBuf {
    let digest = Sha256::digest(format!("{}/{ns}/{id}", address.trim_end_matches('/')).as_bytes());
    Path::new(SHIM_SOCKETS).join(format!("{digest:x}"))
}

fn stop_daemon(l: &Layout) {
    let Ok(text) = fs::read_to_string(l.pid_file()) else { return };
    let Ok(pid) = text.trim().parse::<i32>() else { return };
    let config = l.config().to_string_lossy().into_owned();
    let ours = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).any(|a| a == config.as_bytes()))
        .unwrap_or(false);
    if !ours || !ferry_sys::process_exists(pid) {
        return;
    }
    let _ = ferry_sys::kill(pid, ferry_sys::Signal::Term);
    let start = Instant::now();
    while ferry_sys::process_exists(pid) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if ferry_sys::process_exists(pid) {
        let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
    }
}

/// The cgroup hierarchies of this host: the unified one, or each v1 hierarchy (and v2's
/// `unified` beside them).
fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_path_buf()];
    }
    fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Every cgroup under `rel` in `root`, parents first.
fn cgroup_tree(root: &Path, rel: &str) -> Vec<PathBuf> {
    let top = root.join(rel.trim_start_matches('/'));
    let mut out = Vec::new();
    let mut stack = vec![top];
    while let Some(d) = stack.pop() {
        if !d.is_dir() {
            continue;
        }
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
        out.push(d);
    }
    out
}

/// Kills whatever still runs in the instance's cgroups (thawed first: a frozen task would
/// not die).
fn kill_cgroup_tree(rel: &str) {
    for root in cgroup_roots() {
        for cg in cgroup_tree(&root, rel) {
            let freezer = cg.join("freezer.state");
            if fs::read_to_string(&freezer).is_ok_and(|s| s.trim() != "THAWED") {
                let _ = fs::write(&freezer, "THAWED");
            }
            for pid in fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
                }
            }
        }
    }
}

/// Removes the instance's cgroups, then the parents up to the root as far as they are empty.
fn remove_cgroup_tree(rel: &str, parent: &str) {
    for root in cgroup_roots() {
        let tree = cgroup_tree(&root, rel);
        for cg in tree.iter().rev() {
            for attempt in 0..50 {
                match fs::remove_dir(cg) {
                    Ok(()) => break,
                    Err(e) if e.raw_os_error() == Some(16) && attempt < 49 => {
                        // EBUSY: its last task is still exiting.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        tracing::debug!(cgroup = %cg.display(), error = %e, "cannot remove a cgroup");
                        break;
                    }
                }
            }
        }
        let mut p = PathBuf::from(parent.trim_start_matches('/'));
        while !p.as_os_str().is_empty() {
            if fs::remove_dir(root.join(&p)).is_err() {
                break;
            }
            p = p.parent().map(Path::to_path_buf).unwrap_or_default();
        }
    }
}

/// Detaches every mount at or below `dirs`, deepest first.
fn unmount_under(dirs: &[&Path]) {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = runc_state::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| dirs.iter().any(|d| Path::new(m).starts_with(d)))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        if let Err(e) = ferry_sys::unmount(Path::new(&p)) {
            tracing::debug!(mount = %p, error = %e, "cannot unmount");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> InstanceDirs {
        InstanceDirs {
            data: "/var/lib/lab/nodes/n1/runtimes".into(),
            run: "/run/lab/nodes/n1/rt".into(),
            netns: None,
            cgroup_parent: "/ferry-lab/t1/n1".into(),
        }
    }

    #[test]
    fn config_keeps_everything_private() {
        let l = Layout::new(&dirs());
        let text = config_text(&l).expect("config");
        let v: toml::Value = toml::from_str(&text).expect("valid TOML");
        assert_eq!(v["root"].as_str(), Some("/var/lib/lab/nodes/n1/runtimes/containerd/root"));
        assert_eq!(v["state"].as_str(), Some("/run/lab/nodes/n1/rt/containerd/state"));
        assert_eq!(v["temp"].as_str(), Some("/run/lab/nodes/n1/rt/containerd/tmp"));
        assert_eq!(v["grpc"]["address"].as_str(), Some("/run/lab/nodes/n1/rt/containerd/containerd.sock"));
        assert_eq!(
            v["ttrpc"]["address"].as_str(),
            Some("/run/lab/nodes/n1/rt/containerd/containerd.sock.ttrpc")
        );
        assert_eq!(v["debug"]["address"].as_str(), Some("/run/lab/nodes/n1/rt/containerd/debug.sock"));
        let disabled: Vec<&str> =
            v["disabled_plugins"].as_array().expect("list").iter().filter_map(|p| p.as_str()).collect();
        assert!(disabled.contains(&"io.containerd.grpc.v1.cri"));
        assert!(!disabled.iter().any(|p| p.contains("runtime")));
        assert_eq!(endpoint(&dirs()), PathBuf::from("/run/lab/nodes/n1/rt/containerd/containerd.sock"));
    }

    #[test]
    fn shims_are_recognized_by_their_address() {
        let args = |a: &str| -> Vec<String> {
            ["/usr/bin/containerd-shim-runc-v2", "-namespace", "default", "-id", "web", "-address", a]
                .iter()
                .map(|s| s.to_string())
                .collect()
        };
        assert_eq!(shim_args(&args("/run/a.sock"), "/run/a.sock"), Some(("default".into(), "web".into())));
        assert_eq!(shim_args(&args("/run/b.sock"), "/run/a.sock"), None);
        let mut other = args("/run/a.sock");
        other[0] = "/usr/bin/containerd".into();
        assert_eq!(shim_args(&other, "/run/a.sock"), None);
    }

    #[test]
    fn shim_sockets_are_named_as_containerd_names_them() {
        // sha256("/run/a.sock/default/web")
        let p = shim_socket("/run/a.sock", "default", "web");
        assert_eq!(p.parent(), Some(Path::new("/run/containerd/s")));
        let want = format!("{:x}", Sha256::digest(b"/run/a.sock/default/web"));
        assert_eq!(p.file_name().and_then(|f| f.to_str()), Some(want.as_str()));
    }
}
