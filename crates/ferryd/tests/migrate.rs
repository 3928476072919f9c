//! Live migration between lab nodes, end to end: real agents (this crate's ferryd) in network
//! namespaces, real CRIU, real workloads (tools/memload.py: random memory with a self-checking
//! sum, a TCP request port). Failures are injected at each phase (FERRY_FAILPOINTS in an
//! agent's environment, or a tmpfs that is too small); afterwards the workload must run on
//! exactly one node with its memory intact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failing test should stop right there

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use ferry_lab::{ExecOptions, TestLab, Workload};
use ferry_migrate::api::{Event, MigrateRequest, OnFailure, Report, Request, Strategy};
use ferry_migrate::journal::Phase;
use ferry_migrate::lab_agents::{self, agent_socket, node_dir, METRICS_PORT, PEER_PORT};
use ferry_testkit::{poll, require_privileged, Probe};

/// One migration test at a time: each moves hundreds of MiB on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

const PORT: u16 = 7000;

fn ferryd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferryd"))
}

fn tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools")
}

struct Fixture {
    lab: TestLab,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Fixture {
    /// A lab of `nodes` nodes whose agents run with `env(node)` added to their environment.
    fn new(nodes: usize, env: &dyn Fn(&str) -> Vec<(&'static str, String)>) -> Option<Fixture> {
        if !require_privileged() {
            return None;
        }
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let lab = TestLab::up(nodes).expect("lab up");
        lab_agents::prepare_stores(lab.lab()).expect("stores");
        let names: Vec<String> = lab.lab().nodes().iter().map(|n| n.name.clone()).collect();
        for name in &names {
            start(&lab, name, &env(name));
        }
        Some(Fixture { lab, _serial: serial })
    }

    fn socket(&self, node: &str) -> PathBuf {
        agent_socket(self.lab.config().state_dir(), node)
    }

    /// Starts memload with `mib` MiB on `node`; returns once it answers.
    fn memload(&mut self, node: &str, mib: u32, dirty: Option<u32>) -> Workload {
        let log = node_dir(self.lab.config().state_dir(), node).join("memload.log");
        let mut argv: Vec<String> = vec![
            "/usr/bin/python3".into(),
            tools().join("memload.py").display().to_string(),
            "--mib".into(),
            mib.to_string(),
            "--port".into(),
            PORT.to_string(),
        ];
        if let Some(d) = dirty {
            argv.extend(["--dirty".into(), d.to_string()]);
        }
        let w = self.lab.lab_mut().exec(node, &argv, &ExecOptions { log: Some(log) }).expect("exec memload");
        poll(Duration::from_secs(60), "memload to answer", || ask(w.ip, "!stats"));
        w
    }

    fn migrate(&self, from: &str, pid: i32, to: &str, strategy: Strategy) -> Result<Report, String> {
        let req =
            MigrateRequest { workload: format!("pid:{pid}"), to: to.into(), strategy, ..Default::default() };
        match self.migrate_with(from, req, &mut |_| {}) {
            Ok(Event::Report(r)) => Ok(r),
            Ok(Event::Failed { message, .. }) => Err(message),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A migration asked of `from`'s agent, `on_event` seeing its progress; the last event.
    fn migrate_with(
        &self,
        from: &str,
        req: MigrateRequest,
        on_event: &mut dyn FnMut(&Event),
    ) -> Result<Event, ferry_migrate::MigrateError> {
        ferry_migrate::client::call(&self.socket(from), &Request::Migrate(req), on_event)
    }

    /// Starts counterd with `mib` MiB on `node`; returns once it answers.
    fn counterd(&mut self, node: &str, mib: u32) -> Workload {
        let log = node_dir(self.lab.config().state_dir(), node).join("counterd.log");
        let argv: Vec<String> = vec![
            "/usr/bin/python3".into(),
            tools().join("counterd.py").display().to_string(),
            "--mib".into(),
            mib.to_string(),
            "--port".into(),
            PORT.to_string(),
        ];
        let w = self.lab.lab_mut().exec(node, &argv, &ExecOptions { log: Some(log) }).expect("exec counterd");
        poll(Duration::from_secs(60), "counterd to answer", || counter(w.ip, "get"));
        w
    }

    /// Exactly one running copy of counterd, on `node` by the lab's record; its memory checks
    /// out; returns its counter.
    fn assert_one_counter_on(&self, ip: Ipv4Addr, node: &str) -> u64 {
        let mut seen = Vec::new();
        let one = ferry_testkit::try_poll(Duration::from_secs(30), || {
            seen = self.copies().into_iter().filter(|p| !is_held(*p)).collect();
            (seen.len() == 1).then_some(())
        });
        assert!(one.is_some(), "not exactly one running copy of the workload: {seen:?}");
        let lab = ferry_lab::Lab::load(self.lab.config()).unwrap();
        let running: Vec<&Workload> =
            lab.workloads().iter().filter(|w| w.ip == ip && w.is_running()).collect();
        assert_eq!(running.len(), 1, "lab record: {:?}", lab.workloads());
        assert_eq!(running[0].node, node, "the workload runs on {}, expected {node}", running[0].node);
        assert_eq!(running[0].pid, seen[0], "the recorded pid is the running copy");
        let sum = poll(Duration::from_secs(60), "the workload to answer", || counter_json(ip, "!sum"));
        assert_eq!(sum["ok"], serde_json::Value::Bool(true), "memory checks out: {sum}");
        sum["counter"].as_u64().unwrap()
    }

    /// The journal entries left on `node`.
    fn journal(&self, node: &str) -> Vec<ferry_migrate::journal::Entry> {
        let dir = node_dir(self.lab.config().state_dir(), node).join("store/journal");
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills `node`'s agent with SIGKILL (whatever it is doing).
    fn kill_agent(&self, node: &str) {
        let socket = self.socket(node);
        for pid in agent_pids(&socket) {
            let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
        }
    }

    /// Host pids of workload processes (memload, counterd) in the lab's network namespaces.
    fn copies(&self) -> Vec<i32> {
        let prefix = self.lab.config().netns_prefix();
        let ours: Vec<(u64, u64)> = std::fs::read_dir("/run/netns")
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .filter_map(|e| std::fs::metadata(e.path()).ok().map(|m| (m.dev(), m.ino())))
            .collect();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                // The workload itself, not the `unshare` that launched it on its first node.
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd);
                cmd.starts_with("/usr/bin/python3")
                    && (cmd.contains("memload.py") || cmd.contains("counterd.py"))
            })
            .filter(|pid| {
                std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|m| ours.contains(&(m.dev(), m.ino())))
            })
            .collect()
    }

    /// The node the lab says the workload at `ip` runs on, checking it is the only copy, that
    /// its memory checks out and that it answers at its address.
    fn assert_one_copy_on(&self, ip: Ipv4Addr, node: &str) {
        let mut seen = Vec::new();
        let copies = ferry_testkit::try_poll(Duration::from_secs(30), || {
            seen = self.copies();
            (seen.len() == 1).then(|| seen.clone())
        });
        let copies = copies.unwrap_or_else(|| {
            let cmds: Vec<String> = seen
                .iter()
                .map(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                        .unwrap_or_default()
                        .replace('\0', " ")
                })
                .collect();
            panic!("not exactly one copy of the workload: {seen:?} {cmds:?}")
        });
        let lab = ferry_lab::Lab::load(self.lab.config()).unwrap();
        let running: Vec<&Workload> =
            lab.workloads().iter().filter(|w| w.ip == ip && w.is_running()).collect();
        assert_eq!(running.len(), 1, "lab record: {:?}", lab.workloads());
        assert_eq!(running[0].node, node, "the workload runs on {}, expected {node}", running[0].node);
        assert_eq!(running[0].pid, copies[0], "the recorded pid is the running copy");
        let sum = poll(Duration::from_secs(30), "the workload to answer", || ask(ip, "!sum"));
        assert_eq!(sum["ok"], serde_json::Value::Bool(true), "memory checks out: {sum}");
    }

    fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(node_dir(self.lab.config().state_dir(), node).join("ferryd.log"))
            .unwrap_or_default()
    }

    /// Kills `node`'s agent (if it still runs) and starts it again with `env`.
    fn restart(&self, node: &str, env: &[(&'static str, String)]) {
        let socket = self.socket(node);
        for pid in agent_pids(&socket) {
            let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
        }
        poll(Duration::from_secs(10), "the old agent to be gone", || {
            agent_pids(&socket).is_empty().then_some(())
        });
        start(&self.lab, node, env);
    }
}

fn start(lab: &TestLab, node: &str, env: &[(&'static str, String)]) {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let socket = lab_agents::spawn_agent(lab.lab(), node, ferryd(), None, &env).expect("spawn agent");
    assert!(lab_agents::wait_agent(&socket, Duration::from_secs(30)), "agent of {node} did not start");
}

/// Pids of ferryd processes serving `socket`.
fn agent_pids(socket: &Path) -> Vec<i32> {
    let needle = socket.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains("ferryd ") && cmd.contains(&needle)
        })
        .collect()
}

fn no_env(_: &str) -> Vec<(&'static str, String)> {
    Vec::new()
}

/// The environment that makes `node`'s agent fail at `spec` (`name=action`).
fn failing(node: &'static str, spec: &'static str) -> impl Fn(&str) -> Vec<(&'static str, String)> {
    move |n: &str| if n == node { vec![("FERRY_FAILPOINTS", spec.to_owned())] } else { Vec::new() }
}

/// tools/probe_client.py in echo mode against the workload at `ip`, `conns` connections,
/// until it is finished.
fn start_probe(ip: Ipv4Addr, conns: u32) -> Probe {
    Probe::echo(&tools().join("probe_client.py"), ip, PORT, conns)
}

/// The probe's summary, checked for `counters` all 0, read two seconds plus `downtime` after
/// the migration returned: a client's TCP retransmission timer backs off during an outage, so
/// its next try may come up to the outage's length after the workload answers again (a loaded
/// machine's longer freeze would otherwise read as a stalled client).
fn probe_summary(probe: Probe, downtime_s: f64, counters: &[&str]) -> serde_json::Value {
    let summary = probe.finish(Duration::from_secs_f64(2.0 + downtime_s.clamp(0.0, 30.0)));
    for counter in counters {
        assert_eq!(summary[*counter], 0, "{counter} in {summary}");
    }
    summary
}

/// One request to memload; its JSON answer.
fn ask(ip: Ipv4Addr, line: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, PORT)), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).ok()?;
    let json = answer.splitn(3, ' ').nth(2)?;
    serde_json::from_str(json.trim()).ok()
}

/// One request to counterd; its answer (a number).
fn counter(ip: Ipv4Addr, line: &str) -> Option<u64> {
    counter_line(ip, line)?.trim().parse().ok()
}

/// One request to counterd; its answer (JSON).
fn counter_json(ip: Ipv4Addr, line: &str) -> Option<serde_json::Value> {
    serde_json::from_str(counter_line(ip, line)?.trim()).ok()
}

fn counter_line(ip: Ipv4Addr, line: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, PORT)), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    s.write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).ok()?;
    Some(answer)
}

/// True if `pid` is held frozen in one of ferry's freezer cgroups (a source's copy after the
/// switch): it is not a running copy.
fn is_held(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|c| c.lines().any(|l| l.contains(":freezer:/ferry-hold/")))
}

/// Clients of counterd, each on its own connection sending `inc` and reading the answer in a
/// loop: the highest value any of them had acknowledged (read), and their errors.
struct Clients {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, u64, Vec<String>)>>,
}

#[derive(Debug)]
struct ClientsSummary {
    /// The highest counter value a client read.
    max_acked: u64,
    requests: u64,
    errors: Vec<String>,
}

impl Clients {
    fn start(ip: Ipv4Addr, n: usize) -> Clients {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut max, mut requests, mut errors) = (0u64, 0u64, Vec::new());
                    let conn =
                        TcpStream::connect_timeout(&SocketAddr::from((ip, PORT)), Duration::from_secs(5));
                    let Ok(conn) = conn else {
                        errors.push("connect".to_owned());
                        return (max, requests, errors);
                    };
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(90)));
                    let _ = conn.set_nodelay(true);
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut writer = conn;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Err(e) = writer.write_all(b"inc\n") {
                            errors.push(format!("write: {e}"));
                            break;
                        }
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) => {
                                errors.push("closed".to_owned());
                                break;
                            }
                            Ok(_) => match line.trim().parse::<u64>() {
                                Ok(v) => {
                                    max = max.max(v);
                                    requests += 1;
                                }
                                Err(_) => errors.push(format!("answer {line:?}")),
                            },
                            Err(e) => {
                                errors.push(format!("read: {e}"));
                                break;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    (max, requests, errors)
                })
            })
            .collect();
        Clients { stop, threads }
    }

    fn stop(self) -> ClientsSummary {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut sum = ClientsSummary { max_acked: 0, requests: 0, errors: Vec::new() };
        for t in self.threads {
            let (max, requests, errors) = t.join().unwrap();
            sum.max_acked = sum.max_acked.max(max);
            sum.requests += requests;
            sum.errors.extend(errors);
        }
        sum
    }
}

