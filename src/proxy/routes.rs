//! The routing table: slug → the tool's live backends.
//!
//! Read on every proxied request, written only when a deployment becomes RUNNING or starts to
//! stop, or a tool is created or deleted. So the table is an immutable map behind an
//! `ArcSwap`: a request pays one atomic load and one hash lookup, never a lock; a writer clones
//! the map (a few hundred entries at most) and swaps it in under a writer-only mutex.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use arc_swap::ArcSwap;
use http::uri::Authority;
use uuid::Uuid;

/// One live deployment that can take requests.
#[derive(Debug)]
pub struct Backend {
    pub deployment: Uuid,
    /// `127.0.0.1:<port>`, also the `Host` the upstream is sent.
    pub authority: Authority,
    /// The server's MCP endpoint path, e.g. `/mcp`.
    pub endpoint_path: String,
    /// Requests in flight (including open streams), for least-outstanding balancing.
    outstanding: AtomicU32,
}

impl Backend {
    pub fn new(deployment: Uuid, authority: Authority, endpoint_path: String) -> Backend {
        Backend {
            deployment,
            authority,
            endpoint_path,
            outstanding: AtomicU32::new(0),
        }
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts a request until the guard drops (when the response body ends or is dropped).
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }
}

/// A request in flight on a backend.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
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
    pub fn pick(&self) -> Option<&Arc<Backend>> {
        match self.backends.len() {
            0 => None,
            1 => self.backends.first(),
            n => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (x, y) = (&self.backends[a], &self.backends[b]);
                Some(if y.outstanding() < x.outstanding() {
                    y
                } else {
                    x
                })
            }
        }
    }
}

#[derive(Default)]
pub struct RouteTable {
    map: ArcSwap<HashMap<String, Arc<ToolRoutes>>>,
    write: Mutex<()>,
}

impl RouteTable {
    pub fn new() -> RouteTable {
        RouteTable::default()
    }

    pub fn get(&self, slug: &str) -> Option<Arc<ToolRoutes>> {
        self.map.load().get(slug).cloned()
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

    pub fn add_backend(&self, slug: &str, backend: Arc<Backend>) {
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
