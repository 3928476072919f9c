//! containerd, through its gRPC API (the endpoint is its socket).
//!
//! A workload is `containerd:NAMESPACE/ID`, or `containerd:ID` in the namespace `default`; the
//! record's `id` is `NAMESPACE/ID` and its `name` the `ID`, and a restore keeps the record's
//! namespace (`--name` changes the ID only). containerd runs each container through runc under
//! the runc root of its runtime options (`ROOT/NAMESPACE/ID/state.json`), where ferry reads the
//! dump plan. A restore recreates the container record (`containers.Create` with the spec of
//! [`RestoreSpec::spec`]), prepares its snapshot from the image's layers, applies the root
//! filesystem's changes to it, and has containerd's runc shim restore it: `tasks.Create` with
//! runc options naming a checkpoint directory that holds only `descriptors.json` (what runc
//! reads itself; CRIU reads the images from ferry's tmpfs through `org.criu.config`), then
//! `tasks.Start`. Nothing goes through containerd's content store.
//!
//! ferry's private instances ([`instance`]) keep everything under their own directories: their
//! runc root, their containers' cgroups (under the instance's cgroup parent) and the log files
//! that take the containers' output. containerd 1.6 still puts its shims' sockets into the
//! host-wide `/run/containerd/s`, under names unique to the daemon's socket.

mod api;
mod image;
mod instance;
mod spec;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::{
    containers_client::ContainersClient, tasks_client::TasksClient, Container as CtdContainer,
    CreateContainerRequest, CreateTaskRequest, StartRequest, UpdateContainerRequest,
};
use containerd_client::tonic::Status;
use containerd_client::types::v1::Status as TaskStatus;
use containerd_client::types::Mount;
use prost_types::Any;
use serde::{Deserialize, Serialize};

use self::api::{req, Api, RuncOptions, CALL_LIMIT, RESTORE_LIMIT, SNAPSHOTTER, SPEC_TYPE_URL};
use self::instance::InstanceInfo;
use super::record::{validate_name, DESCRIPTORS_FILE};
use super::{
    runc_state, Container, ContainerRecord, ContainerRuntime, CreateSpec, Endpoints, Kind, NetworkRecord,
    RestoreSpec, Restored, RootfsRecord, RECORD_VERSION,
};
use crate::Error;

const KIND: &str = "containerd";
/// The namespace of a workload named without one (ctr's and containerd's own default).
pub const DEFAULT_NAMESPACE: &str = "default";
/// runc's root when the runtime options name none (containerd's default).
const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";
/// The label containerd's restart monitor restarts a container by (`running`) or stops it by.
const RESTART_STATUS_LABEL: &str = "containerd.io/restart.status";
/// containerd's limit on identifiers (namespaces, container ids).
const MAX_IDENTIFIER: usize = 76;

pub(super) const KIND_ENTRY: Kind = Kind {
    name: KIND,
    default_endpoint: "/run/containerd/containerd.sock",
    open,
    instance_endpoint: instance::endpoint,
    start_instance: instance::start,
    stop_instance: instance::stop,
};

fn open(endpoints: &Endpoints) -> Box<dyn ContainerRuntime> {
    Box::new(Containerd::new(endpoints))
}

/// containerd at one socket.
#[derive(Debug, Clone)]
pub struct Containerd {
    socket: PathBuf,
    /// ferry's own instance behind that socket (a lab node's), if it is one.
    instance: Option<InstanceInfo>,
    /// ferry's state directory (the output of containers restored into a host's containerd).
    state_dir: PathBuf,
}

/// What ferry records of a containerd container beside its spec (the record's `runtime`),
/// and reads back, as hostile, to recreate it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Recorded {
    namespace: String,
    /// The shim, `io.containerd.runc.v2` (or v1).
    runtime: String,
    /// Its runc options as the container had them (a restore keeps only the harmless ones).
    options: RuncOptions,
    snapshotter: String,
    /// The parent of the container's snapshot: the chain id of the image's layers, which the
    /// target must have.
    snapshot_parent: String,
}

