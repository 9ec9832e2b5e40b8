//! The tool registry's vocabulary: what a tool is, and what makes a tool definition valid.
//!
//! A [`ToolSpec`] is what a user writes (in the config file or an API body); [`Tool`] is a spec
//! that passed [`ToolSpec::validate`] and was given an id by the store. Validation lives here, in
//! one place, so the config file and the API can never disagree on what is acceptable.

use std::{collections::BTreeMap, path::PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::runtime::{
    Limits, RuntimeKind,
    container::{DockerSecurity, Network, Pull},
};

/// How Switchboard talks to the tool's MCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// The server listens on a port Switchboard gives it and speaks Streamable HTTP.
    #[default]
    StreamableHttp,
    /// The server speaks MCP on stdin/stdout; a bridge process serves it as Streamable HTTP
    /// (see `stdio`).
    Stdio,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::StreamableHttp => "streamable-http",
            Transport::Stdio => "stdio",
        }
    }
}

/// Whether a deployment whose process ended, or failed its liveness checks, is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit.
    Always,
    /// Unless the process exited with status 0.
    #[default]
    OnFailure,
    /// A deployment that ends is FAILED and stays so.
    Never,
}

/// How a deployment's health is watched once it is RUNNING.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSpec {
    /// Time between checks.
    pub interval_ms: u64,
    /// A check that takes longer fails (default 5 s, or the interval when that is shorter).
    pub timeout_ms: u64,
    /// Consecutive failed checks that make a deployment UNHEALTHY (it leaves routing, and is
    /// restarted as the restart policy says).
    pub failure_threshold: u32,
    /// Consecutive good checks that make an UNHEALTHY deployment HEALTHY again.
    pub success_threshold: u32,
    /// Failures in this long after a deployment becomes RUNNING do not count (a server that
    /// warms caches after answering its first request).
    pub start_period_ms: u64,
    /// A plain HTTP path (GET, 2xx is healthy) checked instead of the MCP probe, for servers
    /// whose MCP endpoint cannot be probed cheaply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            interval_ms: 10_000,
            timeout_ms: 5_000,
            failure_threshold: 3,
            success_threshold: 1,
            start_period_ms: 0,
            http_path: None,
        }
    }
}

/// When and how fast ended deployments are restarted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RestartSpec {
    pub policy: RestartPolicy,
    /// The first restart is immediate; the second waits this long, and each later one twice
    /// as long as the one before, up to `max_delay_ms`.
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    /// A process that ran this long without ending resets the delay (the next restart is
    /// immediate again).
    pub reset_after_ms: u64,
    /// Starts that may fail in a row (the process exits, or does not answer within
    /// `startup_timeout_ms`) before a deployment that has never been RUNNING is FAILED, with
    /// the last failure as its error. A deployment that has run keeps restarting as `policy`
    /// says.
    pub max_start_failures: u32,
}

impl Default for RestartSpec {
    fn default() -> Self {
        RestartSpec {
            policy: RestartPolicy::OnFailure,
            initial_delay_ms: 1_000,
            max_delay_ms: 300_000,
            reset_after_ms: 600_000,
            max_start_failures: 3,
        }
    }
}

