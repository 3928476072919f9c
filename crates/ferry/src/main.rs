//! `ferry`: parses the command line, calls the libraries, prints results and typed exit codes.
#![forbid(unsafe_code)]

mod cli;
mod cmd;
mod exit;
mod output;
mod progress;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};
use crate::exit::Exit;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs, keys and scratch files: nothing ferry or CRIU writes is for other users to read.
    ferry_sys::private_umask();
    init_logging(cli.verbose);
    let outcome = match &cli.command {
        Command::Guard { name } => return ferry_lazy::guard::run(name),
        Command::Doctor { json } => cmd::doctor::run(&cli, *json),
        Command::Check { workload, json, trial: true, probe, trial_seconds, .. } => cmd::trial::run(
            &cli,
            cmd::trial::Args {
                workload: workload.clone(),
                json: *json,
                probe: probe.clone(),
                seconds: *trial_seconds,
            },
        ),
        Command::Check { workload, tcp_established, to, json, .. } => {
            cmd::check::run(&cli, workload, *tcp_established, to.as_deref(), *json)
        }
        Command::Checkpoint { workload, name, leave_running, tcp_established, keep, force } => {
            cmd::checkpoint::run(
                &cli,
                cmd::checkpoint::Args {
                    workload: workload.clone(),
                    name: name.clone(),
                    leave_running: *leave_running,
                    tcp_established: *tcp_established,
                    keep: *keep,
                    force: *force,
                },
            )
        }
        Command::Restore { name, new_name, detach, pidfile, lazy } => {
            cmd::restore::run(&cli, name, new_name.as_deref(), *detach, pidfile.as_deref(), *lazy)
        }
        Command::Clone {
            source,
            replicas,
            to,
            name,
            hostname_prefix,
            on_clone,
            signal,
            force,
            lazy,
            json,
            lab,
        } => cmd::clone::run(
            &cli,
            cmd::clone::Args {
                source: source.clone(),
                replicas: *replicas as usize,
                to: to.clone(),
                name: name.clone(),
                hostname_prefix: hostname_prefix.clone(),
                on_clone: on_clone.clone(),
                signal: signal.clone(),
                force: *force,
                lazy: *lazy,
                json: *json,
                lab: lab.clone(),
            },
        ),
        Command::List { json } => cmd::list::run(&cli, *json),
        Command::Verify { names } => cmd::verify::run(&cli, names),
        Command::Inspect { name, json } => cmd::inspect::run(&cli, name, *json),
        Command::Rm { names, shred } => cmd::rm::run(&cli, names, *shred),
        Command::Gc => cmd::gc::run(&cli),
        Command::Export { name, output, plaintext, oci_image, tag, rootfs_image, recipients } => {
            let how = cmd::archive::How {
                plaintext: *plaintext,
                oci_image: *oci_image,
                tag: tag.as_deref(),
                rootfs_image: rootfs_image.as_deref(),
                only_for: recipients,
            };
            cmd::archive::export(&cli, name, output, &how)
        }
        Command::Import { file, name } => cmd::archive::import(&cli, file, name.as_deref()),
        Command::Keys { action } => cmd::keys::run(&cli, action),
        Command::Lab { action } => cmd::lab::run(&cli, action),
        Command::Migrate { workload, to, strategy, recover_timeout, on_failure, report_json, force } => {
            let req = ferry_migrate::api::MigrateRequest {
                workload: workload.clone(),
                to: to.clone(),
                strategy: *strategy,
                recover_timeout_s: *recover_timeout,
                on_failure: *on_failure,
                force: *force,
            };
            return cmd::migrate::run(&cli, req, report_json.as_deref(), *force);
        }
        Command::Node { action } => match action {
            cli::NodeAction::Status { json } => return cmd::migrate::status(&cli, *json),
            cli::NodeAction::Trust { name, public_key } => cmd::keys::run(
                &cli,
                &cli::KeysAction::AddRecipient { name: name.clone(), public_key: public_key.clone() },
            ),
            cli::NodeAction::Show => {
                cmd::keys::run(&cli, &cli::KeysAction::Show).inspect(|_| cmd::node_ca::show(&cli))
            }
            cli::NodeAction::Ca { action } => cmd::node_ca::run(&cli, action),
        },
    };
    match outcome {
        Ok(code) => code,
        Err((what, err)) => {
            exit::report(&what, &err);
            exit::classify(&err).into()
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    if verbose > 0 || std::env::var_os("FERRY_LOG").is_some() {
        progress::logs_on_stderr();
    }
    let filter = EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

/// What a command returns: an exit code, or what failed and why.
pub type Outcome = Result<ExitCode, (String, ferry_runtime::Error)>;

pub fn ok() -> Outcome {
    Ok(Exit::Ok.into())
}
