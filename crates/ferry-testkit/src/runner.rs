//! Runs the `ferry` binary against a private temporary store and checks its answers against
//! the CLI contract: exit codes, one `error:` line first on stderr, never a panic.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;

use crate::clean::{delete_lock_table, mounts_under, present_lock_tables, run_ids};
use crate::poll::{poll, try_poll, WAIT};
use crate::privileged::criu_path;
use crate::store_files::contains_bytes;
use crate::workload::Workload;

/// How long one `ferry` command may take before the test fails (and the command is killed):
/// far above any checkpoint or restore of the sample workloads, so only a hang trips it.
pub const FERRY_TIMEOUT: Duration = Duration::from_secs(300);

/// The user and group ids a "not root" test runs ferry as (nobody, nogroup).
const NOBODY: &str = "65534";

/// A `ferry` binary bound to a fresh store in a temporary directory.
#[derive(Debug)]
pub struct Ferry {
    bin: PathBuf,
    criu: Option<PathBuf>,
    store: TempDir,
    scratch: TempDir,
    /// CRIU lock tables seen held by this store's checkpoints, released on drop if still there.
    lock_tables: Mutex<Vec<String>>,
}

impl Ferry {
    /// `bin` is the binary under test: `env!("CARGO_BIN_EXE_ferry")` in ferry's tests.
    pub fn new(bin: impl Into<PathBuf>) -> Ferry {
        Ferry {
            bin: bin.into(),
            criu: criu_path(),
            store: tempfile::Builder::new().prefix("ferry-store-").tempdir().expect("store tempdir"),
            scratch: tempfile::Builder::new().prefix("ferry-scratch-").tempdir().expect("scratch tempdir"),
            lock_tables: Mutex::new(Vec::new()),
        }
    }

    /// Uses `criu` as ferry's `--criu` instead of the CRIU the kit found.
    pub fn with_criu(mut self, criu: impl Into<PathBuf>) -> Ferry {
        self.criu = Some(criu.into());
        self
    }

    /// Writes a fake CRIU 3.17.1 into the scratch directory and returns its path: it answers
    /// `--version` and the RPC version request, and refuses everything else.
    pub fn fake_old_criu(&self) -> PathBuf {
        let path = self.scratch().join("criu");
        fs::write(&path, include_str!("../fakes/old_criu.py")).expect("write fake criu");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod fake criu");
        path
    }

    /// The store directory passed as `--store`.
    pub fn store(&self) -> &Path {
        self.store.path()
    }

    /// A private directory for the test's own files (pidfiles, fake binaries).
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// The signed manifest of checkpoint `name`: `STORE/manifests/NAME.fmf`.
    pub fn manifest_path(&self, name: &str) -> PathBuf {
        self.store().join("manifests").join(format!("{name}.fmf"))
    }

    /// `STORE/packs`: sealed chunks (`*.pack`) and their indexes (`*.idx`).
    pub fn packs_dir(&self) -> PathBuf {
        self.store().join("packs")
    }

    /// `STORE/slots`: the wrapped data keys of each manifest (`<manifest id>.slots`).
    pub fn slots_dir(&self) -> PathBuf {
        self.store().join("slots")
    }

    /// `STORE/keys`: this node's keys.
    pub fn keys_dir(&self) -> PathBuf {
        self.store().join("keys")
    }

    /// `STORE/tmp`: private tmpfs mounts while a checkpoint or restore runs.
    pub fn tmp_dir(&self) -> PathBuf {
        self.store().join("tmp")
    }

    /// `ferry inspect NAME --json`, which must succeed, parsed.
    #[track_caller]
    pub fn inspect_json(&self, name: &str) -> serde_json::Value {
        let outcome = self.run(&["inspect", name, "--json"]);
        outcome.assert_ok();
        serde_json::from_str(&outcome.stdout)
            .unwrap_or_else(|e| panic!("inspect --json printed no JSON ({e})\n{outcome}"))
    }

