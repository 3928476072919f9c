use std::path::Path;

use ferry_runtime::Error;
use ferry_store::archive::{self, ExportMode};
use ferry_store::{keys, StoreError};

use super::{human_bytes, open_store};
use crate::cli::Cli;
use crate::Outcome;

pub fn export(cli: &Cli, name: &str, out: &Path, plaintext: bool, only_for: &[String]) -> Outcome {
    let what = || format!("export of {name} failed");
    ferry_runtime::require_root().map_err(|e| (what(), e))?;
    let store = open_store(cli).map_err(|e| (what(), e))?;
    let mode = if plaintext {
        eprintln!(
            "warning: {} will hold the process's memory in the clear: anyone who can read it can read \
             every secret the process had",
            out.display()
        );
        ExportMode::Plaintext
    } else {
        let all =
            keys::recipients(&store.keys_dir()).map_err(|e| (what(), Error::Store(StoreError::Key(e))))?;
        let recipients = if only_for.is_empty() {
            let mut r = vec![store.keys().public().x25519];
            r.extend(all.iter().map(|(_, p)| p.x25519));
            r
        } else {
            only_for
                .iter()
                .map(|want| {
                    all.iter().find(|(n, _)| n == want).map(|(_, p)| p.x25519).ok_or_else(|| {
                        (
                            what(),
                            Error::Store(StoreError::NoKey {
                                name: want.clone(),
                                detail: "no such recipient (`ferry keys show` lists them)".into(),
                            }),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        ExportMode::Encrypted { recipients }
    };
    let r = archive::export(&store, name, out, mode).map_err(|e| (what(), e.into()))?;
    println!(
        "exported {name} to {} ({}, {} image files, {})",
        out.display(),
        r.mode,
        r.files,
        human_bytes(r.bytes)
    );
    crate::ok()
}

pub fn import(cli: &Cli, file: &Path, name: Option<&str>) -> Outcome {
    let what = || format!("import of {} failed", file.display());
    ferry_runtime::require_root().map_err(|e| (what(), e))?;
    let store = open_store(cli).map_err(|e| (what(), e))?;
    let c = archive::import(&store, file, name).map_err(|e| (what(), e.into()))?;
    println!(
        "imported {} as {} ({} of images, {} new on disk)",
        file.display(),
        c.checkpoint.manifest.name,
        human_bytes(c.checkpoint.logical_size()),
        human_bytes(c.stats.stored_bytes)
    );
    crate::ok()
}
