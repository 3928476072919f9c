//! Containers: a process tree plus what its runtime knows about it.
//!
//! One module per runtime, each behind [`ContainerRuntime`]; [`KINDS`] is the one place where
//! they are listed. The page path is the same for all: ferry dumps the container's tree with
//! CRIU itself, with the options runc would use ([`runc_state`]), and the runtime's own restore
//! (`runc restore`, run by the runtime) reads the images from ferry's verified tmpfs through a
//! CRIU configuration file named by the spec's `org.criu.config` annotation ([`criu_conf`]).
//! What travels beside CRIU's images: the container's record (spec, image, labels, network:
//! [`record`]), runc's `descriptors.json`, and its root filesystem's changes ([`rootfs`]).

pub mod containerd;
pub mod criu_conf;
pub mod docker;
pub mod formats;
pub mod podman;
pub mod record;
pub mod rootfs;
pub mod runc;
pub mod runc_state;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub use criu_conf::CriuConfig;
pub use record::{ContainerRecord, NetworkRecord, RootfsRecord, RECORD_VERSION};
pub use runc_state::DumpPlan;

use crate::Error;

/// A container runtime ferry can checkpoint and restore containers of.
pub trait ContainerRuntime: fmt::Debug + Send + Sync {
    /// The `KIND` of `KIND:ID`.
    fn kind(&self) -> &'static str;

    /// The running container `id` (its name or id), with what a dump of it needs.
    fn inspect(&self, id: &str) -> Result<Container, Error>;

    /// CRIU is about to stop the container's processes: keep the runtime from restarting it
    /// (restart policies) until [`ContainerRuntime::release`] or [`ContainerRuntime::remove`].
    fn hold(&self, _c: &Container) -> Result<(), Error> {
        Ok(())
    }

    /// The checkpoint is stored (and a migration committed) and CRIU is about to kill the
    /// container's processes: a runtime that cannot be kept from restarting it (`hold`) may
    /// stop it through its own API here, so that it records a stop rather than a crash.
    fn stopping(&self, _c: &Container) -> Result<(), Error> {
        Ok(())
    }

    /// CRIU resumed the processes (the dump failed, or it left them running): undo
    /// [`ContainerRuntime::hold`].
    fn release(&self, _c: &Container) -> Result<(), Error> {
        Ok(())
    }

    /// The container's processes are gone for good (a checkpoint that stopped it, a migration
    /// that committed): the runtime forgets the container.
    fn remove(&self, record: &ContainerRecord) -> Result<(), Error>;

    /// True if the runtime has a container named `name` (running or not).
    fn exists(&self, name: &str) -> Result<bool, Error>;

    /// True if restoring `record` here as `name` would clash with a container the runtime
    /// has (containerd: in the record's namespace).
    fn name_taken(&self, _record: &ContainerRecord, name: &str) -> Result<bool, Error> {
        self.exists(name)
    }

    /// What would keep `record` from being restored here (each reason a sentence with its
    /// fix): the image missing, a bind mount's source missing. Not the name: a container
    /// checked where it runs has its own name ([`ContainerRuntime::name_taken`]).
    fn preflight(&self, record: &ContainerRecord, name: &str) -> Vec<String>;

    /// Sources of the bind mounts the runtime makes anew for every container it creates
    /// (Docker's `resolv.conf`, `hosts`, `hostname`, `/dev/shm` under its data root): the
    /// target need not have the source's.
    fn own_bind_sources(&self, _record: &ContainerRecord) -> Vec<String> {
        Vec::new()
    }

