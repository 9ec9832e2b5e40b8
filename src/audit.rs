//! The audit trail of `/mcp`: one [`Record`] per MCP request (who, which tool, which JSON-RPC
//! method and MCP tool, allowed or denied or failed upstream, how long), appended as JSON lines
//! to `<data dir>/audit/audit.jsonl`, rotated by size, and read back by `GET /api/v1/audit`.
//!
//! Off the request path: the proxy hands a record to a bounded channel ([`Audit::record`]
//! never waits) and one writer thread appends them, flushing whenever the queue is empty. When
//! the queue is full the record is dropped and counted (`switchboard_audit_dropped_total`),
//! rather than slowing MCP traffic down.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    path::{Path, PathBuf},
};

use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use utoipa::ToSchema;

/// Records waiting for the writer, at most.
const QUEUE: usize = 8192;
/// The live file is rotated when it would grow past this.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Rotated files kept (`audit.jsonl.1` newest .. `audit.jsonl.N` oldest).
pub const KEEP_ROTATED: usize = 3;
const FILE: &str = "audit.jsonl";

/// How a request ended, as far as access goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Sent to the server, which answered (any status below 500).
    Allowed,
    /// Refused by Switchboard: no valid credential, no grant, over quota, or an MCP tool the
    /// caller may not call.
    Denied,
    /// No usable answer from the server: it could not be reached, timed out, or answered 5xx.
    UpstreamError,
}

/// One MCP request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Record {
    /// When the request came in.
    pub time: DateTime<Utc>,
    /// The key id (or token subject) that made it; absent when `/mcp` needs no credential or
    /// none valid was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// The tool's slug.
    pub tool: String,
    /// The HTTP method (a GET opens a stream, a DELETE ends a session).
    pub http_method: String,
    /// The JSON-RPC method of a POST (`"batch"` for a batch), when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The MCP tool of a `tools/call`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp_tool: Option<String>,
    pub outcome: Outcome,
    /// The HTTP status of the answer.
    pub status: u16,
    /// Time until the answer's headers were sent (a stream goes on after that).
    pub duration_ms: f64,
    /// The `tools/call` arguments, only for a tool with `audit_arguments = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
}

/// What `GET /api/v1/audit` asks for.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub principal: Option<String>,
    pub tool: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub limit: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("reading the audit trail in {dir}: {source}")]
    Read {
        dir: PathBuf,
        source: std::io::Error,
    },
}

pub struct Audit {
    tx: mpsc::Sender<Record>,
    dropped: Option<Counter>,
    dir: PathBuf,
}

impl Audit {
    /// Starts the writer thread for `dir` (created if missing); it ends when the last
    /// [`Audit`] is dropped, after writing what is queued.
    pub fn start(dir: PathBuf, dropped: Option<Counter>) -> std::io::Result<Audit> {
        Audit::start_with(dir, dropped, MAX_FILE_BYTES)
    }

    fn start_with(
        dir: PathBuf,
        dropped: Option<Counter>,
        max_bytes: u64,
    ) -> std::io::Result<Audit> {
        std::fs::create_dir_all(&dir)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Writer::open(dir.clone(), max_bytes)?;
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Audit { tx, dropped, dir })
    }

    /// Queues a record; never waits. A full queue drops it (and counts that).
    pub fn record(&self, record: Record) {
        if self.tx.try_send(record).is_err()
            && let Some(c) = &self.dropped
        {
            c.inc();
        }
    }

    /// The newest `filter.limit` records that match, oldest first.
    pub async fn query(&self, filter: Filter) -> Result<Vec<Record>, AuditError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || read(&dir, &filter))
            .await
            .unwrap_or_else(|e| {
                Err(AuditError::Read {
                    dir: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                })
            })
    }
}

/// The files of the trail, oldest first.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = (1..=KEEP_ROTATED)
        .rev()
        .map(|n| dir.join(format!("{FILE}.{n}")))
        .collect();
    out.push(dir.join(FILE));
    out
}

