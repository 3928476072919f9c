//! Long operations draw a progress bar on a terminal and nothing else anywhere else: piped,
//! checkpoint, export, import and restore print their one-line summaries and not one escape
//! code or progress line; on a terminal (a pty through `script`) the bar is drawn.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

use ferry_sys::process_exists;
use ferry_testkit::{poll, read_pid, require_privileged, Ferry, Isolation, Sample, Workload, WAIT};

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

/// Runs ferry with stdout and stderr on pipes; returns them after checking that it succeeded
/// and that neither holds anything a terminal would interpret.
fn piped<S: AsRef<OsStr>>(ferry: &Ferry, args: &[S]) -> (String, String) {
    let mut cmd = ferry.command(args);
    // Its stderr is to be empty: no log lines either.
    cmd.env_remove("FERRY_LOG");
    let Output { status, stdout, stderr } =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output().expect("run ferry");
    let (out, err) =
        (String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned());
    assert!(status.success(), "{cmd:?}: {status}\nstdout: {out}\nstderr: {err}");
    for (what, text) in [("stdout", &out), ("stderr", &err)] {
        assert!(!text.contains(['\x1b', '\r']), "{cmd:?}: a control sequence on its {what}: {text:?}");
    }
    (out, err)
}

#[test]
fn piped_long_operations_print_their_summaries_and_no_progress() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::MemHog { mib: 64 }, Isolation::PidNamespace).expect("start memhog");
    let target = format!("pid:{}", w.pid());

    let (out, err) = piped(&ferry, &["checkpoint", &target, "--name", "quiet"]);
    ferry.criu_lock_tables();
    poll(WAIT, "the checkpointed memhog to be stopped", || (!process_exists(w.pid())).then_some(()));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with(&format!("checkpointed {target} as quiet in ")), "{out}");
    assert!(lines[1].starts_with("  ") && lines[1].contains(" of images: "), "{out}");
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(err, "", "nothing on stderr");

    let archive = ferry.fresh_path("quiet.tar");
    let archive = archive.to_str().expect("a UTF-8 path");
    let (out, err) = piped(&ferry, &["export", "quiet", "-o", archive]);
    assert!(out.starts_with(&format!("exported quiet to {archive} (encrypted, ")), "{out}");
    assert_eq!((out.lines().count(), err.as_str()), (1, ""), "{out}{err}");
    let (out, err) = piped(&ferry, &["import", archive, "--name", "quiet-again"]);
    assert!(out.starts_with(&format!("imported {archive} as quiet-again (")), "{out}");
    assert_eq!((out.lines().count(), err.as_str()), (1, ""), "{out}{err}");

    let pidfile = ferry.fresh_path("pid");
    let pidfile = pidfile.to_str().expect("a UTF-8 path");
    let (out, err) = piped(&ferry, &["restore", "quiet-again", "--detach", "--pidfile", pidfile]);
    let pid = read_pid(pidfile.as_ref()).expect("the restored pid");
    w.adopt(pid);
    assert!(out.starts_with(&format!("restored quiet-again as pid {pid}: running after ")), "{out}");
    assert_eq!((out.lines().count(), err.as_str()), (1, ""), "{out}{err}");
}

#[test]
fn on_a_terminal_a_checkpoint_draws_its_bar_on_stderr() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::MemHog { mib: 64 }, Isolation::PidNamespace).expect("start memhog");
    let target = format!("pid:{}", w.pid());
    // `script` runs it on a pty (stdout and stderr both): the bar's home.
    let line = ferry.command(&["checkpoint", target.as_str(), "--name", "drawn"]);
    let words: Vec<String> = std::iter::once(line.get_program())
        .chain(line.get_args())
        .map(|a| a.to_str().expect("a UTF-8 argument").to_owned())
        .collect();
    // Whatever the CI's environment: a terminal that redraws, and no logs on stderr.
    let out = Command::new("script")
        .args(["-qec", &words.join(" "), "/dev/null"])
        .env("TERM", "xterm")
        .env_remove("FERRY_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run script (util-linux)");
    ferry.criu_lock_tables();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {text}", out.status);
    poll(WAIT, "the checkpointed memhog to be stopped", || (!process_exists(w.pid())).then_some(()));
    // Drawn (the spinner's line, redrawn in place), then cleared before the summary.
    assert!(text.contains("\x1b[2K") && text.contains(" checkpoint "), "{text:?}");
    let summary = text.lines().find(|l| l.contains("checkpointed ")).expect("the summary");
    assert!(summary.trim_end_matches('\r').ends_with(")"), "{summary:?}");
}

/// A reader that went away before ferry printed (`ferry checkpoint ... | true`): the work is
/// done and the exit code tells so, with no panic over the closed pipe.
#[test]
fn a_closed_stdout_is_no_failure() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::MemHog { mib: 8 }, Isolation::PidNamespace).expect("start memhog");
    let target = format!("pid:{}", w.pid());
    for args in [&["checkpoint", target.as_str(), "--name", "gone-reader"][..], &["list"][..]] {
        let mut child =
            ferry.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {}\n{err}", out.status);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    assert_eq!(ferry.list_names(), vec!["gone-reader".to_owned()]);
}
