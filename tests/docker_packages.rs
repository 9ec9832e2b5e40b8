//! `npx:` / `uvx:` packages in containers (`runtime = "docker"`): installed from the real npm
//! registry and PyPI by installers running in containers of a base image, into a Docker volume
//! (never the host's data directory), cached like host installs, and run by containers that
//! mount the volume read-only (HTTP servers as the deployment's container, stdio servers as
//! its bridge's). Against a real dockerd with images built locally by
//! `scripts/docker-node-image` (a Debian minbase with Node and npm; `--python`: with python3
//! and venv); `scripts/with-docker` starts dockerd and sets SWITCHBOARD_TEST_NODE_IMAGE and
//! SWITCHBOARD_TEST_PYTHON_IMAGE. Nothing is pulled.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    process::Command,
    sync::{Arc, Mutex},
};

use common::{AppOptions, TestApp, docker};
use serde_json::{Value, json};
use switchboard::{
    packages::{Installed, Package, PackageError, Registries, Volume, ensure_installed_in_volume},
    runtime::{ContainerLaunch, container::DockerSecurity},
};

const EVERYTHING: &str = "npx:@modelcontextprotocol/server-everything@2026.8.31";
const TIME: &str = "uvx:mcp-server-time==2026.10.19";

/// An image from scripts/with-docker, or a failure saying how to get it (no silent skip).
fn image(var: &str) -> String {
    let tag = std::env::var(var).unwrap_or_default();
    assert!(
        !tag.is_empty(),
        "{var} is not set: run these tests through scripts/with-docker \
         (`scripts/with-docker cargo nextest run --test docker_packages`), which starts dockerd \
         and builds the test images (Debian minbase with debootstrap; nothing is pulled)"
    );
    tag
}

fn node_image() -> String {
    image("SWITCHBOARD_TEST_NODE_IMAGE")
}

fn python_image() -> String {
    image("SWITCHBOARD_TEST_PYTHON_IMAGE")
}

fn volume_exists(name: &str) -> bool {
    Command::new("docker")
        .args(["volume", "inspect", name])
        .output()
        .unwrap()
        .status
        .success()
}

/// The volumes of a node, removed when the test ends however it ends (volumes are caches
/// meant to outlive deployments, so nothing else removes them).
struct NodeVolumes(String);

impl NodeVolumes {
    fn list(&self) -> Vec<String> {
        docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label=switchboard.node={}", self.0),
        ])
        .lines()
        .map(str::to_owned)
        .collect()
    }
}

impl Drop for NodeVolumes {
    fn drop(&mut self) {
        // Containers first: a volume in use cannot be removed.
        let filter = format!("label=switchboard.node={}", self.0);
        if let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        for v in self.list() {
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f", &v])
                .output();
        }
    }
}

fn package(command: &str) -> Package {
    Package::parse(command).unwrap().unwrap()
}

async fn engine() -> bollard::Docker {
    bollard::Docker::connect_with_local_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap_or_else(|e| panic!("no Docker engine ({e}): run through scripts/with-docker"))
}

/// The volume a node of this test would install `command` into, built in `image`.
async fn volume_for(
    command: &str,
    image: &str,
    node: &str,
    packages_dir: &std::path::Path,
) -> Volume {
    let docker = engine().await;
    let image_id = docker.inspect_image(image).await.unwrap().id.unwrap();
    let launch = ContainerLaunch {
        image: image.to_owned(),
        pull: Default::default(),
        network: Default::default(),
        user: "65534:65534".to_owned(),
        security: DockerSecurity::default(),
        tool: "t".to_owned(),
        mounts: Vec::new(),
    };
    Volume::new(
        docker,
        &package(command),
        &launch,
        &image_id,
        node,
        packages_dir,
    )
}

async fn install(
    command: &str,
    volume: &Volume,
    registries: &Registries,
) -> (Result<Installed, PackageError>, Vec<String>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let progress = move |l: &str| sink.lock().unwrap().push(l.to_owned());
    let result = ensure_installed_in_volume(&package(command), volume, registries, &progress).await;
    let lines = lines.lock().unwrap().clone();
    (result, lines)
}

