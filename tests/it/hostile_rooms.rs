//! A room host that lies: what a replica must refuse or bound when the
//! events and answers come from a real host server signing with its real
//! key (SPEC §6: a host can withhold or delay events, never forge them,
//! and never decide our participants' membership).

use std::time::Duration;

use scaiwave::error::Code;
use scaiwave::ids::{Fqid, RoomId};
use scaiwave::protocol::event::{Content, Event, Membership, RoomSummary};
use scaiwave::rooms::replica;
use scaiwave::storage::{self, keys, Member, StoredEvent, T};
use serde_json::{json, Value};

use crate::federation::{bodies, shared_room, texts};
use crate::testnet::{self, eventually, signed_event, TestNet};

/// A room id hosted by `host` that its replicas have never heard of.
fn unknown_room(net: &TestNet, host: &str) -> String {
    RoomId::generate(&net.server(host).name).to_string()
}

/// An invite of `target` to `room`, signed by `host` for its `sender`.
fn invite(
    net: &TestNet,
    host: &str,
    room: &str,
    sender: &str,
    target: &str,
    expires_at_ms: i64,
) -> Value {
    let content = Content::Member {
        membership: Membership::Invite,
        target: Fqid::parse(target).unwrap(),
        expires_at_ms: Some(expires_at_ms),
        room: Some(RoomSummary {
            name: "Far future".into(),
            room_type: "standard".into(),
        }),
    };
    signed_event(net.server(host).app(), room, sender, content).to_wire_value(Some(1))
}

fn results(v: &Value) -> &Vec<Value> {
    v["results"].as_array().expect("a /send answer")
}

fn ms_of(rfc3339: &str) -> i64 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_invite_is_capped_and_the_invitation_list_still_answers() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let bob = net.user("b.test", "bob").await;
    let room = unknown_room(&net, "a.test");
    // Past year 10000, still a valid JSON integer (< 2^53).
    let far = 9_000_000_000_000_000;
    let event = invite(&net, "a.test", &room, &alice.fqid, &bob.fqid, far);
    let (s, v) = net
        .send_events("a.test", "b.test", "t-far", vec![event])
        .await;
    assert_eq!(
        (s, results(&v)[0]["status"].as_str()),
        (200, Some("accepted")),
        "{v}"
    );
    let ttl = net.server("b.test").config.federation.invite_ttl;
    let now = net.server("b.test").app().clock.now_ms();
    let (s, v) = net
        .as_user(&bob, reqwest::Method::GET, "/v1/me/invitations", None)
        .await;
    assert_eq!(s, 200, "{v}");
    let listed = &v["invitations"][0];
    assert_eq!(listed["room_id"], room.as_str(), "{v}");
    let expires = ms_of(listed["expires_at"].as_str().unwrap());
    assert!(
        expires <= now + ttl.as_millis() as i64,
        "expiry {expires} is capped at receipt + invite_ttl: {v}"
    );
    net.stop_all().await;
}

/// A message from `sender` in `room`, signed by `host`, at `seq`.
fn message_at(net: &TestNet, host: &str, room: &str, sender: &str, body: &str, seq: u64) -> Value {
    signed_event(net.server(host).app(), room, sender, testnet::message(body))
        .to_wire_value(Some(seq))
}

