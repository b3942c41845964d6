//! RabbitMQ: the topology both services declare, a self-healing connection with a pool of
//! confirm-mode channels, and the shape of the messages we publish.

pub mod broker;
pub mod message;
pub mod topology;

pub use broker::{Broker, BrokerConfig, PublishError};
pub use message::Outgoing;
pub use topology::{RetryTarget, Topology};
