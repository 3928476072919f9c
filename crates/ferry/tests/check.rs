//! `ferry check` on real processes built to hold one thing it judges, and the gate before
//! `ferry checkpoint`: each verdict is set against what CRIU really does with the workload
//! (a blocker's forced checkpoint fails and leaves the workload running; a ready or caveated
//! workload checkpoints and restores, and its count goes on).

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_runtime::container::{self, ContainerRuntime, CreateSpec, Endpoints};
use ferry_sys::process_exists;
use ferry_testkit::{
    assert_not_stopped, poll, require_privileged, Ferry, Isolation, Outcome, Sample, Workload, WAIT,
};
use serde_json::Value;

/// `ferry check` exits 11 when the workload is not ready (and checkpoint refuses it so).
const NOT_READY: i32 = 11;

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

fn check(ferry: &Ferry, pid: i32, extra: &[&str]) -> (Outcome, Value) {
    let target = format!("pid:{pid}");
    let mut args = vec!["check", target.as_str(), "--json"];
    args.extend_from_slice(extra);
    let outcome = ferry.run(&args);
    let report = serde_json::from_str(&outcome.stdout)
        .unwrap_or_else(|e| panic!("check --json printed no JSON ({e})\n{outcome}"));
    (outcome, report)
}

/// The severity of reason `code` in `report`, if it has one.
fn severity(report: &Value, code: &str) -> Option<String> {
    report["reasons"]
        .as_array()?
        .iter()
        .find(|r| r["code"] == code)
        .and_then(|r| r["severity"].as_str().map(str::to_owned))
}

fn start(hazard: &'static str, isolation: Isolation) -> Workload {
    let w = Workload::start(Sample::Hazard(hazard), isolation)
        .unwrap_or_else(|e| panic!("start the {hazard} workload: {e}"));
    w.wait_counts(w.pid(), 2);
    w
}

/// The workload holds `code`, a blocker: check says not ready (exit 11), checkpoint refuses it
/// before freezing anything, and with --force CRIU's dump really fails and lets it run on.
fn blocker_agrees(hazard: &'static str, code: &str, isolation: Isolation) {
    let w = start(hazard, isolation);
    blocker_agrees_at(&w, w.pid(), hazard, code, &[]);
}

/// [`blocker_agrees`] for the tree rooted at `pid`, a process of workload `w`, checked and
/// checkpointed with `flags`.
fn blocker_agrees_at(w: &Workload, pid: i32, hazard: &str, code: &str, flags: &[&str]) {
    let ferry = ferry();
    let (outcome, report) = check(&ferry, pid, flags);
    assert_eq!(outcome.code, Some(NOT_READY), "{outcome}");
    assert_eq!(report["verdict"], "not-ready", "{report:#}");
    assert_eq!(severity(&report, code).as_deref(), Some("blocker"), "{report:#}");
    assert!(report["score"].as_u64().is_some_and(|s| s <= 40), "{report:#}");

    let refused = ferry.checkpoint(pid, hazard, flags);
    refused.assert_error(NOT_READY).assert_stderr_mentions(code).assert_stderr_mentions("--force");
    // Refused before CRIU ran: nothing was frozen.
    assert!(refused.log_path().is_none(), "{refused}");
    let before = w.counts(pid).len();
    w.wait_counts(pid, before + 1);

    let forced = ferry.checkpoint(pid, hazard, &[flags, &["--force"]].concat());
    assert!(forced.code.is_some_and(|c| c != 0 && c != NOT_READY), "CRIU should fail on {hazard}\n{forced}");
    if hazard == "traced" {
        // Its child is traced by design: only the root must not be left stopped.
        assert!(!matches!(ferry_sys::process_state(pid), Some('T' | 't')), "{hazard} left stopped");
    } else {
        assert_not_stopped(pid);
    }
    let before = w.counts(pid).len();
    w.wait_counts(pid, before + 1);
    assert!(ferry.list_names().is_empty(), "a failed checkpoint is not listed");
}

