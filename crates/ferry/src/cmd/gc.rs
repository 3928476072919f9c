use crate::output::outln;
use ferry_store::Store;

use super::human_bytes;
use crate::cli::Cli;
use crate::Outcome;

pub fn run(cli: &Cli) -> Outcome {
    let what = || "gc failed".to_owned();
    ferry_runtime::require_root().map_err(|e| (what(), e))?;
    let store = Store::open_exclusive(&cli.store).map_err(|e| (what(), e.into()))?;
    let r = store.gc().map_err(|e| (what(), e.into()))?;
    outln!(
        "gc: removed {} chunks ({} packs deleted, {} rewritten, {} leftovers), freed {}",
        r.chunks_removed,
        r.packs_deleted,
        r.packs_rewritten,
        r.leftovers_removed,
        human_bytes(r.bytes_freed)
    );
    crate::ok()
}
