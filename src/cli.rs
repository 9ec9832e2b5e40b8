//! The command line. `serve` runs Switchboard; every other command is a thin client of the REST
//! API (`--url`, `SWITCHBOARD_URL`, `SWITCHBOARD_TOKEN`), printing tables for people and the
//! API's JSON with `--json`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use comfy_table::{Table, presets::NOTHING};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::{
    config::Overrides,
    deployment::Deployment,
    ports::PortRange,
    registry::{Tool, ToolSpec},
    runtime::{RuntimeKind, container::DEFAULT_USER},
};

#[derive(Parser, Debug)]
#[command(
    name = "switchboard",
    version,
    about = "Run and route MCP servers",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Switchboard API address (client commands).
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_URL",
        default_value = "http://127.0.0.1:7300"
    )]
    pub url: String,
    /// API token (client commands). `serve` reads SWITCHBOARD_TOKEN too, but refuses the
    /// flag: a server runs long, and a flag would show its token in `ps`.
    #[arg(long, global = true, env = TOKEN_ENV, hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the Switchboard server.
    Serve(ServeArgs),
    /// Manage the tool registry.
    #[command(subcommand)]
    Tool(ToolCommand),
    /// Deploy a tool: start deployments until it has its `replicas` live (it says so when it
    /// already has them; extra deployments are left alone, `scale` stops them).
    #[command(after_help = WAIT_EXIT_STATUS)]
    Deploy {
        slug: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Set a tool's replica count (0-64) and start or stop deployments to match (gracefully:
    /// those not RUNNING first, then the newest).
    #[command(after_help = WAIT_EXIT_STATUS)]
    Scale {
        slug: String,
        replicas: u32,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// List deployments (live ones unless --all or --status).
    Ps {
        /// Only this tool's deployments.
        #[arg(long)]
        tool: Option<String>,
        /// Only these statuses, comma-separated (e.g. RUNNING,FAILED).
        #[arg(long)]
        status: Option<String>,
        /// Include stopped and failed deployments.
        #[arg(long, short)]
        all: bool,
    },
    /// Stop a deployment (an id or a unique prefix of one).
    Stop { id: String },
    /// Check a deployment's health now and print the result.
    Health { id: String },
    /// A stdio deployment's open MCP sessions, each with its own server process.
    Sessions { id: String },
    /// Print a deployment's output (stdout and stderr).
    Logs {
        id: String,
        /// Keep printing new output until the deployment ends (Ctrl-C to stop).
        #[arg(long, short)]
        follow: bool,
        /// Lines from the end to start with.
        #[arg(long, default_value_t = 100)]
        tail: usize,
    },
    /// A live view of the deployments: status, health, CPU, memory, request rate (q quits).
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Follow status and health transitions as they happen (Ctrl-C to stop).
    Events {
        /// Only this tool's events.
        #[arg(long)]
        tool: Option<String>,
    },
    /// Manage client keys, which MCP clients send on /mcp (`Authorization: Bearer <key>`)
    /// when `[auth] mcp = "required"`.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Make a key and print it (on stdout, alone; only this once: Switchboard keeps a digest).
    Create {
        /// Who or what holds the key.
        name: String,
        /// What it may call: a tool slug, `slug/mcp-tool`, or `*` for everything (repeat).
        #[arg(long = "tool", required = true)]
        tools: Vec<String>,
        /// Seconds until the key stops working (default: never).
        #[arg(long)]
        expires_in: Option<u64>,
        /// Requests per minute, in bursts of up to this many (default: no limit).
        #[arg(long)]
        rate_limit_per_min: Option<u32>,
        /// Requests in flight at once, open streams included (default: no limit).
        #[arg(long)]
        max_concurrent: Option<u32>,
    },
    /// List keys (never the keys themselves), revoked ones included.
    List,
    /// Show one key (an id or a unique prefix of one).
    Show { id: String },
    /// Revoke a key: the next request with it is refused and what it has open ends.
    Revoke { id: String },
}

/// What `deploy` and `scale` exit with; scripts can rely on it.
const WAIT_EXIT_STATUS: &str = "\
Exit status:
  0  without --wait: the request was carried out (deployments STARTING, or nothing to do);
     with --wait: every deployment of the tool is RUNNING
  1  a deployment FAILED, or (with --wait) its start failed and a restart is scheduled; the
     reason is printed. Also any failed request (Switchboard unreachable, unknown tool, bad
     input)
  2  wrong usage
  3  --wait gave up after --timeout with a deployment still STARTING";

#[derive(Args, Debug, Clone, Copy)]
pub struct WaitArgs {
    /// Wait until every deployment of the tool is RUNNING, has FAILED, or has failed a start
    /// (a restart is then scheduled); exit 0 only if all are RUNNING.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: stop waiting after this long and exit 3 if a deployment is still STARTING.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, requires = "wait",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,
}

/// Why `deploy` or `scale` did not end with every deployment as asked: its exit status
/// (see [`WAIT_EXIT_STATUS`]) and the reasons.
#[derive(Debug, thiserror::Error)]
pub enum NotRunning {
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    TimedOut(String),
}

impl NotRunning {
    pub fn exit_code(&self) -> u8 {
        match self {
            NotRunning::Failed(_) => 1,
            NotRunning::TimedOut(_) => 3,
        }
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, short, env = "SWITCHBOARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address for the API [default: 127.0.0.1:7300].
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the database and logs live [default: $XDG_DATA_HOME/switchboard].
    #[arg(long, env = "SWITCHBOARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Ports for deployments, LOW-HIGH [default: 8100-8200].
    #[arg(long, env = "SWITCHBOARD_PORT_RANGE")]
    pub port_range: Option<PortRange>,
    /// File holding the API token (or set SWITCHBOARD_TOKEN).
    #[arg(long, env = "SWITCHBOARD_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Database: sqlite://PATH or postgres://... [default: SQLite in the data directory].
    #[arg(long, env = "SWITCHBOARD_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Async worker threads [default: one per CPU].
    #[arg(long, env = "SWITCHBOARD_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// What happens to running deployments when Switchboard exits [default: stop].
    #[arg(long, env = "SWITCHBOARD_ON_EXIT", value_enum)]
    pub on_exit: Option<OnExit>,
    /// Switchboard's own log lines: `text` for people, `json` (one object per line) for
    /// log pipelines. The level comes from RUST_LOG [default: info].
    #[arg(
        long,
        env = "SWITCHBOARD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// The variable that holds the API token, for the server and the CLI alike.
pub const TOKEN_ENV: &str = "SWITCHBOARD_TOKEN";
/// What the server read before the two agreed on [`TOKEN_ENV`]; still accepted, with a warning.
const OLD_SERVER_TOKEN_ENV: &str = "SWITCHBOARD_API_TOKEN";

/// The server's token from the environment only (a flag would show it in `ps`):
/// SWITCHBOARD_TOKEN, else the old SWITCHBOARD_API_TOKEN with a warning to rename it.
fn server_token_from_env() -> Option<String> {
    let read = |name| {
        std::env::var(name)
            .ok()
            .filter(|t: &String| !t.trim().is_empty())
    };
    match (read(TOKEN_ENV), read(OLD_SERVER_TOKEN_ENV)) {
        (Some(t), None) => Some(t),
        (Some(t), Some(_)) => {
            tracing::warn!(
                "{OLD_SERVER_TOKEN_ENV} is ignored because {TOKEN_ENV} is set; unset {OLD_SERVER_TOKEN_ENV}"
            );
            Some(t)
        }
        (None, Some(t)) => {
            tracing::warn!(
                "{OLD_SERVER_TOKEN_ENV} is deprecated: rename it to {TOKEN_ENV}, which the CLI reads too"
            );
            Some(t)
        }
        (None, None) => None,
    }
}

/// `serve --token` would put the server's token on its command line for its whole life;
/// the token is taken from SWITCHBOARD_TOKEN or a file instead.
pub fn refuse_serve_token_flag(client: &ClientArgs) -> anyhow::Result<()> {
    if client.token.is_some() && client.token != std::env::var(TOKEN_ENV).ok() {
        bail!(
            "`serve` takes no --token (it would show in `ps`): set {TOKEN_ENV} in its \
             environment, or give --api-token-file"
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--on-exit` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum OnExit {
    /// Stop every deployment (SIGTERM, SIGKILL after its grace period).
    Stop,
    /// Leave them running for the next start to adopt (upgrades without downtime).
    Keep,
}

impl ServeArgs {
    pub fn overrides(self) -> Overrides {
        Overrides {
            config: self.config,
            listen: self.listen,
            data_dir: self.data_dir,
            port_range: self.port_range,
            api_token: server_token_from_env(),
            api_token_file: self.api_token_file,
            database_url: self.database_url,
            worker_threads: self.worker_threads.map(usize::from),
            secret_key: std::env::var(crate::secrets::KEY_ENV).ok(),
            on_exit: self.on_exit.map(|p| match p {
                OnExit::Stop => crate::manager::ExitPolicy::Stop,
                OnExit::Keep => crate::manager::ExitPolicy::Keep,
            }),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ToolCommand {
    /// Register a tool: `switchboard tool add SLUG -- COMMAND [ARGS...]`, or `--file FILE`
    /// (one tool, or the config file's `[[tools]]` form).
    Add(Box<ToolAddArgs>),
    /// Change a tool: the flags given (the rest stays), or `--file FILE` for a whole new
    /// definition. A new transport is refused while the tool has live deployments.
    Update(Box<ToolUpdateArgs>),
    /// Create or update every tool of a file in the config file's `[[tools]]` form, and
    /// report each as created, updated or unchanged.
    Apply {
        /// TOML (or JSON, by extension); a whole config file works too.
        #[arg(long, short)]
        file: PathBuf,
    },
    /// List registered tools.
    List,
    /// Show one tool.
    Show { slug: String },
    /// Delete a tool (refused while it has live deployments; its deployments' records stay).
    Rm { slug: String },
}

#[derive(Args, Debug)]
pub struct ToolAddArgs {
    /// The tool's slug (or in the file).
    pub slug: Option<String>,
    #[command(flatten)]
    pub fields: ToolFields,
}

#[derive(Args, Debug)]
pub struct ToolUpdateArgs {
    pub slug: String,
    #[command(flatten)]
    pub fields: ToolFields,
}

/// A tool's fields as flags. Relative paths (a command containing `/`, `--working-dir`)
/// resolve against this command's working directory, as a config file's against its own.
#[derive(Args, Debug)]
pub struct ToolFields {
    /// A tool definition: one tool's table, or the config file's `[[tools]]` form; TOML, or
    /// JSON by extension. Flags override its fields.
    #[arg(long)]
    pub file: Option<PathBuf>,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// Environment for the server, KEY=VALUE; repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Secret environment for the server (never shown by the API): KEY takes the value of
    /// KEY from this command's own environment (so it stays out of `ps`), KEY=VALUE gives it.
    #[arg(long = "secret-env", value_name = "KEY[=VALUE]")]
    pub secret_env: Vec<String>,
    #[arg(long)]
    pub working_dir: Option<PathBuf>,
    #[arg(long, value_parser = ["streamable-http", "stdio"])]
    pub transport: Option<String>,
    #[arg(long)]
    pub endpoint_path: Option<String>,
    /// Variable that receives the port [default: PORT].
    #[arg(long)]
    pub port_env: Option<String>,
    /// Set no port variable (pass the port with {port} in the args instead).
    #[arg(long, conflicts_with = "port_env")]
    pub no_port_env: bool,
    #[arg(long)]
    pub startup_timeout_ms: Option<u64>,
    #[arg(long)]
    pub stop_grace_period_ms: Option<u64>,
    /// Deployments `switchboard deploy` brings the tool to (0-64; a new tool gets 1).
    #[arg(long)]
    pub replicas: Option<u32>,
    /// Also deploy it (to its replicas) whenever Switchboard starts (`--autostart=false`
    /// turns that off).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub autostart: Option<bool>,
    /// Where its deployments run: host processes, or Docker containers (`--image`).
    #[arg(long, value_parser = ["process", "docker"])]
    pub runtime: Option<String>,
    /// The container image (`--runtime docker`); the command after `--`, if any, overrides
    /// the image's entrypoint. For an `npx:`/`uvx:` package, the image it is installed in and
    /// run by [default: the config's `[docker] node_image` / `python_image`].
    #[arg(long)]
    pub image: Option<String>,
    /// Whether the engine may pull a missing image [default: never].
    #[arg(long, value_parser = ["never", "missing"])]
    pub pull: Option<String>,
    /// The containers' network [default: bridge].
    #[arg(long, value_parser = ["bridge", "none", "host"])]
    pub network: Option<String>,
    /// The user the container runs as (`UID[:GID]` or a name in the image) [default:
    /// 65534:65534].
    #[arg(long)]
    pub user: Option<String>,
    /// Memory limit, swap included (`256MiB`; KiB, MiB, GiB or bytes).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPU limit, in CPUs (`0.5` is half of one CPU's time).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Limit on processes and threads at once.
    #[arg(long)]
    pub pids: Option<u32>,
    /// The command and its arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl ToolFields {
    /// Whether any field is given (besides the file).
    fn any_given(&self) -> bool {
        self.name.is_some()
            || self.description.is_some()
            || !self.env.is_empty()
            || !self.secret_env.is_empty()
            || self.working_dir.is_some()
            || self.transport.is_some()
            || self.endpoint_path.is_some()
            || self.port_env.is_some()
            || self.no_port_env
            || self.startup_timeout_ms.is_some()
            || self.stop_grace_period_ms.is_some()
            || self.replicas.is_some()
            || self.autostart.is_some()
            || self.runtime.is_some()
            || self.image.is_some()
            || self.pull.is_some()
            || self.network.is_some()
            || self.user.is_some()
            || self.memory.is_some()
            || self.cpus.is_some()
            || self.pids.is_some()
            || !self.command.is_empty()
    }

    /// Sets the fields the flags give on `spec`; whether any was given.
    fn set_on(self, spec: &mut ToolSpec) -> anyhow::Result<bool> {
        let given = self.any_given();
        if let Some((cmd, args)) = self.command.split_first() {
            spec.command.clone_from(cmd);
            spec.args = args.to_vec();
        }
        if let Some(v) = self.name {
            spec.name = v;
        }
        if let Some(v) = self.description {
            spec.description = v;
        }
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow!("--env '{kv}' must be KEY=VALUE"))?;
            spec.env.insert(k.to_owned(), v.to_owned());
        }
        for kv in &self.secret_env {
            let (k, v) = match kv.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (
                    kv.clone(),
                    std::env::var(kv).map_err(|_| {
                        anyhow!("--secret-env {kv}: {kv} is not set in this environment")
                    })?,
                ),
            };
            spec.secret_env.insert(k, v);
        }
        if let Some(v) = self.working_dir {
            spec.working_dir = Some(v);
        }
        if let Some(v) = self.transport {
            spec.transport = serde_json::from_value(json!(v))?;
        }
        if let Some(v) = self.endpoint_path {
            spec.endpoint_path = v;
        }
        if let Some(v) = self.port_env {
            spec.port_env = Some(v);
        }
        if self.no_port_env {
            spec.port_env = None;
        }
        if let Some(v) = self.startup_timeout_ms {
            spec.startup_timeout_ms = v;
        }
        if let Some(v) = self.stop_grace_period_ms {
            spec.stop_grace_period_ms = v;
        }
        if let Some(v) = self.replicas {
            spec.replicas = v;
        }
        if let Some(v) = self.autostart {
            spec.autostart = v;
        }
        if let Some(v) = self.runtime {
            spec.runtime = serde_json::from_value(json!(v))?;
        }
        if let Some(v) = self.image {
            spec.image = Some(v);
        }
        if let Some(v) = self.pull {
            spec.pull = serde_json::from_value(json!(v))?;
        }
        if let Some(v) = self.network {
            spec.network = serde_json::from_value(json!(v))?;
        }
        if let Some(v) = self.user {
            spec.user = Some(v);
        }
        if let Some(v) = self.memory {
            spec.limits.memory =
                Some(serde_json::from_value(json!(v)).map_err(|e| anyhow!("--memory '{v}': {e}"))?);
        }
        if let Some(v) = self.cpus {
            spec.limits.cpus = Some(v);
        }
        if let Some(v) = self.pids {
            spec.limits.pids = Some(v);
        }
        // Paths from the file are absolute by now; those from flags resolve here. Without a
        // working directory they stay relative, and the API refuses them saying why.
        if let Ok(cwd) = std::env::current_dir() {
            crate::config::resolve_tool_paths(spec, &cwd);
        }
        Ok(given)
    }
}

/// A client of the REST API.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            http,
            base: args.url.trim_end_matches('/').to_owned(),
            token: args.token.clone(),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!("cannot reach Switchboard at {}: is `switchboard serve` running? (set --url or SWITCHBOARD_URL)", self.base)
            } else {
                anyhow!("request to {url} failed: {e}")
            }
        })?;
        let status = resp.status();
        let text = resp.text().await.context("reading the response")?;
        if status.is_success() {
            if text.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text)
                .with_context(|| format!("the API sent invalid JSON: {text}"));
        }
        Err(api_error(status, &text))
    }

    /// A GET whose body is read as it arrives (event and log streams); fails on an error
    /// status.
    async fn get_stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach Switchboard at {}: {e}", self.base))?;
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(api_error(status, &resp.text().await.unwrap_or_default()));
        }
        Ok(resp)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<(T, Value)> {
        let v = self.call(reqwest::Method::GET, path, None).await?;
        Ok((serde_json::from_value(v.clone())?, v))
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(T, Value)> {
        let v = self.call(reqwest::Method::POST, path, body).await?;
        Ok((serde_json::from_value(v.clone())?, v))
    }
}

/// An error answer of the API, as a sentence: its message and code, and for a 401 where the
/// CLI takes the token from.
fn api_error(status: reqwest::StatusCode, text: &str) -> anyhow::Error {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let Some(err) = parsed.as_ref().and_then(|v| v.get("error")) else {
        return anyhow!("HTTP {status}: {text}");
    };
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("unknown error");
    let code = err.get("code").and_then(Value::as_str).unwrap_or("?");
    let hint = if status == reqwest::StatusCode::UNAUTHORIZED {
        format!("\ngive the API token with --token or in {TOKEN_ENV}")
    } else {
        String::new()
    };
    anyhow!("{message} ({code}, HTTP {}){hint}", status.as_u16())
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.iter().copied());
    t
}

fn short(id: &uuid::Uuid) -> String {
    id.simple().to_string()[..12].to_owned()
}

fn age(d: &Deployment) -> String {
    let end = d.stopped_at.unwrap_or_else(Utc::now);
    let secs = (end - d.deployed_at).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn print_deployments(ds: &[Deployment]) {
    let mut t = table(&[
        "ID", "TOOL", "STATUS", "HEALTH", "RESTARTS", "PORT", "RUNTIME", "INSTANCE", "AGE", "URL",
    ]);
    for d in ds {
        let status = match (d.status, d.next_restart_at) {
            (crate::deployment::DeploymentStatus::Starting, Some(at)) => {
                let wait = (at - Utc::now()).num_seconds().max(0);
                format!("STARTING (restart in {wait}s)")
            }
            (s, _) => s.to_string(),
        };
        let tool = match d.tool_deleted_at {
            Some(_) => format!("{} (deleted)", d.tool_slug),
            None => d.tool_slug.clone(),
        };
        t.add_row(vec![
            short(&d.id),
            tool,
            status,
            d.health_status.to_string(),
            d.restart_count.to_string(),
            d.port.map_or_else(|| "stdio".to_owned(), |p| p.to_string()),
            d.runtime.as_str().to_owned(),
            d.instance
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_default(),
            age(d),
            d.tool_url().to_owned(),
        ]);
    }
    println!("{t}");
}

/// Under `ps`'s table: why each FAILED deployment failed, and why each one waiting for a
/// restart ended (the first line; `ps --json` has all of it).
fn print_reasons(ds: &[Deployment]) {
    use crate::deployment::DeploymentStatus as S;
    let first = |t: &str| {
        let line = t.lines().next().unwrap_or_default();
        line.strip_suffix("; last log lines:")
            .unwrap_or(line)
            .to_owned()
    };
    let reasons: Vec<String> = ds
        .iter()
        .filter_map(|d| match (d.status, &d.error, &d.last_exit) {
            (S::Failed, Some(e), _) => Some(format!("{}  FAILED: {}", short(&d.id), first(e))),
            (S::Starting, _, Some(e)) if d.restart_count > 0 => {
                Some(format!("{}  restarting: {}", short(&d.id), first(e)))
            }
            _ => None,
        })
        .collect();
    if !reasons.is_empty() {
        println!("\n{}", reasons.join("\n"));
    }
}

fn print_deployment(d: &Deployment) {
    print_deployments(std::slice::from_ref(d));
    if let Some(e) = &d.last_exit {
        println!("\nlast exit: {e}");
    }
    if let Some(e) = &d.error {
        println!("\nerror: {e}");
    }
}

/// The definitions `tool add` registers: the file's, or one from the slug and the command.
fn tools_to_add(a: ToolAddArgs) -> anyhow::Result<Vec<ToolSpec>> {
    let ToolAddArgs { slug, mut fields } = a;
    let mut specs = match fields.file.take() {
        Some(path) => crate::config::read_tools_file(&path)?,
        None => {
            let slug = slug.clone().ok_or_else(|| {
                anyhow!("give the tool a slug: `switchboard tool add SLUG -- COMMAND [ARGS...]`")
            })?;
            // A container may run its image's own entrypoint: no command needed.
            let command = match fields.command.first() {
                Some(c) => c.clone(),
                None if fields.runtime.as_deref() == Some("docker") => String::new(),
                None => bail!(
                    "give the tool a command after `--`: `switchboard tool add SLUG -- COMMAND \
                     [ARGS...]` (or `--runtime docker --image IMAGE` to run a container image)"
                ),
            };
            vec![serde_json::from_value(
                json!({"slug": slug, "command": command}),
            )?]
        }
    };
    match specs.as_mut_slice() {
        [spec] => {
            if let Some(s) = slug {
                spec.slug = s;
            }
            fields.set_on(spec)?;
        }
        many => {
            if slug.is_some() || fields.any_given() {
                bail!(
                    "the file defines {} tools: a slug or flags would apply to one of them; \
                     put them in the file",
                    many.len()
                );
            }
        }
    }
    Ok(specs)
}

/// The definition `tool update SLUG` sends: the file's (the tool of that slug when the file
/// has several) or the stored one, with the flags set on it.
async fn tool_to_update(client: &Client, a: ToolUpdateArgs) -> anyhow::Result<ToolSpec> {
    let ToolUpdateArgs { slug, mut fields } = a;
    let from_file = fields.file.take();
    let mut spec = match &from_file {
        Some(path) => {
            let mut specs = crate::config::read_tools_file(path)?;
            match specs.iter().position(|s| s.slug == slug) {
                Some(i) => specs.swap_remove(i),
                None if specs.len() == 1 => specs.remove(0),
                None => bail!("{} defines no tool '{slug}'", path.display()),
            }
        }
        // Secrets come back as "********", which the API reads as "keep the stored value".
        None => {
            client
                .get::<Tool>(&format!("/api/v1/tools/{slug}"))
                .await?
                .0
                .spec
        }
    };
    if spec.slug.is_empty() {
        spec.slug.clone_from(&slug);
    }
    if spec.slug != slug {
        bail!(
            "the file defines tool '{}', not '{slug}' (a slug cannot be renamed)",
            spec.slug
        );
    }
    if !fields.set_on(&mut spec)? && from_file.is_none() {
        bail!("nothing to change: give flags, a command after `--`, or --file");
    }
    Ok(spec)
}

/// Prints what `POST /api/v1/apply` did; an error naming every tool that was not applied.
fn report_applied(resp: &crate::api::ApplyResponse, json: bool) -> anyhow::Result<()> {
    if !json {
        let mut t = table(&["SLUG", "RESULT"]);
        for r in &resp.results {
            let result = match (&r.outcome, &r.error) {
                (Some(o), _) => serde_json::to_value(o)?
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                (None, Some(e)) => format!("FAILED: {} ({})", e.message, e.code),
                (None, None) => "?".to_owned(),
            };
            t.add_row(vec![r.slug.clone(), result]);
        }
        println!("{t}");
    }
    let failed: Vec<String> = resp
        .results
        .iter()
        .filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("'{}': {} ({})", r.slug, e.message, e.code))
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} tools were not applied:\n  {}",
            failed.len(),
            resp.results.len(),
            failed.join("\n  ")
        );
    }
    Ok(())
}

fn print_tool(t: &Tool) {
    let s = &t.spec;
    let env_keys: Vec<&str> = s.env.keys().map(String::as_str).collect();
    let rows = [
        ("slug", s.slug.clone()),
        ("name", s.name.clone()),
        ("description", s.description.clone()),
        ("command", s.command.clone()),
        ("args", s.args.join(" ")),
        ("env", env_keys.join(", ")),
        (
            "secret_env",
            s.secret_env.keys().cloned().collect::<Vec<_>>().join(", "),
        ),
        (
            "working_dir",
            s.working_dir
                .as_ref()
                .map(|w| w.display().to_string())
                .unwrap_or_default(),
        ),
        ("transport", s.transport.as_str().to_owned()),
        ("endpoint_path", s.endpoint_path.clone()),
        (
            "port_env",
            s.port_env.clone().unwrap_or_else(|| "(none)".into()),
        ),
        ("startup_timeout", format!("{} ms", s.startup_timeout_ms)),
        (
            "stop_grace_period",
            format!("{} ms", s.stop_grace_period_ms),
        ),
        ("replicas", s.replicas.to_string()),
        ("autostart", s.autostart.to_string()),
        ("runtime", s.runtime.as_str().to_owned()),
    ];
    let mut rows = rows.to_vec();
    if s.runtime == RuntimeKind::Docker {
        let d = &s.docker;
        let off: Vec<&str> = [
            (d.init, "init"),
            (d.drop_capabilities, "drop_capabilities"),
            (d.no_new_privileges, "no_new_privileges"),
            (d.read_only_rootfs, "read_only_rootfs"),
        ]
        .into_iter()
        .filter_map(|(on, name)| (!on).then_some(name))
        .collect();
        rows.extend([
            ("image", s.image.clone().unwrap_or_default()),
            ("pull", s.pull.as_str().to_owned()),
            ("network", s.network.as_str().to_owned()),
            (
                "user",
                s.user
                    .clone()
                    .unwrap_or_else(|| format!("{DEFAULT_USER} (default)")),
            ),
            (
                "secure defaults",
                if off.is_empty() {
                    "all on".to_owned()
                } else {
                    format!("off: {}", off.join(", "))
                },
            ),
        ]);
    }
    let l = &s.limits;
    let limits: Vec<String> = [
        l.memory.map(|m| format!("memory {m}")),
        l.cpus.map(|c| format!("cpus {c}")),
        l.pids.map(|p| format!("pids {p}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    rows.push((
        "limits",
        if limits.is_empty() {
            "(none)".to_owned()
        } else {
            limits.join(", ")
        },
    ));
    rows.push(("id", t.id.to_string()));
    for (k, v) in rows {
        println!("{k:<18} {v}");
    }
}

/// Prints transitions from `GET /api/v1/events` until the server ends the stream.
async fn follow_events(client: &Client, tool: Option<&str>, json: bool) -> anyhow::Result<()> {
    let path = match tool {
        Some(t) => format!("/api/v1/events?tool={t}"),
        None => "/api/v1/events".to_owned(),
    };
    let resp = client.get_stream(&path).await?;
    if !json {
        eprintln!("Following events (Ctrl-C to stop)...");
    }
    for_each_sse(resp, |event, data| print_event(event, data, json)).await
}

/// Calls `f(event name, data)` for each event of an SSE response until it ends.
async fn for_each_sse(
    resp: reqwest::Response,
    mut f: impl FnMut(&str, &str),
) -> anyhow::Result<()> {
    use futures_util::StreamExt as _;
    let mut body = resp.bytes_stream();
    let mut parser = crate::mcp::sse::Parser::new();
    while let Some(chunk) = body.next().await {
        for event in parser.feed(&chunk.context("the event stream broke")?) {
            f(&event.event, &event.data);
        }
    }
    Ok(())
}

/// Prints a deployment's package-install progress (`npx:`/`uvx:` tools) while a deploy waits.
async fn print_install_progress(resp: reqwest::Response) {
    let _ = for_each_sse(resp, |_, data| {
        if let Ok(e) = serde_json::from_str::<crate::events::Event>(data)
            && e.kind == crate::events::EventKind::Install
            && let Some(r) = e.reason
        {
            eprintln!("  {r}");
        }
    })
    .await;
}

fn print_event(event: &str, data: &str, json: bool) {
    if event == "lagged" {
        eprintln!("warning: missed {data} events (reading too slowly)");
        return;
    }
    if json {
        println!("{data}");
        return;
    }
    let Ok(e) = serde_json::from_str::<crate::events::Event>(data) else {
        println!("{data}");
        return;
    };
    let kind = match e.kind {
        crate::events::EventKind::Status => "status",
        crate::events::EventKind::Health => "health",
        crate::events::EventKind::Install => "install",
    };
    let reason = e.reason.map(|r| format!("  ({r})")).unwrap_or_default();
    println!(
        "{}  {:<16} {}  {kind:<6} {} -> {}{reason}",
        e.at.format("%H:%M:%S%.3f"),
        e.tool,
        short(&e.deployment),
        e.from.as_deref().unwrap_or("-"),
        e.to
    );
}

/// `deploy` (`replicas: None`) and `scale`: one scale request, what it did, and the exit
/// status the deployments call for.
async fn converge(
    client: &Client,
    args: &ClientArgs,
    slug: &str,
    replicas: Option<u32>,
    wait: WaitArgs,
) -> anyhow::Result<()> {
    if wait.wait && !args.json {
        eprintln!(
            "Waiting for '{slug}' to answer MCP requests (at most {} s)...",
            wait.timeout
        );
    }
    // Subscribed before anything starts, so no install line is missed.
    let progress = match wait.wait && !args.json {
        true => client
            .get_stream(&format!("/api/v1/events?tool={slug}"))
            .await
            .ok()
            .map(|r| tokio::spawn(print_install_progress(r))),
        false => None,
    };
    let query = if wait.wait {
        format!("?wait=true&timeout_ms={}", wait.timeout * 1000)
    } else {
        String::new()
    };
    let body = match replicas {
        Some(n) => json!({ "replicas": n }),
        None => json!({}),
    };
    let posted = client
        .post(&format!("/api/v1/tools/{slug}/scale{query}"), Some(&body))
        .await;
    if let Some(p) = progress {
        p.abort();
    }
    let (scaled, raw): (crate::manager::Scaled, _) = posted?;
    if args.json {
        print_json(&raw);
    } else {
        println!("{}", scale_summary(&scaled, replicas.is_some()));
        if !scaled.deployments.is_empty() {
            print_deployments(&scaled.deployments);
        }
    }
    not_running(&scaled, wait).map_err(anyhow::Error::from)
}

/// One line on what a scale request did.
fn scale_summary(s: &crate::manager::Scaled, scaling: bool) -> String {
    let (tool, want, live) = (&s.tool, s.replicas, s.deployments.len());
    let (started, stopped) = (s.started.len(), s.stopped.len());
    match (started, stopped) {
        (0, 0) if live as u32 > want => format!(
            "'{tool}' has {live} deployments, more than its {want} replica(s); nothing started \
             (`switchboard scale {tool} {want}` stops the extra)"
        ),
        (0, 0) if scaling => format!("'{tool}' already has {want} replica(s); nothing to do"),
        (0, 0) => format!("'{tool}' already has its {want} replica(s); nothing started"),
        _ => format!("'{tool}': {want} replica(s); started {started}, stopped {stopped}"),
    }
}

/// Checks the deployments a scale request answered with: `Ok` when each is as asked (with
/// --wait, RUNNING), or why not, with the exit status that says so.
fn not_running(s: &crate::manager::Scaled, wait: WaitArgs) -> Result<(), NotRunning> {
    use crate::deployment::DeploymentStatus as S;
    let (mut failed, mut starting) = (Vec::new(), Vec::new());
    for d in &s.deployments {
        let reason = |t: &Option<String>| {
            t.as_deref()
                .map(str::trim_end)
                .unwrap_or("no reason recorded")
                .to_owned()
        };
        match d.status {
            S::Running => {}
            // The whole error: the reason, then the server's last log lines.
            S::Failed | S::Stopped => failed.push(format!(
                "deployment {} is {}: {}",
                short(&d.id),
                d.status,
                reason(&d.error)
            )),
            S::Starting if !wait.wait => {}
            S::Starting if d.restart_count > 0 => failed.push(format!(
                "deployment {} is not running: {}; Switchboard will start it again \
                 (restart {} is scheduled; `switchboard events --tool {}` follows it)",
                short(&d.id),
                reason(&d.last_exit),
                d.restart_count,
                d.tool_slug
            )),
            S::Starting => starting.push(format!(
                "deployment {} is still STARTING after {} s (--timeout)",
                short(&d.id),
                wait.timeout
            )),
        }
    }
    if !failed.is_empty() {
        return Err(NotRunning::Failed(failed.join("\n")));
    }
    if !starting.is_empty() {
        return Err(NotRunning::TimedOut(starting.join("\n")));
    }
    Ok(())
}

/// Resolves a full id or a unique prefix of one (as `ps` prints them).
async fn resolve_id(client: &Client, id: &str) -> anyhow::Result<String> {
    if uuid::Uuid::parse_str(id).is_ok() {
        return Ok(id.to_owned());
    }
    let needle = id.replace('-', "").to_ascii_lowercase();
    if needle.is_empty() {
        bail!("give a deployment id");
    }
    let (all, _): (Vec<Deployment>, _) = client.get("/api/v1/deployments").await?;
    let hits: Vec<&Deployment> = all
        .iter()
        .filter(|d| d.id.simple().to_string().starts_with(&needle))
        .collect();
    match hits.as_slice() {
        [d] => Ok(d.id.to_string()),
        [] => bail!("no deployment with id '{id}'"),
        _ => bail!(
            "'{id}' matches {} deployments; give more of the id",
            hits.len()
        ),
    }
}

/// Runs a client command.
pub async fn run_client(command: Command, args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    match command {
        Command::Serve(_) => unreachable!("serve is handled by main"),
        Command::Tool(ToolCommand::Add(a)) => {
            let mut failed = Vec::new();
            for spec in tools_to_add(*a)? {
                let body = serde_json::to_value(&spec)?;
                match client.post::<Tool>("/api/v1/tools", Some(&body)).await {
                    Ok((_, raw)) if args.json => print_json(&raw),
                    Ok((t, _)) => println!("Registered tool '{}'", t.spec.slug),
                    Err(e) => failed.push(format!("'{}': {e}", spec.slug)),
                }
            }
            match failed.as_slice() {
                [] => {}
                [one] => bail!("tool {one}"),
                many => bail!(
                    "{} tools were not added:\n  {}",
                    many.len(),
                    many.join("\n  ")
                ),
            }
        }
        Command::Tool(ToolCommand::Update(a)) => {
            let spec = tool_to_update(&client, *a).await?;
            let body = serde_json::to_value(&spec)?;
            let v = client
                .call(
                    reqwest::Method::PUT,
                    &format!("/api/v1/tools/{}", spec.slug),
                    Some(&body),
                )
                .await?;
            if args.json {
                print_json(&v);
            } else {
                println!("Updated tool '{}'", spec.slug);
            }
        }
        Command::Tool(ToolCommand::Apply { file }) => {
            let tools = crate::config::read_tools_file(&file)?;
            let (resp, raw): (crate::api::ApplyResponse, _) = client
                .post("/api/v1/apply", Some(&json!({ "tools": tools })))
                .await?;
            if args.json {
                print_json(&raw);
            }
            report_applied(&resp, args.json)?;
        }
        Command::Tool(ToolCommand::List) => {
            let (tools, raw): (Vec<Tool>, _) = client.get("/api/v1/tools").await?;
            if args.json {
                print_json(&raw);
            } else {
                let mut t = table(&[
                    "SLUG",
                    "NAME",
                    "TRANSPORT",
                    "REPLICAS",
                    "AUTOSTART",
                    "COMMAND",
                ]);
                for tool in &tools {
                    let s = &tool.spec;
                    let cmd = std::iter::once(s.command.as_str())
                        .chain(s.args.iter().map(String::as_str))
                        .collect::<Vec<_>>()
                        .join(" ");
                    t.add_row(vec![
                        s.slug.clone(),
                        s.name.clone(),
                        s.transport.as_str().to_owned(),
                        s.replicas.to_string(),
                        s.autostart.to_string(),
                        cmd,
                    ]);
                }
                println!("{t}");
            }
        }
        Command::Tool(ToolCommand::Show { slug }) => {
            let (t, raw): (Tool, _) = client.get(&format!("/api/v1/tools/{slug}")).await?;
            if args.json {
                print_json(&raw);
            } else {
                print_tool(&t);
            }
        }
        Command::Tool(ToolCommand::Rm { slug }) => {
            client
                .call(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/tools/{slug}"),
                    None,
                )
                .await?;
            if !args.json {
                println!("Deleted tool '{slug}'");
            }
        }
        Command::Deploy { slug, wait } => converge(&client, args, &slug, None, wait).await?,
        Command::Scale {
            slug,
            replicas,
            wait,
        } => converge(&client, args, &slug, Some(replicas), wait).await?,
        Command::Ps { tool, status, all } => {
            let mut q = Vec::new();
            if let Some(t) = tool {
                q.push(format!("tool={t}"));
            }
            match (status, all) {
                (Some(s), _) => q.push(format!("status={s}")),
                (None, false) => q.push("status=STARTING,RUNNING".into()),
                (None, true) => {}
            }
            let path = format!("/api/v1/deployments?{}", q.join("&"));
            let (ds, raw): (Vec<Deployment>, _) = client.get(&path).await?;
            if args.json {
                print_json(&raw);
            } else {
                print_deployments(&ds);
                print_reasons(&ds);
            }
        }
        Command::Health { id } => {
            let id = resolve_id(&client, &id).await?;
            let r = client
                .call(
                    reqwest::Method::POST,
                    &format!("/api/v1/deployments/{id}/health"),
                    None,
                )
                .await?;
            if args.json {
                print_json(&r);
            } else {
                let field = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
                println!("status:    {}", field("status"));
                println!(
                    "latency:   {:.1} ms",
                    r.get("latency_ms").and_then(Value::as_f64).unwrap_or(0.0)
                );
                println!("era:       {}", field("era"));
                println!("protocol:  {}", field("protocol_version"));
                println!(
                    "server:    {} {}",
                    field("server_name"),
                    field("server_version")
                );
                if let Some(e) = r.get("error").and_then(Value::as_str) {
                    println!("error:     {e}");
                }
            }
            if r.get("status").and_then(Value::as_str) != Some("HEALTHY") {
                bail!("deployment {id} is not healthy");
            }
        }
        Command::Sessions { id } => {
            let id = resolve_id(&client, &id).await?;
            let (v, raw): (crate::stdio::BridgeSessions, _) = client
                .get(&format!("/api/v1/deployments/{id}/sessions"))
                .await?;
            if args.json {
                print_json(&raw);
            } else {
                let mut t = table(&["SESSION", "PID", "CREATED", "IN FLIGHT", "STREAM"]);
                for s in &v.sessions {
                    t.add_row(vec![
                        s.id.clone(),
                        s.pid.to_string(),
                        s.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        s.in_flight.to_string(),
                        if s.stream_open { "open" } else { "-" }.to_owned(),
                    ]);
                }
                println!("{t}");
                println!(
                    "{} of at most {} sessions; era {}; {} server processes",
                    v.sessions.len(),
                    v.max_sessions,
                    v.era.as_deref().unwrap_or("unknown"),
                    v.processes.len()
                );
            }
        }
        Command::Events { tool } => follow_events(&client, tool.as_deref(), args.json).await?,
        Command::Top { interval } => {
            if !(0.1..=3600.0).contains(&interval) {
                bail!("--interval must be between 0.1 and 3600 seconds");
            }
            let fetch = async || -> anyhow::Result<(Vec<Deployment>, String)> {
                let (ds, _): (Vec<Deployment>, _) = client
                    .get("/api/v1/deployments?status=STARTING,RUNNING")
                    .await?;
                let mut req = client.http.get(format!("{}/metrics", client.base));
                if let Some(t) = &client.token {
                    req = req.bearer_auth(t);
                }
                // Without metrics (turned off), the table still shows statuses.
                let metrics = match req.send().await {
                    Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
                    _ => String::new(),
                };
                Ok((ds, metrics))
            };
            crate::top::run(fetch, &client.base, Duration::from_secs_f64(interval)).await?;
        }
        Command::Logs { id, follow, tail } => {
            use futures_util::StreamExt as _;
            use std::io::Write as _;
            let id = resolve_id(&client, &id).await?;
            let resp = client
                .get_stream(&format!(
                    "/api/v1/deployments/{id}/logs?tail={tail}&follow={follow}"
                ))
                .await?;
            let mut body = resp.bytes_stream();
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = body.next().await {
                out.write_all(&chunk.context("the log stream broke")?)?;
                out.flush()?;
            }
        }
        Command::Key(k) => run_key(&client, k, args.json).await?,
        Command::Stop { id } => {
            let id = resolve_id(&client, &id).await?;
            let (d, raw): (Deployment, _) = client
                .post(&format!("/api/v1/deployments/{id}/stop"), None)
                .await?;
            if args.json {
                print_json(&raw);
            } else {
                print_deployment(&d);
            }
        }
    }
    Ok(())
}

async fn run_key(client: &Client, command: KeyCommand, json: bool) -> anyhow::Result<()> {
    use crate::auth::keys::{ClientKey, CreatedKey};
    match command {
        KeyCommand::Create {
            name,
            tools,
            expires_in,
            rate_limit_per_min,
            max_concurrent,
        } => {
            let body = json!({
                "name": name,
                "tools": tools,
                "expires_in_s": expires_in,
                "rate_limit_per_min": rate_limit_per_min,
                "max_concurrent": max_concurrent,
            });
            let (k, raw): (CreatedKey, _) = client.post("/api/v1/keys", Some(&body)).await?;
            if json {
                print_json(&raw);
            } else {
                // The key alone on stdout (KEY=$(switchboard key create ...)); the rest for people.
                eprintln!(
                    "Created key {} ('{}'); it is shown only now:",
                    k.info.id, k.info.name
                );
                println!("{}", k.key);
            }
        }
        KeyCommand::List => {
            let (keys, raw): (Vec<ClientKey>, _) = client.get("/api/v1/keys").await?;
            if json {
                print_json(&raw);
            } else {
                let mut t = table(&["ID", "NAME", "TOOLS", "LIMITS", "EXPIRES", "STATE"]);
                for k in &keys {
                    t.add_row(key_row(k));
                }
                println!("{t}");
            }
        }
        KeyCommand::Show { id } => {
            let id = resolve_key_id(client, &id).await?;
            let (k, raw): (ClientKey, _) = client.get(&format!("/api/v1/keys/{id}")).await?;
            if json {
                print_json(&raw);
            } else {
                let mut t = table(&["ID", "NAME", "TOOLS", "LIMITS", "EXPIRES", "STATE"]);
                t.add_row(key_row(&k));
                println!("{t}");
            }
        }
        KeyCommand::Revoke { id } => {
            let id = resolve_key_id(client, &id).await?;
            client
                .call(reqwest::Method::DELETE, &format!("/api/v1/keys/{id}"), None)
                .await?;
            if !json {
                println!("Revoked key {id}");
            }
        }
    }
    Ok(())
}

fn key_row(k: &crate::auth::keys::ClientKey) -> Vec<String> {
    let limits = match (k.rate_limit_per_min, k.max_concurrent) {
        (None, None) => "-".to_owned(),
        (r, c) => [
            r.map(|r| format!("{r}/min")),
            c.map(|c| format!("{c} at once")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", "),
    };
    let now = Utc::now();
    let state = match (k.revoked_at, k.expires_at) {
        (Some(_), _) => "revoked",
        (None, Some(e)) if e <= now => "expired",
        _ => "active",
    };
    vec![
        k.id.to_string(),
        k.name.clone(),
        k.tools.join(" "),
        limits,
        k.expires_at.map_or("never".to_owned(), |e| {
            e.format("%Y-%m-%d %H:%M:%S").to_string()
        }),
        state.to_owned(),
    ]
}

/// A key's full id from an id or a unique prefix of one.
async fn resolve_key_id(client: &Client, id: &str) -> anyhow::Result<String> {
    if uuid::Uuid::parse_str(id).is_ok() {
        return Ok(id.to_owned());
    }
    let (keys, _): (Vec<crate::auth::keys::ClientKey>, _) = client.get("/api/v1/keys").await?;
    let hits: Vec<String> = keys
        .iter()
        .map(|k| k.id.to_string())
        .filter(|k| !id.is_empty() && k.starts_with(id))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no key with id '{id}' (key_not_found)"),
        _ => bail!("'{id}' matches {} keys: give more of the id", hits.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The (event, data) pairs `for_each_sse` reports for a response body.
    async fn events_of(body: &'static str) -> Vec<(String, String)> {
        let resp = reqwest::Response::from(http::Response::new(body));
        let mut seen = Vec::new();
        for_each_sse(resp, |e, d| seen.push((e.to_owned(), d.to_owned())))
            .await
            .unwrap();
        seen
    }

    #[tokio::test]
    async fn event_names_do_not_leak_and_data_lines_join() {
        // A `lagged` event, then a plain one: the second is a message, not another `lagged`.
        let seen =
            events_of(": keep-alive\n\nevent: lagged\ndata: 3\n\ndata: {\"a\":\ndata: 1}\n\n")
                .await;
        assert_eq!(
            seen,
            [
                ("lagged".to_owned(), "3".to_owned()),
                ("message".to_owned(), "{\"a\":\n1}".to_owned()),
            ]
        );
    }
}
