//! MCP servers named by package instead of a command: `npx:<name>[@version]` (npm) and
//! `uvx:<name>[==version]` (PyPI).
//!
//! [`ensure_installed`] installs the package into Switchboard's data directory the first time a
//! tool that names it is deployed, and reuses that install afterwards, so a deployment does not
//! depend on the registry once the package is there, and nothing is written outside the data
//! directory (npm's and pip's caches live in it too).
//!
//! Layout under `packages_dir`:
//!
//! ```text
//! npm/<name>@<version>/          npm install --prefix (scoped names: `@scope+name@1.0.0`)
//! pypi/<spec>/                   a venv with the package (`mcp-server-time==2026.10.19`)
//! <kind>/.partial-<dir>/         an install under way; renamed to <dir> when complete
//! <kind>/.lock-<dir>             flock(2) held while one installer works on <dir>
//! .npm-cache/, .pip-cache/       the installers' download caches
//! ```
//!
//! Invariants: a directory `<kind>/<dir>` exists only once its install is complete (it is built
//! as `.partial-<dir>` and renamed into place, its `.installed` marker written before the
//! rename), so a crash mid-install never leaves something that looks installed; one installer
//! at a time works on a package (an exclusive `flock` on `.lock-<dir>`, which serializes both
//! two deployments in this process and two processes), and whoever waited for it then finds the
//! finished install and uses it. Names are validated strictly (no shell metacharacters, no
//! whitespace, no leading `-`), though no shell is ever involved: such characters are never
//! part of a package name, and a strict rule keeps installer arguments from being read as
//! options, paths or URLs.

use std::{
    collections::VecDeque,
    fmt,
    io::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Mutex,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::Command,
};

mod volume;
pub use volume::{MOUNT, PACKAGE_LABEL, Volume};

/// How long one install may take (including waiting for a concurrent one) before it is
/// abandoned. Generous: a large npm dependency tree on a slow link takes minutes, but an
/// installer stuck on a dead connection must not hold a deployment forever.
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Written inside an install directory as its last file, before the rename into place.
const MARKER: &str = ".installed";

/// Output lines kept for classifying a failure and quoting it in the error.
const KEPT_LINES: usize = 200;
/// Output lines quoted in [`PackageError::InstallFailed`].
const QUOTED_LINES: usize = 15;
/// Longest output line kept or forwarded (installers can print huge minified lines).
const MAX_LINE: usize = 2000;

const NPM_DEFAULT_REGISTRY: &str = "https://registry.npmjs.org/";
const PYPI_DEFAULT_INDEX: &str = "https://pypi.org/simple";

/// A package a tool's `command` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Package {
    /// `npx:<name>[@<version>]`; `name` may be scoped (`@scope/name`). `version` is whatever
    /// npm accepts after `@` (a version, a range like `^1.2`, or a tag like `latest`).
    Npm {
        name: String,
        version: Option<String>,
    },
    /// `uvx:<name>[[extras]][==<version>|@<version>]`. `name` (without extras) names the console
    /// script to run, as with uvx; `spec` is the pip requirement (`mcp-server-time==2026.10.19`).
    PyPi { name: String, spec: String },
}

/// Registry overrides, for private registries and mirrors. `None` means the installer's own
/// configuration (npm's `registry`, pip's index; default the public registries).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registries {
    /// Passed to npm as `--registry`.
    pub npm: Option<String>,
    /// Passed to pip as `--index-url` (an `http://` URL is also marked `--trusted-host`, which
    /// pip otherwise silently ignores for any host but localhost).
    pub pypi_index: Option<String>,
}

/// The images package tools in containers are installed in and run by, unless the tool names
/// its own (`[docker] node_image`, `python_image`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImages {
    pub node: String,
    pub python: String,
}

/// The official Node.js image (npm included). Like any tool image, it is pulled only where
/// the tool says `pull = "missing"`; otherwise it must be on the host (`docker pull`).
pub const DEFAULT_NODE_IMAGE: &str = "node:22-bookworm-slim";
/// The official Python image (venv and pip included), pulled on the same terms.
pub const DEFAULT_PYTHON_IMAGE: &str = "python:3.12-slim-bookworm";

impl Default for BaseImages {
    fn default() -> Self {
        BaseImages {
            node: DEFAULT_NODE_IMAGE.to_owned(),
            python: DEFAULT_PYTHON_IMAGE.to_owned(),
        }
    }
}

impl BaseImages {
    /// The base image for `pkg`, and the config key that sets it (for messages).
    pub fn of(&self, pkg: &Package) -> (&str, &'static str) {
        match pkg {
            Package::Npm { .. } => (&self.node, "[docker] node_image"),
            Package::PyPi { .. } => (&self.python, "[docker] python_image"),
        }
    }
}

/// What to execute for an installed package. The tool's own args go after `args`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub program: PathBuf,
    pub args: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("invalid package command {command:?}: {reason}")]
    Invalid { command: String, reason: String },
    #[error(
        "package {package} does not exist on {registry} ({detail}); check the package name and \
         version (a private package also needs the registry's credentials in the installer's \
         configuration)"
    )]
    NotFound {
        package: String,
        registry: String,
        detail: String,
    },
    #[error(
        "cannot reach the package registry {registry} to install {package} ({detail}); check the \
         network and proxy settings, or configure a reachable registry or mirror"
    )]
    RegistryUnreachable {
        package: String,
        registry: String,
        detail: String,
    },
    #[error("installing {package} failed:\n{detail}")]
    InstallFailed { package: String, detail: String },
    #[error("{tool} is needed to install this package but could not be run: {hint}")]
    MissingTool {
        tool: &'static str,
        hint: &'static str,
    },
    #[error(
        "the image {image} has no {tool} to install this package with: use an image that has \
         it ([docker] node_image or python_image in the config, or the tool's image)"
    )]
    MissingInImage { tool: &'static str, image: String },
    /// The container engine failed a request of a container install.
    #[error("docker: {context}: {error}")]
    Engine { context: String, error: String },
    #[error(
        "package {package} installed, but it has no executable to run as an MCP server \
         (found: {}); name the program in the tool's command instead",
        if candidates.is_empty() { "none".to_owned() } else { candidates.join(", ") }
    )]
    NoExecutable {
        package: String,
        candidates: Vec<String>,
    },
    #[error("installing {package} did not finish within {} s; it was stopped (retry the deployment, or check the registry's speed)", after.as_secs())]
    Timeout { package: String, after: Duration },
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PackageError {
    let context = context.into();
    move |error| PackageError::Io { context, error }
}

