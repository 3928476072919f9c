//! Peers admitted by a cluster CA instead of pinned keys, with real agents (this crate's
//! ferryd) in a lab: no node pins another; node1 and node2 hold certificates from one CA and
//! trust it; node3 trusts that CA too but holds a certificate from another one.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failing test should stop right there

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_lab::{ExecOptions, TestLab, Workload};
use ferry_migrate::api::{Event, MigrateRequest, Request, Strategy};
use ferry_migrate::lab_agents::{agent_socket, node_dir, prepare_stores, spawn_agent, wait_agent};
use ferry_store::keys::NodeKeys;
use ferry_testkit::{poll, require_privileged};
use ferry_wire::tls::{ClusterCa, Identity};

const PORT: u16 = 7000;

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

fn keys_dir(lab: &TestLab, node: &str) -> PathBuf {
    node_dir(lab.config().state_dir(), node).join("store").join("keys")
}

fn agent_log(lab: &TestLab, node: &str) -> String {
    fs::read_to_string(node_dir(lab.config().state_dir(), node).join("ferryd.log")).unwrap_or_default()
}

/// What `ferry node ca issue` writes: a certificate for the node's key from `issuer`, and
/// `trusted` as the CA the node admits.
fn issue(lab: &TestLab, node: &str, issuer: &ClusterCa, trusted: &ClusterCa) {
    let dir = keys_dir(lab, node);
    let seed = NodeKeys::load(&dir).unwrap().identity_seed();
    let cert = dir.join("node-cert.pem");
    fs::write(&cert, Identity::issued(&seed, node, issuer).unwrap().cert_pem()).unwrap();
    fs::set_permissions(&cert, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(dir.join("cluster-ca.pem"), trusted.cert_pem()).unwrap();
}

fn migrate(lab: &TestLab, from: &str, pid: i32, to: &str) -> Result<String, String> {
    let req = Request::Migrate(MigrateRequest {
        workload: format!("pid:{pid}"),
        to: to.into(),
        strategy: Strategy::StopCopy,
        ..Default::default()
    });
    match ferry_migrate::client::call(&agent_socket(lab.config().state_dir(), from), &req, &mut |_| {}) {
        Ok(Event::Report(r)) => Ok(r.new_workload),
        Ok(Event::Failed { message, .. }) => Err(message),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// One request to memload; whether it answered.
fn answers(ip: Ipv4Addr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::from((ip, PORT)), Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    if s.write_all(b"!stats\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && !line.is_empty()
}

fn memload(lab: &mut TestLab, node: &str) -> Workload {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/memload.py");
    let log = node_dir(lab.config().state_dir(), node).join("memload.log");
    let argv = [
        "/usr/bin/python3".to_owned(),
        tool.display().to_string(),
        "--mib".into(),
        "16".into(),
        "--port".into(),
        PORT.to_string(),
    ];
    let w = lab.lab_mut().exec(node, &argv, &ExecOptions { log: Some(log) }).expect("exec memload");
    poll(Duration::from_secs(60), "memload to answer", || answers(w.ip).then_some(()));
    w
}

#[test]
fn nodes_with_certificates_from_the_cluster_ca_are_admitted_without_pins() {
    if !require_privileged() {
        return;
    }
    let mut lab = TestLab::up(3).expect("lab up");
    prepare_stores(lab.lab()).expect("stores");
    let ca = ClusterCa::generate("test cluster").unwrap();
    let other = ClusterCa::generate("other cluster").unwrap();
    for node in ["node1", "node2", "node3"] {
        // No pins: the recipients prepare_stores wrote go.
        fs::remove_dir_all(keys_dir(&lab, node).join("recipients")).unwrap();
        let issuer = if node == "node3" { &other } else { &ca };
        issue(&lab, node, issuer, &ca);
    }
    for node in ["node1", "node2", "node3"] {
        let socket = spawn_agent(lab.lab(), node, ferryd(), None, &[]).expect("spawn agent");
        assert!(wait_agent(&socket, Duration::from_secs(30)), "agent of {node}: {}", agent_log(&lab, node));
        let status = ferry_migrate::client::call(&socket, &Request::Status, &mut |_| {}).unwrap();
        assert!(matches!(&status, Event::Status(s) if s.name == node), "{status:?}");
        let log = agent_log(&lab, node);
        assert!(log.contains("pinned=0") && log.contains("cluster_ca=test cluster"), "{log}");
        assert!(log.contains("node-cert.pem (issued by"), "{log}");
    }
    assert!(
        agent_log(&lab, "node3").contains("will refuse this node's certificate"),
        "node3 warns that its certificate is not from the CA it trusts"
    );

    // node1 -> node3: node1 refuses node3's certificate (another CA).
    let w = memload(&mut lab, "node1");
    let e = migrate(&lab, "node1", w.pid, "node3").expect_err("node3 is refused");
    assert!(e.contains("not issued by the cluster CA"), "{e}");
    // node3 -> node1 (node3 trusts node1's CA): node1 refuses node3 as a client.
    let w3 = memload(&mut lab, "node3");
    let e = migrate(&lab, "node3", w3.pid, "node1").expect_err("node3 is refused");
    assert!(e.contains("refused this node's certificate"), "{e}");
    // Its agent logs why (it may still be writing that when node3 has heard the refusal).
    poll(Duration::from_secs(10), "node1 to log the refusal", || {
        agent_log(&lab, "node1").contains("not issued by the cluster CA").then_some(())
    });
    assert!(answers(w.ip) && answers(w3.ip), "both workloads still run where they were");
    let recipients = |node: &str| -> Vec<String> {
        fs::read_dir(keys_dir(&lab, node).join("recipients"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };
    assert!(!recipients("node1").contains(&"node3.pub".to_owned()), "a refused peer is not remembered");

    // node1 -> node2: both admit the other by the CA, and remember its keys as recipients
    // (data keys are wrapped for the target, the source's manifests verified there): the
    // migration goes through with no pin set by hand.
    let moved = migrate(&lab, "node1", w.pid, "node2").expect("a CA-admitted peer takes the workload");
    assert!(moved.starts_with("pid:"), "{moved}");
    assert!(recipients("node1").contains(&"node2.pub".to_owned()), "{:?}", recipients("node1"));
    assert!(recipients("node2").contains(&"node1.pub".to_owned()), "{:?}", recipients("node2"));
    assert!(agent_log(&lab, "node2").contains("trusting the key of a peer the cluster CA admitted"));
    poll(Duration::from_secs(10), "the workload to answer from node2", || answers(w.ip).then_some(()));
    let lab_state = ferry_lab::Lab::load(lab.config()).unwrap();
    let at: Vec<&str> = lab_state
        .workloads()
        .iter()
        .filter(|x| x.ip == w.ip && x.is_running())
        .map(|x| x.node.as_str())
        .collect();
    assert_eq!(at, vec!["node2"], "{:?}", lab_state.workloads());
}
