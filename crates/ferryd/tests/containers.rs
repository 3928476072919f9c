//! Containers of every runtime ferry knows, end to end, against the real runtime (each lab
//! node with its own instance of it: its own state, images and socket), real CRIU and real
//! agents: checkpoint and restore, live migration between lab nodes under 50 TCP clients,
//! refusals before anything is frozen, and clear errors that leave nothing behind.
//!
//! Every scenario is written once, over a runtime kind; `runtime_tests!` at the bottom makes
//! a module of tests per kind. Under CI=true a missing runtime fails its tests (with the
//! reason); elsewhere the privileged tests skip as the others do.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failing test should stop right there

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use ferry_lab::{TestLab, Workload};
use ferry_migrate::api::{Event, MigrateRequest, Report, Request, Strategy};
use ferry_migrate::lab_agents::{self, agent_socket, node_dir};
use ferry_runtime::check::target::TargetFacts;
use ferry_runtime::check::{CheckEnv, CheckOptions};
use ferry_runtime::container::{self, ContainerRuntime, CreateSpec, Endpoints};
use ferry_runtime::{CheckpointRequest, Context, RestoreRequest, WorkloadId};
use ferry_testkit::{poll, require_privileged, try_poll, Probe};

/// One lab at a time: each test moves hundreds of MiB on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

const PORT: u16 = 7000;
const IMAGE_DIR: &str = "/var/cache/ferry/images/busybox";
const IMAGE: &str = "ferry-lab/busybox";
const CTRLOAD: &str = "/opt/ferry/ctrload.py";

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A lab of two nodes with agents, each node with its own instance of runtime `kind` holding
/// the lab's image.
struct Fixture {
    kind: &'static str,
    lab: TestLab,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Fixture {
    fn new(kind: &'static str) -> Option<Fixture> {
        if !require_privileged() {
            return None;
        }
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let built = Command::new(repo().join("scripts/mkrootfs")).arg(IMAGE_DIR).output().unwrap();
        assert!(built.status.success(), "mkrootfs: {}", String::from_utf8_lossy(&built.stderr));
        if kind == "docker" {
            build_docker_wrapper();
        }
        let lab = TestLab::up(2).expect("lab up");
        lab_agents::prepare_stores(lab.lab()).expect("stores");
        let f = Fixture { kind, lab, _serial: serial };
        for node in ["node1", "node2"] {
            let socket = lab_agents::spawn_agent(f.lab.lab(), node, ferryd(), None, &[]).expect("agent");
            assert!(lab_agents::wait_agent(&socket, Duration::from_secs(30)), "agent of {node}");
            if let Err(e) = lab_agents::start_runtime(f.lab.lab(), node, kind) {
                panic!("{kind} does not start on {node}: {e} ({:?})", e.hint());
            }
            f.runtime(node).import_image(Path::new(IMAGE_DIR), IMAGE).expect("import the image");
        }
        Some(f)
    }

    fn image(&self) -> &'static str {
        if self.kind == "runc" {
            IMAGE_DIR
        } else {
            IMAGE
        }
    }

    fn endpoints(&self, node: &str) -> Endpoints {
        let dirs = lab_agents::runtime_dirs(self.lab.lab(), node).unwrap();
        let mut e = Endpoints::new(self.store_dir(node));
        e.set(self.kind, container::instance_endpoint(self.kind, &dirs).unwrap());
        e
    }

    fn store_dir(&self, node: &str) -> PathBuf {
        node_dir(self.lab.config().state_dir(), node).join("store")
    }

    fn runtime(&self, node: &str) -> Box<dyn ContainerRuntime> {
        container::open(self.kind, &self.endpoints(node)).unwrap()
    }

    /// ferry's library over `node`'s store and runtime (as the CLI on that node would be).
    fn ctx(&self, node: &str) -> Context {
        let criu = ferry_criu::Criu::locate(None).unwrap();
        let store = ferry_store::Store::open(self.store_dir(node)).unwrap();
        let mut ctx = Context::new(criu, store).unwrap();
        ctx.endpoints = self.endpoints(node);
        ctx
    }

    /// Starts ctrload (`mib` MiB) in container `name` on `node`, in a lab namespace of its
    /// own; returns once it answers.
    fn start(&mut self, node: &str, name: &str, mib: u32, memory_limit: Option<u64>) -> Workload {
        self.start_with(node, name, mib, memory_limit, Vec::new())
    }

