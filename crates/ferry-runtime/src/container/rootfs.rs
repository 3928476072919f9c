//! The changes a container made to its root filesystem since it started: read from its
//! overlay's upper directory into `rootfs-diff.tar` (added and changed files) and
//! `deleted.files` (a JSON list of deleted paths), as Podman lays them out; applied to a new
//! container's root through its mounted overlay, where deleting makes the whiteouts
//! ([`apply_diff`]), or straight into the upper directory of an overlay that is not mounted yet
//! (a Docker container created and not started: [`apply_diff_to_upper`]), where ferry writes
//! the whiteouts and opaque directories itself.
//!
//! No path is both deleted and in the archive, so that the two may be applied in either
//! order: ferry deletes first, Podman's import unpacks first. A directory that was removed
//! and made again (opaque in the upper directory) is therefore not listed as deleted (that
//! would delete its new content after Podman unpacked it): what it hid of the image is,
//! entry by entry.
//!
//! Both files come out of a checkpoint (maybe an imported archive): every path in them is
//! hostile. Deletions walk the tree component by component and never follow a symbolic link;
//! the archive is unpacked by entries that may not leave the root.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::Error;

/// Most deleted paths a checkpoint may list.
pub const MAX_DELETED: usize = 1 << 20;
/// Largest `deleted.files`.
pub const MAX_DELETED_FILE: u64 = 64 << 20;
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What [`write_diff`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffStats {
    pub entries: u64,
    pub bytes: u64,
    pub deleted: u64,
}

/// Writes the changes in `upper` (over the image's `lower` directories, topmost first) into
/// `tar_path` and `deleted_path`, leaving out what lies under `mount_points` (paths inside
/// the container: their content is not the root's).
pub fn write_diff(
    upper: &Path,
    lower: &[PathBuf],
    mount_points: &[String],
    tar_path: &Path,
    deleted_path: &Path,
) -> Result<DiffStats, Error> {
    write_diff_with(upper, lower, mount_points, tar_path, deleted_path, &is_opaque)
}

fn write_diff_with(
    upper: &Path,
    lower: &[PathBuf],
    mount_points: &[String],
    tar_path: &Path,
    deleted_path: &Path,
    opaque: &dyn Fn(&Path) -> bool,
) -> Result<DiffStats, Error> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        Error::Container(format!("cannot {what} {}: {e}", p.display()))
    };
    let file = File::create(tar_path).map_err(|e| io("create", tar_path, e))?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    tar.follow_symlinks(false);
    let mut stats = DiffStats::default();
    let mut deleted = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = upper.join(&rel);
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| io("read", &dir, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| io("read", &dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let rel = rel.join(e.file_name());
            let inside = format!("/{}", rel.display());
            if under_mount(mount_points, &inside) {
                continue;
            }
            let path = upper.join(&rel);
            let meta = fs::symlink_metadata(&path).map_err(|e| io("stat", &path, e))?;
            if meta.file_type().is_char_device() && meta.rdev() == 0 {
                deleted.push(inside);
                continue;
            }
            if meta.is_dir() && opaque(&path) {
                // The directory replaced the image's: what the image had there goes.
                hide_lower(upper, lower, &rel, mount_points, opaque, &mut deleted);
            }
            tar.append_path_with_name(&path, &rel).map_err(|e| io("archive", &path, e))?;
            stats.entries += 1;
            if meta.is_file() {
                stats.bytes += meta.len();
            }
            if meta.is_dir() {
                stack.push(rel);
            }
        }
    }
    tar.into_inner().and_then(|mut w| w.flush()).map_err(|e| io("write", tar_path, e))?;
    deleted.sort();
    deleted.dedup();
    stats.deleted = deleted.len() as u64;
    let json = serde_json::to_vec(&deleted).map_err(|e| Error::Internal(e.to_string()))?;
    fs::write(deleted_path, json).map_err(|e| io("write", deleted_path, e))?;
    Ok(stats)
}

