//! The sample workloads (Python scripts in `workloads/`) and the handle that owns them.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use ferry_sys::{kill, Signal};
use tempfile::TempDir;

use crate::poll::{poll, try_poll, WAIT};
use crate::procs::{children, ProcId};

/// The interpreter of the workloads: the system's, whose binary stays at one path, since CRIU
/// restores the executable by path.
pub const PYTHON: &str = "/usr/bin/python3";

/// How long a stopped workload is given to vanish on drop.
const REAP_WAIT: Duration = Duration::from_secs(10);

/// A sample workload. Each reports into its directory, in files named `<what>.<host pid>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// Counts every ~50 ms into `counter.<pid>`; exits with code N once `exit.<pid>` holds N.
    Counter,
    /// Holds `mib` MiB of random bytes; SIGUSR1 writes their sha256 to `hash.<pid>`; SIGUSR2
    /// rewrites a share of its pages (see [`Workload::rewrite_pages`]).
    MemHog { mib: u32 },
    /// A [`Sample::MemHog`] with `threads` more threads, each waking every 10 ms on its own
    /// stack (a restore that got one wrong kills the process).
    ThreadedMemHog { mib: u32, threads: u8 },
    /// A privately mapped file with some pages rewritten, shared anonymous memory, and small
    /// anonymous mappings interleaved with small file mappings; SIGUSR1 writes the sha256 of
    /// all of it to `hash.<pid>` (as a memhog does).
    Mappings,
    /// Holds a unique random marker (64 hex digits) in memory many times over, and 256 KiB of
    /// random bytes; writes them to `marker.<pid>` and `blob.<pid>`; SIGUSR1 writes
    /// `report.<pid>` (JSON: the marker, whether it and the blob are intact).
    Marker,
    /// An open file at a known offset, a child behind two pipes, a listener on `port`;
    /// SIGUSR1 writes `report.<pid>` (JSON).
    Resources { port: u16 },
    /// TCP echo server on `port` keeping its connections; SIGUSR1 writes `report.<pid>`.
    TcpEcho { port: u16 },
    /// A C program (`workloads/guarded.c`) holding `mib` MiB of pseudo-random bytes in a private
    /// anonymous mapping with guard regions (`MADV_GUARD_INSTALL`, kernel 6.13+) at its first page
    /// and in its middle, and `threads` more threads on 8 MiB stacks of their own whose lowest page
    /// is a guard region (as glibc 2.42 and later make thread stacks). SIGUSR1 writes `hash.<pid>`:
    /// `fnv64:HASH guards:PRESENT/INSTALLED` (see [`Workload::request_hash`]). Where the kernel
    /// has no guard regions it exits at once, having written `unsupported.<pid>`.
    Guarded { mib: u32, threads: u8 },
    /// Holds one thing `ferry check` judges (`workloads/hazard.py` lists them: `io_uring`,
    /// `perf_event`, `unix_external`, `deleted_cwd`, `flock`, `tcp_self`...), then counts
    /// like [`Sample::Counter`]. Where the kernel refuses the hazard it exits at once, having
    /// written `unsupported.<pid>`.
    Hazard(&'static str),
}

impl Sample {
    /// The program and its arguments before the report directory: Python and the script, or a
    /// C workload's binary (built by the kit's build script).
    fn program(self) -> (PathBuf, Vec<String>) {
        match self {
            Sample::Guarded { .. } => (PathBuf::from(env!("FERRY_TESTKIT_GUARDED")), vec![]),
            _ => {
                (PathBuf::from(PYTHON), vec!["-B".into(), self.script_path().to_string_lossy().into_owned()])
            }
        }
    }

    fn script(self) -> &'static str {
        match self {
            Sample::Guarded { .. } => "guarded.c",
            Sample::Counter => "counter.py",
            Sample::MemHog { .. } | Sample::ThreadedMemHog { .. } => "memhog.py",
            Sample::Mappings => "mappings.py",
            Sample::Resources { .. } => "resources.py",
            Sample::TcpEcho { .. } => "tcp_echo.py",
            Sample::Marker => "marker.py",
            Sample::Hazard(_) => "hazard.py",
        }
    }

    fn args(self) -> Vec<String> {
        match self {
            Sample::Counter | Sample::Marker | Sample::Mappings => vec![],
            Sample::MemHog { mib } => vec![mib.to_string()],
            Sample::ThreadedMemHog { mib, threads } => vec![mib.to_string(), threads.to_string()],
            Sample::Resources { port } | Sample::TcpEcho { port } => vec![port.to_string()],
            Sample::Guarded { mib, threads } => vec![mib.to_string(), threads.to_string()],
            Sample::Hazard(kind) => vec![kind.to_owned()],
        }
    }

    /// The whole command line that starts the workload reporting into `dir` (for launchers
    /// other than [`Workload::start`], such as a lab node's).
    pub fn command(self, dir: &Path) -> Vec<String> {
        let (program, mut argv) = self.program();
        argv.insert(0, program.to_string_lossy().into_owned());
        argv.push(dir.to_string_lossy().into_owned());
        argv.extend(self.args());
        argv
    }

    /// Path of the workload's script (a C workload: its source) in this crate's source tree.
    pub fn script_path(self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads").join(self.script())
    }
}

