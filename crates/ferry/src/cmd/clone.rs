//! `ferry clone`: N running copies of one checkpoint on lab nodes, restored at once.
//!
//! Every copy's place is made first (a network namespace with its own address on its node),
//! then all restores run in parallel; if any fails, every copy, namespace and the checkpoint
//! this call made are removed again.

use crate::output::outln;
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_lab::{Lab, LabConfig, LabError, Workload};
use ferry_runtime::clone::{self, CloneRecord, Replica, ReplicaSpec};
use ferry_runtime::{Context, Error, Joint, WorkloadId};
use serde_json::json;

use super::context;
use crate::cli::Cli;
use crate::progress::Bar;
use crate::Outcome;

pub struct Args {
    pub source: String,
    pub replicas: usize,
    pub to: Vec<String>,
    pub name: Option<String>,
    pub hostname_prefix: Option<String>,
    pub on_clone: Option<String>,
    pub signal: Option<String>,
    pub force: bool,
    pub lazy: bool,
    pub json: bool,
    pub lab: Option<String>,
}

/// One placed copy: its lab record, then (once restored) what runs.
struct Placed {
    workload: Workload,
    /// Its number among the copies of the checkpoint (names and host names end with it).
    index: usize,
    replica: Option<Replica>,
}

pub fn run(cli: &Cli, a: Args) -> Outcome {
    let what = || format!("clone of {} failed", a.source);
    let started = Instant::now();
    // Everything that can be refused is, before anything is frozen or created.
    let signal = a.signal.as_deref().map(parse_signal).transpose().map_err(|e| (what(), e))?;
    if let Some(prefix) = &a.hostname_prefix {
        clone::validate_hostname(&format!("{prefix}-{}", a.replicas)).map_err(|e| (what(), e))?;
    }
    let config = LabConfig::select(a.lab.as_deref()).map_err(|e| (what(), lab_error(&e)))?;
    let lab = Lab::load(&config).map_err(|e| (what(), lab_error(&e)))?;
    for node in &a.to {
        if !lab.nodes().iter().any(|n| &n.name == node) {
            let known = lab.nodes().iter().map(|n| n.name.clone()).collect();
            return Err((what(), lab_error(&LabError::UnknownNode { node: node.clone(), known })));
        }
    }
    let bar = Bar::new("clone");
    let mut ctx = context(cli).map_err(|e| (what(), e))?.with_progress(bar.clone());

    // The checkpoint: the one named, or one of the live workload (it keeps running).
    let (name, made, origin_lab) = match a.source.parse::<WorkloadId>() {
        Ok(workload) => {
            if !a.force {
                super::check::refuse_not_ready(cli, &a.source, Some(true), None).map_err(|e| (what(), e))?;
            }
            let WorkloadId::Pid(pid) = workload else {
                let e = Error::NotClonable {
                    what: a.source.clone(),
                    why: "clones of containers under their runtime are not done yet".into(),
                };
                return Err((what(), e));
            };
            let r = clone::checkpoint_for_clone(&ctx, &workload, a.name.clone(), true)
                .map_err(|e| (what(), e))?;
            if !a.json {
                bar.suspend(|| {
                    outln!(
                        "checkpointed {workload} as {} in {:.2}s (frozen for {:.2}s, left running)",
                        r.name,
                        r.seconds,
                        r.frozen_seconds.unwrap_or(r.dump_seconds)
                    )
                });
            }
            let origin = ferry_lab::workload_by_pid(&config, pid).ok().flatten();
            (r.name, true, origin)
        }
        Err(_) => (a.source.clone(), false, None),
    };
    let forget_made = |ctx: &Context| {
        if made {
            let _ = ferry_runtime::remove(&ctx.store, &name, false);
        }
    };
    let checkpoint = match clone::check_clonable(&ctx, &name) {
        Ok(c) => c,
        Err(e) => {
            forget_made(&ctx);
            return Err((what(), e));
        }
    };
    // Several copies share one check of every chunk: the pages are checked and decrypted into
    // memory once, while CRIU restores the copies; each copy waits for that check before it
    // runs, then runs at once, its pages copied in from there (faults first). One copy is a
    // plain restore.
    let share = !a.lazy && a.replicas > 1;
    if let Err(e) = enough_memory(&checkpoint, a.replicas + usize::from(share)) {
        forget_made(&ctx);
        return Err((what(), e));
    }
    let shared = share.then(ferry_runtime::SharedPages::new);
    // Running before their memory is complete: with --lazy, or served from the checked pages.
    let run_at_once = a.lazy || shared.is_some();

    // Places first: a namespace with its own address on each copy's node.
    let prefix = a.hostname_prefix.clone().unwrap_or_else(|| hostname_label(&name));
    // Numbered on from the copies of this checkpoint that still run: names stay unique.
    let first = clone::live_clones(ctx.store.root())
        .unwrap_or_default()
        .iter()
        .filter(|c| c.origin == name)
        .filter_map(|c| c.name.rsplit('-').next()?.parse::<usize>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let mut placed: Vec<Placed> = Vec::with_capacity(a.replicas);
    for k in 0..a.replicas {
        let node = &a.to[k % a.to.len()];
        match ferry_lab::prepare_workload(&config, node) {
            Ok(w) => placed.push(Placed { workload: w, index: first + k, replica: None }),
            Err(e) => {
                undo(&config, &placed);
                forget_made(&ctx);
                return Err((what(), lab_error(&e)));
            }
        }
    }
    let t_restore = Instant::now();
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // A lazy copy's guard is this program, started again as `ferry guard NAME` (as restore's).
    let guard = run_at_once
        .then(|| std::env::current_exe().ok().map(|exe| vec![exe.display().to_string(), "guard".to_owned()]))
        .flatten();
    // One bar for all the copies: their bytes against the sum of their totals.
    ctx.progress = Joint::new(bar.clone(), "copies").part();
    // All restores at once, each with its own CRIU and pager (and the shared check beside them).
    let (results, checked) = std::thread::scope(|s| {
        let checker = shared.as_ref().map(|sh| {
            let (checkpoint, store) = (&checkpoint, &ctx.store);
            s.spawn(move || {
                let t = Instant::now();
                (sh.fill(checkpoint, store), t.elapsed().as_secs_f64())
            })
        });
        let handles: Vec<_> = placed
            .iter()
            .map(|p| {
                let spec = ReplicaSpec {
                    index: p.index,
                    netns: p.workload.netns_path(),
                    hostname: format!("{prefix}-{}", p.index),
                    lazy: run_at_once,
                    guard: guard.clone(),
                    verified: shared.clone(),
                };
                let (ctx, name, on_clone) = (&ctx, &name, a.on_clone.as_deref());
                // Told it is a copy as soon as it runs (with --lazy, before its memory is in).
                let mut tell = move |pid: i32, hostname: Option<&str>| {
                    tell_copy(&record_of(name, p, pid, hostname, created), signal, on_clone)
                };
                s.spawn(move || clone::restore_replica(ctx, name, &spec, &mut tell))
            })
            .collect();
        let results: Vec<Result<Replica, Error>> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Internal("a restore thread panicked".into()))))
            .collect();
        let checked = checker.map(|h| {
            h.join().unwrap_or_else(|_| (Err(Error::Internal("the page check panicked".into())), 0.0))
        });
        (results, checked)
    });
    let restore_seconds = t_restore.elapsed().as_secs_f64();
    // Every copy's memory is complete: the shared pages are no longer needed.
    drop(shared);
    bar.finish();
    let mut failures = Vec::new();
    // A chunk that failed the shared check is why every copy was refused: that is the error.
    let verify_seconds = match checked {
        Some((Err(e), _)) => {
            failures.push(e);
            None
        }
        Some((Ok(()), seconds)) => Some(seconds),
        None => None,
    };
    for (p, r) in placed.iter_mut().zip(results) {
        match r {
            Ok(replica) if !clone::is_running(replica.report.pid) => {
                let pid = replica.report.pid;
                let how = match ferry_sys::wait_child(pid) {
                    Ok(exit) => format!("exit status {}", exit.shell_code()),
                    Err(e) => e.to_string(),
                };
                failures.push(Error::Placement {
                    detail: format!(
                        "copy {} ended right after its restore ({how}; CRIU's log: {})",
                        p.index,
                        replica.report.log.display()
                    ),
                    hint: Some(
                        "a copy may need what only the original has (its address, a peer); \
                         `ferry check --trial` shows how one ends"
                            .into(),
                    ),
                });
            }
            Ok(replica) => p.replica = Some(replica),
            Err(e) => failures.push(e),
        }
    }
    if let Some(first) = failures.into_iter().next() {
        let n_ok = placed.iter().filter(|p| p.replica.is_some()).count();
        tracing::warn!(restored = n_ok, "a copy failed: removing every copy");
        undo(&config, &placed);
        forget_made(&ctx);
        return Err((what(), first));
    }

    // Each copy is recorded as a workload of its node.
    let mut records = Vec::with_capacity(placed.len());
    for p in &placed {
        let r = p.replica.as_ref().expect("every copy restored");
        let from = origin_lab.as_ref().map(|w| w.id);
        if let Err(e) = ferry_lab::arrived(&config, p.workload.id, r.report.pid, from, None) {
            tracing::warn!(error = %e, "could not record a copy in the lab");
        }
        records.push(record_of(&name, p, r.report.pid, r.hostname.as_deref(), created));
    }
    if let Err(e) = clone::record_clones(ctx.store.root(), &records) {
        eprintln!("warning: the copies run, but `ferry list` will not show them: {e}");
    }

    let total = started.elapsed().as_secs_f64();
    if a.json {
        let rows: Vec<_> = records
            .iter()
            .zip(&placed)
            .map(|(r, p)| {
                let rep = &p.replica.as_ref().expect("restored").report;
                json!({
                    "name": r.name, "origin": r.origin, "node": r.node, "ip": r.ip, "pid": r.pid,
                    "hostname": r.hostname, "running_after_s": rep.seconds, "complete_after_s": rep.complete_seconds,
                })
            })
            .collect();
        let out = json!({"checkpoint": name, "verify_seconds": verify_seconds, "restore_seconds": restore_seconds,
                   "seconds": total, "clones": rows});
        outln!("{out}");
    } else {
        for r in &records {
            outln!(
                "clone {}: pid:{} {} {} (host name {})",
                r.name,
                r.pid,
                r.ip,
                r.node,
                r.hostname.as_deref().unwrap_or("shared with this host")
            );
        }
        if let Some(v) = verify_seconds {
            outln!("every page of {name} checked once for all copies in {v:.2}s");
        }
        outln!(
            "{} copies of {name} running after {restore_seconds:.2}s of restores ({total:.2}s in all)",
            records.len()
        );
    }
    crate::ok()
}

