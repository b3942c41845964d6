//! Calendly payloads, parsed leniently: unknown fields are ignored, optional ones may be missing.

use secrecy::SecretString;
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;

/// The webhook envelope. All four fields are required by Calendly's contract; anything else is
/// ignored. A body that does not parse into this is permanently undeliverable.
#[derive(Debug, Clone, Deserialize)]
pub struct WebhookEnvelope {
    pub event: String,
    #[serde(default)]
    pub created_at: Option<String>,
    pub created_by: String,
    pub payload: Value,
}

/// The events calsync subscribes to and turns into meetings; everything else is acknowledged as
/// `ignored`. The one list of them: subscriptions, parsing and metric labels all read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    InviteeCreated,
    InviteeCanceled,
    NoShowCreated,
    NoShowDeleted,
}

impl EventKind {
    pub const ALL: [Self; 4] = [Self::InviteeCreated, Self::InviteeCanceled, Self::NoShowCreated, Self::NoShowDeleted];

    /// Calendly's name of the event.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InviteeCreated => "invitee.created",
            Self::InviteeCanceled => "invitee.canceled",
            Self::NoShowCreated => "invitee_no_show.created",
            Self::NoShowDeleted => "invitee_no_show.deleted",
        }
    }

    pub fn parse(event: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == event)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Cancellation {
    #[serde(default)]
    pub canceled_by: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub canceler_type: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub created_at: Option<OffsetDateTime>,
}

/// An invitee, as in `invitee.*` and `invitee_no_show.*` payloads and the invitees list.
#[derive(Debug, Clone, Deserialize)]
pub struct Invitee {
    pub uri: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    pub status: String,
    /// URI of the scheduled event.
    pub event: String,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(default)]
    pub rescheduled: Option<bool>,
    #[serde(default)]
    pub old_invitee: Option<String>,
    #[serde(default)]
    pub new_invitee: Option<String>,
    #[serde(default)]
    pub no_show: Option<Value>,
    #[serde(default)]
    pub cancellation: Option<Cancellation>,
}

/// A scheduled event (`GET /scheduled_events/{uuid}` → `resource`).
#[derive(Debug, Clone, Deserialize)]
pub struct ScheduledEvent {
    pub uri: String,
    #[serde(default)]
    pub name: Option<String>,
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    pub start_time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub end_time: OffsetDateTime,
    #[serde(default)]
    pub event_type: Option<String>,
    #[serde(default)]
    pub location: Option<Value>,
    #[serde(default)]
    pub cancellation: Option<Cancellation>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// How many invitees it has (all, and still active): reconciliation compares these with ours,
    /// since an invitee canceling a group event need not change the event's `updated_at`.
    #[serde(default)]
    pub invitees_counter: Option<InviteesCounter>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct InviteesCounter {
    pub total: i64,
    pub active: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Resource<T> {
    pub resource: T,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Pagination {
    #[serde(default)]
    pub next_page_token: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Collection<T> {
    pub collection: Vec<T>,
    pub pagination: Pagination,
}

/// `GET /users/me` → `resource`.
#[derive(Debug, Clone, Deserialize)]
pub struct CalendlyUser {
    pub uri: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    pub current_organization: String,
}

/// The longest token lifetime we believe (Calendly's are two hours). A lifetime outside
/// `1..=MAX_TOKEN_LIFETIME_SECS` is a broken answer — but the tokens in it are real, and for a
/// refresh the only ones left (Calendly consumed the old refresh token), so the answer is kept with
/// [`BELIEVED_TOKEN_LIFETIME_SECS`] instead of an expiry that overflows or never comes.
pub const MAX_TOKEN_LIFETIME_SECS: i64 = 366 * 86_400;

/// The lifetime assumed when Calendly's `expires_in` is absurd: Calendly's documented two hours. If
/// the token dies sooner, the next call's 401 refreshes it.
pub const BELIEVED_TOKEN_LIFETIME_SECS: i64 = 7_200;

/// `POST /oauth/token` answer. The tokens are secrets: never printed, not even by `Debug`.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenResponse {
    pub access_token: SecretString,
    pub refresh_token: SecretString,
    pub expires_in: i64,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub organization: Option<String>,
}

impl TokenResponse {
    /// When the access token expires, counted from `now` (an absurd lifetime counts as
    /// [`BELIEVED_TOKEN_LIFETIME_SECS`]).
    pub fn expires_at(&self, now: OffsetDateTime) -> OffsetDateTime {
        now + time::Duration::seconds(self.believed_lifetime_secs())
    }

    /// Whether `expires_in` is a lifetime at all (`1..=MAX_TOKEN_LIFETIME_SECS`).
    pub fn lifetime_is_believable(&self) -> bool {
        (1..=MAX_TOKEN_LIFETIME_SECS).contains(&self.expires_in)
    }

    /// `expires_in` when it is a lifetime at all, else [`BELIEVED_TOKEN_LIFETIME_SECS`].
    pub fn believed_lifetime_secs(&self) -> i64 {
        if self.lifetime_is_believable() { self.expires_in } else { BELIEVED_TOKEN_LIFETIME_SECS }
    }
}

/// A webhook subscription resource.
#[derive(Debug, Clone, Deserialize)]
pub struct Subscription {
    pub uri: String,
    pub callback_url: String,
    /// `active` or `disabled` (Calendly gave up after 24 hours of failed deliveries).
    pub state: String,
    /// Set while Calendly is retrying failed deliveries to it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub retry_started_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub user: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invitee_payload_with_extra_and_missing_optional_fields_parses() {
        let invitee: Invitee = serde_json::from_value(serde_json::json!({
            "uri": "https://api.calendly.com/scheduled_events/E/invitees/I",
            "status": "active",
            "event": "https://api.calendly.com/scheduled_events/E",
            "updated_at": "2025-12-17T01:59:35.123456Z",
            "brand_new_field": {"x": 1},
            "first_name": null
        }))
        .unwrap();
        assert_eq!(invitee.updated_at.microsecond(), 123_456);
        assert!(invitee.cancellation.is_none());
    }

    #[test]
    fn every_event_kind_parses_from_its_own_name() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EventKind::parse("invitee.rescheduled"), None);
    }
}
