//! The secure store against damage, tampering, rollback, foreign keys and interrupted writers:
//! every such checkpoint is refused (exit 6, or 9 where only the key is missing) before anything
//! runs, nothing plaintext is ever at rest, unchanged pages are stored once, and removal, `--keep`,
//! `--shred` and `gc` do what they say. Formats: docs/store-format.md.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferry_sys::process_exists;
use ferry_testkit::{
    assert_no_mounts_under, assert_not_stopped, copy_tree, dir_names, files_containing, files_under,
    flip_byte, mounts_under, packs_by_size, poll, replace_tree, require_privileged, swap_index_locations,
    swap_ranges, tree_size, Ferry, IndexEntry, Isolation, Outcome, Sample, Workload, FRAME_HEADER, WAIT,
};
use serde_json::Value;

fn ferry() -> Ferry {
    Ferry::new(env!("CARGO_BIN_EXE_ferry"))
}

/// A counter in its own pid namespace that has counted a little.
fn counter() -> Workload {
    let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
    w.wait_counts(w.pid(), 2);
    w
}

/// Nothing of a checkpoint or restore is left mounted or in STORE/tmp.
#[track_caller]
fn assert_no_scratch_left(ferry: &Ferry) {
    assert_no_mounts_under(ferry.store());
    let tmp = dir_names(&ferry.tmp_dir());
    assert!(tmp.is_empty(), "STORE/tmp still holds {tmp:?}");
}

/// `ferry verify NAME` must fail with one of `codes`.
#[track_caller]
fn assert_verify_refused(ferry: &Ferry, name: &str, codes: &[i32]) -> Outcome {
    let outcome = ferry.run(&["verify", name]);
    outcome.assert_error_in(codes);
    outcome
}

/// `ferry restore NAME` must fail with one of `codes`, start no copy of `w` and leave no scratch.
#[track_caller]
fn assert_restore_refused(ferry: &Ferry, w: &Workload, name: &str, codes: &[i32]) -> Outcome {
    let before = w.instances();
    let (outcome, pid) = ferry.restore_detached(name, w);
    outcome.assert_error_in(codes);
    assert_eq!(pid, None, "a refused restore wrote a pid\n{outcome}");
    assert_eq!(w.instances(), before, "a refused restore left a copy running\n{outcome}");
    assert_no_scratch_left(ferry);
    outcome
}

/// Restores `name` and checks that the copy of a counter counts on.
#[track_caller]
fn assert_counter_restores(ferry: &Ferry, w: &Workload, name: &str) {
    let copy = ferry.restore_ok(name, w);
    w.wait_counts(copy, 2);
    assert_not_stopped(copy);
    // What assert_restore_refused relies on to see that no copy runs.
    assert!(w.instances().contains(&copy), "copy {copy} not among {:?}", w.instances());
    assert_no_scratch_left(ferry);
}

/// A `u64` field of `inspect --json`.
#[track_caller]
fn field(doc: &Value, key: &str) -> u64 {
    doc[key].as_u64().unwrap_or_else(|| panic!("inspect --json has no number {key}: {doc}"))
}

#[test]
fn flipped_chunk_byte_is_refused() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = counter();
    ferry.checkpoint(w.pid(), "c", &["--leave-running"]).assert_ok();
    ferry.run(&["verify", "c"]).assert_ok();

    let packs = packs_by_size(ferry.store());
    let chunk = packs[0].entries[packs[0].entries.len() / 2];
    let at = chunk.offset + FRAME_HEADER + (u64::from(chunk.len) - FRAME_HEADER) / 2;
    flip_byte(&packs[0].pack, at);

    for outcome in [assert_verify_refused(&ferry, "c", &[6]), assert_restore_refused(&ferry, &w, "c", &[6])] {
        assert!(
            outcome.stderr_mentions(&chunk.short_id()),
            "the error must name chunk {}\n{outcome}",
            chunk.short_id()
        );
    }
    // `verify` without names checks every checkpoint, and so fails too.
    ferry.run(&["verify"]).assert_error(6);

    // The flipped byte was all that was wrong.
    flip_byte(&packs[0].pack, at);
    ferry.run(&["verify", "c"]).assert_ok();
    assert_counter_restores(&ferry, &w, "c");
}

