//! The page path (docs/page-path.md): a checkpoint reads the pages from the frozen tree
//! straight into the store, and a restore copies them from the store straight into the
//! restored processes through ferry's pager, every chunk checked on the way. What must hold:
//! a tampered chunk is never copied in (by default the tree never runs; with `--lazy` it is
//! killed and the restore fails), a restore whose ferry dies mid-way kills the tree rather
//! than let it read zeros, threaded and guarded workloads and a fork while pages are missing
//! come back bit for bit, and a `--leave-running` checkpoint of a tree that keeps writing its
//! memory is one consistent state.

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_sys::{kill, process_exists, Signal};
use ferry_testkit::{
    assert_no_mounts_under, dir_names, flip_byte, packs_by_size, poll, require_privileged, Ferry, Isolation,
    Sample, Workload, FRAME_HEADER, PYTHON, WAIT,
};

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Nothing of a restore is left mounted, in STORE/tmp, or as a guard process.
#[track_caller]
fn assert_nothing_left(ferry: &Ferry, name: &str) {
    assert_no_mounts_under(ferry.store());
    let tmp = dir_names(&ferry.tmp_dir());
    assert!(tmp.is_empty(), "STORE/tmp still holds {tmp:?}");
    poll(WAIT, "the restore's guard to be gone", || guards_of(name).is_empty().then_some(()));
}

/// Live `ferry guard NAME` processes.
fn guards_of(name: &str) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.len() >= 3
                && args[args.len() - 2] == b"guard"
                && args.last() == Some(&name.as_bytes())
                && process_exists(*pid)
        })
        .collect()
}

/// `ferry restore NAME --detach --pidfile F EXTRA...`: the outcome and the restored pid.
fn restore(ferry: &Ferry, w: &Workload, name: &str, extra: &[&str]) -> (ferry_testkit::Outcome, Option<i32>) {
    let pidfile = ferry.fresh_path("restored.pid");
    let mut args = vec!["restore", name, "--detach", "--pidfile", pidfile.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let outcome = ferry.run(&args);
    let pid = ferry_testkit::read_pid(&pidfile);
    if let Some(pid) = pid {
        w.adopt(pid);
    }
    (outcome, pid)
}

/// A byte in the middle of a page chunk's sealed body, in the largest pack (a memhog's pages).
fn flip_a_page_chunk(ferry: &Ferry) -> (std::path::PathBuf, u64) {
    let packs = packs_by_size(ferry.store());
    let chunk = packs[0].entries[packs[0].entries.len() / 2];
    assert!(u64::from(chunk.len) > FRAME_HEADER + 1000, "not a page frame: {chunk:?}");
    let at = chunk.offset + FRAME_HEADER + (u64::from(chunk.len) - FRAME_HEADER) / 2;
    flip_byte(&packs[0].pack, at);
    (packs[0].pack.clone(), at)
}

#[test]
fn a_tampered_page_chunk_is_never_copied_in() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::MemHog { mib: 32 }, Isolation::PidNamespace).expect("start memhog");
    let hash = w.request_hash(w.pid());
    ferry.checkpoint(w.pid(), "m", &["--leave-running"]).assert_ok();
    let (pack, at) = flip_a_page_chunk(&ferry);

    // Default: every chunk is checked before the tree runs; this one fails, so none runs.
    let before = w.instances();
    for extra in [&[][..], &["--lazy"][..]] {
        let (outcome, pid) = restore(&ferry, &w, "m", extra);
        outcome.assert_error(6);
        assert!(outcome.stderr_mentions("failed authentication"), "{outcome}");
        assert_eq!(pid, None, "a refused restore wrote a pid\n{outcome}");
        // With --lazy the tree ran until the chunk came up, and was killed then.
        poll(WAIT, "no copy of the memhog left", || (w.instances() == before).then_some(()));
        assert_nothing_left(&ferry, "m");
    }

    flip_byte(&pack, at);
    let (outcome, pid) = restore(&ferry, &w, "m", &["--lazy"]);
    outcome.assert_ok();
    let copy = pid.expect("a pid");
    assert_eq!(w.request_hash(copy), hash, "the restored memory differs");
}

