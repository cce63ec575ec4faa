//! `TestNet`: real scaiwave servers on 127.0.0.1:0 with temporary sled
//! databases and real TLS from a throwaway CA (rcgen), each told where the
//! others are through `federation.resolve`. Each is named `<short>:<port>`
//! (`a.test:40123`); tests call it by its short name (`a.test`) and get the
//! real one from `name` / `fqid`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Method;
use scaiwave::app::App;
use scaiwave::clock::Clock;
use scaiwave::config::Config;
use scaiwave::ids::{Fqid, KeyId, RoomId, ServerName};
use scaiwave::protocol::event::{Content, Event};
use scaiwave::server::{HttpVersions, Running};
use serde_json::{json, Value};

/// How long a test waits for one answer, or for a server to stop, before
/// it fails: a hang is a bug to see, not a CI run that never ends.
pub const TEST_REQUEST_SECS: u64 = 60;

pub struct Ca {
    dir: tempfile::TempDir,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "scaiwave test CA");
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).unwrap();
        Ca { dir, issuer }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A leaf for `host`, written as `<host>.pem` / `<host>.key`.
    pub fn leaf(&self, host: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![host.to_string()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{host}.pem")),
            self.dir.path().join(format!("{host}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

pub struct Server {
    /// The short name a test calls it by (`a.test`).
    pub short: String,
    /// Its server_name, port included (`a.test:40123`), as real ones are.
    pub name: ServerName,
    pub addr: SocketAddr,
    pub config: Config,
    pub running: Option<Running>,
    /// The HTTP versions its listener offers.
    pub http: HttpVersions,
    /// Kept so the data dir lives as long as the server (a tenant's is
    /// its instance's).
    _data: Option<tempfile::TempDir>,
    pub admin_token: String,
    /// For a tenant of another server's instance: that server's short name.
    pub instance: Option<String>,
}

impl Server {
    /// Its instance (a tenant's is the one it was created on: use
    /// [`TestNet::tenant`] for the tenant itself).
    pub fn app(&self) -> &Arc<scaiwave::app::App> {
        &self.running.as_ref().expect("server is running").app
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let stopped = tokio::time::timeout(Duration::from_secs(TEST_REQUEST_SECS), r.stop());
            assert!(stopped.await.is_ok(), "the server did not stop");
        }
    }

    /// Start again on the same port and data (after `stop`).
    pub async fn restart(&mut self) {
        self.running = Some(start_at(&self.config, self.addr, self.http).await);
    }
}

/// Start `config` on `addr` (port 0: any free one), waiting out a port or
/// a sled lock that a server just stopped there may hold a moment longer.
pub async fn start_at(config: &Config, addr: SocketAddr, http: HttpVersions) -> Running {
    let mut tries = 0;
    loop {
        let listener = match std::net::TcpListener::bind(addr) {
            Ok(l) => l,
            Err(_) if tries < 300 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let started =
            scaiwave::server::start_on_with(config.clone(), Clock::system(), listener, http);
        match started.await {
            Ok(r) => return r,
            // sled's flusher may hold the lock a moment after stop.
            Err(e) if e.message.contains("could not acquire lock") && tries < 300 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Resolves every test name to its loopback address, port included.
pub struct TestResolver(pub BTreeMap<String, SocketAddr>);

impl Resolve for TestResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let addr = self.0.get(name.as_str()).copied();
        Box::pin(async move {
            let addr = addr.ok_or("unknown test name")?;
            Ok(Box::new(std::iter::once(addr)) as Addrs)
        })
    }
}

pub struct TestNet {
    pub ca: Ca,
    pub servers: Vec<Server>,
    pub http: reqwest::Client,
    /// Host -> address, as the test's own client finds servers.
    pub hosts: BTreeMap<String, SocketAddr>,
}

/// Builds a net; `tweak` may change each server's config before start (it
/// gets the short name). Each server is named `<short>:<port>`, the way a
/// real deployment names a server on a port other than 443.
pub async fn start(names: &[&str], tweak: impl Fn(&str, &mut Config)) -> TestNet {
    start_with_extra(names, BTreeMap::new(), tweak).await
}

/// `extra` maps more names (not scaiwave servers, reached on port 443) to
/// loopback addresses.
pub async fn start_with_extra(
    names: &[&str],
    extra: BTreeMap<String, SocketAddr>,
    tweak: impl Fn(&str, &mut Config),
) -> TestNet {
    start_offering(names, &[], extra, HttpVersions::Both, tweak).await
}

/// A net where some servers are tenants of another's instance: each
/// `(tenant, instance)` is created on the running instance (with its own
/// certificate from the net's CA) and named `<tenant>:<instance's port>`,
/// so it is reached, like any server, at its own name over HTTPS.
pub async fn start_with_tenants(
    names: &[&str],
    tenants: &[(&str, &str)],
    tweak: impl Fn(&str, &mut Config),
) -> TestNet {
    start_offering(names, tenants, BTreeMap::new(), HttpVersions::Both, tweak).await
}

/// A net whose listeners all offer only HTTP/1.1, as peers behind a proxy
/// that does not speak HTTP/2 would: every S2S request travels as HTTP/1.1.
pub async fn start_http1_only(names: &[&str], tweak: impl Fn(&str, &mut Config)) -> TestNet {
    start_offering(names, &[], BTreeMap::new(), HttpVersions::Http1Only, tweak).await
}

async fn start_offering(
    names: &[&str],
    tenants: &[(&str, &str)],
    extra: BTreeMap<String, SocketAddr>,
    http: HttpVersions,
    tweak: impl Fn(&str, &mut Config),
) -> TestNet {
    let ca = Ca::new();
    let listeners: Vec<std::net::TcpListener> = names
        .iter()
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    // server_name (port included) -> address, for the servers' resolve tables.
    let mut resolve: BTreeMap<ServerName, SocketAddr> = names
        .iter()
        .zip(&listeners)
        .map(|(n, l)| {
            let addr = l.local_addr().unwrap();
            (full_name(n, addr), addr)
        })
        .collect();
    let addr_of = |short: &str| {
        let i = names
            .iter()
            .position(|n| *n == short)
            .expect("a server of the net");
        listeners[i].local_addr().unwrap()
    };
    for (tenant, instance) in tenants {
        resolve.insert(full_name(tenant, addr_of(instance)), addr_of(instance));
    }
    for (name, addr) in &extra {
        resolve.insert(ServerName::parse(name).unwrap(), *addr);
    }
    // host -> address, for the test's own client (it dials the URL's port).
    let mut hosts: BTreeMap<String, SocketAddr> = names
        .iter()
        .zip(&listeners)
        .map(|(n, l)| (n.to_string(), l.local_addr().unwrap()))
        .collect();
    for (tenant, instance) in tenants {
        hosts.insert(tenant.to_string(), addr_of(instance));
    }
    hosts.extend(extra.clone());
    let mut servers = Vec::new();
    for (short, listener) in names.iter().zip(listeners) {
        let data = tempfile::tempdir().unwrap();
        let (cert, key) = ca.leaf(short);
        let mut config = Config::default_embedded();
        config.server_name = full_name(short, listener.local_addr().unwrap());
        config.listen = listener.local_addr().unwrap();
        config.data_dir = data.path().to_path_buf();
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        config.tls.trust_roots = vec![ca.ca_path()];
        config.federation.retry_initial = Duration::from_millis(100);
        config.federation.retry_max_interval = Duration::from_secs(1);
        // Every name, its own included: its tenants reach it like any peer.
        config.federation.resolve = resolve.clone();
        tweak(short, &mut config);
        let clock = Clock::system();
        let running =
            scaiwave::server::start_on_with(config.clone(), clock.clone(), listener, http)
                .await
                .unwrap();
        let admin_token = std::fs::read_to_string(data.path().join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
        servers.push(Server {
            short: short.to_string(),
            name: config.server_name.clone(),
            addr: running.addr,
            config,
            running: Some(running),
            http,
            _data: Some(data),
            admin_token,
            instance: None,
        });
    }
    for (tenant, instance) in tenants {
        let host = servers.iter().find(|s| s.short == *instance).unwrap();
        let name = full_name(tenant, host.addr);
        let created = host
            .app()
            .create_tenant(&name, Some(ca.leaf(tenant)))
            .unwrap();
        let mut config = host.config.clone();
        config.server_name = name.clone();
        let tenant = Server {
            short: tenant.to_string(),
            name,
            addr: host.addr,
            config,
            running: None,
            http,
            _data: None,
            admin_token: created.admin_token,
            instance: Some(instance.to_string()),
        };
        servers.push(tenant);
    }
    TestNet {
        http: client(&ca, hosts.clone(), false),
        ca,
        servers,
        hosts,
    }
}

/// `<short>:<port>` of a server listening on `addr`.
pub fn full_name(short: &str, addr: SocketAddr) -> ServerName {
    ServerName::parse(&format!("{short}:{}", addr.port())).unwrap()
}

/// An HTTPS client that trusts only `ca` and finds each name in `names`
/// (HTTP/1.1 only if `http1_only`, else whatever ALPN chooses).
pub fn client(ca: &Ca, names: BTreeMap<String, SocketAddr>, http1_only: bool) -> reqwest::Client {
    scaiwave::tls::install_crypto_provider();
    let ca_pem = std::fs::read(ca.ca_path()).unwrap();
    let mut builder = reqwest::Client::builder()
        // A server that stops answering fails the test instead of hanging it.
        .timeout(Duration::from_secs(TEST_REQUEST_SECS))
        .tls_certs_only([reqwest::Certificate::from_pem(&ca_pem).unwrap()])
        .dns_resolver(Arc::new(TestResolver(names)));
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

/// An HTTPS call to `server`'s local API (`token` as bearer, if any): the
/// status and the JSON answer (`Null` if it is not JSON).
pub async fn request(
    http: &reqwest::Client,
    server: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http.request(method, format!("https://{server}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&b).unwrap());
    }
    let resp = req.send().await.expect("request reaches the server");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A participant on a server, with its token.
#[derive(Clone)]
pub struct User {
    /// The short name of its server (`a.test`).
    pub server: String,
    /// `@local:<server_name>`, port included.
    pub fqid: String,
    pub token: String,
}

impl TestNet {
    /// A server by its short name (`a.test`) or its server_name.
    pub fn server(&self, name: &str) -> &Server {
        self.servers
            .iter()
            .find(|s| s.short == name || s.name.as_str() == name)
            .expect("known server")
    }

    /// The tenant `short` (a server, or a tenant of another's instance)
    /// as its instance holds it.
    pub fn tenant(&self, short: &str) -> Arc<scaiwave::app::Tenant> {
        let s = self.server(short);
        let instance = self.server(s.instance.as_deref().unwrap_or(short));
        instance.app().tenant(Some(s.name.as_str())).unwrap()
    }

    pub fn server_mut(&mut self, name: &str) -> &mut Server {
        self.servers
            .iter_mut()
            .find(|s| s.short == name || s.name.as_str() == name)
            .expect("known server")
    }

    /// The server_name (port included) of the server called `short`; names
    /// that are not servers of this net are returned as they are.
    pub fn name(&self, short: &str) -> String {
        self.servers
            .iter()
            .find(|s| s.short == short || s.name.as_str() == short)
            .map(|s| s.name.to_string())
            .unwrap_or_else(|| short.to_string())
    }

    /// `@{local}:{server_name of short}`.
    pub fn fqid(&self, local: &str, short: &str) -> String {
        format!("@{local}:{}", self.name(short))
    }

    /// An HTTPS call to a server's local API (`token` as bearer, if any).
    pub async fn call(
        &self,
        server: &str,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        request(&self.http, &self.name(server), method, path, token, body).await
    }

    pub async fn admin(
        &self,
        server: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let token = self.server(server).admin_token.clone();
        self.call(server, method, path, Some(&token), body).await
    }

    pub async fn user(&self, server: &str, local: &str) -> User {
        let (status, v) = self
            .admin(
                server,
                reqwest::Method::POST,
                "/v1/admin/participants",
                Some(json!({"local_id": local, "display_name": local.to_uppercase()})),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        User {
            server: server.into(),
            fqid: v["fqid"].as_str().unwrap().into(),
            token: v["token"].as_str().unwrap().into(),
        }
    }

    pub async fn as_user(
        &self,
        u: &User,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call(&u.server, method, path, Some(&u.token), body)
            .await
    }

    pub async fn stop_all(&mut self) {
        for s in &mut self.servers {
            s.stop().await;
        }
    }

    // --- the local API, as a participant ---

    /// `POST /v1/rooms` as `u` (must answer 200): the new room's id.
    pub async fn create_room(&self, u: &User, body: Value) -> String {
        let (s, v) = self.as_user(u, Method::POST, "/v1/rooms", Some(body)).await;
        assert_eq!(s, 200, "{v}");
        v["room_id"].as_str().unwrap().to_string()
    }

    /// The rooms `u` lists (`GET /v1/rooms`).
    pub async fn rooms(&self, u: &User) -> Vec<Value> {
        let (_, v) = self.as_user(u, Method::GET, "/v1/rooms", None).await;
        v["rooms"].as_array().unwrap().clone()
    }

    /// `POST /v1/rooms/{room}/messages` as `u`.
    pub async fn post(&self, u: &User, room: &str, body: Value) -> (u16, Value) {
        let path = format!("/v1/rooms/{}/messages", enc(room));
        self.as_user(u, Method::POST, &path, Some(body)).await
    }

    /// `POST /v1/rooms/{room}/reactions` as `u`.
    pub async fn react(
        &self,
        u: &User,
        room: &str,
        target: &str,
        key: &str,
        action: &str,
    ) -> (u16, Value) {
        let path = format!("/v1/rooms/{}/reactions", enc(room));
        let body = json!({"target": target, "key": key, "action": action});
        self.as_user(u, Method::POST, &path, Some(body)).await
    }

    /// The messages of `room` as `u` sees them (the call must answer 200).
    pub async fn messages(&self, u: &User, room: &str) -> Vec<Value> {
        let path = format!("/v1/rooms/{}/messages", enc(room));
        let (s, v) = self.as_user(u, Method::GET, &path, None).await;
        assert_eq!(s, 200, "{v}");
        v["messages"].as_array().unwrap().clone()
    }

    /// `GET /v1/rooms/{room}/members` as `u`: the whole answer.
    pub async fn members(&self, u: &User, room: &str) -> Value {
        let path = format!("/v1/rooms/{}/members", enc(room));
        self.as_user(u, Method::GET, &path, None).await.1
    }

    /// The fqids of `room`'s members as `u` sees them (none if the answer
    /// lists no members, e.g. `u` is no longer in the room).
    pub async fn member_ids(&self, u: &User, room: &str) -> Vec<String> {
        self.members(u, room).await["members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| m["fqid"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `fqid`'s row in `room`'s members as `u` sees them, if it is listed
    /// (the answer must list members).
    pub async fn member(&self, u: &User, room: &str, fqid: &str) -> Option<Value> {
        let members = self.members(u, room).await;
        members["members"]
            .as_array()
            .unwrap_or_else(|| panic!("a member list: {members}"))
            .iter()
            .find(|m| m["fqid"] == fqid)
            .cloned()
    }

    /// `POST /v1/rooms/{room}/invitations` for `fqid`, as `inviter`.
    pub async fn post_invitation(&self, inviter: &User, room: &str, fqid: &str) -> (u16, Value) {
        let path = format!("/v1/rooms/{}/invitations", enc(room));
        self.as_user(inviter, Method::POST, &path, Some(json!({ "fqid": fqid })))
            .await
    }

    /// `u`'s pending invitations (`GET /v1/me/invitations`).
    pub async fn invitations(&self, u: &User) -> Vec<Value> {
        let (_, v) = self
            .as_user(u, Method::GET, "/v1/me/invitations", None)
            .await;
        v["invitations"].as_array().unwrap().clone()
    }

    /// Wait until `guest` lists an invitation that `matches`; its invite_id.
    pub async fn wait_for_invitation(
        &self,
        guest: &User,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> String {
        eventually(what, || async {
            self.invitations(guest).await.iter().any(&matches)
        })
        .await;
        let found = self.invitations(guest).await;
        let invitation = found.iter().find(|i| matches(i)).expect("still listed");
        invitation["invite_id"].as_str().unwrap().to_string()
    }

    /// `POST /v1/me/invitations/{invite_id}/accept` as `guest`.
    pub async fn accept(&self, guest: &User, invite_id: &str) -> (u16, Value) {
        let path = format!("/v1/me/invitations/{invite_id}/accept");
        self.as_user(guest, Method::POST, &path, None).await
    }

    /// `POST /v1/me/invitations/{invite_id}/decline` as `guest`.
    pub async fn decline(&self, guest: &User, invite_id: &str) -> (u16, Value) {
        let path = format!("/v1/me/invitations/{invite_id}/decline");
        self.as_user(guest, Method::POST, &path, None).await
    }

    /// `inviter` invites `guest` to `room` (must answer 200); returns the
    /// invite_id once `guest`'s `GET /v1/me/invitations` lists it.
    pub async fn invite(&self, inviter: &User, room: &str, guest: &User) -> String {
        let (s, inv) = self.post_invitation(inviter, room, &guest.fqid).await;
        assert_eq!(s, 200, "{inv}");
        let id = inv["invite_id"].as_str().unwrap().to_string();
        let what = format!("{} sees invitation {id}", guest.fqid);
        self.wait_for_invitation(guest, &what, |i| i["invite_id"] == id.as_str())
            .await
    }

    /// `invite`, then `guest` accepts (must answer 200): the accept answer.
    pub async fn invite_and_join(&self, inviter: &User, room: &str, guest: &User) -> Value {
        let id = self.invite(inviter, room, guest).await;
        let (s, v) = self.accept(guest, &id).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    // --- the admin API ---

    /// The rows of `server`'s `GET /v1/admin/federation/peers`.
    pub async fn peers(&self, server: &str) -> Vec<Value> {
        let (_, peers) = self
            .admin(server, Method::GET, "/v1/admin/federation/peers", None)
            .await;
        peers["peers"].as_array().unwrap().clone()
    }

    /// `peer`'s row in `server`'s `GET /v1/admin/federation/peers` (it must
    /// have one).
    pub async fn peer_row(&self, server: &str, peer: &str) -> Value {
        let name = self.name(peer);
        let peers = self.peers(server).await;
        peers
            .iter()
            .find(|p| p["server_name"] == name.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("no row for {name}: {peers:?}"))
    }

    /// `PUT /v1/admin/federation/policy` on `server`.
    pub async fn set_policy(&self, server: &str, patch: Value) -> (u16, Value) {
        self.admin(
            server,
            Method::PUT,
            "/v1/admin/federation/policy",
            Some(patch),
        )
        .await
    }

    /// `GET /v1/admin/audit?{query}` on `server`: the whole answer.
    pub async fn audit(&self, server: &str, query: &str) -> Value {
        let path = format!("/v1/admin/audit?{query}");
        self.admin(server, Method::GET, &path, None).await.1
    }

    /// `POST /v1/admin/rooms/{room}/federation/backfill` on `server`.
    pub async fn admin_backfill(&self, server: &str, room: &str) -> (u16, Value) {
        let path = format!("/v1/admin/rooms/{}/federation/backfill", enc(room));
        self.admin(server, Method::POST, &path, None).await
    }

    // --- server to server ---

    /// A signed S2S request from `from`'s real client and key.
    pub async fn s2s(
        &self,
        from: &str,
        to: &str,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let reply = self
            .tenant(from)
            .fed
            .s2s(
                method,
                &self.name(to).parse().unwrap(),
                path,
                body.map(|b| serde_json::to_vec(&b).unwrap()),
                Duration::from_secs(10),
            )
            .await
            .unwrap()
            .unwrap();
        (
            reply.status,
            serde_json::from_slice(&reply.body).unwrap_or(Value::Null),
        )
    }

    /// A signed S2S `GET path` from `from` to `to`.
    pub async fn s2s_get(&self, from: &str, to: &str, path: &str) -> (u16, Value) {
        self.s2s(from, to, http::Method::GET, path, None).await
    }

    /// `POST /_scaiwave/federation/v1/send` from `from` to `to`.
    pub async fn send_as(&self, from: &str, to: &str, body: Value) -> (u16, Value) {
        self.s2s(
            from,
            to,
            http::Method::POST,
            "/_scaiwave/federation/v1/send",
            Some(body),
        )
        .await
    }

    /// A transaction `txn_id` of `events` (no EDUs) from `from` to `to`.
    pub async fn send_events(
        &self,
        from: &str,
        to: &str,
        txn_id: &str,
        events: Vec<Value>,
    ) -> (u16, Value) {
        let body = json!({"txn_id": txn_id, "events": events, "edus": []});
        self.send_as(from, to, body).await
    }

    /// One event in its own transaction: the status and the event's error code.
    pub async fn send_one(
        &self,
        from: &str,
        to: &str,
        txn_id: &str,
        event: &Event,
    ) -> (u16, Option<String>) {
        let (s, v) = self
            .send_events(from, to, txn_id, vec![event.to_wire_value(None)])
            .await;
        (
            s,
            v["results"][0]["error"]["code"]
                .as_str()
                .map(str::to_string),
        )
    }

    /// The events of `room` as its host serves them to `asker`.
    pub async fn host_events(&self, host: &str, asker: &str, room: &str) -> Vec<Value> {
        let path = format!("/_scaiwave/federation/v1/rooms/{}/backfill", enc(room));
        let (s, v) = self.s2s_get(asker, host, &path).await;
        assert_eq!(s, 200, "{v}");
        v["events"].as_array().unwrap().clone()
    }
}

/// A plain message's content.
pub fn message(body: &str) -> Content {
    Content::Message {
        body: body.into(),
        thread_root: None,
        reply_to: None,
        mentions: vec![],
    }
}

/// An event by `sender` in `room`, stamped by `app`'s clock and signed with
/// `app`'s current key.
pub fn signed_event(app: &App, room: &str, sender: &str, content: Content) -> Event {
    let key = app.first.fed.keys.current().unwrap();
    signed_event_with(app, room, sender, content, &key.key_id, &key.signing)
}

/// As `signed_event`, but signed by `signing` under the name `key_id`
/// (which need not be that key's: a test can forge).
pub fn signed_event_with(
    app: &App,
    room: &str,
    sender: &str,
    content: Content,
    key_id: &KeyId,
    signing: &ed25519_dalek::SigningKey,
) -> Event {
    Event::create(
        RoomId::parse(room).unwrap(),
        Fqid::parse(sender).unwrap(),
        app.clock.now_ms(),
        content,
        key_id,
        signing,
    )
}

pub fn enc(id: &str) -> String {
    scaiwave::federation::peer_api::encode_segment(id)
}

/// Wait (bounded) until `check` holds; never a fixed sleep.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, Duration::from_secs(20), check).await
}

/// `eventually`, waiting at most `limit`.
pub async fn eventually_within<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A stand-in for a peer at `addr` that answers every request with the
/// next scripted status (the last one repeats), over real TLS with a
/// certificate for `host`. Returns the request counter and a stop switch.
pub async fn scripted_peer(
    ca: &Ca,
    host: &str,
    addr: SocketAddr,
    statuses: Vec<(u16, Option<u64>)>,
) -> (
    Arc<std::sync::atomic::AtomicUsize>,
    tokio::sync::oneshot::Sender<()>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (cert, key) = ca.leaf(host);
    let certs =
        scaiwave::tls::Certificates::new(host, scaiwave::tls::certified_key(&cert, &key).unwrap());
    let tls = scaiwave::tls::server_config(certs).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let counter = hits.clone();
    tokio::spawn(async move {
        // Connections die with the stand-in, so no pooled client keeps
        // talking to it after the real server is back.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (tcp, _) = tokio::select! {
                a = listener.accept() => a.unwrap(),
                _ = &mut stopped => {
                    connections.abort_all();
                    return;
                }
            };
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            let statuses = statuses.clone();
            connections.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |_req: http::Request<hyper::body::Incoming>| {
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        let (status, retry_after) = statuses[n.min(statuses.len() - 1)];
                        async move {
                            let mut resp = http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"{}"),
                            ));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            if let Some(secs) = retry_after {
                                resp.headers_mut()
                                    .insert("retry-after", secs.to_string().parse().unwrap());
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    (hits, stop)
}
