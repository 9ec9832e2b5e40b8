//! Package installs in Docker volumes, for `npx:` / `uvx:` tools with `runtime = "docker"`:
//! the same procedure as a host install ([`super::install_at`]), its installers run in
//! containers of the tool's base image and its files kept in a named volume, which the
//! server's container mounts read-only at [`MOUNT`].
//!
//! Layout: one volume per package spec, base image and node (`switchboard-pkg-<spec>-<hash>`,
//! the hash over the spec, the image's id, since a venv or a native addon is only good for
//! the interpreter it was built with, and the node, whose data directory holds the lock),
//! labelled [`NODE_LABEL`] and [`PACKAGE_LABEL`]. Inside:
//!
//! ```text
//! /pkg/npm/          npm install --prefix (node_modules/...)      ─┐ owned by the tool's user
//! /pkg/venv/         a venv with the package                       │ (created by an upload
//! /pkg/<dir>/.installed   written last, after a sync               ─┘ with copy_uidgid)
//! ```
//!
//! Invariants: the marker is written only after the installer succeeded, the program was
//! found and the data was synced, so a volume without it is never taken for complete (it is
//! removed and rebuilt under the lock); the install lock is the host's ([`super::lock`] on a
//! file under `<packages_dir>/volumes/`), so concurrent deployments install once; every
//! container made here (installers, and the never-started "probe" containers through which
//! files are read and written) is labelled with the node and removed when done or abandoned,
//! so the runtime's start-up sweep removes any a crash leaves. Installers run with the tool's
//! user and container security settings; nothing but the registry settings and the caches'
//! locations goes into their environment.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
};

use bollard::{
    Docker,
    errors::Error as DockerError,
    models::{ContainerCreateBody, HostConfig, Mount, MountType, VolumeCreateRequest},
    query_parameters::{
        DownloadFromContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
        RemoveVolumeOptionsBuilder, UploadToContainerOptionsBuilder,
    },
};
use futures_util::StreamExt as _;
use sha2::Digest as _;

use super::{
    Cmd, Files, Installed, Lines, MARKER, MAX_MANIFEST, Needs, Output, Package, PackageError,
    SCRIPT_HEAD, npm_package_dir,
};
use crate::runtime::{
    ContainerLaunch,
    container::{DockerSecurity, Network},
    docker::{NODE_LABEL, secure_host_config},
};

/// Where a package's volume is mounted, in installers and servers alike.
pub const MOUNT: &str = "/pkg";
/// The package a volume (or an installer container) is for, in command form (`npx:...`).
pub const PACKAGE_LABEL: &str = "switchboard.package";

/// A package's volume and how its installers run.
pub struct Volume {
    docker: Docker,
    name: String,
    /// The base image as configured (for messages), and what installers run.
    image: String,
    /// `/pkg/npm` or `/pkg/venv`.
    dir: PathBuf,
    package: String,
    node: String,
    user: String,
    security: DockerSecurity,
    network: Network,
    lock: PathBuf,
}

fn engine(context: impl Into<String>) -> impl FnOnce(DockerError) -> PackageError {
    let context = context.into();
    move |e| PackageError::Engine {
        context,
        error: e.to_string(),
    }
}

fn is_status(e: &DockerError, status: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == status)
}

impl fmt::Display for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "volume {} (image {})", self.name, self.image)
    }
}

impl Volume {
    /// The volume for `pkg` built in the tool's image (`c.image`, present on the engine:
    /// the caller pulls it where the tool allows), whose id is `image_id` (an install is good
    /// for that image only), by installers with the tool's user and security settings;
    /// `packages_dir` holds its install lock.
    pub fn new(
        docker: Docker,
        pkg: &Package,
        c: &ContainerLaunch,
        image_id: &str,
        node: &str,
        packages_dir: &Path,
    ) -> Volume {
        let name = volume_name(pkg, image_id, node);
        let sub = match pkg {
            Package::Npm { .. } => "npm",
            Package::PyPi { .. } => "venv",
        };
        Volume {
            docker,
            lock: packages_dir.join("volumes").join(format!(".lock-{name}")),
            name,
            image: c.image.clone(),
            dir: Path::new(MOUNT).join(sub),
            package: pkg.to_string(),
            node: node.to_owned(),
            user: c.user.clone(),
            security: c.security.clone(),
            // A server without a network still needs its package from the registry.
            network: match c.network {
                Network::Host => Network::Host,
                Network::Bridge | Network::None => Network::Bridge,
            },
        }
    }

