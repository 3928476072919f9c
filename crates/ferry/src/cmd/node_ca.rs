//! `ferry node ca init|issue` and the certificate part of `ferry node show`: a cluster CA
//! admits nodes by a certificate for their key instead of a pin on every other node.
//!
//! Files:
//! ```text
//! CA_DIR/ca.pem             0600  CA certificate and private key (keep it off the nodes)
//! CA_DIR/ca-cert.pem        0600  CA certificate alone (what nodes trust)
//! STORE/keys/node-cert.pem  0600  this node's certificate, issued by the CA for its Ed25519 key
//! STORE/keys/cluster-ca.pem 0644  the CA certificate: peers it issued for are admitted
//! ```
//! ferryd uses `node-cert.pem` as its TLS certificate and trusts `cluster-ca.pem` when they
//! exist (restart it after issuing).

use crate::output::outln;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ferry_runtime::Error;
use ferry_store::keys::NodeKeys;
use ferry_store::StoreError;
use ferry_wire::tls::{CaCert, ClusterCa, Identity};

use crate::cli::{CaAction, Cli};
use crate::Outcome;

/// The CA's certificate and key, in the CA directory.
pub const CA_FILE: &str = "ca.pem";
/// The CA's certificate alone, in the CA directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// This node's certificate, in `STORE/keys/`.
pub const NODE_CERT_FILE: &str = "node-cert.pem";
/// The cluster CA's certificate, in `STORE/keys/`.
pub const CLUSTER_CA_FILE: &str = "cluster-ca.pem";

pub fn run(cli: &Cli, action: &CaAction) -> Outcome {
    match action {
        CaAction::Init { dir, name } => init(dir, name),
        CaAction::Issue { ca, name } => issue(cli, ca, name.as_deref()),
    }
}

fn init(dir: &Path, name: &str) -> Outcome {
    let what = || format!("cannot create a cluster CA in {}", dir.display());
    if dir.join(CA_FILE).exists() || dir.join(CA_CERT_FILE).exists() {
        let e = io::Error::new(io::ErrorKind::AlreadyExists, "a cluster CA is already there");
        return Err((what(), io_error("refusing to overwrite", &dir.join(CA_FILE), e)));
    }
    let ca = ClusterCa::generate(name).map_err(|e| (what(), wire_error(dir, e)))?;
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| (what(), io_error("cannot create", dir, e)))?;
    // An existing directory keeps its mode from before: tighten it, the key goes in it.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| (what(), io_error("cannot restrict", dir, e)))?;
    write_new(&dir.join(CA_FILE), ca.to_pem().as_bytes(), 0o600).map_err(|e| (what(), e))?;
    write_new(&dir.join(CA_CERT_FILE), ca.cert_pem().as_bytes(), 0o600).map_err(|e| (what(), e))?;
    outln!("created cluster CA {name:?} in {}", dir.display());
    outln!("  {}: certificate and private key: keep it on this machine only", dir.join(CA_FILE).display());
    outln!("issue a certificate on each node with `ferry node ca issue --ca {}`", dir.display());
    crate::ok()
}

fn issue(cli: &Cli, ca_dir: &Path, name: Option<&str>) -> Outcome {
    let what = || "cannot issue this node's certificate".to_owned();
    ferry_runtime::require_root().map_err(|e| (what(), e))?;
    // `--ca` names the directory `init` made; the file in it is accepted too.
    let ca_file = if ca_dir.is_dir() { ca_dir.join(CA_FILE) } else { ca_dir.to_path_buf() };
    let pem = fs::read_to_string(&ca_file).map_err(|e| (what(), io_error("cannot read", &ca_file, e)))?;
    let ca = ClusterCa::from_pem(&pem).map_err(|e| (what(), wire_error(&ca_file, e)))?;
    let name = match name {
        Some(n) => n.to_owned(),
        None => hostname().map_err(|e| (what(), e))?,
    };
    let keys_dir = cli.store.join("keys");
    fs::create_dir_all(&cli.store).map_err(|e| (what(), io_error("cannot create", &cli.store, e)))?;
    let keys = NodeKeys::load_or_init(&keys_dir).map_err(|e| (what(), Error::Store(StoreError::Key(e))))?;
    let identity = Identity::issued(&keys.identity_seed(), &name, &ca)
        .map_err(|e| (what(), wire_error(&keys_dir.join(NODE_CERT_FILE), e)))?;
    let cert = keys_dir.join(NODE_CERT_FILE);
    write_replace(&cert, identity.cert_pem().as_bytes(), 0o600).map_err(|e| (what(), e))?;
    let trusted = keys_dir.join(CLUSTER_CA_FILE);
    write_replace(&trusted, ca.cert_pem().as_bytes(), 0o644).map_err(|e| (what(), e))?;
    outln!("issued a certificate for {name:?} by cluster CA {:?}: {}", ca.name(), cert.display());
    outln!("this node now trusts nodes with a certificate from that CA: {}", trusted.display());
    outln!("restart ferryd for it to use them");
    crate::ok()
}

/// The certificate lines of `ferry node show`.
pub fn show(cli: &Cli) {
    let keys_dir = cli.store.join("keys");
    for line in cert_lines(&keys_dir) {
        outln!("{line}");
    }
}