    /// Recreates the container under the runtime and restores it from the images.
    fn restore(&self, req: &RestoreSpec<'_>) -> Result<Restored, Error>;

    /// Removes what a failed restore of `name` left behind; nothing there is no error.
    fn discard(&self, name: &str);

    /// For ferry's lab and tests: creates a container and starts it.
    fn create(&self, req: &CreateSpec<'_>) -> Result<Restored, Error>;

    /// For ferry's lab and tests: makes image `name` from the root filesystem in `rootfs`
    /// (runc has no images: its containers use the directory itself).
    fn import_image(&self, rootfs: &Path, name: &str) -> Result<(), Error>;
}

/// A container to create (ferry's lab and tests).
#[derive(Debug, Clone, Default)]
pub struct CreateSpec<'a> {
    pub name: &'a str,
    /// The image: its name (a directory's path for runc).
    pub image: &'a str,
    pub args: &'a [String],
    pub env: &'a [String],
    /// The network namespace to join (default: a new one).
    pub netns: Option<&'a Path>,
    /// Memory limit in bytes.
    pub memory_limit: Option<u64>,
    pub labels: BTreeMap<String, String>,
    /// Bind mounts: host path, path inside.
    pub mounts: Vec<(String, String)>,
}

/// Where a private instance of a runtime keeps its state (ferry's lab gives each node one).
#[derive(Debug, Clone)]
pub struct InstanceDirs {
    /// Persistent state (images, containers' layers).
    pub data: PathBuf,
    /// Runtime state and sockets (short paths: socket names are limited to 107 bytes).
    pub run: PathBuf,
    /// The network namespace its daemon runs in (a lab node's), if any.
    pub netns: Option<PathBuf>,
    /// The cgroup under which its containers' cgroups go.
    pub cgroup_parent: String,
}

/// What a restore asks of a runtime.
#[derive(Debug, Clone)]
pub struct RestoreSpec<'a> {
    pub record: &'a ContainerRecord,
    /// The name it gets here.
    pub name: &'a str,
    /// The verified images (also `descriptors.json` and the root filesystem's changes).
    pub images: &'a Path,
    /// The CRIU configuration file the spec's `org.criu.config` names.
    pub criu_config: &'a Path,
    /// Where CRIU logs (the configuration file's work directory), for errors.
    pub log: &'a Path,
    /// A directory of ferry's for this restore (stub image directories and the like).
    pub scratch: &'a Path,
    /// The network namespace to join instead of the recorded one (a migration's target).
    pub netns: Option<&'a Path>,
}

impl RestoreSpec<'_> {
    pub fn rootfs_diff(&self) -> Option<PathBuf> {
        Some(self.images.join(record::ROOTFS_DIFF_FILE)).filter(|p| p.exists())
    }

    pub fn deleted_files(&self) -> Option<PathBuf> {
        Some(self.images.join(record::DELETED_FILES_FILE)).filter(|p| p.exists())
    }

    /// The record's spec with what this restore changes: the CRIU configuration annotation,
    /// and the network namespace's path.
    pub fn spec(&self) -> serde_json::Value {
        let mut spec = self.record.spec.clone();
        if let Some(obj) = spec.as_object_mut() {
            let ann = obj.entry("annotations").or_insert_with(|| serde_json::json!({}));
            if let Some(a) = ann.as_object_mut() {
                a.insert(
                    criu_conf::ANNOTATION.into(),
                    self.criu_config.to_string_lossy().into_owned().into(),
                );
            }
        }
        if let Some(netns) = self.netns {
            set_namespace_path(&mut spec, "network", netns);
        }
        spec
    }
}

/// Points the spec's namespace of `kind` at `path`.
pub fn set_namespace_path(spec: &mut serde_json::Value, kind: &str, path: &Path) {
    let Some(list) = spec.pointer_mut("/linux/namespaces").and_then(|n| n.as_array_mut()) else { return };
    for ns in list.iter_mut() {
        if ns.get("type").and_then(|t| t.as_str()) == Some(kind) {
            ns["path"] = path.to_string_lossy().into_owned().into();
        }
    }
}

/// A restored container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The runtime's id of it.
    pub id: String,
    pub name: String,
    /// Host PID of its init process.
    pub pid: i32,
}

/// A running container, ready to be dumped.
#[derive(Debug, Clone)]
pub struct Container {
    pub record: ContainerRecord,
    pub plan: DumpPlan,
}

/// Where each runtime is reached on this host: its state directory (runc) or its API socket.
/// A runtime not named here is reached where it is by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    by_kind: BTreeMap<String, PathBuf>,
    /// Where ferry keeps what it makes for restored containers that the runtime does not
    /// keep itself (runc bundles).
    pub state_dir: PathBuf,
}

impl Endpoints {
    pub fn new(state_dir: impl Into<PathBuf>) -> Endpoints {
        Endpoints { by_kind: BTreeMap::new(), state_dir: state_dir.into() }
    }