#[test]
fn flipped_manifest_byte_is_refused() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = counter();
    ferry.checkpoint(w.pid(), "m", &["--leave-running"]).assert_ok();
    let path = ferry.manifest_path("m");
    let good = fs::read(&path).expect("read the manifest");
    let len = good.len() as u64;
    // Magic, body length, the middle of the body, the signature, the signer's key.
    for at in [0, 9, len / 2, len - 96 + 7, len - 32 + 7] {
        flip_byte(&path, at);
        let what = format!("manifest byte {at} of {len} flipped");
        let v = assert_verify_refused(&ferry, "m", &[6]);
        assert!(
            v.stderr_mentions("m.fmf") || v.stderr_mentions("manifest"),
            "{what}: the error must name the manifest\n{v}"
        );
        assert_restore_refused(&ferry, &w, "m", &[6]);
        assert!(
            !ferry.list_names().contains(&"m".to_string()),
            "{what}: list must not show a manifest that fails verification"
        );
        fs::write(&path, &good).expect("put the manifest back");
    }
    ferry.run(&["verify", "m"]).assert_ok();
    assert_counter_restores(&ferry, &w, "m");
}

#[test]
fn swapped_chunks_are_refused() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    // Random memory: its pages do not compress, so many frames have the same length.
    let w = Workload::start(Sample::MemHog { mib: 8 }, Isolation::PidNamespace).expect("start memhog");
    let hash = w.request_hash(w.pid());
    ferry.checkpoint(w.pid(), "s", &["--leave-running"]).assert_ok();

    let pack = packs_by_size(ferry.store()).remove(0);
    let mut by_len: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, e) in pack.entries.iter().enumerate() {
        by_len.entry(e.len).or_default().push(i);
    }
    let (_, same) = by_len.iter().max_by_key(|(_, v)| v.len()).expect("some entries");
    assert!(same.len() >= 2, "no two frames of equal length");
    let (ia, ib) = (same[0], same[same.len() / 2]);
    let (a, b): (IndexEntry, IndexEntry) = (pack.entries[ia], pack.entries[ib]);

    // Two whole frames trade places in the pack; the index still says where each id is.
    swap_ranges(&pack.pack, a.offset, b.offset, a.len as usize);
    assert_verify_refused(&ferry, "s", &[6]);
    assert_restore_refused(&ferry, &w, "s", &[6]);
    swap_ranges(&pack.pack, a.offset, b.offset, a.len as usize);
    ferry.run(&["verify", "s"]).assert_ok();

    // The index entries trade their frames instead: the pack is intact, the ids point wrong.
    swap_index_locations(&pack.idx, ia, ib);
    assert_verify_refused(&ferry, "s", &[6]);
    assert_restore_refused(&ferry, &w, "s", &[6]);
    swap_index_locations(&pack.idx, ia, ib);
    ferry.run(&["verify", "s"]).assert_ok();

    let copy = ferry.restore_ok("s", &w);
    assert_eq!(w.request_hash(copy), hash, "the restored memory differs");
}

