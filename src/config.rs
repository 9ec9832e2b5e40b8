//! Configuration: an optional TOML file, overridden by command-line flags and environment
//! variables (clap's `env`), with defaults for everything.
//!
//! Relative paths in the file (`data_dir`, `api_token_file`, `secrets.key_file`, a tool's
//! `command` when it contains a `/`, and `working_dir`) are resolved against the file's own directory, so a config works
//! the same from any current directory.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Component, Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    auth::McpAuth,
    log_retention::LogRetention,
    manager::ExitPolicy,
    ports::PortRange,
    proxy::ProxyConfig,
    registry::ToolSpec,
    secrets::{KEY_ENV, KeyError, KeySource, SecretKey},
};

pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7300);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot read the API token file {path}: {error}")]
    TokenFile {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the API token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("node_id '{0}' is invalid: use 1-64 characters of A-Z, a-z, 0-9, '-' and '_'")]
    NodeId(String),
    #[error(
        "refusing to listen on {0} without an API token: a non-loopback address exposes the API \
         (which starts processes) to the network. Set SWITCHBOARD_TOKEN or api_token_file, \
         or listen on 127.0.0.1"
    )]
    TokenRequired(SocketAddr),
    #[error(
        "refusing to serve /mcp without authentication on {0}: a non-loopback address exposes \
         every hosted tool to the network. Remove [auth] mcp = \"off\" (client keys are then \
         required), listen on 127.0.0.1, or set [auth] allow_unauthenticated_mcp = true if \
         something in front of Switchboard authenticates callers"
    )]
    McpAuthRequired(SocketAddr),
    #[error(transparent)]
    SecretKey(#[from] KeyError),
    #[error(transparent)]
    OAuth(#[from] crate::auth::oauth::OAuthConfigError),
    #[error(
        "[auth.oauth] names an authorization server but [auth] mcp = \"off\": remove one of the \
         two (tokens are checked only when /mcp requires authentication)"
    )]
    OAuthWithAuthOff,
    #[error("{key} = {value:?} is not an image reference (such as \"node:22-bookworm-slim\")")]
    Image { key: &'static str, value: String },
}

/// An image setting: absent, or a reference without whitespace.
fn image_setting(key: &'static str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    match value {
        Some(v)
            if v.trim().is_empty() || v.contains(|c: char| c.is_whitespace() || c.is_control()) =>
        {
            Err(ConfigError::Image { key, value: v })
        }
        v => Ok(v),
    }
}

/// The file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub ports: PortsSection,
    #[serde(default)]
    pub proxy: ProxySection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub packages: PackagesSection,
    #[serde(default)]
    pub logs: LogsSection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub secrets: SecretsSection,
    #[serde(default)]
    pub docker: DockerSection,
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
}

/// `[auth]`: who may call `/mcp` (see [`crate::auth`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// `required` (a client key on every request) or `off`. Default: required when the
    /// listener is not loopback, off on loopback.
    pub mcp: Option<McpAuth>,
    /// Lets `mcp = "off"` serve a non-loopback address (something in front authenticates).
    #[serde(default)]
    pub allow_unauthenticated_mcp: bool,
    /// `[auth.oauth]`: also accept access tokens from this authorization server.
    pub oauth: Option<crate::auth::oauth::OAuthConfig>,
}

/// `[secrets]`: the key that encrypts tools' `secret_env` values in the store.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsSection {
    /// A file holding the key (base64 of 32 bytes), kept by the operator; Switchboard never
    /// creates it. Default: `secret.key` in the data directory, created at first start.
    /// `SWITCHBOARD_SECRET_KEY` wins over both.
    pub key_file: Option<PathBuf>,
}

/// `[docker]`: the Docker engine that runs `runtime = "docker"` tools.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerSection {
    /// Offer the Docker runtime (default true). Switchboard starts without a reachable engine
    /// either way; a docker tool's deploy is then refused with `runtime_unavailable`.
    pub enabled: Option<bool>,
    /// The engine's socket (`unix:///var/run/docker.sock`); default: `DOCKER_HOST`, else
    /// that socket.
    pub host: Option<String>,
    /// The image `npx:` tools with `runtime = "docker"` are installed in and run by, unless
    /// the tool names its own `image` (default [`crate::packages::DEFAULT_NODE_IMAGE`]).
    pub node_image: Option<String>,
    /// The same for `uvx:` tools (default [`crate::packages::DEFAULT_PYTHON_IMAGE`]).
    pub python_image: Option<String>,
}

