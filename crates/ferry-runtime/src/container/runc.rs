//! runc, driven through its CLI with its state under a `--root` (the endpoint).
//!
//! runc keeps no images: a container's root is a directory, or an overlay over read-only
//! directories (an "image" that must exist on every host). A restored container gets a bundle
//! of ferry's (`STATE/runc-bundles/NAME`: `config.json`, the overlay's upper and work
//! directories, the mounted root) and its standard output and error go to `stdio.log` there
//! through a pipe, as runc needs them to be pipes to restore them.

use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::record::{read_capped, validate_name, DESCRIPTORS_FILE};
use super::{
    runc_state, Container, ContainerRecord, ContainerRuntime, CreateSpec, Endpoints, InstanceDirs, Kind,
    NetworkRecord, RestoreSpec, Restored, RootfsRecord, RECORD_VERSION,
};
use crate::Error;

const KIND: &str = "runc";
const MAX_SPEC: u64 = 4 << 20;
const MAX_STATE_OUTPUT: u64 = 1 << 20;

/// runc with its state under `root`.
#[derive(Debug, Clone)]
pub struct Runc {
    root: PathBuf,
    bundles: PathBuf,
    binary: PathBuf,
}

pub(super) const KIND_ENTRY: Kind = Kind {
    name: KIND,
    default_endpoint: "/run/runc",
    open,
    instance_endpoint,
    start_instance,
    stop_instance,
};

fn open(endpoints: &Endpoints) -> Box<dyn ContainerRuntime> {
    Box::new(Runc::new(endpoints))
}

/// runc has no daemon: an instance is a state directory.
fn instance_endpoint(dirs: &InstanceDirs) -> PathBuf {
    dirs.run.join("runc")
}

fn start_instance(dirs: &InstanceDirs) -> Result<(), Error> {
    let root = instance_endpoint(dirs);
    fs::create_dir_all(&root).map_err(|e| io_err("create", &root, e))
}

/// Deletes every container of the instance (`runc delete --force` kills them).
fn stop_instance(dirs: &InstanceDirs) {
    let root = instance_endpoint(dirs);
    let Ok(entries) = fs::read_dir(&root) else { return };
    let mut endpoints = Endpoints::new(&dirs.data);
    endpoints.set(KIND, &root);
    let runc = Runc::new(&endpoints);
    for e in entries.flatten() {
        if let Some(name) = e.file_name().to_str() {
            runc.discard(name);
        }
    }
    // The cgroups its containers were given (runc removed theirs; the parent is ours).
    let parent = format!("ferry-runc/{}", root_tag(&root));
    if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let _ = fs::remove_dir(h.path().join(&parent));
        }
    }
    let _ = fs::remove_dir_all(&root);
}

/// `runc state`'s answer (the OCI state).
#[derive(Debug, Deserialize)]
struct OciState {
    #[serde(default)]
    pid: i32,
    status: String,
    bundle: String,
}

impl Runc {
    pub fn new(endpoints: &Endpoints) -> Runc {
        Runc {
            root: endpoints.get(KIND),
            bundles: endpoints.state_dir.join("runc-bundles"),
            binary: std::env::var_os("FERRY_RUNC").map(PathBuf::from).unwrap_or_else(|| "runc".into()),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root);
        c
    }

    fn unavailable(&self, detail: String) -> Error {
        Error::runtime_unavailable(KIND, &self.root, detail)
    }

