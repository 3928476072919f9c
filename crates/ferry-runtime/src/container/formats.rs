//! The checkpoint formats of Podman and of CRI-O (the kubelet's, KEP-2008): their container
//! metadata, `config.dump` and `spec.dump` (and Podman's `network.status`), made from a
//! [`ContainerRecord`] for an export, and a record made from them for an import.
//!
//! - **Podman** (`podman container checkpoint --export`): `config.dump` is libpod's
//!   `ContainerConfig` of the container, `spec.dump` its OCI runtime spec (`config.json`).
//!   A record of kind `podman` keeps the whole `config.dump` as `runtime.config_dump`, the
//!   shape the Podman module restores from.
//! - **CRI-O** (what the kubelet writes under `/var/lib/kubelet/checkpoints/`): `config.dump`
//!   is CRI-O's short `ContainerConfig` (`id`, `name`, `rootfsImage`, `rootfsImageRef`,
//!   `rootfsImageName`, `runtime`, times), `spec.dump` the spec with CRI-O's `io.kubernetes.*`
//!   annotations (`io.container.manager` is `cri-o`). It becomes a record of kind `podman`
//!   too (the only runtime here that restores a container from such an archive), with a
//!   libpod `config.dump` made from it as `runtime.config_dump` and CRI-O's own kept as
//!   `runtime.cri_o.config_dump`.
//!
//! Everything read here is hostile: sizes are capped before parsing, every field is checked
//! for its type, and the record is validated like any other ([`ContainerRecord::validate`]).
//! The spec's `org.criu.config` annotation is dropped both ways: it names a file of the
//! host that wrote it, and would hand CRIU a configuration of the archive's choosing.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_json::{json, Map, Value};

use super::criu_conf::ANNOTATION as CRIU_CONFIG_ANNOTATION;
use super::record::{validate_name, MAX_RECORD};
use super::{ContainerRecord, NetworkRecord, RootfsRecord, RECORD_VERSION};
use crate::Error;

pub const CONFIG_DUMP: &str = "config.dump";
pub const SPEC_DUMP: &str = "spec.dump";
pub const NETWORK_STATUS: &str = "network.status";
/// Largest `config.dump`, `spec.dump` or `network.status` read (real ones are a few KiB).
pub const MAX_DUMP: usize = 1 << 20;

/// libpod's fields that name paths of the host that wrote `config.dump`: Podman recomputes
/// them when they are missing, and uses (or writes to) the old host's paths when not.
const HOST_FIELDS: &[&str] =
    &["conmonPidFile", "pid_file", "ShmDir", "staticDir", "mounts", "logPath", "secretsPath"];

/// Which engine wrote an archive's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Podman,
    CriO,
}

impl Engine {
    /// From `spec.dump`'s `io.container.manager` (`libpod`, `cri-o`), else from the shape of
    /// `config.dump` (CRI-O's has `checkpointedTime` and none of libpod's fields).
    fn detect(config: &Map<String, Value>, spec: &Map<String, Value>) -> Engine {
        match spec.get("annotations").and_then(|a| a.get("io.container.manager")).and_then(Value::as_str) {
            Some("cri-o") => Engine::CriO,
            Some("libpod") => Engine::Podman,
            _ if config.contains_key("checkpointedTime") && !config.contains_key("idMappingsOptions") => {
                Engine::CriO
            }
            _ => Engine::Podman,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Podman => "Podman",
            Engine::CriO => "CRI-O",
        }
    }
}

