//! HTTP load: signed webhook bodies, closed-loop throughput and open-loop latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use calsync_common::calendly::signature;

pub const SIGNING_KEY: &str = "bench-signing-key";

/// A realistic (≈1.3 KiB) invitee.created body, unique per `n`.
pub fn body(n: u64) -> Vec<u8> {
    format!(
        r#"{{"created_at":"2026-11-24T10:00:00.000000Z","created_by":"https://api.calendly.com/users/BENCHUSER{u}","event":"invitee.created","payload":{{"cancel_url":"https://calendly.com/cancellations/{n}","created_at":"2026-11-24T10:00:00.000000Z","email":"guest{n}@example.com","event":"https://api.calendly.com/scheduled_events/EV{n}","first_name":"Guest","last_name":"{n}","name":"Guest {n}","new_invitee":null,"no_show":null,"old_invitee":null,"payment":null,"questions_and_answers":[{{"answer":"Planning","position":0,"question":"Topic?"}}],"reconfirmation":null,"reschedule_url":"https://calendly.com/reschedulings/{n}","rescheduled":false,"routing_form_submission":null,"scheduled_event":{{"created_at":"2026-11-24T10:00:00.000000Z","end_time":"2026-11-25T10:30:00.000000Z","event_memberships":[{{"user":"https://api.calendly.com/users/BENCHUSER{u}"}}],"event_type":"https://api.calendly.com/event_types/ET","invitees_counter":{{"active":1,"limit":1,"total":1}},"location":{{"join_url":"https://zoom.us/j/1","status":"pushed","type":"zoom_conference"}},"name":"30 Minute Meeting","start_time":"2026-11-25T10:00:00.000000Z","status":"active","updated_at":"2026-11-24T10:00:00.000000Z","uri":"https://api.calendly.com/scheduled_events/EV{n}"}},"status":"active","text_reminder_number":null,"timezone":"Europe/Berlin","tracking":{{"utm_campaign":null,"utm_content":null,"utm_medium":null,"utm_source":null,"utm_term":null}},"updated_at":"2026-11-24T10:00:00.000000Z","uri":"https://api.calendly.com/scheduled_events/EV{n}/invitees/INV{n}"}}}}"#,
        u = n % 50
    )
    .into_bytes()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// What became of the requests the load generator sent.
#[derive(Debug, Default)]
pub struct Tally {
    /// Answered 202.
    pub accepted: AtomicU64,
    /// Answered with another status (503 shed or broker trouble, 408, ...).
    pub refused: AtomicU64,
    /// No answer reached the load generator (connection error, its own timeout).
    pub lost: AtomicU64,
}

impl Tally {
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Everything that was not a 202.
    pub fn failed(&self) -> u64 {
        self.refused() + self.lost()
    }

    fn count(&self, status: Option<u16>) {
        let counter = match status {
            Some(202) => &self.accepted,
            Some(_) => &self.refused,
            None => &self.lost,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends one signed webhook; the status, or `None` when no answer came back. The whole answer is
/// read, so a 202 counts only once ingest has finished it.
pub async fn post(http: &reqwest::Client, url: &str, body: Vec<u8>) -> Option<u16> {
    let sig = signature::sign(SIGNING_KEY.as_bytes(), now(), &body);
    let response = http
        .post(url)
        .header(signature::HEADER, sig)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    response.bytes().await.ok()?;
    Some(status)
}

/// `connections` tasks each sending one request after another for `duration`: answers 202 per
/// second, and what became of every request.
pub async fn closed_loop(
    http: &reqwest::Client,
    url: &str,
    connections: usize,
    duration: Duration,
    seq: &Arc<AtomicU64>,
) -> (f64, Tally) {
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (http, url, tally, seq) = (http.clone(), url.to_owned(), tally.clone(), seq.clone());
            tokio::spawn(async move {
                while started.elapsed() < duration {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    tally.count(post(&http, &url, body(n)).await);
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let tally = Arc::into_inner(tally).expect("every task is done");
    (tally.accepted() as f64 / started.elapsed().as_secs_f64(), tally)
}

/// Requests started on a fixed schedule (`rate` per second) whatever the answers do; latency is
/// measured from the scheduled start, so a stall is not hidden (no coordinated omission).
/// Returns sorted latencies of 202 answers and what became of every request.
pub async fn open_loop(
    http: &reqwest::Client,
    url: &str,
    rate: u64,
    duration: Duration,
    seq: &Arc<AtomicU64>,
) -> (Vec<Duration>, Tally) {
    let total = rate * duration.as_secs();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let (http, url, n) = (http.clone(), url.to_owned(), seq.fetch_add(1, Ordering::Relaxed));
        tasks.push(tokio::spawn(async move {
            let status = post(&http, &url, body(n)).await;
            (status, scheduled.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let tally = Tally::default();
    for t in tasks {
        let (status, latency) = t.await.unwrap_or((None, Duration::ZERO));
        tally.count(status);
        if status == Some(202) {
            latencies.push(latency);
        }
    }
    latencies.sort();
    (latencies, tally)
}
