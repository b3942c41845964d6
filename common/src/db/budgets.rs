//! `api_budgets`: each Calendly user's request window, one row shared by every worker process
//! (ARCHITECTURE.md, "Calendly API budget").
//!
//! A request is taken from the row before it is made ([`take`]; many requests' takes in one round
//! trip, [`take_all`]): the take either counts it or says how long until the window resets; the
//! answer's rate-limit headers then correct the row ([`settle`]). The row counts what this fleet
//! has taken in the window, so requests in flight in other processes are counted before Calendly
//! has answered any of them: together the workers stay inside the window however many there are. A
//! cancelled request is not given back (it may have reached Calendly), and a process that dies
//! mid-call leaks nothing past the window.

use std::time::Duration;

use sqlx::PgPool;

use crate::calendly::rate::RateLimit;

/// An answer whose window ends this much later than the row's is about a newer window at Calendly
/// (its reset is in whole seconds, and our clocks and Calendly's differ by a round trip).
const NEWER_WINDOW_SLACK_MS: i64 = 2000;
/// While no answer has confirmed an assumed window, its reset is a guess: a caller whose budget that
/// guess says is spent looks again this soon instead of waiting for a guessed minute.
const UNCONFIRMED_WAIT: Duration = Duration::from_secs(1);

/// What [`take`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Counted: make the request, then [`settle`] with what its answer said, naming `window` —
    /// when the answer tells the row something `seen` does not already say ([`Seen::needs`]).
    Granted { window: i64, seen: Seen },
    /// The window is spent: it resets in this long.
    Spent { wait: Duration },
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A window's limit and length, as the taker knows them before any answer.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub limit: u32,
    pub length: Duration,
    /// Known (the token endpoint's fixed 8 a minute) rather than assumed until an answer says
    /// (the API's, which depends on the user's plan).
    pub known: bool,
}

/// The row as the take that granted a request left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Requests counted in the window, this one included.
    pub used: u32,
    pub limit: u32,
    /// The limit and reset come from one of Calendly's answers (not assumed).
    pub confirmed: bool,
    /// Until the row's window resets, as of the take.
    pub resets_in: Duration,
}

/// While at most this share of the window is left, every answer is recorded: near the limit the
/// row must match Calendly's count and reset exactly.
const SETTLE_EVERY_ANSWER_BELOW: f64 = 0.1;
/// Calendly's reset is in whole seconds: an answer whose window ends within this of the row's is
/// about the same window, and says nothing new about when it ends.
const RESET_RESOLUTION: Duration = Duration::from_millis(1000);

impl Seen {
    /// Whether an answer, `since_take` after the take, tells the row anything: its limit or reset
    /// are assumed, its limit differs, Calendly counted more requests than the row did (other
    /// clients of the same user), its window ends elsewhere than the row's, or the window is nearly
    /// spent. Otherwise recording it would rewrite the row with what it already says — a round trip
    /// saved on most calls (BENCHMARKS.md, "One budget per Calendly user across the fleet").
    pub fn needs(&self, since_take: Duration, rate: RateLimit) -> bool {
        let calendly_used = rate.limit.saturating_sub(rate.remaining);
        let row_ends = self.resets_in.saturating_sub(since_take);
        let ends_apart = rate.reset.abs_diff(row_ends);
        !self.confirmed
            || rate.limit != self.limit
            || calendly_used > self.used
            || ends_apart > RESET_RESOLUTION
            || f64::from(rate.remaining) <= f64::from(rate.limit) * SETTLE_EVERY_ANSWER_BELOW
    }
}

/// Takes one request from `key`'s window: a row not seen before starts a window as `window`
/// describes, and a window past its reset starts the next one. Concurrent takers of one key queue
/// on its row for the length of the take. [`take_all`] of one request.
pub async fn take(pool: &PgPool, key: &str, window: Window) -> sqlx::Result<Taken> {
    let mut taken = take_all(pool, &[(key, window)]).await?;
    taken.pop().ok_or_else(|| sqlx::Error::Protocol("the budget take answered nothing".into()))
}

/// One answer of `take_api_budgets` (migrations/20261204000002_take_budgets_in_one_call.sql).
#[derive(sqlx::FromRow)]
struct TakeRow {
    wanted_at: i64,
    granted: bool,
    window_of: Option<i64>,
    used_now: Option<i32>,
    limit_now: Option<i32>,
    confirmed_now: Option<bool>,
    resets_in: Option<f64>,
}

impl TakeRow {
    fn taken(self) -> Taken {
        let resets_in = Duration::from_secs_f64(self.resets_in.unwrap_or(0.0).max(0.0));
        let confirmed = self.confirmed_now.unwrap_or(false);
        if self.granted {
            let seen = Seen {
                used: self.used_now.and_then(|u| u32::try_from(u).ok()).unwrap_or(0),
                limit: self.limit_now.and_then(|l| u32::try_from(l).ok()).unwrap_or(0),
                confirmed,
                resets_in,
            };
            return Taken::Granted { window: self.window_of.unwrap_or(0), seen };
        }
        // An assumed window's reset is a guess: look again soon rather than wait for it.
        Taken::Spent { wait: if confirmed { resets_in } else { resets_in.min(UNCONFIRMED_WAIT) } }
    }
}