    /// The names `ferry list --json` shows, sorted; the listing must succeed.
    #[track_caller]
    pub fn list_names(&self) -> Vec<String> {
        let outcome = self.run(&["list", "--json"]);
        outcome.assert_ok();
        let entries: Vec<serde_json::Value> = serde_json::from_str(&outcome.stdout)
            .unwrap_or_else(|e| panic!("list --json printed no JSON array ({e})\n{outcome}"));
        let mut names: Vec<String> =
            entries.iter().filter_map(|e| e["name"].as_str().map(str::to_string)).collect();
        names.sort();
        names
    }

    /// `ferry --store STORE [--criu CRIU] ARGS...`, stdin from /dev/null. The CRIU path is
    /// passed explicitly so that the tests do not depend on root's PATH.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(&self.bin);
        self.add_args(&mut cmd, args);
        cmd
    }

    fn add_args<S: AsRef<OsStr>>(&self, cmd: &mut Command, args: &[S]) {
        cmd.arg("--store").arg(self.store());
        if let Some(criu) = &self.criu {
            cmd.arg("--criu").arg(criu);
        }
        cmd.args(args).env_remove("FERRY_STORE").env_remove("FERRY_CRIU").stdin(Stdio::null());
    }

    /// Runs ferry with `args` and returns what it did. Panics only if it runs past
    /// [`FERRY_TIMEOUT`].
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> Outcome {
        run_command(self.command(args), FERRY_TIMEOUT)
    }

    /// Runs ferry as user and group nobody, without supplementary groups.
    pub fn run_as_nobody<S: AsRef<OsStr>>(&self, args: &[S]) -> Outcome {
        // Let nobody reach the store, so that "not root" is the only thing it lacks.
        let _ = fs::set_permissions(self.store(), fs::Permissions::from_mode(0o755));
        let mut cmd = Command::new("setpriv");
        let ids = [format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"), "--clear-groups".to_string()];
        cmd.args(ids).arg(&self.bin);
        self.add_args(&mut cmd, args);
        run_command(cmd, FERRY_TIMEOUT)
    }

    /// Starts ferry with `args` in the background; it is killed if still running on drop.
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S]) -> Running {
        Running::spawn(self.command(args))
    }

    /// `ferry checkpoint pid:PID --name NAME EXTRA...`.
    pub fn checkpoint(&self, pid: i32, name: &str, extra: &[&str]) -> Outcome {
        let target = format!("pid:{pid}");
        let mut args = vec!["checkpoint", target.as_str(), "--name", name];
        args.extend_from_slice(extra);
        let outcome = self.run(&args);
        // Noted now, so that drop can release them even after the checkpoint is gone.
        self.criu_lock_tables();
        outcome
    }

    /// `ferry restore NAME --detach --pidfile FILE`; the restored root is handed to `workload`
    /// to be killed with it. Returns the outcome and the restored host pid, if any.
    pub fn restore_detached(&self, name: &str, workload: &Workload) -> (Outcome, Option<i32>) {
        let pidfile = self.fresh_path("restored.pid");
        let outcome = self.run(&[
            OsStr::new("restore"),
            name.as_ref(),
            "--detach".as_ref(),
            "--pidfile".as_ref(),
            pidfile.as_os_str(),
        ]);
        let pid = read_pid(&pidfile);
        if let Some(pid) = pid {
            workload.adopt(pid);
        }
        (outcome, pid)
    }

    /// Like [`restore_detached`](Ferry::restore_detached), but the restore must succeed.
    #[track_caller]
    pub fn restore_ok(&self, name: &str, workload: &Workload) -> i32 {
        let (outcome, pid) = self.restore_detached(name, workload);
        outcome.assert_ok();
        pid.unwrap_or_else(|| panic!("restore succeeded but wrote no pid to its pidfile\n{outcome}"))
    }

    /// A path in the scratch directory no earlier call returned.
    pub fn fresh_path(&self, stem: &str) -> PathBuf {
        (0..).map(|i| self.scratch().join(format!("{i}.{stem}"))).find(|p| !p.exists()).expect("a free name")
    }
}

