//! Classifies a CRIU failure from the text of CRIU's log, so that the user is told what failed and
//! what to do about it instead of CRIU's bare "criu failed: type NOTIFY errno 0".
//!
//! The patterns are the exact messages CRIU 4.2.1 prints; each one was produced with the real
//! `criu` binary and is kept, trimmed, under `tests/fixtures/`. A failing run usually logs one
//! specific error followed by generic ones ("Dump files (pid: N) failed", "Dumping FAILED."), and
//! some messages carry a stale errno, so a line is matched by its most specific pattern and the
//! most specific cause over the whole log wins, not the first error line.
//!
//! The log is hostile input: the scan is one pass over its lines, never indexes past what `find`
//! returned, and caps what it copies out.

/// Why a CRIU dump or restore failed, as far as the log tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// CRIU lacked a permission: the target runs as another user (CRIU here can only dump uid 0
    /// because the VM withholds CAP_SYS_RESOURCE), the target is traced, or a capability is missing.
    NotPermitted,
    /// Restore: the PID the image needs is taken (often by the original, still running).
    PidInUse { pid: Option<i32> },
    /// Dump: the process does not exist (or exited while CRIU seized it).
    ProcessNotFound { pid: Option<i32> },
    /// A unix socket connected to a process outside the checkpointed tree.
    ExternalUnixSocket,
    /// Restore: a file the process had open is gone or differs from the checkpoint.
    ExternalFile { path: Option<String> },
    /// A mount CRIU cannot handle (bind of an unreachable root, a file on a mount of another
    /// namespace, shared/external mounts).
    ExternalMount,
    /// Something CRIU cannot checkpoint: io_uring, perf events, some devices, ...
    UnsupportedObject { what: String },
    /// An established TCP connection, without `--tcp-established`.
    TcpEstablished,
    /// A listening TCP socket with connections not yet accepted.
    TcpInFlight,
    /// Restore: an address a socket must bind to is taken.
    AddressInUse,
    /// ENOSPC (or EDQUOT) writing the images.
    NoSpace,
    /// An image file is missing, truncated or corrupted.
    DamagedImage { file: Option<String> },
    /// The iptables/nftables rules that freeze the network could not be set.
    NetworkLock,
    /// Dump: CRIU's parasite could not create `proc.crtools` (where it mounts the task's proc)
    /// in the working directory of a root task in a child pid namespace: something by that name
    /// is there (`exists`), or the directory is read-only or deleted.
    ProcMountDir { exists: bool },
    /// None of the above; the first meaningful "Error (" line of the log.
    Unknown { first_error: Option<String> },
}

impl Cause {
    /// One line: what went wrong, in plain words.
    pub fn summary(&self) -> String {
        match self {
            Cause::NotPermitted => {
                "CRIU was not permitted to inspect or change the process (wrong user, traced process, \
                 or a missing capability)"
                    .to_owned()
            }
            Cause::PidInUse { pid: Some(pid) } => {
                format!("the process needs PID {pid} back, but another process is using it")
            }
            Cause::PidInUse { pid: None } => {
                "a PID the checkpoint needs is already used by another process".to_owned()
            }
            Cause::ProcessNotFound { pid: Some(pid) } => format!("there is no process with PID {pid}"),
            Cause::ProcessNotFound { pid: None } => "the process to checkpoint does not exist".to_owned(),
            Cause::ExternalUnixSocket => {
                "the process has a unix socket connected to a process outside the checkpoint".to_owned()
            }
            Cause::ExternalFile { path: Some(path) } => {
                format!("the file {path} that the process had open is missing or has changed")
            }
            Cause::ExternalFile { path: None } => {
                "a file that the process had open is missing or has changed".to_owned()
            }
            Cause::ExternalMount => {
                "the process uses a mount that CRIU cannot checkpoint or find again".to_owned()
            }
            Cause::UnsupportedObject { what } => {
                format!("the process uses something CRIU cannot checkpoint: {what}")
            }
            Cause::TcpEstablished => "the process has an established TCP connection".to_owned(),
            Cause::TcpInFlight => {
                "a listening TCP socket has connections that the process has not accepted yet".to_owned()
            }
            Cause::AddressInUse => {
                "a network address the process listens on is already taken by another process".to_owned()
            }
            Cause::NoSpace => "there is no space left to write the checkpoint".to_owned(),
            Cause::DamagedImage { file: Some(file) } => {
                format!("the checkpoint image {file} is missing, truncated or corrupted")
            }
            Cause::DamagedImage { file: None } => {
                "the checkpoint images are missing, truncated or corrupted".to_owned()
            }
            Cause::NetworkLock => "CRIU could not lock the network with iptables/nftables".to_owned(),
            Cause::ProcMountDir { exists: true } => {
                "CRIU could not create proc.crtools in the working directory of the tree's root task: \
                 something by that name is already there"
                    .to_owned()
            }
            Cause::ProcMountDir { exists: false } => {
                "CRIU could not create proc.crtools in the working directory of the tree's root task \
                 (it is read-only or deleted)"
                    .to_owned()
            }
            Cause::Unknown { first_error: Some(line) } => format!("CRIU failed: {}", error_message(line)),
            Cause::Unknown { first_error: None } => "CRIU failed without logging an error".to_owned(),
        }
    }