fn is_opaque(dir: &Path) -> bool {
    matches!(xattr::get(dir, OPAQUE_XATTR), Ok(Some(v)) if v == b"y")
}

fn under_mount(mount_points: &[String], inside: &str) -> bool {
    mount_points.iter().any(|m| m == inside || inside.starts_with(&format!("{m}/")))
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Lists as deleted what the image's layers have under `rel`, which the upper directory made
/// opaque, unless the upper directory has an entry of that name (it is in the archive; a
/// directory there hides the image's content below it in turn).
fn hide_lower(
    upper: &Path,
    lower: &[PathBuf],
    rel: &Path,
    mount_points: &[String],
    opaque: &dyn Fn(&Path) -> bool,
    deleted: &mut Vec<String>,
) {
    let mut seen = BTreeSet::new();
    let mut lower_dirs = BTreeSet::new();
    for layer in lower {
        let dir = layer.join(rel);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            // Not a directory in this layer: the deeper ones are hidden by it.
            Ok(_) => break,
            Err(_) => continue,
        }
        let mut names: Vec<_> =
            fs::read_dir(&dir).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
        names.sort();
        for name in names {
            if !seen.insert(name.clone()) {
                continue;
            }
            let Ok(meta) = fs::symlink_metadata(dir.join(&name)) else { continue };
            if is_whiteout(&meta) {
                continue;
            }
            if meta.is_dir() {
                lower_dirs.insert(name.clone());
            }
            let r = rel.join(&name);
            let inside = format!("/{}", r.display());
            if under_mount(mount_points, &inside) {
                continue;
            }
            match fs::symlink_metadata(upper.join(&r)) {
                Err(_) => deleted.push(inside),
                Ok(u) if u.is_dir() && lower_dirs.contains(&name) => {
                    hide_lower(upper, lower, &r, mount_points, opaque, deleted)
                }
                Ok(_) => {}
            }
        }
        if opaque(&dir) {
            break;
        }
    }
}

/// Applies a diff to the root filesystem mounted at `root`: deletions first, then the
/// archive. Either file may be missing (no changes of that sort).
pub fn apply_diff(root: &Path, tar_path: Option<&Path>, deleted_path: Option<&Path>) -> Result<(), Error> {
    if let Some(p) = deleted_path {
        for path in read_deleted(p)? {
            remove_beneath(root, &path)?;
        }
    }
    if let Some(p) = tar_path {
        unpack(root, p)?;
    }
    Ok(())
}

/// Unpacks the archive of changes into `root`; returns the directories it held (relative).
/// No extended attribute is unpacked (an overlay's own would name the source's inodes).
fn unpack(root: &Path, tar_path: &Path) -> Result<Vec<PathBuf>, Error> {
    let file = File::open(tar_path)
        .map_err(|e| Error::Container(format!("cannot open {}: {e}", tar_path.display())))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    let mut dirs = Vec::new();
    for entry in archive.entries().map_err(|e| bad_diff(format!("{e}")))? {
        let mut entry = entry.map_err(|e| bad_diff(format!("{e}")))?;
        let name = entry.path().map_err(|e| bad_diff(format!("{e}")))?.into_owned();
        check_relative(&name)?;
        let is_dir = entry.header().entry_type().is_dir();
        // unpack_in refuses names that would leave `root` (also through symlinks).
        let inside = entry.unpack_in(root).map_err(|e| bad_diff(format!("{}: {e}", name.display())))?;
        if !inside {
            return Err(bad_diff(format!("{} points outside the root", name.display())));
        }
        if is_dir {
            dirs.push(name.components().collect());
        }
    }
    Ok(dirs)
}

