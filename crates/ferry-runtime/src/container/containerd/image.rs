//! Images: made from a root filesystem directory (ferry's lab has no registry) as a one-layer
//! OCI image and imported through the API as `ctr images import` + unpack would: the blobs
//! through `content.Write` under a lease, `images.Create`, then the layer unpacked into a
//! committed snapshot named by its chain id (`snapshots.Prepare`, `diff.Apply`,
//! `snapshots.Commit`). And read back: an image's config and the chain id of its layers.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::CommitSnapshotRequest;
use containerd_client::services::v1::{
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient,
    leases_client::LeasesClient, ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, GetImageRequest, Image, InfoRequest, ReadContentRequest,
    UpdateImageRequest, UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::{Code, Status};
use containerd_client::types::Descriptor;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::api::{not_found, req, Api, CALL_LIMIT, SNAPSHOTTER};
use super::io_err;
use crate::Error;

const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Largest manifest, index or config read.
const MAX_JSON_BLOB: usize = 4 << 20;
/// Bytes per `content.Write` message.
const CHUNK: usize = 1 << 20;
/// Time limit of an import (a layer of hundreds of MiB through the API).
const IMPORT_LIMIT: Duration = Duration::from_secs(600);

/// What a new container takes from its image's config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
}

/// An image found in a namespace.
#[derive(Debug, Clone)]
pub(super) struct Resolved {
    /// Its name as containerd lists it.
    pub name: String,
    pub config: ImageConfig,
    /// The chain id of its layers: the parent of its containers' snapshots.
    pub chain_id: String,
}

#[derive(Debug, Deserialize)]
struct DescriptorJson {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: i64,
    #[serde(default)]
    platform: Option<PlatformJson>,
}

#[derive(Debug, Deserialize)]
struct PlatformJson {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Deserialize)]
struct IndexJson {
    manifests: Vec<DescriptorJson>,
}

