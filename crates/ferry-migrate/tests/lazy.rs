//! Post-copy with ferry serving the lazy pages: real CRIU, root. A memhog in its own pid
//! namespace is dumped lazily; at post-dump it is restored lazily into a fresh pid namespace on
//! the same host, its missing pages filled by ferry's `LazyPager` from an in-process
//! `PageFetcher` that reads the frozen source through `PageSource`.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_criu::{Criu, DumpOptions, LogTarget, Notify, NotifyHandler, RecordingNotify, RestoreOptions};
use ferry_migrate::lazy::{pick_port, LazyError, LazyPager, PageFetcher, PageServerFinisher, PageSource};
use ferry_testkit::{assert_not_stopped, require_privileged, try_poll, Isolation, ProcId, Sample, Workload};

const SERVE_TIMEOUT: Duration = Duration::from_secs(300);

/// Serves from the source, failing from request number `fail_at` on (if set), each request
/// `delay` late (a slow link).
struct Direct {
    source: Arc<PageSource>,
    fail_at: Option<u64>,
    seen: u64,
    delay: Duration,
}

impl PageFetcher for Direct {
    fn fetch(&mut self, pid: u32, vaddr: u64, nr_pages: u32, out: &mut Vec<u8>) -> Result<(), LazyError> {
        self.seen += 1;
        std::thread::sleep(self.delay);
        if self.fail_at.is_some_and(|n| self.seen >= n) {
            return Err(LazyError::Fetch(format!("injected failure at request {}", self.seen)));
        }
        self.source.read(pid, vaddr, nr_pages, out)
    }
}

/// What happened at post-dump.
#[derive(Debug, Default)]
struct Outcome {
    restored: Option<i32>,
    restore_returned: Option<Instant>,
    all_pages: Option<Instant>,
    bytes: u64,
    requests: u64,
    faults: u64,
    /// The hash the restored copy's forked child computed while pages were still missing.
    forked_hash: Option<String>,
    fetching: Duration,
    copying: Duration,
    source_bytes: u64,
    lazy_bytes: u64,
    /// Failure test: what the restored copy did once its pages stopped coming.
    notes: Vec<String>,
}

/// The migration at post-dump: restore lazily, serve every page, then answer.
struct MigrateAtPostDump<'a> {
    criu: &'a Criu,
    workload: &'a Workload,
    source_images: PathBuf,
    target_images: PathBuf,
    target_logs: PathBuf,
    fail_at: Option<u64>,
    /// Right after the restore, have the copy fork a child that hashes the memory.
    fork_hash: bool,
    delay: Duration,
    outcome: Outcome,
}

