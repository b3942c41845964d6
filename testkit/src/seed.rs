//! A database shaped like an existing integration's (the Node/Supabase backend calsync grew out
//! of): `calendar_connections` with plaintext tokens, on the tests' PostgreSQL server, for the
//! import of connections to read from. Created per test, dropped with [`SeedDatabase::drop_now`].

use sqlx::{Connection, Executor, PgConnection, PgPool};

/// The seed's table as it stood: URIs nullable (rows from before its fix have none), tokens in
/// plaintext, one row per app user and provider.
const SEED_TABLE: &str = "CREATE TABLE calendar_connections (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL,
    provider text NOT NULL,
    is_active boolean NOT NULL DEFAULT true,
    calendly_user_uri text,
    calendly_organization_uri text,
    access_token text,
    refresh_token text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, provider)
)";

/// One row of the seed's table.
#[derive(Debug, Clone, Default)]
pub struct SeedRow {
    pub user_id: uuid::Uuid,
    pub provider: String,
    pub is_active: bool,
    pub calendly_user_uri: Option<String>,
    pub calendly_organization_uri: Option<String>,
    pub access_token: Option<String>,
    pub refresh_token: Option<String>,
}

impl SeedRow {
    /// An active Calendly row.
    pub fn calendly(user_id: uuid::Uuid, access: &str, refresh: &str) -> Self {
        Self {
            user_id,
            provider: "calendly".into(),
            is_active: true,
            access_token: Some(access.into()),
            refresh_token: Some(refresh.into()),
            ..Self::default()
        }
    }

    pub fn with_uris(mut self, user: &str, organization: &str) -> Self {
        self.calendly_user_uri = Some(user.into());
        self.calendly_organization_uri = Some(organization.into());
        self
    }
}

pub struct SeedDatabase {
    pub url: String,
    name: String,
    admin_url: String,
    pub pool: PgPool,
}

impl SeedDatabase {
    /// A new database beside the one at `server_url` (any database URL of the server), with the
    /// seed's table in it.
    pub async fn create(server_url: &str) -> Self {
        let name = format!("seed_{}", uuid::Uuid::new_v4().simple());
        let mut url = url::Url::parse(server_url).expect("a database URL");
        let admin_url = url.to_string();
        let mut admin = PgConnection::connect(&admin_url).await.expect("the test server");
        admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.expect("create the seed database");
        admin.close().await.ok();
        url.set_path(&name);
        let pool = PgPool::connect(url.as_str()).await.expect("the seed database");
        pool.execute(SEED_TABLE).await.expect("the seed's table");
        Self { url: url.to_string(), name, admin_url, pool }
    }

    pub async fn insert(&self, rows: &[SeedRow]) {
        for row in rows {
            sqlx::query(
                "INSERT INTO calendar_connections (user_id, provider, is_active, calendly_user_uri, \
                     calendly_organization_uri, access_token, refresh_token) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(row.user_id)
            .bind(&row.provider)
            .bind(row.is_active)
            .bind(&row.calendly_user_uri)
            .bind(&row.calendly_organization_uri)
            .bind(&row.access_token)
            .bind(&row.refresh_token)
            .execute(&self.pool)
            .await
            .expect("a seed row");
        }
    }

    /// Every row as text, in a fixed order: equal before and after means nothing was written.
    pub async fn snapshot(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT row_to_json(c)::text FROM calendar_connections c ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .expect("the seed's rows")
    }

    pub async fn drop_now(self) {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&self.admin_url).await.expect("the test server");
        admin
            .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .await
            .expect("drop the seed database");
    }
}
