//! `rm`: remove a checkpoint, and the network lock it may still hold.

use ferry_store::Store;

use crate::{netlock, Error};

#[derive(Debug, Clone, Copy)]
pub struct RemoveReport {
    /// Network locks (held connections of a checkpoint never restored) released.
    pub released_locks: usize,
}

pub fn remove(store: &Store, name: &str) -> Result<RemoveReport, Error> {
    let checkpoint = store.get(name);
    let released_locks = match &checkpoint {
        Ok(c) if !c.meta.network_lock_tables.is_empty() => netlock::release(&c.meta.network_lock_tables),
        _ => 0,
    };
    store.remove(name)?;
    Ok(RemoveReport { released_locks })
}
