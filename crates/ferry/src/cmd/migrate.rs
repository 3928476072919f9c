//! `ferry migrate` and `ferry node status`: requests to a node's agent over its local socket,
//! with a progress bar while it works (the agent's events) and a report at the end.

use crate::output::outln;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ferry_migrate::api::{Event, MigrateRequest, Request};
use ferry_migrate::MigrateError;

use crate::cli::Cli;
use crate::cmd::human_bytes;
use crate::exit::Exit;
use crate::progress::Bar;
use ferry_runtime::Progress;

/// The agent's socket: `--socket`, or the lab node's agent for `--node`.
pub fn agent_socket(cli: &Cli) -> Result<PathBuf, MigrateError> {
    match &cli.node {
        None => Ok(cli.socket.clone()),
        Some(node) => {
            let config = ferry_lab::LabConfig::select(std::env::var("FERRY_LAB").ok().as_deref())?;
            let lab = ferry_lab::Lab::load(&config)?;
            lab.node(node)?;
            Ok(ferry_migrate::lab_agents::agent_socket(config.state_dir(), node))
        }
    }
}

pub fn run(cli: &Cli, req: MigrateRequest, report_json: Option<&Path>, force: bool) -> ExitCode {
    let what = format!("migration of {} to {} failed", req.workload, req.to);
    // Before the agent freezes anything: a blocker is refused with its reasons (exit 11).
    if !force {
        if let Err(e) = super::check::refuse_not_ready(cli, &req.workload, None, Some(&req.to)) {
            crate::exit::report(&what, &e);
            return crate::exit::classify(&e).into();
        }
    }
    let socket = match agent_socket(cli) {
        Ok(s) => s,
        Err(e) => return fail(&what, &e.to_string(), e.hint()),
    };
    let to = req.to.clone();
    let req = Request::Migrate(req);
    let bar = Bar::new("migrate");
    // The last phase the agent reported: where the migration was if the agent goes away.
    let mut phase = String::new();
    let last = ferry_migrate::client::call(&socket, &req, &mut |ev| {
        if let Event::Phase(p) = ev {
            phase = p.clone();
        }
        match ev {
            Event::Phase(p) => bar.stage(p, None),
            Event::Progress(p) => bar.show(&p.phase, p.done, p.total),
            _ => {}
        }
    });
    bar.finish();
    match last {
        Ok(Event::Report(r)) => {
            outln!(
                "migrated {} to {} as {} ({}; {})",
                r.workload,
                r.to,
                r.new_workload,
                r.strategy,
                r.reason
            );
            for p in &r.phases {
                outln!("  {:<10} {:>8.3} s", p.name, p.seconds);
            }
            outln!(
                "  sent       {:>12}  (checkpoint {})",
                human_bytes(r.bytes_sent),
                human_bytes(r.logical_bytes)
            );
            outln!("  downtime   {:>8.3} s", r.downtime_s);
            outln!("  total      {:>8.3} s", r.total_s);
            if let Some(path) = report_json {
                let text = format!("{:#}\n", r.to_json());
                if let Err(e) = std::fs::write(path, text) {
                    return fail("cannot write the report", &format!("{}: {e}", path.display()), None);
                }
            }
            Exit::Ok.into()
        }
        Ok(Event::Failed { message, hint }) => fail(&what, &message, hint),
        Ok(Event::Lost { message, at, resumed }) => {
            eprintln!("error: {what} after the switch ({at})");
            eprintln!("  cause: {message}");
            if resumed {
                eprintln!("  the workload runs again at the source, from its state at the freeze: what it did on {to} since the switch is LOST");
            } else {
                eprintln!("  THE WORKLOAD WAS LOST: no copy of it runs, unless the cause says otherwise (restore it from a checkpoint of your own, or start it again)");
            }
            Exit::Lost.into()
        }
        Ok(other) => fail(&what, &format!("the agent answered {other:?}"), None),
        Err(MigrateError::Lost { .. }) if phase.starts_with("post-copy: pages") => {
            eprintln!("error: the agent went away during the post-copy pages phase, after the switch");
            eprintln!("  the workload runs on {to}; its memory still comes from this node's frozen copy, which an agent started again serves");
            eprintln!("  hint: start ferryd again here within the recover timeout, or {to} kills the workload and reports it lost");
            Exit::Failure.into()
        }
        Err(e) => fail(&what, &e.to_string(), e.hint()),
    }
}

pub fn status(cli: &Cli, json: bool) -> ExitCode {
    let socket = match agent_socket(cli) {
        Ok(s) => s,
        Err(e) => return fail("no agent", &e.to_string(), e.hint()),
    };
    match ferry_migrate::client::call(&socket, &Request::Status, &mut |_| {}) {
        Ok(Event::Status(s)) => {
            if json {
                outln!(
                    "{:#}",
                    serde_json::json!({"name": s.name, "listen": s.listen, "peers": s.peers, "public_key": s.public_key,
                        "migrations_ok": s.migrations_ok, "migrations_failed": s.migrations_failed,
                        "migrations_lost": s.migrations_lost, "arrivals_lost": s.arrivals_lost})
                );
            } else {
                outln!("node {} listening on {}", s.name, s.listen);
                outln!("  key        {}", s.public_key);
                outln!("  peers      {}", s.peers.join(", "));
                outln!("  migrations {} done, {} failed", s.migrations_ok, s.migrations_failed);
                if s.migrations_lost + s.arrivals_lost > 0 {
                    outln!(
                        "  LOST after the switch: {} workloads sent, {} arriving",
                        s.migrations_lost,
                        s.arrivals_lost
                    );
                }
            }
            Exit::Ok.into()
        }
        Ok(other) => fail("status failed", &format!("the agent answered {other:?}"), None),
        Err(e) => fail("status failed", &e.to_string(), e.hint()),
    }
}

fn fail(what: &str, cause: &str, hint: Option<String>) -> ExitCode {
    eprintln!("error: {what}");
    eprintln!("  cause: {cause}");
    if let Some(h) = hint {
        eprintln!("  hint: {h}");
    }
    Exit::Failure.into()
}
