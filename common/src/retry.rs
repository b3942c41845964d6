//! Retry policy: the one place that decides how long to wait before trying again.
//!
//! The `backoff` crate is unmaintained upstream (RUSTSEC-2025-0012): it is used here and nowhere
//! else, behind [`Delays`], so it can be swapped in this file alone.

use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;

/// A sequence of growing, jittered waits; `None` once the policy gives up.
pub struct Delays(ExponentialBackoff);

impl Delays {
    /// How long to wait before the next try, or `None` when it is time to stop trying here.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.0.next_backoff()
    }

    /// Start again from the shortest wait (after a success).
    pub fn reset(&mut self) {
        self.0.reset();
    }
}

/// Jittered waits doubling from `first` up to `longest`, given up after `give_up` in all (never when
/// `None`).
fn doubling(first: Duration, longest: Duration, give_up: Option<Duration>) -> Delays {
    Delays(ExponentialBackoff {
        initial_interval: first,
        max_interval: longest,
        multiplier: 2.0,
        max_elapsed_time: give_up,
        ..ExponentialBackoff::default()
    })
}

/// Reconnecting to RabbitMQ or PostgreSQL: quick first retries so a blip heals in well under a
/// second, capped so a long outage is polled every few seconds, never given up on.
pub fn reconnect() -> Delays {
    doubling(Duration::from_millis(200), Duration::from_secs(5), None)
}

/// In-process retries of a Calendly call: a few seconds in all, after which the message goes back
/// to the broker's delayed-retry path instead of holding a worker slot.
pub fn calendly_call() -> Delays {
    doubling(Duration::from_millis(100), Duration::from_secs(2), Some(Duration::from_secs(5)))
}

/// A Calendly call of an operator command (importing connections): nobody is waiting on a queue
/// behind it, so it rides out a minute of outage before the row is reported as failed.
pub fn operator_call() -> Delays {
    doubling(Duration::from_millis(200), Duration::from_secs(5), Some(Duration::from_secs(60)))
}

/// Storing a refreshed token pair after its first write failed: the pair exists only in memory
/// (Calendly consumed the old refresh token), so keep trying for a minute.
pub fn token_store() -> Delays {
    doubling(Duration::from_millis(200), Duration::from_secs(5), Some(Duration::from_secs(60)))
}

/// Delays of the broker-side retry queues, one queue per delay so a long wait never holds up a
/// short one (RabbitMQ only expires messages at a queue's head).
pub const REDELIVERY_DELAYS: &[Duration] = &[
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    // A minute: Calendly's rate-limit window, so work put off until a window resets comes back
    // right after it, not a minute later.
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

/// Which delay tier a retry goes to: the `attempt`-th failure (1-based) waits longer each time,
/// and never less than `at_least` (a 429's `X-RateLimit-Reset`).
pub fn redelivery_tier(attempt: u32, at_least: Option<Duration>) -> usize {
    let by_attempt = (attempt.saturating_sub(1) as usize).min(REDELIVERY_DELAYS.len() - 1);
    let by_floor = at_least
        .and_then(|floor| REDELIVERY_DELAYS.iter().position(|d| *d >= floor))
        .unwrap_or(if at_least.is_some() { REDELIVERY_DELAYS.len() - 1 } else { 0 });
    by_attempt.max(by_floor)
}

/// The delay tier for work put off until `at_least` from now: the shortest that is long enough.
pub fn deferral_tier(at_least: Duration) -> usize {
    REDELIVERY_DELAYS.iter().position(|d| *d >= at_least).unwrap_or(REDELIVERY_DELAYS.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_attempts_wait_longer_and_cap_at_the_longest_tier() {
        assert_eq!(redelivery_tier(1, None), 0);
        assert_eq!(redelivery_tier(2, None), 1);
        assert_eq!(redelivery_tier(99, None), REDELIVERY_DELAYS.len() - 1);
    }

    #[test]
    fn a_rate_limit_reset_is_never_undercut() {
        assert_eq!(REDELIVERY_DELAYS[redelivery_tier(1, Some(Duration::from_secs(7)))], Duration::from_secs(30));
        assert_eq!(redelivery_tier(1, Some(Duration::from_secs(5))), 1);
        assert_eq!(redelivery_tier(1, Some(Duration::from_secs(100_000))), REDELIVERY_DELAYS.len() - 1);
    }
}