    fn start_with(
        &mut self,
        node: &str,
        name: &str,
        mib: u32,
        memory_limit: Option<u64>,
        mounts: Vec<(String, String)>,
    ) -> Workload {
        let args: Vec<String> =
            ["/usr/bin/python3", CTRLOAD, "--mib", &mib.to_string(), "--port", &PORT.to_string()]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let rt = self.runtime(node);
        let image = self.image();
        let workload = format!("{}:{name}", self.kind);
        let w = self
            .lab
            .lab_mut()
            .exec_container(node, &workload, args.clone(), &mut |netns| {
                let spec = CreateSpec {
                    name,
                    image,
                    args: &args,
                    env: &[],
                    netns: Some(netns),
                    memory_limit,
                    labels: [("ferry.test".to_owned(), "yes".to_owned())].into(),
                    mounts: mounts.clone(),
                };
                rt.create(&spec).map(|r| r.pid).map_err(|e| e.to_string())
            })
            .expect("start the container");
        poll(Duration::from_secs(60), "ctrload to answer", || ask(w.ip, "!stats"));
        w
    }

    fn migrate(&self, from: &str, name: &str, to: &str, strategy: Strategy) -> Result<Report, String> {
        let req = Request::Migrate(MigrateRequest {
            workload: format!("{}:{name}", self.kind),
            to: to.into(),
            strategy,
            ..Default::default()
        });
        let socket = agent_socket(self.lab.config().state_dir(), from);
        match ferry_migrate::client::call(&socket, &req, &mut |_| {}) {
            Ok(Event::Report(r)) => Ok(r),
            Ok(Event::Failed { message, .. }) => Err(message),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    fn exists(&self, node: &str, name: &str) -> bool {
        self.runtime(node).exists(name).unwrap()
    }

    /// What `to` says, through the agents, of container `name` on `from` (`ferry check --to`).
    fn target_facts(&self, from: &str, name: &str, to: &str) -> TargetFacts {
        let criu = ferry_criu::Criu::locate(None).unwrap();
        let id: WorkloadId = format!("{}:{name}", self.kind).parse().unwrap();
        let endpoints = self.endpoints(from);
        let env = CheckEnv { criu: Ok(&criu), endpoints: &endpoints };
        let r = ferry_runtime::check::check(&id, env, CheckOptions::default());
        let record =
            serde_json::to_vec(r.container_record.as_deref().expect("a container's record")).unwrap();
        let req =
            Request::TargetFacts { node: to.into(), cpuinfo: None, container: Some(record), tree: None };
        match ferry_migrate::client::call(
            &agent_socket(self.lab.config().state_dir(), from),
            &req,
            &mut |_| {},
        ) {
            Ok(Event::TargetFacts(facts)) => facts,
            other => panic!("target facts: {other:?}"),
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // The runtimes' containers, daemons and mounts go before the lab does.
        lab_agents::stop_runtimes(self.lab.lab());
    }
}

/// `ferry-runc`, the runtime each node's dockerd runs containers with (a binary of the `ferry`
/// crate, which this test does not build by itself); found beside the test's own binary.
fn build_docker_wrapper() {
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "-p", "ferry", "--bin", "ferry-runc"]);
    if !cfg!(debug_assertions) {
        cargo.arg("--release");
    }
    let out = cargo.current_dir(repo()).output().unwrap();
    assert!(out.status.success(), "cargo build ferry-runc: {}", String::from_utf8_lossy(&out.stderr));
}

/// One request to ctrload; its JSON answer.
fn ask(ip: Ipv4Addr, line: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, PORT)), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).ok()?;
    let json = answer.splitn(3, ' ').nth(2)?;
    serde_json::from_str(json.trim()).ok()
}

fn checkpoint(
    ctx: &Context,
    workload: &str,
    name: &str,
) -> Result<ferry_runtime::CheckpointReport, ferry_runtime::Error> {
    let req = CheckpointRequest {
        workload: workload.parse::<WorkloadId>().unwrap(),
        name: Some(name.into()),
        leave_running: false,
        tcp_established: false,
        keep: None,
        external: Vec::new(),
        lazy_pages: None,
        log_level: None,
        volatile: false,
    };
    ferry_runtime::checkpoint(ctx, &req)
}

