//! The checkpoint formats people already have, both ways, against real Podman 4 and real CRIU:
//! what `podman container checkpoint --export` writes, `ferry import` takes; what `ferry export
//! --plaintext` writes for a container, `podman container restore --import` restores (and an
//! OCI checkpoint image, `podman container restore IMAGE`); a kubelet (CRI-O) archive imports;
//! hostile archives are refused with nothing left.
//!
//! Podman runs as a private CLI (never the service): its own storage root and run root, a
//! `containers.conf` of the test's (cgroupfs, file locks and events, CNI with no networks), and
//! a runc wrapper with a private `--root`, so that nothing is shared with the host's Podman or
//! another test. Under CI=true a missing Podman fails the tests; elsewhere they skip as the
//! other privileged tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failing test should stop right there

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_runtime::container::{self, CreateSpec, Endpoints, InstanceDirs};
use ferry_testkit::{poll, require_privileged, Ferry};

/// One scenario at a time: each starts containers and CRIU on a shared 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);

const IMAGE_DIR: &str = "/var/cache/ferry/images/busybox";
/// The lab's root file system as a Podman image: the same files as runc's containers see.
const IMAGE: &str = "localhost/ferry-lab/busybox:latest";
const CTRLOAD: &str = "/opt/ferry/ctrload.py";

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Root, CRIU, the lab's image and Podman; `None` (skip) outside CI when one is missing.
fn setup() -> Option<std::sync::MutexGuard<'static, ()>> {
    if !require_privileged() {
        return None;
    }
    let ok = Command::new("podman").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        assert!(!ci, "podman is not installed: the formats tests need it (scripts/setup installs it)");
        eprintln!("skipped: podman is not installed");
        return None;
    }
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let built = Command::new(repo().join("scripts/mkrootfs")).arg(IMAGE_DIR).output().unwrap();
    assert!(built.status.success(), "mkrootfs: {}", String::from_utf8_lossy(&built.stderr));
    Some(serial)
}

