//! Calendly's webhook signature: header `Calendly-Webhook-Signature: t=<unix s>,v1=<hex>`, where
//! `v1 = hex(HMAC-SHA256(key, "<t>." ++ raw body))`.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

pub const HEADER: &str = "Calendly-Webhook-Signature";

/// How far in the future a timestamp may be (clock skew between Calendly and us).
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(30);

/// A parsed signature header. Several `v1` entries may appear (Calendly may sign with more than one
/// key during its own rotations); any one matching is enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader {
    pub timestamp: i64,
    pub signatures: Vec<[u8; 32]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Calendly-Webhook-Signature header is missing")]
    Missing,
    #[error("the Calendly-Webhook-Signature header is malformed")]
    Malformed,
    #[error("the signature timestamp is older than the tolerance")]
    Stale,
    #[error("the signature timestamp is in the future")]
    FromTheFuture,
    #[error("no configured signing key produces this signature")]
    Mismatch,
}

impl SignatureError {
    /// The `error` code of the JSON answer: distinct per cause so an operator can tell a clock
    /// problem from a wrong key.
    pub fn code(self) -> &'static str {
        match self {
            Self::Missing => "missing_signature",
            Self::Malformed => "malformed_signature",
            Self::Stale => "stale_signature",
            Self::FromTheFuture => "future_signature",
            Self::Mismatch => "invalid_signature",
        }
    }
}

impl std::str::FromStr for SignatureHeader {
    type Err = SignatureError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for part in value.split(',') {
            let (key, val) = part.trim().split_once('=').ok_or(SignatureError::Malformed)?;
            match key.trim() {
                "t" => {
                    let t = val.trim();
                    if t.is_empty() || t.len() > 12 || !t.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(SignatureError::Malformed);
                    }
                    if timestamp.replace(t.parse::<i64>().map_err(|_| SignatureError::Malformed)?).is_some() {
                        return Err(SignatureError::Malformed);
                    }
                }
                "v1" => {
                    let mut sig = [0u8; 32];
                    hex::decode_to_slice(val.trim(), &mut sig).map_err(|_| SignatureError::Malformed)?;
                    signatures.push(sig);
                }
                // Unknown schemes (a future v2) are ignored, as Calendly's own libraries do.
                _ => {}
            }
        }
        match timestamp {
            Some(timestamp) if !signatures.is_empty() => Ok(Self { timestamp, signatures }),
            _ => Err(SignatureError::Malformed),
        }
    }
}

