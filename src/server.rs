//! `switchboard serve`: wires the store, ports, runtime, manager and API together and runs them
//! until `shutdown` resolves, then stops every deployment before returning.
//!
//! The shape is mini-redis's `server::run(listener, shutdown)`: tests bind port 0, pass the
//! listener in, and talk to the real thing.

use std::{future::Future, path::Path, sync::Arc};

use anyhow::Context as _;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::TcpListener;

use crate::{
    api::{self, ApiToken, AppState},
    config::Config,
    health::Prober,
    manager::Manager,
    ports::PortAllocator,
    runtime::process::{ProcessRuntime, TreeTracking},
    store::Store,
};

/// A stable id for this data directory, so this node's cgroups and records are its own.
fn node_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        _ => {
            let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
            std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
    }
}

/// Takes the data directory for this process alone: two Switchboards sharing one would each
/// believe the other's processes are orphans.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<Flock<std::fs::File>> {
    let path = data_dir.join("switchboard.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another switchboard is already using the data directory {} ({e})",
            data_dir.display()
        )
    })
}

pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let data_dir = &config.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let _lock = lock_data_dir(data_dir)?;
    let node = node_id(data_dir)?;
    let db_path = data_dir.join("switchboard.db");
    let store = Store::open_sqlite(&db_path)
        .await
        .with_context(|| format!("opening the store at {}", db_path.display()))?;

    let shim = match &config.launcher {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating the switchboard executable")?,
    };
    let (tracking, warning) = TreeTracking::detect(&node, shim);
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    tracing::info!(tracking = %tracking.describe(), node = %node, "Process runtime ready");
    let runtime = Arc::new(ProcessRuntime::new(tracking, data_dir.join("logs")));
    let ports = PortAllocator::new(config.port_range.clone());
    let manager = Manager::new(store, ports, runtime.clone(), Prober::new());

    let closed = manager
        .recover(|| runtime.sweep_orphans(&|_| false))
        .await
        .context("recovering deployments left by an earlier run")?;
    if closed > 0 {
        tracing::warn!(closed, "Closed deployments an earlier run left live");
    }
    let applied = manager
        .apply_tools(config.tools.clone())
        .await
        .context("applying the config file's tools")?;
    tracing::info!(
        created = applied.created,
        updated = applied.updated,
        unchanged = applied.unchanged,
        "Config tools applied"
    );

    let state = AppState {
        manager: Arc::clone(&manager),
        token: config.api_token.as_deref().map(ApiToken::new),
    };
    let app = api::router(state);
    let addr = listener.local_addr()?;
    tracing::info!(
        auth = config.api_token.is_some(),
        data_dir = %data_dir.display(),
        "Switchboard listening on http://{addr}"
    );

    let autostart = {
        let manager = Arc::clone(&manager);
        tokio::spawn(async move {
            match manager.autostart().await {
                Ok(ds) if !ds.is_empty() => {
                    tracing::info!(count = ds.len(), "Autostarted deployments")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "Autostart failed"),
            }
        })
    };

    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving the API")?;
    tracing::info!("Shutting down");
    // New deploys are refused from here on, so autostart finishes quickly and everything it
    // started is in the manager's hands when the stop-all runs.
    manager.refuse_deploys();
    let _ = autostart.await;
    manager.shutdown().await;
    tracing::info!("All deployments stopped; bye");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("Cannot listen for SIGTERM/SIGINT; stop Switchboard with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