/// A tool definition as a user writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// Unique name used in URLs: `^[a-z0-9][a-z0-9-]{0,62}$`. (Optional in a PUT body, which
    /// takes it from the URL.)
    #[serde(default)]
    pub slug: String,
    /// Human-readable name; defaults to the slug.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Program to run. A bare name is looked up in `PATH`. For `runtime = "docker"`: the
    /// container's entrypoint, a path or name inside the image (empty: the image's own).
    #[serde(default)]
    pub command: String,
    /// Arguments; `{port}` is replaced by the deployment's port. For `runtime = "docker"`: the
    /// container's command (empty: the image's own, when `command` is empty too).
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment; `{port}` in a value is replaced by the deployment's port.
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, String>)]
    pub env: BTreeMap<String, String>,
    /// Environment holding secrets (API keys, tokens): given to the server like `env`, but
    /// the API never shows the values (they read as `********`; sending that marker back in
    /// an update keeps the stored value), and Switchboard never logs them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub secret_env: BTreeMap<String, String>,
    /// `secret_env` values the store holds but this Switchboard's key cannot decrypt (the key
    /// changed or was lost), as stored: set only by the store when it reads the tool. They
    /// are kept as they are through updates (the API shows them as `********`, and sending
    /// that back keeps them), never given to a process, and a tool that has any cannot be
    /// deployed ([`ToolSpec::check_secrets`]) until the key is restored or new values set.
    #[serde(skip)]
    pub unreadable_secret_env: BTreeMap<String, String>,
    /// Working directory of the server process; Switchboard's own when absent.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub working_dir: Option<PathBuf>,
    #[serde(default)]
    pub transport: Transport,
    /// Path of the MCP endpoint on the server.
    #[serde(default = "default_endpoint_path")]
    pub endpoint_path: String,
    /// Environment variable that receives the port; `null` or `""` sets none.
    #[serde(default = "default_port_env")]
    pub port_env: Option<String>,
    /// How long a new deployment may take to answer its first MCP request.
    #[serde(default = "default_startup_timeout_ms")]
    pub startup_timeout_ms: u64,
    /// How long the proxy waits for a response to this tool's requests to begin, instead of
    /// its `header_timeout_ms`. A JSON reply arrives whole, so this is how long a client that
    /// takes only JSON may wait for a tool call; SSE streams have no total limit either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_timeout_ms: Option<u64>,
    /// Send the client's `Authorization` header on to the server even when Switchboard
    /// authenticated the request with it (`[auth] mcp = "required"`). Off by default: a client
    /// key is Switchboard's credential, not the server's. (With auth off, the header always
    /// passes.) Deployments started before a change keep the value they started with.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_credentials: bool,
    /// The MCP tools of this server that clients may see and call (`tools/list` is filtered,
    /// a `tools/call` of another is refused by the proxy), whoever the caller and whether or
    /// not `/mcp` requires keys. Absent: every tool the server has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose_tools: Option<Vec<String>>,
    /// Record `tools/call` argument values in the audit trail. Off by default: arguments may
    /// carry personal data or secrets.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit_arguments: bool,
    /// Time between SIGTERM and SIGKILL when stopping.
    #[serde(default = "default_stop_grace_period_ms")]
    pub stop_grace_period_ms: u64,
    /// How many deployments the tool should have (0-64): `switchboard deploy` (and the
    /// scale operation without a count) starts what is missing, `switchboard scale` changes
    /// it, and `autostart` brings the tool to it when Switchboard starts.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// Bring the tool to `replicas` deployments when Switchboard starts.
    #[serde(default)]
    pub autostart: bool,
    #[serde(default)]
    pub health: HealthSpec,
    #[serde(default)]
    pub restart: RestartSpec,
    /// How a `stdio` tool's processes serve clients.
    #[serde(default)]
    pub stdio: StdioSpec,
    /// What runs the server: `process` (the default), a process tree on this host, or
    /// `docker`, a container of `image` (Streamable HTTP servers only, for now).
    #[serde(default, skip_serializing_if = "is_default")]
    pub runtime: RuntimeKind,
    /// The container image (`NAME:TAG`): required for `runtime = "docker"` (except for an
    /// `npx:`/`uvx:` package, where it is the image the package is installed in and run by,
    /// default `[docker] node_image` / `python_image`), refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Whether a missing image may be pulled (docker): `never` (the default; a missing image
    /// fails the deployment at once, naming it) or `missing`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub pull: Pull,
    /// The network the container joins (docker): `bridge` (the default; the server's port is
    /// published on 127.0.0.1 only, so the server must listen on 0.0.0.0 inside), or `host`.
    /// `none` leaves an HTTP server unreachable and is refused.
    #[serde(default, skip_serializing_if = "is_default")]
    pub network: Network,
    /// The user the container runs as (docker), `uid[:gid]` or a name its image knows;
    /// default `65534:65534` (nobody), never the image's own (often root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The container's secure defaults (docker), each on unless turned off here.
    #[serde(default, skip_serializing_if = "DockerSecurity::is_default")]
    pub docker: DockerSecurity,
    /// Resources a deployment may use (`{ memory = "256MiB", cpus = 0.5, pids = 128 }`, each
    /// optional): a server killed for exceeding its memory is recorded as "out of memory" and
    /// restarted per its policy. Enforced for containers (their HostConfig) and processes
    /// (cgroup controllers, v2 or v1; a stdio tool's bridge and servers share them); a host
    /// that cannot enforce one refuses the deploy (409 `limits_unenforceable`).
    #[serde(default, skip_serializing_if = "Limits::is_none")]
    pub limits: Limits,
    /// Set by the manager once a `runtime = "docker"` package tool's package is installed:
    /// the volume holding it, which its containers mount read-only. Never stored or shown.
    #[serde(skip)]
    pub package_volume: Option<String>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A `stdio` tool's hosting settings (see ARCHITECTURE.md, `stdio`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct StdioSpec {
    /// Legacy MCP sessions open at once across the tool's replicas; each has a server process
    /// of its own. One more gets 429.
    pub max_sessions: u32,
    /// A legacy session with no request and no open stream for this long is closed (and its
    /// process stopped).
    pub session_idle_ms: u64,
    /// Processes per deployment shared by stateless (2026-07-28) requests.
    pub pool_size: u32,
    /// Processes per deployment started ahead of the next legacy sessions, so `initialize`
    /// does not wait for a server to start; raise it for clients that open sessions in bursts,
    /// 0 starts each session's process on demand.
    pub spares: u32,
}

