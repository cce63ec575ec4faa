//! Every refusal of SPEC §4/§8/§9 through real HTTPS: status, `SW_*` code,
//! and no state changed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use reqwest::Method;
use scaiwave::ids::KeyId;
use scaiwave::protocol::httpsig;
use serde_json::{json, Value};

use crate::federation::{bodies, shared_room, texts};
use crate::testnet::{self, message, signed_event, TestNet};

/// A hand-built signed request, so a test can break one thing at a time.
struct Raw {
    origin: String,
    key_id: KeyId,
    key: ed25519_dalek::SigningKey,
    created: i64,
    path: String,
    body: Vec<u8>,
}

impl Raw {
    fn from_server(net: &TestNet, from: &str, body: &Value) -> Raw {
        let app = net.server(from).app();
        let k = app.first.fed.keys.current().unwrap();
        Raw {
            origin: net.name(from),
            key_id: k.key_id,
            key: k.signing,
            created: app.clock.now_secs(),
            path: "/_scaiwave/federation/v1/send".into(),
            body: serde_json::to_vec(body).unwrap(),
        }
    }

    /// Headers a correct signer would send to the server named `to`
    /// (its server_name, port included: the authority it signs).
    fn headers(&self, to: &str) -> Vec<(String, String)> {
        let digest = httpsig::content_digest(&self.body);
        let parts = httpsig::RequestParts {
            method: "POST",
            authority: to,
            path: &self.path,
            query: None,
            origin: &self.origin,
            content_digest: Some(&digest),
        };
        let sig = httpsig::sign(&parts, &self.key_id, &self.key, self.created);
        vec![
            ("scaiwave-origin".into(), self.origin.clone()),
            ("content-digest".into(), digest),
            ("signature-input".into(), sig.signature_input),
            ("signature".into(), sig.signature),
            ("content-type".into(), "application/json".into()),
        ]
    }

    /// Send as a correct signer would (`headers` for `to`'s server_name,
    /// the signed body).
    async fn send_signed(&self, net: &TestNet, to: &str) -> (u16, Value) {
        self.send(net, to, self.headers(&net.name(to)), self.body.clone())
            .await
    }

