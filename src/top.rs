//! `switchboard top`: a live, refreshing table of this Switchboard's deployments with their
//! status, health, restarts, CPU, memory and request rate.
//!
//! One refresh is two API calls, whatever the number of deployments: the live deployments,
//! and `/metrics` (CPU seconds, resident memory and request counters per deployment). Rates
//! are differences between two refreshes. Drawn with ratatui on the alternate screen; `q`,
//! Esc or Ctrl-C quits and restores the terminal.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Cell, Row, Table},
};

use crate::deployment::{Deployment, DeploymentStatus, HealthStatus};

/// Per-deployment counters read from `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    cpu_seconds: f64,
    memory_bytes: f64,
    requests: f64,
}

/// Reads the per-deployment series `top` shows out of the Prometheus text format.
fn parse_metrics(text: &str) -> HashMap<String, Sample> {
    let mut out: HashMap<String, Sample> = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let Some(dep) = labels
            .split(',')
            .find_map(|kv| kv.strip_prefix("deployment=\""))
            .and_then(|v| v.split('"').next())
        else {
            continue;
        };
        let s = out.entry(dep.to_owned()).or_default();
        match name {
            "switchboard_deployment_cpu_seconds" => s.cpu_seconds = value,
            "switchboard_deployment_resident_memory_bytes" => s.memory_bytes = value,
            "switchboard_proxy_requests_total" => s.requests += value,
            _ => {}
        }
    }
    out
}

fn human_bytes(b: f64) -> String {
    match b {
        b if b >= 1024.0 * 1024.0 * 1024.0 => format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0)),
        b if b >= 1024.0 * 1024.0 => format!("{:.1} MiB", b / (1024.0 * 1024.0)),
        b if b >= 1024.0 => format!("{:.0} KiB", b / 1024.0),
        b => format!("{b:.0} B"),
    }
}

struct View {
    deployments: Vec<Deployment>,
    now: HashMap<String, Sample>,
    rates: HashMap<String, (f64, f64)>,
    error: Option<String>,
    refreshed: chrono::DateTime<chrono::Utc>,
}

