//! The CRIU configuration file a container's restore runs with.
//!
//! A runtime restores a container by running `runc restore`, which passes CRIU the file named
//! by the spec's `org.criu.config` annotation, and CRIU lets that file override what runc asks
//! for over RPC (`images-dir`, `work-dir` and the rest). ferry writes one per restore: CRIU then
//! reads the images where ferry verified them (a private tmpfs, never the runtime's storage),
//! logs where ferry keeps its logs, and, for a lazy restore, hands the restored processes'
//! memory to ferry's own pager, whose socket is in that work directory.

use std::path::{Path, PathBuf};

use crate::Error;

/// The annotation runc reads the file's path from.
pub const ANNOTATION: &str = "org.criu.config";
/// CRIU's log of the restore, in the work directory.
pub const LOG_FILE: &str = "restore.log";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuConfig {
    pub images_dir: PathBuf,
    /// Where CRIU logs, and where a lazy restore finds `lazy-pages.socket`.
    pub work_dir: PathBuf,
    pub lazy_pages: bool,
    pub tcp_established: bool,
}

impl CriuConfig {
    pub fn text(&self) -> Result<String, Error> {
        let mut out = String::new();
        for (key, path) in [("images-dir", &self.images_dir), ("work-dir", &self.work_dir)] {
            let s = path.to_str().filter(|s| plain(s)).ok_or_else(|| {
                Error::Container(format!(
                    "{} cannot be written into a CRIU configuration file",
                    path.display()
                ))
            })?;
            out.push_str(&format!("{key} {s}\n"));
        }
        out.push_str(&format!("log-file {LOG_FILE}\n"));
        // ferry's dumps lock held connections with nftables; a restore must unlock the same way.
        out.push_str("network-lock nftables\n");
        if self.tcp_established {
            out.push_str("tcp-established\n");
        }
        if self.lazy_pages {
            out.push_str("lazy-pages\n");
        }
        Ok(out)
    }

    /// Writes the file at `path` (0600).
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let text = self.text()?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::Container(format!("cannot write {}: {e}", path.display())))?;
        f.write_all(text.as_bytes())
            .map_err(|e| Error::Container(format!("cannot write {}: {e}", path.display())))
    }

    pub fn log_path(&self) -> PathBuf {
        self.work_dir.join(LOG_FILE)
    }
}

/// CRIU's configuration parser splits on blanks and knows no escapes.
fn plain(s: &str) -> bool {
    s.starts_with('/')
        && !s.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '#'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_overrides_and_refuses_odd_paths() {
        let c = CriuConfig {
            images_dir: "/var/lib/ferry/tmp/x/images".into(),
            work_dir: "/var/lib/ferry/logs/r".into(),
            lazy_pages: true,
            tcp_established: true,
        };
        let t = c.text().expect("text");
        assert!(t.contains("images-dir /var/lib/ferry/tmp/x/images\n"));
        assert!(t.contains("work-dir /var/lib/ferry/logs/r\n"));
        assert!(t.contains("lazy-pages\n") && t.contains("tcp-established\n"));
        let odd = CriuConfig { images_dir: "/a b".into(), ..c.clone() };
        assert!(odd.text().is_err());
        let odd = CriuConfig { work_dir: "relative".into(), ..c };
        assert!(odd.text().is_err());
    }
}