#[test]
fn stop_copy_moves_memory_address_and_record_and_counts_it() {
    let Some(mut f) = Fixture::new(2, &no_env) else { return };
    let w = f.memload("node1", 256, None);
    let before = ask(w.ip, "!sum").unwrap();
    let r = f.migrate("node1", w.pid, "node2", Strategy::StopCopy).expect("migrate");
    assert_eq!(r.strategy, Strategy::StopCopy);
    assert!(r.bytes_sent > 200 << 20, "sent {} bytes", r.bytes_sent);
    assert!(r.downtime_s > 0.0 && r.downtime_s <= r.total_s);
    for phase in ["dump", "transfer", "restore", "commit"] {
        assert!(r.phases.iter().any(|p| p.name == phase), "phase {phase} in {:?}", r.phases);
    }
    f.assert_one_copy_on(w.ip, "node2");
    assert_eq!(ask(w.ip, "!sum").unwrap()["computed"], before["computed"], "the same memory");
    // The old namespace is gone; the source's store keeps nothing of the migration.
    assert!(!Path::new("/run/netns").join(&w.netns).exists());
    let src_manifests = node_dir(f.lab.config().state_dir(), "node1").join("store/manifests");
    assert_eq!(std::fs::read_dir(src_manifests).unwrap().count(), 0);
    // Neither store keeps the migration's chunks (the target removes its own after it
    // answered the commit).
    for node in ["node1", "node2"] {
        let packs = node_dir(f.lab.config().state_dir(), node).join("store/packs");
        let left =
            || -> Vec<_> { std::fs::read_dir(&packs).unwrap().flatten().map(|e| e.file_name()).collect() };
        let emptied = ferry_testkit::try_poll(Duration::from_secs(10), || left().is_empty().then_some(()));
        assert!(emptied.is_some(), "{node} keeps {:?}", left());
    }
    // The source's metrics count it, with its phases and downtime in histograms.
    let node1 = f.lab.lab().node("node1").unwrap().ip;
    let mut m = TcpStream::connect((node1, METRICS_PORT)).unwrap();
    m.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    m.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.0 200") && head.contains("application/openmetrics-text"), "{head}");
    let samples = ferry_testkit::parse_metrics(body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let get = |name: &str, labels: &[(&str, &str)]| {
        let mut all = vec![("node", "node1")];
        all.extend_from_slice(labels);
        ferry_testkit::metric(&samples, name, &all)
    };
    assert_eq!(get("ferry_migrations_total", &[]), Some(1.0), "{body}");
    for phase in ["dump", "transfer", "restore", "commit"] {
        let count = get("ferry_phase_duration_seconds_count", &[("phase", phase)]);
        assert_eq!(count, Some(1.0), "{phase}: {body}");
        let all = get("ferry_phase_duration_seconds_bucket", &[("phase", phase), ("le", "+Inf")]);
        assert_eq!(all, Some(1.0), "{phase}: {body}");
    }
    let secs = r.phases.iter().find(|p| p.name == "transfer").map(|p| p.seconds);
    let sum = get("ferry_phase_duration_seconds_sum", &[("phase", "transfer")]);
    assert!(sum.zip(secs).is_some_and(|(a, b)| (a - b).abs() < 1e-9), "{sum:?} against {secs:?}");
    assert_eq!(get("ferry_downtime_seconds_count", &[]), Some(1.0), "{body}");
    // The downtime falls in the first bucket at or above it, and in none below.
    let buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == "ferry_downtime_seconds_bucket")
        .map(|s| (s.labels["le"].parse::<f64>().unwrap_or(f64::INFINITY), s.value))
        .collect();
    assert!(buckets.len() > 5, "{body}");
    for (le, n) in buckets {
        assert_eq!(n, if r.downtime_s <= le { 1.0 } else { 0.0 }, "le={le}, downtime {}", r.downtime_s);
    }
    // And it moves back.
    let back = f.migrate("node2", r.new_workload[4..].parse().unwrap(), "node1", Strategy::StopCopy);
    back.expect("migrate back");
    f.assert_one_copy_on(w.ip, "node1");
}

#[test]
fn fifty_tcp_clients_see_no_error_through_a_pre_copy_migration() {
    let Some(mut f) = Fixture::new(2, &no_env) else { return };
    let w = f.memload("node1", 128, Some(10));
    let probe = start_probe(w.ip, 50);
    std::thread::sleep(Duration::from_secs(3));
    let r = f.migrate("node1", w.pid, "node2", Strategy::PreCopy).expect("migrate");
    let pre = r.phases.iter().find(|p| p.name == "pre-copy").expect("a pre-copy phase");
    assert!(pre.seconds > 0.0);
    let summary =
        probe_summary(probe, r.downtime_s, &["errors", "lost", "dup", "wrong", "resets", "reconnects"]);
    assert!(summary["requests"].as_u64().unwrap() > 1000, "{summary}");
    assert_eq!(summary["conns"], 50);
    f.assert_one_copy_on(w.ip, "node2");
}

#[test]
fn post_copy_switches_before_the_memory_moves_and_keeps_clients() {
    // The push starts at the switch (not a second later): 256 MiB arrive in less than that.
    let env = |n: &str| if n == "node2" { vec![("FERRY_PUSH_DELAY_MS", "0".to_owned())] } else { Vec::new() };
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.memload("node1", 256, Some(5));
    let probe = start_probe(w.ip, 10);
    std::thread::sleep(Duration::from_secs(2));
    let r = f.migrate("node1", w.pid, "node2", Strategy::PostCopy).expect("migrate");
    assert_eq!(r.strategy, Strategy::PostCopy);
    let pages = r.phases.iter().find(|p| p.name == "pages").expect("a pages phase");
    // The switch came before the memory: the downtime ended before the pages phase began.
    assert!(pages.seconds > 0.0, "{r:?}");
    assert!(r.downtime_s + pages.seconds <= r.total_s, "{r:?}");
    assert!(r.bytes_sent >= 256 << 20, "the pages crossed too: {}", r.bytes_sent);
    probe_summary(probe, r.downtime_s, &["errors", "lost", "dup", "wrong", "resets"]);
    f.assert_one_copy_on(w.ip, "node2");
    // The source pushed pages ahead of demand, and some went straight into the workload.
    let log = f.agent_log("node2");
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name} in '{line}'"))
    };
    let pushed = log.lines().find(|l| l.contains("page push ended")).expect("the push ran");
    assert!(field(pushed, "bytes") > 0, "{pushed}");
    let done = log.lines().find(|l| l.contains("every page is in")).expect("the pager's account");
    assert!(field(done, "pushed") > 0, "{done}");
    assert!(field(done, "bytes") >= 256 << 20, "{done}");
}