    /// The volume's name, for the server container's mount.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn image(&self) -> &str {
        &self.image
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn lock_path(&self) -> PathBuf {
        self.lock.clone()
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (NODE_LABEL.to_owned(), self.node.clone()),
            (PACKAGE_LABEL.to_owned(), self.package.clone()),
        ])
    }

    /// A container of the base image with the volume at [`MOUNT`], running `argv` (or never
    /// started, when it is a probe), with the tool's user and security settings.
    async fn create(
        &self,
        argv: &[String],
        env: &[(String, String)],
        read_only: bool,
    ) -> Result<Container, PackageError> {
        let host_config = HostConfig {
            mounts: Some(vec![Mount {
                target: Some(MOUNT.to_owned()),
                source: Some(self.name.clone()),
                typ: Some(MountType::VOLUME),
                read_only: Some(read_only),
                ..Default::default()
            }]),
            network_mode: Some(self.network.as_str().to_owned()),
            ..secure_host_config(&self.security)
        };
        let (entrypoint, cmd) = match argv.split_first() {
            Some((program, args)) => (vec![program.clone()], args.to_vec()),
            None => (vec!["true".to_owned()], Vec::new()),
        };
        // HOME on the tmpfs: the image's user may have no home, and installers write there.
        let env = std::iter::once(("HOME".to_owned(), "/tmp".to_owned()))
            .chain(env.iter().cloned())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            entrypoint: Some(entrypoint),
            cmd: Some(cmd),
            env: Some(env),
            user: Some(self.user.clone()),
            working_dir: Some("/tmp".to_owned()),
            labels: Some(self.labels()),
            host_config: Some(host_config),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            )
            .await
            .map_err(|e| {
                if is_status(&e, 404) {
                    PackageError::Engine {
                        context: format!("image {} is not on this host", self.image),
                        error: e.to_string(),
                    }
                } else {
                    engine(format!("creating a container of {}", self.image))(e)
                }
            })?;
        Ok(Container {
            docker: self.docker.clone(),
            id: Some(created.id),
        })
    }

    /// Whether the volume exists (it may still be incomplete).
    async fn exists(&self) -> Result<bool, PackageError> {
        match self.docker.inspect_volume(&self.name).await {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 404) => Ok(false),
            Err(e) => Err(engine(format!("inspecting volume {}", self.name))(e)),
        }
    }

    pub(super) async fn cached(&self, pkg: &Package) -> Result<Option<Installed>, PackageError> {
        if !self.exists().await? {
            return Ok(None);
        }
        let probe = self.create(&[], &[], true).await?;
        let outcome = async {
            let marker = self.dir.join(MARKER);
            if probe.download(&marker, &self.dir).await?.is_empty() {
                return Ok(None);
            }
            Ok(self.find(pkg, &probe).await.ok())
        }
        .await;
        probe.remove().await;
        outcome
    }

    pub(super) async fn clear(&self) -> Result<(), PackageError> {
        match self
            .docker
            .remove_volume(
                &self.name,
                Some(RemoveVolumeOptionsBuilder::new().force(false).build()),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(engine(format!(
                "removing the incomplete volume {}",
                self.name
            ))(e)),
        }
    }

    /// Creates the volume and, in it, the install directory owned by the tool's user (a new
    /// volume is root's): uploaded with that owner in its tar header when the user is
    /// numeric, else with `copy_uidgid`, by which the engine gives it to the user the probe
    /// runs as, looked up in the image. So installers need no root step.
    pub(super) async fn prepare(&self) -> Result<(), PackageError> {
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(self.name.clone()),
                labels: Some(self.labels()),
                ..Default::default()
            })
            .await
            .map_err(engine(format!("creating volume {}", self.name)))?;
        let probe = self.create(&[], &[], false).await?;
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        let numeric = numeric_user(&self.user);
        if let Some((uid, gid)) = numeric {
            header.set_uid(uid);
            header.set_gid(gid);
        }
        let outcome = probe
            .upload(
                Path::new(MOUNT),
                tar_of(&format!("{name}/"), header, &[]),
                numeric.is_none(),
            )
            .await;
        probe.remove().await;
        outcome
    }

    /// Runs an installer in a container, its output lines forwarded as they come.
    pub(super) async fn run(
        &self,
        cmd: Cmd,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Output, PackageError> {
        let argv: Vec<String> = std::iter::once(cmd.program.clone())
            .chain(cmd.args.iter().cloned())
            .collect();
        let container = self.create(&argv, &cmd.env, false).await?;
        let outcome = self.run_in(&container, cmd.needs, progress).await;
        container.remove().await;
        outcome
    }

    async fn run_in(
        &self,
        container: &Container,
        needs: Needs,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Output, PackageError> {
        let id = container.id();
        if let Err(e) = self.docker.start_container(id, None).await {
            // The OCI runtime's words for a program the image lacks.
            let text = e.to_string();
            if text.contains("executable file not found") || text.contains("no such file") {
                return Err(PackageError::MissingInImage {
                    tool: needs.program(),
                    image: self.image.clone(),
                });
            }
            return Err(engine("starting an installer")(e));
        }
        let lines = Lines::new(progress);
        let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut logs = self.docker.logs(
            id,
            Some(
                LogsOptionsBuilder::new()
                    .follow(true)
                    .stdout(true)
                    .stderr(true)
                    .build(),
            ),
        );
        while let Some(chunk) = logs.next().await {
            let (which, bytes) = match chunk {
                Ok(bollard::container::LogOutput::StdErr { message }) => (1, message),
                Ok(other) => (0, other.into_bytes()),
                Err(e) => return Err(engine("reading an installer's output")(e)),
            };
            let buf = &mut partial[which];
            buf.extend_from_slice(&bytes);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                lines.push(&line);
            }
        }
        for rest in partial.iter().filter(|p| !p.is_empty()) {
            lines.push(rest);
        }
        let code = match self
            .docker
            .wait_container(id, None::<bollard::query_parameters::WaitContainerOptions>)
            .next()
            .await
        {
            Some(Ok(r)) => r.status_code,
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(engine("waiting for an installer")(e)),
            None => -1,
        };
        // A shell-less image reports a missing program only at exec time, as 127.
        if code == 127 {
            return Err(PackageError::MissingInImage {
                tool: needs.program(),
                image: self.image.clone(),
            });
        }
        Ok(lines.finish(code == 0))
    }

    /// What to run for the install in the volume, as a container mounting it sees it.
    pub(super) async fn executable(&self, pkg: &Package) -> Result<Installed, PackageError> {
        let probe = self.create(&[], &[], true).await?;
        let outcome = self.find(pkg, &probe).await;
        probe.remove().await;
        outcome
    }

    /// Copies out of the volume what [`super::executable`] reads (the manifest and bin
    /// scripts, or the venv's `bin`) and asks it.
    async fn find(&self, pkg: &Package, probe: &Container) -> Result<Installed, PackageError> {
        let mut files = Snapshot::default();
        match pkg {
            Package::Npm { name, .. } => {
                let pkg_dir = npm_package_dir(name);
                let manifest = pkg_dir.join("package.json");
                files.add(probe.download(&self.dir.join(&manifest), &self.dir).await?);
                let bins: Vec<String> = files
                    .read(&manifest, MAX_MANIFEST)
                    .ok()
                    .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok())
                    .map(|m| match m.get("bin") {
                        Some(serde_json::Value::String(s)) => vec![s.clone()],
                        Some(serde_json::Value::Object(o)) => o
                            .values()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect(),
                        _ => Vec::new(),
                    })
                    .unwrap_or_default();
                for bin in bins {
                    let rel = pkg_dir.join(&bin);
                    // Paths leaving the package are refused by the shared check anyway.
                    if rel.components().all(|c| {
                        matches!(
                            c,
                            std::path::Component::Normal(_) | std::path::Component::CurDir
                        )
                    }) {
                        files.add(probe.download(&self.dir.join(rel), &self.dir).await?);
                    }
                }
            }
            Package::PyPi { .. } => {
                files.add(probe.download(&self.dir.join("bin"), &self.dir).await?);
            }
        }
        super::executable(pkg, &files, &self.dir)
    }

    /// Flushes the install to disk, then writes the marker: after a crash the volume is
    /// either marked and whole, or unmarked.
    pub(super) async fn commit(&self, pkg: &Package) -> Result<(), PackageError> {
        let out = self.run(Cmd::new("sync", Needs::Sync), &|_| {}).await?;
        if !out.success {
            return Err(PackageError::InstallFailed {
                package: pkg.to_string(),
                detail: format!("sync failed in the image: {}", out.lines.join("\n")),
            });
        }
        let note = format!("{pkg}\n");
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(note.len() as u64);
        let probe = self.create(&[], &[], false).await?;
        let outcome = probe
            .upload(&self.dir, tar_of(MARKER, header, note.as_bytes()), false)
            .await;
        probe.remove().await;
        outcome
    }

    /// Removes a failed install's volume.
    pub(super) async fn discard(&self) {
        if let Err(e) = self.clear().await {
            tracing::warn!(volume = %self.name, error = %e, "Could not remove a failed install's volume");
        }
    }
}

