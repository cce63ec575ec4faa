//! SPEC §16 over HTTP: `GET /metrics` on `metrics.listen`, plain HTTP/1.1,
//! never on the federation listener; and the route templates that label
//! requests on that listener.
//!
//! **Invariant:** a request's `route` label is one of [`ROUTES`] or
//! `unmatched`, never text taken from the path.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::admin::peer_health;
use super::Directory;
use crate::limits::{METRICS_CONNECTIONS_MAX, METRICS_CONNECTION_SECS_MAX};
use crate::metrics::{Gauges, PeerGauge, StorageGauge};

/// Every route, as method and path template; `{…}` matches one segment.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/.well-known/scaiwave/server"),
    ("POST", "/_scaiwave/federation/v1/send"),
    ("GET", "/_scaiwave/federation/v1/profile/{local_id}"),
    ("GET", "/_scaiwave/federation/v1/rooms/{room_id}/members"),
    ("GET", "/_scaiwave/federation/v1/rooms/{room_id}/backfill"),
    (
        "POST",
        "/_scaiwave/federation/v1/rooms/{room_id}/call-token",
    ),
    ("GET", "/v1/events"),
    ("GET", "/v1/me"),
    ("PUT", "/v1/me/presence"),
    ("GET", "/v1/me/invitations"),
    ("POST", "/v1/me/invitations/{invite_id}/accept"),
    ("POST", "/v1/me/invitations/{invite_id}/decline"),
    ("POST", "/v1/me/federated-dms"),
    ("GET", "/v1/rooms"),
    ("POST", "/v1/rooms"),
    ("GET", "/v1/rooms/{room_id}/members"),
    ("GET", "/v1/rooms/{room_id}/messages"),
    ("POST", "/v1/rooms/{room_id}/messages"),
    ("POST", "/v1/rooms/{room_id}/reactions"),
    ("POST", "/v1/rooms/{room_id}/invitations"),
    ("POST", "/v1/rooms/{room_id}/call"),
    ("POST", "/v1/rooms/{room_id}/kick"),
    ("POST", "/v1/rooms/{room_id}/leave"),
    ("GET", "/v1/search"),
    ("GET", "/v1/admin/federation/identity"),
    ("POST", "/v1/admin/federation/key/rotate"),
    ("GET", "/v1/admin/federation/peers"),
    ("DELETE", "/v1/admin/federation/peers/{server_name}"),
    ("GET", "/v1/admin/federation/policy"),
    ("PUT", "/v1/admin/federation/policy"),
    ("POST", "/v1/admin/federation/foreign/{fqid}/refresh"),
    ("PUT", "/v1/admin/rooms/{room_id}/federate"),
    ("POST", "/v1/admin/rooms/{room_id}/federation/invite"),
    ("POST", "/v1/admin/rooms/{room_id}/federation/backfill"),
    ("POST", "/v1/admin/participants"),
    ("GET", "/v1/admin/audit"),
    ("GET", "/admin"),
    ("GET", "/admin/"),
    ("GET", "/admin/{file}"),
];

/// The label of a request that matches no route.
pub const UNMATCHED: &str = "unmatched";

/// The template `segments` (the path split on `/`, percent-decoded)
/// matches, or [`UNMATCHED`].
pub fn route_label(method: &Method, segments: &[&str]) -> &'static str {
    ROUTES
        .iter()
        .find(|(m, template)| {
            *m == method.as_str()
                && template.trim_start_matches('/').split('/').count() == segments.len()
                && template
                    .trim_start_matches('/')
                    .split('/')
                    .zip(segments)
                    .all(|(p, s)| p.starts_with('{') || p == *s)
        })
        .map(|(_, template)| *template)
        .unwrap_or(UNMATCHED)
}

/// The scrape: recorded counters and histograms, then the gauges read now.
pub fn render(directory: &Directory) -> String {
    let mut gauges = Gauges::default();
    let tenants = directory.all();
    for svc in &tenants {
        let fed = &svc.rooms.fed;
        let now = svc.rooms.clock.now_ms();
        // A tenant whose rows cannot be read now shows no peers this scrape
        // rather than failing the whole answer.
        let rows = peer_health(svc).unwrap_or_default();
        gauges.tenant(
            &fed.metrics,
            rows.into_iter().map(|p| PeerGauge {
                peer: p.name.to_string(),
                queue_depth: p.queue_depth as u64,
                oldest_age: Duration::from_millis(
                    p.oldest_queued_at_ms
                        .map_or(0, |at| (now - at).max(0) as u64),
                ),
                up: p.status == "ok",
            }),
        );
    }
    let first = &tenants[0];
    let store = &first.rooms.store;
    gauges.storage(StorageGauge {
        tenant: first.rooms.server_name.to_string(),
        full_refusals: store.full_refusals(),
        available_bytes: store.free_space().ok().map(|f| f.available_bytes),
    });
    let mut out = crate::metrics::render_recorded();
    out.push_str(&gauges.render());
    out
}

/// Serve `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, directory: Arc<Directory>, shutdown: CancellationToken) {
    // A scrape is one short request: a few connections at once are plenty,
    // and the rest wait in the kernel's backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let directory = directory.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let directory = directory.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&directory, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            // Bounded: a client that never finishes its request holds a
            // slot for this long at most.
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::timeout(Duration::from_secs(METRICS_CONNECTION_SECS_MAX), conn) => {}
            }
        });
    }
}

fn answer(
    directory: &Directory,
    req: &http::Request<hyper::body::Incoming>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            render(directory),
        ),
        _ => (
            404,
            "text/plain; charset=utf-8",
            "this listener serves only GET /metrics (SPEC §16)\n".to_string(),
        ),
    };
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_labelled_by_template_never_by_path() {
        let cases: [(Method, &str, &str); 6] = [
            (
                Method::POST,
                "_scaiwave/federation/v1/send",
                "/_scaiwave/federation/v1/send",
            ),
            (
                Method::GET,
                "v1/rooms/!abc:a.test/messages",
                "/v1/rooms/{room_id}/messages",
            ),
            (
                Method::DELETE,
                "v1/admin/federation/peers/b.test:8448",
                "/v1/admin/federation/peers/{server_name}",
            ),
            (Method::GET, "v1/rooms/!abc:a.test/nonsense", UNMATCHED),
            (Method::GET, "_scaiwave/federation/v1/send", UNMATCHED),
            (Method::GET, "anything/else/at/all", UNMATCHED),
        ];
        for (method, path, label) in cases {
            let segs: Vec<&str> = path.split('/').collect();
            assert_eq!(route_label(&method, &segs), label, "{method} {path}");
        }
    }
}
