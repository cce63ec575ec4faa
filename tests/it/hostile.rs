//! The open internet: what a client or peer we do not control can make the
//! listener and the outbound client do (SPEC §2, §12 `[limits]`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::testnet::{self, TestNet};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `server` offering only HTTP/1.1, so a test can
/// write raw requests (or nothing) and watch what the server does.
async fn raw_tls(net: &TestNet, server: &str) -> std::io::Result<Tls> {
    let s = net.server(server);
    let mut config = scaiwave::tls::client_config(&[net.ca.ca_path()]).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.addr).await?;
    let sni = rustls::pki_types::ServerName::try_from(s.name.host().to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(sni, tcp)
        .await
}

/// Everything the server sends until it closes the connection, or `None`
/// if it is still open after `limit`.
async fn until_closed(conn: &mut Tls, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status line of the first answer on `conn`.
async fn status_line(conn: &mut Tls) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap().to_string()
}

/// A loopback listener that only counts the connections reaching it.
async fn counting_listener() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = reached.clone();
    tokio::spawn(async move {
        while let Ok((_conn, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, reached)
}

fn short_limits(c: &mut scaiwave::config::Config) {
    c.limits.request_head_timeout = Duration::from_secs(1);
    c.limits.idle_timeout = Duration::from_secs(3);
    c.limits.request_body_timeout = Duration::from_secs(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_and_private_names_are_never_dialled() {
    // Something listening on loopback, which nothing may reach.
    let (target, reached) = counting_listener().await;
    let port = target.port();
    let mut net = testnet::start(&["a.test"], |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let room = net
        .create_room(&alice, json!({"name": "r", "room_type": "standard"}))
        .await;
    for numeric in ["2130706433", "127.1", "0x7f000001", "017700000001"] {
        let name = format!("{numeric}:{port}");
        // A participant cannot name it: the FQID is refused as written.
        let fqid = format!("@x:{name}");
        let (s, v) = net.post_invitation(&alice, &room, &fqid).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("SW_BAD_REQUEST")),
            "{name}: {v}"
        );
        let (s, v) = net
            .as_user(
                &alice,
                Method::POST,
                "/v1/me/federated-dms",
                Some(json!({ "fqid": fqid })),
            )
            .await;
        assert_eq!(s, 400, "{name}: {v}");
        // Nor can an unauthenticated client claiming to be it.
        let resp = net
            .http
            .post("https://a.test/_scaiwave/federation/v1/send")
            .header("scaiwave-origin", &name)
            .header("content-digest", "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:")
            .header(
                "signature-input",
                r#"sw=("@method" "@authority" "@path" "@query" "scaiwave-origin" "content-digest");created=1;keyid="ed25519:AAAAAAAA";alg="ed25519";tag="scaiwave-v1""#,
            )
            .header("signature", "sw=:AAAA:")
            .body("")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{name}");
    }
    // A DNS name that resolves to loopback is refused at connect time.
    let fqid = format!("@x:localhost:{port}");
    let (s, v) = net.post_invitation(&alice, &room, &fqid).await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("private addresses"),
        "the refusal says why: {v}"
    );
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "no connection reached loopback"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_heads_are_closed_without_an_answer() {
    let mut net = testnet::start(&["a.test"], |_, c| short_limits(c)).await;

    // A connection that never sends a request.
    let mut silent = raw_tls(&net, "a.test").await.unwrap();
    let got = until_closed(&mut silent, Duration::from_secs(5)).await;
    assert_eq!(got, Some(vec![]), "closed, with nothing sent back");

    // Slowloris: a head that trickles in, a byte at a time.
    let mut slow = raw_tls(&net, "a.test").await.unwrap();
    let head = b"GET /.well-known/scaiwave/server HTTP/1.1\r\nHost: a.test\r\nX-Slow: ";
    let mut closed = false;
    for byte in head.iter().chain(std::iter::repeat(&b'x')).take(60) {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !closed {
        let got = until_closed(&mut slow, Duration::from_secs(3)).await;
        assert_eq!(got, Some(vec![]), "closed without an answer");
    }

    // Keep-alive: a served connection lives on past the head timeout while
    // idle, and is closed after the idle timeout.
    let mut kept = raw_tls(&net, "a.test").await.unwrap();
    let get = b"GET /.well-known/scaiwave/server HTTP/1.1\r\nHost: a.test\r\n\r\n";
    kept.write_all(get).await.unwrap();
    assert_eq!(status_line(&mut kept).await, "HTTP/1.1 200 OK");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kept.write_all(get).await.unwrap();
    // (the rest of the first answer may still be buffered; the second follows)
    let got = until_closed(&mut kept, Duration::from_secs(8))
        .await
        .expect("closed when idle");
    let answers = String::from_utf8_lossy(&got)
        .matches("HTTP/1.1 200 OK")
        .count();
    assert_eq!(
        answers, 1,
        "the second request was served before the idle close"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_caps_are_closed_at_accept() {
    let mut net = testnet::start(&["a.test"], |_, c| {
        c.limits.connections_max = 4;
        c.limits.connections_per_ip_max = 2;
    })
    .await;
    let first = raw_tls(&net, "a.test").await.unwrap();
    let _second = raw_tls(&net, "a.test").await.unwrap();
    assert!(
        raw_tls(&net, "a.test").await.is_err(),
        "a third from one address is refused"
    );
    drop(first);
    testnet::eventually("a slot is free again", || async {
        raw_tls(&net, "a.test").await.is_ok()
    })
    .await;
    net.stop_all().await;
}

/// Whether `TCP_NODELAY` is set on the socket of this process whose local
/// address is `local` and whose peer is `peer`; `None` if there is none.
fn nodelay_of_socket(local: std::net::SocketAddr, peer: std::net::SocketAddr) -> Option<bool> {
    let sockaddr =
        |fd: i32,
         get: unsafe extern "C" fn(i32, *mut libc::sockaddr, *mut libc::socklen_t) -> i32| {
            // SAFETY: a zeroed sockaddr_storage is valid, and its size is passed.
            let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: addr and len describe a writable sockaddr_storage.
            let rc = unsafe { get(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len) };
            if rc != 0 || addr.ss_family != libc::AF_INET as libc::sa_family_t {
                return None;
            }
            // SAFETY: the family says it is a sockaddr_in.
            let v4 = unsafe { *(&addr as *const _ as *const libc::sockaddr_in) };
            Some(std::net::SocketAddr::from((
                u32::from_be(v4.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(v4.sin_port),
            )))
        };
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if sockaddr(fd, libc::getsockname) != Some(local)
            || sockaddr(fd, libc::getpeername) != Some(peer)
        {
            continue;
        }
        let mut on: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: on and len describe a writable c_int.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                &mut on as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        return (rc == 0).then_some(on != 0);
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connections_are_not_delayed_by_nagle() {
    // An answer is a few small writes; with Nagle's algorithm each could
    // wait for the client's delayed ACK (12 ms of a 33 ms /send, measured).
    let mut net = testnet::start(&["a.test"], |_, _| {}).await;
    let conn = raw_tls(&net, "a.test").await.unwrap();
    let client = conn.get_ref().0.local_addr().unwrap();
    let server = net.server("a.test").addr;
    assert_eq!(
        nodelay_of_socket(server, client),
        Some(true),
        "the server's end of the connection has TCP_NODELAY"
    );
    assert_eq!(
        nodelay_of_socket(client, server),
        Some(false),
        "the check can tell: this test's own end is left as the OS made it"
    );
    drop(conn);
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_read_only_for_routes_that_exist_after_authentication() {
    let mut net = testnet::start(&["a.test"], |_, c| {
        // Long enough that waiting for the body would show.
        c.limits.request_body_timeout = Duration::from_secs(30);
    })
    .await;
    // Each head announces a body that never comes; each is answered at once.
    for (head, status) in [
        (
            "POST /_scaiwave/federation/v1/send",
            "HTTP/1.1 401 Unauthorized",
        ),
        (
            "POST /_scaiwave/federation/v1/nothing-here",
            "HTTP/1.1 404 Not Found",
        ),
        ("POST /v1/rooms", "HTTP/1.1 401 Unauthorized"),
        ("POST /elsewhere", "HTTP/1.1 404 Not Found"),
    ] {
        let mut conn = raw_tls(&net, "a.test").await.unwrap();
        let req = format!("{head} HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000000\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(status_line(&mut conn).await, status, "{head}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{head}: answered without the body"
        );
    }
    // Over 8 MiB declared: 413 before anything is read.
    let mut conn = raw_tls(&net, "a.test").await.unwrap();
    let req = "POST /_scaiwave/federation/v1/send HTTP/1.1\r\nHost: a.test\r\nContent-Length: 9000000\r\n\r\n";
    conn.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(
        status_line(&mut conn).await,
        "HTTP/1.1 413 Payload Too Large"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_closed_without_an_answer_and_changes_nothing() {
    let mut net = testnet::start(&["a.test"], |_, c| short_limits(c)).await;
    let alice = net.user("a.test", "alice").await;
    let mut conn = raw_tls(&net, "a.test").await.unwrap();
    let body = br#"{"name": "never made", "room_type": "standard"}"#;
    let head = format!(
        "POST /v1/rooms HTTP/1.1\r\nHost: a.test\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        alice.token,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body[..10]).await.unwrap();
    let got = until_closed(&mut conn, Duration::from_secs(5)).await;
    assert_eq!(got, Some(vec![]), "closed, no answer");
    assert!(net.rooms(&alice).await.is_empty(), "nothing created");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rates_are_limited_per_token_and_per_origin() {
    let mut net = testnet::start(&["a.test", "b.test"], |name, c| {
        if name == "b.test" {
            c.limits.rate_per_origin = "1/h".parse().unwrap();
        }
    })
    .await;
    // Per origin: a burst of twice the rate, then 429 with Retry-After.
    let path = "/_scaiwave/federation/v1/profile/nobody";
    for _ in 0..2 {
        let (s, v) = net.s2s_get("a.test", "b.test", path).await;
        assert_eq!(s, 404, "{v}");
    }
    let (s, v) = net.s2s_get("a.test", "b.test", path).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("SW_FED_RATE_LIMITED")),
        "{v}"
    );
    assert_eq!(v["error"]["retryable"], true);
    net.stop_all().await;

    let mut net = testnet::start(&["a.test"], |_, c| {
        c.limits.rate_per_token = "1/h".parse().unwrap();
    })
    .await;
    // The admin token spent one call creating alice.
    let alice = net.user("a.test", "alice").await;
    for _ in 0..2 {
        let (s, _) = net.as_user(&alice, Method::GET, "/v1/me", None).await;
        assert_eq!(s, 200);
    }
    let resp = net
        .http
        .get("https://a.test/v1/me")
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let wait: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait >= 1, "Retry-After {wait}");
    let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "SW_FED_RATE_LIMITED");
    // Another token has its own budget.
    let (s, v) = net
        .admin("a.test", Method::GET, "/v1/admin/federation/identity", None)
        .await;
    assert_eq!(s, 200, "{v}");
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_fetches_no_key_for_an_event_whose_origin_is_not_the_sender() {
    // c.test is somewhere we can see every connection to.
    let (c_addr, reached) = counting_listener().await;
    let extra = std::collections::BTreeMap::from([("c.test".to_string(), c_addr)]);
    let mut net = testnet::start_with_extra(&["a.test", "b.test"], extra, |_, _| {}).await;
    let alice = net.user("a.test", "alice").await;
    let room = net
        .create_room(&alice, json!({"name": "r", "room_type": "standard"}))
        .await;
    let b = net.server("b.test").app().clone();
    let forged = testnet::signed_event(&b, &room, "@eve:c.test", testnet::message("hi"));
    let (s, code) = net.send_one("b.test", "a.test", "t1", &forged).await;
    assert_eq!((s, code.as_deref()), (200, Some("SW_FED_BAD_EVENT")));
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "c.test was never contacted"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_requests_cannot_bloat_the_audit_log() {
    let mut net = testnet::start(&["a.test"], |_, _| {}).await;
    let junk = format!("sw=(\"{}\")", "x".repeat(12 * 1024));
    for _ in 0..60 {
        let resp = net
            .http
            .get("https://a.test/_scaiwave/federation/v1/profile/alice")
            .header("scaiwave-origin", "victim.test")
            .header("signature-input", &junk)
            .header("signature", "sw=:AAAA:")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);
    }
    let v = net
        .audit(
            "a.test",
            "action=federation.signature_verify_failed&limit=1000",
        )
        .await;
    let rows = v["rows"].as_array().unwrap();
    assert!(!rows.is_empty(), "refusals are still audited");
    // 60 requests in a few seconds: at most 10 rows a second were written.
    assert!(
        rows.len() < 60,
        "{} rows for 60 unverified requests",
        rows.len()
    );
    for row in rows {
        assert_eq!(row["unverified"], true, "{row}");
        let detail = row["detail"].as_str().unwrap();
        assert!(detail.len() <= 1024, "detail of {} bytes", detail.len());
    }
    net.stop_all().await;
}

#[test]
fn audit_detail_is_escaped_and_bounded() {
    let d = scaiwave::storage::audit::audit_detail("line\nbreak\u{1b}[31m");
    assert_eq!(d, "line\\nbreak\\u{1b}[31m");
    let long = scaiwave::storage::audit::audit_detail(&"é".repeat(5000));
    assert!(long.len() <= 1024 && long.ends_with('…'), "{}", long.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    // As a permissive umask would leave them: readable by everyone.
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stray = data.join("notes.txt");
    std::fs::write(&stray, "x").unwrap();
    std::fs::set_permissions(&stray, std::fs::Permissions::from_mode(0o644)).unwrap();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = scaiwave::config::Config::default_embedded();
    let port = listener.local_addr().unwrap().port();
    config.server_name = scaiwave::ids::ServerName::parse(&format!("a.test:{port}")).unwrap();
    config.listen = listener.local_addr().unwrap();
    config.data_dir = data.clone();
    let running = scaiwave::server::start_on(config, scaiwave::clock::Clock::system(), listener)
        .await
        .unwrap();

    fn walk(dir: &std::path::Path, found: &mut Vec<(std::path::PathBuf, u32, bool)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if meta.is_dir() {
                found.push((entry.path(), mode, true));
                walk(&entry.path(), found);
            } else if meta.is_file() {
                found.push((entry.path(), mode, false));
            }
        }
    }
    let top = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(top, 0o700, "the data dir");
    let mut found = Vec::new();
    walk(&data, &mut found);
    assert!(found.iter().any(|(p, _, _)| p.ends_with("admin-token")));
    assert!(found.iter().any(|(p, _, dir)| *dir && p.ends_with("db")));
    for (path, mode, dir) in found {
        let want = if dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{}", path.display());
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_entry_matches_its_exact_name_port_included() {
    let (addr, reached) = counting_listener().await;
    let mut net = testnet::start(&["a.test"], |_, c| {
        let name = scaiwave::ids::ServerName::parse("peer.test:9449").unwrap();
        c.federation.resolve.insert(name, addr);
    })
    .await;
    let alice = net.user("a.test", "alice").await;
    let room = net
        .create_room(&alice, json!({"name": "r", "room_type": "standard"}))
        .await;
    // Another port of the same host is not the entry's name: not dialled.
    let (s, _) = net
        .post_invitation(&alice, &room, "@x:peer.test:1234")
        .await;
    assert_ne!(s, 200);
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "peer.test:1234 went elsewhere"
    );
    // The entry's own name is dialled at the entry's address.
    let (s, _) = net
        .post_invitation(&alice, &room, "@x:peer.test:9449")
        .await;
    assert_ne!(s, 200, "nothing answers HTTPS there");
    assert!(
        reached.load(Ordering::SeqCst) > 0,
        "peer.test:9449 reached its entry"
    );
    net.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_request_headers_are_bounded() {
    let mut net = testnet::start(&["a.test"], |_, _| {}).await;
    let get = |bytes: usize| {
        net.http
            .get("https://a.test/.well-known/scaiwave/server")
            .header("x-filler", "x".repeat(bytes))
            .send()
    };
    let small = get(1024).await.unwrap();
    assert_eq!(small.version(), reqwest::Version::HTTP_2);
    assert_eq!(small.status().as_u16(), 200);
    // Past 16 KiB of headers: refused (431, or the stream is reset).
    match get(20 * 1024).await {
        Ok(resp) => assert_eq!(resp.status().as_u16(), 431),
        Err(e) => assert!(!e.is_timeout(), "{e}"),
    }
    net.stop_all().await;
}
