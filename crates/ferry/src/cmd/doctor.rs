use crate::output::outln;
use ferry_criu::Criu;
use ferry_runtime::doctor::{self, Status};

use crate::cli::Cli;
use crate::exit::Exit;
use crate::Outcome;

pub fn run(cli: &Cli, json: bool) -> Outcome {
    let criu = Criu::locate(cli.criu.as_deref()).map_err(|e| e.to_string());
    // The store may be unwritable for a non-root user: doctor still reports, logging elsewhere.
    let logs = ferry_store::Store::open(&cli.store)
        .map(|s| s.logs_dir())
        .unwrap_or_else(|_| std::env::temp_dir().join("ferry-doctor"));
    let findings = doctor::run(criu, &logs);
    let ready = doctor::can_checkpoint(&findings);
    if json {
        let doc = serde_json::json!({ "ready": ready, "findings": findings });
        outln!("{doc}");
    } else {
        outln!("{:<20} {:<6} DETAIL", "CHECK", "STATUS");
        for f in &findings {
            let status = match f.status {
                Status::Ok => "ok",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
                Status::Info => "-",
            };
            outln!("{:<20} {:<6} {}", f.check, status, f.detail);
        }
        outln!();
        if ready {
            outln!("ready: this host can checkpoint and restore");
        } else {
            outln!("not ready: fix the FAIL lines above");
        }
    }
    Ok(if ready { Exit::Ok } else { Exit::Environment }.into())
}