    /// Parses `KIND=PATH` pairs (the CLI's `--runtime-endpoint`, comma-separated in
    /// `FERRY_RUNTIME_ENDPOINTS`).
    pub fn with(mut self, pairs: &[String]) -> Result<Endpoints, Error> {
        for pair in pairs.iter().flat_map(|p| p.split(',')).filter(|p| !p.is_empty()) {
            let bad = |why: &str| Error::InvalidWorkload { input: pair.to_owned(), why: why.into() };
            let (kind, path) = pair.split_once('=').ok_or_else(|| bad("expected KIND=PATH"))?;
            if !is_kind(kind) {
                return Err(bad("KIND must be one of runc, podman, containerd, docker"));
            }
            if !path.starts_with('/') {
                return Err(bad("PATH must be absolute"));
            }
            self.by_kind.insert(kind.to_owned(), PathBuf::from(path));
        }
        Ok(self)
    }

    pub fn set(&mut self, kind: &str, path: impl Into<PathBuf>) {
        self.by_kind.insert(kind.to_owned(), path.into());
    }

    /// The endpoint of `kind`, or its default.
    pub fn get(&self, kind: &str) -> PathBuf {
        self.by_kind.get(kind).cloned().unwrap_or_else(|| {
            KINDS
                .iter()
                .find(|k| k.name == kind)
                .map(|k| PathBuf::from(k.default_endpoint))
                .unwrap_or_default()
        })
    }

    /// The pairs set explicitly, as `KIND=PATH`.
    pub fn pairs(&self) -> Vec<String> {
        self.by_kind.iter().map(|(k, p)| format!("{k}={}", p.display())).collect()
    }
}

/// The first global IPv4 address in the network namespace at `path`, and its link's MAC.
pub fn netns_address(path: &Path) -> (Option<std::net::Ipv4Addr>, Option<String>) {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", path.display()))
        .args(["ip", "-j", "addr", "show"])
        .output();
    let Some(out) = out.ok().filter(|o| o.status.success()) else { return (None, None) };
    let Ok(links) = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout) else {
        return (None, None);
    };
    for link in &links {
        let addrs = link["addr_info"].as_array().cloned().unwrap_or_default();
        let ip = addrs
            .iter()
            .filter(|a| a["family"] == "inet" && a["scope"] == "global")
            .find_map(|a| a["local"].as_str()?.parse().ok());
        if let Some(ip) = ip {
            return (Some(ip), link["address"].as_str().map(str::to_owned));
        }
    }
    (None, None)
}

/// Whether `record` can be restored here as `name`: the runtime answers, the name is free,
/// and nothing it needs is missing (each reason with its fix).
pub fn preflight(endpoints: &Endpoints, record: &ContainerRecord, name: &str) -> Result<(), Error> {
    let rt = open(&record.kind, endpoints)?;
    let workload = format!("{}:{name}", record.kind);
    if rt.name_taken(record, name)? {
        return Err(Error::NameTaken { workload });
    }
    let mut reasons = rt.preflight(record, name);
    reasons.extend(missing_bind_sources(record, &rt.own_bind_sources(record)));
    reasons.extend(missing_devices(record));
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(Error::ContainerRefused { workload, reasons })
    }
}

/// A reason for each device of the spec this host lacks.
pub fn missing_devices(record: &ContainerRecord) -> Vec<String> {
    let Some(devices) = record.spec.pointer("/linux/devices").and_then(|d| d.as_array()) else {
        return Vec::new();
    };
    devices
        .iter()
        .filter_map(|d| d.get("path")?.as_str())
        .filter(|p| !Path::new(p).exists())
        .map(|p| format!("the container uses device {p}, which this host lacks: add it, or restore on a host that has it"))
        .collect()
}

/// A reason for each bind mount of `record` whose source this host lacks (but those the
/// runtime makes itself: `own`).
pub fn missing_bind_sources(record: &ContainerRecord, own: &[String]) -> Vec<String> {
    record
        .bind_sources()
        .into_iter()
        .filter(|(src, _)| !own.contains(src) && !Path::new(src).exists())
        .map(|(src, dst)| {
            format!("bind mount {dst} needs {src} on this host, which is missing: create it (its content is not copied)")
        })
        .collect()
}

