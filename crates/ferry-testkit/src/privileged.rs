//! The check every privileged test starts with: root, CRIU new enough, and the tools the
//! sample workloads need.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::workload::PYTHON;

/// The oldest CRIU the tests accept: 4.1 cannot dump INET sockets on this kernel (see
/// docs/MACHINE-FACTS.md).
pub const CRIU_MIN: (u32, u32, u32) = (4, 2, 0);

/// Tools the kit runs besides CRIU and Python.
const TOOLS: [&str; 4] = ["unshare", "setsid", "setpriv", "iptables-save"];

/// True when the test may go on. Otherwise: under `CI=true` it panics with the reason, since a
/// privileged test must never pass by skipping in CI; elsewhere it prints `skipped: <reason>`
/// and returns false, and the test returns early.
#[track_caller]
pub fn require_privileged() -> bool {
    decide(privileged_missing(), in_ci())
}

#[track_caller]
fn decide(missing: Option<String>, ci: bool) -> bool {
    match missing {
        None => true,
        Some(reason) if ci => panic!("privileged test cannot run in CI: {reason}"),
        Some(reason) => {
            eprintln!("skipped: {reason}");
            false
        }
    }
}

fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Why privileged tests cannot run here, or `None` if they can.
pub fn privileged_missing() -> Option<String> {
    if !ferry_sys::is_root() {
        return Some(format!("needs root (euid is {})", ferry_sys::effective_uid()));
    }
    let Some(criu) = criu_path() else {
        return Some("criu not found (PATH, /usr/local/sbin, /usr/sbin; or set FERRY_TEST_CRIU)".into());
    };
    match criu_version(&criu) {
        Some(v) if v >= CRIU_MIN => {}
        Some((a, b, c)) => {
            return Some(format!("{} is CRIU {a}.{b}.{c}; 4.2 or newer is needed", criu.display()))
        }
        None => return Some(format!("{} --version printed no version", criu.display())),
    }
    if !Path::new(PYTHON).exists() {
        return Some(format!("{PYTHON} not found"));
    }
    TOOLS.iter().find(|t| which(t).is_none()).map(|t| format!("{t} not found in PATH"))
}

/// The CRIU binary tests use: `FERRY_TEST_CRIU` if set, else `criu` in PATH, else the places
/// the project's setup installs it.
pub fn criu_path() -> Option<PathBuf> {
    if let Some(p) = env::var_os("FERRY_TEST_CRIU") {
        return Some(PathBuf::from(p));
    }
    which("criu").or_else(|| {
        ["/usr/local/sbin/criu", "/usr/sbin/criu"].iter().map(PathBuf::from).find(|p| p.is_file())
    })
}

/// The version `criu --version` reports, as (major, minor, patch).
pub fn criu_version(criu: &Path) -> Option<(u32, u32, u32)> {
    let out = Command::new(criu).arg("--version").stdin(Stdio::null()).output().ok()?;
    parse_criu_version(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `Version: 4.2.1` (the patch level may be missing: `Version: 4.2`).
pub fn parse_criu_version(text: &str) -> Option<(u32, u32, u32)> {
    let line = text.lines().find_map(|l| l.trim().strip_prefix("Version:"))?;
    let mut parts = line.trim().split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().unwrap_or(Some(0))?;
    Some((major, minor, patch))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_criu_version("Version: 4.2.1\n"), Some((4, 2, 1)));
        assert_eq!(parse_criu_version("Version: 4.2\nGitID: v4.2\n"), Some((4, 2, 0)));
        assert_eq!(parse_criu_version("Version: 3.17.1"), Some((3, 17, 1)));
        assert_eq!(parse_criu_version("Version: four"), None);
        assert_eq!(parse_criu_version(""), None);
        // 4.1.1 starts here but cannot dump INET sockets; 4.2.1 is what setup installs.
        assert!(parse_criu_version("Version: 4.1.1") < Some(CRIU_MIN));
        assert!(parse_criu_version("Version: 4.2.1") >= Some(CRIU_MIN));
    }

    #[test]
    fn missing_requirements_skip_outside_ci() {
        assert!(decide(None, true));
        assert!(decide(None, false));
        assert!(!decide(Some("no criu".into()), false));
    }

    #[test]
    #[should_panic(expected = "cannot run in CI: no criu")]
    fn missing_requirements_fail_in_ci() {
        decide(Some("no criu".into()), true);
    }

    #[test]
    fn this_machine_is_privileged() {
        // The kit's own tests run as root here; in CI a missing piece must fail loudly.
        if require_privileged() {
            let criu = criu_path().expect("criu found");
            assert!(criu_version(&criu).expect("version") >= CRIU_MIN);
        }
    }
}