/// The memory cgroup limit of `pid`, in bytes.
fn memory_limit_of(pid: i32) -> u64 {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = cgroups
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned()))
        .expect("a memory cgroup");
    let file =
        Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')).join("memory.limit_in_bytes");
    std::fs::read_to_string(&file).unwrap().trim().parse().unwrap()
}

/// What an operation must not leave: CRIU processes of this lab (other developers' may run
/// on the machine: ours hold files under the lab's directories), private tmpfs mounts in a
/// store.
fn assert_nothing_left(f: &Fixture) {
    let dirs = [ferry_lab::data_dir(f.lab.config().state_dir()), f.lab.config().state_dir().to_path_buf()];
    let ours = || -> Vec<i32> {
        let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
        procs
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "criu")
            })
            .filter(|pid| {
                std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten().any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|t| dirs.iter().any(|d| t.starts_with(d)))
                })
            })
            .collect()
    };
    let gone = try_poll(Duration::from_secs(10), || ours().is_empty().then_some(()));
    assert!(gone.is_some(), "criu of this lab still runs: {:?}", ours());
    for node in ["node1", "node2"] {
        let tmp = f.store_dir(node).join("tmp");
        ferry_testkit::assert_no_mounts_under(&tmp);
    }
}

// --- the scenarios, one function each, over a runtime kind ---

/// 512 MiB of random memory, a file written and one deleted after start, a memory limit: all
/// of it as it was after a checkpoint (which removes the container from its runtime) and a
/// restore under a new name, listed by the runtime as running.
fn checkpoint_and_restore(kind: &'static str) {
    let Some(mut f) = Fixture::new(kind) else { return };
    let limit = 768u64 << 20;
    let w = f.start("node1", "web", 512, Some(limit));
    let root = format!("/proc/{}/root", w.pid);
    std::fs::write(format!("{root}/etc/written-after-start"), b"kept\n").unwrap();
    std::fs::remove_file(format!("{root}/bin/vi")).unwrap();
    let before = ask(w.ip, "!sum").unwrap();
    assert_eq!(before["ok"], true);

    let ctx = f.ctx("node1");
    let r = checkpoint(&ctx, &format!("{kind}:web"), "web-ck").expect("checkpoint");
    assert!(r.logical_bytes > 512 << 20, "{} bytes", r.logical_bytes);
    assert!(!f.exists("node1", "web"), "the runtime still lists the checkpointed container");

    let req = RestoreRequest {
        name: "web-ck".into(),
        new_name: Some("web2".into()),
        lazy: false,
        guard: None,
        ..Default::default()
    };
    let restored = ferry_runtime::restore(&ctx, &req).expect("restore");
    assert_eq!(restored.container.as_deref(), Some(format!("{kind}:web2").as_str()));
    assert!(f.exists("node1", "web2"), "the runtime does not list the restored container");
    let after = poll(Duration::from_secs(30), "the restored copy to answer", || ask(w.ip, "!sum"));
    assert_eq!(after["ok"], true, "{after}");
    assert_eq!(after["sha256"], before["sha256"], "the memory came back");
    assert!(after["ticks"].as_u64() >= before["ticks"].as_u64(), "{before} -> {after}");
    let root = format!("/proc/{}/root", restored.pid);
    assert_eq!(std::fs::read(format!("{root}/etc/written-after-start")).unwrap(), b"kept\n");
    assert!(std::fs::symlink_metadata(format!("{root}/bin/vi")).is_err(), "a deleted file came back");
    assert_eq!(memory_limit_of(restored.pid), limit, "the memory limit");
    // The same name is refused while it is taken.
    let again = ferry_runtime::restore(
        &ctx,
        &RestoreRequest {
            name: "web-ck".into(),
            new_name: Some("web2".into()),
            lazy: false,
            guard: None,
            ..Default::default()
        },
    );
    assert!(matches!(again, Err(ferry_runtime::Error::NameTaken { .. })), "{again:?}");
    assert_nothing_left(&f);
}