fn unique(stem: &str) -> String {
    format!("{stem}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A private Podman: its state under a temporary directory, its run root under /run.
struct Podman {
    state: tempfile::TempDir,
    run: PathBuf,
    /// The cgroup parent of the containers it creates.
    cgroup: String,
    /// Cgroup parents its restored containers went under (their config.dump's).
    parents: RefCell<Vec<String>>,
}

impl Podman {
    fn new() -> Podman {
        let state = tempfile::Builder::new().prefix("ferry-podman-").tempdir().unwrap();
        let run = PathBuf::from(format!("/run/{}", unique("fy-pod")));
        let s = state.path();
        for d in ["storage", "volumes", "net"] {
            fs::create_dir_all(s.join(d)).unwrap();
        }
        for d in ["storage", "libpod", "tmp", "runc"] {
            fs::create_dir_all(run.join(d)).unwrap();
        }
        let wrapper = s.join("runc");
        fs::write(&wrapper, format!("#!/bin/sh\nexec runc --root {} \"$@\"\n", run.join("runc").display()))
            .unwrap();
        Command::new("chmod").arg("755").arg(&wrapper).status().unwrap();
        let path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        fs::write(
            s.join("containers.conf"),
            format!(
                "[containers]\nlog_driver = \"k8s-file\"\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{run}/events.log\"\nlock_type = \"file\"\ntmp_dir = \"{run}/libpod\"\n\
                 volume_path = \"{s}/volumes\"\nimage_copy_tmp_dir = \"{run}/tmp\"\n\
                 conmon_env_vars = [\"PATH={path}\"]\n\
                 [engine.runtimes]\nrunc = [\"{wrapper}\"]\n\
                 [network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{s}/net\"\n\
                 cni_plugin_dirs = [\"/usr/lib/cni\"]\n",
                run = run.display(),
                s = s.display(),
                wrapper = wrapper.display(),
            ),
        )
        .unwrap();
        fs::write(
            s.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}/storage\"\nrunroot = \"{}/storage\"\n",
                s.display(),
                run.display()
            ),
        )
        .unwrap();
        fs::write(s.join("registries.conf"), "unqualified-search-registries = []\n").unwrap();
        let cgroup = format!("/{}", unique("ferry-fmt"));
        Podman { state, run, cgroup, parents: RefCell::new(Vec::new()) }
    }

    fn cmd(&self) -> Command {
        let s = self.state.path();
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(s.join("storage"))
            .arg("--runroot")
            .arg(self.run.join("storage"))
            .args(["--cgroup-manager", "cgroupfs"])
            .env("CONTAINERS_CONF", s.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", s.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", s.join("registries.conf"))
            .env("TMPDIR", self.run.join("tmp"))
            .env("PATH", format!("/usr/local/sbin:{}", std::env::var("PATH").unwrap_or_default()))
            .stdin(Stdio::null());
        c
    }

    fn try_run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs podman; its stdout, trimmed. Panics with its stderr on failure.
    #[track_caller]
    fn run(&self, args: &[&str]) -> String {
        let out = self.try_run(args);
        assert!(
            out.status.success(),
            "podman {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `podman container restore ARGS`; on failure, panics with the errors of CRIU's restore
    /// logs (Podman keeps them in the container's directory).
    #[track_caller]
    fn restore(&self, args: &[&str]) {
        let mut all = vec!["container", "restore"];
        all.extend_from_slice(args);
        let out = self.try_run(&all);
        if out.status.success() {
            return;
        }
        let mut logs = String::new();
        let found =
            Command::new("find").arg(self.state.path()).args(["-name", "restore.log"]).output().unwrap();
        for log in String::from_utf8_lossy(&found.stdout).lines() {
            let text = fs::read_to_string(log).unwrap_or_default();
            logs.push_str(&format!("--- {log}\n"));
            for l in text.lines().filter(|l| l.contains("Error") || l.contains("rror (")) {
                logs.push_str(l);
                logs.push('\n');
            }
        }
        panic!("podman {}: {}\n{logs}", all.join(" "), String::from_utf8_lossy(&out.stderr));
    }

    /// The lab's root file system as image [`IMAGE`].
    fn import_lab_image(&self) {
        let mut tar = Command::new("tar")
            .args(["-C", IMAGE_DIR, "-cf", "-", "."])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = self
            .cmd()
            .args(["import", "--change", "CMD [\"/bin/sh\"]", "-", IMAGE])
            .stdin(Stdio::from(tar.stdout.take().unwrap()))
            .output()
            .unwrap();
        assert!(tar.wait().unwrap().success());
        assert!(out.status.success(), "podman import: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// True if `podman ps` lists container `name` as running.
    fn running(&self, name: &str) -> bool {
        let filter = format!("name=^{name}$");
        let out =
            self.run(&["ps", "--filter", &filter, "--filter", "status=running", "--format", "{{.Names}}"]);
        out.lines().any(|l| l == name)
    }

    /// The tick counter of ctrload in container `name` (0 if not there yet).
    fn ticks(&self, name: &str) -> u64 {
        let out = self.try_run(&["exec", name, "cat", "/tmp/ticks"]);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    }

    fn exists(&self, name: &str, path: &str) -> bool {
        self.try_run(&["exec", name, "test", "-e", path]).status.success()
    }

    /// Also removes cgroup `parent` (a restored container's) when it is dropped.
    fn track_cgroup(&self, parent: &str) {
        self.parents.borrow_mut().push(parent.to_owned());
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.try_run(&["rm", "-a", "-f", "-t", "0"]);
        // conmon and runc of this instance, found by its private run root.
        let run = self.run.to_string_lossy().into_owned();
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
            let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if matches!(comm.trim(), "conmon" | "runc") && cmdline.contains(&run) {
                let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
            }
        }
        let _ = self.try_run(&["system", "reset", "--force"]);
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let state = self.state.path().to_string_lossy().into_owned();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&state) || m.starts_with(&run))
            .collect();
        ours.sort_unstable();
        for m in ours.into_iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let mut parents = self.parents.borrow().clone();
        parents.push(self.cgroup.clone());
        for h in fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
            for p in &parents {
                remove_cgroup_tree(&h.path().join(p.trim_start_matches('/')));
            }
        }
        let _ = fs::remove_dir_all(&self.run);
    }
}

/// rmdir of a cgroup and its children, deepest first (a cgroup with tasks stays).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
        let _ = fs::remove_dir(dir);
    }
}

/// A private runc instance whose containers' bundles live in `ferry`'s store, as the CLI's.
struct Runc {
    dirs: InstanceDirs,
    endpoint: PathBuf,
    store: PathBuf,
}

impl Runc {
    fn new(ferry: &Ferry) -> Runc {
        let dirs = InstanceDirs {
            data: ferry.scratch().join("runc-data"),
            run: PathBuf::from(format!("/run/{}", unique("fy-runc"))),
            netns: None,
            cgroup_parent: String::new(),
        };
        let endpoint = container::start_instance("runc", &dirs).unwrap();
        Runc { dirs, endpoint, store: ferry.store().to_path_buf() }
    }

    fn endpoint_arg(&self) -> String {
        format!("runc={}", self.endpoint.display())
    }