impl Package {
    /// Reads a tool's `command`: `None` if it names no package (an ordinary program), else the
    /// package or why the name is malformed.
    pub fn parse(command: &str) -> Option<Result<Package, PackageError>> {
        let (npm, rest) = if let Some(rest) = command.strip_prefix("npx:") {
            (true, rest)
        } else if let Some(rest) = command.strip_prefix("uvx:") {
            (false, rest)
        } else {
            return None;
        };
        let invalid = |reason: String| PackageError::Invalid {
            command: command.to_owned(),
            reason,
        };
        Some(
            check_chars(rest)
                .and_then(|()| {
                    if npm {
                        parse_npm(rest)
                    } else {
                        parse_pypi(rest)
                    }
                })
                .map_err(invalid),
        )
    }

    /// The installer's name for the package, for messages: `@scope/name@1.0.0`,
    /// `mcp-server-time==1.0`.
    fn spec(&self) -> String {
        match self {
            Package::Npm {
                name,
                version: Some(v),
            } => format!("{name}@{v}"),
            Package::Npm {
                name,
                version: None,
            } => name.clone(),
            Package::PyPi { spec, .. } => spec.clone(),
        }
    }

    fn kind_dir(&self) -> &'static str {
        match self {
            Package::Npm { .. } => "npm",
            Package::PyPi { .. } => "pypi",
        }
    }

    /// The install directory's name, one per distinct spec. Injective: `/` (only in scoped
    /// npm names) becomes `+` (never in npm names, and a version comes after the `@` that
    /// ends the name); `[`/`]` (only around pip extras) become `(`/`)` (never valid in specs).
    fn dir_name(&self) -> String {
        self.spec()
            .chars()
            .map(|c| match c {
                '/' => '+',
                '[' => '(',
                ']' => ')',
                c => c,
            })
            .collect()
    }
}

impl fmt::Display for Package {
    /// The command form (`npx:...`, `uvx:...`), as the user wrote it up to normalization.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Package::Npm { .. } => write!(f, "npx:{}", self.spec()),
            Package::PyPi { .. } => write!(f, "uvx:{}", self.spec()),
        }
    }
}

/// Rejects what no package spec contains, with a reason a user can act on.
fn check_chars(rest: &str) -> Result<(), String> {
    if rest.is_empty() {
        return Err("the package name is empty".into());
    }
    if rest.chars().any(char::is_whitespace) {
        return Err(
            "a package command is one package name without spaces; put the server's \
             arguments in the tool's args"
                .into(),
        );
    }
    if let Some(c) = rest.chars().find(|c| "\"'`$;&|<>()*?!{}\\#".contains(*c)) {
        return Err(format!(
            "{c:?} is not allowed in a package name (package commands are not run by a shell)"
        ));
    }
    if let Some(c) = rest.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
        return Err(format!("{c:?} is not allowed in a package name"));
    }
    Ok(())
}

fn npm_part_ok(part: &str) -> bool {
    !part.is_empty()
        && !part.starts_with(['.', '_', '-'])
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._~-".contains(c))
}

