//! Port allocation for deployments that listen on a port.
//!
//! The allocator hands out ports from one configured range. It keeps the set of ports held by
//! live deployments in memory (rebuilt from the store at start with [`PortAllocator::reserve`]);
//! the store's unique index is the backstop. A port that some other process already listens on is
//! skipped: the check is a bind on 127.0.0.1, so it catches listeners on 127.0.0.1 and 0.0.0.0.
//!
//! Allocation scans from a rotating cursor rather than from the bottom of the range, so a port
//! released a moment ago is the last to be handed out again (its old connections may still be
//! draining), while every port stays reusable.

use std::{
    collections::BTreeSet,
    fmt,
    net::{Ipv4Addr, TcpListener},
    str::FromStr,
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

/// An inclusive range of TCP ports, written `8100-8200`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn new(start: u16, end: u16) -> Result<PortRange, String> {
        if start == 0 || start > end {
            return Err(format!(
                "port range {start}-{end} is empty or starts at 0: write it as LOW-HIGH with 1 <= LOW <= HIGH"
            ));
        }
        Ok(PortRange { start, end })
    }
    pub fn len(&self) -> usize {
        usize::from(self.end - self.start) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            start: 8100,
            end: 8200,
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once('-').ok_or_else(|| {
            format!("'{s}' is not a port range: write it as LOW-HIGH, e.g. 8100-8200")
        })?;
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("'{p}' in port range '{s}' is not a port number (1-65535)"))
        };
        PortRange::new(parse(a)?, parse(b)?)
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "no free port in the range {range}: every port is held by a live deployment or another process"
)]
pub struct PortsExhausted {
    pub range: PortRange,
}

#[derive(Debug)]
struct State {
    used: BTreeSet<u16>,
    cursor: u16,
}

#[derive(Debug)]
pub struct PortAllocator {
    range: PortRange,
    state: Mutex<State>,
}

/// Whether another process listens on the port (or it cannot be bound for another reason).
fn held_elsewhere(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err()
}

impl PortAllocator {
    pub fn new(range: PortRange) -> PortAllocator {
        let cursor = range.start;
        PortAllocator {
            range,
            state: Mutex::new(State {
                used: BTreeSet::new(),
                cursor,
            }),
        }
    }

    pub fn range(&self) -> &PortRange {
        &self.range
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the set half-updated (every update is a
        // single insert/remove), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a free port.
    pub fn allocate(&self) -> Result<u16, PortsExhausted> {
        let mut st = self.lock();
        let n = self.range.len();
        let offset = usize::from(st.cursor - self.range.start);
        for i in 0..n {
            let port = self.range.start + ((offset + i) % n) as u16;
            if st.used.contains(&port) || held_elsewhere(port) {
                continue;
            }
            st.used.insert(port);
            st.cursor = if port == self.range.end {
                self.range.start
            } else {
                port + 1
            };
            return Ok(port);
        }
        Err(PortsExhausted {
            range: self.range.clone(),
        })
    }

    /// Takes `port` if it is in the range, not held by a deployment and not listened on by
    /// another process.
    pub fn take(&self, port: u16) -> bool {
        let mut st = self.lock();
        if !self.range.contains(port) || st.used.contains(&port) || held_elsewhere(port) {
            return false;
        }
        st.used.insert(port)
    }

    /// Marks a port as held by a live deployment found in the store. Ports outside the range
    /// (the range was changed since) are still tracked so they are never handed out twice.
    pub fn reserve(&self, port: u16) {
        self.lock().used.insert(port);
    }

    /// Gives a port back. Only the party that ended the deployment calls this.
    pub fn release(&self, port: u16) {
        self.lock().used.remove(&port);
    }

    /// Ports held by live deployments, in order.
    pub fn in_use(&self) -> Vec<u16> {
        self.lock().used.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges() {
        assert_eq!(
            "8100-8200".parse::<PortRange>().unwrap(),
            PortRange::default()
        );
        assert!("8200-8100".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("abc".parse::<PortRange>().unwrap_err().contains("LOW-HIGH"));
        assert!(
            "1-70000"
                .parse::<PortRange>()
                .unwrap_err()
                .contains("70000")
        );
    }
}
