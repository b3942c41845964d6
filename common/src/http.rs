//! HTTP plumbing: outgoing clients and the services' listeners. reqwest is built on rustls with the
//! `ring` provider (smaller and faster to build than aws-lc), which must be installed once per
//! process before a client exists.

/// A reqwest client builder with the TLS provider installed.
pub fn client_builder() -> reqwest::ClientBuilder {
    // Err only means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// Binds a service's listener, naming the setting in the error (`INGEST_ADDR 0.0.0.0:8080: address
/// in use` tells the operator what to change).
pub async fn listen(addr: &str, setting: &str) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {setting} {addr}"))
}
