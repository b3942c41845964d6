//! Connecting a Calendly account: OAuth with forced consent and PKCE, storing the identity that
//! consented, the webhook subscription, the backfill, the replay of parked deliveries, status, and
//! disconnect. HTTP-free so it can be tested and reused; ingest's routes are a thin layer on it.
//! The replay of parked deliveries itself is `calsync_common::replay` (the worker replays too).

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use time::OffsetDateTime;
use url::Url;
use uuid::Uuid;

use calsync_common::activation::Activation;
use calsync_common::calendly::types::TokenResponse;
use calsync_common::calendly::{CalendlyClient, CalendlyError};
use calsync_common::crypto::{CryptoError, TokenCipher};
use calsync_common::db::connections::{self, Connected, Connection, ConnectionStatus, StoreError, SyncStatus};
use calsync_common::db::connections::{ACCESS_TOKEN, REFRESH_TOKEN};
use calsync_common::db::oauth_states::{self, StateRejection};
use calsync_common::db::pending::{self, Pending};
use calsync_common::queue::Broker;
use calsync_common::replay;

/// How long a user has to finish the consent screen.
pub const STATE_TTL: time::Duration = time::Duration::minutes(10);
/// Scopes Calendly apps created after March 2026 must ask for: the user, their scheduled events,
/// and their subscriptions — created at connect, read by the periodic subscription check.
pub const SCOPES: &str = "users:read scheduled_events:read webhooks:read webhooks:write";

/// How long the app has to confirm a consent.
pub const PENDING_TTL: time::Duration = time::Duration::minutes(10);

/// A consent waiting for the app: the one-time id to hand to the app, and whose account it is.
#[derive(Debug)]
pub struct PendingConnect {
    pub connect_id: String,
    pub account: CalendlyAccount,
}

/// The Calendly account a connect is about, as the app may show it.
#[derive(Debug, Clone, Serialize)]
pub struct CalendlyAccount {
    pub name: Option<String>,
    pub email: Option<String>,
    pub uri: String,
}

