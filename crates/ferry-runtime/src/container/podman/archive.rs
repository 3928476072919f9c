//! Podman's checkpoint layout: the `config.dump` a container's record carries, and the archive
//! a restore hands to `POST /libpod/containers/NAME/restore?import=true`.
//!
//! `config.dump` is libpod's `ContainerConfig` as JSON. ferry makes it from what the API says
//! of a running container (`GET /libpod/containers/ID/json`) and its OCI spec, with the fields
//! and names Podman 4.3.1's own export writes, so that it can stand in for that file as it is.
//! A restore then drops what belongs to the source's Podman and must not be kept (its pid
//! files, log, `/dev/shm` directory and static directory: Podman re-derives a path only when it
//! lies under its *own* run root, so a kept one points into the source's storage), and sets
//! the name, the cgroup parent of this instance and the spec of the restore.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use serde_json::{json, Map, Value};

use super::image::MTIME;
use crate::container::record::{DELETED_FILES_FILE, DESCRIPTORS_FILE, ROOTFS_DIFF_FILE};

/// CRIU's inventory: the one image Podman checks for (it `stat`s `checkpoint/inventory.img`
/// to decide whether a checkpoint is complete). It holds no memory.
pub(crate) const INVENTORY: &str = "inventory.img";

/// What a restore removes from the recorded `config.dump`: paths of the source's Podman, and
/// a root filesystem from a host directory (ferry restores containers of images only).
const SOURCE_ONLY: &[&str] = &[
    "rootfs",
    "rootfs_overlay",
    "conmonPidFile",
    "pid_file",
    "ShmDir",
    "mounts",
    "staticDir",
    "secretsPath",
    "logPath",
    "lockID",
    "createdTime",
    "exitCommand",
    "Dependencies",
];

