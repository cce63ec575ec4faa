//! What the benchmark examples share: a throwaway CA, in-process servers
//! on loopback HTTPS, signed load, and the tally of `/send` answers.
//! Each example uses part of it (hence `allow(dead_code)` where it is
//! declared).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;

use scaiwave::app::{App, Tenant};
use scaiwave::clock::Clock;
use scaiwave::config::{Config, StorageSync};
use scaiwave::ids::{Fqid, KeyId, LocalId, RoomId, ServerName};
use scaiwave::protocol::event::{Content, Event, Membership};
use scaiwave::protocol::wire::{SendAnswer, SendBody, SendStatus};
use scaiwave::rooms::{commands, fqid_of, views};
use scaiwave::server::Running;
use scaiwave::storage::{Participant, PowerLevel};

pub const PEER_NAME: &str = "peer.test";
pub const SEND_PATH: &str = "/_scaiwave/federation/v1/send";
/// SPEC §8: at most 100 events per transaction.
pub const BATCH_MAX: usize = 100;
/// One `/send` may take this long before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Setup steps (an invitation arriving) wait at most this long.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Milliseconds at quantile `q` (nearest rank) of sorted latencies.
pub fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    round3(sorted[i].as_secs_f64() * 1000.0)
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn message(i: usize) -> Content {
    Content::Message {
        body: format!("loadgen message {i}"),
        thread_root: None,
        reply_to: None,
        mentions: Vec::new(),
    }
}

/// Signed messages number `range` from `sender`, spread round-robin over
/// `rooms`. Numbered across a whole run, so no two share an event id.
pub fn signed_messages(
    range: std::ops::Range<usize>,
    rooms: &[RoomId],
    sender: &Fqid,
    now: i64,
    key_id: &KeyId,
    signing: &SigningKey,
) -> Vec<Event> {
    range
        .map(|i| {
            Event::create(
                rooms[i % rooms.len()].clone(),
                sender.clone(),
                now,
                message(i),
                key_id,
                signing,
            )
        })
        .collect()
}

/// A throwaway CA writing PEM files into a temporary directory.
pub struct Ca {
    dir: tempfile::TempDir,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub fn new() -> Result<Ca> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "scaiwave loadgen CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate()?)?;
        let dir = tempfile::tempdir().context("temp dir for the CA")?;
        std::fs::write(dir.path().join("ca.pem"), issuer.pem())?;
        Ok(Ca { dir, issuer })
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A leaf certificate for `host`: (cert path, key path).
    pub fn leaf(&self, host: &str) -> Result<(PathBuf, PathBuf)> {
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec![host.to_string()])?.signed_by(&key, &self.issuer)?;
        let c = self.dir.path().join(format!("{host}.pem"));
        let k = self.dir.path().join(format!("{host}.key"));
        std::fs::write(&c, cert.pem())?;
        std::fs::write(&k, key.serialize_pem())?;
        Ok((c, k))
    }
}

pub struct Node {
    pub running: Running,
    /// Kept so the data dir outlives the server.
    _data: tempfile::TempDir,
}

impl Node {
    pub fn app(&self) -> &Arc<App> {
        &self.running.app
    }
}

/// Start an instance per `(name, tenants)` on 127.0.0.1:0, each trusting
/// the CA and resolving every server_name, tenants included. An instance
/// serves `name` and `tenants - 1` more, created once it serves and named
/// `t<i>.<name>:<port>` (a server_name carries its port unless it is 443),
/// with `[storage] sync = sync`.
pub async fn start_nodes(
    ca: &Ca,
    specs: &[(&str, usize)],
    extra: &BTreeMap<ServerName, SocketAddr>,
    sync: StorageSync,
) -> Result<Vec<Node>> {
    let listeners = specs
        .iter()
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding a loopback port")?;
    let mut resolve: BTreeMap<ServerName, SocketAddr> = extra.clone();
    let mut served: Vec<Vec<ServerName>> = Vec::new();
    for (&(name, tenants), l) in specs.iter().zip(&listeners) {
        let addr = l.local_addr()?;
        let mut names = vec![ServerName::parse(name)?];
        for i in 2..=tenants {
            names.push(ServerName::parse(&format!("t{i}.{name}:{}", addr.port()))?);
        }
        for n in &names {
            resolve.insert(n.clone(), addr);
        }
        served.push(names);
    }
    let mut nodes = Vec::new();
    for (names, listener) in served.iter().zip(listeners) {
        let (name, tenants) = names.split_first().context("an instance serves a name")?;
        let data = tempfile::tempdir().context("temp data dir")?;
        let (cert, key) = ca.leaf(name.host())?;
        let mut config = Config::default_embedded();
        config.server_name = name.clone();
        config.listen = listener.local_addr()?;
        config.data_dir = data.path().to_path_buf();
        config.tls.cert = Some(cert);
        config.tls.key = Some(key);
        config.tls.trust_roots = vec![ca.ca_path()];
        config.federation.retry_initial = Duration::from_millis(100);
        config.federation.retry_max_interval = Duration::from_secs(1);
        config.federation.resolve = resolve.clone();
        config.storage.sync = sync;
        // The load comes from one origin; the benchmarks measure the
        // server, not its per-origin rate limit (300/s by default).
        config.limits.rate_per_origin = scaiwave::config::Rate {
            count: 1_000_000,
            per: Duration::from_secs(1),
        };
        let running = scaiwave::server::start_on(config, Clock::system(), listener)
            .await
            .with_context(|| format!("starting {name}"))?;
        for tenant in tenants {
            running
                .app
                .create_tenant(tenant, Some(ca.leaf(tenant.host())?))
                .with_context(|| format!("creating tenant {tenant}"))?;
        }
        eprintln!(
            "bench: {name} serving on {} ({} tenant(s))",
            running.addr,
            names.len()
        );
        nodes.push(Node {
            running,
            _data: data,
        });
    }
    Ok(nodes)
}

