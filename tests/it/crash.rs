//! Crash safety with real processes and SIGKILL: queued events survive a
//! hard kill of the sender, and accepted events survive a hard kill of the
//! receiver right after it answered 200; every event arrives exactly once.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::process::Process;
use crate::testnet::{self, enc, eventually_within, Ca};

struct Node {
    /// The short name a test calls it by (`a.test`).
    short: &'static str,
    /// Its server_name, port included (`a.test:40123`).
    name: String,
    dir: tempfile::TempDir,
    proc: Option<Process>,
}

struct ProcNet {
    _ca: Ca,
    nodes: Vec<Node>,
    http: reqwest::Client,
}

impl ProcNet {
    /// Configs for servers called `names`, each named `<short>:<port>` like
    /// `testnet::start`'s; none started yet.
    fn new(names: &[&'static str], sync: &str) -> ProcNet {
        let ca = Ca::new();
        // Ports are picked up front so each config can name the others.
        let addrs: Vec<SocketAddr> = names
            .iter()
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
            })
            .collect();
        let full: Vec<String> = names
            .iter()
            .zip(&addrs)
            .map(|(n, a)| testnet::full_name(n, *a).to_string())
            .collect();
        let mut nodes = Vec::new();
        for (i, short) in names.iter().enumerate() {
            let name = &full[i];
            let dir = tempfile::tempdir().unwrap();
            let (cert, key) = ca.leaf(short);
            let mut resolve = String::new();
            for (j, other) in full.iter().enumerate() {
                if i != j {
                    resolve.push_str(&format!("\"{other}\" = \"{}\"\n", addrs[j]));
                }
            }
            let toml = format!(
                "server_name = \"{name}\"\nlisten = \"{}\"\ndata_dir = \"{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\ntrust_roots = [\"{}\"]\n[storage]\nsync = \"{sync}\"\n[federation]\nretry_initial = \"100ms\"\nretry_max_interval = \"500ms\"\n[federation.resolve]\n{resolve}",
                addrs[i],
                dir.path().join("data").display(),
                cert.display(),
                key.display(),
                ca.ca_path().display()
            );
            std::fs::write(dir.path().join("scaiwave.toml"), toml).unwrap();
            nodes.push(Node {
                short,
                name: name.clone(),
                dir,
                proc: None,
            });
        }
        let map = names
            .iter()
            .zip(&addrs)
            .map(|(n, a)| (n.to_string(), *a))
            .collect();
        let http = testnet::client(&ca, map, false);
        ProcNet {
            _ca: ca,
            nodes,
            http,
        }
    }

    fn node(&mut self, short: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.short == short).unwrap()
    }

    /// The server_name (port included) of the server called `short`.
    fn name(&self, short: &str) -> &str {
        &self.nodes.iter().find(|n| n.short == short).unwrap().name
    }

    fn start(&mut self, name: &str) {
        let node = self.node(name);
        let config = node.dir.path().join("scaiwave.toml");
        let mut p = Process::serve(
            node.dir.path(),
            &[("SCAIWAVE_CONFIG", config.display().to_string())],
        );
        p.wait_for("scaiwave is serving HTTPS");
        node.proc = Some(p);
    }

    fn kill9(&mut self, name: &str) {
        let mut p = self.node(name).proc.take().expect("running");
        p.signal(9);
        let status = p.wait_exit();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }

    fn token(&self, short: &str) -> String {
        let node = self.nodes.iter().find(|n| n.short == short).unwrap();
        std::fs::read_to_string(node.dir.path().join("data/admin-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// An HTTPS call to the server called `server`, at its server_name.
    async fn call(
        &self,
        server: &str,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let server = self.name(server);
        testnet::request(&self.http, server, method, path, Some(token), body).await
    }

    /// A new participant `local` on `server`: its token.
    async fn participant(&self, server: &str, local: &str) -> String {
        let (_, v) = self
            .call(
                server,
                Method::POST,
                "/v1/admin/participants",
                &self.token(server),
                Some(json!({ "local_id": local })),
            )
            .await;
        v["token"].as_str().unwrap().to_string()
    }

    /// Post a message with `body` in `room` on `server`, as `token`'s holder.
    async fn post(&self, server: &str, token: &str, room: &str, body: String) -> u16 {
        let path = format!("/v1/rooms/{}/messages", enc(room));
        self.call(
            server,
            Method::POST,
            &path,
            token,
            Some(json!({ "body": body })),
        )
        .await
        .0
    }

    async fn queue_depth(&self, server: &str, peer: &str) -> u64 {
        let token = self.token(server);
        let (_, v) = self
            .call(
                server,
                Method::GET,
                "/v1/admin/federation/peers",
                &token,
                None,
            )
            .await;
        v["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["server_name"] == self.name(peer))
            .map(|p| p["queue_depth"].as_u64().unwrap())
            .unwrap_or(0)
    }
}

/// Processes restart in these waits: allow them longer than `eventually`.
const PROCESS_WAIT: Duration = Duration::from_secs(30);

async fn bodies(net: &ProcNet, token: &str, path: &str) -> Vec<String> {
    let (s, v) = net.call("b.test", Method::GET, path, token, None).await;
    if s != 200 {
        return Vec::new();
    }
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_sender_and_receiver_loses_and_duplicates_nothing() {
    sigkill_loses_and_duplicates_nothing("fsync").await;
}

/// The crash-only mode keeps the same promise for a crash of the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sync_flush_sigkill_loses_and_duplicates_nothing() {
    sigkill_loses_and_duplicates_nothing("flush").await;
}

/// Both servers SIGKILLed in turn with `[storage] sync = <sync>`.
async fn sigkill_loses_and_duplicates_nothing(sync: &str) {
    let mut net = ProcNet::new(&["a.test", "b.test"], sync);
    net.start("a.test");
    net.start("b.test");
    let alice_t = net.participant("a.test", "alice").await;
    let bob_t = net.participant("b.test", "bob").await;
    let (_, room) = net
        .call(
            "a.test",
            Method::POST,
            "/v1/rooms",
            &alice_t,
            Some(json!({"name": "crash"})),
        )
        .await;
    let room = room["room_id"].as_str().unwrap().to_string();
    let (s, inv) = net
        .call(
            "a.test",
            Method::POST,
            &format!("/v1/rooms/{}/invitations", enc(&room)),
            &alice_t,
            Some(json!({"fqid": format!("@bob:{}", net.name("b.test"))})),
        )
        .await;
    assert_eq!(s, 200, "{inv}");
    let invite = inv["invite_id"].as_str().unwrap().to_string();
    let mut tries = 0;
    loop {
        let (s, v) = net
            .call(
                "b.test",
                Method::POST,
                &format!("/v1/me/invitations/{invite}/accept"),
                &bob_t,
                None,
            )
            .await;
        if s == 200 {
            break;
        }
        tries += 1;
        assert!(tries < 200, "accept never worked: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let messages = format!("/v1/rooms/{}/messages?limit=1000", enc(&room));

    // Receiver down: alice's messages queue on a.test.
    net.kill9("b.test");
    for i in 0..20 {
        let s = net
            .post("a.test", &alice_t, &room, format!("m{i:02}"))
            .await;
        assert_eq!(s, 200);
    }
    assert_eq!(net.queue_depth("a.test", "b.test").await, 20);
    // Sender killed hard with its queue full; both come back.
    net.kill9("a.test");
    net.start("a.test");
    net.start("b.test");
    let (net_ref, bob_ref, msg_ref) = (&net, &bob_t, &messages);
    eventually_within("a's queue drains to b", PROCESS_WAIT, || async move {
        bodies(net_ref, bob_ref, msg_ref).await.len() == 20
    })
    .await;
    let want: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
    assert_eq!(
        bodies(&net, &bob_t, &messages).await,
        want,
        "all 20, once each, in host order"
    );

    // Receiver killed hard right after it answered 200 for a second batch.
    for i in 20..40 {
        net.post("a.test", &alice_t, &room, format!("m{i:02}"))
            .await;
    }
    let net_ref = &net;
    eventually_within(
        "a's queue is empty (b answered 200)",
        PROCESS_WAIT,
        || async move { net_ref.queue_depth("a.test", "b.test").await == 0 },
    )
    .await;
    net.kill9("b.test");
    net.start("b.test");
    let want: Vec<String> = (0..40).map(|i| format!("m{i:02}")).collect();
    assert_eq!(
        bodies(&net, &bob_t, &messages).await,
        want,
        "what b accepted survived the kill, once each"
    );
    for n in ["a.test", "b.test"] {
        if let Some(mut p) = net.node(n).proc.take() {
            p.signal(15);
            assert_eq!(p.wait_exit().code(), Some(0));
        }
    }
}
