//! The demo's story, driven through real interfaces only: two users connect through OAuth, then
//! meetings are booked, canceled, rescheduled and marked no-show at the simulator, which delivers
//! signed webhooks to ingest. Returns what the database should end up holding.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::stack::{Stack, send_patiently};

#[derive(Debug, Clone)]
pub struct DemoUser {
    pub name: String,
    pub email: String,
    pub app_user: Uuid,
    pub calendly_uri: String,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub users: Vec<DemoUser>,
    /// Per app user: event URI → meeting status we expect.
    pub expected: BTreeMap<Uuid, BTreeMap<String, String>>,
    /// Invitees we expect flagged no-show.
    pub no_shows: Vec<String>,
}

async fn json_ok(response: reqwest::Response, what: &str) -> anyhow::Result<Value> {
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        bail!("{what}: {status} {body}");
    }
    Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
}

impl Stack {
    pub async fn sim_post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let response = self.http.post(format!("{}{path}", self.endpoints.sim_url)).json(&body).send().await?;
        json_ok(response, path).await
    }

    /// The whole journey: ask ingest for the authorize URL, "click Approve" at Calendly, follow the
    /// redirect back to ingest's callback, then play the app: confirm the consent for the app user
    /// this browser is logged in as (the two-phase connect).
    pub async fn connect(&self, user: &DemoUser) -> anyhow::Result<()> {
        let e = &self.endpoints;
        let begin = send_patiently(
            self.http
                .post(format!("{}/connections/calendly", e.ingest_url))
                .bearer_auth(&e.api_token)
                .json(&json!({ "user_id": user.app_user })),
        )
        .await?;
        let authorize = json_ok(begin, "POST /connections/calendly").await?;
        let mut url = url::Url::parse(authorize["authorize_url"].as_str().context("authorize_url")?)?;
        // By URI, not email: on a stack that ran the demo before, an older simulated user has the
        // same email (and is connected to another app user).
        url.query_pairs_mut().append_pair("sim_user", &user.calendly_uri);
        let consent = self.http.get(url).send().await?;
        let back =
            consent.headers().get("location").context("Calendly redirects back to calsync")?.to_str()?.to_owned();
        let callback = self.http.get(&back).send().await?;
        let status = callback.status();
        if status == reqwest::StatusCode::BAD_GATEWAY || status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return Err(CalendlyUnavailable(format!("{status}: {}", callback.text().await?)).into());
        }
        if !status.is_success() && !status.is_redirection() {
            bail!("OAuth callback answered {status}: {}", callback.text().await?);
        }
        let connect_id = connect_id_of(callback).await?;
        let confirm = send_patiently(
            self.http
                .post(format!("{}/connections/calendly/{}/confirm", e.ingest_url, user.app_user))
                .bearer_auth(&e.api_token)
                .json(&json!({ "connect_id": connect_id })),
        )
        .await?;
        json_ok(confirm, "POST /connections/calendly/{user_id}/confirm").await?;
        let status = send_patiently(
            self.http.get(format!("{}/connections/calendly/{}", e.ingest_url, user.app_user)).bearer_auth(&e.api_token),
        )
        .await?;
        let status = json_ok(status, "GET /connections/calendly").await?;
        if status["status"] != "active" {
            bail!("{} is not connected: {status}", user.name);
        }
        Ok(())
    }

    pub async fn book(
        &self,
        user: &DemoUser,
        name: &str,
        start: OffsetDateTime,
        guests: &[&str],
    ) -> anyhow::Result<Value> {
        let invitees: Vec<Value> = guests
            .iter()
            .map(|g| json!({ "name": g, "email": format!("{}@example.com", g.to_lowercase().replace(' ', ".")) }))
            .collect();
        let start = start.format(&time::format_description::well_known::Rfc3339)?;
        self.sim_post("/_sim/events", json!({ "user": user.calendly_uri, "name": name, "start_time": start, "duration_minutes": 30, "invitees": invitees })).await
    }
}

/// The callback's answer when ingest could not reach Calendly to finish the connect (nothing was
/// stored): a user would start the connection again, and so does the demo.
#[derive(Debug)]
pub struct CalendlyUnavailable(String);

impl std::fmt::Display for CalendlyUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OAuth callback answered {}", self.0)
    }
}

impl std::error::Error for CalendlyUnavailable {}

