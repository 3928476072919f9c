//! `rm`: remove a checkpoint, and the network lock it may still hold.

use ferry_store::Store;

use crate::{netlock, Error};

#[derive(Debug, Clone, Copy)]
pub struct RemoveReport {
    /// Network locks (held connections of a checkpoint never restored) released.
    pub released_locks: usize,
}

/// Removes `name`; with `shred`, its data key is destroyed first.
pub fn remove(store: &Store, name: &str, shred: bool) -> Result<RemoveReport, Error> {
    let released_locks = match store.get(name) {
        Ok(c) if !c.manifest.network_lock_tables.is_empty() => {
            netlock::release(&c.manifest.network_lock_tables)
        }
        _ => 0,
    };
    store.remove(name, shred)?;
    Ok(RemoveReport { released_locks })
}
