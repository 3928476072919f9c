//! Podman (4.3.1 here), driven through its REST API on the service socket (`podman system
//! service`; the endpoint is the socket's path) with a small HTTP client of ferry's own
//! ([`http`]: why no crate is used is said there).
//!
//! **Dump.** Podman runs its containers through runc, so ferry dumps a container as runc would,
//! from runc's state of it (`RUNC_ROOT/ID/state.json`, [`runc_state`]). Podman never tells runc
//! a root of its own; ferry's private instances give it one through a wrapper script
//! ([`instance`]), and the endpoint's instance file names it; else runc's default
//! `/run/runc`. Podman notices nothing of a dump: a failed one (CRIU resumes the container)
//! leaves it `Up`. A dump that stops the container must tell Podman, or Podman takes the
//! exit for a crash and applies the restart policy (`always`: a second copy within 0.2 s);
//! Podman 4.3.1 cannot change a policy, so `hold` does nothing and `stopping` kills the
//! container through the API (`POST /libpod/containers/ID/kill?signal=SIGKILL`) just before
//! CRIU kills it: Podman records a stop by the user and leaves it stopped (ferry waits for
//! the kill to land, not for Podman's answer, which waits for an exit CRIU holds back).
//!
//! **What travels.** The record's `spec` is the container's `config.json` (inspect's
//! `OCIConfigPath`) without the mounts Podman makes for every container from its own
//! directories (`/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`, `/run/.containerenv`,
//! `/dev/shm`, `/run/secrets`: an import drops and remakes them), `rootfs` is [`RootfsRecord::Image`] (the changes travel as
//! `rootfs-diff.tar` and `deleted.files`), `image` is Podman's name of the image, and
//! `runtime` is `{"config_dump": CONFIG}`: CONFIG is the JSON object Podman's own export
//! writes as `config.dump` (libpod's `ContainerConfig`: `id`, `name`, `rootfsImageID`,
//! `rootfsImageName`, `command`, `labels`, `restart_policy`, `cgroupParent`, `stopSignal`,
//! `logDriver`, `shmSize`, `spec` and the rest, with the source's own paths such as
//! `conmonPidFile` and `staticDir`), made from the API's description of the container
//! ([`archive::config_dump`]). An export in Podman's layout writes it as `config.dump` and
//! the record's `spec` as `spec.dump`.
//!
//! **Restore.** Podman's own restore of an imported checkpoint (`POST
//! /libpod/containers/NAME/restore?import=true`, the archive as the body): ferry writes the
//! archive straight into the request, from its verified images: `config.dump` (the recorded
//! one with the restore's name, this instance's cgroup parent, and without the source's pid
//! files, log, `/dev/shm` and static directories), `spec.dump` (the record's spec with the
//! `org.criu.config` annotation and the new network namespace's path: Podman has no option to
//! change a path namespace), `checkpoint/` with only `inventory.img` (Podman checks that it
//! exists) and `descriptors.json` (runc reads it), and the root filesystem's changes, which
//! Podman applies to the new root itself. runc's CRIU then reads every image from ferry's
//! directory, as the configuration file says. Podman needs the container's image under its
//! name *and* with its id: [`ContainerRuntime::import_image`] therefore builds images
//! deterministically ([`image`]), so that every host gets the same id. Once restored, the
//! container keeps the `org.criu.config` annotation (Podman stores the spec it was given) and
//! runc would hand the file to CRIU again at Podman's own next checkpoint: ferry empties the
//! file after the restore, and leaves the annotation out of the records it takes.

mod archive;
mod http;
mod image;
mod instance;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use self::http::{encode, Body, Client, HttpError, Response};
use super::record::{read_capped, validate_name};
use super::{
    runc_state, Container, ContainerRecord, ContainerRuntime, CreateSpec, Endpoints, Kind, NetworkRecord,
    RestoreSpec, Restored, RootfsRecord, RECORD_VERSION,
};
use crate::Error;

pub(super) const KIND: &str = "podman";
/// The API's version prefix (Podman 4.x).
const API: &str = "/v4.0.0/libpod";
const MAX_SPEC: u64 = 4 << 20;
/// Largest answer read for a description (a container's inspection is about 10 KiB).
const MAX_ANSWER: usize = 16 << 20;
/// Calls that answer at once.
const SHORT: Duration = Duration::from_secs(60);
/// What the CRIU configuration file of a restore says once the restore is done.
const SPENT_CRIU_CONFIG: &str =
    "# ferry restored a container from here; Podman's own checkpoints and restores of it read this file too\n";
