//! `ferry-runc`, the runc wrapper a dockerd runs ferry's containers with, and the small files
//! through which ferry talks to it.
//!
//! Docker 20.10 cannot hand a container's OCI spec an annotation or a network namespace path,
//! and refuses `start?checkpoint-dir=`: the only per-container hook between Docker and runc is
//! the runtime binary itself. `ferry-runc` is registered as a Docker runtime
//! (`"runtimes": {"ferry": {"path": ".../ferry-runc", "runtimeArgs": ["--ferry-dir", DIR]}}`);
//! containerd's shim calls it exactly as it would call runc. For `create` and `restore` of
//! container `ID`, if ferry left `DIR/ID.json` (a [`Request`]), it rewrites the bundle's
//! `config.json`: the network namespace's path (and without Docker's `libnetwork-setkey`
//! prestart hook, which would set up Docker's "none" sandbox in ferry's namespace and switch
//! IPv6 off there), and for a restore the `org.criu.config` annotation (CRIU then reads the
//! images from ferry's verified tmpfs, never from Docker's storage). It then runs the real runc
//! with the same arguments. For a restore it also notes where containerd unpacked Docker's
//! checkpoint (`DIR/ID.restored`): containerd never removes that directory, ferry does. The
//! network namespace part of a request stays until ferry forgets the container, so that
//! Docker's own later starts and restores of it keep it in that namespace.
//!
//! Every other call, and any container without a request, goes to runc untouched.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::container::record::read_capped;
use crate::Error;

/// The wrapper's file name (a `[[bin]]` of the `ferry` crate).
pub const BINARY: &str = "ferry-runc";
/// The runtime argument that names the wrapper's directory.
pub const DIR_FLAG: &str = "--ferry-dir";
/// The wrapper's directory when its runtime entry names none.
pub const DEFAULT_DIR: &str = "/run/ferry-runc";
/// Docker's prestart hook that sets up its network sandbox in the container's namespace.
const SETKEY_HOOK: &str = "libnetwork-setkey";
const MAX_REQUEST: u64 = 64 << 10;
const MAX_SPEC: u64 = 4 << 20;
/// runc's global flags that take a value.
const VALUE_FLAGS: &[&str] = &["root", "log", "log-format", "criu", "rootless"];

/// What ferry asks of the wrapper for one container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The network namespace the container joins (by path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The CRIU configuration file its restore runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_config: Option<PathBuf>,
}

/// What the wrapper saw of a restore (for ferry to clean up after it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// runc's `--image-path`: the directory containerd unpacked Docker's checkpoint into.
    pub image_path: Option<PathBuf>,
}

/// One call of the wrapper, as containerd's shim makes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invocation {
    /// The wrapper's directory.
    pub dir: PathBuf,
    /// runc's arguments (the wrapper's own taken out).
    pub runc_args: Vec<OsString>,
    /// runc's command (`create`, `restore`, `delete`, ...).
    pub command: Option<String>,
    /// The container id (the last argument of `create` and `restore`).
    pub id: Option<String>,
    pub bundle: Option<PathBuf>,
    pub image_path: Option<PathBuf>,
    /// runc's `--log` (JSON lines, read by the shim when runc fails).
    pub log: Option<PathBuf>,
}