fn mac(key: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header value Calendly would send for `body` signed with `key` at `timestamp`.
pub fn sign(key: &[u8], timestamp: i64, body: &[u8]) -> String {
    let digest = mac(key, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(digest))
}

/// Checks webhook signatures against every configured key.
#[derive(Clone)]
pub struct WebhookVerifier {
    keys: Vec<SecretString>,
    tolerance: Duration,
}

impl WebhookVerifier {
    /// Blank keys are dropped: an empty HMAC key is one anybody can sign with (settings validation
    /// refuses them too; this keeps the verifier safe on its own).
    pub fn new(keys: Vec<SecretString>, tolerance: Duration) -> Self {
        let keys = keys.into_iter().filter(|k| !k.expose_secret().trim().is_empty()).collect();
        Self { keys, tolerance }
    }

    /// Verifies `header` over the raw `body` as received, at wall-clock `now` (unix seconds).
    pub fn verify(&self, header: Option<&str>, body: &[u8], now: i64) -> Result<(), SignatureError> {
        let header: SignatureHeader = header.ok_or(SignatureError::Missing)?.parse()?;
        let age = now.saturating_sub(header.timestamp);
        if age > self.tolerance.as_secs() as i64 {
            return Err(SignatureError::Stale);
        }
        if -age > MAX_FUTURE_SKEW.as_secs() as i64 {
            return Err(SignatureError::FromTheFuture);
        }
        // Every key is tried even after a match would be found, so timing does not reveal which
        // key (or whether the first) matched; `verify_slice` itself compares in constant time.
        let mut matched = false;
        for key in &self.keys {
            let expected = mac(key.expose_secret().as_bytes(), header.timestamp, body);
            for sig in &header.signatures {
                matched |= expected.clone().verify_slice(sig).is_ok();
            }
        }
        if matched { Ok(()) } else { Err(SignatureError::Mismatch) }
    }
}

impl std::fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookVerifier")
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_765_000_000;

    fn verifier(keys: &[&str]) -> WebhookVerifier {
        WebhookVerifier::new(keys.iter().map(|k| SecretString::from(k.to_string())).collect(), Duration::from_secs(180))
    }

    #[test]
    fn a_body_signed_with_the_configured_key_verifies() {
        let header = sign(b"key-1", NOW, b"{\"event\":\"invitee.created\"}");
        assert_eq!(verifier(&["key-1"]).verify(Some(&header), b"{\"event\":\"invitee.created\"}", NOW), Ok(()));
    }

    #[test]
    fn the_signature_matches_calendlys_documented_construction() {
        // printf '1700000000.{}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            sign(b"secret", 1_700_000_000, b"{}"),
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
    }

    #[test]
    fn a_second_configured_key_also_verifies() {
        let header = sign(b"new-key", NOW, b"{}");
        assert_eq!(verifier(&["old-key", "new-key"]).verify(Some(&header), b"{}", NOW), Ok(()));
    }

    #[test]
    fn every_rejection_names_its_cause() {
        let v = verifier(&["k"]);
        assert_eq!(v.verify(None, b"{}", NOW), Err(SignatureError::Missing));
        assert_eq!(v.verify(Some("garbage"), b"{}", NOW), Err(SignatureError::Malformed));
        assert_eq!(v.verify(Some(&sign(b"other", NOW, b"{}")), b"{}", NOW), Err(SignatureError::Mismatch));
        assert_eq!(v.verify(Some(&sign(b"k", NOW, b"{}")), b"{ }", NOW), Err(SignatureError::Mismatch));
        assert_eq!(v.verify(Some(&sign(b"k", NOW - 181, b"{}")), b"{}", NOW), Err(SignatureError::Stale));
        assert_eq!(v.verify(Some(&sign(b"k", NOW + 31, b"{}")), b"{}", NOW), Err(SignatureError::FromTheFuture));
        assert_eq!(v.verify(Some(&sign(b"k", NOW - 180, b"{}")), b"{}", NOW), Ok(()));
        assert_eq!(v.verify(Some(&sign(b"k", NOW + 30, b"{}")), b"{}", NOW), Ok(()));
    }

    #[test]
    fn an_empty_configured_key_never_verifies_a_body_signed_with_an_empty_key() {
        let header = sign(b"", NOW, b"{}");
        assert_eq!(verifier(&["", "real"]).verify(Some(&header), b"{}", NOW), Err(SignatureError::Mismatch));
    }

    #[test]
    fn header_with_several_v1_entries_verifies_when_any_matches() {
        let good = sign(b"k", NOW, b"{}");
        let good_sig = good.split("v1=").nth(1).unwrap();
        let header = format!("t={NOW},v1={},v1={good_sig}", "0".repeat(64));
        assert_eq!(verifier(&["k"]).verify(Some(&header), b"{}", NOW), Ok(()));
    }

    proptest! {
        #[test]
        fn the_header_parser_never_panics_on_arbitrary_input(input in ".*") {
            let _ = input.parse::<SignatureHeader>();
        }

        #[test]
        fn the_header_parser_never_panics_on_header_like_input(
            t in "[0-9a-z-]{0,20}", v in "[0-9a-fA-F]{0,80}", extra in "[,= tv1]{0,6}"
        ) {
            let _ = format!("t={t},v1={v}{extra}").parse::<SignatureHeader>();
        }

        #[test]
        fn any_body_signed_with_the_key_verifies_and_any_change_does_not(
            body in proptest::collection::vec(any::<u8>(), 0..512), flip in any::<usize>()
        ) {
            let v = verifier(&["k"]);
            let header = sign(b"k", NOW, &body);
            prop_assert_eq!(v.verify(Some(&header), &body, NOW), Ok(()));
            if !body.is_empty() {
                let mut changed = body.clone();
                let i = flip % changed.len();
                changed[i] ^= 0x01;
                prop_assert_eq!(v.verify(Some(&header), &changed, NOW), Err(SignatureError::Mismatch));
            }
        }
    }
}