#[test]
fn older_manifest_put_back_is_refused() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let first = counter();
    ferry.checkpoint(first.pid(), "app", &["--leave-running"]).assert_ok();
    let old_manifest = fs::read(ferry.manifest_path("app")).expect("read the manifest");
    let old_slots = dir_names(&ferry.slots_dir());
    assert_eq!(old_slots.len(), 1, "one checkpoint, one slots file");
    let old_slots_bytes = fs::read(ferry.slots_dir().join(&old_slots[0])).expect("read slots");
    let old_generation = field(&ferry.inspect_json("app"), "generation");
    // A second checkpoint of the same tree shares app's chunks and so holds app's data key: the
    // next checkpoint may dedup against app's chunks after app is removed (see
    // checkpoint_after_rm_before_gc_keeps_the_workload).
    ferry.checkpoint(first.pid(), "keeper", &["--leave-running"]).assert_ok();
    ferry.run(&["rm", "app"]).assert_ok();

    let second = counter();
    ferry.checkpoint(second.pid(), "app", &["--leave-running"]).assert_ok();
    ferry.run(&["verify", "app"]).assert_ok();
    let new_generation = field(&ferry.inspect_json("app"), "generation");
    assert!(new_generation > old_generation, "generation {new_generation} after {old_generation}");

    // The old manifest, validly signed by this very node, and its key slots come back.
    fs::write(ferry.manifest_path("app"), &old_manifest).expect("put the old manifest back");
    fs::write(ferry.slots_dir().join(&old_slots[0]), &old_slots_bytes).expect("put the slots back");
    let about_rollback = |o: &Outcome| o.stderr_mentions("generation") || o.stderr_mentions("catalog");
    for outcome in [
        assert_verify_refused(&ferry, "app", &[6]),
        assert_restore_refused(&ferry, &first, "app", &[6]),
        assert_restore_refused(&ferry, &second, "app", &[6]),
    ] {
        assert!(
            about_rollback(&outcome),
            "the error must say the manifest is not the catalog's current one\n{outcome}"
        );
    }
    ferry.run(&["verify", "keeper"]).assert_ok();

    // Removed altogether, the name cannot be brought back by its old manifest either.
    ferry.run(&["rm", "app"]).assert_ok();
    fs::write(ferry.manifest_path("app"), &old_manifest).expect("put the old manifest back");
    let outcome = assert_restore_refused(&ferry, &first, "app", &[6]);
    assert!(about_rollback(&outcome), "{outcome}");
    assert_eq!(ferry.list_names(), ["keeper"]);
}

#[test]
fn foreign_keys_open_nothing() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = counter();
    ferry.checkpoint(w.pid(), "k", &["--leave-running"]).assert_ok();

    let other = self::ferry();
    other.run(&["keys", "init"]).assert_ok();
    let own_keys = ferry.scratch().join("own-keys");
    copy_tree(&ferry.keys_dir(), &own_keys);
    replace_tree(&other.keys_dir(), &ferry.keys_dir());

    assert_verify_refused(&ferry, "k", &[6, 9]);
    assert_restore_refused(&ferry, &w, "k", &[6, 9]);
    assert!(!ferry.list_names().contains(&"k".to_string()), "another node's keys must not vouch for k");

    replace_tree(&own_keys, &ferry.keys_dir());
    ferry.run(&["verify", "k"]).assert_ok();
    assert_counter_restores(&ferry, &w, "k");
}

#[test]
fn missing_chunks_are_refused() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = counter();
    ferry.checkpoint(w.pid(), "gone", &["--leave-running"]).assert_ok();
    let pack = packs_by_size(ferry.store()).remove(0);
    let saved = ferry.scratch().join("saved-packs");
    copy_tree(&ferry.packs_dir(), &saved);

    // The pack and its index: the chunks are unknown to the store.
    fs::remove_file(&pack.pack).expect("remove the pack");
    fs::remove_file(&pack.idx).expect("remove the index");
    assert_verify_refused(&ferry, "gone", &[6]);
    assert_restore_refused(&ferry, &w, "gone", &[6]);
    replace_tree(&saved, &ferry.packs_dir());
    ferry.run(&["verify", "gone"]).assert_ok();

    // The pack alone: the index still promises chunks the store no longer has.
    fs::remove_file(&pack.pack).expect("remove the pack");
    for outcome in
        [assert_verify_refused(&ferry, "gone", &[6]), assert_restore_refused(&ferry, &w, "gone", &[6])]
    {
        let named = outcome.stderr_mentions(&pack.id())
            || pack.entries.iter().any(|e| outcome.stderr_mentions(&e.short_id()));
        assert!(named, "the error must name the pack or a chunk\n{outcome}");
    }
    replace_tree(&saved, &ferry.packs_dir());
    assert_counter_restores(&ferry, &w, "gone");
}

