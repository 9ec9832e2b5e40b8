//! End to end through the `switchboard` binary: `serve` as a real process, driven by the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::{alive, port_range, read_pids, switchboard_bin, test_server_bin};
use serde_json::Value;

struct Serve {
    /// The `switchboard` binary that serves, and that the client commands run.
    bin: std::path::PathBuf,
    data_dir: std::path::PathBuf,
    child: Child,
    url: String,
    /// Log lines up to and including the "listening" line.
    head: Vec<String>,
    log: mpsc::Receiver<String>,
}

impl Serve {
    fn start(data_dir: &Path, extra: &[&str]) -> Serve {
        Self::start_env(data_dir, extra, &[])
    }

    fn start_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Serve {
        Self::start_bin(&switchboard_bin(), data_dir, extra, env)
    }

    /// `serve` of the given `switchboard` binary (another release's, for upgrade tests).
    fn start_bin(bin: &Path, data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Serve {
        let range = port_range(5).to_string();
        let mut child = Command::new(bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--port-range",
                &range,
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("SWITCHBOARD_API_TOKEN")
            .env_remove("SWITCHBOARD_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut head = Vec::new();
        let url = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("switchboard serve did not report its address");
            head.push(line.clone());
            if let Some((_, rest)) = line.split_once("listening on ") {
                // Text or JSON logs: the URL ends at whitespace or a quote.
                break rest
                    .split(|c: char| c.is_whitespace() || c == '"')
                    .next()
                    .unwrap()
                    .to_owned();
            }
        };
        Serve {
            bin: bin.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            child,
            url,
            head,
            log: rx,
        }
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        self.cli_env(args, &[])
    }

    /// A client command with these variables set (and no token unless one of them is it).
    fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
        let mut cmd = self.cli_command(args);
        cmd.envs(env.iter().copied());
        run(cmd)
    }

    /// A client command run in `dir` (its working directory).
    fn cli_in(&self, dir: &Path, args: &[&str]) -> (bool, String, String) {
        let mut cmd = self.cli_command(args);
        cmd.current_dir(dir);
        run(cmd)
    }

    fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--url")
            .arg(&self.url)
            .args(args)
            .env_remove("SWITCHBOARD_TOKEN");
        cmd
    }

    /// Starts a long-running client command; its stdout lines arrive on the receiver.
    fn spawn_lines(&self, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
        let mut child = Command::new(&self.bin)
            .arg("--url")
            .arg(&self.url)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(ok, "switchboard {args:?} failed:\n{out}\n{err}");
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Every log line, once the process has exited.
    fn all_log(&self) -> String {
        let mut lines = self.head.clone();
        lines.extend(self.log.iter());
        lines.join("\n")
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        for _ in 0..300 {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("switchboard serve did not exit");
    }
}

/// Runs a client command: whether it succeeded, its stdout and its stderr.
fn run(mut cmd: Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        common::kill_node_trees(&self.data_dir);
    }
}

#[test]
fn serve_add_deploy_ps_stop_through_the_cli() {
    cli_flow(common::Backend::Sqlite);
}

#[test]
fn serve_add_deploy_ps_stop_through_the_cli_on_postgres() {
    cli_flow(common::Backend::Postgres);
}

#[test]
fn serve_add_deploy_ps_stop_through_the_cli_on_mysql() {
    cli_flow(common::Backend::MySql);
}

fn cli_flow(backend: common::Backend) {
    let dir = tempfile::tempdir().unwrap();
    let url = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(backend.fresh_url());
    let extra: Vec<&str> = match &url {
        Some(u) => vec!["--database-url", u],
        None => vec![],
    };
    let mut sb = Serve::start(dir.path(), &extra);
    let server = test_server_bin();

    let out = sb.ok(&[
        "tool",
        "add",
        "demo",
        "--name",
        "Demo",
        "-e",
        "GREETING=hi",
        "--",
        server.to_str().unwrap(),
        "--port",
        "{port}",
    ]);
    assert!(out.contains("Registered tool 'demo'"), "{out}");
    let list = sb.ok(&["tool", "list"]);
    assert!(
        list.contains("demo") && list.contains("streamable-http"),
        "{list}"
    );
    let shown = sb.json(&["tool", "show", "demo"]);
    assert_eq!(shown["args"], serde_json::json!(["--port", "{port}"]));
    assert_eq!(shown["env"]["GREETING"], "hi");

    let d = sb.json(&["deploy", "demo", "--wait"])["deployments"][0].clone();
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let table = sb.ok(&["ps"]);
    let short = id.replace('-', "")[..12].to_owned();
    assert!(
        table.contains(&short) && table.contains("RUNNING") && table.contains("HEALTHY"),
        "{table}"
    );

    // Stop by the short id `ps` shows.
    let (ok, out, err) = sb.cli(&["stop", &short[..8]]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("STOPPED"), "{out}");
    assert!(!alive(d["instance"]["pid"].as_u64().unwrap() as u32));
    assert!(
        !sb.ok(&["ps"]).contains(&short),
        "ps hides stopped deployments"
    );
    assert!(sb.ok(&["ps", "--all"]).contains(&short));

    // Errors are one clear line and a failing exit code.
    let (ok, _, err) = sb.cli(&["deploy", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("no tool with slug 'nope'") && err.contains("tool_not_found"),
        "{err}"
    );
    let (ok, _, err) = sb.cli(&["stop", "zzzz"]);
    assert!(!ok);
    assert!(err.contains("no deployment"), "{err}");

    sb.ok(&["tool", "rm", "demo"]);
    assert!(!sb.ok(&["tool", "list"]).contains("demo"));

    // A deployment left running is stopped when serve gets SIGTERM.
    sb.ok(&[
        "tool",
        "add",
        "again",
        "--",
        server.to_str().unwrap(),
        "--port",
        "{port}",
    ]);
    let d = sb.json(&["deploy", "again", "--wait"])["deployments"][0].clone();
    let pid = d["instance"]["pid"].as_u64().unwrap() as u32;
    sb.signal(nix::sys::signal::Signal::SIGTERM);
    let st = sb.wait();
    assert!(st.success(), "serve exited with {st}");
    assert!(!alive(pid), "deployment outlived serve");
}

#[test]
fn an_unreachable_server_is_reported_clearly() {
    let out = Command::new(switchboard_bin())
        .args(["--url", "http://127.0.0.1:1", "ps"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach Switchboard"), "{err}");
}

#[test]
fn a_killed_switchboard_adopts_its_running_deployments_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("tree.pids");
    let mut sb = Serve::start(dir.path(), &[]);
    add_tree_tool(&sb, &pids);
    let d = sb.json(&["deploy", "tree", "--wait"])["deployments"][0].clone();
    assert_eq!(d["status"], "RUNNING");
    let id = d["id"].as_str().unwrap().to_owned();
    sb.signal(nix::sys::signal::Signal::SIGKILL);
    sb.wait();
    let tree = read_pids(&pids);
    assert_eq!(tree.len(), 2);
    assert!(
        tree.iter().all(|p| alive(*p)),
        "SIGKILL of switchboard does not reach its children"
    );

    let sb = Serve::start(dir.path(), &[]);
    assert!(
        sb.head
            .iter()
            .any(|l| l.contains("Adopted a running deployment")),
        "the adoption is logged before Switchboard listens"
    );
    assert_adopted_and_stoppable(&sb, &id, &tree);
}

/// The Docker runtime across a real crash of the binary: SIGKILL leaves the container running,
/// and the next start adopts it (the same container, no restart) rather than starting another.
/// Needs dockerd and the test server's image: scripts/test runs the suite under
/// scripts/with-docker, which provides both.
#[test]
fn a_killed_switchboard_adopts_its_running_containers_at_restart() {
    let image = std::env::var("SWITCHBOARD_TEST_IMAGE").unwrap_or_default();
    assert!(
        !image.is_empty(),
        "SWITCHBOARD_TEST_IMAGE is not set: run through scripts/with-docker (scripts/test does), \
         which starts dockerd (installing docker.io if missing) and builds the test server's image"
    );
    let docker = |args: &[&str]| {
        let out = Command::new("docker").args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sb = Serve::start(dir.path(), &[]);
    sb.ok(&[
        "tool",
        "add",
        "boxed",
        "--runtime",
        "docker",
        "--image",
        &image,
        "--startup-timeout-ms",
        "20000",
        "--stop-grace-period-ms",
        "2000",
        "--",
        "/mcp-test-server",
        "--host",
        "0.0.0.0",
    ]);
    let d = sb.json(&["deploy", "boxed", "--wait"])["deployments"][0].clone();
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let container = d["instance"]["id"].as_str().unwrap().to_owned();
    // Whatever happens below, the container goes with the test.
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
        }
    }
    let _guard = Remove(container.clone());
    let started_at = |c: &str| docker(&["inspect", "-f", "{{.State.StartedAt}}", c]);
    let (_, first_start) = started_at(&container);

    sb.signal(nix::sys::signal::Signal::SIGKILL);
    sb.wait();
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", &container]),
        (true, "true".to_owned()),
        "SIGKILL of switchboard stopped its container"
    );

    let sb = Serve::start(dir.path(), &[]);
    let rec = record(&sb, &id);
    assert_eq!(rec["status"], "RUNNING", "{rec}");
    assert_eq!(rec["runtime"], "docker", "{rec}");
    assert_eq!(
        rec["instance"]["id"],
        container.as_str(),
        "not adopted: {rec}"
    );
    assert_eq!(rec["restart_count"], 0, "adopted, not restarted: {rec}");
    assert_eq!(
        started_at(&container),
        (true, first_start),
        "the container was restarted"
    );
    let stopped = sb.json(&["stop", &id]);
    assert_eq!(stopped["status"], "STOPPED", "{stopped}");
    assert!(
        !docker(&["inspect", &container]).0,
        "the adopted container outlived its stop"
    );
}

/// `tool add` takes a container's fields as flags (no command needed: the image's entrypoint
/// runs), `tool show` shows them, and a malformed limit is refused before anything is sent.
#[test]
fn tool_add_takes_container_fields_and_limits_as_flags() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Serve::start(dir.path(), &[]);
    sb.ok(&[
        "tool",
        "add",
        "boxed",
        "--runtime",
        "docker",
        "--image",
        "example/server:1.2",
        "--pull",
        "missing",
        "--network",
        "host",
        "--user",
        "1000:1000",
        "--memory",
        "64MiB",
        "--cpus",
        "0.5",
        "--pids",
        "32",
    ]);
    let spec = sb.json(&["tool", "show", "boxed"]);
    assert_eq!(spec["runtime"], "docker", "{spec}");
    assert_eq!(spec["image"], "example/server:1.2", "{spec}");
    assert_eq!(spec["command"], "", "{spec}");
    assert_eq!(spec["pull"], "missing", "{spec}");
    assert_eq!(spec["network"], "host", "{spec}");
    assert_eq!(spec["user"], "1000:1000", "{spec}");
    assert_eq!(
        spec["limits"],
        serde_json::json!({"memory": "64MiB", "cpus": 0.5, "pids": 32}),
        "{spec}"
    );
    let text = sb.ok(&["tool", "show", "boxed"]);
    for row in [
        "example/server:1.2",
        "memory 64 MiB, cpus 0.5, pids 32",
        "all on",
    ] {
        assert!(text.contains(row), "`tool show` lacks {row:?}:\n{text}");
    }

