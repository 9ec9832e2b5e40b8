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
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    child::{Child, IdMode},
    container::Containers,
};

#[derive(Debug, Clone)]
pub struct HostConfig {
    pub program: String,
    pub args: Vec<String>,
    pub max_sessions: usize,
    pub idle: Duration,
    pub pool_size: usize,
    /// Processes started ahead of the next legacy sessions.
    pub spares: usize,
    /// How long a health probe waits for an answer.
    pub probe: Duration,
    /// How long a stopping child gets after its stdin closes, and again after SIGTERM.
    pub grace: Duration,
    /// Each server process is a container of this engine and image (`runtime = "docker"`);
    /// `None`: a host process of `program`.
    pub containers: Option<Arc<Containers>>,
}

/// A stdio server is `Legacy` or `Modern` (HTTP+SSE is an HTTP transport).
pub use crate::mcp::Era;

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
    #[error("the bridge is stopping")]
    Stopping,
}

pub struct Host {
    pub config: HostConfig,
    /// Everything that changes, behind one lock held only for bookkeeping: never across an
    /// await, I/O or a process spawn. A process is started outside it after a place was
    /// reserved under it, and committed (or released) under it again.
    state: Mutex<State>,
    probe_ids: AtomicU64,
    /// Cancelled (with the reason in the state) when the server keeps dying: the bridge then
    /// exits, so the supervisor's restart policy and backoff take over and the record shows
    /// why.
    pub fatal: tokio_util::sync::CancellationToken,
}

#[derive(Default)]
struct State {
    era: Option<Era>,
    health: Option<Arc<Child>>,
    pool: Vec<Arc<Child>>,
    spares: VecDeque<Arc<Child>>,
    /// Spares being started outside the lock, so concurrent opens start only what is missing.
    spares_starting: usize,
    sessions: HashMap<String, Arc<Session>>,
    /// Modern requests' pools of each principal the proxy named (`pool` serves requests that
    /// name none, i.e. auth off): up to `pool_size` processes each, started on demand, so no
    /// process sees two principals' requests. Reaped with idle sessions.
    principal_pools: HashMap<String, Vec<Arc<Child>>>,
    /// Sessions being opened (a place reserved, not yet registered), counted against the cap.
    opening: usize,
    /// When recent health children died (the window is [`DEATH_WINDOW`]).
    health_deaths: VecDeque<Instant>,
    fatal_reason: Option<String>,
    /// Who the server says it is (from `server/discover`, or the first `initialize` reply),
    /// reported by `/health`.
    about: Option<Value>,
    /// Set by `stop_all`: a process started after it is stopped, not kept.
    stopped: bool,
}

impl State {
    /// Puts `fresh` wherever `dead` was (the health slot, and its pool slot: on a modern
    /// server the health child is the pool's first member). False when `dead` was nowhere,
    /// i.e. someone replaced it already.
    fn replace(&mut self, dead: &Arc<Child>, fresh: &Arc<Child>) -> bool {
        let mut found = false;
        if self.health.as_ref().is_some_and(|h| Arc::ptr_eq(h, dead)) {
            self.health = Some(Arc::clone(fresh));
            found = true;
        }
        for slot in self.pool.iter_mut().filter(|p| Arc::ptr_eq(p, dead)) {
            *slot = Arc::clone(fresh);
            found = true;
        }
        found
    }

    fn children(&self) -> Vec<Arc<Child>> {
        let mut all: Vec<Arc<Child>> = self.pool.clone();
        if let Some(h) = &self.health
            && !all.iter().any(|c| Arc::ptr_eq(c, h))
        {
            all.push(Arc::clone(h));
        }
        all.extend(self.spares.iter().cloned());
        all.extend(self.sessions.values().map(|s| Arc::clone(&s.child)));
        all.extend(self.principal_pools.values().flatten().cloned());
        all
    }
}

