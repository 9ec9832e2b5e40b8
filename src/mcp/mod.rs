//! MCP protocol facts, declared once: the spec revisions and their eras, the HTTP header names,
//! the `_meta` keys of the 2026-07-28 revision, JSON-RPC messages ([`jsonrpc`]) and the one SSE
//! parser ([`sse`]) every reader of an event stream uses (health probes, the proxy, the CLI).
//!
//! This module knows nothing of deployments, the proxy or the manager: everything else may
//! depend on it, it depends on nothing in the crate.

pub mod jsonrpc;
pub mod sse;

use http::HeaderName;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

/// The stateless revision: `server/discover`, no `initialize`, no sessions.
pub const MODERN_VERSION: &str = "2026-07-28";
/// The newest revision with the `initialize` handshake: what a legacy client asks for.
pub const LEGACY_VERSION: &str = "2025-11-25";
/// The revisions a legacy (`initialize`) server may speak, newest first.
pub const LEGACY_VERSIONS: [&str; 4] =
    [LEGACY_VERSION, "2025-06-18", "2025-03-26", HTTP_SSE_VERSION];
/// The revision of the deprecated HTTP+SSE transport (a GET stream opened by `endpoint`).
pub const HTTP_SSE_VERSION: &str = "2024-11-05";

/// `Mcp-Session-Id` (the 2025-11-25 text spells it `MCP-Session-Id`; header names are
/// case-insensitive).
pub const SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
/// The negotiated revision, sent by the client on every request after `initialize`.
pub const PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
/// 2026-07-28's routing header: the JSON-RPC method of the body.
pub const METHOD: HeaderName = HeaderName::from_static("mcp-method");
/// 2026-07-28's routing header: `params.name` of a `tools/call` (and `prompts/get`, or the
/// `uri` of `resources/read`).
pub const NAME: HeaderName = HeaderName::from_static("mcp-name");

/// The `_meta` keys of a 2026-07-28 request and of a `server/discover` result.
pub mod meta {
    pub const PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
    pub const CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
    pub const CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
    pub const SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";
    /// On a notification (and the final result) of a `subscriptions/listen` stream: the id
    /// of the listen request it belongs to.
    pub const SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";
}

/// Which generation of the protocol a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Era {
    /// 2026-07-28 and later: stateless, `server/discover`.
    Modern,
    /// 2025-11-25 and earlier: `initialize` handshake and sessions.
    Legacy,
    /// The deprecated 2024-11-05 HTTP+SSE transport: a GET stream whose first event names the
    /// URL to POST to.
    #[serde(rename = "legacy-sse")]
    LegacySse,
}

impl Era {
    pub fn as_str(self) -> &'static str {
        match self {
            Era::Modern => "modern",
            Era::Legacy => "legacy",
            Era::LegacySse => "legacy-sse",
        }
    }
}

/// The spec's rule for an MCP tool name: 1-128 of `A-Z a-z 0-9 _ - .`.
pub fn is_valid_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// The `_meta` a 2026-07-28 request carries, from a client named `client_name`.
pub fn modern_meta(client_name: &str) -> Value {
    json!({
        meta::PROTOCOL_VERSION: MODERN_VERSION,
        meta::CLIENT_INFO: {"name": client_name, "version": env!("CARGO_PKG_VERSION")},
        meta::CLIENT_CAPABILITIES: {},
    })
}

/// The protocol version a 2026-07-28 message names in its `params._meta`, if it names one
/// (which is what marks a request as modern).
pub fn meta_protocol_version(msg: &Value) -> Option<&Value> {
    msg.get("params")?.get("_meta")?.get(meta::PROTOCOL_VERSION)
}

/// The server's `name` and `version` from an `initialize` result's `serverInfo` or a
/// `server/discover` result's `_meta` (either place: servers differ).
pub fn server_info(result: &Value) -> (Option<String>, Option<String>) {
    let info = result
        .get("_meta")
        .and_then(|m| m.get(meta::SERVER_INFO))
        .or_else(|| result.get("serverInfo"));
    let field = |k: &str| {
        info.and_then(|i| i.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    (field("name"), field("version"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn era_names_are_the_api_names() {
        for era in [Era::Modern, Era::Legacy, Era::LegacySse] {
            assert_eq!(
                serde_json::to_value(era).unwrap(),
                Value::String(era.as_str().to_owned())
            );
        }
    }

    #[test]
    fn modern_meta_names_the_modern_version() {
        let msg = json!({"params": {"_meta": modern_meta("t")}});
        assert_eq!(meta_protocol_version(&msg).unwrap(), MODERN_VERSION);
        assert!(meta_protocol_version(&json!({"params": {}})).is_none());
    }

    #[test]
    fn server_info_from_either_place() {
        let discover = json!({"_meta": {meta::SERVER_INFO: {"name": "a", "version": "1"}}});
        let init = json!({"serverInfo": {"name": "b"}});
        assert_eq!(server_info(&discover), (Some("a".into()), Some("1".into())));
        assert_eq!(server_info(&init), (Some("b".into()), None));
    }
}