impl Drop for Ferry {
    /// Removes every checkpoint through `ferry rm`, which also releases the network lock
    /// (nftables table) a stopping checkpoint holds until its restore; a test never leaves one
    /// behind. A failing test keeps its store, whose `logs/` holds the CRIU logs its errors name.
    fn drop(&mut self) {
        self.remove_all_checkpoints();
        // A test that failed half way may leave a checkpoint's tmpfs mounted (ferry sweeps
        // those of dead processes when it opens the store, which `list` above did): detach what
        // is left, or the store directory could not be removed. Tests that care assert it.
        for mount in mounts_under(self.store()).into_iter().rev() {
            eprintln!("ferry-testkit: unmounting {} left in the store", mount.display());
            let _ = Command::new("umount").arg("-l").arg(&mount).stdin(Stdio::null()).status();
        }
        if !std::thread::panicking() {
            return;
        }
        if let Ok(empty) = tempfile::tempdir() {
            let kept = std::mem::replace(&mut self.store, empty).keep();
            eprintln!("ferry-testkit: kept the store of the failed test at {}", kept.display());
        }
    }
}

impl Ferry {
    /// The nftables tables of CRIU's network lock that this store's dumps hold now: the present
    /// CRIU-* tables whose names a manifest records (the secure store keeps them there, as plain
    /// strings of its encoding, so that `ferry rm` can release them), or whose run id a CRIU log
    /// of the store names (a dump whose checkpoint was never committed). Read from the raw files,
    /// so a manifest a test has damaged still counts.
    pub fn criu_lock_tables(&self) -> Vec<String> {
        let read_all = |dir: &str| -> Vec<Vec<u8>> {
            fs::read_dir(self.store().join(dir))
                .map(|d| d.flatten().filter_map(|e| fs::read(e.path()).ok()).collect())
                .unwrap_or_default()
        };
        let manifests = read_all("manifests");
        let runs: Vec<String> = read_all("logs").iter().flat_map(|l| run_ids(l)).collect();
        let tables: Vec<String> = present_lock_tables()
            .into_iter()
            .filter(|t| {
                let id = &t["CRIU-".len()..];
                manifests.iter().any(|m| contains_bytes(m, t.as_bytes()))
                    || (id.len() >= 8 && runs.iter().any(|run| run.starts_with(id)))
            })
            .collect();
        let mut seen = self.lock_tables.lock().unwrap_or_else(|e| e.into_inner());
        for t in &tables {
            if !seen.contains(t) {
                seen.push(t.clone());
            }
        }
        tables
    }

    /// Best effort and never panicking: it runs in `drop`, perhaps during a panic.
    fn remove_all_checkpoints(&self) {
        let quietly = |args: &[&str]| {
            let mut running = Running::try_spawn(self.command(args)).ok()?;
            try_poll(FERRY_TIMEOUT, || running.try_finish())
        };
        self.criu_lock_tables();
        let listed = quietly(&["list", "--json"]).and_then(|l| serde_json::from_str(&l.stdout).ok());
        if let Some(serde_json::Value::Array(entries)) = listed {
            let mut args = vec!["rm"];
            args.extend(entries.iter().filter_map(|e| e["name"].as_str()));
            if args.len() > 1 {
                quietly(&args);
            }
        }
        // What `ferry rm` should have released but did not; a test that cares asserts it.
        let present = present_lock_tables();
        let seen = self.lock_tables.lock().unwrap_or_else(|e| e.into_inner());
        for table in seen.iter().filter(|t| present.contains(t)) {
            eprintln!("ferry-testkit: removing CRIU lock table {table} that `ferry rm` left");
            delete_lock_table(table);
        }
    }
}