impl Default for StdioSpec {
    fn default() -> Self {
        StdioSpec {
            max_sessions: 100,
            session_idle_ms: 600_000,
            pool_size: 2,
            spares: 1,
        }
    }
}

fn default_endpoint_path() -> String {
    "/mcp".to_owned()
}
fn default_port_env() -> Option<String> {
    Some("PORT".to_owned())
}
fn default_startup_timeout_ms() -> u64 {
    30_000
}
fn default_stop_grace_period_ms() -> u64 {
    10_000
}
fn default_replicas() -> u32 {
    1
}

pub const MAX_REPLICAS: u32 = 64;
const MAX_STARTUP_TIMEOUT_MS: u64 = 10 * 60 * 1000;
const MAX_GRACE_MS: u64 = 60 * 60 * 1000;
const HOUR_MS: u64 = 60 * 60 * 1000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// A definition that breaks a rule, with a message that names the field and the rule.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        message: message.into(),
    }
}

fn relative_path_advice(path: &str) -> String {
    format!(
        "'{path}' is a relative path, which would depend on Switchboard's working directory: \
         give an absolute path (the switchboard CLI resolves paths against its working \
         directory, a config file against its own)"
    )
}

/// `^[a-z0-9][a-z0-9-]{0,62}$`, without pulling in a regex engine for one pattern.
pub fn is_valid_slug(slug: &str) -> bool {
    let bytes = slug.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('=') && !name.contains('\0')
}