fn parse_npm(rest: &str) -> Result<Package, String> {
    // A scoped name starts with '@', so the version separator is the next '@'.
    let at = match rest.strip_prefix('@') {
        Some(scoped) => scoped.find('@').map(|i| i + 1),
        None => rest.find('@'),
    };
    let (name, version) = match at {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let name_ok = match name.strip_prefix('@') {
        Some(scoped) => scoped
            .split_once('/')
            .is_some_and(|(scope, pkg)| npm_part_ok(scope) && npm_part_ok(pkg)),
        None => npm_part_ok(name),
    };
    if !name_ok || name.len() > 214 {
        return Err(format!(
            "{name:?} is not an npm package name (expected name or @scope/name: letters, digits, \
             '.', '_', '~', '-', not starting with '.', '_' or '-', at most 214 characters)"
        ));
    }
    if let Some(v) = version
        && (v.is_empty()
            || v.starts_with('-')
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._+~^-".contains(c)))
    {
        return Err(format!(
            "{v:?} is not an npm version (expected a version like 1.2.3, a range like ^1.2 or a \
             tag like latest)"
        ));
    }
    Ok(Package::Npm {
        name: name.to_owned(),
        version: version.map(str::to_owned),
    })
}

/// PEP 508 name: ASCII letters and digits, with '.', '_', '-' inside.
fn pypi_name_ok(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn parse_pypi(rest: &str) -> Result<Package, String> {
    let name_end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
        .unwrap_or(rest.len());
    let name = &rest[..name_end];
    if !pypi_name_ok(name) {
        return Err(format!(
            "{name:?} is not a PyPI package name (letters, digits, '.', '_', '-', starting and \
             ending with a letter or digit)"
        ));
    }
    let mut tail = &rest[name_end..];
    let mut extras = "";
    if let Some(after) = tail.strip_prefix('[') {
        let Some((list, after)) = after.split_once(']') else {
            return Err("unclosed '[' in the extras".into());
        };
        if !list.split(',').all(pypi_name_ok) {
            return Err(format!("{list:?} is not a list of extras (name,name)"));
        }
        extras = &tail[..list.len() + 2];
        tail = after;
    }
    let version = if tail.is_empty() {
        None
    } else if let Some(v) = tail.strip_prefix("==").or_else(|| tail.strip_prefix('@')) {
        Some(v)
    } else {
        return Err(format!(
            "{tail:?}: only an exact version is supported (name, name==1.2.3 or name@1.2.3)"
        ));
    };
    let spec = match version {
        // uvx's `name@latest` means the newest version.
        None | Some("latest") => format!("{name}{extras}"),
        Some(v)
            if v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c)) =>
        {
            format!("{name}{extras}=={v}")
        }
        Some(v) => return Err(format!("{v:?} is not a version (expected like 1.2.3)")),
    };
    Ok(Package::PyPi {
        name: name.to_owned(),
        spec,
    })
}

/// Makes sure `pkg` is installed under `packages_dir` and says what to execute.
///
/// A completed install is reused without running an installer (and without the network);
/// otherwise the package is installed, every installer output line going to `progress` between
/// a first "installing ..." and a last "installed ... in N s" line. Concurrent calls for one
/// package install it once: the others wait (saying so on `progress`) and reuse it.
pub async fn ensure_installed(
    pkg: &Package,
    packages_dir: &Path,
    registries: &Registries,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Installed, PackageError> {
    let kind_dir = packages_dir.join(pkg.kind_dir());
    let name = pkg.dir_name();
    let place = Place::Host {
        packages_dir,
        dir: kind_dir.join(&name),
        partial: kind_dir.join(format!(".partial-{name}")),
        lock: kind_dir.join(format!(".lock-{name}")),
    };
    install_at(pkg, &place, registries, progress).await
}

/// [`ensure_installed`] for a container: `pkg` installed into a Docker volume by installers
/// run in containers of the volume's base image (see [`Volume`]), cached like a host install
/// (a complete volume is reused, concurrent calls install once). The program is a path
/// inside a container that mounts the volume at [`volume::MOUNT`].
pub async fn ensure_installed_in_volume(
    pkg: &Package,
    volume: &Volume,
    registries: &Registries,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Installed, PackageError> {
    install_at(pkg, &Place::Volume(volume), registries, progress).await
}

/// The one install procedure, wherever it happens: reuse, lock, clear, install under the
/// timeout, check the program, commit.
async fn install_at(
    pkg: &Package,
    place: &Place<'_>,
    registries: &Registries,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Installed, PackageError> {
    if let Some(installed) = place.cached(pkg).await? {
        progress(&format!("using cached install of {pkg} in {place}"));
        return Ok(installed);
    }

    let lock_path = place.lock_path();
    if let Some(dir) = lock_path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(io(format!("cannot create {}", dir.display())))?;
    }
    let _lock = tokio::time::timeout(INSTALL_TIMEOUT, lock(&lock_path, pkg, progress))
        .await
        .map_err(|_| PackageError::Timeout {
            package: pkg.to_string(),
            after: INSTALL_TIMEOUT,
        })??;
    if let Some(installed) = place.cached(pkg).await? {
        progress(&format!(
            "using {pkg} just installed in {place} by another deployment"
        ));
        return Ok(installed);
    }
    // Under the lock, anything still here is ours to clear: a crashed install's partial
    // directory or volume, or an install whose files have since gone missing.
    place.clear().await?;

    let what = match pkg {
        Package::Npm { .. } => "npm",
        Package::PyPi { .. } => "PyPI",
    };
    progress(&format!(
        "installing {what} package {} into {place}",
        pkg.spec()
    ));
    let started = Instant::now();
    let outcome = tokio::time::timeout(INSTALL_TIMEOUT, async {
        place.prepare().await?;
        match pkg {
            Package::Npm { .. } => install_npm(pkg, place, registries, progress).await,
            Package::PyPi { spec, .. } => {
                install_pypi(pkg, spec, place, registries, progress).await
            }
        }?;
        // A package without a runnable program is no use: fail now, not at every start.
        place.built_executable(pkg).await
    })
    .await
    .unwrap_or_else(|_| {
        Err(PackageError::Timeout {
            package: pkg.to_string(),
            after: INSTALL_TIMEOUT,
        })
    });
    let installed = match outcome {
        Ok(installed) => installed,
        Err(e) => {
            place.discard().await;
            return Err(e);
        }
    };
    place.commit(pkg).await?;
    progress(&format!(
        "installed {pkg} in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(installed)
}

/// Where an install is made and where its installers run.
enum Place<'a> {
    /// `dir` under the data directory, built as `partial` by installers run on the host and
    /// renamed into place.
    Host {
        packages_dir: &'a Path,
        dir: PathBuf,
        partial: PathBuf,
        lock: PathBuf,
    },
    /// A Docker volume, filled by installers run in containers.
    Volume(&'a Volume),
}

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Host { dir, .. } => write!(f, "{}", dir.display()),
            Place::Volume(v) => write!(f, "{v}"),
        }
    }
}

/// An installer's command line, the same wherever it runs.
struct Cmd {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// What is missing if `program` cannot be run.
    needs: Needs,
}

/// The program an installer needs from the host or the image.
#[derive(Debug, Clone, Copy)]
enum Needs {
    Npm,
    Python,
    /// `sync`, which a container install runs before it marks the volume complete.
    Sync,
}

impl Needs {
    fn program(self) -> &'static str {
        match self {
            Needs::Npm => "npm",
            Needs::Python => "python3",
            Needs::Sync => "sync",
        }
    }

    /// The error for a host without it.
    fn missing_on_host(self) -> PackageError {
        match self {
            Needs::Npm => NPM_MISSING,
            Needs::Python => PYTHON_MISSING,
            Needs::Sync => PackageError::MissingTool {
                tool: "sync",
                hint: "install coreutils",
            },
        }
    }
}

impl Cmd {
    fn new(program: impl Into<String>, needs: Needs) -> Cmd {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            needs,
        }
    }

    fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Cmd {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    fn env(mut self, key: &str, value: impl Into<String>) -> Cmd {
        self.env.push((key.to_owned(), value.into()));
        self
    }
}

impl Place<'_> {
    fn lock_path(&self) -> PathBuf {
        match self {
            Place::Host { lock, .. } => lock.clone(),
            Place::Volume(v) => v.lock_path(),
        }
    }

    /// The complete install, if there is one and it still has its program. `Err` only when
    /// it cannot be told (an engine that fails), so a good install is never cleared for that.
    async fn cached(&self, pkg: &Package) -> Result<Option<Installed>, PackageError> {
        match self {
            Place::Host { dir, .. } => {
                if !tokio::fs::try_exists(dir.join(MARKER))
                    .await
                    .unwrap_or(false)
                {
                    return Ok(None);
                }
                Ok(host_executable(pkg, dir, dir).await.ok())
            }
            Place::Volume(v) => v.cached(pkg).await,
        }
    }

    async fn clear(&self) -> Result<(), PackageError> {
        match self {
            Place::Host { dir, partial, .. } => {
                for stale in [partial, dir] {
                    if tokio::fs::try_exists(stale).await.unwrap_or(false) {
                        tokio::fs::remove_dir_all(stale)
                            .await
                            .map_err(io(format!("cannot remove {}", stale.display())))?;
                    }
                }
                Ok(())
            }
            Place::Volume(v) => v.clear().await,
        }
    }

    async fn prepare(&self) -> Result<(), PackageError> {
        match self {
            Place::Host { partial, .. } => tokio::fs::create_dir_all(partial)
                .await
                .map_err(io(format!("cannot create {}", partial.display()))),
            Place::Volume(v) => v.prepare().await,
        }
    }

    /// Where the installers write: npm's prefix, or the venv.
    fn install_dir(&self) -> PathBuf {
        match self {
            Place::Host { partial, .. } => partial.clone(),
            Place::Volume(v) => v.dir().to_owned(),
        }
    }

    /// The installers' download cache (`npm`, `pip`): kept in the data directory on the
    /// host; in a container, on its tmpfs (a download is not worth a second volume).
    fn cache_dir(&self, installer: &str) -> PathBuf {
        match self {
            Place::Host { packages_dir, .. } => packages_dir.join(format!(".{installer}-cache")),
            Place::Volume(_) => PathBuf::from(format!("/tmp/.{installer}-cache")),
        }
    }

    async fn run(
        &self,
        cmd: Cmd,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Output, PackageError> {
        match self {
            Place::Host { .. } => run(cmd, progress).await,
            Place::Volume(v) => v.run(cmd, progress).await,
        }
    }

    /// What to run for the install just built (before [`Place::commit`]).
    async fn built_executable(&self, pkg: &Package) -> Result<Installed, PackageError> {
        match self {
            // Checked in the partial directory, for the path it will have once renamed.
            Place::Host { dir, partial, .. } => host_executable(pkg, partial, dir).await,
            Place::Volume(v) => v.executable(pkg).await,
        }
    }

    /// Removes a failed install.
    async fn discard(&self) {
        match self {
            Place::Host { partial, .. } => {
                let _ = tokio::fs::remove_dir_all(partial).await;
            }
            Place::Volume(v) => v.discard().await,
        }
    }

    /// Marks the install complete (its marker written last).
    async fn commit(&self, pkg: &Package) -> Result<(), PackageError> {
        match self {
            Place::Host { dir, partial, .. } => {
                let (from, to, note) = (partial.clone(), dir.clone(), pkg.to_string());
                blocking("finishing the install", move || commit(&from, &to, &note)).await
            }
            Place::Volume(v) => v.commit(pkg).await,
        }
    }

    /// The registry npm uses when none is configured, for error messages.
    async fn npm_registry(&self) -> String {
        match self {
            Place::Host { packages_dir, .. } => npm_registry(packages_dir).await,
            Place::Volume(_) => NPM_DEFAULT_REGISTRY.to_owned(),
        }
    }

    /// The error for an installer that cannot be run here.
    fn missing(&self, needs: Needs) -> PackageError {
        match self {
            Place::Host { .. } => needs.missing_on_host(),
            Place::Volume(v) => PackageError::MissingInImage {
                tool: needs.program(),
                image: v.image().to_owned(),
            },
        }
    }
}

/// Runs filesystem work (syncs, manifests, directory listings) on the blocking pool, never on
/// an async worker thread.
async fn blocking<T: Send + 'static>(
    context: &str,
    work: impl FnOnce() -> Result<T, PackageError> + Send + 'static,
) -> Result<T, PackageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| PackageError::Io {
            context: context.to_owned(),
            error: std::io::Error::other(e),
        })?
}