/// `tenant`'s participant `local`, created as a member on first use: the
/// peer's load participant joins the rooms of every tenant.
pub fn participant(
    tenant: &Tenant,
    local: &str,
    display_name: &str,
) -> Result<(Participant, Fqid)> {
    let id = LocalId::parse(local)?;
    if tenant.store.participant(&id)?.is_none() {
        tenant
            .rooms
            .create_participant(&id, display_name, PowerLevel::Member)?;
    }
    let p = tenant
        .store
        .participant(&id)?
        .with_context(|| format!("participant {local} missing after its creation"))?;
    let fqid = fqid_of(&tenant.rooms, &p);
    Ok((p, fqid))
}

/// Create `rooms` rooms on `host`, invite `@load:peer.test` to each and
/// accept from the peer. Returns the room ids.
pub async fn setup_rooms(host: &Tenant, peer: &Tenant, rooms: usize) -> Result<Vec<RoomId>> {
    let (owner, _) = participant(host, "owner", "Load owner")?;
    let (load, load_fqid) = participant(peer, "load", "Load")?;
    let mut ids = Vec::with_capacity(rooms);
    for r in 0..rooms {
        let room =
            commands::create_room(&host.rooms, &owner, &format!("load {r}"), "standard").await?;
        let room_id = RoomId::parse(&room.room_id)?;
        let invite_id = commands::invite(&host.rooms, &owner, &room_id, &load_fqid).await?;
        join_when_invited(peer, &load, &invite_id, &room_id).await?;
        ids.push(room_id);
    }
    Ok(ids)
}

/// Wait for invitation `invite_id` to reach `load` on the peer (through
/// the host's delivery loop), then accept it: the peer joins `room_id`.
pub async fn join_when_invited(
    peer: &Tenant,
    load: &Participant,
    invite_id: &str,
    room_id: &RoomId,
) -> Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let arrived = poll_until(deadline, || {
        Ok(views::invitations(&peer.rooms, load)?
            .iter()
            .any(|i| i.invite_id == invite_id))
    })
    .await?;
    if !arrived {
        bail!("invitation {invite_id} to {room_id} did not reach {PEER_NAME} within {SETUP_TIMEOUT:?}");
    }
    let answered = commands::answer_invitation(&peer.rooms, load, invite_id, true).await?;
    match answered.state {
        commands::AnswerState::Joined => Ok(()),
        // The host refused for now, retryably (its bound on requests from
        // never-seen servers a second, which joins in a row reach): the
        // join is queued and delivered on retry, as it would be for any
        // peer. Joined once the host's answer settled it here.
        commands::AnswerState::Pending => {
            let me = fqid_of(&peer.rooms, load).to_string();
            let joined = poll_until(deadline, || {
                Ok(peer
                    .rooms
                    .store
                    .members(room_id)?
                    .get(&me)
                    .is_some_and(|m| m.membership == Membership::Join))
            })
            .await?;
            if !joined {
                bail!(
                    "the queued join of {me} to {room_id} was not settled within {SETUP_TIMEOUT:?}"
                );
            }
            Ok(())
        }
        commands::AnswerState::Declined => {
            bail!("joining {room_id} answered {answered:?}; expected a join")
        }
    }
}

/// Check `done` every 20 ms: true once it holds, false if `deadline`
/// passes first.
async fn poll_until(deadline: Instant, done: impl Fn() -> Result<bool>) -> Result<bool> {
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Default)]
pub struct Tally {
    pub latencies: Vec<Duration>,
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected: u64,
    /// Events in requests that got no 200 answer.
    pub unanswered: u64,
    pub failed_requests: u64,
    /// First few distinct rejection / failure reasons, for stderr.
    pub reasons: Vec<String>,
}