/// Applies a diff to `upper`, the upper directory of an overlay that is not mounted (a
/// container created and not yet started): the archive first, then each deleted path as
/// overlayfs marks it, a whiteout (a character device 0:0) where the path is not in the
/// archive, the attribute `trusted.overlay.opaque=y` on a directory the archive recreated
/// (the image's content under it stays hidden). A deleted path under one already deleted, or
/// under something that is not a directory, is hidden already. Nothing follows a symbolic
/// link; parents that are missing are made (0755).
pub fn apply_diff_to_upper(
    upper: &Path,
    tar_path: Option<&Path>,
    deleted_path: Option<&Path>,
) -> Result<(), Error> {
    let dirs = match tar_path {
        Some(p) => unpack(upper, p)?,
        None => Vec::new(),
    };
    let Some(p) = deleted_path else { return Ok(()) };
    let mut deleted: Vec<PathBuf> = read_deleted(p)?
        .iter()
        .map(|d| Path::new(d.trim_start_matches('/')).components().collect())
        .collect();
    // Parents before their children: a deleted directory hides what was under it.
    deleted.sort();
    deleted.dedup();
    for rel in deleted {
        mark_deleted(upper, &rel, dirs.contains(&rel))?;
    }
    Ok(())
}

fn mark_deleted(upper: &Path, rel: &Path, recreated: bool) -> Result<(), Error> {
    check_relative(rel)?;
    let io = |what: &str, p: &Path, e: std::io::Error| {
        Error::Container(format!("cannot {what} {}: {e}", p.display()))
    };
    let parts: Vec<_> = rel.components().collect();
    let mut at = upper.to_path_buf();
    for (i, c) in parts.iter().enumerate() {
        at.push(c.as_os_str());
        let last = i + 1 == parts.len();
        let meta = match fs::symlink_metadata(&at) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("stat", &at, e)),
        };
        match (last, meta) {
            (false, Some(m)) if m.is_dir() => {}
            // A whiteout, a file or a link: what lies below is hidden already.
            (false, Some(_)) => return Ok(()),
            (false, None) => {
                fs::DirBuilder::new().mode(0o755).create(&at).map_err(|e| io("create", &at, e))?;
            }
            (true, Some(m)) => {
                if m.is_dir() && recreated {
                    xattr::set(&at, OPAQUE_XATTR, b"y").map_err(|e| io("mark opaque", &at, e))?;
                }
                // Else the archive's entry replaces the image's: nothing to hide.
            }
            (true, None) => {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &at,
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .map_err(|e| io("make a whiteout at", &at, e.into()))?;
            }
        }
    }
    Ok(())
}

/// Most entries a `rootfs-diff.tar` may hold.
pub const MAX_DIFF_ENTRIES: u64 = 1 << 22;

/// Checks a `rootfs-diff.tar` (maybe from an imported archive) without unpacking it: every
/// entry a plain relative path, a file, directory, symbolic or hard link (to a plain path
/// inside) or FIFO; no devices. [`apply_diff`] checks again as it unpacks.
pub fn check_diff(p: &Path) -> Result<DiffStats, Error> {
    let file = File::open(p).map_err(|e| bad_diff(format!("cannot open {}: {e}", p.display())))?;
    let mut archive = tar::Archive::new(file);
    let mut stats = DiffStats::default();
    for entry in archive.entries_with_seek().map_err(|e| bad_diff(e.to_string()))? {
        let entry = entry.map_err(|e| bad_diff(e.to_string()))?;
        stats.entries += 1;
        if stats.entries > MAX_DIFF_ENTRIES {
            return Err(bad_diff(format!("more than {MAX_DIFF_ENTRIES} entries")));
        }
        let name = entry.path().map_err(|e| bad_diff(e.to_string()))?.into_owned();
        check_relative(&name)?;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => stats.bytes += entry.size(),
            tar::EntryType::Directory | tar::EntryType::Symlink | tar::EntryType::Fifo => {}
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad_diff(e.to_string()))?
                    .ok_or_else(|| bad_diff(format!("{}: a hard link to nothing", name.display())))?;
                check_relative(&target)?;
            }
            other => {
                return Err(bad_diff(format!(
                    "{}: {} entries are not accepted",
                    name.display(),
                    match other {
                        tar::EntryType::Char => "character device",
                        tar::EntryType::Block => "block device",
                        tar::EntryType::GNUSparse => "sparse file",
                        _ => "unknown",
                    }
                )))
            }
        }
    }
    Ok(stats)
}

