//! Copies of a live workload beside it. `ferry clone`: N running copies on lab nodes, each
//! answering on its own address with its own identity while the original and its clients go
//! on untouched; bad input refused before anything is made, and a failure that leaves nothing
//! behind. `ferry check --trial`: one copy in a sandbox with no way out, watched, probed and
//! removed.
//!
//! Real CRIU, real processes, a lab of its own per test (`TestLab`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_lab::{ExecOptions, TestLab, Workload};
use ferry_testkit::{flip_byte, packs_by_size, poll, require_privileged, Ferry, FRAME_HEADER, PYTHON, WAIT};

const PORT: u16 = 7000;

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

fn tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools")
}

/// A TCP server with an identity of its own making: a random seed drawn at start and drawn
/// again on SIGUSR1 (what an application does when told it is a copy), and its host name.
/// `id` answers both; `inc` counts up.
const IDENTITY_SERVER: &str = r#"
import os, signal, socket, socketserver, threading
seed = os.urandom(8).hex()
count = 0
lock = threading.Lock()
def reseed(*_):
    global seed
    seed = os.urandom(8).hex()
signal.signal(signal.SIGUSR1, reseed)
class H(socketserver.StreamRequestHandler):
    def handle(self):
        global count
        for line in self.rfile:
            cmd = line.strip()
            if cmd == b"id":
                out = f"{socket.gethostname()} {seed}"
            else:
                with lock:
                    count += 1
                    out = str(count)
            self.wfile.write(out.encode() + b"\n")
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", 7000), H).serve_forever()
"#;

/// A connection kept open, one line at a time.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(ip: Ipv4Addr) -> Option<Conn> {
        let s = TcpStream::connect_timeout(&SocketAddr::from((ip, PORT)), Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        Some(Conn { reader: BufReader::new(s.try_clone().ok()?), writer: s })
    }

    fn ask(&mut self, line: &str) -> Option<String> {
        self.writer.write_all(format!("{line}\n").as_bytes()).ok()?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer).ok()?;
        (!answer.is_empty()).then(|| answer.trim().to_owned())
    }
}

/// One request on a fresh connection.
fn ask(ip: Ipv4Addr, line: &str) -> Option<String> {
    Conn::open(ip)?.ask(line)
}

fn start(lab: &mut TestLab, node: &str, argv: &[String]) -> Workload {
    let w = lab.lab_mut().exec(node, argv, &ExecOptions::default()).expect("exec");
    poll(WAIT, "the server to answer", || ask(w.ip, "id"));
    w
}

fn hostname_of(pid: i32) -> String {
    let out = Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--uts", "hostname"])
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The innermost PID of `pid` (1: the root of its own pid namespace).
fn inner_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("NSpid:"))?.split_whitespace().last()?.parse().ok()
}

fn lab_netns(lab: &TestLab) -> BTreeSet<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| lab.config().is_lab_netns(n))
        .map(str::to_owned)
        .collect()
}

fn lab_name(lab: &TestLab) -> String {
    lab.config().name().expect("a test lab has a name").to_owned()
}

struct Clone {
    name: String,
    pid: i32,
    ip: Ipv4Addr,
    node: String,
    hostname: String,
}

fn clones_of(json: &serde_json::Value) -> Vec<Clone> {
    json["clones"]
        .as_array()
        .expect("clones")
        .iter()
        .map(|c| Clone {
            name: c["name"].as_str().expect("name").to_owned(),
            pid: c["pid"].as_i64().expect("pid") as i32,
            ip: c["ip"].as_str().expect("ip").parse().expect("an address"),
            node: c["node"].as_str().expect("node").to_owned(),
            hostname: c["hostname"].as_str().expect("a host name of its own").to_owned(),
        })
        .collect()
}

