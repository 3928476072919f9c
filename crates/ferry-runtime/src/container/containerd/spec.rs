//! The OCI specs ferry gives containerd: a new container's (ferry's lab and tests), with
//! containerd's own defaults, and a restored one's cgroup; and the root filesystem changes of a
//! restore, written into the new container's snapshot before its task exists.

use std::path::{Path, PathBuf};
use std::process::Command;

use containerd_client::types::Mount;

use super::super::CreateSpec;
use super::image::ImageConfig;
use super::io_err;
use crate::Error;

/// The cgroup of a new container `ns/id`: under the instance's cgroup parent (two instances
/// on one host must never share one), or containerd's default `/NS/ID`.
pub(super) fn new_cgroup(ns: &str, id: &str, parent: Option<&str>) -> String {
    match parent {
        Some(p) => format!("{}/containerd/{ns}/{id}", p.trim_end_matches('/')),
        None => format!("/{ns}/{id}"),
    }
}

/// The cgroup of a container restored as `ns/name` from one that was `ns/old` in
/// `recorded`: a new one under this instance's parent; outside an instance, containerd's
/// default for the new name when it had the default, the recorded path when it had its own
/// (unless something holds that one, the frozen original on this host for instance).
pub(super) fn restored_cgroup(
    recorded: &str,
    ns: &str,
    old: &str,
    name: &str,
    parent: Option<&str>,
) -> String {
    if parent.is_some() || recorded.is_empty() || recorded == format!("/{ns}/{old}") {
        return new_cgroup(ns, name, parent);
    }
    if recorded.contains(':') || !cgroup_in_use(recorded) {
        // systemd's slice:prefix:name form, or a free path of the user's.
        return recorded.to_owned();
    }
    format!("/ferry-containerd/{ns}/{name}")
}

