//! What a failed (or finished) operation must not leave behind: stopped or traced tasks, CRIU's
//! firewall rules, mounts under the store.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::procs::descendants;

/// Panics unless `pid` is alive and neither it, any of its threads nor any descendant is
/// stopped (`T`), in tracing stop (`t`) or traced: CRIU freezes tasks by ptrace, and a failed
/// dump must let go of them.
#[track_caller]
pub fn assert_not_stopped(pid: i32) {
    assert!(ferry_sys::process_exists(pid), "process {pid} is gone");
    for p in std::iter::once(pid).chain(descendants(pid)) {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let stat = fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
            assert!(
                !matches!(state, Some("T") | Some("t")),
                "task {} of {p} left stopped (state {state:?})",
                task.file_name().to_string_lossy()
            );
            let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let tracer = status.lines().find_map(|l| l.strip_prefix("TracerPid:")).map(str::trim);
            assert!(matches!(tracer, None | Some("0")), "task of {p} still traced by {tracer:?}");
        }
    }
}

/// Everything of CRIU's network lock present now: iptables and ip6tables rules carrying its mark
/// 0xC114 or naming a chain CRIU, one entry per rule, and nftables tables named CRIU-*, one
/// entry per table (its whole listing).
pub fn criu_firewall_rules() -> Vec<String> {
    let mut rules = criu_lines(&command_output("iptables-save", &[]));
    rules.extend(criu_lines(&command_output("ip6tables-save", &[])));
    rules.extend(criu_nft_tables(&command_output("nft", &["list", "ruleset"])));
    rules
}

fn criu_lines(dump: &str) -> Vec<String> {
    dump.lines()
        .filter(|l| l.to_ascii_lowercase().contains("c114") || l.contains("CRIU"))
        .map(str::to_string)
        .collect()
}

/// The `table ... CRIU-* { ... }` blocks of an `nft list ruleset` listing.
fn criu_nft_tables(ruleset: &str) -> Vec<String> {
    let mut tables = Vec::new();
    let mut current: Option<String> = None;
    for line in ruleset.lines() {
        if line.starts_with("table ") {
            current = line.contains(" CRIU-").then(String::new);
        }
        if let Some(table) = current.as_mut() {
            table.push_str(line);
            table.push('\n');
            // A table's closing brace is the only one at the start of a line.
            if line == "}" {
                tables.extend(current.take());
            }
        }
    }
    tables
}

/// The rules among `rules` that name TCP port `port`: iptables rules by `--sport`/`--dport`,
/// nftables tables by the `addr . port . addr . port` elements of their connection sets. CRIU
/// locks each connection by its ports, so this tells one test's leftovers from another's.
pub fn rules_for_port(rules: &[String], port: u16) -> Vec<String> {
    rules.iter().filter(|r| names_port(r, port)).cloned().collect()
}

fn names_port(rule: &str, port: u16) -> bool {
    let p = port.to_string();
    let words: Vec<&str> =
        rule.split(|c: char| c.is_whitespace() || ",{}".contains(c)).filter(|w| !w.is_empty()).collect();
    (0..words.len()).any(|i| {
        let before = i.checked_sub(1).map(|b| words[b]);
        words[i] == p
            && (before.is_some_and(|b| b == "." || b.trim_start_matches('-').ends_with("port"))
                || words.get(i + 1) == Some(&"."))
    })
}

/// Panics if CRIU left any firewall rule for TCP port `port`.
#[track_caller]
pub fn assert_no_criu_rules_for_port(port: u16) {
    let left = rules_for_port(&criu_firewall_rules(), port);
    assert!(left.is_empty(), "CRIU firewall rules left for port {port}:\n{}", left.join("\n"));
}

/// Deletes CRIU's network-lock rules naming `port`: iptables rules (from `iptables-save`'s
/// `-A CHAIN ...` lines of the filter table) and whole nftables CRIU-* tables. Cleanup after a
/// failed test; it asserts nothing.
pub fn remove_criu_rules_for_port(port: u16) {
    for (save, tool) in [("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")] {
        let rules = criu_lines(&command_output(save, &["-t", "filter"]));
        for rule in rules_for_port(&rules, port) {
            let Some(spec) = rule.strip_prefix("-A ") else {
                continue;
            };
            quiet(Command::new(tool).args(["-w", "-t", "filter", "-D"]).args(spec.split_whitespace()));
        }
    }
    let tables = criu_nft_tables(&command_output("nft", &["list", "ruleset"]));
    for table in rules_for_port(&tables, port) {
        // "table inet CRIU-... {": family and name.
        let head: Vec<&str> = table.split_whitespace().take(3).collect();
        if let [_, family, name] = head[..] {
            quiet(Command::new("nft").args(["delete", "table", family, name]));
        }
    }
}