impl CalendlyAccount {
    fn of(held: &Pending) -> Self {
        Self {
            name: held.calendly_name.clone(),
            email: held.calendly_email.clone(),
            uri: held.calendly_user_uri.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the database is unavailable: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0} is not set")]
    NotConfigured(&'static str),
    #[error("this link is not valid: {}", match .0 {
        StateRejection::Unknown => "it was not issued by us",
        StateRejection::Expired => "it has expired (links last 10 minutes)",
        StateRejection::AlreadyUsed => "it has already been used",
    })]
    State(StateRejection),
    #[error("access was not granted ({0})")]
    Denied(String),
    #[error("Calendly did not send an authorization code")]
    MissingCode,
    #[error("this Calendly account is already connected to another user")]
    AccountTaken,
    #[error("unknown, already used or expired connect_id")]
    PendingNotFound,
    #[error("this connection was started by another user; it has been discarded")]
    WrongUser,
    #[error("Calendly: {0}")]
    Calendly(#[from] CalendlyError),
    #[error("stored secret unreadable: {0}")]
    Crypto(#[from] CryptoError),
}

/// The OAuth callback's query.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Callback {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

pub struct ConnectService {
    pub pool: PgPool,
    /// Tokens and PKCE verifiers are stored encrypted, bound to their row.
    pub cipher: Arc<TokenCipher>,
    pub calendly: CalendlyClient,
    /// Backfill jobs and replayed parked deliveries are published as the account connects.
    pub broker: Broker,
    pub options: ConnectOptions,
}

/// The settings the connect flow reads.
pub struct ConnectOptions {
    /// Where Calendly sends the browser back (`CALENDLY_OAUTH_REDIRECT_URI`).
    pub redirect_uri: Url,
    /// Where our webhook subscription delivers; `None` = create no subscription.
    pub callback_url: Option<Url>,
    /// How old an `unmatched` delivery may be and still be replayed (`INBOX_REPLAY_DAYS`).
    pub replay_days: u32,
}

fn random_url_safe() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

fn hash_state(state: &str) -> String {
    hex::encode(Sha256::digest(state.as_bytes()))
}

impl ConnectService {
    /// Issues a single-use state (stored hashed, with the encrypted PKCE verifier) and returns the
    /// URL that sends `user_id` to Calendly's consent screen.
    pub async fn begin(&self, user_id: Uuid) -> Result<Url, ConnectError> {
        let client_id = self.calendly.client_id().ok_or(ConnectError::NotConfigured("CALENDLY_OAUTH_CLIENT_ID"))?;
        let (state, verifier) = (random_url_safe(), random_url_safe());
        let state_hash = hash_state(&state);
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let sealed = self.cipher.encrypt(&verifier, oauth_states::verifier_binding(&state_hash));
        oauth_states::insert(&self.pool, &state_hash, user_id, &sealed, OffsetDateTime::now_utc() + STATE_TTL).await?;
        if let Err(error) = oauth_states::purge_stale(&self.pool).await {
            tracing::debug!(%error, "could not purge old OAuth states");
        }
        let mut url = self.calendly.authorize_endpoint();
        url.query_pairs_mut()
            .append_pair("client_id", client_id)
            .append_pair("response_type", "code")
            .append_pair("redirect_uri", self.options.redirect_uri.as_str())
            .append_pair("state", &state)
            // Always show the consent screen: the account that consents is the one we store.
            .append_pair("prompt", "consent")
            .append_pair("scope", SCOPES)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(url)
    }

    /// Handles Calendly's redirect back: exchanges the code, asks Calendly who consented, and stores
    /// the result as *pending* (not a connection) under a one-time `connect_id`. Nothing becomes a
    /// connection until the app confirms it for the user who started the flow ([`Self::confirm`]):
    /// the browser that consented is not necessarily that user's.
    pub async fn complete(&self, callback: Callback) -> Result<PendingConnect, ConnectError> {
        if let Some(error) = callback.error {
            if let Some(state) = &callback.state {
                oauth_states::burn(&self.pool, &hash_state(state)).await?;
            }
            return Err(ConnectError::Denied(
                callback.error_description.map_or(error.clone(), |d| format!("{error}: {d}")),
            ));
        }
        let state = callback.state.ok_or(ConnectError::State(StateRejection::Unknown))?;
        let state_hash = hash_state(&state);
        let (user_id, sealed_verifier) =
            oauth_states::take(&self.pool, &state_hash).await?.map_err(ConnectError::State)?;
        let verifier = self.cipher.decrypt(&sealed_verifier, oauth_states::verifier_binding(&state_hash))?;
        let code = callback.code.ok_or(ConnectError::MissingCode)?;

        let tokens =
            self.calendly.exchange_code(&code, self.options.redirect_uri.as_str(), verifier.expose_secret()).await?;
        // The one place this consent's tokens are revoked: every way `hold` can fail (Calendly,
        // the database, an account taken) leaves no live grant behind.
        match self.hold(user_id, &tokens).await {
            Ok(pending) => Ok(pending),
            Err(error) => {
                self.revoke_quietly(&tokens.access_token, &tokens.refresh_token).await;
                Err(error)
            }
        }
    }

    /// Asks Calendly who consented and stores the consent as pending under a one-time id.
    async fn hold(&self, user_id: Uuid, tokens: &TokenResponse) -> Result<PendingConnect, ConnectError> {
        // The identity comes from Calendly, asked with the token just issued for this consent.
        let me = self.calendly.users_me(&tokens.access_token).await?;
        if connections::is_linked_to_another_user(&self.pool, &me.uri, user_id).await? {
            tracing::warn!(%user_id, "Calendly account already connected to another user; revoking the new token");
            return Err(ConnectError::AccountTaken);
        }
        let connect_id = random_url_safe();
        let hash = hash_state(&connect_id);
        let now = OffsetDateTime::now_utc();
        let seal =
            |token: &SecretString, column| self.cipher.encrypt(token.expose_secret(), pending::binding(&hash, column));
        let held = Pending {
            connect_id_hash: hash.clone(),
            user_id,
            calendly_user_uri: me.uri.clone(),
            calendly_organization_uri: me.current_organization.clone(),
            calendly_name: me.name.clone(),
            calendly_email: me.email.clone(),
            access_token: seal(&tokens.access_token, ACCESS_TOKEN),
            refresh_token: seal(&tokens.refresh_token, REFRESH_TOKEN),
            token_expires_at: tokens.expires_at(now),
            expires_at: now + PENDING_TTL,
        };
        pending::insert(&self.pool, &held).await?;
        tracing::info!(%user_id, "Calendly consent received; waiting for the app to confirm it");
        Ok(PendingConnect { connect_id, account: CalendlyAccount::of(&held) })
    }

    /// The app's half of the connect: `user_id` is the app user its browser session belongs to.
    /// Only the user who started the flow can turn the pending result into a connection; anyone else
    /// discards it (and its tokens are revoked). Then: the account is stored (replacing, and
    /// releasing, a different account the user had), subscribed, backfilled, and its parked
    /// deliveries replayed.
    pub async fn confirm(&self, user_id: Uuid, connect_id: &str) -> Result<CalendlyAccount, ConnectError> {
        let Some(held) = pending::take(&self.pool, &hash_state(connect_id)).await? else {
            return Err(ConnectError::PendingNotFound);
        };
        let (access, refresh) = self.open_pending(&held)?;
        // The pending result is gone (taken above): the one place its tokens are revoked when they
        // do not become a connection, whichever way `link` fails.
        let connection = match self.link(user_id, &held, &access, &refresh).await {
            Ok(connection) => connection,
            Err(error) => {
                self.revoke_quietly(&access, &refresh).await;
                return Err(error);
            }
        };
        tracing::info!(%user_id, connection_id = %connection.id, "Calendly account connected");
        self.start_syncing(&connection, &held, &access).await?;
        Ok(CalendlyAccount::of(&held))
    }

    /// Turns a pending consent into `user_id`'s connection, if it is theirs and still valid.
    async fn link(
        &self,
        user_id: Uuid,
        held: &Pending,
        access: &SecretString,
        refresh: &SecretString,
    ) -> Result<Connection, ConnectError> {
        if held.is_expired() {
            return Err(ConnectError::PendingNotFound);
        }
        if held.user_id != user_id {
            tracing::warn!(%user_id, started_by = %held.user_id, "connect confirmed by another user; discarding it");
            return Err(ConnectError::WrongUser);
        }
        if let Some(previous) = connections::find_by_user(&self.pool, user_id).await?
            && previous.calendly_user_uri.as_deref().is_some_and(|uri| uri != held.calendly_user_uri)
            && previous.status != ConnectionStatus::Disconnected
        {
            // Switching to another Calendly account: exactly a disconnect of the old one first (its
            // row unlinked, then its subscription deleted and our grant revoked), then the row is reused.
            // A row with no Calendly account (imported as `needs_reauth`: its identity was never
            // confirmed) has nothing to release, and is reused as it is.
            tracing::info!(%user_id, "switching Calendly accounts; disconnecting the previous one");
            self.disconnect(user_id).await?;
        }
        let connected = Connected {
            user_id,
            calendly_user_uri: &held.calendly_user_uri,
            calendly_organization_uri: &held.calendly_organization_uri,
            access_token: access.expose_secret(),
            refresh_token: refresh.expose_secret(),
            expires_at: held.token_expires_at,
        };
        match connections::store_connected(&self.pool, &self.cipher, &connected).await {
            Ok(connection) => Ok(connection),
            Err(StoreError::AccountTaken) => {
                tracing::warn!(%user_id, "Calendly account already connected to another user; revoking the new token");
                Err(ConnectError::AccountTaken)
            }
            Err(StoreError::Database(e)) => Err(e.into()),
        }
    }

    /// Deletes expired pending results and revokes their tokens; returns how many.
    pub async fn sweep_expired(&self) -> Result<usize, ConnectError> {
        let expired = pending::take_expired(&self.pool).await?;
        for held in &expired {
            match self.open_pending(held) {
                Ok((access, refresh)) => self.revoke_quietly(&access, &refresh).await,
                Err(error) => tracing::warn!(%error, "expired pending connection unreadable; its tokens expire alone"),
            }
        }
        if !expired.is_empty() {
            tracing::info!(count = expired.len(), "expired pending connections discarded and revoked");
        }
        Ok(expired.len())
    }

    fn open_pending(&self, held: &Pending) -> Result<(SecretString, SecretString), CryptoError> {
        let hash = &held.connect_id_hash;
        Ok((
            self.cipher.decrypt(&held.access_token, pending::binding(hash, ACCESS_TOKEN))?,
            self.cipher.decrypt(&held.refresh_token, pending::binding(hash, REFRESH_TOKEN))?,
        ))
    }

    /// Subscription, backfill and replay for a connection just confirmed (the steps the import of
    /// an existing integration shares: [`Activation`]).
    async fn start_syncing(&self, connection: &Connection, held: &Pending, access: &SecretString) -> sqlx::Result<()> {
        let activation = Activation {
            pool: &self.pool,
            calendly: &self.calendly,
            broker: &self.broker,
            callback_url: self.options.callback_url.as_ref(),
        };
        activation.subscribe_and_backfill(connection, access).await?;
        // Replayed after the answer, not inside the confirm request: an account with many parked
        // deliveries must not hold the app's call open. What this does not finish (a crash, a
        // broker outage) the worker's next periodic check of this connection replays.
        let (pool, broker, connection_id) = (self.pool.clone(), self.broker.clone(), connection.id);
        let (account, replay_days) = (held.calendly_user_uri.clone(), self.options.replay_days);
        tokio::spawn(async move {
            match replay::replay_parked(&pool, &broker, &account, replay_days).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(%connection_id, replayed = n, "replayed parked deliveries"),
                Err(error) => {
                    tracing::warn!(%connection_id, %error, "could not replay parked deliveries (the next periodic check will)")
                }
            }
        });
        Ok(())
    }

    async fn revoke_quietly(&self, access: &SecretString, refresh: &SecretString) {
        for token in [refresh, access] {
            if let Err(error) = self.calendly.revoke(token).await {
                tracing::warn!(%error, "could not revoke a token at Calendly");
            }
        }
    }

    /// `user_id`'s connection and its last sync pass, if the user ever connected (the route decides
    /// what of them to show).
    pub async fn status(&self, user_id: Uuid) -> Result<Option<(Connection, Option<SyncStatus>)>, ConnectError> {
        let Some(connection) = connections::find_by_user(&self.pool, user_id).await? else { return Ok(None) };
        let sync = connections::sync_status(&self.pool, connection.id).await?;
        Ok(Some((connection, sync)))
    }

    /// Unlinks `user_id`'s connection, then cleans up at Calendly: deletes our subscription (it needs
    /// the token) and revokes the tokens. Returns false when the user never connected.
    ///
    /// The row is unlinked first, in a short transaction (tokens wiped, `disconnected`), and the
    /// Calendly calls (up to four, each up to the client's timeout) happen after it with the tokens
    /// held in memory only. Holding the row lock across them would stall every write batch that
    /// holds a delivery of this connection — and with it every other user's deliveries in that batch.
    /// Once the row is wiped no worker can refresh (and so resurrect) these tokens: a refresh lease
    /// in flight loses its store, because `mark_disconnected` clears the lease.
    pub async fn disconnect(&self, user_id: Uuid) -> Result<bool, ConnectError> {
        let mut tx = self.pool.begin().await?;
        let Some(id) = connections::id_of_user(&mut tx, user_id).await? else { return Ok(false) };
        let Some(c) = connections::lock(&mut tx, id).await? else { return Ok(false) };
        connections::mark_disconnected(&mut tx, id, None).await?;
        tx.commit().await?;
        tracing::info!(%user_id, "Calendly account disconnected");

        let problems = self.release_at_calendly(&c).await;
        if !problems.is_empty() {
            for problem in &problems {
                tracing::warn!(%user_id, %problem, "disconnect");
            }
            connections::record_disconnect_problems(&self.pool, id, &problems.join("; ")).await?;
        }
        Ok(true)
    }

    /// Deletes `c`'s subscription and revokes its tokens at Calendly (refreshing first when the
    /// access token is about to expire, since deleting the subscription needs a working one).
    /// Returns what could not be done.
    async fn release_at_calendly(&self, c: &Connection) -> Vec<String> {
        let mut problems = Vec::new();
        let (Ok(mut access), Ok(mut refresh)) = (c.decrypt_access(&self.cipher), c.decrypt_refresh(&self.cipher))
        else {
            return problems;
        };
        let expiring = c.token_expires_at.is_none_or(|t| t <= OffsetDateTime::now_utc() + time::Duration::minutes(1));
        if expiring {
            match self.calendly.refresh(&refresh).await {
                Ok(t) => (access, refresh) = (t.access_token, t.refresh_token),
                Err(error) => problems.push(format!("token refresh before disconnect failed: {error}")),
            }
        }
        if let Some(uri) = &c.webhook_subscription_uri
            && let Err(error) = self.calendly.delete_subscription(uri, &access).await
        {
            problems.push(format!("webhook subscription not deleted: {error}"));
        }
        for token in [&refresh, &access] {
            if let Err(error) = self.calendly.revoke(token).await {
                problems.push(format!("token not revoked: {error}"));
            }
        }
        problems
    }
}