impl Recorded {
    fn from_record(record: &ContainerRecord) -> Result<Recorded, Error> {
        let bad = |why: String| Error::BadContainerRecord(format!("containerd: {why}"));
        let r: Recorded = serde_json::from_value(record.runtime.clone())
            .map_err(|e| bad(format!("runtime record: {e}")))?;
        validate_identifier("namespace", &r.namespace).map_err(|e| bad(e.to_string()))?;
        if !r.runtime.starts_with("io.containerd.runc.") || !plain(&r.runtime) {
            return Err(bad(format!("runtime '{}' is not containerd's runc shim", trunc(&r.runtime))));
        }
        if !plain(&r.snapshotter) || r.snapshotter.is_empty() {
            return Err(bad("the snapshotter name is not a plain name".into()));
        }
        if !r.snapshot_parent.is_empty() && !is_digest(&r.snapshot_parent) {
            return Err(bad("the snapshot's parent is not a sha256 chain id".into()));
        }
        if record.id != format!("{}/{}", r.namespace, record.name) {
            return Err(bad(format!("id '{}' is not NAMESPACE/NAME", trunc(&record.id))));
        }
        Ok(r)
    }
}

impl Containerd {
    pub fn new(endpoints: &Endpoints) -> Containerd {
        let socket = endpoints.get(KIND);
        let instance = InstanceInfo::read_beside(&socket);
        Containerd { socket, instance, state_dir: endpoints.state_dir.clone() }
    }

    fn connect(&self) -> Result<Api, Error> {
        Api::connect(&self.socket)
    }

