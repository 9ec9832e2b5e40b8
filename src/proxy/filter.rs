//! Which MCP tools a caller may see and call: a principal granted only some MCP tools of a
//! slug (`slug/echo`), and a tool that exposes only some of its server's tools to everyone
//! (`expose_tools`), both become a [`ToolFilter`]. The proxy applies it in two places:
//!
//! - the request: a POST body is read whole ([`ToolFilter::inspect`]) and a `tools/call` of a
//!   tool the caller may not call is answered here with a JSON-RPC error, never forwarded;
//! - the response: the one JSON-RPC response to each `tools/list` request of that POST is
//!   rewritten to list only the allowed tools ([`ToolsListFilter`]), in a JSON body or in an
//!   SSE stream, where every other event (progress, logs, server requests) passes byte for
//!   byte as it arrives. On a GET stream (legacy-era resumption, the 2024-11-05 HTTP+SSE
//!   transport) the request ids are not known here, so every response whose result carries a
//!   `tools` array is filtered.
//!
//! Without a filter (a whole-slug or `*` grant, or auth off, and no `expose_tools`) none of
//! this runs: bodies stream through untouched.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use serde_json::Value;

use crate::{
    auth::principal::Access,
    mcp::{
        jsonrpc::{self, Message},
        sse,
    },
};

/// Largest `tools/list` response (JSON body, or one SSE event) held to be rewritten; beyond
/// it the stream fails rather than pass an unfiltered list.
const MAX_HELD: usize = 16 * 1024 * 1024;

/// JSON-RPC's "invalid params", which servers answer an unknown tool with: to the caller, a
/// tool it may not call does not exist.
pub const ACCESS_DENIED: i64 = jsonrpc::code::INVALID_PARAMS;

#[derive(Debug, Clone)]
pub struct ToolFilter {
    /// The principal's per-MCP-tool grants on this slug; `None`: the whole slug.
    granted: Option<Vec<String>>,
    /// The tool's `expose_tools`; `None`: every tool.
    exposed: Option<Arc<[String]>>,
    /// Who is calling, for error messages.
    principal: Option<String>,
}

/// What to do with a POST under a filter.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Forward it; the responses to these `tools/list` ids are to be filtered (none: the
    /// response passes untouched).
    Forward { list_ids: Vec<Value> },
    /// Answer with this JSON-RPC message (a response, or an array of them for a batch)
    /// without reaching the server. `denied` names the refused MCP tool.
    Refuse { answer: Value, denied: String },
}

impl ToolFilter {
    /// The filter for a caller with `access` on a tool exposing `exposed`; `None` when
    /// nothing is to be filtered.
    pub fn new(
        access: Access<'_>,
        exposed: Option<&Arc<[String]>>,
        principal: Option<&str>,
    ) -> Option<ToolFilter> {
        let granted = match access {
            Access::Only(names) => Some(names.into_iter().map(str::to_owned).collect()),
            Access::Whole | Access::None => None,
        };
        if granted.is_none() && exposed.is_none() {
            return None;
        }
        Some(ToolFilter {
            granted,
            exposed: exposed.cloned(),
            principal: principal.map(str::to_owned),
        })
    }

    pub fn allows(&self, name: &str) -> bool {
        self.granted
            .as_ref()
            .is_none_or(|g| g.iter().any(|n| n == name))
            && self
                .exposed
                .as_ref()
                .is_none_or(|e| e.iter().any(|n| n == name))
    }

    fn denial(&self, name: &str) -> String {
        match &self.principal {
            Some(p)
                if self
                    .exposed
                    .as_ref()
                    .is_none_or(|e| e.iter().any(|n| n == name)) =>
            {
                format!("key {p} lacks access to MCP tool '{name}' (not among its grants)")
            }
            _ => format!("MCP tool '{name}' is not available: this tool does not expose it"),
        }
    }