/// How long a kill through the API may take to land (`stopping`).
const STOPPING_WAIT: Duration = Duration::from_secs(10);
/// Calls that run CRIU or copy an image.
const LONG: Duration = Duration::from_secs(900);

pub(super) const KIND_ENTRY: Kind = Kind {
    name: KIND,
    default_endpoint: "/run/podman/podman.sock",
    open,
    instance_endpoint: instance::endpoint,
    start_instance: instance::start,
    stop_instance: instance::stop,
};

fn open(endpoints: &Endpoints) -> Box<dyn ContainerRuntime> {
    Box::new(Podman::new(endpoints))
}

/// Podman's service at a socket.
#[derive(Debug, Clone)]
pub struct Podman {
    client: Client,
    /// The cgroup under which the instance's containers go (ferry's instances say).
    cgroup_parent: Option<String>,
    /// Where runc keeps the state of the instance's containers: the instance's own root,
    /// then runc's default.
    runc_roots: Vec<PathBuf>,
}

impl Podman {
    pub fn new(endpoints: &Endpoints) -> Podman {
        let socket = endpoints.get(KIND);
        let me: Value = socket
            .parent()
            .map(|d| d.join(instance::INSTANCE_FILE))
            .and_then(|p| read_capped(&p, 1 << 20).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let cgroup_parent = me["cgroup_parent"].as_str().filter(|p| !p.is_empty()).map(str::to_owned);
        let mut runc_roots: Vec<PathBuf> = me["runc_root"].as_str().map(PathBuf::from).into_iter().collect();
        runc_roots.push(PathBuf::from("/run/runc"));
        Podman { client: Client::new(&socket), cgroup_parent, runc_roots }
    }

    fn socket(&self) -> &Path {
        self.client.socket()
    }

    fn call(&self, method: &str, target: &str, body: Body<'_>, timeout: Duration) -> Result<Response, Error> {
        self.client.call(method, target, body, MAX_ANSWER, timeout).map_err(|e| match e {
            HttpError::Connect(_) => Error::runtime_unavailable(KIND, self.socket(), e.to_string()),
            e => Error::runtime_failed(KIND, format!("{method} {target}"), e.to_string(), None),
        })
    }

    /// A description (`GET`), `None` if Podman has no such object.
    fn get_json(&self, target: &str) -> Result<Option<Value>, Error> {
        let r = self.call("GET", target, Body::None, SHORT)?;
        match r.status {
            404 => Ok(None),
            _ if r.ok() => serde_json::from_slice(&r.body).map(Some).map_err(|e| {
                Error::runtime_failed(
                    KIND,
                    format!("GET {target}"),
                    format!("an answer ferry cannot read: {e}"),
                    None,
                )
            }),
            _ => Err(Error::runtime_failed(KIND, format!("GET {target}"), r.message(), None)),
        }
    }

    /// A call that must succeed.
    fn expect_ok(
        &self,
        method: &str,
        target: &str,
        body: Body<'_>,
        timeout: Duration,
    ) -> Result<Response, Error> {
        let r = self.call(method, target, body, timeout)?;
        if r.ok() {
            Ok(r)
        } else {
            Err(Error::runtime_failed(KIND, format!("podman {method} {target}"), r.message(), None))
        }
    }

    fn inspect_json(&self, id: &str) -> Result<Option<Value>, Error> {
        self.get_json(&format!("{API}/containers/{}/json", encode(id)))
    }

    /// The runc root that holds the state of container `id`.
    fn runc_root_of(&self, id: &str) -> Result<&Path, Error> {
        self.runc_roots
            .iter()
            .map(PathBuf::as_path)
            .find(|r| r.join(id).join("state.json").is_file())
            .ok_or_else(|| {
                let roots: Vec<String> = self.runc_roots.iter().map(|r| r.display().to_string()).collect();
                Error::Container(format!(
                    "runc keeps no state of podman container {id} in {}: ferry reads the dump's plan there \
                 (ferry's own Podman instances name their runc root beside their socket)",
                    roots.join(" or ")
                ))
            })
    }

    /// Deletes container `id_or_name` (killing it first); absent is fine.
    fn delete(&self, id_or_name: &str) -> Result<(), Error> {
        let target = format!("{API}/containers/{}?force=true&t=0", encode(id_or_name));
        let r = self.call("DELETE", &target, Body::None, LONG)?;
        if r.ok() || r.status == 404 {
            Ok(())
        } else {
            Err(Error::runtime_failed(KIND, format!("podman rm -f {id_or_name}"), r.message(), None))
        }
    }

    /// The running container `id`'s init pid, as Podman reports it.
    fn running_pid(&self, id: &str) -> Result<(String, i32), Error> {
        let ins = self.inspect_json(id)?.ok_or_else(|| Error::ContainerNotFound {
            workload: format!("{KIND}:{id}"),
            where_: self.socket().display().to_string(),
        })?;
        let status = ins.pointer("/State/Status").and_then(Value::as_str).unwrap_or("unknown");
        let pid = ins.pointer("/State/Pid").and_then(Value::as_i64).unwrap_or(0) as i32;
        if status != "running" || pid <= 0 {
            return Err(Error::ContainerNotRunning {
                workload: format!("{KIND}:{id}"),
                state: status.to_owned(),
            });
        }
        Ok((ins["Name"].as_str().unwrap_or(id).to_owned(), pid))
    }

    fn create_in(&self, req: &CreateSpec<'_>) -> Result<Restored, Error> {
        let env: serde_json::Map<String, Value> = req
            .env
            .iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_owned(), Value::from(v)),
                None => (e.clone(), Value::from("")),
            })
            .collect();
        let mut body = json!({
            "name": req.name,
            "image": image::reference(req.image),
            "command": req.args,
            "env": env,
            "labels": req.labels,
            "netns": match req.netns {
                Some(p) => json!({"nsmode": "path", "value": p}),
                None => json!({"nsmode": "none"}),
            },
            "mounts": req.mounts.iter().map(|(src, dst)| json!({
                "destination": dst, "source": src, "type": "bind", "options": ["rbind", "rw"]
            })).collect::<Vec<_>>(),
        });
        if let Some(limit) = req.memory_limit {
            body["resource_limits"] = json!({ "memory": { "limit": limit } });
        }
        if let Some(parent) = &self.cgroup_parent {
            body["cgroup_parent"] = parent.as_str().into();
        }
        let r = self.expect_ok("POST", &format!("{API}/containers/create"), Body::Json(&body), SHORT)?;
        let id = id_of(&r)?;
        self.expect_ok("POST", &format!("{API}/containers/{id}/start"), Body::None, SHORT)?;
        let (name, pid) = self.running_pid(&id)?;
        Ok(Restored { id, name, pid })
    }

    fn import(&self, rootfs: &Path, reference: &str, tmp: &Path) -> Result<(), Error> {
        let layer = image::write_layer(rootfs, &tmp.join("layer.tar"))
            .map_err(|e| Error::Container(format!("cannot make an image of {}: {e}", rootfs.display())))?;
        let config = image::config(&layer.diff_id, &["/bin/sh"]);
        let id = image::digest(&config).trim_start_matches("sha256:").to_owned();
        let current = |this: &Podman| -> Result<Option<String>, Error> {
            Ok(this
                .get_json(&format!("{API}/images/{}/json", encode(reference)))?
                .and_then(|i| i["Id"].as_str().map(str::to_owned)))
        };
        if current(self)?.as_deref() == Some(id.as_str()) {
            tracing::debug!(%reference, %id, "the image is there already");
            return Ok(());
        }
        let mut produce = |w: &mut dyn Write| image::write_archive(w, &layer, &config, reference);
        self.expect_ok(
            "POST",
            &format!("{API}/images/load"),
            Body::Stream("application/x-tar", &mut produce),
            LONG,
        )?;
        match current(self)? {
            Some(got) if got == id => {
                tracing::info!(%reference, %id, bytes = layer.size, "image loaded");
                Ok(())
            }
            got => Err(Error::runtime_failed(
                KIND,
                format!("podman load {reference}"),
                format!("the image has id {got:?} after the load, not {id}"),
                None,
            )),
        }
    }
}

