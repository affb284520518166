//! The `skiff` binary: parse the command line, start tracing, call the library, exit.
//!
//! Exit codes: 0 on success, 2 for bad configuration (as clap does for usage errors), 1 for
//! failures at run time. Building options from arguments lives in `skiff::cli`.

use std::process::ExitCode;

use clap::Parser;
use skiff::cli::{AdminCall, Cli, Command};

/// Exit code for bad configuration (clap uses 2 for usage errors too).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    // Before any thread exists: one malloc arena per worker thread would keep its own free
    // pages (idle RSS) for no measurable gain.
    skiff::mem::cap_arenas();
    let cli = Cli::parse();
    skiff::admin::logging::init();
    // `skiff run` serves connections on its own worker threads (`--concurrency`): this
    // runtime only runs the control side (xDS, admin, health checks, the fast-path owner).
    let mut builder = match cli.command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = match builder
        .enable_all()
        // Capabilities are per thread: each runtime thread drops what `skiff run` gave up.
        .on_thread_start(skiff::takeover::caps::apply_pending)
        .on_thread_park(skiff::takeover::caps::apply_pending)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("skiff: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let query = |call: AdminCall| print_or_fail(rt.block_on(call.send()));
    match cli.command {
        Command::Run(args) => {
            let handover = args.handover();
            match skiff::cli::run_options(args) {
                Err(e) => fail(e, EXIT_CONFIG),
                Ok((opts, extras)) => {
                    let run = skiff::app::run_handover(opts, extras, handover, shutdown_signal());
                    done(rt.block_on(run), 1)
                }
            }
        }
        Command::ControlPlane(args) => match args.options() {
            Err(e) => fail(e, EXIT_CONFIG),
            // A control plane that cannot load its source or bind is misconfigured: exit 2.
            Ok(opts) => {
                let served = skiff::controlplane::serve(opts, |_addr| {}, shutdown_signal());
                done(rt.block_on(served), EXIT_CONFIG)
            }
        },
        Command::Admin {
            path,
            method,
            admin,
        } => match AdminCall::admin(admin, &method, &path) {
            Err(e) => fail(e, EXIT_CONFIG),
            Ok(call) => query(call),
        },
        Command::Maps { json, admin } => query(AdminCall::maps(admin, json)),
        Command::Explain {
            dst: Some(dst),
            admin,
            ..
        } => query(AdminCall::explain(admin, dst)),
        Command::Explain { recent, admin, .. } => query(AdminCall::explain_recent(
            admin,
            recent.unwrap_or(skiff::bpf::explain::RECENT_DEFAULT),
        )),
        Command::Node { op, admin } => query(AdminCall::node(admin, &op)),
        Command::Cleanup { pin_dir } => {
            print_or_fail(skiff::cli::query::cleanup(pin_dir.as_deref()))
        }
    }
}

/// Prints `e` with its causes (`skiff: outer: inner`) and returns `code`.
fn fail(e: impl Into<anyhow::Error>, code: u8) -> ExitCode {
    eprintln!("skiff: {:#}", e.into());
    ExitCode::from(code)
}

/// Success, or `fail` with `code`.
fn done<E: Into<anyhow::Error>>(r: Result<(), E>, code: u8) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, code),
    }
}

/// Prints the answer to stdout, or fails with 1.
fn print_or_fail<E: Into<anyhow::Error>>(r: Result<String, E>) -> ExitCode {
    match r {
        Ok(body) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e, 1),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process still stops on SIGTERM, just without draining.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
