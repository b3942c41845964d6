//! Everything that speaks Calendly's wire formats.
//!
//! - [`signature`]: the `Calendly-Webhook-Signature` scheme (parse, verify, sign).
//! - [`types`]: webhook envelope and API payloads, parsed leniently; the one list of events.
//! - [`webhook`]: a webhook body parsed once into a typed [`webhook::Webhook`].
//! - [`client`]: the API and OAuth client, with the SSRF guard on fetched URIs.
//! - [`error`]: Calendly failures sorted by what the caller should do.
//! - [`rate`]: the rate-limit headers of every answer, for the caller's budget.
//! - [`subscription`]: making sure a user has a working subscription (create, reuse, replace).

pub mod client;
pub mod error;
pub mod rate;
pub mod signature;
pub mod subscription;
pub mod types;
pub mod webhook;

pub use client::CalendlyClient;
pub use error::CalendlyError;
