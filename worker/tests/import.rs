//! `calsync-worker import-connections`, run as the real binary against a seed-shaped source
//! database the test creates, real PostgreSQL and RabbitMQ, and the simulator as Calendly.

mod support;

use std::collections::BTreeMap;

use calendly_sim::NewUser;
use calsync_common::db::connections::{self, ACCESS_TOKEN, REFRESH_TOKEN, binding};
use calsync_testkit::seed::{SeedDatabase, SeedRow};
use secrecy::ExposeSecret;
use serde_json::Value;
use sqlx::PgPool;
use support::*;
use uuid::Uuid;

/// Where imported subscriptions point (the simulator captures instead of delivering).
const INGEST_URL: &str = "http://127.0.0.1:9/webhooks/calendly";

struct Run {
    ok: bool,
    stdout: String,
    /// stdout and stderr together: what is scanned for tokens.
    everything: String,
}

/// Runs `calsync-worker import-connections --from <seed> <flags…>` on the harness.
async fn import(h: &Harness, seed: &SeedDatabase, flags: &[&str]) -> Run {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_calsync-worker"))
        .args(h.worker_args().into_iter().skip(1))
        .arg(format!("--calendly-webhook-callback-url={INGEST_URL}"))
        .arg("import-connections")
        .env("IMPORT_SOURCE_DATABASE_URL", &seed.url)
        .args(flags)
        .env("RUST_LOG", "info")
        .output()
        .await
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned());
    Run { ok: output.status.success(), everything: format!("{stdout}\n{stderr}"), stdout }
}

fn line_of(run: &Run, user: Uuid) -> &str {
    run.stdout
        .lines()
        .find(|l| l.starts_with(&user.to_string()))
        .unwrap_or_else(|| panic!("no line for {user}:\n{}", run.stdout))
}

/// A simulated Calendly user and a token pair for them, as the old integration held it.
fn calendly_user(h: &Harness, name: &str) -> (Value, String, String) {
    let user = h.sim.sim.create_user(NewUser::named(name)).unwrap();
    let tokens = h.sim.sim.grant_tokens(user["uri"].as_str().unwrap()).unwrap();
    (user, tokens["access_token"].as_str().unwrap().to_owned(), tokens["refresh_token"].as_str().unwrap().to_owned())
}

fn uris(user: &Value) -> (&str, &str) {
    (user["uri"].as_str().unwrap(), user["current_organization"].as_str().unwrap())
}