/// Health children that may die within [`DEATH_WINDOW`] before the bridge gives up: a server
/// that answers and then dies every few seconds is crash-looping, even though a fresh process
/// passes the next probe.
const MAX_HEALTH_DEATHS: usize = 3;
const DEATH_WINDOW: Duration = Duration::from_secs(60);
/// How long `server/discover` waits alone before era detection also sends `ping` (rmcp's
/// Auto mode gives its discover probe the same 10 s).
const DISCOVER_ALONE: Duration = Duration::from_secs(10);

/// The `_meta` every modern request carries (2026-07-28).
fn modern_meta() -> Value {
    crate::mcp::modern_meta("switchboard")
}

impl Host {
    pub fn new(config: HostConfig) -> Arc<Host> {
        Arc::new(Host {
            config,
            state: Mutex::new(State::default()),
            probe_ids: AtomicU64::new(1),
            fatal: tokio_util::sync::CancellationToken::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn era(&self) -> Option<Era> {
        self.state().era
    }

    /// Why the bridge gave up (see `fatal`).
    pub fn fatal_reason(&self) -> Option<String> {
        self.state().fatal_reason.clone()
    }

    /// Starts a server process. Never called with the state locked.
    fn spawn(&self, mode: IdMode) -> Result<Arc<Child>, HostError> {
        if let Some(containers) = &self.config.containers {
            return Ok(Child::spawn_container(containers, mode));
        }
        Child::spawn(&self.config.program, &self.config.args, mode).map_err(|source| {
            HostError::Spawn {
                program: self.config.program.clone(),
                source,
            }
        })
    }

    /// Stops a process that was started but is not needed after all (someone else filled its
    /// place, or the bridge is stopping).
    fn discard(&self, child: Arc<Child>) {
        let grace = self.config.grace;
        tokio::spawn(async move {
            child.shutdown(grace, grace).await;
        });
    }

    /// Keeps `child` in the state with `place`, unless the bridge is stopping (then it is
    /// stopped). False when it was not kept.
    fn commit(&self, child: &Arc<Child>, place: impl FnOnce(&mut State)) -> bool {
        let kept = {
            let mut s = self.state();
            if !s.stopped {
                place(&mut s);
            }
            !s.stopped
        };
        if !kept {
            self.discard(Arc::clone(child));
        }
        kept
    }

    /// Starts the health child and learns the era, all within `timeout`. Errors when the
    /// server cannot be started, ends before answering, or answers neither probe in time: the
    /// deployment has then failed to start.
    pub async fn start(self: &Arc<Self>, timeout: Duration) -> Result<Era, String> {
        let child = self.spawn(IdMode::Shared).map_err(|e| e.to_string())?;
        // Known from the start, so a failed start still stops it.
        if !self.commit(&child, |s| s.health = Some(Arc::clone(&child))) {
            return Err(HostError::Stopping.to_string());
        }
        let era = self.learn_era(&child, timeout).await?;
        {
            let mut s = self.state();
            s.era = Some(era);
            if era == Era::Modern {
                s.pool.push(Arc::clone(&child));
            }
        }
        if era == Era::Modern {
            for _ in 1..self.config.pool_size.max(1) {
                if let Ok(c) = self.spawn(IdMode::Shared) {
                    self.commit(&c, |s| s.pool.push(Arc::clone(&c)));
                }
            }
        }
        Ok(era)
    }

    /// The spec's stdio era detection: `server/discover` first; a DiscoverResult means
    /// modern, any other answer or silence means legacy, confirmed by `ping`. One deadline
    /// covers both probes. A server still silent after [`DISCOVER_ALONE`] (or half the
    /// deadline) also gets the `ping`, but the discover request stays open: a slow modern
    /// server answers it late (before the ping, which it would refuse) and is still modern.
    async fn learn_era(&self, child: &Arc<Child>, timeout: Duration) -> Result<Era, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let discover =
            self.probe_request(child, "server/discover", json!({"_meta": modern_meta()}));
        tokio::pin!(discover);
        let alone = (timeout / 2).min(DISCOVER_ALONE);
        // `None` while discover is unanswered; `Some(false)`: answered, not modern.
        let mut discover_said = None;
        if let Ok(reply) = tokio::time::timeout(alone, &mut discover).await {
            if self.is_discover_result(reply)? {
                return Ok(Era::Modern);
            }
            discover_said = Some(false);
        }
        let ping = self.probe_request(child, "ping", json!({}));
        tokio::pin!(ping);
        let mut ping_refused = None;
        let waited = tokio::time::timeout_at(deadline, async {
            loop {
                tokio::select! {
                    reply = &mut discover, if discover_said.is_none() => {
                        if self.is_discover_result(reply)? {
                            return Ok(Era::Modern);
                        }
                        discover_said = Some(false);
                    }
                    reply = &mut ping, if ping_refused.is_none() => match reply {
                        Ok(r) if r.get("result").is_some() => return Ok(Era::Legacy),
                        Ok(r) => ping_refused = Some(r),
                        Err(e) => return Err(format!("the server {e} before answering ping")),
                    },
                }
                // Both answered, neither in a way that lets the server be used.
                if let (Some(false), Some(r)) = (discover_said, &ping_refused) {
                    return Err(format!("the server answered ping with {r}"));
                }
            }
        })
        .await;
        waited.unwrap_or_else(|_| {
            Err(match discover_said {
                None => format!(
                    "the server answered neither server/discover nor ping within {} ms",
                    timeout.as_millis()
                ),
                Some(_) => format!(
                    "the server did not answer ping within {} ms",
                    timeout.as_millis()
                ),
            })
        })
    }

    /// Whether a `server/discover` reply makes the server modern (a result with
    /// `supportedVersions`; an error, a bogus result or anything else does not: the spec's
    /// fallback rule is not keyed to one error code). A server that ended is an error.
    fn is_discover_result(&self, reply: Result<Value, ProbeError>) -> Result<bool, String> {
        let reply =
            reply.map_err(|why| format!("the server {why} before answering its first request"))?;
        if reply.pointer("/result/supportedVersions").is_none() {
            return Ok(false);
        }
        if let Some(info) = reply.pointer("/result/_meta/io.modelcontextprotocol~1serverInfo") {
            self.note_server(info, crate::mcp::MODERN_VERSION);
        }
        Ok(true)
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
        let (tx, mut rx) = super::child::stream();
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        // The health child is shared, so the id is ours anyway; the probe's own id keeps the
        // reply recognizable in logs.
        let _reg = child
            .request(msg, tx, false)
            .map_err(|e| ProbeError::Ended(child.ending_in_its_words().unwrap_or(e.to_string())))?;
        loop {
            match rx.recv().await {
                Some(bytes) => {
                    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    if v.get("method").is_none() {
                        if let Some(err) = v.pointer("/error/message").and_then(Value::as_str)
                            && err.starts_with("the MCP server process ended")
                        {
                            return Err(ProbeError::Ended(
                                child
                                    .ending_in_its_words()
                                    .unwrap_or_else(|| err.to_owned()),
                            ));
                        }
                        return Ok(v);
                    }
                }
                None => {
                    return Err(ProbeError::Ended(
                        child
                            .ending_in_its_words()
                            .unwrap_or_else(|| "stopped".to_owned()),
                    ));
                }
            }
        }
    }

    /// Remembers the server's name and version (the first report wins).
    pub fn note_server(&self, server_info: &Value, protocol_version: &str) {
        let mut s = self.state();
        if s.about.is_none() {
            s.about = Some(json!({
                "server_name": server_info.get("name"),
                "server_version": server_info.get("version"),
                "protocol_version": protocol_version,
            }));
        }
    }

    /// One health probe on the health child's pipe: `ping` (legacy) or `server/discover`
    /// (modern). A health child that has ended is replaced, and this probe fails with why.
    /// A probe that gets no answer while the child has client calls in flight is not a
    /// failure: many stdio servers handle one request at a time, so it is queued behind them
    /// (on a modern server the health child is also a pool member); the report says `busy`.
    pub async fn check(self: &Arc<Self>, timeout: Duration) -> Result<Value, String> {
        let (era, child) = {
            let s = self.state();
            (s.era, s.health.clone())
        };
        let (Some(era), Some(child)) = (era, child) else {
            return Err("the server is starting".to_owned());
        };
        if let Some(why) = child.ending_in_its_words() {
            return Err(self.health_child_died(&child, &why));
        }
        let (method, params) = match era {
            Era::Modern => ("server/discover", json!({"_meta": modern_meta()})),
            Era::Legacy | Era::LegacySse => ("ping", json!({})),
        };
        let report = |busy: u32| {
            let (children, sessions, about) = {
                let s = self.state();
                (s.children().len(), s.sessions.len(), s.about.clone())
            };
            let mut v = json!({"era": era, "children": children, "sessions": sessions});
            if busy > 0 {
                v["busy"] = json!(busy);
            }
            if let (Some(Value::Object(about)), Some(obj)) = (about, v.as_object_mut()) {
                obj.extend(about);
            }
            v
        };
        match tokio::time::timeout(timeout, self.probe_request(&child, method, params)).await {
            Ok(Ok(r)) if r.get("result").is_some() => Ok(report(0)),
            Ok(Ok(r)) => Err(format!("{method} answered {r}")),
            Ok(Err(e)) => Err(self.health_child_died(&child, &e.to_string())),
            // The probe is gone by now (dropped with the timeout): what is in flight is calls.
            Err(_) if child.in_flight() > 0 => Ok(report(child.in_flight())),
            Err(_) => Err(format!(
                "no answer to {method} within {} ms",
                timeout.as_millis()
            )),
        }
    }

    /// Replaces a dead health child, or, when they keep dying, gives up (see `fatal`).
    fn health_child_died(&self, dead: &Arc<Child>, why: &str) -> String {
        let replaced_already = |s: &State| !s.health.as_ref().is_some_and(|h| Arc::ptr_eq(h, dead));
        // Replaced already (a concurrent check, or the pool): one death, counted once.
        let another = format!("the health child {why}; another was started");
        if replaced_already(&self.state()) {
            return another;
        }
        let fresh = match self.spawn(IdMode::Shared) {
            Ok(c) => c,
            Err(e) => return format!("the health child {why}; {e}"),
        };
        let deaths = {
            let mut s = self.state();
            if s.stopped || replaced_already(&s) {
                None
            } else {
                s.replace(dead, &fresh);
                let now = Instant::now();
                s.health_deaths.push_back(now);
                while s
                    .health_deaths
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > DEATH_WINDOW)
                {
                    s.health_deaths.pop_front();
                }
                Some(s.health_deaths.len())
            }
        };
        let Some(deaths) = deaths else {
            self.discard(fresh);
            return another;
        };
        if deaths >= MAX_HEALTH_DEATHS {
            let reason = format!(
                "the MCP server keeps exiting ({deaths} times within {} s; last: it {why})",
                DEATH_WINDOW.as_secs()
            );
            self.state().fatal_reason = Some(reason.clone());
            self.fatal.cancel();
            return reason;
        }
        format!("the health child {why}; started another")
    }

    /// The pool child with the fewest requests in flight; ended children are replaced.
    pub fn pool_child(&self) -> Result<Arc<Child>, HostError> {
        let dead: Vec<Arc<Child>> = {
            let s = self.state();
            if s.pool.is_empty() {
                return Err(HostError::NotReady);
            }
            s.pool.iter().filter(|c| !c.alive()).cloned().collect()
        };
        for d in &dead {
            let fresh = self.spawn(IdMode::Shared)?;
            let mut replaced = false;
            self.commit(&fresh, |s| replaced = s.replace(d, &fresh));
            if !replaced {
                // A concurrent request replaced it first.
                self.discard(fresh);
            }
        }
        let s = self.state();
        if s.stopped {
            return Err(HostError::Stopping);
        }
        s.pool
            .iter()
            .filter(|c| c.alive())
            .min_by_key(|c| c.in_flight())
            .or_else(|| s.pool.first())
            .cloned()
            .ok_or(HostError::NotReady)
    }

    /// The child of `principal`'s own pool with the fewest requests in flight; a new one when
    /// all are busy and the pool is below `pool_size` (or it has none alive). A principal
    /// beyond `max_sessions` pools is refused.
    pub fn principal_child(&self, principal: &str) -> Result<Arc<Child>, HostError> {
        let pick = |s: &mut State| -> Option<Arc<Child>> {
            let pool = s.principal_pools.get_mut(principal)?;
            pool.retain(|c| c.alive());
            let best = pool.iter().min_by_key(|c| c.in_flight())?;
            (best.in_flight() == 0 || pool.len() >= self.config.pool_size.max(1))
                .then(|| Arc::clone(best))
        };
        {
            let mut s = self.state();
            if s.stopped {
                return Err(HostError::Stopping);
            }
            if !s.principal_pools.contains_key(principal)
                && s.principal_pools.len() >= self.config.max_sessions
            {
                return Err(HostError::TooManySessions(self.config.max_sessions));
            }
            if let Some(c) = pick(&mut s) {
                return Ok(c);
            }
        }
        let fresh = self.spawn(IdMode::Shared)?;
        let mut placed = false;
        let mut other = None;
        self.commit(&fresh, |s| {
            let pool = s.principal_pools.entry(principal.to_owned()).or_default();
            if pool.len() < self.config.pool_size.max(1) {
                pool.push(Arc::clone(&fresh));
                placed = true;
            } else {
                other = pick(s);
            }
        });
        if placed {
            return Ok(fresh);
        }
        self.discard(fresh);
        other.ok_or(HostError::Stopping)
    }

    /// A child for a new legacy session: a spare if one is ready, else a new one; spares are
    /// then started for the sessions after this one. The place under the cap is reserved
    /// here (see [`SessionSlot`]) and becomes the session in `register`.
    pub fn open_session(self: &Arc<Self>) -> Result<(Arc<Session>, SessionSlot), HostError> {
        let spare = {
            let mut s = self.state();
            if s.stopped {
                return Err(HostError::Stopping);
            }
            if s.sessions.len() + s.opening >= self.config.max_sessions {
                return Err(HostError::TooManySessions(self.config.max_sessions));
            }
            s.opening += 1;
            // Ended spares are dropped on the way (their processes are gone).
            std::iter::from_fn(|| s.spares.pop_front()).find(|c| c.alive())
        };
        let slot = SessionSlot {
            host: Arc::clone(self),
            reserved: true,
        };
        let child = match spare {
            Some(c) => c,
            None => self.spawn(IdMode::Owned)?,
        };
        self.refill_spares();
        let session = Arc::new(Session {
            id: uuid::Uuid::new_v4().simple().to_string(),
            child,
            created: chrono::Utc::now(),
        });
        Ok((session, slot))
    }

    /// Starts the spares that are missing (counting those being started), outside the lock.
    fn refill_spares(&self) {
        let missing = {
            let mut s = self.state();
            s.spares.retain(|c| c.alive());
            let missing = self
                .config
                .spares
                .saturating_sub(s.spares.len() + s.spares_starting);
            s.spares_starting += missing;
            missing
        };
        for _ in 0..missing {
            let started = self.spawn(IdMode::Owned);
            let mut s = self.state();
            s.spares_starting -= 1;
            match started {
                Ok(c) if !s.stopped => s.spares.push_back(c),
                Ok(c) => {
                    drop(s);
                    self.discard(c);
                }
                Err(e) => {
                    drop(s);
                    tracing::warn!(error = %e, "Cannot start a spare MCP server process");
                }
            }
        }
    }

    /// Makes an opened session reachable by its id: its reserved place becomes the session, in
    /// one step, so the cap counts it exactly once throughout.
    pub fn register(
        self: &Arc<Self>,
        session: &Arc<Session>,
        mut slot: SessionSlot,
    ) -> Result<(), HostError> {
        let kept = {
            let mut s = self.state();
            s.opening = s.opening.saturating_sub(1);
            slot.reserved = false;
            if !s.stopped {
                s.sessions.insert(session.id.clone(), Arc::clone(session));
            }
            !s.stopped
        };
        if !kept {
            self.discard(Arc::clone(&session.child));
            return Err(HostError::Stopping);
        }
        // The session ends with its child.
        let host = Arc::clone(self);
        let s = Arc::clone(session);
        tokio::spawn(async move {
            let why = s.child.wait().await;
            if host.state().sessions.remove(&s.id).is_some() {
                tracing::warn!(session = %s.id, pid = s.child.pid(), "MCP session ended: its server process {why}");
            }
        });
        Ok(())
    }

    pub fn session(&self, id: &str) -> Option<Arc<Session>> {
        self.state().sessions.get(id).cloned()
    }

    /// Ends a session (DELETE, idle, or its `initialize` failed): its child is stopped as the
    /// spec says (stdin closed, then SIGTERM, then SIGKILL).
    pub fn close_session(&self, id: &str) -> bool {
        let Some(s) = self.state().sessions.remove(id) else {
            return false;
        };
        self.discard(Arc::clone(&s.child));
        true
    }

    /// Closes sessions idle longer than the configured time: no request for that long and no
    /// request or standalone stream open.
    pub fn reap_idle(&self) -> usize {
        let idle = self.config.idle;
        let stale: Vec<Arc<Session>> = {
            let mut s = self.state();
            let ids: Vec<String> = s
                .sessions
                .values()
                .filter(|s| {
                    s.child.idle_for() >= idle
                        && s.child.in_flight() == 0
                        && !s.child.has_listener()
                })
                .map(|s| s.id.clone())
                .collect();
            ids.iter().filter_map(|id| s.sessions.remove(id)).collect()
        };
        for s in &stale {
            tracing::info!(session = %s.id, "Closing an idle MCP session");
            self.discard(Arc::clone(&s.child));
        }
        // A principal's pool goes when none of its processes has had a request for the idle
        // time; its next request starts a new one.
        let idle_pools: Vec<Arc<Child>> = {
            let mut s = self.state();
            let gone: Vec<String> = s
                .principal_pools
                .iter()
                .filter(|(_, pool)| {
                    pool.iter()
                        .all(|c| c.idle_for() >= idle && c.in_flight() == 0)
                })
                .map(|(p, _)| p.clone())
                .collect();
            gone.iter()
                .filter_map(|p| s.principal_pools.remove(p))
                .flatten()
                .collect()
        };
        for c in idle_pools {
            self.discard(c);
        }
        stale.len()
    }

    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.state().sessions.values().cloned().collect()
    }

