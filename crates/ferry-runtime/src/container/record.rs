//! `ferry-container.json`: what a checkpoint of a container records about it, beside CRIU's
//! images, so that another host can recreate it under the same runtime.
//!
//! The file comes out of a checkpoint, which may come from an archive: it is read as hostile.
//! Its size is capped before it is parsed, its version checked, and every name and path in it
//! is validated before anything uses it (a name reaches a runtime's API, a path a mount).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

/// File name of the record in a checkpoint's images.
pub const RECORD_FILE: &str = "ferry-container.json";
/// runc's list of the init process's standard descriptors, read by `runc restore`.
pub const DESCRIPTORS_FILE: &str = "descriptors.json";
/// The container's root filesystem changes (Podman's names, so that its archives map 1:1).
pub const ROOTFS_DIFF_FILE: &str = "rootfs-diff.tar";
pub const DELETED_FILES_FILE: &str = "deleted.files";

/// Version of the record's layout.
pub const RECORD_VERSION: u32 = 1;
/// Largest record file (an OCI spec is a few KiB; Podman's config a few more).
pub const MAX_RECORD: u64 = 4 << 20;
const MAX_NAME: usize = 253;
const MAX_LABELS: usize = 1024;
const MAX_LABEL: usize = 64 << 10;
const MAX_LOWER: usize = 128;
const MAX_PATH: usize = 4096;