impl ToolSpec {
    /// The runtime's fields: a container's only with `runtime = "docker"`, which needs an
    /// image and runs a command in it (in this release not an `npx:`/`uvx:` package); a stdio
    /// tool's server processes are its containers.
    fn validate_runtime(&mut self) -> Result<(), SpecError> {
        self.limits.check().map_err(|e| invalid("limits", e))?;
        if self.runtime == RuntimeKind::Process {
            let container_only = [
                ("image", self.image.is_some()),
                ("pull", self.pull != Pull::default()),
                ("network", self.network != Network::default()),
                ("user", self.user.is_some()),
                ("docker", !self.docker.is_default()),
            ];
            if let Some((field, _)) = container_only.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    field,
                    "is a container setting: it needs runtime = \"docker\"",
                ));
            }
            return Ok(());
        }
        let package = crate::packages::Package::parse(&self.command).is_some();
        let image = self.image.as_deref().unwrap_or_default();
        // A package's image defaults to the configured base image.
        if image.trim().is_empty() && !(package && self.image.is_none()) {
            return Err(invalid(
                "image",
                "runtime = \"docker\" needs an image (such as \"ghcr.io/org/server:1.2\")",
            ));
        }
        if image.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(invalid(
                "image",
                format!("'{image}' is not an image reference (it contains whitespace)"),
            ));
        }
        // A stdio server listens nowhere: no network is a fine choice for one.
        if self.network == Network::None && self.transport != Transport::Stdio {
            return Err(invalid(
                "network",
                "a Streamable HTTP server with network = \"none\" could not be reached: use \
                 \"bridge\" (its port is published on 127.0.0.1 only) or \"host\"",
            ));
        }
        if let Some(user) = &self.user
            && (user.trim().is_empty() || user.contains(|c: char| c.is_whitespace() || c == '\0'))
        {
            return Err(invalid(
                "user",
                format!("'{user}' is not a user: give uid[:gid] or a name the image knows"),
            ));
        }
        if self.command.trim().is_empty() {
            self.command.clear();
        }
        Ok(())
    }

    /// Checks every rule and fills defaults that depend on other fields.
    pub fn validate(mut self) -> Result<ToolSpec, SpecError> {
        if !is_valid_slug(&self.slug) {
            return Err(invalid(
                "slug",
                format!(
                    "'{}' is not a valid slug: use 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit",
                    self.slug
                ),
            ));
        }
        if self.name.trim().is_empty() {
            self.name = self.slug.clone();
        }
        self.validate_runtime()?;
        if self.command.trim().is_empty() && self.runtime == RuntimeKind::Process {
            return Err(invalid("command", "must not be empty"));
        }
        if self.command.contains('\0') || self.args.iter().any(|a| a.contains('\0')) {
            return Err(invalid("args", "must not contain NUL bytes"));
        }
        // A relative path would be resolved against the server's working directory, which
        // whoever wrote it rarely means: the CLI and config files resolve them before sending.
        if self.command.contains('/')
            && !self.command.starts_with('/')
            && crate::packages::Package::parse(&self.command).is_none()
        {
            return Err(invalid(
                "command",
                match self.runtime {
                    RuntimeKind::Process => relative_path_advice(&self.command),
                    RuntimeKind::Docker => format!(
                        "'{}' is a relative path: give the absolute path inside the image, or \
                         a bare name its PATH has",
                        self.command
                    ),
                },
            ));
        }
        if let Some(w) = &self.working_dir
            && w.is_relative()
        {
            return Err(invalid(
                "working_dir",
                relative_path_advice(&w.to_string_lossy()),
            ));
        }
        for (k, v) in &self.env {
            if !valid_env_name(k) {
                return Err(invalid(
                    "env",
                    format!("'{k}' is not a valid environment variable name"),
                ));
            }
            if v.contains('\0') {
                return Err(invalid(
                    "env",
                    format!("the value of '{k}' contains a NUL byte"),
                ));
            }
        }
        for (k, v) in &self.secret_env {
            if !valid_env_name(k) {
                return Err(invalid(
                    "secret_env",
                    format!("'{k}' is not a valid environment variable name"),
                ));
            }
            if v.contains('\0') {
                return Err(invalid(
                    "secret_env",
                    format!("the value of '{k}' contains a NUL byte"),
                ));
            }
        }
        for k in self
            .secret_env
            .keys()
            .chain(self.unreadable_secret_env.keys())
        {
            if self.env.contains_key(k) {
                return Err(invalid(
                    "secret_env",
                    format!("'{k}' is in env too; give it in one of them"),
                ));
            }
        }
        if self.port_env.as_deref() == Some("") {
            // TOML has no null: an empty name is how a config file says "no port variable".
            self.port_env = None;
        }
        if let Some(name) = &self.port_env
            && !valid_env_name(name)
        {
            return Err(invalid(
                "port_env",
                format!("'{name}' is not a valid environment variable name"),
            ));
        }
        if !self.endpoint_path.starts_with('/') || self.endpoint_path.contains(char::is_whitespace)
        {
            return Err(invalid(
                "endpoint_path",
                format!(
                    "'{}' must be an absolute path such as /mcp",
                    self.endpoint_path
                ),
            ));
        }
        if let Some(names) = &self.expose_tools {
            if names.is_empty() {
                return Err(invalid(
                    "expose_tools",
                    "must name at least one MCP tool (omit it to expose every tool)",
                ));
            }
            if let Some(bad) = names.iter().find(|n| !crate::mcp::is_valid_tool_name(n)) {
                return Err(invalid(
                    "expose_tools",
                    format!("'{bad}' is not an MCP tool name (1-128 of A-Z a-z 0-9 _ - .)"),
                ));
            }
        }
        if !(100..=MAX_STARTUP_TIMEOUT_MS).contains(&self.startup_timeout_ms) {
            return Err(invalid(
                "startup_timeout_ms",
                format!("must be between 100 and {MAX_STARTUP_TIMEOUT_MS}"),
            ));
        }
        if let Some(ms) = self.call_timeout_ms
            && !(100..=DAY_MS).contains(&ms)
        {
            return Err(invalid(
                "call_timeout_ms",
                format!("must be between 100 and {DAY_MS}"),
            ));
        }
        if self.stop_grace_period_ms > MAX_GRACE_MS {
            return Err(invalid(
                "stop_grace_period_ms",
                format!("must be at most {MAX_GRACE_MS}"),
            ));
        }
        if self.replicas > MAX_REPLICAS {
            return Err(invalid(
                "replicas",
                format!("must be between 0 and {MAX_REPLICAS}"),
            ));
        }
        // The timeout defaults to 5 s or the interval, whichever is shorter.
        if self.health.timeout_ms == HealthSpec::default().timeout_ms {
            self.health.timeout_ms = self.health.timeout_ms.min(self.health.interval_ms);
        }
        let h = &self.health;
        if !(100..=HOUR_MS).contains(&h.interval_ms) {
            return Err(invalid(
                "health.interval_ms",
                format!("must be between 100 and {HOUR_MS}"),
            ));
        }
        if !(10..=h.interval_ms.max(10)).contains(&h.timeout_ms) {
            return Err(invalid(
                "health.timeout_ms",
                "must be at least 10 and at most health.interval_ms",
            ));
        }
        if !(1..=100).contains(&h.failure_threshold) {
            return Err(invalid(
                "health.failure_threshold",
                "must be between 1 and 100",
            ));
        }
        if !(1..=100).contains(&h.success_threshold) {
            return Err(invalid(
                "health.success_threshold",
                "must be between 1 and 100",
            ));
        }
        if h.start_period_ms > DAY_MS {
            return Err(invalid(
                "health.start_period_ms",
                format!("must be at most {DAY_MS}"),
            ));
        }
        if let Some(p) = &h.http_path
            && (!p.starts_with('/') || p.contains(char::is_whitespace))
        {
            return Err(invalid(
                "health.http_path",
                format!("'{p}' must be an absolute path such as /healthz"),
            ));
        }
        let r = &self.restart;
        if r.max_delay_ms > DAY_MS || r.initial_delay_ms > r.max_delay_ms {
            return Err(invalid(
                "restart",
                format!("need initial_delay_ms <= max_delay_ms <= {DAY_MS}"),
            ));
        }
        if r.reset_after_ms > 7 * DAY_MS {
            return Err(invalid(
                "restart.reset_after_ms",
                format!("must be at most {}", 7 * DAY_MS),
            ));
        }
        if !(1..=100).contains(&r.max_start_failures) {
            return Err(invalid(
                "restart.max_start_failures",
                "must be between 1 and 100",
            ));
        }
        if let Some(Err(e)) = crate::packages::Package::parse(&self.command) {
            return Err(invalid("command", e.to_string()));
        }
        let st = &self.stdio;
        if !(1..=10_000).contains(&st.max_sessions) {
            return Err(invalid("stdio.max_sessions", "must be between 1 and 10000"));
        }
        if !(1_000..=7 * DAY_MS).contains(&st.session_idle_ms) {
            return Err(invalid(
                "stdio.session_idle_ms",
                format!("must be between 1000 and {}", 7 * DAY_MS),
            ));
        }
        if !(1..=64).contains(&st.pool_size) {
            return Err(invalid("stdio.pool_size", "must be between 1 and 64"));
        }
        if st.spares > 64 {
            return Err(invalid("stdio.spares", "must be between 0 and 64"));
        }
        if self.transport == Transport::Stdio
            && (self.args.iter().any(|a| a.contains("{port}"))
                || self.env.values().any(|v| v.contains("{port}")))
        {
            return Err(invalid(
                "args",
                "a stdio server gets no port: '{port}' cannot be used with transport 'stdio'",
            ));
        }
        Ok(self)
    }
}

