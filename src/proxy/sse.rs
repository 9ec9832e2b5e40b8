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

/// Longest first event we are willing to hold back looking for `event: endpoint`.
const MAX_FIRST_EVENT: usize = 16 * 1024;

/// Told the legacy session id found in the endpoint URL, to pin the session.
pub type OnSession = Box<dyn FnOnce(&str) + Send>;

/// Rewrites the endpoint URL (path and query of the server's URL) under `prefix`, calling
/// `on_session` with the `sessionId` query parameter when there is one.
pub struct EndpointRewrite<B> {
    inner: B,
    prefix: String,
    buf: Option<BytesMut>,
    on_session: Option<OnSession>,
}

impl<B> EndpointRewrite<B> {
    pub fn new(inner: B, prefix: String, on_session: OnSession) -> Self {
        EndpointRewrite {
            inner,
            prefix,
            buf: Some(BytesMut::new()),
            on_session: Some(on_session),
        }
    }

    /// Rewrites the first event if it is an endpoint event; returns the bytes to emit.
    fn finish_first(&mut self, buf: BytesMut) -> Bytes {
        let text = match std::str::from_utf8(&buf) {
            Ok(t) => t,
            Err(_) => return buf.freeze(),
        };
        let Some(end) = text.find("\n\n").or_else(|| text.find("\r\n\r\n")) else {
            return buf.freeze();
        };
        let (event, tail) = text.split_at(end);
        if !event
            .lines()
            .any(|l| matches!(l.trim_end(), "event: endpoint" | "event:endpoint"))
        {
            return buf.freeze();
        }
        let after = tail
            .strip_prefix("\n\n")
            .or_else(|| tail.strip_prefix("\r\n\r\n"))
            .unwrap_or(tail);
        let mut out = String::with_capacity(text.len() + self.prefix.len());
        for line in event.lines() {
            let line = line.trim_end_matches('\r');
            match line.strip_prefix("data:") {
                Some(data) => {
                    let url = data.trim();
                    // An absolute URL keeps only its path and query: the client resolves it
                    // against the proxy's own origin.
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
                    out.push_str("data: ");
                    out.push_str(&self.prefix);
                    out.push_str(path_and_query);
                }
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out.push('\n');
        out.push_str(after);
        Bytes::from(out)
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
            let Some(buf) = this.buf.as_mut() else {
                return Pin::new(&mut this.inner).poll_frame(cx);
            };
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        buf.extend_from_slice(&data);
                        let complete = buf.windows(2).any(|w| w == b"\n\n")
                            || buf.windows(4).any(|w| w == b"\r\n\r\n");
                        if complete || buf.len() >= MAX_FIRST_EVENT {
                            let buf = this.buf.take().unwrap_or_default();
                            let out = this.finish_first(buf);
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    let buf = this.buf.take().unwrap_or_default();
                    if buf.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(buf.freeze()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buf.as_ref().is_none_or(|b| b.is_empty()) && self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, Full};
    use std::sync::{Arc, Mutex};

    async fn run(input: &'static str) -> (String, Option<String>) {
        let seen = Arc::new(Mutex::new(None));
        let s2 = Arc::clone(&seen);
        let body = EndpointRewrite::new(
            Full::new(Bytes::from_static(input.as_bytes())),
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
}
