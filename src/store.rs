//! Durable state: tools and deployment records, in SQLite (the embedded default),
//! PostgreSQL or MySQL/MariaDB, through sqlx.
//!
//! This is the only module that writes SQL. Everything above it speaks in [`Tool`] and
//! [`Deployment`] values and never learns which backend it has. Each method's SQL is written
//! once, in the portable subset both backends share (with `?` placeholders, rewritten to `$n`
//! for PostgreSQL), and runs against whichever pool [`on_pool!`] selects; each backend has its
//! own migrations directory because their types and DDL differ.
//!
//! Invariants:
//! - Every method that changes state returns only after its transaction committed (WAL,
//!   `synchronous = FULL`), so an API acknowledgement implies the write is on disk.
//! - Status changes are conditional (`WHERE status IN (...)`): a caller learns whether *it* made
//!   the transition, and only that caller releases what the transition frees (the port).
//! - At most one live (STARTING/RUNNING) deployment holds a given port: a unique partial index
//!   enforces it even if the in-memory allocator were wrong.
//! - A tool's `secret_env` values are written encrypted ([`crate::secrets`]) and decrypted
//!   when the tool is read, so nothing above this module handles ciphertext and no plain
//!   secret reaches the database. A value that does not decrypt is handed up as unreadable
//!   (`ToolSpec::unreadable_secret_env`) and written back as it was.

use std::{borrow::Cow, path::Path, str::FromStr, time::Duration};

use chrono::{DateTime, SubsecRound as _, Utc};
use sqlx::{
    AssertSqlSafe, FromRow, MySqlPool, PgPool, SqlitePool,
    mysql::MySqlPoolOptions,
    postgres::PgPoolOptions,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use uuid::Uuid;

use crate::{
    deployment::{
        Deployment, DeploymentStatus, Desired, ExitInfo, HealthStatus, InstanceRef, RuntimeKind,
    },
    registry::{Tool, ToolSpec},
    secrets::{OpenError, SealError, SecretKey},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Conflict(String),
    /// A deployment was to be recorded for a tool deleted meanwhile.
    #[error("no tool with slug '{0}' (it was deleted)")]
    ToolGone(String),
    #[error("stored record is unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("the database is unavailable or failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "the database was migrated by a newer Switchboard (it has migration {0}, which this \
         binary does not know): upgrade Switchboard, or point it at another database"
    )]
    NewerThanBinary(i64),
    #[error(
        "'{0}' is not a supported database URL: use sqlite://PATH, postgres://USER@HOST/DB or mysql://USER@HOST/DB"
    )]
    UnsupportedUrl(String),
}

/// A database that has a migration this binary lacks was written by a newer version: refuse it
/// by name rather than with sqlx's generic message.
fn migrate_error(e: sqlx::migrate::MigrateError) -> StoreError {
    match e {
        sqlx::migrate::MigrateError::VersionMissing(v) => StoreError::NewerThanBinary(v),
        e => StoreError::Migrate(e),
    }
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Which deployments a listing returns.
#[derive(Debug, Clone, Default)]
pub struct DeploymentFilter {
    pub tool_slug: Option<String>,
    /// Only this node's deployments.
    pub node_id: Option<String>,
    /// Any of these statuses; all when empty.
    pub statuses: Vec<DeploymentStatus>,
    /// At most this many, after skipping `offset` (in deployment order).
    pub limit: Option<u32>,
    pub offset: Option<u32>,
}

#[derive(Clone, Debug)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    MySql(MySqlPool),
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    /// Encrypts `secret_env` values on their way in, decrypts them on their way out.
    key: SecretKey,
}

/// How long a request waits for a database connection before the store reports itself
/// unavailable (an API call then gets 503 `store_unavailable` instead of hanging).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// The current time at the precision every backend keeps (microseconds), so a value read back
/// equals the value written.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn sql_sqlite(sql: &'static str) -> AssertSqlSafe<Cow<'static, str>> {
    AssertSqlSafe(Cow::Borrowed(sql))
}