/// A process with guard regions (`madvise(MADV_GUARD_INSTALL)`), as glibc 2.42 and later put
/// under every thread stack: ferry-testkit's `guarded` workload (16 MiB with two guards, two
/// threads on guarded stacks) moves post-copy with its memory, its threads and its guards.
#[test]
fn post_copy_moves_a_process_with_guard_regions() {
    let Some(mut f) = Fixture::new(2, &no_env) else { return };
    let dir = tempfile::Builder::new().prefix("ferry-guarded-").tempdir().unwrap();
    let argv = ferry_testkit::Sample::Guarded { mib: 16, threads: 2 }.command(dir.path());
    let log = node_dir(f.lab.config().state_dir(), "node1").join("guarded.log");
    let w = f.lab.lab_mut().exec("node1", &argv, &ExecOptions { log: Some(log) }).expect("exec guarded");
    let hash = |pid: i32| -> String {
        let file = dir.path().join(format!("hash.{pid}"));
        let _ = std::fs::remove_file(&file);
        ferry_sys::kill(pid, ferry_sys::Signal::Usr1).unwrap();
        poll(Duration::from_secs(30), "the hash", || std::fs::read_to_string(&file).ok())
    };
    poll(Duration::from_secs(30), "guarded to be ready", || {
        dir.path().join(format!("ready.{}", w.pid)).exists().then_some(())
    });
    let before = hash(w.pid);
    assert!(before.ends_with(" guards:4/4"), "{before}");
    let r = f.migrate("node1", w.pid, "node2", Strategy::PostCopy).expect("migrate");
    assert_eq!(r.strategy, Strategy::PostCopy);
    let moved: i32 = r.new_workload[4..].parse().unwrap();
    eprintln!("guarded: moved post-copy, downtime {:.3} s, {} bytes sent", r.downtime_s, r.bytes_sent);
    assert_eq!(hash(moved), before, "the memory and the guards after the move");
    let threads = std::fs::read_dir(format!("/proc/{moved}/task")).unwrap().count();
    assert_eq!(threads, 3, "the main thread and both on guarded stacks");
    assert!(!ferry_sys::process_exists(w.pid), "the source copy is gone");
}

#[test]
fn post_copy_whose_pages_never_come_is_lost_or_resumed_as_asked() {
    // Every page channel is cut as it opens, and nothing is pushed: the pages never come.
    let env = |n: &str| match n {
        "node1" => vec![("FERRY_FAILPOINTS", "source-serve-pages=cut".to_owned())],
        _ => vec![("FERRY_PUSH", "off".to_owned())],
    };
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.memload("node1", 64, None);
    // Once in a while (seen once in a dozen full runs, cause not found yet) CRIU's lazy dump
    // writes every page into the images: nothing is then served through the page channel and
    // the migration succeeds. Then the workload is moved back and the test tries again.
    let mut current = w.clone();
    for _ in 0..3 {
        let req = MigrateRequest {
            workload: format!("pid:{}", current.pid),
            to: "node2".into(),
            strategy: Strategy::PostCopy,
            recover_timeout_s: 3,
            on_failure: OnFailure::ResumeSource,
            ..Default::default()
        };
        match f.migrate_with("node1", req, &mut |_| {}) {
            // Past the switch: the target gave up after 3 s and killed its copy; the source's
            // frozen copy resumed, as asked.
            Ok(Event::Lost { resumed: true, at, message }) => {
                assert!(at.contains("post-copy pages"), "{at}: {message}");
                assert!(message.contains("unreachable") || message.contains("refused"), "{message}");
            }
            // Before the switch (a page faulted on during the restore): undone.
            Ok(Event::Failed { message, .. }) => assert!(message.contains("node2"), "{message}"),
            Ok(Event::Report(r)) => {
                eprintln!("no page went through the page channel ({r:?}): moving back, trying again");
                f.assert_one_copy_on(w.ip, "node2");
                let back =
                    f.migrate("node2", r.new_workload[4..].parse().unwrap(), "node1", Strategy::StopCopy);
                let back = back.expect("migrate back");
                f.assert_one_copy_on(w.ip, "node1");
                current.pid = back.new_workload[4..].parse().unwrap();
                current.start_time = ferry_testkit::start_time(current.pid).unwrap_or(0);
                continue;
            }
            other => panic!("unexpected outcome {other:?}"),
        }
        f.assert_one_copy_on(w.ip, "node1");
        assert!(ferry_lab::is_alive(current.pid, current.start_time), "the original process runs on");
        let lab = ferry_lab::Lab::load(f.lab.config()).unwrap();
        assert!(lab.workloads().iter().all(|x| x.node == "node1"), "{:?}", lab.workloads());
        poll(Duration::from_secs(30), "both journals to empty", || {
            (f.journal("node1").is_empty() && f.journal("node2").is_empty()).then_some(())
        });
        return;
    }
    panic!("the page channel was never used in three post-copy migrations");
}

#[test]
fn auto_measures_and_says_why() {
    let Some(mut f) = Fixture::new(2, &no_env) else { return };
    let w = f.memload("node1", 16, None);
    let r = f.migrate("node1", w.pid, "node2", Strategy::Auto).expect("migrate");
    // Which one depends on what was measured (a debug build's link is slow); it is never Auto.
    assert_ne!(r.strategy, Strategy::Auto, "{}", r.reason);
    assert!(r.reason.starts_with("auto: "), "{}", r.reason);
    for fact in ["MiB resident", "rewritten per second", "link", "expected freeze"] {
        assert!(r.reason.contains(fact), "reason '{}' lacks {fact}", r.reason);
    }
    f.assert_one_copy_on(w.ip, "node2");
}

