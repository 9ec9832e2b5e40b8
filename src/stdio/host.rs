//! The bridge's state: which child serves which client.
//!
//! - A **legacy session** (`initialize` without a session id) gets a child of its own, because
//!   stdio servers keep per-connection state (the negotiated version, subscriptions, log
//!   level). The session id is ours (random), the child's ids pass through untouched, and
//!   server-to-client requests reach exactly that client. Sessions are capped
//!   (`max_sessions`, 429 beyond) and reaped after `idle` without a request or open stream.
//!   The next session's child is started ahead of time (a *spare*, which has seen nothing), so
//!   `initialize` does not wait for a Node or Python start.
//! - **Modern requests** (2026-07-28, stateless, marked by `_meta`'s protocol version) share a
//!   small pool of children, each request with an id and progress token of the child's own
//!   (mapped back on the way out), sent to the child with the fewest requests in flight.
//! - The **health child** is the first child: the bridge learns the server's era from it
//!   (`server/discover`, falling back to legacy on any other answer or a timeout) and probes it
//!   for `/health` on the same pipe, with ids of its own (`ping` before `initialize` is allowed
//!   to legacy clients). On a modern server it is also the pool's first member.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::child::{Child, IdMode};

#[derive(Debug, Clone)]
pub struct HostConfig {
    pub program: String,
    pub args: Vec<String>,
    pub max_sessions: usize,
    pub idle: Duration,
    pub pool_size: usize,
    /// How long a stopping child gets after its stdin closes, and again after SIGTERM.
    pub grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Era {
    Legacy,
    Modern,
}

pub struct Session {
    pub id: String,
    pub child: Arc<Child>,
    pub created: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "this tool already has {0} MCP sessions open, its limit (stdio.max_sessions): end one (DELETE) or retry later"
    )]
    TooManySessions(usize),
    #[error("cannot start the MCP server '{program}': {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server is not ready yet")]
    NotReady,
}

pub struct Host {
    pub config: HostConfig,
    era: Mutex<Option<Era>>,
    health: Mutex<Option<Arc<Child>>>,
    pool: Mutex<Vec<Arc<Child>>>,
    spare: Mutex<Option<Arc<Child>>>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    /// Sessions being created, counted against the cap.
    opening: Mutex<usize>,
    probe_ids: AtomicU64,
    /// When recent health children died (the window is [`DEATH_WINDOW`]).
    health_deaths: Mutex<std::collections::VecDeque<Instant>>,
    /// Cancelled (with the reason stored in `fatal_reason`) when the server keeps dying: the
    /// bridge then exits, so the supervisor's restart policy and backoff take over and the
    /// record shows why.
    pub fatal: tokio_util::sync::CancellationToken,
    pub fatal_reason: Mutex<Option<String>>,
    /// Who the server says it is (from `server/discover`, or the first `initialize` reply),
    /// reported by `/health`.
    about: Mutex<Option<Value>>,
}

/// Health children that may die within [`DEATH_WINDOW`] before the bridge gives up: a server
/// that answers and then dies every few seconds is crash-looping, even though a fresh process
/// passes the next probe.
const MAX_HEALTH_DEATHS: usize = 3;
const DEATH_WINDOW: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `_meta` every modern request carries (2026-07-28).
fn modern_meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "switchboard", "version": env!("CARGO_PKG_VERSION")},
        "io.modelcontextprotocol/clientCapabilities": {},
    })
}

impl Host {
    pub fn new(config: HostConfig) -> Arc<Host> {
        Arc::new(Host {
            config,
            era: Mutex::new(None),
            health: Mutex::new(None),
            pool: Mutex::new(Vec::new()),
            spare: Mutex::new(None),
            sessions: Mutex::new(HashMap::new()),
            opening: Mutex::new(0),
            probe_ids: AtomicU64::new(1),
            health_deaths: Mutex::new(std::collections::VecDeque::new()),
            fatal: tokio_util::sync::CancellationToken::new(),
            fatal_reason: Mutex::new(None),
            about: Mutex::new(None),
        })
    }

    pub fn era(&self) -> Option<Era> {
        *lock(&self.era)
    }

