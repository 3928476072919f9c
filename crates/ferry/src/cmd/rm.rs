use super::open_store;
use crate::cli::Cli;
use crate::Outcome;

pub fn run(cli: &Cli, names: &[String]) -> Outcome {
    let store = open_store(cli).map_err(|e| ("cannot open the store".to_owned(), e))?;
    for name in names {
        store.remove(name).map_err(|e| (format!("cannot remove {name}"), e.into()))?;
        println!("removed {name}");
    }
    crate::ok()
}
