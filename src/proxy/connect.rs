//! How the proxy reaches an upstream [`Endpoint`]: TCP for HTTP servers, a Unix socket for
//! stdio deployments' bridges. One hyper client and one connection pool serve both. hyper
//! hands a connector nothing but the request URI, so a socket endpoint travels in the URI's
//! authority: its path hex-encoded under the reserved `.invalid` domain (RFC 2606), which no
//! real host can have, which keeps each socket's pooled connections apart (the pool keys by
//! authority), and which [`Connector`] decodes back into the path. The encoding lives here
//! alone; everything else handles [`Endpoint`]s.

use std::{
    future::Future,
    io,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Uri, uri::Authority};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use tokio::net::{TcpStream, UnixStream};

use super::routes::RouteTable;
use crate::runtime::Endpoint;

/// The domain under which a socket path is carried (see the module doc).
const SOCKET_DOMAIN: &str = ".sock.invalid";

/// The authority of requests to `endpoint`.
pub fn authority(endpoint: &Endpoint) -> Result<Authority, http::uri::InvalidUri> {
    match endpoint {
        Endpoint::Tcp { host, port } => Authority::try_from(format!("{host}:{port}")),
        Endpoint::Unix(path) => {
            use std::{fmt::Write as _, os::unix::ffi::OsStrExt as _};
            let bytes = path.as_os_str().as_bytes();
            let mut host = String::with_capacity(bytes.len() * 2 + SOCKET_DOMAIN.len());
            for b in bytes {
                let _ = write!(host, "{b:02x}");
            }
            host.push_str(SOCKET_DOMAIN);
            Authority::try_from(host)
        }
    }
}

/// The socket path an authority made by [`authority`] carries.
fn socket_path(uri: &Uri) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt as _;
    let hex = uri.host()?.strip_suffix(SOCKET_DOMAIN)?;
    if uri.port().is_some() || hex.len() % 2 != 0 {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}

#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    /// Where a backend's authority is dialled instead of itself ([`RouteTable::dial`]).
    routes: Arc<RouteTable>,
}

impl Connector {
    pub fn new(http: HttpConnector, routes: Arc<RouteTable>) -> Connector {
        Connector { http, routes }
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
        // Authorities come from the route table (never from a client).
        if let Some(path) = socket_path(&uri) {
            return Box::pin(async move {
                let stream = UnixStream::connect(&path)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                Ok(Conn::Unix(TokioIo::new(stream)))
            });
        }
        // The request keeps its authority (its Host, the pool's key); only the connection
        // goes to the dial address.
        let dial = uri.authority().and_then(|a| self.routes.dial(a));
        let uri = match dial {
            Some(addr) => match Uri::builder()
                .scheme("http")
                .authority(addr.to_string())
                .path_and_query("/")
                .build()
            {
                Ok(u) => u,
                Err(e) => return Box::pin(async move { Err(e.into()) }),
            },
            None => uri,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_endpoint_round_trips_through_its_authority() {
        let path = PathBuf::from("/srv/switchboard data/run/0123456789abcdef.sock");
        let a = authority(&Endpoint::Unix(path.clone())).unwrap();
        let uri = Uri::builder()
            .scheme("http")
            .authority(a)
            .path_and_query("/mcp")
            .build()
            .unwrap();
        assert_eq!(socket_path(&uri), Some(path));
    }

    #[test]
    fn tcp_hosts_are_never_taken_for_sockets() {
        let a = authority(&Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: 8080,
        })
        .unwrap();
        assert_eq!(a.as_str(), "127.0.0.1:8080");
        for uri in [
            "http://127.0.0.1:8080/mcp",
            "http://abcd.sock.invalid:80/mcp",
            "http://abc.sock.invalid/mcp",
            "http://zz.sock.invalid/mcp",
        ] {
            assert_eq!(socket_path(&uri.parse().unwrap()), None, "{uri}");
        }
    }
}
