//! One file per verb.

pub mod archive;
pub mod check;
pub mod checkpoint;
pub mod clone;
pub mod doctor;
pub mod gc;
pub mod inspect;
pub mod keys;
pub mod lab;
pub mod list;
pub mod migrate;
pub mod node_ca;
pub mod restore;
pub mod rm;
pub mod trial;
pub mod verify;

use std::time::Duration;

use ferry_criu::Criu;
use ferry_runtime::{Context, Error};
use ferry_store::Store;

use crate::cli::Cli;

pub fn open_store(cli: &Cli) -> Result<Store, Error> {
    Ok(Store::open(&cli.store)?)
}

/// Root, CRIU of a supported version, and the store: what checkpoint and restore need.
pub fn context(cli: &Cli) -> Result<Context, Error> {
    ferry_runtime::require_root()?;
    let criu = Criu::locate(cli.criu.as_deref())?.with_timeout(Duration::from_secs(cli.criu_timeout.max(1)));
    Context::new(criu, open_store(cli)?)?.with_endpoints(&cli.runtime_endpoints)
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
