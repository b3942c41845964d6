//! What the demo prints: each user's meetings, inbox and dead-letter counts, headline metrics.

use std::fmt::Write;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::scenario::Outcome;
use crate::stack::Stack;

/// One Prometheus sample: name, label text (`a="b",...`), value.
pub type Sample = (String, String, f64);

pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n.to_owned(), rest.trim_end_matches('}').to_owned()),
                None => (series.to_owned(), String::new()),
            };
            Some((name, labels, value.parse().ok()?))
        })
        .collect()
}

/// Sum of `name` samples whose labels contain every `needles` (0 when there are none).
pub fn sum(samples: &[(String, String, f64)], name: &str, needles: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && needles.iter().all(|x| l.contains(x)))
        .map(|(_, _, v)| v)
        .fold(0.0, |a, v| a + v)
}

/// Webhook deliveries the workers finished as `processed` (backfill jobs are counted apart).
pub fn webhooks_processed(workers: &[(String, String, f64)]) -> f64 {
    sum(workers, "calsync_worker_deliveries_total", &["outcome=\"processed\""])
        - sum(workers, "calsync_worker_deliveries_total", &["outcome=\"processed\"", "event=\"sync\""])
}

/// A quantile estimated from summed histogram buckets (upper bound of the bucket it falls in).
pub fn quantile(samples: &[(String, String, f64)], histogram: &str, q: f64) -> Option<f64> {
    let bucket = format!("{histogram}_bucket");
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    for (name, labels, value) in samples.iter().filter(|(n, _, _)| *n == bucket) {
        let le = labels.split("le=\"").nth(1)?.split('"').next()?;
        let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
        match by_le.iter_mut().find(|(l, _)| *l == le) {
            Some(entry) => entry.1 += value,
            None => by_le.push((le, *value)),
        }
        let _ = name;
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = by_le.last()?.1;
    if total == 0.0 {
        return None;
    }
    by_le.into_iter().find(|(_, count)| *count >= q * total).map(|(le, _)| le)
}

pub struct Metrics {
    pub ingest: Vec<(String, String, f64)>,
    /// Every worker's samples together.
    pub workers: Vec<(String, String, f64)>,
    /// Each worker's own: its URL and samples.
    pub per_worker: Vec<(String, Vec<Sample>)>,
}

pub async fn scrape(stack: &Stack) -> anyhow::Result<Metrics> {
    let get = |url: String| async move { anyhow::Ok(stack.http.get(url).send().await?.text().await?) };
    let ingest = samples(&get(format!("{}/metrics", stack.endpoints.ingest_url)).await?);
    let mut per_worker = Vec::new();
    for w in &stack.endpoints.worker_urls {
        per_worker.push((w.clone(), samples(&get(format!("{w}/metrics")).await?)));
    }
    let workers = per_worker.iter().flat_map(|(_, s)| s.iter().cloned()).collect();
    Ok(Metrics { ingest, workers, per_worker })
}

pub async fn render(stack: &Stack, outcome: &Outcome) -> anyhow::Result<String> {
    let pool = stack.pool()?;
    let mut out = String::new();
    for user in &outcome.users {
        writeln!(out, "\n{} (app user {})", user.name, user.app_user)?;
        writeln!(out, "  {:<17} {:<20} {:<9} invitees", "start (UTC)", "meeting", "status")?;
        let rows: Vec<(Uuid, Option<String>, String, Option<OffsetDateTime>)> =
            sqlx::query_as("SELECT id, name, status, start_time FROM meetings WHERE user_id = $1 ORDER BY start_time")
                .bind(user.app_user)
                .fetch_all(&pool)
                .await?;
        for (id, name, status, start) in rows {
            let invitees: Vec<(Option<String>, String, bool, bool)> = sqlx::query_as(
                "SELECT name, status, no_show, rescheduled FROM meeting_invitees WHERE meeting_id = $1 ORDER BY name",
            )
            .bind(id)
            .fetch_all(&pool)
            .await?;
            let people: Vec<String> = invitees
                .into_iter()
                .map(|(n, s, no_show, rescheduled)| {
                    let mut p = n.unwrap_or_default();
                    if rescheduled {
                        p.push_str(" (rescheduled)");
                    } else if s == "canceled" {
                        p.push_str(" (canceled)");
                    }
                    if no_show {
                        p.push_str(" (no-show)");
                    }
                    p
                })
                .collect();
            let start = start.map_or("-".into(), |t| {
                format!("{:04}-{:02}-{:02} {:02}:{:02}", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute())
            });
            writeln!(out, "  {:<17} {:<20} {:<9} {}", start, name.unwrap_or_default(), status, people.join(", "))?;
        }
    }
    let inbox: Vec<(String, i64)> = calsync_common::db::inbox::counts(&pool).await?;
    let inbox: Vec<String> = inbox.into_iter().map(|(s, n)| format!("{s} {n}")).collect();
    writeln!(out, "\ninbox: {}   dead letters: {}", inbox.join(", "), stack.dead_letters().await?)?;
    let m = scrape(stack).await?;
    let ms = |v: Option<f64>| {
        v.map_or("-".into(), |s| if s.is_finite() { format!("≤{:.0} ms", s * 1000.0) } else { "> 60 s".into() })
    };
    writeln!(
        out,
        "metrics: webhooks accepted {} · webhooks processed {} · end-to-end p50 {} / p99 {} · Calendly API calls {} · token refreshes {}",
        sum(&m.ingest, "calsync_ingest_requests_total", &["outcome=\"accepted\""]),
        webhooks_processed(&m.workers),
        ms(quantile(&m.workers, "calsync_webhook_end_to_end_seconds", 0.5)),
        ms(quantile(&m.workers, "calsync_webhook_end_to_end_seconds", 0.99)),
        sum(&m.workers, "calsync_calendly_requests_total", &[]),
        sum(&m.workers, "calsync_token_refreshes_total", &[]),
    )?;
    // One line per worker: a pool where one replica did everything (or nothing) shows here.
    for (url, samples) in &m.per_worker {
        writeln!(
            out,
            "worker {url}: webhooks processed {} · Calendly API calls {}",
            webhooks_processed(samples),
            sum(samples, "calsync_calendly_requests_total", &[]),
        )?;
    }
    Ok(out)
}