/// The names of a data directory's entries (what a host install would have written).
fn entries(dir: &std::path::Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(d) => d
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Installs in a volume, reuses it, and installs once for concurrent callers; nothing of the
/// package lands on the host.
async fn installs_into_a_volume_once(command: &str, image: &str, program_under: &str) {
    let node = format!("test-{}", uuid::Uuid::new_v4().simple());
    let _cleanup = NodeVolumes(node.clone());
    let dir = tempfile::tempdir().unwrap();
    let volume = volume_for(command, image, &node, dir.path()).await;
    let registries = Registries::default();

    let ((a, a_lines), (b, b_lines)) = tokio::join!(
        install(command, &volume, &registries),
        install(command, &volume, &registries),
    );
    let a = a.unwrap_or_else(|e| panic!("{e}\n{}", a_lines.join("\n")));
    let b = b.unwrap_or_else(|e| panic!("{e}\n{}", b_lines.join("\n")));
    assert_eq!(a, b);
    let (installer, waiter) = if a_lines[0].starts_with("installing ") {
        (&a_lines, &b_lines)
    } else {
        (&b_lines, &a_lines)
    };
    eprintln!("{}", installer.join("\n"));
    assert!(
        installer[0].contains(&format!("into volume {}", volume.name())),
        "{installer:?}"
    );
    assert!(
        installer.len() > 2,
        "installer output is forwarded: {installer:?}"
    );
    assert!(
        installer
            .last()
            .unwrap()
            .starts_with(&format!("installed {command} in ")),
        "{installer:?}"
    );
    assert!(
        !waiter.iter().any(|l| l.starts_with("installing ")),
        "one install for two callers: {waiter:?}"
    );
    assert!(
        waiter
            .iter()
            .any(|l| l.contains("just installed") || l.starts_with("using cached")),
        "{waiter:?}"
    );
    assert!(
        a.program.starts_with(program_under),
        "a path inside the container: {a:?}"
    );

    // The volume is labelled for its node and package; the host has nothing of it.
    let labels: Value = serde_json::from_str(&docker(&[
        "volume",
        "inspect",
        "--format",
        "{{json .Labels}}",
        volume.name(),
    ]))
    .unwrap();
    assert_eq!(labels["switchboard.node"], node.as_str(), "{labels}");
    assert_eq!(labels["switchboard.package"], command, "{labels}");
    let host: Vec<String> = entries(dir.path())
        .into_iter()
        .filter(|e| e != "volumes")
        .collect();
    assert!(host.is_empty(), "nothing installed on the host: {host:?}");

    let (again, lines) = install(command, &volume, &registries).await;
    assert_eq!(again.unwrap(), a);
    assert_eq!(lines.len(), 1, "no installer ran: {lines:?}");
    assert!(
        lines[0].starts_with(&format!("using cached install of {command} in volume ")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn an_npm_package_installs_into_a_volume_once_and_is_reused() {
    installs_into_a_volume_once(EVERYTHING, &node_image(), "/pkg/npm/node_modules/").await;
}

#[tokio::test]
async fn a_pypi_package_installs_into_a_volume_once_and_is_reused() {
    installs_into_a_volume_once(TIME, &python_image(), "/pkg/venv/bin/").await;
}

/// A volume without its marker (an install that crashed) is never used: it is rebuilt.
#[tokio::test]
async fn an_unfinished_volume_is_rebuilt_not_used() {
    let node = format!("test-{}", uuid::Uuid::new_v4().simple());
    let _cleanup = NodeVolumes(node.clone());
    let dir = tempfile::tempdir().unwrap();
    let image = python_image();
    let volume = volume_for(TIME, &image, &node, dir.path()).await;
    // What a crash mid-install leaves: the program there, the marker not.
    docker(&[
        "volume",
        "create",
        "--label",
        &format!("switchboard.node={node}"),
        volume.name(),
    ]);
    docker(&[
        "run",
        "--rm",
        "-v",
        &format!("{}:/pkg", volume.name()),
        &image,
        "sh",
        "-c",
        "mkdir -p /pkg/venv/bin && echo garbage > /pkg/venv/bin/mcp-server-time",
    ]);
    let (result, lines) = install(TIME, &volume, &Registries::default()).await;
    result.unwrap_or_else(|e| panic!("{e}\n{}", lines.join("\n")));
    assert!(lines[0].starts_with("installing "), "{lines:?}");
    let script = docker(&[
        "run",
        "--rm",
        "-v",
        &format!("{}:/pkg:ro", volume.name()),
        &image,
        "cat",
        "/pkg/venv/bin/mcp-server-time",
    ]);
    assert!(script.contains("python"), "a real console script: {script}");
}

/// A package the registry does not have fails as on the host (`NotFound`), and the failed
/// install's volume is removed.
#[tokio::test]
async fn a_missing_package_fails_as_on_the_host_and_leaves_no_volume() {
    let node = format!("test-{}", uuid::Uuid::new_v4().simple());
    let cleanup = NodeVolumes(node.clone());
    let dir = tempfile::tempdir().unwrap();
    for (command, image, name) in [
        (
            "npx:@modelcontextprotocol/server-everything@1999.0.0",
            node_image(),
            "@modelcontextprotocol/server-everything@1999.0.0",
        ),
        (
            "uvx:mcp-server-time==1999.0.0",
            python_image(),
            "mcp-server-time==1999.0.0",
        ),
    ] {
        let volume = volume_for(command, &image, &node, dir.path()).await;
        let (result, lines) = install(command, &volume, &Registries::default()).await;
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
        assert!(
            !volume_exists(volume.name()),
            "{command}: its volume is removed"
        );
    }
    assert!(cleanup.list().is_empty(), "{:?}", cleanup.list());
}

/// The `[packages]` registry settings reach the installers in the container (through their
/// environment): an unreachable one is reported as such, naming it, as on the host.
#[tokio::test]
async fn the_configured_registries_are_used_in_the_container() {
    let node = format!("test-{}", uuid::Uuid::new_v4().simple());
    let cleanup = NodeVolumes(node.clone());
    let dir = tempfile::tempdir().unwrap();
    // The container's own loopback: nothing listens there.
    let registries = Registries {
        npm: Some("http://127.0.0.1:1/".into()),
        pypi_index: Some("http://127.0.0.1:1/simple".into()),
    };
    for (command, image, registry) in [
        (EVERYTHING, node_image(), "http://127.0.0.1:1/"),
        (TIME, python_image(), "http://127.0.0.1:1/simple"),
    ] {
        let volume = volume_for(command, &image, &node, dir.path()).await;
        let (result, lines) = install(command, &volume, &registries).await;
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
        assert!(
            message.contains("Connection refused") || message.contains("ECONNREFUSED"),
            "{message}"
        );
    }
    assert!(cleanup.list().is_empty(), "{:?}", cleanup.list());
}

/// An image without the installer fails naming the image and what it lacks.
#[tokio::test]
async fn an_image_without_the_installer_is_named() {
    let node = format!("test-{}", uuid::Uuid::new_v4().simple());
    let _cleanup = NodeVolumes(node.clone());
    let dir = tempfile::tempdir().unwrap();
    // The Python image has no npm.
    let image = python_image();
    let volume = volume_for(EVERYTHING, &image, &node, dir.path()).await;
    let (result, lines) = install(EVERYTHING, &volume, &Registries::default()).await;
    let e = result.unwrap_err();
    assert!(
        matches!(e, PackageError::MissingInImage { tool: "npm", .. }),
        "{e:?}\n{}",
        lines.join("\n")
    );
    let message = e.to_string();
    assert!(
        message.contains(&image) && message.contains("node_image"),
        "{message}"
    );
}

/// Collects a Switchboard's events (as JSON) from its SSE stream, from now on.
async fn collect_events(app: &TestApp) -> Arc<Mutex<Vec<Value>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    // Subscribed once the headers are back.
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/events", app.url))
        .send()
        .await
        .unwrap();
    tokio::spawn(async move {
        use futures_util::StreamExt as _;
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                for line in event.lines() {
                    if let Some(data) = line.strip_prefix("data:")
                        && let Ok(v) = serde_json::from_str::<Value>(data.trim())
                    {
                        sink.lock().unwrap().push(v);
                    }
                }
            }
        }
    });
    seen
}

/// The install events' messages of deployment `id`.
fn install_lines(events: &Mutex<Vec<Value>>, id: &str) -> Vec<String> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["deployment"] == id && e["kind"] == "install")
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect()
}