impl Tally {
    pub fn note(&mut self, reason: String) {
        if self.reasons.len() < 5 && !self.reasons.contains(&reason) {
            self.reasons.push(reason);
        }
    }

    /// A request that got no 200 answer: its `count` events are unanswered.
    pub fn failed(&mut self, count: usize, reason: String) {
        self.failed_requests += 1;
        self.unanswered += count as u64;
        self.note(reason);
    }

    pub fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.accepted += other.accepted;
        self.duplicate += other.duplicate;
        self.rejected += other.rejected;
        self.unanswered += other.unanswered;
        self.failed_requests += other.failed_requests;
        for r in other.reasons {
            self.note(r);
        }
    }
}

/// `/send` one pre-built transaction of `count` events from `peer` to
/// `dest`, signed as a real peer signs it, and count the answer.
pub async fn send_transaction(
    peer: &App,
    dest: &ServerName,
    count: usize,
    body: Vec<u8>,
    tally: &mut Tally,
) {
    let signer = match peer.first.fed.signer() {
        Ok(s) => s,
        Err(e) => {
            tally.failed(count, format!("no signer: {e}"));
            return;
        }
    };
    let t0 = Instant::now();
    let reply = peer
        .first
        .fed
        .outbound
        .signed(
            &signer,
            http::Method::POST,
            dest,
            SEND_PATH,
            Some(body),
            REQUEST_TIMEOUT,
            scaiwave::limits::S2S_REPLY_BYTES_MAX,
        )
        .await;
    tally.latencies.push(t0.elapsed());
    match reply {
        Ok(r) if r.status == 200 => match r.json::<SendAnswer>() {
            Ok(answer) => {
                for res in answer.results {
                    match res.status {
                        SendStatus::Accepted => tally.accepted += 1,
                        SendStatus::Duplicate => tally.duplicate += 1,
                        SendStatus::Rejected => {
                            tally.rejected += 1;
                            if let Some(e) = res.error {
                                tally.note(format!("{}: {}", e.code, e.message));
                            }
                        }
                    }
                }
            }
            Err(e) => tally.failed(count, e),
        },
        Ok(r) => tally.failed(
            count,
            format!("HTTP {}: {}", r.status, String::from_utf8_lossy(&r.body)),
        ),
        Err(e) => tally.failed(count, format!("network: {e}")),
    }
}

/// A tenant of the target and the rooms there the peer's sender joined.
pub type Hosted = (ServerName, Vec<RoomId>);
/// A `/send` body ready to go: destination, event count, JSON bytes.
pub type Transaction = (ServerName, usize, Vec<u8>);

/// Sign events `range` from `sender` and pack them into transactions of
/// `batch`; transaction t goes to tenant t mod N, so each tenant gets an
/// even share. Event numbers and `tag` keep ids unique across a run.
pub fn transactions(
    peer: &App,
    hosted: &[Hosted],
    sender: &Fqid,
    range: std::ops::Range<usize>,
    batch: usize,
    tag: &str,
) -> Result<Vec<Transaction>> {
    let key = peer.first.fed.keys.current()?;
    let now = peer.clock.now_ms();
    let end = range.end;
    range
        .step_by(batch)
        .enumerate()
        .map(|(t, start)| {
            let (dest, rooms) = &hosted[t % hosted.len()];
            let events = start..(start + batch).min(end);
            let count = events.len();
            let body = SendBody {
                txn_id: format!("{tag}-{now}-{start}"),
                events: signed_messages(events, rooms, sender, now, &key.key_id, &key.signing)
                    .iter()
                    .map(|e| e.to_wire_value(None))
                    .collect(),
                edus: Vec::new(),
            };
            Ok((dest.clone(), count, serde_json::to_vec(&body)?))
        })
        .collect()
}

/// Send every transaction, `concurrency` in flight: the merged tally and
/// the seconds it took.
pub async fn send_all(
    peer: &Arc<App>,
    txns: Vec<Transaction>,
    concurrency: usize,
) -> Result<(Tally, f64)> {
    let workers_n = concurrency.min(txns.len()).max(1);
    let queue = Arc::new(std::sync::Mutex::new(txns.into_iter()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..workers_n {
        let queue = queue.clone();
        let peer = peer.clone();
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            loop {
                let next = queue.lock().expect("queue lock").next();
                let Some((dest, count, body)) = next else {
                    break;
                };
                send_transaction(&peer, &dest, count, body, &mut tally).await;
            }
            tally
        }));
    }
    let mut tally = Tally::default();
    for w in workers {
        tally.merge(w.await.context("a sender task panicked")?);
    }
    Ok((tally, started.elapsed().as_secs_f64()))
}

