//! Memory of the shipped binary (issue 12): the resident set of a real
//! `scaiwave serve` process, idle, while it ingests signed events, and over
//! a long run of sustained `/send` at half the rate it just reached.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example membench -- [--events 200000] [--sustain-secs 600]
//! ```
//!
//! The server under test is the release binary beside this example
//! (`--bin` for another), started as systemd would start it: a config
//! file, an empty environment, its own temporary data dir, a certificate
//! from a throwaway CA. The load comes from a peer server in this process
//! (`peer.test`), whose key signs every event; rooms are set up the way a
//! real deployment sets them up: a participant on the target, created
//! through the admin API, creates each room through the client API and
//! invites `@load:peer.test`, who accepts on the peer.
//!
//! The server's CPU time over the ingest phase (`/proc/<pid>/stat`) is
//! reported per event: the events are signed before the phase starts, so
//! it is the server's cost alone, TLS and HTTP included. The load's own
//! CPU (this process: the peer's client) is reported beside it, since
//! both share the machine's cores.
//!
//! RSS is read from `/proc/<pid>/status` every `--sample-ms`. Exactly one
//! JSON line goes to stdout; progress goes to stderr. The goals are the
//! issue's, in MiB: idle < 30, peak while ingesting < 150, and the sustained
//! phase flat: its last minute's mean within ±10 % of its first minute's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

use scaiwave::app::App;
use scaiwave::ids::{RoomId, ServerName};

#[allow(dead_code)]
mod common;
use common::*;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TARGET_HOST: &str = "target.test";
const MIB: f64 = 1024.0 * 1024.0;
/// The server must listen within this long of being started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The sustained phase compares its first and its last this-long.
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(about = "RSS of a real scaiwave process: idle, ingesting, sustained")]
struct Args {
    /// The scaiwave binary to measure (default: the release binary beside
    /// this example).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Events in the ingest phase.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per /send transaction (1-100).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// /send requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Rooms the events are spread over.
    #[arg(long, default_value_t = 4)]
    rooms: usize,
    /// How long the fresh server sits idle before its RSS is read.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Length of the sustained phase at half the ingest rate (0: skip).
    #[arg(long, default_value_t = 600)]
    sustain_secs: u64,
    /// RSS sampling period.
    #[arg(long, default_value_t = 200)]
    sample_ms: u64,
    /// `[storage] cache_capacity` for the server (default: its own).
    #[arg(long)]
    cache_capacity: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    exit_with("membench", runtime.block_on(run(&args)))
}

fn default_bin() -> Result<PathBuf> {
    // target/<triple>/release/examples/membench → target/<triple>/release/scaiwave
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .context("the example's directory")?
        .join("scaiwave");
    if !bin.exists() {
        bail!(
            "{} does not exist: build it first with `cargo build --release`, or name one with --bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// Resident set and its peak (`VmRSS`, `VmHWM`) of `pid`, in bytes.
fn rss(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .context("a number")?
            .parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time `pid` has used so far (user + system), in seconds: fields 14
/// and 15 of `/proc/<pid>/stat`, counted after the parenthesised command
/// name (which may itself hold spaces).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("a command name in stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so utime (14) is its 12th.
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    // SAFETY: sysconf only reads a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / per_second)
}

fn mib(bytes: u64) -> f64 {
    round3(bytes as f64 / MIB)
}

/// The server under test, stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM and wait: the exit code the service manager would see.
    fn stop(&mut self) -> Result<i32> {
        // SAFETY: kill with a pid we spawned and a valid signal number.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait()?;
        Ok(status.code().unwrap_or(-1))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.stop();
        }
    }
}

fn start_server(
    bin: &Path,
    ca: &Ca,
    name: &ServerName,
    listen: SocketAddr,
    peer: SocketAddr,
    cache_capacity: Option<&str>,
) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = ca.leaf(TARGET_HOST)?;
    let cache = cache_capacity
        .map(|c| format!("[storage]\ncache_capacity = \"{c}\"\n"))
        .unwrap_or_default();
    let config = format!(
        "server_name = \"{name}\"\nlisten = \"{listen}\"\ndata_dir = \"{data}\"\n\
         [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\ntrust_roots = [\"{ca}\"]\n\
         {cache}[federation.resolve]\n\"{PEER_NAME}\" = \"{peer}\"\n",
        data = dir.path().join("data").display(),
        cert = cert.display(),
        key = key.display(),
        ca = ca.ca_path().display(),
    );
    let config_path = dir.path().join("scaiwave.toml");
    std::fs::write(&config_path, config)?;
    let log = dir.path().join("server.log");
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config_path)
        .arg("serve")
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut server = Server {
        child,
        log,
        _dir: dir,
    };
    let token = server._dir.path().join("data").join("admin-token");
    let deadline = Instant::now() + START_TIMEOUT;
    while std::net::TcpStream::connect(listen).is_err() || !token.exists() {
        if let Some(status) = server.child.try_wait()? {
            bail!("the server exited ({status}):\n{}", server.log_tail());
        }
        if Instant::now() > deadline {
            bail!(
                "the server did not listen within {START_TIMEOUT:?}:\n{}",
                server.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(server)
}

/// RSS samples of one process, taken in the background.
#[derive(Clone)]
struct Sampler {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
}

impl Sampler {
    fn start(pid: u32, every: Duration) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Ok((now, _)) = rss(pid) else { break };
                out.lock().expect("samples").push((Instant::now(), now));
            }
        });
        Sampler { samples }
    }

    fn between(&self, from: Instant, to: Instant) -> Vec<u64> {
        self.samples
            .lock()
            .expect("samples")
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|&(_, v)| v)
            .collect()
    }
}