impl MigrateAtPostDump<'_> {
    fn migrate(&mut self) -> Result<(), String> {
        if self.fail_at == Some(0) {
            return Err("refused before serving any page".into());
        }
        let source =
            Arc::new(PageSource::open(&self.source_images, self.workload.pid()).map_err(|e| e.to_string())?);
        self.outcome.lazy_bytes = source.lazy_bytes();
        copy_images(&self.source_images, &self.target_images);
        let fetcher =
            Direct { source: Arc::clone(&source), fail_at: self.fail_at, seen: 0, delay: self.delay };
        let mut server = LazyPager::start(&self.target_images, &self.target_logs, Box::new(fetcher))
            .map_err(|e| e.to_string())?;
        let opts = RestoreOptions::new(&self.target_images, LogTarget::new(&self.target_logs, "restore.log"))
            .lazy_pages(true);
        let restored =
            self.criu.restore(&opts, &mut RecordingNotify::default()).map_err(|e| e.to_string())?;
        self.outcome.restore_returned = Some(Instant::now());
        self.outcome.restored = Some(restored.pid);
        self.workload.adopt(restored.pid);
        if self.fork_hash {
            fs::write(self.workload.path("fork", restored.pid), "").map_err(|e| e.to_string())?;
            ferry_sys::kill(restored.pid, ferry_sys::Signal::Usr1).map_err(|e| e.to_string())?;
        }
        let done = server.wait_done(SERVE_TIMEOUT);
        let stats = server.stats();
        self.outcome.bytes = stats.bytes;
        self.outcome.requests = stats.requests;
        self.outcome.faults = stats.faults;
        self.outcome.fetching = stats.fetching;
        self.outcome.copying = stats.copying;
        self.outcome.source_bytes = source.bytes_served();
        match done {
            Ok(_) => {
                self.outcome.all_pages = Some(Instant::now());
                server.stop();
                if self.fork_hash {
                    let hash = try_poll(Duration::from_secs(60), || {
                        fs::read_to_string(self.workload.path("hash", restored.pid)).ok()
                    });
                    self.outcome.forked_hash = hash.map(|h| h.trim().to_string());
                }
                Ok(())
            }
            Err(e) => {
                self.observe_failure(restored.pid, server);
                Err(format!("lazy transfer failed: {e}"))
            }
        }
    }

    /// The fetcher failed: the copy waits for pages while the pager lives; then see what it
    /// does once the pager is gone, and kill it. The source is resumed by the error answer.
    fn observe_failure(&mut self, pid: i32, server: LazyPager) {
        let hash_file = self.workload.path("hash", pid);
        let _ = fs::remove_file(&hash_file);
        let _ = ferry_sys::kill(pid, ferry_sys::Signal::Usr1);
        let cpu0 = cpu_ticks(pid);
        let answered = try_poll(Duration::from_secs(2), || hash_file.exists().then_some(()));
        let states: String = (0..5)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(100));
                process_state(pid).unwrap_or('-')
            })
            .collect();
        self.outcome.notes.push(format!(
            "pager alive, fetcher failed: hash answered within 2 s: {}, states {states}, cpu ticks in 2.5 s: {:?}",
            answered.is_some(),
            cpu_ticks(pid).zip(cpu0).map(|(a, b)| a - b)
        ));
        self.outcome.notes.push(format!(
            "kernel stack: {:?}",
            fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default().replace('\n', " | ")
        ));
        // Against the documented order (kill the copy first): what does the copy see?
        server.stop();
        let answered = try_poll(Duration::from_secs(5), || fs::read_to_string(&hash_file).ok());
        let alive = ferry_sys::process_exists(pid) && process_state(pid) != Some('Z');
        let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
        let exit = ferry_sys::wait_child(pid);
        self.outcome.notes.push(format!(
            "pager stopped: alive after 5 s {alive}, hash {:?}, exit {exit:?}",
            answered.as_deref().map(str::trim)
        ));
    }
}

impl NotifyHandler for MigrateAtPostDump<'_> {
    fn notify(&mut self, event: &Notify, _pid: Option<i32>) -> Result<(), String> {
        match event {
            Notify::PostDump => {
                self.migrate().inspect_err(|e| self.outcome.notes.push(format!("post-dump: {e}")))
            }
            _ => Ok(()),
        }
    }
}

fn copy_images(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("target images dir");
    for e in fs::read_dir(from).expect("read images").flatten() {
        if e.file_name().to_string_lossy().ends_with(".img") {
            fs::copy(e.path(), to.join(e.file_name())).expect("copy image");
        }
    }
}

fn process_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn criu() -> Criu {
    let path = ferry_testkit::criu_path().expect("criu");
    Criu::locate(Some(&path)).expect("criu").with_timeout(Duration::from_secs(600))
}

struct Run {
    dump: Result<(), String>,
    finish: Result<ferry_migrate::lazy::FinishReport, LazyError>,
    outcome: Outcome,
    started: Instant,
    dump_returned: Instant,
    port: u16,
}

/// Reaches CRIU's page server before ferry does, as any host on the network could.
struct Intruder<H> {
    inner: H,
    port: u16,
    answer: Option<TcpStream>,
}

impl<H: NotifyHandler> NotifyHandler for Intruder<H> {
    fn notify(&mut self, event: &Notify, pid: Option<i32>) -> Result<(), String> {
        if matches!(event, Notify::Other(name) if name == "status-ready") {
            let mut sock = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).map_err(|e| e.to_string())?;
            sock.write_all(&ferry_migrate::lazy::proto::Header::close(false).encode())
                .map_err(|e| e.to_string())?;
            sock.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
            self.answer = Some(sock);
        }
        self.inner.notify(event, pid)
    }
}

