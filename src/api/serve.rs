//! The HTTPS listener: rustls handshakes (recording the SNI and ALPN),
//! hyper-util's HTTP/1.1 + HTTP/2 server around [`Front::handle`], the
//! connection limits and timeouts of SPEC §12 `[limits]`, and graceful
//! shutdown (stop accepting, let in-flight requests finish within a
//! deadline).
//!
//! Timeouts are kept per connection by a watchdog over the connection's
//! reads and its requests in flight (hyper's own HTTP/1.1 header timeout
//! also runs between keep-alive requests, which would make every idle
//! connection last only `request_head_timeout`):
//! - HTTP/1.1: from the first byte of a request head (for a new connection:
//!   from the handshake), the whole head must arrive within
//!   `request_head_timeout`; between requests, with no byte read, the
//!   connection lives `idle_timeout`.
//! - HTTP/2: the first request must come within `request_head_timeout`
//!   of the handshake; after that, `idle_timeout` with no stream open
//!   (HTTP/2 exchanges control frames while idle, so bytes say nothing).
//! - A body must arrive within `request_body_timeout` (in `Front`).
//!   A connection past a timeout is closed without an answer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::api::{ConnInfo, Directory, Front};
use crate::config::LimitsConfig;
use crate::limits::RATE_STATE_SWEEP_SECS;
use crate::limits::{
    HTTP1_BUFFER_BYTES_MAX, HTTP2_HEADER_LIST_BYTES_MAX, HTTP2_STREAMS_PER_CONNECTION_MAX,
    SHUTDOWN_GRACE_SECS, TLS_HANDSHAKE_TIMEOUT_SECS,
};

/// Connections accepted so far, by the protocol ALPN chose (HTTP/1.1 when
/// the client named none).
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    pub http1: std::sync::atomic::AtomicU64,
    pub http2: std::sync::atomic::AtomicU64,
}

/// Connections counted in all and per address. A std mutex: held only for
/// a counter update, never across `.await`.
struct Slots {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One accepted connection's place in [`Slots`], given back on drop.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().expect("slots lock");
        s.total -= 1;
        if let Some(n) = s.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                s.per_ip.remove(&self.ip);
            }
        }
    }
}

fn take_slot(slots: &Arc<Mutex<Slots>>, ip: IpAddr, limits: &LimitsConfig) -> Option<Slot> {
    let mut s = slots.lock().expect("slots lock");
    let here = s.per_ip.get(&ip).copied().unwrap_or(0);
    if s.total >= limits.connections_max || here >= limits.connections_per_ip_max {
        return None;
    }
    s.total += 1;
    *s.per_ip.entry(ip).or_default() += 1;
    Some(Slot {
        slots: slots.clone(),
        ip,
    })
}

pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    tenants: Arc<Directory>,
    counts: Arc<ConnectionCounts>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let svc = tenants.first.clone();
    let front = Arc::new(Front::new(tenants));
    let limits = svc.limits.clone();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(HTTP1_BUFFER_BYTES_MAX);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(HTTP2_STREAMS_PER_CONNECTION_MAX)
        .max_header_list_size(HTTP2_HEADER_LIST_BYTES_MAX);
    let slots = Arc::new(Mutex::new(Slots {
        total: 0,
        per_ip: HashMap::new(),
    }));
    let mut sweep = tokio::time::interval(Duration::from_secs(RATE_STATE_SWEEP_SECS));
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = sweep.tick() => {
                front.forget_idle_rates();
                continue;
            }
            _ = svc.shutdown.cancelled() => break,
        };
        // Over a cap: closed at accept, before any TLS work (SPEC §12).
        let Some(slot) = take_slot(&slots, peer.ip(), &limits) else {
            tracing::debug!(%peer, "connection refused: limits.connections_max or connections_per_ip_max reached");
            drop(tcp);
            continue;
        };
        // An answer is a few small writes after reading a request (TLS
        // records of HTTP/2 frames): with Nagle's algorithm each may wait
        // for the peer's delayed ACK of the one before.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let front = front.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let limits = limits.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(
                Duration::from_secs(TLS_HANDSHAKE_TIMEOUT_SECS).min(limits.request_head_timeout),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let session = tls.get_ref().1;
            let info = ConnInfo {
                sni: session.server_name().map(str::to_string),
                alpn_h2: session.alpn_protocol() == Some(b"h2"),
                peer,
            };
            let counter = if info.alpn_h2 {
                &counts.http2
            } else {
                &counts.http1
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let activity = Arc::new(Activity::new(info.alpn_h2));
            let io = Watched {
                inner: tls,
                activity: activity.clone(),
            };
            let in_service = activity.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let front = front.clone();
                    let info = info.clone();
                    let busy = Busy::start(in_service.clone());
                    async move {
                        let resp = front.handle(info, req).await?;
                        // The request counts as in flight until its answer is
                        // sent, so a long answer (an event stream) is not idle.
                        Ok::<_, crate::api::CloseConnection>(
                            resp.map(|body| Tracked { body, _busy: busy }),
                        )
                    }
                });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
            let conn = watcher.watch(conn.into_owned());
            tokio::select! {
                _ = conn => {}
                why = activity.watchdog(&limits) => {
                    tracing::debug!(%peer, why, "connection closed");
                }
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(SHUTDOWN_GRACE_SECS)) => {
            tracing::warn!("shutdown deadline reached with requests still in flight");
        }
    }
}