/// Where Podman mounts files of its own into every container (from the container's userdata
/// directories); an imported checkpoint's restore drops these mounts and makes them anew.
const PODMAN_MOUNTS: &[&str] =
    &["/dev/shm", "/etc/resolv.conf", "/etc/hostname", "/etc/hosts", "/run/.containerenv", "/run/secrets"];

/// Removes from `spec` the mounts Podman makes itself (their sources are under the
/// container's own `userdata` directories, which the target does not have).
fn drop_podman_mounts(spec: &mut Value, userdata: &[PathBuf]) {
    let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) else { return };
    mounts.retain(|m| {
        let dst = m["destination"].as_str().unwrap_or("");
        let src = Path::new(m["source"].as_str().unwrap_or(""));
        !(PODMAN_MOUNTS.contains(&dst) && userdata.iter().any(|u| src.starts_with(u)))
    });
}

fn id_of(r: &Response) -> Result<String, Error> {
    serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["Id"].as_str().map(str::to_owned))
        .filter(|id| validate_name("id", id, false).is_ok())
        .ok_or_else(|| Error::runtime_failed(KIND, "podman", "the answer names no container id", None))
}

impl ContainerRuntime for Podman {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn inspect(&self, id: &str) -> Result<Container, Error> {
        let workload = format!("{KIND}:{id}");
        validate_name("id", id, false).map_err(|_| Error::InvalidWorkload {
            input: workload.clone(),
            why: "not a podman container name or id".into(),
        })?;
        let ins = self.inspect_json(id)?.ok_or_else(|| Error::ContainerNotFound {
            workload: workload.clone(),
            where_: self.socket().display().to_string(),
        })?;
        let text = |p: &str| ins.pointer(p).and_then(Value::as_str).unwrap_or("").to_owned();
        let status = text("/State/Status");
        if status != "running" {
            return Err(Error::ContainerNotRunning { workload, state: status });
        }
        let full_id = text("/Id");
        let name = text("/Name");
        let config = PathBuf::from(text("/OCIConfigPath"));
        let spec_bytes = read_capped(&config, MAX_SPEC).map_err(|e| io_err("read", &config, e))?;
        let full_spec: Value = serde_json::from_slice(&spec_bytes)
            .map_err(|e| Error::Container(format!("{}: {e}", config.display())))?;
        let mut config_dump = archive::config_dump(&ins, &full_spec);
        let mut spec = full_spec;
        let userdata: Vec<PathBuf> = [text("/StaticDir"), text("/ConmonPidFile")]
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| {
                if p.ends_with(".pid") {
                    Path::new(p).parent().map(Path::to_path_buf).unwrap_or_default()
                } else {
                    PathBuf::from(p)
                }
            })
            .collect();
        drop_podman_mounts(&mut spec, &userdata);
        // ferry's own restore left it (it names a file of that restore's).
        if let Some(a) = spec.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove(super::criu_conf::ANNOTATION);
        }
        config_dump["spec"] = spec.clone();
        let root = self.runc_root_of(&full_id)?;
        let plan = runc_state::dump_plan(root, &full_id).map_err(|e| match e {
            Error::ContainerNotRunning { state, .. } => {
                Error::ContainerNotRunning { workload: workload.clone(), state }
            }
            e => e,
        })?;
        let pid = ins.pointer("/State/Pid").and_then(Value::as_i64).unwrap_or(0);
        if i64::from(plan.init_pid) != pid {
            return Err(Error::ContainerNotRunning { workload, state: "restarting".into() });
        }
        let labels = ins
            .pointer("/Config/Labels")
            .and_then(Value::as_object)
            .map(|l| l.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
            .unwrap_or_default();
        let image = Some(text("/ImageName")).filter(|i| !i.is_empty());
        let record = ContainerRecord {
            version: RECORD_VERSION,
            kind: KIND.into(),
            id: full_id,
            name,
            image,
            runtime: json!({ "config_dump": config_dump }),
            spec,
            rootfs: RootfsRecord::Image,
            labels,
            network: plan.netns_path.as_deref().map(|p| {
                let (ip, mac) = super::netns_address(p);
                NetworkRecord { external: true, ip, mac }
            }),
        };
        Ok(Container { record, plan })
    }

    /// Podman 4.3.1 cannot change a container's restart policy: see `stopping`.
    fn hold(&self, _c: &Container) -> Result<(), Error> {
        Ok(())
    }

    /// Kills the container through the API, so that Podman records a stop by its user (and
    /// no restart). Podman answers a SIGKILL only once the container's exit is reported, which
    /// cannot happen while CRIU holds the tree (it waits 5 s, then gives up): the answer is read
    /// aside, and the kill is seen landing instead, as the init process dying. Podman holds the
    /// container's lock from before that kill until it has saved the stop, so conmon's cleanup
    /// (which applies the restart policy) sees the stop.
    fn stopping(&self, c: &Container) -> Result<(), Error> {
        let target = format!("{API}/containers/{}/kill?signal=SIGKILL", encode(&c.record.id));
        let client = self.client.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let asked = target.clone();
        std::thread::spawn(move || {
            let answer = client.call("POST", &asked, Body::None, 1 << 20, SHORT);
            match &answer {
                Ok(r) if r.ok() => tracing::debug!("podman reported the kill done"),
                Ok(r) => tracing::debug!(answer = %r.message(), "podman's answer to the kill"),
                Err(e) => tracing::debug!(error = %e, "podman's answer to the kill"),
            }
            let _ = tx.send(answer);
        });
        let pid = c.plan.init_pid;
        let started = std::time::Instant::now();
        loop {
            if !ferry_sys::process_state(pid).is_some_and(|s| s != 'Z' && s != 'X') {
                tracing::debug!(seconds = started.elapsed().as_secs_f64(), "podman killed the container");
                return Ok(());
            }
            // A tree held frozen (a migration's holder cgroup) dies only once ferry thaws it,
            // after this returns: podman's SIGKILL pending is enough, podman then records the
            // stop as the tree dies.
            if sigkill_pending(pid) {
                tracing::debug!(seconds = started.elapsed().as_secs_f64(), "podman's SIGKILL is pending");
                return Ok(());
            }
            let failed = match rx.try_recv() {
                Ok(Ok(r)) if !r.ok() => Some(r.message()),
                Ok(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(detail) = failed {
                return Err(Error::runtime_failed(
                    KIND,
                    format!("podman kill {}", c.record.name),
                    detail,
                    None,
                ));
            }
            if started.elapsed() > STOPPING_WAIT {
                return Err(Error::runtime_failed(
                    KIND,
                    format!("podman kill {}", c.record.name),
                    format!(
                        "the container's init (pid {pid}) did not die within {} s",
                        STOPPING_WAIT.as_secs()
                    ),
                    None,
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn remove(&self, record: &ContainerRecord) -> Result<(), Error> {
        self.delete(&record.id)
    }

    fn exists(&self, name: &str) -> Result<bool, Error> {
        // By its description: `exists` also matches a prefix of another container's id.
        Ok(self.inspect_json(name)?.is_some_and(|c| c["Name"] == name || c["Id"] == name))
    }

    /// Podman's import drops the mounts at its own destinations (whatever their source: an
    /// archive of Podman's own export still names the source host's files) and makes them anew.
    fn own_bind_sources(&self, record: &ContainerRecord) -> Vec<String> {
        record
            .bind_sources()
            .into_iter()
            .filter(|(_, dst)| PODMAN_MOUNTS.contains(&dst.as_str()))
            .map(|(src, _)| src)
            .collect()
    }

    fn preflight(&self, record: &ContainerRecord, _name: &str) -> Vec<String> {
        let Some(config) = record.runtime.get("config_dump").filter(|c| c.is_object()) else {
            return vec![
                "the checkpoint carries no Podman configuration (config_dump): it was not taken of a \
                         Podman container by ferry; restore it with its own runtime"
                    .into(),
            ];
        };
        let mut reasons = Vec::new();
        let text = |k: &str| config.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let (image_id, image_name) = (text("rootfsImageID"), text("rootfsImageName"));
        if !text("pod").is_empty() {
            reasons.push(format!(
                "the container was in pod {}: ferry does not restore containers into pods",
                text("pod")
            ));
        }
        let short = image_id.chars().take(12).collect::<String>();
        match self.get_json(&format!("{API}/images/{}/json", encode(&image_name))) {
            Ok(None) => reasons.push(format!(
                "the image {image_name} ({short}) is not in this host's Podman: load the source's image here \
                 (`podman save` there, `podman load` here; `ferry lab exec` imports the lab's image on every node)"
            )),
            Ok(Some(img)) if img["Id"].as_str() != Some(image_id.as_str()) => reasons.push(format!(
                "this host's Podman has {image_name} as image {}, but the container was made from image {short}: \
                 Podman restores onto the very same image; load the source's image here",
                img["Id"].as_str().unwrap_or("?").chars().take(12).collect::<String>()
            )),
            Ok(Some(_)) => {}
            Err(e) => reasons.push(format!("cannot look up the image {image_name}: {e}")),
        }
        reasons
    }

    fn restore(&self, req: &RestoreSpec<'_>) -> Result<Restored, Error> {
        let record = req.record;
        let recorded = record.runtime.get("config_dump").filter(|c| c.is_object()).ok_or_else(|| {
            Error::BadContainerRecord("a podman container's record has no config_dump".into())
        })?;
        let spec = req.spec();
        // The same id when the name is the same and the id free (a migration, a checkpoint
        // that stopped it); otherwise Podman gives it a new one (`name=`).
        let keep_id = req.name == record.name && self.inspect_json(&record.id)?.is_none();
        let id = keep_id.then_some(record.id.as_str());
        let config = archive::restore_config(recorded, req.name, id, &spec, self.cgroup_parent.as_deref());
        let mut target = format!("{API}/containers/{}/restore?import=true", encode(req.name));
        if !keep_id {
            target.push_str(&format!("&name={}", encode(req.name)));
        }
        let images = req.images;
        let mut produce = |w: &mut dyn Write| archive::write_restore_archive(w, &config, &spec, images);
        let r = self.call("POST", &target, Body::Stream("application/x-tar", &mut produce), LONG)?;
        let log = req.log.exists().then(|| req.log.to_path_buf());
        if !r.ok() {
            let mut detail = r.message();
            if let Some(line) = log.as_deref().and_then(criu_error) {
                detail.push_str(&format!("; CRIU: {line}"));
            }
            return Err(Error::runtime_failed(KIND, "podman container restore --import", detail, log));
        }
        // The container keeps the annotation (Podman stores the spec it was given), and runc
        // hands the file to CRIU again at the container's next `podman container checkpoint`
        // or restore: from now on it must ask for nothing (the images it names are gone).
        if let Err(e) = fs::write(req.criu_config, SPENT_CRIU_CONFIG) {
            tracing::warn!(path = %req.criu_config.display(), error = %e, "cannot empty the restore's CRIU configuration");
        }
        let id = id_of(&r)?;
        let (name, pid) = self.running_pid(&id).map_err(|e| {
            Error::runtime_failed(
                KIND,
                "podman container restore --import",
                format!("restored, but: {e}"),
                log.clone(),
            )
        })?;
        tracing::info!(%id, %name, pid, "podman restored the container");
        Ok(Restored { id, name, pid })
    }

    fn discard(&self, name: &str) {
        if let Err(e) = self.delete(name) {
            tracing::warn!(container = %name, error = %e, "cannot remove a half-restored podman container");
        }
    }

    fn create(&self, req: &CreateSpec<'_>) -> Result<Restored, Error> {
        validate_name("name", req.name, false)?;
        if self.exists(req.name)? {
            return Err(Error::NameTaken { workload: format!("{KIND}:{}", req.name) });
        }
        let created = self.create_in(req);
        if created.is_err() {
            self.discard(req.name);
        }
        created
    }

    fn import_image(&self, rootfs: &Path, name: &str) -> Result<(), Error> {
        if !rootfs.is_dir() {
            return Err(Error::Container(format!("{} is not a root filesystem directory", rootfs.display())));
        }
        let reference = image::reference(name);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = std::env::temp_dir().join(format!("ferry-podman-image-{}-{stamp}", std::process::id()));
        fs::create_dir(&tmp).map_err(|e| io_err("create", &tmp, e))?;
        let done = self.import(rootfs, &reference, &tmp);
        let _ = fs::remove_dir_all(&tmp);
        done
    }
}

/// The first error CRIU logged (its log's last 4 MiB are read).
fn criu_error(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4 << 20))).ok()?;
    let mut bytes = Vec::new();
    f.take(4 << 20).read_to_end(&mut bytes).ok()?;
    ferry_criu::classify::first_error_line(&String::from_utf8_lossy(&bytes))
}

pub(crate) fn io_err(action: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Container(format!("cannot {action} {}: {e}", path.display()))
}

/// True if SIGKILL is pending for `pid` (its own or its thread group's pending set).
fn sigkill_pending(pid: i32) -> bool {
    const SIGKILL_BIT: u64 = 1 << (9 - 1);
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    status
        .lines()
        .filter_map(|l| l.strip_prefix("SigPnd:").or_else(|| l.strip_prefix("ShdPnd:")))
        .filter_map(|v| u64::from_str_radix(v.trim(), 16).ok())
        .any(|mask| mask & SIGKILL_BIT != 0)
}
