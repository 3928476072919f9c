//! The RPC client: one `criu swrk` process per call, talking protobuf over a `SOCK_SEQPACKET`
//! pair, answering CRIU's notify messages on the way.

use std::env;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use ferry_sys::SeqPacket;
use prost::Message;

use crate::classify::{classify_log, Cause};
use crate::cwd_lock::CwdLocks;
use crate::error::{CriuError, Operation};
use crate::notify::{Notify, NotifyHandler, RecordingNotify};
use crate::options::{ContainerDump, DumpOptions, LogTarget, NetworkLock, RestoreOptions, Shared};
use crate::rpc::{self, ReqType, Request, Response};
use crate::version::{Version, MIN_VERSION};

/// Read by ferry's patch of CRIU (`scripts/criu-patches/`): lazy pages stay out of the page
/// pipes (see [`DumpOptions::lazy_pages_undrained`]).
const LAZY_UNDRAINED: &str = "FERRY_CRIU_LAZY_UNDRAINED";
/// CRIU's answers are small; anything larger is a broken peer.
const MAX_RESPONSE: usize = 1 << 20;
/// Classification reads at most this much of a log (the end, where the errors are).
const MAX_LOG_READ: u64 = 16 << 20;
/// Where CRIU is looked for after `$PATH`: the setup script installs into /usr/local/sbin,
/// which a non-login root shell's PATH may lack.
const FALLBACK_DIRS: &[&str] = &["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin"];

/// A CRIU installation.
#[derive(Debug, Clone)]
pub struct Criu {
    path: PathBuf,
    timeout: Duration,
}

/// A CRIU call that takes longer is killed: CRIU can spin forever on some damaged images.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Result of a successful dump.
#[derive(Debug, Clone)]
pub struct DumpOutcome {
    pub events: Vec<Notify>,
}

/// Result of a successful restore.
#[derive(Debug, Clone)]
pub struct RestoreOutcome {
    /// Host PID of the restored tree's root.
    pub pid: i32,
}

/// What CRIU and this kernel support, from a feature check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeatureSet {
    pub mem_track: bool,
    pub lazy_pages: bool,
    pub pidfd_store: bool,
}

impl Criu {
    /// A CRIU binary at a known path.
    pub fn at(path: impl Into<PathBuf>) -> Criu {
        Criu { path: path.into(), timeout: DEFAULT_TIMEOUT }
    }