#[test]
fn four_copies_of_a_counter_each_on_its_own_address_while_the_original_and_its_client_go_on() {
    if !require_privileged() {
        return;
    }
    let mut lab = TestLab::up(2).expect("lab up");
    let argv: Vec<String> =
        vec![PYTHON.into(), tools().join("counterd.py").display().to_string(), "--mib".into(), "32".into()];
    let w = lab.lab_mut().exec("node1", &argv, &ExecOptions::default()).expect("exec counterd");
    let mut client = poll(Duration::from_secs(60), "counterd to answer", || Conn::open(w.ip));
    for n in 1..=3 {
        assert_eq!(client.ask("inc").as_deref(), Some(n.to_string().as_str()));
    }
    let f = ferry();
    let marks = f.scratch().join("on-clone.txt");
    let out = f
        .run(&[
            "clone",
            &format!("pid:{}", w.pid),
            "--replicas",
            "4",
            "--to",
            "node1",
            "--to",
            "node2",
            "--lab",
            &lab_name(&lab),
            "--name",
            "counter-ck",
            "--on-clone",
            &format!(
                "echo \"$FERRY_CLONE_INDEX $FERRY_CLONE_IP $FERRY_CLONE_HOSTNAME\" >> {}",
                marks.display()
            ),
            "--json",
        ])
        .assert_ok()
        .stdout
        .clone();
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("clone --json");
    let clones = clones_of(&json);
    assert_eq!(clones.len(), 4);

    // The original and its open connection saw nothing but a short freeze.
    assert_eq!(client.ask("inc").as_deref(), Some("4"), "the original's client goes on where it was");

    let ips: BTreeSet<Ipv4Addr> = clones.iter().map(|c| c.ip).collect();
    assert_eq!(ips.len(), 4, "an address each");
    assert!(!ips.contains(&w.ip), "none has the original's address");
    let nodes: BTreeSet<&str> = clones.iter().map(|c| c.node.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["node1", "node2"]), "spread over the nodes given");
    for (k, c) in clones.iter().enumerate() {
        // Each is the state at the checkpoint (3), and counts on by itself.
        assert_eq!(ask(c.ip, "get").as_deref(), Some("3"), "{} at {}", c.name, c.ip);
        assert_eq!(ask(c.ip, "inc").as_deref(), Some("4"), "{} counts on by itself", c.name);
        let sum: serde_json::Value =
            serde_json::from_str(&ask(c.ip, "!sum").expect("!sum")).expect("!sum answers JSON");
        assert_eq!(sum["ok"], true, "{}'s memory is the original's: {sum}", c.name);
        assert_eq!(c.hostname, format!("counter-ck-{}", k + 1));
        assert_eq!(hostname_of(c.pid), c.hostname, "its own UTS namespace has its own host name");
        assert_eq!(inner_pid(c.pid), Some(1), "PID 1 of a pid namespace of its own");
    }
    assert_eq!(client.ask("get").as_deref(), Some("4"), "the copies' counting is not the original's");
    assert_ne!(hostname_of(w.pid), clones[0].hostname, "the original keeps its host name");

    // --on-clone ran once per copy, with its own address and name.
    let lines = std::fs::read_to_string(&marks).expect("--on-clone wrote");
    let mut seen: Vec<String> = lines.lines().map(str::to_owned).collect();
    seen.sort();
    let mut expected: Vec<String> =
        clones.iter().enumerate().map(|(k, c)| format!("{} {} {}", k + 1, c.ip, c.hostname)).collect();
    expected.sort();
    assert_eq!(seen, expected);

    // `ferry list` shows the copies under the checkpoint they came from.
    let list: serde_json::Value =
        serde_json::from_str(f.run(&["list", "--json"]).assert_ok().stdout.trim()).expect("list");
    let ck = list
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["name"] == "counter-ck")
        .expect("the clone's checkpoint");
    let listed: BTreeSet<i64> =
        ck["clones"].as_array().expect("clones").iter().filter_map(|c| c["pid"].as_i64()).collect();
    assert_eq!(listed, clones.iter().map(|c| i64::from(c.pid)).collect());

    // A second batch from the stored checkpoint goes on numbering; lazy, its memory comes
    // through the pager while it runs, and all of it is the original's.
    let again = f
        .run(&[
            "clone",
            "counter-ck",
            "--replicas",
            "1",
            "--to",
            "node2",
            "--lab",
            &lab_name(&lab),
            "--lazy",
            "--json",
        ])
        .assert_ok()
        .stdout
        .clone();
    let more = clones_of(&serde_json::from_str(again.trim()).expect("json"));
    assert_eq!(more[0].name, "counter-ck-5");
    assert_eq!(ask(more[0].ip, "get").as_deref(), Some("3"));
    let sum: serde_json::Value = serde_json::from_str(&ask(more[0].ip, "!sum").expect("!sum")).expect("JSON");
    assert_eq!(sum["ok"], true, "the lazy copy's memory is the original's: {sum}");
    assert_eq!(hostname_of(more[0].pid), "counter-ck-5");
}