    /// The OCI state of `id`, `None` if runc does not know it.
    fn state(&self, id: &str) -> Result<Option<OciState>, Error> {
        let out = self
            .cmd()
            .arg("state")
            .arg(id)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.unavailable(format!("cannot run {}: {e}", self.binary.display())))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("does not exist") || err.contains("not exist") {
                return Ok(None);
            }
            return Err(Error::runtime_failed(KIND, format!("runc state {id}"), err.trim(), None));
        }
        if out.stdout.len() as u64 > MAX_STATE_OUTPUT {
            return Err(Error::Container("runc state printed too much".into()));
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| Error::Container(format!("runc state {id}: {e}")))
    }

    fn bundle_of(&self, name: &str) -> PathBuf {
        self.bundles.join(name)
    }

    /// Unmounts and removes a bundle of ferry's.
    fn remove_bundle(&self, name: &str) {
        let bundle = self.bundle_of(name);
        if !bundle.exists() {
            return;
        }
        let rootfs = bundle.join("rootfs");
        if is_mount_point(&rootfs) {
            if let Err(e) = umount(&rootfs) {
                tracing::warn!(path = %rootfs.display(), error = %e, "cannot unmount a restored container's root");
                return;
            }
        }
        if let Err(e) = fs::remove_dir_all(&bundle) {
            tracing::warn!(path = %bundle.display(), error = %e, "cannot remove a restored container's bundle");
        }
    }

    /// Makes the root of bundle `bundle` for `record` and returns its path for `config.json`.
    fn make_rootfs(&self, req: &RestoreSpec<'_>, bundle: &Path) -> Result<PathBuf, Error> {
        match &req.record.rootfs {
            RootfsRecord::Overlay { lower } => {
                let rootfs = bundle.join("rootfs");
                mount_overlay(lower, &bundle.join("upper"), &bundle.join("work"), &rootfs)?;
                super::rootfs::apply_diff(
                    &rootfs,
                    req.rootfs_diff().as_deref(),
                    req.deleted_files().as_deref(),
                )?;
                Ok(rootfs)
            }
            RootfsRecord::Directory { path } => {
                if req.rootfs_diff().is_some() {
                    tracing::warn!(%path, "the container's root is a plain directory: it is used as it is now");
                }
                Ok(PathBuf::from(path))
            }
            RootfsRecord::Image => {
                Err(Error::Container("a runc container has no image to make its root from".into()))
            }
        }
    }

    fn restore_in(&self, req: &RestoreSpec<'_>, bundle: &Path) -> Result<Restored, Error> {
        fs::create_dir_all(bundle).map_err(|e| io_err("create", bundle, e))?;
        let rootfs = self.make_rootfs(req, bundle)?;
        let mut spec = req.spec();
        spec["root"]["path"] = rootfs.to_string_lossy().into_owned().into();
        spec["process"]["terminal"] = false.into();
        let recorded = spec.pointer("/linux/cgroupsPath").and_then(|p| p.as_str()).unwrap_or("").to_owned();
        if recorded.starts_with("/ferry-runc/") || cgroup_in_use(&recorded) {
            // Another instance's (a lab node's), or still held by the frozen original.
            spec["linux"]["cgroupsPath"] =
                format!("/ferry-runc/{}/{}", root_tag(&self.root), req.name).into();
        }
        let config = bundle.join("config.json");
        fs::write(&config, serde_json::to_vec_pretty(&spec).map_err(|e| Error::Internal(e.to_string()))?)
            .map_err(|e| io_err("write", &config, e))?;
        // runc reads descriptors.json from --image-path; CRIU reads the images where the
        // configuration file says.
        let stub = req.scratch.join("runc-images");
        fs::create_dir_all(&stub).map_err(|e| io_err("create", &stub, e))?;
        let descriptors = req.images.join(DESCRIPTORS_FILE);
        fs::copy(&descriptors, stub.join(DESCRIPTORS_FILE)).map_err(|e| io_err("copy", &descriptors, e))?;
        let pidfile = req.scratch.join("runc.pid");
        let runc_log = req.scratch.join("runc.log");
        let work = req.log.parent().unwrap_or(req.scratch).to_path_buf();
        let mut cmd = self.cmd();
        cmd.arg("--log")
            .arg(&runc_log)
            .args(["--log-format", "json"])
            .arg("restore")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle)
            .arg("--image-path")
            .arg(&stub)
            .arg("--work-path")
            .arg(&work)
            .arg("--pid-file")
            .arg(&pidfile)
            .arg(req.name);
        run_with_stdio(cmd, &bundle.join("stdio.log"), "restore", &runc_log, req.log)?;
        let pid = read_pid(&pidfile)?;
        Ok(Restored { id: req.name.to_owned(), name: req.name.to_owned(), pid })
    }
}

