//! Each Calendly user's API budget, as the rate-limit headers of Calendly's answers describe it
//! (50 requests a minute on the free plan, 500 on paid ones). A call is made only while the user's
//! window has requests left; otherwise the caller learns how long until it resets and puts the
//! work off (through the delay queues, never holding a worker slot), so a burst for one user ends
//! in a handful of 429s at most, and other users are never slowed by it.
//!
//! The budget is per process: several workers each learn the same window from the headers their
//! own answers carry, so together they overshoot by at most what they have in flight.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use calsync_common::calendly::rate::RateLimit;

/// Assumed until an answer says otherwise: Calendly's windows are a minute long.
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Budgets {
    users: Mutex<HashMap<String, Window>>,
}

struct Window {
    /// Requests left in the window, as last reported (`None` until an answer says).
    remaining: Option<u32>,
    limit: u32,
    resets_at: Instant,
    /// Calls made and not yet answered: not in `remaining` yet.
    in_flight: u32,
}

/// Leave to make one call for a user; dropping it without [`Permit::settle`] (a cancelled call)
/// gives the slot back.
pub struct Permit<'a> {
    budgets: &'a Budgets,
    user: String,
}

impl Budgets {
    /// Leave to call Calendly now as `user`, or how long until `user`'s window resets.
    pub fn reserve(&self, user: &str) -> Result<Permit<'_>, Duration> {
        let now = Instant::now();
        let mut users = self.users.lock().expect("budget lock");
        let window = users.entry(user.to_owned()).or_insert(Window {
            remaining: None,
            limit: 0,
            resets_at: now + WINDOW,
            in_flight: 0,
        });
        if window.remaining.is_some() && now >= window.resets_at {
            // A new window: the whole limit, until the next answer says more precisely.
            window.remaining = Some(window.limit);
            window.resets_at = now + WINDOW;
        }
        if let Some(remaining) = window.remaining
            && remaining <= window.in_flight
        {
            return Err(window.resets_at.saturating_duration_since(now).max(Duration::from_millis(100)));
        }
        window.in_flight += 1;
        Ok(Permit { budgets: self, user: user.to_owned() })
    }

    /// Requests `user` has left in this process's view.
    #[cfg(test)]
    fn remaining(&self, user: &str) -> Option<u32> {
        self.users.lock().expect("budget lock").get(user).and_then(|w| w.remaining)
    }
}

impl Permit<'_> {
    /// Records what the answer said about the window (nothing when it carried no headers).
    pub fn settle(self, rate: Option<RateLimit>) {
        let Some(rate) = rate else { return };
        let mut users = self.budgets.users.lock().expect("budget lock");
        if let Some(window) = users.get_mut(&self.user) {
            window.remaining = Some(rate.remaining);
            window.limit = rate.limit;
            // checked: a reset no clock can represent must not panic while the lock is held
            // (the client caps it already; this is the last line).
            let now = Instant::now();
            window.resets_at = now.checked_add(rate.reset).unwrap_or(now + WINDOW);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut users = self.budgets.users.lock().expect("budget lock");
        if let Some(window) = users.get_mut(&self.user) {
            window.in_flight = window.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(remaining: u32, reset_secs: u64) -> Option<RateLimit> {
        Some(RateLimit { limit: 50, remaining, reset: Duration::from_secs(reset_secs) })
    }

    #[test]
    fn a_user_whose_window_is_spent_waits_for_its_reset_and_others_do_not() {
        let budgets = Budgets::default();
        budgets.reserve("ada").unwrap().settle(rate(0, 40));

        let wait = budgets.reserve("ada").err().expect("ada's budget is spent");
        assert!(wait > Duration::from_secs(38) && wait <= Duration::from_secs(40), "{wait:?}");
        assert!(budgets.reserve("bob").is_ok());
    }

    #[test]
    fn calls_in_flight_count_against_what_is_left() {
        let budgets = Budgets::default();
        budgets.reserve("ada").unwrap().settle(rate(2, 40));
        let first = budgets.reserve("ada").unwrap();
        let second = budgets.reserve("ada").unwrap();
        assert!(budgets.reserve("ada").is_err(), "two left, two in flight");
        drop(first); // cancelled: its slot comes back
        assert!(budgets.reserve("ada").is_ok());
        drop(second);
    }

    #[test]
    fn an_answer_with_an_unrepresentable_reset_does_not_panic_under_the_lock() {
        let budgets = Budgets::default();
        let permit = budgets.reserve("ada").unwrap();
        permit.settle(Some(RateLimit { limit: 50, remaining: 0, reset: Duration::MAX }));
        assert!(budgets.reserve("ada").is_err(), "spent, and still usable");
        assert!(budgets.reserve("bob").is_ok());
    }

    #[test]
    fn a_window_that_has_reset_allows_the_whole_limit_again() {
        let budgets = Budgets::default();
        budgets.reserve("ada").unwrap().settle(rate(0, 0));
        assert!(budgets.reserve("ada").is_ok());
        assert_eq!(budgets.remaining("ada"), Some(50));
    }
}
