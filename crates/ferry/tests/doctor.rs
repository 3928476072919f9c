//! `ferry doctor` and the environment errors: exit 0 only where checkpoint/restore can work,
//! exit 5 when CRIU is missing or too old, and then nothing is touched.

use std::process::Command;

use ferry_testkit::{assert_not_stopped, require_privileged, Ferry, Isolation, Sample, Workload};

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

#[test]
fn doctor_passes_on_a_prepared_host() {
    if !require_privileged() {
        return;
    }
    let outcome = ferry().run(&["doctor"]);
    outcome.assert_ok();
    assert!(outcome.stdout.to_ascii_lowercase().contains("criu"), "the table must report CRIU\n{outcome}");
}

#[test]
fn doctor_fails_without_criu() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let missing = ferry.scratch().join("no-such-criu");
    let outcome = ferry.with_criu(&missing).run(&["doctor"]);
    assert!(!outcome.stderr.contains("panicked at"), "{outcome}");
    assert_eq!(outcome.code, Some(5), "checkpoint/restore cannot work without CRIU\n{outcome}");
}

#[test]
fn doctor_finds_criu_in_path_by_itself() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    // No --criu: ferry finds CRIU on its own, as a user would run it.
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["--store", ferry.store().to_str().expect("utf-8"), "doctor"])
        .env_remove("FERRY_CRIU")
        .output()
        .expect("run ferry doctor");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn missing_criu_is_an_environment_error() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let missing = ferry.scratch().join("no-such-criu");
    let ferry = ferry.with_criu(&missing);
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    ferry.checkpoint(w.pid(), "x", &[]).assert_error(5).assert_stderr_mentions("criu");
    assert_not_stopped(w.pid());
    assert!(!ferry.manifest_path("x").exists());
}

#[test]
fn too_old_criu_is_an_environment_error() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let fake = ferry.fake_old_criu();
    let ferry = ferry.with_criu(&fake);
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    let outcome = ferry.checkpoint(w.pid(), "x", &[]);
    outcome.assert_error(5).assert_stderr_mentions("3.17");
    assert_not_stopped(w.pid());
    let doctor = ferry.run(&["doctor"]);
    assert_ne!(doctor.code, Some(0), "doctor must fail with CRIU 3.17\n{doctor}");
}
