//! A restored process goes on from where it was checkpointed: the counter workload's count
//! continues, neither reset nor replayed.

use std::fs;

use ferry_sys::process_exists;
use ferry_testkit::{poll, read_pid, require_privileged, Ferry, Isolation, Sample, Workload, WAIT};

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Checkpoints the counter (which stops it) and returns the last count it wrote. Its count file
/// is moved aside, so that a copy restored under the same host pid starts a fresh one.
fn checkpoint_and_last_count(ferry: &Ferry, w: &Workload, name: &str) -> u64 {
    w.wait_counts(w.pid(), 3);
    ferry.checkpoint(w.pid(), name, &[]).assert_ok();
    // The default is to stop the workload once dumped.
    poll(WAIT, "the checkpointed counter to be stopped", || (!process_exists(w.pid())).then_some(()));
    let counts = w.counts(w.pid());
    fs::rename(w.path("counter", w.pid()), w.dir().join("counts-before")).expect("move counts aside");
    *counts.last().expect("counts before the checkpoint")
}

/// The `NSpid:` line of /proc/PID/status: the pid in each namespace, host first.
fn ns_pids(pid: i32) -> Vec<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status of restored pid");
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:")).expect("NSpid line");
    line.split_whitespace().map(str::to_string).collect()
}

#[test]
fn restored_counter_goes_on_from_its_count() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    let last = checkpoint_and_last_count(&ferry, &w, "counter");

    let pid = ferry.restore_ok("counter", &w);
    // Restored as PID 1 of a fresh pid namespace, like the original.
    assert_eq!(ns_pids(pid).last().map(String::as_str), Some("1"), "restored root of pid {pid}");
    let after = w.wait_counts(pid, 2);
    // The counter increments, then writes: whether it was frozen before or after a write, the
    // first count the copy writes is exactly the next one. Lower: replayed or reset; higher:
    // the original ran on after its dump.
    assert_eq!(after[0], last + 1, "last count before checkpoint {last}, counts after restore {after:?}");
    assert!(after[1] > after[0], "the restored counter must keep counting: {after:?}");
}

#[test]
fn restore_without_detach_waits_and_exits_with_the_workload_code() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    let last = checkpoint_and_last_count(&ferry, &w, "attached");

    let pidfile = ferry.fresh_path("pid");
    let mut restore =
        ferry.spawn(&["restore".as_ref(), "attached".as_ref(), "--pidfile".as_ref(), pidfile.as_os_str()]);
    let pid = poll(WAIT, "the pidfile of an attached restore", || {
        if let Some(pid) = read_pid(&pidfile) {
            return Some(pid);
        }
        // A restore that already ended will never write it: fail now, with its output.
        if let Some(outcome) = restore.try_finish() {
            panic!("restore ended before writing its pidfile\n{outcome}");
        }
        None
    });
    w.adopt(pid);
    assert_eq!(w.wait_counts(pid, 1)[0], last + 1);
    assert!(restore.try_finish().is_none(), "ferry must wait while the workload runs");

    w.request_exit(pid, 42).expect("ask the counter to exit");
    let outcome = restore.finish(WAIT);
    assert_eq!(outcome.code, Some(42), "ferry must exit with the workload's code\n{outcome}");
    assert!(!outcome.stderr.contains("panicked at"), "{outcome}");
}

/// CRIU's parasite mounts a proc at `proc.crtools` in the working directory of a task of a
/// child pid namespace that sees the host's /proc; two dumps at once of tasks sharing that
/// directory collided there ("Can't create a directory (-17)"). Here the test plays the other
/// dump: it holds that directory's dump lock with `proc.crtools` in place, and the checkpoint
/// must wait for it instead of failing.
#[test]
fn a_checkpoint_waits_for_another_dump_in_the_same_working_directory() {
    use std::collections::BTreeSet;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    use ferry_criu::cwd_lock::{CwdLocks, LOCK_DIR};
    use ferry_testkit::Running;

    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    w.wait_counts(w.pid(), 3);
    let cwd = fs::metadata(w.dir()).expect("cwd");
    let other = CwdLocks::take_dirs(Path::new(LOCK_DIR), &BTreeSet::from([(cwd.dev(), cwd.ino())]));
    assert_eq!(other.len(), 1, "the test holds the lock");
    let window = w.dir().join("proc.crtools");
    fs::create_dir(&window).expect("the other dump's proc.crtools");

    let mut cmd =
        ferry.command(&["checkpoint", &format!("pid:{}", w.pid()), "--name", "waits", "--leave-running"]);
    cmd.env("FERRY_LOG", "info");
    let mut running = Running::start(cmd);
    poll(WAIT, "the checkpoint to wait for the other dump", || {
        if let Some(done) = running.try_finish() {
            panic!("the checkpoint ended while the other dump held the directory\n{done}");
        }
        running.stderr_so_far().contains("waiting for another checkpoint").then_some(())
    });
    fs::remove_dir(&window).expect("the other dump ends");
    drop(other);
    running.finish(WAIT).assert_ok();
    assert!(!window.exists(), "CRIU removes its proc.crtools");
    w.wait_counts(w.pid(), w.counts(w.pid()).len() + 1);
}
