pub mod connect;
pub mod health;
pub mod webhooks;