/// The workload holds `code`, a caveat: check says ready with caveats (exit 0), and the
/// checkpoint (no --force) and the restore work; the restored copy counts on.
fn caveat_agrees(hazard: &'static str, code: &str, isolation: Isolation) {
    caveat_agrees_with(hazard, code, isolation, &[]);
}

/// [`caveat_agrees`], checking and checkpointing with `flags`.
fn caveat_agrees_with(hazard: &'static str, code: &str, isolation: Isolation, flags: &[&str]) {
    let ferry = ferry();
    let mut w = start(hazard, isolation);
    let (outcome, report) = check(&ferry, w.pid(), flags);
    outcome.assert_ok();
    assert_eq!(report["verdict"], "ready-with-caveats", "{report:#}");
    assert_eq!(severity(&report, code).as_deref(), Some("caveat"), "{report:#}");
    checkpoint_and_restore(&ferry, &mut w, hazard, flags);
}

fn checkpoint_and_restore(ferry: &Ferry, w: &mut Workload, name: &str, extra: &[&str]) {
    ferry.checkpoint(w.pid(), name, extra).assert_ok();
    // A host-isolated workload is its own launcher: reaped, so that its pid is free again.
    assert!(w.reap_launcher(), "the checkpointed workload's launcher did not exit");
    poll(WAIT, "the checkpointed workload to be stopped", || (!process_exists(w.pid())).then_some(()));
    let last = *w.counts(w.pid()).last().expect("counts before the checkpoint");
    // A copy restored under the same host pid (host isolation) starts a fresh count file.
    std::fs::rename(w.path("counter", w.pid()), w.dir().join("counts-before")).expect("move counts aside");
    let pid = ferry.restore_ok(name, w);
    // The restored copy reports under its new host pid, from the count after the last one.
    let after = w.wait_counts(pid, 2);
    assert_eq!(after[0], last + 1, "counts after restore {after:?}, last before {last}");
}

#[test]
fn a_plain_workload_is_ready_and_checkpoints() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let mut w = start("none", Isolation::PidNamespace);
    let (outcome, report) = check(&ferry, w.pid(), &[]);
    outcome.assert_ok();
    assert_eq!(report["verdict"], "ready", "{report:#}");
    assert_eq!(report["score"], 100);
    assert_eq!(report["pid"], w.pid());
    assert_eq!(report["processes"], 1);
    assert!(severity(&report, "criu").is_some() && severity(&report, "kernel").is_some(), "{report:#}");
    checkpoint_and_restore(&ferry, &mut w, "plain", &[]);
}

/// Started as the lab starts workloads (`unshare --pid --net --fork`): the launcher waiting for
/// the namespace's init shares its network namespace from outside the tree. That is no caveat
/// (the checkpoint and restore go as for any workload), only an info line naming the launcher.
#[test]
fn a_launcher_sharing_the_network_namespace_is_no_caveat() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let mut w = start("none", Isolation::PidAndNetNamespace);
    let (outcome, report) = check(&ferry, w.pid(), &[]);
    outcome.assert_ok();
    assert_eq!(report["verdict"], "ready", "{report:#}");
    assert_eq!(severity(&report, "shared-namespace"), None, "{report:#}");
    assert_eq!(severity(&report, "namespace-launcher").as_deref(), Some("info"), "{report:#}");
    checkpoint_and_restore(&ferry, &mut w, "launched", &[]);
}

#[test]
fn an_aio_ring_is_ready_and_checkpoints() {
    // `/[aio] (deleted)` in the maps is no deleted file (zdtm's aio00 was "not ready" and passed).
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let mut w = start("aio", Isolation::PidNamespace);
    let (outcome, report) = check(&ferry, w.pid(), &[]);
    outcome.assert_ok();
    assert_eq!(report["verdict"], "ready", "{report:#}");
    checkpoint_and_restore(&ferry, &mut w, "aio", &[]);
}

#[test]
fn io_uring_blocks() {
    if require_privileged() {
        blocker_agrees("io_uring", "io-uring", Isolation::PidNamespace);
    }
}

