//! The routing table: slug → the tool's live backends.
//!
//! Read on every proxied request, written only when a deployment becomes RUNNING or starts to
//! stop, or a tool is created or deleted. So the table is an immutable map behind an
//! `ArcSwap`: a request pays one atomic load and one hash lookup, never a lock; a writer clones
//! the map (a few hundred entries at most) and swaps it in under a writer-only mutex.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use http::uri::Authority;
use uuid::Uuid;

use crate::runtime::Endpoint;

/// One live deployment that can take requests.
#[derive(Debug)]
pub struct Backend {
    pub deployment: Uuid,
    /// Where the deployment listens.
    pub endpoint: Endpoint,
    /// The authority requests to `endpoint` carry (see `proxy::connect`), also the `Host` the
    /// upstream is sent.
    pub authority: Authority,
    /// The server's MCP endpoint path, e.g. `/mcp`.
    pub endpoint_path: String,
    /// Requests in flight (including open streams), for least-outstanding balancing.
    outstanding: AtomicU32,
    /// Open SSE response streams (a subset of `outstanding`), for metrics.
    streams: AtomicU32,
    breaker: Breaker,
    /// Per-request metrics, when metrics are on.
    pub metrics: Option<crate::metrics::BackendMetrics>,
    /// The tool's `call_timeout_ms`: how long to wait for response headers instead of the
    /// proxy's `header_timeout`.
    pub call_timeout: Option<Duration>,
    /// The tool's `forward_credentials`: the client's `Authorization` reaches the server even
    /// when Switchboard authenticated the request with it.
    pub forward_credentials: bool,
    /// The tool's `expose_tools`: the only MCP tools any client sees and may call.
    pub expose_tools: Option<Arc<[String]>>,
    /// The tool's `audit_arguments`: audit records carry `tools/call` arguments.
    pub audit_arguments: bool,
}

/// Consecutive failures (connect errors, timeouts, 5xx) that take a backend out of balancing.
pub const EJECT_AFTER: u32 = 5;
const FIRST_EJECTION: Duration = Duration::from_secs(1);
const MAX_EJECTION: Duration = Duration::from_secs(30);

/// Passive health: a circuit breaker per backend. Closed, it admits everything; after
/// [`EJECT_AFTER`] consecutive failures it opens for an ejection time (1 s, doubling per trip
/// up to 30 s); then it is half-open: one request is let through, and its outcome closes the
/// breaker or opens it again for longer. Active health checks (the manager's) are separate and
/// slower; this reacts within a few requests. The hot path costs one relaxed load when closed.
#[derive(Debug, Default)]
struct Breaker {
    failures: AtomicU32,
    /// Milliseconds after [`epoch`] until which the breaker is open; 0 when closed.
    open_until: AtomicU64,
    /// Trips since it last closed, for the ejection time.
    trips: AtomicU32,
    /// A half-open trial request is out.
    trial: AtomicBool,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Breaker {
    fn admits(&self, now: impl FnOnce() -> u64) -> bool {
        let until = self.open_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        now() >= until && !self.trial.swap(true, Ordering::AcqRel)
    }

    /// Returns true when this outcome opened the breaker.
    fn record(&self, ok: bool, now: impl FnOnce() -> u64) -> bool {
        if ok {
            if self.failures.load(Ordering::Relaxed) != 0 {
                self.failures.store(0, Ordering::Relaxed);
            }
            if self.open_until.load(Ordering::Relaxed) != 0 {
                self.reset();
            }
            return false;
        }
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let half_open_trial_failed = self.trial.load(Ordering::Acquire);
        if failures < EJECT_AFTER && !half_open_trial_failed {
            return false;
        }
        let trips = self.trips.fetch_add(1, Ordering::AcqRel);
        let ejection = FIRST_EJECTION
            .saturating_mul(1u32.checked_shl(trips).unwrap_or(u32::MAX))
            .min(MAX_EJECTION);
        let until = now().saturating_add(u64::try_from(ejection.as_millis()).unwrap_or(u64::MAX));
        self.open_until.store(until.max(1), Ordering::Release);
        self.failures.store(0, Ordering::Relaxed);
        self.trial.store(false, Ordering::Release);
        true
    }

    fn reset(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.trips.store(0, Ordering::Relaxed);
        self.open_until.store(0, Ordering::Release);
        self.trial.store(false, Ordering::Release);
    }
}

impl Backend {
    pub fn new(
        deployment: Uuid,
        endpoint: Endpoint,
        endpoint_path: String,
    ) -> Result<Backend, http::uri::InvalidUri> {
        Ok(Backend {
            deployment,
            authority: super::connect::authority(&endpoint)?,
            endpoint,
            endpoint_path,
            outstanding: AtomicU32::new(0),
            streams: AtomicU32::new(0),
            breaker: Breaker::default(),
            metrics: None,
            call_timeout: None,
            forward_credentials: false,
            expose_tools: None,
            audit_arguments: false,
        })
    }