    let (ok, _, err) = sb.cli(&[
        "tool",
        "add",
        "bad",
        "--runtime",
        "docker",
        "--image",
        "x:1",
        "--memory",
        "64XB",
    ]);
    assert!(!ok && err.contains("--memory '64XB'"), "{err}");
    let (ok, _, err) = sb.cli(&["tool", "add", "nocommand"]);
    assert!(!ok && err.contains("--runtime docker --image"), "{err}");
    let (ok, _, _) = sb.cli(&["tool", "show", "bad"]);
    assert!(!ok, "a refused tool was registered");
}

/// `id`'s process tree (`tree`, main process first) runs on, adopted: the record is RUNNING
/// with the same process and no restart, and a stop takes the whole tree (the setsid
/// grandchild included), since adopted means supervised.
fn assert_adopted_and_stoppable(sb: &Serve, id: &str, tree: &[u32]) {
    for pid in tree {
        assert!(alive(*pid), "{pid} was killed instead of adopted");
    }
    let rec = record(sb, id);
    assert_eq!(rec["status"], "RUNNING", "{rec}");
    assert_eq!(rec["runtime"], "process", "{rec}");
    assert_eq!(
        rec["instance"]["pid"].as_u64(),
        Some(u64::from(tree[0])),
        "{rec}"
    );
    assert_eq!(rec["restart_count"], 0, "adopted, not restarted: {rec}");
    let stopped = sb.json(&["stop", id]);
    assert_eq!(stopped["status"], "STOPPED", "{stopped}");
    for pid in tree {
        assert!(
            !alive(*pid),
            "{pid} survived the stop of an adopted deployment"
        );
    }
}

/// The previous release's binary (scripts/previous-release builds it; scripts/test passes its
/// path in SWITCHBOARD_PREVIOUS_RELEASE).
fn previous_release_bin() -> std::path::PathBuf {
    let path = std::env::var_os("SWITCHBOARD_PREVIOUS_RELEASE").map(std::path::PathBuf::from);
    match path {
        Some(p) if p.is_file() => p,
        _ => panic!(
            "SWITCHBOARD_PREVIOUS_RELEASE does not name the previous release's binary: run \
             `SWITCHBOARD_PREVIOUS_RELEASE=$(scripts/previous-release) cargo nextest run ...` \
             (scripts/test does this)"
        ),
    }
}

