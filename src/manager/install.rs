//! Package installs (`npx:` / `uvx:` tools) for a deployment, with progress in its log and
//! events.

use uuid::Uuid;

use super::Manager;
use crate::{events::EventKind, registry::Tool};

impl Manager {
    /// For a tool named by package (`npx:` / `uvx:`), installs it (once; later deployments
    /// use the install) and returns the tool with the installed program as its command.
    /// Progress goes to the deployment's log and to events (`install`), so `switchboard
    /// deploy --wait`, `logs -f` and `events` show it.
    pub(super) async fn install_package(
        &self,
        id: Uuid,
        mut tool: Tool,
    ) -> Result<Tool, (Tool, String)> {
        let pkg = match crate::packages::Package::parse(&tool.spec.command) {
            None => return Ok(tool),
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                let msg = e.to_string();
                return Err((tool, msg));
            }
        };
        let log = self.runtime.log_file(id);
        if let Some(dir) = log.as_ref().and_then(|l| l.parent()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let slug = tool.spec.slug.clone();
        let progress = |line: &str| {
            if line.trim().is_empty() {
                return;
            }
            if let Some(path) = &log {
                let stamped = format!(
                    "{} {line}\n",
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                );
                let _ = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, stamped.as_bytes()));
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
        match installed {
            Ok(i) => {
                self.publish(EventKind::Install, id, &slug, None, "INSTALLED", None);
                let mut args: Vec<String> = i.args;
                args.append(&mut tool.spec.args);
                tool.spec.command = i.program.display().to_string();
                tool.spec.args = args;
                Ok(tool)
            }
            Err(e) => {
                let msg = format!("cannot install {pkg}: {e}");
                tracing::warn!(deployment = %id, tool = %slug, error = %msg, "Package install failed");
                self.publish(
                    EventKind::Install,
                    id,
                    &slug,
                    None,
                    "INSTALL_FAILED",
                    Some(msg.clone()),
                );
                Err((tool, msg))
            }
        }
    }
}
