//! Ingest: closed-loop throughput and open-loop latency, against two ceilings measured in the
//! same run: the same HTTP stack answering 202 without publishing, and raw confirmed publishes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use calsync_common::calendly::signature::{self, WebhookVerifier};
use calsync_common::queue::{Broker, message};

use crate::Ctx;
use crate::load::{self, SIGNING_KEY};
use crate::procs::{
    CpuMeter, IngestArgs, Memory, Proc, Who, free_port, machine_broker_pid, micros, micros_text, settle, share_text,
    start_ingest, wait_ok,
};
use crate::stats::{self, ms, ratio, row};

/// The HTTP-only ceiling: axum with the same body limit, signature check and message preparation
/// as ingest, answering 202 without publishing. Runs as its own process, like ingest.
pub async fn serve_ceiling(addr: &str) -> anyhow::Result<()> {
    let verifier =
        WebhookVerifier::new(vec![secrecy::SecretString::from(SIGNING_KEY.to_owned())], Duration::from_secs(180));
    async fn receive(
        State(verifier): State<WebhookVerifier>,
        headers: HeaderMap,
        body: Bytes,
    ) -> (StatusCode, axum::Json<serde_json::Value>) {
        let header = headers.get(signature::HEADER).and_then(|v| v.to_str().ok());
        let now = time::OffsetDateTime::now_utc();
        if verifier.verify(header, &body, now.unix_timestamp()).is_err() {
            return (StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({"error": "invalid_signature"})));
        }
        let prepared = message::webhook(body.to_vec(), now);
        (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({ "status": "queued", "message_id": message::message_id(&prepared.body) })),
        )
    }
    let app = Router::new()
        .route("/webhooks/calendly", post(receive).layer(DefaultBodyLimit::max(256 * 1024)))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(verifier);
    axum::serve(tokio::net::TcpListener::bind(addr).await?, app).await?;
    Ok(())
}