/// 50 clients send continuously while the container moves to the other node: no error, no
/// lost or duplicated reply, and afterwards only the target's runtime holds it.
fn migrate_under_clients(kind: &'static str, strategy: Strategy) {
    let Some(mut f) = Fixture::new(kind) else { return };
    let w = f.start("node1", "web", 64, None);
    let before = ask(w.ip, "!sum").unwrap();
    let probe = Probe::echo(&repo().join("tools/probe_client.py"), w.ip, PORT, 50);
    std::thread::sleep(Duration::from_secs(3));
    let r = f.migrate("node1", "web", "node2", strategy).expect("migrate");
    assert_eq!(r.new_workload, format!("{kind}:web"));
    let summary = probe.finish(Duration::from_secs(2));
    assert_eq!(summary["conns"], 50, "{summary}");
    for counter in ["errors", "lost", "dup", "wrong"] {
        assert_eq!(summary[counter], 0, "{counter} in {summary}");
    }
    assert!(!f.exists("node1", "web"), "the source runtime still holds the container");
    assert!(f.exists("node2", "web"), "the target runtime does not list the container");
    let after = ask(w.ip, "!sum").unwrap();
    assert_eq!(after["sha256"], before["sha256"]);
    assert_nothing_left(&f);
}

/// Refused before anything is frozen, with the reason: a bind mount whose source the target
/// lacks (the lab's nodes share a filesystem, so the source is taken away after the start).
/// The container runs on where it was, and the target keeps nothing.
fn refuses_missing_bind_source(kind: &'static str) {
    let Some(mut f) = Fixture::new(kind) else { return };
    let shared = tempfile::tempdir().unwrap();
    let src = shared.path().join("data");
    std::fs::create_dir(&src).unwrap();
    let w = f.start_with("node1", "web", 16, None, vec![(src.display().to_string(), "/data".into())]);
    // `ferry check --to`: the target's runtime has nothing against it yet...
    assert_eq!(f.target_facts("node1", "web", "node2").container, Some(Vec::new()));
    let moved = shared.path().join("moved");
    std::fs::rename(&src, &moved).unwrap();
    // ... and names the missing bind source once it is gone, before anything is frozen.
    let problems = f.target_facts("node1", "web", "node2").container.expect("the container judged");
    assert!(problems.iter().any(|p| p.contains(&src.display().to_string())), "{problems:?}");
    let ticks = ask(w.ip, "!stats").unwrap()["ticks"].as_u64().unwrap();
    let err = f.migrate("node1", "web", "node2", Strategy::StopCopy).expect_err("refused");
    assert!(err.contains("/data") && err.contains(&src.display().to_string()), "{err}");
    std::thread::sleep(Duration::from_millis(500));
    let later = ask(w.ip, "!stats").unwrap()["ticks"].as_u64().unwrap();
    assert!(later > ticks + 2, "the container was frozen: {ticks} -> {later} ticks");
    assert!(f.exists("node1", "web") && !f.exists("node2", "web"));
    std::fs::rename(&moved, &src).unwrap();
}

/// A container `ferry check` finds not ready (its process holds an io_uring, which CRIU cannot
/// dump) is refused by the source's agent before anything is frozen, naming the reason.
fn refuses_not_ready(kind: &'static str) {
    let Some(mut f) = Fixture::new(kind) else { return };
    let ring = "import ctypes, time\n\
                libc = ctypes.CDLL(None, use_errno=True)\n\
                params = (ctypes.c_char * 120)()\n\
                fd = libc.syscall(425, 4, params)\n\
                assert fd >= 0, ctypes.get_errno()\n\
                time.sleep(1000)\n";
    let args: Vec<String> = vec!["/usr/bin/python3".into(), "-c".into(), ring.into()];
    let rt = f.runtime("node1");
    let image = f.image();
    let w = f
        .lab
        .lab_mut()
        .exec_container("node1", &format!("{kind}:ring"), args.clone(), &mut |netns| {
            let spec =
                CreateSpec { name: "ring", image, args: &args, netns: Some(netns), ..Default::default() };
            rt.create(&spec).map(|r| r.pid).map_err(|e| e.to_string())
        })
        .expect("start the container");
    let holds_ring = || {
        ferry_sys::process_tree(w.pid).iter().any(|p| {
            std::fs::read_dir(format!("/proc/{p}/fd")).is_ok_and(|d| {
                d.flatten().any(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("io_uring"))
                })
            })
        })
    };
    poll(Duration::from_secs(30), "the container to hold its io_uring", || holds_ring().then_some(()));
    let err = f.migrate("node1", "ring", "node2", Strategy::StopCopy).expect_err("refused");
    assert!(err.contains("not ready") && err.contains("io-uring"), "{err}");
    assert_ne!(ferry_sys::process_state(w.pid), Some('T'), "never frozen");
    assert!(ferry_sys::process_exists(w.pid));
    assert!(f.exists("node1", "ring") && !f.exists("node2", "ring"));
}

