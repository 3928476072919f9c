//! Images made from a root filesystem directory, the same on every host.
//!
//! A restore of an imported checkpoint needs the container's image by its exact id. Podman's
//! own import (`images/import`) stamps the creation time into the image's config, so the
//! same directory imported on two hosts gets two ids. ferry therefore builds the image
//! itself, as a docker-archive (`manifest.json`, the config, one layer) that Podman loads:
//! the layer's entries sorted by path, every time stamp fixed, owners numeric and no user
//! names, the config's keys in a fixed order. Its id, the digest of the config, then follows
//! from the directory's content alone.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Every entry's modification time (2000-01-01T00:00:00Z): fixed, and not the epoch, which
/// some tools take for "unknown".
pub(crate) const MTIME: u64 = 946_684_800;
const CREATED: &str = "2000-01-01T00:00:00Z";

/// A layer written to a file, with what the image's config says of it.
#[derive(Debug)]
pub(crate) struct Layer {
    pub path: PathBuf,
    /// `sha256:HEX` of the uncompressed tar (the config's `diff_id`).
    pub diff_id: String,
    pub size: u64,
}

/// The image's config (its digest is the image's id) for one layer.
pub(crate) fn config(diff_id: &str, cmd: &[&str]) -> Vec<u8> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    // serde_json's map is ordered by key: the bytes are the same on every host.
    let v = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "created": CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": CREATED, "created_by": "ferry: a root filesystem directory" }],
    });
    v.to_string().into_bytes()
}

/// `sha256:HEX` of `bytes`.
pub(crate) fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The reference Podman files the image under: a name without a registry goes to
/// `localhost/`, one without a tag gets `:latest`.
pub(crate) fn reference(name: &str) -> String {
    let first = name.split('/').next().unwrap_or("");
    let has_domain =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let mut r = if has_domain { name.to_owned() } else { format!("localhost/{name}") };
    let last = r.rsplit('/').next().unwrap_or("");
    if !last.contains(':') && !last.contains('@') {
        r.push_str(":latest");
    }
    r
}

/// Writes the layer tar of `root` into `out`, hashing it on the way.
pub(crate) fn write_layer(root: &Path, out: &Path) -> io::Result<Layer> {
    let file = File::create(out)?;
    let mut sink = Hashing { inner: BufWriter::new(file), ctx: Sha256::new(), len: 0 };
    {
        let mut tar = tar::Builder::new(&mut sink);
        tar.mode(tar::HeaderMode::Deterministic);
        tar.follow_symlinks(false);
        let mut entries = Vec::new();
        collect(root, Path::new(""), &mut entries)?;
        for rel in entries {
            append(&mut tar, root, &rel)?;
        }
        tar.finish()?;
    }
    sink.inner.flush()?;
    let size = sink.len;
    Ok(Layer { path: out.to_path_buf(), diff_id: format!("sha256:{}", hex(&sink.ctx.finalize())), size })
}

/// Every path under `root/rel`, depth first, each directory before its content, sorted by
/// name at every level.
fn collect(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut names: Vec<_> =
        fs::read_dir(root.join(rel))?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let r = rel.join(&name);
        out.push(r.clone());
        let meta = fs::symlink_metadata(root.join(&r))?;
        if meta.is_dir() {
            collect(root, &r, out)?;
        }
    }
    Ok(())
}

fn append(tar: &mut tar::Builder<&mut Hashing<BufWriter<File>>>, root: &Path, rel: &Path) -> io::Result<()> {
    let path = root.join(rel);
    let meta = fs::symlink_metadata(&path)?;
    let ft = meta.file_type();
    let mut h = tar::Header::new_gnu();
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_mtime(MTIME);
    h.set_size(0);
    if ft.is_dir() {
        h.set_entry_type(tar::EntryType::Directory);
        tar.append_data(&mut h, rel, io::empty())
    } else if ft.is_file() {
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(meta.len());
        let f = File::open(&path)?;
        tar.append_data(&mut h, rel, f.take(meta.len()))
    } else if ft.is_symlink() {
        h.set_entry_type(tar::EntryType::Symlink);
        let target = fs::read_link(&path)?;
        tar.append_link(&mut h, rel, target)
    } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
        h.set_entry_type(if ft.is_char_device() {
            tar::EntryType::Char
        } else if ft.is_block_device() {
            tar::EntryType::Block
        } else {
            tar::EntryType::Fifo
        });
        let rdev = meta.rdev();
        h.set_device_major(((rdev >> 8) & 0xfff) as u32 | ((rdev >> 32) & !0xfff) as u32)?;
        h.set_device_minor((rdev & 0xff) as u32 | ((rdev >> 12) & !0xff) as u32)?;
        tar.append_data(&mut h, rel, io::empty())
    } else {
        tracing::warn!(path = %path.display(), "a socket in the image's directory is left out");
        Ok(())
    }
}