/// One kind of container runtime.
#[derive(Debug)]
pub struct Kind {
    pub name: &'static str,
    /// Its endpoint when none is configured.
    pub default_endpoint: &'static str,
    open: fn(&Endpoints) -> Box<dyn ContainerRuntime>,
    /// A private instance's endpoint.
    instance_endpoint: fn(&InstanceDirs) -> PathBuf,
    /// Starts a private instance (its daemon, if it has one) and waits until it answers.
    start_instance: fn(&InstanceDirs) -> Result<(), Error>,
    /// Stops a private instance: its containers, its daemon, its mounts.
    stop_instance: fn(&InstanceDirs),
}

/// Every runtime ferry knows: a new one is a module and a line here.
pub const KINDS: &[Kind] =
    &[runc::KIND_ENTRY, containerd::KIND_ENTRY, docker::KIND_ENTRY, podman::KIND_ENTRY];

/// The kinds a container record may name: a checkpoint of a kind this build has no module
/// for (an imported Podman archive) is kept, inspected and exported; only its restore needs
/// the module.
pub const KIND_NAMES: &[&str] = &["runc", "podman", "containerd", "docker"];

/// The endpoint of a private instance of `kind` in `dirs`.
pub fn instance_endpoint(kind: &str, dirs: &InstanceDirs) -> Result<PathBuf, Error> {
    Ok((find_kind(kind)?.instance_endpoint)(dirs))
}

/// Starts a private instance of `kind` in `dirs` (ferry's lab and tests).
pub fn start_instance(kind: &str, dirs: &InstanceDirs) -> Result<PathBuf, Error> {
    let k = find_kind(kind)?;
    (k.start_instance)(dirs)?;
    Ok((k.instance_endpoint)(dirs))
}

/// Stops a private instance of `kind` in `dirs`; nothing there is fine.
pub fn stop_instance(kind: &str, dirs: &InstanceDirs) {
    if let Ok(k) = find_kind(kind) {
        (k.stop_instance)(dirs);
    }
}

fn find_kind(kind: &str) -> Result<&'static Kind, Error> {
    KINDS.iter().find(|k| k.name == kind).ok_or_else(|| Error::UnsupportedKind { kind: kind.to_owned() })
}

/// True if `kind` names a container runtime.
pub fn is_kind(kind: &str) -> bool {
    KINDS.iter().any(|k| k.name == kind)
}

/// The runtime of `kind`, reached through `endpoints`.
pub fn open(kind: &str, endpoints: &Endpoints) -> Result<Box<dyn ContainerRuntime>, Error> {
    Ok((find_kind(kind)?.open)(endpoints))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_this_host_lacks_is_a_reason() {
        let mut r = record::tests_support::sample();
        r.spec = serde_json::json!({"linux": {"devices": [{"path": "/dev/null"}, {"path": "/dev/ferry-no-such-gpu0"}]}});
        let reasons = missing_devices(&r);
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].contains("/dev/ferry-no-such-gpu0"));
    }

    #[test]
    fn endpoints_parse_and_default() {
        let e = Endpoints::new("/var/lib/ferry").with(&["runc=/run/x".into(), "".into()]).expect("parse");
        assert_eq!(e.get("runc"), PathBuf::from("/run/x"));
        assert_eq!(Endpoints::default().get("runc"), PathBuf::from("/run/runc"));
        assert!(Endpoints::default().with(&["lxc=/x".into()]).is_err());
        assert!(Endpoints::default().with(&["runc=rel".into()]).is_err());
        assert!(Endpoints::default().with(&["runc".into()]).is_err());
    }

    #[test]
    fn restore_spec_points_the_spec_at_ferry() {
        let mut r = record::tests_support::sample();
        r.spec = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/a"}]}});
        let req = RestoreSpec {
            record: &r,
            name: "web",
            images: Path::new("/i"),
            criu_config: Path::new("/w/criu.conf"),
            log: Path::new("/w/restore.log"),
            scratch: Path::new("/s"),
            netns: Some(Path::new("/run/netns/b")),
        };
        let spec = req.spec();
        assert_eq!(spec["annotations"]["org.criu.config"], "/w/criu.conf");
        assert_eq!(spec["linux"]["namespaces"][1]["path"], "/run/netns/b");
        assert!(spec["linux"]["namespaces"][0].get("path").is_none());
    }
}
