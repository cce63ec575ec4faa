//! Two real servers named as real ones are (`a.test:<port>`), federating
//! over HTTP/2 and over HTTP/1.1 only: the authority every request carries
//! (HTTP/1.1 `Host`, HTTP/2 `:authority`, the signed `@authority`) is the
//! destination's server_name, port included.

use std::sync::atomic::Ordering;

use serde_json::json;

use crate::testnet::{self, eventually, TestNet};

/// alice@a hosts a room, bob@b joins, each posts, both see both.
async fn a_room_across(net: &TestNet) {
    let alice = net.user("a.test", "alice").await;
    let bob = net.user("b.test", "bob").await;
    let room = net
        .create_room(&alice, json!({"name": "interop", "room_type": "standard"}))
        .await;
    net.invite_and_join(&alice, &room, &bob).await;
    let (s, v) = net.post(&alice, &room, json!({"body": "from a"})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = net.post(&bob, &room, json!({"body": "from b"})).await;
    assert_eq!(s, 200, "{v}");
    for who in [&alice, &bob] {
        eventually("both messages on both sides", || async {
            let bodies: Vec<String> = net
                .messages(who, &room)
                .await
                .iter()
                .filter(|m| m["state"] == "sent")
                .map(|m| m["body"].as_str().unwrap_or("").to_string())
                .collect();
            bodies.contains(&"from a".to_string()) && bodies.contains(&"from b".to_string())
        })
        .await;
    }
}

fn counts(net: &TestNet, short: &str) -> (u64, u64) {
    let c = &net.server(short).running.as_ref().unwrap().connections;
    (
        c.http1.load(Ordering::SeqCst),
        c.http2.load(Ordering::SeqCst),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_named_with_ports_federate_over_http2() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    // The test's own calls go as HTTP/1.1, so every HTTP/2 connection a
    // server counts was opened by the other server.
    net.http = testnet::client(&net.ca, net.hosts.clone(), true);
    assert!(net.name("b.test").contains(':'), "{}", net.name("b.test"));
    a_room_across(&net).await;
    let (_, a_h2) = counts(&net, "a.test");
    let (_, b_h2) = counts(&net, "b.test");
    assert!(
        a_h2 > 0 && b_h2 > 0,
        "S2S went over HTTP/2 both ways: a {a_h2}, b {b_h2}"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_named_with_ports_federate_over_http1_only() {
    let mut net = testnet::start_http1_only(&["a.test", "b.test"], |_, _| {}).await;
    a_room_across(&net).await;
    for short in ["a.test", "b.test"] {
        let (h1, h2) = counts(&net, short);
        assert!(
            h1 > 0 && h2 == 0,
            "{short}: {h1} HTTP/1.1 and {h2} HTTP/2 connections"
        );
    }
    net.stop_all().await;
}