/// A record of kind `podman` made from an archive's `config.dump`, `spec.dump` and (Podman's)
/// `network.status`, validated. Errors name the file at fault.
pub fn record_from_dumps(
    config: &[u8],
    spec: &[u8],
    network_status: Option<&[u8]>,
) -> Result<(ContainerRecord, Engine), Error> {
    let config = object(CONFIG_DUMP, config)?;
    let mut spec = object(SPEC_DUMP, spec)?;
    let engine = Engine::detect(&config, &spec);
    if let Some(a) = spec.get_mut("annotations").and_then(Value::as_object_mut) {
        a.remove(CRIU_CONFIG_ANNOTATION);
    }
    let annotations = string_map(SPEC_DUMP, "annotations", spec.get("annotations"))?;
    let id = required(CONFIG_DUMP, &config, "id")?;
    let (name, image, labels, runtime) = match engine {
        Engine::Podman => {
            let name = required(CONFIG_DUMP, &config, "name")?;
            let image = optional(CONFIG_DUMP, &config, "rootfsImageName")?.or(optional(
                CONFIG_DUMP,
                &config,
                "rawImageName",
            )?);
            let labels = string_map(CONFIG_DUMP, "labels", config.get("labels"))?;
            (name, image, labels, json!({ "config_dump": Value::Object(config.clone()) }))
        }
        Engine::CriO => {
            // The kubelet's container name ("counter"), not CRI-O's k8s_counter_pod_ns_uid_0.
            let name = match annotations.get("io.kubernetes.container.name") {
                Some(n) if validate_name("name", n, false).is_ok() => n.clone(),
                _ => required(CONFIG_DUMP, &config, "name")?,
            };
            let image = optional(CONFIG_DUMP, &config, "rootfsImageName")?.or(optional(
                CONFIG_DUMP,
                &config,
                "rootfsImage",
            )?);
            let labels = match annotations.get("io.kubernetes.cri-o.Labels") {
                Some(text) => {
                    let v: Value = serde_json::from_str(text)
                        .map_err(|e| bad(SPEC_DUMP, format!("annotation io.kubernetes.cri-o.Labels: {e}")))?;
                    string_map(SPEC_DUMP, "annotation io.kubernetes.cri-o.Labels", Some(&v))?
                }
                None => BTreeMap::new(),
            };
            let image_id = optional(CONFIG_DUMP, &config, "rootfsImageRef")?;
            let podman = minimal_config(&MinimalConfig {
                id: &podman_id("cri-o", &id),
                name: &name,
                image: image.as_deref().unwrap_or_default(),
                image_id: image_id.as_deref(),
                spec: &Value::Object(spec.clone()),
                labels: &labels,
            });
            (
                name,
                image,
                labels,
                json!({ "config_dump": podman, "cri_o": { "config_dump": Value::Object(config.clone()) } }),
            )
        }
    };
    let network = network_of(&spec, &annotations, network_status)?;
    let record = ContainerRecord {
        version: RECORD_VERSION,
        kind: "podman".into(),
        id,
        name,
        image,
        spec: Value::Object(spec),
        rootfs: RootfsRecord::Image,
        labels,
        network,
        runtime,
    };
    record.validate()?;
    let size = serde_json::to_vec(&record).map(|v| v.len()).unwrap_or(usize::MAX);
    if size as u64 > MAX_RECORD {
        return Err(bad(
            CONFIG_DUMP,
            format!("the container's record would be {size} bytes, over {MAX_RECORD}"),
        ));
    }
    Ok((record, engine))
}

/// The network the archive says the container had: its namespace's path (then it stays
/// behind, and the target gives one), and the address CRI-O's annotation or Podman's
/// `network.status` names.
fn network_of(
    spec: &Map<String, Value>,
    annotations: &BTreeMap<String, String>,
    network_status: Option<&[u8]>,
) -> Result<Option<NetworkRecord>, Error> {
    let namespaces = spec.get("linux").and_then(|l| l.get("namespaces")).and_then(Value::as_array);
    let Some(netns) =
        namespaces.and_then(|n| n.iter().find(|n| n.get("type").and_then(Value::as_str) == Some("network")))
    else {
        return Ok(None); // the host's network
    };
    let external = netns.get("path").and_then(Value::as_str).is_some_and(|p| !p.is_empty());
    let mut ip = annotations.get("io.kubernetes.cri-o.IP.0").and_then(|a| a.parse::<Ipv4Addr>().ok());
    let mut mac = None;
    if let Some(bytes) = network_status {
        if bytes.len() > MAX_DUMP {
            return Err(bad(NETWORK_STATUS, format!("larger than {MAX_DUMP} bytes")));
        }
        let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(NETWORK_STATUS, e.to_string()))?;
        // Podman 4: {"NET": {"interfaces": {"eth0": {"subnets": [{"ipnet": "10.88.0.5/16"}],
        // "mac_address": "..."}}}}; `null` when the container has no network of Podman's.
        let interfaces = v
            .as_object()
            .into_iter()
            .flat_map(|nets| nets.values())
            .filter_map(|n| n.get("interfaces")?.as_object());
        for iface in interfaces.flat_map(|i| i.values()) {
            let addr = iface
                .get("subnets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|s| s.get("ipnet")?.as_str()?.split('/').next()?.parse::<Ipv4Addr>().ok())
                .next();
            if let (None, Some(a)) = (ip, addr) {
                ip = Some(a);
                mac = iface.get("mac_address").and_then(Value::as_str).map(str::to_owned);
            }
        }
    }
    Ok(Some(NetworkRecord { external, ip, mac }))
}

