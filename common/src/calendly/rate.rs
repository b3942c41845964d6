//! Calendly's rate-limit headers (`X-RateLimit-Limit/Remaining/Reset`), read from every answer.
//!
//! The client does not know whose token it is calling with, so it cannot keep anyone's budget; it
//! hands what it read to whoever wrapped the call in [`observe`] (the worker's per-user budget).

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use reqwest::header::HeaderMap;

/// The longest reset we believe. Calendly's windows are a minute; a larger value is a broken
/// answer, and taken at face value it would overflow the clock arithmetic of whoever waits on it.
pub const MAX_RESET: Duration = Duration::from_secs(3600);

/// `X-RateLimit-Reset` as a wait: seconds until the window resets, at most [`MAX_RESET`].
pub fn reset_of(headers: &HeaderMap) -> Option<Duration> {
    let secs = headers.get("x-ratelimit-reset")?.to_str().ok()?.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RESET))
}

/// One answer's view of its caller's rate-limit window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub remaining: u32,
    /// Until the window resets (Calendly sends seconds until, not a date).
    pub reset: Duration,
}

impl RateLimit {
    /// The headers of one answer, when all three are there and readable.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
        Some(Self {
            limit: u32::try_from(number("x-ratelimit-limit")?).ok()?,
            remaining: u32::try_from(number("x-ratelimit-remaining")?).ok()?,
            reset: reset_of(headers)?,
        })
    }
}

tokio::task_local! {
    static OBSERVED: Cell<Option<RateLimit>>;
}

/// Runs `call` and returns its output with the rate-limit headers of the last answer it got.
pub async fn observe<F: Future>(call: F) -> (F::Output, Option<RateLimit>) {
    OBSERVED
        .scope(Cell::new(None), async move {
            let output = call.await;
            (output, OBSERVED.with(Cell::take))
        })
        .await
}

/// Called by the client for every answer; outside [`observe`] it does nothing.
pub(crate) fn record(headers: &HeaderMap) {
    if let Some(rate) = RateLimit::from_headers(headers) {
        let _ = OBSERVED.try_with(|cell| cell.set(Some(rate)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_headers_of_the_last_answer_reach_the_caller_that_observes() {
        let mut headers = HeaderMap::new();
        headers.insert("X-RateLimit-Limit", "50".parse().unwrap());
        headers.insert("X-RateLimit-Remaining", "7".parse().unwrap());
        headers.insert("X-RateLimit-Reset", "41".parse().unwrap());
        let ((), seen) = observe(async { record(&headers) }).await;
        assert_eq!(seen, Some(RateLimit { limit: 50, remaining: 7, reset: Duration::from_secs(41) }));
        record(&headers); // outside observe: nowhere to go, and no panic
        assert_eq!(observe(async {}).await.1, None);
    }

    #[test]
    fn an_absurd_reset_is_capped_at_an_hour() {
        let mut headers = HeaderMap::new();
        headers.insert("X-RateLimit-Limit", "50".parse().unwrap());
        headers.insert("X-RateLimit-Remaining", "0".parse().unwrap());
        headers.insert("X-RateLimit-Reset", u64::MAX.to_string().parse().unwrap());
        assert_eq!(RateLimit::from_headers(&headers).unwrap().reset, MAX_RESET);
        assert_eq!(reset_of(&headers), Some(MAX_RESET));
    }
}
