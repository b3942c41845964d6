//! The real `calsync-worker` binary: killed mid-flight it loses nothing and duplicates nothing;
//! on SIGTERM it finishes or requeues its in-flight deliveries and exits 0; `migrate` migrates.

mod support;

use std::time::Duration;

use calendly_sim::Faults;
use sqlx::PgPool;
use support::*;
use tokio::process::{Child, Command};

fn spawn_worker(h: &Harness) -> Child {
    spawn_worker_with(h, &[])
}

fn spawn_worker_with(h: &Harness, extra: &[&str]) -> Child {
    h.spawn_worker_process(extra)
}

async fn processed(h: &Harness) -> i64 {
    h.count("SELECT count(*) FROM webhook_inbox WHERE status = 'processed'").await
}

/// Books `bookings` meetings, publishes their webhooks to a worker started with `flags`, SIGKILLs it
/// once `done_before_kill` are processed, and checks that a restarted worker ends with every row
/// exactly once.
async fn kill_and_restart(h: Harness, bookings: usize, flags: &[&str], done_before_kill: i64) {
    let ada = h.connect("Ada").await;
    for _ in 0..bookings {
        h.book(&ada, 1);
    }
    let bodies = h.captured();
    let mut first = spawn_worker_with(&h, flags);
    let ids = h.publish_all(&bodies).await;
    calsync_testkit::wait_until(DEADLINE, "some deliveries processed", || async {
        processed(&h).await >= done_before_kill
    })
    .await;

    first.kill().await.unwrap(); // SIGKILL
    let done_before_restart = processed(&h).await;
    let mut second = spawn_worker(&h);
    h.wait_for_inbox(&ids, &["processed"]).await;

    assert!((done_before_restart as usize) < bookings, "the kill happened with work outstanding");
    assert_eq!(h.meetings(ada.app_user).await.len(), bookings);
    assert_eq!(h.count("SELECT count(*) FROM meeting_invitees").await, bookings as i64);
    assert_eq!(h.count("SELECT count(*) FROM webhook_inbox").await, bookings as i64);
    second.kill().await.unwrap();
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_worker_killed_with_deliveries_in_flight_loses_none_and_duplicates_none_after_restart(pool: PgPool) {
    let h = Harness::new(pool).await;
    // Slow Calendly: many deliveries are mid-fetch when the worker dies.
    h.sim.sim.set_faults(Faults { latency_ms: 150, ..Faults::default() });
    kill_and_restart(h, 40, &[], 3).await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_worker_killed_in_the_middle_of_a_batch_loses_none_and_duplicates_none_after_restart(pool: PgPool) {
    // Batches of 32 that wait up to 400 ms to fill: at any moment a batch is most likely being
    // gathered or committed, with its deliveries fetched but unacknowledged.
    let flags = ["--worker-concurrency=64", "--worker-batch-size=32", "--worker-batch-max-wait-ms=400"];
    kill_and_restart(Harness::new(pool).await, 200, &flags, 1).await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn sigterm_finishes_or_requeues_in_flight_deliveries_and_exits_zero(pool: PgPool) {
    let h = Harness::new(pool).await;
    let ada = h.connect("Ada").await;
    for _ in 0..30 {
        h.book(&ada, 1);
    }
    let bodies = h.captured();
    h.sim.sim.set_faults(Faults { latency_ms: 200, ..Faults::default() });
    let mut worker = spawn_worker(&h);
    let ids = h.publish_all(&bodies).await;
    calsync_testkit::wait_until(DEADLINE, "work started", || async { processed(&h).await >= 1 }).await;

    let pid = worker.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().await.unwrap().success());
    let exit =
        tokio::time::timeout(Duration::from_secs(30), worker.wait()).await.expect("exits after SIGTERM").unwrap();

    assert_eq!(exit.code(), Some(0));
    let remaining = h.topology.depth(&h.topology.topology.webhooks_queue()).await as i64;
    let done = processed(&h).await;
    assert!(done >= 1);
    let mut next = spawn_worker(&h);
    h.wait_for_inbox(&ids, &["processed"]).await;
    assert_eq!(h.meetings(ada.app_user).await.len(), 30, "{done} done + {remaining} requeued = all 30");
    next.kill().await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn a_worker_without_oauth_client_credentials_refuses_to_start_naming_the_setting() {
    let key = calsync_common::crypto::generate_key();
    let output = Command::new(env!("CARGO_BIN_EXE_calsync-worker"))
        .args(["--worker-addr=127.0.0.1:0", "--database-url=postgres://127.0.0.1:9/none"])
        .env("TOKEN_ENCRYPTION_KEY", key)
        .env_remove("CALENDLY_OAUTH_CLIENT_ID")
        .env("CALENDLY_OAUTH_CLIENT_SECRET", "secret")
        .output()
        .await
        .unwrap();

    assert_eq!(output.status.code(), Some(2), "refused to start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("CALENDLY_OAUTH_CLIENT_ID is not set"), "{stderr}");
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn the_migrate_subcommand_creates_the_database_and_applies_the_schema(pool: PgPool) {
    let name = format!("calsync_migrate_{}", uuid::Uuid::new_v4().simple());
    let mut url = url::Url::parse(&database_url(&pool)).unwrap();
    url.set_path(&name);

    let output = Command::new(env!("CARGO_BIN_EXE_calsync-worker"))
        .arg("migrate")
        .env("DATABASE_URL", url.as_str())
        .output()
        .await
        .unwrap();

    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let check = sqlx::PgPool::connect(url.as_str()).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN \
         ('calendar_connections','meetings','meeting_invitees','webhook_inbox','oauth_states')",
    )
    .fetch_one(&check)
    .await
    .unwrap();
    assert_eq!(tables, 5);
    check.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name}"))).execute(&pool).await.unwrap();
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_worker_started_without_its_database_reports_it_down_in_its_metrics_until_it_is_back(pool: PgPool) {
    let h = Harness::new(pool).await;
    let proxy = calsync_testkit::TcpProxy::start(calsync_testkit::postgres_addr(&h.db_url)).await;
    proxy.cut();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let through = format!("--database-url={}", proxy.url_through(&h.db_url));
    let mut worker = spawn_worker_with(&h, &[&through, &format!("--worker-addr={addr}")]);
    // The alert on `calsync_worker_database_up == 0` needs the series to exist while the database
    // has never been reachable, not only after an outage that began later.
    let says = |value: &'static str| {
        let line = format!("calsync_worker_database_up {value}");
        async move { metrics_if_up(addr).await.is_some_and(|text| text.lines().any(|l| l == line)) }
    };
    calsync_testkit::wait_until(DEADLINE, "the worker saying its database is down", || says("0")).await;
    proxy.restore();
    calsync_testkit::wait_until(DEADLINE, "the worker saying its database is back", || says("1")).await;
    worker.kill().await.unwrap();
    h.stop().await;
}

/// The worker's `/metrics`, or `None` while it is not listening yet.
async fn metrics_if_up(addr: std::net::SocketAddr) -> Option<String> {
    let response = reqwest::get(format!("http://{addr}/metrics")).await.ok()?;
    response.text().await.ok()
}
