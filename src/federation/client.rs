//! Outbound HTTPS to peers: one reqwest client over rustls, a resolver that
//! honours `federation.resolve` and refuses private addresses at connect
//! time, and RFC 9421 signing of every S2S request (SPEC §4, §12).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::config::Config;
use crate::error::{Error, Result, WireError, WireErrorInner};
use crate::federation::httpsig::{self, RequestParts};
use crate::federation::keys::CurrentKey;
use crate::federation::wire::Descriptor;
use crate::ids::ServerName;
use crate::limits::{DESCRIPTOR_BYTES_MAX, DESCRIPTOR_FETCH_TIMEOUT_SECS};

/// Answers above this are cut off: no S2S answer we read is larger.
const REPLY_BYTES_MAX: usize = 16 * 1024 * 1024;

/// An answer from a peer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after_secs: Option<u64>,
    /// The peer's `Date` header, as Unix seconds (for clock-skew checks).
    pub date_secs: Option<i64>,
    pub body: Bytes,
}

impl Reply {
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

#[derive(Clone)]
pub struct Outbound {
    http: reqwest::Client,
    resolved: Arc<BTreeMap<ServerName, SocketAddr>>,
}

/// SPEC §12: addresses S2S never dials unless allowed.
pub fn is_private(ip: IpAddr) -> bool {
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

/// Resolves configured names to their configured address and everything
/// else through the system resolver, dropping refused addresses. Because
/// the connector dials exactly what this returns, there is no window for
/// DNS rebinding between the check and the connect.
struct PeerResolver {
    by_host: HashMap<String, SocketAddr>,
    allow_private: bool,
}

impl Resolve for PeerResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        if let Some(addr) = self.by_host.get(&host).copied() {
            return Box::pin(async move { Ok(Box::new(std::iter::once(addr)) as Addrs) });
        }
        let allow_private = self.allow_private;
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let usable: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow_private || !is_private(a.ip()))
                .collect();
            if usable.is_empty() {
                let msg = if found.is_empty() {
                    format!("{host} resolves to no address")
                } else {
                    format!("{host} resolves only to private addresses; add it to [federation.resolve] or set federation.allow_private_addresses = true")
                };
                return Err(msg.into());
            }
            Ok(Box::new(usable.into_iter()) as Addrs)
        })
    }
}

impl Outbound {
    pub fn new(config: &Config) -> Result<Outbound> {
        let tls = crate::tls::client_config(&config.tls.trust_roots)?;
        let by_host = config
            .federation
            .resolve
            .iter()
            .map(|(name, addr)| (name.host().to_string(), *addr))
            .collect();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .dns_resolver(Arc::new(PeerResolver {
                by_host,
                allow_private: config.federation.allow_private_addresses,
            }))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(DESCRIPTOR_FETCH_TIMEOUT_SECS))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("scaiwave/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::internal("http client", e))?;
        Ok(Outbound {
            http,
            resolved: Arc::new(config.federation.resolve.clone()),
        })
    }

    /// The URL to request and, for a resolved name with a port, the Host
    /// header to send: the URL then carries no port so the resolver's
    /// address (port included) is what gets dialled.
    fn target(&self, dest: &ServerName, path_and_query: &str) -> (String, Option<String>) {
        if self.resolved.contains_key(dest) {
            let host_header = dest.port().map(|_| dest.to_string());
            (
                format!("https://{}{}", dest.host(), path_and_query),
                host_header,
            )
        } else {
            (format!("https://{dest}{path_and_query}"), None)
        }
    }

    async fn read_capped(
        resp: reqwest::Response,
        cap: usize,
    ) -> std::result::Result<Reply, NetworkError> {
        let status = resp.status().as_u16();
        let retry_after_secs = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let date_secs = resp
            .headers()
            .get(http::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64);
        let mut resp = resp;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| NetworkError(describe(&e)))? {
            if body.len() + chunk.len() > cap {
                return Err(NetworkError(format!("answer larger than {cap} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status,
            retry_after_secs,
            date_secs,
            body: Bytes::from(body),
        })
    }

    /// A signed S2S request (SPEC §4).
    pub async fn signed(
        &self,
        signer: &Signer,
        method: http::Method,
        dest: &ServerName,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> std::result::Result<Reply, NetworkError> {
        let (url, host_header) = self.target(dest, path_and_query);
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
        let mut req = self
            .http
            .request(method, &url)
            .timeout(timeout)
            .header("ScaiWave-Origin", signer.origin.as_str())
            .header("Signature-Input", sig.signature_input)
            .header("Signature", sig.signature);
        if let Some(h) = host_header {
            req = req.header(http::header::HOST, h);
        }
        if let (Some(body), Some(digest)) = (body, digest) {
            req = req
                .header("Content-Digest", digest)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let resp = req.send().await.map_err(|e| NetworkError(describe(&e)))?;
        Self::read_capped(resp, REPLY_BYTES_MAX).await
    }

    /// Fetch a peer's descriptor (unsigned, ≤ 64 KiB, 10 s, no redirects).
    /// Returns it with its `max-age` in seconds.
    pub async fn descriptor(
        &self,
        dest: &ServerName,
        no_cache: bool,
    ) -> std::result::Result<(Descriptor, Option<u64>, Option<i64>), String> {
        let (url, host_header) = self.target(dest, "/.well-known/scaiwave/server");
        let mut req = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(DESCRIPTOR_FETCH_TIMEOUT_SECS));
        if let Some(h) = host_header {
            req = req.header(http::header::HOST, h);
        }
        if no_cache {
            req = req.header(http::header::CACHE_CONTROL, "no-cache");
        }
        let resp = req.send().await.map_err(|e| describe(&e))?;
        let max_age = resp
            .headers()
            .get(http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.split(',')
                    .filter_map(|d| d.trim().strip_prefix("max-age="))
                    .find_map(|n| n.parse().ok())
            });
        let reply = Self::read_capped(resp, DESCRIPTOR_BYTES_MAX)
            .await
            .map_err(|e| e.0)?;
        if !reply.ok() {
            return Err(format!("the descriptor answered HTTP {}", reply.status));
        }
        let d = reply.json::<Descriptor>()?;
        Ok((d, max_age, reply.date_secs))
    }
}

/// reqwest's errors hide the cause (e.g. the TLS failure) in `source()`.
fn describe(e: &reqwest::Error) -> String {
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
