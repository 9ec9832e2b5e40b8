//! OAuth 2.1 access tokens on `/mcp`: Switchboard as a resource server of one authorization
//! server (`[auth.oauth] issuer`), as the MCP authorization spec describes.
//!
//! The issuer's metadata is discovered as the spec says (RFC 8414 and OpenID Connect discovery,
//! both tried, path-insertion forms first for an issuer with a path) and must name the same
//! issuer; its `jwks_uri` is fetched and the keys are held in memory, so verifying a token
//! reads no network. A token naming a key (`kid`) not held makes one refetch, shared by every
//! request waiting for it and rate-limited (a flood of made-up kids cannot hammer the issuer),
//! which is how a key rotation at the issuer is picked up.
//!
//! Every token is checked for its signature (asymmetric algorithms only: `none` and HMAC are
//! refused, since an HMAC secret would have to be shared with every resource server), `exp`
//! and `nbf` with [`LEEWAY_S`], `iss`, and `aud`: the configured `audience`, or else the
//! tool's resource URL as the client reached it (RFC 8707; what the Protected Resource Metadata
//! names as `resource`). The principal is the token's `sub` (or `client_id`), and its `scope`
//! carries the grants ([`Grant::from_scope`]).
//!
//! A verified token is remembered (by a digest of the token and the audience it was checked
//! for, [`VERIFIED_TTL`] at most): a signature check costs tens of microseconds, about what the
//! whole proxy hop costs, and a client sends the same token for its whole session. A hit still
//! checks `exp`/`nbf` against the clock and that the token's key is still in the issuer's set,
//! so it is accepted exactly when verifying it again would accept it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::Jwk};
use serde::Deserialize;

use super::{
    principal::{Grant, Grants, Principal, PrincipalKind},
    quota::Quota,
};

/// How long a verified token is remembered (bounded so the cache holds few dead entries).
pub const VERIFIED_TTL: Duration = Duration::from_secs(60);
/// How many verified tokens are remembered.
const VERIFIED_MAX: u64 = 10_000;

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_S: u64 = 30;

/// Refetches of the issuer's keys for unknown kids: bursts of this many, then one per
/// `60 / REFETCHES_PER_MIN` seconds.
pub const REFETCHES_PER_MIN: u32 = 6;

/// How long one request to the issuer may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Metadata and key sets larger than this are refused (they are a few KiB).
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Subjects whose quota state is kept before idle ones are dropped.
const MAX_TRACKED_SUBJECTS: usize = 10_000;

/// The algorithms a token may be signed with.
const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// `[auth.oauth]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// The authorization server's issuer identifier (`https://...`; `http://` only on a
    /// loopback host).
    pub issuer: String,
    /// The `aud` every token must carry. Default: the tool's URL as the client reached it
    /// (`<scheme>://<host>/mcp/<slug>`).
    #[serde(default)]
    pub audience: Option<String>,
    /// Requests per minute per token subject, in bursts of up to this many (default: none).
    #[serde(default)]
    pub rate_limit_per_min: Option<u32>,
    /// Requests in flight per token subject (default: no limit).
    #[serde(default)]
    pub max_concurrent: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthConfigError {
    #[error("[auth.oauth] issuer '{0}' is not a URL")]
    NotUrl(String),
    #[error(
        "[auth.oauth] issuer '{0}' must be https (http is allowed only for a loopback host), \
         with no query or fragment"
    )]
    Insecure(String),
}

impl OAuthConfig {
    pub fn validate(&self) -> Result<(), OAuthConfigError> {
        let url = reqwest::Url::parse(&self.issuer)
            .map_err(|_| OAuthConfigError::NotUrl(self.issuer.clone()))?;
        let loopback = match url.host_str() {
            Some("localhost") => true,
            Some(h) => h
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()),
            None => false,
        };
        let secure = url.scheme() == "https" || (url.scheme() == "http" && loopback);
        if !secure || url.query().is_some() || url.fragment().is_some() {
            return Err(OAuthConfigError::Insecure(self.issuer.clone()));
        }
        Ok(())
    }
}