/// The Docker runtime's settings, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    pub enabled: bool,
    /// `None`: the local defaults (`DOCKER_HOST`, else `/var/run/docker.sock`).
    pub host: Option<String>,
    /// The base images of package tools in containers.
    pub images: crate::packages::BaseImages,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            enabled: true,
            host: None,
            images: crate::packages::BaseImages::default(),
        }
    }
}

/// `[logs]`: how long ended deployments' logs are kept (see [`crate::log_retention`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsSection {
    /// Days an ended deployment's log is kept after its last line (default 7).
    pub retention_days: Option<u64>,
    /// Ended deployments' logs beyond this total are removed, oldest first (default 1024).
    pub max_total_mib: Option<u64>,
    /// Seconds between passes; the first runs at start (default 3600, at least 1).
    pub check_interval_secs: Option<u64>,
}

impl LogsSection {
    fn resolve(&self) -> LogRetention {
        use crate::log_retention as r;
        LogRetention {
            max_age: Duration::from_secs(
                self.retention_days
                    .unwrap_or(r::DEFAULT_RETENTION_DAYS)
                    .saturating_mul(86_400),
            ),
            max_total_bytes: self
                .max_total_mib
                .unwrap_or(r::DEFAULT_MAX_TOTAL_MIB)
                .saturating_mul(1024 * 1024),
            interval: Duration::from_secs(
                self.check_interval_secs
                    .unwrap_or(r::DEFAULT_CHECK_INTERVAL_SECS)
                    .max(1),
            ),
        }
    }
}

/// `[packages]`: where `npx:` and `uvx:` tools are installed from.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagesSection {
    /// npm registry URL (npm's own configuration when absent).
    pub npm_registry: Option<String>,
    /// PyPI index URL, e.g. `https://pypi.org/simple` (pip's own configuration when absent).
    pub pypi_index: Option<String>,
}

/// `[store]`: where records live.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `sqlite://PATH` or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`; default: SQLite in the
    /// data directory.
    pub url: Option<String>,
}

/// `[proxy]`: how `/mcp/{slug}` forwards. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    pub connect_timeout_ms: Option<u64>,
    pub header_timeout_ms: Option<u64>,
    pub max_body_bytes: Option<u64>,
    pub allowed_origins: Option<Vec<String>>,
    pub session_idle_secs: Option<u64>,
    pub max_sessions: Option<u64>,
    /// 0 (the default) means streams are never closed for being idle.
    pub stream_idle_timeout_secs: Option<u64>,
    pub upstream_idle_timeout_secs: Option<u64>,
    /// Share of proxied requests logged, 0 to 1 (default 1: each one, once).
    pub access_log_sample: Option<f64>,
}

impl ProxySection {
    fn resolve(self) -> ProxyConfig {
        let d = ProxyConfig::default();
        ProxyConfig {
            connect_timeout: self
                .connect_timeout_ms
                .map_or(d.connect_timeout, Duration::from_millis),
            header_timeout: self
                .header_timeout_ms
                .map_or(d.header_timeout, Duration::from_millis),
            max_body_bytes: self.max_body_bytes.unwrap_or(d.max_body_bytes),
            allowed_origins: self.allowed_origins.unwrap_or(d.allowed_origins),
            session_idle: self
                .session_idle_secs
                .map_or(d.session_idle, Duration::from_secs),
            max_sessions: self.max_sessions.unwrap_or(d.max_sessions),
            stream_idle_timeout: match self.stream_idle_timeout_secs {
                None | Some(0) => d.stream_idle_timeout,
                Some(s) => Some(Duration::from_secs(s)),
            },
            upstream_idle_timeout: self
                .upstream_idle_timeout_secs
                .map_or(d.upstream_idle_timeout, Duration::from_secs),
            access_log_sample: self
                .access_log_sample
                .filter(|r| r.is_finite())
                .map_or(d.access_log_sample, |r| r.clamp(0.0, 1.0)),
        }
    }
}