fn options() -> AppOptions {
    let mut docker = switchboard::config::DockerConfig::default();
    docker.images.node = node_image();
    docker.images.python = python_image();
    AppOptions {
        docker,
        ..Default::default()
    }
}

/// What a package tool in a container is deployed as and asked.
struct Case<'a> {
    slug: &'a str,
    command: &'a str,
    args: &'a [&'a str],
    transport: &'a str,
    /// Where the program is, inside the container.
    program_under: &'a str,
    base_image: String,
    tool: &'a str,
    call_args: &'a str,
    /// Text the call's result must contain.
    answer: &'a str,
}

/// Calls the case's tool with the Python SDK through `url` and checks the answer.
async fn call_tool(url: &str, case: &Case<'_>) {
    let called = common::mcp_client(&[
        "--url",
        url,
        "call-tool",
        case.tool,
        "--args",
        case.call_args,
    ])
    .await;
    assert!(
        called["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains(case.answer),
        "{called}"
    );
}

/// The containers serving deployment `d`: its own (an HTTP server), or its bridge's server
/// processes (stdio).
fn serving_containers(d: &Value) -> Vec<Value> {
    let ids = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=switchboard.deployment={}", d["id"].as_str().unwrap()),
    ]);
    ids.lines()
        .map(|id| {
            let v: Value = serde_json::from_str(&docker(&["inspect", id])).unwrap();
            v[0].clone()
        })
        .collect()
}

