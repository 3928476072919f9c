//! Docker, through its Engine API on its socket (the endpoint), with bollard pinned to API
//! 1.41 (Docker 20.10).
//!
//! Docker runs its containers through containerd's runc shim, so the dump is the same as for
//! any runc container: runc's state is found through the container's shim (its working
//! directory is the bundle, whose `options.json` names runc's root). What travels beside the
//! spec is Docker's own description of the container (its `Config` and `HostConfig`, the
//! image's layers, the restart policy it had).
//!
//! The restore goes through Docker's own path, so that `docker ps` lists the container:
//! `POST /containers/create` with the recorded configuration, the root filesystem's changes
//! written into the new container's upper directory (the overlay is not mounted before the
//! start), then `POST /containers/{id}/start?checkpoint=ferry`. Docker 20.10 can neither set an
//! OCI annotation nor take a checkpoint directory of ferry's, so the CRIU configuration and
//! the network namespace reach runc through `ferry-runc` ([`wrapper`]), a runtime registered in
//! the daemon; Docker's checkpoint directory holds only the stub runc reads
//! (`descriptors.json`), the images stay in ferry's verified tmpfs.

mod api;
mod instance;
pub mod wrapper;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bollard::models::{ContainerCreateBody, ContainerInspectResponse, RestartPolicy, RestartPolicyNameEnum};
use serde::{Deserialize, Serialize};

use self::api::{Api, CallError, KIND};
use super::record::{read_capped, validate_name, DESCRIPTORS_FILE};
use super::runc_state::{self, Overlay};
use super::{
    Container, ContainerRecord, ContainerRuntime, CreateSpec, Endpoints, Kind, NetworkRecord, RestoreSpec,
    Restored, RootfsRecord, RECORD_VERSION,
};
use crate::Error;

pub(super) const KIND_ENTRY: Kind = Kind {
    name: KIND,
    default_endpoint: "/var/run/docker.sock",
    open,
    instance_endpoint: instance::endpoint,
    start_instance: instance::start,
    stop_instance: instance::stop,
};

/// The checkpoint Docker is told to restore from (a stub: the images are ferry's).
const CHECKPOINT: &str = "ferry";
const MAX_SPEC: u64 = 4 << 20;
const MAX_SMALL: u64 = 64 << 10;
/// What ferry says when a dockerd lacks the wrapper.
const NO_WRAPPER: &str = "this dockerd has no ferry-runc runtime, so Docker cannot restore from ferry's images nor \
     post-copy (it can set neither CRIU's configuration nor the network namespace): register ferry-runc in its \
     daemon.json `runtimes` (docs/containers.md, Docker) and restart it";

fn open(endpoints: &Endpoints) -> Box<dyn ContainerRuntime> {
    Box::new(DockerRuntime::new(endpoints))
}

/// Docker at one socket.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    socket: PathBuf,
    /// Restart policies ferry switched off while CRIU holds a container (one file per
    /// container, so that a later inspection still knows the original).
    held: PathBuf,
}

/// What a restore needs beside the spec (the record's `runtime`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Recorded {
    /// Docker's create body: the container's `Config`, with its `HostConfig`.
    create: serde_json::Value,
    /// The restart policy it had before ferry held it.
    restart_policy: Policy,
    /// The image's id where it ran (ids differ between daemons that imported the same files).
    #[serde(default)]
    image_id: Option<String>,
    /// The image's layers (diff ids): the same wherever the same files were imported.
    #[serde(default)]
    layers: Vec<String>,
    /// The sources of the bind mounts Docker makes for each container (`resolv.conf`,
    /// `hosts`, `hostname`, `/dev/shm`): Docker makes them anew on the target.
    #[serde(default)]
    own_binds: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Policy {
    name: String,
    #[serde(default)]
    max_retries: i64,
}

impl Policy {
    fn of(p: Option<&RestartPolicy>) -> Policy {
        let name = p.and_then(|p| p.name).map(|n| n.to_string()).unwrap_or_default();
        Policy { name, max_retries: p.and_then(|p| p.maximum_retry_count).unwrap_or(0) }
    }

    fn restarts(&self) -> bool {
        !matches!(self.name.as_str(), "" | "no")
    }

    fn to_api(&self) -> RestartPolicy {
        let name = match self.name.as_str() {
            "always" => RestartPolicyNameEnum::ALWAYS,
            "unless-stopped" => RestartPolicyNameEnum::UNLESS_STOPPED,
            "on-failure" => RestartPolicyNameEnum::ON_FAILURE,
            _ => RestartPolicyNameEnum::NO,
        };
        let retries = (name == RestartPolicyNameEnum::ON_FAILURE).then_some(self.max_retries);
        RestartPolicy { name: Some(name), maximum_retry_count: retries }
    }