/// A pack file of the store that has no index yet: a writer is (or was) filling it.
fn unindexed_pack(ferry: &Ferry) -> Option<PathBuf> {
    let names = dir_names(&ferry.packs_dir());
    names
        .iter()
        .filter_map(|n| n.strip_suffix(".pack"))
        .filter(|stem| !names.contains(&format!("{stem}.idx")))
        .map(|stem| ferry.packs_dir().join(format!("{stem}.pack")))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.len() > 0))
}

#[test]
fn killed_checkpoint_leaves_nothing_behind() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let bystander = counter();
    ferry.checkpoint(bystander.pid(), "other", &["--leave-running"]).assert_ok();

    let w = Workload::start(Sample::MemHog { mib: 256 }, Isolation::PidNamespace).expect("start memhog");
    let hash = w.request_hash(w.pid());
    let target = format!("pid:{}", w.pid());
    // The middle: ferry reads the frozen tree's pages into a new pack, CRIU waiting at
    // post-dump, when ferry dies (a failpoint: as abrupt as SIGKILL, however fast the machine).
    let mut cmd = ferry.command(&["checkpoint", &target, "--name", "half"]);
    cmd.env("FERRY_FAILPOINTS", "checkpoint-pages=exit");
    let outcome = cmd.output().expect("run ferry");
    assert_eq!(outcome.status.code(), Some(137), "ferry must have died at the failpoint: {outcome:?}");
    assert!(unindexed_pack(&ferry).is_some(), "ferry died before it sealed into a new pack");
    // CRIU finds its caller gone and lets the tree go.
    poll(WAIT, "the workload to run again", || {
        ferry_sys::process_state(w.pid()).filter(|s| !matches!(s, 't' | 'T')).map(drop)
    });

    // The workload was never checkpointed: CRIU let it go, running and whole.
    assert!(process_exists(w.pid()), "the workload died with the interrupted checkpoint");
    assert_not_stopped(w.pid());
    assert_eq!(w.request_hash(w.pid()), hash, "the workload's memory changed");

    let gc = ferry.run(&["gc"]);
    gc.assert_ok();
    let leftovers: u64 = gc
        .stdout
        .split(" leftovers")
        .next()
        .and_then(|head| head.rsplit(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("gc must report its leftovers\n{gc}"));
    assert!(leftovers >= 1, "gc must remove the interrupted checkpoint's pack\n{gc}");
    assert_eq!(unindexed_pack(&ferry), None, "a pack without index survived gc");
    assert_no_scratch_left(&ferry);
    assert_eq!(ferry.list_names(), ["other"], "no half checkpoint may be listed");
    assert!(!ferry.manifest_path("half").exists());
    ferry.run(&["verify", "other"]).assert_ok();
    ferry.run(&["verify"]).assert_ok();
    // And the workload can be checkpointed after all.
    ferry.checkpoint(w.pid(), "whole", &["--leave-running"]).assert_ok();
    ferry.run(&["verify", "whole"]).assert_ok();
}

/// The files under `dir` that hold any of `needles`.
fn files_holding_any(dir: &Path, needles: &[Vec<u8>]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = needles.iter().flat_map(|n| files_containing(dir, n)).collect();
    found.sort();
    found.dedup();
    found
}

#[test]
fn no_plaintext_at_rest() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::Marker, Isolation::PidNamespace).expect("start marker");
    let marker = w.marker(w.pid());
    assert_eq!(marker.len(), 64, "not a marker: {marker}");
    let report = w.request_report(w.pid());
    assert_eq!(report["marker"], marker.as_str());
    assert_eq!(report["intact"], true, "{report}");
    // The marker, and pieces of the random blob: a page of those stored compressed but not
    // encrypted would still show them.
    let blob = w.blob(w.pid());
    let mut needles = vec![marker.as_bytes().to_vec()];
    needles.extend((0..16).map(|i| blob[i * blob.len() / 16 + 100..][..64].to_vec()));
    // The search finds them where they are plainly written.
    let plain = files_holding_any(w.dir(), &needles);
    for what in ["marker", "blob"] {
        assert!(plain.contains(&w.path(what, w.pid())), "the search missed {what}: {plain:?}");
    }

    ferry.checkpoint(w.pid(), "secret", &[]).assert_ok();
    poll(WAIT, "the checkpointed workload to be stopped", || (!process_exists(w.pid())).then_some(()));
    let files = files_under(ferry.store());
    assert!(files.iter().any(|f| f.extension().is_some_and(|e| e == "pack")), "no packs in {files:?}");
    let leaked = files_holding_any(ferry.store(), &needles);
    assert!(leaked.is_empty(), "plaintext memory of the workload is at rest in {leaked:?}");

    let copy = ferry.restore_ok("secret", &w);
    let report = w.request_report(copy);
    assert_eq!(report["marker"], marker.as_str(), "the restored copy lost its marker");
    assert_eq!(report["intact"], true, "{report}");
    // The restore decrypted into a tmpfs that is gone: still nothing in the clear.
    assert_no_scratch_left(&ferry);
    let leaked = files_holding_any(ferry.store(), &needles);
    assert!(leaked.is_empty(), "the restore left plaintext in {leaked:?}");
}