    pub fn with_forward_credentials(mut self, forward: bool) -> Backend {
        self.forward_credentials = forward;
        self
    }

    pub fn with_expose_tools(mut self, names: Option<&[String]>) -> Backend {
        self.expose_tools = names.map(Arc::from);
        self
    }

    pub fn with_audit_arguments(mut self, audit: bool) -> Backend {
        self.audit_arguments = audit;
        self
    }

    pub fn with_call_timeout(mut self, timeout: Option<Duration>) -> Backend {
        self.call_timeout = timeout;
        self
    }

    /// Whether this backend is a stdio deployment's bridge (reached over its Unix socket).
    pub fn is_stdio_bridge(&self) -> bool {
        matches!(self.endpoint, Endpoint::Unix(_))
    }

    pub fn with_metrics(mut self, metrics: crate::metrics::BackendMetrics) -> Backend {
        self.metrics = Some(metrics);
        self
    }

    pub fn open_streams(&self) -> u32 {
        self.streams.load(Ordering::Relaxed)
    }

    /// Whether balancing may send this backend a request now (its breaker is closed, or
    /// half-open and this is the trial request).
    pub fn admits(&self) -> bool {
        self.breaker.admits(now_ms)
    }

    /// Feeds the breaker a request's outcome (`ok`: the upstream answered with a status below
    /// 500). Returns true when this failure took the backend out of balancing.
    pub fn record(&self, ok: bool) -> bool {
        self.breaker.record(ok, now_ms)
    }

    /// Closes the breaker (a fresh process behind the backend).
    pub fn reset_breaker(&self) {
        self.breaker.reset();
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts a request until the guard drops (when the response body ends or is dropped).
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight {
            backend: Arc::clone(self),
            stream: false,
        }
    }
}

/// A request in flight on a backend.
#[derive(Debug)]
pub struct InFlight {
    backend: Arc<Backend>,
    stream: bool,
}

impl InFlight {
    /// The response is a stream: counted as an open stream until it ends.
    pub fn mark_stream(&mut self) {
        if !self.stream {
            self.stream = true;
            self.backend.streams.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.outstanding.fetch_sub(1, Ordering::Relaxed);
        if self.stream {
            self.backend.streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A tool's entry: its backends (possibly none: the tool exists but nothing is live).
#[derive(Debug, Default)]
pub struct ToolRoutes {
    pub backends: Vec<Arc<Backend>>,
}

impl ToolRoutes {
    pub fn find(&self, deployment: Uuid) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.deployment == deployment)
    }

    /// Power of two choices on outstanding requests: two random backends, take the less busy.
    /// It spreads load nearly as well as a global least-loaded scan, needs no lock or shared
    /// queue, and avoids the herd a strict least-loaded pick sends to a newly started replica.
    /// A backend whose breaker is open is skipped; `None` when no backend admits a request.
    pub fn pick(&self) -> Option<&Arc<Backend>> {
        let chosen = match self.backends.len() {
            0 => return None,
            1 => &self.backends[0],
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (x, y) = (&self.backends[a], &self.backends[b]);
                if y.outstanding() < x.outstanding() {
                    y
                } else {
                    x
                }
            }
        };
        if chosen.admits() {
            return Some(chosen);
        }
        self.backends
            .iter()
            .filter(|b| b.deployment != chosen.deployment)
            .find(|b| b.admits())
    }
}

#[derive(Default)]
pub struct RouteTable {
    map: ArcSwap<HashMap<String, Arc<ToolRoutes>>>,
    write: Mutex<()>,
    /// Where to connect for a routed backend's authority when that is not the authority itself
    /// (a container reached at its own address rather than through its published port).
    /// Read per new upstream connection, not per request.
    dials: Mutex<HashMap<Authority, SocketAddr>>,
}

impl RouteTable {
    pub fn new() -> RouteTable {
        RouteTable::default()
    }

    pub fn get(&self, slug: &str) -> Option<Arc<ToolRoutes>> {
        self.map.load().get(slug).cloned()
    }

    /// Every routed backend, with its tool's slug (for metrics).
    pub fn all_backends(&self) -> Vec<(String, Arc<Backend>)> {
        self.map
            .load()
            .iter()
            .flat_map(|(slug, t)| t.backends.iter().map(|b| (slug.clone(), Arc::clone(b))))
            .collect()
    }

    fn update(&self, f: impl FnOnce(&mut HashMap<String, Arc<ToolRoutes>>)) {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::clone(&self.map.load());
        f(&mut next);
        self.map.store(Arc::new(next));
    }

    /// A tool exists (with no backends until one is added).
    pub fn add_tool(&self, slug: &str) {
        self.update(|m| {
            m.entry(slug.to_owned()).or_default();
        });
    }

    pub fn remove_tool(&self, slug: &str) {
        self.update(|m| {
            m.remove(slug);
        });
    }

    /// Where the connector dials for `authority`, when not at the authority itself.
    pub fn dial(&self, authority: &Authority) -> Option<SocketAddr> {
        self.dials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(authority)
            .copied()
    }