/// Upgrades lose nothing: a data directory the previous release wrote (pid columns, before the
/// runtime boundary), its Switchboard SIGKILLed with a deployment live, is opened by this
/// binary, which migrates the record and adopts the same process: no restart.
#[test]
fn a_live_deployment_of_the_previous_release_is_adopted_after_the_upgrade() {
    let old = previous_release_bin();
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("tree.pids");
    let mut sb = Serve::start_bin(&old, dir.path(), &[], &[]);
    add_tree_tool(&sb, &pids);
    let d = sb.json(&["deploy", "tree", "--wait"]);
    assert_eq!(d["status"], "RUNNING", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    sb.signal(nix::sys::signal::Signal::SIGKILL);
    sb.wait();
    let tree = read_pids(&pids);
    assert_eq!(tree.len(), 2);

    let sb = Serve::start(dir.path(), &[]);
    assert_adopted_and_stoppable(&sb, &id, &tree);
}

/// Upgrades lose nothing, secrets included, and leave none in plain text: the previous
/// release's own binary stores a `secret_env` value (in plain text, which the test checks so
/// that it proves something); the new binary, its key from SWITCHBOARD_SECRET_KEY, encrypts
/// it at its first start (a count in the log, never the value), writes no key file, and the
/// deployed server gets the value but not the key. A start with another key names the tool
/// and variable, and a deploy of the tool fails saying why.
#[test]
fn plain_text_secrets_of_the_previous_release_are_encrypted_at_the_upgrade() {
    const SECRET: &str = "sk-upgrade-0a1b2c3d4e5f6a7b";
    // 32 bytes of 9 and of 10, in base64.
    const KEY: &str = "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";
    const OTHER_KEY: &str = "CgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgoKCgo=";
    let old = previous_release_bin();
    let dir = tempfile::tempdir().unwrap();
    let mut sb = Serve::start_bin(&old, dir.path(), &[], &[]);
    // The value comes from the CLI's environment, never its command line.
    let server = test_server_bin();
    let add = [
        "tool",
        "add",
        "vault",
        "--secret-env",
        "API_KEY",
        "--",
        server.to_str().unwrap(),
        "--port",
        "{port}",
    ];
    let (ok, out, err) = sb.cli_env(&add, &[("API_KEY", SECRET)]);
    assert!(ok, "{out}\n{err}");
    sb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sb.wait().success());
    assert!(
        common::database_holds(dir.path(), SECRET),
        "the previous release should have stored the value in plain text"
    );

    let mut sb = Serve::start_env(dir.path(), &[], &[("SWITCHBOARD_SECRET_KEY", KEY)]);
    assert!(
        !common::database_holds(dir.path(), SECRET),
        "the plain value survived the upgrade"
    );
    assert!(
        !dir.path().join("secret.key").exists(),
        "a key from the environment means no key file"
    );
    let d = sb.json(&["deploy", "vault", "--wait"])["deployments"][0].clone();
    assert_eq!(d["status"], "RUNNING", "{d}");
    let pid = d["instance"]["pid"].as_u64().unwrap();
    let env = common::process_environ(pid);
    assert!(env.contains(&format!("API_KEY={SECRET}")), "{env:?}");
    assert!(
        !env.iter().any(|v| v.starts_with("SWITCHBOARD_SECRET_KEY=")),
        "the server inherited the key"
    );
    sb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sb.wait().success());
    let log = sb.all_log();
    assert!(
        log.contains("Encrypted the secret_env values an earlier release stored in plain text")
            && log.contains("values=1"),
        "{log}"
    );
    assert!(!log.contains(SECRET) && !log.contains(KEY), "{log}");

    let mut sb = Serve::start_env(dir.path(), &[], &[("SWITCHBOARD_SECRET_KEY", OTHER_KEY)]);
    let (ok, out, err) = sb.cli(&["deploy", "vault", "--wait"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("'vault'") && err.contains("API_KEY") && err.contains("cannot be decrypted"),
        "{err}"
    );
    sb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sb.wait().success());
    let log = sb.all_log();
    let named = log
        .lines()
        .find(|l| l.contains("secret_env value cannot be decrypted"))
        .unwrap_or_else(|| panic!("start-up named no tool: {log}"));
    assert!(
        named.contains("vault") && named.contains("API_KEY"),
        "{named}"
    );
    assert!(
        !log.contains("Encrypted the secret_env values"),
        "nothing was left to encrypt: {log}"
    );
    assert!(!log.contains(SECRET) && !log.contains(OTHER_KEY), "{log}");
}

/// `[secrets] key_file` names a key the operator keeps: Switchboard uses it and writes no key
/// of its own, and refuses to start when it is missing (a new key could not decrypt what the
/// old one stored), as it does for a malformed SWITCHBOARD_SECRET_KEY, without quoting it.
#[test]
fn a_configured_key_file_is_used_never_created_and_a_bad_key_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key_file = dir.path().join("keys").join("sb.key");
    let config = dir.path().join("sb.toml");
    std::fs::write(&config, "[secrets]\nkey_file = \"keys/sb.key\"\n").unwrap();
    let serve = |env: &[(&str, &str)]| {
        Command::new(switchboard_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = serve(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{} ([secrets] key_file) does not exist",
            key_file.display()
        )),
        "{err}"
    );
    assert!(!key_file.exists() && !data.join("secret.key").exists());

    let out = serve(&[("SWITCHBOARD_SECRET_KEY", "not-a-key-at-all")]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SWITCHBOARD_SECRET_KEY is not a secret key") && !err.contains("not-a-key"),
        "{err}"
    );

    std::fs::create_dir_all(key_file.parent().unwrap()).unwrap();
    std::fs::write(&key_file, "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=\n").unwrap();
    // Readable by others (as written here): it is used, with a warning to chmod it.
    let mut sb = Serve::start(&data, &["--config", config.to_str().unwrap()]);
    sb.ok(&["tool", "list"]);
    sb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sb.wait().success());
    let log = sb.all_log();
    assert!(
        log.contains(&format!("Secret key loaded from={}", key_file.display())),
        "{log}"
    );
    assert!(
        log.contains("can be read by other users: chmod 600 it"),
        "{log}"
    );
    assert!(!data.join("secret.key").exists(), "a key file of its own");
}

#[test]
fn what_died_while_switchboard_was_down_is_restarted_and_its_leftovers_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("tree.pids");
    let mut sb = Serve::start(dir.path(), &[]);
    add_tree_tool(&sb, &pids);
    let d = sb.json(&["deploy", "tree", "--wait"])["deployments"][0].clone();
    let id = d["id"].as_str().unwrap().to_owned();
    sb.signal(nix::sys::signal::Signal::SIGKILL);
    sb.wait();
    let tree = read_pids(&pids);
    // The server dies while nobody supervises it; its setsid grandchild lives on.
    common::sigkill(tree[0] as i32);
    assert!(alive(tree[1]));

    let sb = Serve::start(dir.path(), &[]);
    assert!(
        !alive(tree[1]),
        "the leftover grandchild survived the restart"
    );
    let rec = restarted_record(&sb, &id);
    assert_eq!(rec["status"], "RUNNING", "{rec}");
    assert_eq!(rec["restart_count"], 1, "{rec}");
    assert_ne!(
        rec["instance"]["pid"].as_u64(),
        Some(u64::from(tree[0])),
        "{rec}"
    );
    assert!(
        rec["last_exit"]
            .as_str()
            .unwrap()
            .contains("found the process gone"),
        "{rec}"
    );
    assert!(sb.log.try_iter().all(|l| !l.contains("panicked")));
}