    /// One line: what the user can do about it.
    pub fn hint(&self) -> String {
        match self {
            Cause::NotPermitted => {
                "run ferry as root; only processes running as root can be checkpointed on this host, \
                 and not while a debugger (strace, gdb) is attached"
                    .to_owned()
            }
            Cause::PidInUse { pid } => {
                let who = pid.map_or_else(|| "the PID".to_owned(), |p| format!("PID {p}"));
                format!(
                    "stop the process holding {who} (after a checkpoint with `--leave-running` the original \
                     is still running), wait until it has exited, then run `ferry restore NAME` again"
                )
            }
            Cause::ProcessNotFound { .. } => {
                "check the PID (it may have exited); list running processes with `ps`".to_owned()
            }
            Cause::ExternalUnixSocket => {
                "checkpoint the peer process together with it (its common parent), or close the connection \
                 first; CRIU can only keep such sockets with its --ext-unix-sk/--external options"
                    .to_owned()
            }
            Cause::ExternalFile { .. } => {
                "put the file back as it was at checkpoint time (same path and size), then run \
                 `ferry restore NAME` again"
                    .to_owned()
            }
            Cause::ExternalMount => {
                "checkpoint a process that lives in the host's mount namespace, or give its stdio as pipes \
                 rather than files on another mount; CRIU needs external mounts declared (--external mnt[])"
                    .to_owned()
            }
            Cause::UnsupportedObject { .. } => {
                "close that file or stop using that feature before the checkpoint; CRIU cannot save it"
                    .to_owned()
            }
            Cause::TcpEstablished => {
                "add `--tcp-established` to checkpoint open TCP connections (and to restore them), \
                 or close them first"
                    .to_owned()
            }
            Cause::TcpInFlight => {
                "retry the checkpoint once the pending connections are accepted, or have CRIU drop them \
                 (its --skip-in-flight option)"
                    .to_owned()
            }
            Cause::AddressInUse => {
                "stop the process that holds the address (the original one, if it still runs), then run \
                 `ferry restore NAME` again"
                    .to_owned()
            }
            Cause::NoSpace => {
                "free space where the checkpoint is stored (see `df`), then try again".to_owned()
            }
            Cause::DamagedImage { .. } => {
                "this checkpoint cannot be restored; take a new one (the disk may have filled up or the \
                 files were changed)"
                    .to_owned()
            }
            Cause::NetworkLock => {
                "check that `iptables` (or nftables) is installed and works as root; if the checkpoint \
                 was taken with `--tcp-established`, restore it with `ferry restore NAME` to remove \
                 the leftover rules"
                    .to_owned()
            }
            Cause::ProcMountDir { exists: true } => {
                "remove `proc.crtools` from the task's working directory (`ls -ld /proc/PID/cwd/proc.crtools`; \
                 a CRIU killed during a dump leaves it), then try again"
                    .to_owned()
            }
            Cause::ProcMountDir { exists: false } => {
                "let the task's root process work in a writable directory that exists, or give its pid \
                 namespace a mount namespace with its own /proc"
                    .to_owned()
            }
            Cause::Unknown { .. } => "read CRIU's log (path above) for details".to_owned(),
        }
    }
}