/// `ferry check --to`: the source's agent asks the target's, which has its CRIU check this
/// host's CPU; the link is measured on the way. A CPU description that is not one fails that
/// check; a node that is not a peer is an error.
#[test]
fn a_target_node_describes_itself_through_the_agents() {
    let Some(mut f) = Fixture::new(2, &no_env) else { return };
    let criu = ferry_criu::Criu::locate(None).expect("criu");
    let cpuinfo = ferry_runtime::check::target::source_cpuinfo(&criu).expect("this host's cpuinfo.img");
    let ask = |node: &str, cpuinfo: Option<Vec<u8>>| {
        let req = Request::TargetFacts { node: node.into(), cpuinfo, container: None, tree: None };
        ferry_migrate::client::call(&f.socket("node1"), &req, &mut |_| {}).expect("call")
    };
    let Event::TargetFacts(facts) = ask("node2", Some(cpuinfo)) else { panic!("no facts") };
    assert_eq!(facts.node, "node2");
    assert!(facts.criu.as_deref().is_ok_and(|v| v.starts_with("4.")), "{:?}", facts.criu);
    assert_eq!(facts.cpu_check, Some(Ok(())), "the same CPU passes CRIU's check");
    assert!(facts.link_bytes_per_s > 0 && facts.mem_available > 0, "{facts:?}");
    let here = ferry_runtime::check::target::SourceFacts::here(Some(&criu), 64 << 20);
    let reasons = ferry_runtime::check::target::target_reasons(&here, &facts);
    assert!(reasons.iter().all(|r| r.severity == ferry_runtime::check::Severity::Info), "{reasons:?}");

    let Event::TargetFacts(bad) = ask("node2", Some(vec![0x5a; 128])) else { panic!("no facts") };
    assert!(matches!(bad.cpu_check, Some(Err(_))), "garbage is no CPU: {:?}", bad.cpu_check);
    assert!(matches!(ask("node9", None), Event::Failed { .. }), "node9 is not a peer");

    // A process tree's paths and listeners, looked for by the target's agent in its own mount
    // and network namespace: the port its peers reach it on is taken there, a path is missing.
    use ferry_runtime::check::target::{Listen, PathNeed, TreeNeeds};
    let peer_port = ferry_migrate::lab_agents::PEER_PORT;
    let tree = TreeNeeds {
        paths: vec![
            PathNeed { path: "/bin/sh".into(), dir: false, size: None, mapped: true },
            PathNeed { path: "/nonexistent/ferry-lib.so".into(), dir: false, size: None, mapped: true },
        ],
        listens: vec![
            Listen { addr: "00000000".into(), port: peer_port },
            Listen { addr: "00000000".into(), port: 1 },
        ],
        addresses: Vec::new(),
    };
    let req = Request::TargetFacts { node: "node2".into(), cpuinfo: None, container: None, tree: Some(tree) };
    let Ok(Event::TargetFacts(judged)) = ferry_migrate::client::call(&f.socket("node1"), &req, &mut |_| {})
    else {
        panic!("no facts")
    };
    let problems = judged.tree.expect("the tree judged");
    let kinds: Vec<&str> = problems.iter().map(|p| p.kind.as_str()).collect();
    assert_eq!(kinds, ["path", "port"], "{problems:?}");
    assert!(problems[0].what.contains("/nonexistent/ferry-lib.so"), "{problems:?}");
    assert!(problems[1].what.contains(&format!("port {peer_port} ")), "{problems:?}");

    // A tree's own network namespace gets its addresses back on the target: taken there by the
    // node itself, or by a workload of that node (here one arriving, as a migration leaves it
    // while it runs), they are blockers; a free one is none.
    // The check finds a lab workload's address in its namespace.
    let w = f.memload("node1", 16, None);
    let endpoints = ferry_runtime::container::Endpoints::new(f.lab.config().state_dir());
    let env = ferry_runtime::check::CheckEnv { criu: Ok(&criu), endpoints: &endpoints };
    let opts = ferry_runtime::check::CheckOptions { tcp_established: Some(true), tree_needs: true };
    let report = ferry_runtime::check::check(&format!("pid:{}", w.pid).parse().expect("id"), env, opts);
    let needs = report.tree_needs.expect("the tree's needs");
    assert_eq!(needs.addresses, [w.ip], "{needs:?}");
    assert!(needs.listens.is_empty(), "its listener moves with its namespace: {needs:?}");
    let node2 = f.lab.lab().node("node2").expect("node2").ip;
    let taken = std::net::Ipv4Addr::new(node2.octets()[0], node2.octets()[1], node2.octets()[2], 200);
    let arriving = ferry_lab::prepare_arrival(f.lab.config(), "node2", taken).expect("an arrival on node2");
    let tree = TreeNeeds { paths: Vec::new(), listens: Vec::new(), addresses: vec![node2, w.ip, taken] };
    let req = Request::TargetFacts { node: "node2".into(), cpuinfo: None, container: None, tree: Some(tree) };
    let answer = ferry_migrate::client::call(&f.socket("node1"), &req, &mut |_| {});
    ferry_lab::remove_workload(f.lab.config(), arriving.id).expect("remove the arrival");
    let Ok(Event::TargetFacts(judged)) = answer else { panic!("no facts: {answer:?}") };
    let problems = judged.tree.clone().expect("the tree judged");
    let whats: Vec<&str> = problems.iter().map(|p| p.what.as_str()).collect();
    assert!(problems.iter().all(|p| p.kind == "address" && p.blocker), "{problems:?}");
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(whats[0].starts_with(&format!("{node2} is an address of this host")), "{whats:?}");
    assert!(whats[1].contains(&format!("{taken} is held by lab workload {}", arriving.id)), "{whats:?}");
    let reasons = ferry_runtime::check::target::target_reasons(&here, &judged);
    assert!(reasons
        .iter()
        .any(|r| r.code == "target-address" && r.severity == ferry_runtime::check::Severity::Blocker));
}

/// A failed migration leaves the workload where it was, whole and reachable.
fn assert_stays_on_node1(f: &Fixture, w: &Workload, result: Result<Report, String>, why: &str) {
    let err = result.expect_err("the migration must fail");
    assert!(err.contains(why), "error '{err}' should say '{why}'");
    f.assert_one_copy_on(w.ip, "node1");
    // Nothing is left on the target: no namespace, no record.
    let lab = ferry_lab::Lab::load(f.lab.config()).unwrap();
    assert!(lab.workloads().iter().all(|x| x.node == "node1"), "{:?}", lab.workloads());
}

#[test]
fn a_corrupted_chunk_is_refused_and_the_workload_resumes_at_the_source() {
    let env = failing("node1", "source-send-chunks=corrupt");
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.memload("node1", 64, None);
    let r = f.migrate("node1", w.pid, "node2", Strategy::StopCopy);
    assert_stays_on_node1(&f, &w, r, "node node2 failed");
    assert!(f.agent_log("node2").contains("chunk"), "the target names the bad chunk");
}

#[test]
fn a_cut_link_before_the_transfer_resumes_the_source() {
    let env = failing("node1", "source-before-transfer=cut");
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.memload("node1", 64, None);
    let r = f.migrate("node1", w.pid, "node2", Strategy::StopCopy);
    assert_stays_on_node1(&f, &w, r, "lost");
}

