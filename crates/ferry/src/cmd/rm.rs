use super::open_store;
use crate::cli::Cli;
use crate::output::outln;
use crate::Outcome;

pub fn run(cli: &Cli, names: &[String], shred: bool) -> Outcome {
    let store = open_store(cli).map_err(|e| ("cannot open the store".to_owned(), e))?;
    for name in names {
        let report =
            ferry_runtime::remove(&store, name, shred).map_err(|e| (format!("cannot remove {name}"), e))?;
        let mut notes = Vec::new();
        if shred {
            notes.push("its data key destroyed");
        }
        if report.released_locks > 0 {
            notes.push("released the network lock holding its TCP connections");
        }
        if notes.is_empty() {
            outln!("removed {name}");
        } else {
            outln!("removed {name} ({})", notes.join("; "));
        }
    }
    crate::ok()
}