/// Why a token was not accepted. Messages name what failed, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the access token is not a signed JWT")]
    Malformed,
    #[error(
        "the access token is signed with {0}, which is not accepted (use RS256, ES256 or another \
         asymmetric algorithm)"
    )]
    Algorithm(String),
    #[error("the access token names no signing key (kid) and the issuer has several")]
    NoKeyId,
    #[error("the access token is signed with key '{0}', which the issuer does not publish")]
    UnknownKey(String),
    #[error("the access token's signature does not verify")]
    Signature,
    #[error("the access token expired")]
    Expired,
    #[error("the access token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the access token was not issued by {expected}")]
    Issuer { expected: String },
    #[error("the access token is not meant for {expected} (aud)")]
    Audience { expected: String },
    #[error("the access token has no '{0}' claim")]
    MissingClaim(String),
    #[error("the access token has a malformed '{0}' claim")]
    BadClaim(String),
    #[error("the access token names no subject (sub or client_id)")]
    NoSubject,
    /// The issuer's metadata or keys could not be fetched: not the client's fault.
    #[error("the authorization server {issuer} cannot be reached to verify tokens: {reason}")]
    IssuerUnavailable { issuer: String, reason: String },
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Malformed => "token_malformed",
            TokenError::Algorithm(_) => "token_algorithm_refused",
            TokenError::NoKeyId | TokenError::UnknownKey(_) => "token_unknown_key",
            TokenError::Signature => "token_bad_signature",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::Issuer { .. } => "token_wrong_issuer",
            TokenError::Audience { .. } => "token_wrong_audience",
            TokenError::MissingClaim(_) | TokenError::BadClaim(_) | TokenError::NoSubject => {
                "token_invalid_claims"
            }
            TokenError::IssuerUnavailable { .. } => "authorization_server_unavailable",
        }
    }
}

/// The claims Switchboard reads besides those `jsonwebtoken` validates.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    client_id: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
}

/// What a verified token established, remembered for the next request that carries it.
struct Remembered {
    principal: Arc<Principal>,
    kid: String,
    exp: u64,
    nbf: Option<u64>,
}

/// A verified token: who it names, what its scopes grant, and its quota.
#[derive(Debug)]
pub struct Verified {
    pub principal: Arc<Principal>,
    pub quota: Arc<Quota>,
}

/// The URLs where the issuer's metadata may be, in the order the MCP authorization spec tries
/// them: RFC 8414 then OpenID Connect discovery with the well-known path inserted after the
/// host, then OpenID Connect's own form (appended to the issuer's path).
pub fn discovery_urls(issuer: &str) -> Vec<String> {
    let trimmed = issuer.trim_end_matches('/');
    let (origin, path) = match trimmed.find("://").map(|i| i + 3) {
        Some(after) => match trimmed[after..].find('/') {
            Some(p) => trimmed.split_at(after + p),
            None => (trimmed, ""),
        },
        None => (trimmed, ""),
    };
    if path.is_empty() {
        vec![
            format!("{origin}/.well-known/oauth-authorization-server"),
            format!("{origin}/.well-known/openid-configuration"),
        ]
    } else {
        vec![
            format!("{origin}/.well-known/oauth-authorization-server{path}"),
            format!("{origin}/.well-known/openid-configuration{path}"),
            format!("{origin}{path}/.well-known/openid-configuration"),
        ]
    }
}

/// A key of the issuer's set, ready to verify with.
struct Key {
    key: DecodingKey,
    /// The key's `alg`, when it names one: a token must then use that algorithm.
    alg: Option<Algorithm>,
}

#[derive(Default)]
struct Keys {
    jwks_uri: Option<String>,
    by_kid: HashMap<String, Arc<Key>>,
    /// Keys without a kid (usable only by tokens without one, when they are the only key).
    unnamed: Vec<Arc<Key>>,
}