fn mean(v: &[u64]) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.iter().sum::<u64>() / v.len() as u64
}

/// A local API call to the target: the JSON answer of a 200.
async fn call(http: &reqwest::Client, url: String, token: &str, body: Value) -> Result<Value> {
    let resp = http
        .post(&url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body)?)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let answer: Value = serde_json::from_slice(&resp.bytes().await?).unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("POST {url}: {status} {answer}");
    }
    Ok(answer)
}

/// A participant on the target creates `rooms` rooms through the client
/// API and invites the peer's sender, who joins on the peer.
async fn setup_rooms(
    ca: &Ca,
    target: &ServerName,
    addr: SocketAddr,
    admin_token: &str,
    peer: &App,
    rooms: usize,
) -> Result<Vec<RoomId>> {
    scaiwave::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(
            ca.ca_path(),
        )?)?])
        .resolve(TARGET_HOST, addr)
        .build()?;
    let base = format!("https://{target}");
    let owner = call(
        &http,
        format!("{base}/v1/admin/participants"),
        admin_token,
        json!({"local_id": "owner", "display_name": "Load owner", "power_level": "member"}),
    )
    .await?;
    let owner_token = owner["token"].as_str().context("a participant token")?;
    let (load, load_fqid) = participant(&peer.first, "load", "Load")?;
    let mut ids = Vec::new();
    for r in 0..rooms {
        let room = call(
            &http,
            format!("{base}/v1/rooms"),
            owner_token,
            json!({"name": format!("load {r}"), "room_type": "standard"}),
        )
        .await?;
        let room_id = RoomId::parse(room["room_id"].as_str().context("a room id")?)?;
        let invite = call(
            &http,
            format!("{base}/v1/rooms/{room_id}/invitations"),
            owner_token,
            json!({"fqid": load_fqid.to_string()}),
        )
        .await?;
        let invite_id = invite["invite_id"].as_str().context("an invite id")?;
        join_when_invited(&peer.first, &load, invite_id, &room_id).await?;
        ids.push(room_id);
    }
    Ok(ids)
}

async fn run(args: &Args) -> Result<Value> {
    if args.batch == 0 || args.batch > BATCH_MAX {
        bail!("--batch must be 1-{BATCH_MAX} (SPEC §8 caps a transaction at {BATCH_MAX} events)");
    }
    if args.events == 0 || args.concurrency == 0 || args.rooms == 0 {
        bail!("--events, --concurrency and --rooms must be at least 1");
    }
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => default_bin()?,
    };
    let ca = Ca::new()?;
    // The target's port is picked first so its server_name can carry it.
    let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let target = ServerName::parse(&format!("{TARGET_HOST}:{}", listen.port()))?;
    let mut nodes = start_nodes(
        &ca,
        &[(PEER_NAME, 1)],
        &BTreeMap::from([(target.clone(), listen)]),
        scaiwave::config::StorageSync::Fsync,
    )
    .await?;
    let peer = nodes[0].app().clone();
    let mut server = start_server(
        &bin,
        &ca,
        &target,
        listen,
        nodes[0].running.addr,
        args.cache_capacity.as_deref(),
    )?;
    let pid = server.pid();
    eprintln!("membench: {} serving {target} as pid {pid}", bin.display());
    let outcome = measure(args, &ca, &target, listen, &server, &peer).await;
    let code = server.stop().unwrap_or(-1);
    if outcome.is_err() {
        eprintln!("membench: server log:\n{}", server.log_tail());
    }
    while let Some(node) = nodes.pop() {
        node.running.stop().await;
    }
    let mut result = outcome?;
    result["binary"] = json!(bin.display().to_string());
    result["exit_code_after_sigterm"] = json!(code);
    Ok(result)
}