    fn none() -> Policy {
        Policy { name: "no".into(), max_retries: 0 }
    }
}

impl Recorded {
    fn of(record: &ContainerRecord) -> Result<Recorded, Error> {
        let r: Recorded = serde_json::from_value(record.runtime.clone())
            .map_err(|e| Error::BadContainerRecord(format!("Docker's part: {e}")))?;
        if !r.create.is_object() {
            return Err(Error::BadContainerRecord("Docker's create body is not an object".into()));
        }
        if !matches!(r.restart_policy.name.as_str(), "" | "no" | "always" | "unless-stopped" | "on-failure") {
            return Err(Error::BadContainerRecord("unknown restart policy".into()));
        }
        Ok(r)
    }

    /// Docker's create body for a restore: the recorded one, with the image found here, the
    /// wrapper as its runtime and no restart policy until the restore is done.
    fn create_body(&self, image: &str, runtime: &str) -> Result<ContainerCreateBody, Error> {
        let mut v = self.create.clone();
        v["Image"] = image.into();
        if !v["HostConfig"].is_object() {
            v["HostConfig"] = serde_json::json!({});
        }
        v["HostConfig"]["Runtime"] = runtime.into();
        v["HostConfig"]["RestartPolicy"] = serde_json::json!({"Name": "no"});
        serde_json::from_value(v).map_err(|e| Error::BadContainerRecord(format!("Docker's create body: {e}")))
    }
}

impl DockerRuntime {
    pub fn new(endpoints: &Endpoints) -> DockerRuntime {
        DockerRuntime { socket: endpoints.get(KIND), held: endpoints.state_dir.join("docker-held") }
    }

    fn api(&self) -> Result<Api, Error> {
        Api::connect(&self.socket)
    }

    fn held_file(&self, id: &str) -> Option<PathBuf> {
        wrapper::valid_id(id).then(|| self.held.join(format!("{id}.json")))
    }

    /// The policy recorded when ferry held `id`, if it still does.
    fn held_policy(&self, id: &str) -> Option<Policy> {
        let bytes = read_capped(&self.held_file(id)?, MAX_SMALL).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn forget_held(&self, id: &str) {
        if let Some(p) = self.held_file(id) {
            let _ = fs::remove_file(p);
        }
    }

    fn record_held(&self, id: &str, policy: &Policy) -> Result<(), Error> {
        let path =
            self.held_file(id).ok_or_else(|| Error::Container(format!("'{id}' is not a Docker id")))?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.held)
            .map_err(|e| io_err("create", &self.held, e))?;
        let text = serde_json::to_vec(policy).map_err(|e| Error::Internal(e.to_string()))?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_err("write", &path, e))?;
        f.write_all(&text).map_err(|e| io_err("write", &path, e))
    }

    /// The id of the container named `name` (or whose id it is): never one whose id merely
    /// starts with it, as Docker's own lookup would also answer.
    fn container_id(&self, api: &Api, name: &str) -> Result<Option<String>, Error> {
        Ok(api.inspect(name)?.filter(|c| is_named(c, name)).and_then(|c| c.id))
    }
}

/// The runtime name and wrapper directory of `ferry-runc` in a daemon, if it has it.
fn wrapper_runtime(info: &bollard::models::SystemInfo) -> Option<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = Api::runtimes(info)
        .into_iter()
        .filter(|(_, (path, args))| {
            Path::new(path).file_name().is_some_and(|f| f == wrapper::BINARY)
                || args.iter().any(|a| a == wrapper::DIR_FLAG)
        })
        .map(|(name, (_, args))| {
            let dir = args
                .iter()
                .position(|a| a == wrapper::DIR_FLAG)
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from)
                .or_else(|| {
                    args.iter()
                        .find_map(|a| a.strip_prefix(&format!("{}=", wrapper::DIR_FLAG)).map(PathBuf::from))
                })
                .unwrap_or_else(|| PathBuf::from(wrapper::DEFAULT_DIR));
            (name, dir)
        })
        .collect();
    // The default runtime first, then by name (stable).
    let default = info.default_runtime.clone().unwrap_or_default();
    found.sort_by_key(|(n, _)| (n != &default, n.clone()));
    found.into_iter().next()
}