    /// The runc root containers created here get (containerd's default outside an instance).
    fn runc_root(&self) -> String {
        self.instance.as_ref().map(|i| i.runc_root.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// The file that takes the output of container `ns/id`.
    fn stdio_log(&self, ns: &str, id: &str) -> PathBuf {
        let dir = match &self.instance {
            Some(i) => i.stdio_dir.clone(),
            None => self.state_dir.join("containerd-stdio"),
        };
        dir.join(ns).join(format!("{id}.log"))
    }

    /// A fresh log file for container `ns/id`, as the `file://` URI containerd takes.
    fn new_stdio(&self, ns: &str, id: &str) -> Result<String, Error> {
        let log = self.stdio_log(ns, id);
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        }
        let _ = std::fs::remove_file(&log);
        Ok(format!("file://{}", log.display()))
    }

    /// Whether image `image` with layers `chain` could be copied into namespace `ns` from the
    /// default one, where ferry's lab imports its images (done here, before anything is frozen,
    /// rather than during the restore).
    fn copied_from_default(&self, api: &Api, ns: &str, image: Option<&str>, chain: &str) -> bool {
        let Some(image) = image.filter(|_| ns != DEFAULT_NAMESPACE) else { return false };
        match image::resolve(api, DEFAULT_NAMESPACE, image) {
            Ok(found) if found.chain_id == chain => {}
            _ => return false,
        }
        match image::copy(api, DEFAULT_NAMESPACE, ns, image, &self.tmp_dir()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%image, %ns, error = %e, "could not copy the image into the container's namespace");
                false
            }
        }
    }

    /// Scratch space on disk for image layers.
    fn tmp_dir(&self) -> PathBuf {
        self.instance.as_ref().map(|i| i.tmp_dir.clone()).unwrap_or_else(std::env::temp_dir)
    }

    fn cgroup_parent(&self) -> Option<&str> {
        self.instance.as_ref().map(|i| i.cgroup_parent.as_str())
    }

    /// Kills and forgets container `ns/id` with its task and snapshot; what is absent is fine.
    fn cleanup(&self, api: &Api, ns: &str, id: &str) {
        let warn = |what: &str, s: &Status| {
            tracing::warn!(container = %format!("{ns}/{id}"), error = %s.message(), "containerd {what} failed");
        };
        match api.task(ns, id) {
            Ok(Some(t)) => {
                if t.status == TaskStatus::Running as i32 || t.status == TaskStatus::Paused as i32 {
                    if let Err(s) = api.kill(ns, id, 9) {
                        warn("tasks.Kill", &s);
                    }
                    wait_not_running(api, ns, id, Duration::from_secs(10));
                }
                if let Err(s) = api.delete_task(ns, id) {
                    warn("tasks.Delete", &s);
                }
            }
            Ok(None) => {}
            Err(s) => warn("tasks.Get", &s),
        }
        let (snapshotter, key) = match api.container(ns, id) {
            Ok(Some(c)) => (c.snapshotter, c.snapshot_key),
            _ => (SNAPSHOTTER.to_owned(), id.to_owned()),
        };
        if let Err(s) = api.delete_container(ns, id) {
            warn("containers.Delete", &s);
        }
        if !key.is_empty() {
            if let Err(s) =
                api.remove_snapshot(ns, if snapshotter.is_empty() { SNAPSHOTTER } else { &snapshotter }, &key)
            {
                warn("snapshots.Remove", &s);
            }
        }
        let _ = std::fs::remove_file(self.stdio_log(ns, id));
    }

    /// Sets (`Some`) or removes (`None`) one label of container `ns/id`.
    fn set_label(&self, api: &Api, ns: &str, id: &str, key: &str, value: Option<&str>) -> Result<(), Status> {
        let mut labels = HashMap::new();
        if let Some(v) = value {
            labels.insert(key.to_owned(), v.to_owned());
        }
        let r = req(
            ns,
            None,
            UpdateContainerRequest {
                container: Some(CtdContainer { id: id.into(), labels, ..Default::default() }),
                update_mask: Some(prost_types::FieldMask { paths: vec![format!("labels.{key}")] }),
            },
        )?;
        api.call(
            "containers.Update",
            CALL_LIMIT,
            |ch| async move { ContainersClient::new(ch).update(r).await },
        )
        .map(|_| ())
    }

    fn restore_in(&self, api: &Api, req_: &RestoreSpec<'_>, rec: &Recorded) -> Result<Restored, Error> {
        let ns = rec.namespace.as_str();
        let name = req_.name;
        let record = req_.record;
        let t0 = Instant::now();
        let mut spec = req_.spec();
        let recorded_cgroup =
            spec.pointer("/linux/cgroupsPath").and_then(|p| p.as_str()).unwrap_or("").to_owned();
        spec["linux"]["cgroupsPath"] =
            spec::restored_cgroup(&recorded_cgroup, ns, &record.name, name, self.cgroup_parent()).into();
        let spec_bytes = serde_json::to_vec(&spec).map_err(|e| Error::Internal(e.to_string()))?;
        // The restart monitor must not see the container before its task runs.
        let mut labels: HashMap<String, String> = record.labels.clone().into_iter().collect();
        let restart = labels.remove(RESTART_STATUS_LABEL);
        let options = RuncOptions {
            no_pivot_root: rec.options.no_pivot_root,
            no_new_keyring: rec.options.no_new_keyring,
            io_uid: rec.options.io_uid,
            io_gid: rec.options.io_gid,
            systemd_cgroup: rec.options.systemd_cgroup,
            // Not the recorded binaries, shim cgroup or root: this host's.
            root: self.runc_root(),
            ..Default::default()
        };
        let container = CtdContainer {
            id: name.into(),
            image: record.image.clone().unwrap_or_default(),
            labels,
            runtime: Some(Runtime { name: rec.runtime.clone(), options: Some(options.to_any()) }),
            spec: Some(Any { type_url: SPEC_TYPE_URL.into(), value: spec_bytes }),
            snapshotter: rec.snapshotter.clone(),
            snapshot_key: name.into(),
            ..Default::default()
        };
        let r = req(ns, None, CreateContainerRequest { container: Some(container) })
            .map_err(|s| api.error("containers.Create", &s))?;
        api.call(
            "containers.Create",
            CALL_LIMIT,
            |ch| async move { ContainersClient::new(ch).create(r).await },
        )
        .map_err(|s| api.error("containers.Create", &s))?;
        let mounts = api
            .prepare(ns, None, name, &rec.snapshot_parent)
            .map_err(|s| api.error("snapshots.Prepare", &s))?;
        let t_record = t0.elapsed();
        let (diff, deleted) = (req_.rootfs_diff(), req_.deleted_files());
        if diff.is_some() || deleted.is_some() {
            spec::apply_to_snapshot(
                &mounts,
                &req_.scratch.join("containerd-rootfs"),
                diff.as_deref(),
                deleted.as_deref(),
            )?;
        }
        // runc reads descriptors.json from --image-path itself; CRIU reads the images where
        // the configuration file says.
        let stub = req_.scratch.join("containerd-checkpoint");
        std::fs::create_dir_all(&stub).map_err(|e| io_err("create", &stub, e))?;
        let descriptors = req_.images.join(DESCRIPTORS_FILE);
        std::fs::copy(&descriptors, stub.join(DESCRIPTORS_FILE))
            .map_err(|e| io_err("copy", &descriptors, e))?;
        let stdio = self.new_stdio(ns, name)?;
        let work = req_.log.parent().unwrap_or(req_.scratch);
        let task_options = RuncOptions {
            criu_image_path: stub.to_string_lossy().into_owned(),
            criu_work_path: work.to_string_lossy().into_owned(),
            ..options
        };
        let create = CreateTaskRequest {
            container_id: name.into(),
            rootfs: mounts,
            stdout: stdio.clone(),
            stderr: stdio,
            options: Some(task_options.to_any()),
            ..Default::default()
        };
        let t_rootfs = t0.elapsed();
        let r = req(ns, None, create).map_err(|s| api.error("tasks.Create", &s))?;
        api.call("tasks.Create", CALL_LIMIT, |ch| async move { TasksClient::new(ch).create(r).await })
            .map_err(|s| {
                Error::runtime_failed(KIND, "tasks.Create", s.message(), Some(req_.log.to_path_buf()))
            })?;
        let t_task = t0.elapsed();
        let r = req(ns, None, StartRequest { container_id: name.into(), exec_id: String::new() })
            .map_err(|s| api.error("tasks.Start", &s))?;
        let pid = api
            .call("tasks.Start", RESTORE_LIMIT, |ch| async move { TasksClient::new(ch).start(r).await })
            .map_err(|s| {
                Error::runtime_failed(
                    KIND,
                    "the restore (tasks.Start)",
                    s.message(),
                    Some(req_.log.to_path_buf()),
                )
            })?
            .pid;
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::info!(
            container = %format!("{ns}/{name}"),
            pid,
            record_ms = ms(t_record),
            rootfs_ms = ms(t_rootfs - t_record),
            task_create_ms = ms(t_task - t_rootfs),
            task_start_ms = ms(t0.elapsed() - t_task),
            "containerd restored the container"
        );
        if let Some(v) = restart {
            if let Err(s) = self.set_label(api, ns, name, RESTART_STATUS_LABEL, Some(&v)) {
                tracing::warn!(error = %s.message(), "could not give the container back its restart label");
            }
        }
        Ok(Restored { id: format!("{ns}/{name}"), name: workload_name(ns, name), pid: pid as i32 })
    }

    fn create_in(&self, api: &Api, req_: &CreateSpec<'_>, ns: &str, id: &str) -> Result<Restored, Error> {
        if ns != DEFAULT_NAMESPACE
            && image::find(api, ns, req_.image)?.is_none()
            && image::find(api, DEFAULT_NAMESPACE, req_.image)?.is_some()
        {
            // Images are imported into the default namespace (`import_image`).
            image::copy(api, DEFAULT_NAMESPACE, ns, req_.image, &self.tmp_dir())?;
        }
        let img = image::resolve(api, ns, req_.image)?;
        let spec = spec::new_spec(req_, id, &img.config, &spec::new_cgroup(ns, id, self.cgroup_parent()));
        let spec_bytes = serde_json::to_vec(&spec).map_err(|e| Error::Internal(e.to_string()))?;
        let options = RuncOptions { root: self.runc_root(), ..Default::default() };
        let container = CtdContainer {
            id: id.into(),
            image: img.name.clone(),
            labels: req_.labels.clone().into_iter().collect(),
            runtime: Some(Runtime { name: api::RUNC_V2.into(), options: Some(options.to_any()) }),
            spec: Some(Any { type_url: SPEC_TYPE_URL.into(), value: spec_bytes }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: id.into(),
            ..Default::default()
        };
        let r = req(ns, None, CreateContainerRequest { container: Some(container) })
            .map_err(|s| api.error("containers.Create", &s))?;
        api.call(
            "containers.Create",
            CALL_LIMIT,
            |ch| async move { ContainersClient::new(ch).create(r).await },
        )
        .map_err(|s| api.error("containers.Create", &s))?;
        let mounts: Vec<Mount> =
            api.prepare(ns, None, id, &img.chain_id).map_err(|s| api.error("snapshots.Prepare", &s))?;
        let stdio = self.new_stdio(ns, id)?;
        let create = CreateTaskRequest {
            container_id: id.into(),
            rootfs: mounts,
            stdout: stdio.clone(),
            stderr: stdio,
            options: Some(options.to_any()),
            ..Default::default()
        };
        let r = req(ns, None, create).map_err(|s| api.error("tasks.Create", &s))?;
        api.call("tasks.Create", CALL_LIMIT, |ch| async move { TasksClient::new(ch).create(r).await })
            .map_err(|s| api.error("tasks.Create", &s))?;
        let r = req(ns, None, StartRequest { container_id: id.into(), exec_id: String::new() })
            .map_err(|s| api.error("tasks.Start", &s))?;
        let pid = api
            .call("tasks.Start", CALL_LIMIT, |ch| async move { TasksClient::new(ch).start(r).await })
            .map_err(|s| api.error("tasks.Start", &s))?
            .pid;
        Ok(Restored { id: format!("{ns}/{id}"), name: workload_name(ns, id), pid: pid as i32 })
    }
}