#[test]
fn copies_of_a_tcp_server_reseed_on_the_signal_and_answer_as_themselves() {
    if !require_privileged() {
        return;
    }
    let mut lab = TestLab::up(2).expect("lab up");
    let w = start(&mut lab, "node1", &[PYTHON.into(), "-c".into(), IDENTITY_SERVER.into()]);
    let original = ask(w.ip, "id").expect("id");
    let f = ferry();
    let done = f.run(&[
        "clone",
        &format!("pid:{}", w.pid),
        "--replicas",
        "4",
        "--to",
        "node2",
        "--lab",
        &lab_name(&lab),
        "--hostname-prefix",
        "web",
        "--signal",
        "USR1",
        // Lazy: named before it runs and signalled once it runs, before its memory is in.
        "--lazy",
        "--json",
    ]);
    let out = done.assert_ok().stdout.clone();
    // Not on a terminal: no progress bar, not one control character.
    assert!(!format!("{}{}", done.stdout, done.stderr).contains(['\x1b', '\r']), "{done}");
    let clones = clones_of(&serde_json::from_str(out.trim()).expect("json"));
    assert_eq!(clones.len(), 4);
    let mut ids = BTreeSet::from([original.clone()]);
    for c in &clones {
        let id = ask(c.ip, "id").expect("the copy answers");
        let (host, seed) = id.split_once(' ').expect("HOST SEED");
        assert_eq!(host, c.hostname, "it sees its own host name");
        assert!(c.hostname.starts_with("web-"));
        assert_eq!(seed.len(), 16);
        assert!(ids.insert(id.clone()), "{} shares an identity: {id}", c.name);
    }
    assert_eq!(ask(w.ip, "id").as_deref(), Some(original.as_str()), "the original is untouched");
}

#[test]
fn copies_share_one_check_of_the_pages_and_a_tampered_chunk_runs_none() {
    if !require_privileged() {
        return;
    }
    let mut lab = TestLab::up(1).expect("lab up");
    let argv: Vec<String> =
        vec![PYTHON.into(), tools().join("counterd.py").display().to_string(), "--mib".into(), "32".into()];
    let w = lab.lab_mut().exec("node1", &argv, &ExecOptions::default()).expect("exec counterd");
    poll(Duration::from_secs(60), "counterd to answer", || ask(w.ip, "inc"));
    let name = lab_name(&lab);
    let f = ferry();
    // One copy: a plain restore; it makes the checkpoint the next calls clone.
    let first = f.run(&[
        "clone",
        &format!("pid:{}", w.pid),
        "--replicas",
        "1",
        "--to",
        "node1",
        "--lab",
        &name,
        "--name",
        "ck",
        "--json",
    ]);
    let first: serde_json::Value = serde_json::from_str(first.assert_ok().stdout.trim()).expect("json");
    assert!(first["verify_seconds"].is_null(), "one copy checks its pages as a restore does: {first}");
    let netns_before = lab_netns(&lab);
    let running_before = running_in(&lab);

    // A byte of a page chunk flipped: the shared check fails before any copy is made.
    let packs = packs_by_size(f.store());
    let chunk = packs[0].entries[packs[0].entries.len() / 2];
    assert!(u64::from(chunk.len) > FRAME_HEADER + 1000, "not a page frame: {chunk:?}");
    let at = chunk.offset + FRAME_HEADER + (u64::from(chunk.len) - FRAME_HEADER) / 2;
    flip_byte(&packs[0].pack, at);
    let refused = f.run(&["clone", "ck", "--replicas", "3", "--to", "node1", "--lab", &name]);
    assert_eq!(refused.code, Some(6), "{refused}");
    assert!(refused.stderr.contains("failed authentication"), "{refused}");
    assert_eq!(lab_netns(&lab), netns_before, "no copy's namespace is left");
    assert_eq!(running_in(&lab), running_before, "no copy ran");
    assert!(f.list_names().contains(&"ck".to_owned()), "a checkpoint this call did not make stays");

    // Mended: three copies from one check, each with the original's memory.
    flip_byte(&packs[0].pack, at);
    let out = f.run(&["clone", "ck", "--replicas", "3", "--to", "node1", "--lab", &name, "--json"]);
    let json: serde_json::Value = serde_json::from_str(out.assert_ok().stdout.trim()).expect("json");
    assert!(json["verify_seconds"].as_f64().is_some(), "the copies shared one check: {json}");
    for c in clones_of(&json) {
        let sum: serde_json::Value = serde_json::from_str(&ask(c.ip, "!sum").expect("!sum")).expect("JSON");
        assert_eq!(sum["ok"], true, "{}'s memory is the original's: {sum}", c.name);
    }
}

