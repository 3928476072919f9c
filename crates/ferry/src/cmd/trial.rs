//! `ferry check --trial`: a real checkpoint (the workload runs on), restored into a sandbox on
//! this host, watched for a few seconds, probed, and removed. The sandbox is a network
//! namespace with nothing but loopback, so the copy cannot answer the workload's clients or
//! write to its peers; it has its own pid namespace (CRIU makes one) and its own host name.

use crate::output::outln;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_runtime::check::{CheckOptions, Verdict};
use ferry_runtime::clone::{self, ReplicaSpec};
use ferry_runtime::{Error, WorkloadId};
use serde::Serialize;

use super::context;
use crate::cli::Cli;
use crate::exit::Exit;
use crate::Outcome;

/// The longest a `--probe` may run.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Args {
    pub workload: String,
    pub json: bool,
    pub probe: Option<String>,
    pub seconds: u64,
}

/// What a trial found.
#[derive(Debug, Serialize)]
pub struct TrialReport {
    pub workload: String,
    /// The static check's verdict, before anything was frozen.
    pub verdict: String,
    /// The original's freeze during the checkpoint.
    pub frozen_seconds: Option<f64>,
    /// The copy ran (restored) — `false` with `error` saying why.
    pub restored: bool,
    /// It still ran after `watched_seconds`.
    pub stayed_alive: bool,
    pub watched_seconds: f64,
    /// How it ended if it did (`exit N`, `signal N`).
    pub ended: Option<String>,
    /// The probe's exit code (`None`: no probe, or it could not run / ran out of time).
    pub probe_exit: Option<i32>,
    pub probe_output: Option<String>,
    pub error: Option<String>,
    pub log: Option<PathBuf>,
    /// Healthy: restored, alive to the end, and the probe (if any) passed.
    pub healthy: bool,
}

pub fn run(cli: &Cli, a: Args) -> Outcome {
    let what = || format!("trial of {} failed", a.workload);
    let id: WorkloadId = a.workload.parse().map_err(|e| (what(), e))?;
    let WorkloadId::Pid(pid) = id else {
        let why = "trials of containers under their runtime are not done yet".to_owned();
        return Err((what(), Error::NotClonable { what: a.workload.clone(), why }));
    };
    // The static check first: a blocker is the answer, nothing is frozen for it.
    let r = super::check::report(cli, &id, CheckOptions { tcp_established: Some(true), tree_needs: false })
        .map_err(|e| (what(), e))?;
    if r.pid.is_none() {
        return Err((what(), Error::ProcessNotFound { pid }));
    }
    if r.verdict == Verdict::NotReady {
        let reasons = r.blockers().map(|b| format!("{}: {}", b.code, b.what)).collect();
        return Err((what(), Error::NotReady { workload: r.workload, reasons }));
    }
    let ctx = context(cli).map_err(|e| (what(), e))?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let pid_label = pid.to_string();
    let name = format!("trial-{pid_label}-{stamp}");
    let ck = clone::checkpoint_for_clone(&ctx, &id, Some(name.clone()), true).map_err(|e| (what(), e))?;
    let mut report = TrialReport {
        workload: a.workload.clone(),
        verdict: r.verdict.as_str().to_owned(),
        frozen_seconds: ck.frozen_seconds,
        restored: false,
        stayed_alive: false,
        watched_seconds: 0.0,
        ended: None,
        probe_exit: None,
        probe_output: None,
        error: None,
        log: None,
        healthy: false,
    };
    // From here on, whatever happens: the copy, the sandbox and the checkpoint go.
    let sandbox = match Sandbox::create(&format!("ferry-trial-{pid_label}-{}", stamp % 1_000_000)) {
        Ok(s) => s,
        Err(e) => {
            let _ = ferry_runtime::remove(&ctx.store, &name, false);
            return Err((what(), e));
        }
    };
    let spec = ReplicaSpec {
        index: 1,
        netns: sandbox.path(),
        hostname: "ferry-trial".into(),
        lazy: false,
        guard: None,
        verified: None,
    };
    match clone::restore_replica(&ctx, &name, &spec, &mut |_, _| Ok(())) {
        Ok(replica) => {
            report.restored = true;
            report.log = Some(replica.report.log.clone());
            watch(replica.report.pid, Duration::from_secs(a.seconds), a.probe.as_deref(), &mut report);
        }
        Err(e) => {
            report.log = e.log_path();
            report.error = Some(chain(&e));
        }
    }
    drop(sandbox);
    if let Err(e) = ferry_runtime::remove(&ctx.store, &name, false) {
        eprintln!("warning: the trial's checkpoint {name} could not be removed: {e}");
    }
    report.healthy = report.restored && report.stayed_alive && report.probe_exit.is_none_or(|c| c == 0);
    if a.json {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| (what(), Error::Internal(e.to_string())))?;
        outln!("{text}");
    } else {
        print_report(&report);
    }
    Ok(if report.healthy { Exit::Ok } else { Exit::NotReady }.into())
}