    /// Routes `backend` (replacing the deployment's earlier one); `dial`: the address its
    /// connections go to instead of its authority (the runtime's [`crate::runtime::Runtime::dial`]).
    pub fn add_backend(&self, slug: &str, backend: Arc<Backend>, dial: Option<SocketAddr>) {
        {
            let mut dials = self.dials.lock().unwrap_or_else(|p| p.into_inner());
            match dial {
                Some(a) => dials.insert(backend.authority.clone(), a),
                None => dials.remove(&backend.authority),
            };
        }
        self.update(|m| {
            let old = m.get(slug).map(|t| t.backends.clone()).unwrap_or_default();
            let mut backends: Vec<_> = old
                .into_iter()
                .filter(|b| b.deployment != backend.deployment)
                .collect();
            backends.push(backend);
            m.insert(slug.to_owned(), Arc::new(ToolRoutes { backends }));
        });
    }

    pub fn remove_backend(&self, slug: &str, deployment: Uuid) {
        self.update(|m| {
            if let Some(t) = m.get(slug) {
                // Its authority (a port) may go to another deployment next.
                if let Some(gone) = t.backends.iter().find(|b| b.deployment == deployment) {
                    self.dials
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&gone.authority);
                }
                let backends = t
                    .backends
                    .iter()
                    .filter(|b| b.deployment != deployment)
                    .cloned()
                    .collect();
                m.insert(slug.to_owned(), Arc::new(ToolRoutes { backends }));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The breaker with an injected clock: no waiting.
    #[test]
    fn breaker_opens_after_consecutive_failures_then_half_opens_and_backs_off() {
        let b = Breaker::default();
        for _ in 0..EJECT_AFTER - 1 {
            assert!(!b.record(false, || 0));
        }
        assert!(b.admits(|| 0), "still closed below the threshold");
        // A success in between resets the count.
        b.record(true, || 0);
        for _ in 0..EJECT_AFTER - 1 {
            b.record(false, || 0);
        }
        assert!(
            b.record(false, || 1_000),
            "the fifth failure in a row opens it"
        );
        assert!(!b.admits(|| 1_500), "open for 1 s");
        assert!(b.admits(|| 2_000), "half-open: one trial");
        assert!(!b.admits(|| 2_001), "only one trial at a time");
        // The trial fails: open again, for twice as long.
        assert!(b.record(false, || 2_010));
        assert!(!b.admits(|| 3_500));
        assert!(b.admits(|| 4_010));
        // The trial succeeds: closed.
        b.record(true, || 4_020);
        assert!(b.admits(|| 4_021));
        assert!(b.admits(|| 4_022));
    }

    #[test]
    fn ejection_is_capped() {
        let b = Breaker::default();
        let mut now = 0;
        for _ in 0..20 {
            for _ in 0..EJECT_AFTER {
                b.record(false, || now);
            }
            let until = b.open_until.load(Ordering::Relaxed);
            assert!(until - now <= 30_000, "{}", until - now);
            now = until;
            assert!(b.admits(|| now));
        }
    }

    /// A dial address lives exactly as long as its backend's route: a port that goes to
    /// another deployment next must not be dialled at the old container's address.
    #[test]
    fn a_dial_address_goes_with_its_backend() {
        let table = RouteTable::new();
        let endpoint = Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 8100,
        };
        let boxed =
            Arc::new(Backend::new(Uuid::new_v4(), endpoint.clone(), "/mcp".into()).unwrap());
        let authority = boxed.authority.clone();
        let addr: SocketAddr = "172.17.0.2:8100".parse().unwrap();
        table.add_backend("t", Arc::clone(&boxed), Some(addr));
        assert_eq!(table.dial(&authority), Some(addr));
        table.remove_backend("t", boxed.deployment);
        assert_eq!(table.dial(&authority), None);
        // The same port routed again without one (a process now): none is left over.
        table.add_backend("t", Arc::clone(&boxed), Some(addr));
        let process = Arc::new(Backend::new(Uuid::new_v4(), endpoint, "/mcp".into()).unwrap());
        table.add_backend("u", process, None);
        assert_eq!(table.dial(&authority), None);
    }

    #[test]
    fn pick_skips_open_backends_and_gives_none_when_all_are_open() {
        let mk = || {
            let endpoint = Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 1,
            };
            Arc::new(Backend::new(Uuid::new_v4(), endpoint, "/mcp".into()).unwrap())
        };
        let routes = ToolRoutes {
            backends: vec![mk(), mk(), mk()],
        };
        for _ in 0..EJECT_AFTER {
            routes.backends[0].record(false);
            routes.backends[1].record(false);
        }
        for _ in 0..50 {
            let b = routes.pick().unwrap();
            assert_eq!(b.deployment, routes.backends[2].deployment);
        }
        for _ in 0..EJECT_AFTER {
            routes.backends[2].record(false);
        }
        assert!(routes.pick().is_none());
    }
}
