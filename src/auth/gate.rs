//! The check every `/mcp` request passes before the proxy routes it: who is calling (a client
//! key or, with `[auth.oauth]`, an OAuth access token in `Authorization: Bearer`), whether it
//! may call this tool, and whether its quota admits one more request. The proxy calls [`Gate::admit`] and turns a refusal into its answer
//! (`proxy::error::ProxyError::Auth`), so errors on `/mcp` come from one place.

use std::sync::Arc;

use axum::http::{HeaderMap, Uri, header};
use tokio_util::sync::CancellationToken;

use super::{
    McpAuth,
    keys::{KEY_PREFIX, Keys},
    metadata,
    oauth::{OAuth, TokenError},
    principal::{Access, Principal, PrincipalKind},
    quota::{QuotaError, Slot},
};
use crate::metrics::{AuthMetrics, AuthOutcome};

/// Why a request was refused. [`AuthError::status`] says how it is answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "this MCP endpoint needs a credential: send 'Authorization: Bearer <key or token>' (keys \
         are made with `switchboard key create`; tokens come from the authorization server the \
         resource metadata names, when one is configured)"
    )]
    Missing,
    #[error("the Authorization header is not 'Bearer <key or token>'")]
    NotBearer,
    #[error("the client key is not valid (unknown or revoked)")]
    InvalidKey,
    #[error("the client key {id} expired")]
    Expired { id: String },
    /// The key was revoked while this request waited for the server's answer.
    #[error("the client key {id} was revoked while this request was under way")]
    Revoked { id: String },
    /// `principal` says which kind: "key <id>" or "token subject <sub>".
    #[error("{principal} has no grant on tool '{slug}' (an OAuth token needs scope mcp:{slug})")]
    Forbidden { principal: String, slug: String },
    /// An access token that does not verify (or, for `IssuerUnavailable`, cannot be checked).
    #[error("{0}")]
    Token(TokenError),
    #[error("{0}")]
    Quota(QuotaError),
}

/// What the three kinds of refusal are answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no valid credential; the client should (re-)authenticate.
    Unauthenticated,
    /// 403: a valid principal without the grant.
    Forbidden,
    /// 429: over the principal's quota.
    OverQuota,
    /// 503: the authorization server's keys cannot be fetched, so no token can be checked.
    Unavailable,
}

impl AuthError {
    pub fn refusal(&self) -> Refusal {
        match self {
            AuthError::Missing
            | AuthError::NotBearer
            | AuthError::InvalidKey
            | AuthError::Expired { .. }
            | AuthError::Revoked { .. } => Refusal::Unauthenticated,
            AuthError::Token(TokenError::IssuerUnavailable { .. }) => Refusal::Unavailable,
            AuthError::Token(_) => Refusal::Unauthenticated,
            AuthError::Forbidden { .. } => Refusal::Forbidden,
            AuthError::Quota(_) => Refusal::OverQuota,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing | AuthError::NotBearer => "unauthorized",
            AuthError::InvalidKey => "invalid_key",
            AuthError::Expired { .. } => "key_expired",
            AuthError::Revoked { .. } => "key_revoked",
            AuthError::Forbidden { .. } => "forbidden",
            AuthError::Token(t) => t.code(),
            AuthError::Quota(QuotaError::Rate { .. }) => "rate_limited",
            AuthError::Quota(QuotaError::Concurrency { .. }) => "too_many_requests_in_flight",
        }
    }

    fn outcome(&self) -> AuthOutcome {
        match self {
            AuthError::Missing | AuthError::NotBearer => AuthOutcome::Missing,
            AuthError::InvalidKey | AuthError::Revoked { .. } => AuthOutcome::Invalid,
            AuthError::Expired { .. } | AuthError::Token(TokenError::Expired) => {
                AuthOutcome::Expired
            }
            AuthError::Token(_) => AuthOutcome::Invalid,
            AuthError::Forbidden { .. } => AuthOutcome::Forbidden,
            AuthError::Quota(QuotaError::Rate { .. }) => AuthOutcome::RateLimited,
            AuthError::Quota(QuotaError::Concurrency { .. }) => AuthOutcome::ConcurrencyLimited,
        }
    }