/// A pid from a pidfile (whitespace around it allowed).
pub fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// What one command did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub command: String,
    /// The exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    fn new(command: String, status: ExitStatus, stdout: String, stderr: String) -> Outcome {
        Outcome { command, code: status.code(), signal: status.signal(), stdout, stderr }
    }

    /// Panics unless the command exited 0 without a panic.
    #[track_caller]
    pub fn assert_ok(&self) -> &Outcome {
        self.assert_no_panic();
        assert_eq!(self.code, Some(0), "expected success\n{self}");
        self
    }

    /// Panics unless the command failed with exit code `code` the way the contract says.
    #[track_caller]
    pub fn assert_error(&self, code: i32) -> &Outcome {
        self.assert_error_in(&[code])
    }

    /// Panics unless the command failed with one of `codes`, stderr's first line is its one
    /// `error: ` line, and nothing panicked.
    #[track_caller]
    pub fn assert_error_in(&self, codes: &[i32]) -> &Outcome {
        self.assert_no_panic();
        assert!(self.code.is_some_and(|c| codes.contains(&c)), "expected exit code in {codes:?}\n{self}");
        let first = self.stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error: ") && first.len() > "error: ".len(),
            "stderr must start with an `error: ` line\n{self}"
        );
        let errors = self.stderr.lines().filter(|l| l.starts_with("error:")).count();
        assert_eq!(errors, 1, "expected exactly one `error:` line\n{self}");
        // The detail lines the contract names are indented and say something.
        for line in self.stderr.lines().skip(1) {
            let trimmed = line.trim_start();
            let Some(key) = ["cause:", "hint:", "log:"].into_iter().find(|k| trimmed.starts_with(k)) else {
                continue;
            };
            assert!(line.starts_with(' '), "`{key}` lines are indented\n{self}");
            assert!(!trimmed[key.len()..].trim().is_empty(), "an empty `{key}` line\n{self}");
        }
        self
    }

    /// Panics unless stderr contains `needle` (ASCII case ignored).
    #[track_caller]
    pub fn assert_stderr_mentions(&self, needle: &str) -> &Outcome {
        assert!(self.stderr_mentions(needle), "stderr should mention {needle:?}\n{self}");
        self
    }

    pub fn stderr_mentions(&self, needle: &str) -> bool {
        self.stderr.to_ascii_lowercase().contains(&needle.to_ascii_lowercase())
    }

    /// True if a line of stderr other than `log:` holds `n` as a whole number (not as digits
    /// inside a longer one, like a timestamp in a log file name).
    pub fn stderr_mentions_number(&self, n: i64) -> bool {
        let n = n.to_string();
        self.stderr
            .lines()
            .filter(|l| !l.trim_start().starts_with("log:"))
            .any(|l| l.split(|c: char| !c.is_ascii_digit()).any(|w| w == n))
    }

    /// The path a `log: PATH` line names, if any.
    pub fn log_path(&self) -> Option<PathBuf> {
        self.stderr.lines().find_map(|l| l.trim().strip_prefix("log: ")).map(|p| PathBuf::from(p.trim()))
    }

    #[track_caller]
    fn assert_no_panic(&self) {
        assert!(!self.stderr.contains("panicked at"), "ferry panicked\n{self}");
        assert!(self.signal.is_none(), "ferry was killed by a signal\n{self}");
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "command: {}", self.command)?;
        writeln!(f, "exit: {:?} (signal {:?})", self.code, self.signal)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

/// A command running in the background, killed and reaped on drop if still running.
#[derive(Debug)]
pub struct Running {
    command: String,
    child: Child,
    stdout: File,
    stderr: File,
}

impl Running {
    fn spawn(cmd: Command) -> Running {
        let command = describe(&cmd);
        Running::try_spawn(cmd).unwrap_or_else(|e| panic!("cannot start {command}: {e}"))
    }

    fn try_spawn(mut cmd: Command) -> std::io::Result<Running> {
        let command = describe(&cmd);
        // Files, not pipes: a grandchild holding a pipe open could stall a reader forever.
        let stdout = tempfile::tempfile()?;
        let stderr = tempfile::tempfile()?;
        cmd.stdout(stdout.try_clone()?).stderr(stderr.try_clone()?);
        let child = cmd.spawn()?;
        Ok(Running { command, child, stdout, stderr })
    }

