//! Operator subcommands' work, beside the `calsync-worker` subcommands that call it.
//!
//! - [`rotate_key`]: re-encrypt every stored token with the current key.
//! - [`replay_dead`]: move dead letters back to their work queues.
//! - [`report`]: `connections`, `resync`, `dead`, `forget`.

pub mod replay_dead;
pub mod report;
pub mod rotate_key;
