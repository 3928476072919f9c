//! One checkpoint, several copies: each restore gets a fresh pid namespace, so copies run side
//! by side (and beside the original, when it was left running) and report separately.

use std::fs;

use ferry_sys::{kill, process_exists, Signal};
use ferry_testkit::{assert_not_stopped, poll, require_privileged, Ferry, Isolation, Sample, Workload, WAIT};

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

fn pid_namespace(pid: i32) -> String {
    let ns = fs::read_link(format!("/proc/{pid}/ns/pid")).expect("pid namespace link");
    ns.to_string_lossy().into_owned()
}

#[test]
fn one_checkpoint_restored_twice_runs_twice() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    w.wait_counts(w.pid(), 3);
    ferry.checkpoint(w.pid(), "twice", &[]).assert_ok();
    poll(WAIT, "the checkpointed counter to be stopped", || (!process_exists(w.pid())).then_some(()));
    let last = *w.counts(w.pid()).last().expect("counts");

    let first = ferry.restore_ok("twice", &w);
    let second = ferry.restore_ok("twice", &w);
    assert_ne!(first, second);
    assert_ne!(pid_namespace(first), pid_namespace(second), "each copy needs its own pid namespace");
    assert_ne!(pid_namespace(first), pid_namespace(std::process::id() as i32));
    for pid in [first, second] {
        let counts = w.wait_counts(pid, 2);
        assert_eq!(counts[0], last + 1, "copy {pid} must go on from the checkpoint: {counts:?}");
        assert_not_stopped(pid);
    }

    // The copies are independent: killing one leaves the other counting.
    kill(first, Signal::Kill).expect("kill the first copy");
    poll(WAIT, "the first copy to die", || (!process_exists(first)).then_some(()));
    let seen = w.counts(second).len();
    w.wait_counts(second, seen + 2);
}

#[test]
fn copy_runs_beside_an_original_left_running() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    w.wait_counts(w.pid(), 3);
    ferry.checkpoint(w.pid(), "beside", &["--leave-running"]).assert_ok();
    assert_not_stopped(w.pid());

    // The original's pid is PID 1 of its namespace, as is the copy's: no conflict.
    let copy = ferry.restore_ok("beside", &w);
    w.wait_counts(copy, 2);
    let seen = w.counts(w.pid()).len();
    w.wait_counts(w.pid(), seen + 2);
}