/// How a run goes: a failure injected, an intruder on CRIU's page server, a fork right after
/// the restore, a slow link.
#[derive(Default)]
struct Plan {
    fail_at: Option<u64>,
    intruder: bool,
    fork_hash: bool,
    delay: Duration,
}

fn run(workload: &Workload, fail_at: Option<u64>, dir: &Path) -> Run {
    run_with(workload, dir, Plan { fail_at, ..Plan::default() })
}

fn run_with(workload: &Workload, dir: &Path, plan: Plan) -> Run {
    let Plan { fail_at, intruder, fork_hash, delay } = plan;
    let criu = criu();
    let source_images = dir.join("source");
    fs::create_dir_all(&source_images).expect("mkdir");
    let port = pick_port().expect("port");
    let migrate = MigrateAtPostDump {
        criu: &criu,
        workload,
        source_images: source_images.clone(),
        target_images: dir.join("target"),
        target_logs: dir.join("target-logs"),
        fail_at,
        fork_hash,
        delay,
        outcome: Outcome::default(),
    };
    let mut handler = Intruder { inner: PageServerFinisher::new(port, migrate), port, answer: None };
    let opts =
        DumpOptions::new(workload.pid(), &source_images, LogTarget::new(dir.join("source-logs"), "dump.log"))
            .lazy_pages(Some(port));
    let started = Instant::now();
    let dump = if intruder { criu.dump(&opts, &mut handler) } else { criu.dump(&opts, &mut handler.inner) }
        .map(drop)
        .map_err(|e| e.to_string());
    let dump_returned = Instant::now();
    let finish = handler.inner.finish();
    let mut outcome = std::mem::take(&mut handler.inner.inner_mut().outcome);
    if let Some(mut sock) = handler.answer {
        let mut status = [0u8; 4];
        let got = sock.read_exact(&mut status).map(|_| i32::from_le_bytes(status));
        outcome.notes.push(format!("intruder's session answered: {got:?}"));
    }
    Run { dump, finish, outcome, started, dump_returned, port }
}

fn secs(from: Instant, to: Option<Instant>) -> String {
    to.map_or("-".into(), |t| format!("{:.3}", t.duration_since(from).as_secs_f64()))
}

fn migrate_memhog(mib: u32) {
    migrate_sample(Sample::MemHog { mib }, mib, 1);
}

/// Migrates `sample` (a memhog of `mib` MiB with `tasks` threads in all) lazily and checks its
/// memory, its threads and that the source is gone.
fn migrate_sample(sample: Sample, mib: u32, tasks: usize) {
    migrate_sample_started(Workload::start(sample, Isolation::PidNamespace).expect("memhog"), mib, tasks);
}