impl ContainerRuntime for Runc {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn inspect(&self, id: &str) -> Result<Container, Error> {
        validate_name("id", id, false).map_err(|_| Error::InvalidWorkload {
            input: format!("runc:{id}"),
            why: "not a runc container id".into(),
        })?;
        let workload = format!("{KIND}:{id}");
        let state = self.state(id)?.ok_or_else(|| Error::ContainerNotFound {
            workload: workload.clone(),
            where_: self.root.display().to_string(),
        })?;
        if state.status != "running" {
            return Err(Error::ContainerNotRunning { workload, state: state.status });
        }
        let config = Path::new(&state.bundle).join("config.json");
        let spec_bytes = read_capped(&config, MAX_SPEC).map_err(|e| io_err("read", &config, e))?;
        let spec: serde_json::Value = serde_json::from_slice(&spec_bytes)
            .map_err(|e| Error::Container(format!("{}: {e}", config.display())))?;
        let plan = runc_state::dump_plan(&self.root, id)?;
        if plan.init_pid != state.pid {
            return Err(Error::ContainerNotRunning { workload, state: "restarting".into() });
        }
        let rootfs = match &plan.overlay {
            Some(o) => RootfsRecord::Overlay {
                lower: o.lower.iter().map(|p| p.to_string_lossy().into_owned()).collect(),
            },
            None => RootfsRecord::Directory { path: plan.dump.root.to_string_lossy().into_owned() },
        };
        let mut record = ContainerRecord {
            version: RECORD_VERSION,
            kind: KIND.into(),
            id: id.to_owned(),
            name: id.to_owned(),
            image: None,
            spec,
            rootfs,
            labels: Default::default(),
            network: plan.netns_path.as_deref().map(|p| {
                let (ip, mac) = super::netns_address(p);
                NetworkRecord { external: true, ip, mac }
            }),
            runtime: serde_json::json!({ "bundle": state.bundle }),
        };
        record.labels = record.annotations();
        Ok(Container { record, plan })
    }

    fn remove(&self, record: &ContainerRecord) -> Result<(), Error> {
        let out = self
            .cmd()
            .args(["delete", "--force", &record.id])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.unavailable(format!("cannot run {}: {e}", self.binary.display())))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if !err.contains("not exist") {
                return Err(Error::runtime_failed(
                    KIND,
                    format!("runc delete {}", record.id),
                    err.trim(),
                    None,
                ));
            }
        }
        self.remove_bundle(&record.id);
        Ok(())
    }

    fn exists(&self, name: &str) -> Result<bool, Error> {
        Ok(self.state(name)?.is_some())
    }

    fn preflight(&self, record: &ContainerRecord, _name: &str) -> Vec<String> {
        let mut problems = Vec::new();
        match &record.rootfs {
            RootfsRecord::Overlay { lower } => {
                for l in lower.iter().filter(|l| !Path::new(l).is_dir()) {
                    problems.push(format!(
                        "the container's image directory {l} is missing here: copy it to this host first"
                    ));
                }
            }
            RootfsRecord::Directory { path } if !Path::new(path).is_dir() => problems.push(format!(
                "the container's root directory {path} is missing here: copy it to this host first"
            )),
            _ => {}
        }
        problems
    }

    fn restore(&self, req: &RestoreSpec<'_>) -> Result<Restored, Error> {
        let bundle = self.bundle_of(req.name);
        if bundle.exists() {
            // Left by a restore that failed half way (runc does not know the name: preflight).
            self.remove_bundle(req.name);
        }
        self.restore_in(req, &bundle)
    }

    fn discard(&self, name: &str) {
        let _ = self.cmd().args(["delete", "--force", name]).stdin(Stdio::null()).output();
        self.remove_bundle(name);
    }

    fn create(&self, req: &CreateSpec<'_>) -> Result<Restored, Error> {
        validate_name("name", req.name, false)?;
        if self.state(req.name)?.is_some() {
            return Err(Error::NameTaken { workload: format!("{KIND}:{}", req.name) });
        }
        let image = req.image;
        super::record::validate_host_path("image directory", image)?;
        let bundle = self.bundle_of(req.name);
        self.remove_bundle(req.name);
        let created = self.create_in(req, &bundle);
        if created.is_err() {
            self.discard(req.name);
        }
        created
    }

    fn import_image(&self, rootfs: &Path, _name: &str) -> Result<(), Error> {
        if rootfs.is_dir() {
            Ok(())
        } else {
            Err(Error::Container(format!("{} is not a root filesystem directory", rootfs.display())))
        }
    }
}

