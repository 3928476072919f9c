//! `ferry export --oci-image`: a checkpoint as an OCI image, the form `podman container
//! checkpoint --create-image` and `checkpointctl build` give one.
//!
//! The image has one layer: the plaintext archive of `archive.rs` (Podman's layout, ferry's
//! signed manifest beside), uncompressed (`application/vnd.oci.image.layer.v1.tar`). The
//! layout's annotations (the checkpoint's container, its image, CRIU, the host) go on the
//! image manifest and on its entry in `index.json`, which also names the image
//! (`org.opencontainers.image.ref.name`). Written either as a tar of the layout (an
//! `oci-archive`, what `podman load` reads), or as the layout's directory.
//!
//! For a tar, the layer is written twice from the same materialized images: once to learn
//! its digest (the tar needs the blob's name before its content), once into the tar, hashed
//! again and compared: the layer is never written anywhere else, not even to a temporary
//! file. For a directory, once, into a temporary file renamed to its digest.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ring::digest::{Context, SHA256};
use serde_json::json;
use tar::{Builder, EntryType, Header};

use crate::archive::{put, PlainSource, TempOut};
use crate::error::io_err;
use crate::fsutil::{create_private, sync_dir};
use crate::packs::hex;
use crate::StoreError;

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const LAYOUT_FILE: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
const BUF: usize = 1 << 20;

/// Writes the image of `plain` named `reference` to `out`; returns the bytes written and the
/// image's id (its config's digest, as engines name an image).
pub(crate) fn write(
    plain: &PlainSource<'_>,
    reference: &str,
    out: &Path,
    directory: bool,
) -> Result<(u64, String), StoreError> {
    check_reference(reference)?;
    if directory {
        write_dir(plain, reference, out)
    } else {
        write_tar(plain, reference, out)
    }
}

/// A blob's digest and size.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Blob {
    digest: String,
    size: u64,
}

impl Blob {
    fn of(bytes: &[u8]) -> Blob {
        Blob {
            digest: format!("sha256:{}", hex(ring::digest::digest(&SHA256, bytes).as_ref())),
            size: bytes.len() as u64,
        }
    }

    fn file_name(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }
}

/// A writer that hashes (SHA-256) and counts what passes through.
struct Hashing<W> {
    inner: W,
    ctx: Context,
    size: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing { inner, ctx: Context::new(&SHA256), size: 0 }
    }

    fn blob(self) -> (Blob, W) {
        let digest = format!("sha256:{}", hex(self.ctx.finish().as_ref()));
        (Blob { digest, size: self.size }, self.inner)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The image config, manifest and index for a layer.
struct Documents {
    config: Vec<u8>,
    manifest: Vec<u8>,
    index: Vec<u8>,
}

impl Documents {
    fn image_id(&self) -> String {
        Blob::of(&self.config).file_name().to_owned()
    }
}

impl Documents {
    fn new(plain: &PlainSource<'_>, reference: &str, layer: &Blob) -> Documents {
        let m = plain.manifest();
        let created = rfc3339(m.created);
        let arch = oci_arch();
        let config = json!({
            "created": created,
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
            "history": [{
                "created": created,
                "created_by": "ferry export --oci-image",
                "comment": format!("checkpoint {} of {}", m.name, m.source),
            }],
        });
        let config = serde_json::to_vec(&config).unwrap_or_default();
        let config_blob = Blob::of(&config);
        let mut annotations = plain.layout.annotations.clone();
        annotations.insert("org.opencontainers.image.created".into(), created);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": { "mediaType": CONFIG_TYPE, "digest": config_blob.digest, "size": config_blob.size },
            "layers": [{ "mediaType": LAYER_TYPE, "digest": layer.digest, "size": layer.size }],
            "annotations": annotations,
        });
        let manifest = serde_json::to_vec(&manifest).unwrap_or_default();
        let manifest_blob = Blob::of(&manifest);
        annotations.insert("org.opencontainers.image.ref.name".into(), reference.to_owned());
        let index = json!({
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [{
                "mediaType": MANIFEST_TYPE,
                "digest": manifest_blob.digest,
                "size": manifest_blob.size,
                "platform": { "architecture": arch, "os": "linux" },
                "annotations": annotations,
            }],
        });
        let index = serde_json::to_vec(&index).unwrap_or_default();
        Documents { config, manifest, index }
    }
}