/// Longest error line handed out, in characters.
const MAX_LINE_CHARS: usize = 300;

/// How specific a match is: a lower rank wins over a higher one anywhere in the log.
type Rank = u8;
/// A message that names the problem precisely.
const SPECIFIC: Rank = 0;
/// Damage and missing files: their messages are precise, but a precise cause may come before them.
const FILES: Rank = 1;
/// The seize warning carries the errno of the target process.
const SEIZE: Rank = 2;
/// Messages that only hint at the cause.
const WEAK: Rank = 3;
/// A bare errno text.
const ERRNO: Rank = 4;

/// Restorer lines "`- returned 0" after "Preadv" needed to call the pages image truncated: CRIU
/// 4.2.1 then retries the read forever (the log grows by ~45 MB/s) until killed.
const EMPTY_READS_FOR_DAMAGE: u32 = 2;

/// Classifies a failed CRIU run from its log text (the whole log or its tail).
pub fn classify_log(log: &str) -> Cause {
    let mut best: Option<(Rank, Cause)> = None;
    // The image named by the last "No X.img image" line: CRIU logs "Unexpected EOF on (empty-image)"
    // right after it when a needed image is missing.
    let mut missing_image: Option<&str> = None;
    let mut after_preadv = false;
    let mut empty_reads = 0u32;

    for line in log.lines() {
        if let Some(name) = missing_image_name(line) {
            missing_image = Some(name);
        }
        let was_after_preadv = after_preadv;
        after_preadv = line.contains("Preadv ");
        if was_after_preadv && line.trim_end().ends_with("`- returned 0") {
            empty_reads = empty_reads.saturating_add(1);
        }
        if !is_diagnostic(line) || is_noise(line) {
            continue;
        }
        if let Some((rank, cause)) = match_line(line, missing_image) {
            // Strictly lower: on equal rank the earlier line is the cause, the later ones follow-ups.
            if !matches!(&best, Some((r, _)) if *r <= rank) {
                best = Some((rank, cause));
            }
        }
    }

    if empty_reads >= EMPTY_READS_FOR_DAMAGE && !matches!(&best, Some((r, _)) if *r <= FILES) {
        best = Some((FILES, Cause::DamagedImage { file: Some("pages-*.img".to_owned()) }));
    }
    match best {
        Some((_, cause)) => cause,
        None => Cause::Unknown { first_error: first_error_line(log) },
    }
}

/// The first line containing "Error (", trimmed and capped to about 300 characters.
///
/// CRIU's "rlimit: Can't setup RLIMIT_NOFILE for self" error is printed on every run on these
/// hosts and means nothing, so it is skipped.
pub fn first_error_line(log: &str) -> Option<String> {
    log.lines().find(|l| l.contains("Error (") && !is_noise(l)).map(|l| cap_chars(l.trim(), MAX_LINE_CHARS))
}

/// CRIU writes "Error (file:line): " and "Warn  (file:line): " before its messages.
fn is_diagnostic(line: &str) -> bool {
    line.contains("Error (") || line.contains("Warn  (")
}

/// Lines CRIU prints on every run here (harmless, see MACHINE-FACTS), or that say nothing by
/// themselves, so they must neither classify nor be shown as the first error.
fn is_noise(line: &str) -> bool {
    line.contains("Can't setup RLIMIT_NOFILE for self")
}

