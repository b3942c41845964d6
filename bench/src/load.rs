//! HTTP load: signed webhook bodies, closed-loop throughput and open-loop latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

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

/// How long the open loop waits for an answer. Under overload a request first waits at the load
/// generator itself (two cores, tens of thousands of requests a second) and in ingest's accept
/// backlog, then up to ingest's own deadlines: with the client's 30 s, an overload run offering
/// 27,000/s gave up on 633 requests ingest had answered 202 (and the bench failed, rightly saying
/// the load generator was off).
const OPEN_LOOP_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends one signed webhook; the status, or `None` when no answer came back. The whole answer is
/// read, so a 202 counts only once ingest has finished it.
async fn post(http: &reqwest::Client, url: &str, body: Vec<u8>) -> Option<u16> {
    let sig = signature::sign(SIGNING_KEY.as_bytes(), now(), &body);
    let response = http
        .post(url)
        .timeout(OPEN_LOOP_TIMEOUT)
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

/// `connections` tasks each sending one request after another for `duration`, each on a keep-alive
/// connection of its own: answers 202 per second, and what became of every request.
///
/// Each task drives hyper's connection itself (joined with its sender) rather than through
/// reqwest's pool: the load generator shares the two cores with ingest and RabbitMQ, and reqwest
/// cost it 35–41 µs of CPU per request at 16 connections where this costs 20–25 µs (BENCHMARKS.md,
/// "A leaner load generator, two publish channels"). Requests are still signed one by one and
/// every answer is read whole.
pub async fn closed_loop(url: &str, connections: usize, duration: Duration, seq: &Arc<AtomicU64>) -> (f64, Tally) {
    let target = Target::parse(url);
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (target, tally, seq) = (target.clone(), tally.clone(), seq.clone());
            tokio::spawn(async move {
                keep_posting(&target, started, duration, &seq, |_, status| {
                    tally.count(status);
                    std::future::ready(())
                })
                .await
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let tally = Arc::into_inner(tally).expect("every task is done");
    (tally.accepted() as f64 / started.elapsed().as_secs_f64(), tally)
}

/// `connections` connections posting webhooks to `url` for `duration`, each 202 followed by `then`
/// before that connection sends its next request: rounds per second that got a 202 and whose `then`
/// succeeded, and the mean time `then` took (µs). Within a connection nothing overlaps: a round
/// costs the HTTP round trip plus `then`.
pub async fn in_turn<F, Fut>(
    url: &str,
    connections: usize,
    duration: Duration,
    seq: &Arc<AtomicU64>,
    then: F,
) -> (f64, Option<f64>)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    /// What every connection's rounds came to.
    #[derive(Default)]
    struct Rounds {
        done: AtomicU64,
        calls: AtomicU64,
        then_nanos: AtomicU64,
    }
    let target = Target::parse(url);
    let rounds = Arc::new(Rounds::default());
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (target, seq, then, rounds) = (target.clone(), seq.clone(), then.clone(), rounds.clone());
            tokio::spawn(async move {
                keep_posting(&target, started, duration, &seq, move |n, status| {
                    let (then, rounds) = ((status == Some(202)).then(|| then(n)), rounds.clone());
                    async move {
                        let Some(then) = then else { return };
                        let begun = Instant::now();
                        let ok = then.await;
                        rounds.then_nanos.fetch_add(begun.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        rounds.calls.fetch_add(1, Ordering::Relaxed);
                        rounds.done.fetch_add(u64::from(ok), Ordering::Relaxed);
                    }
                })
                .await
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    let (done, calls) = (rounds.done.load(Ordering::Relaxed), rounds.calls.load(Ordering::Relaxed));
    let mean = (calls > 0).then(|| rounds.then_nanos.load(Ordering::Relaxed) as f64 / 1e3 / calls as f64);
    (done as f64 / started.elapsed().as_secs_f64(), mean)
}

/// One connection's requests until `duration` has passed since `started`: one signed webhook after
/// another on a keep-alive connection, each answer (its status, `None` if none came) handed to
/// `answered` and awaited before the next request. A connection that breaks (every send then
/// fails) is replaced while time is left.
async fn keep_posting<F, Fut>(target: &Target, started: Instant, duration: Duration, seq: &AtomicU64, mut answered: F)
where
    F: FnMut(u64, Option<u16>) -> Fut,
    Fut: Future<Output = ()>,
{
    while started.elapsed() < duration {
        let Some((mut sender, connection)) = target.connect().await else {
            // Nothing was sent: not a request to count.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let send = async {
            // Not ready: the server closed the connection (nothing sent on it): reconnect.
            while started.elapsed() < duration && sender.ready().await.is_ok() {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let status = target.post(&mut sender, body(n)).await;
                answered(n, status).await;
            }
            // Dropping the sender lets the connection finish.
            drop(sender);
        };
        let _ = tokio::join!(connection, send);
    }
}

/// Where the closed loop posts: the address to connect to, the `Host` header and the path.
#[derive(Clone)]
struct Target {
    addr: String,
    path: String,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Target {
    fn parse(url: &str) -> Self {
        let url = url::Url::parse(url).expect("the bench builds its own URLs");
        let addr = format!("{}:{}", url.host_str().unwrap_or("127.0.0.1"), url.port_or_known_default().unwrap_or(80));
        Self { addr, path: url.path().to_owned() }
    }

    /// A new connection: its sender, and the future that drives it (to be polled alongside).
    async fn connect(&self) -> Option<(Sender, impl Future<Output = ()> + use<>)> {
        let stream = tokio::net::TcpStream::connect(&self.addr).await.ok()?;
        stream.set_nodelay(true).ok()?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
        Some((sender, async move { connection.await.unwrap_or_default() }))
    }

    /// One signed webhook on a ready connection; the status once the whole answer is read, or
    /// `None` if none came.
    async fn post(&self, sender: &mut Sender, body: Vec<u8>) -> Option<u16> {
        let sig = signature::sign(SIGNING_KEY.as_bytes(), now(), &body);
        let request = hyper::Request::post(&self.path)
            .header(hyper::header::HOST, &self.addr)
            .header(signature::HEADER, sig)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        response.into_body().collect().await.ok()?;
        Some(status)
    }
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
