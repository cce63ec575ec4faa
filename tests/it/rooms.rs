//! The "join a federated room" experience between real servers (SPEC §6):
//! three servers, relays, threads, reactions, kicks, leaves, peer removal,
//! gaps, DMs, search, live events, expiry and limits.

use reqwest::Method;
use serde_json::{json, Value};

use crate::federation::{bodies, shared_room};
use crate::refusals::send_as;
use crate::testnet::{self, enc, eventually, TestNet, User};

async fn messages(net: &TestNet, u: &User, room: &str) -> Vec<Value> {
    let (s, v) = net
        .as_user(
            u,
            Method::GET,
            &format!("/v1/rooms/{}/messages", enc(room)),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    v["messages"].as_array().unwrap().clone()
}

async fn member_ids(net: &TestNet, u: &User, room: &str) -> Vec<String> {
    let (_, v) = net
        .as_user(
            u,
            Method::GET,
            &format!("/v1/rooms/{}/members", enc(room)),
            None,
        )
        .await;
    v["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["fqid"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn invite_and_join(net: &TestNet, host_user: &User, room: &str, guest: &User) {
    let (s, inv) = net
        .as_user(
            host_user,
            Method::POST,
            &format!("/v1/rooms/{}/invitations", enc(room)),
            Some(json!({"fqid": guest.fqid})),
        )
        .await;
    assert_eq!(s, 200, "{inv}");
    let id = inv["invite_id"].as_str().unwrap().to_string();
    eventually("the invitation arrives", || async {
        net.as_user(guest, Method::GET, "/v1/me/invitations", None)
            .await
            .1["invitations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["invite_id"] == id.as_str())
    })
    .await;
    let (s, v) = net
        .as_user(
            guest,
            Method::POST,
            &format!("/v1/me/invitations/{id}/accept"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
}

/// A room on a.test with bob@b.test and carol@c.test joined.
async fn three_server_room(net: &TestNet) -> (User, User, User, String) {
    let (alice, bob, room) = shared_room(net).await;
    let carol = net.user("c.test", "carol").await;
    invite_and_join(net, &alice, &room, &carol).await;
    (alice, bob, carol, room)
}

fn view(m: &Value) -> (Value, Value, Value, Value, Value) {
    (
        m["event_id"].clone(),
        m["seq"].clone(),
        m["body"].clone(),
        m["thread_root"].clone(),
        m["reactions"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_see_the_same_room_and_relays_are_verified() {
    let mut net = testnet::start(&["a.test", "b.test", "c.test"], |_, _| {}).await;
    let (alice, bob, carol, room) = three_server_room(&net).await;
    let path = format!("/v1/rooms/{}/messages", enc(&room));
    let (_, a1) = net
        .as_user(
            &alice,
            Method::POST,
            &path,
            Some(json!({"body": "launch at noon"})),
        )
        .await;
    let a1 = a1["event_id"].as_str().unwrap().to_string();
    net.as_user(
        &bob,
        Method::POST,
        &path,
        Some(json!({"body": "ready", "thread_root": a1, "reply_to": a1})),
    )
    .await;
    net.as_user(
        &carol,
        Method::POST,
        &path,
        Some(json!({"body": "from carol"})),
    )
    .await;
    let reactions = format!("/v1/rooms/{}/reactions", enc(&room));
    net.as_user(
        &carol,
        Method::POST,
        &reactions,
        Some(json!({"target": a1, "key": "👍", "action": "add"})),
    )
    .await;
    net.as_user(
        &bob,
        Method::POST,
        &reactions,
        Some(json!({"target": a1, "key": "👍", "action": "add"})),
    )
    .await;
    net.as_user(
        &bob,
        Method::POST,
        &reactions,
        Some(json!({"target": a1, "key": "🎉", "action": "add"})),
    )
    .await;
    net.as_user(
        &bob,
        Method::POST,
        &reactions,
        Some(json!({"target": a1, "key": "🎉", "action": "remove"})),
    )
    .await;

    let settled = |u: User| {
        let (net, room) = (&net, room.clone());
        async move {
            let m = messages(net, &u, &room).await;
            m.len() == 3
                && m.iter().all(|x| x["state"] == "sent")
                && m[0]["reactions"]["👍"]
                    .as_array()
                    .is_some_and(|r| r.len() == 2)
                && m[0]["reactions"].get("🎉").is_none()
        }
    };
    for u in [&alice, &bob, &carol] {
        eventually("everyone sees the whole room", || settled(u.clone())).await;
    }
    let on_a: Vec<_> = messages(&net, &alice, &room)
        .await
        .iter()
        .map(view)
        .collect();
    for u in [&bob, &carol] {
        let there: Vec<_> = messages(&net, u, &room).await.iter().map(view).collect();
        assert_eq!(
            there, on_a,
            "same events, same order, same threads and reactions on {}",
            u.server
        );
    }
    assert_eq!(on_a[1].3, json!(a1), "bob's reply is in a1's thread");
    // carol's event reached b.test relayed by a.test, and b.test verified it
    // against c.test's own key (it fetched c.test's descriptor to do so).
    let b = net.server("b.test").app().clone();
    assert_eq!(
        b.verifier.protocol_versions(&"c.test".parse().unwrap()),
        ["v1"]
    );

    // a.test forging an event "from" c.test: refused on b.test, not stored.
    let c = net.server("c.test").app().clone();
    let a = net.server("a.test").app().clone();
    let forged = {
        let a_key = a.keys.current().unwrap();
        let ev = scaiwave::federation::event::Event::create(
            scaiwave::ids::RoomId::parse(&room).unwrap(),
            scaiwave::ids::Fqid::parse(&carol.fqid).unwrap(),
            a.clock.now_ms(),
            scaiwave::federation::event::Content::Message {
                body: "forged by a".into(),
                thread_root: None,
                reply_to: None,
                mentions: vec![],
            },
            // a.test signs, but the signature claims to be c.test's key.
            &c.keys.current().unwrap().key_id,
            &a_key.signing,
        );
        ev.to_wire_value(Some(900))
    };
    let (s, v) = send_as(
        &net,
        "a.test",
        "b.test",
        json!({"txn_id": "forge", "events": [forged], "edus": []}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["results"][0]["error"]["code"], "SW_FED_SIGNATURE_MISMATCH",
        "{v}"
    );
    assert!(!bodies(&net, &bob, &room)
        .await
        .iter()
        .any(|m| m.1 == "forged by a"));
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_leave_and_peer_removal_propagate() {
    let mut net = testnet::start(&["a.test", "b.test", "c.test"], |_, _| {}).await;
    let (alice, bob, carol, room) = three_server_room(&net).await;
    let dave = net.user("c.test", "dave").await;
    invite_and_join(&net, &alice, &room, &dave).await;
    for u in [&bob, &carol] {
        eventually("everyone sees dave", || async {
            member_ids(&net, u, &room).await.contains(&dave.fqid)
        })
        .await;
    }

    // A kick by the room's creator reaches every side.
    let (s, v) = net
        .as_user(
            &alice,
            Method::POST,
            &format!("/v1/rooms/{}/kick", enc(&room)),
            Some(json!({"fqid": carol.fqid})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    eventually("b sees carol gone", || async {
        !member_ids(&net, &bob, &room).await.contains(&carol.fqid)
    })
    .await;
    eventually("carol's room list drops the room", || async {
        net.as_user(&carol, Method::GET, "/v1/rooms", None).await.1["rooms"]
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    // Only the host's room admins kick: bob (a member on a replica) cannot.
    let (s, _) = net
        .as_user(
            &bob,
            Method::POST,
            &format!("/v1/rooms/{}/kick", enc(&room)),
            Some(json!({"fqid": dave.fqid})),
        )
        .await;
    assert_eq!(s, 403);
    // A kicked participant's messages are refused by the host.
    let (s, _) = net
        .as_user(
            &carol,
            Method::POST,
            &format!("/v1/rooms/{}/messages", enc(&room)),
            Some(json!({"body": "still here?"})),
        )
        .await;
    assert_eq!(
        s, 404,
        "carol is no longer a member on her own server either"
    );

    // bob leaves: gone on a and c, and from his own room list.
    let (s, v) = net
        .as_user(
            &bob,
            Method::POST,
            &format!("/v1/rooms/{}/leave", enc(&room)),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    eventually("a sees bob gone", || async {
        !member_ids(&net, &alice, &room).await.contains(&bob.fqid)
    })
    .await;
    eventually("c sees bob gone", || async {
        !member_ids(&net, &dave, &room).await.contains(&bob.fqid)
    })
    .await;
    assert!(
        net.as_user(&bob, Method::GET, "/v1/rooms", None).await.1["rooms"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Removing c.test on a.test kicks dave everywhere and stops traffic.
    let (s, v) = net
        .admin(
            "a.test",
            Method::DELETE,
            "/v1/admin/federation/peers/c.test",
            None,
        )
        .await;
    assert_eq!((s, v["kicked"].as_u64()), (200, Some(1)), "{v}");
    assert!(!member_ids(&net, &alice, &room).await.contains(&dave.fqid));
    let (_, policy) = net
        .admin("a.test", Method::GET, "/v1/admin/federation/policy", None)
        .await;
    assert_eq!(policy["denied_peers"], json!(["c.test"]));
    net.as_user(
        &alice,
        Method::POST,
        &format!("/v1/rooms/{}/messages", enc(&room)),
        Some(json!({"body": "after removal"})),
    )
    .await;
    let (_, peers) = net
        .admin("a.test", Method::GET, "/v1/admin/federation/peers", None)
        .await;
    assert!(
        !peers["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["server_name"] == "c.test" && p["queue_depth"].as_u64() > Some(0)),
        "{peers}"
    );
    let (s, v) = send_as(
        &net,
        "c.test",
        "a.test",
        json!({"txn_id": "still-there", "events": [], "edus": []}),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("SW_FED_POLICY_REJECTED")),
        "{v}"
    );
    let (_, audit) = net
        .admin(
            "a.test",
            Method::GET,
            "/v1/admin/audit?action=federation.peer.*",
            None,
        )
        .await;
    assert_eq!(audit["rows"][0]["peer"], "c.test", "{audit}");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_fills_gaps_from_the_host() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    let path = format!("/v1/rooms/{}/messages", enc(&room));
    net.server_mut("b.test").stop().await;
    for i in 0..5 {
        net.as_user(
            &alice,
            Method::POST,
            &path,
            Some(json!({"body": format!("missed {i}")})),
        )
        .await;
    }
    // Those deliveries are lost (as after a 24 h give-up).
    let a = net.server("a.test").app().clone();
    let outbox = scaiwave::storage::prefix("b.test");
    let mut end = outbox.clone();
    end.push(0xff);
    assert_eq!(
        a.store
            .remove_range(scaiwave::storage::T::Outbox, &outbox, &end)
            .unwrap(),
        5
    );
    net.server_mut("b.test").restart().await;
    net.as_user(
        &alice,
        Method::POST,
        &path,
        Some(json!({"body": "after the gap"})),
    )
    .await;
    eventually("b fills the gap from a's backfill", || async {
        bodies(&net, &bob, &room).await.len() == 6
    })
    .await;
    let on_b: Vec<String> = bodies(&net, &bob, &room)
        .await
        .into_iter()
        .map(|m| m.1)
        .collect();
    assert_eq!(
        on_b,
        [
            "missed 0",
            "missed 1",
            "missed 2",
            "missed 3",
            "missed 4",
            "after the gap"
        ]
    );
    // The admin backfill verifies and finds nothing new to store.
    let (s, v) = net
        .admin(
            "b.test",
            Method::POST,
            &format!("/v1/admin/rooms/{}/federation/backfill", enc(&room)),
            None,
        )
        .await;
    assert_eq!(
        (s, v["stored"].as_u64(), v["rejected"].as_u64()),
        (200, Some(0), Some(0)),
        "{v}"
    );
    // A host that serves no history answers with its error, 0 events.
    net.admin(
        "a.test",
        Method::PUT,
        "/v1/admin/federation/policy",
        Some(json!({"max_backfill_events_per_request": 0})),
    )
    .await;
    let (s, v) = net
        .admin(
            "b.test",
            Method::POST,
            &format!("/v1/admin/rooms/{}/federation/backfill", enc(&room)),
            None,
        )
        .await;
    assert_eq!(
        (s, v["fetched"].as_u64(), v["remote_error"]["code"].as_str()),
        (200, Some(0), Some("SW_FED_BACKFILL_REFUSED")),
        "{v}"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_dm_search_and_live_events() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let bob = net.user("b.test", "bob").await;
    // The seed's DM flow, idempotent.
    let (s, dm) = net
        .as_user(
            &alice,
            Method::POST,
            "/v1/me/federated-dms",
            Some(json!({"fqid": bob.fqid})),
        )
        .await;
    assert_eq!(
        (s, dm["room_type"].as_str(), dm["federated"].as_bool()),
        (200, Some("dm"), Some(true)),
        "{dm}"
    );
    let (_, again) = net
        .as_user(
            &alice,
            Method::POST,
            "/v1/me/federated-dms",
            Some(json!({"fqid": bob.fqid})),
        )
        .await;
    assert_eq!(
        again["room_id"], dm["room_id"],
        "asking again returns the same room"
    );
    let room = dm["room_id"].as_str().unwrap().to_string();
    let mut invite = String::new();
    eventually("bob is invited", || async {
        let (_, v) = net
            .as_user(&bob, Method::GET, "/v1/me/invitations", None)
            .await;
        v["invitations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["room_id"] == room.as_str())
    })
    .await;
    let (_, v) = net
        .as_user(&bob, Method::GET, "/v1/me/invitations", None)
        .await;
    invite.push_str(v["invitations"][0]["invite_id"].as_str().unwrap());
    let (s, _) = net
        .as_user(
            &bob,
            Method::POST,
            &format!("/v1/me/invitations/{invite}/accept"),
            None,
        )
        .await;
    assert_eq!(s, 200);

    // Alice listens for live events, then bob writes.
    let stream = net
        .http
        .get("https://a.test/v1/events")
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let path = format!("/v1/rooms/{}/messages", enc(&room));
    net.as_user(
        &bob,
        Method::POST,
        &path,
        Some(json!({"body": "The zeppelin departs at dawn"})),
    )
    .await;
    let mut stream = stream;
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !seen.contains("zeppelin") {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .expect("a live event in time")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        seen.contains("event:sw.event") || seen.contains("event: sw.event"),
        "{seen}"
    );

    // Search finds the foreign message by a word in it, on the receiving side.
    eventually("a stored bob's message", || async {
        bodies(&net, &alice, &room)
            .await
            .iter()
            .any(|m| m.1.contains("zeppelin"))
    })
    .await;
    let (s, v) = net
        .as_user(&alice, Method::GET, "/v1/search?q=ZEPPELIN%20dawn", None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["results"][0]["body"], "The zeppelin departs at dawn",
        "{v}"
    );
    assert_eq!(v["results"][0]["sender"], bob.fqid.as_str());
    // Only within the caller's rooms.
    let eve = net.user("a.test", "eve").await;
    let (_, v) = net
        .as_user(&eve, Method::GET, "/v1/search?q=zeppelin", None)
        .await;
    assert_eq!(v["results"], json!([]));
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_invitations_and_the_foreign_limit() {
    let mut net = testnet::start(&["a.test", "b.test", "c.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let bob = net.user("b.test", "bob").await;
    let carol = net.user("c.test", "carol").await;
    let (_, room) = net
        .as_user(
            &alice,
            Method::POST,
            "/v1/rooms",
            Some(json!({"name": "limited"})),
        )
        .await;
    let room = room["room_id"].as_str().unwrap().to_string();
    let (_, inv) = net
        .as_user(
            &alice,
            Method::POST,
            &format!("/v1/rooms/{}/invitations", enc(&room)),
            Some(json!({"fqid": bob.fqid})),
        )
        .await;
    let invite = inv["invite_id"].as_str().unwrap().to_string();
    eventually("bob is invited", || async {
        !net.as_user(&bob, Method::GET, "/v1/me/invitations", None)
            .await
            .1["invitations"]
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;

    // invite_ttl later (both clocks move: skew stays within bounds).
    let ttl = net.server("a.test").app().config.federation.invite_ttl;
    for server in ["a.test", "b.test", "c.test"] {
        net.server(server).app().clock.advance(ttl);
    }
    // The invitee's side: the invitation is gone from the panel and refused.
    assert!(net
        .as_user(&bob, Method::GET, "/v1/me/invitations", None)
        .await
        .1["invitations"]
        .as_array()
        .unwrap()
        .is_empty());
    let (s, v) = net
        .as_user(
            &bob,
            Method::POST,
            &format!("/v1/me/invitations/{invite}/accept"),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (410, Some("SW_FED_INVITE_EXPIRED")),
        "{v}"
    );
    // The host's side: a join that arrives anyway is refused by its own clock.
    let b = net.server("b.test").app().clone();
    let key = b.keys.current().unwrap();
    let bob_id = scaiwave::ids::Fqid::parse(&bob.fqid).unwrap();
    let join = scaiwave::federation::event::Event::create(
        scaiwave::ids::RoomId::parse(&room).unwrap(),
        bob_id.clone(),
        b.clock.now_ms(),
        scaiwave::federation::event::Content::Member {
            membership: scaiwave::federation::event::Membership::Join,
            target: bob_id,
            expires_at_ms: None,
            room: None,
        },
        &key.key_id,
        &key.signing,
    );
    let (s, v) = send_as(
        &net,
        "b.test",
        "a.test",
        json!({"txn_id": "late-join", "events": [join.to_wire_value(None)], "edus": []}),
    )
    .await;
    assert_eq!(
        (s, v["results"][0]["error"]["code"].as_str()),
        (200, Some("SW_FED_INVITE_EXPIRED")),
        "{v}"
    );
    assert!(!member_ids(&net, &alice, &room).await.contains(&bob.fqid));
    assert!(
        net.as_user(&bob, Method::GET, "/v1/rooms", None).await.1["rooms"]
            .as_array()
            .unwrap()
            .is_empty(),
        "no room on b"
    );

    // The foreign limit counts joined and invited foreign participants.
    net.admin(
        "a.test",
        Method::PUT,
        "/v1/admin/federation/policy",
        Some(json!({"max_foreign_participants_per_room": 1})),
    )
    .await;
    let (_, fresh) = net
        .as_user(
            &alice,
            Method::POST,
            "/v1/rooms",
            Some(json!({"name": "small"})),
        )
        .await;
    let fresh = fresh["room_id"].as_str().unwrap().to_string();
    let (s, _) = net
        .as_user(
            &alice,
            Method::POST,
            &format!("/v1/rooms/{}/invitations", enc(&fresh)),
            Some(json!({"fqid": bob.fqid})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = net
        .as_user(
            &alice,
            Method::POST,
            &format!("/v1/rooms/{}/invitations", enc(&fresh)),
            Some(json!({"fqid": carol.fqid})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("SW_FED_FOREIGN_LIMIT")),
        "{v}"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_invite_and_policy_covers_relayed_content() {
    let mut net = testnet::start(&["a.test", "b.test", "c.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    let carol = net.user("c.test", "carol").await;
    // bob (on a replica) invites carol: the host checks, sequences and delivers it.
    invite_and_join(&net, &bob, &room, &carol).await;
    eventually("the host lists carol", || async {
        member_ids(&net, &alice, &room).await.contains(&carol.fqid)
    })
    .await;

    // Mentions travel with the message.
    let path = format!("/v1/rooms/{}/messages", enc(&room));
    net.as_user(
        &bob,
        Method::POST,
        &path,
        Some(json!({"body": "hi @carol", "mentions": [carol.fqid]})),
    )
    .await;
    eventually("a has bob's mention", || async {
        messages(&net, &alice, &room)
            .await
            .iter()
            .any(|m| m["mentions"] == json!([carol.fqid]))
    })
    .await;

    // b.test refuses c.test: carol's messages relayed by a.test are refused on b only.
    net.admin(
        "b.test",
        Method::PUT,
        "/v1/admin/federation/policy",
        Some(json!({"denied_peers": ["c.test"]})),
    )
    .await;
    net.as_user(
        &carol,
        Method::POST,
        &path,
        Some(json!({"body": "from a denied server"})),
    )
    .await;
    eventually("a has carol's message", || async {
        bodies(&net, &alice, &room)
            .await
            .iter()
            .any(|m| m.1 == "from a denied server")
    })
    .await;
    eventually("b audited the refusal", || async {
        let (_, audit) = net
            .admin(
                "b.test",
                Method::GET,
                "/v1/admin/audit?action=federation.policy_rejected",
                None,
            )
            .await;
        audit["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["peer"] == "c.test")
    })
    .await;
    assert!(!bodies(&net, &bob, &room)
        .await
        .iter()
        .any(|m| m.1 == "from a denied server"));

    // Room state is served only to participating servers.
    let (_, other) = net
        .as_user(
            &alice,
            Method::POST,
            "/v1/rooms",
            Some(json!({"name": "a only"})),
        )
        .await;
    let other = other["room_id"].as_str().unwrap().to_string();
    let members_path = format!("/_scaiwave/federation/v1/rooms/{}/members", enc(&other));
    let (s, v) = crate::refusals::s2s(
        &net,
        "c.test",
        "a.test",
        http::Method::GET,
        &members_path,
        None,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("SW_FED_NOT_MEMBER")),
        "{v}"
    );
    let (s, v) = crate::refusals::s2s(
        &net,
        "c.test",
        "b.test",
        http::Method::GET,
        &format!("/_scaiwave/federation/v1/rooms/{}/backfill", enc(&room)),
        None,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("SW_FED_POLICY_REJECTED")),
        "{v}"
    );

    // Incognito rooms refuse federation traffic with their own code.
    let (_, inc) = net
        .as_user(
            &alice,
            Method::POST,
            "/v1/rooms",
            Some(json!({"name": "secret", "room_type": "incognito"})),
        )
        .await;
    let b = net.server("b.test").app().clone();
    let key = b.keys.current().unwrap();
    let ev = scaiwave::federation::event::Event::create(
        scaiwave::ids::RoomId::parse(inc["room_id"].as_str().unwrap()).unwrap(),
        scaiwave::ids::Fqid::parse(&bob.fqid).unwrap(),
        b.clock.now_ms(),
        scaiwave::federation::event::Content::Message {
            body: "let me in".into(),
            thread_root: None,
            reply_to: None,
            mentions: vec![],
        },
        &key.key_id,
        &key.signing,
    );
    let (s, v) = send_as(
        &net,
        "b.test",
        "a.test",
        json!({"txn_id": "incognito", "events": [ev.to_wire_value(None)], "edus": []}),
    )
    .await;
    assert_eq!(
        (s, v["results"][0]["error"]["code"].as_str()),
        (200, Some("SW_FED_ROOM_TYPE_FORBIDDEN")),
        "{v}"
    );

    // An admin refreshes a foreign participant's profile (and its server's keys).
    let (s, v) = net
        .admin(
            "b.test",
            Method::POST,
            &format!("/v1/admin/federation/foreign/{}/refresh", enc(&alice.fqid)),
            None,
        )
        .await;
    assert_eq!((s, v["display_name"].as_str()), (200, Some("ALICE")), "{v}");
    net.stop_all().await;
}