    /// Kills CRIU calls that run longer than `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Criu {
        self.timeout = timeout;
        self
    }

    /// `explicit` if given, else `criu` from `$PATH` or the usual sbin directories.
    pub fn locate(explicit: Option<&Path>) -> Result<Criu, CriuError> {
        if let Some(p) = explicit {
            return if p.is_file() {
                Ok(Criu::at(p))
            } else {
                Err(CriuError::NotFound { searched: p.display().to_string() })
            };
        }
        let path_var = env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = env::split_paths(&path_var).collect();
        dirs.extend(FALLBACK_DIRS.iter().map(PathBuf::from));
        dirs.iter()
            .map(|d| d.join("criu"))
            .find(|p| p.is_file())
            .map(Criu::at)
            .ok_or_else(|| CriuError::NotFound { searched: "$PATH, /usr/local/sbin, /usr/sbin".into() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The version, through RPC.
    pub fn version(&self) -> Result<Version, CriuError> {
        let req = Request { r#type: ReqType::Version as i32, ..Default::default() };
        let resp = self.call(Operation::Version, req, None, &mut RecordingNotify::default(), &[], &[])?;
        let v = resp.version.ok_or_else(|| CriuError::Protocol {
            op: Operation::Version,
            detail: "no version in the answer".into(),
            log: None,
        })?;
        Ok(Version {
            major: v.major_number.max(0) as u32,
            minor: v.minor_number.max(0) as u32,
            sublevel: v.sublevel.unwrap_or(0).max(0) as u32,
        })
    }

    /// Fails with [`CriuError::TooOld`] below [`MIN_VERSION`].
    pub fn require_supported(&self) -> Result<Version, CriuError> {
        let found = self.version()?;
        if found < MIN_VERSION {
            return Err(CriuError::TooOld { found, need: MIN_VERSION, path: self.path.clone() });
        }
        Ok(found)
    }

    /// CRIU's own check of the kernel (`criu check`).
    pub fn check(&self, log: &LogTarget) -> Result<(), CriuError> {
        let (opts, _work_dir) = opts_with_log(log)?;
        let req = Request { r#type: ReqType::Check as i32, opts: Some(opts), ..Default::default() };
        self.call(Operation::Check, req, Some(log), &mut RecordingNotify::default(), &[], &[]).map(drop)
    }

    /// Writes CRIU's description of this CPU (`cpuinfo.img`) into `images_dir`, so a restore
    /// elsewhere can be checked against it.
    pub fn cpuinfo_dump(&self, images_dir: &Path, log: &LogTarget) -> Result<(), CriuError> {
        let images = open_dir("images directory", images_dir)?;
        let (mut opts, _work_dir) = opts_with_log(log)?;
        opts.images_dir_fd = images.as_raw_fd();
        let req = Request { r#type: ReqType::CpuinfoDump as i32, opts: Some(opts), ..Default::default() };
        self.call(Operation::CpuinfoDump, req, Some(log), &mut RecordingNotify::default(), &[], &[]).map(drop)
    }

    /// Checks this CPU against the `cpuinfo.img` in `images_dir` (another host's): an error
    /// (its log says which feature) means a tree dumped there cannot run here.
    pub fn cpuinfo_check(&self, images_dir: &Path, log: &LogTarget) -> Result<(), CriuError> {
        let images = open_dir("images directory", images_dir)?;
        let (mut opts, _work_dir) = opts_with_log(log)?;
        opts.images_dir_fd = images.as_raw_fd();
        let req = Request { r#type: ReqType::CpuinfoCheck as i32, opts: Some(opts), ..Default::default() };
        self.call(Operation::CpuinfoCheck, req, Some(log), &mut RecordingNotify::default(), &[], &[])
            .map(drop)
    }

    /// Which optional features this CRIU and kernel support.
    pub fn features(&self) -> Result<FeatureSet, CriuError> {
        let ask = rpc::Features { mem_track: Some(true), lazy_pages: Some(true), pidfd_store: Some(true) };
        let req = Request { r#type: ReqType::FeatureCheck as i32, features: Some(ask), ..Default::default() };
        let resp =
            self.call(Operation::FeatureCheck, req, None, &mut RecordingNotify::default(), &[], &[])?;
        let f = resp.features.unwrap_or_default();
        Ok(FeatureSet {
            mem_track: f.mem_track.unwrap_or(false),
            lazy_pages: f.lazy_pages.unwrap_or(false),
            pidfd_store: f.pidfd_store.unwrap_or(false),
        })
    }

    /// Dumps the tree described by `opts`.
    pub fn dump(&self, opts: &DumpOptions, notify: &mut dyn NotifyHandler) -> Result<DumpOutcome, CriuError> {
        let images = open_dir("images directory", &opts.images_dir)?;
        let (mut o, _work_dir) = opts_with_log(&opts.shared.log)?;
        o.images_dir_fd = images.as_raw_fd();
        o.pid = Some(opts.pid);
        o.leave_running = Some(opts.leave_running);
        if let Some(port) = opts.lazy_pages {
            o.lazy_pages = Some(true);
            o.ps = Some(rpc::PageServerInfo { port: Some(i32::from(port)), ..Default::default() });
        }
        apply_shared(&mut o, &opts.shared);
        if let Some(c) = &opts.container {
            apply_container(&mut o, c);
        }
        o.notify_scripts = Some(true);
        let req = Request { r#type: ReqType::Dump as i32, opts: Some(o), ..Default::default() };
        let mut recorder = Forwarding { inner: notify, events: Vec::new() };
        let env: &[(&str, &str)] =
            if opts.lazy_pages.is_some() && opts.lazy_undrained { &[(LAZY_UNDRAINED, "1")] } else { &[] };
        let cwd_locks = CwdLocks::take(opts.pid);
        self.call(Operation::Dump, req, Some(&opts.shared.log), &mut recorder, &[], env)?;
        drop(cwd_locks);
        drop(images);
        Ok(DumpOutcome { events: recorder.events })
    }

    /// Restores the tree in `opts.images_dir`.
    pub fn restore(
        &self,
        opts: &RestoreOptions,
        notify: &mut dyn NotifyHandler,
    ) -> Result<RestoreOutcome, CriuError> {
        let images = open_dir("images directory", &opts.images_dir)?;
        let (mut o, _work_dir) = opts_with_log(&opts.shared.log)?;
        o.images_dir_fd = images.as_raw_fd();
        apply_shared(&mut o, &opts.shared);
        o.rst_sibling = Some(opts.restore_sibling);
        o.notify_scripts = Some(true);
        if opts.lazy_pages {
            o.lazy_pages = Some(true);
        }
        if opts.tcp_close {
            o.tcp_close = Some(true);
        }
        o.inherit_fd = opts
            .inherit_fds
            .iter()
            .map(|(key, fd)| rpc::InheritFd { key: key.clone(), fd: fd.as_raw_fd() })
            .collect();
        let fds: Vec<BorrowedFd<'_>> = opts.inherit_fds.iter().map(|(_, fd)| fd.as_fd()).collect();
        let req = Request { r#type: ReqType::Restore as i32, opts: Some(o), ..Default::default() };
        let resp = self.call(Operation::Restore, req, Some(&opts.shared.log), notify, &fds, &[])?;
        drop(images);
        let pid = resp.restore.map(|r| r.pid).ok_or_else(|| CriuError::Protocol {
            op: Operation::Restore,
            detail: "restore succeeded but CRIU sent no PID".into(),
            log: Some(opts.shared.log.path()),
        })?;
        Ok(RestoreOutcome { pid })
    }

    /// One request/response exchange with a fresh `criu swrk`, answering notifications;
    /// `env` is added to CRIU's environment.
    fn call(
        &self,
        op: Operation,
        req: Request,
        log: Option<&LogTarget>,
        notify: &mut dyn NotifyHandler,
        pass_fds: &[BorrowedFd<'_>],
        env: &[(&str, &str)],
    ) -> Result<Response, CriuError> {
        let (ours, theirs) = SeqPacket::pair().map_err(|e| spawn_err(&self.path, e))?;
        let mut cmd = Command::new(&self.path);
        cmd.arg("swrk").arg(theirs.as_fd().as_raw_fd().to_string());
        // Only where a caller asks for it, never inherited.
        cmd.env_remove(LAZY_UNDRAINED);
        cmd.envs(env.iter().copied());
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr_target(log));
        ferry_sys::inherit_fd_in_child(&mut cmd, theirs.as_fd());
        for fd in pass_fds {
            ferry_sys::inherit_fd_in_child(&mut cmd, *fd);
        }
        tracing::debug!(criu = %self.path.display(), %op, "starting criu swrk");
        let mut child = cmd.spawn().map_err(|e| spawn_err(&self.path, e))?;
        drop(theirs);

        let watchdog = Watchdog::arm(child.id() as i32, self.timeout);
        let result = exchange(&ours, op, &req, notify, log);
        drop(ours);
        let status = child.wait();
        let timed_out = watchdog.disarm();
        tracing::debug!(?status, %op, "criu swrk exited");
        if timed_out {
            return Err(CriuError::TimedOut { op, after: self.timeout, log: log.map(LogTarget::path) });
        }
        let resp = result?;
        if resp.success {
            return Ok(resp);
        }
        Err(failure(op, log, resp.cr_errno, resp.cr_errmsg))
    }
}

/// Kills a CRIU process that outlives its deadline.
struct Watchdog {
    cancel: mpsc::Sender<()>,
    fired: thread::JoinHandle<bool>,
}

impl Watchdog {
    fn arm(pid: i32, timeout: Duration) -> Watchdog {
        let (cancel, cancelled) = mpsc::channel::<()>();
        let fired = thread::spawn(move || match cancelled.recv_timeout(timeout) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(pid, ?timeout, "CRIU did not finish in time: killing it");
                let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
                true
            }
            _ => false,
        });
        Watchdog { cancel, fired }
    }

    /// Stops the watchdog; true if it had already killed CRIU.
    fn disarm(self) -> bool {
        let _ = self.cancel.send(());
        self.fired.join().unwrap_or(false)
    }
}

/// Forwards notifications and keeps their order, for the dump outcome.
struct Forwarding<'a> {
    inner: &'a mut dyn NotifyHandler,
    events: Vec<Notify>,
}

impl NotifyHandler for Forwarding<'_> {
    fn notify(&mut self, event: &Notify, pid: Option<i32>) -> Result<(), String> {
        self.events.push(event.clone());
        self.inner.notify(event, pid)
    }
}

fn exchange(
    sock: &SeqPacket,
    op: Operation,
    req: &Request,
    notify: &mut dyn NotifyHandler,
    log: Option<&LogTarget>,
) -> Result<Response, CriuError> {
    let proto = |detail: String| CriuError::Protocol { op, detail, log: log.map(LogTarget::path) };
    sock.send(&req.encode_to_vec()).map_err(|e| proto(format!("send: {e}")))?;
    loop {
        let packet = match sock.recv(MAX_RESPONSE).map_err(|e| proto(format!("receive: {e}")))? {
            Some(p) => p,
            // CRIU died without answering: its log is the only account of why.
            None => return Err(failure(op, log, None, Some("CRIU exited without answering".into()))),
        };
        let resp = Response::decode(packet.as_slice()).map_err(|e| proto(format!("bad answer: {e}")))?;
        if resp.r#type() != ReqType::Notify {
            return Ok(resp);
        }
        let msg = resp.notify.unwrap_or_default();
        let event = Notify::from_script(msg.script.as_deref().unwrap_or(""));
        let answer = notify.notify(&event, msg.pid);
        if let Err(why) = &answer {
            tracing::debug!(?event, %why, "notify handler refused; CRIU will abort");
        }
        let reply = Request {
            r#type: ReqType::Notify as i32,
            notify_success: Some(answer.is_ok()),
            ..Default::default()
        };
        sock.send(&reply.encode_to_vec()).map_err(|e| proto(format!("send notify answer: {e}")))?;
    }
}

fn failure(op: Operation, log: Option<&LogTarget>, errno: Option<i32>, errmsg: Option<String>) -> CriuError {
    let Some(log) = log else {
        return CriuError::Protocol {
            op,
            detail: errmsg.unwrap_or_else(|| format!("CRIU refused (errno {})", errno.unwrap_or(0))),
            log: None,
        };
    };
    let path = log.path();
    let mut text = read_tail(&path);
    text.push_str(&read_tail(&stderr_path(log)));
    let cause = if text.trim().is_empty() {
        Cause::Unknown { first_error: errmsg.clone() }
    } else {
        classify_log(&text)
    };
    tracing::debug!(?cause, log = %path.display(), "classified CRIU failure");
    CriuError::Failed { op, cause, log: path, errno: errno.filter(|e| *e != 0), detail: errmsg }
}

/// The last `MAX_LOG_READ` bytes of a file, lossily decoded; empty if it cannot be read.
fn read_tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_LOG_READ {
        let _ = f.seek(SeekFrom::Start(len - MAX_LOG_READ));
    }
    let mut buf = Vec::new();
    let _ = f.take(MAX_LOG_READ).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn stderr_path(log: &LogTarget) -> PathBuf {
    log.dir.join(format!("{}.stderr", log.file_name))
}

/// CRIU's stderr goes beside its log: it holds what CRIU says before the log is open.
fn stderr_target(log: Option<&LogTarget>) -> Stdio {
    log.and_then(|l| OpenOptions::new().create(true).append(true).open(stderr_path(l)).ok())
        .map(Stdio::from)
        .unwrap_or_else(Stdio::null)
}

/// Options naming the log; the returned directory must stay open until CRIU has answered,
/// because CRIU opens it through /proc/<our pid>/fd.
fn opts_with_log(log: &LogTarget) -> Result<(rpc::Opts, File), CriuError> {
    fs::create_dir_all(&log.dir).map_err(|source| CriuError::Open {
        what: "log directory",
        path: log.dir.clone(),
        source,
    })?;
    let work = open_dir("log directory", &log.dir)?;
    let opts = rpc::Opts {
        images_dir_fd: -1,
        work_dir_fd: Some(work.as_raw_fd()),
        log_file: Some(log.file_name.clone()),
        log_level: Some(log.level as i32),
        ..Default::default()
    };
    Ok((opts, work))
}

fn apply_shared(o: &mut rpc::Opts, s: &Shared) {
    o.tcp_established = Some(s.tcp_established);
    o.shell_job = Some(s.shell_job);
    o.ext_unix_sk = Some(s.ext_unix_sk);
    o.file_locks = Some(s.file_locks);
    o.external = s.external.clone();
    o.network_lock = Some(lock_method(s.network_lock) as i32);
}

fn apply_container(o: &mut rpc::Opts, c: &ContainerDump) {
    o.root = Some(c.root.to_string_lossy().into_owned());
    o.manage_cgroups = Some(true);
    o.orphan_pts_master = Some(true);
    o.freeze_cgroup = c.freeze_cgroup.as_ref().map(|p| p.to_string_lossy().into_owned());
    o.ext_mnt = c
        .ext_mounts
        .iter()
        .map(|(key, val)| rpc::ExtMountMap { key: key.clone(), val: val.clone() })
        .collect();
}

fn lock_method(lock: NetworkLock) -> rpc::NetworkLockMethod {
    match lock {
        NetworkLock::Nftables => rpc::NetworkLockMethod::Nftables,
        NetworkLock::Iptables => rpc::NetworkLockMethod::Iptables,
        NetworkLock::Skip => rpc::NetworkLockMethod::Skip,
    }
}

fn open_dir(what: &'static str, path: &Path) -> Result<File, CriuError> {
    File::open(path).map_err(|source| CriuError::Open { what, path: path.to_path_buf(), source })
}

fn spawn_err(path: &Path, source: std::io::Error) -> CriuError {
    CriuError::Spawn { path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    /// Plays CRIU's side of one exchange: reads the request, sends `notifies` one by one
    /// (checking each answer), then the final response.
    fn fake_criu(
        sock: SeqPacket,
        notifies: Vec<&'static str>,
        final_ok: bool,
    ) -> thread::JoinHandle<Vec<bool>> {
        thread::spawn(move || {
            let req = sock.recv(MAX_RESPONSE).expect("recv").expect("request");
            let req = Request::decode(req.as_slice()).expect("decode request");
            assert_eq!(req.r#type(), ReqType::Dump);
            let mut answers = Vec::new();
            for script in notifies {
                let n = Response {
                    r#type: ReqType::Notify as i32,
                    success: true,
                    notify: Some(rpc::NotifyMsg { script: Some(script.into()), pid: Some(7) }),
                    ..Default::default()
                };
                sock.send(&n.encode_to_vec()).expect("send notify");
                let a = sock.recv(MAX_RESPONSE).expect("recv").expect("answer");
                let a = Request::decode(a.as_slice()).expect("decode answer");
                assert_eq!(a.r#type(), ReqType::Notify);
                answers.push(a.notify_success.unwrap_or(false));
            }
            let done = Response { r#type: ReqType::Dump as i32, success: final_ok, ..Default::default() };
            sock.send(&done.encode_to_vec()).expect("send final");
            answers
        })
    }

    struct RefuseUnlock(Vec<Notify>);

    impl NotifyHandler for RefuseUnlock {
        fn notify(&mut self, event: &Notify, _pid: Option<i32>) -> Result<(), String> {
            self.0.push(event.clone());
            if *event == Notify::NetworkUnlock {
                Err("not now".into())
            } else {
                Ok(())
            }
        }
    }

    fn dump_request() -> Request {
        Request { r#type: ReqType::Dump as i32, opts: Some(rpc::Opts::default()), ..Default::default() }
    }

    #[test]
    fn notifications_are_answered_in_order() {
        let (ours, theirs) = SeqPacket::pair().expect("pair");
        let peer = fake_criu(theirs, vec!["pre-dump", "network-lock", "network-unlock", "post-dump"], true);
        let mut handler = RefuseUnlock(Vec::new());
        let resp = exchange(&ours, Operation::Dump, &dump_request(), &mut handler, None).expect("exchange");
        assert!(resp.success);
        assert_eq!(
            handler.0,
            vec![Notify::PreDump, Notify::NetworkLock, Notify::NetworkUnlock, Notify::PostDump]
        );
        assert_eq!(peer.join().expect("peer"), vec![true, true, false, true]);
    }

    #[test]
    fn criu_dying_mid_call_is_classified_from_its_log() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = LogTarget::new(tmp.path(), "dump.log");
        fs::write(
            log.path(),
            "(00.1) Error (criu/sk-inet.c:1): inet: Connected TCP socket, consider using --tcp-established option.\n",
        )
        .expect("write log");
        let (ours, theirs) = SeqPacket::pair().expect("pair");
        drop(theirs);
        let err =
            exchange(&ours, Operation::Dump, &dump_request(), &mut RecordingNotify::default(), Some(&log))
                .expect_err("peer gone");
        match err {
            CriuError::Failed { log: path, .. } => assert_eq!(path, log.path()),
            CriuError::Protocol { .. } => {} // send may fail first on a closed peer
            other => panic!("unexpected error: {other}"),
        }
    }

    #[test]
    fn garbage_answers_are_protocol_errors() {
        let (ours, theirs) = SeqPacket::pair().expect("pair");
        let peer = thread::spawn(move || {
            let _ = theirs.recv(MAX_RESPONSE);
            theirs.send(b"\xff\xff\xff\xff").expect("send garbage");
        });
        let err = exchange(&ours, Operation::Dump, &dump_request(), &mut RecordingNotify::default(), None)
            .expect_err("garbage");
        assert!(matches!(err, CriuError::Protocol { .. }), "{err}");
        peer.join().expect("peer");
    }

    #[test]
    fn only_a_lazy_dump_served_elsewhere_asks_criu_to_leave_lazy_pages_undrained() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let seen = tmp.path().join("env");
        let fake = tmp.path().join("criu");
        let script = format!("#!/bin/sh\necho \"lazy=${{{LAZY_UNDRAINED}:-unset}}\" >> {}\n", seen.display());
        fs::write(&fake, script).expect("write fake");
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).expect("chmod");
        let criu = Criu::at(&fake);
        let images = tmp.path().join("images");
        fs::create_dir(&images).expect("images dir");
        let log = LogTarget::new(tmp.path(), "dump.log");
        for (port, undrained) in [(Some(7000), true), (Some(7000), false), (None, true)] {
            let opts =
                DumpOptions::new(1, &images, log.clone()).lazy_pages(port).lazy_pages_undrained(undrained);
            // The fake answers nothing: the call fails, after CRIU saw its environment.
            assert!(criu.dump(&opts, &mut RecordingNotify::default()).is_err());
        }
        let lines = fs::read_to_string(&seen).expect("env seen");
        assert_eq!(lines.lines().collect::<Vec<_>>(), vec!["lazy=1", "lazy=unset", "lazy=unset"]);
    }

    #[test]
    fn a_hung_criu_is_killed_at_the_deadline() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let fake = tmp.path().join("criu");
        fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").expect("write fake");
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).expect("chmod");
        let criu = Criu::at(&fake).with_timeout(Duration::from_millis(200));
        let err = criu.version().expect_err("must time out");
        assert!(matches!(err, CriuError::TimedOut { op: Operation::Version, .. }), "{err}");
    }

    #[test]
    fn missing_binary_is_not_found() {
        let err = Criu::locate(Some(Path::new("/nonexistent/criu"))).expect_err("missing");
        assert!(matches!(err, CriuError::NotFound { .. }));
        assert!(err.hint().unwrap_or_default().contains("scripts/setup"));
    }
}
