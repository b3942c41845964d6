//! The simulator's shared state and every operation on it. HTTP routes (Calendly's API, OAuth,
//! and the `/_sim` control API) are thin layers over these methods, which tests can also call
//! directly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::*;
use crate::webhook::{ALL_EVENTS, Captured, DeliveryMode};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub client_id: String,
    pub client_secret: String,
    /// The OAuth app's webhook signing key (one per app, as at Calendly).
    pub signing_key: String,
    pub access_token_ttl: Duration,
    /// How long an authorization code can be exchanged (10 minutes at Calendly).
    pub auth_code_ttl: Duration,
    pub rate_limit_per_minute: u32,
    /// First delay between delivery retries; doubles each time (Calendly: exponential, for 24 h).
    pub delivery_retry_base: Duration,
    /// After retrying this long the subscription becomes `disabled`.
    pub delivery_retry_window: Duration,
    /// Base of every URI the simulator hands out; `None` = `http://<bound address>`.
    pub public_url: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            client_id: "sim-client-id".into(),
            client_secret: "sim-client-secret".into(),
            signing_key: "sim-webhook-signing-key".into(),
            access_token_ttl: Duration::from_secs(7200),
            auth_code_ttl: Duration::from_secs(600),
            rate_limit_per_minute: 500,
            delivery_retry_base: Duration::from_secs(1),
            delivery_retry_window: Duration::from_secs(24 * 3600),
            public_url: None,
        }
    }
}

/// Injected failures, adjustable at run time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Added to every API and OAuth answer.
    pub latency_ms: u64,
    /// Fraction (0..1) of API calls answered with a 5xx.
    pub error_rate: f64,
    /// Fraction (0..1) of API calls answered with a 429.
    pub rate_429: f64,
    /// Overrides every user's limit per window when set.
    pub rate_limit_per_minute: Option<u32>,
    /// Overrides the window's length (60 s at Calendly), so tests can watch windows reset.
    pub rate_limit_window_secs: Option<u64>,
    /// Faults of the tokens and the token endpoint.
    pub token: TokenFaults,
    /// Added to the named endpoints only (`revoke`, `delete_subscription`, `get_event`, ...): one
    /// slow call while the rest of Calendly is quick.
    pub endpoint_latency_ms: std::collections::BTreeMap<String, u64>,
}

/// Injected failures of the tokens and of `POST /oauth/token`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenFaults {
    /// Scopes the users' tokens lack (e.g. `scheduled_events:read`): an endpoint that needs one
    /// answers `403 {"title": "Insufficient scope", "required_scopes": [...]}`.
    pub missing_scopes: Vec<String>,
    /// Added to token answers only (a slow refresh for one user while the API is quick).
    pub latency_ms: u64,
    /// Reported as `expires_in` when set (the real lifetime is unchanged): a broken answer such as
    /// an absurdly long lifetime.
    pub expires_in: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FailNext {
    pub endpoint: String,
    pub count: u32,
    #[serde(default = "default_fail_status")]
    pub status: u16,
}

fn default_fail_status() -> u16 {
    503
}

#[derive(Debug, Default)]
pub struct Counters {
    pub calls: HashMap<String, u64>,
    pub token_grants: HashMap<String, u64>,
    pub refresh_token_reuse_attempts: u64,
    pub revocations: u64,
    pub deliveries_succeeded: u64,
    pub delivery_attempts_failed: u64,
    /// API calls answered 429 because the caller's window was spent (injected 429s not counted).
    pub rate_limited: u64,
    /// Token requests answered 429 because the user's token window was spent.
    pub token_rate_limited: u64,
}

pub(crate) struct Inner {
    pub config: SimConfig,
    pub uris: Uris,
    pub world: Mutex<World>,
    pub counters: Mutex<Counters>,
    pub faults: Mutex<Faults>,
    pub fail_next: Mutex<HashMap<String, (u32, u16)>>,
    pub rate: Mutex<HashMap<Uuid, (Instant, u32)>>,
    /// Token-endpoint windows, per user.
    pub token_rate: Mutex<HashMap<Uuid, (Instant, u32)>>,
    pub authorize_log: Mutex<Vec<Value>>,
    pub delivery_mode: Mutex<DeliveryMode>,
    pub captured: Mutex<Vec<Captured>>,
    pub http: reqwest::Client,
}