    /// Starts ctrload (8 MiB) in runc container `name`, after changing its root file system:
    /// a new file, a removed directory, and the root's mode made Podman's (0555: CRIU checks
    /// the mode of the root it restores into, and Podman's container roots are 0555).
    fn start_counter(&self, name: &str) {
        let endpoints = Endpoints::new(&self.store).with(&[self.endpoint_arg()]).unwrap();
        let rt = container::open("runc", &endpoints).unwrap();
        let args: Vec<String> = ["/bin/sh", "-c", &counter_script(8)].iter().map(|s| s.to_string()).collect();
        let spec = CreateSpec {
            name,
            image: IMAGE_DIR,
            args: &args,
            labels: [("ferry.test".to_owned(), "formats".to_owned())].into(),
            ..CreateSpec::default()
        };
        rt.create(&spec).unwrap();
        let ticks = self.store.join("runc-bundles").join(name).join("rootfs/tmp/ticks");
        poll(Duration::from_secs(60), "ctrload to tick", || {
            fs::read_to_string(&ticks).ok()?.trim().parse::<u64>().ok().filter(|t| *t >= 3)
        });
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        container::stop_instance("runc", &self.dirs);
        let _ = fs::remove_dir_all(&self.dirs.run);
    }
}

/// A directory of the test's with a lowercase path, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = PathBuf::from(format!("/tmp/{}", unique("ferry-oci")));
        fs::create_dir(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The container's command: root file system changes, then ctrload with `mib` MiB.
fn counter_script(mib: u32) -> String {
    format!(
        "echo formats > /root/new.txt && rmdir /data && chmod 555 / && \
         exec /usr/bin/python3 {CTRLOAD} --mib {mib} --tick 0.1"
    )
}

/// Every member of a tar file: path -> data.
fn members(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut a = tar::Archive::new(fs::File::open(path).unwrap());
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            (String::from_utf8(e.path_bytes().into_owned()).unwrap().trim_start_matches("./").to_owned(), v)
        })
        .collect()
}

/// The files under `checkpoint/` of a listing, by image name.
fn images_of(m: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    m.iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("checkpoint/")?.to_owned(), v.clone())))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// No checkpoint listed, no tmpfs or scratch left in the store.
fn assert_store_clean(ferry: &Ferry) {
    assert!(ferry.list_names().is_empty(), "listed: {:?}", ferry.list_names());
    assert_eq!(fs::read_dir(ferry.tmp_dir()).map(|d| d.count()).unwrap_or(0), 0, "scratch left in STORE/tmp");
    ferry_testkit::assert_no_mounts_under(ferry.store());
}

/// (a) Podman's own export, zstd and uncompressed, imports as a checkpoint of a container.
#[test]
fn a_podman_export_imports_as_a_container_checkpoint() {
    let Some(_serial) = setup() else { return };
    let ferry = ferry();
    let podman = Podman::new();
    podman.import_lab_image();
    let script = counter_script(8);
    podman.run(&[
        "run",
        "-d",
        "--name",
        "counter",
        "--network",
        "none",
        "--cgroup-parent",
        &podman.cgroup,
        "--label",
        "app=counter",
        IMAGE,
        "/bin/sh",
        "-c",
        &script,
    ]);
    poll(Duration::from_secs(60), "ctrload to tick in Podman", || {
        (podman.ticks("counter") >= 3).then_some(())
    });

    let zst = ferry.fresh_path("counter.tar.zst");
    podman.run(&["container", "checkpoint", "--leave-running", "--export", s(&zst), "counter"]);
    let before = podman.ticks("counter");
    let plain = ferry.fresh_path("counter.tar");
    podman.run(&["container", "checkpoint", "--compress", "none", "--export", s(&plain), "counter"]);

    ferry.run(&["import", s(&zst), "--name", "from-zstd"]).assert_ok();
    let out = ferry.run(&["import", s(&plain)]);
    out.assert_ok();
    let names = ferry.list_names();
    let default = names.iter().find(|n| n.starts_with("podman-counter-")).expect("named KIND-NAME-TIME");
    for name in ["from-zstd", default.as_str()] {
        let i = ferry.inspect_json(name);
        let c = &i["container"];
        assert_eq!(c["kind"], "podman", "{i}");
        assert_eq!(c["name"], "counter");
        assert_eq!(c["image"], IMAGE);
        assert_eq!(c["labels"]["app"], "counter");
        assert!(c["rootfs_diff_bytes"].as_u64().unwrap() > 0, "{c}");
        assert!(c["deleted"].as_array().unwrap().iter().any(|d| d == "/data"), "{c}");
        assert!(i["processes"].as_array().unwrap().iter().any(|p| p["comm"] == "python3"), "{i}");
        ferry.run(&["verify", name]).assert_ok();
    }
    let listing = ferry.run(&["list"]);
    assert!(listing.stdout.contains("podman:counter"), "{listing}");

    // The images ferry holds are Podman's, byte for byte; so are the root file system changes.
    let podmans = members(&plain);
    let back = ferry.fresh_path("back.tar");
    ferry.run(&["export", default, "--plaintext", "-o", s(&back)]).assert_ok();
    let ferrys = members(&back);
    assert_eq!(images_of(&ferrys), images_of(&podmans));
    for f in ["rootfs-diff.tar", "deleted.files"] {
        assert_eq!(ferrys.get(f), podmans.get(f), "{f}");
    }

    // And what ferry exports of it, Podman restores: the container goes on where it was.
    podman.run(&["rm", "-f", "counter"]);
    podman.restore(&["--import", s(&back)]);
    assert!(podman.running("counter"), "podman ps lists it running");
    poll(Duration::from_secs(30), "the restored counter to go on", || {
        (podman.ticks("counter") > before).then_some(())
    });
    assert!(podman.exists("counter", "/root/new.txt") && !podman.exists("counter", "/data"));
}