impl Runc {
    fn create_in(&self, req: &CreateSpec<'_>, bundle: &Path) -> Result<Restored, Error> {
        fs::create_dir_all(&self.root).map_err(|e| io_err("create", &self.root, e))?;
        fs::create_dir_all(bundle).map_err(|e| io_err("create", bundle, e))?;
        let rootfs = bundle.join("rootfs");
        mount_overlay(&[req.image.to_owned()], &bundle.join("upper"), &bundle.join("work"), &rootfs)?;
        // runc's own default spec, then what the request changes.
        let out = Command::new(&self.binary)
            .args(["spec", "--bundle"])
            .arg(bundle)
            .output()
            .map_err(|e| self.unavailable(format!("cannot run {}: {e}", self.binary.display())))?;
        if !out.status.success() {
            return Err(Error::runtime_failed(
                KIND,
                "runc spec",
                String::from_utf8_lossy(&out.stderr).trim(),
                None,
            ));
        }
        let config = bundle.join("config.json");
        let bytes = read_capped(&config, MAX_SPEC).map_err(|e| io_err("read", &config, e))?;
        let mut spec: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::Container(format!("runc spec: {e}")))?;
        spec["root"] = serde_json::json!({ "path": rootfs, "readonly": false });
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = serde_json::json!(req.args);
        if let Some(env) = spec["process"]["env"].as_array_mut() {
            env.extend(req.env.iter().map(|e| serde_json::Value::from(e.as_str())));
        }
        spec["hostname"] = req.name.into();
        spec["annotations"] = serde_json::json!(req.labels);
        if let Some(netns) = req.netns {
            super::set_namespace_path(&mut spec, "network", netns);
        }
        if let Some(mounts) = spec["mounts"].as_array_mut() {
            for (src, dst) in &req.mounts {
                mounts.push(serde_json::json!({
                    "destination": dst, "type": "bind", "source": src, "options": ["rbind", "rw"]
                }));
            }
        }
        if let Some(limit) = req.memory_limit {
            spec["linux"]["resources"]["memory"] = serde_json::json!({ "limit": limit });
        }
        spec["linux"]["cgroupsPath"] = format!("/ferry-runc/{}/{}", root_tag(&self.root), req.name).into();
        fs::write(&config, serde_json::to_vec_pretty(&spec).map_err(|e| Error::Internal(e.to_string()))?)
            .map_err(|e| io_err("write", &config, e))?;
        let pid = run(&self.root, &self.binary, req.name, bundle)?;
        Ok(Restored { id: req.name.to_owned(), name: req.name.to_owned(), pid })
    }
}