/// As [`migrate_sample`], for a workload already running.
fn migrate_sample_started(w: Workload, mib: u32, tasks: usize) {
    assert_eq!(task_count(w.pid()), tasks, "the workload's threads before the move");
    let original = w.request_hash(w.pid());
    let source = ProcId::of(w.pid()).expect("source alive");
    let dir = tempfile::Builder::new().prefix("ferry-lazy-").tempdir().expect("tempdir");
    let r = run(&w, None, dir.path());
    assert!(r.dump.is_ok(), "dump: {:?} {:?}", r.dump, r.outcome.notes);
    let fin = r.finish.expect("CRIU's page server closed by ferry");
    let o = &r.outcome;
    let restored = o.restored.expect("restored");
    assert_eq!(w.request_hash(restored), original, "restored memory differs");
    assert_eq!(task_count(restored), tasks, "the restored copy's threads");
    assert!(o.bytes >= u64::from(mib) << 20, "served only {} bytes", o.bytes);
    assert_eq!(o.bytes, o.source_bytes);
    assert!(o.bytes <= o.lazy_bytes);
    // The source tree is gone, CRIU's page server too.
    assert!(
        try_poll(Duration::from_secs(10), || (!source.alive()).then_some(())).is_some(),
        "source survived"
    );
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, r.port)).is_err(), "CRIU's page server still listens");
    let rr = o.restore_returned.expect("restore returned");
    println!(
        "lazy {mib} MiB: restore returned {} s after dump start; all pages ({} MiB in {} requests, {} faults) {} s \
         after restore returned (fetching {:.3} s, copying {:.3} s); dump returned {} s after start; CRIU's page server reachable for {:?} before ferry \
         connected, closed {:?} after it listened",
        secs(r.started, Some(rr)),
        o.bytes >> 20,
        o.requests,
        o.faults,
        secs(rr, o.all_pages),
        o.fetching.as_secs_f64(),
        o.copying.as_secs_f64(),
        secs(r.started, Some(r.dump_returned)),
        fin.exposed,
        fin.session,
    );
    assert!(!dir.path().join("target-logs/lazy-pages.socket").exists(), "the pager's socket was left behind");
    let _ = ferry_sys::kill(restored, ferry_sys::Signal::Kill);
    let _ = ferry_sys::wait_child(restored);
}

#[test]
fn lazy_migration_serves_every_page_and_ends_the_source() {
    if !require_privileged() {
        return;
    }
    migrate_memhog(256);
}

/// A tree with threads comes back whole: every thread, running (each wakes every 10 ms on its
/// restored stack while the pages arrive; one that came back wrong kills the process) and the
/// memory intact. With ferry's CRIU patch 0003 the dump adds the lazy pages in runs, cut at
/// each thread's stack page.
#[test]
fn lazy_migration_of_a_threaded_tree() {
    if !require_privileged() {
        return;
    }
    migrate_sample(Sample::ThreadedMemHog { mib: 64, threads: 3 }, 64, 4);
}

/// Memory a lazy dump treats differently, side by side, comes back intact: a private file
/// mapping with pages copied on write (not lazy), shared anonymous memory (dumped apart), and
/// small anonymous mappings (lazy) interleaved with small file mappings, which CRIU's pagemap
/// cache scans in one window.
#[test]
fn lazy_migration_keeps_file_shared_and_small_mappings() {
    if !require_privileged() {
        return;
    }
    migrate_sample(Sample::Mappings, 1, 1);
}

/// Guard regions (`madvise(MADV_GUARD_INSTALL)`, kernel 6.13+), as glibc 2.42 and later put at
/// the bottom of every thread stack: CRIU's mm image lists them after the mappings, as entries of
/// their own lying inside those mappings. The process comes back with its memory, its threads on
/// their guarded stacks, and every guard in place (the hash line counts the guard pages the
/// kernel reports).
#[test]
fn lazy_migration_keeps_guard_regions() {
    if !require_privileged() {
        return;
    }
    let w =
        Workload::start(Sample::Guarded { mib: 16, threads: 2 }, Isolation::PidNamespace).expect("guarded");
    assert!(w.request_hash(w.pid()).ends_with(" guards:4/4"), "the guards before the move");
    migrate_sample_started(w, 16, 3);
}

fn task_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// The figures for 1 GiB: `cargo test -p ferry-migrate --test lazy -- --ignored --nocapture`.
#[test]
#[ignore = "1 GiB: a measurement, slow on small machines"]
fn lazy_migration_1gib() {
    if !require_privileged() {
        return;
    }
    migrate_memhog(1024);
}

