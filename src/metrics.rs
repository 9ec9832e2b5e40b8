//! Prometheus metrics, served at `GET /metrics` in the text exposition format.
//!
//! One explicit [`Registry`] (no global state: tests encode it and read the text). What the
//! proxy counts on every request is pre-resolved per backend ([`BackendMetrics`]: plain atomic
//! counters and one histogram, no label lookup or allocation per request). What can be read
//! when Prometheus scrapes (in-flight requests, open streams, statuses, process CPU and memory,
//! ports) is read then, into gauges that are rebuilt on each scrape, so the request path pays
//! nothing for it. The counters and histograms of a deployment are dropped when it ends
//! ([`Metrics::forget_deployment`]), so ended deployments leave no series behind.

use std::sync::{Mutex, atomic::AtomicU64};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeploymentLabels {
    pub tool: String,
    pub deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub tool: String,
    pub deployment: String,
    pub method: &'static str,
    /// `1xx` … `5xx`.
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub tool: String,
    pub deployment: String,
    /// `connect`, `timeout`, `status_5xx`, `other`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub tool: String,
    pub deployment: String,
    /// `healthy` or `unhealthy`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub tool: String,
    pub status: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 250 µs … ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

pub const METHODS: [&str; 4] = ["GET", "POST", "DELETE", "OTHER"];
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Why an upstream request failed, as `proxy_upstream_errors` counts it (the `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// No connection to the server.
    Connect,
    /// No response headers within the header timeout.
    Timeout,
    /// The server answered with a 5xx (passed to the client as it is).
    Status5xx,
    /// The request failed otherwise (the connection broke, a malformed response).
    Other,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 4] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Status5xx,
        UpstreamErrorKind::Other,
    ];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Status5xx => "status_5xx",
            UpstreamErrorKind::Other => "other",
        }
    }
}

/// How the `/mcp` gate decided on a request, as `mcp_auth_decisions` counts it (the
/// `outcome` label; never a principal, so the label set stays this small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    Allowed,
    /// No credential, or not a bearer one.
    Missing,
    /// An unknown or revoked key.
    Invalid,
    Expired,
    /// A valid principal without the grant.
    Forbidden,
    /// 429: over the principal's rate limit.
    RateLimited,
    /// 429: over the principal's cap on requests in flight.
    ConcurrencyLimited,
}

impl AuthOutcome {
    pub const ALL: [AuthOutcome; 7] = [
        AuthOutcome::Allowed,
        AuthOutcome::Missing,
        AuthOutcome::Invalid,
        AuthOutcome::Expired,
        AuthOutcome::Forbidden,
        AuthOutcome::RateLimited,
        AuthOutcome::ConcurrencyLimited,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthOutcome::Allowed => "allowed",
            AuthOutcome::Missing => "missing",
            AuthOutcome::Invalid => "invalid",
            AuthOutcome::Expired => "expired",
            AuthOutcome::Forbidden => "forbidden",
            AuthOutcome::RateLimited => "rate_limited",
            AuthOutcome::ConcurrencyLimited => "concurrency_limited",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// The gate's counters, resolved once (one per outcome).
#[derive(Debug, Clone)]
pub struct AuthMetrics {
    outcomes: [Counter; 7],
}

impl AuthMetrics {
    pub fn count(&self, outcome: AuthOutcome) {
        self.outcomes[outcome as usize].inc();
    }
}

/// Index into [`METHODS`].
pub fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::POST => 1,
        http::Method::DELETE => 2,
        _ => 3,
    }
}

/// Index into [`CLASSES`].
pub fn class_index(status: http::StatusCode) -> usize {
    usize::from(status.as_u16() / 100).clamp(1, 5) - 1
}

/// The per-request metrics of one backend, resolved once when the backend is created.
#[derive(Debug)]
pub struct BackendMetrics {
    /// `[method][class]`.
    requests: [[Counter; 5]; 4],
    latency: Histogram,
    errors: [Counter; 4],
}

impl BackendMetrics {
    /// Counts a response the client got, with the time to its headers.
    pub fn observe(&self, method: usize, status: http::StatusCode, seconds: f64) {
        self.requests[method][class_index(status)].inc();
        self.latency.observe(seconds);
    }

    /// Responses so far by status class (`CLASSES` order), all methods together.
    pub fn by_class(&self) -> [u64; 5] {
        std::array::from_fn(|c| self.requests.iter().map(|m| m[c].get()).sum())
    }

    /// Counts an upstream failure.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.errors[kind as usize].inc();
    }
}

/// A gauge that holds a float (CPU seconds).
type FloatGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily<DeploymentLabels>,
    upstream_errors: Family<ErrorLabels, Counter>,
    health_checks: Family<CheckLabels, Counter>,
    health_latency: HistogramFamily<DeploymentLabels>,
    restarts: Family<DeploymentLabels, Counter>,
    auth: Family<OutcomeLabels, Counter>,
    audit_dropped: Counter,
    // Rebuilt at each scrape.
    pub in_flight: Family<DeploymentLabels, Gauge>,
    pub open_streams: Family<DeploymentLabels, Gauge>,
    pub deployments: Family<StatusLabels, Gauge>,
    pub process_cpu: Family<DeploymentLabels, FloatGauge>,
    pub process_memory: Family<DeploymentLabels, Gauge>,
    pub ports_in_use: Gauge,
    pub ports_free: Gauge,
    pub own_cpu: FloatGauge,
    pub own_memory: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("switchboard")),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            upstream_errors: Family::default(),
            health_checks: Family::default(),
            health_latency: Family::new_with_constructor(latency_histogram),
            restarts: Family::default(),
            auth: Family::default(),
            audit_dropped: Counter::default(),
            in_flight: Family::default(),
            open_streams: Family::default(),
            deployments: Family::default(),
            process_cpu: Family::default(),
            process_memory: Family::default(),
            ports_in_use: Gauge::default(),
            ports_free: Gauge::default(),
            own_cpu: FloatGauge::default(),
            own_memory: Gauge::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|p| p.into_inner());
            r.register(
                "proxy_requests",
                "Requests proxied to a deployment, by method and response status class",
                m.requests.clone(),
            );
            r.register_with_unit(
                "proxy_response_header_latency",
                "Time from a request's arrival to its response headers",
                Unit::Seconds,
                m.latency.clone(),
            );
            r.register(
                "proxy_in_flight_requests",
                "Requests (and streams) in flight to a deployment",
                m.in_flight.clone(),
            );
            r.register(
                "proxy_open_streams",
                "Open SSE response streams from a deployment",
                m.open_streams.clone(),
            );
            r.register(
                "proxy_upstream_errors",
                "Failed upstream requests by kind",
                m.upstream_errors.clone(),
            );
            r.register(
                "health_checks",
                "Scheduled health checks by result",
                m.health_checks.clone(),
            );
            r.register_with_unit(
                "health_check_latency",
                "Duration of scheduled health checks",
                Unit::Seconds,
                m.health_latency.clone(),
            );
            r.register(
                "deployment_restarts",
                "Times a deployment's process was started again",
                m.restarts.clone(),
            );
            r.register(
                "mcp_auth_decisions",
                "Requests to /mcp by the gate's decision (allowed, or why refused: missing, \
                 invalid, expired, forbidden, rate_limited, concurrency_limited)",
                m.auth.clone(),
            );
            r.register(
                "audit_dropped",
                "Audit records lost because the audit writer was behind (its queue full)",
                m.audit_dropped.clone(),
            );
            r.register(
                "deployments",
                "Deployments this node runs, by tool and status",
                m.deployments.clone(),
            );
            r.register_with_unit(
                "deployment_cpu",
                "CPU time used by a deployment's live processes",
                Unit::Seconds,
                m.process_cpu.clone(),
            );
            r.register_with_unit(
                "deployment_resident_memory",
                "Resident memory of a deployment's live processes",
                Unit::Bytes,
                m.process_memory.clone(),
            );
            r.register(
                "ports_in_use",
                "Ports of the configured range held by live deployments",
                m.ports_in_use.clone(),
            );
            r.register(
                "ports_free",
                "Ports of the configured range still free",
                m.ports_free.clone(),
            );
            r.register_with_unit(
                "process_cpu",
                "CPU time used by Switchboard itself",
                Unit::Seconds,
                m.own_cpu.clone(),
            );
            r.register_with_unit(
                "process_resident_memory",
                "Resident memory of Switchboard itself",
                Unit::Bytes,
                m.own_memory.clone(),
            );
        }
        m
    }

    /// The `/mcp` gate's counters; every outcome's series exists from the start (at 0).
    /// The counter of audit records dropped because the writer's queue was full.
    pub fn audit_dropped(&self) -> Counter {
        self.audit_dropped.clone()
    }

    pub fn auth(&self) -> AuthMetrics {
        AuthMetrics {
            outcomes: std::array::from_fn(|i| {
                self.auth
                    .get_or_create(&OutcomeLabels {
                        outcome: AuthOutcome::ALL[i].label(),
                    })
                    .clone()
            }),
        }
    }

    /// The per-request handles of one deployment's backend.
    pub fn backend(&self, tool: &str, deployment: &str) -> BackendMetrics {
        let labels = DeploymentLabels {
            tool: tool.to_owned(),
            deployment: deployment.to_owned(),
        };
        let requests = std::array::from_fn(|m| {
            std::array::from_fn(|c| {
                self.requests
                    .get_or_create(&RequestLabels {
                        tool: tool.to_owned(),
                        deployment: deployment.to_owned(),
                        method: METHODS[m],
                        class: CLASSES[c],
                    })
                    .clone()
            })
        });
        let errors = std::array::from_fn(|k| {
            self.upstream_errors
                .get_or_create(&ErrorLabels {
                    tool: tool.to_owned(),
                    deployment: deployment.to_owned(),
                    kind: UpstreamErrorKind::ALL[k].label(),
                })
                .clone()
        });
        BackendMetrics {
            requests,
            latency: self.latency.get_or_create(&labels).clone(),
            errors,
        }
    }

    pub fn health_check(&self, tool: &str, deployment: &str, healthy: bool, seconds: f64) {
        let result = if healthy { "healthy" } else { "unhealthy" };
        self.health_checks
            .get_or_create(&CheckLabels {
                tool: tool.to_owned(),
                deployment: deployment.to_owned(),
                result,
            })
            .inc();
        self.health_latency
            .get_or_create(&DeploymentLabels {
                tool: tool.to_owned(),
                deployment: deployment.to_owned(),
            })
            .observe(seconds);
    }

    pub fn restart(&self, tool: &str, deployment: &str) {
        self.restarts
            .get_or_create(&DeploymentLabels {
                tool: tool.to_owned(),
                deployment: deployment.to_owned(),
            })
            .inc();
    }

    /// Drops every series of a deployment that has ended, so `/metrics` stays the size of
    /// what is live however many deployments come and go. (A backend still held by an
    /// in-flight request keeps counting into handles nobody exports any more.)
    pub fn forget_deployment(&self, tool: &str, deployment: &str) {
        let labels = DeploymentLabels {
            tool: tool.to_owned(),
            deployment: deployment.to_owned(),
        };
        for method in METHODS {
            for class in CLASSES {
                self.requests.remove(&RequestLabels {
                    tool: tool.to_owned(),
                    deployment: deployment.to_owned(),
                    method,
                    class,
                });
            }
        }
        for kind in UpstreamErrorKind::ALL {
            self.upstream_errors.remove(&ErrorLabels {
                tool: tool.to_owned(),
                deployment: deployment.to_owned(),
                kind: kind.label(),
            });
        }
        for result in ["healthy", "unhealthy"] {
            self.health_checks.remove(&CheckLabels {
                tool: tool.to_owned(),
                deployment: deployment.to_owned(),
                result,
            });
        }
        self.latency.remove(&labels);
        self.health_latency.remove(&labels);
        self.restarts.remove(&labels);
    }

    /// Empties the gauges that are rebuilt at each scrape.
    pub fn clear_snapshot(&self) {
        self.in_flight.clear();
        self.open_streams.clear();
        self.deployments.clear();
        self.process_cpu.clear();
        self.process_memory.clear();
    }

    /// OpenMetrics text (what Prometheus asks for first).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &r);
        out
    }

    /// The classic Prometheus text format (0.0.4), for clients that do not ask for
    /// OpenMetrics (curl, promtool, older scrapers): counters are named with their `_total`
    /// suffix in HELP and TYPE too, and the OpenMetrics-only UNIT and EOF lines go.
    pub fn encode_prometheus(&self) -> String {
        to_prometheus_text(&self.encode())
    }
}

fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// What `GET /api/v1/deployments/{id}/stats` says: the deployment's processes as /proc sees
/// them now, and its traffic since it was deployed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DeploymentStats {
    pub deployment: uuid::Uuid,
    pub tool: String,
    pub status: crate::deployment::DeploymentStatus,
    pub pid: Option<u32>,
    /// Live processes in the deployment's tree.
    pub processes: usize,
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub open_fds: usize,
    /// Since the current main process started.
    pub uptime_seconds: Option<f64>,
    pub restart_count: u32,
    /// Responses sent through the proxy, all and by status class (`2xx`, ...).
    pub requests_total: u64,
    pub requests_by_class: std::collections::BTreeMap<String, u64>,
    pub in_flight: u32,
    pub open_streams: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_error_kinds_index_their_counters() {
        for (i, kind) in UpstreamErrorKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i, "{kind:?}");
        }
    }

    #[test]
    fn classes_and_methods_index() {
        assert_eq!(class_index(http::StatusCode::OK), 1);
        assert_eq!(class_index(http::StatusCode::BAD_GATEWAY), 4);
        assert_eq!(class_index(http::StatusCode::CONTINUE), 0);
        assert_eq!(method_index(&http::Method::PUT), 3);
    }

    #[test]
    fn encoded_text_has_the_families_and_the_counts() {
        let m = Metrics::new();
        let b = m.backend("echo", "d1");
        b.observe(1, http::StatusCode::OK, 0.002);
        b.observe(1, http::StatusCode::OK, 0.004);
        b.upstream_error(UpstreamErrorKind::Connect);
        m.health_check("echo", "d1", true, 0.001);
        m.restart("echo", "d1");
        let text = m.encode();
        assert!(
            text.contains(
                r#"switchboard_proxy_requests_total{tool="echo",deployment="d1",method="POST",class="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"kind="connect"} 1"#), "{text}");
        assert!(
            text.contains("switchboard_proxy_response_header_latency_seconds_count"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"switchboard_deployment_restarts_total{tool="echo",deployment="d1"} 1"#
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        let classic = m.encode_prometheus();
        assert!(
            classic.contains("# TYPE switchboard_proxy_requests_total counter"),
            "{classic}"
        );
        assert!(
            classic.contains("# TYPE switchboard_proxy_response_header_latency_seconds histogram"),
            "{classic}"
        );
        assert!(
            !classic.contains("# EOF") && !classic.contains("# UNIT"),
            "{classic}"
        );
    }

    #[test]
    fn a_forgotten_deployment_leaves_no_series() {
        let m = Metrics::new();
        let empty = m.encode();
        for d in ["d1", "d2"] {
            let b = m.backend("echo", d);
            b.observe(0, http::StatusCode::OK, 0.001);
            b.upstream_error(UpstreamErrorKind::Timeout);
            m.health_check("echo", d, true, 0.001);
            m.health_check("echo", d, false, 0.001);
            m.restart("echo", d);
        }
        m.forget_deployment("echo", "d1");
        let text = m.encode();
        assert!(!text.contains(r#"deployment="d1""#), "{text}");
        assert!(text.contains(r#"deployment="d2""#), "{text}");
        m.forget_deployment("echo", "d2");
        assert_eq!(m.encode(), empty);
    }
}
