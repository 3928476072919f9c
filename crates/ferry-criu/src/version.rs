//! CRIU versions and the minimum ferry accepts.

use std::fmt;

/// A CRIU release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub sublevel: u32,
}

/// CRIU 4.1 cannot dump any INET socket on kernels >= 6.16 and 3.17 fails at start on this
/// kernel's vDSO; 4.2 is the first release that works (docs/criu.md).
pub const MIN_VERSION: Version = Version { major: 4, minor: 2, sublevel: 0 };

impl Version {
    /// Parses `criu --version` output (`Version: 4.2.1`, possibly followed by `GitID: ...`).
    pub fn parse_cli_output(text: &str) -> Option<Version> {
        let line = text.lines().find_map(|l| l.trim().strip_prefix("Version:"))?;
        Version::parse(line.trim())
    }

    /// Parses `4.2` or `4.2.1`.
    pub fn parse(s: &str) -> Option<Version> {
        let mut parts = s.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let sublevel = match parts.next() {
            Some(p) => p.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()?,
            None => 0,
        };
        Some(Version { major, minor, sublevel })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cli_output() {
        let v = Version::parse_cli_output("Version: 4.2.1\nGitID: v4.2.1\n").expect("parse");
        assert_eq!(v, Version { major: 4, minor: 2, sublevel: 1 });
        assert!(v >= MIN_VERSION);
        assert_eq!(v.to_string(), "4.2.1");
    }

    #[test]
    fn older_versions_compare_lower() {
        assert!(Version::parse("3.17.1").expect("parse") < MIN_VERSION);
        assert!(Version::parse("4.1").expect("parse") < MIN_VERSION);
        assert!(Version::parse("4.10").expect("parse") > MIN_VERSION);
    }

    #[test]
    fn rejects_nonsense() {
        assert_eq!(Version::parse("four"), None);
        assert_eq!(Version::parse_cli_output("criu: command not found"), None);
    }
}