/// Handle to one simulated Calendly. Cheap to clone.
#[derive(Clone)]
pub struct Sim {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NewUser {
    pub name: String,
    pub email: String,
    /// Join an existing organization (URI or UUID); a new one is made otherwise.
    #[serde(default)]
    pub organization: Option<String>,
    /// Whether the plan has the (few) webhook features that still need a paid plan: creating a
    /// subscription answers 403 without them.
    #[serde(default = "yes")]
    pub webhooks_enabled: bool,
    /// `free`: 50 API requests a minute (webhooks included since November 2026); `paid`: 500.
    #[serde(default)]
    pub plan: Plan,
}

fn yes() -> bool {
    true
}

impl NewUser {
    /// `name <name@example.com>` in an organization of their own, on a plan with webhooks.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.into(),
            email: format!("{}@example.com", name.to_lowercase()),
            organization: None,
            webhooks_enabled: true,
            plan: Plan::Paid,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct NewInvitee {
    pub name: String,
    pub email: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Booking {
    /// Host: user URI or UUID.
    pub user: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub start_time: Option<OffsetDateTime>,
    #[serde(default)]
    pub duration_minutes: Option<i64>,
    pub invitees: Vec<NewInvitee>,
    #[serde(default)]
    pub location: Option<Value>,
    /// Further hosts (user URIs or UUIDs) of a collective event.
    #[serde(default)]
    pub co_hosts: Vec<String>,
    /// The booking happens, but its webhooks are lost before they reach anyone (as deliveries
    /// sometimes are): only a reconciliation can find it.
    #[serde(default)]
    pub webhook_lost: bool,
}

/// `PUT /_sim/subscriptions/{id}`: what Calendly changes about a subscription on its own.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SubscriptionChange {
    /// `true`: `disabled` (Calendly gave up on it); `false`: `active` again.
    pub disabled: Option<bool>,
    /// `Some(None)` clears it (JSON `null`); absent leaves it.
    #[serde(deserialize_with = "some_rfc3339")]
    pub retry_started_at: Option<Option<OffsetDateTime>>,
    pub deleted: bool,
}

fn some_rfc3339<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<OffsetDateTime>>, D::Error> {
    time::serde::rfc3339::option::deserialize(d).map(Some)
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Cancellation {
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub canceled_by: Option<String>,
    /// `host` or `invitee`.
    #[serde(default)]
    pub canceler_type: Option<String>,
}

#[derive(Debug)]
pub enum SimError {
    NotFound(String),
    BadRequest(String),
}

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(m) | Self::BadRequest(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for SimError {}

pub(crate) fn random_token() -> String {
    hex::encode(rand::random::<[u8; 24]>())
}

impl Sim {
    /// A fresh access/refresh pair for `user`, as the token endpoint answers it.
    pub(crate) fn issue_tokens(&self, user: Uuid) -> serde_json::Value {
        let now = OffsetDateTime::now_utc();
        let ttl = self.config().access_token_ttl;
        let expires_in = self.faults().token.expires_in.unwrap_or(ttl.as_secs() as i64);
        let (access, refresh) = (random_token(), random_token());
        let mut world = self.world();
        world.access_tokens.insert(access.clone(), AccessToken { user, expires_at: now + ttl, revoked: false });
        world.refresh_tokens.insert(refresh.clone(), RefreshToken { user, used: false, revoked: false });
        let organization = world.users[&user].organization;
        json!({
            "token_type": "Bearer",
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": expires_in,
            "created_at": now.unix_timestamp(),
            "scope": "default",
            "owner": self.uris().user(user),
            "organization": self.uris().organization(organization),
        })
    }

    pub fn new(config: SimConfig, public_url: String) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("http client");
        let api = config.public_url.clone().unwrap_or(public_url);
        let faults = Faults { rate_limit_per_minute: Some(config.rate_limit_per_minute), ..Faults::default() };
        Self {
            inner: Arc::new(Inner {
                config,
                uris: Uris { api: api.trim_end_matches('/').to_owned() },
                world: Mutex::default(),
                counters: Mutex::default(),
                faults: Mutex::new(faults),
                fail_next: Mutex::default(),
                rate: Mutex::default(),
                token_rate: Mutex::default(),
                authorize_log: Mutex::default(),
                delivery_mode: Mutex::new(DeliveryMode::Send),
                captured: Mutex::default(),
                http,
            }),
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    pub fn uris(&self) -> &Uris {
        &self.inner.uris
    }

    pub(crate) fn world(&self) -> MutexGuard<'_, World> {
        self.inner.world.lock().expect("sim world lock")
    }

    pub(crate) fn counters(&self) -> MutexGuard<'_, Counters> {
        self.inner.counters.lock().expect("sim counters lock")
    }

    fn resolve_user(world: &World, user: &str) -> Result<Uuid, SimError> {
        let id = Uris::id_of(user)
            .or_else(|| user.parse().ok())
            .ok_or_else(|| SimError::BadRequest(format!("bad user {user}")))?;
        world.users.contains_key(&id).then_some(id).ok_or_else(|| SimError::NotFound(format!("no user {user}")))
    }

    // ----- control operations -----

    pub fn create_user(&self, new: NewUser) -> Result<Value, SimError> {
        let mut world = self.world();
        let organization = match &new.organization {
            Some(org) => Uris::id_of(org)
                .or_else(|| org.parse().ok())
                .ok_or_else(|| SimError::BadRequest("bad organization".into()))?,
            None => Uuid::new_v4(),
        };
        let user = User {
            id: Uuid::new_v4(),
            name: new.name,
            email: new.email,
            organization,
            timezone: "Europe/Berlin".into(),
            webhooks_enabled: new.webhooks_enabled,
            plan: new.plan,
            created_at: OffsetDateTime::now_utc(),
        };
        let value = world.user_json(&self.inner.uris, &user);
        world.users.insert(user.id, user);
        Ok(value)
    }

    /// Books an event with its invitees; each invitee is delivered as `invitee.created`.
    pub fn book(&self, booking: Booking) -> Result<Value, SimError> {
        let now = OffsetDateTime::now_utc();
        let (value, deliveries, hosts) = {
            let mut world = self.world();
            let host = Self::resolve_user(&world, &booking.user)?;
            let co_hosts =
                booking.co_hosts.iter().map(|u| Self::resolve_user(&world, u)).collect::<Result<Vec<_>, _>>()?;
            if booking.invitees.is_empty() {
                return Err(SimError::BadRequest("a booking needs at least one invitee".into()));
            }
            let start = booking.start_time.unwrap_or(now + time::Duration::days(1));
            let event = Event {
                id: Uuid::new_v4(),
                host,
                co_hosts,
                name: booking.name.unwrap_or_else(|| "30 Minute Meeting".into()),
                status: "active",
                start_time: start,
                end_time: start + time::Duration::minutes(booking.duration_minutes.unwrap_or(30)),
                event_type: format!("{}/event_types/{}", self.inner.uris.api, Uuid::new_v4()),
                location: booking.location.unwrap_or_else(
                    || json!({"type": "zoom_conference", "status": "pushed", "join_url": "https://zoom.us/j/123"}),
                ),
                invitee_limit: booking.invitees.len().max(1) as u32,
                cancellation: None,
                created_at: now,
                updated_at: now,
            };
            let event_id = event.id;
            world.events.insert(event.id, event);
            let mut ids = Vec::new();
            for new in booking.invitees {
                let invitee = Invitee {
                    id: Uuid::new_v4(),
                    event: event_id,
                    name: new.name,
                    email: new.email,
                    status: "active",
                    rescheduled: false,
                    old_invitee: None,
                    new_invitee: None,
                    no_show: None,
                    cancellation: None,
                    created_at: now,
                    updated_at: now,
                };
                ids.push(invitee.id);
                world.add_invitee(invitee);
            }
            let uris = &self.inner.uris;
            let invitees: Vec<Value> =
                ids.iter().map(|id| world.invitee_json(uris, &world.invitees[id], false)).collect();
            let value = json!({ "event": world.event_json(uris, &world.events[&event_id]), "invitees": invitees });
            let deliveries: Vec<_> =
                ids.iter().map(|id| ("invitee.created", world.invitee_json(uris, &world.invitees[id], true))).collect();
            (value, deliveries, world.events[&event_id].hosts())
        };
        if !booking.webhook_lost {
            for (event, payload) in deliveries {
                self.deliver(event, &hosts, payload);
            }
        }
        Ok(value)
    }

    fn cancel_locked(
        world: &mut World,
        id: Uuid,
        cancel: &Cancellation,
        now: OffsetDateTime,
    ) -> Result<Vec<Uuid>, SimError> {
        let invitee = world.invitees.get_mut(&id).ok_or_else(|| SimError::NotFound(format!("no invitee {id}")))?;
        if invitee.status == "canceled" {
            return Err(SimError::BadRequest("invitee already canceled".into()));
        }
        let canceler_type = cancel.canceler_type.clone().unwrap_or_else(|| "invitee".into());
        invitee.status = "canceled";
        invitee.updated_at = now;
        invitee.cancellation = Some(json!({
            "canceled_by": cancel.canceled_by.clone().unwrap_or_else(|| invitee.name.clone()),
            "reason": cancel.reason,
            "canceler_type": canceler_type,
            "created_at": ts(now),
        }));
        let event_id = invitee.event;
        let cancellation = invitee.cancellation.clone();
        let any_active = world.invitees_of(event_id).any(|i| i.status == "active");
        let event = world.events.get_mut(&event_id).expect("invitee's event exists");
        if !any_active {
            event.status = "canceled";
            event.cancellation = cancellation;
        }
        event.updated_at = now;
        Ok(event.hosts())
    }

    /// Cancels an invitee (and its event once no invitee is left): `invitee.canceled`.
    pub fn cancel(&self, invitee: Uuid, cancel: Cancellation) -> Result<Value, SimError> {
        let now = OffsetDateTime::now_utc();
        let (hosts, payload) = {
            let mut world = self.world();
            let hosts = Self::cancel_locked(&mut world, invitee, &cancel, now)?;
            (hosts, world.invitee_json(&self.inner.uris, &world.invitees[&invitee], true))
        };
        self.deliver("invitee.canceled", &hosts, payload.clone());
        Ok(payload)
    }

    /// Calendly's reschedule: the old invitee is canceled with `rescheduled: true` and
    /// `new_invitee`, and a new invitee on a **new** event carries `old_invitee`. Delivered as
    /// `invitee.canceled` then `invitee.created`.
    pub fn reschedule(&self, invitee: Uuid, new_start: Option<OffsetDateTime>) -> Result<Value, SimError> {
        let now = OffsetDateTime::now_utc();
        let (hosts, canceled, created, value) = {
            let mut world = self.world();
            let old = world
                .invitees
                .get(&invitee)
                .cloned()
                .ok_or_else(|| SimError::NotFound(format!("no invitee {invitee}")))?;
            let old_event = world.events[&old.event].clone();
            let start = new_start.unwrap_or(old_event.start_time + time::Duration::days(1));
            let new_event = Event {
                id: Uuid::new_v4(),
                start_time: start,
                end_time: start + (old_event.end_time - old_event.start_time),
                status: "active",
                cancellation: None,
                invitee_limit: 1,
                created_at: now,
                updated_at: now,
                ..old_event.clone()
            };
            let uris = &self.inner.uris;
            let new_invitee = Invitee {
                id: Uuid::new_v4(),
                event: new_event.id,
                status: "active",
                rescheduled: false,
                old_invitee: Some(uris.invitee(old.event, old.id)),
                new_invitee: None,
                no_show: None,
                cancellation: None,
                created_at: now,
                updated_at: now,
                ..old.clone()
            };
            let cancel = Cancellation {
                reason: Some("Rescheduled".into()),
                canceled_by: Some(old.name.clone()),
                canceler_type: Some("invitee".into()),
            };
            let hosts = Self::cancel_locked(&mut world, invitee, &cancel, now)?;
            let o = world.invitees.get_mut(&invitee).expect("just canceled");
            o.rescheduled = true;
            o.new_invitee = Some(uris.invitee(new_event.id, new_invitee.id));
            let new_id = new_invitee.id;
            world.events.insert(new_event.id, new_event);
            world.add_invitee(new_invitee);
            let canceled = world.invitee_json(uris, &world.invitees[&invitee], true);
            let created = world.invitee_json(uris, &world.invitees[&new_id], true);
            let value = json!({ "old_invitee": canceled.clone(), "new_invitee": created.clone() });
            (hosts, canceled, created, value)
        };
        self.deliver("invitee.canceled", &hosts, canceled);
        self.deliver("invitee.created", &hosts, created);
        Ok(value)
    }

    /// Marks (`true`) or unmarks an invitee as a no-show: `invitee_no_show.created` / `.deleted`.
    pub fn set_no_show(&self, invitee: Uuid, no_show: bool) -> Result<Value, SimError> {
        let now = OffsetDateTime::now_utc();
        let (hosts, payload) = {
            let mut world = self.world();
            let inv =
                world.invitees.get_mut(&invitee).ok_or_else(|| SimError::NotFound(format!("no invitee {invitee}")))?;
            inv.no_show = no_show.then(|| json!({ "uri": format!("{}/invitee_no_shows/{}", self.inner.uris.api, Uuid::new_v4()), "created_at": ts(now) }));
            inv.updated_at = now;
            let event = inv.event;
            let hosts = world.events[&event].hosts();
            (hosts, world.invitee_json(&self.inner.uris, &world.invitees[&invitee], true))
        };
        let event = if no_show { "invitee_no_show.created" } else { "invitee_no_show.deleted" };
        self.deliver(event, &hosts, payload.clone());
        Ok(payload)
    }

    /// Issues a token pair for `user` as a completed OAuth flow would (tests and tools that do not
    /// need the browser dance). Not counted as a token-endpoint grant.
    pub fn grant_tokens(&self, user: &str) -> Result<Value, SimError> {
        let id = Self::resolve_user(&self.world(), user)?;
        Ok(self.issue_tokens(id))
    }

    /// Makes every access token of `user` expired (refresh tokens stay valid).
    pub fn expire_tokens(&self, user: &str) -> Result<u32, SimError> {
        let mut world = self.world();
        let id = Self::resolve_user(&world, user)?;
        let past = OffsetDateTime::now_utc() - time::Duration::seconds(1);
        let mut n = 0;
        for token in world.access_tokens.values_mut().filter(|t| t.user == id) {
            token.expires_at = past;
            n += 1;
        }
        Ok(n)
    }

    /// Revokes every access and refresh token of `user` (as a user removing the app would).
    pub fn revoke_tokens(&self, user: &str) -> Result<u32, SimError> {
        let mut world = self.world();
        let id = Self::resolve_user(&world, user)?;
        let mut n = 0;
        for token in world.access_tokens.values_mut().filter(|t| t.user == id) {
            token.revoked = true;
            n += 1;
        }
        for token in world.refresh_tokens.values_mut().filter(|t| t.user == id) {
            token.revoked = true;
            n += 1;
        }
        Ok(n)
    }

    pub fn counters_json(&self) -> Value {
        let c = self.counters();
        json!({
            "calls": c.calls,
            "token_grants": c.token_grants,
            "refresh_token_reuse_attempts": c.refresh_token_reuse_attempts,
            "revocations": c.revocations,
            "deliveries_succeeded": c.deliveries_succeeded,
            "delivery_attempts_failed": c.delivery_attempts_failed,
            "rate_limited": c.rate_limited,
            "token_rate_limited": c.token_rate_limited,
        })
    }

    pub fn calls(&self, endpoint: &str) -> u64 {
        self.counters().calls.get(endpoint).copied().unwrap_or(0)
    }

    pub fn token_grants(&self, grant_type: &str) -> u64 {
        self.counters().token_grants.get(grant_type).copied().unwrap_or(0)
    }

    /// API calls answered 429 because the caller's window was spent.
    pub fn rate_limited(&self) -> u64 {
        self.counters().rate_limited
    }

    /// Token requests answered 429 because the user's token window was spent.
    pub fn token_rate_limited(&self) -> u64 {
        self.counters().token_rate_limited
    }

    pub fn refresh_token_reuse_attempts(&self) -> u64 {
        self.counters().refresh_token_reuse_attempts
    }

    pub fn set_faults(&self, faults: Faults) {
        // No override = each user's plan decides the limit.
        *self.inner.faults.lock().expect("faults lock") = faults;
    }

    pub fn faults(&self) -> Faults {
        self.inner.faults.lock().expect("faults lock").clone()
    }

    /// The next `count` calls to `endpoint` answer `status`.
    pub fn fail_next(&self, fail: FailNext) {
        self.inner.fail_next.lock().expect("fail_next lock").insert(fail.endpoint, (fail.count, fail.status));
    }

    pub fn authorize_requests(&self) -> Vec<Value> {
        self.inner.authorize_log.lock().expect("authorize log lock").clone()
    }

    pub fn set_delivery_mode(&self, mode: DeliveryMode) {
        *self.inner.delivery_mode.lock().expect("delivery mode lock") = mode;
    }

    /// Signed deliveries held back in `capture` mode, oldest first; the list is emptied.
    pub fn take_captured(&self) -> Vec<Captured> {
        std::mem::take(&mut *self.inner.captured.lock().expect("captured lock"))
    }

    /// All subscriptions in any state (a control view; the API filters by user and organization).
    pub fn subscriptions(&self) -> Vec<Value> {
        let world = self.world();
        world.subscriptions.values().map(|s| world.subscription_json(&self.inner.uris, s)).collect()
    }

    /// Creates a subscription directly (the load generator uses this instead of an OAuth flow).
    pub fn subscribe(&self, user: &str, callback_url: &str) -> Result<Value, SimError> {
        let mut world = self.world();
        let id = Self::resolve_user(&world, user)?;
        let sub = Subscription {
            id: Uuid::new_v4(),
            callback_url: callback_url.to_owned(),
            events: ALL_EVENTS.iter().map(|e| e.to_string()).collect(),
            scope: "user".into(),
            organization: world.users[&id].organization,
            user: Some(id),
            creator: id,
            state: "active",
            retry_started_at: None,
            created_at: OffsetDateTime::now_utc(),
        };
        let value = world.subscription_json(&self.inner.uris, &sub);
        world.subscriptions.insert(sub.id, sub);
        Ok(value)
    }

    /// Turns a subscription `disabled`, as Calendly does after 24 hours of failed deliveries.
    pub fn disable_subscription(&self, id: Uuid) -> bool {
        self.set_subscription(id, SubscriptionChange { disabled: Some(true), ..Default::default() }).is_ok()
    }

    /// Changes a subscription as Calendly would on its own: `disabled` after a day of failed
    /// deliveries, `retry_started_at` while it retries, or gone (`deleted`).
    pub fn set_subscription(&self, id: Uuid, change: SubscriptionChange) -> Result<Value, SimError> {
        let mut world = self.world();
        if change.deleted {
            return match world.subscriptions.remove(&id) {
                Some(sub) => Ok(world.subscription_json(&self.inner.uris, &sub)),
                None => Err(SimError::NotFound(format!("subscription {id}"))),
            };
        }
        let sub = world.subscriptions.get_mut(&id).ok_or_else(|| SimError::NotFound(format!("subscription {id}")))?;
        if let Some(disabled) = change.disabled {
            sub.state = if disabled { "disabled" } else { "active" };
        }
        if let Some(since) = change.retry_started_at {
            sub.retry_started_at = since;
        }
        let sub = sub.clone();
        Ok(world.subscription_json(&self.inner.uris, &sub))
    }

    /// Invitee UUIDs of `user`'s events that are still active (the load generator picks from these).
    pub fn active_invitees(&self, user: Uuid) -> Vec<Uuid> {
        let world = self.world();
        world
            .invitees
            .values()
            .filter(|i| i.status == "active" && world.events.get(&i.event).is_some_and(|e| e.is_hosted_by(user)))
            .map(|i| i.id)
            .collect()
    }
}