#[test]
fn ferry_dying_mid_lazy_restore_takes_the_tree_with_it() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::MemHog { mib: 64 }, Isolation::PidNamespace).expect("start memhog");
    ferry.checkpoint(w.pid(), "m", &[]).assert_ok();
    poll(WAIT, "the checkpointed memhog to be gone", || (!process_exists(w.pid())).then_some(()));

    // ferry dies (as if killed) after the first pages went in, the tree running meanwhile.
    let pidfile = ferry.fresh_path("restored.pid");
    let mut cmd =
        ferry.command(&["restore", "m", "--lazy", "--detach", "--pidfile", pidfile.to_str().expect("utf-8")]);
    cmd.env("FERRY_FAILPOINTS", "restore-push=exit");
    let outcome = cmd.output().expect("run ferry");
    assert_eq!(outcome.status.code(), Some(137), "ferry did not die at the failpoint: {outcome:?}");
    // Its guard kills the restored tree before the userfaultfds close: no copy runs on with
    // zeros where its memory was.
    poll(WAIT, "the restored memhog to be killed", || w.instances().is_empty().then_some(()));
    poll(WAIT, "the guard to exit", || guards_of("m").is_empty().then_some(()));

    // The checkpoint is intact: a restore without the failpoint brings it back.
    let (outcome, pid) = restore(&ferry, &w, "m", &["--lazy"]);
    outcome.assert_ok();
    assert!(process_exists(pid.expect("a pid")));
}

#[test]
fn threaded_and_guarded_workloads_restore_in_both_modes() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    for (i, sample) in
        [Sample::ThreadedMemHog { mib: 32, threads: 4 }, Sample::Guarded { mib: 16, threads: 3 }]
            .into_iter()
            .enumerate()
    {
        let w = Workload::start(sample, Isolation::PidNamespace).expect("start workload");
        let hash = w.request_hash(w.pid());
        let name = format!("t{i}");
        ferry.checkpoint(w.pid(), &name, &["--leave-running"]).assert_ok();
        for extra in [&[][..], &["--lazy"][..]] {
            let (outcome, pid) = restore(&ferry, &w, &name, extra);
            outcome.assert_ok();
            assert!(outcome.stdout.contains("through ferry's pager"), "{outcome}");
            let copy = pid.expect("a pid");
            assert_eq!(w.request_hash(copy), hash, "{sample:?} {extra:?}: the restored memory differs");
            // Its threads wake every 10 ms on their own stacks: a wrong one would have killed it.
            std::thread::sleep(Duration::from_millis(200));
            assert!(process_exists(copy), "{sample:?} {extra:?}: the copy died");
            let _ = kill(copy, Signal::Kill);
        }
        assert_nothing_left(&ferry, &name);
    }
}

#[test]
fn a_fork_while_pages_are_missing_copies_the_parent() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::MemHog { mib: 256 }, Isolation::PidNamespace).expect("start memhog");
    let hash = w.request_hash(w.pid());
    ferry.checkpoint(w.pid(), "f", &[]).assert_ok();
    poll(WAIT, "the checkpointed memhog to be gone", || (!process_exists(w.pid())).then_some(()));

    // As soon as the copy runs (its pages still coming in), it forks a child that hashes.
    let pidfile = ferry.fresh_path("restored.pid");
    let running =
        ferry.spawn(&["restore", "f", "--lazy", "--detach", "--pidfile", pidfile.to_str().expect("utf-8")]);
    let copy = poll(WAIT, "the restored memhog to run", || w.instances().first().copied());
    w.adopt(copy);
    fs::write(w.path("fork", copy), b"").expect("write the fork request");
    w.signal(copy, Signal::Usr1).expect("signal the copy");
    running.finish(WAIT).assert_ok();
    let got = w.wait_file("hash", copy, WAIT);
    assert_eq!(got.trim(), hash, "the child forked during the restore hashed other memory");
}

/// A tree that rewrites its memory as fast as it can: one thread writes generation g+1 into
/// each page of 64 MiB in turn, for ever. Any snapshot of one instant has pages 0..k at g+1
/// and the rest at g; on SIGUSR1 it checks that of its own memory (a torn copy would show
/// more than one step) and writes `ok` or what it found to DIR/check.
const WRITER: &str = r#"
import mmap, os, signal, struct, sys
d = sys.argv[1]
PAGE = mmap.PAGESIZE
n = (64 << 20) // PAGE
m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE)
checking = False
def check(*_):
    global checking
    checking = True
