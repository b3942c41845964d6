//! Operator subcommands' work, one command per file, beside the `calsync-worker` subcommands
//! that call it.
//!
//! - [`rotate_key`]: re-encrypt every stored token with the current key.
//! - [`replay_dead`]: move dead letters back to their work queues.
//! - [`connections`]: one line per connection.
//! - [`resync`]: queue a full resync of one connection.
//! - [`dead`]: list dead letters without touching them.
//! - [`dead_letter_policy`]: the RabbitMQ policy that expires dead letters.
//! - [`forget`]: erase one invitee's personal data.
//! - [`import`]: move an existing integration's connections in.

pub mod connections;
pub mod dead;
pub mod dead_letter_policy;
pub mod forget;
pub mod import;
pub mod replay_dead;
pub mod resync;
pub mod rotate_key;
