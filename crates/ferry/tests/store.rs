//! The store as the CLI shows it: `list`, `list --json`, `rm`, name conflicts, FERRY_STORE.

use std::process::Command;

use ferry_sys::process_exists;
use ferry_testkit::{
    assert_not_stopped, free_port, poll, present_lock_tables, require_privileged, Ferry, Isolation,
    LineClient, Sample, Workload, WAIT,
};
use serde_json::Value;

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

fn list_json(ferry: &Ferry) -> Vec<Value> {
    let outcome = ferry.run(&["list", "--json"]);
    outcome.assert_ok();
    match serde_json::from_str(&outcome.stdout) {
        Ok(Value::Array(entries)) => entries,
        _ => panic!("list --json must print a JSON array\n{outcome}"),
    }
}

fn names(entries: &[Value]) -> Vec<&str> {
    let mut names: Vec<&str> = entries.iter().filter_map(|e| e["name"].as_str()).collect();
    names.sort_unstable();
    names
}

#[test]
fn list_describes_checkpoints_and_rm_removes_them() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    assert!(list_json(&ferry).is_empty(), "a new store is empty");
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    w.wait_counts(w.pid(), 2);
    for name in ["alpha", "beta"] {
        ferry.checkpoint(w.pid(), name, &["--leave-running"]).assert_ok();
    }

    let entries = list_json(&ferry);
    assert_eq!(names(&entries), ["alpha", "beta"]);
    for e in &entries {
        assert_eq!(e["source"], format!("pid:{}", w.pid()), "{e}");
        assert!(e["size_bytes"].as_u64().is_some_and(|s| s > 0), "size_bytes: {e}");
        assert!(!e["created"].is_null(), "created: {e}");
    }
    let table = ferry.run(&["list"]);
    table.assert_ok();
    assert!(table.stdout.contains("alpha") && table.stdout.contains("beta"), "{table}");

    ferry.run(&["rm", "alpha"]).assert_ok();
    assert_eq!(names(&list_json(&ferry)), ["beta"]);
    assert!(!ferry.manifest_path("alpha").exists(), "rm must delete the checkpoint's files");
    ferry.run(&["rm", "alpha"]).assert_error(3).assert_stderr_mentions("alpha");
    ferry.run(&["rm", "beta"]).assert_ok();
    assert!(list_json(&ferry).is_empty());
}

#[test]
fn existing_name_is_a_conflict_and_the_workload_survives() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    w.wait_counts(w.pid(), 2);
    ferry.checkpoint(w.pid(), "taken", &["--leave-running"]).assert_ok();
    let before = list_json(&ferry);

    // Without --leave-running: had ferry dumped (and so stopped) the workload before noticing the
    // name, the workload would be lost along with the checkpoint that cannot be stored.
    ferry.checkpoint(w.pid(), "taken", &[]).assert_error(8).assert_stderr_mentions("taken");
    assert_not_stopped(w.pid());
    let seen = w.counts(w.pid()).len();
    w.wait_counts(w.pid(), seen + 2);
    assert_eq!(list_json(&ferry), before, "the existing checkpoint must be left as it was");
}

#[test]
fn default_name_and_store_from_the_environment() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    w.wait_counts(w.pid(), 2);
    let target = format!("pid:{}", w.pid());
    ferry.run(&["checkpoint", &target, "--leave-running"]).assert_ok();

    // FERRY_STORE stands in for --store.
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["list", "--json"])
        .env("FERRY_STORE", ferry.store())
        .output()
        .expect("run ferry list");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let entries: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON array");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["source"], target);
    assert!(entries[0]["name"].as_str().is_some_and(|n| !n.is_empty()), "a name is chosen: {entries:?}");
}

/// Checkpoints `w` (stopping it) as `name`, removes the checkpoint, and checks that no network
/// lock of that dump outlives it: a checkpoint that is never restored must not leave firewall
/// state behind once it is gone.
fn assert_rm_releases_the_lock(ferry: &Ferry, w: &Workload, name: &str, extra: &[&str]) {
    ferry.checkpoint(w.pid(), name, extra).assert_ok();
    poll(WAIT, "the checkpointed workload to be stopped", || (!process_exists(w.pid())).then_some(()));
    let held = ferry.criu_lock_tables();
    ferry.run(&["rm", name]).assert_ok();
    let present = present_lock_tables();
    let left: Vec<&String> = held.iter().filter(|t| present.contains(t)).collect();
    assert!(left.is_empty(), "`ferry rm {name}` left CRIU's lock tables {left:?}");
    assert!(!ferry.manifest_path(name).exists());
}

#[test]
fn rm_releases_the_network_lock_of_a_checkpoint_never_restored() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    w.wait_counts(w.pid(), 2);
    assert_rm_releases_the_lock(&ferry, &w, "plain", &[]);
}

#[test]
fn rm_releases_the_lock_on_established_connections() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let port = free_port();
    let w = Workload::start(Sample::TcpEcho { port }, Isolation::PidNamespace).expect("start tcp-echo");
    let mut client = LineClient::connect(port).expect("connect");
    assert_eq!(client.round_trip("x").expect("echo"), "1 x");
    assert_rm_releases_the_lock(&ferry, &w, "held", &["--tcp-established"]);
    ferry_testkit::assert_no_criu_rules_for_port(port);
}