/// A container as its runtime knew it at the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub version: u32,
    /// `runc`, `podman`, `containerd`, `docker`.
    pub kind: String,
    /// The runtime's id of the container (containerd: `NAMESPACE/ID`).
    pub id: String,
    /// Its name (the id where the runtime has no names).
    pub name: String,
    /// The image it was created from, as the runtime names it (none for runc).
    #[serde(default)]
    pub image: Option<String>,
    /// The OCI runtime spec (`config.json`) the container ran with: process, env, mounts,
    /// cgroup limits, namespaces, annotations.
    pub spec: serde_json::Value,
    /// How its root filesystem is made.
    pub rootfs: RootfsRecord,
    /// Its labels (the runtime's labels; the spec's annotations for runc, which has none).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its own network namespace, when it has one that is not the host's.
    #[serde(default)]
    pub network: Option<NetworkRecord>,
    /// The runtime's own description of the container (Podman's config, Docker's create body,
    /// containerd's container record), for the runtime's module alone.
    #[serde(default)]
    pub runtime: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootfsRecord {
    /// An overlay: read-only layers that must exist on the target (the image), and the
    /// changes made since the container started, which travel in the checkpoint.
    Overlay { lower: Vec<String> },
    /// A plain directory, used in place: it must exist on the target with the same content.
    Directory { path: String },
    /// Made by the runtime from its image (Podman, Docker, containerd): the changes travel.
    Image,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The namespace had a path of its own (e.g. made by ferry's lab): it stays behind and the
    /// target provides one (CRIU's external `extRootNetNS`).
    pub external: bool,
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<String>,
}

impl ContainerRecord {
    /// Reads and validates the record in `images`, if the checkpoint is of a container.
    pub fn read_from(images: &Path) -> Result<Option<ContainerRecord>, Error> {
        let path = images.join(RECORD_FILE);
        let bytes = match read_capped(&path, MAX_RECORD) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad(format!("cannot read {}: {e}", path.display()))),
        };
        Self::parse(&bytes).map(Some)
    }

    /// Parses and validates a record.
    pub fn parse(bytes: &[u8]) -> Result<ContainerRecord, Error> {
        if bytes.len() as u64 > MAX_RECORD {
            return Err(bad(format!("{RECORD_FILE} is larger than {MAX_RECORD} bytes")));
        }
        let r: ContainerRecord =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("{RECORD_FILE}: {e}")))?;
        r.validate()?;
        Ok(r)
    }

    /// Writes the record into `images`.
    pub fn write_to(&self, images: &Path) -> Result<(), Error> {
        self.validate()?;
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::Internal(e.to_string()))?;
        let path = images.join(RECORD_FILE);
        std::fs::write(&path, bytes)
            .map_err(|e| Error::Container(format!("cannot write {}: {e}", path.display())))
    }

    pub fn validate(&self) -> Result<(), Error> {
        if self.version != RECORD_VERSION {
            return Err(bad(format!(
                "record version {} is not {RECORD_VERSION}: written by another ferry version",
                self.version
            )));
        }
        if !super::KIND_NAMES.contains(&self.kind.as_str()) {
            return Err(bad(format!("unknown container kind '{}'", trunc(&self.kind))));
        }
        validate_name("id", &self.id, true)?;
        validate_name("name", &self.name, false)?;
        if let Some(image) = &self.image {
            if image.is_empty() || image.len() > MAX_PATH || image.chars().any(char::is_control) {
                return Err(bad("the image reference is empty, too long or has control characters".into()));
            }
        }
        if !self.spec.is_object() {
            return Err(bad("the OCI spec is not a JSON object".into()));
        }
        match &self.rootfs {
            RootfsRecord::Overlay { lower } => {
                if lower.is_empty() || lower.len() > MAX_LOWER {
                    return Err(bad("an overlay root needs 1 to 128 lower directories".into()));
                }
                for l in lower {
                    validate_host_path("lower directory", l)?;
                }
            }
            RootfsRecord::Directory { path } => validate_host_path("root directory", path)?,
            RootfsRecord::Image => {}
        }
        if self.labels.len() > MAX_LABELS {
            return Err(bad(format!("more than {MAX_LABELS} labels")));
        }
        if self.labels.iter().any(|(k, v)| k.is_empty() || k.len() + v.len() > MAX_LABEL) {
            return Err(bad("a label is empty or too long".into()));
        }
        if let Some(mac) = self.network.as_ref().and_then(|n| n.mac.as_deref()) {
            let ok = mac.len() == 17
                && mac.split(':').count() == 6
                && mac.split(':').all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
            if !ok {
                return Err(bad(format!("'{}' is not a MAC address", trunc(mac))));
            }
        }
        Ok(())
    }

    /// `KIND:NAME`, how the user names the container.
    pub fn workload(&self) -> String {
        // An id with a namespace (containerd's `NS/ID`) keeps it, unless it is the default one.
        match self.id.split_once('/') {
            Some((ns, _)) if ns != "default" => format!("{}:{ns}/{}", self.kind, self.name),
            _ => format!("{}:{}", self.kind, self.name),
        }
    }

    /// The spec's annotations.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        self.spec
            .get("annotations")
            .and_then(|a| a.as_object())
            .map(|a| a.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
            .unwrap_or_default()
    }

    /// The host paths of the spec's bind mounts (they must exist on the target).
    pub fn bind_sources(&self) -> Vec<(String, String)> {
        let Some(mounts) = self.spec.get("mounts").and_then(|m| m.as_array()) else { return Vec::new() };
        mounts
            .iter()
            .filter(|m| {
                let is_bind_type = m.get("type").and_then(|t| t.as_str()) == Some("bind");
                let has_bind_opt = m
                    .get("options")
                    .and_then(|o| o.as_array())
                    .is_some_and(|o| o.iter().any(|x| matches!(x.as_str(), Some("bind" | "rbind"))));
                is_bind_type || has_bind_opt
            })
            .filter_map(|m| {
                Some((m.get("source")?.as_str()?.to_owned(), m.get("destination")?.as_str()?.to_owned()))
            })
            .collect()
    }
}

/// A container name or id as runtimes accept them (and as safe in paths and commands).
pub fn validate_name(what: &str, s: &str, allow_slash: bool) -> Result<(), Error> {
    let ok_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || (allow_slash && c == '/');
    if s.is_empty() || s.len() > MAX_NAME || !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(bad(format!("container {what} '{}' is empty, too long or starts oddly", trunc(s))));
    }
    if !s.chars().all(ok_char) || s.contains("..") || s.ends_with('/') || s.matches('/').count() > 1 {
        return Err(bad(format!("container {what} '{}' has characters runtimes do not accept", trunc(s))));
    }
    Ok(())
}