/// Confirmed publishes per second through `broker` with `concurrency` in flight, and how many.
pub async fn publish_ceiling(broker: &Broker, concurrency: usize, duration: Duration) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (broker, done) = (broker.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while started.elapsed() < duration {
                    let msg =
                        message::webhook(load::body(t as u64 * 1_000_000_000 + n), time::OffsetDateTime::now_utc());
                    if broker.publish(&msg).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let done = done.load(Ordering::Relaxed);
    (done as f64 / started.elapsed().as_secs_f64(), done)
}

/// One reading of ingest's `/metrics`: what ingest itself counted, compared between two readings.
struct IngestMetrics(String);

impl IngestMetrics {
    /// Reads them now. Right after a load ingest may still hold the load's connections up to its cap
    /// and answer a new one with its fixed 503: asked again until it answers (that 503's body read as
    /// metrics would turn every count into 0).
    async fn read(ctx: &Ctx, ingest_url: &str) -> anyhow::Result<Self> {
        let started = Instant::now();
        loop {
            let response = ctx.http.get(format!("{ingest_url}/metrics")).send().await?;
            if response.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE
                || started.elapsed() > Duration::from_secs(30)
            {
                return Ok(Self(response.error_for_status()?.text().await?));
            }
            eprintln!("  ingest's /metrics answered 503 (still at its connection cap); asking again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The value of one series (0 while it has none yet).
    fn value(&self, series: &str) -> f64 {
        let prefix = format!("{series} ");
        self.0.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
    }

    /// `calsync_ingest_requests_total{outcome}` since `before`.
    fn answered_since(&self, before: &Self, outcome: &str) -> u64 {
        let series = format!("calsync_ingest_requests_total{{outcome=\"{outcome}\"}}");
        (self.value(&series) - before.value(&series)) as u64
    }

    /// How long a publish took inside ingest on average since `before` (µs), from
    /// `calsync_ingest_publish_seconds`: from the call to the confirm.
    fn publish_wait_since(&self, before: &Self) -> Option<f64> {
        let since = |series| self.value(series) - before.value(series);
        let count = since("calsync_ingest_publish_seconds_count");
        (count > 0.0).then(|| 1e6 * since("calsync_ingest_publish_seconds_sum") / count)
    }
}

/// The queue must hold what ingest answered 202 for. Checked against ingest's own count of its
/// answers, so a mismatch says which side is off:
/// - fewer held than ingest's 202s: a webhook lost after its 202 — an error;
/// - ingest's 202s missing at the load generator: the harness lost answers — an error;
/// - more held than ingest's 202s: ingest answered 503 for messages the broker then held (a confirm
///   that came after the publish timeout). Nothing is lost: Calendly sends them again and the
///   worker drops the copies as duplicates. Reported, as the figure's `duplicates`.
pub fn check_held(held: u64, seen: &load::Tally, ingest_accepted: u64, ingest_unavailable: u64) -> anyhow::Result<u64> {
    anyhow::ensure!(
        held >= ingest_accepted,
        "LOST: the queue holds {held} but ingest answered 202 {ingest_accepted} times"
    );
    anyhow::ensure!(
        seen.accepted() == ingest_accepted,
        "ingest answered 202 {ingest_accepted} times but the load generator saw {} ({} answers lost on the way, \
         {} other statuses): the load generator, not ingest, is off",
        seen.accepted(),
        seen.lost(),
        seen.refused()
    );
    let duplicates = held - ingest_accepted;
    if duplicates > 0 {
        eprintln!(
            "  note: ingest answered 503 for {duplicates} message(s) the broker then held ({ingest_unavailable} \
             unavailable in all): confirms later than INGEST_PUBLISH_TIMEOUT_MS; Calendly resends them as duplicates"
        );
    }
    Ok(duplicates)
}

/// What the ingest figures run against: ingest and the HTTP-only ceiling as processes of their own,
/// and a broker handle on the same topology for the publish ceiling and the queue checks.
struct Rig {
    ingest: Proc,
    ceiling: Proc,
    ingest_url: String,
    ceiling_url: String,
    broker: Broker,
    queue: String,
    seq: Arc<AtomicU64>,
    /// The machine's RabbitMQ, found once: its CPU is charged to every figure.
    broker_pid: Option<u32>,
}

const PREFIX: &str = "bench-ingest";
/// The longest a pair waits for the machine to go quiet before one of its loops.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// Ingest's default `INGEST_PUBLISH_CHANNELS`, given to ingest explicitly so that the ceiling always
/// publishes through as many channels as ingest does (with fewer, RabbitMQ confirms more per frame).
const PUBLISH_CHANNELS: usize = 2;

impl Rig {
    async fn start(ctx: &Ctx) -> anyhow::Result<Self> {
        crate::reset_topology(ctx, PREFIX).await?;
        let ceiling_port = free_port()?;
        let ceiling =
            Proc::spawn("calsync-bench", &[], &["http-ceiling", "--addr", &format!("127.0.0.1:{ceiling_port}")])?;
        let args = IngestArgs {
            amqp_url: ctx.amqp_url.clone(),
            prefix: PREFIX,
            signing_key: SIGNING_KEY,
            token_key: calsync_common::crypto::generate_key(),
            extra: vec![("INGEST_PUBLISH_CHANNELS", PUBLISH_CHANNELS.to_string())],
        };
        let (ingest, ingest_url) = start_ingest(ctx, args).await?;
        let ceiling_url = format!("http://127.0.0.1:{ceiling_port}");
        wait_ok(&ctx.http, &format!("{ceiling_url}/healthz")).await?;
        let broker = crate::broker(ctx, PREFIX, PUBLISH_CHANNELS).await?;
        let queue = broker.topology().webhooks_queue();
        let (seq, broker_pid) = (Arc::new(AtomicU64::new(0)), machine_broker_pid());
        Ok(Self { ingest, ceiling, ingest_url, ceiling_url, broker, queue, seq, broker_pid })
    }

    fn hook(url: &str) -> String {
        format!("{url}/webhooks/calendly")
    }

    /// The confirmed-publish ceiling at `connections` publishes in flight, and the CPU it cost
    /// RabbitMQ and the publisher (this process) per message. Leaves the queue empty.
    async fn publish_ceiling(&self, ctx: &Ctx, connections: usize) -> anyhow::Result<(f64, Cpu)> {
        let meter = CpuMeter::start(vec![Who::Pid(self.broker_pid), Who::Pid(Some(std::process::id()))]);
        let started = Instant::now();
        let (publishes, published) = publish_ceiling(&self.broker, connections, ctx.duration).await;
        let cpu = Cpu::read(&meter, published, started);
        crate::purge(ctx, &self.queue).await?;
        Ok((publishes, cpu))
    }

    /// The HTTP-only ceiling's closed loop at `connections`, and the CPU per request of that
    /// server and of the load generator: everything ingest does for a webhook but the publish.
    async fn http_only(&self, ctx: &Ctx, connections: usize) -> (f64, Cpu) {
        let meter = CpuMeter::start(vec![Who::Pid(self.ceiling.child.id()), Who::Pid(Some(std::process::id()))]);
        let started = Instant::now();
        let (rps, seen) = load::closed_loop(&Self::hook(&self.ceiling_url), connections, ctx.duration, &self.seq).await;
        (rps, Cpu::read(&meter, seen.accepted(), started))
    }

    /// The parts of ingest run together, with nothing of ingest's own: `connections` connections,
    /// each doing a webhook's two round trips one after the other — a POST to the HTTP-only ceiling,
    /// then a raw confirmed publish from this process. What the round trips allow any ingest,
    /// measured rather than added up: RabbitMQ now waits between a connection's publishes as long
    /// as it does behind ingest (a broker gone idle meanwhile takes longer to answer than in the
    /// ceiling's back-to-back loop), and fewer publishes are in flight than connections. Rounds per
    /// second, how long a publish took on average (µs; building the message included, as in the
    /// ceiling's loop), and the CPU per round of the HTTP-only
    /// server, RabbitMQ and this process (load generator and publisher). Leaves the queue empty.
    async fn in_turn(&self, ctx: &Ctx, connections: usize) -> anyhow::Result<(f64, Option<f64>, Cpu)> {
        let meter = CpuMeter::start(vec![
            Who::Pid(self.ceiling.child.id()),
            Who::Pid(self.broker_pid),
            Who::Pid(Some(std::process::id())),
        ]);
        let started = Instant::now();
        let broker = self.broker.clone();
        let publish = move |n| {
            let broker = broker.clone();
            async move {
                let message = message::webhook(load::body(n), time::OffsetDateTime::now_utc());
                broker.publish(&message).await.is_ok()
            }
        };
        let hook = Self::hook(&self.ceiling_url);
        let (rounds, publish_took) = load::in_turn(&hook, connections, ctx.duration, &self.seq, publish).await;
        // Over the loop only, as in `closed_loop`.
        let (used, busy) = (meter.used(), meter.busy_share(started.elapsed().as_secs_f64()));
        let held = crate::depth(ctx, &self.queue).await?;
        let cpu = Cpu::of(used, held, busy);
        crate::purge(ctx, &self.queue).await?;
        Ok((rounds, publish_took, cpu))
    }

    /// Ingest's closed loop at `connections`, checked against what the queue holds (an error if a
    /// 202 was lost), with the CPU per accepted webhook of ingest, RabbitMQ and the load generator.
    /// Leaves the queue empty.
    async fn closed_loop(&self, ctx: &Ctx, connections: usize) -> anyhow::Result<Closed> {
        let url = &self.ingest_url;
        let before = IngestMetrics::read(ctx, url).await?;
        let meter = CpuMeter::start(vec![
            Who::Pid(self.ingest.child.id()),
            Who::Pid(self.broker_pid),
            Who::Pid(Some(std::process::id())),
        ]);
        let started = Instant::now();
        let (rps, seen) = load::closed_loop(&Self::hook(url), connections, ctx.duration, &self.seq).await;
        // Over the loop only: what follows (queue depth, metrics, purge) is the bench's own work.
        let (used, busy) = (meter.used(), meter.busy_share(started.elapsed().as_secs_f64()));
        let held = crate::depth(ctx, &self.queue).await?;
        let after = IngestMetrics::read(ctx, url).await?;
        let accepted = after.answered_since(&before, "accepted");
        let duplicates = check_held(held, &seen, accepted, after.answered_since(&before, "unavailable"))?;
        crate::purge(ctx, &self.queue).await?;
        let cpu = Cpu::of(used, held, busy);
        Ok(Closed { rps, held, accepted, duplicates, cpu, publish_wait: after.publish_wait_since(&before) })
    }

    /// Lets the machine go quiet before a measured loop (at most [`SETTLE_LIMIT`]), and says how
    /// long that took and what RabbitMQ spent meanwhile.
    async fn settle(&self) -> String {
        let meter = CpuMeter::start(vec![Who::Pid(self.broker_pid)]);
        let (waited, quiet) = settle(SETTLE_LIMIT).await;
        let broker = meter.used().into_iter().next().flatten();
        format!(
            "{} {:.1} s (RabbitMQ {} ms of CPU)",
            if quiet { "quiet after" } else { "still busy after" },
            waited.as_secs_f64(),
            broker.map_or("?".into(), |cpu| format!("{:.0}", cpu.as_secs_f64() * 1e3))
        )
    }

    async fn stop(self, ctx: &Ctx) -> anyhow::Result<()> {
        self.broker.close().await;
        self.ingest.stop().await;
        self.ceiling.stop().await;
        crate::reset_topology(ctx, PREFIX).await
    }
}

/// One closed-loop reading of ingest; `cpu` is ingest / RabbitMQ / load generator per accepted webhook.
struct Closed {
    rps: f64,
    held: u64,
    accepted: u64,
    duplicates: u64,
    cpu: Cpu,
    /// How long a publish took inside ingest, on average (µs): from the call to the confirm.
    publish_wait: Option<f64>,
}

/// One reading's CPU per message or request (µs) of each metered process, in the order metered,
/// and how busy the machine was meanwhile.
struct Cpu {
    each: Vec<Option<f64>>,
    busy: Option<f64>,
}

impl Cpu {
    /// What `meter` has measured since `started`, per `units`.
    fn read(meter: &CpuMeter, units: u64, started: Instant) -> Self {
        Self::of(meter.used(), units, meter.busy_share(started.elapsed().as_secs_f64()))
    }

    /// From CPU `used` (as [`CpuMeter::used`] gives it) and the machine's `busy` share.
    fn of(used: Vec<Option<Duration>>, units: u64, busy: Option<f64>) -> Self {
        Self { each: used.into_iter().map(|cpu| micros(cpu, units)).collect(), busy }
    }

    /// All the metered processes together.
    fn total(&self) -> Option<f64> {
        self.each.iter().copied().sum()
    }

    /// "a / b / c" in µs.
    fn each_text(&self) -> String {
        self.each.iter().map(|us| micros_text(*us)).collect::<Vec<_>>().join(" / ")
    }

    fn busy_text(&self) -> String {
        share_text(self.busy)
    }
}

pub async fn run(ctx: &Ctx, rows: &mut Vec<stats::Row>) -> anyhow::Result<Memory> {
    let rig = Rig::start(ctx).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_mib = rig.ingest.rss_mib();

    let mut capacity = 0.0f64;
    for connections in [1usize, 16, 64] {
        // Ceilings at the same concurrency: the same number of publishes (or requests) in flight.
        let (publishes, ceiling_cpu) = rig.publish_ceiling(ctx, connections).await?;
        let (http_only, _) = rig.http_only(ctx, connections).await;
        let Closed { rps, held, accepted, duplicates, cpu, .. } = rig.closed_loop(ctx, connections).await?;
        capacity = capacity.max(rps);
        rows.push(row(
            "ingest",
            format!("closed loop, {connections} connection(s): 202/s (queue {held} = 202s {accepted} + 503-but-held {duplicates} ✓)"),
            format!("{rps:.0}/s"),
            format!("HTTP-only {http_only:.0}/s; confirmed publishes {publishes:.0}/s"),
            ratio(rps, http_only.min(publishes)),
        ));
        rows.push(row(
            "ingest",
            format!("CPU per accepted webhook, {connections} connection(s): ingest / RabbitMQ / load generator"),
            cpu.each_text(),
            format!("raw confirmed publish: RabbitMQ / publisher {}", ceiling_cpu.each_text()),
            "-",
        ));
    }
    let ingest_hook = Rig::hook(&rig.ingest_url);
    for rate in [1000u64, 5000] {
        let before = IngestMetrics::read(ctx, &rig.ingest_url).await?;
        let (latencies, seen) = load::open_loop(&ctx.http, &ingest_hook, rate, ctx.duration, &rig.seq).await;
        let held = crate::depth(ctx, &rig.queue).await?;
        let after = IngestMetrics::read(ctx, &rig.ingest_url).await?;
        let (accepted, unavailable) =
            (after.answered_since(&before, "accepted"), after.answered_since(&before, "unavailable"));
        let duplicates = check_held(held, &seen, accepted, unavailable)?;
        crate::purge(ctx, &rig.queue).await?;
        rows.push(row(
            "ingest",
            format!(
                "open loop {rate}/s: p50 / p99 / p99.9 ({} not 202, of which held anyway {duplicates})",
                seen.failed()
            ),
            format!(
                "{} / {} / {}",
                ms(stats::percentile(&latencies, 0.5)),
                ms(stats::percentile(&latencies, 0.99)),
                ms(stats::percentile(&latencies, 0.999))
            ),
            "-",
            "-",
        ));
    }
    overload(ctx, &rig.ingest, &rig.ingest_url, &rig.queue, capacity, &rig.seq, rows).await?;
    let peak_mib = rig.ingest.peak_rss_mib();
    rig.stop(ctx).await?;
    Ok(Memory { idle_mib, peak_mib })
}

/// `--only ingest-pairs`: at each concurrency, the confirmed-publish ceiling and right after it
/// ingest's closed loop, `pairs` times, and the median of the ratios. The machine drifts less
/// within a pair than between the ceiling and the figure of a whole section.
///
/// Each pair also reads the HTTP-only ceiling's CPU, for what the two shared cores allow any
/// ingest: it must at least be served, have its requests made, and publish, so its CPU per webhook
/// is about the HTTP-only server's + the load generator's + the raw publish's (RabbitMQ and
/// publisher), and where the machine is as busy in both, its rate about the ceiling's × raw
/// publish ÷ that sum. An estimate, not a bound: RabbitMQ is charged what a message costs it at the
/// raw ceiling, and through ingest it has cost less as well as more (BENCHMARKS.md, "The same pairs
/// on machine D"); ingest's own safeguards — metrics, body deadline, load shedding — are left out. With one
/// connection the machine idles and the round trips bound instead: a webhook waits at least for an
/// HTTP round trip and a publish's, one after the other.
///
/// Both estimates are also measured: each pair runs the parts together ([`Rig::in_turn`]), every
/// connection an HTTP-only round trip then a raw publish. That is an ingest with nothing of its
/// own, and it answers what the sums cannot: how much a broker that waits between a connection's
/// publishes slows each one, and how fewer publishes in flight than connections lower the rate.
/// Every loop starts on a quiet machine ([`settle`]).
pub async fn ratio_pairs(ctx: &Ctx, rows: &mut Vec<stats::Row>, pairs: usize) -> anyhow::Result<()> {
    let rig = Rig::start(ctx).await?;
    for connections in [1usize, 16, 64] {
        let (mut ratios, mut reaches, mut round_trips, mut together) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for pair in 1..=pairs {
            // Each loop starts on a quiet machine: what the one before left (a purge's aftermath in
            // RabbitMQ) would otherwise fall on whichever loop comes right after it.
            let before_http = rig.settle().await;
            let (http_only, http_cpu) = rig.http_only(ctx, connections).await;
            let before_ceiling = rig.settle().await;
            let (publishes, ceiling_cpu) = rig.publish_ceiling(ctx, connections).await?;
            let before_ingest = rig.settle().await;
            let Closed { rps, held, accepted, duplicates, cpu, publish_wait } =
                rig.closed_loop(ctx, connections).await?;
            eprintln!(
                "  {connections} connection(s), pair {pair}/{pairs}: before HTTP-only {before_http}; before the \
                 ceiling {before_ceiling}; before ingest {before_ingest}"
            );
            ratios.push(rps / publishes);
            let before_parts = rig.settle().await;
            let (rounds, publish_took, parts_cpu) = rig.in_turn(ctx, connections).await?;
            together.push(rounds / publishes);
            eprintln!(
                "  {connections} connection(s), pair {pair}/{pairs}: before the parts together {before_parts}; \
                 HTTP-only then raw publish per connection {rounds:.0}/s = {}, a publish took {}",
                ratio(rounds, publishes),
                micros_text(publish_took)
            );
            let parts = (ceiling_cpu.total(), http_cpu.total());
            let reach = parts.0.zip(parts.1).map(|(publish, http)| publish / (publish + http));
            reaches.extend(reach);
            // One request at a time: each webhook waits at least an HTTP round trip and a publish's
            // (with more connections in flight the round trips overlap and bound nothing).
            let in_turn = (connections == 1).then(|| http_only / (http_only + publishes));
            round_trips.extend(in_turn);
            // With one in flight, a raw publish's round trip is the ceiling's period.
            let raw_publish = (connections == 1).then(|| 1e6 / publishes);
            eprintln!(
                "  {connections} connection(s), pair {pair}/{pairs}: {rps:.0}/s vs {publishes:.0}/s = {}; the parts \
                 allow about {}{}",
                ratio(rps, publishes),
                share_text(reach),
                in_turn.map_or(String::new(), |r| format!(
                    ", the round trips {:.0}%; a publish took {} inside ingest, {} raw",
                    100.0 * r,
                    micros_text(publish_wait),
                    micros_text(raw_publish)
                ))
            );
            rows.push(row(
                "ingest",
                format!(
                    "pair {pair}/{pairs}, {connections} connection(s): 202/s right after its ceiling (queue {held} = 202s \
                     {accepted} + 503-but-held {duplicates} ✓); CPU per accepted webhook ingest / RabbitMQ / load \
                     generator {}, machine busy {}; a publish took {} inside ingest on average",
                    cpu.each_text(),
                    cpu.busy_text(),
                    micros_text(publish_wait)
                ),
                format!("{rps:.0}/s"),
                format!(
                    "confirmed publishes {publishes:.0}/s (RabbitMQ / publisher {} per message, machine busy {})",
                    ceiling_cpu.each_text(),
                    ceiling_cpu.busy_text()
                ),
                ratio(rps, publishes),
            ));
            rows.push(row(
                "ingest",
                format!(
                    "pair {pair}/{pairs}, {connections} connection(s): what the parts allow (an estimate), raw \
                     publish's CPU ÷ (it + HTTP-only server + load generator), per webhook"
                ),
                format!("{} ÷ ({} + {})", micros_text(parts.0), micros_text(parts.0), micros_text(parts.1)),
                format!(
                    "HTTP-only {http_only:.0}/s: server / load generator {} per request, machine busy {}",
                    http_cpu.each_text(),
                    http_cpu.busy_text()
                ),
                share_text(reach),
            ));
            rows.push(row(
                "ingest",
                format!(
                    "pair {pair}/{pairs}, {connections} connection(s): the parts together, each connection an HTTP-only \
                     round trip then a raw publish (a publish took {}); CPU per round HTTP-only server / RabbitMQ / \
                     load generator and publisher {}, machine busy {}",
                    micros_text(publish_took),
                    parts_cpu.each_text(),
                    parts_cpu.busy_text()
                ),
                format!("{rounds:.0}/s"),
                format!("confirmed publishes {publishes:.0}/s"),
                ratio(rounds, publishes),
            ));
        }
        let what = format!("{connections} connection(s): 202/s ÷ its confirmed-publish ceiling");
        rows.push(stats::median_row("ingest", &what, ratios, stats::Unit::Percent, 0.75));
        if reaches.len() == pairs {
            let what =
                format!("{connections} connection(s): what the two shared cores allow (sum of the parts, an estimate)");
            rows.push(stats::median_row("ingest", &what, reaches, stats::Unit::Percent, 0.75));
        }
        if connections == 1 {
            let what =
                "1 connection: the most its round trips allow (HTTP-only's + the raw publish's, one after the other)";
            rows.push(stats::median_row("ingest", what, round_trips, stats::Unit::Percent, 0.75));
        }
        let what = format!(
            "{connections} connection(s): the parts together (each connection an HTTP-only round trip, then a raw \
             publish) ÷ the same ceiling"
        );
        rows.push(stats::median_row("ingest", &what, together, stats::Unit::Percent, 0.75));
    }
    rig.stop(ctx).await
}

/// An open loop at twice the best closed-loop rate: what is shed (503 at once, past
/// INGEST_MAX_IN_FLIGHT), how fast the accepted requests still are, and ingest's memory meanwhile.
async fn overload(
    ctx: &Ctx,
    ingest: &Proc,
    ingest_url: &str,
    queue: &str,
    capacity: f64,
    seq: &Arc<AtomicU64>,
    rows: &mut Vec<stats::Row>,
) -> anyhow::Result<()> {
    let rate = (capacity * 2.0).max(100.0) as u64;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sample = async {
        let mut peak = 0.0f64;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(ingest.rss_mib());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    };
    let hook = format!("{ingest_url}/webhooks/calendly");
    let before = IngestMetrics::read(ctx, ingest_url).await?;
    let offered = async {
        let result = load::open_loop(&ctx.http, &hook, rate, ctx.duration, seq).await;
        stop.store(true, Ordering::Relaxed);
        result
    };
    let ((latencies, seen), peak) = tokio::join!(offered, sample);
    let held = crate::depth(ctx, queue).await?;
    let after = IngestMetrics::read(ctx, ingest_url).await?;
    let (accepted, unavailable) =
        (after.answered_since(&before, "accepted"), after.answered_since(&before, "unavailable"));
    let duplicates = check_held(held, &seen, accepted, unavailable)?;
    let failed = seen.failed();
    crate::purge(ctx, queue).await?;
    let total = latencies.len() as f64 + failed as f64;
    rows.push(row(
        "ingest",
        format!("overload: open loop at 2× capacity ({rate}/s): shed share / p99 of 202s / RSS peak (queue = 202s + {duplicates} 503-but-held ✓)"),
        format!(
            "{:.1}% / {} / {peak:.1} MiB",
            100.0 * failed as f64 / total.max(1.0),
            ms(stats::percentile(&latencies, 0.99))
        ),
        "target RSS ≤ 64 MiB",
        if peak <= 64.0 { "✓" } else { "✗" },
    ));
    Ok(())
}