/// Connects `user`, starting again for up to two minutes while the callback cannot reach Calendly.
async fn connect_retrying(stack: &Stack, user: &DemoUser, progress: &dyn Fn(&str)) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    loop {
        match stack.connect(user).await {
            Err(error)
                if started.elapsed() < Duration::from_secs(120)
                    && error.downcast_ref::<CalendlyUnavailable>().is_some() =>
            {
                progress(&format!(
                    "{}'s connect could not reach Calendly ({:.0} s after the first try): starting it again",
                    user.name,
                    started.elapsed().as_secs_f64()
                ));
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            other => return other,
        }
    }
}

/// The one-time connect id the callback hands to the app: in the redirect to `CONNECT_RETURN_URL`,
/// or on the result page when none is configured.
async fn connect_id_of(callback: reqwest::Response) -> anyhow::Result<String> {
    if let Some(location) = callback.headers().get("location") {
        let location = url::Url::parse(location.to_str()?)?;
        let id = location.query_pairs().find(|(k, _)| k == "connect_id").context("connect_id in the redirect")?;
        return Ok(id.1.into_owned());
    }
    let page = callback.text().await?;
    let marker = "data-connect-id=\"";
    let start = page.find(marker).context("connect id on the callback page")? + marker.len();
    let len = page[start..].find('"').context("end of the connect id")?;
    Ok(page[start..start + len].to_owned())
}

fn id_of(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap_or_default()
}

/// Runs the story; `progress` receives one line per step.
pub async fn run(stack: &Stack, progress: &dyn Fn(&str)) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    for name in ["Ada", "Bob"] {
        let email = format!("{}@example.com", name.to_lowercase());
        let created =
            stack.sim_post("/_sim/users", json!({ "name": format!("{name} Lovelace"), "email": email })).await?;
        let user = DemoUser {
            name: name.into(),
            email,
            app_user: Uuid::new_v4(),
            calendly_uri: created["uri"].as_str().context("user uri")?.to_owned(),
        };
        connect_retrying(stack, &user, progress).await?;
        progress(&format!(
            "{name} connected Calendly through OAuth (consent screen, PKCE; confirmed by the app) as app user {}",
            user.app_user
        ));
        outcome.expected.insert(user.app_user, BTreeMap::new());
        outcome.users.push(user);
    }
    let (ada, bob) = (outcome.users[0].clone(), outcome.users[1].clone());
    let base = OffsetDateTime::now_utc().replace_nanosecond(0)? + time::Duration::days(1);
    let at = |hours: i64| base + time::Duration::hours(hours);

    let intro = stack.book(&ada, "Intro call", at(0), &["Grace Hopper"]).await?;
    let team = stack.book(&ada, "Team sync", at(2), &["Alan Turing", "Edsger Dijkstra", "Barbara Liskov"]).await?;
    let review = stack.book(&ada, "Design review", at(4), &["Ken Thompson"]).await?;
    let coffee = stack.book(&bob, "Coffee chat", at(1), &["Margaret Hamilton"]).await?;
    let planning = stack.book(&bob, "Quarterly planning", at(3), &["Donald Knuth"]).await?;
    progress("booked 5 meetings (one a group event with 3 invitees)");

    let review_invitee = review["invitees"][0]["uri"].as_str().context("invitee")?;
    stack
        .sim_post(
            &format!("/_sim/invitees/{}/cancel", id_of(review_invitee)),
            json!({ "reason": "Conflicts with an offsite", "canceled_by": "Ada", "canceler_type": "host" }),
        )
        .await?;
    progress("Ada canceled \"Design review\"");
    let coffee_invitee = coffee["invitees"][0]["uri"].as_str().context("invitee")?;
    let moved = stack
        .sim_post(
            &format!("/_sim/invitees/{}/reschedule", id_of(coffee_invitee)),
            json!({ "start_time": (at(6)).format(&time::format_description::well_known::Rfc3339)? }),
        )
        .await?;
    progress("Margaret rescheduled \"Coffee chat\" (a cancel plus a new event, linked both ways)");
    let intro_invitee = intro["invitees"][0]["uri"].as_str().context("invitee")?;
    stack.sim_post(&format!("/_sim/invitees/{}/no_show", id_of(intro_invitee)), json!({})).await?;
    progress("Grace was marked as a no-show for \"Intro call\"");

    let event = |v: &Value| v["event"]["uri"].as_str().unwrap_or_default().to_owned();
    let ada_expected = outcome.expected.get_mut(&ada.app_user).expect("inserted");
    ada_expected.insert(event(&intro), "active".into());
    ada_expected.insert(event(&team), "active".into());
    ada_expected.insert(event(&review), "canceled".into());
    let bob_expected = outcome.expected.get_mut(&bob.app_user).expect("inserted");
    bob_expected.insert(event(&coffee), "canceled".into());
    bob_expected.insert(moved["new_invitee"]["event"].as_str().unwrap_or_default().to_owned(), "active".into());
    bob_expected.insert(event(&planning), "active".into());
    outcome.no_shows.push(intro_invitee.to_owned());
    Ok(outcome)
}

