//! Runs calsync end to end with real processes: `calendly-sim`, `calsync-ingest` and N
//! `calsync-worker`s, wired together with generated secrets, then drives a scenario through the
//! real HTTP surfaces (the simulator's control API, ingest's OAuth flow, signed webhook delivery).
//!
//! - [`stack`]: start (or attach to) the processes and stop them cleanly.
//! - [`scenario`]: connect two users, book / cancel / reschedule / no-show, wait for the rows.
//! - [`feed`]: the app's view: the change feed, followed and printed while the story runs.
//! - [`report`]: the readable tables and headline metrics.

pub mod feed;
pub mod report;
pub mod scenario;
pub mod stack;
