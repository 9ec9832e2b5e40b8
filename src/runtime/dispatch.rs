//! A node's runtimes, and which one runs each deployment.
//!
//! A new deployment runs on its tool's runtime, an existing one on the runtime its record
//! names; the manager says which when it claims an endpoint ([`Runtimes::assign`], before
//! `reserve` or `adopt`), and every later call for that deployment goes to that runtime
//! ([`Runtimes::of`]) until its release.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use uuid::Uuid;

use super::{PortUse, Runtime, RuntimeError, RuntimeKind, docker::DockerRuntime};

pub struct Runtimes {
    /// The default: what a deployment no runtime was assigned to is asked about.
    process: Arc<dyn Runtime>,
    others: HashMap<RuntimeKind, Arc<dyn Runtime>>,
    /// The Docker runtime, also as itself: package installs use its engine.
    docker: Option<Arc<DockerRuntime>>,
    /// The runtime of each deployment between its assignment and its release.
    owners: Mutex<HashMap<Uuid, RuntimeKind>>,
}

impl Runtimes {
    /// The process runtime alone; [`Runtimes::with`] adds others. A runtime not added is
    /// unavailable (disabled in the config).
    pub fn new(process: Arc<dyn Runtime>) -> Runtimes {
        Runtimes {
            process,
            others: HashMap::new(),
            docker: None,
            owners: Mutex::default(),
        }
    }

    pub fn with(mut self, runtime: Arc<dyn Runtime>) -> Runtimes {
        self.others.insert(runtime.kind(), runtime);
        self
    }

    /// Adds the Docker runtime.
    pub fn with_docker(mut self, docker: Arc<DockerRuntime>) -> Runtimes {
        self.docker = Some(Arc::clone(&docker));
        self.with(docker)
    }

    /// The Docker runtime, or why there is none.
    pub fn docker(&self) -> Result<Arc<DockerRuntime>, RuntimeError> {
        self.docker
            .clone()
            .ok_or_else(|| RuntimeError::Unavailable {
                runtime: "docker",
                reason: "it is disabled in the config".into(),
            })
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, RuntimeKind>> {
        // Every update is a single insert or remove, so a poisoned lock is still consistent.
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The runtime of `kind`, or why there is none.
    pub fn get(&self, kind: RuntimeKind) -> Result<Arc<dyn Runtime>, RuntimeError> {
        if kind == self.process.kind() {
            return Ok(Arc::clone(&self.process));
        }
        self.others
            .get(&kind)
            .cloned()
            .ok_or_else(|| RuntimeError::Unavailable {
                runtime: kind.as_str(),
                reason: "it is disabled in the config".into(),
            })
    }

    /// Makes `kind` the runtime of deployment `id` and returns it.
    pub fn assign(&self, id: Uuid, kind: RuntimeKind) -> Result<Arc<dyn Runtime>, RuntimeError> {
        let runtime = self.get(kind)?;
        self.owners().insert(id, kind);
        Ok(runtime)
    }

    /// The runtime deployment `id` was assigned to (the process runtime for one never
    /// assigned, which it does not know either).
    pub fn of(&self, id: Uuid) -> Arc<dyn Runtime> {
        let kind = self.owners().get(&id).copied();
        kind.and_then(|k| self.get(k).ok())
            .unwrap_or_else(|| Arc::clone(&self.process))
    }

    /// Releases `id`'s endpoint with its runtime and forgets the assignment.
    pub fn release(&self, id: Uuid) {
        self.of(id).release(id);
        self.owners().remove(&id);
    }

    /// Every runtime, the process runtime first.
    pub fn all(&self) -> Vec<Arc<dyn Runtime>> {
        std::iter::once(Arc::clone(&self.process))
            .chain(self.others.values().cloned())
            .collect()
    }

    /// How much of the host port range is taken: the runtimes share one allocator, so any
    /// runtime that allocates reports it whole.
    pub fn host_ports(&self) -> Option<PortUse> {
        self.all().iter().find_map(|r| r.host_ports())
    }
}