#[test]
fn unchanged_pages_are_stored_once() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = Workload::start(Sample::MemHog { mib: 256 }, Isolation::PidNamespace).expect("start memhog");
    let first_hash = w.request_hash(w.pid());
    ferry.checkpoint(w.pid(), "first", &["--leave-running"]).assert_ok();
    let pages = 256 * 1024 * 1024 / 4096;
    let rewritten = w.rewrite_pages(w.pid(), 5.0);
    assert_eq!(rewritten, pages * 5 / 100, "memhog rewrote the wrong share");
    let second_hash = w.request_hash(w.pid());
    assert_ne!(second_hash, first_hash);
    ferry.checkpoint(w.pid(), "second", &["--leave-running"]).assert_ok();

    let first = ferry.inspect_json("first");
    let second = ferry.inspect_json("second");
    let first_stored = field(&first, "stored_bytes");
    let new_bytes = field(&second, "stored_bytes") - field(&second, "shared_bytes");
    eprintln!(
        "dedup: first stored {first_stored} B; second stored {new_bytes} B new ({:.2}%) for {rewritten} rewritten pages",
        new_bytes as f64 * 100.0 / first_stored as f64
    );
    assert!(first_stored >= 256 << 20, "random memory cannot be stored in less than itself: {first}");
    assert!(
        new_bytes * 100 <= first_stored * 8,
        "the second checkpoint stored {new_bytes} new bytes, over 8% of the first's {first_stored}\n\
         first: {first}\nsecond: {second}"
    );
    // The rewritten pages themselves are new, and must be stored.
    assert!(
        new_bytes >= rewritten * 4096,
        "the second checkpoint stored only {new_bytes} new bytes for {rewritten} new pages: {second}"
    );

    let copy = ferry.restore_ok("first", &w);
    assert_eq!(w.request_hash(copy), first_hash, "first checkpoint restored wrong");
    let copy = ferry.restore_ok("second", &w);
    assert_eq!(w.request_hash(copy), second_hash, "second checkpoint restored wrong");
}

#[test]
fn keep_keeps_the_newest_of_the_workload() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let bystander = counter();
    ferry.checkpoint(bystander.pid(), "other", &["--leave-running"]).assert_ok();
    let w = counter();
    for i in 1..=4 {
        let name = format!("keep-{i}");
        let outcome = ferry.checkpoint(w.pid(), &name, &["--leave-running", "--keep", "2"]);
        outcome.assert_ok();
        if i >= 3 {
            let pruned = format!("keep-{}", i - 2);
            assert!(outcome.stdout.contains(&pruned), "the output must say {pruned} was removed\n{outcome}");
        }
    }
    assert_eq!(ferry.list_names(), ["keep-3", "keep-4", "other"]);
    assert_eq!(dir_names(&ferry.store().join("manifests")), ["keep-3.fmf", "keep-4.fmf", "other.fmf"]);
    ferry.run(&["verify"]).assert_ok();
    assert_counter_restores(&ferry, &w, "keep-4");
    assert_counter_restores(&ferry, &w, "keep-3");
}

