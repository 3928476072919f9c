//! A private Docker (dockerd with a containerd of its own) per [`InstanceDirs`]: what ferry's
//! lab gives each node, so that two nodes on one host share nothing a pair of hosts would not.
//!
//! Layout: `DATA/docker/root` (dockerd's data-root: images, layers, containers) and
//! `DATA/docker/containerd` (containerd's root); `RUN/docker/` holds the API socket
//! (`docker.sock`, the endpoint), dockerd's exec-root (`exec/`: runc's state under
//! `exec/runtime-runc/moby`, the bundles), containerd's state and socket (`ctd/`), the daemons'
//! configurations, logs and pid file, `tmp/` (their `XDG_RUNTIME_DIR` and `TMPDIR`: containerd
//! unpacks every restore's checkpoint there and never removes it) and `wrap/`, the directory of
//! the `ferry-runc` runtime registered as the default one. Containers' cgroups go under
//! `CGROUP_PARENT/docker`.
//!
//! containerd is started by ferry, not by dockerd: dockerd 20.10 uses the host's
//! `/run/containerd/containerd.sock` instead of its own whenever that exists, which would put
//! every instance's containers into one shared containerd.

use std::fs;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::api::{Api, KIND};
use super::wrapper;
use crate::container::InstanceDirs;
use crate::Error;

/// How long a daemon may take to answer after its start.
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long a daemon may take to end after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(20);
/// `PATH` of the daemons (and so of the shims and runc, which run CRIU from it): ferry's CRIU
/// in /usr/local/sbin first.
const DAEMON_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The name the wrapper is registered under in an instance.
pub(super) const RUNTIME_NAME: &str = "ferry";

/// Where an instance keeps what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Layout {
    pub data: PathBuf,
    pub run: PathBuf,
    pub netns: Option<PathBuf>,
    pub cgroup_parent: String,
}

impl Layout {
    pub fn of(dirs: &InstanceDirs) -> Layout {
        Layout {
            data: dirs.data.join("docker"),
            run: dirs.run.join("docker"),
            netns: dirs.netns.clone(),
            cgroup_parent: format!("{}/docker", dirs.cgroup_parent.trim_end_matches('/')),
        }
    }
    pub fn socket(&self) -> PathBuf {
        self.run.join("docker.sock")
    }
    fn data_root(&self) -> PathBuf {
        self.data.join("root")
    }
    fn exec_root(&self) -> PathBuf {
        self.run.join("exec")
    }
    fn ctd_dir(&self) -> PathBuf {
        self.run.join("ctd")
    }
    fn ctd_socket(&self) -> PathBuf {
        self.ctd_dir().join("ctd.sock")
    }
    fn ctd_config(&self) -> PathBuf {
        self.run.join("containerd.toml")
    }
    fn daemon_config(&self) -> PathBuf {
        self.run.join("daemon.json")
    }
    fn pidfile(&self) -> PathBuf {
        self.run.join("dockerd.pid")
    }
    fn tmp(&self) -> PathBuf {
        self.run.join("tmp")
    }
    pub fn wrapper_dir(&self) -> PathBuf {
        self.run.join("wrap")
    }

    /// containerd's configuration: its own root, state and sockets; no CRI plugin (it would
    /// use the host's CNI directories).
    pub fn containerd_toml(&self) -> String {
        let q = |p: &Path| toml_string(&p.to_string_lossy());
        format!(
            "version = 2\nroot = {}\nstate = {}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
             [grpc]\n  address = {}\n\n[ttrpc]\n  address = {}\n\n[debug]\n  address = \"\"\n\n\
             [metrics]\n  address = \"\"\n\n[plugins]\n  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = {}\n",
            q(&self.data.join("containerd")),
            q(&self.ctd_dir().join("state")),
            q(&self.ctd_socket()),
            q(&self.ctd_dir().join("ctd.sock.ttrpc")),
            q(&self.data.join("containerd/opt")),
        )
    }