async fn measure(
    args: &Args,
    ca: &Ca,
    target: &ServerName,
    listen: SocketAddr,
    server: &Server,
    peer: &Arc<App>,
) -> Result<Value> {
    let pid = server.pid();
    let sampler = Sampler::start(pid, Duration::from_millis(args.sample_ms));
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let (idle, _) = rss(pid)?;
    eprintln!("membench: idle {:.1} MiB", mib(idle));

    let admin_token = std::fs::read_to_string(server._dir.path().join("data/admin-token"))?;
    let rooms = setup_rooms(ca, target, listen, admin_token.trim(), peer, args.rooms).await?;
    let hosted = vec![(target.clone(), rooms)];
    let (_, sender) = participant(&peer.first, "load", "Load")?;
    let (after_setup, _) = rss(pid)?;

    let txns = transactions(peer, &hosted, &sender, 0..args.events, args.batch, "ingest")?;
    eprintln!("membench: ingesting {} events", args.events);
    let (cpu_before, load_cpu_before) = (cpu_seconds(pid)?, cpu_seconds(std::process::id())?);
    let (tally, seconds) = send_all(peer, txns, args.concurrency).await?;
    let cpu_us_per_event = (cpu_seconds(pid)? - cpu_before) * 1e6 / args.events as f64;
    let load_cpu_us_per_event =
        (cpu_seconds(std::process::id())? - load_cpu_before) * 1e6 / args.events as f64;
    // The kernel's high-water mark: everything before was smaller (idle
    // and setup), and it sees peaks between two samples.
    let (after_ingest, ingest_peak) = rss(pid)?;
    let rate = args.events as f64 / seconds;
    for r in &tally.reasons {
        eprintln!("membench: refused or failed: {r}");
    }
    eprintln!(
        "membench: {rate:.0} events/s, {cpu_us_per_event:.1} µs of server CPU each, peak {:.1} MiB, after {:.1} MiB",
        mib(ingest_peak),
        mib(after_ingest)
    );
    let mut result = json!({
        "cache_capacity": args.cache_capacity.as_deref().unwrap_or("default"),
        "idle_rss_mib": mib(idle),
        "after_setup_rss_mib": mib(after_setup),
        "ingest": {
            "events": args.events,
            "seconds": round3(seconds),
            "events_per_s": rate.round(),
            "server_cpu_us_per_event": round3(cpu_us_per_event),
            "load_cpu_us_per_event": round3(load_cpu_us_per_event),
            "accepted": tally.accepted,
            "rejected": tally.rejected,
            "unanswered": tally.unanswered,
            "peak_rss_mib": mib(ingest_peak),
            "after_rss_mib": mib(after_ingest),
        },
    });
    let mut goals = json!({
        "idle_below_30_mib": mib(idle) < 30.0,
        "ingest_peak_below_150_mib": mib(ingest_peak) < 150.0,
    });
    if args.sustain_secs > 0 {
        let sustained = sustain(args, peer, &hosted, &sender, rate / 2.0, &sampler).await?;
        goals["sustained_flat_within_10_percent"] =
            json!((sustained["last_over_first"].as_f64().unwrap_or(f64::MAX) - 1.0).abs() <= 0.10);
        result["sustain"] = sustained;
    }
    let (_, hwm) = rss(pid)?;
    result["peak_rss_mib"] = json!(mib(hwm));
    result["goals"] = goals;
    Ok(result)
}

/// `/send` at `rate` events/s for `--sustain-secs`, in transactions of
/// `--batch` started on a fixed schedule (at most `--concurrency` in
/// flight: a server that cannot keep up lowers the achieved rate, which
/// is reported).
async fn sustain(
    args: &Args,
    peer: &Arc<App>,
    hosted: &[Hosted],
    sender: &scaiwave::ids::Fqid,
    rate: f64,
    sampler: &Sampler,
) -> Result<Value> {
    let period = Duration::from_secs_f64(args.batch as f64 / rate);
    let length = Duration::from_secs(args.sustain_secs);
    eprintln!(
        "membench: sustaining {rate:.0} events/s for {}s",
        args.sustain_secs
    );
    let mut next = args.events;
    let from = Instant::now();
    let (tally, sent, seconds) = send_paced(
        peer,
        || {
            let txn = transactions(
                peer,
                hosted,
                sender,
                next..next + args.batch,
                args.batch,
                "sustain",
            )?;
            next += args.batch;
            Ok(txn.into_iter().next())
        },
        period,
        args.concurrency,
        Some(length),
    )
    .await?;
    let to = Instant::now();
    let first = sampler.between(from, from + WINDOW);
    let last = sampler.between(to.checked_sub(WINDOW).unwrap_or(from), to);
    let all = sampler.between(from, to);
    let (first, last) = (mean(&first), mean(&last));
    let mut latencies = tally.latencies;
    latencies.sort_unstable();
    Ok(json!({
        "seconds": round3(seconds),
        "offered_events_per_s": rate.round(),
        "achieved_events_per_s": (sent as f64 / seconds).round(),
        "rejected": tally.rejected,
        "unanswered": tally.unanswered,
        "p99_ms": percentile_ms(&latencies, 0.99),
        "first_minute_rss_mib": mib(first),
        "last_minute_rss_mib": mib(last),
        "min_rss_mib": mib(all.iter().copied().min().unwrap_or(0)),
        "max_rss_mib": mib(all.iter().copied().max().unwrap_or(0)),
        "last_over_first": round3(last as f64 / first.max(1) as f64),
    }))
}