#[derive(Debug, Deserialize)]
struct ManifestJson {
    config: DescriptorJson,
    #[serde(default)]
    layers: Vec<DescriptorJson>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigJson {
    #[serde(default)]
    config: Option<ContainerConfigJson>,
    rootfs: RootfsJson,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfigJson {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: String,
}

#[derive(Debug, Default, Deserialize)]
struct RootfsJson {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// A reference as containerd's clients normalize it: `busybox` is
/// `docker.io/library/busybox:latest`, `ferry-lab/busybox` is `docker.io/ferry-lab/busybox:latest`.
pub(super) fn normalize(name: &str) -> Result<String, Error> {
    let bad = || Error::Container(format!("'{}' is not an image reference", super::trunc(name)));
    if name.is_empty()
        || name.len() > 255
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'))
        || name.starts_with(['/', ':', '@', '.', '-'])
        || name.contains("//")
    {
        return Err(bad());
    }
    let (first, rest) = name.split_once('/').unwrap_or(("", name));
    let is_domain = !first.is_empty() && (first.contains(['.', ':']) || first == "localhost");
    let mut out = match (first.is_empty(), is_domain) {
        (true, _) => format!("docker.io/library/{rest}"),
        (false, true) => name.to_owned(),
        (false, false) => format!("docker.io/{name}"),
    };
    let last = out.rsplit('/').next().unwrap_or("");
    if !last.contains([':', '@']) {
        out.push_str(":latest");
    }
    Ok(out)
}

/// Image `name` in namespace `ns` (as given, or normalized): its config and chain id.
/// Image `name` in namespace `ns` (as given, or normalized), if it is there.
pub(super) fn find(api: &Api, ns: &str, name: &str) -> Result<Option<Image>, Error> {
    for candidate in [Some(name.to_owned()), normalize(name).ok()].into_iter().flatten() {
        let r = req(ns, None, GetImageRequest { name: candidate.clone() })
            .map_err(|s| api.error("images.Get", &s))?;
        match api.call("images.Get", CALL_LIMIT, |ch| async move { ImagesClient::new(ch).get(r).await }) {
            Ok(found) => return Ok(found.image),
            Err(s) if not_found(&s) => continue,
            Err(s) => return Err(api.error("images.Get", &s)),
        }
    }
    Ok(None)
}

/// Image `name` in namespace `ns`: its config and chain id.
pub(super) fn resolve(api: &Api, ns: &str, name: &str) -> Result<Resolved, Error> {
    let image = find(api, ns, name)?.ok_or_else(|| {
        Error::Container(format!(
            "containerd has no image {name} in namespace {ns}: import it first (ferry's lab does it with `lab exec --runtime containerd`)"
        ))
    })?;
    let mut target =
        image.target.ok_or_else(|| Error::Container(format!("image {} has no target", image.name)))?;
    if target.media_type == MEDIA_INDEX || target.media_type == DOCKER_LIST {
        let index: IndexJson = read_json(api, ns, &target.digest)?;
        let arch = go_arch();
        let m = index
            .manifests
            .iter()
            .find(|m| m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
            .or_else(|| index.manifests.first())
            .ok_or_else(|| Error::Container(format!("image {} lists no manifest", image.name)))?;
        target =
            Descriptor { media_type: m.media_type.clone(), digest: m.digest.clone(), ..Default::default() };
    }
    if target.media_type != MEDIA_MANIFEST && target.media_type != DOCKER_MANIFEST {
        return Err(Error::Container(format!(
            "image {}: {} is not a manifest ferry reads",
            image.name, target.media_type
        )));
    }
    let manifest: ManifestJson = read_json(api, ns, &target.digest)?;
    let config: ConfigJson = read_json(api, ns, &manifest.config.digest)?;
    let c = config.config.unwrap_or_default();
    Ok(Resolved {
        name: image.name,
        config: ImageConfig {
            env: c.env.unwrap_or_default(),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            working_dir: c.working_dir,
        },
        chain_id: chain_id(&config.rootfs.diff_ids),
    })
}

/// Copies image `name` from namespace `from` into namespace `to`, content and unpacked
/// layers (containerd keeps both per namespace): ferry's lab imports its images into
/// `default`, and a container of another namespace needs its image there.
pub(super) fn copy(api: &Api, from: &str, to: &str, name: &str, tmp: &Path) -> Result<(), Error> {
    let started = std::time::Instant::now();
    let image = find(api, from, name)?
        .ok_or_else(|| Error::Container(format!("containerd has no image {name} in namespace {from}")))?;
    let target = image.target.clone().unwrap_or_default();
    if target.media_type != MEDIA_MANIFEST && target.media_type != DOCKER_MANIFEST {
        return Err(Error::Container(format!(
            "image {} is a {}: ferry copies single manifests between namespaces; import it into {to} (ctr -n {to} images import)",
            image.name, target.media_type
        )));
    }
    let manifest = read_blob(api, from, &target.digest)?;
    let m: ManifestJson = serde_json::from_slice(&manifest)
        .map_err(|e| Error::Container(format!("blob {}: {e}", target.digest)))?;
    let config = read_blob(api, from, &m.config.digest)?;
    let c: ConfigJson = serde_json::from_slice(&config)
        .map_err(|e| Error::Container(format!("blob {}: {e}", m.config.digest)))?;
    if c.rootfs.diff_ids.len() != m.layers.len() {
        return Err(Error::Container(format!(
            "image {}: its config and manifest differ in layers",
            image.name
        )));
    }
    let as_desc = |d: &DescriptorJson| Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: HashMap::new(),
    };
    std::fs::create_dir_all(tmp).map_err(|e| io_err("create", tmp, e))?;
    with_lease(api, to, |lease| {
        for l in &m.layers {
            let path = tmp.join(format!("ferry-copy-{}-{}.blob", std::process::id(), unique()));
            let _remove = RemoveOnDrop(path.clone());
            read_blob_to(api, from, &l.digest, &path)?;
            let file = File::open(&path).map_err(|e| io_err("open", &path, e))?;
            write_blob(api, to, lease, &as_desc(l), file, gc_labels(api, from, &l.digest)?)?;
        }
        let config_desc = as_desc(&m.config);
        write_blob(
            api,
            to,
            lease,
            &config_desc,
            std::io::Cursor::new(config),
            gc_labels(api, from, &m.config.digest)?,
        )?;
        write_blob(
            api,
            to,
            lease,
            &target,
            std::io::Cursor::new(manifest),
            gc_labels(api, from, &target.digest)?,
        )?;
        let copy = Image { name: image.name.clone(), target: Some(target.clone()), ..Default::default() };
        let r = req(to, Some(lease), CreateImageRequest { image: Some(copy), source_date_epoch: None })
            .map_err(|s| api.error("images.Create", &s))?;
        match api.call("images.Create", CALL_LIMIT, |ch| async move { ImagesClient::new(ch).create(r).await })
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(api.error("images.Create", &s)),
        }
        let mut parent = String::new();
        for (i, l) in m.layers.iter().enumerate() {
            let chain = chain_id(&c.rootfs.diff_ids[..=i]);
            unpack(api, to, lease, &as_desc(l), &c.rootfs.diff_ids[i], &parent, &chain)?;
            parent = chain;
        }
        Ok(())
    })?;
    let ms = started.elapsed().as_millis() as u64;
    tracing::info!(image = %image.name, from, to, ms, "copied an image between containerd's namespaces");
    Ok(())
}

/// The garbage collector's labels of a blob (its references to other blobs and snapshots).
fn gc_labels(api: &Api, ns: &str, digest: &str) -> Result<HashMap<String, String>, Error> {
    let r =
        req(ns, None, InfoRequest { digest: digest.into() }).map_err(|s| api.error("content.Info", &s))?;
    let info = api
        .call("content.Info", CALL_LIMIT, |ch| async move { ContentClient::new(ch).info(r).await })
        .map_err(|s| api.error("content.Info", &s))?;
    Ok(info
        .info
        .map(|i| i.labels)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k.starts_with("containerd.io/gc.ref."))
        .collect())
}

/// A blob of the content store into file `path`.
fn read_blob_to(api: &Api, ns: &str, digest: &str, path: &Path) -> Result<(), Error> {
    let mut file = BufWriter::new(File::create(path).map_err(|e| io_err("create", path, e))?);
    let r = req(ns, None, ReadContentRequest { digest: digest.into(), offset: 0, size: 0 })
        .map_err(|s| api.error("content.Read", &s))?;
    let ch = api.channel();
    let file = api
        .block_on("content.Read", IMPORT_LIMIT, async move {
            let mut stream = ContentClient::new(ch).read(r).await?.into_inner();
            while let Some(m) = stream.message().await? {
                file.write_all(&m.data).map_err(|e| Status::internal(e.to_string()))?;
            }
            Ok(file)
        })
        .map_err(|s| api.error("content.Read", &s))?;
    file.into_inner().map(drop).map_err(|e| io_err("write", path, e.into_error()))
}

/// The chain id of layers with these diff ids (the name of their committed snapshot).
pub(super) fn chain_id(diff_ids: &[String]) -> String {
    let mut chain = String::new();
    for d in diff_ids {
        chain = if chain.is_empty() { d.clone() } else { sha256_digest(format!("{chain} {d}").as_bytes()) };
    }
    chain
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Go's name of this machine's architecture (as images record it).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn read_json<T: serde::de::DeserializeOwned>(api: &Api, ns: &str, digest: &str) -> Result<T, Error> {
    let bytes = read_blob(api, ns, digest)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Container(format!("blob {digest}: {e}")))
}

/// A small blob of the content store, whole.
fn read_blob(api: &Api, ns: &str, digest: &str) -> Result<Vec<u8>, Error> {
    let r = req(ns, None, ReadContentRequest { digest: digest.into(), offset: 0, size: 0 })
        .map_err(|s| api.error("content.Read", &s))?;
    let ch = api.channel();
    api.block_on("content.Read", CALL_LIMIT, async move {
        let mut stream = ContentClient::new(ch).read(r).await?.into_inner();
        let mut data = Vec::new();
        while let Some(m) = stream.message().await? {
            data.extend_from_slice(&m.data);
            if data.len() > MAX_JSON_BLOB {
                return Err(Status::out_of_range(format!(
                    "blob {digest} is larger than {MAX_JSON_BLOB} bytes"
                )));
            }
        }
        Ok(data)
    })
    .map_err(|s| api.error("content.Read", &s))
}

/// Makes image `name` from the root filesystem `rootfs` in namespace `ns` and unpacks it; an
/// image already there is pointed at the new content (the same content is not sent again).
pub(super) fn import(api: &Api, ns: &str, rootfs: &Path, name: &str, tmp: &Path) -> Result<(), Error> {
    if !rootfs.is_dir() {
        return Err(Error::Container(format!("{} is not a root filesystem directory", rootfs.display())));
    }
    let name = normalize(name)?;
    let started = std::time::Instant::now();
    std::fs::create_dir_all(tmp).map_err(|e| io_err("create", tmp, e))?;
    let layer_path = tmp.join(format!("ferry-layer-{}-{}.tar", std::process::id(), unique()));
    let _remove = RemoveOnDrop(layer_path.clone());
    let (layer_digest, layer_size) = write_layer(rootfs, &layer_path)?;
    let config = serde_json::json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/"
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        "history": [{ "created_by": format!("ferry: {}", rootfs.display()) }]
    });
    let config = serde_json::to_vec(&config).map_err(|e| Error::Internal(e.to_string()))?;
    let config_desc = desc(MEDIA_CONFIG, sha256_digest(&config), config.len());
    let layer_desc = desc(MEDIA_LAYER, layer_digest.clone(), layer_size as usize);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": config_desc.digest, "size": config_desc.size },
        "layers": [{ "mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer_size }]
    });
    let manifest = serde_json::to_vec(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
    let manifest_desc = desc(MEDIA_MANIFEST, sha256_digest(&manifest), manifest.len());
    let chain = chain_id(std::slice::from_ref(&layer_digest));

    let imported = with_lease(api, ns, |lease| {
        import_in(
            api,
            ns,
            lease,
            &name,
            &layer_path,
            [&layer_desc, &config_desc, &manifest_desc],
            &config,
            &manifest,
            &chain,
        )
    });
    if imported.is_ok() {
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(image = %name, layer_bytes = layer_size, ms, "imported an image into containerd");
    }
    imported
}

