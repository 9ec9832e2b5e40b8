//! Session affinity: which deployment minted an `Mcp-Session-Id` (or a legacy HTTP+SSE
//! `sessionId`), so every follow-up of that session reaches the same process.
//!
//! Bounded (capacity) and expiring (idle time): a client that walks away costs nothing
//! forever. An id we do not know, or whose deployment is gone, gets 404, which tells an MCP
//! client to initialize again; rerouting it silently to another replica would hand a session id
//! to a server that never issued it.
//!
//! Keys are `(slug, upstream id)`: two tools may mint equal ids without colliding. Two replicas
//! of one tool minting the *same* id (a server with predictable ids) would collide; servers are
//! expected to mint random ids, as the spec says they SHOULD.

use std::time::Duration;

use moka::sync::Cache;
use uuid::Uuid;

/// The longest session id accepted (the spec allows any visible ASCII; we bound it before any
/// table lookup).
pub const MAX_SESSION_ID_LEN: usize = 256;

#[derive(Clone)]
pub struct Sessions {
    cache: Cache<String, Uuid>,
}

fn key(slug: &str, id: &str) -> String {
    let mut k = String::with_capacity(slug.len() + 1 + id.len());
    k.push_str(slug);
    k.push('\n');
    k.push_str(id);
    k
}

/// Visible ASCII (0x21–0x7E), at most [`MAX_SESSION_ID_LEN`] bytes.
pub fn valid_session_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_SESSION_ID_LEN && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

impl Sessions {
    pub fn new(max: u64, idle: Duration) -> Sessions {
        Sessions {
            cache: Cache::builder()
                .max_capacity(max)
                .time_to_idle(idle)
                .build(),
        }
    }

    pub fn get(&self, slug: &str, id: &str) -> Option<Uuid> {
        self.cache.get(&key(slug, id))
    }

    pub fn insert(&self, slug: &str, id: &str, deployment: Uuid) {
        self.cache.insert(key(slug, id), deployment);
    }

    pub fn remove(&self, slug: &str, id: &str) {
        self.cache.invalidate(&key(slug, id));
    }

    pub fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
