//! The database stage of webhook processing, batched. Deliveries whose Calendly fetch is done hand
//! their rows here and wait; a batch of up to `WORKER_BATCH_SIZE` of them (or whatever arrived within
//! `WORKER_BATCH_MAX_WAIT_MS` of the first) is written in one transaction with set-based statements,
//! so the fleet is no longer bounded by PostgreSQL's per-transaction rate. Every delivery is acked
//! only after the commit that holds its rows (its caller settles it when [`Writer::write`] returns).
//!
//! Inside a batch every per-delivery guarantee holds: the connection share-lock against a
//! concurrent disconnect, the `updated_at` guards, several deliveries about one row applied in
//! order (see [`calsync_common::db::rounds`]), the inbox rows. A batch that fails is retried one
//! delivery at a time, so only the delivery at fault retries or is dead-lettered.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tracing::Instrument;

use calsync_common::db::changes::{self, Cause};
use calsync_common::db::connections::{self, Connection};
use calsync_common::db::inbox::{self, InboxRecord, InboxStatus};
use calsync_common::db::meetings;
use calsync_common::meeting::{Meeting, MeetingInvitee};
use calsync_common::traces;

use crate::error::ProcessError;

/// One delivery's rows, ready to commit.
#[derive(Debug, Clone)]
pub struct Write {
    /// Whose rows these are; written only while it is still linked (share-locked until commit).
    pub connection: Connection,
    pub meeting: Meeting,
    pub invitee: MeetingInvitee,
    pub inbox: ProcessedDelivery,
}

/// The inbox row of a processed delivery (no body: a processed delivery is never replayed).
#[derive(Debug, Clone)]
pub struct ProcessedDelivery {
    pub message_id: String,
    pub event: String,
    pub created_by: String,
    pub received_at: OffsetDateTime,
    pub attempts: i32,
}

/// What became of one write in a committed transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Written,
    /// The connection was disconnected or changed hands since the delivery resolved it: nothing
    /// was written for it.
    ConnectionChanged,
}

struct Job {
    write: Write,
    reply: oneshot::Sender<Result<Applied, ProcessError>>,
    /// The delivery's span, which the batch's span links to.
    span: tracing::Span,
}

/// Hands writes to the batcher. Cheap to clone; the batcher stops when every clone is gone.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    expected: Arc<Expected>,
}

/// What a gathering batch may still wait for: deliveries being processed that may hand a write
/// (`alive`), and writes handed and not yet answered (`handed`). When every delivery that may write
/// has handed its write, nobody is on the way and the batch commits at once: under light traffic
/// a batch adds no waiting.
#[derive(Default)]
struct Expected {
    alive: AtomicUsize,
    handed: AtomicUsize,
    changed: Notify,
}

impl Expected {
    fn nobody_on_the_way(&self) -> bool {
        self.handed.load(Ordering::SeqCst) >= self.alive.load(Ordering::SeqCst)
    }
}

/// A delivery that may still write ([`Writer::expect`]); dropping it says it will not (any more).
pub struct Expecting {
    expected: Arc<Expected>,
}

impl Drop for Expecting {
    fn drop(&mut self) {
        self.expected.alive.fetch_sub(1, Ordering::SeqCst);
        self.expected.changed.notify_one();
    }
}

/// A write handed to the batcher and not yet answered (also when its caller gives up waiting).
struct Handed(Arc<Expected>);

impl Drop for Handed {
    fn drop(&mut self) {
        self.0.handed.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// `WORKER_BATCH_SIZE`: the most deliveries in one transaction (1 = no batching).
    pub size: usize,
    /// `WORKER_BATCH_MAX_WAIT_MS`: how long the first delivery of a batch waits for company.
    pub max_wait: Duration,
    /// Batches committing at once (each holds one pooled connection while it does).
    pub concurrent: usize,
}

impl Writer {
    pub fn start(pool: PgPool, config: BatchConfig) -> Self {
        let (jobs, receiver) = mpsc::channel(config.size.max(1) * config.concurrent.max(1) * 2);
        let expected = Arc::new(Expected::default());
        tokio::spawn(batch_loop(pool, receiver, config, expected.clone()));
        Self { jobs, expected }
    }

    /// Marks a delivery that may hand a write: while the mark lives, a gathering batch may wait
    /// for it (up to `WORKER_BATCH_MAX_WAIT_MS`).
    pub fn expect(&self) -> Expecting {
        self.expected.alive.fetch_add(1, Ordering::SeqCst);
        Expecting { expected: self.expected.clone() }
    }

