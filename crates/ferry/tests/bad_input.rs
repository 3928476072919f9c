//! Bad input and refused operations: each ends with one clear `error:` line and its exit code,
//! never a panic, and leaves nothing stopped, mounted or locked.

use std::fs::{self, OpenOptions};
use std::path::Path;

use ferry_sys::process_exists;
use ferry_testkit::{
    assert_no_mounts_under, assert_not_stopped, dir_names, flip_byte, packs_by_size, poll,
    require_privileged, Ferry, Isolation, Outcome, PackFiles, Sample, Workload, FRAME_HEADER, WAIT,
};

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A pid no process has right now.
fn unused_pid() -> i32 {
    let max: i32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (2..max).rev().find(|p| !Path::new(&format!("/proc/{p}")).exists()).expect("a free pid")
}

/// The store is left usable: not locked, not mounted over, no plaintext scratch left.
#[track_caller]
fn assert_store_usable(ferry: &Ferry) {
    assert_no_mounts_under(ferry.store());
    let tmp = dir_names(&ferry.tmp_dir());
    assert!(tmp.is_empty(), "STORE/tmp still holds {tmp:?}");
    ferry.run(&["list"]).assert_ok();
}

/// Checkpoints a counter, which stops it; returns the store's packs, largest first.
fn checkpointed_counter(ferry: &Ferry, w: &Workload, name: &str) -> Vec<PackFiles> {
    w.wait_counts(w.pid(), 2);
    ferry.checkpoint(w.pid(), name, &[]).assert_ok();
    poll(WAIT, "the checkpointed counter to be stopped", || (!process_exists(w.pid())).then_some(()));
    packs_by_size(ferry.store())
}

/// Restores `name`, which must fail with one of `codes`; no copy may be left running.
#[track_caller]
fn assert_restore_refused(ferry: &Ferry, w: &Workload, name: &str, codes: &[i32]) -> Outcome {
    // A copy that did come up was adopted by `w`, which kills it whatever happens here.
    let (outcome, pid) = ferry.restore_detached(name, w);
    outcome.assert_error_in(codes);
    if let Some(pid) = pid {
        assert!(!process_exists(pid), "a failed restore left pid {pid} running\n{outcome}");
    }
    outcome
}

#[test]
fn nonexistent_pid_is_not_found() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let pid = unused_pid();
    let outcome = ferry.checkpoint(pid, "ghost", &[]);
    outcome.assert_error(3);
    assert!(outcome.stderr_mentions_number(pid.into()), "the error must name pid {pid}\n{outcome}");
    assert_store_usable(&ferry);
    assert!(
        !ferry.manifest_path("ghost").exists() && ferry.list_names().is_empty(),
        "a failed checkpoint must leave nothing behind"
    );
}

#[test]
fn malformed_arguments_are_usage_errors() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    for args in
        [&["checkpoint", "1234"][..], &["checkpoint", "pid:abc"], &["checkpoint", "bogus:1"], &["frobnicate"]]
    {
        ferry.run(args).assert_error(2);
    }
}

#[test]
fn nonexistent_checkpoint_is_not_found() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    ferry.run(&["restore", "nope", "--detach"]).assert_error(3).assert_stderr_mentions("nope");
    assert_store_usable(&ferry);
}

#[test]
fn truncated_image_is_refused() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    let packs = checkpointed_counter(&ferry, &w, "truncated");
    // Cut the largest pack in half: every chunk from the cut on is gone or torn.
    let victim = &packs[0];
    let cut = victim.pack_len() / 2;
    OpenOptions::new()
        .write(true)
        .open(&victim.pack)
        .and_then(|f| f.set_len(cut))
        .expect("truncate the pack");
    let lost: Vec<String> =
        victim.entries.iter().filter(|e| e.offset + u64::from(e.len) > cut).map(|e| e.short_id()).collect();
    assert!(!lost.is_empty(), "the cut must tear some chunk");

    let outcome = assert_restore_refused(&ferry, &w, "truncated", &[6]);
    // Clear: the error names the damaged pack or one of the chunks it lost.
    let named = outcome.stderr_mentions(&victim.id()) || lost.iter().any(|id| outcome.stderr_mentions(id));
    assert!(named, "the error must name {} or a chunk it lost\n{outcome}", victim.file_name());
    assert!(w.instances().is_empty(), "a refused restore started a copy: {:?}", w.instances());
    assert_store_usable(&ferry);
    // Refused again, the same way: nothing was half repaired or half restored.
    ferry.run(&["verify", "truncated"]).assert_error(6);
}

