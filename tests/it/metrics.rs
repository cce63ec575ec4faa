//! SPEC §16: `GET /metrics` on its own plain-HTTP listener, parsed with a
//! Prometheus text-format parser, and counters that move with traffic.

use prometheus_parse::{Scrape, Value};
use serde_json::json;

use crate::federation::{shared_room, texts};
use crate::testnet::{self, eventually, TestNet};

/// Every series of the SPEC §16 table (histograms by their base name).
const SERIES: &[&str] = &[
    "scaiwave_http_requests_total",
    "scaiwave_http_request_duration_seconds",
    "scaiwave_federation_events_received_total",
    "scaiwave_federation_events_sent_total",
    "scaiwave_federation_queue_depth",
    "scaiwave_federation_queue_oldest_age_seconds",
    "scaiwave_federation_delivery_seconds",
    "scaiwave_federation_peer_up",
    "scaiwave_federation_signature_verifications_total",
    "scaiwave_federation_descriptor_fetches_total",
    "scaiwave_federation_rate_limited_total",
    "scaiwave_storage_flush_seconds",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
];

async fn scrape(net: &TestNet, short: &str) -> (String, Scrape) {
    let addr = net.server(short).running.as_ref().unwrap().metrics_addr;
    let addr = addr.expect("metrics.listen is set for this server");
    let r = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = r.text().await.unwrap();
    let parsed = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    (text, parsed)
}

/// The sum of the samples of `metric` whose labels include `labels`
/// (a histogram counts its observations).
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_apart_and_move_with_traffic() {
    let mut net = testnet::start(&["a.test", "b.test"], |short, c| {
        if short == "a.test" {
            c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        }
    })
    .await;
    let a = net.name("a.test");
    let b = net.name("b.test");
    let (alice, bob, room) = shared_room(&net).await;
    net.post(&bob, &room, json!({"body": "from b"})).await;
    net.post(&alice, &room, json!({"body": "from a"})).await;
    eventually("bob sees both", || async {
        texts(&net, &bob, &room).await.len() == 2
    })
    .await;

    let (text, first) = scrape(&net, "a.test").await;
    for series in SERIES {
        assert!(
            text.contains(&format!("# TYPE {series} ")),
            "{series} is missing from:\n{text}"
        );
    }
    for sample in &first.samples {
        if sample.metric.starts_with("scaiwave_") {
            assert!(
                sample.labels.get("tenant").is_some(),
                "{sample:?} has no tenant"
            );
        }
    }
    let tenant = ("tenant", a.as_str());
    let send = [
        tenant,
        ("route", "/_scaiwave/federation/v1/send"),
        ("status", "200"),
    ];
    assert!(value(&first, "scaiwave_http_requests_total", &send) >= 1.0);
    let received = [tenant, ("peer", b.as_str()), ("outcome", "accepted")];
    assert!(
        value(
            &first,
            "scaiwave_federation_events_received_total",
            &received
        ) >= 1.0
    );
    let to_b = [tenant, ("peer", b.as_str())];
    assert!(value(&first, "scaiwave_federation_events_sent_total", &to_b) >= 1.0);
    assert!(value(&first, "scaiwave_federation_delivery_seconds", &to_b) >= 1.0);
    assert_eq!(value(&first, "scaiwave_federation_peer_up", &to_b), 1.0);
    assert_eq!(value(&first, "scaiwave_federation_queue_depth", &to_b), 0.0);
    let ok = [tenant, ("result", "ok")];
    assert!(
        value(
            &first,
            "scaiwave_federation_signature_verifications_total",
            &ok
        ) >= 1.0
    );
    assert!(value(&first, "scaiwave_federation_descriptor_fetches_total", &ok) >= 1.0);
    assert!(value(&first, "scaiwave_storage_flush_seconds", &[tenant]) >= 1.0);
    assert!(value(&first, "process_resident_memory_bytes", &[]) > 0.0);
    assert_eq!(
        value(&first, "scaiwave_storage_full_refusals_total", &[tenant]),
        0.0
    );
    assert!(value(&first, "scaiwave_storage_available_bytes", &[tenant]) > 0.0);
    assert!(
        !text.contains(room.as_str()),
        "labels carry route templates, never raw paths"
    );

    // More traffic: the counters move; B going down shows in A's gauges.
    net.post(&bob, &room, json!({"body": "again"})).await;
    eventually("alice sees it", || async {
        texts(&net, &alice, &room).await.len() == 3
    })
    .await;
    net.server_mut("b.test").stop().await;
    net.post(&alice, &room, json!({"body": "queued"})).await;
    let later = std::sync::Mutex::new(None);
    eventually("A sees B in backoff with a queued event", || async {
        let (_, s) = scrape(&net, "a.test").await;
        let done = value(&s, "scaiwave_federation_peer_up", &to_b) == 0.0
            && value(&s, "scaiwave_federation_queue_depth", &to_b) >= 1.0;
        *later.lock().unwrap() = Some(s);
        done
    })
    .await;
    let later = later.into_inner().unwrap().unwrap();
    for (metric, labels) in [
        ("scaiwave_federation_events_received_total", &received[..]),
        ("scaiwave_http_requests_total", &send[..]),
    ] {
        assert!(
            value(&later, metric, labels) > value(&first, metric, labels),
            "{metric} did not move"
        );
    }
    assert!(
        value(
            &later,
            "scaiwave_federation_queue_oldest_age_seconds",
            &to_b
        ) >= 0.0
    );

    // The metrics listener answers nothing else, and the federation
    // listener has no /metrics.
    let addr = net
        .server("a.test")
        .running
        .as_ref()
        .unwrap()
        .metrics_addr
        .unwrap();
    let r = reqwest::get(format!("http://{addr}/v1/me")).await.unwrap();
    assert_eq!(r.status(), 404);
    let (status, _) = net
        .call("a.test", reqwest::Method::GET, "/metrics", None, None)
        .await;
    assert_eq!(status, 404);
    net.stop_all().await;
}