/// (b) A runc container's checkpoint, exported in the clear, restores under Podman.
#[test]
fn a_runc_checkpoint_exported_for_podman_restores_there() {
    let Some(_serial) = setup() else { return };
    let ferry = ferry();
    let podman = Podman::new();
    podman.import_lab_image();
    let runc = Runc::new(&ferry);
    runc.start_counter("web");
    ferry
        .run(&["--runtime-endpoint", &runc.endpoint_arg(), "checkpoint", "runc:web", "--name", "web"])
        .assert_ok();
    let i = ferry.inspect_json("web");
    assert_eq!(i["container"]["kind"], "runc", "{i}");

    // runc has no images: the Podman image of its root must be named.
    let out = ferry.fresh_path("web.tar");
    let refused = ferry.run(&["export", "web", "--plaintext", "-o", s(&out)]);
    refused.assert_error(2).assert_stderr_mentions("--rootfs-image");
    assert!(!out.exists());
    let done = ferry.run(&["export", "web", "--plaintext", "--rootfs-image", IMAGE, "-o", s(&out)]);
    done.assert_ok().assert_stderr_mentions("warning");
    let m = members(&out);
    for want in [
        "config.dump",
        "spec.dump",
        "checkpoint/inventory.img",
        "checkpoint/descriptors.json",
        "rootfs-diff.tar",
        "deleted.files",
        "stats-dump",
        "ferry/manifest.fmf",
        "ferry/ferry-container.json",
    ] {
        assert!(m.contains_key(want), "{want} missing: {:?}", m.keys().collect::<Vec<_>>());
    }
    assert!(!m.contains_key("checkpoint/ferry-container.json"));
    let config: serde_json::Value = serde_json::from_slice(&m["config.dump"]).unwrap();
    assert_eq!(config["rootfsImageName"], IMAGE);
    if let Some(parent) = config["cgroupParent"].as_str() {
        podman.track_cgroup(parent);
    }
    // ferry takes its own plaintext export back as it was: the signed manifest's images.
    ferry.run(&["import", s(&out), "--name", "web-again"]).assert_ok();
    ferry.run(&["verify", "web-again"]).assert_ok();
    let again = ferry.inspect_json("web-again");
    assert_eq!(again["container"], i["container"], "the same container, record and changes");
    assert_eq!(again["source"], "runc:web");

    let t = Instant::now();
    podman.restore(&["--import", s(&out)]);
    eprintln!("podman restored ferry's export in {:.2}s", t.elapsed().as_secs_f64());
    assert!(podman.running("web"), "podman ps lists it running");
    let at_restore = podman.ticks("web");
    assert!(at_restore >= 3, "the counter kept its count ({at_restore})");
    poll(Duration::from_secs(30), "the counter to go on under Podman", || {
        (podman.ticks("web") > at_restore).then_some(())
    });
    assert!(podman.exists("web", "/root/new.txt") && !podman.exists("web", "/data"));
}

/// The CRIU images, runc's descriptors and root file system changes of a real checkpoint of a
/// runc container (a plaintext export's members).
fn real_images(ferry: &Ferry, runc: &Runc, name: &str) -> BTreeMap<String, Vec<u8>> {
    runc.start_counter(name);
    ferry
        .run(&[
            "--runtime-endpoint",
            &runc.endpoint_arg(),
            "checkpoint",
            &format!("runc:{name}"),
            "--name",
            name,
        ])
        .assert_ok();
    let out = ferry.fresh_path("real.tar");
    ferry.run(&["export", name, "--plaintext", "--rootfs-image", "x", "-o", s(&out)]).assert_ok();
    ferry.run(&["rm", name]).assert_ok();
    members(&out)
}

