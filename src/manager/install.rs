//! Package installs (`npx:` / `uvx:` tools) for a deployment, with progress in its log and
//! events.

use std::path::PathBuf;

use tokio::sync::mpsc;
use uuid::Uuid;

use super::Manager;
use crate::{
    events::EventKind,
    packages::{Package, PackageError},
    registry::Tool,
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
        let installed = crate::packages::ensure_installed(
            &pkg,
            &self.hosting.packages_dir,
            &self.hosting.registries,
            &progress,
        )
        .await;
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