/// Podman's `config.dump` for `record`: a Podman container's own (without the old host's
/// paths); for other kinds, a minimal one made from the record, with `image` (the Podman
/// image holding its root file system) when the record names none.
pub fn config_dump(record: &ContainerRecord, image: Option<&str>) -> Result<Value, Error> {
    if let Some(own) =
        record.runtime.get("config_dump").and_then(Value::as_object).filter(|_| record.kind == "podman")
    {
        let mut c = own.clone();
        for f in HOST_FIELDS {
            c.remove(*f);
        }
        if let Some(image) = image {
            c.insert("rootfsImageName".into(), image.into());
            c.insert("rootfsImageID".into(), image.into());
        }
        c.entry("runtime").or_insert_with(|| "runc".into());
        return Ok(Value::Object(c));
    }
    let image = image.or(record.image.as_deref()).filter(|i| !i.is_empty()).ok_or_else(|| {
        Error::Usage(format!(
            "{} has no image Podman could create it from (runc containers have none): give --rootfs-image NAME, \
             a Podman image holding its root file system",
            record.workload()
        ))
    })?;
    Ok(minimal_config(&MinimalConfig {
        id: &podman_id(&record.kind, &record.id),
        name: &record.name,
        image,
        image_id: None,
        spec: &record.spec,
        labels: &record.labels,
    }))
}

/// What a minimal `config.dump` is made of.
struct MinimalConfig<'a> {
    id: &'a str,
    name: &'a str,
    image: &'a str,
    /// The image's id where known; else its name (Podman resolves either).
    image_id: Option<&'a str>,
    spec: &'a Value,
    labels: &'a BTreeMap<String, String>,
}

/// The libpod fields `podman container restore --import` needs, and those whose absence
/// would give a restored container bad defaults (no stop signal, no log driver).
fn minimal_config(m: &MinimalConfig<'_>) -> Value {
    let mut c = json!({
        "id": m.id,
        "name": m.name,
        "rootfsImageID": m.image_id.unwrap_or(m.image),
        "rootfsImageName": m.image,
        "runtime": "runc",
        "command": m.spec.pointer("/process/args").cloned().unwrap_or(Value::Null),
        "labels": m.labels,
        "stopSignal": 15,
        "stopTimeout": 10,
        "cgroupManager": "cgroupfs",
        "logDriver": "k8s-file",
        "restart_policy": "no",
        "shmSize": 65_536_000,
        "createNetNS": false,
        "idMappingsOptions": { "HostUIDMapping": true, "HostGIDMapping": true },
        "umask": "0022",
        "passwd": true,
        "labelopts": ["disable"],
    });
    // The cgroup it ran under, as Podman's cgroupfs manager takes a parent.
    let parent = m
        .spec
        .pointer("/linux/cgroupsPath")
        .and_then(Value::as_str)
        .filter(|p| p.starts_with('/'))
        .and_then(|p| p.rsplit_once('/').map(|(parent, _)| parent))
        .filter(|p| !p.is_empty() && !p.contains(['\n', '\0']));
    if let Some(parent) = parent {
        c["cgroupParent"] = parent.into();
    }
    c
}