/// What the watchdog of one connection knows. A std mutex: held for a
/// field update on each read and request, never across `.await`.
struct Activity {
    h2: bool,
    state: Mutex<ActivityState>,
    changed: tokio::sync::Notify,
}

struct ActivityState {
    in_flight: usize,
    /// When the connection last had no request in flight (or began).
    quiet_since: Instant,
    /// HTTP/1.1: the first byte read since it was quiet, if any.
    head_started: Option<Instant>,
    requests: u64,
}

impl Activity {
    fn new(h2: bool) -> Activity {
        Activity {
            h2,
            state: Mutex::new(ActivityState {
                in_flight: 0,
                quiet_since: Instant::now(),
                head_started: None,
                requests: 0,
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn read_some(&self) {
        let mut s = self.state.lock().expect("activity lock");
        if s.in_flight == 0 && s.head_started.is_none() {
            s.head_started = Some(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    /// When the connection must be closed if nothing changes, and why.
    fn deadline(&self, limits: &LimitsConfig) -> Option<(Instant, &'static str)> {
        let s = self.state.lock().expect("activity lock");
        if s.in_flight > 0 {
            return None;
        }
        if self.h2 {
            return Some(if s.requests == 0 {
                (
                    s.quiet_since + limits.request_head_timeout,
                    "no request within request_head_timeout",
                )
            } else {
                (s.quiet_since + limits.idle_timeout, "idle for idle_timeout")
            });
        }
        Some(match s.head_started {
            Some(t) => (
                t + limits.request_head_timeout,
                "request head not complete within request_head_timeout",
            ),
            // A new connection owes its first request head from the start.
            None if s.requests == 0 => (
                s.quiet_since + limits.request_head_timeout,
                "no request within request_head_timeout",
            ),
            None => (s.quiet_since + limits.idle_timeout, "idle for idle_timeout"),
        })
    }

    /// Resolves when a limit is passed; the caller then drops the connection.
    async fn watchdog(&self, limits: &LimitsConfig) -> &'static str {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.deadline(limits) {
                Some((at, why)) if at <= Instant::now() => return why,
                Some((at, _)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// A request in flight on a connection, from its head until its answer is
/// sent (or dropped).
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Busy {
        {
            let mut s = activity.state.lock().expect("activity lock");
            s.in_flight += 1;
            s.requests += 1;
            s.head_started = None;
        }
        activity.changed.notify_one();
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        {
            let mut s = self.0.state.lock().expect("activity lock");
            s.in_flight -= 1;
            if s.in_flight == 0 {
                s.quiet_since = Instant::now();
            }
        }
        self.0.changed.notify_one();
    }
}

/// An answer body that keeps its request [`Busy`] until it is done.
struct Tracked<B> {
    body: B,
    _busy: Busy,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The TLS stream, telling [`Activity`] when bytes arrive.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let out = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_some();
        }
        out
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