/// True if the v1 freezer (or v2) cgroup `path` exists.
fn cgroup_in_use(path: &str) -> bool {
    let rel = path.trim_start_matches('/');
    !rel.is_empty()
        && ["/sys/fs/cgroup/freezer", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .any(|root| Path::new(root).join(rel).join("cgroup.procs").exists())
}

/// A short tag of a runc root, so that two instances on one host (lab nodes) never share a
/// cgroup for containers of the same name.
fn root_tag(root: &Path) -> String {
    let digest = root
        .to_string_lossy()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{:08x}", digest as u32)
}

/// Starts a new runc container `name` in `bundle` (whose `config.json` is written) with its
/// output appended to `stdio.log` there; returns its init PID.
fn run(root: &Path, binary: &Path, name: &str, bundle: &Path) -> Result<i32, Error> {
    let pidfile = bundle.join("runc.pid");
    let runc_log = bundle.join("runc.log");
    let mut cmd = Command::new(binary);
    cmd.arg("--root").arg(root);
    cmd.arg("--log")
        .arg(&runc_log)
        .args(["--log-format", "json"])
        .arg("run")
        .arg("--detach")
        .arg("--bundle")
        .arg(bundle)
        .arg("--pid-file");
    cmd.arg(&pidfile).arg(name);
    run_with_stdio(cmd, &bundle.join("stdio.log"), "run", &runc_log, &runc_log)?;
    read_pid(&pidfile)
}

/// Runs a detaching runc command whose container keeps its stdin and stdout/stderr as pipes
/// (runc can only restore pipes): a `cat`, in a session of its own, holds the other ends and
/// appends what the container prints to `log`.
fn run_with_stdio(
    mut cmd: Command,
    log: &Path,
    action: &str,
    runc_log: &Path,
    criu_log: &Path,
) -> Result<(), Error> {
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let log_file =
        fs::OpenOptions::new().create(true).append(true).open(log).map_err(|e| io_err("open", log, e))?;
    // `setsid --fork`: the holder's parent exits at once (reaped here), so that a long-lived
    // caller (an agent) collects no zombies; the holder itself passes to init.
    let mut holder = Command::new("setsid");
    holder
        .args(["--fork", "cat"])
        .stdin(Stdio::from(out_r))
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::null());
    // The holder keeps the write end of the container's stdin open: it never sees EOF.
    ferry_sys::inherit_fd_in_child(&mut holder, in_w.as_fd());
    holder.status().map_err(|e| Error::Container(format!("cannot start the output holder (cat): {e}")))?;
    drop(in_w);
    let err_w = out_w.try_clone().map_err(|e| Error::Container(format!("cannot duplicate a pipe: {e}")))?;
    cmd.stdin(Stdio::from(in_r)).stdout(Stdio::from(out_w)).stderr(Stdio::from(err_w));
    let status = cmd
        .status()
        .map_err(|e| Error::runtime_unavailable(KIND, "runc", format!("cannot run runc: {e}")))?;
    if status.success() {
        return Ok(());
    }
    let detail = runc_error(runc_log);
    Err(Error::runtime_failed(KIND, format!("runc {action}"), detail, Some(criu_log.to_path_buf())))
}

/// The last error runc logged (its log is JSON lines).
fn runc_error(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(f) = fs::File::open(log) {
        let _ = f.take(1 << 20).read_to_string(&mut text);
    }
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["level"] == "error")
        .and_then(|v| v["msg"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "runc failed without saying why".into())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    let (r, w) = std::io::pipe().map_err(|e| Error::Container(format!("cannot make a pipe: {e}")))?;
    Ok((r.into(), w.into()))
}

fn read_pid(path: &Path) -> Result<i32, Error> {
    let text = fs::read_to_string(path).map_err(|e| io_err("read", path, e))?;
    text.trim().parse().map_err(|_| Error::Container(format!("{} holds no PID", path.display())))
}

fn mount_overlay(lower: &[String], upper: &Path, work: &Path, target: &Path) -> Result<(), Error> {
    for d in [upper, work, target] {
        fs::create_dir_all(d).map_err(|e| io_err("create", d, e))?;
    }
    // The root directory's mode and owner are the upper directory's: make them the image's.
    let top = Path::new(lower.first().map(String::as_str).unwrap_or("/"));
    let meta = fs::metadata(top).map_err(|e| io_err("stat", top, e))?;
    fs::set_permissions(upper, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| io_err("chmod", upper, e))?;
    std::os::unix::fs::chown(upper, Some(meta.uid()), Some(meta.gid()))
        .map_err(|e| io_err("chown", upper, e))?;
    let opts =
        format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), upper.display(), work.display());
    let out = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(target)
        .output()
        .map_err(|e| Error::Container(format!("cannot run mount: {e}")))?;
    if !out.status.success() {
        return Err(Error::Container(format!(
            "cannot mount the container's root at {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn umount(target: &Path) -> Result<(), String> {
    let out = Command::new("umount").arg(target).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn is_mount_point(p: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let p = p.to_string_lossy();
    runc_state::parse_mountinfo(&text).iter().any(|m| m.mount_point == p)
}

fn io_err(action: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Container(format!("cannot {action} {}: {e}", path.display()))
}
