//! `ferry lab`: nodes in network namespaces on a bridge, workloads started on them like pods,
//! everything reachable from this machine and removed by `down`, also after a crash or a panic.
//!
//! Every test works in a lab of its own ([`TestLab`]: its own name, state directory and /24
//! of 198.19.0.0/16), so none meets a user's lab or another test's.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_lab::{mac_of, ns_pids, ExecOptions, Lab, LabConfig, LabError, TestLab, Workload};
use ferry_testkit::{poll, try_poll, Ferry, PYTHON, WAIT};

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Root, iproute2, util-linux and Python. Like the kit's `require_privileged`: under CI=true
/// a missing piece fails the test; elsewhere the test is skipped with a note.
#[track_caller]
fn require_lab() -> bool {
    let missing = ferry_lab::missing_prerequisites()
        .map(|e| e.to_string())
        .or_else(|| (!Path::new(PYTHON).exists()).then(|| format!("{PYTHON} not found")));
    let Some(reason) = missing else { return true };
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    if ci {
        panic!("privileged test cannot run in CI: {reason}");
    }
    eprintln!("skipped: {reason}");
    false
}

/// A TCP server that answers each connection with `echo:` and the first chunk it received.
const ECHO: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000))
s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(b"echo:" + c.recv(100))
    c.close()
"#;

fn echo_server() -> Vec<String> {
    vec![PYTHON.into(), "-c".into(), ECHO.into()]
}

fn sleeper() -> Vec<String> {
    vec!["sleep".into(), "1000".into()]
}

/// One round trip with the echo server at `ip`, or why not.
fn echo(ip: Ipv4Addr, text: &str) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, 7000)), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(text.as_bytes())?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Waits until the echo server at `ip` answers (it needs a moment to start listening).
#[track_caller]
fn wait_echo(ip: Ipv4Addr, text: &str) -> String {
    poll(WAIT, &format!("an answer from {ip}:7000"), || echo(ip, text).ok())
}

/// Reachable without ping: a TCP connection to a closed port is refused by the kernel at
/// `ip`, which needs ARP and the bridge to work just as well as an accepted one.
fn reachable(ip: Ipv4Addr) -> bool {
    match TcpStream::connect_timeout(&SocketAddr::from((ip, 9)), Duration::from_secs(3)) {
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::ConnectionRefused,
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().expect("run");
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lab's links (`ip link`) and namespaces (`ip netns list`) that are still there.
fn leftovers(config: &LabConfig) -> Vec<String> {
    let links = run("ip", &["-o", "link", "show"]);
    let mut left: Vec<String> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name))
        .filter(|name| config.is_lab_link(name))
        .map(|name| format!("link {name}"))
        .collect();
    let netns = run("ip", &["netns", "list"]);
    left.extend(
        netns
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| config.is_lab_netns(n))
            .map(|n| format!("netns {n}")),
    );
    left
}

/// Nothing of the lab is left: no link, no namespace, no state, and none of `pids` in /proc
/// (not even as a zombie: reaping takes this machine's init a moment).
#[track_caller]
fn assert_all_gone(config: &LabConfig, pids: &[i32]) {
    assert_eq!(leftovers(config), Vec::<String>::new(), "lab objects left behind");
    assert!(!config.state_file().exists(), "state file left behind");
    for &pid in pids {
        poll(WAIT, &format!("process {pid} to vanish from /proc"), || {
            (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        });
    }
}

fn ns_id(path: impl AsRef<Path>) -> (u64, u64) {
    let m = fs::metadata(path.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()));
    (m.dev(), m.ino())
}

/// The session id of `pid` (field 6 of /proc/PID/stat).
fn session_of(pid: i32) -> i32 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    rest.split_whitespace().nth(3).and_then(|s| s.parse().ok()).expect("session field")
}

/// A workload as the brief wants it: PID 1 of its own pid namespace and leader of its own
/// session there, in its own network namespace (neither ours nor a node's), in our mount
/// namespace, stdin/stdout/stderr on /dev/null.
#[track_caller]
fn assert_isolated(lab: &Lab, w: &Workload) {
    let pid = w.pid;
    assert_eq!(ns_pids(pid), Some(vec![pid, 1]), "PID 1 of a pid namespace one level down");
    assert_ne!(ns_id(format!("/proc/{pid}/ns/pid")), ns_id("/proc/self/ns/pid"));
    let net = ns_id(format!("/proc/{pid}/ns/net"));
    assert_eq!(net, ns_id(w.netns_path()), "in the workload's own namespace {}", w.netns);
    assert_ne!(net, ns_id("/proc/self/ns/net"));
    for node in lab.nodes() {
        assert_ne!(net, ns_id(node.netns_path()), "not in {}'s namespace", node.name);
    }
    assert_eq!(ns_id(format!("/proc/{pid}/ns/mnt")), ns_id("/proc/self/ns/mnt"), "no private mounts");
    assert_eq!(session_of(pid), pid, "leads its own session");
    for fd in 0..3 {
        let target = fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("fd");
        assert_eq!(target, Path::new("/dev/null"), "fd {fd}");
    }
    // Beyond those, only what it opened itself (a server's sockets): nothing inherited.
    let others: Vec<_> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
        .filter(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()).is_some_and(|fd| fd > 2))
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|target| !target.to_string_lossy().starts_with("socket:"))
        .collect();
    assert!(others.is_empty(), "inherited descriptors: {others:?}");
}