fn draw(frame: &mut ratatui::Frame<'_>, view: &View, url: &str) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let running = view
        .deployments
        .iter()
        .filter(|d| d.status == DeploymentStatus::Running)
        .count();
    let total_rate: f64 = view.rates.values().map(|r| r.1).sum();
    frame.render_widget(
        Line::from(format!(
            "switchboard top — {url} — {} live, {running} running, {total_rate:.1} req/s — {}",
            view.deployments.len(),
            view.refreshed.format("%H:%M:%S")
        ))
        .style(Style::new().add_modifier(Modifier::BOLD)),
        head,
    );
    let rows = view.deployments.iter().map(|d| {
        let id = d.id.to_string();
        let sample = view.now.get(&id).copied().unwrap_or_default();
        let (cpu, rate) = view.rates.get(&id).copied().unwrap_or_default();
        let status_style = match d.status {
            DeploymentStatus::Running => Style::new().fg(Color::Green),
            DeploymentStatus::Starting => Style::new().fg(Color::Yellow),
            _ => Style::new().fg(Color::Red),
        };
        let health_style = match d.health_status {
            HealthStatus::Healthy => Style::new().fg(Color::Green),
            HealthStatus::Unhealthy => Style::new().fg(Color::Red),
            HealthStatus::Unknown => Style::new(),
        };
        Row::new(vec![
            // As `ps` prints ids, so one can be pasted into `stop` or `logs`.
            Cell::from(d.id.simple().to_string()[..12].to_owned()),
            Cell::from(d.tool_slug.clone()),
            Cell::from(d.status.as_str()).style(status_style),
            Cell::from(d.health_status.as_str()).style(health_style),
            Cell::from(d.restart_count.to_string()),
            Cell::from(format!("{cpu:.1}")),
            Cell::from(human_bytes(sample.memory_bytes)),
            Cell::from(format!("{rate:.1}")),
            Cell::from(d.port.map(|p| p.to_string()).unwrap_or_default()),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(13),
            Constraint::Min(12),
            Constraint::Length(9),
            Constraint::Length(10),
            Constraint::Length(9),
            Constraint::Length(7),
            Constraint::Length(10),
            Constraint::Length(9),
            Constraint::Length(6),
        ],
    )
    .header(
        Row::new([
            "ID", "TOOL", "STATUS", "HEALTH", "RESTARTS", "CPU%", "MEM", "REQ/S", "PORT",
        ])
        .style(Style::new().add_modifier(Modifier::REVERSED)),
    )
    .block(Block::bordered());
    frame.render_widget(table, body);
    let foot_text = match &view.error {
        Some(e) => Line::from(format!("error: {e}")).style(Style::new().fg(Color::Red)),
        None => Line::from("q: quit"),
    };
    frame.render_widget(foot_text, foot);
}

/// Runs the view until the user quits.
pub async fn run(
    fetch: impl AsyncFn() -> anyhow::Result<(Vec<Deployment>, String)>,
    url: &str,
    interval: Duration,
) -> anyhow::Result<()> {
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let result = async {
        let mut prev: Option<(Instant, HashMap<String, Sample>)> = None;
        let mut view = View {
            deployments: Vec::new(),
            now: HashMap::new(),
            rates: HashMap::new(),
            error: None,
            refreshed: chrono::Utc::now(),
        };
        loop {
            match fetch().await {
                Ok((mut deployments, metrics)) => {
                    deployments.sort_by(|a, b| {
                        (a.tool_slug.as_str(), a.deployed_at)
                            .cmp(&(b.tool_slug.as_str(), b.deployed_at))
                    });
                    let now = parse_metrics(&metrics);
                    let at = Instant::now();
                    view.rates = match &prev {
                        Some((t0, before)) => {
                            let dt = at.duration_since(*t0).as_secs_f64().max(1e-3);
                            now.iter()
                                .map(|(id, s)| {
                                    let b = before.get(id).copied().unwrap_or(*s);
                                    let cpu =
                                        ((s.cpu_seconds - b.cpu_seconds) / dt * 100.0).max(0.0);
                                    let rate = ((s.requests - b.requests) / dt).max(0.0);
                                    (id.clone(), (cpu, rate))
                                })
                                .collect()
                        }
                        None => HashMap::new(),
                    };
                    prev = Some((at, now.clone()));
                    view.deployments = deployments;
                    view.now = now;
                    view.error = None;
                }
                Err(e) => view.error = Some(format!("{e:#}")),
            }
            view.refreshed = chrono::Utc::now();
            terminal
                .draw(|f| draw(f, &view, url))
                .context("cannot draw")?;
            // Wait for a key or the next refresh, off the async thread.
            let key = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Event>> {
                if event::poll(interval)? {
                    return event::read().map(Some);
                }
                Ok(None)
            })
            .await
            .context("the input thread failed")??;
            if let Some(Event::Key(k)) = key
                && k.kind == KeyEventKind::Press
                && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                    || (k.code == KeyCode::Char('c')
                        && k.modifiers.contains(KeyModifiers::CONTROL)))
            {
                return Ok(());
            }
        }
    }
    .await;
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_read_per_deployment() {
        let text = "# TYPE x counter\n\
            switchboard_proxy_requests_total{tool=\"a\",deployment=\"d1\",method=\"GET\",class=\"2xx\"} 3\n\
            switchboard_proxy_requests_total{tool=\"a\",deployment=\"d1\",method=\"POST\",class=\"2xx\"} 4\n\
            switchboard_deployment_cpu_seconds{tool=\"a\",deployment=\"d1\"} 1.5\n\
            switchboard_deployment_resident_memory_bytes{tool=\"a\",deployment=\"d1\"} 2048\n\
            switchboard_ports_free 9\n";
        let m = parse_metrics(text);
        let d1 = m["d1"];
        assert_eq!(d1.requests, 7.0);
        assert_eq!(d1.cpu_seconds, 1.5);
        assert_eq!(d1.memory_bytes, 2048.0);
        assert_eq!(human_bytes(2048.0), "2 KiB");
        assert_eq!(human_bytes(5.0 * 1024.0 * 1024.0), "5.0 MiB");
    }
}