/// Splits the wrapper's arguments from runc's and finds what the wrapper needs.
pub fn parse(args: &[OsString]) -> Invocation {
    let mut inv = Invocation { dir: PathBuf::from(DEFAULT_DIR), ..Default::default() };
    let mut i = 0;
    // Global flags, up to the command.
    while i < args.len() {
        let a = args[i].to_string_lossy().into_owned();
        if !a.starts_with('-') {
            break;
        }
        let (name, inline) = match a.trim_start_matches('-').split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (a.trim_start_matches('-').to_owned(), None),
        };
        if format!("--{name}") == DIR_FLAG {
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i).map(|v| v.to_string_lossy().into_owned()).unwrap_or_default()
                }
            };
            if !value.is_empty() {
                inv.dir = PathBuf::from(value);
            }
            i += 1;
            continue;
        }
        inv.runc_args.push(args[i].clone());
        if VALUE_FLAGS.contains(&name.as_str()) {
            let value = match inline {
                Some(v) => Some(v),
                None => {
                    i += 1;
                    args.get(i).map(|v| {
                        inv.runc_args.push(v.clone());
                        v.to_string_lossy().into_owned()
                    })
                }
            };
            if name == "log" {
                inv.log = value.map(PathBuf::from);
            }
        }
        i += 1;
    }
    inv.command = args.get(i).map(|c| c.to_string_lossy().into_owned());
    inv.runc_args.extend(args[i.min(args.len())..].iter().cloned());
    let rest: Vec<String> =
        args[(i + 1).min(args.len())..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let value_of = |flags: &[&str]| -> Option<PathBuf> {
        rest.iter().enumerate().find_map(|(k, a)| {
            let name = a.trim_start_matches('-');
            flags.iter().find_map(|f| {
                if name == *f {
                    rest.get(k + 1).map(PathBuf::from)
                } else {
                    name.strip_prefix(&format!("{f}=")).map(PathBuf::from)
                }
            })
        })
    };
    inv.bundle = value_of(&["bundle", "b"]);
    inv.image_path = value_of(&["image-path"]);
    inv.id = rest.last().filter(|a| !a.starts_with('-')).cloned();
    inv
}

/// Rewrites the bundle's spec for `create` and `restore` when ferry left a request for the
/// container; returns whether it did.
pub fn prepare(inv: &Invocation) -> Result<bool, String> {
    let (Some(command), Some(id), Some(bundle)) = (&inv.command, &inv.id, &inv.bundle) else {
        return Ok(false);
    };
    let restore = match command.as_str() {
        "create" => false,
        "restore" => true,
        _ => return Ok(false),
    };
    if !valid_id(id) {
        return Ok(false);
    }
    let path = request_path(&inv.dir, id);
    let req: Request = match read_capped(&path, MAX_REQUEST) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let config = bundle.join("config.json");
    let bytes =
        read_capped(&config, MAX_SPEC).map_err(|e| format!("cannot read {}: {e}", config.display()))?;
    let mut spec: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", config.display()))?;
    rewrite_spec(&mut spec, &req, restore);
    let text = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
    write_atomic(&config, &text, 0o600).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    if restore {
        let seen = Seen { image_path: inv.image_path.clone() };
        let text = serde_json::to_vec(&seen).map_err(|e| e.to_string())?;
        let p = seen_path(&inv.dir, id);
        write_atomic(&p, &text, 0o600).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    Ok(true)
}

/// The spec with what `req` asks for.
pub fn rewrite_spec(spec: &mut serde_json::Value, req: &Request, restore: bool) {
    if let Some(netns) = &req.netns {
        let path = netns.to_string_lossy().into_owned();
        if let Some(list) = spec.pointer_mut("/linux/namespaces").and_then(|n| n.as_array_mut()) {
            match list.iter_mut().find(|n| n.get("type").and_then(|t| t.as_str()) == Some("network")) {
                Some(ns) => ns["path"] = path.into(),
                None => list.push(serde_json::json!({"type": "network", "path": path})),
            }
        }
        if let Some(hooks) = spec.pointer_mut("/hooks/prestart").and_then(|h| h.as_array_mut()) {
            hooks.retain(|h| {
                !h.get("args")
                    .and_then(|a| a.as_array())
                    .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(SETKEY_HOOK)))
            });
        }
    }
    if let (true, Some(conf)) = (restore, &req.criu_config) {
        if let Some(obj) = spec.as_object_mut() {
            let ann = obj.entry("annotations").or_insert_with(|| serde_json::json!({}));
            if let Some(a) = ann.as_object_mut() {
                a.insert(
                    super::super::criu_conf::ANNOTATION.into(),
                    conf.to_string_lossy().into_owned().into(),
                );
            }
        }
    }
}

/// The real runc: the first `runc` on `PATH`, else Debian's.
pub fn real_runc() -> PathBuf {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("runc")).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/runc"))
}

