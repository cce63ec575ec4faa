//! HTTP: the only module that knows warp and HTTP. One warp filter collects
//! a request ([`Request`]), a small router sends it to the S2S, admin or
//! client handlers, and every answer (errors included) is built here.
//!
//! - [`serve`]: the HTTPS listener (rustls + hyper-util), graceful shutdown.
//! - [`s2s`]: `/.well-known/scaiwave/server` and `/_scaiwave/federation/v1/*`.
//! - [`admin`]: `/v1/admin/*`; [`client`]: the rest of `/v1/*`.

pub mod admin;
pub mod client;
pub mod s2s;
pub mod serve;

use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Method, StatusCode};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;
use serde_json::Value;
use warp::Filter;

use crate::app::App;
use crate::error::{Code, Error, Result};
use crate::limits::{BODY_BYTES_MAX, LOCAL_BODY_BYTES_MAX};
use crate::storage::{Participant, PowerLevel};

/// Facts about the TLS connection, put into request extensions by [`serve`].
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub sni: Option<String>,
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

/// Characters left alone when percent-encoding an id into a path segment
/// (RFC 3986 unreserved).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub fn encode_segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// Path segments, each percent-decoded once (warp does not decode).
pub fn segments(path: &str) -> Vec<String> {
    path.trim_start_matches('/')
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect()
}

pub type Response = warp::reply::Response;

pub fn json_reply<T: Serialize>(status: u16, value: &T) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    bytes_reply(status, body)
}

pub fn bytes_reply(status: u16, body: Vec<u8>) -> Response {
    let mut r = http::Response::new(warp::hyper::body::Bytes::from(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    warp::reply::Reply::into_response(r)
}

/// The §10 error answer, the one place errors become HTTP.
pub fn error_reply(e: &Error) -> Response {
    let mut r = json_reply(e.status(), &e.to_body());
    if let Some(secs) = e.retry_after_secs {
        if let Ok(v) = http::HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
    }
    r
}

/// The bearer token's participant.
pub fn caller(app: &App, req: &Request) -> Result<Participant> {
    let token = req
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| Error::new(Code::Unauthenticated, "send Authorization: Bearer <token>; an admin creates tokens with POST /v1/admin/participants"))?;
    app.authenticate(token.trim())
}

pub fn require_admin(app: &App, req: &Request) -> Result<Participant> {
    let p = caller(app, req)?;
    if p.power_level != PowerLevel::Admin {
        return Err(Error::forbidden(
            "this needs an admin token (power_level admin)",
        ));
    }
    Ok(p)
}

async fn read_body<S, B>(headers: &HeaderMap, stream: S) -> Result<Bytes>
where
    S: Stream<Item = std::result::Result<B, warp::Error>>,
    B: Buf,
{
    let too_large = || {
        Error::new(Code::TooLarge, format!("request bodies are limited to {BODY_BYTES_MAX} bytes; send fewer events per transaction"))
    };
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_BYTES_MAX) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
    let mut stream = std::pin::pin!(stream);
    while let Some(chunk) = stream.next().await {
        let mut chunk =
            chunk.map_err(|e| Error::bad_request(format!("could not read the body: {e}")))?;
        if body.len() as u64 + chunk.remaining() as u64 > BODY_BYTES_MAX {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let c = chunk.chunk();
            body.extend_from_slice(c);
            let n = c.len();
            chunk.advance(n);
        }
    }
    Ok(Bytes::from(body))
}

async fn dispatch(app: Arc<App>, req: Request) -> Response {
    let segs = segments(&req.path);
    let seg_refs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let result = match seg_refs.as_slice() {
        [".well-known", "scaiwave", "server"] => s2s::descriptor(&app, &req),
        ["_scaiwave", "federation", "v1", rest @ ..] => s2s::route(&app, &req, rest).await,
        ["v1", ..] if req.body.len() as u64 > LOCAL_BODY_BYTES_MAX => Err(Error::bad_request(
            format!("local API bodies are limited to {LOCAL_BODY_BYTES_MAX} bytes"),
        )),
        ["v1", "admin", rest @ ..] => admin::route(&app, &req, rest).await,
        ["v1", rest @ ..] => client::route(&app, &req, rest).await,
        _ => Err(not_found_route(&req)),
    };
    result.unwrap_or_else(|e| error_reply(&e))
}

pub fn not_found_route(req: &Request) -> Error {
    Error::not_found(format!(
        "no route {} {}; see docs/api.md",
        req.method, req.path
    ))
}

/// The single warp filter that serves everything.
pub fn routes(
    app: Arc<App>,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let optional_query = warp::query::raw()
        .map(Some)
        .or(warp::any().map(|| None))
        .unify();
    warp::method()
        .and(warp::path::full())
        .and(optional_query)
        .and(warp::host::optional().or(warp::any().map(|| None)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<ConnInfo>())
        .and(warp::body::stream())
        .then(
            move |method,
                  path: warp::path::FullPath,
                  query,
                  authority: Option<warp::host::Authority>,
                  headers: HeaderMap,
                  conn,
                  body| {
                let app = app.clone();
                async move {
                    let body = match read_body(&headers, body).await {
                        Ok(b) => b,
                        Err(e) => return error_reply(&e),
                    };
                    let req = Request {
                        method,
                        path: path.as_str().to_string(),
                        query,
                        authority: authority.map(|a| a.as_str().to_string()),
                        headers,
                        body,
                        conn,
                    };
                    dispatch(app, req).await
                }
            },
        )
        .recover(|_rejection: warp::Rejection| async move {
            Ok::<_, std::convert::Infallible>(error_reply(&Error::bad_request(
                "the request could not be read; check the method, Host header and body",
            )))
        })
        .unify()
}