/// True if the v1 freezer (or v2) cgroup `path` exists.
fn cgroup_in_use(path: &str) -> bool {
    let rel = path.trim_start_matches('/');
    !rel.is_empty()
        && ["/sys/fs/cgroup/freezer", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .any(|root| Path::new(root).join(rel).join("cgroup.procs").exists())
}

/// Capabilities containerd gives a container by default.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The spec of a new container `id` from image config `img`, as containerd's clients make
/// it (`ctr run`'s defaults), with what `req` asks for.
pub(super) fn new_spec(req: &CreateSpec<'_>, id: &str, img: &ImageConfig, cgroup: &str) -> serde_json::Value {
    let args: Vec<String> = if req.args.is_empty() {
        img.entrypoint.iter().chain(img.cmd.iter()).cloned().collect()
    } else {
        req.args.to_vec()
    };
    let mut env: Vec<String> =
        if img.env.is_empty() { vec![DEFAULT_PATH.to_owned()] } else { img.env.clone() };
    for e in req.env {
        let key = e.split('=').next().unwrap_or(e);
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let cwd = if img.working_dir.is_empty() { "/".to_owned() } else { img.working_dir.clone() };
    let mount = |dst: &str, typ: &str, src: &str, opts: &[&str]| serde_json::json!({ "destination": dst, "type": typ, "source": src, "options": opts });
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        mount("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
        mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
        mount("/run", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
    ];
    for (src, dst) in &req.mounts {
        mounts.push(mount(dst, "bind", src, &["rbind", "rw"]));
    }
    let mut namespaces: Vec<serde_json::Value> =
        ["pid", "ipc", "uts", "mount"].iter().map(|t| serde_json::json!({ "type": t })).collect();
    namespaces.push(match req.netns {
        Some(p) => serde_json::json!({ "type": "network", "path": p }),
        None => serde_json::json!({ "type": "network" }),
    });
    let mut resources = serde_json::json!({ "devices": [{ "allow": false, "access": "rwm" }] });
    if let Some(limit) = req.memory_limit {
        resources["memory"] = serde_json::json!({ "limit": limit });
    }
    serde_json::json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": { "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs" },
        "hostname": id,
        "mounts": mounts,
        // ctr's --label puts labels into the annotations too.
        "annotations": req.labels,
        "linux": {
            "resources": resources,
            "cgroupsPath": cgroup,
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// Applies a checkpoint's root filesystem changes to a prepared snapshot (not mounted by
/// anyone yet), through [`super::super::rootfs::apply_diff`] and its checks of hostile paths.
/// Without deletions the archive goes straight into the overlay's upper directory (a file or
/// directory there overrides the image's, as a copy-up would); deletions need the overlay
/// itself, mounted at `target` for the time it takes, so that deleting makes its whiteouts
/// and opaque directories.
pub(super) fn apply_to_snapshot(
    mounts: &[Mount],
    target: &Path,
    diff: Option<&Path>,
    deleted: Option<&Path>,
) -> Result<(), Error> {
    let [m] = mounts else {
        return Err(Error::Container(format!("containerd gave {} mounts for one snapshot", mounts.len())));
    };
    let deletions = match deleted {
        Some(p) => !super::super::rootfs::read_deleted(p)?.is_empty(),
        None => false,
    };
    if !deletions {
        if let Some(upper) = upper_dir(m) {
            return super::super::rootfs::apply_diff(&upper, diff, None);
        }
    }
    std::fs::create_dir_all(target).map_err(|e| io_err("create", target, e))?;
    let fstype = if m.r#type == "bind" { "none" } else { m.r#type.as_str() };
    let out = Command::new("mount")
        .args(["-t", fstype, "-o", &m.options.join(","), &m.source])
        .arg(target)
        .output()
        .map_err(|e| Error::Container(format!("cannot run mount: {e}")))?;
    if !out.status.success() {
        return Err(Error::Container(format!(
            "cannot mount the new container's snapshot at {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let applied = super::super::rootfs::apply_diff(target, diff, deleted);
    let unmounted = ferry_sys::unmount(target);
    let _ = std::fs::remove_dir(target);
    applied?;
    unmounted.map_err(|e| io_err("unmount", target, e))
}

/// The directory a snapshot's writes go to: an overlay's upper directory, or the bound
/// directory of a snapshot without parent.
fn upper_dir(m: &Mount) -> Option<PathBuf> {
    let dir = match m.r#type.as_str() {
        "overlay" => m.options.iter().find_map(|o| o.strip_prefix("upperdir="))?,
        "bind" => m.source.as_str(),
        _ => return None,
    };
    Some(PathBuf::from(dir)).filter(|p| p.is_absolute() && p.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_are_the_instances_or_containerds_defaults() {
        assert_eq!(
            new_cgroup("default", "web", Some("/ferry-lab/t1/node1/")),
            "/ferry-lab/t1/node1/containerd/default/web"
        );
        assert_eq!(new_cgroup("default", "web", None), "/default/web");
        // An instance's own parent always.
        assert_eq!(
            restored_cgroup(
                "/ferry-lab/t1/node1/containerd/default/web",
                "default",
                "web",
                "web",
                Some("/ferry-lab/t1/node2")
            ),
            "/ferry-lab/t1/node2/containerd/default/web"
        );
        // containerd's default follows the new name.
        assert_eq!(restored_cgroup("/default/web", "default", "web", "web2", None), "/default/web2");
        assert_eq!(restored_cgroup("", "default", "web", "web2", None), "/default/web2");
        // A path of the user's (free here) or systemd's stays.
        assert_eq!(
            restored_cgroup("/ferry-test-nosuch/web", "default", "web", "w", None),
            "/ferry-test-nosuch/web"
        );
        assert_eq!(
            restored_cgroup("system.slice:ctd:web", "default", "web", "w", None),
            "system.slice:ctd:web"
        );
    }

    #[test]
    fn writes_go_to_the_snapshots_upper_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let up = dir.path().display().to_string();
        let overlay = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            options: vec!["index=off".into(), format!("upperdir={up}"), "lowerdir=/a:/b".into()],
            ..Default::default()
        };
        assert_eq!(upper_dir(&overlay), Some(dir.path().to_path_buf()));
        let bind = Mount {
            r#type: "bind".into(),
            source: up.clone(),
            options: vec!["rbind".into()],
            ..Default::default()
        };
        assert_eq!(upper_dir(&bind), Some(dir.path().to_path_buf()));
        let other =
            Mount { r#type: "overlay".into(), options: vec!["upperdir=rel".into()], ..Default::default() };
        assert_eq!(upper_dir(&other), None);
        // Without deletions the archive is unpacked there, mounting nothing.
        let tar_path = dir.path().join("d.tar");
        // Owned by whoever runs the test (the archive's owners are restored).
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir.path()).expect("stat"));
        let group = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(dir.path()).expect("stat"));
        {
            let mut b = tar::Builder::new(std::fs::File::create(&tar_path).expect("create"));
            let mut d = tar::Header::new_gnu();
            d.set_size(0);
            d.set_mode(0o755);
            d.set_entry_type(tar::EntryType::Directory);
            d.set_uid(owner.into());
            d.set_gid(group.into());
            d.set_mtime(0);
            b.append_data(&mut d, "etc", std::io::empty()).expect("append");
            let mut h = tar::Header::new_gnu();
            h.set_size(2);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_uid(owner.into());
            h.set_gid(group.into());
            h.set_mtime(0);
            b.append_data(&mut h, "etc/new", &b"hi"[..]).expect("append");
            b.finish().expect("finish");
        }
        let deleted = dir.path().join("deleted.files");
        std::fs::write(&deleted, b"[]").expect("write");
        let upper = dir.path().join("upper");
        std::fs::create_dir(&upper).expect("mkdir");
        let m = Mount { r#type: "bind".into(), source: upper.display().to_string(), ..Default::default() };
        apply_to_snapshot(&[m], &dir.path().join("mnt"), Some(&tar_path), Some(&deleted)).expect("apply");
        assert_eq!(std::fs::read(upper.join("etc/new")).expect("read"), b"hi");
        assert!(!dir.path().join("mnt").exists());
    }

    #[test]
    fn new_specs_take_the_image_and_the_request() {
        let img = ImageConfig {
            env: vec!["PATH=/bin".into(), "A=1".into()],
            entrypoint: vec!["/init".into()],
            cmd: vec!["-v".into()],
            working_dir: "/srv".into(),
        };
        let env = vec!["A=2".to_owned()];
        let req = CreateSpec {
            name: "web",
            image: "x",
            env: &env,
            netns: Some(Path::new("/run/netns/n1")),
            memory_limit: Some(64 << 20),
            labels: [("k".to_owned(), "v".to_owned())].into(),
            mounts: vec![("/srv/data".into(), "/data".into())],
            ..Default::default()
        };
        let s = new_spec(&req, "web", &img, "/p/containerd/default/web");
        assert_eq!(s["process"]["args"], serde_json::json!(["/init", "-v"]));
        assert_eq!(s["process"]["env"], serde_json::json!(["PATH=/bin", "A=2"]));
        assert_eq!(s["process"]["cwd"], "/srv");
        assert_eq!(
            s["linux"]["namespaces"][4],
            serde_json::json!({"type": "network", "path": "/run/netns/n1"})
        );
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(s["linux"]["cgroupsPath"], "/p/containerd/default/web");
        assert_eq!(s["annotations"]["k"], "v");
        let binds: Vec<_> =
            s["mounts"].as_array().expect("mounts").iter().filter(|m| m["type"] == "bind").collect();
        assert_eq!(binds.len(), 1);
        assert_eq!(binds[0]["source"], "/srv/data");
        let args = vec!["/bin/sh".to_owned()];
        let s = new_spec(&CreateSpec { args: &args, ..req }, "web", &ImageConfig::default(), "/c");
        assert_eq!(s["process"]["args"], serde_json::json!(["/bin/sh"]));
        assert_eq!(s["process"]["env"][0], DEFAULT_PATH);
    }
}
