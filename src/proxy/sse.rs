//! Legacy HTTP+SSE (2024-11-05) support: the server's first event on the GET stream is
//! `event: endpoint` with the URL to POST messages to. Behind the proxy that URL must point back
//! through `/mcp/{slug}/`, so the first event is rewritten; everything after it passes through
//! untouched, frame by frame.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};

use crate::mcp::sse;

/// Longest first event we are willing to hold back looking for `event: endpoint`.
const MAX_FIRST_EVENT: usize = 16 * 1024;

/// Told the legacy session id found in the endpoint URL, to pin the session.
pub type OnSession = Box<dyn FnOnce(&str) + Send>;

/// Rewrites the endpoint URL (path and query of the server's URL) under `prefix`, calling
/// `on_session` with the `sessionId` query parameter when there is one.
pub struct EndpointRewrite<B> {
    inner: B,
    prefix: String,
    /// Until the first event is complete: the parser and the bytes held back.
    first: Option<(sse::Parser, BytesMut)>,
    on_session: Option<OnSession>,
}

impl<B> EndpointRewrite<B> {
    pub fn new(inner: B, prefix: String, on_session: OnSession) -> Self {
        EndpointRewrite {
            inner,
            prefix,
            first: Some((sse::Parser::new(), BytesMut::new())),
            on_session: Some(on_session),
        }
    }

    /// Feeds a chunk while the first event is incomplete; returns the bytes to emit once it
    /// is (or once holding more would cost too much), `None` while still looking.
    fn look(&mut self, chunk: &[u8]) -> Option<Bytes> {
        let (parser, held) = self.first.as_mut()?;
        let (used, event) = parser.next_event(chunk);
        match event {
            Some(event) if event.event == "endpoint" => {
                let retry = parser.retry();
                self.first = None;
                let mut out = BytesMut::new();
                if let Some(r) = retry {
                    // The only field of the held blocks a client acts on; comments go.
                    out.extend_from_slice(format!("retry: {}\n", r.as_millis()).as_bytes());
                }
                out.extend_from_slice(self.rewrite(&event).as_bytes());
                out.extend_from_slice(&chunk[used..]);
                Some(out.freeze())
            }
            Some(_) => {
                let (_, mut held) = self.first.take()?;
                held.extend_from_slice(chunk);
                Some(held.freeze())
            }
            None => {
                held.extend_from_slice(chunk);
                if held.len() < MAX_FIRST_EVENT {
                    return None;
                }
                self.first.take().map(|(_, held)| held.freeze())
            }
        }
    }

    /// The endpoint event with its URL under the prefix.
    fn rewrite(&mut self, event: &sse::Event) -> String {
        let url = event.data.trim();
        // An absolute URL keeps only its path and query: the client resolves it against the
        // proxy's own origin.
        let path_and_query = match url.find("://") {
            Some(i) => url[i + 3..].find('/').map_or("/", |p| &url[i + 3 + p..]),
            None => url,
        };
        if let Some((_, q)) = path_and_query.split_once('?')
            && let Some(sid) = q.split('&').find_map(|kv| kv.strip_prefix("sessionId="))
            && let Some(f) = self.on_session.take()
        {
            f(sid);
        }
        let data = format!("{}{path_and_query}", self.prefix);
        sse::encode(&event.event, &event.id, &data)
    }
}

impl<B> Body for EndpointRewrite<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            let this = &mut *self;
            if this.first.is_none() {
                return Pin::new(&mut this.inner).poll_frame(cx);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(out) = this.look(&data) {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    let held = this.first.take().map(|(_, held)| held).unwrap_or_default();
                    if held.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(held.freeze()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.as_ref().is_none_or(|(_, held)| held.is_empty()) && self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, StreamBody};
    use std::sync::{Arc, Mutex};

    async fn run(input: &'static str) -> (String, Option<String>) {
        run_chunks(&[input]).await
    }

    /// Runs the rewrite over a body that arrives in these chunks.
    async fn run_chunks(chunks: &[&'static str]) -> (String, Option<String>) {
        let seen = Arc::new(Mutex::new(None));
        let s2 = Arc::clone(&seen);
        let frames = chunks
            .iter()
            .map(|c| {
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(c.as_bytes())))
            })
            .collect::<Vec<_>>();
        let body = EndpointRewrite::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            "/mcp/demo".into(),
            Box::new(move |sid| *s2.lock().unwrap() = Some(sid.to_owned())),
        );
        let out = body.collect().await.unwrap().to_bytes();
        let sid = seen.lock().unwrap().clone();
        (String::from_utf8(out.to_vec()).unwrap(), sid)
    }

    #[tokio::test]
    async fn rewrites_a_relative_endpoint() {
        let (out, sid) =
            run("event: endpoint\ndata: /message?sessionId=abc\n\nevent: message\ndata: {}\n\n")
                .await;
        assert_eq!(
            out,
            "event: endpoint\ndata: /mcp/demo/message?sessionId=abc\n\nevent: message\ndata: {}\n\n"
        );
        assert_eq!(sid.as_deref(), Some("abc"));
    }

    #[tokio::test]
    async fn rewrites_an_absolute_endpoint() {
        let (out, _) =
            run("event: endpoint\ndata: http://127.0.0.1:9/messages/?session_id=x\n\n").await;
        assert_eq!(
            out,
            "event: endpoint\ndata: /mcp/demo/messages/?session_id=x\n\n"
        );
    }

    #[tokio::test]
    async fn other_streams_pass_untouched() {
        let input = "id: 1\ndata: {\"jsonrpc\":\"2.0\"}\n\n";
        let (out, sid) = run(input).await;
        assert_eq!(out, input);
        assert!(sid.is_none());
    }

    #[tokio::test]
    async fn an_endpoint_split_across_chunks_after_a_comment_is_rewritten() {
        // A keep-alive comment first, CRLF line ends, and the event cut mid-line.
        let (out, sid) = run_chunks(&[
            ": ping\r\n\r\nretry: 500\r\nevent: endp",
            "oint\r\ndata: /message?sessionId=q\r",
            "\n\r\nevent: message\r\ndata: {}\r\n\r\n",
        ])
        .await;
        assert_eq!(
            out,
            "retry: 500\nevent: endpoint\ndata: /mcp/demo/message?sessionId=q\n\nevent: message\r\ndata: {}\r\n\r\n"
        );
        assert_eq!(sid.as_deref(), Some("q"));
    }

    #[tokio::test]
    async fn an_event_name_without_data_does_not_make_the_next_event_an_endpoint() {
        // The spec resets the event type when an event is dispatched or dropped.
        let input = "event: endpoint\n\ndata: /message?sessionId=abc\n\n";
        let (out, sid) = run(input).await;
        assert_eq!(out, input);
        assert!(sid.is_none());
    }
}
