//! The "join a federated room" experience between real servers (SPEC §6):
//! three servers, relays, threads, reactions, kicks, leaves, peer removal,
//! gaps, DMs, search, live events, expiry and limits.

use reqwest::Method;
use scaiwave::protocol::event::{Content, Membership};
use serde_json::{json, Value};

use crate::federation::{bodies, shared_room, texts};
use crate::testnet::{
    self, enc, eventually, message, signed_event, signed_event_with, TestNet, User,
};

/// A room on a.test with bob@b.test and carol@c.test joined.
async fn three_server_room(net: &TestNet) -> (User, User, User, String) {
    let (alice, bob, room) = shared_room(net).await;
    let carol = net.user("c.test", "carol").await;
    net.invite_and_join(&alice, &room, &carol).await;
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
    let (_, a1) = net
        .post(&alice, &room, json!({"body": "launch at noon"}))
        .await;
    let a1 = a1["event_id"].as_str().unwrap().to_string();
    net.post(
        &bob,
        &room,
        json!({"body": "ready", "thread_root": a1, "reply_to": a1}),
    )
    .await;
    net.post(&carol, &room, json!({"body": "from carol"})).await;
    net.react(&carol, &room, &a1, "👍", "add").await;
    net.react(&bob, &room, &a1, "👍", "add").await;
    net.react(&bob, &room, &a1, "🎉", "add").await;
    let (_, last) = net.react(&bob, &room, &a1, "🎉", "remove").await;
    // Until the host has sequenced bob's last reaction, a view without 🎉
    // may only mean the add has not arrived yet.
    let (b_app, last) = (net.server("b.test").app().clone(), last["event_id"].clone());
    let room_id = scaiwave::ids::RoomId::parse(&room).unwrap();
    eventually("the host sequenced bob's last reaction", || async {
        let id = last.as_str().unwrap();
        scaiwave::rooms::views::pending_state(&b_app.first.rooms, &room_id, id).unwrap()
            != Some(scaiwave::storage::DeliveryState::Pending)
    })
    .await;

    let settled = |u: User| {
        let (net, room) = (&net, room.clone());
        async move {
            let m = net.messages(&u, &room).await;
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
    // The host's view is final now; the replicas converge on it.
    let on_a: Vec<_> = net.messages(&alice, &room).await.iter().map(view).collect();
    for u in [&bob, &carol] {
        let what = format!("{} shows what the host shows", u.server);
        eventually(&what, || async {
            let there: Vec<_> = net.messages(u, &room).await.iter().map(view).collect();
            there == on_a
        })
        .await;
        let there: Vec<_> = net.messages(u, &room).await.iter().map(view).collect();
        assert_eq!(
            there, on_a,
            "same events, same order, same threads and reactions on {}",
            u.server
        );
    }
    // A page of one message still carries its reactions, which come later
    // in the room (a page reads only its own rows, reactions by target).
    let path = format!("/v1/rooms/{}/messages?after_seq=0&limit=1", enc(&room));
    let (s, page) = net.as_user(&alice, Method::GET, &path, None).await;
    assert_eq!(s, 200, "{page}");
    let page = page["messages"].as_array().unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(view(&page[0]), on_a[0]);
    assert_eq!(page[0]["reactions"]["👍"].as_array().unwrap().len(), 2);
    // bob's and carol's messages race to the host; find bob's by its body.
    let reply = on_a
        .iter()
        .find(|m| m.2 == json!("ready"))
        .expect("bob's reply");
    assert_eq!(reply.3, json!(a1), "bob's reply is in a1's thread");
    // carol's event reached b.test relayed by a.test, and b.test verified it
    // against c.test's own key (it fetched c.test's descriptor to do so).
    let b = net.server("b.test").app().clone();
    assert_eq!(
        b.first
            .fed
            .verifier
            .protocol_versions(&net.server("c.test").name),
        ["v1"]
    );

    // a.test forging an event "from" c.test: refused on b.test, not stored.
    let c = net.server("c.test").app().clone();
    let a = net.server("a.test").app().clone();
    let forged = signed_event_with(
        &a,
        &room,
        &carol.fqid,
        message("forged by a"),
        // a.test signs, but the signature claims to be c.test's key.
        &c.first.fed.keys.current().unwrap().key_id,
        &a.first.fed.keys.current().unwrap().signing,
    )
    .to_wire_value(Some(900));
    let (s, v) = net
        .send_events("a.test", "b.test", "forge", vec![forged])
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
    net.invite_and_join(&alice, &room, &dave).await;
    for u in [&bob, &carol] {
        eventually("everyone sees dave", || async {
            net.member_ids(u, &room).await.contains(&dave.fqid)
        })
        .await;
    }

    // A kick by the room's creator reaches every side.
    let kick = format!("/v1/rooms/{}/kick", enc(&room));
    let (s, v) = net
        .as_user(
            &alice,
            Method::POST,
            &kick,
            Some(json!({"fqid": carol.fqid})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    eventually("b sees carol gone", || async {
        !net.member_ids(&bob, &room).await.contains(&carol.fqid)
    })
    .await;
    eventually("carol's room list drops the room", || async {
        net.rooms(&carol).await.is_empty()
    })
    .await;
    // Only the host's room admins kick: bob (a member on a replica) cannot.
    let (s, _) = net
        .as_user(&bob, Method::POST, &kick, Some(json!({"fqid": dave.fqid})))
        .await;
    assert_eq!(s, 403);
    // A kicked participant's messages are refused by the host.
    let (s, _) = net
        .post(&carol, &room, json!({"body": "still here?"}))
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
        !net.member_ids(&alice, &room).await.contains(&bob.fqid)
    })
    .await;
    eventually("c sees bob gone", || async {
        !net.member_ids(&dave, &room).await.contains(&bob.fqid)
    })
    .await;
    assert!(net.rooms(&bob).await.is_empty());

    // Removing c.test on a.test kicks dave everywhere and stops traffic.
    let c = net.name("c.test");
    let (s, v) = net
        .admin(
            "a.test",
            Method::DELETE,
            &format!("/v1/admin/federation/peers/{}", enc(&c)),
            None,
        )
        .await;
    assert_eq!((s, v["kicked"].as_u64()), (200, Some(1)), "{v}");
    assert!(!net.member_ids(&alice, &room).await.contains(&dave.fqid));
    let (_, policy) = net
        .admin("a.test", Method::GET, "/v1/admin/federation/policy", None)
        .await;
    assert_eq!(policy["denied_peers"], json!([c]));
    net.post(&alice, &room, json!({"body": "after removal"}))
        .await;
    let peers = net.peers("a.test").await;
    assert!(
        !peers
            .iter()
            .any(|p| p["server_name"] == c.as_str() && p["queue_depth"].as_u64() > Some(0)),
        "{peers:?}"
    );
    let (s, v) = net
        .send_events("c.test", "a.test", "still-there", vec![])
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("SW_FED_POLICY_REJECTED")),
        "{v}"
    );
    let audit = net.audit("a.test", "action=federation.peer.*").await;
    assert_eq!(audit["rows"][0]["peer"], c.as_str(), "{audit}");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_fills_gaps_from_the_host() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    net.server_mut("b.test").stop().await;
    for i in 0..5 {
        net.post(&alice, &room, json!({"body": format!("missed {i}")}))
            .await;
    }
    // Those deliveries are lost (as after a 24 h give-up).
    assert_eq!(drop_queue(&net, "a.test", "b.test"), 5);
    net.server_mut("b.test").restart().await;
    net.post(&alice, &room, json!({"body": "after the gap"}))
        .await;
    eventually("b fills the gap from a's backfill", || async {
        bodies(&net, &bob, &room).await.len() == 6
    })
    .await;
    let on_b: Vec<String> = texts(&net, &bob, &room).await;
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
    let (s, v) = net.admin_backfill("b.test", &room).await;
    assert_eq!(
        (s, v["stored"].as_u64(), v["rejected"].as_u64()),
        (200, Some(0), Some(0)),
        "{v}"
    );
    // A host that serves no history answers with its error, 0 events.
    net.set_policy("a.test", json!({"max_backfill_events_per_request": 0}))
        .await;
    let (s, v) = net.admin_backfill("b.test", &room).await;
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
    let ask = || {
        net.as_user(
            &alice,
            Method::POST,
            "/v1/me/federated-dms",
            Some(json!({"fqid": bob.fqid})),
        )
    };
    let (s, dm) = ask().await;
    assert_eq!(
        (s, dm["room_type"].as_str(), dm["federated"].as_bool()),
        (200, Some("dm"), Some(true)),
        "{dm}"
    );
    let (_, again) = ask().await;
    assert_eq!(
        again["room_id"], dm["room_id"],
        "asking again returns the same room"
    );
    let room = dm["room_id"].as_str().unwrap().to_string();
    let invite = net
        .wait_for_invitation(&bob, "bob is invited", |i| i["room_id"] == room.as_str())
        .await;
    let (s, _) = net.accept(&bob, &invite).await;
    assert_eq!(s, 200);

    // Alice listens for live events, then bob writes.
    let stream = net
        .http
        .get(format!("https://{}/v1/events", net.name("a.test")))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    net.post(&bob, &room, json!({"body": "The zeppelin departs at dawn"}))
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
    // A posting whose commit never happened (a crash between the two) is
    // no hit: the message itself must hold the word.
    let seq = v["results"][0]["seq"].as_u64().expect("a sequenced hit");
    let store = &net.server("a.test").app().first.store;
    store
        .put(
            scaiwave::storage::T::Search,
            &scaiwave::storage::keys::posting_block(
                &scaiwave::storage::keys::postings_of("ghost", &room),
                seq,
            ),
            &(),
        )
        .unwrap();
    let (_, v) = net
        .as_user(&alice, Method::GET, "/v1/search?q=ghost", None)
        .await;
    assert_eq!(v["results"], json!([]), "{v}");
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
    let room = net.create_room(&alice, json!({"name": "limited"})).await;
    let invite = net.invite(&alice, &room, &bob).await;

    // invite_ttl later (both clocks move: skew stays within bounds).
    let ttl = net.server("a.test").app().config.federation.invite_ttl;
    for server in ["a.test", "b.test", "c.test"] {
        net.server(server).app().clock.advance(ttl);
    }
    // The invitee's side: the invitation is gone from the panel and refused.
    assert!(net.invitations(&bob).await.is_empty());
    let (s, v) = net.accept(&bob, &invite).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (410, Some("SW_FED_INVITE_EXPIRED")),
        "{v}"
    );
    // The host's side: a join that arrives anyway is refused by its own clock.
    let join = signed_event(
        net.server("b.test").app(),
        &room,
        &bob.fqid,
        Content::Member {
            membership: Membership::Join,
            target: scaiwave::ids::Fqid::parse(&bob.fqid).unwrap(),
            expires_at_ms: None,
            room: None,
        },
    );
    assert_eq!(
        net.send_one("b.test", "a.test", "late-join", &join).await,
        (200, Some("SW_FED_INVITE_EXPIRED".to_string()))
    );
    assert!(!net.member_ids(&alice, &room).await.contains(&bob.fqid));
    assert!(net.rooms(&bob).await.is_empty(), "no room on b");

    // The foreign limit counts joined and invited foreign participants.
    net.set_policy("a.test", json!({"max_foreign_participants_per_room": 1}))
        .await;
    let fresh = net.create_room(&alice, json!({"name": "small"})).await;
    let (s, _) = net.post_invitation(&alice, &fresh, &bob.fqid).await;
    assert_eq!(s, 200);
    let (s, v) = net.post_invitation(&alice, &fresh, &carol.fqid).await;
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
    net.invite_and_join(&bob, &room, &carol).await;
    eventually("the host lists carol", || async {
        net.member_ids(&alice, &room).await.contains(&carol.fqid)
    })
    .await;

    // Mentions travel with the message.
    net.post(
        &bob,
        &room,
        json!({"body": "hi @carol", "mentions": [carol.fqid]}),
    )
    .await;
    eventually("a has bob's mention", || async {
        net.messages(&alice, &room)
            .await
            .iter()
            .any(|m| m["mentions"] == json!([carol.fqid]))
    })
    .await;

    // b.test refuses c.test: carol's messages relayed by a.test are refused on b only.
    let c = net.name("c.test");
    net.set_policy("b.test", json!({"denied_peers": [c]})).await;
    net.post(&carol, &room, json!({"body": "from a denied server"}))
        .await;
    eventually("a has carol's message", || async {
        bodies(&net, &alice, &room)
            .await
            .iter()
            .any(|m| m.1 == "from a denied server")
    })
    .await;
    eventually("b audited the refusal", || async {
        net.audit("b.test", "action=federation.policy_rejected")
            .await["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["peer"] == c.as_str())
    })
    .await;
    assert!(!bodies(&net, &bob, &room)
        .await
        .iter()
        .any(|m| m.1 == "from a denied server"));

    // Room state is served only to participating servers.
    let other = net.create_room(&alice, json!({"name": "a only"})).await;
    let members_path = format!("/_scaiwave/federation/v1/rooms/{}/members", enc(&other));
    let (s, v) = net.s2s_get("c.test", "a.test", &members_path).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("SW_FED_NOT_MEMBER")),
        "{v}"
    );
    let (s, v) = net
        .s2s_get(
            "c.test",
            "b.test",
            &format!("/_scaiwave/federation/v1/rooms/{}/backfill", enc(&room)),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("SW_FED_POLICY_REJECTED")),
        "{v}"
    );

    // Incognito rooms refuse federation traffic with their own code.
    let inc = net
        .create_room(&alice, json!({"name": "secret", "room_type": "incognito"}))
        .await;
    let ev = signed_event(
        net.server("b.test").app(),
        &inc,
        &bob.fqid,
        message("let me in"),
    );
    assert_eq!(
        net.send_one("b.test", "a.test", "incognito", &ev).await,
        (200, Some("SW_FED_ROOM_TYPE_FORBIDDEN".to_string()))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_that_cannot_be_filled_yet_is_tried_again_later() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    net.server_mut("b.test").stop().await;
    net.post(&alice, &room, json!({"body": "lost"})).await;
    // Only once a's sender has failed and is backing off has it let go of
    // the row: one it holds in memory it would send after b's restart.
    eventually("a backs off from b", || async {
        net.peer_row("a.test", "b.test").await["next_retry_at"].is_string()
    })
    .await;
    assert_eq!(drop_queue(&net, "a.test", "b.test"), 1);
    // While the host serves no history, the gap cannot be filled.
    net.set_policy("a.test", json!({"max_backfill_events_per_request": 0}))
        .await;
    net.server_mut("b.test").restart().await;
    net.post(&alice, &room, json!({"body": "second"})).await;
    eventually("b has the second message", || async {
        bodies(&net, &bob, &room)
            .await
            .iter()
            .any(|m| m.1 == "second")
    })
    .await;
    let gap_fill_wait =
        std::time::Duration::from_millis(scaiwave::limits::GAP_FILL_DELAY_MS + 1000);
    tokio::time::sleep(gap_fill_wait).await;
    assert!(
        !bodies(&net, &bob, &room)
            .await
            .iter()
            .any(|m| m.1 == "lost"),
        "not fillable yet"
    );
    // History is served again; the next event makes b try again.
    net.set_policy("a.test", json!({"max_backfill_events_per_request": 1000}))
        .await;
    net.post(&alice, &room, json!({"body": "third"})).await;
    eventually("b filled the old gap", || async {
        let got: Vec<String> = texts(&net, &bob, &room).await;
        got == ["lost", "second", "third"]
    })
    .await;
    net.stop_all().await;
}

/// Drop everything `from` has queued for `to`, as a 24 h give-up would;
/// answers how many rows went.
fn drop_queue(net: &TestNet, from: &str, to: &str) -> usize {
    let queue = scaiwave::storage::prefix(&net.name(to));
    let mut end = queue.clone();
    end.push(0xff);
    net.server(from)
        .app()
        .first
        .store
        .remove_range(scaiwave::storage::T::Outbox, &queue, &end)
        .unwrap()
}