/// How `ferry list` and `--on-clone` know copy `p`.
fn record_of(origin: &str, p: &Placed, pid: i32, hostname: Option<&str>, created: u64) -> CloneRecord {
    CloneRecord {
        name: format!("{origin}-{}", p.index),
        origin: origin.to_owned(),
        node: p.workload.node.clone(),
        ip: p.workload.ip.to_string(),
        pid,
        start_time: ferry_sys::process_start_time(pid).unwrap_or(0),
        hostname: hostname.map(str::to_owned),
        created,
    }
}

/// Takes back every placed copy: kills what was restored, removes its namespace and record.
fn undo(config: &LabConfig, placed: &[Placed]) {
    for p in placed {
        if let Some(r) = &p.replica {
            kill_tree(r.report.pid);
        }
        if let Err(e) = ferry_lab::remove_workload(config, p.workload.id) {
            tracing::warn!(error = %e, id = p.workload.id, "could not remove a copy's namespace");
        }
    }
}

fn kill_tree(root: i32) {
    for p in ferry_sys::process_tree(root) {
        let _ = ferry_sys::kill(p, ferry_sys::Signal::Kill);
    }
    let _ = ferry_sys::wait_child(root);
}

/// Tells a running copy that it is one: the signal, then the command.
fn tell_copy(rec: &CloneRecord, signal: Option<i32>, on_clone: Option<&str>) -> Result<(), Error> {
    if let Some(sig) = signal {
        ferry_sys::kill_raw(rec.pid, sig).map_err(|e| {
            Error::Internal(format!("cannot signal copy {} (pid {}): {e}", rec.name, rec.pid))
        })?;
    }
    let Some(cmd) = on_clone else { return Ok(()) };
    let index = rec.name.rsplit('-').next().unwrap_or("");
    let out = Command::new("sh")
        .args(["-c", cmd])
        .env("FERRY_CLONE_INDEX", index)
        .env("FERRY_CLONE_NAME", &rec.name)
        .env("FERRY_CLONE_PID", rec.pid.to_string())
        .env("FERRY_CLONE_IP", &rec.ip)
        .env("FERRY_CLONE_HOSTNAME", rec.hostname.as_deref().unwrap_or(""))
        .env("FERRY_CLONE_NODE", &rec.node)
        .env("FERRY_CLONE_ORIGIN", &rec.origin)
        .output()
        .map_err(|e| Error::Usage(format!("cannot run --on-clone: {e}")))?;
    if !out.status.success() {
        return Err(Error::Usage(format!(
            "--on-clone failed for {} ({}): {}; every copy was removed",
            rec.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// `HUP`, `SIGHUP`, `usr1` or a number.
fn parse_signal(s: &str) -> Result<i32, Error> {
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let n = match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "WINCH" => 28,
        _ => name.parse().ok().filter(|n| (1..=64).contains(n)).ok_or_else(|| {
            Error::Usage(format!(
                "'{s}' is not a signal (HUP, INT, QUIT, USR1, USR2, TERM, CONT, WINCH or 1-64)"
            ))
        })?,
    };
    Ok(n)
}

/// Copies need their memory each: refused when they would not fit in what is available.
fn enough_memory(checkpoint: &ferry_store::Checkpoint, replicas: usize) -> Result<(), Error> {
    let memory: u64 =
        checkpoint.manifest.files.iter().filter(|f| f.name.starts_with("pages-")).map(|f| f.size).sum();
    let need = memory.saturating_mul(replicas as u64);
    let available = mem_available().unwrap_or(u64::MAX);
    if need > available {
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        return Err(Error::Usage(format!(
            "{replicas} copies of {:.2} GiB need {:.2} GiB; {:.2} GiB is available here",
            gib(memory),
            gib(need),
            gib(available)
        )));
    }
    Ok(())
}

fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A host name label from a checkpoint's name: letters, digits and hyphens, at most 50.
fn hostname_label(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(50)
        .collect();
    while s.ends_with('-') {
        s.pop();
    }
    let s = s.trim_start_matches('-').to_owned();
    if s.is_empty() {
        "clone".to_owned()
    } else {
        s
    }
}

fn lab_error(e: &LabError) -> Error {
    Error::Placement { detail: e.to_string(), hint: e.hint() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("HUP").ok(), Some(1));
        assert_eq!(parse_signal("sigusr1").ok(), Some(10));
        assert_eq!(parse_signal("12").ok(), Some(12));
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("KILLME").is_err());
    }

    #[test]
    fn host_name_labels() {
        assert_eq!(hostname_label("pid-123-1796625678"), "pid-123-1796625678");
        assert_eq!(hostname_label("Redis_warm.ck"), "redis-warm-ck");
        assert_eq!(hostname_label("__"), "clone");
        assert!(clone::validate_hostname(&format!("{}-64", hostname_label(&"x".repeat(200)))).is_ok());
    }
}
