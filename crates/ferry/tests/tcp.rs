//! Established TCP connections: kept across checkpoint/restore with `--tcp-established`; without
//! it the checkpoint fails cleanly and the server goes on serving.

use ferry_sys::process_exists;
use ferry_testkit::{
    assert_no_criu_rules_for_port, assert_no_mounts_under, assert_not_stopped, free_port, poll,
    require_privileged, Ferry, FirewallGuard, Isolation, LineClient, Sample, Workload, WAIT,
};

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

#[test]
fn established_connection_survives_with_tcp_established() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let port = free_port();
    let w = Workload::start(Sample::TcpEcho { port }, Isolation::PidNamespace).expect("start tcp-echo");
    let mut client = LineClient::connect(port).expect("connect");
    let client_port = client.local_port().expect("client port");
    // Until the restore, CRIU holds the connection with firewall rules: removed if we fail.
    let _rules = FirewallGuard::new(&[port]);
    assert_eq!(client.round_trip("before").expect("echo before"), "1 before");

    ferry.checkpoint(w.pid(), "tcp", &["--tcp-established"]).assert_ok();
    poll(WAIT, "the checkpointed server to be stopped", || (!process_exists(w.pid())).then_some(()));
    // Sent while no server runs: CRIU's lock drops it, TCP retransmits it to the restored
    // socket, so it is answered once, in order.
    client.send("during").expect("send while checkpointed");

    let pid = ferry.restore_ok("tcp", &w);
    assert_eq!(client.recv().expect("answer to the line sent while checkpointed"), "2 during");
    assert_eq!(client.round_trip("after").expect("echo after restore"), "3 after");
    assert_eq!(w.request_report(pid)["connections"], 1, "the restored server holds the one connection");
    assert_no_criu_rules_for_port(port);
    assert_no_criu_rules_for_port(client_port);
}

#[test]
fn established_connection_without_the_flag_fails_cleanly() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let port = free_port();
    let w = Workload::start(Sample::TcpEcho { port }, Isolation::PidNamespace).expect("start tcp-echo");
    let mut client = LineClient::connect(port).expect("connect");
    let _rules = FirewallGuard::new(&[port]);
    assert_eq!(client.round_trip("before").expect("echo before"), "1 before");

    // `ferry check`'s gate refuses it before anything is frozen (exit 11); forced, CRIU does (7).
    ferry.checkpoint(w.pid(), "tcp", &[]).assert_error(11).assert_stderr_mentions("tcp-established");
    let outcome = ferry.checkpoint(w.pid(), "tcp", &["--force"]);
    outcome.assert_error(7).assert_stderr_mentions("--tcp-established");
    let log =
        outcome.log_path().unwrap_or_else(|| panic!("CRIU was involved: a `log:` line is due\n{outcome}"));
    assert!(log.is_file(), "the log {} named on stderr does not exist", log.display());

    // The server was never stopped for good: it runs, answers on the same connection and on
    // new ones, and nothing of the attempt is left behind.
    assert_not_stopped(w.pid());
    assert_eq!(client.round_trip("still").expect("echo after the failure"), "2 still");
    let mut other = LineClient::connect(port).expect("new connection");
    assert_eq!(other.round_trip("new").expect("echo on a new connection"), "1 new");
    assert_no_criu_rules_for_port(port);
    assert_no_mounts_under(ferry.store());
    let list = ferry.run(&["list", "--json"]);
    list.assert_ok();
    let entries: serde_json::Value = serde_json::from_str(&list.stdout).expect("list --json is JSON");
    assert_eq!(entries, serde_json::json!([]), "a failed checkpoint must leave nothing in the store");
}