#[test]
fn shred_destroys_the_key_unless_shared() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = counter();
    ferry.checkpoint(w.pid(), "a", &["--leave-running"]).assert_ok();
    let slots_a = dir_names(&ferry.slots_dir());
    assert_eq!(slots_a.len(), 1, "{slots_a:?}");
    let slots_a = ferry.slots_dir().join(&slots_a[0]);
    // The same tree again: b's chunks are mostly a's, sealed under a's key.
    ferry.checkpoint(w.pid(), "b", &["--leave-running"]).assert_ok();

    ferry.run(&["rm", "--shred", "a"]).assert_error(8).assert_stderr_mentions("b");
    assert!(slots_a.exists(), "a refused shred destroyed the key");
    ferry.run(&["verify", "a"]).assert_ok();

    let manifest_a = fs::read(ferry.manifest_path("a")).expect("read a's manifest");
    let catalog = fs::read(ferry.store().join("catalog")).expect("read the catalog");
    // A second name for the slots file's inode: shredding must overwrite the key, not only
    // unlink one name of it.
    let link = ferry.store().join("slots-link");
    fs::hard_link(&slots_a, &link).expect("link the slots file");
    let slots_len = fs::metadata(&slots_a).expect("stat slots").len();

    ferry.run(&["rm", "b"]).assert_ok();
    ferry.run(&["rm", "--shred", "a"]).assert_ok();
    assert!(!slots_a.exists(), "the slots file of a survived --shred");
    let left = fs::read(&link).expect("read the link");
    assert_eq!(left.len() as u64, slots_len);
    assert!(left.iter().all(|b| *b == 0), "--shred unlinked the key slots without overwriting them");
    fs::remove_file(&link).expect("remove the link");
    assert!(ferry.list_names().is_empty());

    // Its manifest put back: refused.
    fs::write(ferry.manifest_path("a"), &manifest_a).expect("put the manifest back");
    assert_restore_refused(&ferry, &w, "a", &[6, 9]);
    // With the catalog of before the shred too, only the key is missing: still nothing opens.
    fs::write(ferry.store().join("catalog"), &catalog).expect("put the catalog back");
    assert_verify_refused(&ferry, "a", &[9]).assert_stderr_mentions("key");
    assert_restore_refused(&ferry, &w, "a", &[9]);
}

#[test]
fn loose_key_permissions_are_refused() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = counter();
    ferry.checkpoint(w.pid(), "p", &["--leave-running"]).assert_ok();
    let key = ferry.keys_dir().join("node.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod 644");

    let fix_named = |o: &Outcome| o.stderr_mentions("chmod") && o.stderr_mentions("node.key");
    // Without --leave-running: refused before the workload is touched.
    let outcome = ferry.checkpoint(w.pid(), "p2", &[]);
    outcome.assert_error(4);
    assert!(fix_named(&outcome), "the error must say how to fix it\n{outcome}");
    assert_not_stopped(w.pid());
    let seen = w.counts(w.pid()).len();
    w.wait_counts(w.pid(), seen + 2);
    assert!(!ferry.manifest_path("p2").exists());

    let outcome = assert_restore_refused(&ferry, &w, "p", &[4]);
    assert!(fix_named(&outcome), "the error must say how to fix it\n{outcome}");
    let mode = fs::metadata(&key).expect("stat node.key").permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "ferry must refuse, not quietly fix, the key");

    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod 600");
    assert_counter_restores(&ferry, &w, "p");
}

/// base64url without padding (RFC 4648 §5).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let n = group.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..=group.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

#[test]
fn keys_show_prints_the_node_public_key() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let outcome = ferry.run(&["keys", "show"]);
    outcome.assert_ok();
    let line = outcome
        .stdout
        .lines()
        .find(|l| l.starts_with("ferry-node-v1:"))
        .unwrap_or_else(|| panic!("no ferry-node-v1: line\n{outcome}"));
    let public = fs::read(ferry.keys_dir().join("node.pub")).expect("read node.pub");
    assert_eq!(&public[..4], b"FRYP");
    assert_eq!(line, format!("ferry-node-v1:{}", base64url(&public)));
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&ferry.keys_dir()), 0o700);
    assert_eq!(mode(&ferry.keys_dir().join("node.key")), 0o600);
    // The same node the next time.
    let again = ferry.run(&["keys", "show"]);
    again.assert_ok();
    assert!(again.stdout.contains(line), "{again}");
}