#[allow(clippy::too_many_arguments)]
fn import_in(
    api: &Api,
    ns: &str,
    lease: &str,
    name: &str,
    layer_path: &Path,
    [layer, config_desc, manifest_desc]: [&Descriptor; 3],
    config: &[u8],
    manifest: &[u8],
    chain: &str,
) -> Result<(), Error> {
    let gc = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    };
    let file = File::open(layer_path).map_err(|e| io_err("open", layer_path, e))?;
    write_blob(api, ns, lease, layer, file, HashMap::new())?;
    write_blob(
        api,
        ns,
        lease,
        config_desc,
        std::io::Cursor::new(config.to_vec()),
        gc(&[(&format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"), chain)]),
    )?;
    write_blob(
        api,
        ns,
        lease,
        manifest_desc,
        std::io::Cursor::new(manifest.to_vec()),
        gc(&[
            ("containerd.io/gc.ref.content.config", &config_desc.digest),
            ("containerd.io/gc.ref.content.l.0", &layer.digest),
        ]),
    )?;
    let image = Image { name: name.to_owned(), target: Some(manifest_desc.clone()), ..Default::default() };
    let r = req(ns, Some(lease), CreateImageRequest { image: Some(image.clone()), source_date_epoch: None })
        .map_err(|s| api.error("images.Create", &s))?;
    match api.call("images.Create", CALL_LIMIT, |ch| async move { ImagesClient::new(ch).create(r).await }) {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {
            let r = req(
                ns,
                Some(lease),
                UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask { paths: vec!["target".into()] }),
                    source_date_epoch: None,
                },
            )
            .map_err(|s| api.error("images.Update", &s))?;
            api.call("images.Update", CALL_LIMIT, |ch| async move { ImagesClient::new(ch).update(r).await })
                .map_err(|s| api.error("images.Update", &s))?;
        }
        Err(s) => return Err(api.error("images.Create", &s)),
    }
    unpack(api, ns, lease, layer, &layer.digest, "", chain)
}