/// Where runc keeps container `id` of init `pid`, and its bundle: the shim's working directory
/// is the bundle, whose `options.json` names runc's root (`ROOT/NAMESPACE/ID/state.json`).
fn runc_location(pid: i32, id: &str) -> Result<(PathBuf, PathBuf), Error> {
    let is_bundle = |shim: i32| -> Option<PathBuf> {
        let cwd = fs::read_link(format!("/proc/{shim}/cwd")).ok()?;
        (cwd.file_name()? == id).then_some(cwd)
    };
    let parent = parent_pid(pid);
    let bundle = parent
        .and_then(is_bundle)
        .or_else(|| {
            // Not the init's parent (a tree reparented elsewhere): any shim whose bundle it is.
            fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
                let p: i32 = e.file_name().to_str()?.parse().ok()?;
                let comm = fs::read_to_string(format!("/proc/{p}/comm")).ok()?;
                if comm.starts_with("containerd-shim") {
                    is_bundle(p)
                } else {
                    None
                }
            })
        })
        .ok_or_else(|| {
            Error::Container(format!(
                "cannot find the containerd shim of Docker container {id} (init pid {pid})"
            ))
        })?;
    let namespace =
        bundle.parent().and_then(|p| p.file_name()).map(PathBuf::from).unwrap_or_else(|| "moby".into());
    let root = read_capped(&bundle.join("options.json"), MAX_SMALL)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["root"].as_str().filter(|r| r.starts_with('/')).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/run/containerd/runc"));
    Ok((root.join(namespace), bundle))
}

fn parent_pid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The image's layers (diff ids).
fn layers_of(image: &bollard::models::ImageInspect) -> Vec<String> {
    image.root_fs.as_ref().and_then(|r| r.layers.clone()).unwrap_or_default()
}

/// The image to create a restored container from here: the recorded name if it has the
/// recorded layers, else any image with those layers; `Err` is the reason with its fix.
fn resolve_image(
    api: &Api,
    record: &ContainerRecord,
    rec: &Recorded,
) -> Result<Result<String, String>, Error> {
    let name = record.image.clone().unwrap_or_default();
    let same = |img: &bollard::models::ImageInspect| rec.layers.is_empty() || layers_of(img) == rec.layers;
    if !name.is_empty() {
        if let Some(img) = api.image(&name)? {
            if same(&img) {
                return Ok(Ok(name));
            }
            return Ok(Err(format!(
                "the image {name} here is not the one the container ran from (other layers): load the source's \
                 (`docker save {name}` there, `docker load` here), or restore on another host"
            )));
        }
    }
    if rec.layers.is_empty() {
        return Ok(Err(format!(
            "the image {name} is missing here: load it first (`docker save`, `docker load`)"
        )));
    }
    let mut candidates: Vec<String> = rec.image_id.iter().cloned().collect();
    candidates.extend(api.images()?.into_iter().map(|i| i.id));
    for id in candidates {
        if let Some(img) = api.image(&id)? {
            if layers_of(&img) == rec.layers {
                return Ok(Ok(img.id.unwrap_or(id)));
            }
        }
    }
    Ok(Err(format!(
        "the image {name} (nor any image with its layers) is not in Docker at {}: load it first (`docker save {name}` \
         on the source, `docker load` here)",
        api.socket().display()
    )))
}

/// The network namespace path the spec names, if any.
fn netns_path(spec: &serde_json::Value) -> Option<PathBuf> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|n| n.get("type").and_then(|t| t.as_str()) == Some("network"))?
        .get("path")?
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// True if `c` is the container named `name`, or `name` is its full id.
fn is_named(c: &ContainerInspectResponse, name: &str) -> bool {
    c.name.as_deref().map(|n| n.trim_start_matches('/')) == Some(name) || c.id.as_deref() == Some(name)
}

fn container_state(c: &ContainerInspectResponse) -> (bool, String) {
    let s = c.state.as_ref();
    let status = s.and_then(|s| s.status).map(|st| st.to_string()).unwrap_or_else(|| "unknown".into());
    let paused = s.and_then(|s| s.paused).unwrap_or(false);
    let restarting = s.and_then(|s| s.restarting).unwrap_or(false);
    let running = s.and_then(|s| s.running).unwrap_or(false) && !paused && !restarting;
    (running, status)
}