/// The restored copy forks while most of its pages are still at the source: the child (whose
/// userfaultfd comes with the fork event) must see the same memory.
#[test]
fn a_fork_while_pages_are_missing_sees_the_whole_memory() {
    if !require_privileged() {
        return;
    }
    let w = Workload::start(Sample::MemHog { mib: 64 }, Isolation::PidNamespace).expect("memhog");
    let original = w.request_hash(w.pid());
    let dir = tempfile::Builder::new().prefix("ferry-lazy-").tempdir().expect("tempdir");
    // 64 MiB in 1 MiB pieces 20 ms apart: over a second, so the fork comes early in it.
    let plan = Plan { fork_hash: true, delay: Duration::from_millis(20), ..Plan::default() };
    let r = run_with(&w, dir.path(), plan);
    assert!(r.dump.is_ok(), "dump: {:?}; logs in {}", r.dump, dir.path().display());
    r.finish.expect("CRIU's page server closed by ferry");
    let o = &r.outcome;
    assert_eq!(o.forked_hash.as_deref(), Some(original.as_str()), "the forked child's memory differs");
    let restored = o.restored.expect("restored");
    assert_eq!(w.request_hash(restored), original, "the parent's memory differs");
    println!("fork: {} MiB in {} requests, {} faults", o.bytes >> 20, o.requests, o.faults);
}

#[test]
fn failed_fetch_resumes_the_source() {
    if !require_privileged() {
        return;
    }
    let w = Workload::start(Sample::MemHog { mib: 64 }, Isolation::PidNamespace).expect("memhog");
    let original = w.request_hash(w.pid());
    let dir = tempfile::Builder::new().prefix("ferry-lazy-").tempdir().expect("tempdir");
    let r = run(&w, Some(5), dir.path());
    for n in &r.outcome.notes {
        println!("failed fetch: {n}");
    }
    let err = r.dump.expect_err("post-dump refused: the dump must fail");
    assert!(err.contains("post-dump") || !err.is_empty(), "{err}");
    // CRIU still ran its page server after the refusal; ferry closed it.
    r.finish.expect("CRIU's page server closed by ferry");
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, r.port)).is_err(), "CRIU's page server still listens");
    // The source runs again, its memory intact.
    assert_not_stopped(w.pid());
    assert_eq!(w.request_hash(w.pid()), original);
    let restored = r.outcome.restored.expect("restored before the failure");
    assert!(!ferry_sys::process_exists(restored), "restored copy survived");
    println!("failed fetch: dump error: {err}");
}

#[test]
fn refused_post_dump_resumes_the_source_untouched() {
    if !require_privileged() {
        return;
    }
    let w = Workload::start(Sample::MemHog { mib: 16 }, Isolation::PidNamespace).expect("memhog");
    let original = w.request_hash(w.pid());
    let dir = tempfile::Builder::new().prefix("ferry-lazy-").tempdir().expect("tempdir");
    let r = run(&w, Some(0), dir.path());
    assert!(r.dump.is_err(), "post-dump refused: the dump must fail");
    r.finish.expect("CRIU's page server closed by ferry");
    assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, r.port)).is_err(), "CRIU's page server still listens");
    assert_not_stopped(w.pid());
    assert_eq!(w.request_hash(w.pid()), original);
    println!(
        "refused post-dump: source resumed {} s after dump start",
        secs(r.started, Some(r.dump_returned))
    );
}

#[test]
fn another_client_on_criu_page_server_is_detected() {
    if !require_privileged() {
        return;
    }
    let w = Workload::start(Sample::MemHog { mib: 16 }, Isolation::PidNamespace).expect("memhog");
    let source = ProcId::of(w.pid()).expect("source alive");
    let dir = tempfile::Builder::new().prefix("ferry-lazy-").tempdir().expect("tempdir");
    let r = run_with(&w, dir.path(), Plan { intruder: true, ..Plan::default() });
    for n in &r.outcome.notes {
        println!("intruder: {n}");
    }
    // CRIU served the first connection (the intruder's) and dropped ferry's.
    let err = r.finish.expect_err("ferry's session was never accepted");
    println!("intruder: finish: {err}");
    assert!(r.outcome.notes.iter().any(|n| n.contains("Ok(0)")), "{:?}", r.outcome.notes);
    assert!(r.dump.is_ok(), "{:?}", r.dump);
    assert!(
        try_poll(Duration::from_secs(10), || (!source.alive()).then_some(())).is_some(),
        "source survived"
    );
    if let Some(pid) = r.outcome.restored {
        let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
        let _ = ferry_sys::wait_child(pid);
    }
}