/// A missing container and a stopped one get clear errors, and nothing is left behind.
fn clear_errors(kind: &'static str) {
    let Some(mut f) = Fixture::new(kind) else { return };
    let ctx = f.ctx("node1");
    let missing = checkpoint(&ctx, &format!("{kind}:nosuch"), "x1");
    assert!(matches!(missing, Err(ferry_runtime::Error::ContainerNotFound { .. })), "{missing:?}");
    let w = f.start("node1", "web", 16, None);
    ferry_sys::kill(w.pid, ferry_sys::Signal::Kill).unwrap();
    let stopped =
        try_poll(Duration::from_secs(20), || match checkpoint(&ctx, &format!("{kind}:web"), "x2") {
            Err(ferry_runtime::Error::ContainerNotRunning { .. }) => Some(()),
            _ => None,
        });
    assert!(stopped.is_some(), "a stopped container was not reported as such");
    assert!(ctx.store.list().unwrap().0.is_empty(), "a failed checkpoint left one behind");
    assert_nothing_left(&f);
}

/// A runtime whose daemon is down: the error names it and says how to start it.
fn daemon_down(kind: &'static str) {
    let Some(f) = Fixture::new(kind) else { return };
    let dirs = lab_agents::runtime_dirs(f.lab.lab(), "node1").unwrap();
    container::stop_instance(kind, &dirs);
    let err = checkpoint(&f.ctx("node1"), &format!("{kind}:web"), "x").expect_err("refused");
    assert!(matches!(err, ferry_runtime::Error::RuntimeUnavailable(_)), "{err:?}");
    assert!(err.hint().is_some_and(|h| h.contains(kind)), "{:?}", err.hint());
    assert_nothing_left(&f);
}

/// One module of tests per runtime kind.
macro_rules! runtime_tests {
    ($($kind:ident: { $($extra:item)* })*) => {$(
        mod $kind {
            use super::*;

            #[test]
            fn checkpoint_and_restore_keep_memory_files_and_limits() {
                checkpoint_and_restore(stringify!($kind));
            }

            #[test]
            fn refuses_a_missing_bind_source_before_freezing() {
                refuses_missing_bind_source(stringify!($kind));
            }

            #[test]
            fn missing_and_stopped_containers_get_clear_errors() {
                clear_errors(stringify!($kind));
            }

            $($extra)*
        }
    )*};
}

runtime_tests! {
    runc: {
        #[test]
        fn fifty_clients_through_post_copy() {
            migrate_under_clients("runc", Strategy::PostCopy);
        }

        #[test]
        fn fifty_clients_through_stop_copy() {
            migrate_under_clients("runc", Strategy::StopCopy);
        }

        #[test]
        fn a_container_not_ready_is_refused_before_freezing() {
            refuses_not_ready("runc");
        }
    }
    containerd: {
        #[test]
        fn fifty_clients_through_stop_copy() {
            migrate_under_clients("containerd", Strategy::StopCopy);
        }

        #[test]
        fn fifty_clients_through_post_copy() {
            migrate_under_clients("containerd", Strategy::PostCopy);
        }

        #[test]
        fn a_daemon_that_is_down_gets_a_clear_error() {
            daemon_down_test("containerd");
        }

        #[test]
        fn refuses_an_image_the_target_lacks_before_freezing() {
            refuses_missing_image("containerd");
        }

        #[test]
        fn a_container_of_another_namespace_migrates_there() {
            migrate_namespaced("containerd", "prod/web");
        }
    }
    docker: {
        #[test]
        fn fifty_clients_through_pre_copy() {
            migrate_under_clients("docker", Strategy::PreCopy);
        }

        #[test]
        fn fifty_clients_through_post_copy() {
            migrate_under_clients("docker", Strategy::PostCopy);
        }

        #[test]
        fn a_daemon_that_is_down_gets_a_clear_error() {
            daemon_down_test("docker");
        }

        #[test]
        fn refuses_an_image_the_target_lacks_before_freezing() {
            refuses_missing_image("docker");
        }
    }
    podman: {
        #[test]
        fn fifty_clients_through_post_copy() {
            migrate_under_clients("podman", Strategy::PostCopy);
        }

        #[test]
        fn fifty_clients_through_pre_copy() {
            migrate_under_clients("podman", Strategy::PreCopy);
        }

        #[test]
        fn a_daemon_that_is_down_gets_a_clear_error() {
            daemon_down_test("podman");
        }

        #[test]
        fn restart_always_is_not_restarted_and_a_remade_directory_keeps_its_content() {
            podman_restart_policy_and_remade_directory();
        }

        #[test]
        fn refuses_an_image_the_target_lacks_before_freezing() {
            refuses_missing_image("podman");
        }

        #[test]
        fn its_own_export_imports_into_ferry_and_restores() {
            podman_export_imports_and_restores();
        }
    }
}