#[test]
fn a_link_cut_during_the_transfer_resumes_the_source() {
    // Agents give up a silent peer after 3 s (instead of 120).
    let env = |_: &str| vec![("FERRY_PEER_TIMEOUT", "3".to_owned())];
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.memload("node1", 256, None);
    let veth = f.lab.lab().node("node2").unwrap().veth.clone();
    let link = |state: &str| {
        Command::new("ip").args(["link", "set", &veth, state]).status().is_ok_and(|s| s.success())
    };
    let req = Request::Migrate(MigrateRequest {
        workload: format!("pid:{}", w.pid),
        to: "node2".into(),
        strategy: Strategy::StopCopy,
        ..Default::default()
    });
    let mut cut = false;
    let r = ferry_migrate::client::call(&f.socket("node1"), &req, &mut |ev| {
        if !cut && matches!(ev, Event::Phase(p) if p == "transfer") {
            cut = link("down");
        }
    });
    assert!(cut, "the link was cut during the transfer");
    assert!(matches!(r, Ok(Event::Failed { .. })), "the migration fails: {r:?}");
    assert!(link("up"));
    f.assert_one_copy_on(w.ip, "node1");
    // The target gave up on its side too: nothing of the workload is left there.
    poll(Duration::from_secs(30), "the target to undo its arrival", || {
        let lab = ferry_lab::Lab::load(f.lab.config()).ok()?;
        lab.workloads().iter().all(|x| x.node == "node1").then_some(())
    });
}

#[test]
fn the_target_agent_killed_while_receiving_leaves_the_workload_at_the_source() {
    let env = failing("node2", "target-receive=exit");
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.memload("node1", 64, None);
    let r = f.migrate("node1", w.pid, "node2", Strategy::StopCopy);
    let err = r.expect_err("must fail");
    assert!(!err.is_empty());
    f.assert_one_copy_on(w.ip, "node1");
    // Its restart finds its journal and undoes the half arrival.
    f.restart("node2", &[]);
    let lab = ferry_lab::Lab::load(f.lab.config()).unwrap();
    assert!(lab.workloads().iter().all(|x| x.node == "node1"), "{:?}", lab.workloads());
    let journal = node_dir(f.lab.config().state_dir(), "node2").join("store/journal");
    assert_eq!(std::fs::read_dir(journal).unwrap().count(), 0, "journal emptied");
}

#[test]
fn the_target_agent_killed_while_chunks_stream_during_the_dump_leaves_the_workload_at_the_source() {
    let env = failing("node2", "target-stream=exit");
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.memload("node1", 64, None);
    let r = f.migrate("node1", w.pid, "node2", Strategy::StopCopy);
    let err = r.expect_err("must fail");
    assert!(!err.is_empty());
    assert!(f.agent_log("node2").contains("target-stream"), "the target died in the stream");
    f.assert_one_copy_on(w.ip, "node1");
    f.restart("node2", &[]);
    let lab = ferry_lab::Lab::load(f.lab.config()).unwrap();
    assert!(lab.workloads().iter().all(|x| x.node == "node1"), "{:?}", lab.workloads());
    let store = node_dir(f.lab.config().state_dir(), "node2").join("store");
    assert_eq!(std::fs::read_dir(store.join("journal")).unwrap().count(), 0, "journal emptied");
    // What the dead writer left has no index: no chunk of it is known to the store.
    let indexed: Vec<_> = std::fs::read_dir(store.join("packs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".idx"))
        .collect();
    assert!(indexed.is_empty(), "{indexed:?}");
}

#[test]
fn stop_copy_streams_the_chunks_while_dumping() {
    let Some(mut f) = Fixture::new(2, &no_env) else { return };
    let w = f.memload("node1", 128, None);
    let r = f.migrate("node1", w.pid, "node2", Strategy::StopCopy).expect("migrate");
    let phases: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
    assert!(phases.contains(&"stream"), "{phases:?}");
    let log = f.agent_log("node2");
    let streamed = log
        .lines()
        .find(|l| l.contains("stored the chunks streamed during the dump"))
        .unwrap_or_else(|| panic!("the target took a stream: {log}"));
    let chunks: u64 = streamed
        .split_whitespace()
        .find_map(|w| w.strip_prefix("chunks="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("chunk count in '{streamed}'"));
    // 128 MiB of random pages are 32768 chunks; most of them crossed during the dump (a
    // batch that finds the stream's queue full goes after it instead).
    assert!(chunks > 16_384, "{chunks} chunks streamed: {streamed}");
    f.assert_one_copy_on(w.ip, "node2");
}

#[test]
fn a_full_disk_on_the_target_leaves_the_workload_at_the_source() {
    let Some(mut f) = Fixture::new(2, &no_env) else { return };
    let packs = node_dir(f.lab.config().state_dir(), "node2").join("store/packs");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "ferry-test-full"])
        .arg(&packs)
        .status()
        .unwrap();
    assert!(mounted.success());
    let w = f.memload("node1", 64, None);
    let r = f.migrate("node1", w.pid, "node2", Strategy::StopCopy);
    let _ = Command::new("umount").arg("-l").arg(&packs).status();
    assert_stays_on_node1(&f, &w, r, "No space left on device");
}

#[test]
fn a_target_that_dies_after_restoring_commits_when_it_comes_back() {
    let env = failing("node2", "target-after-running=exit");
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.memload("node1", 64, None);
    let r = f.migrate("node1", w.pid, "node2", Strategy::StopCopy);
    assert!(r.is_err(), "the commit cannot be confirmed while the target is down");
    // The source let go (its journal says committed); the target holds the workload.
    poll(Duration::from_secs(10), "the source copy to be gone", || {
        (!ferry_lab::is_alive(w.pid, w.start_time)).then_some(())
    });
    f.restart("node2", &[]);
    f.assert_one_copy_on(w.ip, "node2");
}

#[test]
fn a_source_that_dies_before_the_switch_keeps_the_workload() {
    let env = failing("node1", "source-before-switch=exit");
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.memload("node1", 64, None);
    let r = f.migrate("node1", w.pid, "node2", Strategy::StopCopy);
    assert!(r.is_err(), "the source agent died");
    // CRIU resumed the workload (into ferry's freezer) when the agent's end of its socket
    // closed; the restarted agent lets it go, brings its address back and tells the target,
    // which undoes its copy.
    f.restart("node1", &[]);
    f.assert_one_copy_on(w.ip, "node1");
    assert!(ferry_lab::is_alive(w.pid, w.start_time), "the original process runs on");
    assert!(!is_held(w.pid));
    poll(Duration::from_secs(30), "both journals to empty", || {
        (f.journal("node1").is_empty() && f.journal("node2").is_empty()).then_some(())
    });
}

#[test]
fn a_source_that_dies_after_the_target_switched_leaves_the_workload_there() {
    let env = failing("node1", "source-before-commit=exit");
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.memload("node1", 64, None);
    let r = f.migrate("node1", w.pid, "node2", Strategy::StopCopy);
    assert!(r.is_err(), "the source agent died");
    // The target had switched (its copy ran with its network up) when the source died: that
    // copy is the workload. CRIU let the source's copy go, into ferry's freezer: it never runs.
    assert!(is_held(w.pid), "the source's copy is held frozen");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ferry_sys::process_state(w.pid), Some('D'), "the source's copy is frozen");
    f.restart("node1", &[]);
    // The restarted source asks the target, which says it switched: the held copy goes.
    poll(Duration::from_secs(30), "both journals to empty", || {
        (f.journal("node1").is_empty() && f.journal("node2").is_empty()).then_some(())
    });
    assert!(!ferry_lab::is_alive(w.pid, w.start_time), "the source's copy is gone");
    f.assert_one_copy_on(w.ip, "node2");
}

