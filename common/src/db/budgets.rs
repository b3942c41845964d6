//! `api_budgets`: each Calendly user's request window, one row shared by every worker process
//! (ARCHITECTURE.md, "Calendly API budget").
//!
//! A request is taken from the row before it is made ([`take`]), in one statement that either
//! counts it or says how long until the window resets; the answer's rate-limit headers then
//! correct the row ([`settle`]). The row counts what this fleet has taken in the window, so requests
//! in flight in other processes are counted before Calendly has answered any of them: together the
//! workers stay inside the window however many there are. A cancelled request is not given back (it
//! may have reached Calendly), and a process that dies mid-call leaks nothing past the window.

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
    /// saved on most calls (BENCHMARKS.md, "Budget cost per call").
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
/// describes, and a window past its reset starts the next one. One statement, one round trip;
/// concurrent takers of one key queue on its row for the length of that statement.
pub async fn take(pool: &PgPool, key: &str, window: Window) -> sqlx::Result<Taken> {
    let limit = i32::try_from(window.limit).unwrap_or(i32::MAX);
    let granted: Option<(i64, i32, i32, bool, f64)> = sqlx::query_as(
        "INSERT INTO api_budgets AS b (budget_key, request_limit, used, resets_at, confirmed) \
         VALUES ($1, $2, 1, statement_timestamp() + $3 * interval '1 millisecond', $4) \
         ON CONFLICT (budget_key) DO UPDATE SET \
             used = CASE WHEN b.resets_at <= statement_timestamp() THEN 1 ELSE b.used + 1 END, \
             window_no = b.window_no + (b.resets_at <= statement_timestamp())::int, \
             confirmed = CASE WHEN b.resets_at <= statement_timestamp() THEN $4 ELSE b.confirmed END, \
             resets_at = CASE WHEN b.resets_at <= statement_timestamp() \
                 THEN statement_timestamp() + $3 * interval '1 millisecond' ELSE b.resets_at END \
         WHERE b.resets_at <= statement_timestamp() OR b.used < b.request_limit \
         RETURNING b.window_no, b.used, b.request_limit, b.confirmed, \
             GREATEST(EXTRACT(EPOCH FROM b.resets_at - statement_timestamp()), 0)::float8",
    )
    .bind(key)
    .bind(limit)
    .bind(millis(window.length))
    .bind(window.known)
    .fetch_optional(pool)
    .await?;
    if let Some((window, used, limit, confirmed, resets_in)) = granted {
        let seen = Seen {
            used: u32::try_from(used).unwrap_or(0),
            limit: u32::try_from(limit).unwrap_or(0),
            confirmed,
            resets_in: Duration::from_secs_f64(resets_in),
        };
        return Ok(Taken::Granted { window, seen });
    }
    let spent: Option<(f64, bool)> = sqlx::query_as(
        "SELECT GREATEST(EXTRACT(EPOCH FROM resets_at - clock_timestamp()), 0)::float8, confirmed \
         FROM api_budgets WHERE budget_key = $1",
    )
    .bind(key)
    .fetch_optional(pool)
    .await?;
    let wait = match spent {
        Some((secs, confirmed)) => {
            let wait = Duration::from_secs_f64(secs);
            if confirmed { wait } else { wait.min(UNCONFIRMED_WAIT) }
        }
        // Deleted between the two statements: nothing is spent.
        None => Duration::ZERO,
    };
    Ok(Taken::Spent { wait })
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