/// Podman's `config.dump` of a container, from its inspection and its OCI spec.
pub(crate) fn config_dump(ins: &Value, spec: &Value) -> Value {
    let text = |p: &str| ins.pointer(p).and_then(Value::as_str).unwrap_or("").to_owned();
    let num = |p: &str| ins.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let flag = |p: &str| ins.pointer(p).and_then(Value::as_bool).unwrap_or(false);
    let mut c = Map::new();
    c.insert("spec".into(), spec.clone());
    c.insert("id".into(), text("/Id").into());
    c.insert("name".into(), text("/Name").into());
    if matches!(text("/HostConfig/UsernsMode").as_str(), "" | "host") {
        c.insert("idMappingsOptions".into(), json!({"HostUIDMapping": true, "HostGIDMapping": true}));
    }
    c.insert("rootfsImageID".into(), text("/Image").into());
    c.insert("rootfsImageName".into(), text("/ImageName").into());
    let shm = spec.get("mounts").and_then(Value::as_array).and_then(|ms| {
        ms.iter()
            .find(|m| m["destination"] == "/dev/shm" && m["type"] == "bind")
            .and_then(|m| m["source"].as_str())
    });
    if let Some(shm) = shm {
        c.insert("ShmDir".into(), shm.into());
        c.insert("mounts".into(), json!([shm]));
    }
    c.insert("shmSize".into(), num("/HostConfig/ShmSize").into());
    let static_dir = text("/StaticDir");
    if !static_dir.is_empty() {
        c.insert("secretsPath".into(), format!("{static_dir}/secrets").into());
    }
    c.insert("staticDir".into(), static_dir.into());
    c.insert("createWorkingDir".into(), true.into());
    if let Some(p) = ins.pointer("/Config/Passwd").and_then(Value::as_bool) {
        c.insert("passwd".into(), p.into());
    }
    c.insert("privileged".into(), flag("/HostConfig/Privileged").into());
    if text("/ProcessLabel").is_empty() && text("/MountLabel").is_empty() {
        c.insert("labelopts".into(), json!(["disable"]));
    }
    let mode = text("/HostConfig/NetworkMode");
    let own_netns = !(mode.starts_with("ns:") || mode == "host" || mode.starts_with("container:"));
    c.insert("createNetNS".into(), own_netns.into());
    c.insert("UseImageResolvConf".into(), false.into());
    c.insert("UseImageHosts".into(), false.into());
    let cmd: Vec<Value> = ins.pointer("/Config/Cmd").and_then(Value::as_array).cloned().unwrap_or_default();
    if let Some(entrypoint) = entrypoint(ins, spec, &cmd) {
        c.insert("entrypoint".into(), entrypoint.into());
    }
    if !cmd.is_empty() {
        c.insert("command".into(), cmd.into());
    }
    if let Some(labels) =
        ins.pointer("/Config/Labels").filter(|l| l.as_object().is_some_and(|o| !o.is_empty()))
    {
        c.insert("labels".into(), labels.clone());
    }
    for (key, from) in [("stopSignal", "/Config/StopSignal"), ("stopTimeout", "/Config/StopTimeout")] {
        if let Some(n) = ins.pointer(from).and_then(Value::as_u64) {
            c.insert(key.into(), n.into());
        }
    }
    if num("/Config/Timeout") > 0 {
        c.insert("timeout".into(), num("/Config/Timeout").into());
    }
    c.insert("createdTime".into(), text("/Created").into());
    c.insert("cgroupManager".into(), text("/HostConfig/CgroupManager").into());
    let cgroups_mode = match text("/HostConfig/Cgroups").as_str() {
        m @ ("disabled" | "no-conmon" | "split") => m.to_owned(),
        _ => "enabled".into(),
    };
    c.insert("cgroupsMode".into(), cgroups_mode.into());
    c.insert("cgroupParent".into(), text("/HostConfig/CgroupParent").into());
    c.insert("logPath".into(), text("/HostConfig/LogConfig/Path").into());
    c.insert("logTag".into(), text("/HostConfig/LogConfig/Tag").into());
    c.insert("logSize".into(), 0.into());
    c.insert("logDriver".into(), text("/HostConfig/LogConfig/Type").into());
    c.insert("conmonPidFile".into(), text("/ConmonPidFile").into());
    let policy = text("/HostConfig/RestartPolicy/Name");
    if !policy.is_empty() {
        c.insert("restart_policy".into(), policy.into());
    }
    if num("/HostConfig/RestartPolicy/MaximumRetryCount") > 0 {
        c.insert("restart_retries".into(), num("/HostConfig/RestartPolicy/MaximumRetryCount").into());
    }
    c.insert("postConfigureNetNS".into(), false.into());
    c.insert("runtime".into(), text("/OCIRuntime").into());
    c.insert("pause".into(), flag("/IsInfra").into());
    c.insert("isService".into(), flag("/IsService").into());
    c.insert("healthcheck".into(), Value::Null);
    c.insert("umask".into(), text("/Config/Umask").into());
    c.insert("pid_file".into(), text("/PidFile").into());
    for (key, value) in
        [("user", text("/Config/User")), ("timezone", text("/Config/Timezone")), ("pod", text("/Pod"))]
    {
        if !value.is_empty() {
            c.insert(key.into(), value.into());
        }
    }
    if let Some(groups) =
        ins.pointer("/HostConfig/GroupAdd").filter(|g| g.as_array().is_some_and(|a| !a.is_empty()))
    {
        c.insert("groups".into(), groups.clone());
    }
    if flag("/Config/OpenStdin") {
        c.insert("stdin".into(), true.into());
    }
    c.insert("mountAllDevices".into(), false.into());
    Value::Object(c)
}

/// The entrypoint: the API gives it as one string (4.3.1), joined by blanks; the spec's
/// arguments are the entrypoint followed by the command.
fn entrypoint(ins: &Value, spec: &Value, cmd: &[Value]) -> Option<Vec<Value>> {
    match ins.pointer("/Config/Entrypoint")? {
        Value::Array(a) if !a.is_empty() => Some(a.clone()),
        Value::String(s) if !s.is_empty() => {
            let args = spec.pointer("/process/args")?.as_array()?;
            let n = args.len().checked_sub(cmd.len()).filter(|n| *n > 0)?;
            (args[n..] == *cmd).then(|| args[..n].to_vec())
        }
        _ => None,
    }
}