/// An absolute, normalized host path without `..`, whitespace or control characters.
pub fn validate_host_path(what: &str, p: &str) -> Result<(), Error> {
    let ok = p.starts_with('/')
        && p.len() <= MAX_PATH
        && !p.chars().any(|c| c.is_control() || c.is_whitespace() || matches!(c, ',' | ':' | '"' | '\''))
        && !p.split('/').any(|c| c == ".." || c == ".");
    if !ok {
        return Err(bad(format!("{what} '{}' is not a plain absolute path", trunc(p))));
    }
    Ok(())
}

fn bad(detail: String) -> Error {
    Error::BadContainerRecord(detail)
}

fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Reads a file of at most `cap` bytes.
pub(crate) fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    f.take(cap + 1).read_to_end(&mut out)?;
    if out.len() as u64 > cap {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("larger than {cap} bytes")));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub(crate) fn sample() -> ContainerRecord {
        ContainerRecord {
            version: RECORD_VERSION,
            kind: "runc".into(),
            id: "web".into(),
            name: "web".into(),
            image: None,
            spec: serde_json::json!({
                "ociVersion": "1.0.2",
                "annotations": {"a": "b"},
                "mounts": [
                    {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind"]},
                    {"destination": "/proc", "type": "proc", "source": "proc"}
                ]
            }),
            rootfs: RootfsRecord::Overlay { lower: vec!["/var/lib/images/busybox".into()] },
            labels: BTreeMap::new(),
            network: Some(NetworkRecord {
                external: true,
                ip: Some(Ipv4Addr::new(198, 18, 0, 5)),
                mac: Some("02:c6:12:00:00:05".into()),
            }),
            runtime: serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::sample;
    use super::*;

    #[test]
    fn round_trips_and_reads_binds() {
        let r = sample();
        let bytes = serde_json::to_vec(&r).expect("encode");
        assert_eq!(ContainerRecord::parse(&bytes).expect("parse"), r);
        assert_eq!(r.bind_sources(), vec![("/srv/data".to_owned(), "/data".to_owned())]);
        assert_eq!(r.annotations().get("a").map(String::as_str), Some("b"));
        assert_eq!(r.workload(), "runc:web");
        let ns =
            |id: &str| ContainerRecord { kind: "containerd".into(), id: id.into(), ..sample() }.workload();
        assert_eq!(ns("prod/web"), "containerd:prod/web");
        assert_eq!(ns("default/web"), "containerd:web");
    }

    #[test]
    fn refuses_hostile_records() {
        let mut cases = Vec::new();
        let mut r = sample();
        r.version = 2;
        cases.push(r);
        let mut r = sample();
        r.kind = "lxc".into();
        cases.push(r);
        for name in ["../x", "-rf", "a b", "a;b", "", "a/b/c"] {
            let mut r = sample();
            r.name = name.into();
            cases.push(r);
        }
        for lower in ["relative", "/a/../etc", "/a b", "/a,upperdir=/x", "/a:b"] {
            let mut r = sample();
            r.rootfs = RootfsRecord::Overlay { lower: vec![lower.into()] };
            cases.push(r);
        }
        let mut r = sample();
        r.spec = serde_json::json!([1, 2]);
        cases.push(r);
        let mut r = sample();
        r.network.as_mut().expect("net").mac = Some("zz:zz".into());
        cases.push(r);
        for r in cases {
            let bytes = serde_json::to_vec(&r).expect("encode");
            assert!(matches!(ContainerRecord::parse(&bytes), Err(Error::BadContainerRecord(_))), "{r:?}");
        }
        assert!(ContainerRecord::parse(b"{not json").is_err());
        assert!(ContainerRecord::parse(&vec![b' '; (MAX_RECORD + 1) as usize]).is_err());
    }

    #[test]
    fn containerd_ids_keep_their_namespace() {
        assert!(validate_name("id", "default/web", true).is_ok());
        assert!(validate_name("name", "default/web", false).is_err());
    }
}
