//! What calsync stores about a meeting, built from Calendly's types. The rules that turn Calendly's
//! view into ours live here, once, and are tested without a database: which status a meeting or
//! invitee has, when it counts as canceled, and why.

use serde_json::Value;
use time::OffsetDateTime;

use crate::calendly::types::{Cancellation, Invitee, ScheduledEvent};

/// `meetings.status` and `meeting_invitees.status`: our columns know only these two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum MeetingStatus {
    Active,
    Canceled,
}

impl MeetingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Canceled => "canceled",
        }
    }

    /// Calendly says `canceled` for both events and invitees; anything else (`active`, or a status
    /// added later) is a meeting that still takes place.
    pub fn from_calendly(status: &str) -> Self {
        if status == "canceled" { Self::Canceled } else { Self::Active }
    }
}

/// When it was canceled: Calendly's cancellation time, or (when a canceled resource carries none)
/// the time of the snapshot that first says so. Never set for something active.
fn canceled_at(
    status: MeetingStatus,
    cancellation: Option<&Cancellation>,
    updated_at: OffsetDateTime,
) -> Option<OffsetDateTime> {
    match status {
        MeetingStatus::Canceled => cancellation.and_then(|c| c.created_at).or(Some(updated_at)),
        MeetingStatus::Active => None,
    }
}

/// A row of `meetings`, before it knows its owner.
#[derive(Debug, Clone, PartialEq)]
pub struct Meeting {
    pub calendly_event_uri: String,
    pub name: Option<String>,
    pub status: MeetingStatus,
    pub start_time: OffsetDateTime,
    pub end_time: OffsetDateTime,
    pub event_type_uri: Option<String>,
    pub location: Option<Value>,
    pub canceled_at: Option<OffsetDateTime>,
    pub cancel_reason: Option<String>,
    /// Calendly's `updated_at`: an older snapshot never overwrites a newer one.
    pub source_updated_at: OffsetDateTime,
}

impl Meeting {
    pub fn from_event(event: &ScheduledEvent) -> Self {
        let status = MeetingStatus::from_calendly(&event.status);
        let cancellation = event.cancellation.as_ref();
        Self {
            calendly_event_uri: event.uri.clone(),
            name: event.name.clone(),
            status,
            start_time: event.start_time,
            end_time: event.end_time,
            event_type_uri: event.event_type.clone(),
            location: event.location.clone(),
            canceled_at: canceled_at(status, cancellation, event.updated_at),
            cancel_reason: cancellation.and_then(|c| c.reason.clone()),
            source_updated_at: event.updated_at,
        }
    }
}

/// A row of `meeting_invitees`, before it knows its meeting.
#[derive(Debug, Clone, PartialEq)]
pub struct MeetingInvitee {
    pub calendly_invitee_uri: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub status: MeetingStatus,
    /// Canceled as part of a reschedule (`new_invitee_uri` is the replacement).
    pub rescheduled: bool,
    pub old_invitee_uri: Option<String>,
    pub new_invitee_uri: Option<String>,
    pub no_show: bool,
    pub canceled_at: Option<OffsetDateTime>,
    pub cancel_reason: Option<String>,
    pub canceled_by: Option<String>,
    pub canceler_type: Option<String>,
    pub source_updated_at: OffsetDateTime,
}

/// A webhook named an invitee that is not one of the fetched event's.
#[derive(Debug, thiserror::Error)]
#[error("invitee {invitee} is not an invitee of event {event}")]
pub struct ForeignInvitee {
    pub invitee: String,
    pub event: String,
}

impl MeetingInvitee {
    /// The row for `invitee` on `event`'s meeting, only if it really is one of that event's
    /// invitees (`<event uri>/invitees/<id>`, and the invitee names that event): a body that pairs
    /// an event with someone else's invitee must not write that invitee into this meeting.
    pub fn of_event(event: &ScheduledEvent, invitee: &Invitee) -> Result<Self, ForeignInvitee> {
        let own = invitee.event == event.uri
            && invitee
                .uri
                .strip_prefix(event.uri.as_str())
                .and_then(|rest| rest.strip_prefix("/invitees/"))
                .is_some_and(|id| !id.is_empty() && !id.contains('/'));
        if !own {
            return Err(ForeignInvitee { invitee: invitee.uri.clone(), event: event.uri.clone() });
        }
        Ok(Self::from_invitee(invitee))
    }

