//! Failure injection for tests: `FERRY_FAILPOINTS=name=action[,name=action...]` in an agent's
//! (or ferry's) environment makes it fail at that point of a migration (or a restore).
//! Actions: `exit` (the process dies on the spot, as if killed), `cut` (the connection to the
//! peer drops), `corrupt` (one byte of the data sent there is flipped). Unset, every check is
//! a lookup in an empty list.

use std::sync::OnceLock;

/// What to do at a failpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Exit,
    Cut,
    Corrupt,
}

fn points() -> &'static [(String, Action)] {
    static POINTS: OnceLock<Vec<(String, Action)>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let spec = std::env::var("FERRY_FAILPOINTS").unwrap_or_default();
        spec.split(',')
            .filter_map(|p| p.split_once('='))
            .filter_map(|(name, action)| {
                let a = match action {
                    "exit" => Action::Exit,
                    "cut" => Action::Cut,
                    "corrupt" => Action::Corrupt,
                    _ => return None,
                };
                Some((name.trim().to_owned(), a))
            })
            .collect()
    })
}

/// The action set for failpoint `name`; `exit` is carried out here.
pub fn check(name: &str) -> Option<Action> {
    let action = points().iter().find(|(n, _)| n == name).map(|(_, a)| *a)?;
    tracing::warn!(failpoint = name, ?action, "failpoint reached");
    if action == Action::Exit {
        // As abrupt as a kill: no unwinding, no cleanup.
        std::process::exit(137);
    }
    Some(action)
}
