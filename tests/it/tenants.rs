//! Tenants of one instance (SPEC §14): x.test and y.test share one
//! instance (one process, one port, one database), z.test is a second
//! instance; every pair federates over real HTTPS, tenants included.

use reqwest::Method;
use scaiwave::cli::{execute, Admin, AdminArgs, TenantCmd, TenantSwitch};
use serde_json::{json, Value};

use crate::federation::texts;
use crate::testnet::{self, eventually, TestNet, User};

/// x.test hosts a room each with y.test (a tenant of its own instance)
/// and with z.test (another instance); every message before the join
/// reaches the joiner by backfill.
async fn tenants_net() -> (TestNet, [User; 3], String, String) {
    let net =
        testnet::start_with_tenants(&["x.test", "z.test"], &[("y.test", "x.test")], |_, _| {})
            .await;
    let alice = net.user("x.test", "alice").await;
    let bob = net.user("y.test", "bob").await;
    let carol = net.user("z.test", "carol").await;
    let mut rooms = Vec::new();
    for guest in [&bob, &carol] {
        let room = net
            .create_room(
                &alice,
                json!({"name": format!("with {}", guest.server), "room_type": "standard"}),
            )
            .await;
        net.post(&alice, &room, json!({"body": "before the join"}))
            .await;
        net.invite_and_join(&alice, &room, guest).await;
        rooms.push(room);
    }
    let [xy, xz] = <[String; 2]>::try_from(rooms).unwrap();
    (net, [alice, bob, carol], xy, xz)
}

async fn admin_command(net: &TestNet, tenant: Option<&str>, command: Admin) -> String {
    let args = AdminArgs {
        tenant: tenant.map(|t| net.name(t)),
        command,
    };
    execute(net.server("x.test").app(), args).await.unwrap()
}

async fn switch(net: &TestNet, short: &str, on: bool) {
    let server_name = net.name(short);
    let switch = if on {
        TenantSwitch::Enable { server_name }
    } else {
        TenantSwitch::Disable { server_name }
    };
    admin_command(net, None, Admin::Tenant(TenantCmd::Federation(switch))).await;
}

async fn sees(net: &TestNet, u: &User, room: &str, body: &str) {
    let what = format!("{} sees {body:?}", u.fqid);
    eventually(&what, || async {
        texts(net, u, room).await.iter().any(|t| t == body)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_of_one_instance_and_another_instance_federate_over_https() {
    let (mut net, [alice, bob, carol], xy, xz) = tenants_net().await;
    // Both joins backfilled the message sent before them.
    for (u, room) in [(&bob, &xy), (&carol, &xz)] {
        sees(&net, u, room, "before the join").await;
    }
    // Messages both ways, tenant to tenant and instance to instance.
    net.post(&bob, &xy, json!({"body": "from y"})).await;
    net.post(&carol, &xz, json!({"body": "from z"})).await;
    sees(&net, &alice, &xy, "from y").await;
    sees(&net, &alice, &xz, "from z").await;
    net.post(&alice, &xy, json!({"body": "to y"})).await;
    sees(&net, &bob, &xy, "to y").await;
    // Presence from a tenant reaches its neighbour tenant.
    let (s, v) = net
        .as_user(
            &bob,
            Method::PUT,
            "/v1/me/presence",
            Some(json!({"status": "dnd"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    eventually("alice sees bob's presence", || async {
        net.member(&alice, &xy, &bob.fqid).await.unwrap()["presence"]["status"] == "dnd"
    })
    .await;
    // Each tenant keeps its own peers, keys and audit.
    let peers_of = |short: &'static str| {
        let net = &net;
        async move {
            let rows = net.peers(short).await;
            let mut names: Vec<String> = rows
                .iter()
                .map(|p| p["server_name"].as_str().unwrap().to_string())
                .collect();
            names.sort();
            names
        }
    };
    assert_eq!(peers_of("y.test").await, vec![net.name("x.test")]);
    let mut x_peers = vec![net.name("y.test"), net.name("z.test")];
    x_peers.sort();
    assert_eq!(peers_of("x.test").await, x_peers);
    assert_ne!(
        net.tenant("x.test").fed.keys.current().unwrap().key_id,
        net.tenant("y.test").fed.keys.current().unwrap().key_id
    );

    // Y's federation off: S2S to it is refused, it sends nothing, and
    // its rooms are not federated; x.test and z.test go on.
    switch(&net, "y.test", false).await;
    let (s, v) = net
        .s2s_get("z.test", "y.test", "/_scaiwave/federation/v1/profile/bob")
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("SW_FED_TENANT_DISABLED")),
        "{v}"
    );
    let bob_rooms = net.rooms(&bob).await;
    assert!(
        bob_rooms.iter().all(|r| r["federated"] == false),
        "{bob_rooms:?}"
    );
    let (s, v) = net.post(&bob, &xy, json!({"body": "held on y"})).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("pending")), "{v}");
    net.post(&carol, &xz, json!({"body": "z goes on"})).await;
    sees(&net, &alice, &xz, "z goes on").await;
    eventually("y holds its message for x", || async {
        net.peer_row("y.test", "x.test").await["queue_depth"] == 1
    })
    .await;
    assert!(!texts(&net, &alice, &xy)
        .await
        .contains(&"held on y".to_string()));
    let audit = net
        .audit("y.test", "action=federation.tenant.disabled")
        .await;
    assert_eq!(audit["rows"].as_array().unwrap().len(), 1, "{audit}");

    // On again: the held message is delivered, and y catches up with what
    // x sent meanwhile.
    switch(&net, "y.test", true).await;
    sees(&net, &alice, &xy, "held on y").await;
    net.post(&alice, &xy, json!({"body": "welcome back"})).await;
    sees(&net, &bob, &xy, "welcome back").await;
    assert!(net.rooms(&bob).await.iter().all(|r| r["federated"] == true));
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_token_and_policy_stay_with_their_tenant() {
    let (mut net, [alice, bob, carol], _, _) = tenants_net().await;
    // x's tokens are unknown to y, on the local and the admin API alike.
    let x_admin = net.server("x.test").admin_token.clone();
    for (path, token) in [
        ("/v1/me", &alice.token),
        ("/v1/admin/federation/peers", &x_admin),
    ] {
        let (s, v) = net
            .call("y.test", Method::GET, path, Some(token), None)
            .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (401, Some("SW_UNAUTHENTICATED")),
            "{path}: {v}"
        );
    }
    // x denies z; y's policy is its own, so y and z still share a room.
    let (s, v) = net
        .set_policy("x.test", json!({"denied_peers": [net.name("z.test")]}))
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, y_policy) = net
        .admin("y.test", Method::GET, "/v1/admin/federation/policy", None)
        .await;
    assert_eq!(y_policy["denied_peers"], json!([]));
    let yz = net
        .create_room(&bob, json!({"name": "y and z", "room_type": "standard"}))
        .await;
    net.invite_and_join(&bob, &yz, &carol).await;
    net.post(&carol, &yz, json!({"body": "z to y"})).await;
    sees(&net, &bob, &yz, "z to y").await;
    let (s, v) = net
        .s2s_get("z.test", "x.test", "/_scaiwave/federation/v1/profile/alice")
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (403, Some("SW_FED_POLICY_REJECTED")),
        "{v}"
    );

    // `tenant list` names both tenants of the instance, the first first.
    let list = admin_command(&net, None, Admin::Tenant(TenantCmd::List)).await;
    let list: Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["server_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [net.name("x.test"), net.name("y.test")]);
    net.stop_all().await;
}
