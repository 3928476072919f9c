//! A private Podman service (`podman system service --time=0 unix://SOCK`) per lab node, with
//! nothing shared with another instance or with the host's own Podman.
//!
//! Its state: `DATA/podman` (configuration, images and containers' layers) and `RUN/podman`
//! (the socket, the run root, libpod's tmp dir with its lock files, runc's root, `TMPDIR`).
//! What keeps two instances apart on one machine, found the hard way (research notes):
//! - `CONTAINERS_CONF` replaces every system containers.conf; `lock_type = "file"` (the
//!   default is one SHM segment for the whole machine); `static_dir` left unset: conmon's exit
//!   command (`podman container cleanup`, which also applies restart policies) is not given
//!   it and looks for the database under the graph root, where the default puts it;
//! - Podman 4.3.1 never passes `--root` to runc (runc then keeps every container in
//!   `/run/runc`), and `--runtime-flag` is not copied into the exit command either: the
//!   runtime is a wrapper script that adds `--root RUN/podman/runc`;
//! - containers are created under the instance's cgroup parent (without one, every Podman
//!   uses `/libpod_parent`, and conmon goes to `PARENT/conmon`);
//! - `TMPDIR` is where the API writes the archives it receives.
//!
//! One file is not Podman's to move: an image load writes
//! `/var/lib/containers/cache/blob-info-cache-v1.boltdb` (not configurable in 4.3.1). When
//! `/var/lib/containers` did not exist before ferry's first instance, ferry notes that and
//! removes it again when no Podman runs any more and it holds nothing but that cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::http::{Body, Client};
use super::{io_err, KIND};
use crate::container::InstanceDirs;
use crate::Error;

/// How long a starting service may take to answer (cold: about 0.75 s here).
const START_WAIT: Duration = Duration::from_secs(30);
/// The instance's own description, beside its socket (read by [`super::Podman::new`]).
pub(crate) const INSTANCE_FILE: &str = "ferry-instance.json";
/// Noted when ferry found `/var/lib/containers` missing (Podman's image cache then is ours).
const VARLIB_NOTE: &str = "/run/ferry-podman-made-var-lib-containers";
const VARLIB: &str = "/var/lib/containers";
const BLOB_CACHE_PREFIX: &str = "blob-info-cache";

pub(crate) fn run_dir(dirs: &InstanceDirs) -> PathBuf {
    dirs.run.join("podman")
}

fn data_dir(dirs: &InstanceDirs) -> PathBuf {
    dirs.data.join("podman")
}

pub(crate) fn endpoint(dirs: &InstanceDirs) -> PathBuf {
    run_dir(dirs).join("podman.sock")
}

/// True if the service at `socket` answers its ping.
pub(crate) fn answers(socket: &Path) -> bool {
    Client::new(socket).call("GET", "/_ping", Body::None, 1024, Duration::from_secs(5)).is_ok_and(|r| r.ok())
}