#[test]
fn perf_event_blocks() {
    if require_privileged() {
        blocker_agrees("perf_event", "perf-event", Isolation::PidNamespace);
    }
}

#[test]
fn bpf_map_blocks() {
    if require_privileged() {
        blocker_agrees("bpf_map", "bpf", Isolation::PidNamespace);
    }
}

#[test]
fn device_blocks() {
    // /dev/kvm (or /dev/fuse): a misc device CRIU does not dump.
    if require_privileged() {
        blocker_agrees("device", "device", Isolation::PidNamespace);
    }
}

#[test]
fn tun_in_the_host_network_namespace_blocks() {
    // CRIU: "Net namespace is required to dump tun link", even for a tun with no interface.
    if require_privileged() {
        blocker_agrees("tun", "tun", Isolation::PidNamespace);
    }
}

#[test]
fn controlling_terminal_outside_blocks() {
    // Host isolation: the terminal's master is held by a process reparented out of the tree.
    if require_privileged() {
        blocker_agrees("ctty_external", "terminal", Isolation::Host);
    }
}

#[test]
fn fanotify_is_a_caveat_and_checkpoints() {
    if require_privileged() {
        caveat_agrees("fanotify", "fanotify", Isolation::PidNamespace);
    }
}

#[test]
fn half_closed_tcp_is_a_caveat_and_checkpoints_with_the_flag() {
    if !require_privileged() {
        return;
    }
    // FIN_WAIT2 and CLOSE_WAIT: without the flag CRIU would refuse them, and so does the gate.
    let ferry = ferry();
    let w = start("tcp_half_closed", Isolation::PidNamespace);
    ferry.checkpoint(w.pid(), "half", &[]).assert_error(NOT_READY).assert_stderr_mentions("tcp-transient");
    drop(w);
    caveat_agrees_with("tcp_half_closed", "tcp-transient", Isolation::PidNamespace, &["--tcp-established"]);
}

#[test]
fn a_closed_connection_blocks_without_the_flag_and_restores_with_it() {
    if !require_privileged() {
        return;
    }
    // Closed on both sides, sockets still open: CRIU dumps them whatever the flags and, without
    // --tcp-established, its restore refuses them (found by the zdtm sweep, docs/check.md).
    let ferry = ferry();
    let mut w = start("tcp_closed", Isolation::PidNamespace);
    let (outcome, report) = check(&ferry, w.pid(), &["--tcp-established=false"]);
    assert_eq!(outcome.code, Some(NOT_READY), "{outcome}");
    assert_eq!(severity(&report, "tcp-closed").as_deref(), Some("blocker"), "{report:#}");
    let (outcome, report) = check(&ferry, w.pid(), &[]);
    outcome.assert_ok();
    assert_eq!(severity(&report, "tcp-closed").as_deref(), Some("caveat"), "{report:#}");
    let (_, asked) = check(&ferry, w.pid(), &["--tcp-established"]);
    assert_eq!(asked["verdict"], "ready", "{asked:#}");
    ferry.checkpoint(w.pid(), "closed", &[]).assert_error(NOT_READY).assert_stderr_mentions("tcp-closed");
    // With the flag it checkpoints and restores.
    checkpoint_and_restore(&ferry, &mut w, "closed", &["--tcp-established"]);
    // Forced without it, the dump works and the restore is what fails.
    let mut w = start("tcp_closed", Isolation::PidNamespace);
    ferry.checkpoint(w.pid(), "forced", &["--force"]).assert_ok();
    assert!(w.reap_launcher(), "the checkpointed workload's launcher did not exit");
    let (restore, pid) = ferry.restore_detached("forced", &w);
    restore.assert_error(7).assert_stderr_mentions("--tcp-established");
    assert_eq!(pid, None, "{restore}");
}

#[test]
fn a_network_namespace_shared_outside_is_a_caveat_and_checkpoints() {
    // CRIU dumps the namespace and restores a new one: the outside process no longer shares it.
    if require_privileged() {
        caveat_agrees("netns_shared", "shared-namespace", Isolation::Host);
    }
}

