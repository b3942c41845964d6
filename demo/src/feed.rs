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
    reader: JoinHandle<anyhow::Result<(Reader, Vec<Value>)>>,
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

/// The app's side of `GET /changes`: where it has read up to.
struct Reader {
    http: reqwest::Client,
    ingest_url: String,
    api_token: String,
    cursor: Option<String>,
}

impl Reader {
    /// The next page after the cursor (the cursor moves on).
    async fn next_page(&mut self) -> anyhow::Result<Vec<Value>> {
        let mut url = url::Url::parse(&format!("{}/changes", self.ingest_url))?;
        url.query_pairs_mut().append_pair("limit", "1000");
        if let Some(after) = &self.cursor {
            url.query_pairs_mut().append_pair("after", after);
        }
        let response = send_patiently(self.http.get(url).bearer_auth(&self.api_token)).await?;
        let status = response.status();
        let body: Value = response.json().await.context("GET /changes answers JSON")?;
        if !status.is_success() {
            bail!("GET /changes: {status} {body}");
        }
        self.cursor = Some(body["next_cursor"].as_str().context("next_cursor")?.to_owned());
        Ok(body["changes"].as_array().cloned().unwrap_or_default())
    }

    /// Reads one page and prints each change as the app receives it.
    async fn read_into(&mut self, seen: &mut Vec<Value>) -> anyhow::Result<()> {
        for change in self.next_page().await? {
            println!("{}", line(&change));
            seen.push(change);
        }
        Ok(())
    }
}

/// How long [`AppFeed::stop`] keeps reading for changes still on their way: a change is numbered
/// in the feed shortly after its transaction commits, so the rows can be in PostgreSQL a moment
/// before the app is told about them.
const SETTLE: Duration = Duration::from_secs(60);

impl AppFeed {
    /// Starts reading from the feed's current end (a stack that ran the demo before has older
    /// changes: they are not this run's story).
    pub async fn follow(stack: &Stack) -> anyhow::Result<Self> {
        let mut reader = Reader {
            http: stack.http.clone(),
            ingest_url: stack.endpoints.ingest_url.clone(),
            api_token: stack.endpoints.api_token.clone(),
            cursor: None,
        };
        while !reader.next_page().await?.is_empty() {}
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                reader.read_into(&mut seen).await?;
                tokio::select! {
                    _ = stopped.cancelled() => return Ok((reader, seen)),
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
        });
        Ok(Self { stop, reader })
    }

    /// Stops the background reader, then goes on reading until what an app needs has arrived or
    /// [`SETTLE`] has passed: each of `kinds`, and a change announcing every meeting and invitee
    /// row of `users` (which kinds depends on the order Calendly's deliveries happened to arrive
    /// in: a no-show processed before its booking is one `invitee.created`). Returns a summary line.
    pub async fn stop(self, pool: &sqlx::PgPool, users: &[Uuid], kinds: &[&str]) -> anyhow::Result<String> {
        self.stop.cancel();
        let (mut reader, mut seen) = self.reader.await.context("the feed reader")??;
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT m.id::text FROM meetings m WHERE m.user_id = ANY($1) \
             UNION ALL SELECT i.id::text FROM meeting_invitees i JOIN meetings m ON m.id = i.meeting_id \
             WHERE m.user_id = ANY($1)",
        )
        .bind(users)
        .fetch_all(pool)
        .await?;
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for change in &seen {
                *counts.entry(change["kind"].as_str().unwrap_or("?")).or_default() += 1;
            }
            let missing: Vec<&&str> = kinds.iter().filter(|k| !counts.contains_key(**k)).collect();
            let announced: HashSet<&str> =
                seen.iter().flat_map(|c| [c["meeting_id"].as_str(), c["invitee_id"].as_str()]).flatten().collect();
            let unannounced = rows.iter().filter(|(id,)| !announced.contains(id.as_str())).count();
            if missing.is_empty() && unannounced == 0 {
                let counts: Vec<String> = counts.into_iter().map(|(k, n)| format!("{k} {n}")).collect();
                return Ok(format!(
                    "the app received {} changes through GET /changes, announcing all {} meeting and invitee rows: {}",
                    seen.len(),
                    rows.len(),
                    counts.join(", ")
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                if !missing.is_empty() {
                    bail!("the app was never told: {missing:?} (it got {counts:?})");
                }
                bail!(
                    "{unannounced} of {} meeting and invitee rows were not announced in the feed within {}s",
                    rows.len(),
                    SETTLE.as_secs()
                );
            }
            tokio::time::sleep(POLL).await;
            reader.read_into(&mut seen).await?;
        }
    }
}
