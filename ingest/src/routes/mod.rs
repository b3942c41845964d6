pub mod connect;
pub mod webhooks;