/// What webhooks alone would miss: Calendly silently disables Ada's subscription (as after 24 hours
/// of failed deliveries) and she gets booked meanwhile; one of Bob's bookings has its webhook lost on
/// the way. The workers' subscription check and reconciliation must bring both in, with no webhook.
pub async fn drift(stack: &Stack, outcome: &mut Outcome, progress: &dyn Fn(&str)) -> anyhow::Result<()> {
    let (ada, bob) = (outcome.users[0].clone(), outcome.users[1].clone());
    let subscriptions = stack.http.get(format!("{}/_sim/subscriptions", stack.endpoints.sim_url)).send().await?;
    let subscriptions = json_ok(subscriptions, "GET /_sim/subscriptions").await?;
    let ada_subscription = subscriptions
        .as_array()
        .and_then(|all| all.iter().find(|s| s["user"] == ada.calendly_uri.as_str()))
        .and_then(|s| s["uri"].as_str())
        .context("Ada's subscription")?
        .to_owned();
    let disable = stack
        .http
        .put(format!("{}/_sim/subscriptions/{}", stack.endpoints.sim_url, id_of(&ada_subscription)))
        .json(&json!({ "disabled": true }))
        .send()
        .await?;
    json_ok(disable, "PUT /_sim/subscriptions/{id}").await?;
    progress("Calendly silently disabled Ada's webhook subscription (as after 24 h of failed deliveries)");
    let start = OffsetDateTime::now_utc().replace_nanosecond(0)? + time::Duration::days(2);
    let unseen = stack.book(&ada, "Missed booking", start, &["Frances Allen"]).await?;
    progress("Frances booked Ada while the subscription was disabled: no webhook is sent");
    let lost = stack
        .sim_post(
            "/_sim/events",
            json!({ "user": bob.calendly_uri, "name": "Lost webhook", "invitees": [{ "name": "John Backus", "email": "john.backus@example.com" }], "webhook_lost": true }),
        )
        .await?;
    progress("John booked Bob, and that webhook was lost on the way");
    let event = |v: &Value| v["event"]["uri"].as_str().unwrap_or_default().to_owned();
    outcome.expected.get_mut(&ada.app_user).context("Ada")?.insert(event(&unseen), "active".into());
    outcome.expected.get_mut(&bob.app_user).context("Bob")?.insert(event(&lost), "active".into());
    Ok(())
}

/// Ada's subscription as calsync holds it now: it must be a new one, and active.
pub async fn replaced_subscription(stack: &Stack, outcome: &Outcome) -> anyhow::Result<String> {
    let ada = &outcome.users[0];
    let (uri, state): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT webhook_subscription_uri, subscription_state FROM calendar_connections WHERE user_id = $1",
    )
    .bind(ada.app_user)
    .fetch_one(&stack.pool()?)
    .await?;
    match (uri, state.as_deref()) {
        (Some(uri), Some("active")) => Ok(uri),
        other => bail!("Ada's subscription was not replaced: {other:?}"),
    }
}

/// Waits until the database holds exactly the expected meetings for every user.
pub async fn wait_for_rows(stack: &Stack, outcome: &Outcome, deadline: Duration) -> anyhow::Result<()> {
    let pool = stack.pool()?;
    let started = std::time::Instant::now();
    loop {
        let rows: Vec<(Uuid, String, String)> =
            sqlx::query_as("SELECT user_id, calendly_event_uri, status FROM meetings").fetch_all(&pool).await?;
        let mut actual: BTreeMap<Uuid, BTreeMap<String, String>> =
            outcome.expected.keys().map(|k| (*k, BTreeMap::new())).collect();
        // Only this run's users: an attached stack may hold other data.
        for (user, uri, status) in rows {
            if let Some(meetings) = actual.get_mut(&user) {
                meetings.insert(uri, status);
            }
        }
        let no_shows: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM meeting_invitees WHERE no_show AND calendly_invitee_uri = ANY($1)",
        )
        .bind(&outcome.no_shows)
        .fetch_one(&pool)
        .await?;
        if actual == outcome.expected && no_shows as usize == outcome.no_shows.len() {
            return Ok(());
        }
        if started.elapsed() > deadline {
            bail!("after {deadline:?} the database holds {actual:?}, expected {:?}", outcome.expected);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