/// Takes one request from each `(key, window)` of `wanted`, in one round trip, each exactly as
/// [`take`] would alone; answer `i` is request `i`'s. Requests for the same key are taken in the
/// order given (the later ones see the earlier ones counted). The rule itself is the SQL function
/// `take_api_budgets`, which visits the keys in sorted order so concurrent callers never deadlock;
/// every row it took stays locked until it returns.
pub async fn take_all(pool: &PgPool, wanted: &[(&str, Window)]) -> sqlx::Result<Vec<Taken>> {
    let keys: Vec<&str> = wanted.iter().map(|(key, _)| *key).collect();
    let limits: Vec<i32> = wanted.iter().map(|(_, w)| i32::try_from(w.limit).unwrap_or(i32::MAX)).collect();
    let lengths: Vec<i64> = wanted.iter().map(|(_, w)| millis(w.length)).collect();
    let known: Vec<bool> = wanted.iter().map(|(_, w)| w.known).collect();
    let rows: Vec<TakeRow> = sqlx::query_as(
        "SELECT wanted_at, granted, window_of, used_now, limit_now, confirmed_now, resets_in \
         FROM take_api_budgets($1, $2, $3, $4)",
    )
    .bind(&keys)
    .bind(&limits)
    .bind(&lengths)
    .bind(&known)
    .fetch_all(pool)
    .await?;
    let mut answers: Vec<Option<Taken>> = vec![None; wanted.len()];
    for row in rows {
        // 1-based, and only ever a position of `wanted`.
        if let Some(answer) = usize::try_from(row.wanted_at - 1).ok().and_then(|i| answers.get_mut(i)) {
            *answer = Some(row.taken());
        }
    }
    answers
        .into_iter()
        .map(|answer| answer.ok_or_else(|| sqlx::Error::Protocol("the budget take left a request unanswered".into())))
        .collect()
}

/// What Calendly's answer to a request taken in `window` said about `key`'s window. An answer
/// about a window the row has since left says nothing about the current one and is ignored; one
/// whose window ends clearly later than the row's means Calendly has started a newer window, which
/// the row then follows; otherwise the row takes Calendly's limit and reset, and counts at least as
/// many requests as Calendly did.
pub async fn settle(pool: &PgPool, key: &str, window: i64, rate: RateLimit) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE api_budgets SET \
             request_limit = $3, \
             used = CASE WHEN statement_timestamp() + $5 * interval '1 millisecond' \
                              > resets_at + $6 * interval '1 millisecond' \
                 THEN $3 - LEAST($4, $3) ELSE GREATEST(used, $3 - LEAST($4, $3)) END, \
             window_no = window_no + (statement_timestamp() + $5 * interval '1 millisecond' \
                                      > resets_at + $6 * interval '1 millisecond')::int, \
             resets_at = statement_timestamp() + $5 * interval '1 millisecond', \
             confirmed = true \
         WHERE budget_key = $1 AND window_no = $2",
    )
    .bind(key)
    .bind(window)
    .bind(i32::try_from(rate.limit).unwrap_or(i32::MAX))
    .bind(i32::try_from(rate.remaining).unwrap_or(i32::MAX))
    .bind(millis(rate.reset))
    .bind(NEWER_WINDOW_SLACK_MS)
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW: Seen = Seen { used: 20, limit: 500, confirmed: true, resets_in: Duration::from_secs(40) };

    fn answer(remaining: u32, reset_secs: u64) -> RateLimit {
        RateLimit { limit: 500, remaining, reset: Duration::from_secs(reset_secs) }
    }

    #[test]
    fn an_answer_that_says_what_the_row_says_is_not_recorded() {
        assert!(!ROW.needs(Duration::from_millis(300), answer(480, 40)));
        assert!(!ROW.needs(Duration::from_secs(2), answer(485, 39)), "Calendly counted fewer: the row keeps its own");
    }

    #[test]
    fn an_answer_with_news_or_near_the_limit_is_recorded() {
        assert!(Seen { confirmed: false, ..ROW }.needs(Duration::ZERO, answer(480, 40)), "an assumed window");
        assert!(ROW.needs(Duration::ZERO, RateLimit { limit: 50, ..answer(30, 40) }), "another plan");
        assert!(ROW.needs(Duration::ZERO, answer(470, 40)), "Calendly counted more requests");
        assert!(ROW.needs(Duration::ZERO, answer(480, 45)), "its window ends later");
        assert!(ROW.needs(Duration::ZERO, answer(480, 30)), "its window ends sooner");
        assert!(Seen { used: 460, ..ROW }.needs(Duration::ZERO, answer(40, 40)), "the window is nearly spent");
    }
}