/// Says why the wrapper failed: on standard error, and in runc's JSON log, where the shim
/// looks for runc's last error (Docker shows it).
pub fn report(inv: &Invocation, message: &str) {
    let msg = format!("{BINARY}: {message}");
    eprintln!("{msg}");
    if let Some(log) = &inv.log {
        let line = serde_json::json!({"level": "error", "msg": msg}).to_string();
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// `DIR/ID.json`: ferry's request for container `id`.
pub fn request_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// `DIR/ID.restored`: what the wrapper saw of a restore.
pub fn seen_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.restored"))
}

/// `DIR/ID.criu.conf`: the container's copy of ferry's CRIU configuration for its restore.
/// runc keeps the annotation in its state for the container's life and hands the file to
/// every later CRIU run of it (`docker checkpoint create` too): the copy is removed once the
/// restore is done, and CRIU takes a missing file as an empty one.
pub fn criu_conf_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.criu.conf"))
}

/// Copies ferry's CRIU configuration `from` for the restore of container `id`; returns the
/// copy's path (for the request).
pub fn copy_criu_conf(dir: &Path, id: &str, from: &Path) -> Result<PathBuf, Error> {
    if !valid_id(id) {
        return Err(Error::Container(format!("'{id}' is not a Docker container id")));
    }
    make_dir(dir)?;
    let text = read_capped(from, MAX_REQUEST)
        .map_err(|e| Error::Container(format!("cannot read {}: {e}", from.display())))?;
    let path = criu_conf_path(dir, id);
    write_atomic(&path, &text, 0o600)
        .map_err(|e| Error::Container(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

fn make_dir(dir: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Container(format!("cannot create {}: {e}", dir.display())))
}

/// Leaves `req` for container `id` in the wrapper's directory `dir` (0600, atomically).
pub fn write_request(dir: &Path, id: &str, req: &Request) -> Result<(), Error> {
    if !valid_id(id) {
        return Err(Error::Container(format!("'{id}' is not a Docker container id")));
    }
    make_dir(dir)?;
    let text = serde_json::to_vec(req).map_err(|e| Error::Internal(e.to_string()))?;
    let path = request_path(dir, id);
    write_atomic(&path, &text, 0o600)
        .map_err(|e| Error::Container(format!("cannot write {}: {e}", path.display())))
}

/// After a restore of `id` (or a start): cleans up after containerd (the directory it unpacked
/// Docker's checkpoint stub into: only if it is one, named `ctrd-checkpoint*` with plain files
/// only), removes the copy of the CRIU configuration, and keeps of the request only the
/// network namespace, so that Docker's later creates and restores of the container (`docker
/// restart`, `docker start --checkpoint`) put it back into the same one; the CRIU
/// configuration was for this restore alone.
pub fn after_start(dir: &Path, id: &str) {
    if !valid_id(id) {
        return;
    }
    clean_seen(dir, id);
    let _ = std::fs::remove_file(criu_conf_path(dir, id));
    let path = request_path(dir, id);
    let Ok(bytes) = read_capped(&path, MAX_REQUEST) else { return };
    match serde_json::from_slice::<Request>(&bytes) {
        Ok(Request { netns: Some(netns), criu_config: Some(_) }) => {
            let kept = Request { netns: Some(netns), criu_config: None };
            if let Err(e) = write_request(dir, id, &kept) {
                tracing::warn!(error = %e, "cannot rewrite the wrapper's request");
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(Request { netns: Some(_), criu_config: None }) => {}
        _ => {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The container `id` is gone: its request, and what the wrapper saw of its restores.
pub fn forget(dir: &Path, id: &str) {
    if !valid_id(id) {
        return;
    }
    clean_seen(dir, id);
    let _ = std::fs::remove_file(criu_conf_path(dir, id));
    let _ = std::fs::remove_file(request_path(dir, id));
}

fn clean_seen(dir: &Path, id: &str) {
    let seen = seen_path(dir, id);
    if let Ok(bytes) = read_capped(&seen, MAX_REQUEST) {
        if let Some(p) = serde_json::from_slice::<Seen>(&bytes).ok().and_then(|s| s.image_path) {
            remove_unpacked_checkpoint(&p);
        }
    }
    let _ = std::fs::remove_file(seen);
}

fn remove_unpacked_checkpoint(p: &Path) {
    let named = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("ctrd-checkpoint"));
    let Ok(meta) = std::fs::symlink_metadata(p) else { return };
    if !named || !p.is_absolute() || !meta.is_dir() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(p) else { return };
    let files: Vec<_> = entries.flatten().collect();
    if files.iter().all(|e| e.file_type().is_ok_and(|t| t.is_file())) {
        for f in files {
            let _ = std::fs::remove_file(f.path());
        }
        if let Err(e) = std::fs::remove_dir(p) {
            tracing::warn!(path = %p.display(), error = %e, "cannot remove containerd's copy of the checkpoint stub");
        }
    }
}

/// A container id as Docker makes them (and safe as a file name).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    drop(f);
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn finds_what_it_needs_in_the_shims_calls() {
        let inv = parse(&args(
            "--ferry-dir /run/x/wrap --root /e/runtime-runc/moby --log /b/log.json --log-format json \
             restore --image-path /t/ctrd-checkpoint1 --work-path /b/work --detach --pid-file /b/init.pid \
             -no-subreaper --bundle /b abc123",
        ));
        assert_eq!(inv.dir, PathBuf::from("/run/x/wrap"));
        assert_eq!(inv.command.as_deref(), Some("restore"));
        assert_eq!(inv.id.as_deref(), Some("abc123"));
        assert_eq!(inv.bundle, Some(PathBuf::from("/b")));
        assert_eq!(inv.image_path, Some(PathBuf::from("/t/ctrd-checkpoint1")));
        assert_eq!(inv.log, Some(PathBuf::from("/b/log.json")));
        assert_eq!(inv.runc_args[0], "--root");
        assert!(!inv.runc_args.iter().any(|a| a == "--ferry-dir" || a == "/run/x/wrap"));
        assert_eq!(inv.runc_args.len(), 18);

        let inv = parse(&args("--root=/r create --bundle=/b2 --pid-file /p id2"));
        assert_eq!(inv.dir, PathBuf::from(DEFAULT_DIR));
        assert_eq!((inv.command.as_deref(), inv.id.as_deref()), (Some("create"), Some("id2")));
        assert_eq!(inv.bundle, Some(PathBuf::from("/b2")));
        assert_eq!(inv.runc_args, args("--root=/r create --bundle=/b2 --pid-file /p id2"));

        let inv = parse(&args("--root /r state"));
        assert_eq!(inv.command.as_deref(), Some("state"));
        assert_eq!(inv.id, None);
        assert_eq!(parse(&[]), Invocation { dir: DEFAULT_DIR.into(), ..Default::default() });
    }

    #[test]
    fn rewrites_the_netns_the_hook_and_the_annotation() {
        let spec = serde_json::json!({
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]},
            "hooks": {"prestart": [
                {"path": "/proc/1/exe", "args": ["libnetwork-setkey", "-exec-root=/e", "id", "ctl"]},
                {"path": "/bin/other", "args": ["other"]}
            ]}
        });
        let req = Request { netns: Some("/run/netns/w2".into()), criu_config: Some("/w/criu.conf".into()) };
        let mut created = spec.clone();
        rewrite_spec(&mut created, &req, false);
        assert_eq!(created["linux"]["namespaces"][1]["path"], "/run/netns/w2");
        assert_eq!(created["hooks"]["prestart"].as_array().map(Vec::len), Some(1));
        assert!(created.get("annotations").is_none(), "a create gets no CRIU configuration");
        let mut restored = spec.clone();
        rewrite_spec(&mut restored, &req, true);
        assert_eq!(restored["annotations"]["org.criu.config"], "/w/criu.conf");
        // Only the annotation: Docker's own network stays as it is.
        let mut only_criu = spec.clone();
        rewrite_spec(&mut only_criu, &Request { netns: None, ..req.clone() }, true);
        assert!(only_criu["linux"]["namespaces"][1].get("path").is_none());
        assert_eq!(only_criu["hooks"]["prestart"].as_array().map(Vec::len), Some(2));
        // A host-network container gets a namespace entry.
        let mut host = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
        rewrite_spec(&mut host, &req, false);
        assert_eq!(host["linux"]["namespaces"][1]["path"], "/run/netns/w2");
    }

    #[test]
    fn prepares_bundles_and_cleans_up_after_a_restore() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wrap = dir.path().join("wrap");
        let bundle = dir.path().join("bundle");
        std::fs::create_dir_all(&bundle).expect("mkdir");
        let spec = serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}});
        std::fs::write(bundle.join("config.json"), spec.to_string()).expect("write");
        let unpacked = dir.path().join("ctrd-checkpoint42");
        std::fs::create_dir_all(&unpacked).expect("mkdir");
        std::fs::write(unpacked.join("descriptors.json"), b"[]").expect("write");
        let call = format!(
            "--ferry-dir {} --root /r restore --image-path {} --bundle {} cid",
            wrap.display(),
            unpacked.display(),
            bundle.display()
        );
        let inv = parse(&args(&call));
        assert_eq!(prepare(&inv), Ok(false), "no request: runc runs untouched");
        let conf = dir.path().join("criu.conf");
        std::fs::write(&conf, b"images-dir /i\n").expect("write");
        let copy = copy_criu_conf(&wrap, "cid", &conf).expect("copy");
        assert_eq!(copy, criu_conf_path(&wrap, "cid"));
        let req = Request { netns: Some("/run/netns/a".into()), criu_config: Some(copy.clone()) };
        assert!(write_request(&wrap, "../x", &req).is_err());
        assert!(copy_criu_conf(&wrap, "../x", &conf).is_err());
        write_request(&wrap, "cid", &req).expect("request");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(request_path(&wrap, "cid")).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(prepare(&inv), Ok(true));
        let text = std::fs::read(bundle.join("config.json")).expect("read");
        let written: serde_json::Value = serde_json::from_slice(&text).expect("json");
        assert_eq!(written["linux"]["namespaces"][0]["path"], "/run/netns/a");
        assert_eq!(written["annotations"]["org.criu.config"], copy.to_string_lossy().as_ref());
        assert!(seen_path(&wrap, "cid").exists());
        after_start(&wrap, "cid");
        assert!(!unpacked.exists(), "containerd's copy of the stub stays");
        assert!(!copy.exists(), "later checkpoints of the container would read the restore's configuration");
        assert!(!seen_path(&wrap, "cid").exists());
        // Docker's later starts and restores of it go to the same namespace, without CRIU's
        // configuration.
        let kept = std::fs::read(request_path(&wrap, "cid")).expect("request");
        let kept: Request = serde_json::from_slice(&kept).expect("json");
        assert_eq!(kept, Request { netns: Some("/run/netns/a".into()), criu_config: None });
        forget(&wrap, "cid");
        assert_eq!(std::fs::read_dir(&wrap).expect("dir").count(), 0);
        // Without a namespace nothing stays.
        write_request(&wrap, "c2", &Request { netns: None, criu_config: Some("/w/c.conf".into()) })
            .expect("request");
        after_start(&wrap, "c2");
        assert_eq!(std::fs::read_dir(&wrap).expect("dir").count(), 0);
    }

    #[test]
    fn leaves_what_is_not_an_unpacked_stub() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = dir.path().join("images");
        std::fs::create_dir_all(other.join("sub")).expect("mkdir");
        remove_unpacked_checkpoint(&other);
        assert!(other.exists());
        let nested = dir.path().join("ctrd-checkpoint7");
        std::fs::create_dir_all(nested.join("sub")).expect("mkdir");
        remove_unpacked_checkpoint(&nested);
        assert!(nested.join("sub").exists(), "a directory with subdirectories is not a stub");
        assert!(!valid_id("../etc") && !valid_id("") && !valid_id(".x") && valid_id("0123abc"));
    }
}