    /// The `WWW-Authenticate` value of this refusal given the tool's challenge (which names
    /// its metadata): RFC 6750's `invalid_token` when a credential was presented and is not
    /// good, `insufficient_scope` with the scope that would do on a 403. `None` for refusals
    /// that are not about the credential.
    pub fn www_authenticate(&self, challenge: &str) -> Option<String> {
        match self {
            AuthError::Missing | AuthError::NotBearer => Some(challenge.to_owned()),
            AuthError::InvalidKey
            | AuthError::Expired { .. }
            | AuthError::Revoked { .. }
            | AuthError::Token(_) => (self.refusal() == Refusal::Unauthenticated)
                .then(|| format!("{challenge}, error=\"invalid_token\"")),
            AuthError::Forbidden { slug, .. } => Some(format!(
                "{challenge}, error=\"insufficient_scope\", scope=\"mcp:{slug}\""
            )),
            AuthError::Quota(_) => None,
        }
    }
}

/// How a refusal names a principal.
fn who(p: &Principal) -> String {
    match p.kind {
        PrincipalKind::Key => format!("key {}", p.id),
        PrincipalKind::OAuth => format!("token subject {}", p.id),
    }
}

/// An admitted request: who made it, its in-flight slot (held until its response ends), and
/// the token that ends it if the credential is revoked meanwhile.
#[derive(Debug)]
pub struct Admission {
    pub principal: Arc<Principal>,
    pub slot: Slot,
    pub revoked: CancellationToken,
}

pub struct Gate {
    mode: McpAuth,
    /// Switchboard's own address, for metadata URLs when a request names none usable.
    public_url: String,
    keys: Arc<Keys>,
    /// `[auth.oauth]`: bearer tokens that are not client keys are verified as its JWTs.
    oauth: Option<Arc<OAuth>>,
    metrics: Option<AuthMetrics>,
}

impl Gate {
    pub fn new(
        mode: McpAuth,
        keys: Arc<Keys>,
        oauth: Option<Arc<OAuth>>,
        metrics: Option<AuthMetrics>,
        public_url: String,
    ) -> Gate {
        Gate {
            mode,
            public_url,
            keys,
            oauth,
            metrics,
        }
    }

    pub fn mode(&self) -> McpAuth {
        self.mode
    }

    /// The `WWW-Authenticate` challenge of a 401 on tool `slug`, for the address the request
    /// used.
    pub fn challenge(&self, headers: &HeaderMap, uri: &Uri, slug: &str) -> String {
        metadata::challenge(&metadata::base_url(headers, uri, &self.public_url), slug)
    }

    /// Admits a request to tool `slug` (at `uri`), or says why not. `Ok(None)`: authentication
    /// is off, nobody is identified and nothing is limited. Waits only when an access token
    /// names a signing key not fetched yet.
    pub async fn admit(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        slug: &str,
    ) -> Result<Option<Admission>, AuthError> {
        if self.mode == McpAuth::Off {
            return Ok(None);
        }
        let outcome = self.check(headers, uri, slug).await;
        if let Some(m) = &self.metrics {
            m.count(match &outcome {
                Ok(_) => AuthOutcome::Allowed,
                Err(e) => e.outcome(),
            });
        }
        outcome.map(Some)
    }

    async fn check(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        slug: &str,
    ) -> Result<Admission, AuthError> {
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?;
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|k| !k.is_empty())
            .ok_or(AuthError::NotBearer)?;
        let (principal, quota, revoked) = match &self.oauth {
            Some(oauth) if !presented.starts_with(KEY_PREFIX) => {
                let resource = metadata::resource_url(
                    &metadata::base_url(headers, uri, &self.public_url),
                    slug,
                );
                let v = oauth
                    .verify(presented, &resource)
                    .await
                    .map_err(AuthError::Token)?;
                // A token is not revoked here: it ends when it expires.
                (v.principal, v.quota, CancellationToken::new())
            }
            _ => {
                let key = self.keys.find(presented).ok_or(AuthError::InvalidKey)?;
                if key.expired(chrono::Utc::now()) {
                    return Err(AuthError::Expired {
                        id: key.principal.id.clone(),
                    });
                }
                (
                    Arc::clone(&key.principal),
                    Arc::clone(&key.quota),
                    key.revoked.clone(),
                )
            }
        };
        // Per-MCP-tool grants admit the request; the proxy filters what it may see and call
        // (`proxy::filter`).
        if principal.grants.access(slug) == Access::None {
            return Err(AuthError::Forbidden {
                principal: who(&principal),
                slug: slug.to_owned(),
            });
        }
        let slot = quota.admit().map_err(AuthError::Quota)?;
        Ok(Admission {
            principal,
            slot,
            revoked,
        })
    }
}
