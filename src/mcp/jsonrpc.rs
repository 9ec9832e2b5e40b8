//! JSON-RPC 2.0 as MCP uses it: what a message is (request, notification, response), read
//! from a `serde_json::Value` without copying, the error codes Switchboard answers with, and
//! builders for the messages it writes. Messages stay `Value`s because relays (the stdio
//! bridge, the proxy) pass them on byte for byte or change one field; [`Message`] is the view
//! that decides what to do with one.

use serde_json::{Value, json};

/// Error codes (JSON-RPC 2.0 §5.1, and the ones the MCP SDKs use).
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Also what servers answer a `tools/call` of an unknown tool with.
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The SDKs' generic server error, which they answer "Bad Request" with (a missing session
    /// header, a GET without a session).
    pub const SERVER_ERROR: i64 = -32000;
    /// The SDKs' "session not found" for an unknown `Mcp-Session-Id`.
    pub const SESSION_NOT_FOUND: i64 = -32001;
    /// 2026-07-28's UnsupportedProtocolVersionError (a client then falls back to `initialize`).
    pub const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;
}

/// What one JSON-RPC message is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Message<'a> {
    /// Has a method and a (non-null) id: expects a response with that id.
    Request {
        id: &'a Value,
        method: &'a str,
        params: Option<&'a Value>,
    },
    /// Has a method and no id: expects nothing.
    Notification {
        method: &'a str,
        params: Option<&'a Value>,
    },
    /// Has `result` (Ok) or `error` (Err) for the request with `id` (null when the request
    /// could not be read).
    Response {
        id: &'a Value,
        outcome: Result<&'a Value, &'a Value>,
    },
}

impl<'a> Message<'a> {
    /// Reads `msg`; `None` when it is none of the three (not an object, or neither a method
    /// nor a result or error).
    pub fn parse(msg: &'a Value) -> Option<Message<'a>> {
        let obj = msg.as_object()?;
        let id = obj.get("id").filter(|id| !id.is_null());
        if let Some(method) = obj.get("method") {
            let method = method.as_str()?;
            let params = obj.get("params");
            return Some(match id {
                Some(id) => Message::Request { id, method, params },
                None => Message::Notification { method, params },
            });
        }
        let id = obj.get("id").unwrap_or(&Value::Null);
        let outcome = match (obj.get("result"), obj.get("error")) {
            (_, Some(e)) => Err(e),
            (Some(r), None) => Ok(r),
            (None, None) => return None,
        };
        Some(Message::Response { id, outcome })
    }

    pub fn method(&self) -> Option<&'a str> {
        match self {
            Message::Request { method, .. } | Message::Notification { method, .. } => Some(method),
            Message::Response { .. } => None,
        }
    }

    /// The id of a request or response (a notification has none).
    pub fn id(&self) -> Option<&'a Value> {
        match self {
            Message::Request { id, .. } | Message::Response { id, .. } => Some(id),
            Message::Notification { .. } => None,
        }
    }

    /// The outcome when this is the response to the request with `id`.
    pub fn response_to(&self, id: &Value) -> Option<Result<&'a Value, &'a Value>> {
        match self {
            Message::Response { id: got, outcome } if *got == id => Some(*outcome),
            _ => None,
        }
    }
}

pub fn request(id: impl Into<Value>, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id.into(), "method": method, "params": params})
}

pub fn notification(method: &str) -> Value {
    json!({"jsonrpc": "2.0", "method": method})
}

/// An error response; `id` is null when the request could not be read.
pub fn error_response(id: Value, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut error = json!({"code": code, "message": message});
    if let Some(d) = data {
        error["data"] = d;
    }
    json!({"jsonrpc": "2.0", "id": id, "error": error})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_classified_by_their_fields() {
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
        assert_eq!(
            Message::parse(&req),
            Some(Message::Request {
                id: &json!(1),
                method: "ping",
                params: None
            })
        );
        // A null id is no id: the message expects no answer.
        let note = json!({"jsonrpc": "2.0", "id": null, "method": "notifications/initialized"});
        assert!(matches!(
            Message::parse(&note),
            Some(Message::Notification {
                method: "notifications/initialized",
                ..
            })
        ));
        let ok = json!({"jsonrpc": "2.0", "id": "a", "result": {}});
        assert_eq!(
            Message::parse(&ok).unwrap().response_to(&json!("a")),
            Some(Ok(&json!({})))
        );
        assert_eq!(Message::parse(&ok).unwrap().response_to(&json!(1)), None);
        let err = error_response(Value::Null, code::INTERNAL_ERROR, "x", None);
        let parsed = Message::parse(&err).unwrap();
        assert_eq!(parsed.id(), Some(&Value::Null));
        assert!(matches!(
            parsed,
            Message::Response {
                outcome: Err(_),
                ..
            }
        ));
        for bad in [json!([]), json!({"id": 1}), json!({"method": 3})] {
            assert_eq!(Message::parse(&bad), None, "{bad}");
        }
    }

    #[test]
    fn builders_write_what_parse_reads() {
        let r = request(7, "tools/list", json!({}));
        assert_eq!(Message::parse(&r).unwrap().method(), Some("tools/list"));
        assert_eq!(Message::parse(&r).unwrap().id(), Some(&json!(7)));
        let n = notification("notifications/initialized");
        assert_eq!(Message::parse(&n).unwrap().id(), None);
        let e = error_response(json!(2), code::SESSION_NOT_FOUND, "gone", Some(json!([1])));
        assert_eq!(e["error"]["data"], json!([1]));
    }
}