fn read(dir: &Path, filter: &Filter) -> Result<Vec<Record>, AuditError> {
    let mut out = VecDeque::with_capacity(filter.limit.min(1024));
    for path in files(dir) {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(AuditError::Read {
                    dir: dir.to_owned(),
                    source,
                });
            }
        };
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|source| AuditError::Read {
                dir: dir.to_owned(),
                source,
            })?;
            // A line cut short by a crash is skipped, not an error for the whole trail.
            let Ok(r) = serde_json::from_str::<Record>(&line) else {
                continue;
            };
            let keep = filter
                .principal
                .as_ref()
                .is_none_or(|p| r.principal.as_ref() == Some(p))
                && filter.tool.as_ref().is_none_or(|t| &r.tool == t)
                && filter.since.is_none_or(|s| r.time >= s);
            if keep {
                if out.len() == filter.limit {
                    out.pop_front();
                }
                if filter.limit > 0 {
                    out.push_back(r);
                }
            }
        }
    }
    Ok(out.into())
}

struct Writer {
    dir: PathBuf,
    file: BufWriter<File>,
    size: u64,
    max_bytes: u64,
}

impl Writer {
    fn open(dir: PathBuf, max_bytes: u64) -> std::io::Result<Writer> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(FILE))?;
        let size = file.metadata()?.len();
        Ok(Writer {
            dir,
            file: BufWriter::new(file),
            size,
            max_bytes,
        })
    }

    fn run(mut self, mut rx: mpsc::Receiver<Record>) {
        while let Some(r) = rx.blocking_recv() {
            let mut next = Some(r);
            while let Some(r) = next {
                if let Err(e) = self.write(&r) {
                    tracing::warn!(error = %e, dir = %self.dir.display(), "Writing the audit trail failed; record lost");
                }
                next = rx.try_recv().ok();
            }
            if let Err(e) = self.file.flush() {
                tracing::warn!(error = %e, "Flushing the audit trail failed");
            }
        }
    }

    fn write(&mut self, r: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// `audit.jsonl` becomes `.1`, `.1` becomes `.2`, ...; the oldest is removed.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let files = files(&self.dir);
        // files: [.N, .N-1, ..., .1, live]; shift each onto the older name.
        for pair in files.windows(2) {
            match std::fs::rename(&pair[1], &pair[0]) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        *self = Writer::open(std::mem::take(&mut self.dir), self.max_bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize, principal: &str) -> Record {
        Record {
            time: Utc::now(),
            principal: Some(principal.to_owned()),
            tool: "t".into(),
            http_method: "POST".into(),
            method: Some("tools/call".into()),
            mcp_tool: Some(format!("n{i}")),
            outcome: Outcome::Allowed,
            status: 200,
            duration_ms: 1.0,
            arguments: None,
        }
    }

    /// Everything in the trail once the writer has written record `n{last}`.
    async fn until_written(audit: &Audit, last: usize) -> Vec<Record> {
        let want = format!("n{last}");
        for _ in 0..500 {
            let got = audit
                .query(Filter {
                    limit: 10_000,
                    ..Filter::default()
                })
                .await
                .unwrap();
            if got.last().and_then(|r| r.mcp_tool.as_ref()) == Some(&want) {
                return got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the writer never wrote record {want}");
    }

    #[tokio::test]
    async fn records_are_written_rotated_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // Small files: each holds a few records, so 40 rotate several times.
        let audit = Audit::start_with(dir.path().to_owned(), None, 1000).unwrap();
        for i in 0..40 {
            audit.record(record(i, if i % 2 == 0 { "even" } else { "odd" }));
        }
        // What survives is the newest files' records, in the order they were made.
        let got = until_written(&audit, 39).await;
        let n: Vec<usize> = got
            .iter()
            .map(|r| r.mcp_tool.as_ref().unwrap()[1..].parse().unwrap())
            .collect();
        assert_eq!(n.last(), Some(&39));
        assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "{n:?}");
        assert!(n.len() < 40, "older files were removed: {n:?}");
        assert!(dir.path().join("audit.jsonl.3").exists());
        assert!(!dir.path().join("audit.jsonl.4").exists());

        let odd = audit
            .query(Filter {
                principal: Some("odd".into()),
                limit: 2,
                ..Filter::default()
            })
            .await
            .unwrap();
        let names: Vec<&str> = odd.iter().map(|r| r.mcp_tool.as_deref().unwrap()).collect();
        assert_eq!(names, ["n37", "n39"]);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = mpsc::channel(1);
        let dropped = Counter::default();
        let audit = Audit {
            tx,
            dropped: Some(dropped.clone()),
            dir: PathBuf::new(),
        };
        audit.record(record(0, "p"));
        audit.record(record(1, "p"));
        audit.record(record(2, "p"));
        assert_eq!(dropped.get(), 2);
    }
}
