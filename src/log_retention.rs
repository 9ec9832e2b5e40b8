//! How long ended deployments' logs are kept: `[logs]` in the config file.
//!
//! A deployment's output lives in `<data_dir>/logs/<id>.log` (and up to three rotated
//! `<id>.log.N`), each file bounded by rotation, but one set per deployment ever run would
//! fill the disk in time. A pass removes the logs of every deployment that is not live on this
//! node once they are older than `retention_days` (by their last write), then the oldest ones
//! until the rest fit in `max_total_mib`. The records stay; only the output goes.
//!
//! Invariants: a live deployment's log is never removed (its id is in the live set the pass
//! reads from the store first), nor a log written after that read began (a deployment started
//! meanwhile is not in the set yet); a pass that cannot read the live set removes nothing.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use uuid::Uuid;

use crate::store::Store;

/// The `[logs]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRetention {
    /// Ended deployments' logs last written longer ago than this are removed.
    pub max_age: Duration,
    /// Ended deployments' logs beyond this total are removed, oldest first.
    pub max_total_bytes: u64,
    /// Time between passes (the first runs at start).
    pub interval: Duration,
}

pub const DEFAULT_RETENTION_DAYS: u64 = 7;
pub const DEFAULT_MAX_TOTAL_MIB: u64 = 1024;
pub const DEFAULT_CHECK_INTERVAL_SECS: u64 = 3600;

impl Default for LogRetention {
    fn default() -> Self {
        LogRetention {
            max_age: Duration::from_secs(DEFAULT_RETENTION_DAYS * 86_400),
            max_total_bytes: DEFAULT_MAX_TOTAL_MIB * 1024 * 1024,
            interval: Duration::from_secs(DEFAULT_CHECK_INTERVAL_SECS),
        }
    }
}

/// What one pass removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub deployments: usize,
    pub bytes: u64,
}

/// One deployment's log files.
struct LogSet {
    files: Vec<PathBuf>,
    bytes: u64,
    last_write: SystemTime,
}

/// The deployment a log file belongs to: `<uuid>.log` or `<uuid>.log.<n>`.
fn owner(name: &str) -> Option<Uuid> {
    let (stem, rest) = name.split_once(".log")?;
    if !(rest.is_empty()
        || rest
            .strip_prefix('.')
            .is_some_and(|n| n.parse::<u32>().is_ok()))
    {
        return None;
    }
    Uuid::parse_str(stem).ok()
}

/// Removes ended deployments' logs from `dir` as `policy` says. `live` are the deployments
/// whose logs stay whatever their age; files written at or after `since` stay too (their
/// deployment may have started after `live` was read).
pub fn prune(
    dir: &Path,
    live: &HashSet<Uuid>,
    since: SystemTime,
    policy: &LogRetention,
) -> std::io::Result<Pruned> {
    let mut sets: HashMap<Uuid, LogSet> = HashMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Pruned::default()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Some(id) = entry.file_name().to_str().and_then(owner) else {
            continue;
        };
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let modified = meta.modified()?;
        let set = sets.entry(id).or_insert_with(|| LogSet {
            files: Vec::new(),
            bytes: 0,
            last_write: SystemTime::UNIX_EPOCH,
        });
        set.files.push(entry.path());
        set.bytes += meta.len();
        set.last_write = set.last_write.max(modified);
    }
    let mut ended: Vec<LogSet> = sets
        .into_iter()
        .filter(|(id, set)| !live.contains(id) && set.last_write < since)
        .map(|(_, set)| set)
        .collect();
    // Oldest first: the age limit removes a prefix, the size limit continues from there.
    ended.sort_by_key(|s| s.last_write);
    let mut total: u64 = ended.iter().map(|s| s.bytes).sum();
    let mut pruned = Pruned::default();
    for set in ended {
        let too_old = since
            .duration_since(set.last_write)
            .is_ok_and(|age| age > policy.max_age);
        if !too_old && total <= policy.max_total_bytes {
            break;
        }
        for f in &set.files {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        total -= set.bytes;
        pruned.deployments += 1;
        pruned.bytes += set.bytes;
    }
    Ok(pruned)
}

/// One pass: reads this node's live deployments, then prunes.
async fn pass(store: &Store, node: &str, dir: &Path, policy: &LogRetention) {
    let since = SystemTime::now();
    let live = match store.live_deployments(node).await {
        Ok(ds) => ds.into_iter().map(|d| d.id).collect::<HashSet<_>>(),
        Err(e) => {
            tracing::warn!(error = %e, "Log retention skipped: the live deployments are unknown");
            return;
        }
    };
    let dir = dir.to_path_buf();
    let policy = *policy;
    match tokio::task::spawn_blocking(move || prune(&dir, &live, since, &policy)).await {
        Ok(Ok(p)) if p.deployments > 0 => tracing::info!(
            deployments = p.deployments,
            bytes = p.bytes,
            "Removed ended deployments' logs (log retention)"
        ),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "Log retention failed"),
        Err(e) => tracing::warn!(error = %e, "Log retention task failed"),
    }
}

/// Prunes at once, then every `policy.interval`, until the returned handle is aborted.
pub fn spawn(
    store: Store,
    node: String,
    dir: PathBuf,
    policy: LogRetention,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(policy.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            pass(&store, &node, &dir, &policy).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_log_files_name_their_deployment() {
        let id = Uuid::new_v4();
        assert_eq!(owner(&format!("{id}.log")), Some(id));
        assert_eq!(owner(&format!("{id}.log.3")), Some(id));
        assert_eq!(owner(&format!("{id}.log.x")), None);
        assert_eq!(owner(&format!("{id}.txt")), None);
        assert_eq!(owner("notes.log"), None);
    }
}
