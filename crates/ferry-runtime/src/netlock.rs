//! The nftables tables in which CRIU holds the traffic of checkpointed TCP connections.
//!
//! A dump that stops the workload leaves its connections locked (an empty table without
//! `--tcp-established`), so the peers' packets are dropped rather than answered with resets until
//! the restore, which removes the lock. A checkpoint that is never restored would hold it
//! forever: ferry records the table of each dump (named after the run id in `inventory.img`) and
//! `ferry rm` releases it.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const PREFIX: &str = "CRIU-";

/// Names of CRIU's lock tables (family `inet`) present now. Empty if nft is missing.
pub fn lock_tables() -> BTreeSet<String> {
    let Ok(out) = Command::new("nft").args(["list", "tables"]).output() else {
        return BTreeSet::new();
    };
    parse_tables(&String::from_utf8_lossy(&out.stdout))
}

fn parse_tables(listing: &str) -> BTreeSet<String> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .filter(|name| is_lock_table(name))
        .map(str::to_owned)
        .collect()
}

/// Only names CRIU makes are ever passed to nft: `CRIU-` and a run id.
fn is_lock_table(name: &str) -> bool {
    name.strip_prefix(PREFIX).is_some_and(|id| {
        !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

/// The lock tables present now that the dump whose images are in `images_dir` created.
pub fn tables_of_dump(images_dir: &Path) -> Vec<String> {
    let run_id = match ferry_criu::image::read_inventory(images_dir) {
        Ok(inv) => inv.dump_criu_run_id.unwrap_or_default(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the dump's run id; its network lock is not tracked");
            return Vec::new();
        }
    };
    lock_tables().into_iter().filter(|t| ferry_criu::image::is_lock_table_of(t, &run_id)).collect()
}

/// Deletes the lock tables among `tables` that still exist; returns how many it released.
pub fn release(tables: &[String]) -> usize {
    let present = lock_tables();
    let mut released = 0;
    for t in tables.iter().filter(|t| is_lock_table(t) && present.contains(*t)) {
        match Command::new("nft").args(["delete", "table", "inet", t]).status() {
            Ok(s) if s.success() => released += 1,
            other => tracing::warn!(table = %t, ?other, "could not release CRIU's network lock"),
        }
    }
    released
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_criu_tables() {
        let listing = "table ip filter\ntable inet CRIU-07a0f47b-9ca2-46fa-ac\ntable inet other\n\
                       table inet CRIU-\ntable inet CRIU-x;rm\n";
        let t = parse_tables(listing);
        assert_eq!(t.into_iter().collect::<Vec<_>>(), vec!["CRIU-07a0f47b-9ca2-46fa-ac".to_owned()]);
    }

    #[test]
    fn refuses_names_crius_never_makes() {
        assert!(!is_lock_table("filter"));
        assert!(!is_lock_table("CRIU-a b"));
        assert!(!is_lock_table(&format!("CRIU-{}", "a".repeat(65))));
        assert!(is_lock_table("CRIU-1234"));
    }
}