/// The `config.dump` a restore of `recorded` as `name` gives Podman: the source's paths
/// dropped, the spec of the restore, this instance's cgroup parent (Podman's default when
/// there is none), and `id` (the record's, when it is kept) or none (Podman makes one, asked
/// with `name=`).
pub(crate) fn restore_config(
    recorded: &Value,
    name: &str,
    id: Option<&str>,
    spec: &Value,
    cgroup_parent: Option<&str>,
) -> Value {
    let mut c = recorded.as_object().cloned().unwrap_or_default();
    for key in SOURCE_ONLY {
        c.remove(*key);
    }
    c.insert("spec".into(), spec.clone());
    c.insert("name".into(), name.into());
    c.insert("id".into(), id.unwrap_or("").into());
    match cgroup_parent {
        Some(p) => c.insert("cgroupParent".into(), p.into()),
        None => c.remove("cgroupParent"),
    };
    let netns_path = spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .and_then(|l| l.iter().find(|n| n["type"] == "network"))
        .and_then(|n| n.get("path"))
        .and_then(Value::as_str)
        .is_some_and(|p| !p.is_empty());
    if netns_path {
        c.insert("createNetNS".into(), false.into());
    }
    Value::Object(c)
}

/// Writes the archive of a restore into `w`: `config.dump`, `spec.dump`, `checkpoint/` with
/// only the stubs Podman and runc look at (`inventory.img`, `descriptors.json`: CRIU reads the
/// images from ferry's directory, as the spec's `org.criu.config` file says), and the root
/// filesystem's changes, which Podman applies to the new container's root before CRIU runs.
pub(crate) fn write_restore_archive(
    w: &mut dyn Write,
    config: &Value,
    spec: &Value,
    images: &Path,
) -> io::Result<()> {
    let mut tar = tar::Builder::new(w);
    let json = |v: &Value| serde_json::to_vec(v).map_err(io::Error::other);
    add_bytes(&mut tar, "config.dump", &json(config)?, 0o600)?;
    add_bytes(&mut tar, "spec.dump", &json(spec)?, 0o600)?;
    let mut dir = header(tar::EntryType::Directory, 0o700, 0);
    tar.append_data(&mut dir, "checkpoint/", io::empty())?;
    for name in [INVENTORY, DESCRIPTORS_FILE] {
        add_file(&mut tar, &format!("checkpoint/{name}"), &images.join(name), 0o600)?;
    }
    for name in [ROOTFS_DIFF_FILE, DELETED_FILES_FILE] {
        let path = images.join(name);
        if path.exists() {
            add_file(&mut tar, name, &path, 0o600)?;
        }
    }
    tar.finish()
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_mtime(MTIME);
    h.set_size(size);
    h
}

fn add_bytes(tar: &mut tar::Builder<&mut dyn Write>, name: &str, data: &[u8], mode: u32) -> io::Result<()> {
    let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
    tar.append_data(&mut h, name, data)
}

