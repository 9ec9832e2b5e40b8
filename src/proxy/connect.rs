//! How the proxy reaches an upstream: TCP for HTTP servers, a Unix socket for stdio
//! deployments (their bridge listens on `<socket dir>/<deployment>.sock`, and the backend's
//! authority is that file name). One client and one connection pool serve both; the pool keys
//! connections by authority, so each bridge gets its own kept-alive connections.

use std::{
    future::Future,
    io,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use tokio::net::{TcpStream, UnixStream};

/// The suffix that marks an authority as a socket file in the socket directory.
pub const SOCKET_SUFFIX: &str = ".sock";

#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    socket_dir: Arc<PathBuf>,
}

impl Connector {
    pub fn new(http: HttpConnector, socket_dir: PathBuf) -> Connector {
        Connector {
            http,
            socket_dir: Arc::new(socket_dir),
        }
    }
}

/// A connection to either kind of upstream.
pub enum Conn {
    Tcp(TokioIo<TcpStream>),
    Unix(TokioIo<UnixStream>),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<Uri>::poll_ready(&mut self.http, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // Authorities come from the route table (never from a client), so a `.sock` host is
        // always a file name the manager made.
        if let Some(host) = uri.host().filter(|h| h.ends_with(SOCKET_SUFFIX))
            && uri.port().is_none()
            && !host.contains('/')
        {
            let path = self.socket_dir.join(host);
            return Box::pin(async move {
                let stream = UnixStream::connect(&path)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                Ok(Conn::Unix(TokioIo::new(stream)))
            });
        }
        let connecting = self.http.call(uri);
        Box::pin(async move { Ok(Conn::Tcp(connecting.await?)) })
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Conn::Tcp(s) => s.connected(),
            Conn::Unix(_) => Connected::new(),
        }
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
}