#[test]
fn a_stale_record_never_gets_an_unrelated_process_signalled() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("tree.pids");
    let mut sb = Serve::start(dir.path(), &[]);
    add_tree_tool(&sb, &pids);
    let d = sb.json(&["deploy", "tree", "--wait"])["deployments"][0].clone();
    let id = d["id"].as_str().unwrap().to_owned();
    sb.signal(nix::sys::signal::Signal::SIGKILL);
    sb.wait();
    drop(sb);
    // The deployment's processes are gone and its pid now names an unrelated process (a
    // reused pid): the record points at a live pid whose start time is not the recorded one.
    let mut bystander = Command::new("sleep").arg("120").spawn().unwrap();
    let by_pid = bystander.id();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use sqlx::Connection as _;
        let db = dir.path().join("switchboard.db");
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        sqlx::query(
            "UPDATE deployments SET instance = json_set(instance, '$.pid', ?) WHERE id = ?",
        )
        .bind(i64::from(by_pid))
        .bind(&id)
        .execute(&mut c)
        .await
        .unwrap();
    });
    let sb = Serve::start(dir.path(), &[]);
    assert!(
        alive(by_pid),
        "an unrelated process with a reused pid was signalled"
    );
    let rec = restarted_record(&sb, &id);
    assert_eq!(rec["status"], "RUNNING", "restarted, not adopted: {rec}");
    assert_ne!(
        rec["instance"]["pid"].as_u64(),
        Some(u64::from(by_pid)),
        "{rec}"
    );
    sb.json(&["stop", &id]);
    assert!(
        alive(by_pid),
        "stopping the deployment reached the unrelated process"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[test]
fn health_and_events_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Serve::start(dir.path(), &[]);
    add_server_tool(&sb, "echo");
    let (mut follower, rx) = sb.spawn_lines(&["events", "--json"]);
    // The follower subscribes asynchronously: add a replica until it has seen one run.
    let mut ids = Vec::new();
    let seen = 'outer: loop {
        let n = (ids.len() + 1).to_string();
        let d = sb.json(&["scale", "echo", &n, "--wait"])["started"][0].clone();
        ids.push(d["id"].as_str().unwrap().to_owned());
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
            let e: Value = serde_json::from_str(&line).unwrap();
            if e["to"] == "RUNNING" {
                break 'outer e;
            }
        }
        assert!(
            ids.len() < 5,
            "`switchboard events` printed no RUNNING transition"
        );
    };
    assert!(
        ids.contains(&seen["deployment"].as_str().unwrap().to_owned()),
        "{seen}"
    );
    assert_eq!(seen["tool"], "echo");
    let _ = follower.kill();
    let _ = follower.wait();

    let id = &ids[0];
    let out = sb.ok(&["health", &id[..8]]);
    assert!(out.contains("status:    HEALTHY"), "{out}");
    assert!(out.contains("server:"), "{out}");
    sb.ok(&["stop", id]);
    let (ok, _, err) = sb.cli(&["health", id]);
    assert!(!ok);
    assert!(err.contains("not_live"), "{err}");
}

#[test]
fn on_exit_keep_leaves_deployments_running_for_the_next_start_and_stop_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("tree.pids");
    let mut sb = Serve::start(dir.path(), &["--on-exit", "keep"]);
    add_tree_tool(&sb, &pids);
    let d = sb.json(&["deploy", "tree", "--wait"])["deployments"][0].clone();
    let id = d["id"].as_str().unwrap().to_owned();
    sb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sb.wait().success());
    let log = sb.all_log();
    assert!(
        log.contains("Leaving deployments running"),
        "the exit policy is logged"
    );
    assert!(
        !log.contains("All deployments stopped") && !log.contains("Stopped 1 deployments"),
        "the last words claim a stop that did not happen: {log}"
    );
    let tree = read_pids(&pids);
    assert_eq!(tree.len(), 2);
    for pid in &tree {
        assert!(alive(*pid), "{pid} was stopped although on_exit = keep");
    }
    // Not dropped: a Serve's drop kills its node's trees, and they must live on here.
    std::mem::forget(sb);

    // The next start (default policy: stop) adopts them...
    let mut sb = Serve::start(dir.path(), &[]);
    let rec = record(&sb, &id);
    assert_eq!(rec["status"], "RUNNING", "{rec}");
    assert_eq!(
        rec["instance"]["pid"].as_u64(),
        Some(u64::from(tree[0])),
        "{rec}"
    );
    // ...and stops them when it exits.
    sb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sb.wait().success());
    for pid in &tree {
        assert!(
            !alive(*pid),
            "{pid} outlived a graceful exit with on_exit = stop"
        );
    }
    drop(sb);
    let sb = Serve::start(dir.path(), &[]);
    let rec = record(&sb, &id);
    assert_eq!(rec["status"], "STOPPED", "{rec}");
}

#[test]
fn json_logs_carry_one_access_line_per_proxied_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut sb = Serve::start(dir.path(), &["--log-format", "json"]);
    add_server_tool(&sb, "echo");
    let d = sb.json(&["deploy", "echo", "--wait"])["deployments"][0].clone();
    let id = d["id"].as_str().unwrap().to_owned();
    // One plain proxied request, by hand.
    let addr = sb.url.trim_start_matches("http://").to_owned();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    {
        use std::io::{Read as _, Write as _};
        write!(
            conn,
            "GET /mcp/echo/bytes?n=5 HTTP/1.1\r\nHost: {addr}\r\nX-Request-Id: req-42\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        conn.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }
    sb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sb.wait().success());
    let log = sb.all_log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "switchboard::access")
        .collect();
    assert_eq!(access.len(), 1, "{log}");
    let a = access[0];
    assert_eq!(a["request_id"], "req-42", "{a}");
    assert_eq!(a["status"], 200, "{a}");
    assert_eq!(a["deployment"], id.as_str(), "{a}");
    assert_eq!(a["path"], "/mcp/echo/bytes", "{a}");
    assert!(a["duration_ms"].as_f64().unwrap() > 0.0, "{a}");
}

