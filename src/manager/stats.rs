//! Resource use and traffic of deployments: the scrape-time metrics gauges and a deployment's
//! stats.

use uuid::Uuid;

use super::{Manager, ManagerError};
use crate::{
    deployment::DeploymentStatus,
    runtime::{InstanceRef, RuntimeKind, Usage},
};

impl Manager {
    /// Refreshes the scrape-time gauges: statuses, in-flight requests and streams, the
    /// processes' CPU and memory, ports, and Switchboard's own process.
    pub async fn refresh_metrics(&self) {
        let Some(m) = &self.metrics else { return };
        m.clear_snapshot();
        let live: Vec<(Uuid, String, DeploymentStatus, RuntimeKind)> = self
            .live()
            .iter()
            .map(|(id, l)| (*id, l.slug.clone(), l.status.borrow().0, l.runtime))
            .collect();
        for (id, slug, status, runtime) in &live {
            m.deployments
                .get_or_create(&crate::metrics::StatusLabels {
                    tool: slug.clone(),
                    status: status.as_str(),
                })
                .inc();
            if let Some(usage) = self.usage(*id, *runtime).await {
                let labels = crate::metrics::DeploymentLabels {
                    tool: slug.clone(),
                    deployment: id.to_string(),
                };
                m.process_cpu.get_or_create(&labels).set(usage.cpu_seconds);
                m.process_memory
                    .get_or_create(&labels)
                    .set(i64::try_from(usage.memory_bytes).unwrap_or(i64::MAX));
            }
        }
        for (slug, b) in self.routes.all_backends() {
            let labels = crate::metrics::DeploymentLabels {
                tool: slug,
                deployment: b.deployment.to_string(),
            };
            m.in_flight
                .get_or_create(&labels)
                .set(i64::from(b.outstanding()));
            m.open_streams
                .get_or_create(&labels)
                .set(i64::from(b.open_streams()));
        }
        if let Some(ports) = self.runtimes.host_ports() {
            m.ports_in_use.set(i64::try_from(ports.in_use).unwrap_or(0));
            m.ports_free
                .set(i64::try_from(ports.total.saturating_sub(ports.in_use)).unwrap_or(0));
        }
        let (cpu, rss) = crate::runtime::process::usage_of(&[std::process::id()]);
        m.own_cpu.set(cpu);
        m.own_memory.set(i64::try_from(rss).unwrap_or(i64::MAX));
    }

    /// What a deployment uses: its instance, plus the servers another runtime runs for it (a
    /// stdio bridge's server containers) when the record's runtime is not the instance's.
    async fn usage(&self, id: Uuid, runtime: RuntimeKind) -> Option<Usage> {
        let instance = self.runtimes.of(id);
        let mut usage = instance.usage(id).await?;
        if instance.kind() != runtime
            && let Ok(servers) = self.runtimes.get(runtime)
            && let Some(more) = servers.servers_usage(id).await
        {
            usage.add(&more);
        }
        Some(usage)
    }

    /// A live deployment's resource use and traffic.
    pub async fn stats(&self, id: Uuid) -> Result<crate::metrics::DeploymentStats, ManagerError> {
        let d = self.get_deployment(id).await?;
        if !d.status.is_live() {
            return Err(ManagerError::NotLive {
                id,
                status: d.status,
            });
        }
        let usage = self.usage(id, d.runtime).await.unwrap_or_default();
        let backend = self
            .routes
            .all_backends()
            .into_iter()
            .find(|(_, b)| b.deployment == id)
            .map(|(_, b)| b);
        let by_class = backend
            .as_ref()
            .and_then(|b| b.metrics.as_ref())
            .map(|m| m.by_class())
            .unwrap_or_default();
        Ok(crate::metrics::DeploymentStats {
            deployment: id,
            tool: d.tool_slug,
            status: d.status,
            pid: d.instance.as_ref().and_then(InstanceRef::pid),
            processes: usage.processes,
            cpu_seconds: usage.cpu_seconds,
            resident_memory_bytes: usage.memory_bytes,
            open_fds: usage.open_fds.unwrap_or(0),
            uptime_seconds: usage.uptime_seconds,
            restart_count: d.restart_count,
            requests_total: by_class.iter().sum(),
            requests_by_class: crate::metrics::CLASSES
                .iter()
                .zip(by_class)
                .map(|(c, n)| ((*c).to_owned(), n))
                .collect(),
            in_flight: backend.as_ref().map_or(0, |b| b.outstanding()),
            open_streams: backend.as_ref().map_or(0, |b| b.open_streams()),
        })
    }
}
