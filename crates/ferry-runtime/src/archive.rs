//! `ferry export` and `ferry import`, with containers: the store's archive (`ferry_store::
//! archive`) laid out as Podman and CRI-O lay out their checkpoint archives, and their
//! archives taken in.
//!
//! Export of a container's checkpoint, in the clear (`--plaintext`, or an OCI image): Podman's
//! `config.dump` (a Podman container's own; a minimal one made from the record for other
//! kinds) and `spec.dump` at the top, CRIU's images and runc's `descriptors.json` under
//! `checkpoint/`, `rootfs-diff.tar` and `deleted.files` at the top, and ferry's own record
//! under `ferry/`, beside the signed manifest. `podman container restore --import` restores
//! it. Encrypted exports are unchanged: nothing in them is plaintext.
//!
//! Import of Podman's and the kubelet's (CRI-O's) archives: the container's record is made
//! from `config.dump` and `spec.dump` ([`crate::container::formats`]) and written beside the
//! images, the root file system changes are checked (no path leaves the root, no devices),
//! all before anything is sealed into the store; a refusal leaves nothing.

use std::cell::RefCell;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_store::archive::{
    self, ArchiveMeta, ExportLayout, ExportMode, ExportReport, HookError, ImportHook, Layout, Origin,
    MAX_METADATA_FILE,
};
use ferry_store::manifest::ManifestBody;
use ferry_store::{Committed, Progress, Store, StoreError};

use crate::container::formats::{self, ImageFacts, CONFIG_DUMP, NETWORK_STATUS, SPEC_DUMP};
use crate::container::record::{DELETED_FILES_FILE, RECORD_FILE, ROOTFS_DIFF_FILE};
use crate::container::{rootfs, ContainerRecord, KIND_NAMES};
use crate::Error;

/// How to export.
#[derive(Debug, Clone)]
pub struct ExportRequest<'a> {
    pub name: &'a str,
    pub out: &'a Path,
    pub mode: ExportMode,
    /// For a container whose record names no image Podman has (runc's), the Podman image
    /// holding its root file system, for `config.dump`.
    pub rootfs_image: Option<&'a str>,
    /// Where the bytes written are reported.
    pub progress: &'a dyn Progress,
}

/// Writes checkpoint `req.name` as an archive (or OCI image); a container's in the layout
/// Podman restores.
pub fn export(store: &Store, req: &ExportRequest<'_>) -> Result<ExportReport, Error> {
    if matches!(req.mode, ExportMode::OciImage { .. }) {
        let c = store.get(req.name)?;
        if !is_container_source(&c.manifest.source) {
            return Err(Error::Usage(format!(
                "an OCI checkpoint image holds a container, and {} is a checkpoint of {}",
                req.name, c.manifest.source
            )));
        }
    }
    let layout = ContainerLayout { rootfs_image: req.rootfs_image, failure: RefCell::new(None) };
    let result = archive::export_with(store, req.name, req.out, req.mode.clone(), &layout, req.progress);
    match (result, layout.failure.into_inner()) {
        (Err(_), Some(e)) => Err(e),
        (r, _) => Ok(r?),
    }
}

/// Imports a ferry archive, or a container checkpoint archive of Podman or the kubelet; the
/// bytes read of it are reported to `progress`.
pub fn import(
    store: &Store,
    file: &Path,
    name: Option<&str>,
    progress: &dyn Progress,
) -> Result<Committed, Error> {
    Ok(archive::import_with(store, file, name, &ContainerImport { now: unix_now() }, progress)?)
}

/// The default name of `podman container checkpoint --create-image`'s counterpart: the
/// checkpoint's name as an image reference (`localhost/ferry/NAME:latest`).
pub fn default_image_reference(checkpoint: &str) -> String {
    let mut repo = String::with_capacity(checkpoint.len());
    for c in checkpoint.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            repo.push(c);
        } else if !repo.ends_with('-') && !repo.is_empty() {
            repo.push('-');
        }
    }
    let repo = repo.trim_end_matches('-');
    format!("localhost/ferry/{}:latest", if repo.is_empty() { "checkpoint" } else { repo })
}

fn is_container_source(source: &str) -> bool {
    source.split_once(':').is_some_and(|(kind, _)| KIND_NAMES.contains(&kind))
}

/// Lays out a container's checkpoint as Podman does; a process tree's as before.
struct ContainerLayout<'a> {
    rootfs_image: Option<&'a str>,
    /// The error that made [`ExportLayout::layout`] fail, as ferry-runtime says it.
    failure: RefCell<Option<Error>>,
}

impl ContainerLayout<'_> {
    fn fail(&self, m: &ManifestBody, e: Error) -> StoreError {
        let detail = e.to_string();
        *self.failure.borrow_mut() = Some(e);
        StoreError::Damaged { name: m.name.clone(), file: RECORD_FILE.into(), detail }
    }
}

