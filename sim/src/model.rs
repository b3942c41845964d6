//! The simulated Calendly world: organizations, users, OAuth grants, scheduled events, invitees,
//! webhook subscriptions. Pure data plus the JSON shapes Calendly answers with.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

/// Calendly's timestamp style: ISO-8601, microseconds, `Z`.
pub fn ts(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// A Calendly plan, as far as its API limits go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    Free,
    #[default]
    Paid,
}

/// Requests a minute a free-plan user may make.
pub const FREE_PLAN_REQUESTS_PER_MINUTE: u32 = 50;
/// Token requests a minute one user's grants may make (every plan).
pub const TOKEN_REQUESTS_PER_MINUTE: u32 = 8;

#[derive(Debug, Clone)]
pub struct User {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub organization: Uuid,
    pub timezone: String,
    /// Without the plan feature some webhooks need, subscription creation answers 403.
    pub webhooks_enabled: bool,
    pub plan: Plan,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub id: Uuid,
    /// The event's owner (the booked user).
    pub host: Uuid,
    /// Further hosts of a collective (or round-robin) event: each one's user-scoped subscription
    /// receives the event's webhooks, and each one may read the event with their own token.
    pub co_hosts: Vec<Uuid>,
    pub name: String,
    pub status: &'static str,
    pub start_time: OffsetDateTime,
    pub end_time: OffsetDateTime,
    pub event_type: String,
    pub location: Value,
    pub invitee_limit: u32,
    pub cancellation: Option<Value>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

impl Event {
    /// Every host, the owner first.
    pub fn hosts(&self) -> Vec<Uuid> {
        std::iter::once(self.host).chain(self.co_hosts.iter().copied()).collect()
    }

    pub fn is_hosted_by(&self, user: Uuid) -> bool {
        self.host == user || self.co_hosts.contains(&user)
    }
}

#[derive(Debug, Clone)]
pub struct Invitee {
    pub id: Uuid,
    pub event: Uuid,
    pub name: String,
    pub email: String,
    pub status: &'static str,
    pub rescheduled: bool,
    pub old_invitee: Option<String>,
    pub new_invitee: Option<String>,
    pub no_show: Option<Value>,
    pub cancellation: Option<Value>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: Uuid,
    pub callback_url: String,
    pub events: Vec<String>,
    pub scope: String,
    pub organization: Uuid,
    pub user: Option<Uuid>,
    pub creator: Uuid,
    pub state: &'static str,
    pub retry_started_at: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone)]
pub struct AuthCode {
    pub user: Uuid,
    pub redirect_uri: String,
    pub code_challenge: Option<String>,
    pub expires_at: OffsetDateTime,
    pub used: bool,
}

#[derive(Debug, Clone)]
pub struct AccessToken {
    pub user: Uuid,
    pub expires_at: OffsetDateTime,
    pub revoked: bool,
}

#[derive(Debug, Clone)]
pub struct RefreshToken {
    pub user: Uuid,
    /// Single use: set when exchanged; a second exchange is `invalid_grant`.
    pub used: bool,
    pub revoked: bool,
}

/// URIs, rooted at the simulator's own API base (so "same origin as the API" holds as with Calendly).
#[derive(Debug, Clone)]
pub struct Uris {
    pub api: String,
}

impl Uris {
    pub fn user(&self, id: Uuid) -> String {
        format!("{}/users/{id}", self.api)
    }
    pub fn organization(&self, id: Uuid) -> String {
        format!("{}/organizations/{id}", self.api)
    }
    pub fn event(&self, id: Uuid) -> String {
        format!("{}/scheduled_events/{id}", self.api)
    }
    pub fn invitee(&self, event: Uuid, id: Uuid) -> String {
        format!("{}/scheduled_events/{event}/invitees/{id}", self.api)
    }
    pub fn subscription(&self, id: Uuid) -> String {
        format!("{}/webhook_subscriptions/{id}", self.api)
    }
    /// The trailing UUID of a Calendly URI.
    pub fn id_of(uri: &str) -> Option<Uuid> {
        uri.trim_end_matches('/').rsplit('/').next()?.parse().ok()
    }
}

#[derive(Debug, Default)]
pub struct World {
    pub users: HashMap<Uuid, User>,
    pub events: HashMap<Uuid, Event>,
    pub invitees: HashMap<Uuid, Invitee>,
    /// Invitee ids per event, so answering about one event never scans every invitee.
    pub invitees_by_event: HashMap<Uuid, Vec<Uuid>>,
    pub subscriptions: HashMap<Uuid, Subscription>,
    pub codes: HashMap<String, AuthCode>,
    pub access_tokens: HashMap<String, AccessToken>,
    pub refresh_tokens: HashMap<String, RefreshToken>,
}