/// A 64-hex id for Podman (its ids are), the same for the same container.
fn podman_id(kind: &str, id: &str) -> String {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return id.to_owned();
    }
    blake3::derive_key("ferry 2026 podman container id", format!("{kind}:{id}").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `spec.dump` for `record`: its OCI spec, without ferry's CRIU configuration annotation.
pub fn spec_dump(record: &ContainerRecord) -> Value {
    let mut spec = record.spec.clone();
    if let Some(a) = spec.get_mut("annotations").and_then(Value::as_object_mut) {
        a.remove(CRIU_CONFIG_ANNOTATION);
    }
    spec
}

/// Host facts an OCI checkpoint image's annotations carry.
#[derive(Debug, Clone, Default)]
pub struct ImageFacts<'a> {
    /// The checkpoint's name in ferry's store.
    pub checkpoint: &'a str,
    pub criu_version: &'a str,
    pub kernel: &'a str,
}

/// The annotations of an OCI checkpoint image of `record` whose `config.dump` is `config`:
/// Podman 4's (`io.podman.annotations.checkpoint.*`, what `podman container restore IMAGE`
/// checks: it needs `runtime.name` to be its own runtime's), checkpointctl's newer
/// `org.criu.checkpoint.*` ones, and CRI-O's.
pub fn image_annotations(
    record: &ContainerRecord,
    config: &Value,
    facts: &ImageFacts<'_>,
) -> BTreeMap<String, String> {
    let text = |k: &str| config.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let image_name = text("rootfsImageName");
    let image_id = text("rootfsImageID");
    let raw = Some(text("rawImageName")).filter(|r| !r.is_empty()).unwrap_or_else(|| image_name.clone());
    let criu = criu_version_number(facts.criu_version).map(|v| v.to_string()).unwrap_or_default();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut a = BTreeMap::new();
    for (prefix, keys) in [
        (
            "io.podman.annotations.checkpoint.",
            &[
                ("name", record.name.clone()),
                ("rawImageName", raw.clone()),
                ("rootfsImageID", image_id.clone()),
                ("rootfsImageName", image_name.clone()),
                ("runtime.name", "runc".to_owned()),
                ("criu.version", criu.clone()),
                ("host.arch", arch.to_owned()),
                ("host.kernel", facts.kernel.to_owned()),
            ][..],
        ),
        (
            "org.criu.checkpoint.",
            &[
                ("engine.name", record.kind.clone()),
                ("container.name", record.name.clone()),
                ("rootfsImageUserRequested", raw.clone()),
                ("rootfsImageName", image_name.clone()),
                ("rootfsImageID", image_id.clone()),
                ("rawImageName", raw.clone()),
                ("runtime.name", "runc".to_owned()),
                ("criu.version", criu.clone()),
                ("host.arch", arch.to_owned()),
                ("host.kernel", facts.kernel.to_owned()),
            ][..],
        ),
        (
            "io.kubernetes.cri-o.annotations.checkpoint.",
            &[
                ("name", record.name.clone()),
                ("rawImageName", raw),
                ("rootfsImageID", image_id),
                ("rootfsImageName", image_name),
                ("criu.version", criu),
            ][..],
        ),
    ] {
        for (k, v) in keys {
            a.insert(format!("{prefix}{k}"), v.clone());
        }
    }
    a.insert("io.ferry.checkpoint.name".into(), facts.checkpoint.to_owned());
    a.insert("io.ferry.checkpoint.workload".into(), record.workload());
    a
}

/// CRIU's version as Podman writes it (`4.2.1` is 40201).
pub fn criu_version_number(v: &str) -> Option<u32> {
    let mut parts = v.trim().split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().unwrap_or(Some(0))?;
    let patch = parts.next().unwrap_or(Some(0))?;
    (minor < 100 && patch < 100).then_some(major * 10_000 + minor * 100 + patch)
}

fn object(file: &str, bytes: &[u8]) -> Result<Map<String, Value>, Error> {
    if bytes.len() > MAX_DUMP {
        return Err(bad(file, format!("larger than {MAX_DUMP} bytes")));
    }
    match serde_json::from_slice::<Value>(bytes).map_err(|e| bad(file, e.to_string()))? {
        Value::Object(o) => Ok(o),
        _ => Err(bad(file, "not a JSON object".into())),
    }
}