/// A package tool with runtime docker and no image: installed in the configured base image
/// into a volume, served by containers that mount it read-only, reached by the Python SDK
/// through `/mcp/{slug}`; a second deployment reuses the install.
async fn runs_in_a_container_from_its_volume(case: Case<'_>) {
    let app = TestApp::with(options()).await;
    let events = collect_events(&app).await;
    app.add_tool(json!({
        "slug": case.slug,
        "runtime": "docker",
        "transport": case.transport,
        "command": case.command,
        "args": case.args,
        "endpoint_path": "/mcp",
        "startup_timeout_ms": 60000,
        "stop_grace_period_ms": 2000,
    }))
    .await;
    let d = app.deploy_wait(case.slug).await;
    let volumes = NodeVolumes(d["node_id"].as_str().unwrap().to_owned());
    assert_eq!(d["status"], "RUNNING", "{d}");
    assert_eq!(d["runtime"], "docker", "{d}");
    let id = d["id"].as_str().unwrap().to_owned();
    let lines = install_lines(&events, &id);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("installing ") && l.contains("into volume switchboard-pkg-")),
        "{lines:?}"
    );

    let url = format!("{}/mcp/{}", app.url, case.slug);
    let listed = common::mcp_client(&["--url", &url, "list-tools"]).await;
    assert!(
        listed["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == case.tool),
        "{listed}"
    );
    call_tool(&url, &case).await;

    // The server runs in a container of the base image that mounts the package's volume
    // read-only, and runs the package's program from it.
    let listed_volumes = volumes.list();
    assert_eq!(listed_volumes.len(), 1, "{listed_volumes:?}");
    let containers = serving_containers(&d);
    assert!(!containers.is_empty(), "{d}");
    for c in &containers {
        let mounts = &c["Mounts"];
        assert_eq!(mounts[0]["Type"], "volume", "{mounts}");
        assert_eq!(mounts[0]["Name"], listed_volumes[0].as_str(), "{mounts}");
        assert_eq!(mounts[0]["Destination"], "/pkg", "{mounts}");
        assert_eq!(mounts[0]["RW"], false, "{mounts}");
        assert_eq!(c["Config"]["Image"], case.base_image.as_str());
        let program = c["Config"]["Entrypoint"][0].as_str().unwrap();
        assert!(program.starts_with(case.program_under), "{}", c["Config"]);
    }
    // Nothing of the package on the host.
    let packages = app.data_dir.path().join("packages");
    let host: Vec<String> = entries(&packages)
        .into_iter()
        .filter(|e| e != "volumes")
        .collect();
    assert!(host.is_empty(), "{host:?}");

    // Another deployment uses the install.
    app.stop_deployment(&id).await;
    let again = app.deploy_wait(case.slug).await;
    assert_eq!(again["status"], "RUNNING", "{again}");
    let lines = install_lines(&events, again["id"].as_str().unwrap());
    let cached = format!("using cached install of {} in volume ", case.command);
    assert!(lines.iter().any(|l| l.starts_with(&cached)), "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.starts_with("installing ")),
        "{lines:?}"
    );
    call_tool(&url, &case).await;
    app.stop_deployment(again["id"].as_str().unwrap()).await;
    app.stop().await;
    drop(volumes);
}

