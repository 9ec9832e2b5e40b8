//! The check every `/mcp` request passes before the proxy routes it: who is calling (a client
//! key in `Authorization: Bearer`), whether it may call this tool, and whether its quota admits
//! one more request. The proxy calls [`Gate::admit`] and turns a refusal into its answer
//! (`proxy::error::ProxyError::Auth`), so errors on `/mcp` come from one place.

use std::sync::Arc;

use axum::http::{HeaderMap, Uri, header};
use tokio_util::sync::CancellationToken;

use super::{
    McpAuth,
    keys::Keys,
    metadata,
    principal::{Access, Principal},
    quota::{QuotaError, Slot},
};
use crate::metrics::{AuthMetrics, AuthOutcome};

/// Why a request was refused. [`AuthError::status`] says how it is answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "this MCP endpoint needs a client key: send 'Authorization: Bearer <key>' (keys are made \
         with `switchboard key create`)"
    )]
    Missing,
    #[error("the Authorization header is not 'Bearer <key>'")]
    NotBearer,
    #[error("the client key is not valid (unknown or revoked)")]
    InvalidKey,
    #[error("the client key {id} expired")]
    Expired { id: String },
    /// The key was revoked while this request waited for the server's answer.
    #[error("the client key {id} was revoked while this request was under way")]
    Revoked { id: String },
    #[error("key {principal} has no grant on tool '{slug}'")]
    Forbidden { principal: String, slug: String },
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
}

impl AuthError {
    pub fn refusal(&self) -> Refusal {
        match self {
            AuthError::Missing
            | AuthError::NotBearer
            | AuthError::InvalidKey
            | AuthError::Expired { .. }
            | AuthError::Revoked { .. } => Refusal::Unauthenticated,
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
            AuthError::Quota(QuotaError::Rate { .. }) => "rate_limited",
            AuthError::Quota(QuotaError::Concurrency { .. }) => "too_many_requests_in_flight",
        }
    }

    fn outcome(&self) -> AuthOutcome {
        match self {
            AuthError::Missing | AuthError::NotBearer => AuthOutcome::Missing,
            AuthError::InvalidKey | AuthError::Revoked { .. } => AuthOutcome::Invalid,
            AuthError::Expired { .. } => AuthOutcome::Expired,
            AuthError::Forbidden { .. } => AuthOutcome::Forbidden,
            AuthError::Quota(QuotaError::Rate { .. }) => AuthOutcome::RateLimited,
            AuthError::Quota(QuotaError::Concurrency { .. }) => AuthOutcome::ConcurrencyLimited,
        }
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
    metrics: Option<AuthMetrics>,
}

impl Gate {
    pub fn new(
        mode: McpAuth,
        keys: Arc<Keys>,
        metrics: Option<AuthMetrics>,
        public_url: String,
    ) -> Gate {
        Gate {
            mode,
            public_url,
            keys,
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

    /// Admits a request to tool `slug`, or says why not. `Ok(None)`: authentication is off,
    /// nobody is identified and nothing is limited.
    pub fn admit(&self, headers: &HeaderMap, slug: &str) -> Result<Option<Admission>, AuthError> {
        if self.mode == McpAuth::Off {
            return Ok(None);
        }
        let outcome = self.check(headers, slug);
        if let Some(m) = &self.metrics {
            m.count(match &outcome {
                Ok(_) => AuthOutcome::Allowed,
                Err(e) => e.outcome(),
            });
        }
        outcome.map(Some)
    }

    fn check(&self, headers: &HeaderMap, slug: &str) -> Result<Admission, AuthError> {
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
        let key = self.keys.find(presented).ok_or(AuthError::InvalidKey)?;
        let principal = &key.principal;
        if key.expired(chrono::Utc::now()) {
            return Err(AuthError::Expired {
                id: principal.id.clone(),
            });
        }
        // Per-MCP-tool grants admit the request; the proxy filters what it may see and call
        // (`proxy::filter`).
        if principal.grants.access(slug) == Access::None {
            return Err(AuthError::Forbidden {
                principal: principal.id.clone(),
                slug: slug.to_owned(),
            });
        }
        let slot = key.quota.admit().map_err(AuthError::Quota)?;
        Ok(Admission {
            principal: Arc::clone(principal),
            slot,
            revoked: key.revoked.clone(),
        })
    }
}