/// What applying a tool definition did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    Created,
    Updated,
    /// The stored definition was already this one.
    Unchanged,
}

/// How a secret value reads in API responses.
pub const REDACTED: &str = "********";

impl ToolSpec {
    /// The spec as the API shows it: secret values replaced by [`REDACTED`] (those it cannot
    /// decrypt too: they exist, and an update that sends the marker back keeps them).
    pub fn redacted(mut self) -> ToolSpec {
        for k in std::mem::take(&mut self.unreadable_secret_env).into_keys() {
            self.secret_env.insert(k, String::new());
        }
        for v in self.secret_env.values_mut() {
            *v = REDACTED.to_owned();
        }
        self
    }

    /// For an update: a secret sent back as [`REDACTED`] keeps its value from `stored`, even
    /// one this Switchboard cannot decrypt (it stays as stored, unreadable).
    pub fn keep_secrets_from(&mut self, stored: &ToolSpec) {
        let mut unreadable = Vec::new();
        for (k, v) in self.secret_env.iter_mut() {
            if v != REDACTED {
                continue;
            }
            if let Some(old) = stored.secret_env.get(k) {
                v.clone_from(old);
            } else if let Some(sealed) = stored.unreadable_secret_env.get(k) {
                unreadable.push((k.clone(), sealed.clone()));
            }
        }
        for (k, sealed) in unreadable {
            self.secret_env.remove(&k);
            self.unreadable_secret_env.insert(k, sealed);
        }
    }