#[test]
fn a_vfork_parent_blocks() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    // Its child never execs: the parent stays in vfork, uninterruptible, and never counts.
    let w = Workload::start(Sample::Hazard("vfork"), Isolation::PidNamespace).expect("start vfork");
    poll(WAIT, "the parent to wait in vfork", || {
        (ferry_sys::process_state(w.pid()) == Some('D')).then_some(())
    });
    let (outcome, report) = check(&ferry, w.pid(), &[]);
    assert_eq!(outcome.code, Some(NOT_READY), "{outcome}");
    assert_eq!(severity(&report, "vfork").as_deref(), Some("blocker"), "{report:#}");
    ferry.checkpoint(w.pid(), "vfork", &[]).assert_error(NOT_READY).assert_stderr_mentions("vfork");
    // Forced, CRIU cannot seize it and gives up after its freeze timeout (10 s).
    let forced = ferry.checkpoint(w.pid(), "vfork", &["--force"]);
    assert!(forced.code.is_some_and(|c| c != 0 && c != NOT_READY), "CRIU should fail\n{forced}");
    assert_eq!(ferry_sys::process_state(w.pid()), Some('D'), "still in its vfork, not left stopped");
    assert!(ferry.list_names().is_empty());
}

#[test]
fn a_session_led_from_outside_the_tree_blocks() {
    // The child's tree is checkpointed alone: its session's leader (the root) is outside it.
    if !require_privileged() {
        return;
    }
    let w = start("child", Isolation::Host);
    let child = poll(WAIT, "the child", || ferry_testkit::children(w.pid()).first().copied());
    w.wait_counts(child, 2);
    blocker_agrees_at(&w, child, "child", "session", &[]);
}

#[test]
fn a_tree_below_its_pid_namespace_init_blocks() {
    // The child is pid 2 of the workload's pid namespace: CRIU dumps a namespace from its init.
    if !require_privileged() {
        return;
    }
    let w = start("child", Isolation::PidNamespace);
    let child = poll(WAIT, "the child", || ferry_testkit::children(w.pid()).first().copied());
    w.wait_counts(child, 2);
    blocker_agrees_at(&w, child, "child", "pid-namespace", &[]);
}

#[test]
fn a_connection_waiting_in_the_accept_queue_blocks() {
    // With --tcp-established the established client end is fine: the queued connection is not.
    if require_privileged() {
        let w = start("tcp_queued", Isolation::PidNamespace);
        blocker_agrees_at(&w, w.pid(), "tcp_queued", "tcp-accept-queue", &["--tcp-established"]);
    }
}

#[test]
fn unix_socket_to_outside_blocks() {
    // Host isolation: the peer process is reparented out of the tree, to the host's init.
    if require_privileged() {
        blocker_agrees("unix_external", "unix-external", Isolation::Host);
    }
}

#[test]
fn large_deleted_file_blocks() {
    if require_privileged() {
        blocker_agrees("deleted_large", "deleted-file-large", Isolation::PidNamespace);
    }
}

#[test]
fn a_removed_name_still_linked_elsewhere_blocks() {
    // Small, but not a ghost file: CRIU needs --link-remap for it (found by the zdtm sweep).
    if require_privileged() {
        blocker_agrees("deleted_linked", "deleted-file-linked", Isolation::PidNamespace);
    }
}

#[test]
fn file_lock_blocks() {
    if require_privileged() {
        blocker_agrees("flock", "file-locks", Isolation::PidNamespace);
    }
}

#[test]
fn traced_task_blocks() {
    if require_privileged() {
        blocker_agrees("traced", "traced", Isolation::PidNamespace);
    }
}

#[test]
fn deleted_cwd_is_a_caveat_and_checkpoints() {
    // In the host's pid namespace CRIU recreates the directory as a ghost.
    if require_privileged() {
        caveat_agrees("deleted_cwd", "cwd-deleted", Isolation::Host);
    }
}

