//! Kernel resources a process holds come back with it: a file descriptor at its offset, pipes
//! to a child process (and the child), a listening TCP socket.

use ferry_sys::process_exists;
use ferry_testkit::{
    descendants, fetch_greeting, free_port, poll, require_privileged, Ferry, Isolation, Sample, Workload,
    WAIT,
};

#[test]
fn file_offset_pipes_child_and_listener_survive() {
    if !require_privileged() {
        return;
    }
    let ferry = Ferry::new(env!("CARGO_BIN_EXE_ferry"));
    let port = free_port();
    let w = Workload::start(Sample::Resources { port }, Isolation::PidNamespace).expect("start resources");
    assert_eq!(fetch_greeting(port).expect("greeting before"), format!("hello from {}\n", w.pid()));
    let before = w.request_report(w.pid());
    assert_eq!(before["echo_ok"], true, "{before}");

    ferry.checkpoint(w.pid(), "resources", &[]).assert_ok();
    poll(WAIT, "the checkpointed workload to be stopped", || (!process_exists(w.pid())).then_some(()));
    // With the original gone nobody listens, so the next greeting can only come from the copy.
    poll(WAIT, "the original's listener to close", || fetch_greeting(port).is_err().then_some(()));

    let pid = ferry.restore_ok("resources", &w);
    assert_eq!(fetch_greeting(port).expect("greeting after restore"), format!("hello from {pid}\n"));
    let after = w.request_report(pid);
    assert_eq!(after["offset"], before["expected_offset"], "file offset after restore: {after}");
    assert_eq!(after["content_ok"], true, "the fd must still read the same file: {after}");
    assert_eq!(after["port"], port);
    // The ping number continues (the parent's memory) and the child answers through the same
    // pipes: nothing was lost or duplicated in them.
    let child = after["child_host_pid"].as_i64().expect("child answered") as i32;
    assert_eq!(after["echo"], format!("pong 2 {child}"), "{after}");
    assert_eq!(after["echo_ok"], true, "{after}");
    assert_eq!(after["child_alive"], true, "{after}");
    assert_eq!(descendants(pid), vec![child], "the child must be restored below the root");
    // One connection served before the checkpoint, one after.
    assert_eq!(after["served"], 2, "{after}");
}