/// Runs `f` with a lease of namespace `ns`: everything written under it stays until the image
/// refers to it (containerd's garbage collector would take it before).
fn with_lease<T>(api: &Api, ns: &str, f: impl FnOnce(&str) -> Result<T, Error>) -> Result<T, Error> {
    let lease = format!("ferry-{}-{}", std::process::id(), unique());
    let expire = rfc3339(SystemTime::now() + Duration::from_secs(3600));
    let r = req(
        ns,
        None,
        CreateLeaseRequest {
            id: lease.clone(),
            labels: [("containerd.io/gc.expire".to_owned(), expire)].into(),
        },
    )
    .map_err(|s| api.error("leases.Create", &s))?;
    api.call("leases.Create", CALL_LIMIT, |ch| async move { LeasesClient::new(ch).create(r).await })
        .map_err(|s| api.error("leases.Create", &s))?;
    let out = f(&lease);
    let r = req(ns, None, DeleteLeaseRequest { id: lease, sync: false })
        .map_err(|s| api.error("leases.Delete", &s))?;
    if let Err(s) =
        api.call("leases.Delete", CALL_LIMIT, |ch| async move { LeasesClient::new(ch).delete(r).await })
    {
        tracing::warn!(error = %s.message(), "could not end a lease of containerd's (it expires in an hour)");
    }
    out
}