fn total_calls(h: &Harness) -> u64 {
    h.sim.sim.counters_json()["calls"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum()
}

/// `(user_id, status, calendly_user_uri, reauth_reason)` of every connection.
async fn connections_here(h: &Harness) -> BTreeMap<Uuid, (String, Option<String>, Option<String>)> {
    let rows: Vec<(Uuid, String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT user_id, status, calendly_user_uri, reauth_reason FROM calendar_connections")
            .fetch_all(&h.pool)
            .await
            .unwrap();
    rows.into_iter().map(|(u, s, uri, r)| (u, (s, uri, r))).collect()
}

/// `(kind, reason, cause)` of every change of `user`, in order.
async fn changes_of(h: &Harness, user: Uuid) -> Vec<(String, Option<String>, String)> {
    sqlx::query_as("SELECT kind, reason, cause FROM change_log WHERE user_id = $1 ORDER BY seq")
        .bind(user)
        .fetch_all(&h.pool)
        .await
        .unwrap()
}

/// Every token calsync holds, decrypted.
async fn tokens_here(h: &Harness) -> Vec<String> {
    let mut tokens = Vec::new();
    for c in connections::all(&h.pool).await.unwrap() {
        for (column, sealed) in [(ACCESS_TOKEN, &c.access_token), (REFRESH_TOKEN, &c.refresh_token)] {
            if let Some(sealed) = sealed {
                tokens.push(h.cipher.decrypt(sealed, binding(c.id, column)).unwrap().expose_secret().to_owned());
            }
        }
    }
    tokens
}

fn assert_no_token(run: &Run, tokens: &[String]) {
    for token in tokens {
        assert!(!run.everything.contains(token.as_str()), "a token was printed:\n{}", run.everything);
    }
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn an_import_moves_verified_users_in_prompts_the_unverifiable_leaves_owned_ones_alone_and_a_rerun_spends_nothing(
    pool: PgPool,
) {
    let mut h = Harness::new(pool).await;
    h.start_worker(&[]).await;
    let seed = SeedDatabase::create(&h.db_url).await;
    // Ada: URIs stored. Bob: a row from before the seed's fix (no URIs). Cy: an expired access
    // token, and a stored URI that is not his. Dee: removed the app at Calendly (grant revoked).
    let (ada, ada_access, ada_refresh) = calendly_user(&h, "Ada");
    let (bob, bob_access, bob_refresh) = calendly_user(&h, "Bob");
    let (cy, cy_access, cy_refresh) = calendly_user(&h, "Cy");
    let (dee, dee_access, dee_refresh) = calendly_user(&h, "Dee");
    h.sim.sim.expire_tokens(uris(&cy).0).unwrap();
    h.sim.sim.revoke_tokens(uris(&dee).0).unwrap();
    // Eve's Calendly account is connected here to another app user; Fay's app user connected here
    // on her own.
    let eve_here = h.connect("Eve").await;
    let eve_tokens = h.sim.sim.grant_tokens(&eve_here.uri).unwrap();
    let fay_here = h.connect("Fay").await;
    let fay_tokens = h.sim.sim.grant_tokens(&fay_here.uri).unwrap();
    let fay_before = connections::find(&h.pool, fay_here.connection_id).await.unwrap().unwrap();
    let (a, b, c, d, e) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let token = |t: &Value, k: &str| t[k].as_str().unwrap().to_owned();
    let mut google = SeedRow::calendly(Uuid::new_v4(), "google-access-token", "google-refresh-token");
    google.provider = "google".into();
    let (gus, gus_access, gus_refresh) = calendly_user(&h, "Gus");
    let inactive = SeedRow { is_active: false, ..SeedRow::calendly(Uuid::new_v4(), &gus_access, &gus_refresh) }
        .with_uris(uris(&gus).0, uris(&gus).1);
    seed.insert(&[
        SeedRow::calendly(a, &ada_access, &ada_refresh).with_uris(uris(&ada).0, uris(&ada).1),
        SeedRow::calendly(b, &bob_access, &bob_refresh),
        SeedRow::calendly(c, &cy_access, &cy_refresh).with_uris(uris(&ada).0, uris(&cy).1),
        SeedRow::calendly(d, &dee_access, &dee_refresh).with_uris(uris(&dee).0, uris(&dee).1),
        SeedRow::calendly(e, &token(&eve_tokens, "access_token"), &token(&eve_tokens, "refresh_token")),
        SeedRow::calendly(fay_here.app_user, &token(&fay_tokens, "access_token"), &token(&fay_tokens, "refresh_token")),
        google,
        inactive,
    ])
    .await;
    let source_before = seed.snapshot().await;
    let mut source_tokens = vec![ada_access, ada_refresh, bob_access, bob_refresh, cy_access, cy_refresh];
    source_tokens.extend([dee_access, dee_refresh, gus_access, gus_refresh, "google-access-token".into()]);
    // A delivery for Ada's account that arrived before she was connected here: parked, `unmatched`.
    h.sim.sim.subscribe(uris(&ada).0, CAPTURE_URL).unwrap();
    h.sim
        .sim
        .book(calendly_sim::Booking {
            user: uris(&ada).0.to_owned(),
            name: Some("Booked before the move".into()),
            start_time: None,
            duration_minutes: Some(30),
            invitees: vec![calendly_sim::NewInvitee { name: "Guest".into(), email: "guest@example.com".into() }],
            location: None,
            co_hosts: vec![],
            webhook_lost: false,
        })
        .unwrap();
    let parked = h.publish_all(&h.captured()).await;
    h.wait_for_inbox(&parked, &["unmatched"]).await;
    let refreshes_before = h.sim.sim.token_grants("refresh_token");

    let run = import(&h, &seed, &[]).await;

    assert!(run.ok, "{}", run.everything);
    let here = connections_here(&h).await;
    assert_eq!(here[&a], ("active".into(), Some(uris(&ada).0.into()), None));
    assert_eq!(here[&b].1.as_deref(), Some(bob["uri"].as_str().unwrap()), "Bob's account comes from Calendly");
    assert_eq!(here[&c], ("active".into(), Some(uris(&cy).0.into()), None), "Cy's wrong URI replaced");
    assert_eq!(here[&d], ("needs_reauth".into(), None, Some("invalid_grant".into())));
    assert!(!here.contains_key(&e), "Eve's account belongs to another app user here");
    let fay_after = connections::find(&h.pool, fay_here.connection_id).await.unwrap().unwrap();
    assert_eq!(fay_after.access_token, fay_before.access_token, "Fay's own connection untouched");
    assert_eq!(here.len(), 6, "ignored rows (Google, inactive) imported nothing");
    assert!(line_of(&run, c).contains(&format!("the source said user {}: replaced", uris(&ada).0)), "{}", run.stdout);
    assert!(line_of(&run, c).contains("token refreshed"));
    assert!(line_of(&run, d).contains("needs_reauth  invalid_grant"));
    assert!(line_of(&run, e).contains("connected to another app user"));
    assert!(line_of(&run, fay_here.app_user).contains("already has a calsync connection (active)"));
    assert!(run.stdout.contains("imported 3, needs_reauth 1, skipped 2, failed 0"), "{}", run.stdout);
    assert!(run.stdout.contains("1 row(s) of other providers and 1 inactive row(s) ignored"), "{}", run.stdout);
    let refreshed: Vec<&str> = run.stdout.lines().filter(|l| l.contains("token refreshed")).collect();
    assert_eq!(refreshed, [line_of(&run, c)], "only Cy's token needed a refresh");
    assert!(h.sim.sim.token_grants("refresh_token") > refreshes_before);
    let ada_budget: Option<i32> = sqlx::query_scalar("SELECT used FROM api_budgets WHERE budget_key = $1")
        .bind(format!("api:{}", uris(&ada).0))
        .fetch_optional(&h.pool)
        .await
        .unwrap();
    assert!(ada_budget >= Some(1), "the import's calls count against the user's API budget");
    // The steps of a confirmed connect: our subscription, a backfill, the parked delivery replayed,
    // and the app told.
    let ours = h.sim.sim.subscriptions().into_iter().filter(|s| s["callback_url"] == INGEST_URL).count();
    assert_eq!(ours, 3, "one subscription to ingest per imported user");
    h.wait_for_inbox(&parked, &["processed"]).await;
    assert_eq!(h.meetings(a).await.len(), 1, "the parked delivery landed with Ada");
    calsync_testkit::wait_until(DEADLINE, "the imported users' backfills", || async {
        h.count("SELECT count(*) FROM calendar_connections WHERE sync_kind = 'backfill' AND sync_result = 'done'").await
            == 3
    })
    .await;
    for user in [a, b, c] {
        assert_eq!(changes_of(&h, user).await[0], ("connection.active".into(), None, "connect".into()));
    }
    assert_eq!(
        changes_of(&h, d).await,
        vec![("connection.needs_reauth".into(), Some("invalid_grant".into()), "connect".into())]
    );
    assert_eq!(seed.snapshot().await, source_before, "the source is only read");
    let mut every_token = source_tokens.clone();
    every_token.extend(tokens_here(&h).await);
    assert_no_token(&run, &every_token);

    let (changes, subscriptions) = (h.count("SELECT count(*) FROM change_log").await, h.sim.sim.subscriptions().len());
    let (token_calls, users_me_calls) = (h.sim.sim.calls("token"), h.sim.sim.calls("users_me"));
    let rerun = import(&h, &seed, &[]).await;

    assert!(rerun.ok, "{}", rerun.everything);
    for user in [a, b, c, d] {
        assert!(line_of(&rerun, user).contains("already imported"), "{}", rerun.stdout);
    }
    assert!(rerun.stdout.contains("imported 0, needs_reauth 0, skipped 6, failed 0"), "{}", rerun.stdout);
    assert_eq!(h.sim.sim.calls("token"), token_calls, "the rerun spent no refresh token");
    // Only Eve's row, which was not imported, is asked about again.
    assert_eq!(h.sim.sim.calls("users_me"), users_me_calls + 1, "imported rows are not asked about again");
    assert_eq!(h.sim.sim.subscriptions().len(), subscriptions, "no second subscription");
    assert_eq!(h.count("SELECT count(*) FROM change_log").await, changes);
    assert_eq!(connections_here(&h).await, here);
    assert_no_token(&rerun, &every_token);
    seed.drop_now().await;
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_dry_run_reports_what_it_would_do_and_writes_nothing_refreshes_nothing_and_calls_nobody(pool: PgPool) {
    let h = Harness::new(pool).await;
    let seed = SeedDatabase::create(&h.db_url).await;
    let (ada, ada_access, ada_refresh) = calendly_user(&h, "Ada");
    let (_, bob_access, bob_refresh) = calendly_user(&h, "Bob");
    let fay_here = h.connect("Fay").await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    seed.insert(&[
        SeedRow::calendly(a, &ada_access, &ada_refresh).with_uris(uris(&ada).0, uris(&ada).1),
        SeedRow::calendly(b, &bob_access, &bob_refresh),
        SeedRow::calendly(fay_here.app_user, "fay-old-access", "fay-old-refresh"),
    ])
    .await;
    let (calls, here) = (total_calls(&h), connections_here(&h).await);
    let count = "SELECT (SELECT count(*) FROM change_log) + (SELECT count(*) FROM api_budgets)";
    let bookkeeping = h.count(count).await;

    let run = import(&h, &seed, &["--dry-run"]).await;

    assert!(run.ok, "{}", run.everything);
    assert!(line_of(&run, a).contains("would import"));
    assert!(line_of(&run, b).contains("would import  (no Calendly user in the source"), "{}", run.stdout);
    assert!(line_of(&run, fay_here.app_user).contains("skipped"));
    assert!(run.stdout.contains("dry run: would import 2, skip 1"), "{}", run.stdout);
    assert_eq!(total_calls(&h), calls, "Calendly was not called");
    assert_eq!(connections_here(&h).await, here, "no connection written");
    assert_eq!(h.count(count).await, bookkeeping, "no change, no budget row");
    assert_no_token(&run, &[ada_access, ada_refresh, bob_access, bob_refresh, "fay-old-access".into()]);
    seed.drop_now().await;
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_source_without_the_table_or_its_columns_or_out_of_reach_is_a_clear_error_and_nothing_is_written(
    pool: PgPool,
) {
    let h = Harness::new(pool).await;
    let seed = SeedDatabase::create(&h.db_url).await;
    sqlx::query("CREATE TABLE legacy_connections (user_id uuid, provider text, access_token text)")
        .execute(&seed.pool)
        .await
        .unwrap();
    let here = connections_here(&h).await;

    let no_table = import(&h, &seed, &["--table", "public.nope"]).await;
    let no_columns = import(&h, &seed, &["--table", "legacy_connections"]).await;
    let not_a_name = import(&h, &seed, &["--table", "x; DROP TABLE calendar_connections"]).await;
    let out_of_reach = tokio::process::Command::new(env!("CARGO_BIN_EXE_calsync-worker"))
        .args(h.worker_args().into_iter().skip(1))
        .arg(format!("--calendly-webhook-callback-url={INGEST_URL}"))
        .args(["import-connections", "--from", "postgres://importer:s3cret-pw@127.0.0.1:1/old_app"])
        .output()
        .await
        .unwrap();

    assert!(!no_table.ok && no_table.everything.contains("has no table public.nope"), "{}", no_table.everything);
    assert!(!no_columns.ok, "{}", no_columns.everything);
    assert!(
        no_columns
            .everything
            .contains("lacks the column(s) is_active, calendly_user_uri, calendly_organization_uri, refresh_token"),
        "{}",
        no_columns.everything
    );
    assert!(!not_a_name.ok && not_a_name.everything.contains("is not a table name"), "{}", not_a_name.everything);
    let stderr = String::from_utf8_lossy(&out_of_reach.stderr);
    assert!(!out_of_reach.status.success());
    assert!(stderr.contains("cannot connect to the source database 127.0.0.1:1/old_app"), "{stderr}");
    assert!(!stderr.contains("s3cret-pw"), "the password is never printed: {stderr}");
    assert_eq!(connections_here(&h).await, here, "nothing written");
    assert_eq!(seed.snapshot().await, Vec::<String>::new());
    seed.drop_now().await;
    h.stop().await;
}

#[sqlx::test(migrator = "calsync_common::db::MIGRATOR")]
async fn a_pair_refreshed_for_an_account_connected_to_another_app_user_is_revoked_not_kept(pool: PgPool) {
    let h = Harness::new(pool).await;
    let seed = SeedDatabase::create(&h.db_url).await;
    // The old system holds a grant of Eve's account, which is connected here to another app user;
    // its access token expired, so the import spends the source's refresh token to ask who it is.
    let eve_here = h.connect("Eve").await;
    let old = h.sim.sim.grant_tokens(&eve_here.uri).unwrap();
    h.sim.sim.expire_tokens(&eve_here.uri).unwrap();
    let someone = Uuid::new_v4();
    let token = |k: &str| old[k].as_str().unwrap().to_owned();
    seed.insert(&[SeedRow::calendly(someone, &token("access_token"), &token("refresh_token"))]).await;
    let revocations = |h: &Harness| h.sim.sim.counters_json()["revocations"].as_u64().unwrap();
    let (revoked_before, refreshes_before) = (revocations(&h), h.sim.sim.token_grants("refresh_token"));

    let run = import(&h, &seed, &[]).await;

    assert!(run.ok, "{}", run.everything);
    assert!(line_of(&run, someone).contains("connected to another app user"), "{}", run.stdout);
    assert_eq!(h.sim.sim.token_grants("refresh_token"), refreshes_before + 1, "the source's grant was refreshed");
    assert_eq!(revocations(&h), revoked_before + 2, "the new access and refresh token are revoked, not left live");
    assert!(!connections_here(&h).await.contains_key(&someone));
    seed.drop_now().await;
    h.stop().await;
}