    /// dockerd's configuration: private paths, checkpoints on (experimental), no host network
    /// changes (no iptables, forwarding, masquerading, bridge or proxy), its containers' cgroups
    /// under the instance's parent, and `ferry-runc` (at `wrapper`) as the default runtime.
    pub fn daemon_json(&self, wrapper: &Path) -> serde_json::Value {
        serde_json::json!({
            "experimental": true,
            "data-root": self.data_root(),
            "exec-root": self.exec_root(),
            "pidfile": self.pidfile(),
            "hosts": [format!("unix://{}", self.socket().display())],
            "containerd": self.ctd_socket(),
            "iptables": false,
            "ip6tables": false,
            "ip-forward": false,
            "ip-masq": false,
            "bridge": "none",
            "userland-proxy": false,
            "storage-driver": "overlay2",
            "log-driver": "json-file",
            "live-restore": false,
            "cgroup-parent": self.cgroup_parent,
            "default-runtime": RUNTIME_NAME,
            "runtimes": {
                RUNTIME_NAME: {
                    "path": wrapper,
                    "runtimeArgs": [wrapper::DIR_FLAG, self.wrapper_dir()]
                }
            }
        })
    }
}

fn toml_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

pub(super) fn endpoint(dirs: &InstanceDirs) -> PathBuf {
    Layout::of(dirs).socket()
}

/// Where `ferry-runc` is: `FERRY_RUNC_WRAPPER`, else beside this program (or one directory up:
/// cargo's test binaries sit in `deps/`), else on `PATH`.
pub(super) fn locate_wrapper() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("FERRY_RUNC_WRAPPER") {
        return Ok(PathBuf::from(p));
    }
    let exe_dir = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(d) = exe_dir {
        candidates.push(d.join(wrapper::BINARY));
        if let Some(up) = d.parent() {
            candidates.push(up.join(wrapper::BINARY));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(wrapper::BINARY)));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        Error::Container(format!(
            "{} is not beside ferry nor on PATH (set FERRY_RUNC_WRAPPER): build it with `cargo build -p ferry`",
            wrapper::BINARY
        ))
    })
}

pub(super) fn start(dirs: &InstanceDirs) -> Result<(), Error> {
    let l = Layout::of(dirs);
    if Api::connect(&l.socket()).and_then(|a| a.ping()).is_ok() {
        return Ok(());
    }
    let wrapper = locate_wrapper()?;
    for d in [l.data_root(), l.data.join("containerd"), l.exec_root(), l.ctd_dir(), l.tmp(), l.wrapper_dir()]
    {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&d).map_err(|e| io_err("create", &d, e))?;
    }
    let _ = fs::remove_file(l.socket());
    let toml = l.ctd_config();
    fs::write(&toml, l.containerd_toml()).map_err(|e| io_err("write", &toml, e))?;
    let json = l.daemon_config();
    let text =
        serde_json::to_vec_pretty(&l.daemon_json(&wrapper)).map_err(|e| Error::Internal(e.to_string()))?;
    fs::write(&json, text).map_err(|e| io_err("write", &json, e))?;
    let t = Instant::now();
    if !is_socket(&l.ctd_socket()) {
        spawn(&l, "containerd", &["--config".as_ref(), toml.as_os_str()], &l.run.join("containerd.log"))?;
        let ready = wait_until(START_LIMIT, || is_socket(&l.ctd_socket()));
        if !ready {
            return Err(Error::runtime_failed(
                KIND,
                "start containerd",
                format!("its socket did not appear: {}", tail(&l.run.join("containerd.log"))),
                None,
            ));
        }
    }
    spawn(&l, "dockerd", &["--config-file".as_ref(), json.as_os_str()], &l.run.join("dockerd.log"))?;
    let ready = wait_until(START_LIMIT, || {
        Api::connect(&l.socket()).and_then(|a| a.ping()).is_ok() || dockerd_gave_up(&l)
    });
    if !ready || dockerd_gave_up(&l) {
        let why = tail(&l.run.join("dockerd.log"));
        stop(dirs);
        return Err(Error::runtime_failed(KIND, "start dockerd", why, None));
    }
    tracing::info!(socket = %l.socket().display(), seconds = t.elapsed().as_secs_f64(), "private dockerd ready");
    Ok(())
}

/// Starts `program` detached (its own session, reparented to init: no zombie here), in the
/// instance's network namespace, with the instance's temporary directories.
fn spawn(l: &Layout, program: &str, args: &[&std::ffi::OsStr], log: &Path) -> Result<(), Error> {
    let out =
        fs::OpenOptions::new().create(true).append(true).open(log).map_err(|e| io_err("open", log, e))?;
    let err = out.try_clone().map_err(|e| io_err("open", log, e))?;
    let mut cmd = match &l.netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("--");
            c.arg("setsid");
            c
        }
        None => Command::new("setsid"),
    };
    cmd.arg("--fork").arg(program).args(args);
    cmd.env("PATH", DAEMON_PATH)
        .env("XDG_RUNTIME_DIR", l.tmp())
        .env("TMPDIR", l.tmp())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let status = cmd
        .status()
        .map_err(|e| Error::runtime_unavailable(KIND, l.socket(), format!("cannot run {program}: {e}")))?;
    if !status.success() {
        return Err(Error::runtime_failed(KIND, format!("start {program}"), tail(log), None));
    }
    Ok(())
}