/// Used by the runtimes with a daemon (in their module of `runtime_tests!`).
#[allow(dead_code)]
fn daemon_down_test(kind: &'static str) {
    daemon_down(kind);
}

/// An image only the source's runtime has (the lab's nodes each have their own image store):
/// refused before anything is frozen, saying which image, and the container runs on.
#[allow(dead_code)]
fn refuses_missing_image(kind: &'static str) {
    let Some(mut f) = Fixture::new(kind) else { return };
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("only-node1");
    let built = Command::new(repo().join("scripts/mkrootfs")).arg(&rootfs).arg("--minimal").output().unwrap();
    assert!(built.status.success(), "mkrootfs: {}", String::from_utf8_lossy(&built.stderr));
    // Content of its own, so that no image of the target matches it by id or layers.
    std::fs::write(rootfs.join("etc/only-node1"), format!("{:?}\n", std::time::SystemTime::now())).unwrap();
    f.runtime("node1").import_image(&rootfs, "ferry-lab/only-node1").expect("import on node1");
    let args: Vec<String> =
        ["/bin/sh", "-c", "while true; do sleep 1; done"].iter().map(|s| s.to_string()).collect();
    let rt = f.runtime("node1");
    let w = f
        .lab
        .lab_mut()
        .exec_container("node1", &format!("{kind}:solo"), args.clone(), &mut |netns| {
            let spec = CreateSpec {
                name: "solo",
                image: "ferry-lab/only-node1",
                args: &args,
                netns: Some(netns),
                ..Default::default()
            };
            rt.create(&spec).map(|r| r.pid).map_err(|e| e.to_string())
        })
        .expect("start the container");
    let err = f.migrate("node1", "solo", "node2", Strategy::StopCopy).expect_err("refused");
    assert!(err.contains("only-node1"), "the refusal names the image: {err}");
    assert!(ferry_sys::process_exists(w.pid), "the container stopped");
    assert_eq!(ferry_sys::process_state(w.pid), Some('S'), "the container is not running freely");
    assert!(f.exists("node1", "solo") && !f.exists("node2", "solo"));
    assert_nothing_left(&f);
}

/// A container named `NAMESPACE/ID` (containerd) moves into the same namespace on the target,
/// and the source's namespace no longer holds it.
#[allow(dead_code)]
fn migrate_namespaced(kind: &'static str, name: &str) {
    let Some(mut f) = Fixture::new(kind) else { return };
    let w = f.start("node1", name, 16, None);
    let before = ask(w.ip, "!sum").unwrap();
    let r = f.migrate("node1", name, "node2", Strategy::PostCopy).expect("migrate");
    assert_eq!(r.new_workload, format!("{kind}:{name}"));
    assert!(!f.exists("node1", name) && f.exists("node2", name));
    let bare = name.rsplit('/').next().unwrap();
    assert!(!f.exists("node2", bare), "restored into another namespace");
    let after = poll(Duration::from_secs(30), "the migrated copy to answer", || ask(w.ip, "!sum"));
    assert_eq!(after["sha256"], before["sha256"]);
    // Checked where it now runs, its own name is no clash (the agent's gate runs this check).
    let criu = ferry_criu::Criu::locate(None).unwrap();
    let endpoints = f.endpoints("node2");
    let id: WorkloadId = format!("{kind}:{name}").parse().unwrap();
    let r = ferry_runtime::check::check(
        &id,
        CheckEnv { criu: Ok(&criu), endpoints: &endpoints },
        CheckOptions::default(),
    );
    assert!(r.blockers().next().is_none(), "{:?}", r.reasons);
    // The target side still sees the name as taken in that namespace.
    let problems = f.target_facts("node2", name, "node2").container.expect("judged");
    assert!(problems.iter().any(|p| p.contains("already")), "{problems:?}");
    assert_nothing_left(&f);
}