    fn spawn(&self, mode: IdMode) -> Result<Arc<Child>, HostError> {
        Child::spawn(&self.config.program, &self.config.args, mode).map_err(|source| {
            HostError::Spawn {
                program: self.config.program.clone(),
                source,
            }
        })
    }

    /// Starts the health child and learns the era. Errors when the server cannot be started
    /// or ends before answering: the deployment has then failed to start.
    pub async fn start(self: &Arc<Self>, timeout: Duration) -> Result<Era, String> {
        let child = self.spawn(IdMode::Shared).map_err(|e| e.to_string())?;
        // Known from the start, so a failed start still stops it.
        *lock(&self.health) = Some(Arc::clone(&child));
        let discover =
            self.probe_request(&child, "server/discover", json!({"_meta": modern_meta()}));
        let era = match tokio::time::timeout(timeout.min(Duration::from_secs(10)), discover).await {
            Ok(Ok(reply)) if reply.pointer("/result/supportedVersions").is_some() => {
                if let Some(info) =
                    reply.pointer("/result/_meta/io.modelcontextprotocol~1serverInfo")
                {
                    self.note_server(info, "2026-07-28");
                }
                Era::Modern
            }
            Ok(Err(ProbeError::Ended(why))) => {
                return Err(format!(
                    "the server {why} before answering its first request"
                ));
            }
            // An error, a bogus result or silence: a legacy server (the spec's fallback rule,
            // not keyed to one error code).
            _ => Era::Legacy,
        };
        if era == Era::Legacy {
            match tokio::time::timeout(timeout, self.probe_request(&child, "ping", json!({}))).await
            {
                Ok(Ok(r)) if r.get("result").is_some() => {}
                Ok(Ok(r)) => return Err(format!("the server answered ping with {r}")),
                Ok(Err(e)) => return Err(format!("the server {e} before answering ping")),
                Err(_) => {
                    return Err(format!(
                        "the server did not answer ping within {} ms",
                        timeout.as_millis()
                    ));
                }
            }
        }
        *lock(&self.era) = Some(era);
        *lock(&self.health) = Some(Arc::clone(&child));
        if era == Era::Modern {
            let mut pool = lock(&self.pool);
            pool.push(child);
            for _ in 1..self.config.pool_size.max(1) {
                if let Ok(c) = self.spawn(IdMode::Shared) {
                    pool.push(c);
                }
            }
        }
        Ok(era)
    }