/// Unpacks `layer` (whose uncompressed digest is `diff_id`) over the committed snapshot
/// `parent` into the committed snapshot `chain`, unless that is there.
fn unpack(
    api: &Api,
    ns: &str,
    lease: &str,
    layer: &Descriptor,
    diff_id: &str,
    parent: &str,
    chain: &str,
) -> Result<(), Error> {
    if api.snapshot_parent(ns, SNAPSHOTTER, chain).map_err(|s| api.error("snapshots.Stat", &s))?.is_some() {
        return Ok(());
    }
    let key = format!("ferry-extract-{}-{} {chain}", std::process::id(), unique());
    let mounts =
        api.prepare(ns, Some(lease), &key, parent).map_err(|s| api.error("snapshots.Prepare", &s))?;
    let r = req(
        ns,
        Some(lease),
        ApplyRequest { diff: Some(layer.clone()), mounts, payloads: HashMap::new(), sync_fs: false },
    )
    .map_err(|s| api.error("diff.Apply", &s))?;
    let applied =
        api.call("diff.Apply", IMPORT_LIMIT, |ch| async move { DiffClient::new(ch).apply(r).await });
    let applied = match applied {
        Ok(a) => a.applied.map(|d| d.digest).unwrap_or_default(),
        Err(s) => {
            let _ = api.remove_snapshot(ns, SNAPSHOTTER, &key);
            return Err(api.error("diff.Apply", &s));
        }
    };
    if applied != diff_id {
        let _ = api.remove_snapshot(ns, SNAPSHOTTER, &key);
        return Err(Error::Container(format!(
            "the layer {} unpacked as {applied}, not {diff_id}",
            layer.digest
        )));
    }
    let r = req(
        ns,
        Some(lease),
        CommitSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            name: chain.into(),
            key: key.clone(),
            labels: HashMap::new(),
        },
    )
    .map_err(|s| api.error("snapshots.Commit", &s))?;
    match api.call(
        "snapshots.Commit",
        CALL_LIMIT,
        |ch| async move { SnapshotsClient::new(ch).commit(r).await },
    ) {
        Ok(()) => Ok(()),
        Err(s) => {
            let _ = api.remove_snapshot(ns, SNAPSHOTTER, &key);
            // Another import committed the same layers meanwhile.
            if s.code() == Code::AlreadyExists {
                Ok(())
            } else {
                Err(api.error("snapshots.Commit", &s))
            }
        }
    }
}

fn desc(media_type: &str, digest: String, size: usize) -> Descriptor {
    Descriptor { media_type: media_type.into(), digest, size: size as i64, annotations: HashMap::new() }
}

