//! Outgoing HTTP clients. reqwest is built on rustls with the `ring` provider (smaller and faster
//! to build than aws-lc), which must be installed once per process before a client exists.

/// A reqwest client builder with the TLS provider installed.
pub fn client_builder() -> reqwest::ClientBuilder {
    // Err only means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}