/// `uid[:gid]` as numbers (the group defaulting to the user's number), or `None` for a name.
fn numeric_user(user: &str) -> Option<(u64, u64)> {
    let (uid, gid) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = uid.parse().ok()?;
    let gid = match gid {
        Some(g) => g.parse().ok()?,
        None => uid,
    };
    Some((uid, gid))
}

/// A tar archive of one entry.
fn tar_of(path: &str, mut header: tar::Header, data: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let _ = header.set_path(path);
    header.set_cksum();
    let _ = builder.append(&header, data);
    builder.into_inner().unwrap_or_default()
}

/// The volume's name for `pkg` built in the image `image_id` by `node`: readable, and unique
/// per spec, image and node (whose install lock is in its own data directory, so two nodes
/// sharing an engine never fill one volume at once). Docker allows `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn volume_name(pkg: &Package, image_id: &str, node: &str) -> String {
    let spec = pkg.to_string();
    let mut readable: String = spec
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => c,
            _ => '_',
        })
        .collect();
    readable.truncate(100);
    let hash = sha2::Sha256::digest(format!("{spec}\n{image_id}\n{node}"));
    let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("switchboard-pkg-{readable}-{hex}")
}

/// A container made for an install, removed when done (or, if the future holding it is
/// dropped, by a task spawned then).
struct Container {
    docker: Docker,
    id: Option<String>,
}