    /// Every child this host runs.
    pub fn children(&self) -> Vec<Arc<Child>> {
        self.state().children()
    }

    /// Stops every child (sessions, pool, health, spares) as the spec says, all at once, and
    /// waits for them. Processes started after this are stopped as they are committed.
    pub async fn stop_all(&self) {
        let children = {
            let mut s = self.state();
            s.stopped = true;
            let all = s.children();
            s.sessions.clear();
            s.pool.clear();
            s.principal_pools.clear();
            s.health = None;
            s.spares.clear();
            all
        };
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

/// A place held under the session cap while a session is being opened; released if the
/// session is never registered.
pub struct SessionSlot {
    host: Arc<Host>,
    reserved: bool,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        if self.reserved {
            let mut s = self.host.state();
            s.opening = s.opening.saturating_sub(1);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("{0}")]
    Ended(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn cat_host(max_sessions: usize) -> Arc<Host> {
        host_of("cat", &[], max_sessions)
    }

    fn host_of(program: &str, args: &[&str], max_sessions: usize) -> Arc<Host> {
        Host::new(HostConfig {
            program: program.to_owned(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            max_sessions,
            idle: Duration::from_secs(600),
            pool_size: 1,
            spares: 1,
            probe: Duration::from_secs(10),
            grace: Duration::from_millis(500),
            containers: None,
        })
    }

    /// Many tasks open and close sessions against the cap at once (real `cat` processes); no
    /// open may ever succeed while the cap's worth of sessions is already held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_opens_never_exceed_the_cap() {
        const CAP: usize = 3;
        let host = cat_host(CAP);
        // Sessions the tasks hold: counted up once an open succeeds, down before the close.
        let held = Arc::new(AtomicUsize::new(0));
        let worst = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let (host, held, worst) =
                    (Arc::clone(&host), Arc::clone(&held), Arc::clone(&worst));
                tokio::spawn(async move {
                    let mut opened = 0;
                    while opened < 150 {
                        match host.open_session() {
                            Ok((session, slot)) => {
                                let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                                worst.fetch_max(now, Ordering::SeqCst);
                                host.register(&session, slot).unwrap();
                                tokio::task::yield_now().await;
                                held.fetch_sub(1, Ordering::SeqCst);
                                host.close_session(&session.id);
                                opened += 1;
                            }
                            Err(HostError::TooManySessions(_)) => tokio::task::yield_now().await,
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            worst.load(Ordering::SeqCst) <= CAP,
            "{} sessions held at once with a cap of {CAP}",
            worst.load(Ordering::SeqCst)
        );
        host.stop_all().await;
    }

    /// A server that reads its input and never answers: discover and ping share the one
    /// startup deadline (time is paused: the clock jumps to each next timer, so "within" is
    /// virtual time, not a measurement).
    #[tokio::test(start_paused = true)]
    async fn era_detection_has_one_deadline_for_discover_and_ping() {
        let host = host_of("sleep", &["600"], 1);
        let deadline = Duration::from_millis(1500);
        let started =
            tokio::time::timeout(deadline + Duration::from_millis(100), host.start(deadline)).await;
        host.stop_all().await;
        let err = started
            .expect("era detection took longer than its deadline")
            .unwrap_err();
        assert!(
            err.contains("neither server/discover nor ping within 1500 ms"),
            "{err}"
        );
    }

    /// A modern server too slow to answer `server/discover` before the bridge also sends
    /// `ping`: it answers discover first (in order, as stdio servers do), then refuses ping.
    /// Its late discover reply makes it modern.
    #[tokio::test]
    async fn a_late_discover_reply_still_makes_the_server_modern() {
        let script = r#"
            read -r discover; read -r ping
            id() { printf '%s' "$1" | sed 's/.*"id":\([0-9]*\).*/\1/'; }
            printf '{"jsonrpc":"2.0","id":%s,"result":{"supportedVersions":["2026-07-28"],"capabilities":{},"_meta":{"io.modelcontextprotocol/serverInfo":{"name":"late","version":"1"}}}}\n' "$(id "$discover")"
            printf '{"jsonrpc":"2.0","id":%s,"error":{"code":-32601,"message":"Method not found"}}\n' "$(id "$ping")"
            cat >/dev/null
        "#;
        let host = host_of("sh", &["-c", script], 1);
        let era = host.start(Duration::from_secs(6)).await;
        host.stop_all().await;
        assert_eq!(era, Ok(Era::Modern));
    }
}