fn add_file(tar: &mut tar::Builder<&mut dyn Write>, name: &str, path: &Path, mode: u32) -> io::Result<()> {
    let f = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let len = f.metadata()?.len();
    let mut h = header(tar::EntryType::Regular, mode, len);
    tar.append_data(&mut h, name, f.take(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspection() -> Value {
        json!({
            "Id": "64123825905b0632c174d2985414f96fc6023624037c01f3ef7e550381ca37f2",
            "Created": "2026-12-06T21:16:05.623887649Z",
            "Name": "cnt",
            "Image": "4b1f32f4",
            "ImageName": "localhost/bb:latest",
            "StaticDir": "/s/userdata",
            "ConmonPidFile": "/r/userdata/conmon.pid",
            "PidFile": "/r/userdata/pidfile",
            "OCIRuntime": "runc",
            "IsInfra": false,
            "Config": {"Cmd": ["/bin/sh", "-c", "x"], "Entrypoint": "", "Labels": {"a": "b"},
                       "StopSignal": 15, "StopTimeout": 10, "Umask": "0022", "Passwd": true},
            "HostConfig": {"CgroupManager": "cgroupfs", "Cgroups": "default", "CgroupParent": "/pw-A",
                           "LogConfig": {"Type": "k8s-file", "Path": "/s/userdata/ctr.log", "Tag": ""},
                           "NetworkMode": "ns:/run/netns/w1", "RestartPolicy": {"Name": "always", "MaximumRetryCount": 0},
                           "ShmSize": 65536000, "Privileged": false, "UsernsMode": "", "GroupAdd": []}
        })
    }

    fn spec() -> Value {
        json!({
            "process": {"args": ["/bin/sh", "-c", "x"]},
            "mounts": [{"destination": "/dev/shm", "type": "bind", "source": "/s/userdata/shm"}],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/w1"}]}
        })
    }

    #[test]
    fn config_dump_has_podmans_fields() {
        let c = config_dump(&inspection(), &spec());
        assert_eq!(c["id"], "64123825905b0632c174d2985414f96fc6023624037c01f3ef7e550381ca37f2");
        assert_eq!(c["rootfsImageID"], "4b1f32f4");
        assert_eq!(c["rootfsImageName"], "localhost/bb:latest");
        assert_eq!(c["restart_policy"], "always");
        assert_eq!(c["cgroupParent"], "/pw-A");
        assert_eq!(c["cgroupsMode"], "enabled");
        assert_eq!(c["createNetNS"], false);
        assert_eq!(c["command"], json!(["/bin/sh", "-c", "x"]));
        assert!(c.get("entrypoint").is_none());
        assert_eq!(c["ShmDir"], "/s/userdata/shm");
        assert_eq!(c["mounts"], json!(["/s/userdata/shm"]));
        assert_eq!(c["stopSignal"], 15);
        assert_eq!(c["labels"], json!({"a": "b"}));
        assert_eq!(c["spec"], spec());
        assert_eq!(c["logDriver"], "k8s-file");
    }

    #[test]
    fn an_entrypoint_string_is_split_by_the_spec() {
        let mut ins = inspection();
        ins["Config"]["Entrypoint"] = "/usr/bin/tini --".into();
        let mut s = spec();
        s["process"]["args"] = json!(["/usr/bin/tini", "--", "/bin/sh", "-c", "x"]);
        assert_eq!(config_dump(&ins, &s)["entrypoint"], json!(["/usr/bin/tini", "--"]));
    }

    #[test]
    fn a_restore_drops_the_sources_paths() {
        let recorded = config_dump(&inspection(), &spec());
        let mut new_spec = spec();
        new_spec["annotations"] = json!({"org.criu.config": "/w/criu.conf"});
        let mut hostile = recorded.clone();
        hostile["rootfs"] = "/".into();
        let c = restore_config(&hostile, "web2", None, &new_spec, Some("/ferry-lab/x/node2"));
        for key in SOURCE_ONLY {
            assert!(c.get(*key).is_none(), "{key} kept");
        }
        assert_eq!(c["name"], "web2");
        assert_eq!(c["id"], "");
        assert_eq!(c["cgroupParent"], "/ferry-lab/x/node2");
        assert_eq!(c["spec"]["annotations"]["org.criu.config"], "/w/criu.conf");
        assert_eq!(c["rootfsImageID"], "4b1f32f4");
        let c = restore_config(
            &recorded,
            "cnt",
            Some("64123825905b0632c174d2985414f96fc6023624037c01f3ef7e550381ca37f2"),
            &new_spec,
            None,
        );
        assert_eq!(c["id"], recorded["id"]);
        assert!(c.get("cgroupParent").is_none());
    }

    #[test]
    fn the_archive_holds_only_stubs_and_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = dir.path();
        std::fs::write(images.join(INVENTORY), b"inv").expect("write");
        std::fs::write(images.join(DESCRIPTORS_FILE), b"[]").expect("write");
        std::fs::write(images.join("pages-1.img"), vec![7u8; 4096]).expect("write");
        std::fs::write(images.join(DELETED_FILES_FILE), b"[\"/a\"]").expect("write");
        let mut out = Vec::new();
        write_restore_archive(&mut out, &json!({"name": "x"}), &spec(), images).expect("archive");
        let mut ar = tar::Archive::new(&out[..]);
        let names: Vec<String> = ar
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").path().expect("path").display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "config.dump",
                "spec.dump",
                "checkpoint/",
                "checkpoint/inventory.img",
                "checkpoint/descriptors.json",
                "deleted.files"
            ]
        );
    }
}