impl World {
    pub fn add_invitee(&mut self, invitee: Invitee) {
        self.invitees_by_event.entry(invitee.event).or_default().push(invitee.id);
        self.invitees.insert(invitee.id, invitee);
    }

    /// The invitees of `event`, in booking order.
    pub fn invitees_of(&self, event: Uuid) -> impl Iterator<Item = &Invitee> {
        self.invitees_by_event.get(&event).into_iter().flatten().filter_map(|id| self.invitees.get(id))
    }

    pub fn user_json(&self, uris: &Uris, user: &User) -> Value {
        let slug = user.email.split('@').next().unwrap_or("user").to_owned();
        json!({
            "uri": uris.user(user.id),
            "name": user.name,
            "slug": slug,
            "email": user.email,
            "scheduling_url": format!("https://calendly.com/{slug}"),
            "timezone": user.timezone,
            "avatar_url": null,
            "created_at": ts(user.created_at),
            "updated_at": ts(user.created_at),
            "current_organization": uris.organization(user.organization),
        })
    }

    pub fn event_json(&self, uris: &Uris, event: &Event) -> Value {
        let invitees: Vec<&Invitee> = self.invitees_of(event.id).collect();
        let active = invitees.iter().filter(|i| i.status == "active").count();
        let memberships: Vec<Value> = event
            .hosts()
            .into_iter()
            .map(|id| {
                let host = self.users.get(&id);
                json!({
                    "user": uris.user(id),
                    "user_email": host.map(|h| h.email.clone()),
                    "user_name": host.map(|h| h.name.clone()),
                })
            })
            .collect();
        json!({
            "uri": uris.event(event.id),
            "name": event.name,
            "status": event.status,
            "start_time": ts(event.start_time),
            "end_time": ts(event.end_time),
            "event_type": event.event_type,
            "location": event.location,
            "invitees_counter": { "total": invitees.len(), "active": active, "limit": event.invitee_limit },
            "created_at": ts(event.created_at),
            "updated_at": ts(event.updated_at),
            "event_memberships": memberships,
            "event_guests": [],
            "cancellation": event.cancellation,
            "meeting_notes_plain": null,
            "meeting_notes_html": null,
            "calendar_event": null,
        })
    }

    /// The invitee resource; webhook payloads also embed the whole scheduled event.
    pub fn invitee_json(&self, uris: &Uris, invitee: &Invitee, embed_event: bool) -> Value {
        let mut first_last = invitee.name.splitn(2, ' ');
        let uri = uris.invitee(invitee.event, invitee.id);
        let mut value = json!({
            "uri": uri,
            "email": invitee.email,
            "name": invitee.name,
            "first_name": first_last.next(),
            "last_name": first_last.next(),
            "status": invitee.status,
            "event": uris.event(invitee.event),
            "created_at": ts(invitee.created_at),
            "updated_at": ts(invitee.updated_at),
            "timezone": "Europe/Berlin",
            "questions_and_answers": [],
            "tracking": { "utm_campaign": null, "utm_source": null, "utm_medium": null, "utm_content": null, "utm_term": null, "salesforce_uuid": null },
            "text_reminder_number": null,
            "rescheduled": invitee.rescheduled,
            "old_invitee": invitee.old_invitee,
            "new_invitee": invitee.new_invitee,
            "cancel_url": format!("https://calendly.com/cancellations/{}", invitee.id),
            "reschedule_url": format!("https://calendly.com/reschedulings/{}", invitee.id),
            "routing_form_submission": null,
            "payment": null,
            "no_show": invitee.no_show,
            "reconfirmation": null,
            "scheduling_method": null,
            "invitee_scheduled_by": null,
        });
        if let Some(cancellation) = &invitee.cancellation {
            value["cancellation"] = cancellation.clone();
        }
        if embed_event && let Some(event) = self.events.get(&invitee.event) {
            value["scheduled_event"] = self.event_json(uris, event);
        }
        value
    }

    pub fn subscription_json(&self, uris: &Uris, sub: &Subscription) -> Value {
        json!({
            "uri": uris.subscription(sub.id),
            "callback_url": sub.callback_url,
            "created_at": ts(sub.created_at),
            "updated_at": ts(sub.created_at),
            "retry_started_at": sub.retry_started_at.map(ts),
            "state": sub.state,
            "events": sub.events,
            "scope": sub.scope,
            "organization": uris.organization(sub.organization),
            "user": sub.user.map(|u| uris.user(u)),
            "group": null,
            "creator": uris.user(sub.creator),
        })
    }
}
