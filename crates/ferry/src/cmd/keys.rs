use crate::output::outln;
use ferry_runtime::Error;
use ferry_store::keys::{self, NodeKeys, NodePublic};
use ferry_store::StoreError;

use crate::cli::{Cli, KeysAction};
use crate::Outcome;

pub fn run(cli: &Cli, action: &KeysAction) -> Outcome {
    let what = || "keys command failed".to_owned();
    let fail = |e: keys::KeyError| (what(), Error::Store(StoreError::Key(e)));
    ferry_runtime::require_root().map_err(|e| (what(), e))?;
    let dir = cli.store.join("keys");
    std::fs::create_dir_all(&cli.store).map_err(|source| {
        (what(), Error::Store(StoreError::Io { action: "cannot create", path: cli.store.clone(), source }))
    })?;
    match action {
        KeysAction::Init => {
            let k = NodeKeys::init(&dir).map_err(fail)?;
            outln!("created the keys of this node in {}", dir.display());
            outln!("{}", k.public().to_text());
        }
        KeysAction::Show => {
            let k = NodeKeys::load_or_init(&dir).map_err(fail)?;
            outln!("{}", k.public().to_text());
            for (name, r) in keys::recipients(&dir).map_err(fail)? {
                outln!("recipient {name}: {}", r.to_text());
            }
        }
        KeysAction::AddRecipient { name, public_key } => {
            let public = NodePublic::from_text(public_key).map_err(fail)?;
            keys::add_recipient(&dir, name, &public).map_err(fail)?;
            outln!("checkpoints from now on are also encrypted for {name}, and its signatures are trusted");
        }
        KeysAction::Rotate => {
            let public = ferry_store::rotate_keys(&cli.store).map_err(|e| (what(), e.into()))?;
            outln!("rotated; every checkpoint was re-wrapped for the new key. New public key:");
            outln!("{}", public.to_text());
        }
    }
    crate::ok()
}
