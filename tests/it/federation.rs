//! Two real servers share a room: invite, accept, messages both ways in
//! host order, and replays answered `duplicate`.

use reqwest::Method;
use serde_json::{json, Value};

use crate::testnet::{self, enc, eventually, TestNet, User};

pub async fn bodies(net: &TestNet, u: &User, room: &str) -> Vec<(Option<u64>, String, String)> {
    net.messages(u, room)
        .await
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64(),
                m["body"].as_str().unwrap().to_string(),
                m["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The bodies of the messages `u` sees in `room`, in order.
pub async fn texts(net: &TestNet, u: &User, room: &str) -> Vec<String> {
    bodies(net, u, room)
        .await
        .into_iter()
        .map(|m| m.1)
        .collect()
}

/// alice@a.test hosts a room; bob@b.test is invited and joins.
pub async fn shared_room(net: &TestNet) -> (User, User, String) {
    let alice = net.user("a.test", "alice").await;
    let bob = net.user("b.test", "bob").await;
    let room_id = net
        .create_room(&alice, json!({"name": "Launch", "room_type": "standard"}))
        .await;
    let invite_id = net.invite(&alice, &room_id, &bob).await;
    let invitations = net.invitations(&bob).await;
    let invitation = &invitations[0];
    assert_eq!(
        (
            invitation["invite_id"].as_str(),
            invitation["room_id"].as_str(),
            invitation["room"]["name"].as_str()
        ),
        (
            Some(invite_id.as_str()),
            Some(room_id.as_str()),
            Some("Launch")
        ),
        "{invitation}"
    );
    let (s, v) = net.accept(&bob, &invite_id).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("joined")), "{v}");
    (alice, bob, room_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_a_room_in_host_order() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;

    // Bob sees the room with the 🌐 badge and both members.
    let rooms = net.rooms(&bob).await;
    assert_eq!(rooms[0]["room_id"], room.as_str());
    assert_eq!(rooms[0]["federated"], true);
    let bob_row = net
        .member(&alice, &room, &bob.fqid)
        .await
        .expect("bob is listed");
    assert_eq!(
        (
            bob_row["foreign"].clone(),
            bob_row["membership"].clone(),
            bob_row["display_name"].clone()
        ),
        (json!(true), json!("join"), json!("BOB"))
    );

    // Messages both ways, interleaved.
    for i in 0..3 {
        let (s, v) = net
            .post(&alice, &room, json!({"body": format!("a{i}")}))
            .await;
        assert_eq!((s, v["state"].as_str()), (200, Some("sent")), "{v}");
        let (s, v) = net
            .post(&bob, &room, json!({"body": format!("b{i}")}))
            .await;
        assert_eq!((s, v["state"].as_str()), (200, Some("pending")), "{v}");
    }
    let want =
        |v: &Vec<(Option<u64>, String, String)>| v.iter().filter(|m| m.2 == "sent").count() == 6;
    eventually("both sides hold all six messages", || async {
        want(&bodies(&net, &alice, &room).await) && want(&bodies(&net, &bob, &room).await)
    })
    .await;
    let on_a = bodies(&net, &alice, &room).await;
    let on_b = bodies(&net, &bob, &room).await;
    assert_eq!(
        on_a, on_b,
        "both sides show the same messages in the same host order"
    );
    let seqs: Vec<u64> = on_a.iter().map(|m| m.0.unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "host order: {seqs:?}");
    let a_order: Vec<&str> = on_a
        .iter()
        .map(|m| m.1.as_str())
        .filter(|b| b.starts_with('a'))
        .collect();
    assert_eq!(a_order, ["a0", "a1", "a2"]);

    // A replay of one of alice's events to b.test is `duplicate` and stores nothing.
    let (s, backfill) = net
        .s2s_get(
            "a.test",
            "b.test",
            &format!("/_scaiwave/federation/v1/rooms/{}/backfill", enc(&room)),
        )
        .await;
    assert_eq!(s, 403, "only the host serves backfill: {backfill}");
    assert_eq!(backfill["error"]["code"], "SW_FED_NOT_ROOM_HOST");
    let events = net.host_events("a.test", "b.test", &room).await;
    let replay: Vec<Value> = events
        .iter()
        .filter(|e| e["content"]["body"] == "a1")
        .cloned()
        .collect();
    assert_eq!(replay.len(), 1);
    let (s, answer) = net
        .send_events("a.test", "b.test", "replay-1", replay)
        .await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(answer["results"][0]["status"], "duplicate", "{answer}");
    assert_eq!(
        bodies(&net, &bob, &room).await,
        on_b,
        "nothing stored twice"
    );

    // Peer rows show traffic both ways.
    let row = net.peer_row("a.test", "b.test").await;
    assert!(row["events_sent_24h"].as_u64().unwrap() >= 3, "{row}");
    assert!(row["events_received_24h"].as_u64().unwrap() >= 3, "{row}");
    assert_eq!(row["status"], "ok");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiner_backfills_history_and_members() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let carol = net.user("a.test", "carol").await;
    let bob = net.user("b.test", "bob").await;
    let room = net.create_room(&alice, json!({"name": "History"})).await;
    // A local invite and join, and history before bob arrives.
    net.invite_and_join(&alice, &room, &carol).await;
    for b in ["early-1", "early-2"] {
        net.post(&carol, &room, json!({"body": b})).await;
    }
    net.invite_and_join(&alice, &room, &bob).await;
    let seen: Vec<String> = texts(&net, &bob, &room).await;
    assert_eq!(
        seen,
        ["early-1", "early-2"],
        "bob sees the history from before his join"
    );
    let names = net.member_ids(&bob, &room).await;
    for who in [&alice.fqid, &carol.fqid, &bob.fqid] {
        assert!(names.contains(who), "{who} in {names:?}");
    }
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_is_seen_from_the_other_side() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    let count = |n: usize| {
        let (net, bob, room) = (&net, &bob, &room);
        move || async move { bodies(net, bob, room).await.len() == n }
    };
    net.post(&alice, &room, json!({"body": "before rotation"}))
        .await;
    eventually("first message reaches b", count(1)).await;

    let a = net.server("a.test").app().clone();
    let old = a.first.fed.keys.current().unwrap().key_id;
    a.first.fed.rotate(false).unwrap();
    assert_ne!(a.first.fed.keys.current().unwrap().key_id, old);
    net.post(&alice, &room, json!({"body": "after rotation"}))
        .await;
    eventually(
        "a message signed with the new key is verified on b",
        count(2),
    )
    .await;

    // History signed with the old key still verifies (backfill re-verifies every event).
    let (s, v) = net.admin_backfill("b.test", &room).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["rejected"], 0, "{v}");
    assert!(v["fetched"].as_u64().unwrap() >= 3, "{v}");
    assert_eq!(v["stored"], 0, "nothing new: b had it all");
    let audit = net.audit("a.test", "action=federation.key.*").await;
    assert_eq!(
        audit["rows"][0]["action"], "federation.key.rotated",
        "{audit}"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_and_refused_events_end_in_failed_state() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    let dave = net.user("b.test", "dave").await;

    // dave declines: the invitation is gone on both sides.
    let invite_id = net.invite(&alice, &room, &dave).await;
    let (s, v) = net.decline(&dave, &invite_id).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("declined")), "{v}");
    assert!(net.invitations(&dave).await.is_empty());
    let dave_row = net.member(&alice, &room, &dave.fqid).await;
    assert!(dave_row.is_none(), "{dave_row:?}");
    // Accepting a declined invitation is refused.
    let (s, _) = net.accept(&dave, &invite_id).await;
    assert_eq!(s, 404);

    // The host turns federation off for the room: bob's next message is refused
    // for good, marked failed, and audited; nothing is retried.
    let (s, v) = net
        .admin(
            "a.test",
            Method::PUT,
            &format!("/v1/admin/rooms/{}/federate", enc(&room)),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, posted) = net
        .post(&bob, &room, json!({"body": "into the void"}))
        .await;
    eventually("bob's message is marked failed", || async {
        bodies(&net, &bob, &room)
            .await
            .iter()
            .any(|m| m.1 == "into the void" && m.2 == "failed")
    })
    .await;
    let audit = net.audit("b.test", "action=federation.send.failed").await;
    let row = &audit["rows"][0];
    assert_eq!(
        (row["event_id"].as_str(), row["code"].as_str()),
        (
            posted["event_id"].as_str(),
            Some("SW_FED_ROOM_NOT_FEDERATED")
        ),
        "{audit}"
    );
    let a_row = net.peer_row("b.test", "a.test").await;
    assert_eq!(a_row["queue_depth"], 0, "{a_row}");
    assert_eq!(
        a_row["last_error"]["code"], "SW_FED_ROOM_NOT_FEDERATED",
        "{a_row}"
    );
    assert!(!bodies(&net, &alice, &room)
        .await
        .iter()
        .any(|m| m.1 == "into the void"));
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_federation_disabled_refuses_both_ways() {
    let mut net = testnet::start(&["a.test", "b.test"], |name, c| {
        c.federation.enabled = name != "b.test"
    })
    .await;
    let (s, v) = net.send_events("a.test", "b.test", "t", vec![]).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("SW_FED_TENANT_DISABLED")),
        "{v}"
    );
    let bob = net.user("b.test", "bob").await;
    let room = net.create_room(&bob, json!({"name": "local only"})).await;
    let alice = net.fqid("alice", "a.test");
    let (s, v) = net.post_invitation(&bob, &room, &alice).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("SW_FED_TENANT_DISABLED")),
        "{v}"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_travels_both_ways_and_the_newest_wins() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    let carol = net.user("b.test", "carol").await;
    let presence_of = |viewer: User, who: String| {
        let (net, room) = (&net, room.clone());
        async move {
            net.member(&viewer, &room, &who)
                .await
                .map(|m| m["presence"].clone())
                .unwrap_or(Value::Null)
        }
    };
    let (s, _) = net
        .as_user(
            &alice,
            Method::PUT,
            "/v1/me/presence",
            Some(json!({"status": "dnd", "status_msg": "launching"})),
        )
        .await;
    assert_eq!(s, 200);
    eventually("bob sees alice's presence", || async {
        presence_of(bob.clone(), alice.fqid.clone()).await["status"] == "dnd"
    })
    .await;
    assert_eq!(
        presence_of(bob.clone(), alice.fqid.clone()).await["status_msg"],
        "launching"
    );
    net.as_user(
        &bob,
        Method::PUT,
        "/v1/me/presence",
        Some(json!({"status": "idle"})),
    )
    .await;
    eventually("alice sees bob's presence", || async {
        presence_of(alice.clone(), bob.fqid.clone()).await["status"] == "idle"
    })
    .await;

    // Older or foreign EDUs change nothing.
    let stale = json!({"type": "sw.presence", "sender": alice.fqid, "ts": 1, "content": {"status": "offline"}});
    let foreign = json!({"type": "sw.presence", "sender": carol.fqid, "ts": 4_000_000_000_000i64, "content": {"status": "offline"}});
    let (s, _) = net
        .send_as(
            "a.test",
            "b.test",
            json!({"txn_id": "edus", "events": [], "edus": [stale, foreign]}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        presence_of(bob.clone(), alice.fqid.clone()).await["status"],
        "dnd"
    );

    // The profile carries presence only for servers that share a room.
    let (s, p) = net
        .s2s_get("a.test", "b.test", "/_scaiwave/federation/v1/profile/bob")
        .await;
    assert_eq!(
        (s, p["presence"]["status"].as_str()),
        (200, Some("idle")),
        "{p}"
    );
    let (s, p) = net
        .s2s_get("a.test", "b.test", "/_scaiwave/federation/v1/profile/carol")
        .await;
    assert_eq!((s, p["presence"].clone()), (200, Value::Null), "{p}");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_answering_5xx_and_429_is_retried_until_it_recovers() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    // b.test goes away; something at its address answers 500, then 429.
    net.server_mut("b.test").stop().await;
    let addr = net.server("b.test").addr;
    let (hits, stop) = testnet::scripted_peer(
        &net.ca,
        net.server("b.test").name.host(),
        addr,
        vec![(500, None), (429, Some(1)), (503, None)],
    )
    .await;
    for i in 0..3 {
        net.post(&alice, &room, json!({"body": format!("while down {i}")}))
            .await;
    }
    eventually("a.test retried several times", || async {
        hits.load(std::sync::atomic::Ordering::SeqCst) >= 3
    })
    .await;
    let row = net.peer_row("a.test", "b.test").await;
    assert_eq!(row["queue_depth"], 3, "{row}");
    assert_eq!(row["status"], "backoff", "{row}");
    assert!(row["next_retry_at"].is_string(), "{row}");
    assert!(
        row["last_error"]["code"]
            .as_str()
            .unwrap()
            .starts_with("http_")
            || row["last_error"]["code"] == "SW_FED_RATE_LIMITED",
        "{row}"
    );
    // The real b.test comes back: everything arrives once, in order.
    stop.send(()).unwrap();
    net.server_mut("b.test").restart().await;
    // Inbound traffic from b wakes a's queue at once.
    net.send_events("b.test", "a.test", "hello-again", vec![])
        .await;
    eventually("queued messages reach b", || async {
        bodies(&net, &bob, &room).await.len() == 3
    })
    .await;
    let got: Vec<String> = texts(&net, &bob, &room).await;
    assert_eq!(got, ["while down 0", "while down 1", "while down 2"]);
    net.stop_all().await;
}