/// One call to a Podman API at `socket` (through curl: the test speaks to Podman as its users
/// do, not through ferry's client); the JSON values of the answer (an event stream has several).
fn podman_api(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Vec<serde_json::Value>, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail-with-body", "--unix-socket"]).arg(socket).args(["-X", method]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"]).arg(b.to_string());
    }
    let out = cmd.arg(format!("http://podman/v4.0.0/libpod{path}")).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{method} {path}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{method} {path}: {e}"))
}

/// What `podman container checkpoint --export` writes (the API's `checkpoint?export=true`),
/// `ferry import` takes and `ferry restore` restores under another node's Podman.
fn podman_export_imports_and_restores() {
    let Some(mut f) = Fixture::new("podman") else { return };
    let w = f.start("node1", "web", 32, None);
    let root = format!("/proc/{}/root", w.pid);
    std::fs::write(format!("{root}/etc/written-after-start"), b"kept\n").unwrap();
    let before = ask(w.ip, "!sum").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("web.tar");
    let socket =
        container::instance_endpoint("podman", &lab_agents::runtime_dirs(f.lab.lab(), "node1").unwrap())
            .unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--fail", "--unix-socket"])
        .arg(&socket)
        .args(["-X", "POST", "-o"])
        .arg(&archive)
        .arg("http://podman/v4.0.0/libpod/containers/web/checkpoint?export=true")
        .output()
        .unwrap();
    assert!(out.status.success(), "podman's export: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !ferry_sys::process_exists(w.pid) || ask(w.ip, "!stats").is_none(),
        "podman's checkpoint stops it"
    );

    let ctx = f.ctx("node2");
    let imported =
        ferry_runtime::archive::import(&ctx.store, &archive, Some("web-imported"), &ferry_runtime::Silent)
            .expect("ferry import");
    assert_eq!(imported.checkpoint.manifest.source, "podman:web");
    let restored = ferry_runtime::restore(
        &ctx,
        &RestoreRequest {
            name: "web-imported".into(),
            new_name: None,
            lazy: false,
            guard: None,
            ..Default::default()
        },
    )
    .expect("ferry restore of Podman's archive");
    assert_eq!(restored.container.as_deref(), Some("podman:web"));
    assert!(f.exists("node2", "web"), "node2's Podman does not list the restored container");
    let after = poll(Duration::from_secs(30), "the restored copy to answer", || ask(w.ip, "!sum"));
    assert_eq!(after["sha256"], before["sha256"], "the memory came back");
    let root = format!("/proc/{}/root", restored.pid);
    assert_eq!(std::fs::read(format!("{root}/etc/written-after-start")).unwrap(), b"kept\n");
    assert_nothing_left(&f);
}

