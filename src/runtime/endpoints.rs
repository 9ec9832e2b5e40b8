//! Where each deployment of a runtime listens, from its reservation to its release, and the
//! host ports behind those endpoints. Every runtime that publishes host ports draws them from
//! one allocator (shared through an `Arc`), so a port is never handed out twice across
//! runtimes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use uuid::Uuid;

use super::{Endpoint, Listen, PortUse, RuntimeError};
use crate::ports::PortAllocator;

pub struct Endpoints {
    held: Mutex<HashMap<Uuid, Endpoint>>,
    ports: Arc<PortAllocator>,
}

impl Endpoints {
    pub fn new(ports: Arc<PortAllocator>) -> Endpoints {
        Endpoints {
            held: Mutex::default(),
            ports,
        }
    }

    pub fn ports(&self) -> &PortAllocator {
        &self.ports
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Endpoint>> {
        // Every update is a single insert or remove, so a poisoned lock is still consistent.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoint held for `id`, or a new one as `listen` asks: a host port on `host` (the
    /// preferred one when it is free, else any in the range), or the named socket.
    pub fn reserve(&self, id: Uuid, listen: &Listen, host: &str) -> Result<Endpoint, RuntimeError> {
        if let Some(held) = self.held().get(&id) {
            return Ok(held.clone());
        }
        let endpoint = match listen {
            Listen::Port { prefer, .. } => {
                let port = match prefer {
                    Some(p) if self.ports.take(*p) => *p,
                    _ => self.ports.allocate()?,
                };
                Endpoint::Tcp {
                    host: host.to_owned(),
                    port,
                }
            }
            Listen::Socket(path) => Endpoint::Unix(path.clone()),
        };
        Ok(self.hold(id, endpoint))
    }

    /// Holds where an adopted instance listens: its port is the deployment's whatever the
    /// range says now.
    pub fn adopted(&self, id: Uuid, endpoint: Endpoint) -> Endpoint {
        if let Some(p) = endpoint.port() {
            self.ports.reserve(p);
        }
        self.hold(id, endpoint)
    }

    /// Records `endpoint` for `id` unless one is already there; returns the one that holds.
    /// A port claimed for nothing (a racing reservation won) goes back to the allocator.
    fn hold(&self, id: Uuid, endpoint: Endpoint) -> Endpoint {
        let held = self
            .held()
            .entry(id)
            .or_insert_with(|| endpoint.clone())
            .clone();
        if held != endpoint
            && let Some(p) = endpoint.port()
        {
            self.ports.release(p);
        }
        held
    }

    /// Ends `id`'s claim and frees its port. Idempotent.
    pub fn release(&self, id: Uuid) {
        let gone = self.held().remove(&id);
        if let Some(p) = gone.and_then(|e| e.port()) {
            self.ports.release(p);
        }
    }

    /// How much of the shared range is taken (by every runtime).
    pub fn port_use(&self) -> PortUse {
        PortUse {
            in_use: self.ports.in_use().len(),
            total: self.ports.range().len(),
        }
    }
}