    async fn probe_request(
        &self,
        child: &Arc<Child>,
        method: &str,
        params: Value,
    ) -> Result<Value, ProbeError> {
        let id = format!(
            "switchboard-probe-{}",
            self.probe_ids.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        // The health child is shared, so the id is ours anyway; the probe's own id keeps the
        // reply recognizable in logs.
        let _reg = child
            .request(msg, tx, false)
            .map_err(|e| ProbeError::Ended(e.to_string()))?;
        loop {
            match rx.recv().await {
                Some(bytes) => {
                    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    if v.get("method").is_none() {
                        if let Some(err) = v.pointer("/error/message").and_then(Value::as_str)
                            && err.starts_with("the MCP server process ended")
                        {
                            return Err(ProbeError::Ended(
                                child.exit_description().unwrap_or_else(|| err.to_owned()),
                            ));
                        }
                        return Ok(v);
                    }
                }
                None => {
                    return Err(ProbeError::Ended(
                        child
                            .exit_description()
                            .unwrap_or_else(|| "stopped".to_owned()),
                    ));
                }
            }
        }
    }

    /// Remembers the server's name and version (the first report wins).
    pub fn note_server(&self, server_info: &Value, protocol_version: &str) {
        let mut about = lock(&self.about);
        if about.is_none() {
            *about = Some(json!({
                "server_name": server_info.get("name"),
                "server_version": server_info.get("version"),
                "protocol_version": protocol_version,
            }));
        }
    }

    /// One health probe on the health child's pipe: `ping` (legacy) or `server/discover`
    /// (modern). A health child that has ended is replaced, and this probe fails with why.
    pub async fn check(self: &Arc<Self>, timeout: Duration) -> Result<Value, String> {
        let Some(era) = self.era() else {
            return Err("the server is starting".to_owned());
        };
        let child = lock(&self.health).clone();
        let Some(child) = child else {
            return Err("the server is starting".to_owned());
        };
        if let Some(why) = child.exit_description() {
            return Err(self.health_child_died(era, &child, &why));
        }
        let (method, params) = match era {
            Era::Modern => ("server/discover", json!({"_meta": modern_meta()})),
            Era::Legacy => ("ping", json!({})),
        };
        match tokio::time::timeout(timeout, self.probe_request(&child, method, params)).await {
            Ok(Ok(r)) if r.get("result").is_some() => {
                let mut v = json!({
                    "era": era,
                    "children": self.children().len(),
                    "sessions": lock(&self.sessions).len(),
                });
                if let (Some(about), Some(obj)) = (lock(&self.about).clone(), v.as_object_mut())
                    && let Value::Object(about) = about
                {
                    obj.extend(about);
                }
                Ok(v)
            }
            Ok(Ok(r)) => Err(format!("{method} answered {r}")),
            Ok(Err(e)) => Err(self.health_child_died(era, &child, &e.to_string())),
            Err(_) => Err(format!(
                "no answer to {method} within {} ms",
                timeout.as_millis()
            )),
        }
    }

    /// Replaces a dead health child, or, when they keep dying, gives up (see `fatal`).
    fn health_child_died(&self, era: Era, dead: &Arc<Child>, why: &str) -> String {
        if !self.replace_health(era, dead) {
            // Replaced already (a concurrent check, or the pool): one death, counted once.
            return format!("the health child {why}; another was started");
        }
        let deaths = {
            let mut d = lock(&self.health_deaths);
            let now = Instant::now();
            d.push_back(now);
            while d
                .front()
                .is_some_and(|t| now.duration_since(*t) > DEATH_WINDOW)
            {
                d.pop_front();
            }
            d.len()
        };
        if deaths >= MAX_HEALTH_DEATHS {
            let reason = format!(
                "the MCP server keeps exiting ({deaths} times within {} s; last: it {why})",
                DEATH_WINDOW.as_secs()
            );
            *lock(&self.fatal_reason) = Some(reason.clone());
            self.fatal.cancel();
            return reason;
        }
        format!("the health child {why}; started another")
    }

    /// Puts a new health child in place of `dead` (in its pool slot too, on a modern server,
    /// where the health child is the pool's first member). False when `dead` was no longer
    /// the health child. Locks: pool, then health, everywhere.
    fn replace_health(&self, era: Era, dead: &Arc<Child>) -> bool {
        let mut pool = lock(&self.pool);
        let mut health = lock(&self.health);
        if !health.as_ref().is_some_and(|h| Arc::ptr_eq(h, dead)) {
            return false;
        }
        let Ok(c) = self.spawn(IdMode::Shared) else {
            return false;
        };
        if era == Era::Modern
            && let Some(slot) = pool.iter_mut().find(|p| Arc::ptr_eq(p, dead))
        {
            *slot = Arc::clone(&c);
        }
        *health = Some(c);
        true
    }

    /// The pool child with the fewest requests in flight; ended children are replaced.
    pub fn pool_child(&self) -> Result<Arc<Child>, HostError> {
        let mut pool = lock(&self.pool);
        if pool.is_empty() {
            return Err(HostError::NotReady);
        }
        for slot in pool.iter_mut() {
            if !slot.alive() {
                let fresh = self.spawn(IdMode::Shared)?;
                // The health child is the pool's first member: keep them the same process.
                let mut health = lock(&self.health);
                if health.as_ref().is_some_and(|h| Arc::ptr_eq(h, slot)) {
                    *health = Some(Arc::clone(&fresh));
                }
                *slot = fresh;
            }
        }
        pool.iter()
            .min_by_key(|c| c.in_flight())
            .cloned()
            .ok_or(HostError::NotReady)
    }

    /// A child for a new legacy session: the spare if one is ready, else a new one; a new
    /// spare is started for the session after this one.
    pub fn open_session(self: &Arc<Self>) -> Result<(Arc<Session>, SessionSlot), HostError> {
        {
            let sessions = lock(&self.sessions).len();
            let mut opening = lock(&self.opening);
            if sessions + *opening >= self.config.max_sessions {
                return Err(HostError::TooManySessions(self.config.max_sessions));
            }
            *opening += 1;
        }
        let slot = SessionSlot {
            host: Arc::clone(self),
        };
        let spare = lock(&self.spare).take().filter(|c| c.alive());
        let child = match spare {
            Some(c) => c,
            None => self.spawn(IdMode::Owned)?,
        };
        {
            // One spare at most: concurrent opens must not each leave one (an overwritten
            // spare would run untracked until the deployment stops).
            let mut slot = lock(&self.spare);
            if slot.as_ref().is_none_or(|c| !c.alive())
                && let Ok(next) = self.spawn(IdMode::Owned)
            {
                *slot = Some(next);
            }
        }
        let session = Arc::new(Session {
            id: uuid::Uuid::new_v4().simple().to_string(),
            child,
            created: chrono::Utc::now(),
        });
        Ok((session, slot))
    }

    /// Makes an opened session reachable by its id.
    pub fn register(self: &Arc<Self>, session: &Arc<Session>, slot: SessionSlot) {
        lock(&self.sessions).insert(session.id.clone(), Arc::clone(session));
        drop(slot);
        // The session ends with its child.
        let host = Arc::clone(self);
        let s = Arc::clone(session);
        tokio::spawn(async move {
            let why = s.child.wait().await;
            if lock(&host.sessions).remove(&s.id).is_some() {
                tracing::warn!(session = %s.id, pid = s.child.pid, "MCP session ended: its server process {why}");
            }
        });
    }

    pub fn session(&self, id: &str) -> Option<Arc<Session>> {
        lock(&self.sessions).get(id).cloned()
    }

    /// Ends a session (DELETE, idle, or its `initialize` failed): its child is stopped as the
    /// spec says (stdin closed, then SIGTERM, then SIGKILL).
    pub fn close_session(self: &Arc<Self>, id: &str) -> bool {
        let Some(s) = lock(&self.sessions).remove(id) else {
            return false;
        };
        let grace = self.config.grace;
        tokio::spawn(async move {
            s.child.shutdown(grace, grace).await;
        });
        true
    }

    /// Closes sessions idle longer than the configured time: no request for that long and no
    /// request or standalone stream open.
    pub fn reap_idle(self: &Arc<Self>) -> usize {
        let idle = self.config.idle;
        let stale: Vec<String> = lock(&self.sessions)
            .values()
            .filter(|s| {
                s.child.idle_for() >= idle && s.child.in_flight() == 0 && !s.child.has_listener()
            })
            .map(|s| s.id.clone())
            .collect();
        for id in &stale {
            tracing::info!(session = %id, "Closing an idle MCP session");
            self.close_session(id);
        }
        stale.len()
    }

    pub fn sessions(&self) -> Vec<Arc<Session>> {
        lock(&self.sessions).values().cloned().collect()
    }

    /// Every child this host runs.
    pub fn children(&self) -> Vec<Arc<Child>> {
        let mut all: Vec<Arc<Child>> = lock(&self.pool).clone();
        if let Some(h) = lock(&self.health).clone()
            && !all.iter().any(|c| Arc::ptr_eq(c, &h))
        {
            all.push(h);
        }
        all.extend(lock(&self.spare).clone());
        all.extend(lock(&self.sessions).values().map(|s| Arc::clone(&s.child)));
        all
    }

    /// Stops every child (sessions, pool, health, spare) as the spec says, all at once, and
    /// waits for them.
    pub async fn stop_all(&self) {
        let children = self.children();
        lock(&self.sessions).clear();
        lock(&self.pool).clear();
        lock(&self.health).take();
        lock(&self.spare).take();
        let grace = self.config.grace;
        let waits: Vec<_> = children
            .into_iter()
            .map(|c| tokio::spawn(async move { c.shutdown(grace, grace).await }))
            .collect();
        for w in waits {
            let _ = w.await;
        }
    }
}

/// Holds a place under the session cap while a session is being opened.
pub struct SessionSlot {
    host: Arc<Host>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut opening = lock(&self.host.opening);
        *opening = opening.saturating_sub(1);
    }
}

#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("{0}")]
    Ended(String),
}