/// The pids of the lab's running workloads.
fn running_in(lab: &TestLab) -> BTreeSet<i32> {
    let now = ferry_lab::Lab::load(lab.config()).expect("lab");
    now.workloads().iter().filter(|x| x.is_running()).map(|x| x.pid).collect()
}

#[test]
fn bad_input_is_refused_and_a_failed_clone_leaves_nothing_behind() {
    if !require_privileged() {
        return;
    }
    let mut lab = TestLab::up(1).expect("lab up");
    let w = start(&mut lab, "node1", &[PYTHON.into(), "-c".into(), IDENTITY_SERVER.into()]);
    let name = lab_name(&lab);
    let f = ferry();
    let netns_before = lab_netns(&lab);
    let source = format!("pid:{}", w.pid);

    let zero = f.run(&["clone", &source, "--replicas", "0", "--to", "node1", "--lab", &name]);
    assert_eq!(zero.code, Some(2), "{zero}");
    let huge = f.run(&["clone", &source, "--replicas", "1000", "--to", "node1", "--lab", &name]);
    assert_eq!(huge.code, Some(2), "{huge}");
    assert!(huge.stderr.contains("1..=64"), "{huge}");
    let unknown = f.run(&["clone", &source, "--replicas", "2", "--to", "node7", "--lab", &name]);
    assert_eq!(unknown.code, Some(1), "{unknown}");
    assert!(unknown.stderr.contains("node7") && unknown.stderr.contains("node1"), "{unknown}");
    let missing = f.run(&["clone", "no-such-checkpoint", "--replicas", "2", "--to", "node1", "--lab", &name]);
    assert_eq!(missing.code, Some(3), "{missing}");
    assert!(missing.stderr.contains("no-such-checkpoint"), "{missing}");
    let bad_signal =
        f.run(&["clone", &source, "--replicas", "2", "--to", "node1", "--lab", &name, "--signal", "NOPE"]);
    assert_eq!(bad_signal.code, Some(2), "{bad_signal}");

    // A tree in the host's namespaces: its copies would share PIDs and ports.
    // (--force: what `ferry check` makes of a bare sleep is not what is tested here.)
    let mut host_tree = Command::new("sleep").arg("600").spawn().expect("sleep");
    let host = f.run(&[
        "clone",
        &format!("pid:{}", host_tree.id()),
        "--replicas",
        "2",
        "--to",
        "node1",
        "--lab",
        &name,
        "--force",
    ]);
    let _ = host_tree.kill();
    let _ = host_tree.wait();
    assert_eq!(host.code, Some(1), "{host}");
    assert!(host.stderr.contains("cannot be cloned"), "{host}");

    // Every copy restored, then the user's hook fails: every copy goes, and the checkpoint
    // this clone made too.
    let failed = f.run(&[
        "clone",
        &source,
        "--replicas",
        "3",
        "--to",
        "node1",
        "--lab",
        &name,
        "--on-clone",
        "exit 3",
    ]);
    assert_eq!(failed.code, Some(2), "{failed}");
    assert!(failed.stderr.contains("--on-clone failed"), "{failed}");
    assert!(f.list_names().is_empty(), "the checkpoint made for the clone is removed: {:?}", f.list_names());
    assert_eq!(lab_netns(&lab), netns_before, "no copy's namespace is left");
    let lab_now = ferry_lab::Lab::load(lab.config()).expect("lab");
    let running: Vec<_> = lab_now.workloads().iter().filter(|x| x.is_running()).map(|x| x.pid).collect();
    assert_eq!(running, vec![w.pid], "only the original runs in the lab");
    assert_eq!(ask(w.ip, "inc").as_deref(), Some("1"), "the original still answers");
}

/// Lives as long as it can reach `GATEWAY` (a refused connection is an answer too): what a
/// service does that exits when its database is gone. In the trial's sandbox it cannot.
const NEEDS_ITS_NETWORK: &str = r#"
import socket, sys, time
while True:
    try:
        socket.create_connection((sys.argv[1], 9), timeout=1).close()
    except ConnectionRefusedError:
        pass
    except OSError:
        sys.exit(3)
    time.sleep(0.1)
