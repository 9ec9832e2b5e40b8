//! Restart decisions: whether a deployment whose process ended runs again, and after how long.
//!
//! Pure functions of the policy and of how long the process ran, so the schedule is tested
//! with made-up durations instead of real waiting; the supervisor in [`crate::manager`]
//! measures the durations and sleeps.

use std::time::Duration;

use crate::{
    deployment::ExitInfo,
    registry::{RestartPolicy, RestartSpec},
};

/// Why a deployment's process stopped serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The process exited on its own (or was killed by someone else).
    Exited(ExitInfo),
    /// It never answered its readiness probe within `within`; `last_probe` says how the last
    /// probe failed.
    NotReady {
        within: Duration,
        last_probe: String,
    },
    /// It failed its liveness checks `failed_checks` (its `failure_threshold`) times in a row.
    Unhealthy {
        failed_checks: u32,
        last_error: String,
    },
}

impl Ending {
    /// Whether the policy restarts a deployment that ended this way.
    pub fn restarts_under(&self, policy: RestartPolicy) -> bool {
        match policy {
            RestartPolicy::Never => false,
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !matches!(self, Ending::Exited(e) if e.code == Some(0)),
        }
    }

    pub fn exit(&self) -> Option<ExitInfo> {
        match self {
            Ending::Exited(e) => Some(*e),
            _ => None,
        }
    }
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Exited(e) => write!(f, "exited ({e})"),
            Ending::NotReady { within, last_probe } => write!(
                f,
                "never became ready (no answer to an MCP request within {:.1} s; last probe: \
                 {last_probe})",
                within.as_secs_f64()
            ),
            Ending::Unhealthy {
                failed_checks,
                last_error,
            } => write!(
                f,
                "failed its health checks ({failed_checks} failed checks in a row; last: \
                 {last_error})"
            ),
        }
    }
}

/// Exponential backoff between restarts: the first restart at once, then `initial`, doubling
/// up to `max`; a process that ran `reset_after` without ending starts the schedule over.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    /// Restarts since the schedule last started over.
    streak: u32,
}

impl Backoff {
    pub fn new(spec: &RestartSpec) -> Backoff {
        Backoff {
            initial: Duration::from_millis(spec.initial_delay_ms),
            max: Duration::from_millis(spec.max_delay_ms),
            reset_after: Duration::from_millis(spec.reset_after_ms),
            streak: 0,
        }
    }

    /// The wait before restarting a process that ran for `ran_for` before it ended.
    pub fn next_delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.reset_after {
            self.streak = 0;
        }
        let delay = match self.streak {
            0 => Duration::ZERO,
            n => {
                let factor = 1u32.checked_shl(n - 1).unwrap_or(u32::MAX);
                self.initial.saturating_mul(factor).min(self.max)
            }
        };
        self.streak = self.streak.saturating_add(1);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// The injected clock: each process "runs" for the given time, and the schedule is read
    /// off without waiting.
    #[test]
    fn first_restart_at_once_then_doubling_from_1s_to_the_5min_cap_then_reset_after_10min() {
        let mut b = Backoff::new(&RestartSpec::default());
        let crash = Duration::from_millis(50);
        let got: Vec<u64> = (0..12).map(|_| b.next_delay(crash).as_secs()).collect();
        assert_eq!(got, [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        // Stable for 10 minutes: the next crash restarts at once, and the schedule starts over.
        assert_eq!(b.next_delay(secs(600)), Duration::ZERO);
        assert_eq!(b.next_delay(crash), secs(1));
        // 9:59 is not stable enough.
        assert_eq!(b.next_delay(secs(599)), secs(2));
    }

    #[test]
    fn the_schedule_follows_the_spec_and_never_overflows() {
        let mut b = Backoff::new(&RestartSpec {
            initial_delay_ms: 100,
            max_delay_ms: 1_000,
            reset_after_ms: 5_000,
            ..RestartSpec::default()
        });
        let got: Vec<u128> = (0..6)
            .map(|_| b.next_delay(Duration::ZERO).as_millis())
            .collect();
        assert_eq!(got, [0, 100, 200, 400, 800, 1000]);
        for _ in 0..100 {
            assert!(b.next_delay(Duration::ZERO) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn policies() {
        let clean = Ending::Exited(ExitInfo {
            code: Some(0),
            signal: None,
            oom_limit: None,
        });
        let crash = Ending::Exited(ExitInfo {
            code: None,
            signal: Some(9),
            oom_limit: None,
        });
        let hung = Ending::Unhealthy {
            failed_checks: 3,
            last_error: "timeout".into(),
        };
        assert!(!clean.restarts_under(RestartPolicy::OnFailure));
        assert!(crash.restarts_under(RestartPolicy::OnFailure));
        assert!(hung.restarts_under(RestartPolicy::OnFailure));
        assert!(clean.restarts_under(RestartPolicy::Always));
        for e in [clean, crash, hung] {
            assert!(!e.restarts_under(RestartPolicy::Never));
        }
    }
}
