//! Memory comes back bit for bit: 256 MiB of random bytes hash the same before the checkpoint
//! and after the restore.

use ferry_sys::process_exists;
use ferry_testkit::{poll, require_privileged, Ferry, Isolation, Sample, Workload, WAIT};

#[test]
fn random_memory_survives_checkpoint_and_restore() {
    if !require_privileged() {
        return;
    }
    let ferry = Ferry::new(env!("CARGO_BIN_EXE_ferry"));
    let w = Workload::start(Sample::MemHog { mib: 256 }, Isolation::PidNamespace).expect("start memhog");
    let before = w.request_hash(w.pid());

    ferry.checkpoint(w.pid(), "memhog", &[]).assert_ok();
    poll(WAIT, "the checkpointed memhog to be stopped", || (!process_exists(w.pid())).then_some(()));

    let pid = ferry.restore_ok("memhog", &w);
    let after = w.request_hash(pid);
    assert_eq!(after, before, "sha256 of the 256 MiB buffer changed across checkpoint/restore");
}