signal.signal(signal.SIGUSR1, check)
open(os.path.join(d, "ready"), "w").write(str(os.getpid()))
g = 0
while True:
    g += 1
    for i in range(n):
        struct.pack_into("<Q", m, i * PAGE, g)
        if checking:
            checking = False
            gens = [struct.unpack_from("<Q", m, j * PAGE)[0] for j in range(n)]
            steps = sum(1 for j in range(1, n) if gens[j] != gens[j - 1])
            ok = steps <= 1 and gens[0] - gens[-1] in (0, 1)
            with open(os.path.join(d, "check.tmp"), "w") as f:
                f.write("ok" if ok else "torn: %d steps, first %d last %d" % (steps, gens[0], gens[-1]))
            os.rename(os.path.join(d, "check.tmp"), os.path.join(d, "check"))
"#;

#[test]
fn leave_running_checkpoint_of_a_busy_writer_is_one_state() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("writer.py");
    fs::write(&script, WRITER).expect("write the writer");
    let mut launcher = Command::new("unshare")
        .args(["--pid", "--fork", "setsid", PYTHON])
        .arg(&script)
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the writer");
    let ready = dir.path().join("ready");
    poll(WAIT, "the writer to run", || fs::read_to_string(&ready).ok().filter(|s| !s.is_empty()));
    let pid = poll(WAIT, "the writer's host pid", || {
        ferry_testkit::children(launcher.id() as i32).first().copied()
    });
    std::thread::sleep(Duration::from_millis(300));

    let outcome = ferry.checkpoint(pid, "w", &["--leave-running"]);
    outcome.assert_ok();
    assert!(outcome.stdout.contains("frozen for"), "the freeze is reported\n{outcome}");
    let _ = kill(pid, Signal::Kill);
    let _ = launcher.kill();
    let _ = launcher.wait();
    poll(WAIT, "the writer to be gone", || (!process_exists(pid)).then_some(()));

    for extra in [&[][..], &["--lazy"][..]] {
        let check = dir.path().join("check");
        let _ = fs::remove_file(&check);
        let pidfile = ferry.fresh_path("restored.pid");
        let mut args = vec!["restore", "w", "--detach", "--pidfile", pidfile.to_str().expect("utf-8")];
        args.extend_from_slice(extra);
        ferry.run(&args).assert_ok();
        let copy = ferry_testkit::wait_pidfile(&pidfile);
        kill(copy, Signal::Usr1).expect("signal the copy");
        let verdict = poll(WAIT, "the copy's check", || fs::read_to_string(&check).ok());
        let _ = kill(copy, Signal::Kill);
        assert_eq!(verdict, "ok", "{extra:?}: the restored memory is not one state of the writer");
        poll(WAIT, "the copy to be gone", || (!process_exists(copy)).then_some(()));
    }
}

/// The largest private anonymous mapping of `pid` (a memhog's buffer): `(start, end)`.
fn largest_anonymous_mapping(pid: i32) -> (u64, u64) {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let path = f.nth(3);
            if !perms.starts_with("rw") || path.is_some() {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        })
        .max_by_key(|(a, b)| b - a)
        .expect("an anonymous mapping")
}

