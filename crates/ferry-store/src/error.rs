use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no checkpoint named '{0}'")]
    NotFound(String),
    #[error("a checkpoint named '{0}' already exists")]
    Exists(String),
    #[error("invalid checkpoint name '{name}': {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("checkpoint '{name}' is damaged: {file}: {detail}")]
    Damaged { name: String, file: String, detail: String },
    #[error("the store is in use by another ferry process")]
    Busy,
    #[error("cannot shred '{name}': its data key also protects {}", others.join(", "))]
    KeyShared { name: String, others: Vec<String> },
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    #[error("{file} fails verification: {detail}")]
    Tampered { file: String, detail: String },
    #[error("the data key of checkpoint '{name}' is not available: {detail}")]
    NoKey { name: String, detail: String },
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_err(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { action, path, source }
}