fn dockerd_gave_up(l: &Layout) -> bool {
    let log = tail(&l.run.join("dockerd.log"));
    log.contains("failed to start daemon") || log.contains("level=fatal")
}

/// Removes the instance's containers, ends dockerd, its containerd and their shims, unmounts
/// what is under its directories, removes its cgroups and its state. Nothing there is fine.
pub(super) fn stop(dirs: &InstanceDirs) {
    let l = Layout::of(dirs);
    if let Ok(api) = Api::connect(&l.socket()) {
        if let Ok(list) = api.list() {
            for c in list {
                if let Some(id) = c.id {
                    if let Err(e) = api.remove(&id) {
                        tracing::warn!(container = %id, error = %e, "cannot remove a container of the instance");
                    }
                }
            }
        }
    }
    let config = l.daemon_config().to_string_lossy().into_owned();
    let dockerd: Vec<i32> = fs::read_to_string(l.pidfile())
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .filter(|&pid| cmdline(pid).iter().any(|a| a == &config))
        .into_iter()
        .chain(processes(|args| {
            args.first().is_some_and(|a| a.ends_with("dockerd")) && args.contains(&config)
        }))
        .collect();
    end(&dockerd);
    let toml = l.ctd_config().to_string_lossy().into_owned();
    end(&processes(|args| args.first().is_some_and(|a| a.ends_with("containerd")) && args.contains(&toml)));
    // Shims left over (a daemon that died): they carry our containerd's address.
    let ctd = l.ctd_socket().to_string_lossy().into_owned();
    for pid in processes(|args| {
        args.first().is_some_and(|a| a.contains("containerd-shim")) && args.iter().any(|a| a == &ctd)
    }) {
        let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
    }
    runc_leftovers(&l.exec_root());
    for base in [&l.run, &l.data] {
        unmount_under(base);
    }
    remove_cgroups(&l.cgroup_parent);
    // Docker made the parent's ancestors too (the lab's, the node's): gone once empty (a
    // cgroup another runtime still uses is not removed).
    let mut above = Path::new(&l.cgroup_parent).parent();
    while let Some(a) = above.filter(|a| a.parent().is_some()) {
        remove_empty_cgroup(&a.to_string_lossy());
        above = a.parent();
    }
    for d in [&l.run, &l.data] {
        if d.exists() {
            if let Err(e) = fs::remove_dir_all(d) {
                tracing::warn!(path = %d.display(), error = %e, "cannot remove a Docker instance's state");
            }
        }
    }
}

/// SIGTERM, then SIGKILL after [`STOP_LIMIT`].
fn end(pids: &[i32]) {
    for &pid in pids {
        let _ = ferry_sys::kill(pid, ferry_sys::Signal::Term);
    }
    let gone = wait_until(STOP_LIMIT, || pids.iter().all(|&p| !alive(p)));
    if !gone {
        for &pid in pids.iter().filter(|&&p| alive(p)) {
            tracing::warn!(pid, "a Docker daemon did not end: killing it");
            let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
        }
        wait_until(Duration::from_secs(5), || pids.iter().all(|&p| !alive(p)));
    }
}

fn alive(pid: i32) -> bool {
    ferry_sys::process_exists(pid) && ferry_sys::process_state(pid) != Some('Z')
}

