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
    Damaged {
        name: String,
        file: String,
        detail: String,
    },
    #[error("checkpoint metadata {} is unreadable: {detail}", path.display())]
    BadMeta { path: PathBuf, detail: String },
    #[error("checkpoint format {found} is not supported (this ferry reads format {supported})")]
    UnsupportedFormat { found: u32, supported: u32 },
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
