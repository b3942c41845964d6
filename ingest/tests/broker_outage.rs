//! Broker outages seen through a TCP proxy we can cut: fast 503s while down, recovery without a
//! restart, and never a 202 for a message the broker does not hold.

mod support;

use std::time::{Duration, Instant};

use calsync_testkit::{TcpProxy, wait_until};
use support::*;

/// Ingest reaching RabbitMQ through `proxy`, ready.
async fn app_behind(proxy: &TcpProxy) -> TestApp {
    let app =
        spawn_app_with(Options { amqp_url: proxy.url_through(&calsync_testkit::amqp_url()), ..Options::default() })
            .await;
    wait_until(Duration::from_secs(10), "ingest ready through the proxy", || async {
        app.http.get(app.url("/readyz")).send().await.unwrap().status() == 200
    })
    .await;
    app
}

#[tokio::test]
async fn while_the_broker_is_unreachable_webhooks_get_a_fast_503_and_recover_without_a_restart() {
    let proxy = TcpProxy::start(calsync_testkit::amqp_addr()).await;
    let app = app_behind(&proxy).await;
    let before = sample_body(10);
    assert_eq!(app.post_webhook(&before, Some(signed(KEY, &before))).await.status(), 202);

    proxy.cut();
    wait_until(Duration::from_secs(5), "readiness reports the broker down", || async {
        app.http.get(app.url("/readyz")).send().await.unwrap().status() == 503
    })
    .await;
    let during = sample_body(11);
    let started = Instant::now();
    let response = app.post_webhook(&during, Some(signed(KEY, &during))).await;
    let took = started.elapsed();

    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "broker_unavailable");
    assert!(took < Duration::from_secs(2), "503 took {took:?}");

    proxy.restore();
    wait_until(Duration::from_secs(20), "ingest accepts again after the broker returns", || async {
        let body = sample_body(12);
        app.post_webhook(&body, Some(signed(KEY, &body))).await.status() == 202
    })
    .await;

    // Exactly the two accepted deliveries are held; the refused one is not.
    let messages = app.topology.drain(&app.topology.topology.webhooks_queue()).await;
    let bodies: Vec<Vec<u8>> = messages.into_iter().map(|m| m.delivery.data).collect();
    assert_eq!(bodies, vec![before, sample_body(12)]);
    app.stop().await;
}

#[tokio::test]
async fn a_broker_that_never_answered_at_start_still_lets_ingest_start_and_answer_503() {
    let proxy = TcpProxy::start(calsync_testkit::amqp_addr()).await;
    proxy.cut();
    let app =
        spawn_app_with(Options { amqp_url: proxy.url_through(&calsync_testkit::amqp_url()), ..Options::default() })
            .await;

    let body = sample_body(13);
    let response = app.post_webhook(&body, Some(signed(KEY, &body))).await;
    assert_eq!(response.status(), 503);
    assert_eq!(app.http.get(app.url("/readyz")).send().await.unwrap().status(), 503);

    proxy.restore();
    wait_until(Duration::from_secs(20), "ingest connects once the broker is reachable", || async {
        app.http.get(app.url("/readyz")).send().await.unwrap().status() == 200
    })
    .await;
    assert_eq!(app.post_webhook(&body, Some(signed(KEY, &body))).await.status(), 202);
    assert_eq!(app.webhooks_depth().await, 1);
    app.stop().await;
}

#[tokio::test]
async fn cutting_the_broker_under_load_never_yields_a_202_for_a_message_it_does_not_hold() {
    let proxy = TcpProxy::start(calsync_testkit::amqp_addr()).await;
    let app = app_behind(&proxy).await;

    let send = |n: usize| {
        let app = &app;
        async move {
            let body = sample_body(20_000 + n);
            (body.clone(), app.post_webhook(&body, Some(signed(KEY, &body))).await.status().as_u16())
        }
    };
    let load = futures_util::future::join_all((0..300).map(send));
    let cutter = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.restore();
    };
    let (results, ()) = tokio::join!(load, cutter);

    let accepted: std::collections::HashSet<Vec<u8>> =
        results.iter().filter(|(_, s)| *s == 202).map(|(b, _)| b.clone()).collect();
    assert!(results.iter().all(|(_, s)| *s == 202 || *s == 503), "only 202 or 503");
    wait_until(Duration::from_secs(20), "broker back", || async {
        app.http.get(app.url("/readyz")).send().await.unwrap().status() == 200
    })
    .await;
    let held: std::collections::HashSet<Vec<u8>> = app.queued_bodies().await.into_iter().collect();
    let lost: Vec<_> = accepted.difference(&held).collect();
    assert!(lost.is_empty(), "{} accepted webhooks are not in the queue", lost.len());
    app.stop().await;
}

#[tokio::test]
async fn with_several_nodes_listed_ingest_moves_to_another_when_its_node_goes_away_without_a_restart() {
    // Two "nodes" (proxies to the one local broker): whichever ingest picked first is cut for good.
    let (a, b) =
        (TcpProxy::start(calsync_testkit::amqp_addr()).await, TcpProxy::start(calsync_testkit::amqp_addr()).await);
    let url = calsync_testkit::amqp_url();
    let amqp_url = format!("{},{}", a.url_through(&url), b.url_through(&url));
    let app = spawn_app_with(Options { amqp_url, ..Options::default() }).await;
    wait_until(Duration::from_secs(10), "ingest ready on one of the nodes", || async {
        app.http.get(app.url("/readyz")).send().await.unwrap().status() == 200
    })
    .await;
    let accepted = std::sync::Mutex::new(Vec::new());

    for (round, node) in [&a, &b].into_iter().enumerate() {
        node.cut(); // if ingest was on it, it must move to the other node; if not, nothing changes
        wait_until(Duration::from_secs(20), "webhooks accepted again, on the remaining node", || async {
            let body = sample_body(100 + round);
            let status = app.post_webhook(&body, Some(signed(KEY, &body))).await.status();
            assert!(status == 202 || status == 503, "only 202 or 503, got {status}");
            if status == 202 {
                accepted.lock().unwrap().push(body);
            }
            status == 202
        })
        .await;
        node.restore();
    }

    assert_eq!(
        app.queued_bodies().await,
        accepted.into_inner().unwrap(),
        "every 202 is in the queue, and nothing else"
    );
    app.stop().await;
}