impl ContainerRuntime for Containerd {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn inspect(&self, id: &str) -> Result<Container, Error> {
        let (ns, cid) = split_name(id).map_err(|_| Error::InvalidWorkload {
            input: format!("{KIND}:{id}"),
            why: "not a containerd container (NAMESPACE/ID, or ID in the default namespace)".into(),
        })?;
        let workload = format!("{KIND}:{ns}/{cid}");
        let api = self.connect()?;
        let c = api.container(&ns, &cid).map_err(|s| api.error("containers.Get", &s))?.ok_or_else(|| {
            Error::ContainerNotFound {
                workload: workload.clone(),
                where_: format!("namespace {ns} of containerd at {}", self.socket.display()),
            }
        })?;
        let task = api.task(&ns, &cid).map_err(|s| api.error("tasks.Get", &s))?;
        let task = match task {
            Some(t) if t.status == TaskStatus::Running as i32 => t,
            Some(t) => return Err(Error::ContainerNotRunning { workload, state: status_name(t.status) }),
            None => {
                return Err(Error::ContainerNotRunning { workload, state: "created, without a task".into() })
            }
        };
        let runtime = c.runtime.clone().unwrap_or_default();
        if !runtime.name.starts_with("io.containerd.runc.") {
            return Err(Error::Container(format!(
                "{workload} runs under {}, not containerd's runc shim: ferry cannot dump it",
                runtime.name
            )));
        }
        let options = RuncOptions::from_any(runtime.options.as_ref()).map_err(Error::Container)?;
        let root = if options.root.is_empty() { DEFAULT_RUNC_ROOT } else { options.root.as_str() };
        let plan = runc_state::dump_plan(&Path::new(root).join(&ns), &cid)?;
        if plan.init_pid as u32 != task.pid {
            return Err(Error::ContainerNotRunning { workload, state: "restarting".into() });
        }
        let spec_any = c.spec.clone().ok_or_else(|| Error::Container(format!("{workload} has no spec")))?;
        let spec: serde_json::Value = serde_json::from_slice(&spec_any.value)
            .map_err(|e| Error::Container(format!("the spec of {workload}: {e}")))?;
        let snapshotter =
            if c.snapshotter.is_empty() { SNAPSHOTTER.to_owned() } else { c.snapshotter.clone() };
        let snapshot_parent = api
            .snapshot_parent(&ns, &snapshotter, &c.snapshot_key)
            .map_err(|s| api.error("snapshots.Stat", &s))?
            .ok_or_else(|| {
                Error::Container(format!("the snapshot {} of {workload} is gone", c.snapshot_key))
            })?;
        let recorded =
            Recorded { namespace: ns.clone(), runtime: runtime.name, options, snapshotter, snapshot_parent };
        let record = ContainerRecord {
            version: RECORD_VERSION,
            kind: KIND.into(),
            id: format!("{ns}/{cid}"),
            name: cid,
            image: Some(c.image.clone()).filter(|i| !i.is_empty()),
            spec,
            rootfs: RootfsRecord::Image,
            labels: c.labels.into_iter().collect(),
            network: plan.netns_path.as_deref().map(|p| {
                let (ip, mac) = super::netns_address(p);
                NetworkRecord { external: true, ip, mac }
            }),
            runtime: serde_json::to_value(&recorded).map_err(|e| Error::Internal(e.to_string()))?,
        };
        Ok(Container { record, plan })
    }