impl ExportLayout for ContainerLayout<'_> {
    fn layout(&self, images: &Path, m: &ManifestBody) -> Result<Layout, StoreError> {
        let record = match ContainerRecord::read_from(images) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(Layout::default()),
            Err(e) => return Err(self.fail(m, e)),
        };
        let config = formats::config_dump(&record, self.rootfs_image).map_err(|e| self.fail(m, e))?;
        let spec = formats::spec_dump(&record);
        let mut metadata = Vec::new();
        for (file, doc) in [(CONFIG_DUMP, &config), (SPEC_DUMP, &spec)] {
            let bytes = serde_json::to_vec(doc).map_err(|e| self.fail(m, Error::Internal(e.to_string())))?;
            if bytes.len() as u64 > MAX_METADATA_FILE {
                let e = Error::Container(format!(
                    "its {file} would be {} bytes, more than the {MAX_METADATA_FILE} Podman's archives carry",
                    bytes.len()
                ));
                return Err(self.fail(m, e));
            }
            metadata.push((file.to_owned(), bytes));
        }
        let has = |f: &str| m.files.iter().any(|x| x.name == f);
        let facts =
            ImageFacts { checkpoint: &m.name, criu_version: &m.host.criu_version, kernel: &m.host.kernel };
        Ok(Layout {
            metadata,
            top: [ROOTFS_DIFF_FILE, DELETED_FILES_FILE]
                .into_iter()
                .filter(|f| has(f))
                .map(str::to_owned)
                .collect(),
            own: vec![RECORD_FILE.to_owned()],
            annotations: formats::image_annotations(&record, &config, &facts),
        })
    }
}

/// Checks what a container's archive carries, and makes its record from Podman's or CRI-O's
/// metadata.
struct ContainerImport {
    now: u64,
}

impl ImportHook for ContainerImport {
    fn default_name(&self, meta: &ArchiveMeta) -> Option<String> {
        let config = meta.files.get(CONFIG_DUMP)?;
        let spec = meta.files.get(SPEC_DUMP).map(Vec::as_slice).unwrap_or_default();
        // An archive whose metadata does not map still gets a name: `finish` then refuses it
        // with the reason.
        let stem = match formats::record_from_dumps(config, spec, None) {
            Ok((r, _)) => format!("{}-{}", r.kind, r.name.chars().take(96).collect::<String>()),
            Err(_) => "import".to_owned(),
        };
        Some(format!("{stem}-{}", self.now))
    }

    fn finish(&self, images: &Path, meta: &ArchiveMeta, verified: bool) -> Result<Option<Origin>, HookError> {
        let refuse = |entry: &str, e: Error| HookError {
            entry: entry.to_owned(),
            detail: match e {
                Error::BadContainerRecord(d) => d,
                other => other.to_string(),
            },
        };
        let diff = images.join(ROOTFS_DIFF_FILE);
        let deleted = images.join(DELETED_FILES_FILE);
        if diff.exists() {
            rootfs::check_diff(&diff).map_err(|e| refuse(ROOTFS_DIFF_FILE, e))?;
        }
        if deleted.exists() {
            rootfs::read_deleted(&deleted).map_err(|e| refuse(DELETED_FILES_FILE, e))?;
        }
        let own = format!("ferry/{RECORD_FILE}");
        let record = match ContainerRecord::read_from(images).map_err(|e| refuse(&own, e))? {
            Some(r) => r,
            None if verified => return Ok(None),
            None => {
                let Some(config) = meta.files.get(CONFIG_DUMP) else {
                    if diff.exists() || deleted.exists() {
                        return Err(refuse(
                            ROOTFS_DIFF_FILE,
                            Error::BadContainerRecord(
                                "root file system changes, but no config.dump and spec.dump say whose".into(),
                            ),
                        ));
                    }
                    return Ok(None);
                };
                let spec = meta.files.get(SPEC_DUMP).ok_or_else(|| {
                    refuse(SPEC_DUMP, Error::BadContainerRecord("config.dump without spec.dump".into()))
                })?;
                let network = meta.files.get(NETWORK_STATUS).map(Vec::as_slice);
                let (record, engine) = formats::record_from_dumps(config, spec, network).map_err(|e| {
                    let entry = [CONFIG_DUMP, SPEC_DUMP, NETWORK_STATUS]
                        .into_iter()
                        .find(|f| e.to_string().contains(f))
                        .unwrap_or(CONFIG_DUMP);
                    refuse(entry, e)
                })?;
                record.write_to(images).map_err(|e| refuse(CONFIG_DUMP, e))?;
                tracing::info!(archive = %meta.archive, engine = engine.name(), container = %record.workload(), "a container checkpoint archive");
                record
            }
        };
        let summary = serde_json::json!({
            "kind": record.kind,
            "id": record.id,
            "name": record.name,
            "image": record.image,
            "pid": null,
            "ip": record.network.as_ref().and_then(|n| n.ip),
            "archive": meta.archive,
        });
        Ok(Some(Origin { source: record.workload(), spec: summary.to_string() }))
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_are_made_from_checkpoint_names() {
        assert_eq!(
            default_image_reference("runc-web-1796591894"),
            "localhost/ferry/runc-web-1796591894:latest"
        );
        assert_eq!(default_image_reference("Web_1..x"), "localhost/ferry/web-1-x:latest");
        assert_eq!(default_image_reference("-"), "localhost/ferry/checkpoint:latest");
    }

    #[test]
    fn container_sources_are_told_from_processes() {
        assert!(is_container_source("podman:web"));
        assert!(is_container_source("runc:c1"));
        assert!(!is_container_source("pid:1234"));
        assert!(!is_container_source("archive:x.tar"));
    }
}