pub struct OAuth {
    config: OAuthConfig,
    http: reqwest::Client,
    /// Held for a lookup or a swap, never across a fetch.
    keys: Mutex<Keys>,
    /// One refetch at a time: requests that wait for a kid share the fetch in progress. A
    /// tokio mutex, because it is held across that fetch on purpose.
    refetch: tokio::sync::Mutex<()>,
    refetch_budget: Quota,
    subjects: Mutex<HashMap<String, Arc<Quota>>>,
    /// Tokens verified lately, by SHA-256 of the audience and the token.
    verified: moka::sync::Cache<[u8; 32], Arc<Remembered>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchError {
    Status(u16),
    Other,
}

impl OAuth {
    pub fn new(config: OAuthConfig) -> Result<OAuth, OAuthConfigError> {
        config.validate()?;
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            // Metadata must come from the issuer itself (RFC 8414 §3); a redirect elsewhere
            // would let another host publish keys.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|_| OAuthConfigError::NotUrl(config.issuer.clone()))?;
        Ok(OAuth {
            config,
            http,
            keys: Mutex::new(Keys::default()),
            refetch: tokio::sync::Mutex::new(()),
            refetch_budget: Quota::new(Some(REFETCHES_PER_MIN), None),
            subjects: Mutex::new(HashMap::new()),
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_MAX)
                .time_to_live(VERIFIED_TTL)
                .build(),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Discovers the issuer and loads its keys (at start, so the first request finds them).
    pub async fn load(&self) -> Result<(), TokenError> {
        let _flight = self.refetch.lock().await;
        self.refresh().await
    }

    /// Verifies `token` for the tool whose resource URL is `resource`.
    pub async fn verify(&self, token: &str, resource: &str) -> Result<Verified, TokenError> {
        let audience = self.config.audience.as_deref().unwrap_or(resource);
        let digest = digest_of(audience, token);
        if let Some(r) = self.verified.get(&digest) {
            let now = unix_now();
            if now > r.exp + LEEWAY_S {
                self.verified.invalidate(&digest);
                return Err(TokenError::Expired);
            }
            // Remembered only once valid (nbf passed), so this holds unless the clock went back.
            if r.nbf.is_some_and(|nbf| nbf > now + LEEWAY_S) {
                return Err(TokenError::NotYetValid);
            }
            // A key the issuer has withdrawn (seen at a refetch) no longer vouches for it.
            if self.lookup(Some(&r.kid))?.is_some() {
                return Ok(Verified {
                    quota: self.quota_for(&r.principal.id),
                    principal: Arc::clone(&r.principal),
                });
            }
            self.verified.invalidate(&digest);
        }
        self.verify_uncached(token, audience).await
    }

    async fn verify_uncached(&self, token: &str, audience: &str) -> Result<Verified, TokenError> {
        // A header jsonwebtoken cannot read may still name an algorithm it does not know
        // (`none`): say so rather than "malformed".
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| alg_named(token).map_or(TokenError::Malformed, TokenError::Algorithm))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let key = self.key_for(header.kid.as_deref()).await?;
        if key.alg.is_some_and(|a| a != header.alg) {
            return Err(TokenError::Signature);
        }
        let mut v = Validation::new(header.alg);
        v.leeway = LEEWAY_S;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&[audience]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &v).map_err(|e| {
            match e.into_kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidIssuer => TokenError::Issuer {
                    expected: self.config.issuer.clone(),
                },
                ErrorKind::InvalidAudience => TokenError::Audience {
                    expected: audience.to_owned(),
                },
                ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c),
                ErrorKind::InvalidClaimFormat(c) => TokenError::BadClaim(c),
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEddsaKey => TokenError::Signature,
                _ => TokenError::Malformed,
            }
        })?;
        let claims = data.claims;
        let id = claims
            .sub
            .or(claims.client_id)
            .filter(|s| !s.is_empty())
            .ok_or(TokenError::NoSubject)?;
        let grants = claims
            .scope
            .as_deref()
            .unwrap_or_default()
            .split_ascii_whitespace()
            .filter_map(Grant::from_scope)
            .collect();
        let quota = self.quota_for(&id);
        let principal = Arc::new(Principal {
            id,
            kind: PrincipalKind::OAuth,
            grants: Grants::new(grants),
        });
        // Tokens without a kid are rare (a one-key issuer) and take the slow path each time.
        if let Some(kid) = header.kid {
            self.verified.insert(
                digest_of(audience, token),
                Arc::new(Remembered {
                    principal: Arc::clone(&principal),
                    kid,
                    exp: claims.exp,
                    nbf: claims.nbf,
                }),
            );
        }
        Ok(Verified { principal, quota })
    }

    fn lookup(&self, kid: Option<&str>) -> Result<Option<Arc<Key>>, TokenError> {
        let keys = self.keys();
        match kid {
            Some(kid) => Ok(keys.by_kid.get(kid).cloned()),
            None => match (keys.by_kid.len(), keys.unnamed.as_slice()) {
                (0, []) => Ok(None),
                (0, [only]) => Ok(Some(Arc::clone(only))),
                (1, []) => Ok(keys.by_kid.values().next().cloned()),
                _ => Err(TokenError::NoKeyId),
            },
        }
    }

    /// The key a token names, refetching the issuer's set once (rate-limited) if it is not
    /// held: that is how a rotation at the issuer is picked up.
    async fn key_for(&self, kid: Option<&str>) -> Result<Arc<Key>, TokenError> {
        if let Some(k) = self.lookup(kid)? {
            return Ok(k);
        }
        let unknown = || TokenError::UnknownKey(kid.unwrap_or("(none)").to_owned());
        let _flight = self.refetch.lock().await;
        // Another request may have fetched it while this one waited.
        if let Some(k) = self.lookup(kid)? {
            return Ok(k);
        }
        if self.refetch_budget.admit().is_err() {
            tracing::debug!(kid, "Unknown signing key; refetch rate-limited");
            return Err(unknown());
        }
        self.refresh().await?;
        self.lookup(kid)?.ok_or_else(unknown)
    }

    /// Discovers the metadata if not known yet, then replaces the held keys with the issuer's
    /// current set. Called with `refetch` held.
    async fn refresh(&self) -> Result<(), TokenError> {
        let known = self.keys().jwks_uri.clone();
        let jwks_uri = match known {
            Some(u) => u,
            None => self.discover().await?,
        };
        let set: serde_json::Value = self
            .get_json(&jwks_uri)
            .await
            .map_err(|e| self.unavailable(format!("its key set {jwks_uri}: {e:?}")))?;
        let mut by_kid = HashMap::new();
        let mut unnamed = Vec::new();
        for raw in set["keys"].as_array().into_iter().flatten() {
            // One key Switchboard cannot use (another kind, an encryption key) does not spoil
            // the set.
            let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
                continue;
            };
            if raw["use"].as_str().is_some_and(|u| u != "sig") {
                continue;
            }
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            if key.family() == jsonwebtoken::AlgorithmFamily::Hmac {
                continue;
            }
            let key = Arc::new(Key { key, alg });
            match jwk.common.key_id {
                Some(kid) => {
                    by_kid.insert(kid, key);
                }
                None => unnamed.push(key),
            }
        }
        tracing::info!(
            issuer = %self.config.issuer,
            keys = by_kid.len() + unnamed.len(),
            "Loaded the authorization server's signing keys"
        );
        let mut keys = self.keys();
        keys.jwks_uri = Some(jwks_uri);
        keys.by_kid = by_kid;
        keys.unnamed = unnamed;
        Ok(())
    }

    /// The issuer's `jwks_uri`, from the first discovery URL that answers with metadata for
    /// this very issuer.
    async fn discover(&self) -> Result<String, TokenError> {
        let mut tried = Vec::new();
        for url in discovery_urls(&self.config.issuer) {
            match self.get_json(&url).await {
                Ok(meta) => {
                    if meta["issuer"].as_str() != Some(self.config.issuer.as_str()) {
                        tried.push(format!("{url} names another issuer"));
                        continue;
                    }
                    return match meta["jwks_uri"].as_str() {
                        Some(u) => Ok(u.to_owned()),
                        None => Err(self.unavailable(format!("{url} has no jwks_uri"))),
                    };
                }
                Err(FetchError::Status(s)) => tried.push(format!("{url}: HTTP {s}")),
                Err(FetchError::Other) => tried.push(format!("{url}: no answer")),
            }
        }
        Err(self.unavailable(format!("no metadata found ({})", tried.join("; "))))
    }

    fn unavailable(&self, reason: String) -> TokenError {
        tracing::warn!(issuer = %self.config.issuer, %reason, "Authorization server metadata");
        TokenError::IssuerUnavailable {
            issuer: self.config.issuer.clone(),
            reason,
        }
    }

    async fn get_json(&self, url: &str) -> Result<serde_json::Value, FetchError> {
        let resp = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|_| FetchError::Other)?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(FetchError::Other);
        }
        let body = resp.bytes().await.map_err(|_| FetchError::Other)?;
        if body.len() > MAX_DOCUMENT_BYTES {
            return Err(FetchError::Other);
        }
        serde_json::from_slice(&body).map_err(|_| FetchError::Other)
    }

    /// The quota of a token subject: one per subject, like one per key, kept while the
    /// subject has requests in flight or rate spent.
    fn quota_for(&self, subject: &str) -> Arc<Quota> {
        let mut subjects = self.subjects.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = subjects.get(subject) {
            return Arc::clone(q);
        }
        if subjects.len() >= MAX_TRACKED_SUBJECTS {
            // Only subjects whose state is back to where a new entry would start are dropped,
            // so forgetting one lifts no limit.
            subjects.retain(|_, q| Arc::strong_count(q) > 1 || !q.at_rest());
        }
        let q = Arc::new(Quota::new(
            self.config.rate_limit_per_min,
            self.config.max_concurrent,
        ));
        subjects.insert(subject.to_owned(), Arc::clone(&q));
        q
    }
}