/// Starts the instance in `dirs` unless it answers already; returns once its API does.
pub(crate) fn start(dirs: &InstanceDirs) -> Result<(), Error> {
    let socket = endpoint(dirs);
    if answers(&socket) {
        return Ok(());
    }
    let (run, data) = (run_dir(dirs), data_dir(dirs));
    for d in ["storage", "libpod", "tmp", "runc"] {
        mkdir(&run.join(d))?;
    }
    for d in ["storage", "volumes", "net"] {
        mkdir(&data.join(d))?;
    }
    write_config(dirs, &run, &data)?;
    note_varlib();
    let _ = fs::remove_file(&socket);
    let log = run.join("service.log");
    let log_file = fs::File::create(&log).map_err(|e| io_err("create", &log, e))?;
    let err_file = log_file.try_clone().map_err(|e| io_err("open", &log, e))?;
    let pidfile = run.join("service.pid");
    // `setsid --fork`: the service's parent exits at once, so that a long-lived caller (an
    // agent, a test) collects no zombie; the shell writes the pid the service will have.
    let mut cmd = Command::new("setsid");
    cmd.args(["--fork", "sh", "-c", "echo $$ > \"$0\" && exec \"$@\""]).arg(&pidfile);
    if let Some(netns) = &dirs.netns {
        cmd.arg("nsenter").arg(format!("--net={}", netns.display())).arg("--");
    }
    cmd.args(["podman", "system", "service", "--time=0"])
        .arg(format!("unix://{}", socket.display()))
        .env_clear()
        .env("PATH", SERVICE_PATH)
        .env("HOME", &run)
        .env("CONTAINERS_CONF", data.join("containers.conf"))
        .env("CONTAINERS_STORAGE_CONF", data.join("storage.conf"))
        .env("CONTAINERS_REGISTRIES_CONF", data.join("registries.conf"))
        .env("TMPDIR", run.join("tmp"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(err_file));
    let status = cmd.status().map_err(|e| {
        Error::runtime_unavailable(KIND, &socket, format!("cannot start podman system service: {e}"))
    })?;
    if !status.success() {
        return Err(Error::runtime_unavailable(KIND, &socket, format!("setsid exited with {status}")));
    }
    let started = Instant::now();
    while !answers(&socket) {
        if started.elapsed() > START_WAIT {
            let tail = log_tail(&log);
            stop(dirs);
            return Err(Error::runtime_unavailable(
                KIND,
                &socket,
                format!("podman system service did not answer within {} s: {tail}", START_WAIT.as_secs()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(socket = %socket.display(), seconds = started.elapsed().as_secs_f64(), "podman service started");
    Ok(())
}

/// PATH of the service, its conmon and runc: CRIU >= 4.2 is in /usr/local/sbin.
const SERVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn write_config(dirs: &InstanceDirs, run: &Path, data: &Path) -> Result<(), Error> {
    let runc_root = run.join("runc");
    let runc =
        ["/usr/sbin/runc", "/usr/bin/runc"].iter().find(|p| Path::new(p).exists()).copied().unwrap_or("runc");
    let wrapper = data.join("runc");
    // runc's root for every call Podman (and conmon's exit command) makes.
    write(&wrapper, &format!("#!/bin/sh\nexec {runc} --root {} \"$@\"\n", sh_quote(&runc_root)))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
        .map_err(|e| io_err("chmod", &wrapper, e))?;
    let conf = format!(
        r#"# Written by ferry for a private instance; see ferry-runtime's container::podman.
[containers]
# Podman's defaults ask for more than this kernel allows a container.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = {events}
lock_type = "file"
tmp_dir = {tmp_dir}
volume_path = {volumes}
image_copy_tmp_dir = {tmp}
conmon_env_vars = [{path}]

[engine.runtimes]
runc = [{wrapper}]

[network]
network_backend = "cni"
network_config_dir = {net}
cni_plugin_dirs = ["/usr/lib/cni"]
"#,
        events = toml_str(&run.join("events.log")),
        tmp_dir = toml_str(&run.join("libpod")),
        volumes = toml_str(&data.join("volumes")),
        tmp = toml_str(&run.join("tmp")),
        path = toml_str(Path::new(&format!("PATH={SERVICE_PATH}"))),
        wrapper = toml_str(&wrapper),
        net = toml_str(&data.join("net")),
    );
    write(&data.join("containers.conf"), &conf)?;
    let storage = format!(
        "[storage]\ndriver = \"overlay\"\ngraphroot = {}\nrunroot = {}\n",
        toml_str(&data.join("storage")),
        toml_str(&run.join("storage"))
    );
    write(&data.join("storage.conf"), &storage)?;
    write(&data.join("registries.conf"), "unqualified-search-registries = []\n")?;
    let me = serde_json::json!({ "cgroup_parent": dirs.cgroup_parent, "runc_root": runc_root });
    write(&run.join(INSTANCE_FILE), &me.to_string())
}

/// Stops the instance: its containers, the service and what it started, its mounts, its
/// cgroups and its state. Nothing there is fine.
pub(crate) fn stop(dirs: &InstanceDirs) {
    let (run, data) = (run_dir(dirs), data_dir(dirs));
    let socket = endpoint(dirs);
    if answers(&socket) {
        remove_all_containers(&socket);
    }
    stop_service(&run.join("service.pid"), &socket);
    // Containers the service could not remove (it was down): runc kills and forgets them.
    let runc_root = run.join("runc");
    if let Ok(entries) = fs::read_dir(&runc_root) {
        for e in entries.flatten() {
            let _ = Command::new(data.join("runc"))
                .args(["delete", "--force"])
                .arg(e.file_name())
                .stdin(Stdio::null())
                .output()
                .or_else(|_| {
                    Command::new("runc")
                        .arg("--root")
                        .arg(&runc_root)
                        .args(["delete", "--force"])
                        .arg(e.file_name())
                        .output()
                });
        }
    }
    kill_leftovers(&[&run, &data]);
    unmount_under(&[&run, &data]);
    remove_cgroups(&dirs.cgroup_parent);
    for d in [&run, &data] {
        if let Err(e) = fs::remove_dir_all(d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %d.display(), error = %e, "cannot remove the podman instance's state");
            }
        }
    }
    forget_varlib();
}

fn remove_all_containers(socket: &Path) {
    let client = Client::new(socket);
    let list = client.call(
        "GET",
        "/v4.0.0/libpod/containers/json?all=true",
        Body::None,
        64 << 20,
        Duration::from_secs(30),
    );
    let Ok(list) = list else { return };
    let ids: Vec<String> = serde_json::from_slice::<Vec<serde_json::Value>>(&list.body)
        .unwrap_or_default()
        .iter()
        .filter_map(|c| c["Id"].as_str().map(str::to_owned))
        .collect();
    for id in ids {
        let target = format!("/v4.0.0/libpod/containers/{id}?force=true&t=0");
        if let Err(e) = client.call("DELETE", &target, Body::None, 1 << 20, Duration::from_secs(60)) {
            tracing::warn!(%id, error = %e, "cannot remove a container of the podman instance");
        }
    }
}

/// Ends the service whose pid `pidfile` holds, if it is still that service.
fn stop_service(pidfile: &Path, socket: &Path) {
    let Some(pid) = fs::read_to_string(pidfile).ok().and_then(|t| t.trim().parse::<i32>().ok()) else {
        return;
    };
    if !cmdline(pid).is_some_and(|c| c.contains(&socket.to_string_lossy().into_owned())) {
        return;
    }
    let _ = ferry_sys::kill(pid, ferry_sys::Signal::Term);
    if !wait_gone(pid, Duration::from_secs(10)) {
        let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
        wait_gone(pid, Duration::from_secs(5));
    }
}

fn wait_gone(pid: i32, limit: Duration) -> bool {
    let t = Instant::now();
    while ferry_sys::process_exists(pid) {
        if t.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The command line of `pid`, its arguments joined by blanks.
fn cmdline(pid: i32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " "))
}

/// Kills what this instance started and left: conmon, runc and Podman processes (a cleanup)
/// whose command line names one of its private directories (an agent's names the socket too,
/// hence the names).
fn kill_leftovers(dirs: &[&Path]) {
    let me = std::process::id() as i32;
    let needles: Vec<String> = dirs.iter().map(|d| format!("{}/", d.display())).collect();
    let Ok(procs) = fs::read_dir("/proc") else { return };
    let ours: Vec<i32> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| matches!(c.trim(), "conmon" | "runc" | "podman"))
        })
        .filter(|pid| cmdline(*pid).is_some_and(|c| needles.iter().any(|n| c.contains(n.as_str()))))
        .collect();
    for pid in &ours {
        tracing::debug!(pid, "killing a leftover of the podman instance");
        let _ = ferry_sys::kill(*pid, ferry_sys::Signal::Kill);
    }
    for pid in ours {
        wait_gone(pid, Duration::from_secs(5));
    }
}

/// Unmounts everything mounted under `dirs`, deepest first.
fn unmount_under(dirs: &[&Path]) {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<String> = crate::container::runc_state::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| dirs.iter().any(|d| Path::new(m).starts_with(d)))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        let ok = Command::new("umount").arg(&p).output().is_ok_and(|o| o.status.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&p).output();
        }
    }
}