/// `?` placeholders become `$1, $2, ...`. Our SQL has no `?` inside string literals.
fn sql_postgres(sql: &'static str) -> AssertSqlSafe<Cow<'static, str>> {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    AssertSqlSafe(Cow::Owned(out))
}

/// Runs `$body` with `$pool` bound to the backend's pool and `$sql` to its placeholder
/// rewriter; the body is compiled once per backend, so each gets its own types.
macro_rules! on_pool {
    ($store:expr, $pool:ident, $sql:ident => $body:expr) => {
        match &$store.pool {
            Pool::Sqlite($pool) => {
                let $sql = sql_sqlite;
                $body
            }
            Pool::Postgres($pool) => {
                let $sql = sql_postgres;
                $body
            }
            Pool::MySql($pool) => {
                let $sql = sql_sqlite;
                $body
            }
        }
    };
}

/// The URL with any password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((creds, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match creds.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[derive(FromRow)]
struct ToolRow {
    id: String,
    spec: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// A tool as read, with what its secrets were like in the row.
struct LoadedTool {
    tool: Tool,
    /// Values stored in plain text (by a release before encryption), now in `tool` as read.
    plain: usize,
    /// Values that did not decrypt, by name, and why.
    unreadable: Vec<(String, OpenError)>,
}

/// What [`Store::seal_plain_secrets`] found at start.
#[derive(Debug, Default)]
pub struct SecretsAtStart {
    /// Plain-text values an earlier release stored, encrypted now.
    pub sealed: usize,
    /// Tools whose values do not decrypt with this key: slug, and each variable with why.
    pub unreadable: Vec<(String, Vec<(String, OpenError)>)>,
}

#[derive(FromRow)]
struct DeploymentRow {
    id: String,
    tool_id: String,
    tool_slug: String,
    node_id: String,
    endpoint_url: String,
    port: Option<i64>,
    status: String,
    health_status: String,
    last_health_check: Option<DateTime<Utc>>,
    deployed_at: DateTime<Utc>,
    stopped_at: Option<DateTime<Utc>>,
    runtime: String,
    /// The runtime's [`InstanceRef`] as JSON.
    instance: Option<String>,
    exit_code: Option<i64>,
    exit_signal: Option<i64>,
    error: Option<String>,
    updated_at: DateTime<Utc>,
    desired: String,
    restart_count: i64,
    last_exit: Option<String>,
    next_restart_at: Option<DateTime<Utc>>,
    tool_deleted_at: Option<DateTime<Utc>>,
}

fn instance_json(instance: Option<&InstanceRef>) -> Option<String> {
    // Serializing a plain enum of integers cannot fail.
    instance.map(|i| serde_json::to_string(i).unwrap_or_default())
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
            node_id: r.node_id,
            endpoint_url: r.endpoint_url,
            port: narrow(r.port, "port")?,
            status: DeploymentStatus::from_str(&r.status)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            health_status: HealthStatus::from_str(&r.health_status)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            last_health_check: r.last_health_check,
            deployed_at: r.deployed_at,
            stopped_at: r.stopped_at,
            runtime: RuntimeKind::from_str(&r.runtime).map_err(StoreError::Corrupt)?,
            instance: r
                .instance
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| {
                    StoreError::Corrupt(format!("instance of deployment {}: {e}", r.id))
                })?,
            exit_code: narrow(r.exit_code, "exit code")?,
            exit_signal: narrow(r.exit_signal, "exit signal")?,
            error: r.error,
            updated_at: r.updated_at,
            desired: Desired::from_str(&r.desired)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            restart_count: narrow(Some(r.restart_count), "restart count")?.unwrap_or(0),
            last_exit: r.last_exit,
            next_restart_at: r.next_restart_at,
            tool_deleted_at: r.tool_deleted_at,
        })
    }
}