/// Limits at the edge, on every connection to Switchboard's listener.
#[derive(Debug, Clone)]
pub struct EdgeLimits {
    /// A client must send its whole request head within this time (slowloris).
    pub header_read_timeout: Duration,
    /// More request headers than this get 431.
    pub max_headers: usize,
    /// A request head larger than this gets 431 (at least 8 KiB).
    pub max_header_bytes: usize,
    /// Connections beyond this wait in the kernel's accept queue.
    pub max_connections: usize,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        EdgeLimits {
            header_read_timeout: Duration::from_secs(10),
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub api_token_file: Option<PathBuf>,
    pub header_read_timeout_ms: Option<u64>,
    pub max_headers: Option<usize>,
    pub max_header_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    /// Async worker threads; default: one per CPU.
    pub worker_threads: Option<usize>,
    /// What happens to running deployments when Switchboard exits: `stop` (default) or `keep`.
    pub on_exit: Option<ExitPolicy>,
    /// Serve Prometheus metrics at /metrics and count requests (default true).
    pub metrics: Option<bool>,
    /// This node's id, when several Switchboards share one database; default: one generated
    /// once and kept in the data directory.
    pub node_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortsSection {
    pub range: Option<PortRange>,
}

/// Values given on the command line or in the environment; each wins over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub port_range: Option<PortRange>,
    pub api_token: Option<String>,
    pub api_token_file: Option<PathBuf>,
    pub database_url: Option<String>,
    pub worker_threads: Option<usize>,
    pub on_exit: Option<ExitPolicy>,
    /// The secret key's base64 text, from the environment only (a flag would show in `ps`).
    pub secret_key: Option<String>,
}

/// Everything `serve` needs, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Never logged as is (it may hold a password): see [`crate::store::redact_url`].
    pub database_url: String,
    pub port_range: PortRange,
    /// Never logged; see [`crate::api::ApiToken`].
    pub api_token: Option<String>,
    pub tools: Vec<ToolSpec>,
    pub proxy: ProxyConfig,
    pub edge: EdgeLimits,
    /// The executable that implements the launch shim; `None` means this one.
    pub launcher: Option<PathBuf>,
    /// `None`: generated once per data directory.
    pub node_id: Option<String>,
    /// Threads of the async runtime that serves the API and the proxy. Switchboard shares its
    /// host with the servers it runs, so an operator may want to leave them cores; one per CPU
    /// by default, which measured best on the 2-core benchmark machine (one thread: 10-25%
    /// fewer proxied requests per second; ARCHITECTURE.md "Performance notes").
    pub worker_threads: usize,
    /// Stop deployments at exit, or keep them running for the next start to adopt.
    pub exit_policy: ExitPolicy,
    /// Count requests, checks and restarts and serve them at `GET /metrics`.
    pub metrics: bool,
    /// Registry overrides for `npx:` / `uvx:` tools.
    pub registries: crate::packages::Registries,
    /// How long ended deployments' logs are kept.
    pub log_retention: LogRetention,
    /// Whether `/mcp` requires a client key.
    pub mcp_auth: McpAuth,
    /// Where the key for `secret_env` values at rest comes from.
    pub secret_key: KeySource,
    pub docker: DockerConfig,
    /// `[auth.oauth]`: the authorization server whose access tokens `/mcp` accepts.
    pub oauth: Option<crate::auth::oauth::OAuthConfig>,
}

/// One per CPU this process may use (tokio's own default).
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("switchboard");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h).join(".local/share/switchboard");
    }
    PathBuf::from("switchboard-data")
}

/// `p` against `base`, which is canonical (no symlinks, no `..`), so the leading `.` and `..`
/// of `p` can be applied by name: logs and records then show `/srv/data`, not
/// `/srv/examples/../data`. Later components are kept as written (past a symlink, `..` is the
/// kernel's business).
fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let mut out = base.to_path_buf();
    let mut rest = p.components().peekable();
    while let Some(c) = rest.peek() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            _ => break,
        }
        rest.next();
    }
    out.extend(rest);
    out
}

