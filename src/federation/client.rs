//! Outbound HTTPS to peers (SPEC §4, §12): one hyper client over rustls
//! with a connector of our own, and RFC 9421 signing of every S2S request.
//!
//! The connector is why this is not reqwest: a `federation.resolve` entry
//! maps an exact server_name, port included, to the address to dial, while
//! the request keeps `https://{server_name}` as its URL, so HTTP/1.1 `Host`,
//! HTTP/2 `:authority` and the signed `@authority` all carry the
//! server_name. reqwest's resolvers see only the host and dial the URL's
//! port. The connector also checks every address it dials, IP literals
//! included, against the private ranges at connect time, so there is no
//! window for DNS rebinding between the check and the connect.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::config::Config;
use crate::error::{Result, WireError, WireErrorInner};
use crate::federation::keys::CurrentKey;
use crate::ids::ServerName;
use crate::limits::{
    DESCRIPTOR_BYTES_MAX, DESCRIPTOR_FETCH_TIMEOUT_SECS, OUTBOUND_CONNECT_TIMEOUT_SECS,
    OUTBOUND_POOL_IDLE_SECS,
};
use crate::protocol::httpsig::{self, RequestParts};
use crate::protocol::wire::Descriptor;

/// An answer from a peer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after_secs: Option<u64>,
    /// The peer's `Date` header, as Unix seconds (for clock-skew checks).
    pub date_secs: Option<i64>,
    /// `Cache-Control: max-age` (descriptors).
    pub max_age_secs: Option<u64>,
    pub body: Bytes,
}

impl Reply {
    fn from_parts(head: &http::response::Parts, body: Bytes) -> Reply {
        let header = |name| head.headers.get(name).and_then(|v| v.to_str().ok());
        Reply {
            status: head.status.as_u16(),
            // Only the delay-seconds form; an HTTP-date is ignored (the
            // sender's own backoff applies). Delivery clamps the value.
            retry_after_secs: header(http::header::RETRY_AFTER).and_then(|v| v.trim().parse().ok()),
            date_secs: header(http::header::DATE)
                .and_then(|v| httpdate::parse_http_date(v).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs() as i64),
            max_age_secs: header(http::header::CACHE_CONTROL).and_then(|v| {
                v.split(',')
                    .filter_map(|d| d.trim().strip_prefix("max-age="))
                    .find_map(|n| n.parse().ok())
            }),
            body,
        }
    }

    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The §10 error object, if the body is one.
    pub fn error(&self) -> Option<WireErrorInner> {
        serde_json::from_slice::<WireError>(&self.body)
            .ok()
            .map(|w| w.error)
    }

    pub fn json<T: serde::de::DeserializeOwned>(&self) -> std::result::Result<T, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("unreadable answer: {e}"))
    }
}

/// The request never got an HTTP answer (DNS, connect, TLS, timeout...).
#[derive(Debug, Clone)]
pub struct NetworkError(pub String);

impl std::fmt::Display for NetworkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who signs: our name and current key, and the time to put in `created`.
pub struct Signer {
    pub origin: ServerName,
    pub key: CurrentKey,
    pub now_secs: i64,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Outbound S2S: cheap to clone, one connection pool per destination
/// (scheme and authority, so `b.test:8448` and `b.test:9449` never share).
#[derive(Clone)]
pub struct Outbound {
    http: hyper_util::client::legacy::Client<PeerConnector, Full<Bytes>>,
}

/// SPEC §12: addresses S2S never dials unless allowed.
pub(crate) fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 0
                || o[0] == 10
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || o[0] == 127
                || (o[0] == 169 && o[1] == 254)
                || (o[0] == 172 && (16..32).contains(&o[1]))
                || (o[0] == 192 && o[1] == 168)
                || o[0] >= 224
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            if s[0] == 0x2002 {
                let v4 = std::net::Ipv4Addr::new(
                    (s[1] >> 8) as u8,
                    s[1] as u8,
                    (s[2] >> 8) as u8,
                    s[2] as u8,
                );
                return is_private(IpAddr::V4(v4));
            }
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let v4 = std::net::Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                );
                return is_private(IpAddr::V4(v4));
            }
            v6.is_unspecified()
                || v6.is_loopback()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xff00) == 0xff00
        }
    }
}

