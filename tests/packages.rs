//! Installing MCP servers named by package (`npx:`, `uvx:`) from the real npm registry and
//! PyPI, and the errors for missing packages and unreachable registries.
#![allow(clippy::unwrap_used)]

use std::{
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use switchboard::packages::{Installed, Package, PackageError, Registries, ensure_installed};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const EVERYTHING: &str = "npx:@modelcontextprotocol/server-everything@2026.8.31";
const TIME: &str = "uvx:mcp-server-time==2026.10.19";

/// Fails (never skips) when an installer is missing, saying how to get it.
fn require(program: &str, args: &[&str], install: &str) {
    let ok = std::process::Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "`{program}` is needed by these tests: {install}");
}

fn require_npm() {
    require(
        "npm",
        &["--version"],
        "apt-get install nodejs npm (Node.js ≥ 20)",
    );
}

fn require_python() {
    require(
        "python3",
        &["-m", "venv", "--help"],
        "apt-get install python3 python3-venv",
    );
}

fn package(command: &str) -> Package {
    Package::parse(command).unwrap().unwrap()
}

/// A progress callback that records the lines it gets.
fn recorder() -> (
    Arc<Mutex<Vec<String>>>,
    impl Fn(&str) + Send + Sync + 'static,
) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    (lines, move |l: &str| {
        sink.lock().unwrap().push(l.to_owned())
    })
}

async fn install(
    command: &str,
    dir: &Path,
    registries: &Registries,
) -> (Result<Installed, PackageError>, Vec<String>) {
    let (lines, progress) = recorder();
    let result = ensure_installed(&package(command), dir, registries, &progress).await;
    let lines = lines.lock().unwrap().clone();
    (result, lines)
}

/// Starts the installed server over stdio, sends `initialize` and returns its reply.
async fn initialize(installed: &Installed) -> Value {
    let mut child = tokio::process::Command::new(&installed.program)
        .args(&installed.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {installed:?}: {e}"));
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "0"},
    }});
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{request}\n").as_bytes())
        .await
        .unwrap();
    stdin.flush().await.unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // A guard against a hang, not a timing assertion.
    let reply = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["id"] == 1
            {
                return v;
            }
        }
        panic!("{installed:?} closed stdout without replying to initialize");
    })
    .await
    .unwrap_or_else(|_| panic!("{installed:?} did not reply to initialize"));
    drop(stdin);
    let _ = child.kill().await;
    reply
}

/// Installs, reinstalls from the cache, and proves the result is a working MCP server.
async fn installs_caches_and_runs(command: &str, server_name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let registries = Registries::default();

    let (first, lines) = install(command, dir.path(), &registries).await;
    let first = first.unwrap_or_else(|e| panic!("{e}\n{}", lines.join("\n")));
    eprintln!("{}", lines.join("\n"));
    assert!(lines[0].starts_with("installing "), "{lines:?}");
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with(&format!("installed {command} in ")),
        "{lines:?}"
    );
    assert!(lines.len() > 2, "installer output is forwarded: {lines:?}");
    assert!(first.program.is_file(), "{first:?}");
    assert!(
        first.program.starts_with(dir.path()),
        "installed inside the packages dir: {first:?}"
    );

    let (second, lines) = install(command, dir.path(), &registries).await;
    assert_eq!(second.unwrap(), first);
    assert_eq!(lines.len(), 1, "no installer ran: {lines:?}");
    assert!(
        lines[0].starts_with("using cached install of "),
        "{lines:?}"
    );

    let reply = initialize(&first).await;
    assert_eq!(
        reply["result"]["serverInfo"]["name"], server_name,
        "{reply}"
    );
    assert!(reply["result"]["capabilities"].is_object(), "{reply}");

    // Only the install and the caches are left in the data directory.
    let mut left: Vec<_> = std::fs::read_dir(dir.path().join(if command.starts_with("npx:") {
        "npm"
    } else {
        "pypi"
    }))
    .unwrap()
    .map(|e| e.unwrap().file_name().into_string().unwrap())
    .filter(|n| !n.starts_with(".lock-"))
    .collect();
    left.sort();
    assert_eq!(left.len(), 1, "no partial install left: {left:?}");
}

#[tokio::test]
async fn npm_package_installs_is_cached_and_serves_mcp() {
    require_npm();
    installs_caches_and_runs(EVERYTHING, "mcp-servers/everything").await;
}

#[tokio::test]
async fn pypi_package_installs_is_cached_and_serves_mcp() {
    require_python();
    installs_caches_and_runs(TIME, "mcp-time").await;
}