/// A post-copy migration of counterd (256 MiB) with `clients` clients incrementing its
/// counter, `during_pages` called once when the pages phase begins; the migration's last
/// event (or the error if the source agent went away), and the clients (still running).
fn post_copy_under_clients(
    f: &Fixture,
    w: &Workload,
    clients: usize,
    recover_timeout_s: u32,
    on_failure: OnFailure,
    during_pages: &mut dyn FnMut(&Fixture),
) -> (Result<Event, ferry_migrate::MigrateError>, Clients) {
    let c = Clients::start(w.ip, clients);
    std::thread::sleep(Duration::from_secs(1));
    let req = MigrateRequest {
        workload: format!("pid:{}", w.pid),
        to: "node2".into(),
        strategy: Strategy::PostCopy,
        recover_timeout_s,
        on_failure,
        ..Default::default()
    };
    let mut fired = false;
    let r = f.migrate_with("node1", req, &mut |ev| {
        if !fired && matches!(ev, Event::Phase(p) if p == "post-copy: pages") {
            fired = true;
            during_pages(f);
        }
    });
    assert!(fired, "the pages phase was reached: {r:?}");
    (r, c)
}

/// Waits until both agents have forgotten the migration (the end of the pages phase, after
/// whatever happened); the clients run on a second more, then stop.
fn settled(f: &Fixture, clients: Clients) -> ClientsSummary {
    poll(Duration::from_secs(120), "both journals to empty", || {
        (f.journal("node1").is_empty() && f.journal("node2").is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    clients.stop()
}

/// No journal entry, holder or frozen process of the migration is left.
fn assert_nothing_left(f: &Fixture, w: &Workload) {
    assert!(f.journal("node1").is_empty() && f.journal("node2").is_empty());
    assert!(!ferry_lab::is_alive(w.pid, w.start_time), "the source's copy is gone");
    let held: Vec<i32> = f.copies().into_iter().filter(|p| is_held(*p)).collect();
    assert!(held.is_empty(), "held processes left: {held:?}");
}

#[test]
fn a_threaded_server_moves_post_copy_without_a_client_error() {
    let env =
        |n: &str| if n == "node2" { vec![("FERRY_PUSH_DELAY_MS", "1000".to_owned())] } else { Vec::new() };
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.counterd("node1", 256);
    let (r, clients) = post_copy_under_clients(&f, &w, 8, 60, OnFailure::Lost, &mut |_| {});
    assert!(matches!(r, Ok(Event::Report(_))), "{r:?}");
    let clients = settled(&f, clients);
    assert!(clients.errors.is_empty(), "{clients:?}");
    assert!(clients.requests > 100, "{clients:?}");
    let counter = f.assert_one_counter_on(w.ip, "node2");
    assert!(counter >= clients.max_acked, "counter {counter} < acknowledged {}", clients.max_acked);
    assert_nothing_left(&f, &w);
}

#[test]
fn post_copy_survives_the_source_agent_killed_in_the_pages_phase() {
    // The push starts 3 s after the switch: the source dies with most pages still there.
    let env =
        |n: &str| if n == "node2" { vec![("FERRY_PUSH_DELAY_MS", "3000".to_owned())] } else { Vec::new() };
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.counterd("node1", 256);
    let (r, clients) = post_copy_under_clients(&f, &w, 8, 60, OnFailure::Lost, &mut |f| {
        f.kill_agent("node1");
        // Restarted at once: its journal has the migration, its freezer the tree.
        f.restart("node1", &[]);
    });
    assert!(r.is_err(), "the agent answering the request died: {r:?}");
    let clients = settled(&f, clients);
    assert!(f.agent_log("node1").contains("serving the"), "the restarted agent serves the pages again");
    assert!(clients.errors.is_empty(), "{clients:?}");
    let counter = f.assert_one_counter_on(w.ip, "node2");
    assert!(counter >= clients.max_acked, "counter {counter} < acknowledged {}", clients.max_acked);
    assert_nothing_left(&f, &w);
}

#[test]
fn post_copy_survives_a_link_cut_in_the_pages_phase() {
    // Agents give up a silent connection after 3 s; the link stays down 6 s.
    let env = |n: &str| {
        let mut e = vec![("FERRY_PEER_TIMEOUT", "3".to_owned())];
        if n == "node2" {
            e.push(("FERRY_PUSH_DELAY_MS", "3000".to_owned()));
        }
        e
    };
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.counterd("node1", 256);
    let veth = f.lab.lab().node("node2").unwrap().veth.clone();
    let link = move |state: &str| {
        Command::new("ip").args(["link", "set", &veth, state]).status().is_ok_and(|s| s.success())
    };
    let up = link.clone();
    let mut restore = None;
    let (r, clients) = post_copy_under_clients(&f, &w, 8, 60, OnFailure::Lost, &mut |_| {
        assert!(link("down"));
        let up = up.clone();
        restore = Some(std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(6));
            up("up")
        }));
    });
    assert!(restore.unwrap().join().unwrap(), "the link came back");
    assert!(matches!(r, Ok(Event::Report(_))), "{r:?}");
    let clients = settled(&f, clients);
    // The faulting threads waited while the page channel was dialled again.
    assert!(f.agent_log("node2").contains("the pages flow again"), "the target reconnected");
    assert!(clients.errors.is_empty(), "{clients:?}");
    let counter = f.assert_one_counter_on(w.ip, "node2");
    assert!(counter >= clients.max_acked, "counter {counter} < acknowledged {}", clients.max_acked);
    assert_nothing_left(&f, &w);
}

