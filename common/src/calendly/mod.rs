//! Everything that speaks Calendly's wire formats.
//!
//! - [`signature`]: the `Calendly-Webhook-Signature` scheme (parse, verify, sign).

pub mod signature;