/// Dials peers: a `federation.resolve` entry for the exact name (port
/// included) gives the address, anything else goes through the system
/// resolver with refused addresses dropped; then TLS with SNI = the host.
#[derive(Clone)]
struct PeerConnector {
    tls: tokio_rustls::TlsConnector,
    resolved: Arc<BTreeMap<ServerName, SocketAddr>>,
    allow_private: bool,
}

/// A TLS connection to a peer, telling the pool whether ALPN chose HTTP/2.
pub struct PeerStream(TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>);

impl Connection for PeerStream {
    fn connected(&self) -> Connected {
        let (_, tls) = self.0.inner().get_ref();
        if tls.alpn_protocol() == Some(b"h2") {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

impl hyper::rt::Read for PeerStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PeerStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl PeerConnector {
    /// Where `name` (host and port as in the URL) may be dialled.
    async fn addresses(
        &self,
        host: &str,
        port: u16,
    ) -> std::result::Result<Vec<SocketAddr>, String> {
        let name = if port == 443 {
            host.to_string()
        } else {
            format!("{host}:{port}")
        };
        if let Some(addr) = ServerName::parse(&name)
            .ok()
            .and_then(|n| self.resolved.get(&n).copied())
        {
            return Ok(vec![addr]);
        }
        // The system resolver also reads IP literals (and the numeric forms
        // inet_aton accepts), so what it returns is exactly what would be
        // dialled, and all of it is checked.
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {name}: {e}"))?
            .collect();
        let usable: Vec<SocketAddr> = found
            .iter()
            .copied()
            .filter(|a| self.allow_private || !is_private(a.ip()))
            .collect();
        if usable.is_empty() {
            return Err(if found.is_empty() {
                format!("{name} resolves to no address")
            } else {
                format!("{name} resolves only to private addresses, which federation never dials; add it to [federation.resolve] or set federation.allow_private_addresses = true")
            });
        }
        Ok(usable)
    }

    async fn connect(self, uri: http::Uri) -> std::result::Result<PeerStream, BoxError> {
        let host = uri.host().ok_or("the URL has no host")?.to_string();
        let port = uri.port_u16().unwrap_or(443);
        let addrs = self.addresses(&host, port).await?;
        let timeout = Duration::from_secs(OUTBOUND_CONNECT_TIMEOUT_SECS);
        let mut last = String::from("no address to try");
        for addr in addrs {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    let sni = rustls::pki_types::ServerName::try_from(host.clone())
                        .map_err(|e| format!("{host} is not a TLS server name: {e}"))?;
                    let tls = tokio::time::timeout(timeout, self.tls.connect(sni, tcp))
                        .await
                        .map_err(|_| format!("TLS handshake with {addr} timed out"))?
                        .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
                    return Ok(PeerStream(TokioIo::new(tls)));
                }
                Ok(Err(e)) => last = format!("cannot connect to {addr}: {e}"),
                Err(_) => last = format!("connecting to {addr} timed out"),
            }
        }
        Err(last.into())
    }
}

impl tower_service::Service<http::Uri> for PeerConnector {
    type Response = PeerStream;
    type Error = BoxError;
    type Future = BoxFuture<'static, std::result::Result<PeerStream, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

impl Outbound {
    pub fn new(config: &Config) -> Result<Outbound> {
        let tls = crate::tls::client_config(&config.tls.trust_roots)?;
        let connector = PeerConnector {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            resolved: Arc::new(config.federation.resolve.clone()),
            allow_private: config.federation.allow_private_addresses,
        };
        // Idle pooled connections are let go before a peer's own idle
        // timeout (ours is 60 s by default) would close them under a request.
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(OUTBOUND_POOL_IDLE_SECS))
            .build(connector);
        Ok(Outbound { http })
    }