    fn from_invitee(invitee: &Invitee) -> Self {
        let status = MeetingStatus::from_calendly(&invitee.status);
        let cancellation = invitee.cancellation.as_ref();
        Self {
            calendly_invitee_uri: invitee.uri.clone(),
            email: invitee.email.clone(),
            name: invitee.name.clone(),
            status,
            rescheduled: invitee.rescheduled.unwrap_or(false),
            old_invitee_uri: invitee.old_invitee.clone(),
            new_invitee_uri: invitee.new_invitee.clone(),
            // Calendly sends `no_show: null` when there is none, an object when there is one.
            no_show: invitee.no_show.as_ref().is_some_and(|v| !v.is_null()),
            canceled_at: canceled_at(status, cancellation, invitee.updated_at),
            cancel_reason: cancellation.and_then(|c| c.reason.clone()),
            canceled_by: cancellation.and_then(|c| c.canceled_by.clone()),
            canceler_type: cancellation.and_then(|c| c.canceler_type.clone()),
            source_updated_at: invitee.updated_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::macros::datetime;

    use super::*;

    fn event(extra: Value) -> ScheduledEvent {
        let mut base = json!({
            "uri": "https://api.calendly.com/scheduled_events/E",
            "name": "Intro",
            "status": "active",
            "start_time": "2026-01-05T10:00:00Z",
            "end_time": "2026-01-05T10:30:00Z",
            "updated_at": "2026-01-01T09:00:00Z"
        });
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    fn invitee(extra: Value) -> Invitee {
        let mut base = json!({
            "uri": "https://api.calendly.com/scheduled_events/E/invitees/I",
            "status": "active",
            "event": "https://api.calendly.com/scheduled_events/E",
            "updated_at": "2026-01-01T09:00:00Z"
        });
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    fn own(invitee: &Invitee) -> MeetingInvitee {
        MeetingInvitee::of_event(&event(json!({})), invitee).unwrap()
    }

    #[test]
    fn an_invitee_of_another_event_is_refused() {
        let of_other = |uri: &str, event_uri: &str| {
            let other = invitee(json!({"uri": uri, "event": event_uri}));
            MeetingInvitee::of_event(&event(json!({})), &other).is_err()
        };
        let e = "https://api.calendly.com/scheduled_events/E";
        assert!(of_other("https://api.calendly.com/scheduled_events/F/invitees/I", e), "another event's invitee");
        assert!(of_other(&format!("{e}/invitees/I"), "https://api.calendly.com/scheduled_events/F"), "names F");
        assert!(of_other(&format!("{e}X/invitees/I"), e), "a prefix is not the event");
        assert!(of_other(&format!("{e}/invitees/"), e), "no invitee id");
        assert!(of_other(&format!("{e}/invitees/I/x"), e), "nested path");
        assert!(!of_other(&format!("{e}/invitees/I"), e));
    }

    #[test]
    fn an_active_event_is_an_active_meeting_with_no_cancellation() {
        let meeting = Meeting::from_event(&event(json!({})));
        assert_eq!(meeting.status, MeetingStatus::Active);
        assert_eq!(meeting.canceled_at, None);
        assert_eq!(meeting.source_updated_at, datetime!(2026-01-01 09:00 UTC));
    }

    #[test]
    fn a_canceled_event_takes_calendlys_cancellation_time_and_reason() {
        let meeting = Meeting::from_event(&event(json!({
            "status": "canceled",
            "updated_at": "2026-01-02T12:00:00Z",
            "cancellation": {"reason": "sick", "created_at": "2026-01-02T11:59:00Z"}
        })));
        assert_eq!(meeting.status, MeetingStatus::Canceled);
        assert_eq!(meeting.canceled_at, Some(datetime!(2026-01-02 11:59 UTC)));
        assert_eq!(meeting.cancel_reason.as_deref(), Some("sick"));
    }

    #[test]
    fn a_canceled_event_without_a_cancellation_time_is_canceled_as_of_its_snapshot() {
        let meeting = Meeting::from_event(&event(json!({"status": "canceled", "updated_at": "2026-01-02T12:00:00Z"})));
        assert_eq!(meeting.canceled_at, Some(datetime!(2026-01-02 12:00 UTC)));
    }

    #[test]
    fn an_unknown_calendly_status_counts_as_active() {
        assert_eq!(MeetingStatus::from_calendly("some_future_status"), MeetingStatus::Active);
        assert_eq!(Meeting::from_event(&event(json!({"status": "rescheduling"}))).status, MeetingStatus::Active);
    }

    #[test]
    fn a_rescheduled_invitee_is_canceled_and_points_to_its_replacement() {
        let row = own(&invitee(json!({
            "status": "canceled",
            "rescheduled": true,
            "new_invitee": "https://api.calendly.com/scheduled_events/F/invitees/J",
            "cancellation": {"canceled_by": "Ada", "canceler_type": "invitee", "reason": "moved"}
        })));
        assert_eq!(row.status, MeetingStatus::Canceled);
        assert!(row.rescheduled);
        assert_eq!(row.new_invitee_uri.as_deref(), Some("https://api.calendly.com/scheduled_events/F/invitees/J"));
        assert_eq!(row.canceled_at, Some(datetime!(2026-01-01 09:00 UTC)));
        assert_eq!((row.canceled_by.as_deref(), row.canceler_type.as_deref()), (Some("Ada"), Some("invitee")));
    }

    #[test]
    fn an_invitee_is_a_no_show_only_when_calendly_sends_a_no_show_object() {
        assert!(!own(&invitee(json!({"no_show": null}))).no_show);
        assert!(!own(&invitee(json!({}))).no_show);
        assert!(own(&invitee(json!({"no_show": {"uri": "x"}}))).no_show);
    }

    #[test]
    fn an_active_invitee_has_no_cancellation_time_even_if_calendly_sends_one() {
        let row = own(&invitee(json!({"cancellation": {"created_at": "2026-01-02T11:59:00Z"}})));
        assert_eq!(row.status, MeetingStatus::Active);
        assert_eq!(row.canceled_at, None);
    }
}
