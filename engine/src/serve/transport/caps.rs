//! A cap on open connections: each accepted connection holds a semaphore permit for as long as
//! it is open; one accepted while none is left is closed at once (so a flood of idle sockets
//! costs at most the cap in file descriptors and memory, and the other server, with a cap of its
//! own, keeps answering).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many connections may be open at once on one server.
#[derive(Clone, Debug)]
pub struct ConnectionCap {
    permits: Arc<Semaphore>,
    max: usize,
    server: &'static str,
    /// Set while connections are being refused, so a flood logs once, not once per socket.
    refusing: Arc<AtomicBool>,
    /// A connection must send this many bytes within this time, or it is closed.
    greeting: Option<(usize, Duration)>,
}

impl ConnectionCap {
    /// A cap of `max` connections for `server` (named in the log line when a connection is
    /// refused).
    pub fn new(server: &'static str, max: usize) -> Self {
        ConnectionCap {
            permits: Arc::new(Semaphore::new(max)),
            max,
            server,
            refusing: Arc::default(),
            greeting: None,
        }
    }

    /// Closes an admitted connection that has not sent `bytes` within `within` (e.g. HTTP/2's
    /// 24-byte client preface), so connections that never speak do not keep a place. Needs a
    /// tokio runtime when connections are admitted.
    pub fn with_greeting_timeout(mut self, bytes: usize, within: Duration) -> Self {
        self.greeting = Some((bytes, within));
        self
    }

    /// `stream` with a permit, or `None` (and `stream` dropped: closed) when the cap is reached.
    pub fn admit<S>(&self, stream: S) -> Option<Capped<S>> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                self.refusing.store(false, Ordering::Relaxed);
                Some(Capped {
                    inner: stream,
                    _permit: permit,
                    greeting: self.greeting.map(|(needed, within)| Greeting {
                        needed,
                        deadline: Box::pin(tokio::time::sleep(within)),
                    }),
                })
            }
            Err(_) => {
                if self.refusing.swap(true, Ordering::Relaxed) {
                    return None;
                }
                tracing::warn!(
                    server = self.server,
                    max_connections = self.max,
                    "Connection cap reached; closing new connections until one ends (raise --max-connections?)."
                );
                None
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// A connection holding its place under a [`ConnectionCap`] until it is dropped.
#[derive(Debug)]
pub struct Capped<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
    /// Until the client has sent its first bytes: how many more, and by when.
    greeting: Option<Greeting>,
}

#[derive(Debug)]
struct Greeting {
    needed: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Capped<S> {
    /// The connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(greeting) = &mut this.greeting
            && greeting.deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client sent no request in time",
            )));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(greeting)) = (&read, &mut this.greeting) {
            let got = buf.filled().len() - before;
            if got >= greeting.needed {
                this.greeting = None;
            } else {
                greeting.needed -= got;
            }
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Capped<TcpStream> {
    type ConnectInfo = <TcpStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The connections `listener` accepts, with `TCP_NODELAY` (small answers must not wait for
/// Nagle's algorithm), each holding a place under `cap`; those past the cap are closed at once.
/// Accept errors (out of file descriptors, a connection reset before it was accepted) are
/// logged and retried after a short pause instead of ending the server.
pub fn capped_incoming(
    listener: TcpListener,
    cap: ConnectionCap,
) -> impl Stream<Item = io::Result<Capped<TcpStream>>> + Send + 'static {
    futures::stream::unfold((listener, cap), |(listener, cap)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    if let Some(capped) = cap.admit(stream) {
                        return Some((Ok(capped), (listener, cap)));
                    }
                }
                Err(e) => {
                    tracing::warn!(server = cap.server, error = %e, "Accepting a connection failed; retrying.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// An axum-server acceptor that admits a connection under a [`ConnectionCap`] (and sets
/// `TCP_NODELAY`); past the cap the connection is closed before anything is read from it.
#[cfg(feature = "web")]
#[derive(Clone, Debug)]
pub struct CapAcceptor {
    cap: ConnectionCap,
}

#[cfg(feature = "web")]
impl CapAcceptor {
    /// Admits connections under `cap`.
    pub fn new(cap: ConnectionCap) -> Self {
        CapAcceptor { cap }
    }
}

#[cfg(feature = "web")]
impl<S> axum_server::accept::Accept<TcpStream, S> for CapAcceptor {
    type Stream = Capped<TcpStream>;
    type Service = S;
    type Future = std::future::Ready<io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let _ = stream.set_nodelay(true);
        std::future::ready(match self.cap.admit(stream) {
            Some(capped) => Ok((capped, service)),
            None => Err(io::Error::other("connection cap reached")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_past_the_cap_are_refused_and_places_come_back() {
        let cap = ConnectionCap::new("test", 2);
        let a = cap.admit(()).expect("first");
        let _b = cap.admit(()).expect("second");
        assert!(cap.admit(()).is_none(), "the third is over the cap");
        assert_eq!(cap.open(), 2);
        drop(a);
        assert!(
            cap.admit(()).is_some(),
            "a closed connection frees its place"
        );
    }
}