/// The most specific cause one diagnostic line names, with its rank.
fn match_line(line: &str, missing_image: Option<&str>) -> Option<(Rank, Cause)> {
    let msg = error_message(line);

    // TCP first: these name the fix exactly.
    if msg.contains("Connected TCP socket") {
        return Some((SPECIFIC, Cause::TcpEstablished));
    }
    if msg.contains("In-flight connection") {
        return Some((SPECIFIC, Cause::TcpInFlight));
    }
    if contains_any(
        msg,
        &[
            "External socket is used",
            "External socket found in image",
            "Can't dump half of stream unix connection",
            "Can't dump name-less external socket",
            "with unreachable peer",
        ],
    ) {
        return Some((SPECIFIC, Cause::ExternalUnixSocket));
    }
    if contains_any(
        msg,
        &[
            "Iptables configuration failed",
            "Locking network failed",
            "Locking connection failed",
            "Failed to lock TCP connection",
            "Failed to unlock TCP connection",
            "nft command error",
            "without libnftables support",
        ],
    ) {
        return Some((SPECIFIC, Cause::NetworkLock));
    }
    if contains_any(msg, &["No space left on device", "Disk quota exceeded"]) {
        return Some((SPECIFIC, Cause::NoSpace));
    }
    if let Some(rest) = after(msg, "Can't fork for ") {
        // clone3() with set_tid gives EEXIST when the PID is taken; other errnos are not this.
        if rest.contains("File exists") {
            return Some((SPECIFIC, Cause::PidInUse { pid: leading_int(rest) }));
        }
    }
    if let Some(rest) = after(msg, "do not match expected ") {
        // The clone()+ns_last_pid path of older kernels: the child got another PID.
        return Some((SPECIFIC, Cause::PidInUse { pid: leading_int(rest) }));
    }
    if msg.contains("Address already in use") {
        return Some((SPECIFIC, Cause::AddressInUse));
    }
    if let Some(rest) = after(msg, "Can't create a directory (") {
        // parasite.c: mkdir("proc.crtools") in the root task's cwd; -17 is EEXIST.
        return Some((SPECIFIC, Cause::ProcMountDir { exists: rest.starts_with("-17)") }));
    }
    if msg.contains("Can't get rlimit") {
        // prlimit() on a process of another user needs CAP_SYS_RESOURCE, which this VM withholds.
        return Some((SPECIFIC, Cause::NotPermitted));
    }
    if let Some(what) = unsupported_object(msg) {
        return Some((SPECIFIC, Cause::UnsupportedObject { what }));
    }
    if contains_any(
        msg,
        &[
            "doesn't have a proper root mount",
            "Can't lookup mount=",
            "is autodetected external mount",
            "has unreachable sharing",
            "Open files on overmounted mounts",
            "is a fuse mount but not external",
            "External slavery sharing group",
        ],
    ) || (msg.starts_with("FS mnt ") && msg.contains(" unsupported id "))
    {
        return Some((SPECIFIC, Cause::ExternalMount));
    }
    if let Some(file) = damaged_image(msg, missing_image) {
        return Some((FILES, Cause::DamagedImage { file }));
    }
    if let Some(path) = external_file(msg) {
        return Some((FILES, Cause::ExternalFile { path }));
    }
    if let Some(rest) = after(msg, "Unable to interrupt task: ") {
        // PTRACE_INTERRUPT's errno tells a missing process from a forbidden one (e.g. traced).
        if rest.contains("(No such process)") {
            return Some((SEIZE, Cause::ProcessNotFound { pid: leading_int(rest) }));
        }
        if rest.contains("(Operation not permitted)") {
            return Some((SEIZE, Cause::NotPermitted));
        }
    }
    if let Some(rest) = after(msg, "Unable to detach from ") {
        if rest.contains("No such process") {
            return Some((WEAK, Cause::ProcessNotFound { pid: leading_int(rest) }));
        }
    }
    if let Some(rest) = after(msg, "Failed to open /proc/") {
        if rest.contains("/comm: No such file or directory") {
            return Some((WEAK, Cause::ProcessNotFound { pid: leading_int(rest) }));
        }
    }
    if contains_any(msg, &["Operation not permitted", "Permission denied"]) {
        return Some((ERRNO, Cause::NotPermitted));
    }
    None
}

