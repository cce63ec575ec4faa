//! Tenants of one instance (SPEC §14): x.test and y.test share one
//! instance (one process, one port, one database), z.test is a second
//! instance; every pair federates over real HTTPS, tenants included.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use reqwest::Method;
use scaiwave::cli::{execute, Admin, AdminArgs, TenantCmd, TenantSwitch};
use scaiwave::config::Config;
use scaiwave::ids::ServerName;
use scaiwave::server::HttpVersions;
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
        json: false,
        command,
    };
    execute(net.server("x.test").app(), args)
        .await
        .unwrap()
        .output
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
    // Presence from a tenant reaches its neighbour tenant, and from the
    // other instance too.
    for (u, status, room) in [(&bob, "dnd", &xy), (&carol, "idle", &xz)] {
        let body = Some(json!({ "status": status }));
        let (s, v) = net.as_user(u, Method::PUT, "/v1/me/presence", body).await;
        assert_eq!(s, 200, "{v}");
        let what = format!("alice sees {}'s presence", u.fqid);
        eventually(&what, || async {
            net.member(&alice, room, &u.fqid).await.unwrap()["presence"]["status"] == status
        })
        .await;
    }
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

/// Copy a directory tree (the fixture is read-only in a clone).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_made_before_tenants_opens_and_keeps_serving() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/before-tenants");
    let data = tempfile::tempdir().unwrap();
    copy_tree(&fixture.join("db"), &data.path().join("db"));
    for file in ["tls-cert.pem", "tls-key.pem", "admin-token"] {
        std::fs::copy(fixture.join(file), data.path().join(file)).unwrap();
    }
    let mut config = Config::default_embedded();
    config.server_name = ServerName::parse("old.test:8448").unwrap();
    config.data_dir = data.path().to_path_buf();
    let running =
        testnet::start_at(&config, "127.0.0.1:0".parse().unwrap(), HttpVersions::Both).await;
    let addr = running.addr;
    // Its self-signed certificate (made before the local CA) is kept.
    let old_cert = std::fs::read(fixture.join("tls-cert.pem")).unwrap();
    assert_eq!(
        std::fs::read(data.path().join("tls-cert.pem")).unwrap(),
        old_cert
    );

    // The new tenant is named with the port, so it is reached at its name.
    let new = ServerName::parse(&format!("new.test:{}", addr.port())).unwrap();
    let created = running.app.create_tenant(&new, None).unwrap();
    assert_eq!(created.admin_fqid, format!("@admin:{new}"));
    let token_file = data
        .path()
        .join("tenants")
        .join(new.as_str())
        .join("admin-token");
    assert_eq!(read(&token_file), created.admin_token);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    running.stop().await;

    // Restarted: both tenants serve, each at its name with its certificate.
    let running = testnet::start_at(&config, addr, HttpVersions::Both).await;
    let roots = [
        old_cert,
        std::fs::read(data.path().join("tls-ca.pem")).unwrap(),
    ];
    let hosts = BTreeMap::from([
        ("old.test".to_string(), addr),
        ("new.test".to_string(), addr),
    ]);
    let http = reqwest::Client::builder()
        .tls_certs_only(
            roots
                .iter()
                .map(|pem| reqwest::Certificate::from_pem(pem).unwrap()),
        )
        .dns_resolver(Arc::new(testnet::TestResolver(hosts)))
        .build()
        .unwrap();
    let old = format!("old.test:{}", addr.port());
    let call = |host: String, path: String, token: String| {
        let http = http.clone();
        async move { testnet::request(&http, &host, Method::GET, &path, Some(&token), None).await }
    };
    let admin_token = read(&fixture.join("admin-token"));
    let (s, identity) = call(
        old.clone(),
        "/v1/admin/federation/identity".into(),
        admin_token.clone(),
    )
    .await;
    assert_eq!(s, 200, "{identity}");
    assert_eq!(
        identity["key_id"].as_str().unwrap(),
        read(&fixture.join("key-id"))
    );
    assert_eq!(identity["server_name"], "old.test:8448");
    let (_, policy) = call(
        old.clone(),
        "/v1/admin/federation/policy".into(),
        admin_token.clone(),
    )
    .await;
    assert_eq!(policy["denied_peers"], json!(["evil.test"]));
    let room = read(&fixture.join("room-id"));
    let messages = format!("/v1/rooms/{}/messages", testnet::enc(&room));
    let (s, v) = call(old.clone(), messages.clone(), admin_token.clone()).await;
    assert_eq!(s, 200, "{v}");
    let bodies: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["first message", "second message", "third message"]);
    let body = Some(json!({"body": "after tenants"}));
    let (s, v) = testnet::request(
        &http,
        &old,
        Method::POST,
        &messages,
        Some(&admin_token),
        body,
    )
    .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("sent")), "{v}");
    let bob_token = read(&fixture.join("bob-token"));
    let (s, v) = call(old.clone(), "/v1/me".into(), bob_token.clone()).await;
    assert_eq!(
        (s, v["fqid"].as_str()),
        (200, Some("@bob:old.test:8448")),
        "{v}"
    );
    // The new tenant: its own identity, and the old tenant's tokens are
    // not its own.
    let (s, v) = call(
        new.to_string(),
        "/v1/admin/federation/identity".into(),
        created.admin_token.clone(),
    )
    .await;
    assert_eq!(
        (s, v["server_name"].as_str()),
        (200, Some(new.as_str())),
        "{v}"
    );
    let (s, _) = call(new.to_string(), "/v1/me".into(), bob_token).await;
    assert_eq!(s, 401);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_commands_refuse_bad_input_and_change_nothing() {
    let mut net = testnet::start(&["x.test"], |_, _| {}).await;
    let app = net.server("x.test").app().clone();
    let port = net.server("x.test").addr.port();
    let y = ServerName::parse(&format!("y.test:{port}")).unwrap();
    let refused = |result: scaiwave::error::Result<scaiwave::app::CreatedTenant>| {
        let e = result.unwrap_err();
        (e.code.as_str(), e.message)
    };
    // Configured certificates: the local CA issues none.
    let (code, message) = refused(app.create_tenant(&y, None));
    assert_eq!(code, "SW_BAD_REQUEST");
    assert!(message.contains("--cert"), "{message}");
    // A certificate with another certificate's key.
    let (cert, _) = net.ca.leaf("y.test");
    let (_, other_key) = net.ca.leaf("other.test");
    let (code, message) = refused(app.create_tenant(&y, Some((cert.clone(), other_key))));
    assert_eq!(code, "SW_BAD_REQUEST");
    assert!(message.contains("do not form a pair"), "{message}");
    // The name of a tenant it has.
    let (code, _) = refused(app.create_tenant(&net.server("x.test").name.clone(), None));
    assert_eq!(code, "SW_CONFLICT");
    // None of that left a tenant behind: not listed, not routed, no files,
    // and the name is still free.
    assert_eq!(app.tenants().len(), 1);
    let e = execute(
        &app,
        AdminArgs {
            tenant: Some(y.to_string()),
            json: false,
            command: Admin::Tenant(TenantCmd::List),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code.as_str(), "SW_NOT_FOUND", "{}", e.message);
    assert!(!net
        .server("x.test")
        .config
        .data_dir
        .join("tenants")
        .join(y.as_str())
        .join("admin-token")
        .exists());
    let (y_cert, y_key) = net.ca.leaf("y.test");
    app.create_tenant(&y, Some((y_cert, y_key))).unwrap();
    let (code, _) = refused(app.create_tenant(&y, None));
    assert_eq!(code, "SW_CONFLICT");
    assert_eq!(app.tenants().len(), 2);
    net.stop_all().await;
}
