//! The `switchboard` binary: argument parsing, logging and the process's exit code. Everything
//! else is in the library.

use anyhow::Context as _;
use clap::Parser as _;
use switchboard::{
    cli::{Cli, Command},
    config::Config,
    runtime::launch,
    server, signal,
};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    // The launch shim must exec before any thread exists; see runtime::launch.
    if launch::is_shim_invocation() {
        launch::run_shim();
    }
    if launch::is_log_invocation() {
        launch::run_log_writer();
    }
    if switchboard::stdio::is_bridge_invocation() {
        switchboard::stdio::run_bridge();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => {
            switchboard::cli::refuse_serve_token_flag(&cli.client).and_then(|()| serve(args))
        }
        // A client makes a few requests: one thread is plenty.
        other => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(switchboard::cli::run_client(other, &cli.client))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // deploy/scale say with their status whether a deployment failed or is still
            // starting (documented in their --help).
            match e.downcast_ref::<switchboard::cli::NotRunning>() {
                Some(n) => std::process::ExitCode::from(n.exit_code()),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

fn serve(args: switchboard::cli::ServeArgs) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        switchboard::cli::LogFormat::Json => logs.json().flatten_event(true).init(),
        switchboard::cli::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    // The config is read first because it sizes the runtime.
    let config = Config::load(args.overrides())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        server::run(listener, config, signal::shutdown_signal()).await
    })
}
