//! The real `calsync-ingest` binary: it refuses to start without its secrets, and a SIGTERM with
//! requests in flight loses none of the webhooks it confirmed.

mod support;

use std::process::Stdio;
use std::time::Duration;

use calsync_testkit::IsolatedTopology;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn ingest_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_calsync-ingest"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("INGEST_ADDR", "127.0.0.1:0")
        .env("AMQP_URL", calsync_testkit::amqp_url())
        .env("DATABASE_URL", NO_DATABASE)
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn ingest_refuses_to_start_without_a_signing_key_and_names_the_variable() {
    let output =
        ingest_command().env("TOKEN_ENCRYPTION_KEY", calsync_common::crypto::generate_key()).output().await.unwrap();

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("CALENDLY_WEBHOOK_SIGNING_KEYS"), "{stderr}");
}

#[tokio::test]
async fn ingest_refuses_to_start_with_an_empty_signing_key_in_the_list() {
    let output = ingest_command()
        .env("CALENDLY_WEBHOOK_SIGNING_KEYS", format!("{KEY},"))
        .env("TOKEN_ENCRYPTION_KEY", calsync_common::crypto::generate_key())
        .output()
        .await
        .unwrap();

    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("contains an empty key"));
}

#[tokio::test]
async fn ingest_refuses_to_start_without_a_token_encryption_key_and_names_the_variable() {
    let output = ingest_command().env("CALENDLY_WEBHOOK_SIGNING_KEYS", KEY).output().await.unwrap();

    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("TOKEN_ENCRYPTION_KEY"));
}

/// Reads the JSON log until the "listening" line and returns the bound address.
async fn listening_addr(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"] == "calsync-ingest listening"
            {
                return v["addr"].as_str().unwrap().to_owned();
            }
        }
        panic!("ingest exited before listening");
    })
    .await
    .expect("ingest starts listening");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    addr
}

#[tokio::test]
async fn sigterm_with_requests_in_flight_loses_none_of_the_confirmed_webhooks_and_exits_zero() {
    let topology = IsolatedTopology::new().await;
    let mut child = ingest_command()
        .env("CALENDLY_WEBHOOK_SIGNING_KEYS", KEY)
        .env("TOKEN_ENCRYPTION_KEY", calsync_common::crypto::generate_key())
        .env("AMQP_TOPOLOGY_PREFIX", &topology.prefix)
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut child).await;
    let http = calsync_common::http::client_builder().build().unwrap();
    let url = format!("http://{addr}/webhooks/calendly");
    calsync_testkit::wait_until(Duration::from_secs(10), "ingest ready", || async {
        http.get(format!("http://{addr}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;

    let (first_accepted_tx, first_accepted) = tokio::sync::oneshot::channel::<()>();
    let first_accepted_tx = std::sync::Mutex::new(Some(first_accepted_tx));
    let load = futures_util::future::join_all((0..400).map(|n| {
        let (http, url, tx) = (&http, &url, &first_accepted_tx);
        async move {
            let body = sample_body(50_000 + n);
            let status = http
                .post(url)
                .header(calsync_common::calendly::signature::HEADER, signed(KEY, &body))
                .body(body.clone())
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok();
            if status == Some(202)
                && let Some(tx) = tx.lock().unwrap().take()
            {
                let _ = tx.send(());
            }
            (body, status)
        }
    }));
    let terminate = async {
        first_accepted.await.unwrap();
        let pid = child.id().unwrap().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
        assert!(killed.success());
    };
    let (results, ()) = tokio::join!(load, terminate);
    let exit =
        tokio::time::timeout(Duration::from_secs(15), child.wait()).await.expect("ingest exits after SIGTERM").unwrap();

    assert_eq!(exit.code(), Some(0));
    let accepted: std::collections::HashSet<Vec<u8>> =
        results.iter().filter(|(_, s)| *s == Some(202)).map(|(b, _)| b.clone()).collect();
    assert!(!accepted.is_empty());
    let held: std::collections::HashSet<Vec<u8>> =
        topology.drain(&topology.topology.webhooks_queue()).await.into_iter().map(|m| m.delivery.data).collect();
    assert!(accepted.is_subset(&held), "{} confirmed webhooks missing", accepted.difference(&held).count());
    topology.cleanup().await;
}

/// A local OTLP/HTTP sink: the content type and body of every request to `/v1/traces`.
async fn otlp_sink() -> (String, std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>) {
    use axum::routing::post;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
            let kind = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            store.lock().unwrap().push((kind, body.to_vec()));
            ""
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// Runs ingest with `otel` variables, accepts one webhook, stops it with SIGTERM; returns it exited.
async fn one_webhook_through_ingest(otel: &[(&str, &str)]) {
    let topology = IsolatedTopology::new().await;
    let mut command = ingest_command();
    command
        .env("CALENDLY_WEBHOOK_SIGNING_KEYS", KEY)
        .env("TOKEN_ENCRYPTION_KEY", calsync_common::crypto::generate_key())
        .env("AMQP_TOPOLOGY_PREFIX", &topology.prefix);
    for (name, value) in otel {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let addr = listening_addr(&mut child).await;
    let http = calsync_common::http::client_builder().build().unwrap();
    calsync_testkit::wait_until(Duration::from_secs(10), "ingest ready", || async {
        http.get(format!("http://{addr}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let body = sample_body(70_001);
    let response = http
        .post(format!("http://{addr}/webhooks/calendly"))
        .header(calsync_common::calendly::signature::HEADER, signed(KEY, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().await.unwrap().success());
    let exit = tokio::time::timeout(Duration::from_secs(15), child.wait()).await.expect("ingest exits").unwrap();
    assert_eq!(exit.code(), Some(0));
    topology.cleanup().await;
}

#[tokio::test]
async fn with_an_otlp_endpoint_set_ingest_exports_its_spans_as_protobuf_over_http_and_without_it_nothing() {
    let (url, received) = otlp_sink().await;
    one_webhook_through_ingest(&[]).await;
    assert!(received.lock().unwrap().is_empty(), "no endpoint set: nothing is exported");

    one_webhook_through_ingest(&[("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str())]).await;
    // The spans still buffered are flushed on the way out (SIGTERM), so they are here by now.
    let received = received.lock().unwrap();
    assert!(!received.is_empty(), "the spans were exported");
    let body = received.iter().flat_map(|(_, body)| body.clone()).collect::<Vec<u8>>();
    assert!(received.iter().all(|(kind, _)| kind == "application/x-protobuf"), "OTLP/HTTP protobuf");
    let contains = |needle: &str| body.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(contains("calsync-ingest"), "service.name is the binary's name");
    assert!(contains("POST /webhooks/calendly") && contains("publish calsync"), "the request and publish spans");
    assert!(!contains(KEY), "no signing key in what is exported");
}

#[tokio::test]
async fn a_malformed_otlp_endpoint_leaves_traces_off_and_ingest_accepting_webhooks() {
    // Accepts a webhook (202) and exits 0 on SIGTERM: the exporter's error only turns traces off.
    one_webhook_through_ingest(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "::not a url")]).await;
}