/// [`executable`] for an install in `dir` on the host (to be run from `root`), off the async
/// threads.
async fn host_executable(
    pkg: &Package,
    dir: &Path,
    root: &Path,
) -> Result<Installed, PackageError> {
    let (pkg, dir, root) = (pkg.clone(), dir.to_owned(), root.to_owned());
    blocking("finding the installed program", move || {
        executable(&pkg, &HostFiles(&dir), &root)
    })
    .await
}

/// Takes the per-package install lock, polling so that waiting holds no thread and can be
/// abandoned (a blocking flock on the blocking pool could not be).
async fn lock(
    path: &Path,
    pkg: &Package,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Flock<std::fs::File>, PackageError> {
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .await
        .map_err(io(format!("cannot open {}", path.display())))?
        .into_std()
        .await;
    let mut told = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, Errno::EWOULDBLOCK)) => {
                if !told {
                    progress(&format!(
                        "waiting for another installation of {pkg} to finish"
                    ));
                    told = true;
                }
                file = f;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err((_, e)) => {
                return Err(PackageError::Io {
                    context: format!("cannot lock {}", path.display()),
                    error: e.into(),
                });
            }
        }
    }
}

/// Marks the install in `partial` complete and moves it into place: flush everything it wrote
/// (syncfs: one call instead of an fsync per file of a node_modules tree), write the marker,
/// rename, flush the rename. After a crash at any point the package is either absent or whole.
fn commit(partial: &Path, dir: &Path, note: &str) -> Result<(), PackageError> {
    let sync_dir = |d: &Path| -> Result<(), PackageError> {
        let f = std::fs::File::open(d).map_err(io(format!("cannot open {}", d.display())))?;
        f.sync_all()
            .map_err(io(format!("cannot sync {}", d.display())))
    };
    let root =
        std::fs::File::open(partial).map_err(io(format!("cannot open {}", partial.display())))?;
    nix::unistd::syncfs(&root).map_err(|e| PackageError::Io {
        context: format!("cannot sync {}", partial.display()),
        error: e.into(),
    })?;
    let marker = partial.join(MARKER);
    let mut f = std::fs::File::create(&marker)
        .map_err(io(format!("cannot create {}", marker.display())))?;
    writeln!(f, "{note}")
        .and_then(|()| f.sync_all())
        .map_err(io(format!("cannot write {}", marker.display())))?;
    sync_dir(partial)?;
    std::fs::rename(partial, dir).map_err(io(format!(
        "cannot rename {} to {}",
        partial.display(),
        dir.display()
    )))?;
    match dir.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Read access to an install's files, by path relative to its directory: the host's
/// filesystem, or what was copied out of a volume ([`volume`]).
trait Files {
    /// Up to `max` bytes of the regular file at `rel`.
    fn read(&self, rel: &Path, max: usize) -> std::io::Result<Vec<u8>>;
    /// Whether `rel` is a regular file (following symlinks where the files are local).
    fn is_file(&self, rel: &Path) -> bool;
    /// The names in directory `rel`.
    fn list(&self, rel: &Path) -> std::io::Result<Vec<String>>;
}

struct HostFiles<'a>(&'a Path);

impl Files for HostFiles<'_> {
    fn read(&self, rel: &Path, max: usize) -> std::io::Result<Vec<u8>> {
        let mut data = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(std::fs::File::open(self.0.join(rel))?, max as u64),
            &mut data,
        )?;
        Ok(data)
    }

    fn is_file(&self, rel: &Path) -> bool {
        self.0.join(rel).is_file()
    }

    fn list(&self, rel: &Path) -> std::io::Result<Vec<String>> {
        Ok(std::fs::read_dir(self.0.join(rel))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect())
    }
}

