//! Durable state: tools and deployment records, in SQLite through sqlx.
//!
//! This is the only module that writes SQL. Everything above it speaks in [`Tool`] and
//! [`Deployment`] values, so a PostgreSQL or MySQL backend is a second implementation of these
//! methods, not a change to the manager or the API.
//!
//! Invariants:
//! - Every method that changes state returns only after its transaction committed (WAL,
//!   `synchronous = FULL`), so an API acknowledgement implies the write is on disk.
//! - Status changes are conditional (`WHERE status IN (...)`): a caller learns whether *it* made
//!   the transition, and only that caller releases what the transition frees (the port).
//! - At most one live (STARTING/RUNNING) deployment holds a given port: a unique partial index
//!   enforces it even if the in-memory allocator were wrong.

use std::{path::Path, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{
    FromRow, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use uuid::Uuid;

use crate::{
    deployment::{Deployment, DeploymentStatus, ExitInfo, HealthStatus},
    registry::{Tool, ToolSpec},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Conflict(String),
    #[error("stored record is unreadable: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Which deployments a listing returns.
#[derive(Debug, Clone, Default)]
pub struct DeploymentFilter {
    pub tool_slug: Option<String>,
    /// Any of these statuses; all when empty.
    pub statuses: Vec<DeploymentStatus>,
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

#[derive(FromRow)]
struct ToolRow {
    id: String,
    spec: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<ToolRow> for Tool {
    type Error = StoreError;
    fn try_from(row: ToolRow) -> Result<Self, StoreError> {
        Ok(Tool {
            id: parse_uuid(&row.id)?,
            spec: serde_json::from_str(&row.spec)
                .map_err(|e| StoreError::Corrupt(format!("tool {}: {e}", row.id)))?,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

#[derive(FromRow)]
struct DeploymentRow {
    id: String,
    tool_id: String,
    tool_slug: String,
    endpoint_url: String,
    port: Option<i64>,
    status: String,
    health_status: String,
    last_health_check: Option<DateTime<Utc>>,
    deployed_at: DateTime<Utc>,
    stopped_at: Option<DateTime<Utc>>,
    pid: Option<i64>,
    exit_code: Option<i64>,
    exit_signal: Option<i64>,
    error: Option<String>,
    updated_at: DateTime<Utc>,
}

fn parse_uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("id '{s}': {e}")))
}

fn narrow<T: TryFrom<i64>>(v: Option<i64>, what: &str) -> Result<Option<T>, StoreError> {
    v.map(|v| T::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} out of range"))))
        .transpose()
}

impl TryFrom<DeploymentRow> for Deployment {
    type Error = StoreError;
    fn try_from(r: DeploymentRow) -> Result<Self, StoreError> {
        Ok(Deployment {
            id: parse_uuid(&r.id)?,
            tool_id: parse_uuid(&r.tool_id)?,
            tool_slug: r.tool_slug,
            endpoint_url: r.endpoint_url,
            port: narrow(r.port, "port")?,
            status: DeploymentStatus::from_str(&r.status)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            health_status: HealthStatus::from_str(&r.health_status)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            last_health_check: r.last_health_check,
            deployed_at: r.deployed_at,
            stopped_at: r.stopped_at,
            pid: narrow(r.pid, "pid")?,
            exit_code: narrow(r.exit_code, "exit code")?,
            exit_signal: narrow(r.exit_signal, "exit signal")?,
            error: r.error,
            updated_at: r.updated_at,
        })
    }
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and applies migrations.
    pub async fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit survives power loss, not only a crash of Switchboard. Deploys are
            // rare enough that the extra fsync is noise.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(Store { pool })
    }

    /// `PRAGMA integrity_check`, for tests and diagnostics.
    pub async fn integrity_check(&self) -> Result<String, StoreError> {
        let (res,): (String,) = sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(&self.pool)
            .await?;
        Ok(res)
    }

    // ----- tools -----

    pub async fn insert_tool(&self, spec: &ToolSpec) -> Result<Tool, StoreError> {
        let now = Utc::now();
        let tool = Tool {
            id: Uuid::new_v4(),
            spec: spec.clone(),
            created_at: now,
            updated_at: now,
        };
        let spec_json =
            serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO tools (id, slug, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(tool.id.to_string())
        .bind(&spec.slug)
        .bind(spec_json)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("a tool with slug '{}' already exists", spec.slug))
            } else {
                e.into()
            }
        })?;
        Ok(tool)
    }

    /// Replaces the spec of the tool with this slug; `None` when there is none.
    pub async fn update_tool(&self, spec: &ToolSpec) -> Result<Option<Tool>, StoreError> {
        let spec_json =
            serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let row: Option<ToolRow> = sqlx::query_as(
            "UPDATE tools SET spec = ?, updated_at = ? WHERE slug = ? \
             RETURNING id, spec, created_at, updated_at",
        )
        .bind(spec_json)
        .bind(Utc::now())
        .bind(&spec.slug)
        .fetch_optional(&self.pool)
        .await?;
        row.map(Tool::try_from).transpose()
    }

    pub async fn get_tool(&self, slug: &str) -> Result<Option<Tool>, StoreError> {
        let row: Option<ToolRow> =
            sqlx::query_as("SELECT id, spec, created_at, updated_at FROM tools WHERE slug = ?")
                .bind(slug)
                .fetch_optional(&self.pool)
                .await?;
        row.map(Tool::try_from).transpose()
    }

    pub async fn list_tools(&self) -> Result<Vec<Tool>, StoreError> {
        let rows: Vec<ToolRow> =
            sqlx::query_as("SELECT id, spec, created_at, updated_at FROM tools ORDER BY slug")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(Tool::try_from).collect()
    }

    /// Deletes the tool and its finished deployments, unless it has live ones.
    pub async fn delete_tool(&self, slug: &str) -> Result<DeleteTool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let live: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deployments WHERE tool_slug = ? AND status IN ('STARTING', 'RUNNING')",
        )
        .bind(slug)
        .fetch_one(&mut *tx)
        .await?;
        if live > 0 {
            return Ok(DeleteTool::InUse(live as u64));
        }
        let done = sqlx::query("DELETE FROM tools WHERE slug = ?")
            .bind(slug)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(if done.rows_affected() == 0 {
            DeleteTool::NotFound
        } else {
            DeleteTool::Deleted
        })
    }

    // ----- deployments -----

    pub async fn insert_deployment(&self, d: &Deployment) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO deployments (id, tool_id, tool_slug, endpoint_url, port, status, \
             health_status, last_health_check, deployed_at, stopped_at, pid, exit_code, \
             exit_signal, error, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(d.id.to_string())
        .bind(d.tool_id.to_string())
        .bind(&d.tool_slug)
        .bind(&d.endpoint_url)
        .bind(d.port.map(i64::from))
        .bind(d.status.as_str())
        .bind(d.health_status.as_str())
        .bind(d.last_health_check)
        .bind(d.deployed_at)
        .bind(d.stopped_at)
        .bind(d.pid.map(i64::from))
        .bind(d.exit_code.map(i64::from))
        .bind(d.exit_signal.map(i64::from))
        .bind(&d.error)
        .bind(d.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!(
                    "port {:?} is already held by a live deployment",
                    d.port
                ))
            } else {
                e.into()
            }
        })?;
        Ok(())
    }

    pub async fn get_deployment(&self, id: Uuid) -> Result<Option<Deployment>, StoreError> {
        let row: Option<DeploymentRow> = sqlx::query_as("SELECT * FROM deployments WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(Deployment::try_from).transpose()
    }

    pub async fn list_deployments(
        &self,
        filter: &DeploymentFilter,
    ) -> Result<Vec<Deployment>, StoreError> {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new("SELECT * FROM deployments WHERE 1=1");
        if let Some(slug) = &filter.tool_slug {
            qb.push(" AND tool_slug = ").push_bind(slug.clone());
        }
        if !filter.statuses.is_empty() {
            qb.push(" AND status IN (");
            let mut sep = qb.separated(", ");
            for st in &filter.statuses {
                sep.push_bind(st.as_str());
            }
            qb.push(")");
        }
        qb.push(" ORDER BY deployed_at, id");
        let rows: Vec<DeploymentRow> = qb.build_query_as().fetch_all(&self.pool).await?;
        rows.into_iter().map(Deployment::try_from).collect()
    }

    pub async fn live_deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        self.list_deployments(&DeploymentFilter {
            tool_slug: None,
            statuses: vec![DeploymentStatus::Starting, DeploymentStatus::Running],
        })
        .await
    }

    pub async fn set_pid(&self, id: Uuid, pid: u32) -> Result<(), StoreError> {
        sqlx::query("UPDATE deployments SET pid = ?, updated_at = ? WHERE id = ?")
            .bind(i64::from(pid))
            .bind(Utc::now())
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// STARTING → RUNNING/HEALTHY. False when the deployment was no longer STARTING.
    pub async fn mark_running(&self, id: Uuid) -> Result<bool, StoreError> {
        let now = Utc::now();
        let res = sqlx::query(
            "UPDATE deployments SET status = 'RUNNING', health_status = 'HEALTHY', \
             last_health_check = ?, updated_at = ? WHERE id = ? AND status = 'STARTING'",
        )
        .bind(now)
        .bind(now)
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// A live deployment ends, as STOPPED or FAILED. False when it had already ended: the caller
    /// then owns nothing the transition would free.
    pub async fn mark_ended(
        &self,
        id: Uuid,
        status: DeploymentStatus,
        exit: Option<ExitInfo>,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        debug_assert!(!status.is_live());
        let now = Utc::now();
        let res = sqlx::query(
            "UPDATE deployments SET status = ?, health_status = 'UNKNOWN', stopped_at = ?, \
             exit_code = ?, exit_signal = ?, error = COALESCE(?, error), updated_at = ? \
             WHERE id = ? AND status IN ('STARTING', 'RUNNING')",
        )
        .bind(status.as_str())
        .bind(now)
        .bind(exit.and_then(|e| e.code).map(i64::from))
        .bind(exit.and_then(|e| e.signal).map(i64::from))
        .bind(error)
        .bind(now)
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }
}

/// Outcome of [`Store::delete_tool`].
#[derive(Debug, PartialEq, Eq)]
pub enum DeleteTool {
    Deleted,
    NotFound,
    InUse(u64),
}
