//! Serving the router over HTTP/1.1 with hyper's own connection settings: `axum::serve` cannot set
//! a header read timeout, and without one a client that sends its headers slowly holds a connection
//! (and delays a graceful shutdown) for as long as it likes. Calendly speaks HTTP/1.1.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What one ingest process allows its clients.
pub struct Limits {
    /// Headers must be complete within this.
    pub header_timeout: Duration,
    /// Open connections at once (an HTTP/1.1 connection carries one request at a time).
    pub max_connections: usize,
    /// How long a graceful shutdown waits for requests in flight before it drops them. Bodies are
    /// bounded by their deadline and publishes by their confirm timeout, but a connection API call
    /// may still be talking to Calendly: a SIGTERM must end in bounded time all the same.
    pub shutdown_grace: Duration,
    /// The largest body a route accepts: a refused connection's request is read (and dropped) up
    /// to this, so its client gets the answer instead of a reset.
    pub max_body_bytes: usize,
}

/// Connections being refused at once (each a small task writing a fixed answer). Past this a
/// connection is closed without an answer: a flood must not turn into unbounded tasks either.
const MAX_REFUSING: usize = 256;

/// The answer to a connection over the cap, written without reading the request: the same JSON
/// error and Retry-After as a shed request.
const OVERLOADED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 5\r\nconnection: close\r\ncontent-length: 83\r\n\r\n\
{\"error\":\"overloaded\",\"message\":\"too many webhook requests in flight; retry later\"}";

async fn refuse(mut stream: TcpStream, max_body_bytes: usize) {
    metrics::counter!("calsync_ingest_requests_total", "outcome" => "overloaded").increment(1);
    // Read (and drop) the request first, briefly and within the body limit: a client still
    // sending when the answer arrives, or a close with unread input (a TCP reset), would lose it.
    let _ = tokio::time::timeout(Duration::from_secs(1), drain_request(&mut stream, max_body_bytes)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(OVERLOADED)).await;
    let _ = stream.shutdown().await;
}

async fn drain_request(stream: &mut TcpStream, max_body_bytes: usize) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let body_start = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let text = String::from_utf8_lossy(&head[..body_start]).to_ascii_lowercase();
    let length = text
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(max_body_bytes);
    let mut left = length.saturating_sub(head.len() - body_start);
    while left > 0 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        left = left.saturating_sub(n);
    }
    Ok(())
}

/// Serves `router` until `shutdown`, then stops accepting and waits for in-flight requests (whose
/// bodies are themselves bounded in time by the router's layers), at most `shutdown_grace`.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, shutdown: CancellationToken) {
    let Limits { header_timeout, max_connections, shutdown_grace, max_body_bytes } = limits;
    let connections = Arc::new(Semaphore::new(max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let mut http = hyper::server::conn::http1::Builder::new();
    // Headers must be complete within the timeout, or hyper closes the connection.
    http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off briefly rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Each open connection costs buffers and a task: past the cap, a connection gets a fixed
        // 503 at once and is closed, so a flood of clients cannot grow memory without bound.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, max_body_bytes).await;
                    drop(refusal);
                });
            } else {
                metrics::counter!("calsync_ingest_requests_total", "outcome" => "overloaded").increment(1);
            }
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(grace = ?shutdown_grace, "requests still in flight after the shutdown grace; dropping them");
    }
}
