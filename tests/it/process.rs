//! The real binary as an operator runs it: embedded default, first-start
//! files, admin commands through the running server's socket, sd_notify,
//! SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_scaiwave");

/// The binary under test: the one cargo built for the tests, or the one
/// named by TEST_SCAIWAVE_BIN (`.ci/run` points it at the static release
/// binary, the one an operator installs).
fn bin() -> String {
    std::env::var("TEST_SCAIWAVE_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// A `scaiwave serve` child in `dir`, with its JSON log lines.
pub struct Process {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl Process {
    pub fn serve(dir: &std::path::Path, envs: &[(&str, String)]) -> Process {
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--log-format", "json"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Process::from_child(cmd.spawn().unwrap())
    }

    /// A started `serve` child whose stderr carries JSON log lines.
    pub fn from_child(mut child: Child) -> Process {
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Process {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Wait (bounded) for a log line whose message contains `needle`.
    pub fn wait_for(&mut self, needle: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.log.push(line.clone());
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains(needle))
                    {
                        return v;
                    }
                }
            }
        }
        panic!("no log line with {needle:?}; log so far: {:#?}", self.log);
    }

    pub fn signal(&self, sig: i32) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.try_recv() {
                    self.log.push(line);
                }
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn admin(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .arg("admin")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A free loopback port and the server_name that goes with it, picked up
/// front so the server can be named with its port.
fn free_listen_address() -> (std::net::SocketAddr, String) {
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    (listen, format!("localhost:{}", listen.port()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_first_start_admin_socket_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, name) = free_listen_address();
    // systemd's side of Type=notify: a datagram socket named in NOTIFY_SOCKET.
    let notify_path = dir.path().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let notified = || {
        let mut buf = [0u8; 256];
        let n = systemd.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut p = Process::serve(
        dir.path(),
        &[
            ("SCAIWAVE_LISTEN", listen.to_string()),
            ("SCAIWAVE_SERVER_NAME", name.clone()),
            ("NOTIFY_SOCKET", notify_path.display().to_string()),
        ],
    );
    let started = p.wait_for("scaiwave is serving HTTPS");
    assert_eq!(
        notified().trim(),
        "READY=1",
        "ready once the listener is up"
    );
    let addr: std::net::SocketAddr = started["fields"]["addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(addr, listen);

    // First-start files: the admin token is 0600 and never logged.
    let data = dir.path().join("scaiwave-data");
    let token_path = data.join("admin-token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(token.len(), 64, "256-bit token in hex");
    assert!(
        p.log.iter().all(|l| !l.contains(&token)),
        "the token never reaches the log"
    );
    assert!(
        p.log.iter().any(|l| l.contains("admin-token")),
        "the token's path is logged"
    );

    // The descriptor over HTTPS, with the certificate the data dir's local
    // CA issued: the CA is what a client (or a peer) trusts.
    scaiwave::tls::install_crypto_provider();
    let cert = std::fs::read(data.join("tls-ca.pem")).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&cert).unwrap()])
        .resolve("localhost", addr)
        .build()
        .unwrap();
    // The URL's authority is the server_name itself.
    let url = format!("https://{name}/.well-known/scaiwave/server");
    let descriptor = |http: reqwest::Client, url: String| async move {
        let r = http.get(url).send().await.unwrap();
        assert_eq!(r.headers()["cache-control"], "max-age=300");
        serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap()
    };
    let d = descriptor(http.clone(), url.clone()).await;
    assert_eq!(d["server_name"], name.as_str());
    let first_key = d["key_id"].as_str().unwrap().to_string();

    // Admin commands go through the running server (sled allows one process).
    let (code, out, err) = admin(dir.path(), &["federation", "key", "show"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&first_key), "{out}");
    let (code, out, err) = admin(dir.path(), &["federation", "key", "rotate"]);
    assert_eq!(code, 0, "{err}");
    let d = descriptor(http.clone(), url.clone()).await;
    assert_ne!(
        d["key_id"],
        first_key.as_str(),
        "the running server signs with the new key at once"
    );
    assert!(out.contains(d["key_id"].as_str().unwrap()), "{out}");
    assert_eq!(d["old_keys"][0]["key_id"], first_key.as_str());
    let (code, out, _) = admin(dir.path(), &["federation", "peers"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("SERVER_NAME"), "{out}");
    // `--json` travels with the command line through the socket.
    let (code, out, err) = admin(dir.path(), &["--json", "federation", "peers"]);
    assert_eq!(code, 0, "{err}");
    let peers: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(peers["peers"], serde_json::json!([]), "{out}");
    // A failed check prints its findings and exits 1, for scripts.
    let (code, out, err) = admin(dir.path(), &["federation", "check", "localhost:1"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("check(s) failed"), "{out}");
    assert!(
        !err.contains("error:"),
        "the findings are the answer: {err}"
    );
    let (code, out, err) = admin(
        dir.path(),
        &[
            "participant",
            "create",
            "bob",
            "--json",
            "--display-name",
            "Bob",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let bob: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(bob["fqid"], format!("@bob:{name}"));
    assert_eq!(bob["token"].as_str().unwrap().len(), 64, "{out}");

    // Tenants too are made and switched through the running server, and
    // `--tenant` points any command at one.
    let y = format!("y.localhost:{}", listen.port());
    let (code, out, err) = admin(dir.path(), &["tenant", "create", &y]);
    assert_eq!(code, 0, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["admin_fqid"], format!("@admin:{y}"));
    let y_token = data.join("tenants").join(&y).join("admin-token");
    assert_eq!(
        std::fs::read_to_string(&y_token).unwrap().trim(),
        created["admin_token"].as_str().unwrap()
    );
    let (code, out, err) = admin(dir.path(), &["--tenant", &y, "federation", "key", "show"]);
    assert_eq!(code, 0, "{err}");
    let y_identity: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(y_identity["server_name"], y.as_str());
    assert_ne!(y_identity["key_id"], d["key_id"]);
    let (code, _, err) = admin(dir.path(), &["tenant", "federation", "disable", &y]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = admin(dir.path(), &["tenant", "list"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        list["tenants"],
        serde_json::json!([
            {"server_name": name, "first": true, "federation_enabled": true},
            {"server_name": y, "first": false, "federation_enabled": false},
        ])
    );

    // SIGTERM: systemd hears "stopping", then drain, flush, exit 0.
    p.signal(15);
    assert_eq!(notified().trim(), "STOPPING=1");
    let status = p.wait_exit();
    assert_eq!(status.code(), Some(0), "{:#?}", p.log);

    // Stopped: the same command opens the database directly.
    let (code, out, err) = admin(dir.path(), &["federation", "key", "show"]);
    assert_eq!(code, 0, "{err}");
    let (code, out_check, _) = admin(
        dir.path(),
        &["--json", "federation", "check", "localhost:1"],
    );
    assert_eq!(code, 1, "{out_check}");
    let findings: Value = serde_json::from_str(&out_check).unwrap();
    assert_eq!(findings["ok"], false, "{out_check}");
    assert!(out.contains(d["key_id"].as_str().unwrap()), "{out}");
    let (code, out, err) = admin(dir.path(), &["--tenant", &y, "federation", "key", "show"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(y_identity["key_id"].as_str().unwrap()),
        "{out}"
    );
    let (_, out, _) = admin(dir.path(), &["tenant", "list"]);
    let after: Value = serde_json::from_str(&out).unwrap();
    // (This command runs without the server's SCAIWAVE_SERVER_NAME, so
    // only the other tenant's row is comparable.)
    assert_eq!(
        after["tenants"][1], list["tenants"][1],
        "the switch outlives the process"
    );
}

/// What systemd does: only a config file, an empty environment, SIGTERM;
/// whatever was accepted is there after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_and_an_empty_environment_are_enough_and_sigterm_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, name) = free_listen_address();
    let data = dir.path().join("data");
    let config = dir.path().join("scaiwave.toml");
    std::fs::write(
        &config,
        format!(
            "server_name = \"{name}\"\nlisten = \"{listen}\"\ndata_dir = \"{}\"\n",
            data.display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let start = || {
        let mut cmd = Command::new(bin());
        cmd.env_clear()
            .args(["serve", "--config", &config, "--log-format", "json"])
            .current_dir("/")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Process::from_child(cmd.spawn().unwrap())
    };
    let admin_clean = |args: &[&str]| {
        let out = Command::new(bin())
            .env_clear()
            .args(["admin", "--config", &config])
            .args(args)
            .current_dir("/")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };

    let mut p = start();
    p.wait_for("scaiwave is serving HTTPS");
    let bob = admin_clean(&["--json", "participant", "create", "bob"]);
    let key = admin_clean(&["federation", "key", "show"]);
    p.signal(15);
    assert_eq!(p.wait_exit().code(), Some(0), "{:#?}", p.log);

    let mut p = start();
    p.wait_for("scaiwave is serving HTTPS");
    scaiwave::tls::install_crypto_provider();
    let ca = std::fs::read(data.join("tls-ca.pem")).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .resolve("localhost", listen)
        .build()
        .unwrap();
    let me = http
        .get(format!("https://{name}/v1/me"))
        .bearer_auth(bob["token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let me: Value = serde_json::from_slice(&me).unwrap();
    assert_eq!(
        me["fqid"],
        format!("@bob:{name}"),
        "the participant survived"
    );
    assert_eq!(
        admin_clean(&["federation", "key", "show"])["key_id"],
        key["key_id"],
        "the signing key survived"
    );
    p.signal(15);
    assert_eq!(p.wait_exit().code(), Some(0), "{:#?}", p.log);
}

#[test]
fn configuration_errors_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("serve")
        .current_dir(dir.path())
        .env("SCAIWAVE_FEDERATION__MAX_CLOCK_SKEW", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("federation.max_clock_skew"));
    std::fs::write(
        dir.path().join("c.toml"),
        "[federation]\nretry_intial = \"2s\"\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config", "c.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("federation.retry_intial"));
    assert!(
        !dir.path().join("scaiwave-data").exists(),
        "a configuration error changes nothing on disk"
    );
}

/// `--version` says which commit the binary was built from (build.rs).
#[test]
fn version_names_the_checkouts_revision() {
    let git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    let rev = match git {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
        _ => "unknown".to_string(),
    };
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        format!(
            "scaiwave {} (rev {})",
            env!("CARGO_PKG_VERSION"),
            rev.trim()
        )
    );
}
