//! Typed options for dump and restore. Paths, not raw descriptors: the client opens the
//! directories and hands CRIU their numbers only for the duration of one call.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// What dump and restore both take: how the tree's resources are treated.
#[derive(Debug, Clone)]
pub struct Shared {
    pub(crate) log: LogTarget,
    pub(crate) tcp_established: bool,
    pub(crate) shell_job: bool,
    pub(crate) ext_unix_sk: bool,
    pub(crate) file_locks: bool,
    pub(crate) external: Vec<String>,
    pub(crate) network_lock: NetworkLock,
}

impl Shared {
    fn new(log: LogTarget) -> Shared {
        Shared {
            log,
            tcp_established: false,
            shell_job: false,
            ext_unix_sk: false,
            file_locks: false,
            external: Vec::new(),
            network_lock: NetworkLock::default(),
        }
    }
}

/// Builder methods common to [`DumpOptions`] and [`RestoreOptions`].
pub trait SharedOptions: Sized {
    #[doc(hidden)]
    fn shared_mut(&mut self) -> &mut Shared;

    /// Checkpoint (or restore) established TCP connections (TCP repair); after a dump that
    /// stops the tree, the connections stay locked until they are restored.
    fn tcp_established(mut self, yes: bool) -> Self {
        self.shared_mut().tcp_established = yes;
        self
    }

    /// The tree is attached to a terminal session it does not own.
    fn shell_job(mut self, yes: bool) -> Self {
        self.shared_mut().shell_job = yes;
        self
    }

    /// Allow unix sockets connected to peers outside the tree.
    fn ext_unix_sk(mut self, yes: bool) -> Self {
        self.shared_mut().ext_unix_sk = yes;
        self
    }

    fn file_locks(mut self, yes: bool) -> Self {
        self.shared_mut().file_locks = yes;
        self
    }

    /// Declares an external resource (CRIU's `--external` syntax).
    fn external(mut self, spec: impl Into<String>) -> Self {
        self.shared_mut().external.push(spec.into());
        self
    }

    /// How established connections are held while they are away (same for dump and restore).
    fn network_lock(mut self, method: NetworkLock) -> Self {
        self.shared_mut().network_lock = method;
        self
    }
}

/// Options of a dump (checkpoint) of the tree rooted at `pid`.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub(crate) pid: i32,
    pub(crate) images_dir: PathBuf,
    pub(crate) leave_running: bool,
    pub(crate) lazy_pages: Option<u16>,
    pub(crate) lazy_undrained: bool,
    pub(crate) container: Option<ContainerDump>,
    pub(crate) shared: Shared,
}

/// What a dump of a container's tree adds, so that the container runtime's own restore
/// (`runc restore`) can take the images: the options runc itself would give CRIU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerDump {
    /// The container's root filesystem as this host sees it.
    pub root: PathBuf,
    /// Mounts whose content is not the container's (bind mounts, masked paths, devices,
    /// cgroup v1 hierarchies): mount point inside the container, and the key it gets in the images.
    pub ext_mounts: Vec<(String, String)>,
    /// The cgroup (v1 freezer) that freezes the whole container at once.
    pub freeze_cgroup: Option<PathBuf>,
}

impl DumpOptions {
    pub fn new(pid: i32, images_dir: impl Into<PathBuf>, log: LogTarget) -> Self {
        DumpOptions {
            pid,
            images_dir: images_dir.into(),
            leave_running: false,
            lazy_pages: None,
            lazy_undrained: false,
            container: None,
            shared: Shared::new(log),
        }
    }

    /// Dump a container's tree the way its runtime would (root, external mounts, cgroups,
    /// orphaned pty masters), so that the runtime can restore it.
    pub fn container(mut self, c: Option<ContainerDump>) -> Self {
        self.container = c;
        self
    }

    /// With lazy pages: the caller serves them from the frozen tree's memory itself, so CRIU
    /// need not copy them into its page pipes first (a tenth of a second per GiB, all of it
    /// while the tree is frozen). Needs ferry's patch of CRIU (`scripts/criu-patches/`); CRIU's
    /// own page server then has nothing to serve and must only be closed. A CRIU without the
    /// patch ignores it and copies them as before.
    pub fn lazy_pages_undrained(mut self, yes: bool) -> Self {
        self.lazy_undrained = yes;
        self
    }

    /// Dump everything but the anonymous memory, which stays in the frozen tree; after the
    /// post-dump notification CRIU serves it from a page server listening on `port` (all
    /// addresses of its network namespace) until a client closes the session.
    pub fn lazy_pages(mut self, port: Option<u16>) -> Self {
        self.lazy_pages = port;
        self
    }

    /// Keep the tree running after the dump instead of killing it.
    pub fn leave_running(mut self, yes: bool) -> Self {
        self.leave_running = yes;
        self
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    pub fn log(&self) -> &LogTarget {
        &self.shared.log
    }
}

impl SharedOptions for DumpOptions {
    fn shared_mut(&mut self) -> &mut Shared {
        &mut self.shared
    }
}

/// Options of a restore from an images directory.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub(crate) images_dir: PathBuf,
    pub(crate) restore_sibling: bool,
    pub(crate) lazy_pages: bool,
    pub(crate) inherit_fds: Vec<(String, Arc<OwnedFd>)>,
    pub(crate) tcp_close: bool,
    pub(crate) shared: Shared,
}

impl RestoreOptions {
    pub fn new(images_dir: impl Into<PathBuf>, log: LogTarget) -> Self {
        RestoreOptions {
            images_dir: images_dir.into(),
            restore_sibling: true,
            lazy_pages: false,
            inherit_fds: Vec::new(),
            tcp_close: false,
            shared: Shared::new(log),
        }
    }

    /// Restore anonymous memory lazily: a `criu lazy-pages` daemon must be running on the
    /// same images directory; it fills pages on first touch (userfaultfd).
    pub fn lazy_pages(mut self, yes: bool) -> Self {
        self.lazy_pages = yes;
        self
    }

    /// Gives CRIU `fd` in place of the external resource named `key` (CRIU's
    /// `--inherit-fd fd[N]:KEY`), e.g. a network namespace declared external at dump time.
    pub fn inherit_fd(mut self, key: impl Into<String>, fd: Arc<OwnedFd>) -> Self {
        self.inherit_fds.push((key.into(), fd));
        self
    }

    /// Restore established TCP connections closed (CRIU's `--tcp-close`): a copy that runs
    /// beside its original must not answer the original's peers.
    pub fn tcp_close(mut self, yes: bool) -> Self {
        self.tcp_close = yes;
        self
    }

    /// Make the restored root a child of the caller (default) rather than of CRIU, so the
    /// caller can wait for it and reap it at once.
    pub fn restore_sibling(mut self, yes: bool) -> Self {
        self.restore_sibling = yes;
        self
    }

    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    pub fn log(&self) -> &LogTarget {
        &self.shared.log
    }
}

impl SharedOptions for RestoreOptions {
    fn shared_mut(&mut self) -> &mut Shared {
        &mut self.shared
    }
}