impl Store {
    /// Connects to the database a URL names (`sqlite://PATH`, `postgres://...`, `mysql://...`)
    /// and applies migrations.
    /// `key` encrypts and decrypts the tools' `secret_env` values.
    pub async fn connect(url: &str, key: SecretKey) -> Result<Store, StoreError> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            return Self::open_sqlite(Path::new(path), key).await;
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect(url)
                .await?;
            sqlx::migrate!("migrations/postgres")
                .run(&pool)
                .await
                .map_err(migrate_error)?;
            return Ok(Store {
                pool: Pool::Postgres(pool),
                key,
            });
        }
        if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            let url = url.replacen("mariadb://", "mysql://", 1);
            let pool = MySqlPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect(&url)
                .await?;
            sqlx::migrate!("migrations/mysql")
                .run(&pool)
                .await
                .map_err(migrate_error)?;
            return Ok(Store {
                pool: Pool::MySql(pool),
                key,
            });
        }
        Err(StoreError::UnsupportedUrl(redact_url(url)))
    }

    /// Which backend this store uses: "sqlite", "postgres" or "mysql".
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
            Pool::MySql(_) => "mysql",
        }
    }

    /// Opens (creating if needed) the SQLite database at `path` and applies migrations.
    pub async fn open_sqlite(path: &Path, key: SecretKey) -> Result<Store, StoreError> {
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
        sqlx::migrate!("migrations/sqlite")
            .run(&pool)
            .await
            .map_err(migrate_error)?;
        Ok(Store {
            pool: Pool::Sqlite(pool),
            key,
        })
    }

    /// A trivial query, bounded in time: whether the database answers now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let q = async {
            on_pool!(self, pool, sql => {
                sqlx::query(sql("SELECT 1")).execute(pool).await?;
            });
            Ok::<(), StoreError>(())
        };
        tokio::time::timeout(Duration::from_secs(2), q)
            .await
            .map_err(|_| StoreError::Database(sqlx::Error::PoolTimedOut))?
    }

    /// SQLite's `PRAGMA integrity_check`; "ok" from backends that check themselves.
    pub async fn integrity_check(&self) -> Result<String, StoreError> {
        match &self.pool {
            Pool::Sqlite(pool) => {
                let (res,): (String,) = sqlx::query_as("PRAGMA integrity_check")
                    .fetch_one(pool)
                    .await?;
                Ok(res)
            }
            Pool::Postgres(_) | Pool::MySql(_) => Ok("ok".to_owned()),
        }
    }

    // ----- tools -----

    /// The spec as stored: JSON, with each `secret_env` value encrypted for this tool and
    /// variable, and the unreadable ones as they were.
    fn spec_json(&self, tool: Uuid, spec: &ToolSpec) -> Result<String, StoreError> {
        let mut stored = spec.clone();
        for (name, value) in &mut stored.secret_env {
            *value = self.key.seal(tool, name, value)?;
        }
        stored
            .secret_env
            .extend(std::mem::take(&mut stored.unreadable_secret_env));
        serde_json::to_string(&stored).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// A row as a tool, its secrets decrypted. A plain-text value (an earlier release's) is
    /// taken as it is; one that does not decrypt is set aside as unreadable, never handed up
    /// as a value.
    fn load_tool(&self, row: ToolRow) -> Result<LoadedTool, StoreError> {
        let id = parse_uuid(&row.id)?;
        let mut spec: ToolSpec = serde_json::from_str(&row.spec)
            .map_err(|e| StoreError::Corrupt(format!("tool {}: {e}", row.id)))?;
        let (mut plain, mut unreadable) = (0, Vec::new());
        for (name, stored) in std::mem::take(&mut spec.secret_env) {
            if !crate::secrets::is_sealed(&stored) {
                plain += 1;
                spec.secret_env.insert(name, stored);
                continue;
            }
            match self.key.open(id, &name, &stored) {
                Ok(value) => {
                    spec.secret_env.insert(name, value);
                }
                Err(e) => {
                    unreadable.push((name.clone(), e));
                    spec.unreadable_secret_env.insert(name, stored);
                }
            }
        }
        Ok(LoadedTool {
            tool: Tool {
                id,
                spec,
                created_at: row.created_at,
                updated_at: row.updated_at,
                url: None,
            },
            plain,
            unreadable,
        })
    }

    fn tool_from_row(&self, row: ToolRow) -> Result<Tool, StoreError> {
        self.load_tool(row).map(|l| l.tool)
    }

    /// Encrypts the `secret_env` values an earlier release stored in plain text (once: a
    /// second run finds none), and reports the tools whose values do not decrypt with this
    /// key. Run at start, before anything reads the tools. Each tool is rewritten only if
    /// its row is still the one read, so a node of the earlier release writing meanwhile
    /// loses nothing (its value is sealed at the next start).
    pub async fn seal_plain_secrets(&self) -> Result<SecretsAtStart, StoreError> {
        let rows: Vec<ToolRow> = on_pool!(self, pool, sql => {
            sqlx::query_as(sql("SELECT id, spec, created_at, updated_at FROM tools ORDER BY slug"))
                .fetch_all(pool)
                .await?
        });
        let mut found = SecretsAtStart::default();
        for row in rows {
            let old_json = row.spec.clone();
            let loaded = self.load_tool(row)?;
            let slug = loaded.tool.spec.slug.clone();
            if !loaded.unreadable.is_empty() {
                found.unreadable.push((slug, loaded.unreadable));
            }
            if loaded.plain == 0 {
                continue;
            }
            let new_json = self.spec_json(loaded.tool.id, &loaded.tool.spec)?;
            let updated = on_pool!(self, pool, sql => {
                sqlx::query(sql("UPDATE tools SET spec = ? WHERE id = ? AND spec = ?"))
                    .bind(new_json)
                    .bind(loaded.tool.id.to_string())
                    .bind(old_json)
                    .execute(pool)
                    .await?
                    .rows_affected()
            });
            if updated == 1 {
                found.sealed += loaded.plain;
            }
        }
        if found.sealed > 0
            && let Pool::Sqlite(pool) = &self.pool
        {
            // The plain text may survive in pages an earlier release freed (it did not zero
            // them) and in the WAL's older frames: rebuild the file, then empty the WAL.
            sqlx::query("VACUUM").execute(pool).await?;
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(pool)
                .await?;
        }
        Ok(found)
    }

    pub async fn insert_tool(&self, spec: &ToolSpec) -> Result<Tool, StoreError> {
        let now = now();
        let tool = Tool {
            id: Uuid::new_v4(),
            spec: spec.clone(),
            created_at: now,
            updated_at: now,
            url: None,
        };
        let spec_json = self.spec_json(tool.id, spec)?;
        let res = on_pool!(self, pool, sql => {
            sqlx::query(sql(
                "INSERT INTO tools (id, slug, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            ))
            .bind(tool.id.to_string())
            .bind(&spec.slug)
            .bind(spec_json)
            .bind(now)
            .bind(now)
            .execute(pool)
            .await
            .map(|_| ())
        });
        res.map_err(|e| {
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
        // The id first (secrets are encrypted for it), then UPDATE and SELECT, in one
        // transaction: MySQL has no UPDATE ... RETURNING.
        let row: Option<ToolRow> = on_pool!(self, pool, sql => {
            let mut tx = pool.begin().await?;
            let id: Option<String> = sqlx::query_scalar(sql("SELECT id FROM tools WHERE slug = ?"))
                .bind(&spec.slug)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(id) = id else {
                return Ok(None);
            };
            let spec_json = self.spec_json(parse_uuid(&id)?, spec)?;
            sqlx::query(sql("UPDATE tools SET spec = ?, updated_at = ? WHERE id = ?"))
                .bind(spec_json)
                .bind(now())
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            let row = sqlx::query_as(sql(
                "SELECT id, spec, created_at, updated_at FROM tools WHERE id = ?",
            ))
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            row
        });
        row.map(|r| self.tool_from_row(r)).transpose()
    }

    pub async fn get_tool(&self, slug: &str) -> Result<Option<Tool>, StoreError> {
        let row: Option<ToolRow> = on_pool!(self, pool, sql => {
            sqlx::query_as(sql("SELECT id, spec, created_at, updated_at FROM tools WHERE slug = ?"))
                .bind(slug)
                .fetch_optional(pool)
                .await?
        });
        row.map(|r| self.tool_from_row(r)).transpose()
    }

    pub async fn list_tools(&self) -> Result<Vec<Tool>, StoreError> {
        let rows: Vec<ToolRow> = on_pool!(self, pool, sql => {
            sqlx::query_as(sql("SELECT id, spec, created_at, updated_at FROM tools ORDER BY slug"))
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(|r| self.tool_from_row(r)).collect()
    }

    /// Deletes the tool, unless it has live deployments; its ended deployments' records stay,
    /// marked with the time their tool was deleted.
    pub async fn delete_tool(&self, slug: &str) -> Result<DeleteTool, StoreError> {
        let now = now();
        on_pool!(self, pool, sql => {
            let mut tx = pool.begin().await?;
            // Lock the tool's row before reading anything: a deploy holding it (see
            // insert_deployment) commits first, and the count below then sees its deployment
            // (MySQL takes its snapshot at the first plain read, which comes after this).
            sqlx::query(sql("UPDATE tools SET slug = slug WHERE slug = ?"))
                .bind(slug)
                .execute(&mut *tx)
                .await?;
            let id: Option<String> = sqlx::query_scalar(sql("SELECT id FROM tools WHERE slug = ?"))
                .bind(slug)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(id) = id else {
                return Ok(DeleteTool::NotFound);
            };
            let live: i64 = sqlx::query_scalar(sql(
                "SELECT COUNT(*) FROM deployments WHERE tool_id = ? AND status IN ('STARTING', 'RUNNING')",
            ))
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
            if live > 0 {
                return Ok(DeleteTool::InUse(live.unsigned_abs()));
            }
            sqlx::query(sql(
                "UPDATE deployments SET tool_deleted_at = ?, updated_at = ? WHERE tool_id = ?",
            ))
            .bind(now)
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(sql("DELETE FROM tools WHERE id = ?"))
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(DeleteTool::Deleted)
        })
    }

    // ----- deployments -----

    /// How a deploy locks its tool's row against a delete: shared, so deploys of one tool do
    /// not wait for each other. SQLite needs none: its writers are serialized and the insert
    /// below is one statement.
    fn tool_share_lock(&self) -> Option<&'static str> {
        match &self.pool {
            Pool::Sqlite(_) => None,
            Pool::Postgres(_) => Some("SELECT 1 FROM tools WHERE id = ? FOR SHARE"),
            // MariaDB and MySQL both accept this spelling.
            Pool::MySql(_) => Some("SELECT 1 FROM tools WHERE id = ? LOCK IN SHARE MODE"),
        }
    }

    /// Records a new deployment of a tool that still exists: it fails with
    /// [`StoreError::ToolGone`] when the tool was deleted, even by a delete racing this insert
    /// (the tool's row is share-locked first, so [`Store::delete_tool`], which locks it
    /// exclusively, waits for this deployment and then counts it as live, or this waits for
    /// the delete and finds no tool).
    pub async fn insert_deployment(&self, d: &Deployment) -> Result<(), StoreError> {
        let res = on_pool!(self, pool, sql => async {
            let mut tx = pool.begin().await?;
            if let Some(lock) = self.tool_share_lock() {
                sqlx::query(sql(lock))
                    .bind(d.tool_id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            let inserted = sqlx::query(sql(
                "INSERT INTO deployments (id, tool_id, tool_slug, node_id, endpoint_url, port, \
                 status, health_status, last_health_check, deployed_at, stopped_at, runtime, \
                 instance, exit_code, exit_signal, error, updated_at, desired, restart_count, \
                 last_exit, next_restart_at) \
                 SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? \
                 FROM tools WHERE id = ?",
            ))
            .bind(d.id.to_string())
            .bind(d.tool_id.to_string())
            .bind(&d.tool_slug)
            .bind(&d.node_id)
            .bind(&d.endpoint_url)
            .bind(d.port.map(i64::from))
            .bind(d.status.as_str())
            .bind(d.health_status.as_str())
            .bind(d.last_health_check)
            .bind(d.deployed_at)
            .bind(d.stopped_at)
            .bind(d.runtime.as_str())
            .bind(instance_json(d.instance.as_ref()))
            .bind(d.exit_code.map(i64::from))
            .bind(d.exit_signal.map(i64::from))
            .bind(&d.error)
            .bind(d.updated_at)
            .bind(d.desired.as_str())
            .bind(i64::from(d.restart_count))
            .bind(&d.last_exit)
            .bind(d.next_restart_at)
            .bind(d.tool_id.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            Ok::<u64, sqlx::Error>(inserted)
        }
        .await);
        match res {
            Ok(0) => Err(StoreError::ToolGone(d.tool_slug.clone())),
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "port {:?} is already held by a live deployment",
                d.port
            ))),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get_deployment(&self, id: Uuid) -> Result<Option<Deployment>, StoreError> {
        let row: Option<DeploymentRow> = on_pool!(self, pool, sql => {
            sqlx::query_as(sql("SELECT * FROM deployments WHERE id = ?"))
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?
        });
        row.map(Deployment::try_from).transpose()
    }

    pub async fn list_deployments(
        &self,
        filter: &DeploymentFilter,
    ) -> Result<Vec<Deployment>, StoreError> {
        let rows: Vec<DeploymentRow> = on_pool!(self, pool, _sql => {
            let mut qb = sqlx::QueryBuilder::new("SELECT * FROM deployments WHERE 1=1");
            if let Some(slug) = &filter.tool_slug {
                qb.push(" AND tool_slug = ").push_bind(slug.clone());
            }
            if let Some(node) = &filter.node_id {
                qb.push(" AND node_id = ").push_bind(node.clone());
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
            if filter.limit.is_some() || filter.offset.is_some() {
                // MySQL has no OFFSET without LIMIT; the largest BIGINT stands for "no limit".
                qb.push(" LIMIT ")
                    .push_bind(filter.limit.map_or(i64::MAX, i64::from))
                    .push(" OFFSET ")
                    .push_bind(i64::from(filter.offset.unwrap_or(0)));
            }
            qb.build_query_as().fetch_all(pool).await?
        });
        rows.into_iter().map(Deployment::try_from).collect()
    }

    /// One node's live deployments.
    pub async fn live_deployments(&self, node_id: &str) -> Result<Vec<Deployment>, StoreError> {
        self.list_deployments(&DeploymentFilter {
            node_id: Some(node_id.to_owned()),
            statuses: vec![DeploymentStatus::Starting, DeploymentStatus::Running],
            ..Default::default()
        })
        .await
    }

    /// Notes the instance now running a live deployment, as its runtime names it.
    pub async fn set_instance(
        &self,
        id: Uuid,
        instance: &InstanceRef,
        port: Option<u16>,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool, sql => {
            sqlx::query(sql(
                "UPDATE deployments SET instance = ?, port = ?, updated_at = ? WHERE id = ?",
            ))
            .bind(instance_json(Some(instance)))
            .bind(port.map(i64::from))
            .bind(now())
            .bind(id.to_string())
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Records what someone asked the deployment to be. False for a record that is not live
    /// (there is nothing left to change).
    pub async fn set_desired(&self, id: Uuid, desired: Desired) -> Result<bool, StoreError> {
        let affected = on_pool!(self, pool, sql => {
            sqlx::query(sql(
                "UPDATE deployments SET desired = ?, updated_at = ? \
                 WHERE id = ? AND status IN ('STARTING', 'RUNNING')",
            ))
            .bind(desired.as_str())
            .bind(now())
            .bind(id.to_string())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// A live deployment whose process ended goes back to STARTING to be restarted at
    /// `restart_at`: one more restart, and how the last process ended. False when the record
    /// was no longer live or no longer desired running (a stop won).
    pub async fn mark_restarting(
        &self,
        id: Uuid,
        last_exit: &str,
        restart_at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let now = now();
        let affected = on_pool!(self, pool, sql => {
            sqlx::query(sql(
                "UPDATE deployments SET status = 'STARTING', health_status = 'UNKNOWN', \
                 restart_count = restart_count + 1, last_exit = ?, next_restart_at = ?, \
                 instance = NULL, updated_at = ? \
                 WHERE id = ? AND status IN ('STARTING', 'RUNNING') AND desired = 'RUNNING'",
            ))
            .bind(last_exit)
            .bind(restart_at)
            .bind(now)
            .bind(id.to_string())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// Records a round of health checks whose results did not change: one UPDATE per health
    /// value (so at most three statements for any number of deployments), all stamped with the
    /// round's newest check time.
    pub async fn set_health_many(
        &self,
        checks: &[(Uuid, HealthStatus, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        let Some(at) = checks.iter().map(|c| c.2).max() else {
            return Ok(());
        };
        let now = now();
        for health in [
            HealthStatus::Healthy,
            HealthStatus::Unhealthy,
            HealthStatus::Unknown,
        ] {
            // Bounded IN lists: every backend takes a few hundred binds in one statement.
            let ids: Vec<String> = checks
                .iter()
                .filter(|c| c.1 == health)
                .map(|c| c.0.to_string())
                .collect();
            for chunk in ids.chunks(500) {
                on_pool!(self, pool, _sql => {
                    let mut qb = sqlx::QueryBuilder::new("UPDATE deployments SET health_status = ");
                    qb.push_bind(health.as_str())
                        .push(", last_health_check = ")
                        .push_bind(at)
                        .push(", updated_at = ")
                        .push_bind(now)
                        .push(" WHERE status = 'RUNNING' AND id IN (");
                    let mut sep = qb.separated(", ");
                    for id in chunk {
                        sep.push_bind(id.clone());
                    }
                    qb.push(")");
                    qb.build().execute(pool).await?;
                });
            }
        }
        Ok(())
    }

    /// Records a health check's outcome on a live deployment.
    pub async fn set_health(
        &self,
        id: Uuid,
        health: HealthStatus,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let affected = on_pool!(self, pool, sql => {
            sqlx::query(sql(
                "UPDATE deployments SET health_status = ?, last_health_check = ?, updated_at = ? \
                 WHERE id = ? AND status = 'RUNNING'",
            ))
            .bind(health.as_str())
            .bind(at)
            .bind(now())
            .bind(id.to_string())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// STARTING → RUNNING/HEALTHY. False when the deployment was no longer STARTING.
    pub async fn mark_running(&self, id: Uuid) -> Result<bool, StoreError> {
        let now = now();
        let affected = on_pool!(self, pool, sql => {
            sqlx::query(sql(
                "UPDATE deployments SET status = 'RUNNING', health_status = 'HEALTHY', \
                 last_health_check = ?, next_restart_at = NULL, updated_at = ? \
                 WHERE id = ? AND status = 'STARTING'",
            ))
            .bind(now)
            .bind(now)
            .bind(id.to_string())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
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
        let now = now();
        let affected = on_pool!(self, pool, sql => {
            sqlx::query(sql(
                "UPDATE deployments SET status = ?, health_status = 'UNKNOWN', stopped_at = ?, \
                 exit_code = ?, exit_signal = ?, error = COALESCE(?, error), \
                 next_restart_at = NULL, updated_at = ? \
                 WHERE id = ? AND status IN ('STARTING', 'RUNNING')",
            ))
            .bind(status.as_str())
            .bind(now)
            .bind(exit.and_then(|e| e.code).map(i64::from))
            .bind(exit.and_then(|e| e.signal).map(i64::from))
            .bind(error)
            .bind(now)
            .bind(id.to_string())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }
}

/// A client key's record (what `auth::keys` keeps): the SHA-256 digest of the key, never the
/// key itself; its grants as written ("slug", "slug/tool", "*"), parsed by `auth`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: Uuid,
    pub name: String,
    pub key_hash: [u8; 32],
    pub grants: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub rate_limit_per_min: Option<u32>,
    pub max_concurrent: Option<u32>,
}

#[derive(FromRow)]
struct KeyRow {
    id: String,
    name: String,
    key_hash: String,
    grants: String,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    rate_limit_per_min: Option<i64>,
    max_concurrent: Option<i64>,
}

macro_rules! key_columns {
    () => {
        "SELECT id, name, key_hash, grants, created_at, expires_at, revoked_at, \
         rate_limit_per_min, max_concurrent"
    };
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl TryFrom<KeyRow> for KeyRecord {
    type Error = StoreError;
    fn try_from(r: KeyRow) -> Result<Self, StoreError> {
        Ok(KeyRecord {
            id: parse_uuid(&r.id)?,
            key_hash: unhex32(&r.key_hash)
                .ok_or_else(|| StoreError::Corrupt(format!("key {}: bad digest", r.id)))?,
            grants: serde_json::from_str(&r.grants)
                .map_err(|e| StoreError::Corrupt(format!("key {}: grants: {e}", r.id)))?,
            name: r.name,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            rate_limit_per_min: narrow(r.rate_limit_per_min, "rate limit")?,
            max_concurrent: narrow(r.max_concurrent, "concurrency limit")?,
        })
    }
}

impl Store {
    // ----- client keys -----

    pub async fn insert_key(&self, k: &KeyRecord) -> Result<(), StoreError> {
        let grants =
            serde_json::to_string(&k.grants).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        on_pool!(self, pool, sql => {
            sqlx::query(sql(
                "INSERT INTO client_keys (id, name, key_hash, grants, created_at, expires_at, \
                 revoked_at, rate_limit_per_min, max_concurrent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ))
            .bind(k.id.to_string())
            .bind(&k.name)
            .bind(hex(&k.key_hash))
            .bind(grants)
            .bind(k.created_at)
            .bind(k.expires_at)
            .bind(k.revoked_at)
            .bind(k.rate_limit_per_min.map(i64::from))
            .bind(k.max_concurrent.map(i64::from))
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Every key, revoked ones included, oldest first.
    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let rows: Vec<KeyRow> = on_pool!(self, pool, sql => {
            sqlx::query_as(sql(concat!(key_columns!(), " FROM client_keys ORDER BY created_at, id")))
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(KeyRecord::try_from).collect()
    }

    pub async fn get_key(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        let row: Option<KeyRow> = on_pool!(self, pool, sql => {
            sqlx::query_as(sql(concat!(key_columns!(), " FROM client_keys WHERE id = ?")))
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?
        });
        row.map(KeyRecord::try_from).transpose()
    }

    /// Marks a key revoked at `at` (a key already revoked keeps its first time). The record
    /// as it now is; `None` when there is no such key.
    pub async fn revoke_key(
        &self,
        id: Uuid,
        at: DateTime<Utc>,
    ) -> Result<Option<KeyRecord>, StoreError> {
        on_pool!(self, pool, sql => {
            sqlx::query(sql(
                "UPDATE client_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            ))
            .bind(at)
            .bind(id.to_string())
            .execute(pool)
            .await?;
        });
        self.get_key(id).await
    }
}

/// Outcome of [`Store::delete_tool`].
#[derive(Debug, PartialEq, Eq)]
pub enum DeleteTool {
    Deleted,
    NotFound,
    InUse(u64),
}
