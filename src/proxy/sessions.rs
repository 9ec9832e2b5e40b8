//! Session affinity: which deployment minted an `Mcp-Session-Id` (or a legacy HTTP+SSE
//! `sessionId`), so every follow-up of that session reaches the same process.
//!
//! Bounded (capacity) and expiring (idle time): a client that walks away costs nothing
//! forever. An id we do not know, or whose deployment is gone, gets 404, which tells an MCP
//! client to initialize again; rerouting it silently to another replica would hand a session id
//! to a server that never issued it.
//!
//! Each session also records the principal that opened it: the same id from another principal
//! is unknown to it (404), so a leaked or guessed session id does not hand one client's
//! session to another.
//!
//! Keys are `(slug, upstream id)`: two tools may mint equal ids without colliding. Two replicas
//! of one tool minting the *same* id (a server with predictable ids) would collide; servers are
//! expected to mint random ids, as the spec says they SHOULD.

use std::{sync::Arc, time::Duration};

use moka::sync::Cache;
use uuid::Uuid;

/// The longest session id accepted (the spec allows any visible ASCII; we bound it before any
/// table lookup).
pub const MAX_SESSION_ID_LEN: usize = 256;

#[derive(Clone)]
pub struct Sessions {
    cache: Cache<String, Pinned>,
}

/// Where a session lives and who opened it.
#[derive(Clone, Debug)]
struct Pinned {
    deployment: Uuid,
    /// The principal whose request minted the session (`None` with auth off): only it may use
    /// the session, so one client's session, and the server state behind it, is never another's.
    principal: Option<Arc<str>>,
}

/// What the table knows of a session id, for the principal asking.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Its deployment.
    Found(Uuid),
    /// Never seen (or expired).
    Unknown,
    /// Minted for another principal: to this one, it does not exist.
    OtherPrincipal,
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

    pub fn get(&self, slug: &str, id: &str, principal: Option<&str>) -> Lookup {
        match self.cache.get(&key(slug, id)) {
            None => Lookup::Unknown,
            Some(p) if p.principal.as_deref() == principal => Lookup::Found(p.deployment),
            Some(_) => Lookup::OtherPrincipal,
        }
    }

    pub fn insert(&self, slug: &str, id: &str, deployment: Uuid, principal: Option<&str>) {
        self.cache.insert(
            key(slug, id),
            Pinned {
                deployment,
                principal: principal.map(Arc::from),
            },
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_belongs_to_the_principal_that_opened_it() {
        let s = Sessions::new(10, Duration::from_secs(60));
        let d = Uuid::new_v4();
        s.insert("t", "sid", d, Some("key-a"));
        assert_eq!(s.get("t", "sid", Some("key-a")), Lookup::Found(d));
        assert_eq!(s.get("t", "sid", Some("key-b")), Lookup::OtherPrincipal);
        assert_eq!(s.get("t", "sid", None), Lookup::OtherPrincipal);
        assert_eq!(s.get("u", "sid", Some("key-a")), Lookup::Unknown);
        s.insert("t", "open", d, None);
        assert_eq!(s.get("t", "open", None), Lookup::Found(d));
    }
}
