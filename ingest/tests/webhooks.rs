//! `POST /webhooks/calendly` against real RabbitMQ: what is accepted, what is refused, and that
//! nothing is ever queued without a 202 or answered 202 without being queued.

mod support;

use std::time::Duration;

use calsync_common::calendly::signature::sign;
use calsync_common::queue::message::{RECEIVED_AT_MS_HEADER, int_header, message_id};
use support::*;

#[tokio::test]
async fn valid_delivery_is_accepted_and_its_exact_bytes_are_queued_with_the_contract_properties() {
    let app = spawn_app().await;
    // Odd spacing and key order: ingest must not re-serialise.
    let body = br#"{ "event":"invitee.created",  "created_by":"https://api.calendly.com/users/U1","created_at":"2025-12-17T01:59:35.000000Z","payload":{"x":[1, 2]} }"#;

    let response = app.post_webhook(body, Some(signed(KEY, body))).await;

    assert_eq!(response.status(), 202);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["message_id"], message_id(body));
    let messages = app.topology.drain(&app.topology.topology.webhooks_queue()).await;
    assert_eq!(messages.len(), 1);
    let delivery = &messages[0].delivery;
    assert_eq!(delivery.data, body.to_vec());
    assert_eq!(delivery.routing_key.as_str(), "webhook.calendly.invitee.created");
    let props = &delivery.properties;
    assert_eq!(props.delivery_mode(), &Some(2));
    assert_eq!(props.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
    assert_eq!(props.message_id().as_ref().map(|s| s.as_str().to_owned()), Some(message_id(body)));
    let ts = props.timestamp().expect("timestamp set") as i64;
    assert!((now() - ts).abs() <= 5, "timestamp is the receive time in seconds");
    assert!(int_header(props, RECEIVED_AT_MS_HEADER).is_some());
    app.stop().await;
}

#[tokio::test]
async fn a_body_without_a_readable_event_is_still_kept_under_the_unknown_routing_key() {
    let app = spawn_app().await;
    let body = b"this is not json, but it is authentic";

    let response = app.post_webhook(body, Some(signed(KEY, body))).await;

    assert_eq!(response.status(), 202);
    let messages = app.topology.drain(&app.topology.topology.webhooks_queue()).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].delivery.routing_key.as_str(), "webhook.calendly.unknown");
    assert_eq!(messages[0].delivery.data, body.to_vec());
    app.stop().await;
}

#[tokio::test]
async fn a_body_signed_with_the_second_configured_key_is_accepted() {
    let app = spawn_app().await;
    let body = sample_body(1);

    let response = app.post_webhook(&body, Some(signed(SECOND_KEY, &body))).await;

    assert_eq!(response.status(), 202);
    assert_eq!(app.webhooks_depth().await, 1);
    app.stop().await;
}

#[tokio::test]
async fn every_unauthentic_delivery_is_answered_401_with_a_json_reason_and_nothing_is_queued() {
    let app = spawn_app().await;
    let body = sample_body(2);
    let cases: Vec<(&str, Vec<u8>, Option<String>, &str)> = vec![
        ("wrong key", body.clone(), Some(signed("not-our-key", &body)), "invalid_signature"),
        ("missing header", body.clone(), None, "missing_signature"),
        ("garbled header", body.clone(), Some("t=abc;v1=zz".into()), "malformed_signature"),
        ("stale timestamp", body.clone(), Some(sign(KEY.as_bytes(), now() - 181, &body)), "stale_signature"),
        ("future timestamp", body.clone(), Some(sign(KEY.as_bytes(), now() + 60, &body)), "future_signature"),
        ("body changed after signing", sample_body(3), Some(signed(KEY, &body)), "invalid_signature"),
    ];

    for (case, body, signature, code) in cases {
        let response = app.post_webhook(&body, signature).await;
        assert_eq!(response.status(), 401, "{case}");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["error"], code, "{case}");
        assert!(answer["message"].is_string(), "{case}");
    }

    assert_eq!(app.webhooks_depth().await, 0);
    assert!(metric(&app, r#"calsync_ingest_requests_total{outcome="unauthorized"}"#).await >= 6.0);
    app.stop().await;
}

#[tokio::test]
async fn a_body_over_256_kib_is_answered_413_in_json_and_nothing_is_queued() {
    let app = spawn_app().await;
    let body = vec![b' '; 256 * 1024 + 1];

    let response = app.post_webhook(&body, Some(signed(KEY, &body))).await;

    assert_eq!(response.status(), 413);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "payload_too_large");
    assert_eq!(app.webhooks_depth().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn many_concurrent_deliveries_each_get_202_and_each_is_queued_once() {
    let app = spawn_app().await;

    let responses = futures_util::future::join_all((0..200).map(|n| {
        let body = sample_body(1000 + n);
        let signature = signed(KEY, &body);
        let app = &app;
        async move { app.post_webhook(&body, Some(signature)).await.status().as_u16() }
    }))
    .await;

    assert!(responses.iter().all(|s| *s == 202), "{responses:?}");
    assert_eq!(app.webhooks_depth().await, 200);
    app.stop().await;
}

#[tokio::test]
async fn health_is_ok_and_readiness_reports_the_broker_up_and_the_database_down() {
    let app = spawn_app().await;

    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();

    assert_eq!(health.status(), 200);
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["broker"], "up");
    assert_eq!(body["database"], "down");
    app.stop().await;
}

// An empty database of its own: ingest applies the schema itself. (Never DATABASE_URL's own
// database: that is the server's maintenance database, which sqlx only keeps its bookkeeping in.)
#[sqlx::test(migrations = false)]
async fn readiness_reports_the_database_up_once_it_is_migrated(pool: sqlx::PgPool) {
    let database_url = calsync_testkit::test_database_url(&pool);
    let app = spawn_app_with(Options { database_url, ..Options::default() }).await;

    calsync_testkit::wait_until(Duration::from_secs(30), "database reported up", || async {
        let body: serde_json::Value = app.http.get(app.url("/readyz")).send().await.unwrap().json().await.unwrap();
        body["database"] == "up"
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn metrics_count_accepted_requests_and_publish_latency() {
    let app = spawn_app().await;
    let before = metric(&app, r#"calsync_ingest_requests_total{outcome="accepted"}"#).await;
    let body = sample_body(4);

    assert_eq!(app.post_webhook(&body, Some(signed(KEY, &body))).await.status(), 202);

    assert!(metric(&app, r#"calsync_ingest_requests_total{outcome="accepted"}"#).await >= before + 1.0);
    assert!(metric(&app, "calsync_ingest_publish_seconds_count").await >= 1.0);
    app.stop().await;
}