#[test]
fn deleted_cwd_in_a_pid_namespace_sharing_our_proc_blocks() {
    // There CRIU's parasite must mount a proc in the working directory, and cannot.
    if require_privileged() {
        blocker_agrees("deleted_cwd", "cwd-deleted-pidns", Isolation::PidNamespace);
    }
}

#[test]
fn a_pipe_read_outside_is_a_caveat_and_checkpoints() {
    // The restored copy writes nothing to it here; one that did would get SIGPIPE.
    if require_privileged() {
        caveat_agrees("pipe_external", "pipe-external", Isolation::Host);
    }
}

#[test]
fn a_memfd_executable_blocks_and_its_restore_fails() {
    // Deleted and over 1 MiB, but a memfd: CRIU dumps it (no ghost limit), and then cannot
    // restore it as the executable.
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let mut w = start("memfd_exe", Isolation::PidNamespace);
    let exe = std::fs::read_link(format!("/proc/{}/exe", w.pid())).expect("exe");
    assert!(exe.to_string_lossy().starts_with("/memfd:"), "{}", exe.display());
    let (outcome, report) = check(&ferry, w.pid(), &[]);
    assert_eq!(outcome.code, Some(NOT_READY), "{outcome}");
    assert_eq!(severity(&report, "exe-memfd").as_deref(), Some("blocker"), "{report:#}");
    assert_eq!(severity(&report, "deleted-file-large"), None, "{report:#}");
    ferry.checkpoint(w.pid(), "memfd", &[]).assert_error(NOT_READY).assert_stderr_mentions("exe-memfd");
    // Forced, the dump works and the restore is what fails.
    ferry.checkpoint(w.pid(), "memfd", &["--force"]).assert_ok();
    assert!(w.reap_launcher(), "the checkpointed workload's launcher did not exit");
    let (restore, pid) = ferry.restore_detached("memfd", &w);
    restore.assert_error(7).assert_stderr_mentions("reg-file");
    assert_eq!(pid, None, "{restore}");
}

#[test]
fn small_deleted_file_is_a_caveat_and_checkpoints() {
    if require_privileged() {
        caveat_agrees("deleted_small", "deleted-file", Isolation::PidNamespace);
    }
}

#[test]
fn sysv_shm_attached_in_the_host_ipc_namespace_blocks() {
    // CRIU: "Task ... with SysVIPC shmem map ... doesn't live in IPC ns".
    if require_privileged() {
        blocker_agrees("sysv_shm", "sysv-shm-attached", Isolation::PidNamespace);
    }
}

#[test]
fn established_tcp_needs_the_flag() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let mut w = start("tcp_self", Isolation::PidNamespace);
    let (outcome, report) = check(&ferry, w.pid(), &[]);
    outcome.assert_ok();
    assert_eq!(severity(&report, "tcp-established").as_deref(), Some("caveat"), "{report:#}");
    let (_, asked) = check(&ferry, w.pid(), &["--tcp-established"]);
    assert_eq!(severity(&asked, "tcp-established").as_deref(), Some("caveat"), "{asked:#}");
    // Without the flag CRIU would refuse the connection: so does the gate, before freezing.
    ferry.checkpoint(w.pid(), "tcp", &[]).assert_error(NOT_READY).assert_stderr_mentions("tcp-established");
    assert_not_stopped(w.pid());
    checkpoint_and_restore(&ferry, &mut w, "tcp", &["--tcp-established"]);
}

#[test]
fn human_output_names_the_fix() {
    if !require_privileged() {
        return;
    }
    let w = start("io_uring", Isolation::PidNamespace);
    let out = ferry().run(&["check".to_owned(), format!("pid:{}", w.pid())]);
    assert_eq!(out.code, Some(NOT_READY), "{out}");
    assert!(out.stdout.contains("not ready (score"), "{out}");
    assert!(out.stdout.contains("BLOCKER  io-uring") && out.stdout.contains("fix: "), "{out}");
}