/// A tar in `dir` named `file`, of `entries` (a path ending in `/` is a directory).
fn write_tar(path: &Path, entries: &[(&str, &[u8])]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        if name.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
        }
        h.set_mtime(1_796_590_000);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.finish().unwrap();
}

/// `config.dump` and `spec.dump` as CRI-O writes them for a kubelet checkpoint of container
/// `counter` of pod `counters` in namespace `default`.
fn crio_dumps(spec_of_runc: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::json!({
        "id": "6b2c5e1f0b0e4f6a9d7c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e",
        "name": "k8s_counter_counters_default_2f1c7a3e-0d6b-4e8a-9c5d-1b2a3c4d5e6f_0",
        "rootfsImage": "busybox",
        "rootfsImageRef": "3f57d9401f8d42f986df300f0c69192fc41da28ccc8d797829467780db3dd741",
        "rootfsImageName": "docker.io/library/busybox:latest",
        "runtime": "runc",
        "createdTime": "2026-12-06T20:00:00Z",
        "checkpointedTime": "2026-12-06T21:00:00Z",
        "restoredTime": "0001-01-01T00:00:00Z",
        "restored": false,
    });
    let mut spec: serde_json::Value = serde_json::from_slice(spec_of_runc).unwrap();
    spec["linux"]["namespaces"] = serde_json::json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
        {"type": "network", "path": "/var/run/netns/7d6c2a9e-1f3b-4c5d-8e9f-0a1b2c3d4e5f"}
    ]);
    let labels = serde_json::json!({
        "io.kubernetes.container.name": "counter", "io.kubernetes.pod.name": "counters",
        "io.kubernetes.pod.namespace": "default"
    });
    spec["annotations"] = serde_json::json!({
        "io.container.manager": "cri-o",
        "io.kubernetes.container.name": "counter",
        "io.kubernetes.pod.name": "counters",
        "io.kubernetes.pod.namespace": "default",
        "io.kubernetes.cri-o.IP.0": "10.85.0.12",
        "io.kubernetes.cri-o.Labels": labels.to_string(),
        "io.kubernetes.cri-o.Metadata": "{\"name\":\"counter\"}",
        "io.kubernetes.cri-o.ContainerType": "container",
    });
    (serde_json::to_vec(&config).unwrap(), serde_json::to_vec(&spec).unwrap())
}