fn cert_lines(keys_dir: &Path) -> Vec<String> {
    let cert_path = keys_dir.join(NODE_CERT_FILE);
    let ca_path = keys_dir.join(CLUSTER_CA_FILE);
    let mut out = Vec::new();
    let ca = match fs::read(&ca_path) {
        Ok(b) => match CaCert::parse(&b) {
            Ok(c) => {
                out.push(format!("cluster CA: {:?} ({}): its nodes are admitted", c.name, ca_path.display()));
                Some(c)
            }
            Err(e) => {
                out.push(format!("cluster CA: {} is not usable: {e}", ca_path.display()));
                None
            }
        },
        Err(_) => {
            out.push("cluster CA: none (only pinned nodes are admitted)".into());
            None
        }
    };
    let Ok(cert) = fs::read(&cert_path) else {
        out.push("certificate: self-signed (peers must pin this node's key, or issue one with `ferry node ca issue`)".into());
        return out;
    };
    let identity = NodeKeys::load(keys_dir)
        .map_err(|e| e.to_string())
        .and_then(|k| Identity::from_cert(&k.identity_seed(), &cert).map_err(|e| e.to_string()));
    match identity {
        Err(e) => out.push(format!("certificate: {} is not usable: {e}", cert_path.display())),
        Ok(id) => {
            let issuer = id.issuer().unwrap_or_else(|| "itself".into());
            let check = match &ca {
                Some(c) => match c.check_issued(&id) {
                    Ok(()) => "valid for the cluster CA".to_owned(),
                    Err(r) => format!("NOT accepted by the cluster CA above: {r}"),
                },
                None => "no cluster CA to check it against".to_owned(),
            };
            out.push(format!(
                "certificate: CA-issued for {:?} by {issuer:?} ({}), {check}",
                id.name(),
                cert_path.display()
            ));
        }
    }
    out
}

/// The machine's host name (the default node name in a certificate).
fn hostname() -> Result<String, Error> {
    let path = Path::new("/proc/sys/kernel/hostname");
    let name = fs::read_to_string(path).map_err(|e| io_error("cannot read", path, e))?;
    Ok(name.trim().to_owned())
}

/// Writes a file that must not exist yet, with `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io_error("cannot create", path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| io_error("cannot write", path, e))
}

/// Replaces `path` atomically (a temporary file beside it, renamed), with `mode`.
fn write_replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file}.tmp"));
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, bytes, mode)?;
    // The umask may have narrowed the mode of the new file.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(|e| io_error("cannot chmod", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_error("cannot replace", path, e))
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Store(StoreError::Io { action, path: PathBuf::from(path), source })
}

fn wire_error(path: &Path, e: ferry_wire::WireError) -> Error {
    io_error("cannot use", path, io::Error::other(e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn keys(dir: &Path) -> PathBuf {
        let k = dir.join("keys");
        NodeKeys::init(&k).unwrap();
        k
    }

    #[test]
    fn show_says_what_is_there() {
        let tmp = tempfile::tempdir().unwrap();
        let k = keys(tmp.path());
        let lines = cert_lines(&k).join("\n");
        assert!(lines.contains("cluster CA: none"), "{lines}");
        assert!(lines.contains("certificate: self-signed"), "{lines}");

        let ca = ClusterCa::generate("test CA").unwrap();
        let seed = NodeKeys::load(&k).unwrap().identity_seed();
        let id = Identity::issued(&seed, "node1", &ca).unwrap();
        write_replace(&k.join(NODE_CERT_FILE), id.cert_pem().as_bytes(), 0o600).unwrap();
        write_replace(&k.join(CLUSTER_CA_FILE), ca.cert_pem().as_bytes(), 0o644).unwrap();
        assert_eq!(fs::metadata(k.join(CLUSTER_CA_FILE)).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(fs::metadata(k.join(NODE_CERT_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        let lines = cert_lines(&k).join("\n");
        assert!(lines.contains("cluster CA: \"test CA\""), "{lines}");
        assert!(lines.contains("CA-issued for \"node1\" by \"test CA\""), "{lines}");
        assert!(lines.contains("valid for the cluster CA"), "{lines}");

        let other = ClusterCa::generate("other CA").unwrap();
        write_replace(&k.join(CLUSTER_CA_FILE), other.cert_pem().as_bytes(), 0o644).unwrap();
        let lines = cert_lines(&k).join("\n");
        assert!(lines.contains("NOT accepted by the cluster CA"), "{lines}");

        // A certificate for another key (keys rotated, or copied from another node).
        let stranger = Identity::issued(&[7; 32], "node1", &ca).unwrap();
        write_replace(&k.join(NODE_CERT_FILE), stranger.cert_pem().as_bytes(), 0o600).unwrap();
        let lines = cert_lines(&k).join("\n");
        assert!(lines.contains("is not usable") && lines.contains("not for this node's key"), "{lines}");
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        init(&dir, "test CA").unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        for f in [CA_FILE, CA_CERT_FILE] {
            assert_eq!(fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
        }
        let before = fs::read(dir.join(CA_FILE)).unwrap();
        let ca = ClusterCa::from_pem(&String::from_utf8(before.clone()).unwrap()).unwrap();
        assert_eq!(ca.name(), "test CA");
        let (_, e) = init(&dir, "test CA").unwrap_err();
        assert!(
            matches!(&e, Error::Store(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists),
            "{e:?}"
        );
        assert_eq!(fs::read(dir.join(CA_FILE)).unwrap(), before);
    }
}