#[test]
fn nodes_and_workloads_are_reachable_from_this_machine() {
    if !require_lab() {
        return;
    }
    let forward_before = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("ip_forward");
    let mut guard = TestLab::up(2).expect("lab up");
    let config = guard.config().clone();
    let subnet = guard.lab().subnet();
    let names: Vec<&str> = guard.lab().nodes().iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["node1", "node2"]);
    for (k, node) in guard.lab().nodes().iter().enumerate() {
        assert_eq!(Some(node.ip), subnet.node_ip(k + 1));
        assert!(reachable(node.ip), "{} at {} is not reachable from the root namespace", node.name, node.ip);
        // Inside: the lab's subnet and nothing else, so no packet can leave the lab.
        let routes = run("ip", &["-n", &node.netns, "-4", "route", "show", "table", "all"]);
        for r in routes.lines().filter(|r| !r.starts_with("local ") && !r.starts_with("broadcast ")) {
            assert!(r.starts_with(&subnet.to_string()), "unexpected route in {}: {r}", node.netns);
        }
    }
    // No address outside 198.18.0.0/15 on lab links (no IPv6 link-local either).
    let bridge = guard.lab().bridge().name.clone();
    assert_eq!(run("ip", &["-6", "-o", "addr", "show", "dev", &bridge]), "");
    assert!(run("ip", &["-4", "-o", "addr", "show", "dev", &bridge])
        .contains(&format!("{}/24", subnet.bridge_ip())));

    let server = guard.lab_mut().exec("node2", &echo_server(), &ExecOptions::default()).expect("exec server");
    assert_eq!(Some(server.ip), subnet.workload_ip(2, 0));
    assert_eq!(wait_echo(server.ip, "hello"), "echo:hello", "from the root namespace");
    let lab = guard.lab();
    assert_isolated(lab, &server);
    // Across the bridge from another node's namespace, as a peer agent would connect.
    let client = format!(
        "import socket\ns = socket.create_connection(('{}', 7000), timeout=10)\ns.sendall(b'x')\nprint(s.recv(100).decode())",
        server.ip
    );
    let out = lab
        .node_command("node1", PYTHON)
        .expect("node1 command")
        .args(["-c", &client])
        .output()
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "echo:x",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let sleeper = guard.lab_mut().exec("node1", &sleeper(), &ExecOptions::default()).expect("exec sleep");
    assert_eq!(Some(sleeper.ip), subnet.workload_ip(1, 0));
    assert!(reachable(sleeper.ip), "a workload with no server is reachable at once");
    // Its MAC follows from its address, so that the address can move without ARP updates.
    let link = run("ip", &["-n", &sleeper.netns, "-br", "link", "show", "eth0"]);
    assert!(link.contains(&mac_of(sleeper.ip)), "{link}");
    assert_isolated(guard.lab(), &sleeper);
    assert_eq!(guard.lab().workloads().len(), 2);

    let report = guard.down().expect("lab down");
    assert!(report.had_state);
    for w in [&server, &sleeper] {
        assert!(report.processes_killed.contains(&w.pid), "{} was not killed: {report:?}", w.workload_id());
        assert!(report.netns_removed.contains(&w.netns));
        assert!(report.links_removed.contains(&w.veth));
    }
    assert_eq!(report.netns_removed.len(), 4);
    assert_eq!(report.links_removed.len(), 5, "bridge, 2 node veths, 2 workload veths");
    assert_all_gone(&config, &[server.pid, sleeper.pid]);
    // (No connection attempt now: with the lab's route gone it would leave by the default route.)
    assert!(!run("ip", &["-4", "route", "show"]).contains(&subnet.to_string()), "the lab's route is gone");
    let forward_after = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("ip_forward");
    assert_eq!(forward_before, forward_after, "forwarding was left as it was");
}