/// Counts and hashes what passes through.
struct Hashing<W> {
    inner: W,
    ctx: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the docker-archive of one layer and its config, tagged `reference`, into `w`.
pub(crate) fn write_archive(
    w: &mut dyn Write,
    layer: &Layer,
    config: &[u8],
    reference: &str,
) -> io::Result<()> {
    let config_hex = digest(config).trim_start_matches("sha256:").to_owned();
    let layer_hex = layer.diff_id.trim_start_matches("sha256:").to_owned();
    let config_name = format!("{config_hex}.json");
    let layer_name = format!("{layer_hex}/layer.tar");
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [reference],
        "Layers": [layer_name],
    }])
    .to_string();
    let mut tar = tar::Builder::new(w);
    let add = |tar: &mut tar::Builder<&mut dyn Write>, name: &str, size: u64, data: &mut dyn Read| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(MTIME);
        h.set_size(size);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data)
    };
    add(&mut tar, &config_name, config.len() as u64, &mut &config[..])?;
    let mut dir = tar::Header::new_gnu();
    dir.set_mode(0o755);
    dir.set_mtime(MTIME);
    dir.set_size(0);
    dir.set_entry_type(tar::EntryType::Directory);
    tar.append_data(&mut dir, format!("{layer_hex}/"), io::empty())?;
    let mut f = File::open(&layer.path)?.take(layer.size);
    add(&mut tar, &layer_name, layer.size, &mut f)?;
    add(&mut tar, "manifest.json", manifest.len() as u64, &mut manifest.as_bytes())?;
    tar.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_directory_makes_the_same_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let make = |root: &Path| {
            fs::create_dir_all(root.join("bin")).expect("mkdir");
            fs::create_dir_all(root.join("etc/app")).expect("mkdir");
            fs::write(root.join("etc/app/b.conf"), b"b").expect("write");
            fs::write(root.join("etc/app/a.conf"), b"a").expect("write");
            fs::write(root.join("bin/busybox"), b"\x7fELF").expect("write");
            std::os::unix::fs::symlink("busybox", root.join("bin/sh")).expect("symlink");
        };
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        make(&a);
        std::thread::sleep(std::time::Duration::from_millis(20));
        make(&b);
        let la = write_layer(&a, &dir.path().join("a.tar")).expect("layer a");
        let lb = write_layer(&b, &dir.path().join("b.tar")).expect("layer b");
        assert_eq!(la.diff_id, lb.diff_id, "the layer does not depend on when the files were made");
        assert_eq!(la.size, fs::metadata(&la.path).expect("stat").len());
        let ca = config(&la.diff_id, &["/bin/sh"]);
        assert_eq!(digest(&ca), digest(&config(&lb.diff_id, &["/bin/sh"])));

        let mut names = Vec::new();
        let mut ar = tar::Archive::new(File::open(&la.path).expect("open"));
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            assert_eq!(e.header().mtime().expect("mtime"), MTIME);
            names.push(e.path().expect("path").display().to_string());
        }
        assert_eq!(
            names,
            ["bin", "bin/busybox", "bin/sh", "etc", "etc/app", "etc/app/a.conf", "etc/app/b.conf"]
        );

        let mut archive = Vec::new();
        write_archive(&mut archive, &la, &ca, "localhost/x:latest").expect("archive");
        let mut ar = tar::Archive::new(&archive[..]);
        let mut members = Vec::new();
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let name = e.path().expect("path").display().to_string();
            if name == "manifest.json" {
                let mut s = String::new();
                e.read_to_string(&mut s).expect("read");
                let m: serde_json::Value = serde_json::from_str(&s).expect("json");
                assert_eq!(m[0]["RepoTags"][0], "localhost/x:latest");
                assert_eq!(m[0]["Config"], format!("{}.json", &digest(&ca)[7..]));
            }
            members.push(name);
        }
        assert_eq!(members.len(), 4, "{members:?}");
    }

    #[test]
    fn references_get_a_registry_and_a_tag() {
        assert_eq!(reference("ferry-lab/busybox"), "localhost/ferry-lab/busybox:latest");
        assert_eq!(reference("busybox:1"), "localhost/busybox:1");
        assert_eq!(reference("localhost/x"), "localhost/x:latest");
        assert_eq!(reference("quay.io/a/b:2"), "quay.io/a/b:2");
        assert_eq!(reference("registry:5000/a"), "registry:5000/a:latest");
    }
}