#[test]
fn a_recorded_working_set_goes_in_first_and_is_checked_like_the_rest() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::MemHog { mib: 32 }, Isolation::PidNamespace).expect("start memhog");
    let hash = w.request_hash(w.pid());
    ferry.checkpoint(w.pid(), "ws", &["--leave-running"]).assert_ok();
    // The working set a restore would have recorded: the buffer, named by its addresses (the
    // images keep the original's, and its pid in its own namespace).
    let (start, end) = largest_anonymous_mapping(w.pid());
    let status = fs::read_to_string(format!("/proc/{}/status", w.pid())).expect("status");
    let ns_pid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last()?.parse().ok())
        .expect("NSpid");
    let store = ferry_store::Store::open(ferry.store()).expect("store");
    let ck = store.get("ws").expect("checkpoint");
    let runs: Vec<ferry_store::working_set::Run> = (start..end)
        .step_by(4 << 20)
        .map(|a| ferry_store::working_set::Run {
            pid: ns_pid,
            vaddr: a,
            pages: (((end - a).min(4 << 20)) / 4096) as u32,
        })
        .collect();
    store.record_working_set(&ck, &runs).expect("record");
    drop(store);
    let hint_files = || dir_names(&ferry.store().join("hints"));
    assert_eq!(hint_files().len(), 1);

    let lazy_restore = |ferry: &Ferry| {
        let pidfile = ferry.fresh_path("restored.pid");
        let mut cmd = ferry.command(&[
            "restore",
            "ws",
            "--lazy",
            "--detach",
            "--pidfile",
            pidfile.to_str().expect("utf-8"),
        ]);
        cmd.env("FERRY_LOG", "info");
        let out = cmd.output().expect("run ferry");
        let pid = ferry_testkit::read_pid(&pidfile);
        if let Some(pid) = pid {
            w.adopt(pid);
        }
        (out, pid)
    };
    let (out, pid) = lazy_restore(&ferry);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("working set prefetched"), "{stderr}");
    let copy = pid.expect("a pid");
    assert_eq!(w.request_hash(copy), hash, "the restored memory differs");
    let _ = kill(copy, Signal::Kill);
    poll(WAIT, "the first copy to be gone", || (!w.instances().contains(&copy)).then_some(()));

    // A tampered chunk inside the working set: never copied in; the tree is killed and the
    // restore fails, as for any page of a lazy restore.
    let before = w.instances();
    let (pack, at) = flip_a_page_chunk(&ferry);
    let (out, pid) = lazy_restore(&ferry);
    assert!(!out.status.success(), "a tampered working set restored");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("failed authentication"), "{stderr}");
    // It failed in the prefetch, the first thing pushed.
    assert!(!stderr.contains("working set prefetched"), "{stderr}");
    assert_eq!(pid, None);
    poll(WAIT, "no copy of the memhog left", || (w.instances() == before).then_some(()));
    assert_nothing_left(&ferry, "ws");
    flip_byte(&pack, at);

    // The hint goes with its checkpoint.
    ferry.run(&["rm", "ws"]).assert_ok();
    assert!(hint_files().is_empty(), "the working set outlived its checkpoint: {:?}", hint_files());
}

/// Every fetch fails its check (failpoint `restore-fetch=corrupt`), including those of the
/// pages CRIU's restorer touches before the tree runs: the restore fails, nothing hangs, no
/// copy is left, and the checkpoint restores afterwards.
#[test]
fn a_page_failing_its_check_while_criu_restores_fails_the_restore_and_nothing_hangs() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::MemHog { mib: 16 }, Isolation::PidNamespace).expect("start memhog");
    let hash = w.request_hash(w.pid());
    ferry.checkpoint(w.pid(), "f", &["--leave-running"]).assert_ok();
    let before = w.instances();
    let pidfile = ferry.fresh_path("restored.pid");
    let mut cmd =
        ferry.command(&["restore", "f", "--lazy", "--detach", "--pidfile", pidfile.to_str().expect("utf-8")]);
    cmd.env("FERRY_FAILPOINTS", "restore-fetch=corrupt").stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run ferry");
    let status =
        poll(Duration::from_secs(60), "the failing restore to end", || child.try_wait().ok().flatten());
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!status.success(), "a restore whose pages fail their check succeeded: {stderr}");
    assert!(stderr.contains("failed authentication"), "{stderr}");
    // CRIU's restorer itself faults on lazy pages (the first fetch): refused before it runs.
    assert!(stderr.contains("before the tree ran"), "{stderr}");
    assert_eq!(ferry_testkit::read_pid(&pidfile), None);
    poll(WAIT, "no copy of the memhog left", || (w.instances() == before).then_some(()));
    assert_nothing_left(&ferry, "f");

    let (outcome, pid) = restore(&ferry, &w, "f", &["--lazy"]);
    outcome.assert_ok();
    assert_eq!(w.request_hash(pid.expect("a pid")), hash);
}
