//! A webhook body, parsed once at the worker's boundary into what processing needs: which event,
//! whose subscription it came from, and the invitee change it carries.

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::calendly::types::{EventKind, Invitee, WebhookEnvelope};

/// The Calendly user whose subscription delivered a webhook (`created_by`): the one and only key
/// by which a delivery finds its app user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CalendlyUserUri(String);

impl CalendlyUserUri {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CalendlyUserUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An authentic webhook as calsync understands it.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// The event name exactly as sent, known to calsync or not (the inbox records it).
    pub event: String,
    pub created_by: CalendlyUserUri,
    pub change: Change,
}

/// What a webhook asks calsync to do.
#[derive(Debug, Clone)]
pub enum Change {
    /// An invitee was booked, canceled, or marked (or unmarked) as a no-show.
    /// (Boxed: the other variants are small, and a webhook moves around by value.)
    Invitee(Box<InviteeChange>),
    /// A known event whose payload is not an invitee: it can never succeed. Kept apart rather than
    /// refused at parse time because a delivery for nobody we know is parked, not dead.
    Malformed { reason: String },
    /// An event calsync does not turn into meetings.
    Ignored,
}

#[derive(Debug, Clone)]
pub struct InviteeChange {
    pub kind: EventKind,
    pub invitee: Invitee,
    /// `payload.scheduled_event.updated_at`, when the payload embeds a readable one: a shared fetch
    /// of the event is only good enough if it is at least this new.
    pub event_updated_at: Option<OffsetDateTime>,
}

#[derive(Debug, thiserror::Error)]
#[error("not a Calendly webhook envelope (needs event, created_by, payload): {0}")]
pub struct NotAWebhook(#[from] serde_json::Error);

impl Webhook {
    pub fn parse(body: &[u8]) -> Result<Self, NotAWebhook> {
        let envelope: WebhookEnvelope = serde_json::from_slice(body)?;
        let change = match EventKind::parse(&envelope.event) {
            None => Change::Ignored,
            Some(kind) => match Invitee::deserialize(&envelope.payload) {
                Ok(invitee) => Change::Invitee(Box::new(InviteeChange {
                    kind,
                    invitee,
                    event_updated_at: embedded_event_updated_at(&envelope.payload),
                })),
                Err(error) => {
                    Change::Malformed { reason: format!("{} payload is not an invitee: {error}", envelope.event) }
                }
            },
        };
        Ok(Self { event: envelope.event, created_by: CalendlyUserUri(envelope.created_by), change })
    }

    /// The event calsync knows this as, if any.
    pub fn kind(&self) -> Option<EventKind> {
        EventKind::parse(&self.event)
    }
}

/// Read leniently: a missing or unreadable time only means "no floor", never a failed delivery.
fn embedded_event_updated_at(payload: &serde_json::Value) -> Option<OffsetDateTime> {
    let text = payload.get("scheduled_event")?.get("updated_at")?.as_str()?;
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(event: &str, payload: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "event": event,
            "created_at": "2026-01-01T00:00:00Z",
            "created_by": "https://api.calendly.com/users/U",
            "payload": payload,
        }))
        .unwrap()
    }

    fn invitee_payload() -> serde_json::Value {
        json!({
            "uri": "https://api.calendly.com/scheduled_events/E/invitees/I",
            "status": "active",
            "event": "https://api.calendly.com/scheduled_events/E",
            "updated_at": "2026-01-01T09:00:00Z",
            "scheduled_event": {"updated_at": "2026-01-01T08:00:00Z"}
        })
    }

    #[test]
    fn an_invitee_event_parses_into_its_kind_invitee_and_embedded_snapshot_time() {
        let webhook = Webhook::parse(&body("invitee.canceled", invitee_payload())).unwrap();
        assert_eq!(webhook.created_by.as_str(), "https://api.calendly.com/users/U");
        let Change::Invitee(change) = webhook.change else { panic!("an invitee change") };
        assert_eq!(change.kind, EventKind::InviteeCanceled);
        assert_eq!(change.invitee.event, "https://api.calendly.com/scheduled_events/E");
        assert_eq!(change.event_updated_at, Some(time::macros::datetime!(2026-01-01 08:00 UTC)));
    }

    #[test]
    fn an_unreadable_embedded_time_is_no_floor_rather_than_an_error() {
        let mut payload = invitee_payload();
        payload["scheduled_event"]["updated_at"] = json!("yesterday");
        let Change::Invitee(change) = Webhook::parse(&body("invitee.created", payload)).unwrap().change else {
            panic!("an invitee change")
        };
        assert_eq!(change.event_updated_at, None);
    }

    #[test]
    fn an_unknown_event_is_ignored_whatever_its_payload() {
        let webhook = Webhook::parse(&body("routing_form_submission.created", json!({"x": 1}))).unwrap();
        assert!(matches!(webhook.change, Change::Ignored));
        assert_eq!(webhook.kind(), None);
    }

    #[test]
    fn a_known_event_with_a_foreign_payload_is_malformed_not_rejected() {
        let webhook = Webhook::parse(&body("invitee.created", json!({"uri": 7}))).unwrap();
        assert!(matches!(webhook.change, Change::Malformed { .. }));
    }

    #[test]
    fn a_body_without_created_by_is_not_a_webhook() {
        assert!(Webhook::parse(br#"{"event":"invitee.created","payload":{}}"#).is_err());
        assert!(Webhook::parse(b"not json").is_err());
    }
}
