//! Bad input and refused operations: each ends with one clear `error:` line and its exit code,
//! never a panic, and leaves nothing stopped, mounted or locked.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ferry_sys::process_exists;
use ferry_testkit::{
    assert_no_mounts_under, assert_not_stopped, poll, require_privileged, Ferry, Isolation, Outcome, Sample,
    Workload, WAIT,
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
    (2..max)
        .rev()
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid")
}

/// The store is left usable: not locked, not mounted over.
#[track_caller]
fn assert_store_usable(ferry: &Ferry) {
    assert_no_mounts_under(ferry.store());
    ferry.run(&["list"]).assert_ok();
}

/// Checkpoints a counter, which stops it, and returns the checkpoint's image directory.
fn checkpointed_counter(ferry: &Ferry, w: &Workload, name: &str) -> PathBuf {
    w.wait_counts(w.pid(), 2);
    ferry.checkpoint(w.pid(), name, &[]).assert_ok();
    poll(WAIT, "the checkpointed counter to be stopped", || {
        (!process_exists(w.pid())).then_some(())
    });
    let images = ferry.checkpoint_dir(name).join("images");
    assert!(images.is_dir(), "expected CRIU images in {}", images.display());
    images
}

/// The image files in `images` whose name starts with `prefix`, largest first.
fn images_named(images: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(images)
        .expect("read images")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| (e.metadata().map(|m| m.len()).unwrap_or(0), e.path()))
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// Restores `name`, which must fail with one of `codes`; no copy may be left running.
#[track_caller]
fn assert_restore_refused(ferry: &Ferry, w: &Workload, name: &str, codes: &[i32]) -> Outcome {
    // A copy that did come up was adopted by `w`, which kills it whatever happens here.
    let (outcome, pid) = ferry.restore_detached(name, w);
    outcome.assert_error_in(codes);
    if let Some(pid) = pid {
        assert!(
            !process_exists(pid),
            "a failed restore left pid {pid} running\n{outcome}"
        );
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
    assert!(
        outcome.stderr_mentions_number(pid.into()),
        "the error must name pid {pid}\n{outcome}"
    );
    assert_store_usable(&ferry);
    assert!(
        !ferry.checkpoint_dir("ghost").exists(),
        "a failed checkpoint must leave nothing behind"
    );
}

#[test]
fn malformed_arguments_are_usage_errors() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    for args in [
        &["checkpoint", "1234"][..],
        &["checkpoint", "pid:abc"],
        &["checkpoint", "bogus:1"],
        &["frobnicate"],
    ] {
        ferry.run(args).assert_error(2);
    }
}

#[test]
fn nonexistent_checkpoint_is_not_found() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    ferry
        .run(&["restore", "nope", "--detach"])
        .assert_error(3)
        .assert_stderr_mentions("nope");
    assert_store_usable(&ferry);
}

#[test]
fn truncated_image_is_refused() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    let images = checkpointed_counter(&ferry, &w, "truncated");
    let victim = images.join("pstree.img");
    let len = fs::metadata(&victim).expect("pstree.img in the checkpoint").len();
    OpenOptions::new()
        .write(true)
        .open(&victim)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");

    let outcome = assert_restore_refused(&ferry, &w, "truncated", &[6, 7]);
    // Clear: either ferry names what is damaged, or CRIU failed and its log is named.
    let clear = outcome.stderr_mentions("pstree.img")
        || outcome.stderr_mentions("damaged")
        || outcome.stderr_mentions("corrupt")
        || outcome.log_path().is_some_and(|l| l.is_file());
    assert!(
        clear,
        "the error must say what is damaged or where CRIU's log is\n{outcome}"
    );
    assert_store_usable(&ferry);
}

#[test]
fn corrupted_memory_image_is_refused() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    let images = checkpointed_counter(&ferry, &w, "flipped");
    let victim = images_named(&images, "pages-")
        .into_iter()
        .next()
        .expect("a pages-*.img file");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&victim)
        .expect("open pages image");
    let len = file.metadata().expect("size").len();
    let mut page = vec![0u8; 4096.min(len as usize)];
    let at = (len / 2) & !4095;
    file.seek(SeekFrom::Start(at))
        .and_then(|_| file.read_exact(&mut page))
        .expect("read a page");
    page.iter_mut().for_each(|b| *b ^= 0xff);
    file.seek(SeekFrom::Start(at))
        .and_then(|_| file.write_all(&page))
        .expect("corrupt a page");
    drop(file);

    // CRIU itself would restore the flipped bytes without noticing: only ferry's own checks
    // of the checkpoint can refuse it, and it must, before anything runs.
    assert_restore_refused(&ferry, &w, "flipped", &[6]);
    assert_store_usable(&ferry);
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
    ferry
        .checkpoint(w.pid(), "twin", &["--leave-running"])
        .assert_ok();
    assert_not_stopped(w.pid());

    let outcome = assert_restore_refused(&ferry, &w, "twin", &[8]);
    let about_pid = outcome.stderr_mentions_number(w.pid().into()) || outcome.stderr_mentions("in use");
    assert!(about_pid, "the error must say that the pid is in use\n{outcome}");
    let log = outcome
        .log_path()
        .unwrap_or_else(|| panic!("CRIU was involved: a `log:` line is due\n{outcome}"));
    assert!(
        log.is_file(),
        "the log {} named on stderr does not exist",
        log.display()
    );

    // The original is untouched, and neither it nor the store is locked: it can be
    // checkpointed again.
    assert_not_stopped(w.pid());
    let seen = w.counts(w.pid()).len();
    w.wait_counts(w.pid(), seen + 2);
    assert_store_usable(&ferry);
    ferry
        .checkpoint(w.pid(), "twin-again", &["--leave-running"])
        .assert_ok();
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
    assert!(!ferry.checkpoint_dir("nobody").exists());
}

#[test]
fn non_root_cannot_restore() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    w.wait_counts(w.pid(), 2);
    ferry
        .checkpoint(w.pid(), "mine", &["--leave-running"])
        .assert_ok();
    ferry
        .run_as_nobody(&["restore", "mine", "--detach"])
        .assert_error(4)
        .assert_stderr_mentions("root");
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