#[tokio::test]
async fn a_package_that_does_not_exist_is_not_found() {
    require_npm();
    require_python();
    let dir = tempfile::tempdir().unwrap();
    for (command, name) in [
        (
            "npx:@modelcontextprotocol/this-does-not-exist-switchboard@1.0.0",
            "@modelcontextprotocol/this-does-not-exist-switchboard",
        ),
        (
            "uvx:switchboard-no-such-package-xyz==1.0",
            "switchboard-no-such-package-xyz",
        ),
        // An existing package at a version that does not exist.
        (
            "npx:@modelcontextprotocol/server-everything@1999.0.0",
            "@modelcontextprotocol/server-everything@1999.0.0",
        ),
        ("uvx:mcp-server-time==1999.1", "mcp-server-time==1999.1"),
    ] {
        let (result, lines) = install(command, dir.path(), &Registries::default()).await;
        let e = result.unwrap_err();
        eprintln!("{command}: {e}");
        assert!(
            matches!(e, PackageError::NotFound { .. }),
            "{command}: {e:?}\n{}",
            lines.join("\n")
        );
        let message = e.to_string();
        assert!(message.contains(name), "{message}");
        assert!(message.contains("check the package name"), "{message}");
    }
    for kind in ["npm", "pypi"] {
        let left: Vec<_> = std::fs::read_dir(dir.path().join(kind))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with(".lock-"))
            .collect();
        assert!(left.is_empty(), "failed installs leave nothing: {left:?}");
    }
}

#[tokio::test]
async fn an_unreachable_registry_is_reported_as_such() {
    require_npm();
    require_python();
    let dir = tempfile::tempdir().unwrap();
    let registries = Registries {
        npm: Some("http://127.0.0.1:1/".into()),
        pypi_index: Some("http://127.0.0.1:1/simple".into()),
    };
    for (command, registry) in [
        (EVERYTHING, "http://127.0.0.1:1/"),
        (TIME, "http://127.0.0.1:1/simple"),
    ] {
        let (result, lines) = install(command, dir.path(), &registries).await;
        let e = result.unwrap_err();
        eprintln!("{command}: {e}");
        let PackageError::RegistryUnreachable {
            registry: reported, ..
        } = &e
        else {
            panic!("{command}: {e:?}\n{}", lines.join("\n"));
        };
        assert_eq!(reported, registry);
        let message = e.to_string();
        assert!(message.contains(command), "{message}");
        assert!(message.contains("Connection refused") || message.contains("ECONNREFUSED"));
    }
}

#[tokio::test]
async fn concurrent_installs_of_one_package_install_it_once() {
    require_npm();
    let dir = tempfile::tempdir().unwrap();
    let registries = Registries::default();
    let (a, b) = tokio::join!(
        install(EVERYTHING, dir.path(), &registries),
        install(EVERYTHING, dir.path(), &registries),
    );
    let (a, a_lines) = a;
    let (b, b_lines) = b;
    let a = a.unwrap_or_else(|e| panic!("{e}\n{}", a_lines.join("\n")));
    let b = b.unwrap_or_else(|e| panic!("{e}\n{}", b_lines.join("\n")));
    assert_eq!(a, b);
    let installs = a_lines
        .iter()
        .chain(&b_lines)
        .filter(|l| l.starts_with("installing "))
        .count();
    assert_eq!(installs, 1, "{a_lines:?}\n{b_lines:?}");
    let (waiter, _) = if a_lines[0].starts_with("installing ") {
        (&b_lines, &a_lines)
    } else {
        (&a_lines, &b_lines)
    };
    assert!(
        waiter[0].starts_with("waiting for another installation"),
        "{waiter:?}"
    );
    assert!(
        waiter[1].contains("just installed") && waiter[1].contains("by another deployment"),
        "{waiter:?}"
    );
}

/// What a crash mid-install leaves (a partial directory) is removed and the install redone.
#[tokio::test]
async fn a_crashed_install_is_redone_not_used() {
    require_python();
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("pypi/.partial-mcp-server-time==2026.10.19");
    std::fs::create_dir_all(partial.join("bin")).unwrap();
    std::fs::write(partial.join("bin/mcp-server-time"), "garbage").unwrap();
    let (result, lines) = install(TIME, dir.path(), &Registries::default()).await;
    let installed = result.unwrap_or_else(|e| panic!("{e}\n{}", lines.join("\n")));
    assert!(lines[0].starts_with("installing "), "{lines:?}");
    assert!(!partial.exists());
    assert!(installed.program.is_file());
}