    /// Refuses to start a tool with secrets this Switchboard cannot decrypt: it would run
    /// without them (or with garbage in their place).
    pub fn check_secrets(&self) -> Result<(), UnreadableSecrets> {
        if self.unreadable_secret_env.is_empty() {
            return Ok(());
        }
        Err(UnreadableSecrets {
            slug: self.slug.clone(),
            names: self.unreadable_secret_env.keys().cloned().collect(),
        })
    }
}

/// A tool whose stored secrets do not decrypt with this Switchboard's key cannot be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "tool '{slug}' cannot be started: its secret_env {names} cannot be decrypted with this \
     Switchboard's secret key (it was stored with another key, which was lost or replaced). \
     Restore the key it was stored with (the data directory's secret.key, or \
     SWITCHBOARD_SECRET_KEY) and restart Switchboard, or set new values: `switchboard tool \
     update {slug} --secret-env NAME` takes NAME's value from the command's environment",
    names = names.join(", ")
)]
pub struct UnreadableSecrets {
    pub slug: String,
    pub names: Vec<String>,
}

/// A registered tool.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Tool {
    pub id: Uuid,
    #[serde(flatten)]
    pub spec: ToolSpec,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Where MCP clients reach the tool: `http://<switchboard>/mcp/<slug>`, the same for every
    /// transport (set in API responses; not stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl Tool {
    /// The tool as the API shows it (see [`ToolSpec::redacted`]), with the URL clients use
    /// given Switchboard's public base URL.
    pub fn redacted(mut self, public_url: &str) -> Tool {
        self.spec = self.spec.redacted();
        self.url = Some(format!("{public_url}/mcp/{}", self.spec.slug));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_kept_through_an_update() {
        let stored: ToolSpec = serde_json::from_value(serde_json::json!(
            {"slug": "a", "command": "x", "secret_env": {"API_KEY": "s3cr3t"}}))
        .unwrap();
        let shown = stored.clone().redacted();
        assert_eq!(shown.secret_env["API_KEY"], REDACTED);
        assert!(!serde_json::to_string(&shown).unwrap().contains("s3cr3t"));
        let mut update = shown;
        update.keep_secrets_from(&stored);
        assert_eq!(update.secret_env["API_KEY"], "s3cr3t");
        let both: ToolSpec = serde_json::from_value(serde_json::json!(
            {"slug": "a", "command": "x", "env": {"K": "1"}, "secret_env": {"K": "2"}}))
        .unwrap();
        assert!(
            both.validate()
                .unwrap_err()
                .to_string()
                .starts_with("secret_env")
        );
    }

    fn spec(slug: &str) -> ToolSpec {
        serde_json::from_value(serde_json::json!({"slug": slug, "command": "x"})).unwrap()
    }

    #[test]
    fn slug_rule() {
        for ok in ["a", "0", "demo", "my-tool-2", &"a".repeat(63)] {
            assert!(is_valid_slug(ok), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", "é", &"a".repeat(64), "a b"] {
            assert!(!is_valid_slug(bad), "{bad}");
        }
    }

    #[test]
    fn defaults_fill_in() {
        let s = spec("demo").validate().unwrap();
        assert_eq!(s.name, "demo");
        assert_eq!(s.endpoint_path, "/mcp");
        assert_eq!(s.port_env.as_deref(), Some("PORT"));
        assert_eq!(s.stop_grace_period_ms, 10_000);
        assert_eq!(s.replicas, 1);
        assert_eq!(s.transport, Transport::StreamableHttp);
        assert_eq!(s.restart.policy, RestartPolicy::OnFailure);
        assert_eq!(s.restart.initial_delay_ms, 1_000);
        assert_eq!(s.restart.max_delay_ms, 300_000);
        assert_eq!(s.restart.reset_after_ms, 600_000);
        assert_eq!(s.restart.max_start_failures, 3);
        assert_eq!(s.health.interval_ms, 10_000);
        assert_eq!(s.health.timeout_ms, 5_000);
        assert_eq!(s.health.failure_threshold, 3);
        assert_eq!(s.health.success_threshold, 1);
    }

    #[test]
    fn health_and_restart_settings_are_checked_by_name() {
        let bad = [
            (
                serde_json::json!({"health": {"interval_ms": 5}}),
                "health.interval_ms",
            ),
            (
                serde_json::json!({"health": {"interval_ms": 1000, "timeout_ms": 2000}}),
                "health.timeout_ms",
            ),
            (
                serde_json::json!({"health": {"failure_threshold": 0}}),
                "health.failure_threshold",
            ),
            (
                serde_json::json!({"health": {"http_path": "healthz"}}),
                "health.http_path",
            ),
            (
                serde_json::json!({"restart": {"initial_delay_ms": 10, "max_delay_ms": 5}}),
                "restart",
            ),
            (
                serde_json::json!({"restart": {"max_start_failures": 0}}),
                "restart.max_start_failures",
            ),
        ];
        for (extra, field) in bad {
            let mut v = serde_json::json!({"slug": "a", "command": "x"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            let err = serde_json::from_value::<ToolSpec>(v)
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(err.to_string().starts_with(field), "{field}: {err}");
        }
        let err = serde_json::from_value::<ToolSpec>(
            serde_json::json!({"slug": "a", "command": "x", "restart": {"policy": "sometimes"}}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
    }

    #[test]
    fn stdio_tools_get_no_port() {
        let mut s = spec("demo");
        s.transport = Transport::Stdio;
        assert!(s.clone().validate().is_ok());
        s.args = vec!["--port={port}".into()];
        let err = s.validate().unwrap_err();
        assert!(err.to_string().contains("gets no port"), "{err}");
    }

    #[test]
    fn unknown_transport_is_refused_by_name() {
        let err = serde_json::from_value::<ToolSpec>(
            serde_json::json!({"slug": "a", "command": "x", "transport": "carrier-pigeon"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("carrier-pigeon"), "{err}");
    }

    fn from(v: serde_json::Value) -> Result<ToolSpec, SpecError> {
        serde_json::from_value::<ToolSpec>(v).unwrap().validate()
    }

    #[test]
    fn a_docker_tool_needs_an_image_and_may_leave_the_command_to_it() {
        let ok =
            from(serde_json::json!({"slug": "d", "runtime": "docker", "image": "srv:1"})).unwrap();
        assert_eq!(ok.runtime, RuntimeKind::Docker);
        assert_eq!(ok.command, "");
        let err = from(serde_json::json!({"slug": "d", "runtime": "docker"})).unwrap_err();
        assert!(err.to_string().starts_with("image:"), "{err}");
        let err = from(serde_json::json!({"slug": "d", "runtime": "docker", "image": "a b"}))
            .unwrap_err();
        assert!(err.to_string().starts_with("image:"), "{err}");
        let err = from(
            serde_json::json!({"slug": "d", "runtime": "docker", "image": "srv:1",
            "command": "bin/server"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("inside the image"), "{err}");
        // A process still needs its command.
        let err = from(serde_json::json!({"slug": "p"})).unwrap_err();
        assert!(err.to_string().starts_with("command:"), "{err}");
    }

    #[test]
    fn a_stdio_tool_runs_in_containers_even_without_a_network() {
        let stdio = from(
            serde_json::json!({"slug": "s", "runtime": "docker", "image": "srv:1",
            "transport": "stdio", "args": ["--stdio"], "network": "none"}),
        )
        .unwrap();
        assert_eq!(stdio.transport, Transport::Stdio);
        assert_eq!(stdio.network, Network::None);
        // An HTTP server without a network could not be reached: still refused.
        let http = from(
            serde_json::json!({"slug": "h", "runtime": "docker", "image": "srv:1",
            "network": "none"}),
        )
        .unwrap_err();
        assert!(http.to_string().starts_with("network:"), "{http}");
    }

    #[test]
    fn container_settings_are_refused_for_a_process() {
        for (field, value) in [
            ("image", serde_json::json!("srv:1")),
            ("pull", serde_json::json!("missing")),
            ("network", serde_json::json!("host")),
            ("user", serde_json::json!("1000")),
            ("docker", serde_json::json!({"init": false})),
        ] {
            let err =
                from(serde_json::json!({"slug": "p", "command": "x", field: value})).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("{field}:"))
                    && err.to_string().contains("runtime = \"docker\""),
                "{field}: {err}"
            );
        }
    }

    #[test]
    fn what_a_container_cannot_do_is_refused_saying_so() {
        let docker = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"slug": "d", "runtime": "docker", "image": "srv:1"});
            if let (serde_json::Value::Object(v), serde_json::Value::Object(e)) = (&mut v, extra) {
                v.extend(e);
            }
            from(v).unwrap_err().to_string()
        };
        let none = docker(serde_json::json!({"network": "none"}));
        assert!(none.starts_with("network:"), "{none}");
        let user = docker(serde_json::json!({"user": " "}));
        assert!(user.starts_with("user:"), "{user}");
    }

    #[test]
    fn a_package_in_a_container_needs_no_image_but_a_given_one_must_be_valid() {
        let spec = from(serde_json::json!({"slug": "n", "runtime": "docker",
            "command": "npx:@modelcontextprotocol/server-everything@2026.8.31"}))
        .unwrap();
        assert_eq!(spec.image, None, "the configured base image is used");
        let uvx = from(serde_json::json!({"slug": "u", "runtime": "docker",
            "command": "uvx:mcp-server-time", "image": "python:3.12-slim"}))
        .unwrap();
        assert_eq!(uvx.image.as_deref(), Some("python:3.12-slim"));
        let blank = from(serde_json::json!({"slug": "b", "runtime": "docker",
            "command": "npx:x", "image": " "}))
        .unwrap_err();
        assert!(blank.to_string().starts_with("image:"), "{blank}");
        // An ordinary command still needs its image.
        let plain = from(serde_json::json!({"slug": "p", "runtime": "docker",
            "command": "server"}))
        .unwrap_err();
        assert!(plain.to_string().starts_with("image:"), "{plain}");
    }

    #[test]
    fn a_process_tool_serializes_as_before() {
        let json = serde_json::to_value(spec("p").validate().unwrap()).unwrap();
        for field in [
            "runtime", "image", "pull", "network", "user", "docker", "limits",
        ] {
            assert!(
                json.get(field).is_none(),
                "{field} shown for a process: {json}"
            );
        }
    }

    #[test]
    fn limits_are_validated_naming_the_field_for_every_runtime() {
        let docker = |limits: serde_json::Value| {
            from(
                serde_json::json!({"slug": "d", "runtime": "docker", "image": "srv:1",
                "limits": limits}),
            )
        };
        let ok = docker(serde_json::json!({"memory": "256MiB", "cpus": 0.5, "pids": 128})).unwrap();
        assert_eq!(ok.limits.memory.map(|m| m.0), Some(256 << 20));
        for bad in [
            serde_json::json!({"memory": "1MiB"}),
            serde_json::json!({"cpus": 0}),
            serde_json::json!({"pids": 0}),
        ] {
            let err = docker(bad.clone()).unwrap_err().to_string();
            assert!(err.starts_with("limits: "), "{bad}: {err}");
        }
        let process = from(serde_json::json!({"slug": "p", "command": "x",
            "limits": {"memory": "256MiB", "cpus": 0.5, "pids": 128}}))
        .unwrap();
        assert_eq!(process.limits, ok.limits);
        let bad = from(serde_json::json!({"slug": "p", "command": "x",
            "limits": {"pids": 0}}))
        .unwrap_err()
        .to_string();
        assert!(bad.starts_with("limits: "), "{bad}");
    }
}
