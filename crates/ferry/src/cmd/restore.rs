use crate::output::outln;
use std::fs;
use std::path::Path;
use std::process::ExitCode;

use ferry_runtime::{Error, RestoreRequest};
use ferry_store::StoreError;

use super::context;
use crate::cli::Cli;
use crate::progress::Bar;
use crate::Outcome;

pub fn run(
    cli: &Cli,
    name: &str,
    new_name: Option<&str>,
    detach: bool,
    pidfile: Option<&Path>,
    lazy: bool,
) -> Outcome {
    let what = || format!("restore of {name} failed");
    let bar = Bar::new("restore");
    let ctx = context(cli).map_err(|e| (what(), e))?.with_progress(bar.clone());
    // A lazy restore's guard is this program, started again as `ferry guard NAME`.
    let guard = std::env::current_exe().ok().map(|exe| vec![exe.display().to_string(), "guard".to_owned()]);
    let req = RestoreRequest {
        name: name.to_owned(),
        new_name: new_name.map(str::to_owned),
        lazy,
        guard,
        ..Default::default()
    };
    let report = ferry_runtime::restore(&ctx, &req).map_err(|e| (what(), e))?;
    bar.finish();
    if let Some(path) = pidfile {
        fs::write(path, format!("{}\n", report.pid)).map_err(|source| {
            let err =
                StoreError::Io { action: "cannot write the pid file", path: path.to_path_buf(), source };
            (format!("restored {name} as pid {}, but", report.pid), Error::Store(err))
        })?;
    }
    if let Some(container) = &report.container {
        // Its runtime runs it now: nothing to wait for.
        outln!("restored {name} as {container} (pid {}) in {:.2}s", report.pid, report.seconds);
        return crate::ok();
    }
    if report.paged_bytes > 0 {
        outln!(
            "restored {name} as pid {}: running after {:.2}s, memory complete after {:.2}s ({:.1} MiB through ferry's pager)",
            report.pid,
            report.seconds,
            report.complete_seconds,
            report.paged_bytes as f64 / f64::from(1u32 << 20)
        );
    } else {
        outln!("restored {name} as pid {} in {:.2}s", report.pid, report.seconds);
    }
    if detach {
        return crate::ok();
    }
    // CRIU restored the tree as our child: wait for it, and end as it ends.
    match ferry_sys::wait_child(report.pid) {
        Ok(exit) => Ok(ExitCode::from(exit.shell_code().clamp(0, 255) as u8)),
        Err(e) => {
            eprintln!("warning: cannot wait for pid {}: {e}; it keeps running", report.pid);
            crate::ok()
        }
    }
}
