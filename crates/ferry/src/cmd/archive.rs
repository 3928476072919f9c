use crate::output::outln;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use ferry_runtime::archive::{default_image_reference, ExportRequest};
use ferry_runtime::Error;
use ferry_store::archive::ExportMode;
use ferry_store::{keys, StoreError};

use super::{human_bytes, open_store};
use crate::cli::Cli;
use crate::progress::Bar;
use crate::Outcome;

/// What `ferry export` was asked for.
#[derive(Debug, Clone, Copy)]
pub struct How<'a> {
    pub plaintext: bool,
    pub oci_image: bool,
    pub tag: Option<&'a str>,
    pub rootfs_image: Option<&'a str>,
    pub only_for: &'a [String],
}

pub fn export(cli: &Cli, name: &str, out: &Path, how: &How<'_>) -> Outcome {
    let what = || format!("export of {name} failed");
    let usage = |why: &str| (what(), Error::Usage(why.to_owned()));
    if how.oci_image && !how.plaintext {
        return Err(usage(
            "an OCI checkpoint image holds the container's memory in the clear (images cannot be encrypted): \
             add --plaintext to say that this is wanted",
        ));
    }
    if how.rootfs_image.is_some() && !how.plaintext {
        return Err(usage("--rootfs-image names the image Podman restores from: it needs --plaintext"));
    }
    if how.plaintext && !how.only_for.is_empty() {
        return Err(usage("--for names recipients of an encrypted export: it cannot go with --plaintext"));
    }
    ferry_runtime::require_root().map_err(|e| (what(), e))?;
    let store = open_store(cli).map_err(|e| (what(), e))?;
    let mode = if how.oci_image {
        ExportMode::OciImage {
            reference: how.tag.map_or_else(|| default_image_reference(name), str::to_owned),
            directory: out.as_os_str().as_bytes().ends_with(b"/"),
        }
    } else if how.plaintext {
        ExportMode::Plaintext
    } else {
        let all =
            keys::recipients(&store.keys_dir()).map_err(|e| (what(), Error::Store(StoreError::Key(e))))?;
        let recipients = if how.only_for.is_empty() {
            let mut r = vec![store.keys().public().x25519];
            r.extend(all.iter().map(|(_, p)| p.x25519));
            r
        } else {
            how.only_for
                .iter()
                .map(|want| {
                    all.iter().find(|(n, _)| n == want).map(|(_, p)| p.x25519).ok_or_else(|| {
                        (
                            what(),
                            Error::Store(StoreError::NoKey {
                                name: want.clone(),
                                detail: "no such recipient (`ferry keys show` lists them)".into(),
                            }),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        ExportMode::Encrypted { recipients }
    };
    let reference = match &mode {
        ExportMode::OciImage { reference, .. } => Some(reference.clone()),
        _ => None,
    };
    let bar = Bar::new("export");
    let req = ExportRequest { name, out, mode, rootfs_image: how.rootfs_image, progress: &*bar };
    let r = ferry_runtime::archive::export(&store, &req).map_err(|e| (what(), e))?;
    bar.finish();
    if how.plaintext {
        // After the fact, so that a refused export's stderr starts with its error.
        eprintln!(
            "warning: {} holds the process's memory in the clear: anyone who can read it can read \
             every secret the process had",
            out.display()
        );
    }
    outln!(
        "exported {name} to {} ({}, {} image files, {})",
        out.display(),
        r.mode,
        r.files,
        human_bytes(r.bytes)
    );
    if let (Some(reference), Some(id)) = (reference, &r.image_id) {
        let short = &id[..id.len().min(12)];
        if out.as_os_str().as_bytes().ends_with(b"/") {
            let dir = out.to_string_lossy();
            outln!(
                "image {short} (as {reference}): `podman pull oci:{}` (Podman 4 names it after the \
                 directory, whose path must then be lowercase), then `podman container restore {short}`",
                dir.trim_end_matches('/')
            );
        } else {
            outln!(
                "image {short} ({reference}): `podman load -i {}`, then `podman container restore {reference}`",
                out.display()
            );
        }
    }
    crate::ok()
}

pub fn import(cli: &Cli, file: &Path, name: Option<&str>) -> Outcome {
    let what = || format!("import of {} failed", file.display());
    ferry_runtime::require_root().map_err(|e| (what(), e))?;
    let store = open_store(cli).map_err(|e| (what(), e))?;
    let bar = Bar::new("import");
    let c = ferry_runtime::archive::import(&store, file, name, &*bar).map_err(|e| (what(), e))?;
    bar.finish();
    let m = &c.checkpoint.manifest;
    outln!(
        "imported {} as {} ({}: {} of images, {} new on disk)",
        file.display(),
        m.name,
        m.source,
        human_bytes(c.checkpoint.logical_size()),
        human_bytes(c.stats.stored_bytes)
    );
    crate::ok()
}