fn required(file: &str, o: &Map<String, Value>, key: &str) -> Result<String, Error> {
    optional(file, o, key)?.filter(|s| !s.is_empty()).ok_or_else(|| bad(file, format!("'{key}' is missing")))
}

fn optional(file: &str, o: &Map<String, Value>, key: &str) -> Result<Option<String>, Error> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(file, format!("'{key}' is not a string"))),
    }
}

/// A JSON map of strings (labels, annotations); absent or `null` is empty.
fn string_map(file: &str, what: &str, v: Option<&Value>) -> Result<BTreeMap<String, String>, Error> {
    match v {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(bad(file, format!("{what}: the value of '{}' is not a string", trunc(k)))),
            })
            .collect(),
        Some(_) => Err(bad(file, format!("{what} is not a JSON map"))),
    }
}

fn bad(file: &str, detail: String) -> Error {
    Error::BadContainerRecord(format!("{file}: {detail}"))
}

fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
pub(crate) mod samples {
    /// `config.dump` as Podman 4.3.1 writes it (trimmed, host paths kept).
    pub(crate) const PODMAN_CONFIG: &str = r#"{
        "id": "54afcbe79e1572275246f2d32624812d396ea9410d849d1d5f1c2ecf8dab407b", "name": "web",
        "rootfsImageID": "10ab2a76fde08deda52d3c1da1b25d4b1469590484cce792df52de62affb293a",
        "rootfsImageName": "localhost/ferry-lab/busybox:latest", "labels": {"app": "web"},
        "ShmDir": "/var/lib/containers/storage/overlay-containers/54af/userdata/shm",
        "mounts": ["/var/lib/containers/storage/overlay-containers/54af/userdata/shm"],
        "conmonPidFile": "/run/containers/storage/overlay-containers/54af/userdata/conmon.pid",
        "pid_file": "/run/containers/storage/overlay-containers/54af/userdata/pidfile",
        "staticDir": "/var/lib/containers/storage/overlay-containers/54af/userdata",
        "idMappingsOptions": {"HostUIDMapping": true, "HostGIDMapping": true},
        "cgroupParent": "/libpod_parent", "runtime": "runc", "stopSignal": 15}"#;
    /// `spec.dump` of a Podman container in a network namespace of its own path.
    pub(crate) const PODMAN_SPEC: &str = r#"{
        "ociVersion": "1.0.2-dev", "process": {"args": ["/bin/sh"], "env": ["PATH=/bin"]},
        "root": {"path": "/var/lib/containers/storage/overlay/x/merged"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/cni-1"}],
                  "cgroupsPath": "/libpod_parent/libpod-54af"},
        "annotations": {"io.container.manager": "libpod", "org.criu.config": "/etc/evil.conf"}}"#;
    pub(crate) const PODMAN_NETWORK: &str = r#"{"podman": {"interfaces": {"eth0": {
        "subnets": [{"ipnet": "10.88.0.5/16", "gateway": "10.88.0.1"}], "mac_address": "0a:58:0a:58:00:05"}}}}"#;
    /// `config.dump` as CRI-O writes it for the kubelet.
    pub(crate) const CRIO_CONFIG: &str = r#"{
        "id": "6b2c5e1f0b0e4f6a9d7c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e", "name": "k8s_counter_counters_default_2f1c_0",
        "rootfsImage": "busybox", "rootfsImageRef": "3f57d9401f8d42f986df300f0c69192fc41da28ccc8d797829467780db3dd741",
        "rootfsImageName": "docker.io/library/busybox:latest", "runtime": "runc",
        "createdTime": "2026-12-06T20:00:00Z", "checkpointedTime": "2026-12-06T21:00:00Z",
        "restoredTime": "0001-01-01T00:00:00Z", "restored": false}"#;
    /// Its `spec.dump`: the spec with CRI-O's annotations.
    pub(crate) const CRIO_SPEC: &str = r#"{
        "ociVersion": "1.0.2-dev", "process": {"args": ["/bin/sh", "-c", "count"]},
        "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/7d6c"}]},
        "annotations": {"io.container.manager": "cri-o", "io.kubernetes.container.name": "counter",
          "io.kubernetes.pod.name": "counters", "io.kubernetes.pod.namespace": "default",
          "io.kubernetes.cri-o.IP.0": "10.85.0.12",
          "io.kubernetes.cri-o.Labels": "{\"io.kubernetes.container.name\":\"counter\",\"io.kubernetes.pod.name\":\"counters\"}",
          "io.kubernetes.cri-o.Metadata": "{\"name\":\"counter\"}"}}"#;
}

