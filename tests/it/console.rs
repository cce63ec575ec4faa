//! The admin console (SPEC §17) in a real browser: Debian's headless
//! Chromium, driven over WebDriver by chromedriver, against two real
//! servers on loopback HTTPS.
//!
//! chromedriver and chromium come from Debian's `chromium-driver` and
//! `chromium`, which `.ci/run` installs; it also sets
//! `BROWSER_TEST_REQUIRED=1`, so a missing browser fails CI. Without that
//! variable a machine lacking them prints "skipped" (`cargo test` must
//! pass on a fresh checkout). The variables are not `SCAIWAVE_*`: the
//! servers the process tests start would read those as configuration and
//! refuse an unknown key.
//!
//! `CONSOLE_SCREENSHOTS=<dir>` also saves every page at 1280 and 375 px
//! wide into `<dir>` (how `docs/screenshots/` is made).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::Method;
use serde_json::{json, Value};

use crate::testnet::{self, eventually};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const FIREFOX: &str = "/usr/bin/firefox-esr";
/// WebDriver's Enter key (a "\n" is only a newline to geckodriver).
const ENTER: char = '\u{E007}';

/// The browsers the console is tested in.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Engine {
    /// Debian's `chromium` + `chromium-driver`.
    Chromium,
    /// Debian's `firefox-esr` + `geckodriver` (`cargo install geckodriver`:
    /// Debian does not package it).
    Firefox,
}

impl Engine {
    /// The WebDriver server and the browser, if both are installed.
    fn programs(self) -> Option<(PathBuf, &'static str)> {
        let (driver, browser, how) = match self {
            Engine::Chromium => (
                Some(PathBuf::from(CHROMEDRIVER)),
                CHROMIUM,
                "apt-get install chromium chromium-driver",
            ),
            Engine::Firefox => (
                on_path("geckodriver"),
                FIREFOX,
                "apt-get install firefox-esr; cargo install geckodriver",
            ),
        };
        match driver {
            Some(d) if d.exists() && std::path::Path::new(browser).exists() => Some((d, browser)),
            _ => {
                assert!(
                    std::env::var_os("BROWSER_TEST_REQUIRED").is_none(),
                    "{self:?} is missing: {how}"
                );
                eprintln!("skipped: {self:?} is not installed ({how})");
                None
            }
        }
    }

