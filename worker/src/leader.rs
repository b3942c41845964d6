//! One worker at a time does a job (scheduling the periodic checks, publishing changes): the one
//! holding a PostgreSQL advisory lock on a connection of its own, outside the pool. If it dies, its
//! connection closes, the lock is released and another worker takes over at its next try.

use std::time::Duration;

use sqlx::{Connection as _, PgConnection};

/// How long a check that the lock's connection is alive may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection holding advisory lock `key`, or `None` when another worker holds it (or the
/// database cannot be reached).
pub async fn try_lead(database_url: &str, key: i64) -> Option<PgConnection> {
    let mut connection = PgConnection::connect(database_url).await.ok()?;
    // The connection may idle for long. If the network to it dies without a word, PostgreSQL
    // would keep the session (and the lock) until its TCP keepalives give up — two hours by
    // default, with nobody leading meanwhile. These make the server drop a dead peer within
    // about a minute, so the lock is free for another worker.
    sqlx::raw_sql("SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3")
        .execute(&mut connection)
        .await
        .ok()?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(key).fetch_one(&mut connection).await.ok()?;
    locked.then_some(connection)
}

/// Whether `lock`'s connection (and so the lock) is still alive.
pub async fn still_leading(lock: &mut PgConnection) -> bool {
    matches!(tokio::time::timeout(PING_TIMEOUT, sqlx::query("SELECT 1").execute(lock)).await, Ok(Ok(_)))
}
