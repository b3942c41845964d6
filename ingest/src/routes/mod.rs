pub mod body;
pub mod connect;
pub mod webhooks;