/// What an "unsupported" message names, in words for the user.
fn unsupported_object(msg: &str) -> Option<String> {
    if let Some(rest) = after(msg, "Can't dump file ") {
        // "Can't dump file 3 of that type [600] (anon anon_inode:[perf_event])"
        let fd = rest.split(' ').next().unwrap_or("?");
        let inner =
            rest.find(" (").map(|i| &rest[i + 2..]).map(|s| s.strip_suffix(')').unwrap_or(s)).unwrap_or("");
        let what = if let Some(dev) = inner.strip_prefix("chr ") {
            format!("character device {dev}")
        } else if let Some(dev) = inner.strip_prefix("blk ") {
            format!("block device {dev}")
        } else if let Some(anon) = inner.strip_prefix("anon ") {
            anon.to_owned()
        } else {
            inner.to_owned()
        };
        return Some(cap_chars(&format!("{what} (fd {fd})"), MAX_LINE_CHARS));
    }
    // The kernel refuses to pass io_uring files over SCM_RIGHTS with EINVAL, so the parasite
    // fails to hand the fds to CRIU; CRIU itself never names io_uring.
    if msg.contains("send_fds failed (-22)") {
        return Some("an io_uring instance (or another file the kernel will not hand over)".to_owned());
    }
    let table: &[(&str, &str)] = &[
        ("Unsupported mapping found", "an unusual memory mapping"),
        ("Can't dump high memory region", "a memory region above 47 bits"),
        ("Control messages in queue", "a unix socket with file descriptors queued in it"),
        ("Only stream, dgram and raw are supported", "a network socket of an unsupported type"),
        ("Unsupported proto ", "a network socket of an unsupported protocol"),
        ("Unsupported socket family", "a socket of an unsupported family"),
        ("Unsupported type (", "a unix socket of an unsupported type"),
        ("Can't dump corked dgram socket", "a corked UDP socket"),
        ("Can't dump nested ", "a nested namespace"),
        ("Sysv shmem ", "a System V shared memory segment with holes"),
        ("Unsupported link ", "a network device of an unsupported kind"),
        ("Can't dump ghost file ", "a large deleted file that is still open"),
        ("The path [", "a file at a path CRIU does not support"),
        ("PIDFD_THREAD flag", "a pidfd of a thread"),
    ];
    table.iter().find(|(pat, _)| msg.contains(pat)).map(|(_, what)| (*what).to_owned())
}

/// The image file a damage message names (`Some(None)` when it names none).
fn damaged_image(msg: &str, missing_image: Option<&str>) -> Option<Option<String>> {
    // "Head magic doesn't match for core-1.img", "Magic doesn't match for inventory.img"
    if let Some(rest) = after(msg, "agic doesn't match for ") {
        return Some(image_name(rest));
    }
    if let Some(rest) = after(msg, "Unexpected EOF on ") {
        if rest.starts_with("(empty-image)") {
            return Some(missing_image.map(str::to_owned));
        }
        return Some(image_name(rest));
    }
    // "Read 1294 bytes while 2601 expected from /d/core-1.img: <stale errno>" (also "on ...")
    if let Some(rest) = after(msg, " bytes while ") {
        let path = after(rest, " expected from ").or_else(|| after(rest, " expected on "));
        return Some(path.and_then(image_name));
    }
    if let Some(rest) = after(msg, "Failed unpacking object ") {
        return Some(after(rest, " from ").and_then(image_name));
    }
    if msg.starts_with("Can't read ") {
        if let Some(rest) = after(msg, " bytes from file ") {
            return Some(image_name(rest));
        }
    }
    if contains_any(
        msg,
        &[
            "Reached EOF unexpectedly while reading page",
            "Corrupted ghost image",
            "Corrupted root cgset",
            "Img trimmed",
            "Wrong object requested",
            "Not supported images version",
            "Too old image",
        ],
    ) {
        return Some(None);
    }
    None
}

/// The path a restore-side file message names (`Some(None)` when it names none).
fn external_file(msg: &str) -> Option<Option<String>> {
    // "Can't open file tmp/x on restore: No such file..." and "Can't open file tmp/x: ..."
    if let Some(rest) = after(msg, "Can't open file ") {
        let end = rest.find(" on restore:").or_else(|| rest.rfind(": ")).unwrap_or(rest.len());
        return Some(restored_path(&rest[..end]));
    }
    // "File tmp/x has bad size 27 (expect 12)", also bad mode / bad build-ID
    if let Some(rest) = msg.strip_prefix("File ") {
        if let Some(end) = rest.find(" has bad ") {
            return Some(restored_path(&rest[..end]));
        }
    }
    if let Some(rest) = after(msg, "could not be obtained for file ") {
        let end = rest.find(" because").unwrap_or(rest.len());
        return Some(restored_path(&rest[..end]));
    }
    if msg.contains("Unaccessible path opened") {
        return Some(None);
    }
    None
}