/// `pid:N IP`, the last line `ferry lab exec` prints.
#[track_caller]
fn parse_exec(stdout: &str) -> (i32, Ipv4Addr) {
    let last = stdout.lines().last().unwrap_or_else(|| panic!("exec printed nothing"));
    let (id, ip) = last.split_once(' ').unwrap_or_else(|| panic!("not `pid:N IP`: {last:?}"));
    let pid = id.strip_prefix("pid:").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("bad id {id:?}"));
    (pid, ip.parse().unwrap_or_else(|_| panic!("bad address {ip:?}")))
}

#[test]
fn cli_up_exec_status_down() {
    if !require_lab() {
        return;
    }
    let ferry = ferry();
    let guard = TestLab::reserve().expect("reserve a test lab");
    let config = guard.config().clone();
    let subnet = guard.subnet();
    let sel = config.cli_args();
    let lab_cmd = |verb: &str, extra: &[&str]| -> Vec<String> {
        let mut args = vec!["lab".to_string(), verb.to_string()];
        args.extend(sel.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    let up = ferry.run(&lab_cmd("up", &["--nodes", "2", "--subnet", &subnet.to_string()]));
    up.assert_ok();
    assert!(up.stdout.contains("node1") && up.stdout.contains("node2"), "{up}");
    ferry.run(&lab_cmd("up", &["--nodes", "2"])).assert_error(8).assert_stderr_mentions("already up");

    let exec = ferry.run(&lab_cmd("exec", &["node1", "--", "sleep", "1000"]));
    exec.assert_ok();
    let (pid, ip) = parse_exec(&exec.stdout);
    assert_eq!(Some(ip), subnet.workload_ip(1, 0));
    assert_eq!(ns_pids(pid), Some(vec![pid, 1]), "the pid printed is the workload's, PID 1 inside");
    assert!(reachable(ip));

    let log = ferry.scratch().join("w.log");
    let log_arg = log.to_str().expect("utf-8 path");
    let exec = ferry.run(&lab_cmd(
        "exec",
        &["--log", log_arg, "node2", "--", "sh", "-c", "echo started; echo oops >&2; exec sleep 1000"],
    ));
    exec.assert_ok();
    let (logged_pid, logged_ip) = parse_exec(&exec.stdout);
    assert_eq!(Some(logged_ip), subnet.workload_ip(2, 0));
    poll(WAIT, "the workload's output in its log", || {
        let text = fs::read_to_string(&log).unwrap_or_default();
        (text.contains("started") && text.contains("oops")).then_some(())
    });
    assert_eq!(fs::metadata(&log).expect("log").mode() & 0o777, 0o600);
    // Write-only and appending: the kind of file CRIU exempts from its size check on restore.
    let info = fs::read_to_string(format!("/proc/{logged_pid}/fdinfo/1")).expect("fdinfo");
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).expect("flags").trim();
    let flags = u32::from_str_radix(flags, 8).expect("octal flags");
    assert_eq!(flags & 0o3, 0o1, "O_WRONLY");
    assert_ne!(flags & 0o2000, 0, "O_APPEND");

    ferry
        .run(&lab_cmd("exec", &["node7", "--", "true"]))
        .assert_error(3)
        .assert_stderr_mentions("node1, node2");
    ferry.run(&lab_cmd("exec", &["node1", "--", "no-such-command-here"])).assert_error(2);
    ferry
        .run(&lab_cmd("exec", &["node1", "--", "false"]))
        .assert_error(1)
        .assert_stderr_mentions("exit status: 1");
    ferry.run(&["lab", "exec", "--name", "BAD!", "node1", "--", "true"]).assert_error(2);
    ferry
        .run(&lab_cmd("up", &["--subnet", "10.0.0.0/16"]))
        .assert_error(2)
        .assert_stderr_mentions("198.18.0.0/15");
    ferry.run_as_nobody(&lab_cmd("status", &[])).assert_error(4);

    let status = ferry.run(&lab_cmd("status", &["--json"]));
    status.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&status.stdout).expect("status --json");
    let workloads = doc["workloads"].as_array().expect("workloads");
    let running: Vec<&serde_json::Value> = workloads.iter().filter(|w| w["running"] == true).collect();
    assert_eq!(running.len(), 2, "the failed starts are not recorded\n{status}");
    assert_eq!(running[0]["id"], format!("pid:{pid}"));
    assert_eq!(doc["nodes"].as_array().map(Vec::len), Some(2));

    let down = ferry.run(&lab_cmd("down", &[]));
    down.assert_ok();
    assert!(down.stdout.contains("is down"), "{down}");
    assert_all_gone(&config, &[pid, logged_pid]);
    let again = ferry.run(&lab_cmd("down", &[]));
    again.assert_ok();
    assert!(again.stdout.contains("was not up"), "{again}");
    ferry.run(&lab_cmd("status", &[])).assert_error(3).assert_stderr_mentions("not up");
}