/// The directory relative paths in the file at `path` resolve against: its own, absolute (so
/// resolved paths stay right whatever directory a server runs in) and canonical (so `resolve`
/// may apply a leading `..` by name).
fn base_dir_of(path: &Path) -> PathBuf {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Makes a tool's relative paths absolute against `base`, a canonical directory: its `command`
/// when that contains a `/` (a bare name is looked up in `PATH`; `npx:@scope/name` names a
/// package), and its `working_dir`. The server never sees a path that would depend on its own
/// working directory.
pub fn resolve_tool_paths(t: &mut ToolSpec, base: &Path) {
    // A container's command and working directory are paths inside its image.
    if t.runtime == crate::runtime::RuntimeKind::Docker {
        return;
    }
    if t.command.contains('/') && crate::packages::Package::parse(&t.command).is_none() {
        t.command = resolve(base, Path::new(&t.command))
            .to_string_lossy()
            .into_owned();
    }
    t.working_dir = t.working_dir.take().map(|w| resolve(base, &w));
}

/// Tool definitions in a file, as `switchboard tool add/update/apply --file` read them: the
/// config file's `[[tools]]` form (a whole config file works; its other sections are checked
/// and left alone), or one tool's table. TOML, or JSON when the name ends in `.json`. Relative
/// paths resolve against the file's directory, as in a config file.
pub fn read_tools_file(path: &Path) -> Result<Vec<ToolSpec>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let parse_error = |message: String| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let json = path.extension().is_some_and(|e| e == "json");
    let many = if json {
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| parse_error(e.to_string()))?
            .get("tools")
            .is_some()
    } else {
        toml::from_str::<toml::Table>(&text)
            .map_err(|e| parse_error(e.to_string()))?
            .contains_key("tools")
    };
    let mut tools = match (many, json) {
        (true, true) => serde_json::from_str::<FileConfig>(&text)
            .map(|f| f.tools)
            .map_err(|e| parse_error(e.to_string()))?,
        (true, false) => toml::from_str::<FileConfig>(&text)
            .map(|f| f.tools)
            .map_err(|e| parse_error(e.to_string()))?,
        (false, true) => vec![serde_json::from_str(&text).map_err(|e| parse_error(e.to_string()))?],
        (false, false) => vec![toml::from_str(&text).map_err(|e| parse_error(e.to_string()))?],
    };
    if tools.is_empty() {
        return Err(parse_error("it defines no tools".to_owned()));
    }
    let base = base_dir_of(path);
    for t in &mut tools {
        resolve_tool_paths(t, &base);
    }
    Ok(tools)
}

fn read_token_file(path: &Path) -> Result<String, ConfigError> {
    let raw = std::fs::read_to_string(path).map_err(|error| ConfigError::TokenFile {
        path: path.to_path_buf(),
        error,
    })?;
    let t = raw.trim().to_owned();
    if t.is_empty() {
        return Err(ConfigError::EmptyToken(path.to_path_buf()));
    }
    Ok(t)
}