/// Removes the cgroups Podman made under `parent` (its containers' and conmon's) in every
/// hierarchy, and then `parent` and its ancestors as far as they are empty (runc made them).
fn remove_cgroups(parent: &str) {
    let rel = parent.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else { return };
    for h in hierarchies.flatten() {
        let p = h.path().join(rel);
        if let Ok(children) = fs::read_dir(&p) {
            for c in children.flatten() {
                let name = c.file_name().to_string_lossy().into_owned();
                if c.path().is_dir() && (name.starts_with("libpod-") || name == "conmon") {
                    remove_cgroup_tree(&c.path());
                }
            }
        }
        for dir in p.ancestors().take_while(|d| *d != h.path()) {
            if fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

/// Removes a cgroup of the instance's (a container's, or its conmons'), ending what still
/// runs in it (a cleanup that conmon started late): it may take a moment to be empty.
fn remove_cgroup_tree(dir: &Path) {
    let started = Instant::now();
    loop {
        kill_members(dir);
        if remove_tree_once(dir) || started.elapsed() > Duration::from_secs(5) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_members(dir: &Path) {
    if let Ok(children) = fs::read_dir(dir) {
        for c in children.flatten().filter(|c| c.path().is_dir()) {
            kill_members(&c.path());
        }
    }
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
    }
}

fn remove_tree_once(dir: &Path) -> bool {
    if let Ok(children) = fs::read_dir(dir) {
        for c in children.flatten().filter(|c| c.path().is_dir()) {
            remove_tree_once(&c.path());
        }
    }
    fs::remove_dir(dir).is_ok() || !dir.exists()
}

/// Before ferry's Podman first runs: is `/var/lib/containers` someone else's?
fn note_varlib() {
    if !Path::new(VARLIB).exists() && !Path::new(VARLIB_NOTE).exists() {
        if let Err(e) =
            fs::write(VARLIB_NOTE, "ferry's podman instances made /var/lib/containers (its image cache)\n")
        {
            tracing::warn!(error = %e, "cannot note that /var/lib/containers is ferry's");
        }
    }
}

/// Removes `/var/lib/containers` if ferry's Podman made it, none runs any more, and it holds
/// nothing but Podman's image cache.
fn forget_varlib() {
    if !Path::new(VARLIB_NOTE).exists() || podman_runs() {
        return;
    }
    let names = |d: &Path| -> Vec<String> {
        fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let varlib = Path::new(VARLIB);
    // `cache/blob-info-cache-v1.boltdb` and nothing else (bolt may keep a lock file beside it).
    let only_cache = names(varlib).iter().all(|n| n == "cache")
        && names(&varlib.join("cache")).iter().all(|n| n.starts_with(BLOB_CACHE_PREFIX));
    if !only_cache {
        // Someone's Podman keeps more there now: theirs; a later stop looks again.
        tracing::info!("/var/lib/containers holds more than Podman's image cache: left as it is");
        return;
    }
    match fs::remove_dir_all(varlib) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot remove /var/lib/containers (Podman's image cache)");
            return;
        }
    }
    let _ = fs::remove_file(VARLIB_NOTE);
}

/// True if any `podman` process runs on this machine (ferry's or not).
fn podman_runs() -> bool {
    let me = std::process::id() as i32;
    let Ok(procs) = fs::read_dir("/proc") else { return true };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me && ferry_sys::process_exists(*pid))
        .any(|pid| fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "podman"))
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    if tail.is_empty() {
        "it printed nothing".into()
    } else {
        tail.join(" | ")
    }
}

fn mkdir(d: &Path) -> Result<(), Error> {
    fs::create_dir_all(d).map_err(|e| io_err("create", d, e))
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    fs::write(path, text).map_err(|e| io_err("write", path, e))
}

/// A TOML basic string.
fn toml_str(p: &Path) -> String {
    let s = p.to_string_lossy();
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A word for sh, single-quoted.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_paths_for_toml_and_sh() {
        assert_eq!(toml_str(Path::new("/run/a\"b")), "\"/run/a\\\"b\"");
        assert_eq!(sh_quote(Path::new("/a'b")), "'/a'\\''b'");
    }

    #[test]
    fn writes_a_private_configuration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dirs = InstanceDirs {
            data: dir.path().join("data"),
            run: dir.path().join("run"),
            netns: None,
            cgroup_parent: "/ferry-lab/x/node1".into(),
        };
        let (run, data) = (run_dir(&dirs), data_dir(&dirs));
        fs::create_dir_all(&run).expect("mkdir");
        fs::create_dir_all(&data).expect("mkdir");
        write_config(&dirs, &run, &data).expect("config");
        let conf = fs::read_to_string(data.join("containers.conf")).expect("read");
        let parsed: toml::Value = toml::from_str(&conf).expect("toml");
        assert_eq!(parsed["engine"]["lock_type"].as_str(), Some("file"));
        assert!(parsed["engine"].get("static_dir").is_none(), "static_dir must stay unset");
        assert_eq!(
            parsed["engine"]["runtimes"]["runc"][0].as_str(),
            Some(data.join("runc").to_str().expect("utf8"))
        );
        let wrapper = fs::read_to_string(data.join("runc")).expect("wrapper");
        assert!(wrapper.contains(&format!("--root '{}'", run.join("runc").display())), "{wrapper}");
        let storage: toml::Value =
            toml::from_str(&fs::read_to_string(data.join("storage.conf")).expect("read")).expect("toml");
        assert_eq!(storage["storage"]["runroot"].as_str(), Some(run.join("storage").to_str().expect("utf8")));
        let me: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(run.join(INSTANCE_FILE)).expect("read")).expect("json");
        assert_eq!(me["cgroup_parent"], "/ferry-lab/x/node1");
        assert_eq!(endpoint(&dirs), run.join("podman.sock"));
    }
}