#[test]
fn gc_after_rm_frees_the_removed_packs() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let hog = Workload::start(Sample::MemHog { mib: 64 }, Isolation::PidNamespace).expect("start memhog");
    ferry.checkpoint(hog.pid(), "big", &["--leave-running"]).assert_ok();
    let w = counter();
    ferry.checkpoint(w.pid(), "small", &["--leave-running"]).assert_ok();
    let big = ferry.inspect_json("big");
    let only_big = field(&big, "stored_bytes") - field(&big, "shared_bytes");
    assert!(only_big >= 64 << 20, "{big}");

    let before = tree_size(&ferry.packs_dir());
    ferry.run(&["rm", "big"]).assert_ok();
    let gc = ferry.run(&["gc"]);
    gc.assert_ok();
    let after = tree_size(&ferry.packs_dir());
    assert!(
        after + only_big * 9 / 10 <= before,
        "gc freed {} bytes of packs; big alone had {only_big}\n{gc}",
        before.saturating_sub(after)
    );
    assert_eq!(ferry.list_names(), ["small"]);
    ferry.run(&["verify"]).assert_ok();
    assert_counter_restores(&ferry, &w, "small");
}

#[test]
fn checkpoint_after_rm_before_gc_keeps_the_workload() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    let w = counter();
    ferry.checkpoint(w.pid(), "first", &["--leave-running"]).assert_ok();
    // first's chunks stay in the packs until gc; its key goes with its slots.
    ferry.run(&["rm", "first"]).assert_ok();
    let outcome = ferry.checkpoint(w.pid(), "second", &[]);
    if outcome.code != Some(0) {
        assert!(
            process_exists(w.pid()),
            "the checkpoint failed and the workload is gone: it is lost\n{outcome}"
        );
    }
    outcome.assert_ok();
    poll(WAIT, "the checkpointed counter to be stopped", || (!process_exists(w.pid())).then_some(()));
    ferry.run(&["verify", "second"]).assert_ok();
    assert_counter_restores(&ferry, &w, "second");
}

#[test]
fn leftover_tmpfs_is_swept_with_a_relative_store_path() {
    if !require_privileged() {
        return;
    }
    let ferry = ferry();
    ferry.run(&["list"]).assert_ok();
    // A tmpfs as an interrupted checkpoint leaves it: NAME.PID.NANOS, PID dead.
    let mut dead = Command::new("true").spawn().expect("spawn true");
    let dead_pid = dead.id();
    dead.wait().expect("reap true");
    for (i, relative) in [false, true].into_iter().enumerate() {
        let leftover = ferry.tmp_dir().join(format!("x.{dead_pid}.{i}"));
        fs::create_dir(&leftover).expect("mkdir leftover");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
            .arg(&leftover)
            .status()
            .expect("run mount");
        assert!(mounted.success(), "cannot mount a tmpfs at {}", leftover.display());
        fs::write(leftover.join("plain.img"), b"plaintext").expect("write into the tmpfs");
        assert_eq!(mounts_under(&ferry.tmp_dir()).len(), 1);

        let parent = ferry.store().parent().expect("store parent");
        let store_arg = if relative {
            PathBuf::from(ferry.store().file_name().expect("store name"))
        } else {
            ferry.store().to_path_buf()
        };
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .current_dir(parent)
            .arg("--store")
            .arg(&store_arg)
            .arg("list")
            .stdin(Stdio::null())
            .output()
            .expect("run ferry list");
        assert!(out.status.success(), "{out:?}");
        let how = if relative { "a relative" } else { "an absolute" };
        assert_no_mounts_under(ferry.store());
        assert!(
            dir_names(&ferry.tmp_dir()).is_empty(),
            "opening the store by {how} path left {:?} in STORE/tmp",
            dir_names(&ferry.tmp_dir())
        );
    }
}