#[test]
fn a_missing_workload_is_not_found() {
    // No privilege needed: nothing is read but /proc.
    let out = ferry().run(&["check", "pid:2147483646"]);
    assert_eq!(out.code, Some(3), "{out}");
    assert!(
        out.stdout.contains("not ready") && out.stdout.contains("no process with PID 2147483646"),
        "{out}"
    );
    ferry().run(&["check", "bogus"]).assert_error(2);
}

/// A runc container of its own runc root, deleted on drop.
struct RuncContainer {
    rt: Box<dyn ContainerRuntime>,
    root: PathBuf,
    name: String,
    _state: tempfile::TempDir,
}

impl RuncContainer {
    fn start(args: &[&str]) -> RuncContainer {
        let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/mkrootfs");
        let image = "/var/cache/ferry/images/check-minimal";
        let built = Command::new(rootfs).args([image, "--minimal"]).output().expect("run mkrootfs");
        assert!(built.status.success(), "mkrootfs: {}", String::from_utf8_lossy(&built.stderr));
        let state = tempfile::Builder::new().prefix("ferry-check-runc-").tempdir().expect("tempdir");
        let root = PathBuf::from(format!("/run/fy-check-{}", std::process::id()));
        let endpoints =
            Endpoints::new(state.path()).with(&[format!("runc={}", root.display())]).expect("endpoints");
        let rt = container::open("runc", &endpoints).expect("runc");
        let name = format!("chk{}", std::process::id());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let spec = CreateSpec { name: &name, image, args: &args, ..Default::default() };
        rt.create(&spec).expect("create the runc container");
        RuncContainer { rt, root, name, _state: state }
    }

    fn endpoint(&self) -> String {
        format!("runc={}", self.root.display())
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        self.rt.discard(&self.name);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[test]
fn a_runc_container_is_found_through_its_runtime_and_checkpoints() {
    if !require_privileged() {
        return;
    }
    let c = RuncContainer::start(&["/bin/sleep", "1000"]);
    let ferry = ferry();
    let workload = format!("runc:{}", c.name);
    let out = ferry.run(&["--runtime-endpoint", &c.endpoint(), "check", &workload, "--json"]);
    out.assert_ok();
    let report: Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(severity(&report, "container").as_deref(), Some("info"), "{report:#}");
    assert_ne!(report["verdict"], "not-ready", "{report:#}");
    assert!(report["pid"].as_i64().is_some_and(|p| p > 1), "{report:#}");
    // The verdict holds: the container's tree is dumped (left running, so the drop cleans up).
    let name = "runc-check";
    ferry
        .run(&[
            "--runtime-endpoint",
            &c.endpoint(),
            "checkpoint",
            &workload,
            "--name",
            name,
            "--leave-running",
        ])
        .assert_ok();

    // A container its runtime does not have: not found, with the runtime's listing as the fix.
    let missing = ferry.run(&["--runtime-endpoint", &c.endpoint(), "check", "runc:nosuch"]);
    assert_eq!(missing.code, Some(3), "{missing}");
    assert!(missing.stdout.contains("BLOCKER  container: runc:nosuch"), "{missing}");
}

#[test]
fn migrate_refuses_a_not_ready_workload_before_asking_any_agent() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = start("io_uring", Isolation::PidNamespace);
    let target = format!("pid:{}", w.pid());
    // No agent listens on this socket: the refusal comes before it would be needed.
    let socket = ferry.scratch().join("no-agent.sock");
    let socket = socket.to_str().expect("utf-8 path");
    let refused = ferry.run(&["--socket", socket, "migrate", &target, "--to", "node2"]);
    refused.assert_error(NOT_READY).assert_stderr_mentions("io-uring");
    assert_not_stopped(w.pid());
    // --force skips the gate: the request then goes on to the (missing) agent.
    let forced = ferry.run(&["--socket", socket, "migrate", &target, "--to", "node2", "--force"]);
    assert!(forced.code.is_some_and(|c| c != 0 && c != NOT_READY), "{forced}");
    assert!(!forced.stderr_mentions("io-uring"), "{forced}");
}