/// `--sync fsync|flush`, spelled as `[storage] sync`.
pub fn parse_sync(s: &str) -> std::result::Result<StorageSync, String> {
    match s {
        "fsync" => Ok(StorageSync::Fsync),
        "flush" => Ok(StorageSync::Flush),
        _ => Err(format!("expected fsync or flush, got {s:?}")),
    }
}

pub fn sync_name(s: StorageSync) -> &'static str {
    match s {
        StorageSync::Fsync => "fsync",
        StorageSync::Flush => "flush",
    }
}

/// Start one transaction every `period` (a fixed offered rate, however
/// slow the answers), at most `in_flight` unanswered at once (beyond that
/// the schedule slips, and the achieved rate says so), until `next`
/// returns `None` or `length` has passed. The merged tally, the events
/// sent, and the seconds from the first start to the last answer.
pub async fn send_paced(
    peer: &Arc<App>,
    mut next: impl FnMut() -> Result<Option<Transaction>>,
    period: Duration,
    in_flight: usize,
    length: Option<Duration>,
) -> Result<(Tally, usize, f64)> {
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let mut sent = 0usize;
    let seconds = paced(
        || {
            let Some((dest, count, body)) = next()? else {
                return Ok(None);
            };
            sent += count;
            let (peer, tally) = (peer.clone(), tally.clone());
            Ok(Some(async move {
                let mut mine = Tally::default();
                send_transaction(&peer, &dest, count, body, &mut mine).await;
                tally.lock().expect("tally").merge(mine);
            }))
        },
        period,
        in_flight,
        length,
    )
    .await?;
    let tally = std::mem::take(&mut *tally.lock().expect("tally"));
    Ok((tally, sent, seconds))
}

/// The schedule of [`send_paced`] for any work: spawn what `next` hands
/// out, one every `period`, at most `in_flight` unfinished at once, until
/// it hands out `None` or `length` has passed; the seconds from the first
/// start to the last finish.
pub async fn paced<F>(
    mut next: impl FnMut() -> Result<Option<F>>,
    period: Duration,
    in_flight: usize,
    length: Option<Duration>,
) -> Result<f64>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(in_flight));
    // tokio's timer counts milliseconds (and may wake later than asked):
    // each tick starts what the schedule says is due by now, so the
    // offered rate holds for periods shorter than a tick too.
    let mut tick =
        tokio::time::interval(period.clamp(Duration::from_millis(1), Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let from = Instant::now();
    let mut started = 0usize;
    'schedule: while length.is_none_or(|l| from.elapsed() < l) {
        tick.tick().await;
        let due = (from.elapsed().as_secs_f64() / period.as_secs_f64()) as usize + 1;
        while started < due {
            let slot = slots.clone().acquire_owned().await?;
            let Some(work) = next()? else {
                break 'schedule;
            };
            started += 1;
            tokio::spawn(async move {
                work.await;
                drop(slot);
            });
        }
    }
    // Everything started has finished once all slots are free.
    let _all = slots.acquire_many(in_flight as u32).await?;
    Ok(from.elapsed().as_secs_f64())
}

/// A server that is not serving (`App::open` on a temporary data dir,
/// named `bench.test`), with one participant, `reader`, in one room it
/// created: what the benchmarks that need no network start from.
pub struct OneRoom {
    pub app: Arc<App>,
    pub reader: Participant,
    pub fqid: Fqid,
    pub room_id: RoomId,
    _dir: tempfile::TempDir,
}

pub async fn one_room(name: &str, sync: StorageSync) -> Result<OneRoom> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::default_embedded();
    config.server_name = ServerName::parse("bench.test")?;
    config.data_dir = dir.path().to_path_buf();
    config.storage.sync = sync;
    let app = App::open(config, Clock::system())?;
    app.first_start()?;
    let (reader, fqid) = participant(&app.first, "reader", "Reader")?;
    let room = commands::create_room(&app.first.rooms, &reader, name, "standard").await?;
    let room_id = RoomId::parse(&room.room_id)?;
    Ok(OneRoom {
        app,
        reader,
        fqid,
        room_id,
        _dir: dir,
    })
}

/// CPU time (user + system) this process has used, from /proc (Linux).
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 counting
    // from 0 after the closing parenthesis.
    // Linux reports them in USER_HZ, which is 100 on every mainstream build.
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// This process's resident set in MiB (Linux).
pub fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(round3(kib / 1024.0))
}

/// A benchmark's exit: its one JSON line on stdout, or its error on
/// stderr and a failing status.
pub fn exit_with(bench: &str, outcome: Result<serde_json::Value>) -> std::process::ExitCode {
    match outcome {
        Ok(line) => {
            println!("{line}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{bench}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