/// Rows of `server`'s search index under the word `token`.
fn postings(net: &TestNet, server: &str, token: &str) -> usize {
    net.server(server)
        .app()
        .first
        .store
        .count_prefix(T::Search, &storage::prefix(token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_the_replica_rejects_leave_no_search_postings() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    let elsewhere = unknown_room(&net, "a.test");
    // Refused for a room b does not know, and for a seq b already holds.
    let refused: Vec<Value> = (0..20)
        .map(|i| {
            message_at(
                &net,
                "a.test",
                &elsewhere,
                &alice.fqid,
                "rejectedword",
                i + 1,
            )
        })
        .chain([message_at(
            &net,
            "a.test",
            &room,
            &alice.fqid,
            "rejectedword heldseq",
            1,
        )])
        .collect();
    let (s, v) = net
        .send_events("a.test", "b.test", "t-refused-postings", refused)
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(results(&v).iter().all(|r| r["status"] == "rejected"), "{v}");
    assert_eq!(postings(&net, "b.test", "rejectedword"), 0);
    assert_eq!(postings(&net, "b.test", "heldseq"), 0);
    // What b stores is indexed and found.
    net.post(&alice, &room, json!({"body": "acceptedword arrives"}))
        .await;
    eventually("b finds the accepted message", || async {
        let (_, v) = net
            .as_user(
                &bob,
                reqwest::Method::GET,
                "/v1/search?q=acceptedword",
                None,
            )
            .await;
        v["results"].as_array().is_some_and(|r| r.len() == 1)
    })
    .await;
    assert_eq!(postings(&net, "b.test", "acceptedword"), 1);
    net.stop_all().await;
}

/// A membership event by `sender` about `target`, signed by `host`, at `seq`.
fn membership_at(
    net: &TestNet,
    host: &str,
    room: &str,
    sender: &str,
    membership: Membership,
    target: &str,
    seq: u64,
) -> Value {
    let content = Content::Member {
        membership,
        target: Fqid::parse(target).unwrap(),
        expires_at_ms: None,
        room: None,
    };
    signed_event(net.server(host).app(), room, sender, content).to_wire_value(Some(seq))
}

/// `fqid`'s member row in `room` on `server`, if any.
fn member_row(net: &TestNet, server: &str, room: &str, fqid: &str) -> Option<Member> {
    net.server(server)
        .app()
        .first
        .store
        .get(T::Members, &keys::member(room, fqid))
        .unwrap()
}

/// `r` is a per-event refusal with `code`, its message naming `words`.
fn assert_refused(r: &Value, code_wanted: &str, words: &str) {
    assert_eq!(
        (r["status"].as_str(), code(r)),
        (Some("rejected"), code_wanted),
        "{r}"
    );
    let message = r["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains(words), "{words:?} in {r}");
}

fn code(r: &Value) -> &str {
    r["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cannot_join_or_remove_our_participants_for_them() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    let carol = net.user("b.test", "carol").await;
    let carol_rooms = net.rooms(&carol).await;
    let next = net.host_events("a.test", "b.test", &room).await.len() as u64 + 1;
    let forged = vec![
        // alice "joins" carol, and "leaves" for bob.
        membership_at(
            &net,
            "a.test",
            &room,
            &alice.fqid,
            Membership::Join,
            &carol.fqid,
            next,
        ),
        membership_at(
            &net,
            "a.test",
            &room,
            &alice.fqid,
            Membership::Leave,
            &bob.fqid,
            next + 1,
        ),
    ];
    let (s, v) = net
        .send_events("a.test", "b.test", "t-forced-join", forged)
        .await;
    assert_eq!(s, 200, "{v}");
    for r in results(&v) {
        assert_refused(r, "SW_FED_BAD_EVENT", "target must be its sender");
    }
    assert_eq!(member_row(&net, "b.test", &room, &carol.fqid), None);
    assert_eq!(net.rooms(&carol).await, carol_rooms);
    assert_eq!(
        member_row(&net, "b.test", &room, &bob.fqid).map(|m| m.membership),
        Some(Membership::Join)
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_member_list_does_not_decide_our_participants_membership() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let bob = net.user("b.test", "bob").await;
    let carol = net.user("b.test", "carol").await;
    let room = net
        .create_room(&alice, json!({"name": "Listed", "room_type": "standard"}))
        .await;
    // The host's list claims carol joined, and a name far over the bound.
    let dave = format!("@dave:{}", net.server("a.test").name);
    let host_store = &net.server("a.test").app().first.store;
    let listed = |fqid: &str, display_name: String| Member {
        fqid: fqid.to_string(),
        membership: Membership::Join,
        display_name: Some(display_name),
        invite_expires_at_ms: None,
    };
    for m in [
        listed(&carol.fqid, "Carol".into()),
        listed(&dave, "é".repeat(1000)),
    ] {
        host_store
            .put(T::Members, &keys::member(&room, &m.fqid), &m)
            .unwrap();
    }
    net.invite_and_join(&alice, &room, &bob).await;
    eventually("b stored the host's member list", || async {
        member_row(&net, "b.test", &room, &dave).is_some()
    })
    .await;
    assert_eq!(member_row(&net, "b.test", &room, &carol.fqid), None);
    assert!(net.rooms(&carol).await.is_empty());
    let name = member_row(&net, "b.test", &room, &dave)
        .and_then(|m| m.display_name)
        .unwrap();
    assert!(name.len() <= 256 && name.starts_with("é"), "{name}");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_beyond_json_integers_are_refused_at_parse() {
    let mut net = testnet::start(&["a.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let room = unknown_room(&net, "a.test");
    let mut event = message_at(&net, "a.test", &room, &alice.fqid, "hi", 1);
    for (seq, ok) in [
        (json!((1u64 << 53) - 1), true),
        (json!(1u64 << 53), false),
        (json!(u64::MAX), false),
    ] {
        event["unsigned"]["seq"] = seq.clone();
        let parsed = Event::from_value(event.clone());
        match parsed {
            Ok((_, got)) => assert!(ok && got == seq.as_u64(), "{seq} must be refused"),
            Err(e) => {
                assert!(!ok, "{seq}: {e:?}");
                assert_eq!(e.code, Code::BadEvent, "{seq}");
                assert!(e.message.contains("unsigned.seq"), "{}", e.message);
            }
        }
    }
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_seq_at_u64_max_does_not_wrap() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, _bob, room) = shared_room(&net).await;
    // Below the parser, which refuses such a seq: nothing may overflow.
    let event = signed_event(
        net.server("a.test").app(),
        &room,
        &alice.fqid,
        testnet::message("at the end"),
    );
    let b = net.server("b.test").app().clone();
    let host = net.server("a.test").name.clone();
    let out = replica::accept_from_host(&b.first.rooms, &host, vec![(event, u64::MAX)])
        .await
        .unwrap();
    assert_eq!(out.len(), 1);
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_never_overwrites_a_stored_event() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    net.post(&alice, &room, json!({"body": "first"})).await;
    eventually("b has alice's message", || async {
        texts(&net, &bob, &room).await == ["first"]
    })
    .await;
    let b = net.server("b.test").app().clone();
    let first_seq = net.messages(&bob, &room).await[0]["seq"].as_u64().unwrap();
    let stored_before: StoredEvent = b
        .first
        .store
        .get(T::Events, &keys::event(&room, first_seq))
        .unwrap()
        .unwrap();
    // bob's message waits for the host, which then "answers" with a seq
    // that already holds alice's message.
    net.server_mut("a.test").stop().await;
    let (s, v) = net.post(&bob, &room, json!({"body": "mine"})).await;
    assert_eq!(s, 200, "{v}");
    let event_id = v["event_id"].as_str().unwrap();
    let pending: StoredEvent = b
        .first
        .store
        .get(T::Pending, &keys::pending(&room, event_id))
        .unwrap()
        .unwrap();
    let (event, _) = Event::parse(&pending.json).unwrap();
    replica::settle(&b.first.rooms, &event, first_seq)
        .await
        .unwrap();
    let stored_after: Option<StoredEvent> = b
        .first
        .store
        .get(T::Events, &keys::event(&room, first_seq))
        .unwrap();
    assert_eq!(stored_after, Some(stored_before));
    let roomid = RoomId::parse(&room).unwrap();
    assert_eq!(
        scaiwave::rooms::views::pending_state(&b.first.rooms, &roomid, event_id).unwrap(),
        Some(scaiwave::storage::DeliveryState::Failed)
    );
    assert_eq!(
        bodies(&net, &bob, &room).await,
        [
            (Some(first_seq), "first".into(), "sent".into()),
            (None, "mine".into(), "failed".into())
        ]
    );
    net.stop_all().await;
}

/// The seq b's copy of `room` expects next.
fn next_seq(net: &TestNet, server: &str, room: &str) -> u64 {
    net.server(server)
        .app()
        .first
        .store
        .get::<scaiwave::storage::Room>(T::Rooms, room.as_bytes())
        .unwrap()
        .unwrap()
        .next_seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_far_ahead_is_refused_and_opens_no_gap() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, _bob, room) = shared_room(&net).await;
    let before = next_seq(&net, "b.test", &room);
    let far = message_at(&net, "a.test", &room, &alice.fqid, "far", 1 << 52);
    let (s, v) = net
        .send_events("a.test", "b.test", "t-far-seq", vec![far])
        .await;
    assert_eq!(s, 200, "{v}");
    let r = &results(&v)[0];
    assert_refused(r, "SW_FED_BAD_EVENT", "past the newest seq");
    assert_eq!(next_seq(&net, "b.test", &room), before);
    assert_eq!(
        replica::gap_fills_running(&net.server("b.test").app().first.rooms),
        0
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_with_a_gap_share_one_fill() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, _bob, room) = shared_room(&net).await;
    let next = next_seq(&net, "b.test", &room);
    for i in 0..4 {
        let e = message_at(
            &net,
            "a.test",
            &room,
            &alice.fqid,
            "after a gap",
            next + 5 + i,
        );
        let (s, v) = net
            .send_events("a.test", "b.test", &format!("t-gap-{i}"), vec![e])
            .await;
        assert_eq!(
            (s, results(&v)[0]["status"].as_str()),
            (200, Some("accepted")),
            "{v}"
        );
    }
    // Well within the fill's first wait.
    assert_eq!(
        replica::gap_fills_running(&net.server("b.test").app().first.rooms),
        1
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_everyone_of_ours_left_an_invite_may_come_at_any_seq() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    let path = format!("/v1/rooms/{}/leave", testnet::enc(&room));
    let (s, v) = net.as_user(&bob, reqwest::Method::POST, &path, None).await;
    assert_eq!(s, 200, "{v}");
    eventually("bob's leave is settled on b", || async {
        member_row(&net, "b.test", &room, &bob.fqid)
            .is_some_and(|m| m.membership == Membership::Leave)
    })
    .await;
    // The room went on for a long time without b.
    let seq = next_seq(&net, "b.test", &room) + 50_000;
    let far = net.server("b.test").app().clock.now_ms() + 60_000;
    let mut again = invite(&net, "a.test", &room, &alice.fqid, &bob.fqid, far);
    again["unsigned"]["seq"] = json!(seq);
    let (s, v) = net
        .send_events("a.test", "b.test", "t-reinvite", vec![again])
        .await;
    assert_eq!(
        (s, results(&v)[0]["status"].as_str()),
        (200, Some("accepted")),
        "{v}"
    );
    assert_eq!(net.invitations(&bob).await.len(), 1);
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_send_answers_go_after_a_day() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let room = unknown_room(&net, "a.test");
    let e = message_at(&net, "a.test", &room, &alice.fqid, "x", 1);
    net.send_events("a.test", "b.test", "t-kept-a-day", vec![e])
        .await;
    let b = net.server("b.test").app().clone();
    assert_eq!(b.first.store.count_prefix(T::Txns, b""), 1);
    let pass =
        scaiwave::rooms::retention::run_pass(&b.first.rooms, b.config.audit.retention).unwrap();
    assert_eq!(pass.txn_answers, 0, "still fresh");
    b.clock.advance(Duration::from_secs(25 * 3600));
    let pass =
        scaiwave::rooms::retention::run_pass(&b.first.rooms, b.config.audit.retention).unwrap();
    assert_eq!(pass.txn_answers, 1);
    assert_eq!(b.first.store.count_prefix(T::Txns, b""), 0);
    assert_eq!(b.first.store.count_prefix(T::TxnTimes, b""), 0);
    net.stop_all().await;
}

/// `server`'s stored invitation rows.
fn invitation_rows(net: &TestNet, server: &str) -> usize {
    net.server(server)
        .app()
        .first
        .store
        .count_prefix(T::Invitations, b"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_invitations_are_deleted_by_the_retention_pass() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let bob = net.user("b.test", "bob").await;
    let b = net.server("b.test").app().clone();
    let soon = b.clock.now_ms() + 60_000;
    let events = (0..3)
        .map(|_| {
            let room = unknown_room(&net, "a.test");
            invite(&net, "a.test", &room, &alice.fqid, &bob.fqid, soon)
        })
        .collect();
    let (s, v) = net
        .send_events("a.test", "b.test", "t-expiring", events)
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(results(&v).iter().all(|r| r["status"] == "accepted"), "{v}");
    assert_eq!(invitation_rows(&net, "b.test"), 3);
    scaiwave::rooms::retention::run_pass(&b.first.rooms, b.config.audit.retention).unwrap();
    assert_eq!(invitation_rows(&net, "b.test"), 3, "not expired yet");
    assert_eq!(net.invitations(&bob).await.len(), 3);
    b.clock.advance(Duration::from_secs(120));
    scaiwave::rooms::retention::run_pass(&b.first.rooms, b.config.audit.retention).unwrap();
    assert_eq!(invitation_rows(&net, "b.test"), 0);
    assert!(net.invitations(&bob).await.is_empty());
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitations_over_the_per_participant_cap_are_refused() {
    use scaiwave::limits::INVITATIONS_PENDING_PER_PARTICIPANT_MAX as MAX;
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let bob = net.user("b.test", "bob").await;
    let far = net.server("b.test").app().clock.now_ms() + 3_600_000;
    let mut accepted = 0;
    let mut refused = Vec::new();
    // Batches of 60: the cap falls inside a batch, so it must count what
    // the batch itself adds.
    for batch in 0..MAX.div_ceil(60) + 1 {
        let events = (0..60)
            .map(|_| {
                let room = unknown_room(&net, "a.test");
                invite(&net, "a.test", &room, &alice.fqid, &bob.fqid, far)
            })
            .collect();
        let (s, v) = net
            .send_events("a.test", "b.test", &format!("t-cap-{batch}"), events)
            .await;
        assert_eq!(s, 200, "{v}");
        for r in results(&v) {
            if r["status"] == "accepted" {
                accepted += 1;
            } else {
                refused.push(r.clone());
            }
        }
    }
    assert_eq!(accepted, MAX, "{refused:?}");
    let r = &refused[0];
    assert_eq!(code(r), "SW_FED_FOREIGN_LIMIT", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pending invitations"),
        "{r}"
    );
    assert_eq!(net.invitations(&bob).await.len(), MAX);
    assert_eq!(invitation_rows(&net, "b.test"), MAX);
    net.stop_all().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_kept_only_for_a_peers_joined_members() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let (alice, bob, room) = shared_room(&net).await;
    let b_name = net.server("b.test").name.clone();
    let ts = net.server("b.test").app().clock.now_ms();
    let edu = |sender: &str| json!({"type": "sw.presence", "sender": sender, "ts": ts, "content": {"status": "dnd"}});
    let mut edus: Vec<Value> = (0..50)
        .map(|i| edu(&format!("@ghost{i}:{b_name}")))
        .collect();
    edus.push(edu(&bob.fqid));
    let (s, v) = net
        .send_as(
            "b.test",
            "a.test",
            json!({"txn_id": "t-ghosts", "events": [], "edus": edus}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let a = net.server("a.test").app();
    assert_eq!(a.first.store.count_prefix(T::Presence, b""), 1);
    let members = net.members(&alice, &room).await;
    let listed = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["fqid"] == bob.fqid.as_str())
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed["presence"]["status"], "dnd", "{members}");
    net.stop_all().await;
}
