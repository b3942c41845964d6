//! The demo as the app that owns the users sees it: a reader following `GET /changes` with its
//! cursor, printing each change as it arrives while the story runs.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::stack::{Stack, send_patiently};

/// How often the app asks for new changes.
const POLL: Duration = Duration::from_millis(300);

/// The app's reader, running in the background until [`AppFeed::stop`].
pub struct AppFeed {
    stop: CancellationToken,
    reader: JoinHandle<anyhow::Result<Vec<Value>>>,
}

/// What the app keeps of one change (and prints).
fn line(change: &Value) -> String {
    let short =
        |key: &str| change[key].as_str().map(|s| s.rsplit('/').next().unwrap_or(s)[..8.min(s.len())].to_owned());
    let about = match (short("calendly_event_uri"), short("invitee_id")) {
        (Some(event), Some(invitee)) => format!("event {event}… invitee {invitee}…"),
        (Some(event), None) => format!("event {event}…"),
        _ => change["reason"].as_str().map_or(String::new(), |r| format!("reason {r}")),
    };
    format!(
        "  ⇢ app feed #{:<4} {:<33} user {}… {:<34} ({}, status {})",
        change["cursor"].as_str().unwrap_or("?"),
        change["kind"].as_str().unwrap_or("?"),
        &change["user_id"].as_str().unwrap_or("?")[..8],
        about,
        change["cause"].as_str().unwrap_or("?"),
        change["status"].as_str().unwrap_or("-"),
    )
}

impl AppFeed {
    /// Starts reading from the feed's current end (a stack that ran the demo before has older
    /// changes: they are not this run's story).
    pub async fn follow(stack: &Stack) -> anyhow::Result<Self> {
        let (http, e) = (stack.http.clone(), stack.endpoints.clone());
        let page = move |after: Option<String>| {
            let (http, e) = (http.clone(), e.clone());
            async move {
                let mut url = url::Url::parse(&format!("{}/changes", e.ingest_url))?;
                url.query_pairs_mut().append_pair("limit", "1000");
                if let Some(after) = &after {
                    url.query_pairs_mut().append_pair("after", after);
                }
                let response = send_patiently(http.get(url).bearer_auth(&e.api_token)).await?;
                let status = response.status();
                let body: Value = response.json().await.context("GET /changes answers JSON")?;
                if !status.is_success() {
                    bail!("GET /changes: {status} {body}");
                }
                let changes = body["changes"].as_array().cloned().unwrap_or_default();
                let next = body["next_cursor"].as_str().context("next_cursor")?.to_owned();
                anyhow::Ok((changes, next))
            }
        };
        let mut cursor = None;
        loop {
            let (changes, next) = page(cursor.clone()).await?;
            cursor = Some(next);
            if changes.is_empty() {
                break;
            }
        }
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                // A last read after the stop, so nothing committed before it is left out.
                let last = stopped.is_cancelled();
                let (changes, next) = page(cursor.clone()).await?;
                cursor = Some(next);
                for change in changes {
                    println!("{}", line(&change));
                    seen.push(change);
                }
                if last {
                    return Ok(seen);
                }
                tokio::select! {
                    _ = stopped.cancelled() => {}
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        });
        Ok(Self { stop, reader })
    }

    /// Stops reading, then checks what an app needs: each of `kinds` arrived, and every meeting and
    /// invitee row of `users` was announced by at least one change (which kinds depends on the order
    /// Calendly's deliveries happened to arrive in: a no-show processed before its booking is one
    /// `invitee.created`). Returns a summary line.
    pub async fn stop(self, pool: &sqlx::PgPool, users: &[Uuid], kinds: &[&str]) -> anyhow::Result<String> {
        self.stop.cancel();
        let seen = self.reader.await.context("the feed reader")??;
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for change in &seen {
            *counts.entry(change["kind"].as_str().unwrap_or("?")).or_default() += 1;
        }
        let missing: Vec<&&str> = kinds.iter().filter(|k| !counts.contains_key(**k)).collect();
        if !missing.is_empty() {
            bail!("the app was never told: {missing:?} (it got {counts:?})");
        }
        let announced: HashSet<&str> =
            seen.iter().flat_map(|c| [c["meeting_id"].as_str(), c["invitee_id"].as_str()]).flatten().collect();
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT m.id::text FROM meetings m WHERE m.user_id = ANY($1) \
             UNION ALL SELECT i.id::text FROM meeting_invitees i JOIN meetings m ON m.id = i.meeting_id \
             WHERE m.user_id = ANY($1)",
        )
        .bind(users)
        .fetch_all(pool)
        .await?;
        let unannounced = rows.iter().filter(|(id,)| !announced.contains(id.as_str())).count();
        if unannounced > 0 {
            bail!("{unannounced} of {} meeting and invitee rows were never announced in the feed", rows.len());
        }
        let counts: Vec<String> = counts.into_iter().map(|(k, n)| format!("{k} {n}")).collect();
        Ok(format!(
            "the app received {} changes through GET /changes, announcing all {} meeting and invitee rows: {}",
            seen.len(),
            rows.len(),
            counts.join(", ")
        ))
    }
}
