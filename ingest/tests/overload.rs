//! Overload and slow clients: past `INGEST_MAX_IN_FLIGHT` requests are shed with 503 at once, and a
//! client that does not finish its headers or body within `INGEST_REQUEST_TIMEOUT_SECS` is cut off,
//! so neither a flood nor a slow client can hold ingest (or its shutdown) hostage.

mod support;

use std::time::Duration;

use calsync_common::calendly::signature;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a connection and sends a webhook request's headers (announcing a 100-byte body) and
/// `body_bytes` of it, then stalls.
async fn half_sent(app: &TestApp, headers_complete: bool, body_bytes: usize) -> TcpStream {
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let mut request = format!(
        "POST /webhooks/calendly HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{}: {}\r\nContent-Length: 100\r\n",
        app.addr,
        signature::HEADER,
        signed(KEY, &[b'x'; 100]),
    );
    if headers_complete {
        request.push_str("\r\n");
        request.push_str(&"x".repeat(body_bytes));
    }
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Everything the server sends until it closes the connection.
async fn read_until_closed(stream: &mut TcpStream, deadline: Duration) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(deadline, stream.read_to_end(&mut answer))
        .await
        .expect("ingest closes the connection in time")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn requests_past_the_in_flight_limit_are_shed_with_503_at_once_and_the_slots_come_back() {
    let app = spawn_app_with(Options { extra: vec!["--ingest-max-in-flight=2".into()], ..Options::default() }).await;
    let stalled = [half_sent(&app, true, 10).await, half_sent(&app, true, 10).await];

    let mut shed = None;
    for n in 0..200 {
        let body = sample_body(n);
        let response = app.post_webhook(&body, Some(signed(KEY, &body))).await;
        if response.status() == 503 {
            shed = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shed = shed.expect("with both slots held, a third request is shed");
    assert!(shed.headers().contains_key("retry-after"));
    let answer: serde_json::Value = shed.json().await.unwrap();
    assert_eq!(answer["error"], "overloaded");
    assert!(metric(&app, r#"calsync_ingest_requests_total{outcome="overloaded"}"#).await >= 1.0);

    drop(stalled);
    let body = sample_body(1_000);
    calsync_testkit::wait_until(Duration::from_secs(10), "a slot to free up", || async {
        app.post_webhook(&body, Some(signed(KEY, &body))).await.status() == 202
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_sends_its_headers_or_its_body_too_slowly_is_cut_off_and_nothing_is_queued() {
    let app =
        spawn_app_with(Options { extra: vec!["--ingest-request-timeout-secs=1".into()], ..Options::default() }).await;

    let mut slow_headers = half_sent(&app, false, 0).await;
    let mut slow_body = half_sent(&app, true, 10).await;

    let headers_answer = read_until_closed(&mut slow_headers, Duration::from_secs(5)).await;
    let body_answer = read_until_closed(&mut slow_body, Duration::from_secs(5)).await;
    assert!(!headers_answer.contains(" 202 "), "{headers_answer}");
    assert!(body_answer.starts_with("HTTP/1.1 4"), "a 4xx answer, never 202 or 410: {body_answer}");
    assert!(!body_answer.starts_with("HTTP/1.1 410"));
    assert_eq!(app.webhooks_depth().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_client_that_never_finishes_its_request() {
    let app =
        spawn_app_with(Options { extra: vec!["--ingest-request-timeout-secs=1".into()], ..Options::default() }).await;
    let _stalled = [half_sent(&app, false, 0).await, half_sent(&app, true, 10).await];
    tokio::time::sleep(Duration::from_millis(100)).await;

    app.shutdown.cancel();

    tokio::time::timeout(Duration::from_secs(5), app.server)
        .await
        .expect("ingest stops within its request timeout, not when the client pleases")
        .unwrap()
        .unwrap();
    app.topology.cleanup().await;
}

#[tokio::test]
async fn connections_past_the_cap_get_a_503_at_once_so_a_flood_cannot_grow_memory() {
    let app = spawn_app_with(Options { extra: vec!["--ingest-max-in-flight=1".into()], ..Options::default() }).await;
    // The cap is the in-flight limit plus 64 idle keep-alive connections: hold all 65.
    let mut held = Vec::new();
    for _ in 0..65 {
        held.push(half_sent(&app, false, 0).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let body = sample_body(7);
    let refused = app.post_webhook(&body, Some(signed(KEY, &body))).await;

    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "5");
    let answer: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(answer["error"], "overloaded");
    drop(held);
    calsync_testkit::wait_until(Duration::from_secs(10), "connections to be accepted again", || async {
        app.post_webhook(&body, Some(signed(KEY, &body))).await.status() == 202
    })
    .await;
    app.stop().await;
}

/// Sends `request`'s head announcing a 100-byte body, then the body one byte every 300 ms (30 s in
/// all) until the server stops reading; returns what the server answered and whether the body was
/// still being sent when it did.
async fn trickle(app: &TestApp, head: &str) -> (String, bool) {
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(format!("{head}Host: {}\r\nContent-Length: 100\r\n\r\n", app.addr).as_bytes()).await.unwrap();
    let sending = tokio::spawn(async move {
        for _ in 0..100 {
            if writer.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(25), reader.read(&mut answer))
        .await
        .expect("ingest answers before the trickled body is complete")
        .unwrap();
    let still_sending = !sending.is_finished();
    sending.abort();
    (String::from_utf8_lossy(&answer[..n]).into_owned(), still_sending)
}

#[tokio::test]
async fn a_connection_api_request_without_the_bearer_token_is_refused_before_its_body_is_read() {
    // A long body deadline: only a check made before reading the body can answer in time.
    let app = spawn_app_with(Options {
        extra: vec!["--ingest-request-timeout-secs=60".into(), "--internal-api-token=secret-token".into()],
        ..Options::default()
    })
    .await;

    let (answer, still_sending) =
        trickle(&app, "POST /connections/calendly HTTP/1.1\r\nContent-Type: application/json\r\n").await;

    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(still_sending, "answered while the body was still arriving");
    app.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_body_trickled_a_byte_at_a_time_is_cut_off_at_the_request_deadline_on_every_route(pool: sqlx::PgPool) {
    let app = spawn_app_with(Options {
        database_url: calsync_testkit::test_database_url(&pool),
        extra: vec!["--ingest-request-timeout-secs=2".into(), "--internal-api-token=secret-token".into()],
        ..Options::default()
    })
    .await;
    let status_url = app.url("/connections/calendly/00000000-0000-0000-0000-000000000001");
    calsync_testkit::wait_until(Duration::from_secs(30), "the connection API to have its database", || async {
        app.http.get(&status_url).bearer_auth("secret-token").send().await.unwrap().status() == 404
    })
    .await;
    let signature = signed(KEY, &[b'x'; 100]);
    let timeouts = r#"calsync_ingest_requests_total{outcome="timeout"}"#;
    let timeouts_before = metric(&app, timeouts).await;

    let (webhook, webhook_sending) = trickle(
        &app,
        &format!(
            "POST /webhooks/calendly HTTP/1.1\r\nContent-Type: application/json\r\n{}: {signature}\r\n",
            signature::HEADER
        ),
    )
    .await;
    let (api, api_sending) = trickle(
        &app,
        "POST /connections/calendly/00000000-0000-0000-0000-000000000001/confirm HTTP/1.1\r\n\
         Authorization: Bearer secret-token\r\nContent-Type: application/json\r\n",
    )
    .await;

    for (answer, sending) in [(&webhook, webhook_sending), (&api, api_sending)] {
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(sending, "cut off while the body was still arriving");
    }
    assert_eq!(app.webhooks_depth().await, 0);
    // (The recorder is shared by the tests of this binary: at least ours was counted.)
    assert!(metric(&app, timeouts).await >= timeouts_before + 1.0);
    app.stop().await;
}