/// Writes a blob through `content.Write` in chunks, committed with its digest; a blob
/// already there only gets the labels.
fn write_blob(
    api: &Api,
    ns: &str,
    lease: &str,
    d: &Descriptor,
    source: impl Read + Send + 'static,
    labels: HashMap<String, String>,
) -> Result<(), Error> {
    let r = req(ns, Some(lease), InfoRequest { digest: d.digest.clone() })
        .map_err(|s| api.error("content.Info", &s))?;
    match api.call("content.Info", CALL_LIMIT, |ch| async move { ContentClient::new(ch).info(r).await }) {
        Ok(_) => return set_labels(api, ns, &d.digest, labels),
        Err(s) if not_found(&s) => {}
        Err(s) => return Err(api.error("content.Info", &s)),
    }
    let failed = Arc::new(Mutex::new(None));
    let chunks = Chunks {
        source,
        offset: 0,
        done: false,
        r#ref: format!("ferry-{}", d.digest),
        total: d.size,
        expected: d.digest.clone(),
        labels: Some(labels.clone()),
        failed: failed.clone(),
    };
    let r = req(ns, Some(lease), tokio_stream::iter(chunks)).map_err(|s| api.error("content.Write", &s))?;
    let ch = api.channel();
    let written = api.block_on("content.Write", IMPORT_LIMIT, async move {
        let mut answers = ContentClient::new(ch).write(r).await?.into_inner();
        while answers.message().await?.is_some() {}
        Ok(())
    });
    if let Some(e) = failed.lock().ok().and_then(|mut f| f.take()) {
        return Err(Error::Container(format!("cannot read the blob {}: {e}", d.digest)));
    }
    match written {
        Ok(()) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => set_labels(api, ns, &d.digest, labels),
        Err(s) => Err(api.error("content.Write", &s)),
    }
}

fn set_labels(api: &Api, ns: &str, digest: &str, labels: HashMap<String, String>) -> Result<(), Error> {
    if labels.is_empty() {
        return Ok(());
    }
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    let info = containerd_client::services::v1::Info { digest: digest.into(), labels, ..Default::default() };
    let r = req(
        ns,
        None,
        UpdateContentRequest { info: Some(info), update_mask: Some(prost_types::FieldMask { paths }) },
    )
    .map_err(|s| api.error("content.Update", &s))?;
    api.call("content.Update", CALL_LIMIT, |ch| async move { ContentClient::new(ch).update(r).await })
        .map(|_| ())
        .map_err(|s| api.error("content.Update", &s))
}

/// The messages of one `content.Write`: the data in chunks, then the commit.
struct Chunks<R> {
    source: R,
    offset: i64,
    done: bool,
    r#ref: String,
    total: i64,
    expected: String,
    labels: Option<HashMap<String, String>>,
    failed: Arc<Mutex<Option<std::io::Error>>>,
}

impl<R: Read> Iterator for Chunks<R> {
    type Item = WriteContentRequest;

    fn next(&mut self) -> Option<WriteContentRequest> {
        if self.done {
            return None;
        }
        let mut data = vec![0u8; CHUNK];
        let mut n = 0;
        while n < CHUNK {
            match self.source.read(&mut data[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Ends the stream without a commit: the write fails.
                    if let Ok(mut f) = self.failed.lock() {
                        *f = Some(e);
                    }
                    self.done = true;
                    return None;
                }
            }
        }
        data.truncate(n);
        let offset = self.offset;
        self.offset += n as i64;
        let last = n < CHUNK;
        self.done = last;
        Some(WriteContentRequest {
            action: if last { WriteAction::Commit } else { WriteAction::Write } as i32,
            r#ref: self.r#ref.clone(),
            total: self.total,
            expected: self.expected.clone(),
            offset,
            data,
            labels: if last { self.labels.take().unwrap_or_default() } else { HashMap::new() },
        })
    }
}