/// (c) A kubelet checkpoint archive (CRI-O's layout, under .../kubelet/checkpoints/) imports.
#[test]
fn a_kubelet_checkpoint_archive_imports() {
    let Some(_serial) = setup() else { return };
    let ferry = ferry();
    let runc = Runc::new(&ferry);
    let real = real_images(&ferry, &runc, "kube");
    let (config, spec) = crio_dumps(&real["spec.dump"]);
    let dir = ferry.scratch().join("var/lib/kubelet/checkpoints");
    fs::create_dir_all(&dir).unwrap();
    let archive = dir.join("checkpoint-counters_default-counter-2026-12-06T21:00:00Z.tar");
    // Member for member as CRI-O's exportCheckpoint tars them (its container directory, with
    // the log under its annotation's name).
    let mut entries: Vec<(&str, &[u8])> = vec![
        ("./", b""),
        ("stats-dump", b"\x00"),
        ("dump.log", b"(00.000000) Dumping finished successfully\n"),
        ("checkpoint/", b""),
    ];
    let images: Vec<(String, Vec<u8>)> =
        images_of(&real).into_iter().map(|(k, v)| (format!("checkpoint/{k}"), v)).collect();
    entries.extend(images.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    entries.extend([
        ("config.dump", config.as_slice()),
        ("spec.dump", spec.as_slice()),
        ("bind.mounts", b"[]".as_slice()),
        ("rootfs-diff.tar", real["rootfs-diff.tar"].as_slice()),
        ("deleted.files", real["deleted.files"].as_slice()),
        ("io.kubernetes.cri-o.LogPath", b"2026-12-06T21:00:00Z stdout F tick\n".as_slice()),
    ]);
    write_tar(&archive, &entries);

    ferry.run(&["import", s(&archive)]).assert_ok();
    let names = ferry.list_names();
    let name = names.iter().find(|n| n.starts_with("podman-counter-")).expect("imported");
    let i = ferry.inspect_json(name);
    let c = &i["container"];
    assert_eq!(c["kind"], "podman", "{i}");
    assert_eq!(c["name"], "counter");
    assert_eq!(c["image"], "docker.io/library/busybox:latest");
    assert_eq!(c["labels"]["io.kubernetes.pod.name"], "counters");
    assert_eq!(c["network"]["ip"], "10.85.0.12");
    assert_eq!(c["network"]["external"], true);
    assert!(c["rootfs_diff_bytes"].as_u64().unwrap() > 0);
    assert_eq!(c["deleted"], serde_json::json!(["/data"]));
    assert!(c["spec"]["annotations"].get("org.criu.config").is_none());
    assert!(i["processes"].as_array().unwrap().iter().any(|p| p["comm"] == "python3"), "{i}");
    ferry.run(&["verify", name]).assert_ok();
}

/// (d) An OCI checkpoint image: refused without --plaintext; `podman load` and `podman
/// container restore IMAGE` restore it; also as a layout directory (`podman pull oci:DIR`).
#[test]
fn an_oci_checkpoint_image_restores_under_podman() {
    let Some(_serial) = setup() else { return };
    let ferry = ferry();
    let podman = Podman::new();
    podman.import_lab_image();
    let runc = Runc::new(&ferry);
    runc.start_counter("img");
    ferry
        .run(&["--runtime-endpoint", &runc.endpoint_arg(), "checkpoint", "runc:img", "--name", "img"])
        .assert_ok();

    let out = ferry.fresh_path("img.oci.tar");
    let refused = ferry.run(&["export", "img", "--oci-image", "--rootfs-image", IMAGE, "-o", s(&out)]);
    refused.assert_error(2).assert_stderr_mentions("--plaintext");
    assert!(!out.exists());
    let done =
        ferry.run(&["export", "img", "--oci-image", "--plaintext", "--rootfs-image", IMAGE, "-o", s(&out)]);
    done.assert_ok().assert_stderr_mentions("warning");
    let reference = "localhost/ferry/img:latest";
    assert!(done.stdout.contains(reference), "{done}");

    let loaded = podman.run(&["load", "-i", s(&out)]);
    assert!(loaded.contains(reference), "{loaded}");
    let annotations = podman.run(&["image", "inspect", reference, "--format", "{{json .Annotations}}"]);
    let annotations: serde_json::Value = serde_json::from_str(&annotations).unwrap();
    assert_eq!(annotations["io.podman.annotations.checkpoint.name"], "img");
    assert_eq!(annotations["io.podman.annotations.checkpoint.runtime.name"], "runc");
    assert_eq!(annotations["io.podman.annotations.checkpoint.rootfsImageName"], IMAGE);
    let m = members(&out);
    let layer = m.keys().find(|k| k.starts_with("blobs/sha256/") && m[*k].len() > 4096).unwrap();
    let layer_path = ferry.fresh_path("layer.tar");
    fs::write(&layer_path, &m[layer]).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&members(&layer_path)["config.dump"]).unwrap();
    if let Some(parent) = config["cgroupParent"].as_str() {
        podman.track_cgroup(parent);
    }

    podman.restore(&[reference]);
    assert!(podman.running("img"), "podman ps lists it running");
    let at_restore = podman.ticks("img");
    assert!(at_restore >= 3, "the counter kept its count ({at_restore})");
    poll(Duration::from_secs(30), "the counter to go on", || {
        (podman.ticks("img") > at_restore).then_some(())
    });

    // As a directory: the layout itself. Podman names an image pulled from an OCI layout
    // directory after the directory's path, so that path must be lowercase.
    podman.run(&["rm", "-f", "img"]);
    podman.run(&["rmi", reference]);
    let parent = Scratch::new();
    let dir = parent.0.join("img-layout");
    let arg = format!("{}/", dir.display());
    let done =
        ferry.run(&["export", "img", "--oci-image", "--plaintext", "--rootfs-image", IMAGE, "-o", &arg]);
    done.assert_ok();
    assert!(dir.join("index.json").is_file() && dir.join("oci-layout").is_file());
    let hint = done.stdout.lines().find(|l| l.starts_with("image ")).expect("the image's id");
    let id = hint.split_whitespace().nth(1).unwrap().to_owned();
    podman.run(&["pull", &format!("oci:{}", dir.display())]);
    podman.restore(&[&id]);
    assert!(podman.running("img"), "podman ps lists it running");
}

