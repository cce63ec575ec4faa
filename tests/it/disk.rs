//! A full data disk, for real: the binary on a 8 MiB tmpfs of its own (a
//! private mount namespace, so nothing outside the test sees it). Needs
//! root for `unshare -m` and `mount`, which CI has.
//!
//! Messages are posted until the disk refuses one (507 `SW_STORAGE_FULL`,
//! retryable, naming the data dir); a restart while it is still full says
//! so (not "another process"); once space is freed and the server
//! restarted it takes messages again, and every message ever answered 200
//! is there.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::process::Process;
use crate::testnet::{enc, request};

const BIN: &str = env!("CARGO_BIN_EXE_scaiwave");
/// Room the server cannot use, freed later to let it write again.
const FILLER_BYTES: usize = 2 * 1024 * 1024;
/// Bodies near the 32 KiB cap fill the disk in a few hundred posts.
const BODY_BYTES: usize = 24 * 1024;
/// Far more posts than an 8 MiB disk can take: the fill loop's bound.
const POSTS_MAX: usize = 2000;

/// A mount namespace holding a small tmpfs at `dir`, kept alive by a
/// sleeping process; servers are started inside it with `nsenter`, and the
/// test reaches its files through `/proc/<pid>/root`.
struct SmallDisk {
    holder: Child,
    /// Servers started on it, killed if the test fails before it stops them.
    servers: std::sync::Mutex<Vec<u32>>,
    /// The mount point, as the server sees it.
    dir: PathBuf,
}