/// Podman cannot change a restart policy: a container with `always` that a checkpoint stops
/// must be recorded as stopped by its user (ferry kills it through the API just before CRIU
/// does), or Podman starts a second copy. Its root filesystem has a directory that was
/// removed and made again (opaque in the overlay): Podman's import unpacks the changes before
/// it deletes, so the new content must survive that order.
fn podman_restart_policy_and_remade_directory() {
    // A directory of the image that ctrload does not use.
    const REMADE: &str = "/usr/lib/python3.11/email";
    let Some(mut f) = Fixture::new("podman") else { return };
    let dirs = lab_agents::runtime_dirs(f.lab.lab(), "node1").unwrap();
    let socket = container::instance_endpoint("podman", &dirs).unwrap();
    let script = format!(
        "rm -rf {REMADE} && mkdir {REMADE} && echo remade > {REMADE}/z && exec /usr/bin/python3 {CTRLOAD} --mib 16 --port {PORT}"
    );
    let args = vec!["/bin/sh".to_owned(), "-c".to_owned(), script];
    let w = f
        .lab
        .lab_mut()
        .exec_container("node1", "podman:web", args.clone(), &mut |netns| {
            let body = serde_json::json!({
                "name": "web", "image": format!("localhost/{IMAGE}:latest"), "command": args,
                "netns": {"nsmode": "path", "value": netns}, "cgroup_parent": dirs.cgroup_parent,
                "restart_policy": "always",
            });
            podman_api(&socket, "POST", "/containers/create", Some(&body))?;
            podman_api(&socket, "POST", "/containers/web/start", None)?;
            let ins = podman_api(&socket, "GET", "/containers/web/json", None)?;
            ins[0]["State"]["Pid"].as_i64().map(|p| p as i32).ok_or_else(|| "no pid".to_owned())
        })
        .expect("start the container");
    poll(Duration::from_secs(60), "ctrload to answer", || ask(w.ip, "!stats"));
    let id = podman_api(&socket, "GET", "/containers/web/json", None).unwrap()[0]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = ask(w.ip, "!sum").unwrap();

    // The policy is live in this instance: a container whose init is killed (as CRIU kills a
    // dumped tree) is started again (conmon's exit command finds the instance's state).
    let bystander = serde_json::json!({
        "name": "bystander", "image": format!("localhost/{IMAGE}:latest"), "command": ["/bin/sleep", "1000"],
        "netns": {"nsmode": "none"}, "cgroup_parent": dirs.cgroup_parent, "restart_policy": "always",
    });
    podman_api(&socket, "POST", "/containers/create", Some(&bystander)).unwrap();
    podman_api(&socket, "POST", "/containers/bystander/start", None).unwrap();
    let pid = podman_api(&socket, "GET", "/containers/bystander/json", None).unwrap()[0]["State"]["Pid"]
        .as_i64()
        .unwrap();
    ferry_sys::kill(pid as i32, ferry_sys::Signal::Kill).unwrap();
    poll(Duration::from_secs(20), "podman to restart the killed container", || {
        let c = podman_api(&socket, "GET", "/containers/bystander/json", None).ok()?;
        (c[0]["RestartCount"].as_u64()? >= 1 && c[0]["State"]["Status"] == "running").then_some(())
    });

    let ctx = f.ctx("node1");
    checkpoint(&ctx, "podman:web", "web-ck").expect("checkpoint");
    std::thread::sleep(Duration::from_secs(3));
    assert!(!f.exists("node1", "web"), "podman still lists the checkpointed container");
    assert!(ask(w.ip, "!stats").is_none(), "a copy of the container answers after the checkpoint");
    let filters = query_encode(&format!(r#"{{"container":["{id}"]}}"#));
    let events =
        podman_api(&socket, "GET", &format!("/events?stream=false&filters={filters}"), None).unwrap();
    let actions: Vec<String> = events
        .iter()
        .filter_map(|e| e["Action"].as_str().or(e["Status"].as_str()).map(str::to_owned))
        .collect();
    // Told by ferry (a kill through its API) before CRIU killed it: no second start.
    assert!(actions.iter().any(|a| a == "kill"), "podman was not told: {actions:?}");
    assert_eq!(actions.iter().filter(|a| a.as_str() == "start").count(), 1, "started again: {actions:?}");
    assert!(!actions.iter().any(|a| a == "restart"), "restarted: {actions:?}");
    eprintln!("podman's events of the checkpointed container: {actions:?}");

    let restored = ferry_runtime::restore(
        &ctx,
        &RestoreRequest {
            name: "web-ck".into(),
            new_name: None,
            lazy: false,
            guard: None,
            ..Default::default()
        },
    )
    .expect("restore");
    assert_eq!(restored.container.as_deref(), Some("podman:web"));
    let after = poll(Duration::from_secs(30), "the restored copy to answer", || ask(w.ip, "!sum"));
    assert_eq!(after["sha256"], before["sha256"]);
    let ins = podman_api(&socket, "GET", "/containers/web/json", None).unwrap();
    assert_eq!(ins[0]["Id"], id.as_str(), "the same name keeps the same id");
    assert_eq!(ins[0]["State"]["Status"], "running");
    assert_eq!(ins[0]["HostConfig"]["RestartPolicy"]["Name"], "always");
    let root = format!("/proc/{}/root", restored.pid);
    assert_eq!(
        std::fs::read(format!("{root}{REMADE}/z")).unwrap(),
        b"remade\n",
        "the remade directory's file"
    );
    assert!(
        std::fs::symlink_metadata(format!("{root}{REMADE}/__init__.py")).is_err(),
        "the image's content came back"
    );
    assert!(std::fs::symlink_metadata(format!("{root}/bin/sh")).is_ok());
    assert_nothing_left(&f);
}

/// Percent-encodes a query value.
fn query_encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}
