//! Per-principal quotas: a request rate (GCRA, the token bucket written as one timestamp) and
//! a cap on requests in flight, open response streams included.
//!
//! Each key's [`Quota`] lives in its index entry, so no shared keyed map is looked up per
//! request and nothing is labelled by principal. An OAuth subject's lives in a map by subject
//! (`oauth::OAuth`), made on its first request with `[auth.oauth]`'s limits.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("rate limit of {per_min} requests per minute reached; retry in {retry_after:?}")]
    Rate { per_min: u32, retry_after: Duration },
    #[error("{limit} requests of this principal are already in flight (open streams count)")]
    Concurrency { limit: u32 },
}

impl QuotaError {
    /// Whole seconds until trying again makes sense (at least 1), for `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            QuotaError::Rate { retry_after, .. } => {
                retry_after.as_secs_f64().ceil().max(1.0) as u64
            }
            // A slot frees when some request ends; there is no better guess.
            QuotaError::Concurrency { .. } => 1,
        }
    }
}

/// The rate limit: requests are spaced `interval` apart on average, with bursts of up to
/// `per_min` at once (a minute's worth). State is the theoretical arrival time of the next
/// request (GCRA), so refills need no timer.
#[derive(Debug)]
struct Rate {
    per_min: u32,
    interval: Duration,
    /// Behind a mutex held for a comparison and an addition, never across an await.
    tat: Mutex<Instant>,
}

#[derive(Debug, Default)]
pub struct Quota {
    rate: Option<Rate>,
    slots: Option<(u32, Arc<Semaphore>)>,
}

/// Holds one in-flight slot until dropped.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Quota {
    pub fn new(rate_limit_per_min: Option<u32>, max_concurrent: Option<u32>) -> Quota {
        Quota {
            rate: rate_limit_per_min.filter(|r| *r > 0).map(|per_min| Rate {
                per_min,
                interval: Duration::from_secs(60) / per_min,
                tat: Mutex::new(Instant::now()),
            }),
            slots: max_concurrent
                .filter(|m| *m > 0)
                .map(|m| (m, Arc::new(Semaphore::new(m as usize)))),
        }
    }

    /// Whether this quota is where a new one starts: no request in flight, no rate spent.
    pub fn at_rest(&self) -> bool {
        let slots_free = self
            .slots
            .as_ref()
            .is_none_or(|(limit, sem)| sem.available_permits() == *limit as usize);
        let rate_unspent = self
            .rate
            .as_ref()
            .is_none_or(|r| *r.tat.lock().unwrap_or_else(|p| p.into_inner()) <= Instant::now());
        slots_free && rate_unspent
    }

    /// Admits one request now, or says why not. A refused request uses up nothing.
    pub fn admit(&self) -> Result<Slot, QuotaError> {
        // The slot first: a request refused for concurrency must not spend rate.
        let slot = match &self.slots {
            None => Slot(None),
            Some((limit, sem)) => match Arc::clone(sem).try_acquire_owned() {
                Ok(p) => Slot(Some(p)),
                Err(_) => return Err(QuotaError::Concurrency { limit: *limit }),
            },
        };
        if let Some(rate) = &self.rate {
            let now = Instant::now();
            let burst = rate.interval * rate.per_min;
            let mut tat = rate.tat.lock().unwrap_or_else(|p| p.into_inner());
            let next = (*tat).max(now) + rate.interval;
            let ahead = next - now;
            if ahead > burst {
                return Err(QuotaError::Rate {
                    per_min: rate.per_min,
                    retry_after: ahead - burst,
                });
            }
            *tat = next;
        }
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_a_minutes_worth_then_one_per_interval() {
        let q = Quota::new(Some(3), None);
        for _ in 0..3 {
            q.admit().unwrap();
        }
        let e = q.admit().unwrap_err();
        assert_eq!(
            e,
            QuotaError::Rate {
                per_min: 3,
                retry_after: Duration::from_secs(20)
            }
        );
        assert_eq!(e.retry_after_secs(), 20);
        tokio::time::advance(Duration::from_secs(20)).await;
        q.admit().unwrap();
        assert!(q.admit().is_err());
    }

    #[tokio::test]
    async fn slots_are_held_until_dropped_and_refusals_spend_no_rate() {
        let q = Quota::new(Some(2), Some(1));
        let held = q.admit().unwrap();
        assert_eq!(q.admit().unwrap_err(), QuotaError::Concurrency { limit: 1 });
        drop(held);
        // The refused request did not count: one of the two is still there.
        q.admit().unwrap();
        assert!(matches!(q.admit(), Err(QuotaError::Rate { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_quota_is_at_rest_only_with_nothing_in_flight_and_no_rate_spent() {
        let q = Quota::new(Some(60), Some(1));
        assert!(q.at_rest());
        let held = q.admit().unwrap();
        assert!(!q.at_rest());
        drop(held);
        // The slot is back, but a second's rate is still spent.
        assert!(!q.at_rest());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(q.at_rest());
    }

    #[test]
    fn no_limits_admit_everything() {
        let q = Quota::new(None, Some(0));
        for _ in 0..1000 {
            q.admit().unwrap();
        }
    }
}
