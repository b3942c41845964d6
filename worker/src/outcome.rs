//! What becomes of a delivery, decided in one place for webhooks and sync jobs alike.

use std::time::Duration;

use calsync_common::db::inbox::InboxStatus;
use calsync_common::queue::message::SyncJob;

use crate::error::ProcessError;

/// What the consumer does with the message: ack, republish to a delay queue, or dead-letter.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Finished: acknowledge. `status` is what the inbox says about it; `note` why, when it is
    /// parked (e.g. what the user must reconnect for).
    Ack { status: InboxStatus, note: Option<String> },
    /// Not yet: redeliver after at least `at_least` (a delay tier is chosen from the attempt).
    Retry { reason: String, at_least: Option<Duration> },
    /// Never: dead-letter with the reason.
    Dead { reason: String },
    /// Not now, and not this delivery's fault (the database is unreachable): back to the queue
    /// without counting an attempt, while consumption pauses.
    Requeue { reason: String },
    /// Put off, not failed (the user's API budget is spent): redeliver after `at_least` without
    /// counting an attempt.
    Defer { reason: String, at_least: Duration },
    /// Done for now, with a follow-up job: ack, and queue `job` to run after `at_least` — the rest
    /// of a sync pass its user's budget interrupted (from the page it reached), or the resync a
    /// replaced subscription calls for.
    Continue { job: SyncJob, at_least: Duration },
}

impl Outcome {
    pub fn ack(status: InboxStatus) -> Self {
        Self::Ack { status, note: None }
    }

    /// The `outcome` metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Ack { status, .. } => status.as_str(),
            Self::Retry { .. } => "retry",
            Self::Dead { .. } => "dead",
            Self::Requeue { .. } => "requeued",
            Self::Defer { .. } => "deferred",
            Self::Continue { .. } => "continued",
        }
    }
}

/// The one rule for failures: a user who must reconnect parks the work; a transient failure retries
/// until `max_attempts` attempts have failed, then is dead; a permanent one is dead at once.
pub fn decide(error: ProcessError, attempt: u32, max_attempts: u32) -> Outcome {
    match error {
        ProcessError::NeedsReauth(reason) => Outcome::Ack { status: InboxStatus::AwaitingReauth, note: Some(reason) },
        ProcessError::Transient { reason, at_least } if attempt < max_attempts => Outcome::Retry { reason, at_least },
        ProcessError::Transient { reason, .. } => {
            Outcome::Dead { reason: format!("gave up after {attempt} attempts: {reason}") }
        }
        ProcessError::Permanent(reason) => Outcome::Dead { reason },
        ProcessError::DatabaseDown(reason) => Outcome::Requeue { reason },
        ProcessError::Deferred { reason, until } => Outcome::Defer { reason, at_least: until },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transient_failure_retries_until_the_last_attempt_then_is_dead() {
        let transient = || ProcessError::Transient { reason: "503".into(), at_least: Some(Duration::from_secs(5)) };
        assert_eq!(
            decide(transient(), 1, 3),
            Outcome::Retry { reason: "503".into(), at_least: Some(Duration::from_secs(5)) }
        );
        assert!(matches!(decide(transient(), 2, 3), Outcome::Retry { .. }));
        assert_eq!(decide(transient(), 3, 3), Outcome::Dead { reason: "gave up after 3 attempts: 503".into() });
    }

    #[test]
    fn an_unreachable_database_requeues_without_counting_even_on_the_last_attempt() {
        let outcome = decide(ProcessError::DatabaseDown("connection refused".into()), 8, 8);
        assert_eq!(outcome, Outcome::Requeue { reason: "connection refused".into() });
    }

    #[test]
    fn a_permanent_failure_is_dead_on_the_first_attempt() {
        assert_eq!(decide(ProcessError::Permanent("403".into()), 1, 8), Outcome::Dead { reason: "403".into() });
    }

    #[test]
    fn needing_reauth_parks_whatever_the_attempt() {
        let outcome = decide(ProcessError::NeedsReauth("invalid_grant".into()), 8, 8);
        assert_eq!(outcome, Outcome::Ack { status: InboxStatus::AwaitingReauth, note: Some("invalid_grant".into()) });
        assert_eq!(outcome.label(), "awaiting_reauth");
    }
}
