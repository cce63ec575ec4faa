//! Calls across servers (SPEC §14): the room host mints every LiveKit
//! token, for its own participants and, on a signed `call-token` request,
//! for a replica's; the tokens are decoded and checked here with the
//! configured secret.

use reqwest::Method;
use scaiwave::config::LivekitConfig;
use serde_json::{json, Value};

use crate::testnet::{self, enc, TestNet, User};

const SECRET: &str = "a-livekit-secret-of-the-test";
const API_KEY: &str = "APItestkey";
const URL: &str = "wss://livekit.a.test";

/// a.test has a LiveKit; b.test has none.
async fn net() -> TestNet {
    testnet::start(&["a.test", "b.test"], |short, c| {
        if short == "a.test" {
            c.livekit = Some(LivekitConfig {
                url: URL.into(),
                api_key: API_KEY.into(),
                api_secret: SECRET.into(),
            });
        }
    })
    .await
}

async fn call(net: &TestNet, u: &User, room: &str) -> (u16, Value) {
    let path = format!("/v1/rooms/{}/call", enc(room));
    net.as_user(u, Method::POST, &path, None).await
}

/// `POST …/rooms/{room}/call-token` `{"fqid"}`, signed by b.test to a.test.
async fn call_token_from_b(net: &TestNet, room: &str, fqid: &str) -> (u16, Value) {
    let path = format!("/_scaiwave/federation/v1/rooms/{}/call-token", enc(room));
    let body = Some(json!({ "fqid": fqid }));
    net.s2s("b.test", "a.test", http::Method::POST, &path, body)
        .await
}

/// The answer is the refusal `status` with error `code`.
fn assert_refused((s, v): &(u16, Value), status: u16, code: &str) {
    assert_eq!(
        (*s, v["error"]["code"].as_str()),
        (status, Some(code)),
        "{v}"
    );
}

/// The token's claims, once its HS256 signature with our secret, its
/// `nbf` and its `exp` check out.
fn claims(answer: &Value) -> Value {
    assert_eq!(answer["url"], URL, "{answer}");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "nbf", "iss", "sub"]);
    validation.set_issuer(&[API_KEY]);
    validation.validate_nbf = true;
    jsonwebtoken::decode::<Value>(
        answer["token"].as_str().unwrap(),
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .expect("a token signed with the configured secret")
    .claims
}

fn assert_grants(c: &Value, fqid: &str, room: &str) {
    assert_eq!(c["sub"], fqid, "{c}");
    let lifetime = c["exp"].as_i64().unwrap() - c["nbf"].as_i64().unwrap();
    assert!(lifetime > 0 && lifetime <= 3600, "{c}");
    assert_eq!(
        c["video"],
        json!({"roomJoin": true, "room": room, "canPublish": true, "canSubscribe": true})
    );
}

#[tokio::test]
async fn the_host_mints_call_tokens_for_its_members_and_a_replicas() {
    let mut net = net().await;
    let alice = net.user("a.test", "alice").await;
    let bob = net.user("b.test", "bob").await;
    let room = net.create_room(&alice, json!({"name": "standup"})).await;
    net.invite_and_join(&alice, &room, &bob).await;

    let (s, v) = call(&net, &alice, &room).await;
    assert_eq!(s, 200, "{v}");
    let c = claims(&v);
    assert_grants(&c, &alice.fqid, &room);
    assert_eq!(c["name"], "ALICE");

    // bob's server asks the host: the same kind of token, for bob, under
    // the name the room shows for him.
    let (s, v) = call(&net, &bob, &room).await;
    assert_eq!(s, 200, "{v}");
    let c = claims(&v);
    assert_grants(&c, &bob.fqid, &room);
    let shown = net.member(&alice, &room, &bob.fqid).await.unwrap();
    assert_eq!(c["name"], shown["display_name"]);
    net.stop_all().await;
}

#[tokio::test]
async fn call_tokens_are_refused_to_non_members_and_to_peers_in_incognito_rooms() {
    let mut net = net().await;
    let alice = net.user("a.test", "alice").await;
    let carol = net.user("a.test", "carol").await;
    let bob = net.user("b.test", "bob").await;
    let room = net.create_room(&alice, json!({"name": "standup"})).await;
    net.invite_and_join(&alice, &room, &bob).await;
    // A participant of ours who has not joined.
    assert_refused(&call(&net, &carol, &room).await, 403, "SW_FED_NOT_MEMBER");
    // A peer asking for one of its participants who has not joined...
    let dave = net.fqid("dave", "b.test");
    let r = call_token_from_b(&net, &room, &dave).await;
    assert_refused(&r, 403, "SW_FED_NOT_MEMBER");
    // ...or for someone else's participant, even a joined one.
    let r = call_token_from_b(&net, &room, &alice.fqid).await;
    assert_refused(&r, 403, "SW_FED_NOT_MEMBER");
    let message = r.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("only for its own"), "{}", r.1);

    // An incognito room never federates: its call is for the host's own
    // participants only.
    let secret = net
        .create_room(&alice, json!({"name": "quiet", "room_type": "incognito"}))
        .await;
    let (s, v) = call(&net, &alice, &secret).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call_token_from_b(&net, &secret, &bob.fqid).await;
    assert_eq!(s, 403, "{v}");
    assert!(v.get("token").is_none(), "{v}");
    net.stop_all().await;
}

#[tokio::test]
async fn a_host_without_livekit_answers_calls_unavailable_to_its_members_and_replicas() {
    let mut net = net().await;
    let bob = net.user("b.test", "bob").await;
    let alice = net.user("a.test", "alice").await;
    let room = net.create_room(&bob, json!({"name": "on b"})).await;
    net.invite_and_join(&bob, &room, &alice).await;
    for u in [&bob, &alice] {
        let r = call(&net, u, &room).await;
        assert_refused(&r, 503, "SW_CALLS_UNAVAILABLE");
        let message = r.1["error"]["message"].as_str().unwrap();
        assert!(message.contains("[livekit]"), "{}", r.1);
    }
    net.stop_all().await;
}
