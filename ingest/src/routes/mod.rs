pub mod body;
pub mod changes;
pub mod connect;
pub mod webhooks;