/// Where the workload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// As PID 1 of a new pid namespace (`unshare --pid --fork`), so that restored copies do not
    /// collide with the original's pid. The net and mount namespaces stay the host's.
    PidNamespace,
    /// As PID 1 of a new pid namespace in a new network namespace (`unshare --pid --net
    /// --fork`), as the lab starts workloads: the launcher waiting for it is outside the tree
    /// but in its network namespace.
    PidAndNetNamespace,
    /// Plainly in the host's pid namespace: a restore needs the original's pid free.
    Host,
}

/// A running sample workload. The tree root is the Python process; `pid()` is its host pid.
///
/// Dropping it SIGKILLs the workload, its launcher, every pid registered with [`adopt`]
/// (restored copies) and all their descendants, reaps what it can and waits briefly for the
/// rest to vanish.
///
/// [`adopt`]: Workload::adopt
#[derive(Debug)]
pub struct Workload {
    sample: Sample,
    root: ProcId,
    launcher: Child,
    extras: Mutex<Vec<ProcId>>,
    // Dropped after `Drop::drop` killed everything: the workloads hold files in it.
    dir: TempDir,
}

impl Workload {
    /// Starts `sample` and waits until it reports ready.
    pub fn start(sample: Sample, isolation: Isolation) -> io::Result<Workload> {
        let dir = tempfile::Builder::new().prefix("ferry-workload-").tempdir()?;
        let mut cmd = match isolation {
            // No --kill-child: it sets PR_SET_PDEATHSIG on the workload, which CRIU restores,
            // so a restored copy would be killed as soon as CRIU exits.
            Isolation::PidNamespace => {
                let mut c = Command::new("unshare");
                c.args(["--pid", "--fork", "setsid"]);
                c
            }
            Isolation::PidAndNetNamespace => {
                let mut c = Command::new("unshare");
                c.args(["--pid", "--net", "--fork", "setsid"]);
                c
            }
            Isolation::Host => Command::new("setsid"),
        };
        // setsid: CRIU cannot dump a task whose session leader lies outside the dumped tree.
        // The launched process is no group leader, so setsid execs in place without forking.
        let (program, before) = sample.program();
        cmd.arg(program).args(before).arg(dir.path()).args(sample.args());
        // Nothing but /dev/null: CRIU cannot restore pipes or terminals it did not dump.
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // A working directory of its own: dumping a task of a child pid namespace that sees the
        // host's /proc, CRIU's parasite mounts a proc at "proc.crtools" in the task's cwd, so
        // two tasks dumped at once from one cwd (say "/") fail with EEXIST.
        cmd.current_dir(dir.path());
        let mut launcher = cmd.spawn()?;
        let launcher_pid = launcher.id() as i32;
        let root_pid = match isolation {
            Isolation::Host => Some(launcher_pid),
            Isolation::PidNamespace | Isolation::PidAndNetNamespace => {
                try_poll(WAIT, || children(launcher_pid).first().copied())
            }
        };
        let Some(root_pid) = root_pid else {
            let _ = launcher.kill();
            let _ = launcher.wait();
            return Err(io::Error::other("unshare started no workload process"));
        };
        // Identity recorded now, so that Drop kills exactly this process and never a later
        // holder of its pid; one already gone gets start 0, which no live process has.
        let root = ProcId::of(root_pid).unwrap_or(ProcId { pid: root_pid, start: 0 });
        let workload = Workload { sample, root, launcher, extras: Mutex::new(Vec::new()), dir };
        // Stop waiting early if the workload died (a bad port, a missing interpreter).
        let ready = workload.path("ready", root.pid);
        let _ = try_poll(WAIT, || (ready.exists() || !workload.root.alive()).then_some(()));
        if !ready.exists() {
            return Err(io::Error::other(format!("{sample:?} (pid {}) did not become ready", root.pid)));
        }
        Ok(workload)
    }

    /// Host pid of the tree root (the Python process, or the C workload).
    pub fn pid(&self) -> i32 {
        self.root.pid
    }