"#;

fn trial_json(out: &ferry_testkit::Outcome) -> serde_json::Value {
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("trial --json: {e}\n{out}"))
}

/// The sandboxes of trials of `pid` and the checkpoints of `f`'s store that are still there
/// (tests run at once: another test's trial may be under way).
fn trial_leftovers(f: &Ferry, pid: i32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns");
    let mut left: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("ferry-trial-{pid}-")))
        .map(|l| format!("netns {l}"))
        .collect();
    left.extend(f.list_names().into_iter().map(|n| format!("checkpoint {n}")));
    left
}

#[test]
fn trial_of_a_healthy_server_passes_its_probe_and_the_original_clients_see_nothing() {
    if !require_privileged() {
        return;
    }
    let mut lab = TestLab::up(1).expect("lab up");
    let w = start(&mut lab, "node1", &[PYTHON.into(), "-c".into(), IDENTITY_SERVER.into()]);
    let mut client = Conn::open(w.ip).expect("connect");
    assert_eq!(client.ask("inc").as_deref(), Some("1"));
    let f = ferry();
    // The probe runs in the copy's namespace: 127.0.0.1 is the copy, and its answer is the
    // state at the checkpoint (1) plus its own count.
    let probe = format!(
        "{PYTHON} -c 'import socket; s=socket.create_connection((\"127.0.0.1\", 7000)); s.sendall(b\"inc\\n\"); \
         a=s.recv(100).strip(); print(a.decode()); raise SystemExit(0 if a == b\"2\" else 1)'"
    );
    let out = f.run(&[
        "check",
        &format!("pid:{}", w.pid),
        "--trial",
        "--probe",
        &probe,
        "--trial-seconds",
        "2",
        "--json",
    ]);
    out.assert_ok();
    let r = trial_json(&out);
    assert_eq!(r["healthy"], true, "{r}");
    assert_eq!(r["stayed_alive"], true, "{r}");
    assert_eq!(r["probe_exit"], 0, "{r}");
    assert_eq!(r["probe_output"], "2", "{r}");
    // The original's client: its connection and count go on as if nothing happened.
    assert_eq!(client.ask("inc").as_deref(), Some("2"), "the copy's count is not the original's");
    assert_eq!(trial_leftovers(&f, w.pid), Vec::<String>::new());

    // The same copy, judged by a probe that fails: the trial fails (exit 11), nothing is left.
    let bad = f.run(&[
        "check",
        &format!("pid:{}", w.pid),
        "--trial",
        "--probe",
        "echo sick; exit 4",
        "--trial-seconds",
        "1",
    ]);
    assert_eq!(bad.code, Some(11), "{bad}");
    assert!(bad.stdout.contains("trial FAILED") && bad.stdout.contains("exit 4: sick"), "{bad}");
    assert_eq!(client.ask("inc").as_deref(), Some("3"));
    assert_eq!(trial_leftovers(&f, w.pid), Vec::<String>::new());
}

#[test]
fn trial_of_a_server_that_dies_without_its_network_fails_and_the_original_runs_on() {
    if !require_privileged() {
        return;
    }
    let mut lab = TestLab::up(1).expect("lab up");
    let gateway = lab.lab().bridge().ip.to_string();
    let w = lab
        .lab_mut()
        .exec(
            "node1",
            &[PYTHON.into(), "-c".into(), NEEDS_ITS_NETWORK.into(), gateway],
            &ExecOptions::default(),
        )
        .expect("exec");
    // It has had time to find its network (it would have exited by now otherwise).
    std::thread::sleep(Duration::from_millis(500));
    assert!(ferry_sys::process_exists(w.pid), "it runs where its network is");
    let f = ferry();
    let out = f.run(&["check", &format!("pid:{}", w.pid), "--trial", "--trial-seconds", "5", "--json"]);
    assert_eq!(out.code, Some(11), "{out}");
    let r = trial_json(&out);
    assert_eq!(r["restored"], true, "{r}");
    assert_eq!(r["stayed_alive"], false, "{r}");
    assert_eq!(r["ended"], "exit 3", "{r}");
    assert_eq!(r["healthy"], false, "{r}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(ferry_sys::process_exists(w.pid), "the original runs on");
    assert_eq!(trial_leftovers(&f, w.pid), Vec::<String>::new());
}
