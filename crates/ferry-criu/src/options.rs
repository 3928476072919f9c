//! Typed options for dump and restore. Paths, not raw descriptors: the client opens the
//! directories and hands CRIU their numbers only for the duration of one call.

use std::path::{Path, PathBuf};

/// CRIU's log verbosity (`-v0` .. `-v4`). ferry keeps full logs: they are the evidence when
/// something fails, and writing them costs little next to page data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Errors = 1,
    Warnings = 2,
    Info = 3,
    Debug = 4,
}

/// How CRIU blocks traffic of established TCP connections while they are checkpointed. A dump
/// and its restore must use the same method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkLock {
    /// One `inet CRIU-<run id>` table per dump: easy to find and remove as a whole.
    #[default]
    Nftables,
    Iptables,
    /// No lock: for trees in their own network namespace that is dumped with them.
    Skip,
}

/// Where CRIU writes its log for one call.
#[derive(Debug, Clone)]
pub struct LogTarget {
    pub dir: PathBuf,
    pub file_name: String,
    pub level: LogLevel,
}

impl LogTarget {
    pub fn new(dir: impl Into<PathBuf>, file_name: impl Into<String>) -> Self {
        LogTarget { dir: dir.into(), file_name: file_name.into(), level: LogLevel::Debug }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.file_name)
    }
}

/// Options of a dump (checkpoint) of the tree rooted at `pid`.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub(crate) pid: i32,
    pub(crate) images_dir: PathBuf,
    pub(crate) log: LogTarget,
    pub(crate) leave_running: bool,
    pub(crate) tcp_established: bool,
    pub(crate) shell_job: bool,
    pub(crate) ext_unix_sk: bool,
    pub(crate) file_locks: bool,
    pub(crate) external: Vec<String>,
    pub(crate) network_lock: NetworkLock,
}

impl DumpOptions {
    pub fn new(pid: i32, images_dir: impl Into<PathBuf>, log: LogTarget) -> Self {
        DumpOptions {
            pid,
            images_dir: images_dir.into(),
            log,
            leave_running: false,
            tcp_established: false,
            shell_job: false,
            ext_unix_sk: false,
            file_locks: false,
            external: Vec::new(),
            network_lock: NetworkLock::default(),
        }
    }

    /// Keep the tree running after the dump instead of killing it.
    pub fn leave_running(mut self, yes: bool) -> Self {
        self.leave_running = yes;
        self
    }

    /// Checkpoint established TCP connections (TCP repair); the network stays locked for those
    /// connections until they are restored.
    pub fn tcp_established(mut self, yes: bool) -> Self {
        self.tcp_established = yes;
        self
    }

    /// The tree is attached to a terminal session it does not own.
    pub fn shell_job(mut self, yes: bool) -> Self {
        self.shell_job = yes;
        self
    }

    /// Allow unix sockets connected to peers outside the tree.
    pub fn ext_unix_sk(mut self, yes: bool) -> Self {
        self.ext_unix_sk = yes;
        self
    }

    pub fn file_locks(mut self, yes: bool) -> Self {
        self.file_locks = yes;
        self
    }

    /// Declares an external resource (CRIU's `--external` syntax).
    pub fn external(mut self, spec: impl Into<String>) -> Self {
        self.external.push(spec.into());
        self
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// How established connections are held while they are away.
    pub fn network_lock(mut self, method: NetworkLock) -> Self {
        self.network_lock = method;
        self
    }

    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    pub fn log(&self) -> &LogTarget {
        &self.log
    }
}

/// Options of a restore from an images directory.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub(crate) images_dir: PathBuf,
    pub(crate) log: LogTarget,
    pub(crate) tcp_established: bool,
    pub(crate) shell_job: bool,
    pub(crate) ext_unix_sk: bool,
    pub(crate) file_locks: bool,
    pub(crate) restore_sibling: bool,
    pub(crate) external: Vec<String>,
    pub(crate) network_lock: NetworkLock,
}

impl RestoreOptions {
    pub fn new(images_dir: impl Into<PathBuf>, log: LogTarget) -> Self {
        RestoreOptions {
            images_dir: images_dir.into(),
            log,
            tcp_established: false,
            shell_job: false,
            ext_unix_sk: false,
            file_locks: false,
            restore_sibling: true,
            external: Vec::new(),
            network_lock: NetworkLock::default(),
        }
    }

    pub fn tcp_established(mut self, yes: bool) -> Self {
        self.tcp_established = yes;
        self
    }

    pub fn shell_job(mut self, yes: bool) -> Self {
        self.shell_job = yes;
        self
    }

    pub fn ext_unix_sk(mut self, yes: bool) -> Self {
        self.ext_unix_sk = yes;
        self
    }

    pub fn file_locks(mut self, yes: bool) -> Self {
        self.file_locks = yes;
        self
    }

    /// Make the restored root a child of the caller (default) rather than of CRIU, so the
    /// caller can wait for it and reap it at once.
    pub fn restore_sibling(mut self, yes: bool) -> Self {
        self.restore_sibling = yes;
        self
    }

    pub fn external(mut self, spec: impl Into<String>) -> Self {
        self.external.push(spec.into());
        self
    }

    /// How established connections are held while they are away.
    pub fn network_lock(mut self, method: NetworkLock) -> Self {
        self.network_lock = method;
        self
    }

    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    pub fn log(&self) -> &LogTarget {
        &self.log
    }
}
