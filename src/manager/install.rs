//! Package installs (`npx:` / `uvx:` tools) for a deployment, with progress in its log and
//! events.

use std::path::PathBuf;

use tokio::sync::mpsc;
use uuid::Uuid;

use super::Manager;
use crate::{
    events::EventKind,
    packages::{Installed, Package, PackageError, Volume},
    registry::{Tool, ToolSpec},
    runtime::RuntimeKind,
};

/// Why a tool's package is not there to run.
#[derive(Debug, thiserror::Error)]
pub(super) enum InstallError {
    /// The command names no valid package.
    #[error(transparent)]
    BadName(PackageError),
    #[error("cannot install {package}: {error}")]
    Failed {
        package: Package,
        error: PackageError,
    },
}

impl Manager {
    /// For a tool named by package (`npx:` / `uvx:`), installs it (once; later deployments
    /// use the install) and returns the tool with the installed program as its command.
    /// Progress goes to the deployment's log and to events (`install`), so `switchboard
    /// deploy --wait`, `logs -f` and `events` show it.
    pub(super) async fn install_package(
        &self,
        id: Uuid,
        mut tool: Tool,
    ) -> Result<Tool, (Tool, InstallError)> {
        let pkg = match Package::parse(&tool.spec.command) {
            None => return Ok(tool),
            Some(Ok(p)) => p,
            Some(Err(e)) => return Err((tool, InstallError::BadName(e))),
        };
        // The progress callback cannot wait: its lines go, in order, to a task that appends
        // them to the log with async file I/O.
        let (lines, writer) = match self.runtimes.of(id).log_file(id) {
            Some(path) => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(tokio::spawn(append_lines(path, rx))))
            }
            None => (None, None),
        };
        let slug = tool.spec.slug.clone();
        let progress = |line: &str| {
            if line.trim().is_empty() {
                return;
            }
            if let Some(lines) = &lines {
                let _ = lines.send(format!(
                    "{} {line}\n",
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                ));
            }
            self.publish(
                EventKind::Install,
                id,
                &slug,
                None,
                "INSTALLING",
                Some(line.to_owned()),
            );
        };
        let installed = match tool.spec.runtime {
            RuntimeKind::Process => {
                crate::packages::ensure_installed(
                    &pkg,
                    &self.hosting.packages_dir,
                    &self.hosting.registries,
                    &progress,
                )
                .await
            }
            RuntimeKind::Docker => {
                self.install_in_volume(&pkg, &mut tool.spec, &progress)
                    .await
            }
        };
        // Every line is in the log before the server, which writes there too, starts.
        drop(lines);
        if let Some(writer) = writer {
            let _ = writer.await;
        }
        match installed {
            Ok(i) => {
                self.publish(EventKind::Install, id, &slug, None, "INSTALLED", None);
                let mut args: Vec<String> = i.args;
                args.append(&mut tool.spec.args);
                tool.spec.command = i.program.display().to_string();
                tool.spec.args = args;
                Ok(tool)
            }
            Err(error) => {
                let e = InstallError::Failed {
                    package: pkg,
                    error,
                };
                tracing::warn!(deployment = %id, tool = %slug, error = %e, "Package install failed");
                self.publish(
                    EventKind::Install,
                    id,
                    &slug,
                    None,
                    "INSTALL_FAILED",
                    Some(e.to_string()),
                );
                Err((tool, e))
            }
        }
    }
}

impl Manager {
    /// Installs a `runtime = "docker"` tool's package into its volume, built in the tool's
    /// image or the configured base image (which the spec then names), with the tool's
    /// container settings; on success the spec also names the volume, which its containers
    /// mount.
    async fn install_in_volume(
        &self,
        pkg: &Package,
        spec: &mut ToolSpec,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Installed, PackageError> {
        let source = match &spec.image {
            Some(_) => "the tool's image",
            None => {
                let (image, key) = self.hosting.images.of(pkg);
                spec.image = Some(image.to_owned());
                key
            }
        };
        let container = super::launch::container_launch(spec);
        let runtime_error = |context: String| {
            move |e: crate::runtime::RuntimeError| PackageError::Engine {
                context,
                error: e.to_string(),
            }
        };
        let docker = self
            .runtimes
            .docker()
            .map_err(runtime_error("the docker runtime".into()))?;
        let image_id = docker
            .image_id(&container)
            .await
            .map_err(runtime_error(format!(
                "the image to install {pkg} in ({source})"
            )))?;
        let volume = Volume::new(
            docker
                .engine()
                .await
                .map_err(runtime_error("the docker runtime".into()))?,
            pkg,
            &container,
            &image_id,
            docker.node(),
            &self.hosting.packages_dir,
        );
        let installed = crate::packages::ensure_installed_in_volume(
            pkg,
            &volume,
            &self.hosting.registries,
            progress,
        )
        .await?;
        spec.package_volume = Some(volume.name().to_owned());
        Ok(installed)
    }
}

/// Appends each line received to the log file at `path` until the sender is gone.
async fn append_lines(path: PathBuf, mut lines: mpsc::UnboundedReceiver<String>) {
    use tokio::io::AsyncWriteExt as _;
    if let Some(dir) = path.parent() {
        let _ = tokio::fs::create_dir_all(dir).await;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .ok();
    while let Some(line) = lines.recv().await {
        if let Some(f) = &mut file {
            let _ = f.write_all(line.as_bytes()).await;
        }
    }
    if let Some(f) = &mut file {
        let _ = f.flush().await;
    }
}
