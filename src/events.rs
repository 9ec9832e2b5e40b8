//! Status and health transitions, as they happen, for whoever listens (`GET /api/v1/events`,
//! `switchboard events`).
//!
//! A broadcast channel: publishing never waits and costs nothing without subscribers, and a
//! subscriber that falls more than [`CAPACITY`] events behind is told how many it missed
//! rather than slowing the supervisors down.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;
use uuid::Uuid;

/// Events kept for a slow subscriber before it starts missing some.
pub const CAPACITY: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// `from`/`to` are deployment statuses (STARTING, RUNNING, STOPPED, FAILED).
    Status,
    /// `from`/`to` are health statuses (HEALTHY, UNHEALTHY, UNKNOWN).
    Health,
    /// A tool's package being installed: `to` is INSTALLING (`reason`: an installer output
    /// line), INSTALLED or INSTALL_FAILED (`reason`: why).
    Install,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub at: DateTime<Utc>,
    pub kind: EventKind,
    pub deployment: Uuid,
    pub tool: String,
    /// `None` for a deployment's first status.
    pub from: Option<String>,
    pub to: String,
    /// Why, when there is more to say than the new state (an exit, a failed probe).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Events {
    pub fn publish(&self, event: Event) {
        // An error only means nobody listens.
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