    /// containerd restarts nothing by itself; its restart monitor restarts the containers
    /// labelled `containerd.io/restart.status=running`: the label goes while CRIU has it.
    fn hold(&self, c: &Container) -> Result<(), Error> {
        if !c.record.labels.contains_key(RESTART_STATUS_LABEL) {
            return Ok(());
        }
        let (ns, id) = split_name(&c.record.id)?;
        let api = self.connect()?;
        self.set_label(&api, &ns, &id, RESTART_STATUS_LABEL, None)
            .map_err(|s| api.error("containers.Update", &s))
    }

    fn release(&self, c: &Container) -> Result<(), Error> {
        let Some(v) = c.record.labels.get(RESTART_STATUS_LABEL) else { return Ok(()) };
        let (ns, id) = split_name(&c.record.id)?;
        let api = self.connect()?;
        self.set_label(&api, &ns, &id, RESTART_STATUS_LABEL, Some(v))
            .map_err(|s| api.error("containers.Update", &s))
    }

    /// The task stays listed (STOPPED) after CRIU killed its processes: it goes, with the
    /// container and its snapshot.
    fn remove(&self, record: &ContainerRecord) -> Result<(), Error> {
        let (ns, id) = split_name(&record.id)?;
        let api = self.connect()?;
        if let Some(t) = api.task(&ns, &id).map_err(|s| api.error("tasks.Get", &s))? {
            if t.status == TaskStatus::Running as i32
                && !wait_not_running(&api, &ns, &id, Duration::from_secs(10))
            {
                // The shim has not seen the exit: what is left is killed.
                api.kill(&ns, &id, 9).map_err(|s| api.error("tasks.Kill", &s))?;
                wait_not_running(&api, &ns, &id, Duration::from_secs(10));
            }
            api.delete_task(&ns, &id).map_err(|s| api.error("tasks.Delete", &s))?;
        }
        let c = api.container(&ns, &id).map_err(|s| api.error("containers.Get", &s))?;
        api.delete_container(&ns, &id).map_err(|s| api.error("containers.Delete", &s))?;
        if let Some(c) = c.filter(|c| !c.snapshot_key.is_empty()) {
            let snapshotter = if c.snapshotter.is_empty() { SNAPSHOTTER } else { c.snapshotter.as_str() };
            api.remove_snapshot(&ns, snapshotter, &c.snapshot_key)
                .map_err(|s| api.error("snapshots.Remove", &s))?;
        }
        let _ = std::fs::remove_file(self.stdio_log(&ns, &id));
        Ok(())
    }