    /// Writes `write` in the next batch; returns once that batch has committed (or failed).
    pub async fn write(&self, write: Write) -> Result<Applied, ProcessError> {
        self.expected.handed.fetch_add(1, Ordering::SeqCst);
        let _handed = Handed(self.expected.clone());
        let (reply, answer) = oneshot::channel();
        // Only what the batch's span links to: nothing to carry with traces off.
        let span = if traces::enabled() { tracing::Span::current() } else { tracing::Span::none() };
        self.jobs
            .send(Job { write, reply, span })
            .await
            .map_err(|_| ProcessError::transient("the writer has stopped"))?;
        answer.await.map_err(|_| ProcessError::transient("the writer stopped before committing"))?
    }
}

async fn batch_loop(pool: PgPool, mut receiver: mpsc::Receiver<Job>, config: BatchConfig, expected: Arc<Expected>) {
    let committing = Arc::new(Semaphore::new(config.concurrent.max(1)));
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + config.max_wait;
        while batch.len() < config.size {
            if expected.nobody_on_the_way() {
                // Every write that is coming has been handed: take those already queued, then go.
                while batch.len() < config.size
                    && let Ok(job) = receiver.try_recv()
                {
                    batch.push(job);
                }
                break;
            }
            tokio::select! {
                job = receiver.recv() => match job {
                    Some(job) => batch.push(job),
                    None => break,
                },
                // A delivery finished without writing: perhaps nobody is on the way any more.
                _ = expected.changed.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let Ok(permit) = committing.clone().acquire_owned().await else { return };
        let pool = pool.clone();
        tokio::spawn(async move {
            commit(&pool, batch).await;
            drop(permit);
        });
    }
}

async fn commit(pool: &PgPool, jobs: Vec<Job>) {
    let span = batch_span(&jobs);
    commit_batch(pool, jobs).instrument(span).await;
}

/// One span for a batch's transaction, linked to each delivery's span (OTel's messaging
/// conventions model a batch with links: it belongs to many traces at once).
fn batch_span(jobs: &[Job]) -> tracing::Span {
    if !traces::enabled() {
        return tracing::Span::none();
    }
    let message_ids: Vec<&str> = jobs.iter().map(|job| job.write.inbox.message_id.as_str()).collect();
    let span = tracing::info_span!(
        "batch commit",
        otel.kind = "internal",
        "messaging.batch.message_count" = jobs.len(),
        message_id = %message_ids.join(","),
    );
    for job in jobs {
        traces::link(&span, &job.span);
    }
    span
}

async fn commit_batch(pool: &PgPool, jobs: Vec<Job>) {
    metrics::histogram!("calsync_worker_batch_size").record(jobs.len() as f64);
    let writes: Vec<&Write> = jobs.iter().map(|j| &j.write).collect();
    let error = match apply(pool, &writes).await {
        Ok(applied) => {
            for (job, applied) in jobs.into_iter().zip(applied) {
                let _ = job.reply.send(Ok(applied));
            }
            return;
        }
        Err(error) => ProcessError::from(error),
    };
    // Nobody's fault: every delivery of the batch gets the same answer (the database is down).
    if jobs.len() == 1 || matches!(error, ProcessError::DatabaseDown(_)) {
        for job in jobs {
            let _ = job.reply.send(Err(error.clone()));
        }
        return;
    }
    // Someone's fault: find whose by writing each alone.
    tracing::warn!(%error, deliveries = jobs.len(), "a batch failed; writing its deliveries one by one");
    metrics::counter!("calsync_worker_batch_fallbacks_total").increment(1);
    for job in jobs {
        let result = apply(pool, &[&job.write]).await.map(|mut a| a.remove(0)).map_err(ProcessError::from);
        let _ = job.reply.send(result);
    }
}

/// A batch's transaction, waiting at most 2 s for a connection row's lock (see [`apply`]).
const LOCK_TIMEOUT: &str = "; SET LOCAL lock_timeout = '2s'";

/// Writes `writes` in one transaction, in order; returns what became of each.
pub async fn apply(pool: &PgPool, writes: &[&Write]) -> sqlx::Result<Vec<Applied>> {
    // A batch mixes users: one connection row held by someone else (an operator's long
    // transaction, a stuck session) must not stall everyone's writes. Past the timeout the batch
    // fails with 55P03, a failure of a delivery (not "database down"), so the batch falls back to
    // one delivery at a time and only the one whose row is held retries. Set in the BEGIN itself
    // (one round trip, not two), with the cause its changes are recorded under.
    let mut tx = pool.begin_with(changes::begin_statement(Cause::Webhook, LOCK_TIMEOUT)).await?;
    let connections: Vec<&Connection> = writes.iter().map(|w| &w.connection).collect();
    let linked = connections::lock_linked(&mut tx, &connections).await?;
    let applied: Vec<Applied> =
        linked.into_iter().map(|linked| if linked { Applied::Written } else { Applied::ConnectionChanged }).collect();
    let kept: Vec<&Write> =
        writes.iter().zip(&applied).filter(|(_, a)| **a == Applied::Written).map(|(w, _)| *w).collect();
    let meetings: Vec<(uuid::Uuid, &Meeting)> = kept.iter().map(|w| (w.connection.user_id, &w.meeting)).collect();
    let ids = meetings::upsert_meetings(&mut tx, &meetings).await?;
    let invitees = kept
        .iter()
        .map(|w| {
            let key = (w.connection.user_id, w.meeting.calendly_event_uri.clone());
            ids.get(&key).map(|id| (*id, &w.invitee)).ok_or(sqlx::Error::RowNotFound)
        })
        .collect::<sqlx::Result<Vec<_>>>()?;
    meetings::upsert_invitees(&mut tx, &invitees).await?;
    let records: Vec<InboxRecord<'_>> = kept
        .iter()
        .map(|w| InboxRecord {
            message_id: &w.inbox.message_id,
            event: Some(&w.inbox.event),
            created_by: Some(&w.inbox.created_by),
            received_at: w.inbox.received_at,
            status: InboxStatus::Processed,
            attempts: w.inbox.attempts,
            last_error: None,
            body: &[],
            traceparent: None,
        })
        .collect();
    inbox::record_all(&mut tx, &records).await?;
    tx.commit().await?;
    Ok(applied)
}