impl Container {
    fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    async fn remove(mut self) {
        if let Some(id) = self.id.take() {
            remove(&self.docker, &id).await;
        }
    }

    /// A tar of `path` as the container sees it (the volume included), empty if it does not
    /// exist; entries are named relative to `base`.
    async fn download(
        &self,
        path: &Path,
        base: &Path,
    ) -> Result<Vec<(PathBuf, Entry)>, PackageError> {
        let mut stream = self.docker.download_from_container(
            self.id(),
            Some(
                DownloadFromContainerOptionsBuilder::new()
                    .path(&path.to_string_lossy())
                    .build(),
            ),
        );
        let mut tar = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => tar.extend_from_slice(&c),
                Err(e) if is_status(&e, 404) => return Ok(Vec::new()),
                Err(e) => return Err(engine(format!("reading {}", path.display()))(e)),
            }
        }
        // Entries are named from the last component of `path`.
        let parent = path
            .parent()
            .and_then(|p| p.strip_prefix(base).ok())
            .unwrap_or(Path::new(""))
            .to_owned();
        let mut entries = Vec::new();
        let mut archive = tar::Archive::new(&tar[..]);
        let read_error = |e: std::io::Error| PackageError::Io {
            context: format!("cannot read the copy of {}", path.display()),
            error: e,
        };
        for entry in archive.entries().map_err(read_error)? {
            let mut entry = entry.map_err(read_error)?;
            let name = parent.join(entry.path().map_err(read_error)?);
            let kind = entry.header().entry_type();
            let keep = if name.ends_with("package.json") {
                MAX_MANIFEST
            } else {
                SCRIPT_HEAD
            };
            let mut data = Vec::new();
            if kind.is_file() {
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(&mut entry, keep as u64),
                    &mut data,
                )
                .map_err(read_error)?;
            }
            let entry = if kind.is_file() {
                Entry::File(data)
            } else if kind.is_dir() {
                Entry::Dir
            } else {
                Entry::Other
            };
            entries.push((name, entry));
        }
        Ok(entries)
    }

    /// Extracts `tar` at `path`, its entries owned as their headers say, or (`copy_uidgid`)
    /// by the container's user.
    async fn upload(
        &self,
        path: &Path,
        tar: Vec<u8>,
        copy_uidgid: bool,
    ) -> Result<(), PackageError> {
        let mut options = UploadToContainerOptionsBuilder::new().path(&path.to_string_lossy());
        if copy_uidgid {
            options = options.copy_uidgid("true");
        }
        self.docker
            .upload_to_container(
                self.id(),
                Some(options.build()),
                bollard::body_full(tar.into()),
            )
            .await
            .map_err(engine(format!("writing to {}", path.display())))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(id) = self.id.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let docker = self.docker.clone();
            rt.spawn(async move { remove(&docker, &id).await });
        }
    }
}