impl Config {
    pub fn load(o: Overrides) -> Result<Config, ConfigError> {
        let (file, base) = match &o.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.clone(),
                    error,
                })?;
                let file: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                (file, base_dir_of(path))
            }
            None => (FileConfig::default(), PathBuf::from(".")),
        };
        let listen = o.listen.or(file.server.listen).unwrap_or(DEFAULT_LISTEN);
        let data_dir = match (o.data_dir, file.server.data_dir.clone()) {
            (Some(d), _) => d,
            (None, Some(d)) => resolve(&base, &d),
            (None, None) => default_data_dir(),
        };
        let api_token = match (
            o.api_token.filter(|t| !t.trim().is_empty()),
            o.api_token_file,
        ) {
            (Some(t), _) => Some(t.trim().to_owned()),
            (None, Some(f)) => Some(read_token_file(&f)?),
            (None, None) => match &file.server.api_token_file {
                Some(f) => Some(read_token_file(&resolve(&base, f))?),
                None => None,
            },
        };
        if !listen.ip().is_loopback() && api_token.is_none() {
            return Err(ConfigError::TokenRequired(listen));
        }
        // Naming an authorization server asks for authentication, on loopback too.
        let mcp_auth =
            file.auth
                .mcp
                .unwrap_or(if listen.ip().is_loopback() && file.auth.oauth.is_none() {
                    McpAuth::Off
                } else {
                    McpAuth::Required
                });
        if let Some(oauth) = &file.auth.oauth {
            oauth.validate()?;
            if mcp_auth == McpAuth::Off {
                return Err(ConfigError::OAuthWithAuthOff);
            }
        }
        if mcp_auth == McpAuth::Off
            && !listen.ip().is_loopback()
            && !file.auth.allow_unauthenticated_mcp
        {
            return Err(ConfigError::McpAuthRequired(listen));
        }
        let tools = file
            .tools
            .into_iter()
            .map(|mut t| {
                resolve_tool_paths(&mut t, &base);
                t
            })
            .collect();
        let d = EdgeLimits::default();
        let s = &file.server;
        let edge = EdgeLimits {
            header_read_timeout: s
                .header_read_timeout_ms
                .map_or(d.header_read_timeout, Duration::from_millis),
            max_headers: s.max_headers.unwrap_or(d.max_headers),
            max_header_bytes: s.max_header_bytes.unwrap_or(d.max_header_bytes).max(8192),
            max_connections: s.max_connections.unwrap_or(d.max_connections).max(1),
        };
        let database_url = o
            .database_url
            .filter(|u| !u.trim().is_empty())
            .or(file.store.url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("switchboard.db").display()));
        let node_id = file.server.node_id.clone();
        if let Some(n) = &node_id
            && (n.is_empty()
                || n.len() > 64
                || !n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(ConfigError::NodeId(n.clone()));
        }
        let secret_key = match (
            o.secret_key.filter(|k| !k.trim().is_empty()),
            &file.secrets.key_file,
        ) {
            (Some(k), _) => KeySource::Env(SecretKey::from_base64(&k, KEY_ENV)?),
            (None, Some(f)) => KeySource::File(resolve(&base, f)),
            (None, None) => KeySource::DataDir,
        };
        let worker_threads = o
            .worker_threads
            .or(file.server.worker_threads)
            .filter(|n| *n > 0)
            .unwrap_or_else(default_worker_threads);
        Ok(Config {
            listen,
            node_id,
            worker_threads,
            exit_policy: o.on_exit.or(file.server.on_exit).unwrap_or_default(),
            metrics: file.server.metrics.unwrap_or(true),
            log_retention: file.logs.resolve(),
            docker: DockerConfig {
                enabled: file.docker.enabled.unwrap_or(true),
                host: file.docker.host.filter(|h| !h.trim().is_empty()),
                images: crate::packages::BaseImages {
                    node: image_setting("docker.node_image", file.docker.node_image)?
                        .unwrap_or_else(|| crate::packages::DEFAULT_NODE_IMAGE.to_owned()),
                    python: image_setting("docker.python_image", file.docker.python_image)?
                        .unwrap_or_else(|| crate::packages::DEFAULT_PYTHON_IMAGE.to_owned()),
                },
            },
            registries: crate::packages::Registries {
                npm: file.packages.npm_registry,
                pypi_index: file.packages.pypi_index,
            },
            database_url,
            data_dir,
            port_range: o.port_range.or(file.ports.range).unwrap_or_default(),
            api_token,
            tools,
            proxy: file.proxy.resolve(),
            edge,
            launcher: None,
            mcp_auth,
            secret_key,
            oauth: file.auth.oauth,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("sb.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    /// The config a file holding `text` in `dir` loads to.
    fn load_text(dir: &Path, text: &str) -> Config {
        Config::load(Overrides {
            config: Some(write(dir, text)),
            ..Default::default()
        })
        .unwrap()
    }

    fn load_text_err(dir: &Path, text: &str) -> String {
        Config::load(Overrides {
            config: Some(write(dir, text)),
            ..Default::default()
        })
        .unwrap_err()
        .to_string()
    }

    /// README's first command runs this file: it must stay valid.
    #[test]
    fn the_example_config_loads_with_both_demo_tools() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/switchboard.toml");
        let c = Config::load(Overrides {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        let tools: Vec<ToolSpec> = c.tools.into_iter().map(|t| t.validate().unwrap()).collect();
        let slugs: Vec<&str> = tools.iter().map(|t| t.slug.as_str()).collect();
        assert_eq!(slugs, ["demo", "demo-stdio"]);
        assert_eq!(tools[1].transport, crate::registry::Transport::Stdio);
        assert!(tools[1].command.ends_with("target/debug/mcp-test-server"));
    }

    #[test]
    fn file_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            r#"
            [server]
            data_dir = "data"
            [ports]
            range = "9000-9010"
            [[tools]]
            slug = "demo"
            command = "bin/server"
            args = ["--port", "{port}"]
            "#,
        );
        let c = Config::load(Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.port_range.to_string(), "9000-9010");
        assert_eq!(
            c.tools[0].command,
            dir.path().join("bin/server").to_string_lossy()
        );
        assert_eq!(c.listen, DEFAULT_LISTEN);
    }

    #[test]
    fn the_docker_section_configures_the_engine_and_leaves_container_paths_alone() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| load_text(dir.path(), text);
        assert_eq!(load("").docker, DockerConfig::default());
        let c = load(
            r#"
            [docker]
            enabled = false
            host = "unix:///run/other.sock"
            [[tools]]
            slug = "boxed"
            runtime = "docker"
            image = "srv:1"
            command = "bin/server"
            "#,
        );
        assert!(!c.docker.enabled);
        assert_eq!(c.docker.host.as_deref(), Some("unix:///run/other.sock"));
        assert_eq!(c.docker.images.node, crate::packages::DEFAULT_NODE_IMAGE);
        assert_eq!(
            c.docker.images.python,
            crate::packages::DEFAULT_PYTHON_IMAGE
        );

        // A path inside the image, not the config file's directory.
        assert_eq!(c.tools[0].command, "bin/server");
        let c = load(
            r#"
            [docker]
            node_image = "registry.local/node:22"
            python_image = "registry.local/python:3.12"
            "#,
        );
        assert_eq!(c.docker.images.node, "registry.local/node:22");
        assert_eq!(c.docker.images.python, "registry.local/python:3.12");
        let bad = load_text_err(dir.path(), "[docker]\nnode_image = \" \"");
        assert!(bad.contains("docker.node_image"), "{bad}");
    }

    #[test]
    fn a_leading_parent_directory_is_resolved_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("examples");
        std::fs::create_dir(&sub).unwrap();
        let p = write(
            &sub,
            r#"
            [server]
            data_dir = "../.data"
            "#,
        );
        let c = Config::load(Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(c.data_dir, root.join(".data"));
    }

    #[test]
    fn logs_retention_comes_from_the_file_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| load_text(dir.path(), text).log_retention;
        assert_eq!(load(""), LogRetention::default());
        assert_eq!(
            LogRetention::default().max_age,
            Duration::from_secs(7 * 86_400)
        );
        let r = load("[logs]\nretention_days = 2\nmax_total_mib = 5\ncheck_interval_secs = 0\n");
        assert_eq!(r.max_age, Duration::from_secs(2 * 86_400));
        assert_eq!(r.max_total_bytes, 5 * 1024 * 1024);
        assert_eq!(r.interval, Duration::from_secs(1), "0 would spin");
    }

    #[test]
    fn tool_files_take_one_tool_or_the_tools_form_with_paths_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let at = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            read_tools_file(&p)
        };
        let one = at(
            "one.toml",
            "slug = \"a\"\ncommand = \"./bin/a\"\nworking_dir = \"w\"\n",
        )
        .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].command, base.join("bin/a").to_string_lossy());
        assert_eq!(
            one[0].working_dir.as_deref(),
            Some(base.join("w").as_path())
        );
        let many = at(
            "many.toml",
            "[server]\nlisten = \"127.0.0.1:7300\"\n[[tools]]\nslug = \"a\"\ncommand = \"npx:@s/a\"\n\
             [[tools]]\nslug = \"b\"\ncommand = \"b\"\n",
        )
        .unwrap();
        let names: Vec<(&str, &str)> = many
            .iter()
            .map(|t| (t.slug.as_str(), t.command.as_str()))
            .collect();
        assert_eq!(
            names,
            [("a", "npx:@s/a"), ("b", "b")],
            "packages and bare names stay"
        );
        let json = at("t.json", r#"{"tools": [{"slug": "j", "command": "../j"}]}"#).unwrap();
        assert_eq!(
            json[0].command,
            base.parent().unwrap().join("j").to_string_lossy()
        );
        let e = at("none.toml", "tools = []\n").unwrap_err();
        assert!(e.to_string().contains("defines no tools"), "{e}");
        let e = at("typo.toml", "slug = \"a\"\ncommand = \"a\"\nreplica = 2\n").unwrap_err();
        assert!(e.to_string().contains("replica"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[server]\nlisten_on = \"x\"\n");
        let e = Config::load(Overrides {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("listen_on"), "{e}");
    }

    #[test]
    fn public_bind_needs_a_token() {
        let e = Config::load(Overrides {
            listen: Some("0.0.0.0:7300".parse().unwrap()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, ConfigError::TokenRequired(_)));
        let ok = Config::load(Overrides {
            listen: Some("0.0.0.0:7300".parse().unwrap()),
            api_token: Some("s3cret".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.api_token.as_deref(), Some("s3cret"));
        assert!(!format!("{:?}", ok.listen).contains("s3cret"));
    }

    /// Loads `text` as the config file with the API token set, listening on `listen`.
    fn load_listening(dir: &Path, listen: &str, text: &str) -> Result<Config, ConfigError> {
        Config::load(Overrides {
            config: Some(write(dir, text)),
            listen: Some(listen.parse().unwrap()),
            api_token: Some("t".into()),
            ..Default::default()
        })
    }

    #[test]
    fn mcp_auth_is_required_off_loopback_and_off_needs_an_explicit_opt_in() {
        let dir = tempfile::tempdir().unwrap();
        let load = |listen: &str, text: &str| load_listening(dir.path(), listen, text);
        assert_eq!(load("127.0.0.1:7300", "").unwrap().mcp_auth, McpAuth::Off);
        assert_eq!(
            load("0.0.0.0:7300", "").unwrap().mcp_auth,
            McpAuth::Required
        );
        assert_eq!(
            load("127.0.0.1:7300", "[auth]\nmcp = \"required\"\n")
                .unwrap()
                .mcp_auth,
            McpAuth::Required
        );
        let e = load("0.0.0.0:7300", "[auth]\nmcp = \"off\"\n").unwrap_err();
        assert!(matches!(e, ConfigError::McpAuthRequired(_)), "{e}");
        assert!(e.to_string().contains("allow_unauthenticated_mcp"), "{e}");
        let opted = load(
            "0.0.0.0:7300",
            "[auth]\nmcp = \"off\"\nallow_unauthenticated_mcp = true\n",
        )
        .unwrap();
        assert_eq!(opted.mcp_auth, McpAuth::Off);
        assert!(load("0.0.0.0:7300", "[auth]\nmcp = \"maybe\"\n").is_err());
    }

    #[test]
    fn the_secret_key_comes_from_the_environment_then_the_file_then_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[secrets]\nkey_file = \"keys/sb.key\"\n");
        let load = |config: Option<PathBuf>, secret_key: Option<&str>| {
            Config::load(Overrides {
                config,
                secret_key: secret_key.map(str::to_owned),
                ..Overrides::default()
            })
        };
        let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
        let from_env = load(Some(p.clone()), Some(key)).unwrap();
        assert!(matches!(from_env.secret_key, KeySource::Env(k) if k.origin() == KEY_ENV));
        let base = std::fs::canonicalize(dir.path()).unwrap();
        assert!(
            matches!(load(Some(p), None).unwrap().secret_key, KeySource::File(f) if f == base.join("keys/sb.key"))
        );
        assert!(matches!(
            load(None, None).unwrap().secret_key,
            KeySource::DataDir
        ));
        let e = load(None, Some("hunter2")).unwrap_err().to_string();
        assert!(e.contains(KEY_ENV) && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn an_oauth_issuer_turns_mcp_auth_on_and_must_be_https_or_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let load = |listen: &str, text: &str| load_listening(dir.path(), listen, text);
        let c = load(
            "127.0.0.1:7300",
            "[auth.oauth]\nissuer = \"https://auth.example.com\"\naudience = \"a\"\n",
        )
        .unwrap();
        assert_eq!(c.mcp_auth, McpAuth::Required);
        assert_eq!(c.oauth.unwrap().audience.as_deref(), Some("a"));
        let e = load(
            "127.0.0.1:7300",
            "[auth]\nmcp = \"off\"\n[auth.oauth]\nissuer = \"https://a.example\"\n",
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::OAuthWithAuthOff), "{e}");
        let e = load(
            "127.0.0.1:7300",
            "[auth.oauth]\nissuer = \"http://auth.example.com\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("must be https"), "{e}");
        assert!(
            load(
                "127.0.0.1:7300",
                "[auth.oauth]\nissuer = \"https://a\"\nx = 1\n"
            )
            .is_err()
        );
    }

    #[test]
    fn worker_threads_come_from_flag_then_file_then_the_cpu_count() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "[server]\nworker_threads = 3\n");
        let with = |flag: Option<usize>| {
            Config::load(Overrides {
                config: Some(p.clone()),
                worker_threads: flag,
                ..Overrides::default()
            })
            .unwrap()
            .worker_threads
        };
        assert_eq!(with(None), 3);
        assert_eq!(with(Some(5)), 5);
        let p0 = write(dir.path(), "[server]\nworker_threads = 0\n");
        let c = Config::load(Overrides {
            config: Some(p0),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(c.worker_threads, default_worker_threads());
        assert!(c.worker_threads >= 1);
    }
}