impl SmallDisk {
    fn new(dir: &Path) -> SmallDisk {
        let mut holder = Command::new("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -t tmpfs -o size=8m tmpfs \"$0\" && echo mounted && exec sleep 600",
            ])
            .arg(dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "mounted", "the tmpfs is mounted");
        SmallDisk {
            holder,
            servers: Default::default(),
            dir: dir.to_path_buf(),
        }
    }

    /// `path` (under the mount point) as this process can reach it.
    fn outside(&self, path: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.holder.id()))
            .join(path.strip_prefix("/").unwrap())
    }

    fn command(&self, port: u16) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.holder.id().to_string(), "-m", "--"])
            .arg(BIN)
            .args(["serve", "--log-format", "json"])
            .env("SCAIWAVE_DATA_DIR", &self.dir)
            .env("SCAIWAVE_LISTEN", format!("127.0.0.1:{port}"))
            .env("SCAIWAVE_SERVER_NAME", format!("localhost:{port}"))
            // The fill loop is one token's burst of posts.
            .env("SCAIWAVE_LIMITS__RATE_PER_TOKEN", "100000/s");
        cmd
    }

    /// A server on this disk, with its JSON log lines.
    fn serve(&self, port: u16) -> Process {
        let child = self
            .command(port)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.servers.lock().unwrap().push(child.id());
        Process::from_child(child)
    }

    /// Fill what is left of the disk with a file (until ENOSPC).
    fn fill_up(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.outside(&self.dir.join(name))).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        for pid in self.servers.lock().unwrap().iter() {
            // SAFETY: kill has no memory preconditions; an exited (and
            // reaped) server's pid makes it fail harmlessly.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        // Ours: the namespace and its tmpfs go with it.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// SIGTERM, and the exit status (bounded; the log is shown if it hangs).
fn stop(p: &mut Process) -> std::process::ExitStatus {
    p.signal(15);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        while let Ok(line) = p.lines.try_recv() {
            p.log.push(line);
        }
        if let Some(status) = p.child.try_wait().unwrap() {
            while let Ok(line) = p.lines.recv_timeout(Duration::from_millis(100)) {
                p.log.push(line);
            }
            return status;
        }
        if Instant::now() > deadline {
            let _ = p.child.kill();
            panic!("no exit after SIGTERM; log: {:#?}", p.log);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_507_loses_nothing_and_says_so_at_start() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs this as root)");
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let mount = tmp.path().join("data");
    std::fs::create_dir(&mount).unwrap();
    let disk = SmallDisk::new(&mount);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let name = format!("localhost:{port}");
    std::fs::write(disk.outside(&mount.join("filler")), vec![1u8; FILLER_BYTES]).unwrap();

    let mut p = disk.serve(port);
    p.wait_for("scaiwave is serving HTTPS");
    // An 8 MiB disk is below the low-space threshold from the start (the
    // watch may log before or after the listener is up).
    let earlier = p
        .log
        .iter()
        .find(|l| l.contains("storage.low_space"))
        .cloned();
    let low = match earlier {
        Some(line) => serde_json::from_str::<Value>(&line).unwrap(),
        None => p.wait_for("storage.low_space"),
    };
    assert_eq!(low["level"], "WARN");
    assert_eq!(low["fields"]["data_dir"], mount.display().to_string());

    scaiwave::tls::install_crypto_provider();
    let ca = std::fs::read(disk.outside(&mount.join("tls-ca.pem"))).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let token = std::fs::read_to_string(disk.outside(&mount.join("admin-token")))
        .unwrap()
        .trim()
        .to_string();
    let call = |method: Method, path: String, body: Option<Value>| {
        let (http, name, token) = (http.clone(), name.clone(), token.clone());
        async move { request(&http, &name, method, &path, Some(&token), body).await }
    };
    let (status, room) = call(
        Method::POST,
        "/v1/rooms".into(),
        Some(json!({"name": "fill", "room_type": "standard"})),
    )
    .await;
    assert_eq!(status, 200, "{room}");
    let messages = format!(
        "/v1/rooms/{}/messages",
        enc(room["room_id"].as_str().unwrap())
    );
    let body = |i: usize| format!("m{i} {}", "a".repeat(BODY_BYTES));

    // Fill the disk: every 200 is remembered, the first refusal ends it.
    let mut accepted = Vec::new();
    let refusal = loop {
        assert!(
            accepted.len() < POSTS_MAX,
            "an 8 MiB disk took {POSTS_MAX} posts"
        );
        let i = accepted.len();
        let (status, v) = call(
            Method::POST,
            messages.clone(),
            Some(json!({"body": body(i)})),
        )
        .await;
        match status {
            200 => accepted.push(i),
            _ => break (status, v),
        }
    };
    let (status, v) = refusal;
    assert_eq!(status, 507, "{v}");
    assert_eq!(v["error"]["code"], "SW_STORAGE_FULL", "{v}");
    assert_eq!(v["error"]["retryable"], true, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "the data disk is full; free space in {}",
            mount.display()
        )),
        "{message}"
    );
    assert!(
        accepted.len() > 100,
        "only {} posts before the disk filled",
        accepted.len()
    );
    // More refusals, one log line: the episode is logged once.
    for i in 0..3 {
        let (status, v) = call(
            Method::POST,
            messages.clone(),
            Some(json!({"body": body(POSTS_MAX + i)})),
        )
        .await;
        assert_eq!(status, 507, "{v}");
    }
    p.wait_for("storage.full");
    // Reads still work on a full disk.
    let (status, _) = call(Method::GET, "/v1/rooms".into(), None).await;
    assert_eq!(status, 200);
    stop(&mut p);
    let full_lines = p
        .log
        .iter()
        .filter(|l| l.contains("\"storage.full: the data disk is full"))
        .count();
    assert_eq!(full_lines, 1, "{:#?}", p.log);

    // A restart while the disk is still (entirely) full: the true reason,
    // exit 1, and never "another scaiwave process".
    disk.fill_up("filler2");
    let out = disk.command(port).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the data disk is full; free space in {}",
            mount.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("another scaiwave process"), "{stderr}");

    // Space freed, server restarted: it takes messages again, and nothing
    // that was ever answered 200 is missing.
    std::fs::remove_file(disk.outside(&mount.join("filler"))).unwrap();
    std::fs::remove_file(disk.outside(&mount.join("filler2"))).unwrap();
    let mut p = disk.serve(port);
    p.wait_for("scaiwave is serving HTTPS");
    let (status, v) = call(
        Method::POST,
        messages.clone(),
        Some(json!({"body": "after"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = call(
        Method::GET,
        format!("{messages}?after_seq=0&limit=1000"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let stored: std::collections::BTreeSet<String> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["body"].as_str()?.split(' ').next().map(str::to_string))
        .collect();
    for i in &accepted {
        assert!(
            stored.contains(&format!("m{i}")),
            "accepted message m{i} is lost"
        );
    }
    assert!(stored.contains("after"));
    assert_eq!(stop(&mut p).code(), Some(0), "{:#?}", p.log);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
