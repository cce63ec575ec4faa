//! HTTP: the only module that knows warp, serves requests or chooses a
//! status (layer 6; it takes [`Services`], never `App`). [`Front::handle`] takes
//! a request's head, routes and authenticates it, applies the rate limits,
//! and only then reads the body (bounded in size, time and, across all
//! requests, memory) into a [`Request`] for the S2S, admin or client
//! handlers. Every answer (errors included) is built here.
//!
//! - [`serve`]: the HTTPS listener (rustls + hyper-util), connection
//!   limits and timeouts, graceful shutdown.
//! - [`s2s`]: `/.well-known/scaiwave/server` and `/_scaiwave/federation/v1/*`.
//! - [`admin`]: `/v1/admin/*`; [`client`]: the rest of `/v1/*`.
//! - [`console`]: the admin console's static files at `/admin/` (SPEC §17).

pub mod admin;
pub mod client;
pub mod console;
pub mod metrics;
pub mod s2s;
pub mod serve;

use std::num::NonZeroU32;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use percent_encoding::percent_decode_str;
use serde::Serialize;
use serde_json::Value;

use crate::config::{LimitsConfig, Rate};
use crate::error::{Code, Error, Result};
use crate::ids::ServerName;
use crate::limits::{BODY_BUFFER_BYTES_MAX, BODY_BYTES_MAX, LOCAL_BODY_BYTES_MAX};
use crate::rooms::Rooms;
use crate::storage::{Participant, PowerLevel};

/// Facts about the TLS connection, put into request extensions by [`serve`].
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub sni: Option<String>,
    /// Whether ALPN chose HTTP/2.
    pub alpn_h2: bool,
    pub peer: std::net::SocketAddr,
}

/// A request as the handlers see it: raw path (signatures cover it as
/// sent), raw query, headers, the buffered body and the connection facts.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub authority: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub conn: Option<ConnInfo>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every value of a header, joined as RFC 9110 allows for list headers.
    pub fn header_joined(&self, name: &str) -> Option<String> {
        let vals: Vec<&str> = self
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!vals.is_empty()).then(|| vals.join(", "))
    }

    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
        })
    }

    /// The JSON body of a local API call.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::bad_request(format!("the body is not valid JSON: {e}")))
    }
}

/// Path segments, each percent-decoded once (warp does not decode).
pub(crate) fn segments(path: &str) -> Vec<String> {
    path.trim_start_matches('/')
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect()
}

pub type Response = warp::reply::Response;

pub(crate) fn json_reply<T: Serialize>(status: u16, value: &T) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    bytes_reply(status, body)
}