#[test]
fn down_without_state_finds_everything_by_name() {
    if !require_lab() {
        return;
    }
    let mut guard = TestLab::up(2).expect("lab up");
    let config = guard.config().clone();
    let w = guard.lab_mut().exec("node2", &sleeper(), &ExecOptions::default()).expect("exec");
    // A crash that lost the record: nothing but names tells what the lab was.
    fs::remove_file(config.state_file()).expect("remove state");
    ferry().run(&["lab", "status", "--name", config.name().expect("named")]).assert_error(3);

    let down = ferry().run(&["lab", "down", "--name", config.name().expect("named")]);
    down.assert_ok();
    assert!(down.stdout.contains("found by name"), "{down}");
    assert_all_gone(&config, &[w.pid]);
    drop(guard);
}

#[test]
fn a_damaged_state_file_does_not_stop_down() {
    if !require_lab() {
        return;
    }
    let mut guard = TestLab::up(1).expect("lab up");
    let config = guard.config().clone();
    let w = guard.lab_mut().exec("node1", &sleeper(), &ExecOptions::default()).expect("exec");
    fs::write(config.state_file(), "{ not json").expect("damage state");
    assert!(matches!(Lab::load(&config), Err(LabError::DamagedState { .. })));
    let report = Lab::down(&config).expect("down");
    assert!(report.processes_killed.contains(&w.pid));
    assert_all_gone(&config, &[w.pid]);
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    if !require_lab() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let mut guard = TestLab::up(2).expect("lab up");
        let w = guard.lab_mut().exec("node1", &sleeper(), &ExecOptions::default()).expect("exec");
        tx.send((guard.config().clone(), w.pid)).expect("send");
        panic!("a test failing half way");
    })
    .join();
    assert!(result.is_err(), "the thread was meant to panic");
    let (config, pid) = rx.recv().expect("the lab was up before the panic");
    assert_all_gone(&config, &[pid]);
}

#[test]
fn up_refuses_leftovers_and_taken_subnets() {
    if !require_lab() {
        return;
    }
    // A namespace of a lab that crashed before it wrote any state.
    let guard = TestLab::reserve().expect("reserve");
    let config = guard.config().clone();
    let stray = format!("{}node1", config.netns_prefix());
    run("ip", &["netns", "add", &stray]);
    match Lab::up(&config, 1) {
        Err(LabError::Leftovers { objects, .. }) => {
            assert!(objects.iter().any(|o| o.contains(&stray)), "{objects:?}")
        }
        other => panic!("expected leftovers, got {other:?}"),
    }
    let report = Lab::down(&config).expect("down");
    assert!(!report.had_state);
    assert_eq!(report.netns_removed, [stray]);
    assert_all_gone(&config, &[]);

    // Another lab already uses this subnet.
    let taken = TestLab::up(1).expect("lab up");
    let other = TestLab::reserve().expect("reserve");
    let clash = other.config().clone().with_subnet(taken.subnet());
    match Lab::up(&clash, 1) {
        Err(e @ LabError::SubnetInUse { .. }) => assert!(e.to_string().contains(&taken.subnet().to_string())),
        other => panic!("expected the subnet to be in use, got {other:?}"),
    }
    assert!(leftovers(&clash).is_empty(), "a refused up creates nothing");
    assert!(matches!(Lab::up(taken.config(), 1), Err(LabError::AlreadyUp { .. })));
}

#[test]
fn parallel_execs_get_distinct_addresses() {
    if !require_lab() {
        return;
    }
    let guard = TestLab::up(2).expect("lab up");
    let config = guard.config().clone();
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let config = config.clone();
            std::thread::spawn(move || {
                let mut lab = Lab::load(&config).expect("load");
                let node = if i % 2 == 0 { "node1" } else { "node2" };
                lab.exec(node, &sleeper(), &ExecOptions::default()).expect("exec")
            })
        })
        .collect();
    let workloads: Vec<Workload> = threads.into_iter().map(|t| t.join().expect("exec thread")).collect();
    let ips: BTreeSet<Ipv4Addr> = workloads.iter().map(|w| w.ip).collect();
    let netns: BTreeSet<&str> = workloads.iter().map(|w| w.netns.as_str()).collect();
    assert_eq!(ips.len(), 6, "{workloads:?}");
    assert_eq!(netns.len(), 6);
    let lab = Lab::load(&config).expect("load");
    assert_eq!(lab.workloads().len(), 6, "every start is recorded");
    for w in &workloads {
        assert!(w.is_running());
        assert!(try_poll(WAIT, || reachable(w.ip).then_some(())).is_some(), "{} unreachable", w.ip);
    }
    let pids: Vec<i32> = workloads.iter().map(|w| w.pid).collect();
    guard.down().expect("down");
    assert_all_gone(&config, &pids);
}
