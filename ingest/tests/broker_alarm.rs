//! A RabbitMQ resource alarm blocks publishers. Ingest must answer fast 503s while blocked (never
//! pile requests up) and accept again once the alarm clears.
//!
//! The alarm is broker-wide, so this test lives in a binary of its own (cargo runs test binaries
//! one after another) and restores the watermark on every exit path. It needs `rabbitmqctl`
//! (root on the CI machine); without it the test says so and passes vacuously.

mod support;

use std::process::Command;
use std::time::Duration;

use calsync_testkit::wait_until;
use support::*;

fn rabbitmqctl(args: &[&str]) -> Option<String> {
    let out = Command::new("rabbitmqctl").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Puts the watermark back when dropped, even if an assertion failed.
struct Alarm {
    restore: String,
}

impl Alarm {
    fn raise() -> Option<Self> {
        let current = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])?;
        let restore = current.lines().last()?.trim().to_owned();
        restore.parse::<f64>().ok()?;
        rabbitmqctl(&["set_vm_memory_high_watermark", "0"])?;
        Some(Self { restore })
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["set_vm_memory_high_watermark", &self.restore]);
    }
}

#[tokio::test]
async fn while_rabbitmq_blocks_publishers_webhooks_get_fast_503s_and_are_accepted_again_after() {
    let app =
        spawn_app_with(Options { extra: vec!["--ingest-publish-timeout-ms=1000".into()], ..Options::default() }).await;
    let Some(alarm) = Alarm::raise() else {
        eprintln!("rabbitmqctl is not available here; the resource-alarm test cannot raise an alarm");
        app.stop().await;
        return;
    };

    // The first publish meets the alarm: no confirm comes, so the bounded confirm wait answers 503
    // (or RabbitMQ's "blocked" arrived first, and ingest did not publish at all).
    let first = sample_body(1);
    let response = app.post_webhook(&first, Some(signed(KEY, &first))).await;
    assert_eq!(response.status(), 503);
    let code = response.json::<serde_json::Value>().await.unwrap()["error"].clone();
    assert!(code == "broker_timeout" || code == "broker_blocked", "{code}");
    // Once RabbitMQ has said "blocked", ingest answers without publishing (no confirm to wait for:
    // the code says which path answered, whatever the machine's speed).
    wait_until(Duration::from_secs(10), "ingest knows the connection is blocked", || async {
        let body = sample_body(2);
        let response = app.post_webhook(&body, Some(signed(KEY, &body))).await;
        response.status() == 503 && response.json::<serde_json::Value>().await.unwrap()["error"] == "broker_blocked"
    })
    .await;
    assert_eq!(app.http.get(app.url("/readyz")).send().await.unwrap().status(), 503);

    drop(alarm);
    wait_until(Duration::from_secs(30), "accepted again after the alarm clears", || async {
        let body = sample_body(3);
        app.post_webhook(&body, Some(signed(KEY, &body))).await.status() == 202
    })
    .await;
    app.stop().await;
}