/// Containers runc still has under the instance's roots (a daemon that died mid-way).
fn runc_leftovers(exec_root: &Path) {
    let Ok(roots) = fs::read_dir(exec_root) else { return };
    for r in roots.flatten() {
        let name = r.file_name().to_string_lossy().into_owned();
        if !name.starts_with("runtime-") {
            continue;
        }
        let root = r.path().join("moby");
        let Ok(ids) = fs::read_dir(&root) else { continue };
        for id in ids.flatten() {
            let id = id.file_name().to_string_lossy().into_owned();
            for args in [vec!["kill", &id, "KILL"], vec!["delete", "--force", &id]] {
                let _ = Command::new("runc")
                    .env("PATH", DAEMON_PATH)
                    .arg("--root")
                    .arg(&root)
                    .args(&args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

fn unmount_under(base: &Path) {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else { return };
    let base = base.to_string_lossy().into_owned();
    let mut points: Vec<String> = crate::container::runc_state::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m == &base || m.starts_with(&format!("{base}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        if let Err(e) = ferry_sys::unmount(Path::new(&p)) {
            tracing::debug!(path = %p, error = %e, "unmount");
        }
    }
}

/// Removes `parent` (and what is left below it) in every cgroup hierarchy.
fn remove_cgroups(parent: &str) {
    let rel = parent.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else { return };
    for h in hierarchies.flatten() {
        let top = h.path().join(rel);
        if top.is_dir() {
            remove_cgroup_tree(&top);
        }
    }
}

/// Removes `path` in every hierarchy where it is empty.
fn remove_empty_cgroup(path: &str) {
    let rel = path.trim_start_matches('/');
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else { return };
    for h in hierarchies.flatten() {
        let _ = fs::remove_dir(h.path().join(rel));
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        tracing::debug!(path = %dir.display(), error = %e, "cannot remove a cgroup");
    }
}

/// Processes whose command line matches.
fn processes(matches: impl Fn(&[String]) -> bool) -> Vec<i32> {
    let Ok(procs) = fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| matches(&cmdline(pid)))
        .collect()
}

fn cmdline(pid: i32) -> Vec<String> {
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else { return Vec::new() };
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last lines of a daemon's log.
fn tail(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(log) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        use std::io::{Seek, SeekFrom};
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let out: Vec<&str> = lines.into_iter().rev().collect();
    if out.is_empty() {
        format!("nothing in {}", log.display())
    } else {
        format!("{} (from {})", out.join(" | "), log.display())
    }
}

fn io_err(action: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Container(format!("cannot {action} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> InstanceDirs {
        InstanceDirs {
            data: "/var/lib/l/nodes/n1/runtimes".into(),
            run: "/run/l/nodes/n1/rt".into(),
            netns: Some("/run/netns/n1".into()),
            cgroup_parent: "/ferry-lab/l/n1".into(),
        }
    }

    #[test]
    fn each_instance_keeps_everything_private() {
        let l = Layout::of(&dirs());
        let d = l.daemon_json(Path::new("/opt/ferry/ferry-runc"));
        assert_eq!(d["data-root"], "/var/lib/l/nodes/n1/runtimes/docker/root");
        assert_eq!(d["exec-root"], "/run/l/nodes/n1/rt/docker/exec");
        assert_eq!(d["hosts"][0], "unix:///run/l/nodes/n1/rt/docker/docker.sock");
        assert_eq!(d["containerd"], "/run/l/nodes/n1/rt/docker/ctd/ctd.sock");
        assert_eq!(d["cgroup-parent"], "/ferry-lab/l/n1/docker");
        assert_eq!(d["experimental"], true);
        for off in ["iptables", "ip6tables", "ip-forward", "ip-masq", "userland-proxy"] {
            assert_eq!(d[off], false, "{off}");
        }
        assert_eq!(d["bridge"], "none");
        assert_eq!(d["default-runtime"], RUNTIME_NAME);
        assert_eq!(d["runtimes"][RUNTIME_NAME]["path"], "/opt/ferry/ferry-runc");
        assert_eq!(d["runtimes"][RUNTIME_NAME]["runtimeArgs"][0], wrapper::DIR_FLAG);
        assert_eq!(d["runtimes"][RUNTIME_NAME]["runtimeArgs"][1], "/run/l/nodes/n1/rt/docker/wrap");
        let toml = l.containerd_toml();
        assert!(toml.contains("root = \"/var/lib/l/nodes/n1/runtimes/docker/containerd\""), "{toml}");
        assert!(toml.contains("address = \"/run/l/nodes/n1/rt/docker/ctd/ctd.sock\""), "{toml}");
        assert!(toml.contains("io.containerd.grpc.v1.cri"));
        assert!(!toml.contains("/run/containerd") && !toml.contains("/var/lib/containerd"));
        // The socket path stays far below the 107 bytes a socket's name may have.
        assert!(l.ctd_dir().join("ctd.sock.ttrpc").as_os_str().len() < 80);
    }
}