impl ContainerRuntime for DockerRuntime {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn inspect(&self, id: &str) -> Result<Container, Error> {
        validate_name("id", id, false).map_err(|_| Error::InvalidWorkload {
            input: format!("{KIND}:{id}"),
            why: "not a Docker container name or id".into(),
        })?;
        let workload = format!("{KIND}:{id}");
        let api = self.api()?;
        let c = api.inspect(id)?.ok_or_else(|| Error::ContainerNotFound {
            workload: workload.clone(),
            where_: self.socket.display().to_string(),
        })?;
        let (running, status) = container_state(&c);
        if !running {
            return Err(Error::ContainerNotRunning { workload, state: status });
        }
        let cid = c.id.clone().ok_or_else(|| Error::Container("Docker gave no container id".into()))?;
        let pid = c.state.as_ref().and_then(|s| s.pid).unwrap_or(0) as i32;
        let (runc_root, bundle) = runc_location(pid, &cid)?;
        let config = bundle.join("config.json");
        let spec_bytes = read_capped(&config, MAX_SPEC).map_err(|e| io_err("read", &config, e))?;
        let spec: serde_json::Value = serde_json::from_slice(&spec_bytes)
            .map_err(|e| Error::Container(format!("{}: {e}", config.display())))?;
        let mut plan = runc_state::dump_plan(&runc_root, &cid)?;
        if plan.init_pid != pid {
            return Err(Error::ContainerNotRunning { workload, state: "restarting".into() });
        }
        // Docker's word on the upper directory (the mount may name it relative to its home).
        let upper = c.graph_driver.as_ref().and_then(|g| g.data.get("UpperDir")).map(PathBuf::from);
        if let Some(upper) = upper.filter(|u| u.is_absolute()) {
            plan.overlay = Some(Overlay { lower: Vec::new(), upper });
        }
        let info = api.info()?;
        let image_id = c.image.clone();
        let layers = match &image_id {
            Some(i) => api.image(i)?.map(|img| layers_of(&img)).unwrap_or_default(),
            None => Vec::new(),
        };
        let config_json = c.config.as_ref().map(serde_json::to_value).transpose();
        let host_json = c.host_config.as_ref().map(serde_json::to_value).transpose();
        let (Ok(config_json), Ok(host_json)) = (config_json, host_json) else {
            return Err(Error::Internal("cannot encode Docker's container configuration".into()));
        };
        let mut create = config_json.unwrap_or_else(|| serde_json::json!({}));
        create["HostConfig"] = host_json.unwrap_or_else(|| serde_json::json!({}));
        let policy = self
            .held_policy(&cid)
            .unwrap_or_else(|| Policy::of(c.host_config.as_ref().and_then(|h| h.restart_policy.as_ref())));
        let mut recorded =
            Recorded { create, restart_policy: policy, image_id, layers, own_binds: Vec::new() };
        let name = c.name.clone().unwrap_or_default().trim_start_matches('/').to_owned();
        let labels: BTreeMap<String, String> =
            c.config.as_ref().and_then(|cfg| cfg.labels.clone()).unwrap_or_default().into_iter().collect();
        let mut record = ContainerRecord {
            version: RECORD_VERSION,
            kind: KIND.into(),
            id: cid,
            name: if name.is_empty() { id.to_owned() } else { name },
            image: c.config.as_ref().and_then(|cfg| cfg.image.clone()).filter(|i| !i.is_empty()),
            spec,
            rootfs: RootfsRecord::Image,
            labels,
            network: plan.netns_path.as_deref().map(|p| {
                let (ip, mac) = super::netns_address(p);
                NetworkRecord { external: true, ip, mac }
            }),
            runtime: serde_json::Value::Null,
        };
        // Docker makes these for every container (resolv.conf, hosts, hostname, /dev/shm).
        let own = info.docker_root_dir.as_ref().map(|r| format!("{r}/containers/{}/", record.id));
        recorded.own_binds = record
            .bind_sources()
            .into_iter()
            .map(|(src, _)| src)
            .filter(|src| own.as_ref().is_some_and(|p| src.starts_with(p)))
            .collect();
        record.runtime = serde_json::to_value(&recorded).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Container { record, plan })
    }

    fn hold(&self, c: &Container) -> Result<(), Error> {
        let rec = Recorded::of(&c.record)?;
        if !rec.restart_policy.restarts() {
            return Ok(());
        }
        // Recorded first: whoever inspects the container meanwhile still learns the original.
        self.record_held(&c.record.id, &rec.restart_policy)?;
        let api = self.api()?;
        api.set_restart_policy(&c.record.id, Policy::none().to_api())
            .inspect_err(|_| self.forget_held(&c.record.id))
    }

    fn release(&self, c: &Container) -> Result<(), Error> {
        let rec = Recorded::of(&c.record)?;
        if rec.restart_policy.restarts() {
            self.api()?.set_restart_policy(&c.record.id, rec.restart_policy.to_api())?;
        }
        self.forget_held(&c.record.id);
        Ok(())
    }

    fn remove(&self, record: &ContainerRecord) -> Result<(), Error> {
        let api = self.api()?;
        api.remove(&record.id)?;
        self.forget_held(&record.id);
        if let Some((_, dir)) = api.info().ok().as_ref().and_then(wrapper_runtime) {
            wrapper::forget(&dir, &record.id);
        }
        Ok(())
    }

    fn exists(&self, name: &str) -> Result<bool, Error> {
        let api = self.api()?;
        Ok(self.container_id(&api, name)?.is_some())
    }

    fn own_bind_sources(&self, record: &ContainerRecord) -> Vec<String> {
        Recorded::of(record).map(|r| r.own_binds).unwrap_or_default()
    }

    fn preflight(&self, record: &ContainerRecord, _name: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let rec = match Recorded::of(record) {
            Ok(r) => r,
            Err(e) => return vec![e.to_string()],
        };
        let checked = self.api().and_then(|api| {
            let info = api.info()?;
            if info.experimental_build != Some(true) {
                problems.push(
                    "this dockerd runs without experimental features, which its checkpoint restore needs: set \
                     \"experimental\": true in its daemon.json and restart it"
                        .to_owned(),
                );
            }
            if wrapper_runtime(&info).is_none() {
                problems.push(NO_WRAPPER.to_owned());
            }
            if let Err(reason) = resolve_image(&api, record, &rec)? {
                problems.push(reason);
            }
            Ok(())
        });
        if let Err(e) = checked {
            problems.push(format!(
                "{e}: start dockerd, or point ferry at it with --runtime-endpoint docker=SOCKET"
            ));
        }
        problems
    }

    fn restore(&self, req: &RestoreSpec<'_>) -> Result<Restored, Error> {
        let api = self.api()?;
        let info = api.info()?;
        let (runtime, wrap_dir) =
            wrapper_runtime(&info).ok_or_else(|| Error::Container(NO_WRAPPER.into()))?;
        let root = info.docker_root_dir.clone().map(PathBuf::from).ok_or_else(|| {
            Error::Container("Docker does not say where its data is (DockerRootDir)".into())
        })?;
        let rec = Recorded::of(req.record)?;
        let image = resolve_image(&api, req.record, &rec)?.map_err(|reason| Error::ContainerRefused {
            workload: format!("{KIND}:{}", req.name),
            reasons: vec![reason],
        })?;
        let body = rec.create_body(&image, &runtime)?;
        let spec = req.spec();
        let t = std::time::Instant::now();
        let id = api.create(req.name, body)?;
        tracing::debug!(container = %req.name, seconds = t.elapsed().as_secs_f64(), "created");
        let restored = self.restore_created(&api, req, &rec, &id, &root, &wrap_dir, netns_path(&spec));
        wrapper::after_start(&wrap_dir, &id);
        let stub = checkpoint_dir(&root, &id);
        if stub.exists() && api.delete_checkpoint(&id, CHECKPOINT).is_err() {
            let _ = fs::remove_dir_all(&stub);
        }
        if restored.is_err() {
            if let Err(e) = api.remove(&id) {
                tracing::warn!(container = %id, error = %e, "cannot remove the container of a failed restore");
            }
            wrapper::forget(&wrap_dir, &id);
        }
        restored
    }

    fn discard(&self, name: &str) {
        let Ok(api) = self.api() else { return };
        let id = match self.container_id(&api, name) {
            Ok(Some(id)) => id,
            _ => return,
        };
        if let Err(e) = api.remove(&id) {
            tracing::warn!(container = %name, error = %e, "cannot remove a Docker container");
        }
        if let Some((_, dir)) = api.info().ok().as_ref().and_then(wrapper_runtime) {
            wrapper::forget(&dir, &id);
        }
        self.forget_held(&id);
    }

    fn create(&self, req: &CreateSpec<'_>) -> Result<Restored, Error> {
        validate_name("name", req.name, false)?;
        let api = self.api()?;
        if self.container_id(&api, req.name)?.is_some() {
            return Err(Error::NameTaken { workload: format!("{KIND}:{}", req.name) });
        }
        let info = api.info()?;
        let wrapper = wrapper_runtime(&info);
        let (runtime, wrap_dir) = match (req.netns, wrapper) {
            (_, Some((r, d))) => (Some(r), Some(d)),
            (None, None) => (None, None),
            (Some(_), None) => return Err(Error::Container(NO_WRAPPER.into())),
        };
        let body = ContainerCreateBody {
            image: Some(req.image.to_owned()),
            cmd: Some(req.args.to_vec()),
            env: Some(req.env.to_vec()),
            labels: Some(req.labels.clone().into_iter().collect()),
            hostname: Some(req.name.to_owned()),
            host_config: Some(bollard::models::HostConfig {
                memory: req.memory_limit.map(|m| m as i64),
                network_mode: Some("none".into()),
                runtime,
                binds: Some(req.mounts.iter().map(|(src, dst)| format!("{src}:{dst}")).collect()),
                restart_policy: Some(Policy::none().to_api()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = api.create(req.name, body)?;
        let started = (|| {
            if let (Some(dir), Some(netns)) = (&wrap_dir, req.netns) {
                let r = wrapper::Request { netns: Some(netns.to_path_buf()), criu_config: None };
                wrapper::write_request(dir, &id, &r)?;
            }
            api.start(&id).map_err(|e| api.error(&format!("POST /containers/{}/start", req.name), e))?;
            let c = api.inspect(&id)?.ok_or_else(|| Error::Container(format!("{} vanished", req.name)))?;
            let pid = c.state.as_ref().and_then(|s| s.pid).unwrap_or(0) as i32;
            if pid <= 0 {
                return Err(Error::ContainerNotRunning {
                    workload: format!("{KIND}:{}", req.name),
                    state: container_state(&c).1,
                });
            }
            Ok(Restored { id: id.clone(), name: req.name.to_owned(), pid })
        })();
        if let Some(dir) = &wrap_dir {
            match &started {
                Ok(_) => wrapper::after_start(dir, &id),
                Err(_) => wrapper::forget(dir, &id),
            }
        }
        if started.is_err() {
            let _ = api.remove(&id);
        }
        started
    }

    fn import_image(&self, rootfs: &Path, name: &str) -> Result<(), Error> {
        if !rootfs.is_dir() {
            return Err(Error::Container(format!("{} is not a root filesystem directory", rootfs.display())));
        }
        let (repo, tag) = split_reference(name);
        let tar = tar_of(rootfs)?;
        let api = self.api()?;
        api.import(tar, repo, tag)
    }
}

impl DockerRuntime {
    /// The restore of the created container `id`; the caller removes it if this fails.
    #[allow(clippy::too_many_arguments)]
    fn restore_created(
        &self,
        api: &Api,
        req: &RestoreSpec<'_>,
        rec: &Recorded,
        id: &str,
        root: &Path,
        wrap_dir: &Path,
        netns: Option<PathBuf>,
    ) -> Result<Restored, Error> {
        let c = api.inspect(id)?.ok_or_else(|| Error::Container(format!("{} vanished", req.name)))?;
        let upper = c
            .graph_driver
            .as_ref()
            .and_then(|g| g.data.get("UpperDir"))
            .map(PathBuf::from)
            .filter(|u| u.is_absolute() && u.is_dir())
            .ok_or_else(|| {
                Error::Container(
                    "Docker's storage driver gave no upper directory (overlay2 is needed)".into(),
                )
            })?;
        let t = std::time::Instant::now();
        super::rootfs::apply_diff_to_upper(
            &upper,
            req.rootfs_diff().as_deref(),
            req.deleted_files().as_deref(),
        )?;
        let diff_s = t.elapsed().as_secs_f64();
        let conf = wrapper::copy_criu_conf(wrap_dir, id, req.criu_config)?;
        wrapper::write_request(wrap_dir, id, &wrapper::Request { netns, criu_config: Some(conf) })?;
        // Docker checks that the checkpoint directory exists and hands it (through containerd,
        // which unpacks it into a directory of its own) to `runc restore --image-path`, which
        // reads only `descriptors.json` there; CRIU reads the images where ferry's CRIU
        // configuration says.
        let stub = checkpoint_dir(root, id);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&stub)
            .map_err(|e| io_err("create", &stub, e))?;
        let descriptors = req.images.join(DESCRIPTORS_FILE);
        fs::copy(&descriptors, stub.join(DESCRIPTORS_FILE)).map_err(|e| io_err("copy", &descriptors, e))?;
        let t = std::time::Instant::now();
        api.start_from_checkpoint(id, CHECKPOINT).map_err(|e| match e {
            CallError::Docker(status, message) => Error::runtime_failed(
                KIND,
                format!("POST /containers/{}/start?checkpoint={CHECKPOINT}", req.name),
                format!("{message} (HTTP {status})"),
                Some(req.log.to_path_buf()),
            ),
            e => api.error(&format!("POST /containers/{}/start", req.name), e),
        })?;
        tracing::info!(
            container = %req.name,
            root_changes_s = diff_s,
            start_s = t.elapsed().as_secs_f64(),
            "Docker restored the container"
        );
        let c = api.inspect(id)?.ok_or_else(|| Error::Container(format!("{} vanished", req.name)))?;
        let (running, status) = container_state(&c);
        let pid = c.state.as_ref().and_then(|s| s.pid).unwrap_or(0) as i32;
        if !running || pid <= 0 {
            return Err(Error::runtime_failed(
                KIND,
                "docker start --checkpoint",
                format!("the container is {status} after its restore"),
                Some(req.log.to_path_buf()),
            ));
        }
        if rec.restart_policy.restarts() {
            api.set_restart_policy(id, rec.restart_policy.to_api())?;
        }
        Ok(Restored { id: id.to_owned(), name: req.name.to_owned(), pid })
    }
}

fn checkpoint_dir(root: &Path, id: &str) -> PathBuf {
    root.join("containers").join(id).join("checkpoints").join(CHECKPOINT)
}

/// `REPO[:TAG]` (a registry port's colon is not a tag's).
fn split_reference(name: &str) -> (&str, &str) {
    match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') && !repo.is_empty() => (repo, tag),
        _ => (name, "latest"),
    }
}

/// A tar of the directory `dir` (in name order, links as links, owners and times kept).
fn tar_of(dir: &Path) -> Result<Vec<u8>, Error> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        let mut entries: Vec<_> = fs::read_dir(&here)
            .and_then(|r| r.collect::<Result<Vec<_>, _>>())
            .map_err(|e| io_err("read", &here, e))?;
        entries.sort_by_key(|e| e.file_name());
        // Depth first, in name order: push in reverse.
        let mut subdirs = Vec::new();
        for e in entries {
            let rel = rel.join(e.file_name());
            let path = dir.join(&rel);
            b.append_path_with_name(&path, &rel).map_err(|e| io_err("archive", &path, e))?;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                subdirs.push(rel);
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    b.into_inner().map_err(|e| io_err("archive", dir, e))
}

fn io_err(action: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Container(format!("cannot {action} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded() -> Recorded {
        Recorded {
            create: serde_json::json!({
                "Hostname": "0123456789ab",
                "Image": "ferry-lab/busybox",
                "Cmd": ["/usr/bin/python3", "/opt/ferry/ctrload.py"],
                "Env": ["PATH=/usr/bin", "A=b"],
                "Labels": {"ferry.test": "yes"},
                "HostConfig": {
                    "Memory": 805306368,
                    "NetworkMode": "none",
                    "Runtime": "runc",
                    "Binds": ["/srv/data:/data"],
                    "RestartPolicy": {"Name": "always", "MaximumRetryCount": 0}
                }
            }),
            restart_policy: Policy { name: "always".into(), max_retries: 0 },
            image_id: Some("sha256:aa".into()),
            layers: vec!["sha256:l1".into()],
            own_binds: vec!["/var/lib/docker/containers/x/resolv.conf".into()],
        }
    }

    #[test]
    fn the_restored_container_is_created_as_it_was() {
        let body = recorded().create_body("sha256:bb", "ferry").expect("body");
        assert_eq!(body.image.as_deref(), Some("sha256:bb"));
        assert_eq!(body.hostname.as_deref(), Some("0123456789ab"));
        assert_eq!(body.env.as_deref(), Some(&["PATH=/usr/bin".to_owned(), "A=b".to_owned()][..]));
        assert_eq!(body.labels.as_ref().and_then(|l| l.get("ferry.test")).map(String::as_str), Some("yes"));
        let host = body.host_config.expect("host config");
        assert_eq!(host.memory, Some(805306368));
        assert_eq!(host.runtime.as_deref(), Some("ferry"), "restored through the wrapper");
        assert_eq!(host.binds, Some(vec!["/srv/data:/data".to_owned()]));
        // No restart while the restore runs: the recorded policy comes after.
        assert_eq!(host.restart_policy.and_then(|p| p.name), Some(RestartPolicyNameEnum::NO));
    }

    #[test]
    fn records_round_trip_and_hostile_ones_are_refused() {
        let mut r = super::super::record::tests_support::sample();
        r.kind = "docker".into();
        r.runtime = serde_json::to_value(recorded()).expect("encode");
        assert_eq!(Recorded::of(&r).expect("parse"), recorded());
        for bad in [
            serde_json::json!(null),
            serde_json::json!({"create": [], "restart_policy": {"name": "no"}}),
            serde_json::json!({"create": {}, "restart_policy": {"name": "sometimes"}}),
            serde_json::json!({"create": {}, "restart_policy": {"name": "no"}, "extra": 1}),
        ] {
            r.runtime = bad.clone();
            assert!(matches!(Recorded::of(&r), Err(Error::BadContainerRecord(_))), "{bad}");
        }
        let mut rec = recorded();
        rec.create["HostConfig"]["Memory"] = "lots".into();
        assert!(rec.create_body("i", "ferry").is_err());
    }

    #[test]
    fn restart_policies_map_both_ways() {
        let p = Policy::of(Some(&RestartPolicy {
            name: Some(RestartPolicyNameEnum::ON_FAILURE),
            maximum_retry_count: Some(3),
        }));
        assert_eq!(p, Policy { name: "on-failure".into(), max_retries: 3 });
        assert!(p.restarts());
        assert_eq!(p.to_api().maximum_retry_count, Some(3));
        assert!(!Policy::of(None).restarts());
        assert!(!Policy::none().restarts());
        let always = Policy { name: "always".into(), max_retries: 0 }.to_api();
        assert_eq!((always.name, always.maximum_retry_count), (Some(RestartPolicyNameEnum::ALWAYS), None));
    }

    #[test]
    fn finds_the_wrapper_among_the_runtimes() {
        let info: bollard::models::SystemInfo = serde_json::from_value(serde_json::json!({
            "DefaultRuntime": "runc",
            "Runtimes": {
                "runc": {"path": "runc"},
                "ferry": {"path": "/usr/local/bin/ferry-runc", "runtimeArgs": ["--ferry-dir", "/run/fw"]},
            }
        }))
        .expect("info");
        assert_eq!(wrapper_runtime(&info), Some(("ferry".to_owned(), PathBuf::from("/run/fw"))));
        let info: bollard::models::SystemInfo = serde_json::from_value(serde_json::json!({
            "Runtimes": {"mine": {"path": "/opt/bin/ferry-runc"}, "runc": {"path": "runc"}}
        }))
        .expect("info");
        assert_eq!(wrapper_runtime(&info), Some(("mine".to_owned(), PathBuf::from(wrapper::DEFAULT_DIR))));
        let info: bollard::models::SystemInfo =
            serde_json::from_value(serde_json::json!({"Runtimes": {"runc": {"path": "runc"}}}))
                .expect("info");
        assert_eq!(wrapper_runtime(&info), None);
    }

    #[test]
    fn names_are_matched_whole() {
        let c: ContainerInspectResponse =
            serde_json::from_value(serde_json::json!({"Id": "abc123def", "Name": "/web"})).expect("inspect");
        assert!(is_named(&c, "web") && is_named(&c, "abc123def"));
        assert!(!is_named(&c, "abc"), "an id prefix is not a name");
        assert!(!is_named(&c, "we"));
    }

    #[test]
    fn reads_the_spec_and_image_names() {
        let spec = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/a"}]}});
        assert_eq!(netns_path(&spec), Some(PathBuf::from("/run/netns/a")));
        assert_eq!(netns_path(&serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}})), None);
        assert_eq!(split_reference("ferry-lab/busybox"), ("ferry-lab/busybox", "latest"));
        assert_eq!(split_reference("redis:7"), ("redis", "7"));
        assert_eq!(split_reference("reg:5000/app"), ("reg:5000/app", "latest"));
    }

    #[test]
    fn image_tars_are_the_same_every_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["b/c", "a", "z"] {
            fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        fs::write(dir.path().join("b/c/f"), b"x").expect("write");
        std::os::unix::fs::symlink("/nowhere", dir.path().join("a/l")).expect("symlink");
        let one = tar_of(dir.path()).expect("tar");
        assert_eq!(one, tar_of(dir.path()).expect("tar"));
        let mut names = Vec::new();
        let mut archive = tar::Archive::new(&one[..]);
        for e in archive.entries().expect("entries") {
            names.push(e.expect("entry").path().expect("path").display().to_string());
        }
        assert_eq!(names, ["a", "b", "z", "a/l", "b/c", "b/c/f"]);
    }
}