/// The list in a `deleted.files`, validated.
pub fn read_deleted(p: &Path) -> Result<Vec<String>, Error> {
    let bytes = super::record::read_capped(p, MAX_DELETED_FILE)
        .map_err(|e| bad_diff(format!("cannot read {}: {e}", p.display())))?;
    parse_deleted(&bytes)
}

/// Parses and validates the content of a `deleted.files`.
pub fn parse_deleted(bytes: &[u8]) -> Result<Vec<String>, Error> {
    if bytes.len() as u64 > MAX_DELETED_FILE {
        return Err(bad_diff(format!("deleted.files is larger than {MAX_DELETED_FILE} bytes")));
    }
    let list: Vec<String> =
        serde_json::from_slice(bytes).map_err(|e| bad_diff(format!("deleted.files: {e}")))?;
    if list.len() > MAX_DELETED {
        return Err(bad_diff(format!("deleted.files lists more than {MAX_DELETED} paths")));
    }
    for p in &list {
        check_relative(Path::new(p.trim_start_matches('/')))?;
    }
    Ok(list)
}

/// Removes `path` (inside the container) under `root` without following a symbolic link on
/// the way; a path that is not there is fine.
fn remove_beneath(root: &Path, path: &str) -> Result<(), Error> {
    let rel = Path::new(path.trim_start_matches('/'));
    check_relative(rel)?;
    let mut at = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for (i, c) in parts.iter().enumerate() {
        at.push(c.as_os_str());
        let Ok(meta) = fs::symlink_metadata(&at) else { return Ok(()) };
        let last = i + 1 == parts.len();
        if !last && !meta.is_dir() {
            // A symlink or a file where a directory was: the path is not there.
            return Ok(());
        }
        if last {
            let removed = if meta.is_dir() { fs::remove_dir_all(&at) } else { fs::remove_file(&at) };
            removed.map_err(|e| Error::Container(format!("cannot delete {}: {e}", at.display())))?;
        }
    }
    Ok(())
}

fn check_relative(p: &Path) -> Result<(), Error> {
    if p.as_os_str().is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(bad_diff(format!("'{}' is not a plain path inside the root", p.display())));
    }
    Ok(())
}