#[test]
fn corrupted_memory_image_is_refused() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    let packs = checkpointed_counter(&ferry, &w, "flipped");
    // Page chunks come first in a pack (they are sealed while CRIU writes): the middle chunk of
    // the largest pack is memory. One bit pattern of one byte of its sealed body changes.
    let victim = &packs[0];
    let chunk = victim.entries[victim.entries.len() / 2];
    let body = u64::from(chunk.len) - FRAME_HEADER;
    flip_byte(&victim.pack, chunk.offset + FRAME_HEADER + body / 2);

    // CRIU itself would restore flipped bytes without noticing: only ferry's own checks of the
    // checkpoint can refuse it, and they must, before anything runs.
    let outcome = assert_restore_refused(&ferry, &w, "flipped", &[6]);
    assert!(
        outcome.stderr_mentions(&chunk.short_id()),
        "the error must name the damaged chunk {}\n{outcome}",
        chunk.short_id()
    );
    assert!(w.instances().is_empty(), "a refused restore started a copy: {:?}", w.instances());
    assert_store_usable(&ferry);
    ferry.run(&["verify", "flipped"]).assert_error(6);
}

#[test]
fn restore_while_the_original_runs_is_a_conflict() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    // In the host's pid namespace, a restore needs the original's pid, which it still holds.
    let w = Workload::start(Sample::Counter, Isolation::Host).expect("start counter");
    w.wait_counts(w.pid(), 2);
    ferry.checkpoint(w.pid(), "twin", &["--leave-running"]).assert_ok();
    assert_not_stopped(w.pid());

    let outcome = assert_restore_refused(&ferry, &w, "twin", &[8]);
    let about_pid = outcome.stderr_mentions_number(w.pid().into()) || outcome.stderr_mentions("in use");
    assert!(about_pid, "the error must say that the pid is in use\n{outcome}");
    let log =
        outcome.log_path().unwrap_or_else(|| panic!("CRIU was involved: a `log:` line is due\n{outcome}"));
    assert!(log.is_file(), "the log {} named on stderr does not exist", log.display());

    // The original is untouched, and neither it nor the store is locked: it can be
    // checkpointed again.
    assert_not_stopped(w.pid());
    let seen = w.counts(w.pid()).len();
    w.wait_counts(w.pid(), seen + 2);
    assert_store_usable(&ferry);
    ferry.checkpoint(w.pid(), "twin-again", &["--leave-running"]).assert_ok();
    assert_not_stopped(w.pid());
}

#[test]
fn non_root_cannot_checkpoint() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    let target = format!("pid:{}", w.pid());
    ferry
        .run_as_nobody(&["checkpoint", &target, "--name", "nobody"])
        .assert_error(4)
        .assert_stderr_mentions("root");
    assert_not_stopped(w.pid());
    assert_store_usable(&ferry);
    assert!(!ferry.manifest_path("nobody").exists());
}

#[test]
fn non_root_cannot_restore() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    w.wait_counts(w.pid(), 2);
    ferry.checkpoint(w.pid(), "mine", &["--leave-running"]).assert_ok();
    ferry.run_as_nobody(&["restore", "mine", "--detach"]).assert_error(4).assert_stderr_mentions("root");
    assert_not_stopped(w.pid());
    // Only the original counts: no copy came to life.
    let counters: Vec<_> = fs::read_dir(w.dir())
        .expect("report dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("counter."))
        .collect();
    assert_eq!(counters.len(), 1, "a refused restore started a copy");
    assert_store_usable(&ferry);
}