/// server-everything in one of its modes (`stdio`, or `streamableHttp` on $PORT).
fn everything<'a>(slug: &'a str, mode: &'a [&'a str], transport: &'a str) -> Case<'a> {
    Case {
        slug,
        command: EVERYTHING,
        args: mode,
        transport,
        program_under: "/pkg/npm/node_modules/@modelcontextprotocol/server-everything/",
        base_image: node_image(),
        tool: "echo",
        call_args: r#"{"message":"from a volume"}"#,
        answer: "from a volume",
    }
}

#[tokio::test]
async fn an_npx_stdio_tool_runs_in_containers_from_its_volume() {
    runs_in_a_container_from_its_volume(everything("ev", &["stdio"], "stdio")).await;
}

#[tokio::test]
async fn an_npx_http_tool_runs_in_a_container_from_its_volume() {
    runs_in_a_container_from_its_volume(everything(
        "evhttp",
        &["streamableHttp"],
        "streamable-http",
    ))
    .await;
}

#[tokio::test]
async fn a_uvx_stdio_tool_runs_in_containers_from_its_volume() {
    runs_in_a_container_from_its_volume(Case {
        slug: "time",
        command: TIME,
        args: &[],
        transport: "stdio",
        // The venv's interpreter, running its console script.
        program_under: "/pkg/venv/bin/python",
        base_image: python_image(),
        tool: "get_current_time",
        call_args: r#"{"timezone":"UTC"}"#,
        answer: "UTC",
    })
    .await;
}

/// A base image that is not on the host fails the deployment naming the image and the
/// setting, without pulling it.
#[tokio::test]
async fn a_missing_base_image_is_named_with_its_setting() {
    let mut opts = options();
    opts.docker.images.node = "switchboard-test-absent:none".to_owned();
    let app = TestApp::with(opts).await;
    app.add_tool(json!({
        "slug": "nobase",
        "runtime": "docker",
        "command": EVERYTHING,
        "args": ["streamableHttp"],
    }))
    .await;
    let (_, d) = app
        .call("POST", "/api/v1/tools/nobase/deployments?wait=true", None)
        .await;
    let d = app.wait_status(d["id"].as_str().unwrap(), "FAILED").await;
    let error = d["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("switchboard-test-absent:none")
            && error.contains("[docker] node_image")
            && error.contains("pull"),
        "{d}"
    );
    app.stop().await;
}