fn bad_diff(detail: String) -> Error {
    Error::BadContainerRecord(format!("root filesystem changes: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_round_trips_through_a_plain_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let upper = dir.path().join("upper");
        fs::create_dir_all(upper.join("etc/app")).expect("mkdir");
        fs::write(upper.join("etc/app/new.conf"), b"hello").expect("write");
        fs::create_dir_all(upper.join("proc")).expect("mkdir");
        fs::write(upper.join("proc/junk"), b"x").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", upper.join("link")).expect("symlink");
        let tar = dir.path().join("diff.tar");
        let deleted = dir.path().join("deleted.files");
        let stats = write_diff(&upper, &[], &["/proc".into()], &tar, &deleted).expect("diff");
        assert_eq!(stats.entries, 4);
        assert_eq!(read_deleted(&deleted).expect("deleted"), Vec::<String>::new());

        let root = dir.path().join("root");
        fs::create_dir_all(root.join("var/gone")).expect("mkdir");
        fs::write(root.join("var/gone/f"), b"old").expect("write");
        fs::write(&deleted, br#"["/var/gone", "/not/there"]"#).expect("write");
        apply_diff(&root, Some(&tar), Some(&deleted)).expect("apply");
        assert_eq!(fs::read(root.join("etc/app/new.conf")).expect("read"), b"hello");
        assert!(!root.join("var/gone").exists());
        assert!(!root.join("proc/junk").exists());
        assert_eq!(fs::read_link(root.join("link")).expect("link"), Path::new("/etc/passwd"));
    }

    /// `rm -rf /sbin; mkdir /sbin; echo y > /sbin/z` and `rm -rf /usr/lib/x; mkdir -p
    /// /usr/lib/x/keep` over an image: applied in ferry's order (delete, unpack) and in
    /// Podman's (unpack, delete), the result is the container's view.
    #[test]
    fn a_recreated_directory_survives_either_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("image");
        for d in ["sbin", "usr/lib/x/keep", "usr/lib/x/old", "etc"] {
            fs::create_dir_all(image.join(d)).expect("mkdir");
        }
        for f in [
            "sbin/ifconfig",
            "sbin/route",
            "usr/lib/x/keep/a",
            "usr/lib/x/old/b",
            "usr/lib/x/c",
            "etc/passwd",
        ] {
            fs::write(image.join(f), b"image").expect("write");
        }
        let upper = dir.path().join("upper");
        fs::create_dir_all(upper.join("sbin")).expect("mkdir");
        fs::write(upper.join("sbin/z"), b"y").expect("write");
        fs::write(upper.join("sbin/route"), b"new route").expect("write");
        fs::create_dir_all(upper.join("usr/lib/x/keep")).expect("mkdir");
        fs::write(upper.join("usr/lib/x/keep/new"), b"n").expect("write");
        let opaque_dirs = [upper.join("sbin"), upper.join("usr/lib/x")];
        let opaque = |p: &Path| opaque_dirs.iter().any(|o| o == p);
        let tar = dir.path().join("diff.tar");
        let deleted = dir.path().join("deleted.files");
        write_diff_with(&upper, std::slice::from_ref(&image), &[], &tar, &deleted, &opaque).expect("diff");
        let list = read_deleted(&deleted).expect("deleted");
        assert_eq!(list, ["/sbin/ifconfig", "/usr/lib/x/c", "/usr/lib/x/keep/a", "/usr/lib/x/old"]);

        let copy = |to: &Path| {
            let out = std::process::Command::new("cp").arg("-a").arg(&image).arg(to).output().expect("cp");
            assert!(out.status.success());
        };
        let check = |root: &Path| {
            assert_eq!(fs::read(root.join("sbin/z")).expect("z"), b"y");
            assert_eq!(fs::read(root.join("sbin/route")).expect("route"), b"new route");
            assert!(!root.join("sbin/ifconfig").exists());
            assert_eq!(fs::read(root.join("usr/lib/x/keep/new")).expect("new"), b"n");
            for gone in ["usr/lib/x/keep/a", "usr/lib/x/old", "usr/lib/x/c"] {
                assert!(!root.join(gone).exists(), "{gone}");
            }
            assert!(root.join("etc/passwd").exists());
        };
        let ferry = dir.path().join("ferry");
        copy(&ferry);
        apply_diff(&ferry, Some(&tar), Some(&deleted)).expect("apply");
        check(&ferry);
        let podman = dir.path().join("podman");
        copy(&podman);
        apply_diff(&podman, Some(&tar), None).expect("unpack");
        apply_diff(&podman, None, Some(&deleted)).expect("delete");
        check(&podman);
    }

    #[test]
    fn deletions_do_not_follow_symlinks_or_leave_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        fs::create_dir_all(outside.join("keep")).expect("mkdir");
        let root = dir.path().join("root");
        fs::create_dir_all(&root).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("esc")).expect("symlink");
        remove_beneath(&root, "/esc/keep").expect("no error");
        assert!(outside.join("keep").exists());
        let deleted = dir.path().join("deleted.files");
        for bad in [r#"["/../outside/keep"]"#, r#"["/a/../b"]"#, r#"[""]"#, r#"{"a":1}"#] {
            fs::write(&deleted, bad).expect("write");
            assert!(apply_diff(&root, None, Some(&deleted)).is_err(), "{bad}");
        }
        assert!(outside.join("keep").exists());
    }

    /// A tar with one raw entry: any name, type and link.
    fn raw_tar(path: &Path, name: &[u8], kind: tar::EntryType, link: &[u8]) {
        let mut b = tar::Builder::new(File::create(path).expect("create"));
        let mut h = tar::Header::new_gnu();
        h.set_size(if kind == tar::EntryType::Regular { 1 } else { 0 });
        h.set_mode(0o644);
        h.set_entry_type(kind);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        let data: &[u8] = if kind == tar::EntryType::Regular { b"x" } else { b"" };
        b.append(&h, data).expect("append");
        b.finish().expect("finish");
    }

    #[test]
    fn a_diff_is_checked_before_it_is_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let upper = dir.path().join("upper");
        fs::create_dir_all(upper.join("etc")).expect("mkdir");
        fs::write(upper.join("etc/a"), b"hello").expect("write");
        std::os::unix::fs::symlink("/etc/a", upper.join("abs-link")).expect("symlink");
        let tar_path = dir.path().join("diff.tar");
        write_diff(&upper, &[], &[], &tar_path, &dir.path().join("deleted.files")).expect("diff");
        let stats = check_diff(&tar_path).expect("a diff ferry wrote passes");
        assert_eq!((stats.entries, stats.bytes), (3, 5));
        let bad = dir.path().join("bad.tar");
        for (name, kind, link, why) in [
            (&b"../escape"[..], tar::EntryType::Regular, &b""[..], "not a plain path"),
            (b"/etc/passwd", tar::EntryType::Regular, b"", "not a plain path"),
            (b"a/../../b", tar::EntryType::Directory, b"", "not a plain path"),
            (b"dev/sda", tar::EntryType::Block, b"", "block device"),
            (b"dev/tty", tar::EntryType::Char, b"", "character device"),
            (b"h", tar::EntryType::Link, b"../../etc/shadow", "not a plain path"),
            (b"h", tar::EntryType::Link, b"/etc/shadow", "not a plain path"),
        ] {
            raw_tar(&bad, name, kind, link);
            let err = check_diff(&bad).expect_err(why);
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        fs::write(&bad, b"not a tar at all, long enough to be read as one header block........")
            .expect("write");
        assert!(check_diff(&bad).is_err());
    }

    /// Whiteouts and `trusted.*` attributes need root (CAP_MKNOD, CAP_SYS_ADMIN).
    fn privileged() -> bool {
        ferry_sys::is_root()
    }

    fn is_whiteout(p: &Path) -> bool {
        fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
    }

    #[test]
    fn an_upper_dir_round_trips_into_an_unmounted_overlay() {
        if !privileged() {
            eprintln!("skipped: whiteouts need root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        // The source's upper directory, as overlayfs leaves it.
        let a = dir.path().join("a");
        fs::create_dir_all(a.join("etc/app")).expect("mkdir");
        fs::write(a.join("etc/app/new.conf"), b"hello").expect("write");
        fs::create_dir_all(a.join("bin")).expect("mkdir");
        for wo in ["bin/vi", "gone"] {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                a.join(wo),
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::empty(),
                rustix::fs::makedev(0, 0),
            )
            .expect("whiteout");
        }
        fs::create_dir_all(a.join("usr/sbin")).expect("mkdir");
        fs::write(a.join("usr/sbin/x"), b"x").expect("write");
        xattr::set(a.join("usr/sbin"), OPAQUE_XATTR, b"y").expect("opaque");
        xattr::set(a.join("etc"), "trusted.overlay.origin", b"\x00handle").expect("origin");
        // The image under it: /usr/sbin was removed and made again.
        let image = dir.path().join("image");
        fs::create_dir_all(image.join("usr/sbin")).expect("mkdir");
        fs::write(image.join("usr/sbin/old"), b"old").expect("write");
        let tar = dir.path().join("diff.tar");
        let deleted = dir.path().join("deleted.files");
        write_diff(&a, std::slice::from_ref(&image), &[], &tar, &deleted).expect("diff");
        let mut listed = read_deleted(&deleted).expect("deleted");
        listed.sort();
        assert_eq!(listed, vec!["/bin/vi", "/gone", "/usr/sbin/old"]);

        // The target's upper directory: empty, the overlay not mounted.
        let b = dir.path().join("b");
        fs::create_dir_all(&b).expect("mkdir");
        apply_diff_to_upper(&b, Some(&tar), Some(&deleted)).expect("apply");
        assert_eq!(fs::read(b.join("etc/app/new.conf")).expect("read"), b"hello");
        assert!(is_whiteout(&b.join("bin/vi")) && is_whiteout(&b.join("gone")));
        assert!(is_whiteout(&b.join("usr/sbin/old")), "what the remade directory hid");
        assert_eq!(fs::read(b.join("usr/sbin/x")).expect("read"), b"x");
        assert_eq!(
            xattr::get(b.join("etc"), "trusted.overlay.origin").expect("xattr"),
            None,
            "overlay's own attributes stay behind"
        );
        assert_eq!(xattr::get(b.join("etc/app"), OPAQUE_XATTR).expect("xattr"), None);

        // Podman's own export lists a remade directory itself (and its new content in the
        // archive): the directory is made opaque.
        let c = dir.path().join("c");
        fs::create_dir_all(&c).expect("mkdir");
        fs::write(&deleted, br#"["/usr/sbin"]"#).expect("write");
        apply_diff_to_upper(&c, Some(&tar), Some(&deleted)).expect("apply");
        assert_eq!(xattr::get(c.join("usr/sbin"), OPAQUE_XATTR).expect("xattr"), Some(b"y".to_vec()));
        assert_eq!(fs::read(c.join("usr/sbin/x")).expect("read"), b"x");
    }

    #[test]
    fn whiteouts_go_under_real_directories_only() {
        if !privileged() {
            eprintln!("skipped: whiteouts need root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).expect("mkdir");
        let upper = dir.path().join("upper");
        fs::create_dir_all(&upper).expect("mkdir");
        std::os::unix::fs::symlink(&outside, upper.join("esc")).expect("symlink");
        let deleted = dir.path().join("deleted.files");
        fs::write(&deleted, br#"["/esc/x", "/d/e/f", "/d", "/new/dir/file"]"#).expect("write");
        apply_diff_to_upper(&upper, None, Some(&deleted)).expect("apply");
        assert_eq!(fs::read_dir(&outside).expect("dir").count(), 0, "a whiteout went through a symlink");
        assert!(is_whiteout(&upper.join("d")), "a deleted directory is one whiteout");
        assert!(is_whiteout(&upper.join("new/dir/file")));
        let mode = fs::metadata(upper.join("new/dir")).expect("stat").permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o755);
        for bad in [r#"["/../outside/x"]"#, r#"["/a/../b"]"#, r#"[""]"#] {
            fs::write(&deleted, bad).expect("write");
            assert!(apply_diff_to_upper(&upper, None, Some(&deleted)).is_err(), "{bad}");
        }
        assert_eq!(fs::read_dir(&outside).expect("dir").count(), 0);
    }

    #[test]
    fn archive_entries_may_not_escape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tar_path = dir.path().join("evil.tar");
        {
            let mut b = tar::Builder::new(File::create(&tar_path).expect("create"));
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // Written raw: the builder itself refuses `..`.
            h.as_old_mut().name[..9].copy_from_slice(b"../escape");
            h.set_cksum();
            b.append(&h, &b"x"[..]).expect("append");
            b.finish().expect("finish");
        }
        let root = dir.path().join("root");
        fs::create_dir_all(&root).expect("mkdir");
        assert!(apply_diff(&root, Some(&tar_path), None).is_err());
        assert!(apply_diff_to_upper(&root, Some(&tar_path), None).is_err());
        assert!(!dir.path().join("escape").exists());
    }
}