/// The `alg` a token's header names, for the error of one Switchboard does not know (such as
/// `none`); never more of the token than that.
/// The verified-token cache's key: the token and the audience it was checked for.
fn digest_of(audience: &str, token: &str) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(audience.as_bytes());
    h.update([0]);
    h.update(token.as_bytes());
    h.finalize().into()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn alg_named(token: &str) -> Option<String> {
    use base64::Engine as _;
    token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|h| h["alg"].as_str().map(|a| a.chars().take(16).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_tries_rfc8414_then_openid_with_path_insertion() {
        assert_eq!(
            discovery_urls("https://auth.example.com"),
            [
                "https://auth.example.com/.well-known/oauth-authorization-server",
                "https://auth.example.com/.well-known/openid-configuration",
            ]
        );
        assert_eq!(
            discovery_urls("https://auth.example.com/tenant1/"),
            [
                "https://auth.example.com/.well-known/oauth-authorization-server/tenant1",
                "https://auth.example.com/.well-known/openid-configuration/tenant1",
                "https://auth.example.com/tenant1/.well-known/openid-configuration",
            ]
        );
    }

    #[test]
    fn issuers_are_https_or_loopback_http() {
        let c = |issuer: &str| OAuthConfig {
            issuer: issuer.into(),
            audience: None,
            rate_limit_per_min: None,
            max_concurrent: None,
        };
        for ok in [
            "https://auth.example.com",
            "https://auth.example.com/realms/x",
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:9",
        ] {
            assert_eq!(c(ok).validate(), Ok(()), "{ok}");
        }
        for bad in [
            "http://auth.example.com",
            "https://auth.example.com/?x=1",
            "ftp://127.0.0.1",
        ] {
            assert!(
                matches!(c(bad).validate(), Err(OAuthConfigError::Insecure(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            c("auth.example.com").validate(),
            Err(OAuthConfigError::NotUrl(_))
        ));
    }

    /// An issuer nothing listens on: reaching for its keys fails, so a test sees what is
    /// decided before any fetch.
    fn unreachable_issuer(rate_limit_per_min: Option<u32>) -> OAuth {
        OAuth::new(OAuthConfig {
            issuer: "http://127.0.0.1:9".into(),
            audience: None,
            rate_limit_per_min,
            max_concurrent: None,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_remembered_token_is_refused_once_expired_or_its_key_is_withdrawn() {
        let oauth = unreachable_issuer(None);
        let remember = |token: &str, kid: &str, exp: u64| {
            oauth.verified.insert(
                digest_of("r", token),
                Arc::new(Remembered {
                    principal: Arc::new(Principal {
                        id: "client".into(),
                        kind: PrincipalKind::OAuth,
                        grants: Grants::new(Vec::new()),
                    }),
                    kid: kid.into(),
                    exp,
                    nbf: None,
                }),
            )
        };
        let key = Arc::new(Key {
            key: DecodingKey::from_ec_der(&[]),
            alg: None,
        });
        oauth.keys().by_kid.insert("k1".into(), key);
        remember("live", "k1", unix_now() + 300);
        let hit = oauth.verify("live", "r").await.expect("a remembered token");
        assert_eq!(hit.principal.id, "client");
        // Past exp and the leeway: refused as expired, and forgotten.
        remember("old", "k1", unix_now() - LEEWAY_S - 5);
        assert_eq!(
            oauth.verify("old", "r").await.err(),
            Some(TokenError::Expired)
        );
        assert!(oauth.verified.get(&digest_of("r", "old")).is_none());
        // For another audience it was never verified.
        assert_eq!(
            oauth.verify("live", "other").await.err(),
            Some(TokenError::Malformed)
        );
        // Its key withdrawn: verified again from scratch (here: not a JWT at all).
        oauth.keys().by_kid.clear();
        assert_eq!(
            oauth.verify("live", "r").await.err(),
            Some(TokenError::Malformed)
        );
    }

    #[tokio::test]
    async fn none_and_hmac_tokens_are_refused_before_any_key_lookup() {
        use base64::Engine as _;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let oauth = unreachable_issuer(None);
        let claims = b64(serde_json::json!({"sub": "x", "exp": 4_000_000_000u64}));
        let none = format!("{}.{claims}.", b64(serde_json::json!({"alg": "none"})));
        let e = oauth.verify(&none, "r").await.err();
        assert_eq!(e, Some(TokenError::Algorithm("none".into())));
        let hs = format!(
            "{}.{claims}.c2ln",
            b64(serde_json::json!({"alg": "HS256", "kid": "k"}))
        );
        let e = oauth.verify(&hs, "r").await.err();
        assert_eq!(e, Some(TokenError::Algorithm("HS256".into())));
        assert_eq!(
            oauth.verify("not-a-jwt", "r").await.err(),
            Some(TokenError::Malformed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_subject_has_one_quota() {
        let oauth = unreachable_issuer(Some(1));
        let q = oauth.quota_for("alice");
        q.admit().unwrap();
        // The same subject gets the same bucket: its rate is spent.
        assert!(oauth.quota_for("alice").admit().is_err());
        assert!(oauth.quota_for("bob").admit().is_ok());
    }
}