    /// Headless, finding every name in `hosts` at 127.0.0.1. The test CA
    /// is not in the browser's store (`acceptInsecureCerts`); the TLS
    /// itself is real.
    fn capabilities(self, browser: &str, hosts: &[&str]) -> Value {
        match self {
            Engine::Chromium => {
                let rules: Vec<String> =
                    hosts.iter().map(|h| format!("MAP {h} 127.0.0.1")).collect();
                json!({
                    "browserName": "chrome",
                    "acceptInsecureCerts": true,
                    "goog:chromeOptions": {
                        "binary": browser,
                        "args": [
                            "--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
                            "--disable-background-networking", "--disable-component-update",
                            "--disable-sync",
                            format!("--host-resolver-rules={}", rules.join(", ")),
                            "--window-size=1280,900",
                        ],
                    },
                })
            }
            Engine::Firefox => json!({
                "browserName": "firefox",
                "acceptInsecureCerts": true,
                "moz:firefoxOptions": {
                    "binary": browser,
                    "args": ["-headless", "-width", "1280", "-height", "900"],
                    "prefs": {
                        // These names resolve to the loopback address.
                        "network.dns.localDomains": hosts.join(","),
                        "network.dns.disableIPv6": true,
                        "app.update.enabled": false,
                        "datareporting.policy.dataSubmissionEnabled": false,
                        "toolkit.telemetry.enabled": false,
                    },
                },
            }),
        }
    }
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.exists())
}

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The engine's WebDriver server on a free loopback port, and a session.
async fn browser(engine: Engine, hosts: &[&str]) -> Option<(Driver, Client)> {
    let (driver_bin, browser_bin) = engine.programs()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let driver = Driver(
        Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", driver_bin.display())),
    );
    let Value::Object(caps) = engine.capabilities(browser_bin, hosts) else {
        unreachable!("capabilities are an object")
    };
    let url = format!("http://127.0.0.1:{port}");
    let mut last = None;
    for _ in 0..100 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(c) => return Some((driver, c)),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {engine:?} WebDriver session: {last:?}");
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Wait until the element `css` exists and its text contains `needle`.
async fn wait_text(c: &Client, css: &str, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if t.contains(needle) {
                    return t;
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{css}` never showed {needle:?}; page: {}",
            c.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn type_into(c: &Client, css: &str, value: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

async fn open_page(c: &Client, page: &str) {
    click(c, &format!("nav a[data-page='{page}']")).await;
    let css = format!("#page-{page}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !c
        .find(Locator::Css(&css))
        .await
        .unwrap()
        .is_displayed()
        .await
        .unwrap()
    {
        assert!(tokio::time::Instant::now() < deadline, "{page} never shown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every page at both widths, when `CONSOLE_SCREENSHOTS` names a dir.
async fn screenshots(c: &Client) {
    let Some(dir) = std::env::var_os("CONSOLE_SCREENSHOTS").map(PathBuf::from) else {
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    for (width, height) in [(1280, 900), (375, 812)] {
        c.set_window_size(width, height).await.unwrap();
        for page in ["identity", "peers", "policy", "audit", "rooms"] {
            open_page(c, page).await;
            tokio::time::sleep(Duration::from_millis(400)).await;
            let png = c.screenshot().await.unwrap();
            std::fs::write(dir.join(format!("{page}-{width}.png")), png).unwrap();
        }
    }
    c.set_window_size(1280, 900).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_chromium_the_console_signs_in_watches_a_peer_fail_and_removes_it() {
    console_flow(Engine::Chromium).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_firefox_the_console_signs_in_watches_a_peer_fail_and_removes_it() {
    console_flow(Engine::Firefox).await;
}

/// Issue 13's walk through the console, in one browser.
async fn console_flow(engine: Engine) {
    let mut net = testnet::start(&["a.test", "b.test"], |_, c| {
        c.federation.retry_initial = Duration::from_millis(200);
    })
    .await;
    let Some((_driver, c)) = browser(engine, &["a.test", "b.test"]).await else {
        return;
    };
    let a = net.name("a.test");
    let b = net.name("b.test");
    let origin = format!("https://{a}");

    // A room of A's admin, and bob on B to invite into it.
    let (s, room) = net
        .admin(
            "a.test",
            Method::POST,
            "/v1/rooms",
            Some(json!({"name": "Ops", "room_type": "standard"})),
        )
        .await;
    assert_eq!(s, 200, "{room}");
    let room_id = room["room_id"].as_str().unwrap().to_string();
    let bob = net.user("b.test", "bob").await;

    c.goto(&format!("{origin}/admin/")).await.unwrap();
    // A wrong token is refused and kept nowhere.
    type_into(&c, "#token", "not-a-token").await;
    click(&c, "#signin-form button[type=submit]").await;
    wait_text(&c, "#signin-error", "refused").await;
    let kept = c
        .execute(
            "return sessionStorage.length + document.cookie.length",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(kept, json!(0));

    // Sign in from the keyboard: the token and Enter.
    let admin_token = net.server("a.test").admin_token.clone();
    type_into(&c, "#token", &format!("{admin_token}{ENTER}")).await;
    wait_text(&c, "#tenant", &a).await;
    assert!(!c
        .current_url()
        .await
        .unwrap()
        .as_str()
        .contains(&admin_token));

    // Rooms: invite a foreign FQID; bob accepts on B, so B becomes a peer.
    open_page(&c, "rooms").await;
    let item = format!("#rooms li[data-room='{room_id}']");
    wait_text(&c, &item, "Ops").await;
    type_into(&c, &format!("{item} input[placeholder^='@']"), &bob.fqid).await;
    click(&c, &format!("{item} button[type=submit]")).await;
    wait_text(&c, &format!("{item} .status"), "Invited").await;
    let invite_id = net
        .wait_for_invitation(&bob, "bob is invited", |i| i["room_id"] == room_id.as_str())
        .await;
    let (s, v) = net.accept(&bob, &invite_id).await;
    assert_eq!(s, 200, "{v}");
    // A bad FQID is refused with the server's reason, at the room.
    type_into(
        &c,
        &format!("{item} input[placeholder^='@']"),
        "bob-without-a-server",
    )
    .await;
    click(&c, &format!("{item} button[type=submit]")).await;
    wait_text(&c, &format!("{item} .status"), "SW_BAD_REQUEST").await;
    // A room type that never federates says why, with nothing to press.
    let (s, dm) = net
        .admin(
            "a.test",
            Method::POST,
            "/v1/rooms",
            Some(json!({"name": "Secret", "room_type": "incognito"})),
        )
        .await;
    assert_eq!(s, 200, "{dm}");
    let secret = dm["room_id"].as_str().unwrap().to_string();
    open_page(&c, "identity").await;
    open_page(&c, "rooms").await;
    let secret_item = format!("#rooms li[data-room='{secret}']");
    wait_text(&c, &secret_item, "incognito rooms never federate").await;
    assert!(c
        .find_all(Locator::Css(&format!(
            "{secret_item} button, {secret_item} input"
        )))
        .await
        .unwrap()
        .is_empty());

    // Identity: rotating asks first; the old key is then listed.
    open_page(&c, "identity").await;
    let first_key = wait_text(&c, "#identity", "ed25519:").await;
    let (_, id) = net
        .admin("a.test", Method::GET, "/v1/admin/federation/identity", None)
        .await;
    let first_key_id = id["key_id"].as_str().unwrap().to_string();
    assert!(first_key.contains(&first_key_id));
    click(&c, "#rotate").await;
    wait_text(&c, "#confirm-text", "new key").await;
    click(&c, "#confirm-cancel").await;
    let (_, same) = net
        .admin("a.test", Method::GET, "/v1/admin/federation/identity", None)
        .await;
    assert_eq!(same["key_id"], id["key_id"], "cancel rotates nothing");
    click(&c, "#rotate").await;
    click(&c, "#confirm-ok").await;
    wait_text(&c, "#identity-status", "Rotated").await;
    wait_text(&c, "#old-keys", &first_key_id).await;

    // Peers: B is ok; the page is not reloaded from here on.
    open_page(&c, "peers").await;
    let row = format!("#peers tr[data-peer-row='{b}']");
    wait_text(&c, &format!("{row} .badge"), "ok").await;
    c.execute("window.stillTheSamePage = true", vec![])
        .await
        .unwrap();

    // B goes down; A has something for it, and the row turns to backoff
    // with the last error, by the page's own refresh.
    net.server_mut("b.test").stop().await;
    let (s, v) = net
        .admin(
            "a.test",
            Method::POST,
            &format!("/v1/rooms/{}/messages", testnet::enc(&room_id)),
            Some(json!({"body": "are you there?"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    wait_text(&c, &format!("{row} .badge"), "backoff").await;
    let cells = text(&c, &row).await;
    let api_row = net.peer_row("a.test", "b.test").await;
    let code = api_row["last_error"]["code"].as_str().unwrap();
    assert!(
        cells.contains(&format!("{code}: ")),
        "the last error's code is shown: {cells} / {api_row}"
    );
    assert_eq!(
        c.execute("return window.stillTheSamePage === true", vec![])
            .await
            .unwrap(),
        json!(true),
        "the row changed without a reload"
    );
    if engine == Engine::Chromium {
        screenshots(&c).await;
    }

    // Policy: a bad value is shown at its field, and nothing changes.
    let (_, before) = net
        .admin("a.test", Method::GET, "/v1/admin/federation/policy", None)
        .await;
    open_page(&c, "policy").await;
    wait_text(&c, "#policy-title", "Policy").await;
    eventually("the policy form is filled", || async {
        c.find(Locator::Css("#p-max_foreign_participants_per_room"))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap()
            .is_some_and(|v| !v.is_empty())
    })
    .await;
    type_into(&c, "#p-max_foreign_participants_per_room", "-1").await;
    click(&c, "#policy-form button[type=submit]").await;
    wait_text(
        &c,
        "#e-max_foreign_participants_per_room",
        "max_foreign_participants_per_room",
    )
    .await;
    let invalid = c
        .find(Locator::Css("#p-max_foreign_participants_per_room"))
        .await
        .unwrap()
        .attr("aria-invalid")
        .await
        .unwrap();
    assert_eq!(invalid.as_deref(), Some("true"));
    let (_, after) = net
        .admin("a.test", Method::GET, "/v1/admin/federation/policy", None)
        .await;
    assert_eq!(before, after, "a refused policy changes nothing");

    // Audit: filtered by action, newest first.
    open_page(&c, "audit").await;
    type_into(&c, "#audit-action", "federation.*").await;
    click(&c, "#audit-form button[type=submit]").await;
    wait_text(&c, "#audit", "federation.").await;

    // Remove B: the confirmation says it severs shared rooms; afterwards
    // bob is no longer in A's room.
    open_page(&c, "peers").await;
    click(&c, &format!("{row} button")).await;
    let warning = wait_text(&c, "#confirm-text", "severs every room").await;
    assert!(warning.contains(&b), "{warning}");
    click(&c, "#confirm-ok").await;
    wait_text(&c, "#peers-status", "Removed").await;
    let (_, members) = net
        .admin(
            "a.test",
            Method::GET,
            &format!("/v1/rooms/{}/members", testnet::enc(&room_id)),
            None,
        )
        .await;
    let ids: Vec<&str> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["membership"] == "join")
        .filter_map(|m| m["fqid"].as_str())
        .collect();
    assert!(
        !ids.contains(&bob.fqid.as_str()),
        "bob was severed: {members}"
    );

    // Nothing but the server itself was ever asked for anything.
    let urls = c
        .execute(
            "return performance.getEntriesByType('resource').map(e => e.name)\
             .concat(performance.getEntriesByType('navigation').map(e => e.name))",
            vec![],
        )
        .await
        .unwrap();
    let urls = urls.as_array().unwrap();
    assert!(urls.len() >= 3, "{urls:?}");
    for u in urls {
        let u = u.as_str().unwrap();
        assert!(
            u.starts_with(&format!("{origin}/")),
            "{u} is another origin"
        );
    }

    // The page's own headers hold it to that.
    let resp = net
        .http
        .get(format!("{origin}/admin/"))
        .send()
        .await
        .unwrap();
    let csp = resp.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");

    c.close().await.unwrap();
    net.stop_all().await;
}

/// With tenants, the console at a tenant's name is that tenant's: its
/// admin token signs in and shows its identity; the instance's first
/// tenant's token is refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_serves_the_tenant_named_by_host() {
    let mut net =
        testnet::start_with_tenants(&["x.test"], &[("y.test", "x.test")], |_, _| {}).await;
    let Some((_driver, c)) = browser(Engine::Chromium, &["x.test", "y.test"]).await else {
        return;
    };
    let y = net.name("y.test");
    c.goto(&format!("https://{y}/admin/")).await.unwrap();
    let x_token = net.server("x.test").admin_token.clone();
    type_into(&c, "#token", &format!("{x_token}{ENTER}")).await;
    wait_text(&c, "#signin-error", "refused").await;
    let y_token = net.server("y.test").admin_token.clone();
    type_into(&c, "#token", &format!("{y_token}{ENTER}")).await;
    wait_text(&c, "#tenant", &y).await;
    open_page(&c, "identity").await;
    let (_, id) = net
        .admin("y.test", Method::GET, "/v1/admin/federation/identity", None)
        .await;
    wait_text(&c, "#identity", id["key_id"].as_str().unwrap()).await;
    c.close().await.unwrap();
    net.stop_all().await;
}
