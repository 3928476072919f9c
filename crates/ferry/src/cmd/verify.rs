use super::{human_bytes, open_store};
use crate::cli::Cli;
use crate::exit::Exit;
use crate::output::outln;
use crate::Outcome;

pub fn run(cli: &Cli, names: &[String]) -> Outcome {
    let store = open_store(cli).map_err(|e| ("cannot open the store".to_owned(), e))?;
    let names: Vec<String> = if names.is_empty() {
        let (good, bad) = store.list().map_err(|e| ("cannot list checkpoints".to_owned(), e.into()))?;
        if let Some((name, err)) = bad.into_iter().next() {
            return Err((format!("verification of {name} failed"), err.into()));
        }
        good.into_iter().map(|c| c.manifest.name).collect()
    } else {
        names.to_vec()
    };
    for name in &names {
        let what = || format!("verification of {name} failed");
        let c = store.get(name).map_err(|e| (what(), e.into()))?;
        let r = c.verify(&store).map_err(|e| (what(), e.into()))?;
        outln!("{name}: ok ({} files, {} chunks, {} checked)", r.files, r.chunks, human_bytes(r.bytes));
    }
    Ok(Exit::Ok.into())
}