/// CRIU logs restored paths relative to the root ("tmp/x"); show them absolute.
fn restored_path(path: &str) -> Option<String> {
    let path = path.trim();
    if path.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        out.push('/');
    }
    out.push_str(path);
    Some(cap_chars(&out, MAX_LINE_CHARS))
}

/// The file name of an image path that may be followed by ": errno text".
fn image_name(text: &str) -> Option<String> {
    let path = text.split(": ").next().unwrap_or(text).trim();
    let name = path.rsplit('/').next().unwrap_or(path);
    if name.is_empty() {
        None
    } else {
        Some(cap_chars(name, MAX_LINE_CHARS))
    }
}

/// "X.img" from a "No X.img image" line.
fn missing_image_name(line: &str) -> Option<&str> {
    let rest = after(line, ") No ")?;
    let name = rest.strip_suffix(" image")?;
    (name.ends_with(".img") && !name.contains(' ')).then_some(name)
}

/// The message after CRIU's "Error (file:line): " prefix, or the trimmed line.
fn error_message(line: &str) -> &str {
    for tag in ["Error (", "Warn  ("] {
        if let Some(rest) = after(line, tag) {
            if let Some(i) = rest.find("): ") {
                return rest[i + 3..].trim();
            }
        }
    }
    line.trim()
}

/// The text after the first `pat` in `s`.
fn after<'a>(s: &'a str, pat: &str) -> Option<&'a str> {
    s.find(pat).map(|i| &s[i + pat.len()..])
}

fn contains_any(s: &str, pats: &[&str]) -> bool {
    pats.iter().any(|p| s.contains(p))
}

/// The decimal number at the start of `s`, if it fits an i32 and is positive.
fn leading_int(s: &str) -> Option<i32> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse::<i32>().ok().filter(|n| *n > 0)
}