    /// Send to `to` (a short name) at its server_name, with exactly these
    /// headers and body.
    async fn send(
        &self,
        net: &TestNet,
        to: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = net
            .http
            .post(format!("https://{}{}", net.name(to), self.path))
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (
            status,
            serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap_or(Value::Null),
        )
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// A fresh message event from alice in `room`, signed by a.test.
fn new_event(net: &TestNet, room: &str, alice: &str, body: &str) -> Value {
    signed_event(net.server("a.test").app(), room, alice, message(body)).to_wire_value(Some(999))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_request_refusals_follow_the_spec_order_and_change_nothing() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    let before = bodies(&net, &bob, &room).await;
    let body = json!({"txn_id": "t-refused", "events": [new_event(&net, &room, &alice.fqid, "must not land")], "edus": []});
    let raw = Raw::from_server(&net, "a.test", &body);
    let good = raw.headers(&net.name("b.test"));
    let without = |name: &str| {
        good.iter()
            .filter(|(k, _)| k != name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let with = |name: &str, value: String| {
        let mut h = without(name);
        h.push((name.into(), value));
        h
    };

    // 1. missing / malformed headers, wrong label, tag, alg, uncovered component.
    let sig_input = good
        .iter()
        .find(|(k, _)| k == "signature-input")
        .unwrap()
        .1
        .clone();
    let cases: Vec<(&str, Vec<(String, String)>)> = vec![
        ("no Signature", without("signature")),
        ("no Signature-Input", without("signature-input")),
        ("no ScaiWave-Origin", without("scaiwave-origin")),
        (
            "wrong label",
            with("signature-input", sig_input.replacen("sw=", "xx=", 1)),
        ),
        (
            "wrong tag",
            with(
                "signature-input",
                sig_input.replace("scaiwave-v1", "other-v1"),
            ),
        ),
        (
            "wrong alg",
            with(
                "signature-input",
                sig_input.replace("\"ed25519\"", "\"rsa-v1_5-sha256\""),
            ),
        ),
        (
            "uncovered @query",
            with("signature-input", sig_input.replace("\"@query\" ", "")),
        ),
        ("garbage", with("signature-input", "sw=(((".into())),
    ];
    for (what, headers) in cases {
        let (s, v) = raw.send(&net, "b.test", headers, raw.body.clone()).await;
        assert_eq!(
            (s, code(&v)),
            (401, "SW_FED_SIGNATURE_MISMATCH"),
            "{what}: {v}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap().len() > 10,
            "{what}: the message says what to do"
        );
    }

    // 2. wrong authority → 421 (the Host names no tenant here). The URL,
    // SNI and signature name b.test's real server_name; only the Host
    // header is wrong (over HTTP/2 it contradicts `:authority`).
    let mut wrong_host = good.clone();
    wrong_host.push(("host".into(), "elsewhere.test".into()));
    let (s, v) = raw.send(&net, "b.test", wrong_host, raw.body.clone()).await;
    assert_eq!((s, code(&v)), (421, "SW_FED_WRONG_DESTINATION"), "{v}");

    // 3. clock skew.
    let mut old = Raw::from_server(&net, "a.test", &body);
    old.created -= 3600;
    let (s, v) = old.send_signed(&net, "b.test").await;
    assert_eq!(
        (s, code(&v), v["error"]["reason"].as_str()),
        (401, "SW_FED_SIGNATURE_MISMATCH", Some("clock_skew")),
        "{v}"
    );

    // 4. digest: the body changed after signing.
    let mut tampered = raw.body.clone();
    tampered.extend_from_slice(b" ");
    let (s, v) = raw.send(&net, "b.test", good.clone(), tampered).await;
    assert_eq!(
        (s, code(&v), v["error"]["reason"].as_str()),
        (401, "SW_FED_SIGNATURE_MISMATCH", Some("digest")),
        "{v}"
    );

    // 6. a signature by another key under a.test's key_id.
    let mut forged = Raw::from_server(&net, "a.test", &body);
    forged.key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let (s, v) = forged.send_signed(&net, "b.test").await;
    assert_eq!((s, code(&v)), (401, "SW_FED_SIGNATURE_MISMATCH"), "{v}");

    // Nothing of all that changed b.test's room.
    assert_eq!(bodies(&net, &bob, &room).await, before);
    // The well-formed request itself is accepted (as a non-host sender it is refused per event).
    let (s, v) = raw.send(&net, "b.test", good, raw.body.clone()).await;
    assert_eq!(s, 200, "{v}");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_only_refuses_unknown_origins_without_fetching_anything() {
    // c.test resolves to a listener that counts connections: a descriptor
    // fetch would show up there.
    let counter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let counter_addr = counter.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let hits2 = hits.clone();
    std::thread::spawn(move || {
        for c in counter.incoming() {
            if c.is_ok() {
                hits2.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let extra = BTreeMap::from([("c.test".to_string(), counter_addr)]);
    let mut net = testnet::start_with_extra(&["a.test", "b.test"], extra, |_, _| {}).await;
    let a = net.name("a.test");
    let (s, v) = net
        .set_policy(
            "b.test",
            json!({"default_mode": "invite_only", "allowed_peers": [a]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let body = json!({"txn_id": "x", "events": [], "edus": []});
    let mut raw = Raw::from_server(&net, "a.test", &body);
    raw.origin = "c.test".into();
    raw.key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
    raw.key_id = KeyId::derive(&raw.key.verifying_key().to_bytes());
    let (s, v) = raw.send_signed(&net, "b.test").await;
    assert_eq!((s, code(&v)), (403, "SW_FED_PEER_UNKNOWN"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allowed_peers"),
        "{v}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "no descriptor fetch for a refused origin"
    );
    // Audited as a policy refusal.
    let audit = net
        .audit("b.test", "action=federation.policy_rejected&limit=5")
        .await;
    assert_eq!(audit["rows"][0]["peer"], "c.test", "{audit}");
    // closed refuses everyone, denied_peers wins.
    net.set_policy(
        "b.test",
        json!({"default_mode": "open", "denied_peers": [a]}),
    )
    .await;
    let raw = Raw::from_server(&net, "a.test", &body);
    let (s, v) = raw.send_signed(&net, "b.test").await;
    assert_eq!((s, code(&v)), (403, "SW_FED_POLICY_REJECTED"), "{v}");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_body_and_event_refusals() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    let before = bodies(&net, &bob, &room).await;

    // Oversized body: 413 before it is buffered.
    let resp = net
        .http
        .post(format!(
            "https://{}/_scaiwave/federation/v1/send",
            net.name("b.test")
        ))
        .header("content-length", (9 * 1024 * 1024).to_string())
        .body(vec![b' '; 9 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "SW_FED_TOO_LARGE");

    // Malformed JSON and too many events: 400 SW_FED_BAD_REQUEST.
    let raw_bad = |bytes: &[u8]| {
        let mut r = Raw::from_server(&net, "a.test", &json!({}));
        r.body = bytes.to_vec();
        r
    };
    let r = raw_bad(b"{\"txn_id\": \"x\", \"events\": [");
    let (s, v) = r.send_signed(&net, "b.test").await;
    assert_eq!((s, code(&v)), (400, "SW_FED_BAD_REQUEST"), "{v}");
    let many = json!({"txn_id": "many", "events": vec![json!({}); 101], "edus": []});
    let (s, v) = net.send_as("a.test", "b.test", many).await;
    assert_eq!((s, code(&v)), (400, "SW_FED_BAD_REQUEST"), "{v}");

    // Per event: a forged signature, a non-host sender, a float, an unknown field.
    let mut forged = new_event(&net, &room, &alice.fqid, "forged");
    forged["content"]["body"] = json!("changed after signing");
    let from_b = signed_event(net.server("b.test").app(), &room, &bob.fqid, message("x"))
        .to_wire_value(Some(50));
    let mut float = new_event(&net, &room, &alice.fqid, "float");
    float["content"]["n"] = json!(1.5);
    let mut unknown = new_event(&net, &room, &alice.fqid, "unknown");
    unknown["colour"] = json!("blue");
    let (s, v) = net
        .send_events(
            "a.test",
            "b.test",
            "per-event",
            vec![forged, float, unknown],
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let codes: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["error"]["code"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        codes,
        [
            "SW_FED_SIGNATURE_MISMATCH",
            "SW_FED_BAD_EVENT",
            "SW_FED_BAD_EVENT"
        ],
        "{v}"
    );
    assert!(v["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["status"] == "rejected"));
    // b.test is not the host of a room hosted by a.test: it refuses b's relays.
    let (s, v) = net
        .send_events("b.test", "a.test", "relay", vec![from_b])
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["results"][0]["status"], "accepted",
        "a replica's own event goes to the host: {v}"
    );
    // a.test relaying an event of a room hosted by c.test: not its host.
    let elsewhere = new_event(
        &net,
        "!ElsewhereRoom0000000:c.test",
        &alice.fqid,
        "via a non-host",
    );
    let (s, v) = net
        .send_events("a.test", "b.test", "not-host", vec![elsewhere])
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["results"][0]["error"]["code"], "SW_FED_NOT_ROOM_HOST",
        "{v}"
    );

    // Nothing refused was stored on b.test (the accepted relay reached a.test only so far).
    let after = texts(&net, &bob, &room).await;
    assert!(
        !after.iter().any(|b| b == "forged"
            || b == "changed after signing"
            || b == "float"
            || b == "unknown"
            || b == "via a non-host"),
        "{after:?}"
    );
    assert!(after.len() >= before.len());
    let audit = net
        .audit("b.test", "action=federation.event.*&limit=10")
        .await;
    assert!(
        audit["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "federation.event.rejected"),
        "{audit}"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_state_answers_no_key() {
    let mut net = testnet::start(&["a.test", "b.test"], |name, c| {
        if name == "b.test" {
            c.federation.generate_key_on_start = false;
        }
    })
    .await;
    let (s, d) = net
        .call(
            "b.test",
            Method::GET,
            "/.well-known/scaiwave/server",
            None,
            None,
        )
        .await;
    assert_eq!(
        (s, d["public_key"].as_str(), d["key_id"].as_str()),
        (200, Some(""), Some("")),
        "{d}"
    );
    let (s, v) = net.send_events("a.test", "b.test", "k", vec![]).await;
    assert_eq!(
        (s, code(&v), v["error"]["retryable"].as_bool()),
        (503, "SW_FED_NO_KEY", Some(true)),
        "{v}"
    );
    // Generating the key (same function as the CLI) makes it federate.
    net.server("b.test")
        .app()
        .first
        .fed
        .keys
        .generate(0)
        .unwrap();
    let (s, _) = net.send_events("a.test", "b.test", "k2", vec![]).await;
    assert_eq!(s, 200);
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_api_refusals() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let (s, v) = net
        .call("a.test", Method::GET, "/v1/rooms", None, None)
        .await;
    assert_eq!((s, code(&v)), (401, "SW_UNAUTHENTICATED"));
    let (s, v) = net
        .as_user(&alice, Method::GET, "/v1/admin/federation/peers", None)
        .await;
    assert_eq!((s, code(&v)), (403, "SW_FORBIDDEN"));
    let room = net.create_room(&alice, json!({"name": "r"})).await;
    // Each a real FQID of b.test's, broken in one way.
    let b = net.name("b.test");
    for bad in [
        format!("bob@{b}"),
        format!("@Bob:{b}"),
        "@bob:".to_string(),
        format!("@bob:{}", b.to_uppercase()),
    ] {
        let (s, v) = net.post_invitation(&alice, &room, &bad).await;
        assert_eq!((s, code(&v)), (400, "SW_BAD_REQUEST"), "{bad}: {v}");
    }
    // Unknown participant on the peer: its error comes back at once.
    let nobody = net.fqid("nobody", "b.test");
    let (s, v) = net.post_invitation(&alice, &room, &nobody).await;
    assert_eq!((s, code(&v)), (404, "SW_FED_PARTICIPANT_NOT_FOUND"), "{v}");
    // Incognito rooms never federate: 409 with the reason.
    let inc = net
        .create_room(&alice, json!({"name": "secret", "room_type": "incognito"}))
        .await;
    let bob = net.fqid("bob", "b.test");
    let (s, v) = net.post_invitation(&alice, &inc, &bob).await;
    assert_eq!((s, code(&v)), (409, "SW_FED_ROOM_TYPE_FORBIDDEN"), "{v}");
    // Policy: a bad value names the field and changes nothing.
    let (_, before) = net
        .admin("a.test", Method::GET, "/v1/admin/federation/policy", None)
        .await;
    for (patch, field) in [
        (
            json!({"default_mode": "maybe", "allowed_peers": ["x.test"]}),
            "default_mode",
        ),
        (
            json!({"max_backfill_events_per_request": -4}),
            "max_backfill_events_per_request",
        ),
        (json!({"nope": 1}), "nope"),
    ] {
        let (s, v) = net.set_policy("a.test", patch).await;
        assert_eq!((s, code(&v)), (400, "SW_BAD_REQUEST"));
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
    let (_, after) = net
        .admin("a.test", Method::GET, "/v1/admin/federation/policy", None)
        .await;
    assert_eq!(before, after);
    assert_eq!(after["default_mode"], "open");
    // Outbound policy: we never send to a server we would refuse.
    net.set_policy("a.test", json!({"default_mode": "closed"}))
        .await;
    let bob = net.user("b.test", "bob").await;
    let (s, v) = net.post_invitation(&alice, &room, &bob.fqid).await;
    assert_eq!((s, code(&v)), (409, "SW_FED_POLICY_REJECTED"), "{v}");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_refusal_is_not_cached_for_the_transaction() {
    let mut net = testnet::start(&["a.test", "b.test", "c.test"], |_, _| {}).await;
    let (a, c) = (net.name("a.test"), net.name("c.test"));
    net.set_policy(
        "b.test",
        json!({"default_mode": "invite_only", "allowed_peers": [a]}),
    )
    .await;
    // An event of c.test's, relayed by its room's host a.test to b.test:
    // c.test is unknown to b.
    let carol_event = testnet::signed_event(
        net.server("c.test").app(),
        &format!("!RoomHostedOnA000000:{}", net.name("a.test")),
        &net.fqid("carol", "c.test"),
        testnet::message("relayed"),
    );
    let events = vec![carol_event.to_wire_value(Some(5))];
    let (s, v) = net
        .send_events("a.test", "b.test", "same-txn", events.clone())
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["results"][0]["error"]["code"].as_str(),
            v["results"][0]["error"]["retryable"].as_bool()
        ),
        (Some("SW_FED_PEER_UNKNOWN"), Some(true)),
        "{v}"
    );
    // The admin fixes the policy; the same transaction is looked at afresh.
    net.set_policy("b.test", json!({"allowed_peers": [a, c]}))
        .await;
    let (s, v) = net
        .send_events("a.test", "b.test", "same-txn", events)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["results"][0]["error"]["code"], "SW_FED_NOT_MEMBER",
        "a fresh answer, not the cached refusal: {v}"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_api_bodies_are_bounded() {
    let mut net = testnet::start(&["a.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let big = "x".repeat(300 * 1024);
    let (s, v) = net
        .as_user(
            &alice,
            Method::POST,
            "/v1/rooms",
            Some(json!({"name": big})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("SW_BAD_REQUEST")),
        "{v}"
    );
    assert!(net.rooms(&alice).await.is_empty(), "nothing created");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cannot_put_two_events_at_one_seq() {
    let net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    net.post(&alice, &room, json!({"body": "kept"})).await;
    testnet::eventually("b.test holds alice's message", || async {
        bodies(&net, &bob, &room)
            .await
            .iter()
            .any(|m| m.1 == "kept")
    })
    .await;
    let held = bodies(&net, &bob, &room).await;
    let taken = held.iter().find_map(|m| m.0).expect("b.test holds a seq");
    let at = |body: &str, seq: u64| {
        signed_event(
            net.server("a.test").app(),
            &room,
            &alice.fqid,
            message(body),
        )
        .to_wire_value(Some(seq))
    };
    // A seq b.test already stored, and one seq twice in the same transaction.
    let fresh = taken + 50;
    let events = vec![
        at("over a stored one", taken),
        at("first", fresh),
        at("second", fresh),
    ];
    let (s, v) = net
        .send_events("a.test", "b.test", "equivocate", events)
        .await;
    assert_eq!(s, 200, "{v}");
    let statuses: Vec<(&str, &str)> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap(),
                r["error"]["code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("rejected", "SW_FED_BAD_EVENT"),
            ("accepted", ""),
            ("rejected", "SW_FED_BAD_EVENT")
        ],
        "{v}"
    );
    let after = texts(&net, &bob, &room).await;
    assert!(after.contains(&"first".to_string()), "{after:?}");
    assert!(
        !after
            .iter()
            .any(|b| b == "over a stored one" || b == "second"),
        "{after:?}"
    );
}