    /// One request to `dest` and its answer, read up to `reply_bytes_max`,
    /// all within `timeout`. The URL is `https://{dest}{path_and_query}`,
    /// so the authority sent is the server_name, port included.
    async fn exchange(
        &self,
        request: http::request::Builder,
        dest: &ServerName,
        path_and_query: &str,
        body: Bytes,
        timeout: Duration,
        reply_bytes_max: usize,
    ) -> std::result::Result<Reply, NetworkError> {
        let request = request
            .uri(format!("https://{dest}{path_and_query}"))
            .header(
                http::header::USER_AGENT,
                concat!("scaiwave/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(body))
            .map_err(|e| NetworkError(format!("cannot build the request: {e}")))?;
        let exchange = async {
            let resp = self
                .http
                .request(request)
                .await
                .map_err(|e| NetworkError(describe(&e)))?;
            let (head, incoming) = resp.into_parts();
            let body = Limited::new(incoming, reply_bytes_max)
                .collect()
                .await
                .map_err(|e| {
                    NetworkError(if e.is::<http_body_util::LengthLimitError>() {
                        format!("answer larger than {reply_bytes_max} bytes")
                    } else {
                        format!("reading the answer failed: {}", describe(e.as_ref()))
                    })
                })?
                .to_bytes();
            Ok(Reply::from_parts(&head, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| NetworkError(format!("no answer from {dest} within {timeout:?}")))?
    }

    /// A signed S2S request (SPEC §4).
    #[allow(clippy::too_many_arguments)]
    pub async fn signed(
        &self,
        signer: &Signer,
        method: http::Method,
        dest: &ServerName,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
        reply_bytes_max: usize,
    ) -> std::result::Result<Reply, NetworkError> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let digest = body.as_deref().map(httpsig::content_digest);
        let parts = RequestParts {
            method: method.as_str(),
            authority: dest.as_str(),
            path,
            query,
            origin: signer.origin.as_str(),
            content_digest: digest.as_deref(),
        };
        let sig = httpsig::sign(
            &parts,
            &signer.key.key_id,
            &signer.key.signing,
            signer.now_secs,
        );
        let mut req = http::Request::builder()
            .method(method)
            .header("ScaiWave-Origin", signer.origin.as_str())
            .header("Signature-Input", sig.signature_input)
            .header("Signature", sig.signature);
        if let Some(digest) = digest {
            req = req
                .header("Content-Digest", digest)
                .header(http::header::CONTENT_TYPE, "application/json");
        }
        let body = body.map(Bytes::from).unwrap_or_default();
        self.exchange(req, dest, path_and_query, body, timeout, reply_bytes_max)
            .await
    }

    /// Fetch a peer's descriptor (unsigned, ≤ 64 KiB, 10 s, no redirects).
    /// Returns it with its `max-age` in seconds and the peer's `Date`.
    pub async fn descriptor(
        &self,
        dest: &ServerName,
        no_cache: bool,
    ) -> std::result::Result<(Descriptor, Option<u64>, Option<i64>), String> {
        let mut req = http::Request::builder().method(http::Method::GET);
        if no_cache {
            req = req.header(http::header::CACHE_CONTROL, "no-cache");
        }
        let reply = self
            .exchange(
                req,
                dest,
                "/.well-known/scaiwave/server",
                Bytes::new(),
                Duration::from_secs(DESCRIPTOR_FETCH_TIMEOUT_SECS),
                DESCRIPTOR_BYTES_MAX,
            )
            .await
            .map_err(|e| e.0)?;
        if !reply.ok() {
            return Err(format!("the descriptor answered HTTP {}", reply.status));
        }
        let d = reply.json::<Descriptor>()?;
        Ok((d, reply.max_age_secs, reply.date_secs))
    }
}

/// hyper's errors hide the cause (e.g. the TLS failure) in `source()`.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "100.64.0.1",
            "169.254.1.1",
            "172.16.0.1",
            "192.168.1.1",
            "224.0.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "2002:0a00:0001::",
            "64:ff9b::7f00:1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2001:4860::8888",
            "2002:0808:0808::",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }
}