/// Writes the layer of `rootfs` (an uncompressed tar, entries sorted) to `out`: its digest
/// and size.
fn write_layer(rootfs: &Path, out: &Path) -> Result<(String, u64), Error> {
    let file = File::create(out).map_err(|e| io_err("create", out, e))?;
    let mut tar = tar::Builder::new(Hashing { inner: BufWriter::new(file), hasher: Sha256::new(), count: 0 });
    tar.follow_symlinks(false);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = rootfs.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .and_then(|d| d.collect::<Result<Vec<_>, _>>())
            .map_err(|e| io_err("read", &dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in entries {
            let rel = rel.join(e.file_name());
            let path = rootfs.join(&rel);
            let meta = std::fs::symlink_metadata(&path).map_err(|e| io_err("stat", &path, e))?;
            if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
                continue;
            }
            tar.append_path_with_name(&path, &rel).map_err(|e| io_err("archive", &path, e))?;
            if meta.is_dir() {
                subdirs.push(rel);
            }
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    let mut w = tar.into_inner().map_err(|e| io_err("write", out, e))?;
    w.flush().map_err(|e| io_err("write", out, e))?;
    Ok((format!("sha256:{:x}", w.hasher.finalize_reset()), w.count))
}

/// A writer that hashes and counts what goes through.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn unique() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// `t` as RFC 3339 in UTC (what containerd's `gc.expire` label takes).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize_as_containerds_clients_do() {
        for (given, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("ferry-lab/busybox", "docker.io/ferry-lab/busybox:latest"),
            ("ferry-lab/busybox:v1", "docker.io/ferry-lab/busybox:v1"),
            ("localhost/x", "localhost/x:latest"),
            ("reg.example:5000/a/b", "reg.example:5000/a/b:latest"),
            ("docker.io/ferry/bb:latest", "docker.io/ferry/bb:latest"),
        ] {
            assert_eq!(normalize(given).expect(given), want);
        }
        for bad in ["", "/abs", "a b", "a//b", "x\n", ":tag"] {
            assert!(normalize(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_eq!(chain_id(std::slice::from_ref(&a)), a);
        assert_eq!(chain_id(&[a.clone(), b.clone()]), sha256_digest(format!("{a} {b}").as_bytes()));
        assert_eq!(chain_id(&[]), "");
    }

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661)), "2000-02-29T01:01:01Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_798_761_599)), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn layers_are_sorted_tars_with_their_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("b/c")).expect("mkdir");
        std::fs::write(root.join("a"), b"x").expect("write");
        std::fs::write(root.join("b/c/d"), b"yy").expect("write");
        std::os::unix::fs::symlink("a", root.join("l")).expect("symlink");
        let out = dir.path().join("layer.tar");
        let (digest, size) = write_layer(&root, &out).expect("layer");
        let bytes = std::fs::read(&out).expect("read");
        assert_eq!(size, bytes.len() as u64);
        assert_eq!(digest, sha256_digest(&bytes));
        let mut names = Vec::new();
        for e in tar::Archive::new(bytes.as_slice()).entries().expect("entries") {
            names.push(e.expect("entry").path().expect("path").display().to_string());
        }
        // A directory's entries, then its subdirectories' (parents always first).
        assert_eq!(names, ["a", "b", "l", "b/c", "b/c/d"]);
    }

    #[test]
    fn chunks_end_with_the_commit() {
        let failed = Arc::new(Mutex::new(None));
        let data = vec![7u8; CHUNK + 5];
        let chunks = Chunks {
            source: std::io::Cursor::new(data),
            offset: 0,
            done: false,
            r#ref: "r".into(),
            total: (CHUNK + 5) as i64,
            expected: "sha256:x".into(),
            labels: Some([("k".to_owned(), "v".to_owned())].into()),
            failed,
        };
        let msgs: Vec<_> = chunks.collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].action, WriteAction::Write as i32);
        assert_eq!(msgs[1].action, WriteAction::Commit as i32);
        assert_eq!(msgs[1].offset, CHUNK as i64);
        assert_eq!(msgs[1].data.len(), 5);
        assert_eq!(msgs[1].labels.get("k").map(String::as_str), Some("v"));
    }
}
