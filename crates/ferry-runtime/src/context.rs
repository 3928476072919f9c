use ferry_criu::{Criu, Version};
use ferry_store::{SharedProgress, Store};

use crate::container::Endpoints;
use crate::Error;

/// What every verb needs: a CRIU that works here, and the store.
#[derive(Debug)]
pub struct Context {
    pub criu: Criu,
    pub criu_version: Version,
    pub store: Store,
    /// Where the container runtimes are reached.
    pub endpoints: Endpoints,
    /// Where checkpoint and restore report how far they are (default: no one).
    pub progress: SharedProgress,
}

impl Context {
    /// Checks privileges and CRIU's version before anything is touched.
    pub fn new(criu: Criu, store: Store) -> Result<Context, Error> {
        require_root()?;
        let criu_version = criu.require_supported().map_err(Error::from)?;
        let endpoints = Endpoints::new(store.root());
        Ok(Context { criu, criu_version, store, endpoints, progress: ferry_store::progress::silent() })
    }

    /// Reports how far checkpoints and restores are to `progress`.
    pub fn with_progress(mut self, progress: SharedProgress) -> Context {
        self.progress = progress;
        self
    }

    /// Reaches container runtimes at `endpoints` (`KIND=PATH` pairs) instead of their defaults.
    pub fn with_endpoints(mut self, pairs: &[String]) -> Result<Context, Error> {
        self.endpoints = Endpoints::new(self.store.root()).with(pairs)?;
        Ok(self)
    }
}

pub fn require_root() -> Result<(), Error> {
    let uid = ferry_sys::effective_uid();
    if uid != 0 {
        return Err(Error::NotRoot { uid });
    }
    Ok(())
}