#[cfg(test)]
mod tests {
    use super::samples::*;
    use super::*;

    #[test]
    fn a_podman_export_maps_to_a_podman_record() {
        let (r, engine) = record_from_dumps(
            PODMAN_CONFIG.as_bytes(),
            PODMAN_SPEC.as_bytes(),
            Some(PODMAN_NETWORK.as_bytes()),
        )
        .expect("maps");
        assert_eq!(engine, Engine::Podman);
        assert_eq!((r.kind.as_str(), r.name.as_str()), ("podman", "web"));
        assert_eq!(r.image.as_deref(), Some("localhost/ferry-lab/busybox:latest"));
        assert_eq!(r.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(r.rootfs, RootfsRecord::Image);
        let net = r.network.clone().expect("a network");
        assert!(net.external);
        assert_eq!(net.ip, Some(Ipv4Addr::new(10, 88, 0, 5)));
        assert_eq!(net.mac.as_deref(), Some("0a:58:0a:58:00:05"));
        assert!(!r.annotations().contains_key("org.criu.config"), "the archive's CRIU config is dropped");
        assert_eq!(r.runtime["config_dump"]["ShmDir"], PODMAN_CONFIG_SHM);
        // And back: Podman's own config, without the old host's paths.
        let c = config_dump(&r, None).expect("config");
        assert_eq!(c["id"], r.id);
        assert_eq!(c["cgroupParent"], "/libpod_parent");
        for gone in HOST_FIELDS {
            assert!(c.get(*gone).is_none(), "{gone}");
        }
    }

    const PODMAN_CONFIG_SHM: &str = "/var/lib/containers/storage/overlay-containers/54af/userdata/shm";

    #[test]
    fn a_kubelet_archive_maps_to_a_podman_record() {
        let (r, engine) =
            record_from_dumps(CRIO_CONFIG.as_bytes(), CRIO_SPEC.as_bytes(), None).expect("maps");
        assert_eq!(engine, Engine::CriO);
        assert_eq!((r.kind.as_str(), r.name.as_str()), ("podman", "counter"));
        assert_eq!(r.id.len(), 64);
        assert_eq!(r.image.as_deref(), Some("docker.io/library/busybox:latest"));
        assert_eq!(r.labels["io.kubernetes.pod.name"], "counters");
        assert_eq!(r.network.as_ref().and_then(|n| n.ip), Some(Ipv4Addr::new(10, 85, 0, 12)));
        let made = &r.runtime["config_dump"];
        assert_eq!(made["name"], "counter");
        assert_eq!(made["rootfsImageID"], "3f57d9401f8d42f986df300f0c69192fc41da28ccc8d797829467780db3dd741");
        assert_eq!(made["command"][0], "/bin/sh");
        assert_eq!(r.runtime["cri_o"]["config_dump"]["rootfsImage"], "busybox");
        // Exported again for Podman: the made config.
        assert_eq!(config_dump(&r, None).expect("config")["name"], "counter");
    }

    #[test]
    fn records_of_other_kinds_get_a_minimal_config() {
        let mut r = super::super::record::tests_support::sample();
        r.spec["linux"] = json!({"cgroupsPath": "/ferry-runc/1a2b3c4d/web"});
        r.spec["process"] = json!({"args": ["/bin/sh", "-c", "x"]});
        r.spec["annotations"] = json!({"org.criu.config": "/var/lib/ferry/x/criu.conf", "a": "b"});
        let err = config_dump(&r, None).expect_err("runc has no image");
        assert!(err.to_string().contains("--rootfs-image"), "{err}");
        let c = config_dump(&r, Some("localhost/busybox:latest")).expect("config");
        assert_eq!(c["rootfsImageName"], "localhost/busybox:latest");
        assert_eq!(c["runtime"], "runc");
        assert_eq!(c["cgroupParent"], "/ferry-runc/1a2b3c4d");
        assert_eq!(c["command"][2], "x");
        let id = c["id"].as_str().expect("id");
        assert_eq!(id.len(), 64);
        assert_eq!(config_dump(&r, Some("i")).expect("again")["id"], id, "stable");
        let spec = spec_dump(&r);
        assert!(spec["annotations"].get("org.criu.config").is_none());
        assert_eq!(spec["annotations"]["a"], "b");
    }

    #[test]
    fn hostile_dumps_are_refused() {
        let cases: Vec<(String, String, Option<&str>, &str)> = vec![
            ("{not json".into(), PODMAN_SPEC.into(), None, "config.dump"),
            ("[1]".into(), PODMAN_SPEC.into(), None, "not a JSON object"),
            (PODMAN_CONFIG.into(), "\"x\"".into(), None, "spec.dump"),
            (r#"{"name": "web"}"#.into(), PODMAN_SPEC.into(), None, "'id' is missing"),
            (r#"{"id": 5, "name": "web"}"#.into(), PODMAN_SPEC.into(), None, "not a string"),
            (r#"{"id": "abc", "name": "../../etc"}"#.into(), PODMAN_SPEC.into(), None, "name"),
            (r#"{"id": "abc", "name": "web", "labels": [1]}"#.into(), PODMAN_SPEC.into(), None, "labels"),
            (
                r#"{"id": "abc", "name": "web", "labels": {"a": 1}}"#.into(),
                PODMAN_SPEC.into(),
                None,
                "labels",
            ),
            (PODMAN_CONFIG.into(), PODMAN_SPEC.into(), Some("{bad"), "network.status"),
            (
                PODMAN_CONFIG.into(),
                PODMAN_SPEC.into(),
                Some(
                    r#"{"n": {"interfaces": {"e": {"subnets": [{"ipnet": "1.2.3.4/8"}], "mac_address": "zz"}}}}"#,
                ),
                "MAC",
            ),
            (
                CRIO_CONFIG.into(),
                CRIO_SPEC.replace(r#"{\"io.kubernetes"#, r#"[\"io.kubernetes"#),
                None,
                "Labels",
            ),
            (" ".repeat(MAX_DUMP + 1), PODMAN_SPEC.into(), None, "larger"),
        ];
        for (config, spec, net, why) in cases {
            let err =
                record_from_dumps(config.as_bytes(), spec.as_bytes(), net.map(str::as_bytes)).expect_err(why);
            assert!(matches!(err, Error::BadContainerRecord(_)), "{err}");
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn image_annotations_are_podmans_checkpointctls_and_crios() {
        let (r, _) = record_from_dumps(PODMAN_CONFIG.as_bytes(), PODMAN_SPEC.as_bytes(), None).expect("maps");
        let c = config_dump(&r, None).expect("config");
        let a =
            image_annotations(&r, &c, &ImageFacts { checkpoint: "ck", criu_version: "4.2.1", kernel: "6.1" });
        assert_eq!(a["io.podman.annotations.checkpoint.name"], "web");
        assert_eq!(a["io.podman.annotations.checkpoint.runtime.name"], "runc");
        assert_eq!(a["io.podman.annotations.checkpoint.criu.version"], "40201");
        assert_eq!(
            a["io.podman.annotations.checkpoint.rootfsImageName"],
            "localhost/ferry-lab/busybox:latest"
        );
        assert_eq!(a["org.criu.checkpoint.container.name"], "web");
        assert_eq!(a["io.kubernetes.cri-o.annotations.checkpoint.name"], "web");
        assert_eq!(a["io.ferry.checkpoint.name"], "ck");
        assert_eq!(criu_version_number("4.2"), Some(40200));
        assert_eq!(criu_version_number("x"), None);
    }
}