    fn exists(&self, name: &str) -> Result<bool, Error> {
        let (ns, id) = split_name(name)?;
        let api = self.connect()?;
        Ok(api.container(&ns, &id).map_err(|s| api.error("containers.Get", &s))?.is_some())
    }

    fn name_taken(&self, record: &ContainerRecord, name: &str) -> Result<bool, Error> {
        let rec = Recorded::from_record(record)?;
        // A name given without a namespace is restored into the record's.
        let (ns, id) = match name.split_once('/') {
            Some(_) => split_name(name)?,
            None => (rec.namespace.clone(), name.to_owned()),
        };
        validate_identifier("namespace", &ns)?;
        validate_identifier("id", &id)?;
        let api = self.connect()?;
        Ok(api.container(&ns, &id).map_err(|s| api.error("containers.Get", &s))?.is_some())
    }

    fn preflight(&self, record: &ContainerRecord, _name: &str) -> Vec<String> {
        let rec = match Recorded::from_record(record) {
            Ok(r) => r,
            Err(e) => return vec![e.to_string()],
        };
        let api = match self.connect() {
            Ok(a) => a,
            Err(e) => {
                return vec![format!(
                    "{e}: start containerd, or point ferry at it (--runtime-endpoint containerd=SOCKET)"
                )]
            }
        };
        let mut reasons = Vec::new();
        let ns = rec.namespace.as_str();
        if !rec.snapshot_parent.is_empty() {
            let image = record.image.as_deref().unwrap_or("(unnamed)");
            match api.snapshot_parent(ns, &rec.snapshotter, &rec.snapshot_parent) {
                Ok(Some(_)) => {}
                Ok(None) if self.copied_from_default(&api, ns, record.image.as_deref(), &rec.snapshot_parent) => {}
                Ok(None) => reasons.push(format!(
                    "the image {image} (layers {}) is not unpacked in containerd's namespace {ns} here: import it into that namespace first (ctr -n {ns} images import)",
                    rec.snapshot_parent
                )),
                Err(s) => reasons.push(api.error("snapshots.Stat", &s).to_string()),
            }
        }
        reasons
    }