/// Largest package.json read.
const MAX_MANIFEST: usize = 1 << 20;
/// Bytes of a script read to tell a Python script from anything else.
const SCRIPT_HEAD: usize = 512;

/// What to run for the package whose files `files` shows, installed (or to be run) at `root`.
fn executable(pkg: &Package, files: &dyn Files, root: &Path) -> Result<Installed, PackageError> {
    match pkg {
        Package::Npm { name, .. } => npm_executable(pkg, name, files, root),
        Package::PyPi { name, .. } => pypi_executable(pkg, name, files, root),
    }
}

/// The package's own directory inside an npm prefix.
fn npm_package_dir(name: &str) -> PathBuf {
    Path::new("node_modules").join(name)
}

/// The package's `bin` entry, as npx picks it: a string `bin` is named after the package; in a
/// map, the entry named like the unscoped package, else the only entry.
///
/// The program is the bin script itself, as npx runs it, not `node <script>`: npm makes it
/// executable, its shebang picks the interpreter (usually `node` from PATH; sometimes flags,
/// a shell script or a native binary, which `node <script>` would break), and paths inside
/// node_modules are relative, so the rename into place does not matter.
fn npm_executable(
    pkg: &Package,
    name: &str,
    files: &dyn Files,
    root: &Path,
) -> Result<Installed, PackageError> {
    let pkg_dir = npm_package_dir(name);
    let manifest_path = pkg_dir.join("package.json");
    let text = files
        .read(&manifest_path, MAX_MANIFEST)
        .map_err(io(format!(
            "cannot read {}",
            root.join(&manifest_path).display()
        )))?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| PackageError::Io {
            context: format!("cannot parse {}", root.join(&manifest_path).display()),
            error: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
    let unscoped = name.rsplit('/').next().unwrap_or(name);
    let no_executable = |candidates: Vec<String>| PackageError::NoExecutable {
        package: pkg.to_string(),
        candidates,
    };
    let script = match manifest.get("bin") {
        Some(serde_json::Value::String(path)) => path.as_str(),
        Some(serde_json::Value::Object(bins)) => {
            let pick = bins
                .get(unscoped)
                .or_else(|| (bins.len() == 1).then(|| bins.values().next()).flatten());
            match pick.and_then(|v| v.as_str()) {
                Some(path) => path,
                None => return Err(no_executable(bins.keys().cloned().collect())),
            }
        }
        _ => return Err(no_executable(Vec::new())),
    };
    let rel = Path::new(script);
    // A bin path must stay inside the package.
    if rel.components().any(|c| {
        !matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    }) {
        return Err(no_executable(vec![script.to_owned()]));
    }
    let program = pkg_dir.join(rel);
    if !files.is_file(&program) {
        return Err(no_executable(vec![script.to_owned()]));
    }
    Ok(Installed {
        program: root.join(program),
        args: Vec::new(),
    })
}

/// The console scripts uvx would run for a package named `name`: the name itself, then
/// normalized (`Foo.Bar` → `foo-bar`, `foo_bar`).
fn pypi_script_names(name: &str) -> [String; 3] {
    let normalized: String = name
        .to_ascii_lowercase()
        .split(['-', '_', '.'])
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    [name.to_owned(), normalized.replace('-', "_"), normalized]
}

/// The console script named like the package, as uvx runs it (see [`pypi_script_names`]).
///
/// A Python script is run by the venv's interpreter (`<venv>/bin/python <script>`) rather
/// than through its shebang: the venv was built under `.partial-<dir>` and renamed, so the
/// shebang names a path that no longer exists (and pip writes a `/bin/sh` trampoline instead
/// when the path is longer than a shebang may be). A venv is otherwise relocatable: the
/// interpreter finds it from its own path. A non-Python file (a binary shipped as a script)
/// is run directly.
fn pypi_executable(
    pkg: &Package,
    name: &str,
    files: &dyn Files,
    root: &Path,
) -> Result<Installed, PackageError> {
    let bin = Path::new("bin");
    let Some(script) = pypi_script_names(name)
        .iter()
        .map(|c| bin.join(c))
        .find(|p| files.is_file(p))
    else {
        let mut found: Vec<String> = files
            .list(bin)
            .map_err(io(format!("cannot list {}", root.join(bin).display())))?
            .into_iter()
            .filter(|n| {
                !(n.starts_with("python")
                    || n.starts_with("pip")
                    || n.starts_with("activate")
                    || n.starts_with("Activate"))
            })
            .collect();
        found.sort();
        return Err(PackageError::NoExecutable {
            package: pkg.to_string(),
            candidates: found,
        });
    };
    let head = files
        .read(&script, SCRIPT_HEAD)
        .map_err(io(format!("cannot read {}", root.join(&script).display())))?;
    let is_python = head.starts_with(b"#!") && head.windows(6).any(|w| w == b"python");
    let script = root.join(script);
    if !is_python {
        return Ok(Installed {
            program: script,
            args: Vec::new(),
        });
    }
    let script = script
        .into_os_string()
        .into_string()
        .map_err(|p| PackageError::Io {
            context: format!("{} is not valid UTF-8", Path::new(&p).display()),
            error: std::io::ErrorKind::InvalidData.into(),
        })?;
    Ok(Installed {
        program: root.join("bin").join("python"),
        args: vec![script],
    })
}

/// The registry settings as the installers' environment, not their command line (a private
/// registry's URL may carry credentials, and any local user can read a command line).
fn registry_env(mut cmd: Cmd, registries: &Registries) -> Cmd {
    match cmd.needs {
        Needs::Npm => {
            if let Some(registry) = &registries.npm {
                cmd = cmd.env("npm_config_registry", registry.clone());
            }
        }
        Needs::Python => {
            if let Some(index) = &registries.pypi_index {
                cmd = cmd.env("PIP_INDEX_URL", index.clone());
                // pip ignores an http:// index on any host but localhost unless trusted.
                if let Ok(url) = reqwest::Url::parse(index)
                    && url.scheme() == "http"
                    && let Some(host) = url.host_str()
                {
                    cmd = cmd.env("PIP_TRUSTED_HOST", host.to_owned());
                }
            }
        }
        Needs::Sync => {}
    }
    cmd
}

/// `npm install` into the place's prefix. Retries and timeouts are short so that an
/// unreachable registry is reported in seconds, not after npm's minutes of backoff.
async fn install_npm(
    pkg: &Package,
    place: &Place<'_>,
    registries: &Registries,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), PackageError> {
    let cmd = Cmd::new("npm", Needs::Npm)
        .args([
            "install".to_owned(),
            arg("--prefix=", &place.install_dir())?,
        ])
        .args([
            "--no-audit",
            "--no-fund",
            "--no-update-notifier",
            "--progress=false",
            "--fetch-retries=1",
            "--fetch-retry-mintimeout=1000",
            "--fetch-retry-maxtimeout=5000",
            "--fetch-timeout=60000",
        ])
        .args([pkg.spec()])
        .env("npm_config_cache", path_str(&place.cache_dir("npm"))?);
    let out = place.run(registry_env(cmd, registries), progress).await?;
    if out.success {
        return Ok(());
    }
    let registry = match &registries.npm {
        Some(r) => r.clone(),
        None => place.npm_registry().await,
    };
    Err(classify_npm(pkg, registry, &out.lines))
}

const NPM_MISSING: PackageError = PackageError::MissingTool {
    tool: "npm",
    hint: "install Node.js and npm (Debian/Ubuntu: apt-get install nodejs npm) and make sure \
           `npm` is on Switchboard's PATH",
};
const PYTHON_MISSING: PackageError = PackageError::MissingTool {
    tool: "python3",
    hint: "install Python 3 with its venv module (Debian/Ubuntu: apt-get install python3 \
           python3-venv) and make sure `python3` is on Switchboard's PATH",
};

/// Installers run packages' own scripts: Switchboard's key and tokens stay out of their
/// environment.
fn without_our_credentials(cmd: &mut Command) {
    for k in crate::secrets::NEVER_INHERITED {
        cmd.env_remove(k);
    }
}

/// The registry npm is configured with, for error messages.
async fn npm_registry(packages_dir: &Path) -> String {
    let mut cmd = Command::new("npm");
    cmd.args(["config", "get", "registry"])
        .env("npm_config_cache", packages_dir.join(".npm-cache"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    without_our_credentials(&mut cmd);
    let out = cmd.output();
    match tokio::time::timeout(Duration::from_secs(10), out).await {
        Ok(Ok(o)) if o.status.success() && !o.stdout.trim_ascii().is_empty() => {
            String::from_utf8_lossy(o.stdout.trim_ascii()).into_owned()
        }
        _ => NPM_DEFAULT_REGISTRY.to_owned(),
    }
}

fn classify_npm(pkg: &Package, registry: String, lines: &[String]) -> PackageError {
    // npm ≥ 10 writes "npm error code E404", older ones "npm ERR! code E404".
    let errors = || {
        lines.iter().filter_map(|l| {
            l.strip_prefix("npm error ")
                .or_else(|| l.strip_prefix("npm ERR! "))
        })
    };
    let code = errors()
        .find_map(|l| l.strip_prefix("code "))
        .unwrap_or_default()
        .trim();
    let first = |pat: &[&str]| {
        errors()
            .find(|l| pat.iter().any(|p| l.contains(p)))
            .map(|l| l.trim().to_owned())
    };
    match code {
        "E404" | "ETARGET" => PackageError::NotFound {
            package: pkg.to_string(),
            registry,
            detail: first(&[
                "404 Not Found",
                "No matching version",
                "not in this registry",
            ])
            .unwrap_or_else(|| format!("npm error {code}")),
        },
        "ECONNREFUSED" | "ENOTFOUND" | "ETIMEDOUT" | "EAI_AGAIN" | "ECONNRESET"
        | "EHOSTUNREACH" | "ENETUNREACH" | "ERR_SOCKET_TIMEOUT" | "ESOCKETTIMEDOUT" => {
            PackageError::RegistryUnreachable {
                package: pkg.to_string(),
                registry,
                detail: first(&["reason:", "network"]).unwrap_or_else(|| code.to_owned()),
            }
        }
        _ if first(&["network request", "network aborted", "network timeout"]).is_some() => {
            PackageError::RegistryUnreachable {
                package: pkg.to_string(),
                registry,
                detail: first(&["network"]).unwrap_or_default(),
            }
        }
        _ => install_failed(pkg, lines),
    }
}

fn install_failed(pkg: &Package, lines: &[String]) -> PackageError {
    let from = lines.len().saturating_sub(QUOTED_LINES);
    PackageError::InstallFailed {
        package: pkg.to_string(),
        detail: lines[from..].join("\n"),
    }
}

/// A venv at the place's install directory with the package (`spec`) pip-installed into it.
///
/// This is what `uvx` does, done with what these machines have (`uv` is not installed):
/// `uv tool install`/`uv venv` + `uv pip install` could replace it later, being faster and
/// able to fetch a Python itself.
async fn install_pypi(
    pkg: &Package,
    spec: &str,
    place: &Place<'_>,
    registries: &Registries,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), PackageError> {
    let dir = place.install_dir();
    let venv =
        Cmd::new("python3", Needs::Python).args(["-m".to_owned(), "venv".into(), path_str(&dir)?]);
    let out = place.run(venv, progress).await?;
    if !out.success {
        if out
            .lines
            .iter()
            .any(|l| l.contains("ensurepip") || l.contains("No module named venv"))
        {
            return Err(place.missing(Needs::Python));
        }
        return Err(install_failed(pkg, &out.lines));
    }

    // `python -m pip`, not `bin/pip`: the pip script's shebang would break on a data
    // directory path longer than a shebang may be.
    let pip = Cmd::new(path_str(&dir.join("bin").join("python"))?, Needs::Python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar=off",
            "--no-warn-script-location",
            // One retry: with none, pip reports an unreachable index only as "no matching
            // distribution" (its retry warning is the only line naming the connection error).
            "--retries=1",
            "--timeout=15",
            spec,
        ])
        .env("PIP_CACHE_DIR", path_str(&place.cache_dir("pip"))?);
    let out = place.run(registry_env(pip, registries), progress).await?;
    if out.success {
        return Ok(());
    }
    let registry = match &registries.pypi_index {
        Some(r) => r.clone(),
        None => out
            .lines
            .iter()
            .find_map(|l| l.strip_prefix("Looking in indexes: "))
            .unwrap_or(PYPI_DEFAULT_INDEX)
            .to_owned(),
    };
    Err(classify_pip(pkg, registry, &out.lines))
}

fn classify_pip(pkg: &Package, registry: String, lines: &[String]) -> PackageError {
    let first = |pat: &[&str]| {
        lines
            .iter()
            .find(|l| pat.iter().any(|p| l.contains(p)))
            .map(|l| l.trim().to_owned())
    };
    // Checked first: an unreachable index also ends in "No matching distribution found".
    if let Some(line) = first(&[
        "Failed to establish a new connection",
        "Connection refused",
        "ConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "Max retries exceeded",
        "connection broken by",
        "ProxyError",
        "SSLError",
        "Temporary failure in name resolution",
        "Name or service not known",
    ]) {
        return PackageError::RegistryUnreachable {
            package: pkg.to_string(),
            registry,
            detail: connection_reason(&line),
        };
    }
    match first(&[
        "No matching distribution found",
        "Could not find a version that satisfies",
    ]) {
        Some(_) => PackageError::NotFound {
            package: pkg.to_string(),
            registry,
            detail: first(&["Could not find a version that satisfies"])
                .unwrap_or_default()
                .trim_start_matches("ERROR: ")
                .to_owned(),
        },
        None => install_failed(pkg, lines),
    }
}

/// The readable end of urllib3's retry warning: "[Errno 111] Connection refused" rather than
/// the object reprs around it.
fn connection_reason(line: &str) -> String {
    if let Some(i) = line.find("[Errno")
        && let Some(reason) = line[i..].split(['\'', ')']).next()
    {
        return reason.to_owned();
    }
    line.to_owned()
}

/// `path` as an argument or variable: paths Switchboard builds are UTF-8 unless the data
/// directory is not.
fn path_str(path: &Path) -> Result<String, PackageError> {
    arg("", path)
}

/// Builds `<flag><path>` as one argument, so a path is never taken for another option.
fn arg(flag: &str, path: &Path) -> Result<String, PackageError> {
    path.to_str()
        .map(|p| format!("{flag}{p}"))
        .ok_or_else(|| PackageError::Io {
            context: format!("{} is not valid UTF-8", path.display()),
            error: std::io::ErrorKind::InvalidData.into(),
        })
}

struct Output {
    success: bool,
    /// The last [`KEPT_LINES`] lines of stdout and stderr, interleaved as they came.
    lines: Vec<String>,
}

/// An installer's output as it comes: each line forwarded to `progress` (cut at
/// [`MAX_LINE`]), the last [`KEPT_LINES`] kept for the error.
struct Lines<'a> {
    progress: &'a (dyn Fn(&str) + Send + Sync),
    kept: Mutex<VecDeque<String>>,
}

impl<'a> Lines<'a> {
    fn new(progress: &'a (dyn Fn(&str) + Send + Sync)) -> Lines<'a> {
        Lines {
            progress,
            kept: Mutex::new(VecDeque::with_capacity(KEPT_LINES)),
        }
    }

    fn push(&self, raw: &[u8]) {
        let mut line = String::from_utf8_lossy(raw).trim_end().to_owned();
        if line.len() > MAX_LINE {
            let mut end = MAX_LINE;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        (self.progress)(&line);
        if let Ok(mut kept) = self.kept.lock() {
            if kept.len() == KEPT_LINES {
                kept.pop_front();
            }
            kept.push_back(line);
        }
    }

    fn finish(self, success: bool) -> Output {
        Output {
            success,
            lines: self.kept.into_inner().map(Vec::from).unwrap_or_default(),
        }
    }
}

/// Kills an installer's whole process group (npm runs install scripts as children) if its
/// future is dropped before the installer was reaped, e.g. at the timeout. Once it has been
/// reaped, its pid (the group id) may be reused, so the guard is disarmed.
struct KillGroup(Option<Pid>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// Runs an installer on the host, forwarding each output line to `progress` as it comes.
async fn run(spec: Cmd, progress: &(dyn Fn(&str) + Send + Sync)) -> Result<Output, PackageError> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    without_our_credentials(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(spec.needs.missing_on_host());
        }
        Err(e) => return Err(io(format!("cannot run {}", spec.program))(e)),
    };
    let mut guard = KillGroup(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw),
    );
    let lines = Lines::new(progress);
    let forward = |stream: Option<Box<dyn AsyncRead + Unpin + Send>>| {
        let lines = &lines;
        async move {
            let Some(stream) = stream else { return };
            let mut split = BufReader::new(stream).split(b'\n');
            while let Ok(Some(raw)) = split.next_segment().await {
                lines.push(&raw);
            }
        }
    };
    let stdout = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn AsyncRead + Unpin + Send>);
    let stderr = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn AsyncRead + Unpin + Send>);
    let (status, (), ()) = tokio::join!(child.wait(), forward(stdout), forward(stderr));
    guard.0 = None;
    let status = status.map_err(io(format!("cannot wait for {}", spec.program)))?;
    Ok(lines.finish(status.success()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn installers_never_see_switchboards_key_or_tokens() {
        let mut cmd = Cmd::new("sh", Needs::Python).args([
            "-c",
            "echo \"${SWITCHBOARD_SECRET_KEY:-unset} ${SWITCHBOARD_TOKEN:-unset} \
             ${SWITCHBOARD_API_TOKEN:-unset}\"",
        ]);
        for k in crate::secrets::NEVER_INHERITED {
            cmd = cmd.env(k, "leaked");
        }
        let out = run(cmd, &|_| {}).await.unwrap();
        assert_eq!(out.lines, ["unset unset unset"]);
    }

    fn parse(command: &str) -> Package {
        match Package::parse(command) {
            Some(Ok(p)) => p,
            other => panic!("{command}: {other:?}"),
        }
    }

    fn reason(command: &str) -> String {
        match Package::parse(command) {
            Some(Err(PackageError::Invalid { reason, .. })) => reason,
            other => panic!("{command} should be invalid: {other:?}"),
        }
    }

    #[test]
    fn ordinary_commands_are_not_packages() {
        for c in [
            "node",
            "/usr/bin/python3",
            "npx",
            "uvx",
            "npm:foo",
            "NPX:foo",
            "",
        ] {
            assert!(Package::parse(c).is_none(), "{c}");
        }
    }

    #[test]
    fn npm_names_and_versions() {
        assert_eq!(
            parse("npx:@modelcontextprotocol/server-everything@2026.8.31"),
            Package::Npm {
                name: "@modelcontextprotocol/server-everything".into(),
                version: Some("2026.8.31".into()),
            }
        );
        assert_eq!(
            parse("npx:@scope/name"),
            Package::Npm {
                name: "@scope/name".into(),
                version: None
            }
        );
        assert_eq!(
            parse("npx:left-pad@^1.3"),
            Package::Npm {
                name: "left-pad".into(),
                version: Some("^1.3".into())
            }
        );
        assert_eq!(
            parse("npx:foo@latest").to_string(),
            "npx:foo@latest".to_owned()
        );
        assert_eq!(
            parse("npx:foo@1.0.0+build.1").dir_name(),
            "foo@1.0.0+build.1"
        );
        assert_eq!(
            parse("npx:@a/b@1.0.0").dir_name(),
            "@a+b@1.0.0",
            "one directory level per package"
        );
    }

    #[test]
    fn pypi_names_and_versions() {
        assert_eq!(
            parse("uvx:mcp-server-time==2026.10.19"),
            Package::PyPi {
                name: "mcp-server-time".into(),
                spec: "mcp-server-time==2026.10.19".into(),
            }
        );
        assert_eq!(
            parse("uvx:mcp-server-time@2026.10.19"),
            parse("uvx:mcp-server-time==2026.10.19"),
            "uvx's @ form"
        );
        assert_eq!(
            parse("uvx:mcp-server-time@latest"),
            parse("uvx:mcp-server-time")
        );
        let extras = parse("uvx:pkg[cli,http]==1.0");
        assert_eq!(
            extras,
            Package::PyPi {
                name: "pkg".into(),
                spec: "pkg[cli,http]==1.0".into()
            }
        );
        assert_eq!(extras.dir_name(), "pkg(cli,http)==1.0");
        assert_eq!(extras.to_string(), "uvx:pkg[cli,http]==1.0");
    }

    #[test]
    fn malformed_names_are_rejected_with_a_reason() {
        assert!(reason("npx:").contains("empty"));
        assert!(reason("uvx:").contains("empty"));
        assert!(reason("npx:foo bar").contains("without spaces"));
        assert!(reason("npx: foo").contains("without spaces"));
        assert!(reason("uvx:foo\tbar").contains("without spaces"));
        for bad in [
            "npx:foo;rm",
            "npx:foo&&x",
            "npx:$(x)",
            "npx:`x`",
            "npx:a|b",
            "npx:a>b",
            "uvx:a'b",
            "uvx:a\"b",
            "uvx:pkg>=1",
            "npx:a*",
            "npx:a\\b",
        ] {
            assert!(reason(bad).contains("not allowed"), "{bad}");
        }
        assert!(reason("npx:-g").contains("not an npm package name"));
        assert!(reason("npx:.hidden").contains("not an npm package name"));
        assert!(reason("npx:@scope").contains("not an npm package name"));
        assert!(reason("npx:@scope/").contains("not an npm package name"));
        assert!(reason("npx:@/name").contains("not an npm package name"));
        assert!(
            reason("npx:a/b").contains("not an npm package name"),
            "no git shorthands"
        );
        assert!(reason("npx:../x").contains("not an npm package name"));
        assert!(reason("npx:http://x").contains("not an npm package name"));
        assert!(reason("npx:foo@").contains("not an npm version"));
        assert!(reason("npx:foo@-x").contains("not an npm version"));
        assert!(reason("npx:foo@1@2").contains("not an npm version"));
        assert!(reason("npx:é").contains("not allowed"));
        assert!(reason("uvx:-r").contains("not a PyPI package name"));
        assert!(reason("uvx:pkg-").contains("not a PyPI package name"));
        assert!(reason("uvx:pkg==").contains("not a version"));
        assert!(reason("uvx:pkg==-1").contains("not a version"));
        assert!(reason("uvx:pkg~=1.0").contains("only an exact version"));
        assert!(reason("uvx:pkg[x").contains("unclosed"));
        assert!(reason("uvx:pkg[]").contains("extras"));
        assert!(reason("uvx:../x").contains("not a PyPI package name"));
    }

    #[test]
    fn npm_failures_are_told_apart() {
        let pkg = parse("npx:@a/b@1.0.0");
        let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = classify_npm(
            &pkg,
            "R".into(),
            &lines(&[
                "npm error code E404",
                "npm error 404 Not Found - GET https://registry.npmjs.org/@a%2fb - Not found",
            ]),
        );
        assert!(matches!(e, PackageError::NotFound { .. }), "{e}");
        let e = classify_npm(
            &pkg,
            "R".into(),
            &lines(&[
                "npm ERR! code ETARGET",
                "npm ERR! notarget No matching version found for @a/b@1.0.0.",
            ]),
        );
        assert!(e.to_string().contains("No matching version found"), "{e}");
        let e = classify_npm(
            &pkg,
            "R".into(),
            &lines(&[
                "npm error code EAI_AGAIN",
                "npm error request to https://r/@a%2fb failed, reason: getaddrinfo EAI_AGAIN r",
            ]),
        );
        assert!(matches!(e, PackageError::RegistryUnreachable { .. }), "{e}");
        assert!(e.to_string().contains("getaddrinfo EAI_AGAIN"), "{e}");
        let e = classify_npm(
            &pkg,
            "R".into(),
            &lines(&["npm error code 1", "npm error command failed"]),
        );
        assert!(matches!(e, PackageError::InstallFailed { .. }), "{e}");
    }

    #[test]
    fn pip_failures_are_told_apart() {
        let pkg = parse("uvx:x==1");
        let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let unreachable = lines(&[
            "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, \
             status=None)) after connection broken by 'NewConnectionError('<pip._vendor.urllib3.\
             connection.HTTPConnection object at 0x7f>: Failed to establish a new connection: \
             [Errno 111] Connection refused')': /simple/x/",
            "ERROR: Could not find a version that satisfies the requirement x==1 (from versions: none)",
            "ERROR: No matching distribution found for x==1",
        ]);
        let e = classify_pip(&pkg, "R".into(), &unreachable);
        assert!(matches!(e, PackageError::RegistryUnreachable { .. }), "{e}");
        assert!(
            e.to_string().contains("([Errno 111] Connection refused)"),
            "{e}"
        );
        let e = classify_pip(&pkg, "R".into(), &unreachable[1..]);
        assert!(matches!(e, PackageError::NotFound { .. }), "{e}");
        let e = classify_pip(
            &pkg,
            "R".into(),
            &lines(&["error: subprocess-exited-with-error"]),
        );
        assert!(matches!(e, PackageError::InstallFailed { .. }), "{e}");
    }
}