/// Watches the copy for `limit`, then runs the probe in its namespaces, then kills it.
fn watch(pid: i32, limit: Duration, probe: Option<&str>, report: &mut TrialReport) {
    let t0 = Instant::now();
    // The restored root is this process's child: a zombie (or no process) means it ended.
    let alive = || clone::is_running(pid);
    while t0.elapsed() < limit && alive() {
        std::thread::sleep(Duration::from_millis(50));
    }
    report.watched_seconds = t0.elapsed().as_secs_f64();
    report.stayed_alive = alive();
    if report.stayed_alive {
        if let Some(cmd) = probe {
            run_probe(pid, cmd, report);
        }
        for p in ferry_sys::process_tree(pid) {
            let _ = ferry_sys::kill(p, ferry_sys::Signal::Kill);
        }
    }
    let ended = ferry_sys::wait_child(pid);
    if !report.stayed_alive {
        report.ended = Some(match ended {
            Ok(ferry_sys::ChildExit::Exited(c)) => format!("exit {c}"),
            Ok(ferry_sys::ChildExit::Signaled(s)) => format!("signal {s}"),
            Err(e) => format!("unknown ({e})"),
        });
    }
}

/// Runs `cmd` (`sh -c`) inside the copy's network and UTS namespaces: it reaches the copy at
/// 127.0.0.1, and nothing else.
fn run_probe(pid: i32, cmd: &str, report: &mut TrialReport) {
    let child = Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--net", "--uts", "--", "sh", "-c", cmd])
        .env("FERRY_TRIAL_PID", pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            report.probe_output = Some(format!("cannot run the probe: {e}"));
            return;
        }
    };
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if t0.elapsed() < PROBE_TIMEOUT => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                report.probe_output = Some(format!("the probe ran past {} s", PROBE_TIMEOUT.as_secs()));
                let _ = child.wait();
                return;
            }
        }
    }
    match child.wait_with_output() {
        Ok(out) => {
            report.probe_exit = Some(out.status.code().unwrap_or(128));
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let text: String = text.trim().chars().take(2000).collect();
            report.probe_output = Some(text);
        }
        Err(e) => report.probe_output = Some(format!("cannot read the probe's output: {e}")),
    }
}

fn print_report(r: &TrialReport) {
    outln!("{}: trial {} (check: {})", r.workload, if r.healthy { "passed" } else { "FAILED" }, r.verdict);
    if let Some(f) = r.frozen_seconds {
        outln!("  the original was frozen for {f:.2}s and runs on");
    }
    if !r.restored {
        outln!("  the copy did not restore: {}", r.error.as_deref().unwrap_or("unknown"));
    } else if r.stayed_alive {
        outln!("  the copy ran for {:.1}s in the sandbox (no network but loopback)", r.watched_seconds);
    } else {
        outln!(
            "  the copy ended after {:.1}s in the sandbox: {}",
            r.watched_seconds,
            r.ended.as_deref().unwrap_or("unknown")
        );
    }
    match (r.probe_exit, &r.probe_output) {
        (Some(code), out) => {
            outln!(
                "  probe: exit {code}{}",
                out.as_deref().filter(|o| !o.is_empty()).map(|o| format!(": {o}")).unwrap_or_default()
            )
        }
        (None, Some(out)) => outln!("  probe: {out}"),
        (None, None) => {}
    }
    if let Some(log) = &r.log {
        outln!("  CRIU's log: {}", log.display());
    }
    outln!("  the copy, its sandbox and the trial's checkpoint were removed");
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let line = c.to_string();
        if !s.contains(&line) {
            s.push_str(": ");
            s.push_str(&line);
        }
        src = c.source();
    }
    s
}

/// A network namespace with only loopback, up; deleted on drop (with anything left in it).
struct Sandbox {
    name: String,
}

impl Sandbox {
    fn create(name: &str) -> Result<Sandbox, Error> {
        ip(&["netns", "add", name])?;
        let sandbox = Sandbox { name: name.to_owned() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(sandbox)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: the trial's sandbox {} could not be removed: {e}", self.name);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Internal(format!("cannot run ip (iproute2): {e}")))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