    /// Judges a POST body, parsed (`None`: it is not JSON). A body that is not JSON is refused
    /// (a parse error) rather than forwarded: what this filter cannot read, it cannot vouch
    /// for.
    pub fn inspect(&self, body: Option<&Value>) -> Verdict {
        let Some(msg) = body else {
            return Verdict::Refuse {
                answer: jsonrpc::error_response(
                    Value::Null,
                    jsonrpc::code::PARSE_ERROR,
                    "the request body is not JSON",
                    None,
                ),
                denied: String::new(),
            };
        };
        let messages = match msg {
            Value::Array(items) => items.iter().collect::<Vec<_>>(),
            one => vec![one],
        };
        let mut list_ids = Vec::new();
        let mut denied = None;
        for m in &messages {
            match Message::parse(m) {
                Some(Message::Request {
                    id,
                    method: "tools/list",
                    ..
                }) => list_ids.push(id.clone()),
                Some(Message::Request {
                    id,
                    method: "tools/call",
                    params,
                }) => {
                    let name = params
                        .and_then(|p| p.get("name"))
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if !self.allows(name) && denied.is_none() {
                        denied = Some((id.clone(), name.to_owned()));
                    }
                }
                _ => {}
            }
        }
        let Some((denied_id, name)) = denied else {
            return Verdict::Forward { list_ids };
        };
        let message = self.denial(&name);
        let answer = match msg {
            Value::Array(_) => Value::Array(
                messages
                    .iter()
                    .filter_map(|m| {
                        Message::parse(m)?
                            .id()
                            .filter(|_| m.get("method").is_some())
                    })
                    .map(|id| {
                        let text = if *id == denied_id {
                            message.clone()
                        } else {
                            format!("not sent: the batch also calls a tool it may not ({message})")
                        };
                        jsonrpc::error_response(id.clone(), ACCESS_DENIED, &text, None)
                    })
                    .collect(),
            ),
            _ => jsonrpc::error_response(denied_id, ACCESS_DENIED, &message, None),
        };
        Verdict::Refuse {
            answer,
            denied: name,
        }
    }

    /// Filters `msg` (a message or a batch of them) where it is a response `matcher` picks;
    /// true when something was a match.
    fn rewrite(&self, msg: &mut Value, matcher: &mut Matcher) -> bool {
        if let Value::Array(items) = msg {
            let mut any = false;
            for item in items {
                any |= self.rewrite(item, matcher);
            }
            return any;
        }
        let picked = match (Message::parse(msg), &mut *matcher) {
            (Some(Message::Response { id, outcome: Ok(_) }), Matcher::Ids(ids)) => {
                match ids.iter().position(|i| i == id) {
                    Some(i) => {
                        ids.swap_remove(i);
                        true
                    }
                    None => false,
                }
            }
            (Some(Message::Response { outcome: Ok(r), .. }), Matcher::AnyToolsList) => {
                r.get("tools").is_some_and(Value::is_array)
            }
            _ => false,
        };
        if picked && let Some(Value::Array(tools)) = msg.pointer_mut("/result/tools") {
            tools.retain(|t| {
                t.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| self.allows(n))
            });
        }
        picked
    }
}

/// Which responses of a stream are `tools/list` results.
#[derive(Debug, Clone, PartialEq)]
pub enum Matcher {
    /// The responses to these request ids (a POST's); done when all are seen.
    Ids(Vec<Value>),
    /// Any successful response whose result has a `tools` array (a GET stream's).
    AnyToolsList,
}

impl Matcher {
    fn done(&self) -> bool {
        matches!(self, Matcher::Ids(ids) if ids.is_empty())
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("a tools/list response over {MAX_HELD} bytes cannot be filtered; stream ended")]
struct TooLarge;

enum Mode {
    /// SSE: the parser and the bytes of the event under way.
    Sse(sse::Parser, BytesMut),
    /// JSON: the whole body so far.
    Json(BytesMut),
    /// Nothing more to rewrite.
    Through,
}

/// A response body with its `tools/list` results filtered.
pub struct ToolsListFilter<B> {
    inner: B,
    filter: Arc<ToolFilter>,
    matcher: Matcher,
    mode: Mode,
}

impl<B> ToolsListFilter<B> {
    pub fn new(inner: B, filter: Arc<ToolFilter>, matcher: Matcher, is_sse: bool) -> Self {
        let mode = match () {
            _ if matcher.done() => Mode::Through,
            _ if is_sse => Mode::Sse(sse::Parser::new(), BytesMut::new()),
            _ => Mode::Json(BytesMut::new()),
        };
        ToolsListFilter {
            inner,
            filter,
            matcher,
            mode,
        }
    }

    /// The event's bytes as the client should get them: re-encoded when it was rewritten.
    fn event(&mut self, event: &sse::Event, original: BytesMut, out: &mut BytesMut) {
        let data = event.data.trim_start();
        if (data.starts_with('{') || data.starts_with('['))
            && let Ok(mut msg) = serde_json::from_str::<Value>(data)
            && self.filter.rewrite(&mut msg, &mut self.matcher)
        {
            out.extend_from_slice(
                sse::encode(&event.event, &event.id, &msg.to_string()).as_bytes(),
            );
            return;
        }
        out.extend_from_slice(&original);
    }