#[test]
fn logs_print_and_follow_a_deployments_output_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Serve::start(dir.path(), &[]);
    add_server_tool(&sb, "echo");
    let d = sb.json(&["deploy", "echo", "--wait"])["deployments"][0].clone();
    let id = d["id"].as_str().unwrap().to_owned();
    let started = format!("--- switchboard: starting deployment {id}");
    let out = sb.ok(&["logs", &id[..8]]);
    assert!(out.contains(&started), "{out}");
    // The server's own lines carry the time they were written.
    let line = out
        .lines()
        .find(|l| l.contains("mcp-test-server: listening on"))
        .unwrap_or_else(|| panic!("{out}"));
    let (stamp, rest) = line.split_once(' ').unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(stamp).is_ok(),
        "no timestamp: {line}"
    );
    assert!(rest.starts_with("mcp-test-server: listening on"), "{line}");

    let (mut follower, rx) = sb.spawn_lines(&["logs", "-f", "--tail", "1000", &id]);
    let next_start = |rx: &mpsc::Receiver<String>| loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("no new output reached `logs -f`");
        if line.starts_with(&started) {
            break;
        }
    };
    // The tail first; then output written after the follower attached: a restart's banner.
    next_start(&rx);
    common::sigkill(d["instance"]["pid"].as_u64().unwrap() as i32);
    next_start(&rx);
    sb.ok(&["stop", &id]);
    // The deployment ended: the stream ends and the follower exits by itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = follower.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "`logs -f` did not end with the deployment"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    // The log writers (one per process run) end with the deployment too.
    let writers = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| {
                let c = String::from_utf8_lossy(c);
                c.contains("__log") && c.contains(&id)
            })
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while writers() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a log writer outlived its deployment"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `tmux` with these arguments, returning its stdout.
fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("tmux is missing ({e}): apt-get install tmux (scripts/test does this)")
        });
    assert!(
        out.status.success(),
        "tmux {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn top_shows_live_deployments_in_a_real_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Serve::start(dir.path(), &[]);
    add_server_tool(&sb, "topped");
    let d = sb.json(&["deploy", "topped", "--wait"])["deployments"][0].clone();
    let short = d["id"].as_str().unwrap().replace('-', "")[..12].to_owned();
    let session = format!("sbtop-{}", std::process::id());
    let cmd = format!(
        "{} --url {} top --interval 0.2",
        switchboard_bin().display(),
        sb.url
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "150",
        "-y",
        "30",
        &cmd,
    ]);
    let screen = |session: &str| tmux(&["capture-pane", "-p", "-t", session]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let shown = loop {
        let s = screen(&session);
        if s.contains(&short) && s.contains("HEALTHY") || std::time::Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(shown.contains("switchboard top"), "{shown}");
    assert!(shown.contains("topped"), "{shown}");
    assert!(shown.contains(&short), "{shown}");
    assert!(shown.contains("RUNNING"), "{shown}");
    assert!(shown.contains("HEALTHY"), "{shown}");
    assert!(shown.contains("MiB"), "memory is shown: {shown}");
    // It refreshes in place: a stop shows up without restarting top.
    sb.ok(&["stop", d["id"].as_str().unwrap()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = screen(&session);
        if !s.contains(&short) {
            assert!(s.contains("0 live"), "{s}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stop never showed: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // q quits and the session (whose only program was top) ends.
    tmux(&["send-keys", "-t", &session, "q"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Command::new("tmux")
        .args(["has-session", "-t", &session])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(std::time::Instant::now() < deadline, "q did not quit top");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Registers the repo's test server as tool `slug`.
fn add_server_tool(sb: &Serve, slug: &str) {
    sb.ok(&[
        "tool",
        "add",
        slug,
        "--",
        test_server_bin().to_str().unwrap(),
        "--port",
        "{port}",
    ]);
}

fn add_tree_tool(sb: &Serve, pids: &Path) {
    sb.ok(&[
        "tool",
        "add",
        "tree",
        "--",
        test_server_bin().to_str().unwrap(),
        "--port",
        "{port}",
        "--setsid-grandchild",
        "--pid-file",
        pids.to_str().unwrap(),
    ]);
}

/// The deployment's record once its first restart is recorded and it runs again (or, after
/// 30 s, as it is, for the caller's assertions to describe).
fn restarted_record(sb: &Serve, id: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rec = record(sb, id);
        let restarted = rec["status"] == "RUNNING" && rec["restart_count"] == 1;
        if restarted || std::time::Instant::now() > deadline {
            return rec;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn record(sb: &Serve, id: &str) -> Value {
    let all = sb.json(&["ps", "--all"]);
    all.as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .cloned()
        .unwrap()
}

#[test]
fn an_unreadable_config_file_names_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere.toml");
    let out = Command::new(switchboard_bin())
        .args(["serve", "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read config file"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn a_public_address_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(switchboard_bin())
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("SWITCHBOARD_API_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without an API token"), "{err}");
}

#[test]
fn one_data_directory_serves_one_switchboard() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Serve::start(dir.path(), &[]);
    let out = Command::new(switchboard_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already using the data directory"), "{err}");
}

#[test]
fn the_token_and_secrets_are_required_or_hidden_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-8d1f2c0e9b";
    let mut sb = Serve::start_env(
        dir.path(),
        &[],
        &[("SWITCHBOARD_TOKEN", token), ("RUST_LOG", "debug")],
    );
    let (ok, _, err) = sb.cli(&["tool", "list"]);
    assert!(!ok);
    assert!(err.contains("unauthorized"), "{err}");
    let (ok, out, err) = sb.cli(&["--token", token, "tool", "list"]);
    assert!(ok, "{out}{err}");

    // A secret reaches the server's environment and nothing else.
    let secret = "hunter2-7f3a91";
    let add = Command::new(switchboard_bin())
        .args(["--url", &sb.url, "--token", token, "tool", "add", "vault"])
        .args(["--secret-env", "VAULT_KEY", "--"])
        .arg(test_server_bin())
        .args(["--port", "{port}"])
        .env("VAULT_KEY", secret)
        .output()
        .unwrap();
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let d = sb.json(&["--token", token, "deploy", "vault", "--wait"])["deployments"][0].clone();
    let pid = d["instance"]["pid"].as_u64().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        String::from_utf8_lossy(&environ).contains(&format!("VAULT_KEY={secret}")),
        "the server did not get its secret"
    );
    let shown = sb.ok(&["--token", token, "tool", "show", "vault", "--json"]);
    assert!(!shown.contains(secret), "{shown}");
    assert!(shown.contains("********"), "{shown}");
    let listed = sb.ok(&["--token", token, "tool", "list", "--json"]);
    assert!(!listed.contains(secret), "{listed}");
    sb.ok(&["--token", token, "stop", d["id"].as_str().unwrap()]);

    sb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sb.wait().success());
    let all = sb.all_log();
    assert!(all.contains("Shutting down"), "{all}");
    assert!(!all.contains(token), "the token appeared in the log");
    assert!(!all.contains(secret), "a secret appeared in the log");
}

/// Runs `sh -c script` inside the mount namespace of `pid`.
fn in_namespace_of(pid: u32, script: &str) -> std::process::Output {
    Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "sh", "-c", script])
        .output()
        .unwrap()
}

#[test]
fn a_full_disk_refuses_writes_clearly_and_traffic_keeps_flowing() {
    // The data directory is a 4 MiB tmpfs in a mount namespace of Switchboard's own.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let range = port_range(3).to_string();
    let mut child = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=4m tmpfs '{data}' && exec '{bin}' serve --listen 127.0.0.1:0 \
             --port-range {range} --data-dir '{data}'",
            data = data.display(),
            bin = switchboard_bin().display(),
        ))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("serve exited").unwrap();
        if let Some((_, rest)) = line.split_once("listening on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let pid = child.id();
    let cli = |args: &[&str]| {
        Command::new(switchboard_bin())
            .arg("--url")
            .arg(&url)
            .args(args)
            .output()
            .unwrap()
    };
    let server = test_server_bin();
    assert!(
        cli(&[
            "tool",
            "add",
            "t",
            "--",
            server.to_str().unwrap(),
            "--port",
            "{port}"
        ])
        .status
        .success()
    );
    let out = cli(&["deploy", "t", "--wait", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Fill the disk (dd ends with "No space left on device", which is the point).
    in_namespace_of(
        pid,
        &format!(
            "dd if=/dev/zero of='{}/filler' bs=64k 2>/dev/null; sync",
            data.display()
        ),
    );
    let out = cli(&["tool", "add", "late", "--", "x"]);
    assert!(!out.status.success(), "a write on a full disk must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("store_unavailable") && err.contains("503"),
        "{err}"
    );

    // Traffic to the running deployment does not need the disk.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let who = rt.block_on(common::whoami(&format!("{url}/mcp/t")));
    assert_eq!(who["tool"], "t");

    // Space comes back, writes work again, and the database is intact.
    let free = in_namespace_of(pid, &format!("rm -f '{}/filler'", data.display()));
    assert!(free.status.success());
    let out = cli(&["tool", "add", "late", "--", "x"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = in_namespace_of(
        pid,
        &format!(
            "python3 -c \"import sqlite3; print(sqlite3.connect('{}/switchboard.db').execute('pragma integrity_check').fetchone()[0])\"",
            data.display()
        ),
    );
    assert_eq!(
        String::from_utf8_lossy(&check.stdout).trim(),
        "ok",
        "{check:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "serve exited with {st}");
}

/// Server and CLI read one variable, SWITCHBOARD_TOKEN; a 401 says where the token goes.
#[test]
fn server_and_cli_share_switchboard_token_and_a_401_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-51c7e0a2";
    let sb = Serve::start_env(dir.path(), &[], &[("SWITCHBOARD_TOKEN", token)]);
    let (ok, out, err) = sb.cli(&["tool", "list"]);
    assert!(!ok, "no token, yet the API answered: {out}");
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(
        err.contains("--token") && err.contains("SWITCHBOARD_TOKEN"),
        "{err}"
    );
    // Streams (events, logs) report a 401 the same way.
    let (ok, _, err) = sb.cli(&["events"]);
    assert!(!ok);
    assert!(
        err.contains("--token") && err.contains("SWITCHBOARD_TOKEN"),
        "{err}"
    );
    let (ok, out, err) = sb.cli_env(&["tool", "list"], &[("SWITCHBOARD_TOKEN", token)]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = sb.cli(&["--token", token, "tool", "list"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = sb.cli(&["--token", "wrong", "tool", "list"]);
    assert!(!ok);
    assert!(err.contains("HTTP 401"), "{err}");
}

/// The server's old variable still works, with a warning that names the new one.
#[test]
fn the_old_server_token_variable_works_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-0b9e33d1";
    let sb = Serve::start_env(dir.path(), &[], &[("SWITCHBOARD_API_TOKEN", token)]);
    let (ok, out, _) = sb.cli(&["tool", "list"]);
    assert!(!ok, "the old variable was not applied: {out}");
    let (ok, out, err) = sb.cli_env(&["tool", "list"], &[("SWITCHBOARD_TOKEN", token)]);
    assert!(ok, "{out}{err}");
    let head = sb.head.join("\n");
    assert!(
        head.contains("SWITCHBOARD_API_TOKEN is deprecated") && head.contains("SWITCHBOARD_TOKEN"),
        "{head}"
    );
    assert!(!head.contains(token), "{head}");
}

/// `serve --token` would show the token in `ps` for the server's whole life: refused, saying
/// what to do instead.
#[test]
fn serve_refuses_a_token_on_its_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(switchboard_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "tok-on-the-cmdline",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("SWITCHBOARD_TOKEN")
        .env_remove("SWITCHBOARD_API_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        child.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        common::kill_node_trees(dir.path());
        panic!("serve accepted --token and kept running");
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SWITCHBOARD_TOKEN") && err.contains("--api-token-file"),
        "{err}"
    );
}

/// `[[tools]]` of the test server, one per (slug, description).
fn tools_file(dir: &Path, name: &str, tools: &[(&str, &str)]) -> std::path::PathBuf {
    let mut text = String::new();
    for (slug, description) in tools {
        text.push_str(&format!(
            "[[tools]]\nslug = \"{slug}\"\ndescription = \"{description}\"\ncommand = {:?}\nargs = [\"--port\", \"{{port}}\"]\n\n",
            test_server_bin().to_str().unwrap()
        ));
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn outcomes(v: &Value) -> Vec<(String, String)> {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let what = r["outcome"].as_str().map_or_else(
                || r["error"]["code"].as_str().unwrap().to_owned(),
                str::to_owned,
            );
            (r["slug"].as_str().unwrap().to_owned(), what)
        })
        .collect()
}

/// `tool update` changes the given fields, `tool apply` reports created/updated/unchanged,
/// `tool add --file` takes the `[[tools]]` form, and a transport change under live
/// deployments is refused with the reason and a failing exit code.
#[test]
fn tools_are_updated_and_applied_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let sb = Serve::start(dir.path(), &[]);
    let server = test_server_bin();
    add_server_tool(&sb, "echo");

    let out = sb.ok(&[
        "tool",
        "update",
        "echo",
        "--replicas",
        "2",
        "-e",
        "GREETING=hi",
    ]);
    assert!(out.contains("Updated tool 'echo'"), "{out}");
    let shown = sb.json(&["tool", "show", "echo"]);
    assert_eq!(shown["replicas"], 2, "{shown}");
    assert_eq!(shown["env"]["GREETING"], "hi", "{shown}");
    assert_eq!(shown["command"], server.to_str().unwrap(), "the rest stays");
    assert_eq!(shown["args"], serde_json::json!(["--port", "{port}"]));
    sb.ok(&[
        "tool",
        "update",
        "echo",
        "--autostart",
        "--",
        server.to_str().unwrap(),
        "--port",
        "{port}",
        "--name",
        "x",
    ]);
    let shown = sb.json(&["tool", "show", "echo"]);
    assert_eq!(shown["autostart"], true, "{shown}");
    assert_eq!(shown["args"].as_array().unwrap().len(), 4, "{shown}");
    sb.ok(&["tool", "update", "echo", "--autostart=false"]);
    assert_eq!(sb.json(&["tool", "show", "echo"])["autostart"], false);

    let (ok, _, err) = sb.cli(&["tool", "update", "nope", "--replicas", "2"]);
    assert!(!ok && err.contains("tool_not_found"), "{err}");
    let (ok, _, err) = sb.cli(&["tool", "update", "echo"]);
    assert!(!ok && err.contains("nothing to change"), "{err}");
    let (ok, _, err) = sb.cli(&["tool", "update", "echo", "--replicas", "65"]);
    assert!(
        !ok && err.contains("invalid_tool") && err.contains("HTTP 422"),
        "{err}"
    );

    // apply: created, then unchanged, then only the changed one updated.
    let v1 = tools_file(files.path(), "v1.toml", &[("alpha", "a"), ("beta", "b")]);
    let first = sb.json(&["tool", "apply", "-f", v1.to_str().unwrap()]);
    assert_eq!(
        outcomes(&first),
        [
            ("alpha".into(), "created".into()),
            ("beta".into(), "created".into())
        ]
    );
    let again = sb.json(&["tool", "apply", "-f", v1.to_str().unwrap()]);
    assert_eq!(
        outcomes(&again),
        [
            ("alpha".into(), "unchanged".into()),
            ("beta".into(), "unchanged".into())
        ]
    );
    let v2 = tools_file(files.path(), "v2.toml", &[("alpha", "a"), ("beta", "b2")]);
    let out = sb.ok(&["tool", "apply", "-f", v2.to_str().unwrap()]);
    assert!(
        out.contains("unchanged") && out.contains("updated"),
        "{out}"
    );
    assert_eq!(sb.json(&["tool", "show", "beta"])["description"], "b2");

    // tool add --file takes the same form, several tools at once.
    let more = tools_file(files.path(), "more.toml", &[("gamma", "g"), ("delta", "d")]);
    let out = sb.ok(&["tool", "add", "--file", more.to_str().unwrap()]);
    assert!(out.contains("'gamma'") && out.contains("'delta'"), "{out}");
    let (ok, _, err) = sb.cli(&["tool", "add", "--file", more.to_str().unwrap()]);
    assert!(
        !ok && err.contains("tool_exists") && err.contains("'gamma'"),
        "{err}"
    );

    // A transport change while alpha runs: refused (409, with the reason), and an apply that
    // contains it fails naming alpha while applying the rest.
    let d = sb.json(&["deploy", "alpha", "--wait"])["deployments"][0].clone();
    assert_eq!(d["status"], "RUNNING", "{d}");
    let (ok, _, err) = sb.cli(&[
        "tool",
        "update",
        "alpha",
        "--transport",
        "stdio",
        "--",
        server.to_str().unwrap(),
        "--stdio",
    ]);
    assert!(
        !ok,
        "a transport change under a live deployment was accepted"
    );
    assert!(
        err.contains("HTTP 409") && err.contains("transport_change_with_live_deployments"),
        "{err}"
    );
    assert!(err.contains("live deployment"), "{err}");
    assert_eq!(
        sb.json(&["tool", "show", "alpha"])["transport"],
        "streamable-http"
    );
    let mut stdio = std::fs::read_to_string(&v2).unwrap();
    stdio = stdio.replacen(
        "args = [\"--port\", \"{port}\"]",
        "args = [\"--stdio\"]\ntransport = \"stdio\"",
        1,
    );
    stdio.push_str(&format!(
        "[[tools]]\nslug = \"epsilon\"\ncommand = {:?}\n",
        server.to_str().unwrap()
    ));
    let v3 = files.path().join("v3.toml");
    std::fs::write(&v3, stdio).unwrap();
    let (ok, out, err) = sb.cli(&["tool", "apply", "-f", v3.to_str().unwrap()]);
    assert!(!ok, "an apply with a refused tool exited 0: {out}");
    assert!(
        err.contains("1 of 3 tools were not applied")
            && err.contains("'alpha'")
            && err.contains("transport_change_with_live_deployments"),
        "{err}"
    );
    assert!(
        out.contains("created") && out.contains("unchanged"),
        "{out}"
    );
    assert_eq!(sb.json(&["tool", "show", "epsilon"])["slug"], "epsilon");

    // Once nothing runs, the same change goes through.
    sb.ok(&["stop", d["id"].as_str().unwrap()]);
    let again = sb.json(&["tool", "apply", "-f", v3.to_str().unwrap()]);
    assert_eq!(outcomes(&again)[0], ("alpha".into(), "updated".into()));
    assert_eq!(sb.json(&["tool", "show", "alpha"])["transport"], "stdio");
}

/// A relative command given to the CLI is the CLI's: it resolves against the CLI's working
/// directory (a config file's against the file's), not the server's.
#[test]
fn relative_command_paths_resolve_against_the_cli_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Serve::start(dir.path(), &[]);
    let bin = test_server_bin();
    let bin_dir = bin.parent().unwrap();
    let (ok, out, err) = sb.cli_in(
        bin_dir,
        &[
            "tool",
            "add",
            "rel",
            "--working-dir",
            ".",
            "--",
            "./mcp-test-server",
            "--port",
            "{port}",
        ],
    );
    assert!(ok, "{out}{err}");
    let shown = sb.json(&["tool", "show", "rel"]);
    let canonical = std::fs::canonicalize(&bin).unwrap();
    assert_eq!(shown["command"], canonical.to_str().unwrap(), "{shown}");
    assert_eq!(
        shown["working_dir"],
        canonical.parent().unwrap().to_str().unwrap(),
        "{shown}"
    );
    let d = sb.json(&["deploy", "rel", "--wait"])["deployments"][0].clone();
    assert_eq!(d["status"], "RUNNING", "{d}");
    sb.ok(&["stop", d["id"].as_str().unwrap()]);

    // A file's relative paths resolve against the file, wherever the CLI runs.
    let files = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&canonical, files.path().join("srv")).unwrap();
    std::fs::write(
        files.path().join("t.toml"),
        "slug = \"filerel\"\ncommand = \"./srv\"\nargs = [\"--port\", \"{port}\"]\n",
    )
    .unwrap();
    let (ok, out, err) = sb.cli_in(
        bin_dir,
        &[
            "tool",
            "add",
            "--file",
            files.path().join("t.toml").to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}{err}");
    let shown = sb.json(&["tool", "show", "filerel"]);
    let want = std::fs::canonicalize(files.path()).unwrap().join("srv");
    assert_eq!(shown["command"], want.to_str().unwrap(), "{shown}");
}

/// Runs a client command; its exit code, stdout and stderr.
fn cli_code(sb: &Serve, args: &[&str]) -> (Option<i32>, String, String) {
    let out = sb.cli_command(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Registers the test server with extra arguments and definition fields (from a JSON file).
fn add_spec_tool(sb: &Serve, slug: &str, extra_args: &[&str], fields: Value) {
    let mut args = vec!["--port".to_owned(), "{port}".to_owned()];
    args.extend(extra_args.iter().map(|a| a.to_string()));
    let mut spec = serde_json::json!({"slug": slug, "command": test_server_bin(), "args": args});
    if let (Value::Object(s), Value::Object(f)) = (&mut spec, fields) {
        s.extend(f);
    }
    let file = sb.data_dir.join(format!("{slug}.json"));
    std::fs::write(&file, spec.to_string()).unwrap();
    sb.ok(&["tool", "add", "--file", file.to_str().unwrap()]);
}

#[test]
fn deploy_wait_exits_zero_only_when_running_and_says_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Serve::start(dir.path(), &[]);

    add_spec_tool(&sb, "fine", &[], serde_json::json!({}));
    let (code, out, err) = cli_code(&sb, &["deploy", "fine", "--wait"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("RUNNING"), "{out}");

    // Dies during startup, every time: the first failed start answers, non-zero, with why.
    add_spec_tool(
        &sb,
        "crashy",
        &["--startup-delay-ms", "60000", "--exit-after-ms", "200"],
        serde_json::json!({}),
    );
    let (code, out, err) = cli_code(&sb, &["deploy", "crashy", "--wait"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("is not running: exited (exit status 3)"),
        "{err}"
    );
    assert!(
        err.contains("exiting after 200 ms as asked"),
        "the server's words: {err}"
    );
    assert!(err.contains("restart 1 is scheduled"), "{err}");
    let ps = sb.ok(&["ps", "--tool", "crashy"]);
    assert!(
        ps.contains("restarting: exited (exit status 3)"),
        "ps says why: {ps}"
    );

    // Never answers and may not be retried: FAILED, non-zero, with why.
    add_spec_tool(
        &sb,
        "mute",
        &["--never-ready"],
        serde_json::json!({"startup_timeout_ms": 300, "restart": {"max_start_failures": 1}}),
    );
    let (code, out, err) = cli_code(&sb, &["deploy", "mute", "--wait", "--json"]);
    assert_eq!(code, Some(1), "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["deployments"][0]["status"], "FAILED", "{v}");
    assert!(
        err.contains("is FAILED: never became ready (no answer"),
        "{err}"
    );
    assert!(err.contains("gave up after 1 failed start(s)"), "{err}");
    let ps = sb.ok(&["ps", "--all", "--tool", "mute"]);
    assert!(
        ps.contains("FAILED: never became ready") && ps.contains("gave up after 1 failed start"),
        "ps says why: {ps}"
    );

    // Still starting when the wait runs out: its own exit status.
    add_spec_tool(
        &sb,
        "slow",
        &["--startup-delay-ms", "60000"],
        serde_json::json!({"startup_timeout_ms": 120000}),
    );
    let (code, out, err) = cli_code(&sb, &["deploy", "slow", "--wait", "--timeout", "1"]);
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(err.contains("still STARTING after 1 s"), "{err}");

    // The help says all of it.
    let (code, help, _) = cli_code(&sb, &["deploy", "--help"]);
    assert_eq!(code, Some(0));
    for line in [
        "every deployment of the tool is RUNNING",
        "a restart is scheduled",
        "3  --wait gave up after --timeout",
    ] {
        assert!(help.contains(line), "{line}: {help}");
    }
}

#[test]
fn deploy_brings_a_tool_to_its_replicas_and_scale_changes_them() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Serve::start(dir.path(), &[]);
    let server = test_server_bin();
    // --replicas without --autostart.
    sb.ok(&[
        "tool",
        "add",
        "rep",
        "--replicas",
        "2",
        "--",
        server.to_str().unwrap(),
        "--port",
        "{port}",
    ]);
    let live = || {
        sb.json(&["ps", "--tool", "rep"])
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["status"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let out = sb.ok(&["deploy", "rep", "--wait"]);
    assert!(out.contains("started 2"), "{out}");
    assert_eq!(live(), ["RUNNING", "RUNNING"]);
    let out = sb.ok(&["deploy", "rep"]);
    assert!(out.contains("'rep' already has its 2 replica(s)"), "{out}");
    assert_eq!(live().len(), 2);

    let out = sb.ok(&["scale", "rep", "3", "--wait"]);
    assert!(out.contains("started 1, stopped 0"), "{out}");
    assert_eq!(live(), ["RUNNING", "RUNNING", "RUNNING"]);
    assert_eq!(sb.json(&["tool", "show", "rep"])["replicas"], 3);

    let out = sb.ok(&["scale", "rep", "1"]);
    assert!(out.contains("started 0, stopped 2"), "{out}");
    assert_eq!(live(), ["RUNNING"]);
    let stopped = sb.json(&["ps", "--tool", "rep", "--status", "STOPPED"]);
    assert_eq!(stopped.as_array().unwrap().len(), 2, "{stopped}");

    // Bad input: a clear error, a failing exit, nothing changed.
    let (code, _, err) = cli_code(&sb, &["scale", "rep", "65"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("replicas: must be between 0 and 64"), "{err}");
    let (code, _, err) = cli_code(&sb, &["scale", "nope", "1"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("tool_not_found"), "{err}");
    let (code, _, _) = cli_code(&sb, &["scale", "rep", "many"]);
    assert_eq!(code, Some(2), "a usage error");
    assert_eq!(live().len(), 1);

    sb.ok(&["scale", "rep", "0"]);
    assert!(live().is_empty());
    let out = sb.ok(&["deploy", "rep"]);
    assert!(out.contains("already has its 0 replica(s)"), "{out}");
}

/// `ps --all` keeps showing a deleted tool's deployments, marked as such.
#[test]
fn ps_all_shows_a_deleted_tools_deployments() {
    let dir = tempfile::tempdir().unwrap();
    let sb = Serve::start(dir.path(), &[]);
    add_server_tool(&sb, "brief");
    let d = sb.json(&["deploy", "brief", "--wait"])["deployments"][0].clone();
    let id = d["id"].as_str().unwrap();
    sb.ok(&["stop", id]);
    sb.ok(&["tool", "rm", "brief"]);
    let short = id.replace('-', "")[..12].to_owned();
    let table = sb.ok(&["ps", "--all"]);
    let row = table
        .lines()
        .find(|l| l.contains(&short))
        .unwrap_or_else(|| panic!("ps --all lost the deployment:\n{table}"));
    assert!(
        row.contains("brief (deleted)") && row.contains("STOPPED"),
        "{row}"
    );
    let all = sb.json(&["ps", "--all"]);
    let rec = all
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap();
    assert!(rec["tool_deleted_at"].is_string(), "{rec}");
}

/// At start, a config file that changes the transport of a tool whose deployment was kept
/// running is not applied (the adopted deployment could not follow it, and failing the start
/// would leave no API to stop it through): the refusal is logged and the stored tool stays.
#[test]
fn a_config_transport_change_under_a_kept_deployment_is_logged_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let cfg = files.path().join("sb.toml");
    let tool = |extra: &str| {
        format!(
            "[[tools]]\nslug = \"kept\"\ncommand = {:?}\nautostart = true\n{extra}\n",
            test_server_bin().to_str().unwrap()
        )
    };
    std::fs::write(&cfg, tool("args = [\"--port\", \"{port}\"]")).unwrap();
    let cfg_arg = cfg.to_str().unwrap();
    let mut sb = Serve::start(dir.path(), &["--on-exit", "keep", "--config", cfg_arg]);
    let running = || {
        sb.json(&["ps", "--tool", "kept", "--status", "RUNNING"])
            .as_array()
            .unwrap()
            .len()
    };
    let mut tries = 0;
    while running() != 1 {
        tries += 1;
        assert!(tries < 300, "autostart did not bring 'kept' up");
        std::thread::sleep(Duration::from_millis(100));
    }
    sb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(sb.wait().success());
    // Not dropped: its drop would kill the deployment kept for the next start.
    std::mem::forget(sb);

    std::fs::write(&cfg, tool("args = [\"--stdio\"]\ntransport = \"stdio\"")).unwrap();
    let sb = Serve::start(dir.path(), &["--config", cfg_arg]);
    let head = sb.head.join("\n");
    assert!(
        head.contains("Config change refused")
            && head.contains("'kept'")
            && head.contains("stop them before changing its transport to stdio"),
        "{head}"
    );
    assert_eq!(
        sb.json(&["tool", "show", "kept"])["transport"],
        "streamable-http"
    );
    let live = sb.json(&["ps", "--tool", "kept"]);
    assert_eq!(live.as_array().unwrap().len(), 1, "{live}");
    assert_eq!(live[0]["status"], "RUNNING", "{live}");
}