    fn restore(&self, req_: &RestoreSpec<'_>) -> Result<Restored, Error> {
        let rec = Recorded::from_record(req_.record)?;
        validate_identifier("name", req_.name)?;
        let ns = rec.namespace.as_str();
        let api = self.connect()?;
        if api.container(ns, req_.name).map_err(|s| api.error("containers.Get", &s))?.is_some() {
            return Err(Error::NameTaken { workload: format!("{KIND}:{}", workload_name(ns, req_.name)) });
        }
        let restored = self.restore_in(&api, req_, &rec);
        if restored.is_err() {
            self.cleanup(&api, ns, req_.name);
        }
        restored
    }

    fn discard(&self, name: &str) {
        let Ok((ns, id)) = split_name(name) else { return };
        match self.connect() {
            Ok(api) => self.cleanup(&api, &ns, &id),
            Err(e) => tracing::warn!(container = %name, error = %e, "cannot remove the container"),
        }
    }

    fn create(&self, req_: &CreateSpec<'_>) -> Result<Restored, Error> {
        let (ns, id) = split_name(req_.name)?;
        let api = self.connect()?;
        if api.container(&ns, &id).map_err(|s| api.error("containers.Get", &s))?.is_some() {
            return Err(Error::NameTaken { workload: format!("{KIND}:{}", workload_name(&ns, &id)) });
        }
        let created = self.create_in(&api, req_, &ns, &id);
        if created.is_err() {
            self.cleanup(&api, &ns, &id);
        }
        created
    }

    /// Into the default namespace, under the name as containerd's clients normalize it
    /// (`ferry-lab/busybox` is `docker.io/ferry-lab/busybox:latest`); `create` copies it into
    /// another namespace when a container there needs it.
    fn import_image(&self, rootfs: &Path, name: &str) -> Result<(), Error> {
        let api = self.connect()?;
        image::import(&api, DEFAULT_NAMESPACE, rootfs, name, &self.tmp_dir())
    }
}

