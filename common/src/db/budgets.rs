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
    /// Counted: make the request, then [`settle`] with what its answer said, naming `window`.
    Granted { window: i64 },
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

/// Takes one request from `key`'s window: a row not seen before starts a window as `window`
/// describes, and a window past its reset starts the next one. One statement, one round trip;
/// concurrent takers of one key queue on its row for the length of that statement.
pub async fn take(pool: &PgPool, key: &str, window: Window) -> sqlx::Result<Taken> {
    let limit = i32::try_from(window.limit).unwrap_or(i32::MAX);
    let granted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO api_budgets AS b (budget_key, request_limit, used, resets_at, confirmed) \
         VALUES ($1, $2, 1, statement_timestamp() + $3 * interval '1 millisecond', $4) \
         ON CONFLICT (budget_key) DO UPDATE SET \
             used = CASE WHEN b.resets_at <= statement_timestamp() THEN 1 ELSE b.used + 1 END, \
             window_no = b.window_no + (b.resets_at <= statement_timestamp())::int, \
             confirmed = CASE WHEN b.resets_at <= statement_timestamp() THEN $4 ELSE b.confirmed END, \
             resets_at = CASE WHEN b.resets_at <= statement_timestamp() \
                 THEN statement_timestamp() + $3 * interval '1 millisecond' ELSE b.resets_at END \
         WHERE b.resets_at <= statement_timestamp() OR b.used < b.request_limit \
         RETURNING b.window_no",
    )
    .bind(key)
    .bind(limit)
    .bind(millis(window.length))
    .bind(window.known)
    .fetch_optional(pool)
    .await?;
    if let Some(window) = granted {
        return Ok(Taken::Granted { window });
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
