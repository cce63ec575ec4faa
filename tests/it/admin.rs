//! Admin room routes (SPEC §9): they act on any room of the server, the
//! admin need not be a member, and a room type that never federates is
//! refused before anything else.

use reqwest::Method;
use serde_json::json;

use crate::testnet::{self, enc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_room_routes_act_on_rooms_the_admin_is_not_in() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let bob = net.user("b.test", "bob").await;
    let room = net
        .create_room(&alice, json!({"name": "r", "room_type": "standard"}))
        .await;
    let secret = net
        .create_room(&alice, json!({"name": "s", "room_type": "incognito"}))
        .await;

    // The admin is no member of alice's room, yet may switch and invite.
    let path = format!("/v1/admin/rooms/{}/federate", enc(&room));
    let (s, v) = net
        .admin("a.test", Method::PUT, &path, Some(json!({"enabled": true})))
        .await;
    assert_eq!(s, 200, "{v}");
    let path = format!("/v1/admin/rooms/{}/federation/invite", enc(&room));
    let (s, v) = net
        .admin(
            "a.test",
            Method::POST,
            &path,
            Some(json!({"fqid": bob.fqid})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let invite_id = v["invite_id"].as_str().unwrap().to_string();
    let seen = format!("{} sees the admin's invitation", bob.fqid);
    net.wait_for_invitation(&bob, &seen, |i| i["invite_id"] == invite_id.as_str())
        .await;
    let (s, v) = net.accept(&bob, &invite_id).await;
    assert_eq!(s, 200, "{v}");

    // Forbidden room types: 409 first, whatever else the request says.
    for (method, route, body) in [
        (Method::PUT, "federate", Some(json!({"enabled": false}))),
        (
            Method::POST,
            "federation/invite",
            Some(json!({"fqid": bob.fqid})),
        ),
        (
            Method::POST,
            "federation/invite",
            Some(json!({"not": "a body"})),
        ),
        (Method::POST, "federation/backfill", None),
    ] {
        let path = format!("/v1/admin/rooms/{}/{route}", enc(&secret));
        let (s, v) = net.admin("a.test", method, &path, body).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (409, Some("SW_FED_ROOM_TYPE_FORBIDDEN")),
            "{route}: {v}"
        );
    }

    // On the replica, b's admin is not joined: the host decides who invites.
    let path = format!("/v1/admin/rooms/{}/federation/invite", enc(&room));
    let (s, v) = net
        .admin(
            "b.test",
            Method::POST,
            &path,
            Some(json!({"fqid": alice.fqid})),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("SW_FORBIDDEN")),
        "{v}"
    );
    // But it may pull history from the host without being a member.
    let (s, v) = net.admin_backfill("b.test", &room).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["fetched"].as_u64().unwrap() >= 1, "{v}");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_refresh_never_contacts_a_refused_peer() {
    let mut net = testnet::start(&["a.test", "b.test"], |_, _| {}).await;
    let bob = net.user("b.test", "bob").await;
    let b = net.name("b.test");
    net.set_policy("a.test", json!({"denied_peers": [b]})).await;
    let path = format!("/v1/admin/federation/foreign/{}/refresh", enc(&bob.fqid));
    let (s, v) = net.admin("a.test", Method::POST, &path, None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("SW_FED_POLICY_REJECTED")),
        "{v}"
    );
    let counts = &net.server("b.test").running.as_ref().unwrap().connections;
    let connections = counts.http1.load(std::sync::atomic::Ordering::SeqCst)
        + counts.http2.load(std::sync::atomic::Ordering::SeqCst);
    // b saw only the test's own call that created bob.
    assert_eq!(connections, 1, "a never connected to b");
    net.stop_all().await;
}
