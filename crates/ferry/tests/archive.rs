//! `ferry export` / `ferry import` through the CLI: an encrypted archive holds no plaintext and
//! comes back as a restorable checkpoint; a plaintext one has the Podman/CRI-O layout; a hostile
//! one is refused with nothing left in the store.

use std::fs;
use std::process::Command;

use ferry_sys::process_exists;
use ferry_testkit::{poll, require_privileged, Ferry, Isolation, Sample, Workload, WAIT};

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

fn tar_listing(path: &std::path::Path) -> Vec<String> {
    let out = Command::new("tar").arg("tf").arg(path).output().expect("run tar");
    assert!(out.status.success(), "tar tf {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn encrypted_export_survives_rm_and_imports_as_a_restorable_checkpoint() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Marker, Isolation::PidNamespace).expect("start marker");
    let marker = w.marker(w.pid());
    ferry.checkpoint(w.pid(), "sealed", &[]).assert_ok();
    poll(WAIT, "the checkpointed workload to stop", || (!process_exists(w.pid())).then_some(()));

    let archive = ferry.fresh_path("sealed.tar");
    ferry.run(&["export", "sealed", "-o", archive.to_str().expect("utf-8 path")]).assert_ok();
    let listing = tar_listing(&archive);
    assert!(listing.iter().any(|e| e == "ferry/manifest.fmf"), "{listing:?}");
    assert!(
        !listing.iter().any(|e| e.starts_with("checkpoint/") && e.len() > "checkpoint/".len()),
        "{listing:?}"
    );
    let bytes = fs::read(&archive).expect("read archive");
    assert!(
        !bytes.windows(marker.len()).any(|win| win == marker.as_bytes()),
        "the encrypted archive must not hold the process's memory in the clear"
    );

    ferry.run(&["rm", "sealed"]).assert_ok();
    ferry.run(&["import", archive.to_str().expect("utf-8 path")]).assert_ok();
    ferry.run(&["verify", "sealed"]).assert_ok();
    let pid = ferry.restore_ok("sealed", &w);
    assert!(process_exists(pid), "the imported checkpoint restores");
}

#[test]
fn plaintext_export_has_the_checkpoint_archive_layout_and_imports() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    w.wait_counts(w.pid(), 2);
    ferry.checkpoint(w.pid(), "open", &["--leave-running"]).assert_ok();
    let archive = ferry.fresh_path("open.tar");
    let out = ferry.run(&["export", "open", "--plaintext", "-o", archive.to_str().expect("utf-8 path")]);
    out.assert_ok();
    assert!(out.stderr_mentions("warning"), "a plaintext export warns");
    let listing = tar_listing(&archive);
    for wanted in ["checkpoint/inventory.img", "checkpoint/pstree.img", "stats-dump", "ferry/manifest.fmf"] {
        assert!(listing.iter().any(|e| e == wanted), "{wanted} missing from {listing:?}");
    }
    ferry.run(&["import", archive.to_str().expect("utf-8 path"), "--name", "copy"]).assert_ok();
    ferry.run(&["verify", "copy"]).assert_ok();
}

#[test]
fn hostile_archive_is_refused_and_leaves_nothing() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let evil = ferry.fresh_path("evil.tar");
    // A path climbing out of the extraction directory, written by Python's tarfile.
    let script = format!(
        "import tarfile, io\n\
         t = tarfile.open('{}', 'w')\n\
         data = b'pwned'\n\
         i = tarfile.TarInfo('checkpoint/../../evil')\n\
         i.size = len(data)\n\
         t.addfile(i, io.BytesIO(data))\n\
         t.close()\n",
        evil.display()
    );
    let status = Command::new("/usr/bin/python3").arg("-c").arg(&script).status().expect("python3");
    assert!(status.success());
    let out = ferry.run(&["import", evil.to_str().expect("utf-8 path"), "--name", "evil"]);
    out.assert_error(6);
    assert!(ferry.list_names().is_empty(), "nothing may be listed after a refused import");
    assert!(
        !ferry.store().join("evil").exists()
            && !ferry.store().parent().expect("parent").join("evil").exists()
    );
    let tmp_entries = fs::read_dir(ferry.tmp_dir()).map(|d| d.count()).unwrap_or(0);
    assert_eq!(tmp_entries, 0, "no scratch left in STORE/tmp");
}
