use ferry_criu::{Criu, Version};
use ferry_store::Store;

use crate::Error;

/// What every verb needs: a CRIU that works here, and the store.
#[derive(Debug)]
pub struct Context {
    pub criu: Criu,
    pub criu_version: Version,
    pub store: Store,
}

impl Context {
    /// Checks privileges and CRIU's version before anything is touched.
    pub fn new(criu: Criu, store: Store) -> Result<Context, Error> {
        require_root()?;
        let criu_version = criu.require_supported().map_err(Error::from)?;
        Ok(Context { criu, criu_version, store })
    }
}

pub fn require_root() -> Result<(), Error> {
    let uid = ferry_sys::effective_uid();
    if uid != 0 {
        return Err(Error::NotRoot { uid });
    }
    Ok(())
}
