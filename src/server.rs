//! `switchboard serve`: wires the store, ports, runtime, manager and API together and runs them
//! until `shutdown` resolves, then stops every deployment before returning.
//!
//! The shape is mini-redis's `server::run(listener, shutdown)`: tests bind port 0, pass the
//! listener in, and talk to the real thing.

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{Router, body::Body, extract::ConnectInfo};
use futures_util::future::Either;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use nix::fcntl::{Flock, FlockArg};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    api::{self, ApiToken, AppState},
    audit::Audit,
    auth::{Gate, Keys, oauth::OAuth},
    config::{Config, EdgeLimits},
    health::Prober,
    manager::{ExitPolicy, Hosting, Manager, Reconciled},
    metrics::Metrics,
    ports::PortAllocator,
    proxy::{Proxy, routes::RouteTable},
    runtime::{
        Runtimes,
        docker::DockerRuntime,
        process::{Placement, ProcessRuntime},
    },
    secrets::SecretKey,
    store::{Store, redact_url},
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

/// Encrypts what an earlier release stored in plain text, and names every tool whose secrets
/// this key cannot decrypt. Those tools stay registered and their running deployments keep
/// running (they have their environment), but they cannot be deployed or restarted until the
/// key is restored or new values set: refusing to start would take every other tool down
/// with them, and leave no API through which to set new values.
async fn check_secrets(store: &Store) -> anyhow::Result<()> {
    let found = store
        .seal_plain_secrets()
        .await
        .context("encrypting the secret_env values stored in plain text")?;
    if found.sealed > 0 {
        tracing::info!(
            values = found.sealed,
            "Encrypted the secret_env values an earlier release stored in plain text"
        );
    }
    for (slug, vars) in &found.unreadable {
        for (name, why) in vars {
            tracing::error!(
                tool = %slug,
                variable = %name,
                "A secret_env value cannot be decrypted: {why}. The tool cannot be deployed or \
                 restarted until the key it was stored with is restored or a new value is set"
            );
        }
    }
    Ok(())
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
    let node = match &config.node_id {
        Some(n) => n.clone(),
        None => node_id(data_dir)?,
    };
    let key = SecretKey::load(&config.secret_key, data_dir)?;
    if key.created {
        tracing::info!(
            path = %key.key.origin(),
            "Created the secret key that encrypts tools' secret_env values: back it up \
             apart from the database (without it they cannot be decrypted)"
        );
    } else {
        tracing::info!(from = %key.key.origin(), "Secret key loaded");
    }
    let store = Store::connect(&config.database_url, key.key)
        .await
        .with_context(|| format!("opening the store at {}", redact_url(&config.database_url)))?;
    tracing::info!(backend = store.backend(), url = %redact_url(&config.database_url), "Store ready");
    check_secrets(&store).await?;

    let shim = match &config.launcher {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating the switchboard executable")?,
    };
    let (placement, warning) = Placement::detect(&node, shim.clone());
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    tracing::info!(
        tracking = %placement.tracking.describe(),
        limits = %placement.limits.describe(),
        node = %node,
        "Process runtime ready"
    );
    let socket_dir = data_dir.join("run");
    std::fs::create_dir_all(&socket_dir)
        .with_context(|| format!("creating {}", socket_dir.display()))?;
    let addr = listener.local_addr()?;
    let hosting = Hosting {
        packages_dir: data_dir.join("packages"),
        registries: config.registries.clone(),
        images: config.docker.images.clone(),
        bridge: shim.clone(),
        socket_dir,
        public_url: format!(
            "http://{}",
            if addr.ip().is_unspecified() {
                std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
            } else {
                addr
            }
        ),
        docker_host: config.docker.host.clone(),
    };
    // One allocator for every runtime: a host port is never handed out twice.
    let ports = Arc::new(PortAllocator::new(config.port_range.clone()));
    let runtime = Arc::new(ProcessRuntime::new(
        placement,
        data_dir.join("logs"),
        Arc::clone(&ports),
    ));
    let mut runtimes = Runtimes::new(runtime.clone());
    if config.docker.enabled {
        runtimes = runtimes.with_docker(Arc::new(DockerRuntime::new(
            node.clone(),
            config.docker.host.clone(),
            ports,
        )));
    }
    let routes = Arc::new(RouteTable::new());
    let manager = Manager::new(
        store,
        runtimes,
        Prober::new(),
        Arc::clone(&routes),
        node.clone(),
        config.metrics.then(|| Arc::new(Metrics::new())),
        hosting,
    );
    let keys = Arc::new(
        Keys::load(manager.store().clone())
            .await
            .context("loading client keys")?,
    );
    let oauth = match &config.oauth {
        Some(c) => {
            let oauth = Arc::new(OAuth::new(c.clone()).context("[auth.oauth]")?);
            // Keys are fetched now so the first token finds them; a failure here is retried
            // when a token needs them.
            let first = Arc::clone(&oauth);
            tokio::spawn(async move {
                if let Err(e) = first.load().await {
                    tracing::warn!(error = %e, "OAuth tokens cannot be verified yet");
                }
            });
            Some(oauth)
        }
        None => None,
    };
    let gate = Gate::new(
        config.mcp_auth,
        Arc::clone(&keys),
        oauth.clone(),
        manager.metrics().map(|m| m.auth()),
        manager.public_url().to_owned(),
    );
    let audit = Arc::new(
        Audit::start(
            data_dir.join("audit"),
            manager.metrics().map(|m| m.audit_dropped()),
        )
        .with_context(|| {
            format!(
                "opening the audit trail in {}",
                data_dir.join("audit").display()
            )
        })?,
    );
    let proxy = Arc::new(
        Proxy::new(routes, config.proxy.clone())
            .with_gate(Arc::new(gate))
            .with_audit(Arc::clone(&audit)),
    );
    // Keys made or revoked through another node that shares the database.
    let key_refresh = {
        let keys = Arc::clone(&keys);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(crate::auth::keys::REFRESH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                if let Err(e) = keys.refresh().await {
                    tracing::warn!(error = %e, "Reloading client keys failed; keeping those known");
                }
            }
        })
    };

    manager.set_exit_policy(config.exit_policy);
    manager.start_background();
    let r = manager
        .reconcile()
        .await
        .context("reconciling deployments left by an earlier run")?;
    if r != Reconciled::default() {
        tracing::info!(
            adopted = r.adopted,
            restarted = r.restarted,
            closed = r.closed,
            "Reconciled the deployments an earlier run left"
        );
    }
    let applied = manager
        .apply_tools(config.tools.clone())
        .await
        .context("applying the config file's tools")?;
    manager.load_routes().await.context("loading routes")?;
    tracing::info!(
        created = applied.created,
        updated = applied.updated,
        unchanged = applied.unchanged,
        refused = applied.refused,
        "Config tools applied"
    );

    let state = AppState {
        manager: Arc::clone(&manager),
        token: config.api_token.as_deref().map(ApiToken::new),
        keys,
        audit,
        oauth_issuer: config.oauth.as_ref().map(|o| o.issuer.clone()),
    };
    let app = api::router(state);
    tracing::info!(
        auth = config.api_token.is_some(),
        mcp_auth = ?config.mcp_auth,
        worker_threads = config.worker_threads,
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

    // After reconcile, so the live set it reads is this run's.
    let retention = crate::log_retention::spawn(
        manager.store().clone(),
        node.clone(),
        data_dir.join("logs"),
        config.log_retention,
    );

    serve_http(listener, app, proxy, &config.edge, shutdown).await;
    tracing::info!("Shutting down");
    retention.abort();
    key_refresh.abort();
    // New deploys are refused from here on, so autostart finishes quickly and everything it
    // started is in the manager's hands when the stop-all runs.
    manager.refuse_deploys();
    let _ = autostart.await;
    let live = manager.shutdown().await;
    runtime.close();
    match config.exit_policy {
        ExitPolicy::Stop => tracing::info!("Stopped {live} deployments; bye"),
        ExitPolicy::Keep => tracing::info!(
            "Left {live} deployments running for the next start to adopt (exit policy: keep); bye"
        ),
    }
    Ok(())
}

/// Accepts connections until `shutdown`, serving `app` over HTTP/1.1 and HTTP/2 with the edge
/// limits applied. axum::serve offers none of them: hyper's header-read timeout needs a timer
/// installed to be active at all, and the header count/size caps and the connection cap are
/// connection-builder settings.
async fn serve_http(
    listener: TcpListener,
    app: Router,
    proxy: Arc<Proxy>,
    limits: &EdgeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on a full fd table.
                    tracing::warn!(error = %e, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let proxy = Arc::clone(&proxy);
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                // MCP traffic skips the router: the proxy parses its own path, and every
                // request it forwards is one the API's layers would only pass through.
                if req.uri().path().starts_with("/mcp/") {
                    let proxy = Arc::clone(&proxy);
                    Either::Left(async move {
                        Ok::<_, std::convert::Infallible>(
                            proxy.handle(req.map(Body::new), Some(addr)).await,
                        )
                    })
                } else {
                    req.extensions_mut().insert(ConnectInfo::<SocketAddr>(addr));
                    Either::Right(tower::ServiceExt::oneshot(app.clone(), req))
                }
            });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    // Requests under way get a moment to finish; long-lived streams end when their
    // deployments stop, right after this.
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("Some connections were still open after 5 s; closing them");
    }
}