async fn remove(docker: &Docker, id: &str) {
    if let Err(e) = docker
        .remove_container(
            id,
            Some(RemoveContainerOptionsBuilder::new().force(true).build()),
        )
        .await
        && !is_status(&e, 404)
    {
        tracing::warn!(container = %id, error = %e, "Could not remove an installer's container");
    }
}

/// A file or directory copied out of a volume: a file's first bytes (all of a manifest).
enum Entry {
    File(Vec<u8>),
    Dir,
    Other,
}

/// The files copied out of a volume, by path relative to the install directory.
#[derive(Default)]
struct Snapshot(HashMap<PathBuf, Entry>);

impl Snapshot {
    fn add(&mut self, entries: Vec<(PathBuf, Entry)>) {
        self.0.extend(entries);
    }
}

impl Files for Snapshot {
    fn read(&self, rel: &Path, max: usize) -> std::io::Result<Vec<u8>> {
        match self.0.get(rel) {
            Some(Entry::File(data)) => Ok(data[..data.len().min(max)].to_vec()),
            _ => Err(std::io::ErrorKind::NotFound.into()),
        }
    }

    fn is_file(&self, rel: &Path) -> bool {
        matches!(self.0.get(rel), Some(Entry::File(_)))
    }

    fn list(&self, rel: &Path) -> std::io::Result<Vec<String>> {
        if !matches!(self.0.get(rel), Some(Entry::Dir)) {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        Ok(self
            .0
            .keys()
            .filter(|p| p.parent() == Some(rel))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_are_valid_and_differ_by_spec_and_image() {
        let pkg = |c: &str| Package::parse(c).and_then(Result::ok).expect("valid");
        let everything = pkg("npx:@modelcontextprotocol/server-everything@2026.8.31");
        let name = volume_name(&everything, "sha256:1", "n");
        assert!(
            name.starts_with(
                "switchboard-pkg-npx__modelcontextprotocol_server-everything_2026.8.31-"
            ),
            "{name}"
        );
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
            "{name}"
        );
        assert_ne!(name, volume_name(&everything, "sha256:2", "n"));
        assert_ne!(name, volume_name(&everything, "sha256:1", "m"));
        assert_ne!(
            volume_name(&pkg("uvx:a-b==1"), "i", "n"),
            volume_name(&pkg("uvx:a_b==1"), "i", "n"),
            "names that read alike still differ"
        );
    }
}
