//! What a webhook delivery is, apart from sending it: the events, a captured delivery, and
//! Calendly's signature scheme.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use time::OffsetDateTime;

pub const SIGNATURE_HEADER: &str = "Calendly-Webhook-Signature";

pub const ALL_EVENTS: &[&str] =
    &["invitee.created", "invitee.canceled", "invitee_no_show.created", "invitee_no_show.deleted"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// POST to the subscription's callback URL (with retries).
    Send,
    /// Keep the signed bodies for the test to fetch and send in whatever order it likes.
    Capture,
}

/// A delivery held back in capture mode: exactly what would have been POSTed.
#[derive(Debug, Clone, Serialize)]
pub struct Captured {
    pub subscription: String,
    pub callback_url: String,
    pub event: String,
    pub body: String,
}

impl Captured {
    /// A fresh signature for sending this body now.
    pub fn signature(&self, key: &str) -> String {
        sign(key, OffsetDateTime::now_utc().unix_timestamp(), self.body.as_bytes())
    }
}

/// Calendly's scheme, implemented here independently of calsync's verifier so each checks the other.
pub fn sign(key: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}
