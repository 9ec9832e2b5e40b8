//! Health-check results that changed nothing, written to the store in batches.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use uuid::Uuid;

use super::Manager;
use crate::{deployment::HealthStatus, store::Store};

/// Unchanged health-check results, written to the store in batches: with 1,000 deployments
/// checked every 10 s, one commit per second instead of a hundred (each commit is an fsync on
/// SQLite). Only the newest result per deployment is kept; a failed flush is dropped, since the
/// next round of checks writes the same fields again.
pub(super) struct HealthLog {
    pending: Arc<Mutex<PendingChecks>>,
}

/// Deployment → its newest unwritten check result.
type PendingChecks = HashMap<Uuid, (HealthStatus, chrono::DateTime<chrono::Utc>)>;

/// How often batched health results are written.
const HEALTH_FLUSH: Duration = Duration::from_secs(1);

impl HealthLog {
    pub(super) fn new() -> HealthLog {
        HealthLog {
            pending: Arc::default(),
        }
    }

    pub(super) fn record(&self, id: Uuid, health: HealthStatus, at: chrono::DateTime<chrono::Utc>) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (health, at));
    }

    /// Writes batches until the manager is gone.
    pub(super) fn spawn_flusher(&self, store: Store, manager: std::sync::Weak<Manager>) {
        let pending = Arc::clone(&self.pending);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_FLUSH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if manager.strong_count() == 0 {
                    return;
                }
                let batch: Vec<_> =
                    std::mem::take(&mut *pending.lock().unwrap_or_else(|p| p.into_inner()))
                        .into_iter()
                        .map(|(id, (h, at))| (id, h, at))
                        .collect();
                if let Err(e) = store.set_health_many(&batch).await {
                    tracing::warn!(error = %e, checks = batch.len(), "Could not record health checks");
                }
            }
        });
    }
}
