//! Webhook delivery as Calendly does it: every matching active subscription gets a signed POST;
//! non-2xx answers and timeouts are retried with exponential backoff, and a subscription whose
//! retries outlast the retry window turns `disabled` (silently, as at Calendly).

use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::ts;
use crate::sim::Sim;
use crate::webhook::{Captured, DeliveryMode, SIGNATURE_HEADER};

impl Sim {
    /// Delivers `event` about something hosted by `hosts` to every matching active subscription:
    /// each host's user-scoped one (a collective event reaches every host), and those of the hosts'
    /// organizations.
    pub(crate) fn deliver(&self, event: &str, hosts: &[Uuid], payload: serde_json::Value) {
        let targets: Vec<(Uuid, String, String)> = {
            let world = self.world();
            let organizations: Vec<Uuid> =
                hosts.iter().filter_map(|h| world.users.get(h)).map(|u| u.organization).collect();
            world
                .subscriptions
                .values()
                .filter(|s| s.state == "active" && s.events.iter().any(|e| e == event))
                .filter(|s| match s.scope.as_str() {
                    "user" => s.user.is_some_and(|u| hosts.contains(&u)),
                    _ => organizations.contains(&s.organization),
                })
                .map(|s| (s.id, s.callback_url.clone(), self.uris().user(s.creator)))
                .collect()
        };
        let mode = *self.inner.delivery_mode.lock().expect("delivery mode lock");
        for (subscription, url, created_by) in targets {
            let body = json!({
                "event": event,
                "created_at": ts(OffsetDateTime::now_utc()),
                "created_by": created_by,
                "payload": payload,
            })
            .to_string();
            let captured = Captured {
                subscription: self.uris().subscription(subscription),
                callback_url: url,
                event: event.to_owned(),
                body,
            };
            match mode {
                DeliveryMode::Capture => self.inner.captured.lock().expect("captured lock").push(captured),
                DeliveryMode::Send => {
                    let sim = self.clone();
                    tokio::spawn(async move { sim.send_with_retries(subscription, captured).await });
                }
            }
        }
    }

    async fn send_with_retries(&self, subscription: Uuid, delivery: Captured) {
        let mut delay = self.config().delivery_retry_base;
        loop {
            let signature = delivery.signature(&self.config().signing_key);
            let result = self
                .inner
                .http
                .post(&delivery.callback_url)
                .header("content-type", "application/json")
                .header(SIGNATURE_HEADER, signature)
                .body(delivery.body.clone())
                .send()
                .await;
            if result.is_ok_and(|r| r.status().is_success()) {
                self.counters().deliveries_succeeded += 1;
                // Delivering again: Calendly is no longer retrying.
                if let Some(sub) = self.world().subscriptions.get_mut(&subscription) {
                    sub.retry_started_at = None;
                }
                return;
            }
            self.counters().delivery_attempts_failed += 1;
            let now = OffsetDateTime::now_utc();
            {
                let mut world = self.world();
                let Some(sub) = world.subscriptions.get_mut(&subscription) else { return };
                let started = *sub.retry_started_at.get_or_insert(now);
                if (now - started).unsigned_abs() >= self.config().delivery_retry_window {
                    sub.state = "disabled";
                    tracing::info!(subscription = %subscription, "retry window exhausted; subscription disabled");
                    return;
                }
                if sub.state != "active" {
                    return;
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(3600));
        }
    }
}
