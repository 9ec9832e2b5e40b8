//! OAuth 2.0 Protected Resource Metadata (RFC 9728) for each tool's MCP endpoint, which the
//! MCP authorization spec has clients discover from a 401's `WWW-Authenticate` header.
//!
//! URLs are built from the address the client used (`Host`, or the request's authority over
//! HTTP/2), so a client behind a name or a port mapping is pointed back at what it can reach;
//! a `Host` that is not a valid authority falls back to Switchboard's own address.

use axum::http::{HeaderMap, Uri, header, uri::Authority};
use serde::Serialize;

/// Where a tool's metadata is served: `<base>{WELL_KNOWN}/mcp/{slug}`.
pub const WELL_KNOWN: &str = "/.well-known/oauth-protected-resource";

/// `scheme://authority` as the client reached Switchboard.
pub fn base_url(headers: &HeaderMap, uri: &Uri, fallback: &str) -> String {
    let authority = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<Authority>().ok())
        .or_else(|| uri.authority().cloned());
    let Some(authority) = authority else {
        return fallback.to_owned();
    };
    // A TLS terminator in front says so; Switchboard itself serves plain HTTP.
    let https = headers
        .get("x-forwarded-proto")
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    format!("{}://{authority}", if https { "https" } else { "http" })
}

/// The URL a 401 on tool `slug` points at.
pub fn metadata_url(base: &str, slug: &str) -> String {
    format!("{base}{WELL_KNOWN}/mcp/{slug}")
}

/// The `WWW-Authenticate` value of a 401 on tool `slug` (RFC 9728 §5.1).
pub fn challenge(base: &str, slug: &str) -> String {
    format!("Bearer resource_metadata=\"{}\"", metadata_url(base, slug))
}

/// Tool `slug`'s resource URL (RFC 8707): what the metadata names as `resource`, and the
/// audience an access token for it carries unless `[auth.oauth] audience` says otherwise.
pub fn resource_url(base: &str, slug: &str) -> String {
    format!("{base}/mcp/{slug}")
}

/// The metadata document (RFC 9728 §2). `authorization_servers` is absent without
/// `[auth.oauth]`: client keys are made by an operator, not obtained from an authorization
/// server.
#[derive(Debug, Serialize)]
pub struct ResourceMetadata {
    /// The tool's MCP endpoint as the client reached it.
    pub resource: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub authorization_servers: Vec<String>,
    /// The scope that grants this tool (`mcp:{slug}`), with `[auth.oauth]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes_supported: Vec<String>,
    pub bearer_methods_supported: [&'static str; 1],
    pub resource_name: String,
}

/// The document of tool `slug`; `issuer` is `[auth.oauth] issuer` when configured.
pub fn document(base: &str, slug: &str, issuer: Option<&str>) -> ResourceMetadata {
    ResourceMetadata {
        resource: resource_url(base, slug),
        authorization_servers: issuer.map(str::to_owned).into_iter().collect(),
        scopes_supported: issuer.map(|_| format!("mcp:{slug}")).into_iter().collect(),
        bearer_methods_supported: ["header"],
        resource_name: format!("Switchboard tool '{slug}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_host_the_client_used() {
        let mut h = HeaderMap::new();
        let uri: Uri = "/mcp/demo".parse().unwrap();
        assert_eq!(
            base_url(&h, &uri, "http://127.0.0.1:7300"),
            "http://127.0.0.1:7300"
        );
        h.insert(header::HOST, "mcp.example.com:8080".parse().unwrap());
        assert_eq!(base_url(&h, &uri, "x"), "http://mcp.example.com:8080");
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        let base = base_url(&h, &uri, "x");
        assert_eq!(
            challenge(&base, "demo"),
            "Bearer resource_metadata=\"https://mcp.example.com:8080/.well-known/oauth-protected-resource/mcp/demo\""
        );
        // A Host that could break out of the quoted string is not used.
        h.insert(header::HOST, "evil\"x".parse().unwrap());
        assert_eq!(base_url(&h, &uri, "http://fallback"), "http://fallback");
    }
}