/// Waits until the task of `ns/id` no longer runs; false if it still does after `limit`.
fn wait_not_running(api: &Api, ns: &str, id: &str, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        match api.task(ns, id) {
            Ok(Some(t))
                if t.status == TaskStatus::Running as i32 || t.status == TaskStatus::Pausing as i32 => {}
            Ok(_) => return true,
            Err(_) => return false,
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_name(status: i32) -> String {
    TaskStatus::try_from(status).map(|s| s.as_str_name().to_lowercase()).unwrap_or_else(|_| "unknown".into())
}

/// `NAMESPACE/ID` or `ID` (in the default namespace), each validated.
fn split_name(s: &str) -> Result<(String, String), Error> {
    let (ns, id) = s.split_once('/').unwrap_or((DEFAULT_NAMESPACE, s));
    validate_identifier("namespace", ns)?;
    validate_identifier("id", id)?;
    Ok((ns.to_owned(), id.to_owned()))
}

/// How ferry names container `ns/id` after `containerd:`: the ID alone in the default namespace.
fn workload_name(ns: &str, id: &str) -> String {
    if ns == DEFAULT_NAMESPACE {
        id.to_owned()
    } else {
        format!("{ns}/{id}")
    }
}

/// A containerd identifier: letters and digits, single `.`, `_` or `-` between them.
fn validate_identifier(what: &str, s: &str) -> Result<(), Error> {
    validate_name(what, s, false)?;
    let ok = s.len() <= MAX_IDENTIFIER
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !s.as_bytes().windows(2).any(|w| !w[0].is_ascii_alphanumeric() && !w[1].is_ascii_alphanumeric());
    if !ok {
        return Err(Error::BadContainerRecord(format!(
            "container {what} '{}' is not a containerd identifier",
            trunc(s)
        )));
    }
    Ok(())
}

fn plain(s: &str) -> bool {
    s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')))
}

fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

fn io_err(action: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Container(format!("cannot {action} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ContainerRecord {
        let recorded = Recorded {
            namespace: "prod".into(),
            runtime: "io.containerd.runc.v2".into(),
            options: RuncOptions {
                root: "/run/a/runc".into(),
                binary_name: "/tmp/evil".into(),
                ..Default::default()
            },
            snapshotter: "overlayfs".into(),
            snapshot_parent: format!("sha256:{}", "ab".repeat(32)),
        };
        ContainerRecord {
            version: RECORD_VERSION,
            kind: KIND.into(),
            id: "prod/web".into(),
            name: "web".into(),
            image: Some("docker.io/ferry-lab/busybox:latest".into()),
            spec: serde_json::json!({"linux": {"cgroupsPath": "/prod/web"}}),
            rootfs: RootfsRecord::Image,
            labels: Default::default(),
            network: None,
            runtime: serde_json::to_value(recorded).expect("json"),
        }
    }

    #[test]
    fn names_carry_their_namespace() {
        assert_eq!(split_name("web").expect("plain"), ("default".into(), "web".into()));
        assert_eq!(split_name("prod/web-1").expect("ns"), ("prod".into(), "web-1".into()));
        for bad in
            ["", "a/b/c", "/web", "web/", "../x", "a b", "we..b", "web-", "-web", "a__b", &"x".repeat(77)]
        {
            assert!(split_name(bad).is_err(), "{bad}");
        }
        assert_eq!(workload_name("default", "web"), "web");
        assert_eq!(workload_name("prod", "web"), "prod/web");
    }

    #[test]
    fn recorded_runtime_is_validated() {
        let r = record();
        let rec = Recorded::from_record(&r).expect("valid");
        assert_eq!(rec.namespace, "prod");
        assert_eq!(r.clone(), ContainerRecord::parse(&serde_json::to_vec(&r).expect("json")).expect("parse"));
        let mut bad = Vec::new();
        for (field, value) in [
            ("namespace", serde_json::json!("../etc")),
            ("runtime", serde_json::json!("io.containerd.kata.v2")),
            ("snapshotter", serde_json::json!("overlay fs")),
            ("snapshot_parent", serde_json::json!("sha256:zz")),
        ] {
            let mut r = record();
            r.runtime[field] = value;
            bad.push(r);
        }
        let mut r = record();
        r.id = "other/web".into();
        bad.push(r);
        let mut r = record();
        r.runtime = serde_json::json!("x");
        bad.push(r);
        for r in bad {
            assert!(
                matches!(Recorded::from_record(&r), Err(Error::BadContainerRecord(_))),
                "{:?}",
                r.runtime
            );
        }
    }
}
