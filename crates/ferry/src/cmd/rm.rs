use super::open_store;
use crate::cli::Cli;
use crate::Outcome;

pub fn run(cli: &Cli, names: &[String]) -> Outcome {
    let store = open_store(cli).map_err(|e| ("cannot open the store".to_owned(), e))?;
    for name in names {
        let report = ferry_runtime::remove(&store, name).map_err(|e| (format!("cannot remove {name}"), e))?;
        if report.released_locks > 0 {
            println!("removed {name} (released the network lock holding its TCP connections)");
        } else {
            println!("removed {name}");
        }
    }
    crate::ok()
}