/// (e) Hostile archives: refused with a clear error (exit 6), nothing left anywhere.
#[test]
fn hostile_container_archives_are_refused_and_leave_nothing() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let config =
        br#"{"id": "54afcbe79e1572275246f2d32624812d396ea9410d849d1d5f1c2ecf8dab407b", "name": "web",
        "rootfsImageName": "localhost/web:latest", "rootfsImageID": "localhost/web:latest"}"#;
    let spec = br#"{"ociVersion": "1.0.2", "process": {"args": ["/bin/sh"]}, "annotations": {"io.container.manager": "libpod"}}"#;
    let diff_path = ferry.fresh_path("diff.tar");
    let tar_with = |name: &[u8], link: &[u8], kind: tar::EntryType| -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        let data: &[u8] = if kind == tar::EntryType::Regular { b"pwned" } else { b"" };
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
        b.into_inner().unwrap()
    };
    let good_diff = tar_with(b"root/new.txt", b"", tar::EntryType::Regular);
    let escaping = tar_with(b"../../../evil", b"", tar::EntryType::Regular);
    let absolute = tar_with(b"/etc/evil", b"", tar::EntryType::Regular);
    let hardlink = tar_with(b"root/x", b"../../etc/shadow", tar::EntryType::Link);
    let device = tar_with(b"dev/sda", b"", tar::EntryType::Block);
    let big = vec![b' '; (1 << 20) + 1];
    let bad_labels = br#"{"id": "abc", "name": "web", "labels": {"a": ["not", "a", "string"]}}"#;
    let bad_name = br#"{"id": "abc", "name": "../../etc"}"#;
    /// A case: its label, the members it adds (or, named `NAME!`, replaces), what the error says.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a [u8])>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("rootfs-diff.tar climbs out", vec![("rootfs-diff.tar", &escaping)], "not a plain path"),
        ("rootfs-diff.tar absolute", vec![("rootfs-diff.tar", &absolute)], "not a plain path"),
        ("rootfs-diff.tar hard link out", vec![("rootfs-diff.tar", &hardlink)], "not a plain path"),
        ("rootfs-diff.tar device", vec![("rootfs-diff.tar", &device)], "block device"),
        (
            "deleted.files climbs out",
            vec![("deleted.files", br#"["/../../etc/passwd"]"#)],
            "not a plain path",
        ),
        ("deleted.files not a list", vec![("deleted.files", br#"{"a": 1}"#)], "deleted.files"),
        ("oversized config.dump", vec![("config.dump!", &big)], "cap"),
        ("config.dump not JSON", vec![("config.dump!", b"{\"id\": ")], "config.dump"),
        ("spec.dump not JSON", vec![("spec.dump!", b"[1, 2")], "spec.dump"),
        ("labels of another type", vec![("config.dump!", bad_labels)], "labels"),
        ("name with a path", vec![("config.dump!", bad_name)], "name"),
        ("volume content", vec![("volumes/data.tar", b"x")], "volumes"),
        ("image path climbs out", vec![("checkpoint/../../evil", b"x")], "'..'"),
    ];
    for (label, extra, why) in cases {
        // A Podman archive with the case's members replacing (NAME!) or joining the base ones.
        let replaced = |n: &str| extra.iter().any(|(e, _)| e.trim_end_matches('!') == n);
        let mut entries: Vec<(&str, &[u8])> = Vec::new();
        if !replaced("config.dump") {
            entries.push(("config.dump", config));
        }
        if !replaced("spec.dump") {
            entries.push(("spec.dump", spec));
        }
        entries.extend([
            ("checkpoint/", &b""[..]),
            ("checkpoint/inventory.img", b"inv"),
            ("checkpoint/pages-1.img", &[7u8; 4096]),
        ]);
        if !replaced("rootfs-diff.tar") {
            entries.push(("rootfs-diff.tar", &good_diff));
        }
        let raw_header = label == "image path climbs out";
        if !raw_header {
            entries.extend(extra.iter().map(|(n, d)| (n.trim_end_matches('!'), *d)));
        }
        let path = ferry.fresh_path("hostile.tar");
        if raw_header {
            // The tar crate's builder refuses '..': write that header by hand.
            let mut bytes = tar_with(b"checkpoint/../../evil", b"", tar::EntryType::Regular);
            bytes.truncate(bytes.len() - 1024);
            let mut rest = Vec::new();
            write_tar(&diff_path, &entries);
            fs::File::open(&diff_path).unwrap().read_to_end(&mut rest).unwrap();
            bytes.extend_from_slice(&rest);
            fs::write(&path, bytes).unwrap();
        } else {
            write_tar(&path, &entries);
        }
        let out = ferry.run(&["import", s(&path), "--name", "victim"]);
        out.assert_error(6);
        assert!(out.stderr_mentions(why), "{label}: {out}");
        assert_store_clean(&ferry);
        for near in [ferry.store().join("evil"), ferry.scratch().join("evil"), PathBuf::from("/etc/evil")] {
            assert!(!near.exists(), "{label}: {} was written", near.display());
        }
    }
}

/// Export and import of a container holding 512 MiB, ferry's and Podman's own, in one run:
/// `cargo test -p ferry --test formats -- --ignored --nocapture timings`.
#[test]
#[ignore = "a measurement: run it on purpose"]
fn timings_of_a_512_mib_container() {
    let Some(_serial) = setup() else { return };
    let ferry = ferry();
    let podman = Podman::new();
    podman.import_lab_image();
    let args = format!("exec /usr/bin/python3 {CTRLOAD} --mib 512 --tick 0.1");
    podman.run(&[
        "run",
        "-d",
        "--name",
        "big",
        "--network",
        "none",
        "--cgroup-parent",
        &podman.cgroup,
        IMAGE,
        "/bin/sh",
        "-c",
        &args,
    ]);
    let sum = |name: &str| -> serde_json::Value {
        // Podman 4.3.1 restores a `--network none` container into a namespace whose loopback
        // is down: bring it up from outside, as the container may not.
        let pid = podman.run(&["inspect", name, "--format", "{{.State.Pid}}"]);
        let _ = Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["ip", "link", "set", "lo", "up"])
            .status();
        let py = "import socket,json;s=socket.create_connection(('127.0.0.1',7000));s.sendall(b'!sum\\n');\
                  print(s.makefile().readline().split(' ',2)[2])";
        let out = podman.try_run(&["exec", name, "/usr/bin/python3", "-c", py]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    poll(Duration::from_secs(180), "512 MiB to be filled", || (sum("big")["ok"] == true).then_some(()));
    let timed = |what: &str, f: &mut dyn FnMut()| -> f64 {
        let t = Instant::now();
        f();
        let secs = t.elapsed().as_secs_f64();
        eprintln!("{what:<58} {secs:>7.2} s");
        secs
    };
    let zst = ferry.fresh_path("big.tar.zst");
    let raw = ferry.fresh_path("big.tar");
    timed("podman container checkpoint --export (zstd, leave running)", &mut || {
        podman.run(&["container", "checkpoint", "--leave-running", "--export", s(&zst), "big"]);
    });
    timed("podman container checkpoint --export --compress none", &mut || {
        podman.run(&["container", "checkpoint", "--compress", "none", "--export", s(&raw), "big"]);
    });
    let ok = |args: &[&str]| {
        ferry.run(args).assert_ok();
    };
    timed("ferry import (podman's zstd archive)", &mut || ok(&["import", s(&zst), "--name", "bigz"]));
    timed("ferry import (podman's uncompressed archive)", &mut || ok(&["import", s(&raw), "--name", "big"]));
    let back = ferry.fresh_path("back.tar");
    timed("ferry export --plaintext", &mut || ok(&["export", "big", "--plaintext", "-o", s(&back)]));
    let sealed = ferry.fresh_path("sealed.tar");
    timed("ferry export (encrypted)", &mut || ok(&["export", "big", "-o", s(&sealed)]));
    timed("ferry import (ferry's encrypted archive)", &mut || ok(&["import", s(&sealed), "--name", "big2"]));
    let image = ferry.fresh_path("big.oci.tar");
    timed("ferry export --oci-image --plaintext", &mut || {
        ok(&["export", "big", "--oci-image", "--plaintext", "-o", s(&image)])
    });
    podman.run(&["rm", "-f", "big"]);
    timed("podman container restore --import (podman's archive)", &mut || {
        podman.run(&["container", "restore", "--import", s(&raw)]);
    });
    assert_eq!(sum("big")["ok"], true, "memory intact after Podman's own round trip");
    podman.run(&["rm", "-f", "big"]);
    timed("podman container restore --import (ferry's export)", &mut || {
        podman.run(&["container", "restore", "--import", s(&back)]);
    });
    assert_eq!(sum("big")["ok"], true, "memory intact after ferry's export");
    podman.run(&["rm", "-f", "big"]);
    timed("podman load + container restore IMAGE (ferry's OCI image)", &mut || {
        podman.run(&["load", "-i", s(&image)]);
        podman.run(&["container", "restore", "localhost/ferry/big:latest"]);
    });
    assert_eq!(sum("big")["ok"], true, "memory intact after ferry's OCI image");
    for p in [&zst, &raw, &back, &sealed, &image] {
        eprintln!(
            "{:<58} {:>7.1} MiB",
            p.file_name().unwrap().to_string_lossy(),
            fs::metadata(p).unwrap().len() as f64 / (1 << 20) as f64
        );
    }
}