pub(crate) fn bytes_reply(status: u16, body: Vec<u8>) -> Response {
    let mut r = http::Response::new(warp::hyper::body::Bytes::from(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    warp::reply::Reply::into_response(r)
}

/// The §10 error answer, the one place errors become HTTP.
pub(crate) fn error_reply(e: &Error) -> Response {
    let mut r = json_reply(e.status(), &e.to_body());
    if let Some(secs) = e.retry_after_secs {
        if let Ok(v) = http::HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
    }
    r
}

/// The bearer token's participant, and the token's hash (what rate
/// limits are kept by).
fn caller(svc: &Services, req: &Request) -> Result<(Participant, [u8; 32])> {
    let token = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| Error::new(Code::Unauthenticated, "send Authorization: Bearer <token>; an admin creates tokens with POST /v1/admin/participants"))?;
    let token = token.trim();
    Ok((
        svc.rooms.store.participant_by_token(token)?,
        crate::storage::participants::token_hash(token),
    ))
}

/// The caller must hold an admin token.
pub(crate) fn require_admin(p: &Participant) -> Result<()> {
    if p.power_level != PowerLevel::Admin {
        return Err(Error::forbidden(
            "this needs an admin token (power_level admin)",
        ));
    }
    Ok(())
}

/// What the routes serve: the room domain (and through it federation and
/// storage), the operator's limits, and the signal live streams end at.
pub struct Services {
    pub rooms: Arc<Rooms>,
    pub limits: LimitsConfig,
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// The tenants one listener answers for (SPEC §14), by server_name. A
/// request goes to the tenant its Host / `:authority` names; any other
/// name gets the first tenant, whose own checks then refuse what must
/// name it exactly (§4 step 2 answers such S2S requests 421).
pub struct Directory {
    first: Arc<Services>,
    /// server_name → services. A std lock: written when a tenant is
    /// created, never held across `.await`.
    by_name: std::sync::RwLock<std::collections::HashMap<String, Arc<Services>>>,
}

impl Directory {
    pub fn new(first: Arc<Services>) -> Arc<Directory> {
        let dir = Arc::new(Directory {
            first: first.clone(),
            by_name: Default::default(),
        });
        dir.add(first);
        dir
    }

    pub fn add(&self, svc: Arc<Services>) {
        let name = svc.rooms.server_name.as_str().to_string();
        self.by_name
            .write()
            .expect("directory lock")
            .insert(name, svc);
    }

    /// Every tenant's services, the first first.
    pub fn all(&self) -> Vec<Arc<Services>> {
        let mut out = vec![self.first.clone()];
        let by_name = self.by_name.read().expect("directory lock");
        let mut rest: Vec<&Arc<Services>> = by_name
            .values()
            .filter(|s| !Arc::ptr_eq(s, &self.first))
            .collect();
        rest.sort_by(|a, b| a.rooms.server_name.cmp(&b.rooms.server_name));
        out.extend(rest.into_iter().cloned());
        out
    }

    fn route(&self, authority: Option<&str>) -> Arc<Services> {
        let named = authority.and_then(|a| {
            self.by_name
                .read()
                .expect("directory lock")
                .get(&a.to_ascii_lowercase())
                .cloned()
        });
        named.unwrap_or_else(|| self.first.clone())
    }
}

/// What the listener holds for every request: the tenants, the limits,
/// and the rate limiters (HTTP concerns, so they live here; shared by
/// all tenants, as the connections are).
pub struct Front {
    tenants: Arc<Directory>,
    limits: LimitsConfig,
    per_origin: Limiter<ServerName>,
    per_token: Limiter<[u8; 32]>,
    /// Bytes of request bodies being held at once, across all requests.
    body_budget: Arc<tokio::sync::Semaphore>,
}

type Limiter<K> = governor::DefaultKeyedRateLimiter<K>;

fn limiter<K: std::hash::Hash + Eq + Clone>(rate: Rate) -> Limiter<K> {
    let period = rate.per / rate.count.max(1);
    let burst = std::num::NonZeroU32::new(rate.count.saturating_mul(2)).unwrap_or(NonZeroU32::MIN);
    let quota = governor::Quota::with_period(period)
        .unwrap_or_else(|| governor::Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst);
    governor::RateLimiter::keyed(quota)
}

/// The answer to a request over its rate: 429 with the wait.
fn rate_limited<K: std::hash::Hash + Eq + Clone>(
    kind: &str,
    limiter: &Limiter<K>,
    not_until: governor::NotUntil<
        <governor::clock::DefaultClock as governor::clock::Clock>::Instant,
    >,
) -> Error {
    let wait = not_until.wait_time_from(governor::clock::Clock::now(limiter.clock()));
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut e = Error::new(
        Code::RateLimited,
        format!("too many requests for this {kind}; retry after {secs} s (limits.rate_per_{kind})"),
    );
    e.retry_after_secs = Some(secs.max(1));
    e
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

fn s2s_too_large() -> Error {
    Error::new(
        Code::TooLarge,
        format!("request bodies are limited to {BODY_BYTES_MAX} bytes; send fewer events per transaction"),
    )
}

fn local_too_large() -> Error {
    Error::bad_request(format!(
        "local API bodies are limited to {LOCAL_BODY_BYTES_MAX} bytes"
    ))
}

/// A request that must be closed without an answer (its body was too slow).
#[derive(Debug)]
pub struct CloseConnection(&'static str);

impl std::fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for CloseConnection {}

impl Front {
    pub fn new(tenants: Arc<Directory>) -> Front {
        let limits = tenants.first.limits.clone();
        Front {
            per_origin: limiter(limits.rate_per_origin),
            per_token: limiter(limits.rate_per_token),
            body_budget: Arc::new(tokio::sync::Semaphore::new(BODY_BUFFER_BYTES_MAX)),
            limits,
            tenants,
        }
    }

    /// Forget rate state of keys that are back to a full bucket, so the
    /// maps stay as small as the set of recently active peers and tokens.
    pub fn forget_idle_rates(&self) {
        self.per_origin.retain_recent();
        self.per_origin.shrink_to_fit();
        self.per_token.retain_recent();
        self.per_token.shrink_to_fit();
    }

    /// Read a body of at most `max` bytes within the body timeout, holding
    /// its size of the shared body budget until the request is done. Too
    /// slow: the connection is closed without an answer (SPEC §12).
    async fn read_body(
        &self,
        req: &mut Request,
        body: hyper::body::Incoming,
        max: u64,
        too_large: fn() -> Error,
    ) -> std::result::Result<tokio::sync::OwnedSemaphorePermit, Refusal> {
        let declared = declared_length(&req.headers);
        if declared.is_some_and(|n| n > max) {
            return Err(too_large().into());
        }
        // Reserve what the body may take before reading it: with many slow
        // senders at once, memory stays bounded and later ones wait.
        let reserve = declared.unwrap_or(max) as u32;
        let read = async {
            let permit = self
                .body_budget
                .clone()
                .acquire_many_owned(reserve.max(1))
                .await
                .map_err(|e| Error::internal("body budget", e))?;
            match http_body_util::Limited::new(body, max as usize)
                .collect()
                .await
            {
                Ok(c) => Ok((c.to_bytes(), permit)),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
                Err(e) => Err(Error::bad_request(format!("could not read the body: {e}"))),
            }
        };
        let (bytes, permit) = tokio::time::timeout(self.limits.request_body_timeout, read)
            .await
            .map_err(|_| Refusal::Close(CloseConnection("request body too slow")))??;
        req.body = bytes;
        Ok(permit)
    }

    /// One request, start to end. The route is chosen and the request
    /// authenticated from its head; only then is the body read (SPEC §12).
    pub async fn handle(
        &self,
        conn: ConnInfo,
        req: http::Request<hyper::body::Incoming>,
    ) -> std::result::Result<Response, CloseConnection> {
        let started = std::time::Instant::now();
        let (parts, body) = req.into_parts();
        // HTTP/2 names the destination in `:authority` (the URI), HTTP/1.1
        // in Host. A request carrying both, differently, is malformed (RFC
        // 9113 §8.3.1): it names no tenant, so step 2 of §4 refuses it.
        let host = parts
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok());
        let authority = match (parts.uri.authority().map(|a| a.as_str()), host) {
            (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => {
                Some(format!("{h} (Host) / {a} (:authority)"))
            }
            (Some(a), _) => Some(a.to_string()),
            (None, h) => h.map(str::to_string),
        };
        let mut req = Request {
            method: parts.method,
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            authority,
            headers: parts.headers,
            body: Bytes::new(),
            conn: Some(conn),
        };
        let segs = segments(&req.path);
        let seg_refs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let svc = self.tenants.route(req.authority.as_deref());
        // Matched against the templates only while metrics are recorded:
        // the default (no `metrics.listen`) pays nothing per request.
        let route =
            crate::metrics::recording().then(|| metrics::route_label(&req.method, &seg_refs));
        let local_api = seg_refs.first() == Some(&"v1");
        let answer = match seg_refs.as_slice() {
            [".well-known", "scaiwave", "server"] => {
                s2s::descriptor(&svc, &req).map_err(Refusal::from)
            }
            ["_scaiwave", "federation", "v1", rest @ ..]
                if s2s::known(req.method.as_str(), rest) =>
            {
                self.s2s(&svc, &mut req, body, rest).await
            }
            ["v1", rest @ ..] => self.local(&svc, &mut req, body, rest).await,
            ["admin"] if req.method == Method::GET => Ok(console::redirect_to_slash()),
            ["admin", rest @ ..] if req.method == Method::GET => {
                console::asset(rest).ok_or_else(|| not_found_route(&req).into())
            }
            _ => Err(not_found_route(&req).into()),
        };
        let answer = match answer {
            Ok(r) => Ok(r),
            Err(Refusal::Answer(e)) => {
                if e.code == Code::RateLimited {
                    let kind = if local_api { "token" } else { "origin" };
                    svc.rooms.fed.metrics.rate_limited(kind);
                }
                Ok(error_reply(&e))
            }
            Err(Refusal::Close(c)) => Err(c),
        };
        // A connection closed without an answer has no status to count.
        if let (Ok(r), Some(route)) = (&answer, route) {
            svc.rooms
                .fed
                .metrics
                .http_request(route, r.status().as_u16(), started.elapsed());
        }
        answer
    }

    async fn s2s(
        &self,
        svc: &Services,
        req: &mut Request,
        body: hyper::body::Incoming,
        rest: &[&str],
    ) -> std::result::Result<Response, Refusal> {
        // A declared length over the limit is refused before anything else
        // (SPEC §10: 413 before the body is buffered).
        if declared_length(&req.headers).is_some_and(|n| n > BODY_BYTES_MAX) {
            return Err(s2s_too_large().into());
        }
        let origin = s2s::authenticate(svc, req).await?;
        if let Err(not_until) = self.per_origin.check_key(&origin) {
            return Err(rate_limited("origin", &self.per_origin, not_until).into());
        }
        let _permit = if s2s::has_body(req.method.as_str()) {
            let permit = self
                .read_body(req, body, BODY_BYTES_MAX, s2s_too_large)
                .await?;
            s2s::check_digest(svc, req, &origin)?;
            Some(permit)
        } else {
            None
        };
        Ok(s2s::route(svc, req, &origin, rest).await?)
    }

    async fn local(
        &self,
        svc: &Arc<Services>,
        req: &mut Request,
        body: hyper::body::Incoming,
        rest: &[&str],
    ) -> std::result::Result<Response, Refusal> {
        let (me, token) = caller(svc, req)?;
        if let Err(not_until) = self.per_token.check_key(&token) {
            return Err(rate_limited("token", &self.per_token, not_until).into());
        }
        let _permit = if matches!(req.method, Method::POST | Method::PUT) {
            Some(
                self.read_body(req, body, LOCAL_BODY_BYTES_MAX, local_too_large)
                    .await?,
            )
        } else {
            None
        };
        Ok(match rest {
            ["admin", rest @ ..] => admin::route(svc, req, rest, me).await,
            _ => client::route(svc, req, rest, me).await,
        }?)
    }
}

/// Why a request ends before its handler: an error to answer with, or a
/// connection to close without an answer.
enum Refusal {
    Answer(Error),
    Close(CloseConnection),
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Refusal {
        Refusal::Answer(e)
    }
}

pub(crate) fn not_found_route(req: &Request) -> Error {
    Error::not_found(format!(
        "no route {} {}; see docs/api.md",
        req.method, req.path
    ))
}