    /// Feeds an SSE chunk; returns what to send on.
    fn sse_chunk(&mut self, mut chunk: &[u8]) -> Result<Bytes, TooLarge> {
        let Mode::Sse(mut parser, mut held) = std::mem::replace(&mut self.mode, Mode::Through)
        else {
            return Ok(Bytes::copy_from_slice(chunk));
        };
        let mut out = BytesMut::new();
        while !chunk.is_empty() {
            let (used, event) = parser.next_event(chunk);
            held.extend_from_slice(&chunk[..used]);
            chunk = &chunk[used..];
            if let Some(event) = event {
                let original = held.split();
                self.event(&event, original, &mut out);
                if self.matcher.done() {
                    out.extend_from_slice(chunk);
                    return Ok(out.freeze());
                }
            }
        }
        // Nothing of an event is pending (only comments or complete field lines): send it
        // now, so keep-alives are not held back.
        if parser.buffered() == 0 {
            out.extend_from_slice(&held.split());
        }
        if held.len() > MAX_HELD {
            return Err(TooLarge);
        }
        self.mode = Mode::Sse(parser, held);
        Ok(out.freeze())
    }

    fn json_end(&mut self, body: BytesMut) -> Bytes {
        if let Ok(mut msg) = serde_json::from_slice::<Value>(&body)
            && self.filter.rewrite(&mut msg, &mut self.matcher)
        {
            return Bytes::from(msg.to_string());
        }
        body.freeze()
    }
}

impl<B> Body for ToolsListFilter<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let this = &mut *self;
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    return match std::mem::replace(&mut this.mode, Mode::Through) {
                        Mode::Json(body) if !body.is_empty() => {
                            Poll::Ready(Some(Ok(Frame::data(this.json_end(body)))))
                        }
                        // An event cut off by the end of the stream is no event: its bytes
                        // are sent as they were.
                        Mode::Sse(_, held) if !held.is_empty() => {
                            Poll::Ready(Some(Ok(Frame::data(held.freeze()))))
                        }
                        _ => Poll::Ready(None),
                    };
                }
            };
            let data = match frame.into_data() {
                Ok(d) => d,
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            match &mut this.mode {
                Mode::Through => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Mode::Json(body) => {
                    body.extend_from_slice(&data);
                    if body.len() > MAX_HELD {
                        return Poll::Ready(Some(Err(TooLarge.into())));
                    }
                }
                Mode::Sse(..) => match this.sse_chunk(&data) {
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    Ok(out) if out.is_empty() => {}
                    Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.mode, Mode::Through) && self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, StreamBody};
    use serde_json::json;

    fn only(names: &[&'static str], exposed: Option<&[&str]>) -> ToolFilter {
        let exposed: Option<Arc<[String]>> =
            exposed.map(|e| e.iter().map(|s| s.to_string()).collect());
        ToolFilter::new(Access::Only(names.to_vec()), exposed.as_ref(), Some("k1")).unwrap()
    }

    fn list(id: i64, names: &[&str]) -> Value {
        let tools: Vec<Value> = names.iter().map(|n| json!({"name": n})).collect();
        json!({"jsonrpc": "2.0", "id": id, "result": {"tools": tools}})
    }

    fn names(msg: &Value) -> Vec<String> {
        msg["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn run(filter: ToolFilter, matcher: Matcher, sse: bool, chunks: &[&str]) -> String {
        let frames = chunks
            .iter()
            .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(c.to_string()))))
            .collect::<Vec<_>>();
        let body = ToolsListFilter::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            Arc::new(filter),
            matcher,
            sse,
        );
        String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[test]
    fn no_filter_for_whole_access_without_expose_tools() {
        assert!(ToolFilter::new(Access::Whole, None, Some("k")).is_none());
        let exposed: Arc<[String]> = Arc::from(vec!["echo".to_owned()]);
        let f = ToolFilter::new(Access::Whole, Some(&exposed), None).unwrap();
        assert!(f.allows("echo") && !f.allows("sleep"));
        // Both apply: a grant cannot reach what the tool does not expose.
        let f = only(&["echo", "sleep"], Some(&["echo", "count"]));
        assert!(f.allows("echo") && !f.allows("sleep") && !f.allows("count"));
    }

    #[test]
    fn calls_of_other_tools_are_refused_and_lists_are_noted() {
        let f = only(&["echo"], None);
        let call = |name: &str| {
            json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                "params": {"name": name, "arguments": {"text": "secret"}}})
        };
        assert_eq!(
            f.inspect(Some(&call("echo"))),
            Verdict::Forward { list_ids: vec![] }
        );
        let Verdict::Refuse { answer, denied } = f.inspect(Some(&call("sleep"))) else {
            panic!("sleep was let through");
        };
        assert_eq!(denied, "sleep");
        assert_eq!(answer["id"], 3);
        assert_eq!(answer["error"]["code"], ACCESS_DENIED);
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("lacks access"),
            "{answer}"
        );
        let list = json!({"jsonrpc": "2.0", "id": "l", "method": "tools/list"});
        assert_eq!(
            f.inspect(Some(&list)),
            Verdict::Forward {
                list_ids: vec![json!("l")]
            }
        );
        // Not JSON: refused, not forwarded unread.
        assert!(matches!(f.inspect(None), Verdict::Refuse { .. }));
    }

    #[test]
    fn a_batch_with_a_refused_call_is_answered_whole() {
        let f = only(&["echo"], None);
        let batch = json!([
            {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "sleep"}},
        ]);
        let Verdict::Refuse { answer, .. } = f.inspect(Some(&batch)) else {
            panic!("batch forwarded");
        };
        let ids: Vec<&Value> = answer
            .as_array()
            .unwrap()
            .iter()
            .map(|a| &a["id"])
            .collect();
        assert_eq!(ids, [&json!(1), &json!(2)]);
    }

    #[tokio::test]
    async fn a_json_tools_list_is_filtered() {
        let body = list(1, &["echo", "sleep", "count"]).to_string();
        let out = run(
            only(&["echo"], None),
            Matcher::Ids(vec![json!(1)]),
            false,
            &[&body[..10], &body[10..]],
        )
        .await;
        assert_eq!(names(&serde_json::from_str(&out).unwrap()), ["echo"]);
        // Another id's response is left alone.
        let out = run(
            only(&["echo"], None),
            Matcher::Ids(vec![json!(9)]),
            false,
            &[&body],
        )
        .await;
        assert_eq!(out, body);
    }

    #[tokio::test]
    async fn only_the_tools_list_event_of_a_stream_is_rewritten() {
        let progress = "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\r\n\r\n";
        let listed = format!("id: 5\ndata: {}\n\n", list(4, &["echo", "sleep"]));
        let after = ": keep-alive\n\ndata: {\"jsonrpc\":\"2.0\",\"id\":4,\"result\":{\"tools\":[{\"name\":\"sleep\"}]}}\n\n";
        let input = format!("data: \nid: 0\nretry: 3000\n\n{progress}{listed}{after}");
        // Split everywhere a chunk boundary could fall.
        for at in [1, 20, 40, input.len() - 3] {
            let out = run(
                only(&["echo"], None),
                Matcher::Ids(vec![json!(4)]),
                true,
                &[&input[..at], &input[at..]],
            )
            .await;
            let events = sse::Parser::new().feed(out.as_bytes());
            assert_eq!(events.len(), 4, "{out}");
            assert_eq!(events[1].data, progress[6..progress.len() - 4]);
            let msg: Value = serde_json::from_str(&events[2].data).unwrap();
            assert_eq!(names(&msg), ["echo"], "{out}");
            assert_eq!(events[2].id, "5");
            // Once the response is rewritten, the rest passes byte for byte.
            assert!(out.ends_with(after), "{out}");
        }
    }

    #[tokio::test]
    async fn on_a_get_stream_every_tools_result_is_filtered() {
        let input = format!(
            "event: message\ndata: {}\n\nevent: message\ndata: {}\n\n",
            list(1, &["echo", "sleep"]),
            list(2, &["sleep", "echo"])
        );
        let out = run(
            only(&["echo"], None),
            Matcher::AnyToolsList,
            true,
            &[&input],
        )
        .await;
        let events = sse::Parser::new().feed(out.as_bytes());
        for e in &events {
            assert_eq!(e.event, "message");
            assert_eq!(names(&serde_json::from_str(&e.data).unwrap()), ["echo"]);
        }
        assert_eq!(events.len(), 2);
    }
}
