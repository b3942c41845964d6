//! The Calendly API and OAuth client. One per process (it pools connections); every call is
//! counted in `calsync_calendly_requests_total{endpoint,status}`.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use tracing::Instrument;
use url::Url;

use super::error::CalendlyError;
use super::types::*;
use crate::config::CalendlyArgs;

/// Page size for list calls (Calendly's maximum).
pub const PAGE_SIZE: u32 = 100;

#[derive(Clone)]
pub struct CalendlyClient {
    http: reqwest::Client,
    api_base: Url,
    auth_base: Url,
    client_id: Option<String>,
    client_secret: Option<SecretString>,
}

/// `path` below `base`'s own path (a base URL may carry a path prefix, e.g. behind a proxy).
fn under(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let prefix = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{prefix}{path}"));
    url
}

impl CalendlyClient {
    pub fn new(args: &CalendlyArgs) -> anyhow::Result<Self> {
        let http = crate::http::client_builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5))
            // Never follow a redirect with a bearer token to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            api_base: args.calendly_api_base_url.clone(),
            auth_base: args.calendly_auth_base_url.clone(),
            client_id: args.calendly_oauth_client_id.clone(),
            client_secret: args.calendly_oauth_client_secret.clone(),
        })
    }

    /// SSRF guard: a URI from a webhook body may only be fetched when it is on the API's own origin
    /// (scheme, host and port), so a token is never sent anywhere else.
    pub fn api_url(&self, uri: &str) -> Result<Url, CalendlyError> {
        let url = Url::parse(uri).map_err(|_| CalendlyError::ForeignOrigin(uri.to_owned()))?;
        if url.origin() != self.api_base.origin() || !url.username().is_empty() || url.password().is_some() {
            return Err(CalendlyError::ForeignOrigin(uri.to_owned()));
        }
        Ok(url)
    }

    fn api_path(&self, path: &str) -> Url {
        under(&self.api_base, path)
    }

    fn auth_path(&self, path: &str) -> Url {
        under(&self.auth_base, path)
    }

    async fn send(&self, endpoint: &'static str, request: RequestBuilder) -> Result<Response, CalendlyError> {
        let span = call_span(endpoint);
        let result = request.send().instrument(span.clone()).await;
        let status = match &result {
            Ok(r) => r.status().as_u16().to_string(),
            Err(_) => "error".to_owned(),
        };
        span.record("http.response.status_code", status.as_str());
        metrics::counter!("calsync_calendly_requests_total", "endpoint" => endpoint, "status" => status).increment(1);
        let response = result.map_err(|e| CalendlyError::Transient(format!("{endpoint}: {}", without_url(&e))))?;
        classify(response).await
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        url: Url,
        token: &SecretString,
    ) -> Result<T, CalendlyError> {
        let request = self.http.request(Method::GET, url).bearer_auth(token.expose_secret());
        let response = self.send(endpoint, request).await?;
        response.json::<T>().await.map_err(|e| CalendlyError::Unexpected(format!("{endpoint}: {}", without_url(&e))))
    }

    /// `GET <event uri>` (the URI from a webhook payload, origin-checked).
    pub async fn get_event(&self, event_uri: &str, token: &SecretString) -> Result<ScheduledEvent, CalendlyError> {
        let url = self.api_url(event_uri)?;
        Ok(self.get_json::<Resource<ScheduledEvent>>("get_event", url, token).await?.resource)
    }

    pub async fn users_me(&self, token: &SecretString) -> Result<CalendlyUser, CalendlyError> {
        Ok(self.get_json::<Resource<CalendlyUser>>("users_me", self.api_path("/users/me"), token).await?.resource)
    }

    /// One page of `user`'s scheduled events starting at or after `min_start`.
    pub async fn list_events(
        &self,
        user_uri: &str,
        min_start: OffsetDateTime,
        page_token: Option<&str>,
        token: &SecretString,
    ) -> Result<Collection<ScheduledEvent>, CalendlyError> {
        let mut url = self.api_path("/scheduled_events");
        let min = min_start.format(&time::format_description::well_known::Rfc3339).expect("formattable");
        url.query_pairs_mut()
            .append_pair("user", user_uri)
            .append_pair("min_start_time", &min)
            .append_pair("sort", "start_time:asc")
            .append_pair("count", &PAGE_SIZE.to_string());
        if let Some(t) = page_token {
            url.query_pairs_mut().append_pair("page_token", t);
        }
        self.get_json("list_events", url, token).await
    }

    /// One page of an event's invitees.
    pub async fn list_invitees(
        &self,
        event_uri: &str,
        page_token: Option<&str>,
        token: &SecretString,
    ) -> Result<Collection<Invitee>, CalendlyError> {
        let mut url = self.api_url(event_uri)?;
        let path = format!("{}/invitees", url.path().trim_end_matches('/'));
        url.set_path(&path);
        url.query_pairs_mut().append_pair("count", &PAGE_SIZE.to_string());
        if let Some(t) = page_token {
            url.query_pairs_mut().append_pair("page_token", t);
        }
        self.get_json("list_invitees", url, token).await
    }

    fn client_credentials(&self) -> Result<(&str, &SecretString), CalendlyError> {
        match (&self.client_id, &self.client_secret) {
            (Some(id), Some(secret)) => Ok((id, secret)),
            _ => Err(CalendlyError::Unexpected(
                "CALENDLY_OAUTH_CLIENT_ID / CALENDLY_OAUTH_CLIENT_SECRET are not set".into(),
            )),
        }
    }

    async fn token_request(
        &self,
        endpoint: &'static str,
        form: &[(&str, &str)],
    ) -> Result<TokenResponse, CalendlyError> {
        let (id, secret) = self.client_credentials()?;
        let request =
            self.http.post(self.auth_path("/oauth/token")).basic_auth(id, Some(secret.expose_secret())).form(form);
        let response = self.send(endpoint, request).await?;
        let tokens: TokenResponse =
            response.json().await.map_err(|e| CalendlyError::Unexpected(format!("{endpoint}: {}", without_url(&e))))?;
        if !tokens.lifetime_is_believable() {
            // Kept, never discarded: a refresh answer holds the only refresh token left.
            tracing::warn!(
                endpoint,
                expires_in = tokens.expires_in,
                believed = tokens.believed_lifetime_secs(),
                "Calendly answered a token lifetime that is not one (1 s to {MAX_TOKEN_LIFETIME_SECS} s); keeping the tokens"
            );
            metrics::counter!("calsync_token_absurd_lifetimes_total").increment(1);
        }
        Ok(tokens)
    }

    /// `grant_type=refresh_token`. Calendly's refresh tokens are single-use: call this only while
    /// holding the connection's row lock.
    pub async fn refresh(&self, refresh_token: &SecretString) -> Result<TokenResponse, CalendlyError> {
        self.token_request(
            "oauth_refresh",
            &[("grant_type", "refresh_token"), ("refresh_token", refresh_token.expose_secret())],
        )
        .await
    }

    /// `grant_type=authorization_code` with the PKCE verifier.
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
        code_verifier: &str,
    ) -> Result<TokenResponse, CalendlyError> {
        self.token_request(
            "oauth_code",
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("code_verifier", code_verifier),
            ],
        )
        .await
    }

    /// `POST /oauth/revoke`.
    pub async fn revoke(&self, token: &SecretString) -> Result<(), CalendlyError> {
        let (id, secret) = self.client_credentials()?;
        let form = [("client_id", id), ("client_secret", secret.expose_secret()), ("token", token.expose_secret())];
        let request = self.http.post(self.auth_path("/oauth/revoke")).form(&form);
        self.send("oauth_revoke", request).await.map(|_| ())
    }

    /// `authorize_url` base: `<auth base>/oauth/authorize`.
    pub fn authorize_endpoint(&self) -> Url {
        self.auth_path("/oauth/authorize")
    }

    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_deref()
    }

    /// Creates a user-scoped subscription; `Ok(None)` means 409 (that URL is already subscribed).
    pub async fn create_subscription(
        &self,
        callback_url: &str,
        events: &[&str],
        organization: &str,
        user: &str,
        token: &SecretString,
    ) -> Result<Option<Subscription>, CalendlyError> {
        let body = serde_json::json!({ "url": callback_url, "events": events, "organization": organization, "scope": "user", "user": user });
        let request =
            self.http.post(self.api_path("/webhook_subscriptions")).bearer_auth(token.expose_secret()).json(&body);
        match self.send("create_subscription", request).await {
            Ok(response) => {
                let created: Resource<Subscription> = response
                    .json()
                    .await
                    .map_err(|e| CalendlyError::Unexpected(format!("create_subscription: {}", without_url(&e))))?;
                Ok(Some(created.resource))
            }
            Err(CalendlyError::Conflict) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// All of `user`'s user-scoped subscriptions (every page).
    pub async fn list_subscriptions(
        &self,
        organization: &str,
        user: &str,
        token: &SecretString,
    ) -> Result<Vec<Subscription>, CalendlyError> {
        let mut out = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut url = self.api_path("/webhook_subscriptions");
            url.query_pairs_mut()
                .append_pair("organization", organization)
                .append_pair("scope", "user")
                .append_pair("user", user)
                .append_pair("count", &PAGE_SIZE.to_string());
            if let Some(t) = &page {
                url.query_pairs_mut().append_pair("page_token", t);
            }
            let collection: Collection<Subscription> = self.get_json("list_subscriptions", url, token).await?;
            out.extend(collection.collection);
            match collection.pagination.next_page_token {
                Some(t) => page = Some(t),
                None => return Ok(out),
            }
        }
    }

    pub async fn get_subscription(&self, uri: &str, token: &SecretString) -> Result<Subscription, CalendlyError> {
        let url = self.api_url(uri)?;
        Ok(self.get_json::<Resource<Subscription>>("get_subscription", url, token).await?.resource)
    }

    /// `DELETE <subscription uri>`; a subscription that is already gone counts as deleted.
    pub async fn delete_subscription(&self, uri: &str, token: &SecretString) -> Result<(), CalendlyError> {
        let url = self.api_url(uri)?;
        let request = self.http.delete(url).bearer_auth(token.expose_secret());
        match self.send("delete_subscription", request).await {
            Ok(_) | Err(CalendlyError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// reqwest errors print the URL, which may carry a page token; keep logs to the cause. The causes
/// underneath are kept ("error sending request" alone cannot tell a DNS failure from a refused
/// connection or a timeout).
fn without_url(error: &reqwest::Error) -> String {
    let mut e = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        e.push_str(": ");
        e.push_str(&cause.to_string());
        source = cause.source();
    }
    if let Some(url) = error.url() {
        e = e.replace(url.as_str(), "<url>");
    }
    e
}

/// `required_scopes` of a `403 {"title": "Insufficient scope", ...}`: a missing scope, not someone
/// else's resource.
fn insufficient_scope(body: &str) -> Option<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        title: Option<String>,
        #[serde(default)]
        required_scopes: Option<Vec<String>>,
    }
    let answer: Answer = serde_json::from_str(body).ok()?;
    match (answer.title.as_deref(), answer.required_scopes) {
        (_, Some(required)) if !required.is_empty() => Some(required),
        (Some(title), _) if title.eq_ignore_ascii_case("insufficient scope") => Some(Vec::new()),
        _ => None,
    }
}

async fn classify(response: Response) -> Result<Response, CalendlyError> {
    super::rate::record(response.headers());
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let reset = super::rate::reset_of(response.headers());
    let body = response.text().await.unwrap_or_default();
    let snippet: String = body.chars().take(300).collect();
    Err(match status {
        StatusCode::UNAUTHORIZED => CalendlyError::Unauthorized,
        StatusCode::FORBIDDEN => match insufficient_scope(&body) {
            Some(required) => CalendlyError::InsufficientScope { required },
            None => CalendlyError::Forbidden(snippet),
        },
        StatusCode::NOT_FOUND => CalendlyError::NotFound,
        StatusCode::CONFLICT => CalendlyError::Conflict,
        StatusCode::TOO_MANY_REQUESTS => CalendlyError::RateLimited { reset: reset.unwrap_or(Duration::from_secs(60)) },
        StatusCode::BAD_REQUEST if body.contains("invalid_grant") => CalendlyError::InvalidGrant(snippet),
        s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
            CalendlyError::Transient(format!("{s}: {snippet}"))
        }
        s => CalendlyError::Unexpected(format!("{} {snippet}", s.as_u16())),
    })
}

/// A client span per Calendly call (with traces on): the endpoint's name, never its URL (which
/// names users and events) nor any header (which carry tokens).
fn call_span(endpoint: &'static str) -> tracing::Span {
    if !crate::traces::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "calendly",
        otel.name = endpoint,
        otel.kind = "client",
        "calsync.calendly.endpoint" = endpoint,
        http.response.status_code = tracing::field::Empty,
        message_id = tracing::field::Empty,
    );
    crate::traces::record_message_id(&span);
    span
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_transport_error_names_its_cause_and_hides_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let http = crate::http::client_builder().build().unwrap();
        let error = http.get(format!("http://127.0.0.1:{port}/users?page_token=secret")).send().await.unwrap_err();
        let message = super::without_url(&error);
        assert!(!message.contains("secret"), "{message}");
        assert!(message.contains("<url>"), "{message}");
        assert!(message.to_lowercase().contains("refused"), "the cause under \"error sending request\": {message}");
    }
}