#[test]
fn post_copy_with_the_source_gone_for_good_loses_the_workload_loudly() {
    let env =
        |n: &str| if n == "node2" { vec![("FERRY_PUSH_DELAY_MS", "3000".to_owned())] } else { Vec::new() };
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.counterd("node1", 256);
    let (r, clients) = post_copy_under_clients(&f, &w, 4, 5, OnFailure::Lost, &mut |f| f.kill_agent("node1"));
    assert!(r.is_err(), "the agent answering the request died: {r:?}");
    // Past the 5 s recover timeout the target kills its copy and says so.
    let lost = poll(Duration::from_secs(60), "the target to declare the workload lost", || {
        f.journal("node2").into_iter().find(|e| e.phase == Phase::Lost)
    });
    let why = lost.lost.clone().unwrap_or_default();
    assert!(why.contains("post-copy pages") && why.contains("unreachable"), "{why}");
    assert!(f.agent_log("node2").contains("THE WORKLOAD WAS LOST"), "said loudly");
    match ferry_migrate::client::call(&f.socket("node2"), &Request::Status, &mut |_| {}) {
        Ok(Event::Status(s)) => assert_eq!(s.arrivals_lost, 1, "{s:?}"),
        other => panic!("status: {other:?}"),
    }
    let running: Vec<i32> = f.copies().into_iter().filter(|p| !is_held(*p)).collect();
    assert!(running.is_empty(), "no copy runs: {running:?}");
    // The source's copy was never resumed: still frozen in its holder.
    assert!(is_held(w.pid), "the source's copy is held");
    assert_eq!(ferry_sys::process_state(w.pid), Some('D'), "the source's copy is frozen");
    // An agent started again there later hears of the loss, kills the held copy, and both
    // forget the migration.
    f.restart("node1", &[]);
    let clients = settled(&f, clients);
    assert!(!clients.errors.is_empty(), "the clients lost their server");
    assert_nothing_left(&f, &w);
    let lab = ferry_lab::Lab::load(f.lab.config()).unwrap();
    assert!(lab.workloads().iter().all(|x| x.ip != w.ip), "{:?}", lab.workloads());
}

#[test]
fn post_copy_with_the_target_agent_killed_in_the_pages_phase_resumes_the_source_when_asked() {
    let env =
        |n: &str| if n == "node2" { vec![("FERRY_PUSH_DELAY_MS", "3000".to_owned())] } else { Vec::new() };
    let Some(mut f) = Fixture::new(2, &env) else { return };
    let w = f.counterd("node1", 256);
    let mut restarted = false;
    let req = MigrateRequest {
        workload: format!("pid:{}", w.pid),
        to: "node2".into(),
        strategy: Strategy::PostCopy,
        recover_timeout_s: 30,
        on_failure: OnFailure::ResumeSource,
        ..Default::default()
    };
    let r = f.migrate_with("node1", req, &mut |ev| {
        if let Event::Phase(p) = ev {
            if p == "post-copy: pages" {
                // The target's agent dies: its pager with it. The workload's copy there cannot
                // get its missing pages any more: its guard kills it at once (before the
                // userfaultfds close: it never reads a zero page for a missing one).
                f.kill_agent("node2");
                poll(Duration::from_secs(10), "the guard to kill the arriving copy", || {
                    f.copies().into_iter().all(is_held).then_some(())
                });
            } else if p.starts_with("post-copy: pages (reconnecting") && !restarted {
                restarted = true;
                f.restart("node2", &[]);
            }
        }
    });
    assert!(restarted, "the source noticed and waited: {r:?}");
    match r {
        Ok(Event::Lost { resumed: true, message, .. }) => {
            assert!(message.contains("agent stopped"), "{message}")
        }
        other => panic!("expected the source's copy resumed: {other:?}"),
    }
    assert!(f.agent_log("node2").contains("THE WORKLOAD WAS LOST"), "said loudly");
    assert!(f.agent_log("node2").contains("guard"), "the guard killed the copy");
    // The source's copy runs again, in its state at the freeze; nothing is left on node2.
    f.assert_one_counter_on(w.ip, "node1");
    assert!(ferry_lab::is_alive(w.pid, w.start_time), "the original process runs on");
    assert!(!is_held(w.pid));
    poll(Duration::from_secs(30), "both journals to empty", || {
        (f.journal("node1").is_empty() && f.journal("node2").is_empty()).then_some(())
    });
}

#[test]
fn a_peer_without_a_trusted_certificate_is_refused() {
    let Some(f) = Fixture::new(1, &no_env) else { return };
    let node1 = f.lab.lab().node("node1").unwrap().ip;
    let stranger = ferry_wire::Identity::self_signed(&[7u8; 32], "stranger").unwrap();
    let endpoint = ferry_wire::Endpoint::new(&stranger, ferry_wire::Trust::default()).unwrap();
    // It does not trust node1 either: refused on both counts; the agent logs the refusal.
    let r = endpoint.connect(SocketAddr::from((node1, PEER_PORT)), Duration::from_secs(5));
    assert!(r.is_err());
    let pinned = ferry_wire::Trust { pinned: vec![node_key(&f, "node1")], ca: None };
    let endpoint = ferry_wire::Endpoint::new(&stranger, pinned).unwrap();
    let err =
        endpoint.connect(SocketAddr::from((node1, PEER_PORT)), Duration::from_secs(5)).map(drop).unwrap_err();
    assert!(err.to_string().contains("refused") || err.to_string().contains("Refused"), "{err}");
    poll(Duration::from_secs(5), "the agent to log the refusal", || {
        f.agent_log("node1").contains("refused a peer").then_some(())
    });
    // Pinned on node1 (what `ferry node trust` writes), the stranger is admitted at its next
    // handshake: the running agent reads its pins again.
    let keys = node_dir(f.lab.config().state_dir(), "node1").join("store/keys");
    let public = ferry_store::keys::NodePublic { ed25519: stranger.public_key(), x25519: [9u8; 32] };
    ferry_store::keys::add_recipient(&keys, "stranger", &public).unwrap();
    let (_stream, peer) = endpoint
        .connect(SocketAddr::from((node1, PEER_PORT)), Duration::from_secs(5))
        .expect("admitted once pinned, without restarting the agent");
    assert_eq!(peer.key, node_key(&f, "node1"));
}

fn node_key(f: &Fixture, node: &str) -> [u8; 32] {
    let keys = node_dir(f.lab.config().state_dir(), node).join("store/keys");
    ferry_store::keys::NodeKeys::load(&keys).unwrap().public().ed25519
}