fn write_tar(plain: &PlainSource<'_>, reference: &str, out: &Path) -> Result<(u64, String), StoreError> {
    // First pass: the layer's digest and size, written nowhere.
    let (layer, _) = plain.write(Hashing::new(io::sink()), out)?.blob();
    let docs = Documents::new(plain, reference, &layer);
    let mut tmp = TempOut::create(out)?;
    let file = tmp.file().try_clone().map_err(io_err("cannot open", tmp.path()))?;
    let target = tmp.path().to_path_buf();
    let werr = |e: io::Error| StoreError::Io { action: "cannot write", path: target.clone(), source: e };
    let mtime = plain.manifest().created;
    let mut tar = Builder::new(BufWriter::with_capacity(BUF, file));
    put(&mut tar, "oci-layout", EntryType::Regular, LAYOUT_FILE.len() as u64, mtime, LAYOUT_FILE)
        .map_err(werr)?;
    put(&mut tar, "blobs/", EntryType::Directory, 0, mtime, io::empty()).map_err(werr)?;
    put(&mut tar, "blobs/sha256/", EntryType::Directory, 0, mtime, io::empty()).map_err(werr)?;
    // The layer: its header, then the archive written straight into the tar, then padding.
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(layer.size);
    h.set_mode(0o600);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    tar.append_data(&mut h, format!("blobs/sha256/{}", layer.file_name()), io::empty()).map_err(werr)?;
    let (again, _) = plain.write(Hashing::new(tar.get_mut()), &target)?.blob();
    if again != layer {
        return Err(StoreError::Damaged {
            name: plain.manifest().name.clone(),
            file: "OCI image layer".into(),
            detail: "the layer changed between its two passes".into(),
        });
    }
    let pad = (512 - layer.size % 512) % 512;
    tar.get_mut().write_all(&vec![0u8; pad as usize]).map_err(werr)?;
    for doc in [&docs.config, &docs.manifest] {
        let blob = Blob::of(doc);
        put(
            &mut tar,
            &format!("blobs/sha256/{}", blob.file_name()),
            EntryType::Regular,
            blob.size,
            mtime,
            &doc[..],
        )
        .map_err(werr)?;
    }
    put(&mut tar, "index.json", EntryType::Regular, docs.index.len() as u64, mtime, &docs.index[..])
        .map_err(werr)?;
    let buffered = tar.into_inner().map_err(werr)?;
    let file = buffered.into_inner().map_err(|e| werr(e.into_error()))?;
    file.sync_all().map_err(werr)?;
    let bytes = file.metadata().map_err(io_err("cannot stat", &target))?.len();
    tmp.persist(out)?;
    Ok((bytes, docs.image_id()))
}

fn write_dir(plain: &PlainSource<'_>, reference: &str, out: &Path) -> Result<(u64, String), StoreError> {
    if fs::symlink_metadata(out).is_ok() {
        return Err(StoreError::Io {
            action: "will not write an image layout into an existing",
            path: out.to_path_buf(),
            source: io::Error::from(io::ErrorKind::AlreadyExists),
        });
    }
    let tmp = TempDir::create(out)?;
    let blobs = tmp.path.join("blobs/sha256");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&blobs)
        .map_err(io_err("cannot create", &blobs))?;
    let partial = blobs.join(".layer");
    let file = create_private(&partial)?;
    let (layer, w) = plain.write(Hashing::new(BufWriter::with_capacity(BUF, file)), &partial)?.blob();
    let file = w.into_inner().map_err(|e| io_err("cannot write", &partial)(e.into_error()))?;
    file.sync_all().map_err(io_err("cannot write", &partial))?;
    let layer_path = blobs.join(layer.file_name());
    fs::rename(&partial, &layer_path).map_err(io_err("cannot rename into", &layer_path))?;
    let docs = Documents::new(plain, reference, &layer);
    let mut bytes = layer.size;
    for doc in [&docs.config, &docs.manifest] {
        let path = blobs.join(Blob::of(doc).file_name());
        write_file(&path, doc)?;
        bytes += doc.len() as u64;
    }
    write_file(&tmp.path.join("oci-layout"), LAYOUT_FILE)?;
    write_file(&tmp.path.join("index.json"), &docs.index)?;
    bytes += (LAYOUT_FILE.len() + docs.index.len()) as u64;
    sync_dir(&blobs)?;
    sync_dir(&tmp.path)?;
    tmp.persist(out)?;
    Ok((bytes, docs.image_id()))
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let mut f = create_private(path)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(io_err("cannot write", path))
}

/// The image layout's directory being written: removed unless renamed into place.
struct TempDir {
    path: PathBuf,
    done: bool,
}

impl TempDir {
    fn create(out: &Path) -> Result<TempDir, StoreError> {
        let out = out.components().as_path();
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let base = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = dir.join(format!(".{base}.ferry-tmp.{}.{nanos}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&path).map_err(io_err("cannot create", &path))?;
        Ok(TempDir { path, done: false })
    }

    fn persist(mut self, out: &Path) -> Result<(), StoreError> {
        let out = out.components().as_path();
        fs::rename(&self.path, out).map_err(io_err("cannot rename into", out))?;
        self.done = true;
        match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
            _ => sync_dir(Path::new(".")),
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// An image reference as container tools take it: lowercase repository, optional tag.
fn check_reference(r: &str) -> Result<(), StoreError> {
    let ok = !r.is_empty()
        && r.len() <= 255
        && r.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && r.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/' | ':')
        })
        && !r.contains("//")
        && !r.ends_with(['/', ':']);
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            name: r.chars().take(128).collect(),
            why: "an image name is lowercase letters, digits, '.', '_', '-', '/' and a ':TAG'",
        })
    }
}

/// The OCI name of this machine's architecture.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Unix seconds as an RFC 3339 UTC time (`2026-12-06T21:18:21Z`).
pub(crate) fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rest = secs % 86_400;
    // Days since 1970-01-01 to a civil date (proleptic Gregorian), by 400-year eras.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_591_901), "2026-12-06T21:18:21Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn references_are_checked() {
        for ok in ["localhost/web:latest", "web", "registry.example/a/b_c-d:v1.2"] {
            check_reference(ok).expect(ok);
        }
        for bad in ["", "Web", "a b", "a//b", "x:", "/abs", "a\nb", "-x"] {
            assert!(check_reference(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashing_writer_matches_a_digest() {
        let mut h = Hashing::new(Vec::new());
        h.write_all(b"abc").expect("write");
        let (blob, inner) = h.blob();
        assert_eq!(inner, b"abc");
        assert_eq!(blob, Blob::of(b"abc"));
        assert_eq!(blob.digest, "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