/// `s` cut to `max` characters (on a char boundary), with "..." when cut.
fn cap_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}...", &s[..i]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(cause: Cause, log: &str) {
        assert_eq!(classify_log(log), cause);
    }

    #[test]
    fn tcp_established_on_dump_and_restore() {
        fixture(Cause::TcpEstablished, include_str!("../tests/fixtures/tcp_established_dump.log"));
        fixture(Cause::TcpEstablished, include_str!("../tests/fixtures/tcp_established_restore.log"));
    }

    #[test]
    fn proc_dir_exists() {
        fixture(Cause::ProcMountDir { exists: true }, include_str!("../tests/fixtures/proc_dir_exists.log"));
        assert_eq!(
            classify_log("pie: 1: Error (criu/pie/parasite.c:634): Can't create a directory (-30)"),
            Cause::ProcMountDir { exists: false }
        );
    }

    #[test]
    fn tcp_in_flight() {
        fixture(Cause::TcpInFlight, include_str!("../tests/fixtures/tcp_in_flight.log"));
    }

    #[test]
    fn pid_in_use() {
        fixture(Cause::PidInUse { pid: Some(8633) }, include_str!("../tests/fixtures/pid_in_use.log"));
    }

    #[test]
    fn process_not_found() {
        fixture(
            Cause::ProcessNotFound { pid: Some(999999) },
            include_str!("../tests/fixtures/process_not_found.log"),
        );
    }

    #[test]
    fn not_permitted() {
        fixture(Cause::NotPermitted, include_str!("../tests/fixtures/not_permitted_nobody.log"));
        // Same "Unable to detach ... No such process" error as a missing PID; only the warning differs.
        fixture(Cause::NotPermitted, include_str!("../tests/fixtures/not_permitted_traced.log"));
    }

    #[test]
    fn external_unix_socket() {
        fixture(Cause::ExternalUnixSocket, include_str!("../tests/fixtures/external_unix_socket.log"));
        fixture(Cause::ExternalUnixSocket, include_str!("../tests/fixtures/external_unix_socket_half.log"));
    }

    #[test]
    fn external_file() {
        fixture(
            Cause::ExternalFile { path: Some("/tmp/fcls/data.txt".to_owned()) },
            include_str!("../tests/fixtures/external_file_deleted.log"),
        );
        fixture(
            Cause::ExternalFile { path: Some("/tmp/fcls/data2.txt".to_owned()) },
            include_str!("../tests/fixtures/external_file_size.log"),
        );
    }

    #[test]
    fn external_mount() {
        fixture(Cause::ExternalMount, include_str!("../tests/fixtures/external_mount_root.log"));
        fixture(Cause::ExternalMount, include_str!("../tests/fixtures/external_mount_lookup.log"));
    }

    #[test]
    fn unsupported_objects() {
        let io_uring = classify_log(include_str!("../tests/fixtures/unsupported_io_uring.log"));
        assert!(
            matches!(&io_uring, Cause::UnsupportedObject { what } if what.contains("io_uring")),
            "{io_uring:?}"
        );
        fixture(
            Cause::UnsupportedObject { what: "anon_inode:[perf_event] (fd 3)".to_owned() },
            include_str!("../tests/fixtures/unsupported_perf_event.log"),
        );
        fixture(
            Cause::UnsupportedObject { what: "character device 10:229 (fd 3)".to_owned() },
            include_str!("../tests/fixtures/unsupported_char_device.log"),
        );
    }

    #[test]
    fn no_space() {
        fixture(Cause::NoSpace, include_str!("../tests/fixtures/no_space.log"));
    }

    #[test]
    fn damaged_images() {
        let cases = [
            ("core-8633.img", include_str!("../tests/fixtures/damaged_core_truncated.log")),
            ("core-8633.img", include_str!("../tests/fixtures/damaged_core_magic.log")),
            ("core-8633.img", include_str!("../tests/fixtures/damaged_core_garbage.log")),
            ("core-8633.img", include_str!("../tests/fixtures/damaged_core_missing.log")),
            ("pstree.img", include_str!("../tests/fixtures/damaged_pstree_truncated.log")),
            ("pstree.img", include_str!("../tests/fixtures/damaged_pstree_magic.log")),
            ("inventory.img", include_str!("../tests/fixtures/damaged_inventory_magic.log")),
            ("inventory.img", include_str!("../tests/fixtures/damaged_no_images.log")),
            ("pages-*.img", include_str!("../tests/fixtures/damaged_pages_truncated.log")),
        ];
        for (file, log) in cases {
            fixture(Cause::DamagedImage { file: Some(file.to_owned()) }, log);
        }
    }

    #[test]
    fn network_lock() {
        // The first error is the generic "exited, status=127" of the iptables child.
        fixture(Cause::NetworkLock, include_str!("../tests/fixtures/network_lock_iptables.log"));
    }

    #[test]
    fn address_in_use() {
        fixture(Cause::AddressInUse, include_str!("../tests/fixtures/address_in_use.log"));
    }

    #[test]
    fn unknown_keeps_first_real_error() {
        fixture(
            Cause::Unknown {
                first_error: Some(
                    "(00.036744) Error (criu/log.c:416): pidfile: Can't open /nonexistent/dir/pid: \
                     No such file or directory"
                        .to_owned(),
                ),
            },
            include_str!("../tests/fixtures/unknown_pidfile.log"),
        );
    }

    #[test]
    fn empty_and_errorless_input() {
        fixture(Cause::Unknown { first_error: None }, "");
        fixture(Cause::Unknown { first_error: None }, "\n\n   \n");
        // The harmless rlimit error alone is not a cause and not worth showing.
        let noise = "(00.04) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: \
                     Operation not permitted\n";
        fixture(Cause::Unknown { first_error: None }, noise);
        assert_eq!(first_error_line(noise), None);
    }

    #[test]
    fn specific_cause_beats_earlier_generic_one() {
        let log = "(0.1) Error (x.c:1): something odd: Operation not permitted\n\
                   (0.2) Error (criu/sk-inet.c:200): inet: Connected TCP socket, consider using \
                   --tcp-established option.\n\
                   (0.3) Error (criu/cr-dump.c:1975): Dumping FAILED.\n";
        fixture(Cause::TcpEstablished, log);
    }

    #[test]
    fn first_error_line_is_trimmed_and_capped() {
        let long = format!("  (0.1) Error (a.c:1): {}\u{e9}\u{e9}  \r\nnext", "x".repeat(400));
        let line = first_error_line(&long).unwrap_or_default();
        assert!(line.starts_with("(0.1) Error (a.c:1): xxx"));
        assert!(line.ends_with("..."));
        assert_eq!(line.chars().count(), MAX_LINE_CHARS + 3);
        let short = first_error_line("a\n\t(0.1) Error (a.c:1): \u{e9}t\u{e9}  \nb");
        assert_eq!(short.as_deref(), Some("(0.1) Error (a.c:1): \u{e9}t\u{e9}"));
    }

    #[test]
    fn hostile_input_does_not_panic() {
        let cases = [
            "Error (",
            "Error (): ",
            "Error (x): Can't fork for 99999999999999999999: File exists",
            "Error (x): Can't fork for : File exists",
            "Error (x): Can't dump file ",
            "Error (x): Can't dump file 3 of that type [1] (",
            "Error (x): Can't open file ",
            "Error (x): File  has bad ",
            "Error (x): Read 1 bytes while 2 expected from ",
            "Error (x): Unexpected EOF on (empty-image)",
            "Error (x): Head magic doesn't match for ",
            "Warn  (x): Unable to interrupt task: -5 (No such process)",
            "Error (x): could not be obtained for file ",
            ") No  image",
            "Preadv \n`- returned 0\nPreadv\n`- returned 0",
            "\u{0}\u{feff}Error (\u{1F600}): \u{1F600}",
        ];
        for case in cases {
            let cause = classify_log(case);
            assert!(!cause.summary().is_empty());
            assert!(!cause.hint().is_empty());
        }
        assert_eq!(
            classify_log("Error (x): Can't fork for 99999999999999999999: File exists"),
            Cause::PidInUse { pid: None }
        );
        assert_eq!(
            classify_log("Error (x): Unexpected EOF on (empty-image)"),
            Cause::DamagedImage { file: None }
        );
    }

    #[test]
    fn large_log_is_scanned_quickly() {
        // Linear scan: 200k lines of restorer noise plus one error at the end.
        let mut log = "(00.1) pie: 1: Preadv 0x1000:4096... (1 iovs)\n(00.1) pie: 1: `- returned 4096\n"
            .repeat(100_000);
        log.push_str("(00.2) Error (criu/cr-restore.c:1237): Can't fork for 42: File exists\n");
        assert_eq!(classify_log(&log), Cause::PidInUse { pid: Some(42) });
    }

    #[test]
    fn every_cause_has_one_line_texts() {
        let all = [
            Cause::NotPermitted,
            Cause::PidInUse { pid: Some(1) },
            Cause::PidInUse { pid: None },
            Cause::ProcessNotFound { pid: Some(1) },
            Cause::ProcessNotFound { pid: None },
            Cause::ExternalUnixSocket,
            Cause::ExternalFile { path: Some("/a".to_owned()) },
            Cause::ExternalFile { path: None },
            Cause::ExternalMount,
            Cause::UnsupportedObject { what: "x".to_owned() },
            Cause::TcpEstablished,
            Cause::TcpInFlight,
            Cause::AddressInUse,
            Cause::NoSpace,
            Cause::DamagedImage { file: Some("a.img".to_owned()) },
            Cause::DamagedImage { file: None },
            Cause::NetworkLock,
            Cause::Unknown { first_error: Some("(0.1) Error (a.c:1): boom".to_owned()) },
            Cause::Unknown { first_error: None },
        ];
        for cause in all {
            for text in [cause.summary(), cause.hint()] {
                assert!(!text.is_empty() && !text.contains('\n') && !text.contains("  "), "{text:?}");
            }
        }
        assert_eq!(
            Cause::Unknown { first_error: Some("(0.1) Error (a.c:1): boom".to_owned()) }.summary(),
            "CRIU failed: boom"
        );
        assert!(Cause::TcpEstablished.hint().contains("`--tcp-established`"));
        assert!(Cause::PidInUse { pid: Some(7) }.hint().contains("`ferry restore NAME`"));
    }
}