fn quiet(cmd: &mut Command) {
    let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Removes CRIU's leftover rules for some ports when dropped, so that a test failing between a
/// `--tcp-established` checkpoint and its restore does not leave connections locked.
#[derive(Debug)]
pub struct FirewallGuard {
    ports: Vec<u16>,
}

impl FirewallGuard {
    pub fn new(ports: &[u16]) -> FirewallGuard {
        FirewallGuard { ports: ports.to_vec() }
    }
}

impl Drop for FirewallGuard {
    fn drop(&mut self) {
        for port in &self.ports {
            remove_criu_rules_for_port(*port);
        }
    }
}

/// The nftables tables (`inet` family) of CRIU's network lock present now that belong to the
/// dump whose images are in `images`: CRIU names them `CRIU-` and the start of the dump's run
/// id, which the dump's `inventory.img` holds.
pub fn criu_lock_tables_of(images: &Path) -> Vec<String> {
    let inventory = fs::read(images.join("inventory.img")).unwrap_or_default();
    let ids = run_ids(&inventory);
    present_lock_tables()
        .into_iter()
        .filter(|t| {
            let id = &t["CRIU-".len()..];
            id.len() >= 8 && ids.iter().any(|run| run.starts_with(id))
        })
        .collect()
}

/// Deletes an nftables table of CRIU's network lock (`inet` family); cleanup, asserts nothing.
pub fn delete_lock_table(name: &str) {
    if name.starts_with("CRIU-") {
        quiet(Command::new("nft").args(["delete", "table", "inet", name]));
    }
}

/// Names of the `inet` tables named CRIU-* present now: CRIU's network locks.
pub fn present_lock_tables() -> Vec<String> {
    let listing = command_output("nft", &["list", "tables"]);
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .filter(|n| n.starts_with("CRIU-"))
        .map(str::to_string)
        .collect()
}

/// The UUID-shaped strings (36 characters of hex digits and dashes) in a binary image.
pub(crate) fn run_ids(bytes: &[u8]) -> Vec<String> {
    let is_id_byte = |b: &u8| b.is_ascii_hexdigit() || *b == b'-';
    bytes
        .split(|b| !is_id_byte(b))
        .filter(|run| run.len() == 36 && run.iter().filter(|b| **b == b'-').count() == 4)
        .map(|run| String::from_utf8_lossy(run).into_owned())
        .collect()
}

/// Mount points at or below `path`, from /proc/self/mountinfo.
pub fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mount_points(&info).into_iter().filter(|m| m.starts_with(&path)).collect()
}

/// Panics if anything is mounted at or below `path`.
#[track_caller]
pub fn assert_no_mounts_under(path: &Path) {
    let left = mounts_under(path);
    assert!(left.is_empty(), "mounts left under {}: {left:?}", path.display());
}

fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    // Field 5 is the mount point, with space, tab, newline and backslash written as \ooo.
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).map(|m| PathBuf::from(unescape(m))).collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "*filter\n:INPUT ACCEPT [0:0]\n\
        -A INPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m mark ! --mark 0xc114 -m tcp --sport 56378 --dport 45678 -j DROP\n\
        -A OUTPUT -s 127.0.0.1/32 -d 127.0.0.1/32 -p tcp -m mark ! --mark 0xc114 -m tcp --sport 45678 --dport 56378 -j DROP\n\
        -A INPUT -p tcp -m tcp --dport 45678 -j ACCEPT\n\
        -A CRIU -j DROP\nCOMMIT\n";

    #[test]
    fn criu_rules_are_recognised_by_mark_and_chain() {
        let rules = criu_lines(SAVE);
        assert_eq!(rules.len(), 3, "{rules:?}");
        assert_eq!(rules_for_port(&rules, 45678).len(), 2);
        assert_eq!(rules_for_port(&rules, 56378).len(), 2);
        // A port number appearing elsewhere (an address, a mark) does not match.
        assert!(rules_for_port(&rules, 127).is_empty());
        assert!(rules_for_port(&rules, 4567).is_empty());
    }

    const RULESET: &str = "table ip filter {\n\tchain INPUT {\n\t}\n}\n\
        table inet CRIU-8db0b884-4e6f {\n\tset conns4 {\n\
        \t\ttype ipv4_addr . inet_service . ipv4_addr . inet_service\n\
        \t\telements = { 127.0.0.1 . 48070 . 127.0.0.1 . 45679,\n\
        \t\t\t     127.0.0.1 . 45679 . 127.0.0.1 . 48070 }\n\t}\n\
        \tchain input {\n\t\tmeta mark 0x0000c114 accept\n\t}\n}\n\
        table inet CRIU-other {\n\tchain input {\n\t\tpriority 4; policy drop;\n\t}\n}\n";

    #[test]
    fn nft_tables_match_by_the_ports_of_their_connections() {
        let tables = criu_nft_tables(RULESET);
        assert_eq!(tables.len(), 2, "{tables:?}");
        assert!(tables[0].starts_with("table inet CRIU-8db0b884-4e6f {") && tables[0].ends_with("}\n"));
        assert_eq!(rules_for_port(&tables, 45679).len(), 1);
        assert_eq!(rules_for_port(&tables, 48070).len(), 1);
        assert!(rules_for_port(&tables, 4).is_empty(), "a priority is no port");
        assert!(rules_for_port(&tables, 4567).is_empty());
    }

    #[test]
    fn real_leftovers_are_found_and_removed() {
        if !crate::require_privileged() {
            return;
        }
        // A lock table and a rule shaped like CRIU's, for a port nobody uses, under names of
        // this test's own: found by port, then removed.
        let (port, peer) = (crate::free_port(), crate::free_port());
        let table = format!("CRIU-testkit-{}", std::process::id());
        let set = format!(
            "add table inet {table}\nadd set inet {table} conns4 {{ type ipv4_addr . inet_service . ipv4_addr . \
             inet_service; }}\nadd element inet {table} conns4 {{ 127.0.0.1 . {port} . 127.0.0.1 . {peer} }}\n"
        );
        let script = tempfile::NamedTempFile::new().expect("nft script");
        fs::write(script.path(), set).expect("write nft script");
        let nft = Command::new("nft").arg("-f").arg(script.path()).status();
        let rule =
            format!("INPUT -p tcp -m mark ! --mark 0xC114 -m tcp --sport {port} --dport {peer} -j DROP");
        let ipt = Command::new("iptables").args(["-w", "-A"]).args(rule.split_whitespace()).status();
        let expected = [nft, ipt].iter().filter(|s| s.as_ref().is_ok_and(|s| s.success())).count();
        assert!(expected > 0, "neither nft nor iptables could add a rule");
        assert_eq!(rules_for_port(&criu_firewall_rules(), port).len(), expected);
        assert_eq!(rules_for_port(&criu_firewall_rules(), peer).len(), expected);
        drop(FirewallGuard::new(&[port]));
        assert_no_criu_rules_for_port(port);
        assert_no_criu_rules_for_port(peer);
    }

    #[test]
    fn run_ids_are_found_in_images() {
        let inventory = b"\x08\x02\x10\x01j$23b360e2-980c-40eb-96e8-4e0713056eee\x18\x01";
        assert_eq!(run_ids(inventory), ["23b360e2-980c-40eb-96e8-4e0713056eee"]);
        assert!(run_ids(b"0123456789abcdef0123456789abcdef0123").is_empty(), "no dashes, no id");
    }

    #[test]
    fn mountinfo_points_are_unescaped() {
        let info = "22 1 0:21 / /tmp/a\\040b rw,relatime shared:1 - tmpfs tmpfs rw\n\
                    23 1 0:22 / /proc rw - proc proc rw\n";
        assert_eq!(mount_points(info), [PathBuf::from("/tmp/a b"), PathBuf::from("/proc")]);
    }

    #[test]
    fn mounts_under_sees_real_mounts() {
        assert!(!mounts_under(Path::new("/proc")).is_empty(), "/proc is a mount point");
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(mounts_under(dir.path()).is_empty());
        assert_no_mounts_under(dir.path());
    }

    /// A child killed and reaped on drop, after an expected panic too.
    struct Reap(std::process::Child);

    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_running_process_is_not_stopped() {
        // Not this test process: its descendants include the stopped child of the next test.
        let sleep = Reap(Command::new("sleep").arg("1000").spawn().expect("spawn sleep"));
        assert_not_stopped(sleep.0.id() as i32);
    }

    #[test]
    #[should_panic(expected = "left stopped")]
    fn a_stopped_process_is_reported() {
        let sleep = Reap(Command::new("sleep").arg("1000").spawn().expect("spawn sleep"));
        let pid = sleep.0.id() as i32;
        let stopped = Command::new("kill").args(["-STOP", &pid.to_string()]).status().expect("kill -STOP");
        assert!(stopped.success());
        crate::poll(crate::WAIT, "sleep to stop", || {
            (ferry_sys::process_state(pid) == Some('T')).then_some(())
        });
        assert_not_stopped(pid);
    }
}
