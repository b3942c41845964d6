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

pub async fn post(http: &reqwest::Client, url: &str, body: Vec<u8>) -> Option<u16> {
    let sig = signature::sign(SIGNING_KEY.as_bytes(), now(), &body);
    http.post(url)
        .header(signature::HEADER, sig)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// `connections` tasks each sending one request after another for `duration`: answers 202 per second.
pub async fn closed_loop(
    http: &reqwest::Client,
    url: &str,
    connections: usize,
    duration: Duration,
    seq: &Arc<AtomicU64>,
) -> (f64, u64) {
    let accepted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (http, url, accepted, seq) = (http.clone(), url.to_owned(), accepted.clone(), seq.clone());
            tokio::spawn(async move {
                while started.elapsed() < duration {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    if post(&http, &url, body(n)).await == Some(202) {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let n = accepted.load(Ordering::Relaxed);
    (n as f64 / started.elapsed().as_secs_f64(), n)
}

/// Requests started on a fixed schedule (`rate` per second) whatever the answers do; latency is
/// measured from the scheduled start, so a stall is not hidden (no coordinated omission).
/// Returns sorted latencies of 202 answers and the count of other outcomes.
pub async fn open_loop(
    http: &reqwest::Client,
    url: &str,
    rate: u64,
    duration: Duration,
    seq: &Arc<AtomicU64>,
) -> (Vec<Duration>, u64) {
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
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok((Some(202), latency)) => latencies.push(latency),
            _ => failed += 1,
        }
    }
    latencies.sort();
    (latencies, failed)
}