    /// Starts `cmd` in the background, as [`Ferry::spawn`] does with ferry's arguments.
    pub fn start(cmd: Command) -> Running {
        Running::spawn(cmd)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// What the command wrote to stderr so far.
    pub fn stderr_so_far(&mut self) -> String {
        read_all(&mut self.stderr)
    }

    /// The outcome once the command has ended, if it has.
    pub fn try_finish(&mut self) -> Option<Outcome> {
        let status = self.child.try_wait().expect("try_wait")?;
        Some(Outcome::new(
            self.command.clone(),
            status,
            read_all(&mut self.stdout),
            read_all(&mut self.stderr),
        ))
    }

    /// Waits up to `timeout` for the command to end; panics (killing it) after that.
    #[track_caller]
    pub fn finish(mut self, timeout: Duration) -> Outcome {
        if let Some(outcome) = try_poll(timeout, || self.try_finish()) {
            return outcome;
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait");
        let so_far = Outcome::new(
            self.command.clone(),
            status,
            read_all(&mut self.stdout),
            read_all(&mut self.stderr),
        );
        panic!("command still running after {timeout:?}, killed\n{so_far}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run_command(cmd: Command, timeout: Duration) -> Outcome {
    Running::spawn(cmd).finish(timeout)
}

fn read_all(file: &mut File) -> String {
    let mut bytes = Vec::new();
    let _ = file.seek(SeekFrom::Start(0)).and_then(|_| file.read_to_end(&mut bytes));
    String::from_utf8_lossy(&bytes).into_owned()
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits (up to [`WAIT`]) for a pidfile to name a pid.
#[track_caller]
pub fn wait_pidfile(path: &Path) -> i32 {
    poll(WAIT, &format!("pid in {}", path.display()), || read_pid(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(code: i32, stderr: &str) -> Outcome {
        Outcome::new("x".into(), ExitStatus::from_raw(code << 8), String::new(), stderr.into())
    }

    #[test]
    fn commands_report_code_and_output() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo 'error: bad' >&2; echo '  cause: worse' >&2; exit 3"]);
        let o = run_command(cmd, WAIT);
        assert_eq!(o.code, Some(3));
        assert_eq!(o.stdout, "out\n");
        o.assert_error(3).assert_error_in(&[1, 3]).assert_stderr_mentions("CAUSE: WORSE");
    }

    #[test]
    fn numbers_are_matched_whole() {
        let o = outcome(8, "error: pid 1234 is in use\n  log: /s/logs/restore-98765-4321.log\n");
        assert!(o.stderr_mentions_number(1234));
        assert!(!o.stderr_mentions_number(123), "part of 1234");
        assert!(!o.stderr_mentions_number(4321), "only in the log path");
    }

    #[test]
    fn log_line_is_found() {
        let o = outcome(7, "error: restore failed\n  cause: x\n  log: /tmp/a b/restore.log\n");
        assert_eq!(o.log_path(), Some(PathBuf::from("/tmp/a b/restore.log")));
        assert_eq!(outcome(7, "error: y\n").log_path(), None);
    }

    #[test]
    #[should_panic(expected = "ferry panicked")]
    fn a_panic_is_never_an_acceptable_error() {
        outcome(101, "error: x\nthread 'main' panicked at src/main.rs:1:1\n").assert_error(101);
    }

    #[test]
    #[should_panic(expected = "must start with an `error: ` line")]
    fn the_error_line_comes_first() {
        outcome(1, "warning: w\nerror: x\n").assert_error(1);
    }

    #[test]
    #[should_panic(expected = "exactly one `error:` line")]
    fn one_error_line_only() {
        outcome(1, "error: x\nerror: y\n").assert_error(1);
    }

    #[test]
    #[should_panic(expected = "an empty `hint:` line")]
    fn detail_lines_say_something() {
        outcome(7, "error: x\n  cause: y\n  hint: \n").assert_error(7);
    }

    #[test]
    #[should_panic(expected = "expected exit code")]
    fn wrong_code_is_reported() {
        outcome(1, "error: x\n").assert_error(3);
    }

    #[test]
    #[should_panic(expected = "still running")]
    fn a_hanging_command_is_killed() {
        let mut cmd = Command::new("sleep");
        cmd.arg("1000");
        run_command(cmd, Duration::from_millis(200));
    }

    #[test]
    fn fake_criu_is_too_old() {
        let ferry = Ferry::new("/bin/false");
        let fake = ferry.fake_old_criu();
        assert_eq!(crate::criu_version(&fake), Some((3, 17, 1)));
    }

    #[test]
    fn fresh_paths_differ() {
        let ferry = Ferry::new("/bin/false");
        let a = ferry.fresh_path("pid");
        fs::write(&a, "1").expect("write");
        assert_ne!(ferry.fresh_path("pid"), a);
        assert_eq!(read_pid(&a), Some(1));
    }
}