    /// The report directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn sample(&self) -> Sample {
        self.sample
    }

    /// Reaps the launcher once it has exited; false if it still runs after [`WAIT`]. An
    /// [`Isolation::Host`] workload is its own launcher: once a checkpoint stopped it, its
    /// zombie would hold the pid its restore needs back.
    pub fn reap_launcher(&mut self) -> bool {
        try_poll(WAIT, || self.launcher.try_wait().ok().flatten()).is_some()
    }

    /// `DIR/<what>.<pid>`: where process `pid` reports `what`.
    pub fn path(&self, what: &str, pid: i32) -> PathBuf {
        self.dir.path().join(format!("{what}.{pid}"))
    }

    /// Registers another process (a restored copy) to be killed with this workload.
    pub fn adopt(&self, pid: i32) {
        if let Some(id) = ProcId::of(pid) {
            self.extras.lock().unwrap_or_else(|e| e.into_inner()).push(id);
        }
    }

    pub fn signal(&self, pid: i32, sig: Signal) -> io::Result<()> {
        kill(pid, sig)
    }

    /// Waits until `DIR/<what>.<pid>` exists and returns its content.
    #[track_caller]
    pub fn wait_file(&self, what: &str, pid: i32, timeout: Duration) -> String {
        let path = self.path(what, pid);
        poll(timeout, &format!("{}", path.display()), || fs::read_to_string(&path).ok())
    }

    /// The counts process `pid` has written so far (counter workload).
    pub fn counts(&self, pid: i32) -> Vec<u64> {
        let text = fs::read_to_string(self.path("counter", pid)).unwrap_or_default();
        // A line still being written has no newline yet: only whole lines count.
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Waits until process `pid` has written at least `n` counts; returns all of them.
    #[track_caller]
    pub fn wait_counts(&self, pid: i32, n: usize) -> Vec<u64> {
        poll(WAIT, &format!("{n} counts from pid {pid}"), || {
            let c = self.counts(pid);
            (c.len() >= n).then_some(c)
        })
    }

    /// Asks the counter copy `pid` to exit with `code`.
    pub fn request_exit(&self, pid: i32, code: i32) -> io::Result<()> {
        let tmp = self.path("exit-tmp", pid);
        fs::write(&tmp, code.to_string())?;
        fs::rename(tmp, self.path("exit", pid))
    }

    /// Sends SIGUSR1 to `pid` and returns the fresh `report.<pid>` it writes, parsed.
    #[track_caller]
    pub fn request_report(&self, pid: i32) -> serde_json::Value {
        let text = self.request("report", pid);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("report of pid {pid} is not JSON ({e}): {text}"))
    }

    /// Sends SIGUSR1 to `pid` (memhog, mappings, guarded) and returns the hash of its memory: the
    /// sha256 in hex, or for [`Sample::Guarded`] its hash line.
    #[track_caller]
    pub fn request_hash(&self, pid: i32) -> String {
        self.request("hash", pid).trim().to_string()
    }

    /// Asks the memhog `pid` to overwrite `percent` % of its buffer's pages (distinct pages,
    /// picked at random) with new random bytes; returns how many pages it rewrote.
    #[track_caller]
    pub fn rewrite_pages(&self, pid: i32, percent: f64) -> u64 {
        let _ = fs::remove_file(self.path("rewritten", pid));
        let request = self.path("rewrite", pid);
        let tmp = self.path("rewrite-tmp", pid);
        fs::write(&tmp, percent.to_string())
            .and_then(|_| fs::rename(&tmp, &request))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", request.display()));
        crate::procs::signal_by_name(pid, "USR2").unwrap_or_else(|e| panic!("SIGUSR2 to {pid}: {e}"));
        let answer = self.wait_file("rewritten", pid, WAIT);
        answer.trim().parse().unwrap_or_else(|e| panic!("rewritten.{pid} is not a count ({e}): {answer}"))
    }

    /// The marker the marker workload `pid` holds, as it wrote it when it started.
    #[track_caller]
    pub fn marker(&self, pid: i32) -> String {
        self.wait_file("marker", pid, WAIT).trim().to_string()
    }

    /// The random blob the marker workload `pid` holds, as it wrote it when it started.
    #[track_caller]
    pub fn blob(&self, pid: i32) -> Vec<u8> {
        self.wait_file("marker", pid, WAIT);
        let path = self.path("blob", pid);
        fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }

    /// Host pids of every live process running this workload's script on its report directory:
    /// the original and every restored copy, whoever restored them.
    pub fn instances(&self) -> Vec<i32> {
        let (program, before) = self.sample.program();
        let dir = self.dir().as_os_str().as_bytes();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found: Vec<i32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                // PROGRAM [-B SCRIPT] DIR ...: the launcher (unshare, setsid) names them too but
                // runs another program.
                args.first() == Some(&program.as_os_str().as_bytes())
                    && before.iter().all(|b| args.contains(&b.as_bytes()))
                    && args.contains(&dir)
                    && ferry_sys::process_exists(*pid)
            })
            .collect();
        found.sort_unstable();
        found
    }

    #[track_caller]
    fn request(&self, what: &str, pid: i32) -> String {
        // An older answer of the same pid must not pass for the fresh one.
        let _ = fs::remove_file(self.path(what, pid));
        kill(pid, Signal::Usr1).unwrap_or_else(|e| panic!("SIGUSR1 to {pid}: {e}"));
        self.wait_file(what, pid, WAIT)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let extras = std::mem::take(&mut *self.extras.lock().unwrap_or_else(|e| e.into_inner()));
        for id in extras.iter().chain([&self.root]) {
            id.kill_tree();
        }
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        // Restored copies are not our children and their reaper may be slow: wait until they are
        // at least dead (zombies count as dead), so no test leaves anything running.
        let gone =
            try_poll(REAP_WAIT, || extras.iter().chain([&self.root]).all(|id| !id.alive()).then_some(()));
        if gone.is_none() {
            eprintln!("ferry-testkit: {:?} still alive {REAP_WAIT:?} after SIGKILL", self.sample);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{fetch_greeting, free_port, require_privileged, LineClient};

    #[test]
    fn counter_in_pid_namespace_counts_and_dies_with_the_handle() {
        if !require_privileged() {
            return;
        }
        let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
        let pid = w.pid();
        // PID 1 of its namespace, yet reporting under its host pid.
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).expect("NSpid line");
        assert_eq!(nspid.split_whitespace().collect::<Vec<_>>(), ["NSpid:", &pid.to_string(), "1"]);
        let counts = w.wait_counts(pid, 3);
        assert_eq!(&counts[..3], &[1, 2, 3]);
        let id = ProcId::of(pid).expect("alive");
        drop(w);
        assert!(!id.alive(), "counter survived its handle");
    }

    #[test]
    fn counter_on_host_exits_on_request() {
        if !require_privileged() {
            return;
        }
        let mut w = Workload::start(Sample::Counter, Isolation::Host).expect("start counter");
        assert_eq!(w.launcher.id() as i32, w.pid(), "setsid must exec in place");
        w.request_exit(w.pid(), 7).expect("request exit");
        let status = w.launcher.wait().expect("wait");
        assert_eq!(status.code(), Some(7));
    }

    #[test]
    fn adopted_processes_are_killed_on_drop() {
        if !require_privileged() {
            return;
        }
        let w = Workload::start(Sample::Counter, Isolation::PidNamespace).expect("start counter");
        let mut other = Command::new("sleep").arg("1000").spawn().expect("spawn sleep");
        w.adopt(other.id() as i32);
        drop(w);
        let status = other.wait().expect("reap sleep");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    }

    #[test]
    fn memhog_hash_is_stable() {
        if !require_privileged() {
            return;
        }
        let w = Workload::start(Sample::MemHog { mib: 4 }, Isolation::PidNamespace).expect("start memhog");
        let first = w.request_hash(w.pid());
        assert_eq!(first.len(), 64, "not a sha256: {first}");
        assert_eq!(w.request_hash(w.pid()), first);
    }

    #[test]
    fn resources_report_their_state() {
        if !require_privileged() {
            return;
        }
        let port = free_port();
        let w = Workload::start(Sample::Resources { port }, Isolation::PidNamespace).expect("start");
        let greeting = fetch_greeting(port).expect("greeting");
        assert_eq!(greeting, format!("hello from {}\n", w.pid()));
        let r = w.request_report(w.pid());
        assert_eq!(r["offset"], r["expected_offset"]);
        assert_eq!(r["content_ok"], true);
        assert_eq!(r["echo_ok"], true, "{r}");
        assert_eq!(r["child_alive"], true);
        assert_eq!(r["port"], port);
        assert_eq!(r["served"], 1);
        // The child is the namespace's second process, a child of the root on the host too.
        let child = r["child_host_pid"].as_i64().expect("child pid") as i32;
        assert_eq!(children(w.pid()), vec![child]);
        // A second report counts its own ping: the pipe carries each round trip once.
        assert_eq!(w.request_report(w.pid())["echo"].as_str().expect("echo"), format!("pong 2 {child}"));
    }

    #[test]
    fn tcp_echo_numbers_lines_per_connection() {
        if !require_privileged() {
            return;
        }
        let port = free_port();
        let w = Workload::start(Sample::TcpEcho { port }, Isolation::PidNamespace).expect("start");
        let mut a = LineClient::connect(port).expect("connect a");
        let mut b = LineClient::connect(port).expect("connect b");
        assert_eq!(a.round_trip("x").expect("a1"), "1 x");
        assert_eq!(a.round_trip("y").expect("a2"), "2 y");
        assert_eq!(b.round_trip("z").expect("b1"), "1 z");
        assert_eq!(w.request_report(w.pid())["connections"], 2);
    }
}
