//! Load generator (SPEC §15): plays a peer server and sends signed events to
//! a target's `/_scaiwave/federation/v1/send`, or, with `--bound`, measures
//! this machine's ceiling for the same work without HTTP.
//!
//! ```text
//! cargo run --release --example loadgen -- --events N --batch B --concurrency C [--rooms R] [--tenants T] [--bound]
//! cargo run --release --example loadgen -- --events 20000 --batch 100 --concurrency 4 --compare-tenants 10
//! cargo run --release --example loadgen -- --events 20000 --single --rate 1000 [--sync flush] [--bound]
//! ```
//!
//! Without `--target` everything runs in this process over loopback HTTPS:
//! a throwaway CA (rcgen), the target server `target.test` and the load
//! generator's own peer server `peer.test` (whose key signs every event and
//! whose descriptor the target fetches), each with a temporary data dir and
//! `federation.resolve` naming every server (tenants included). Rooms are
//! set up the way a real peer would: a participant on the target creates
//! each room and invites `@load:peer.test`, who accepts from the peer server.
//!
//! With `--tenants T` the target instance serves T tenants: `target.test`
//! and T-1 more created while it serves, `t<i>.target.test:<port>`, each
//! with its own certificate from the CA. Every tenant hosts `--rooms R`
//! rooms set up as above, and the transactions go round-robin to the
//! tenants, each at its own name, so the listener routes them by SNI and
//! Host. `--compare-tenants T` runs the ingest twice on fresh instances,
//! with one tenant and then with T, for the per-tenant cost.
//!
//! Exactly one JSON line goes to stdout:
//! `{"events","seconds","events_per_s","p50_ms","p99_ms","rejected",…}`, or
//! with `--compare-tenants`
//! `{"one_tenant":{…},"tenants":T,"n_tenants":{…},"ratio"}`, where `ratio`
//! is T tenants' `events_per_s` over one tenant's.
//! Logs go to stderr (set `RUST_LOG` for the servers' own tracing).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ed25519_dalek::SigningKey;
use serde_json::{json, Value};

use scaiwave::app::App;
use scaiwave::clock::Clock;
use scaiwave::ids::{Fqid, KeyId, LocalId, RoomId, ServerName};
use scaiwave::protocol::canonical;
use scaiwave::protocol::event::Event;
use scaiwave::storage::{keys, DeliveryState, Store, StoreOptions, StoredEvent, WriteSet, T};

#[allow(dead_code)]
mod common;
use common::*;

// The same allocator as the shipped binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TARGET_NAME: &str = "target.test";

#[derive(Parser, Debug)]
#[command(about = "ScaiWave federation load generator (SPEC §15)")]
struct Args {
    /// Number of sw.message events to send.
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Events per /send transaction (1-100).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// /send requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Rooms per tenant to spread the events over (round-robin).
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Tenants the target instance serves; transactions go round-robin
    /// to them.
    #[arg(long, default_value_t = 1)]
    tenants: usize,
    /// Ingest with one tenant, then with this many (fresh instances each),
    /// and print both and their ratio.
    #[arg(long)]
    compare_tenants: Option<usize>,
    /// A remote target `https://HOST:PORT` (not implemented yet).
    #[arg(long)]
    target: Option<String>,
    /// Measure the ceiling without HTTP, only what no server can skip:
    /// strict JCS parse + Ed25519 verify of each event, its bytes written
    /// as one row, one sled transaction and flush per batch. With
    /// `--single`: the same for one event at a time at `--rate`, each
    /// waiting for the server's own group flush (`--sync`), the latency
    /// floor of a single-event `/send`.
    #[arg(long)]
    bound: bool,
    /// Worker threads for `--bound`.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Measure delivery instead: the target builds a backlog of `--events`
    /// events for the peer while the peer refuses it, then the peer lets it
    /// in and the drain of the target's queue is timed (issue 4's figure).
    #[arg(long)]
    drain: bool,
    /// `[storage] sync` of both servers: fsync (the default: accepted
    /// survives a power cut) or flush (a process crash only).
    #[arg(long, default_value = "fsync", value_parser = parse_sync)]
    sync: scaiwave::config::StorageSync,
    /// Latency instead: one event per /send, started at `--rate` events
    /// per second whatever the answers take; prints p50/p99/p999.
    #[arg(long)]
    single: bool,
    /// Offered rate for `--single`, events (= requests) per second.
    #[arg(long)]
    rate: Option<f64>,
}

/// `--single`: at most this many requests unanswered at once; past it the
/// offered rate is not met, and the achieved rate says so.
const SINGLE_IN_FLIGHT_MAX: usize = 256;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logs();
    exit_with("loadgen", run(&args))
}

fn run(args: &Args) -> Result<Value> {
    if args.events == 0 {
        bail!("--events must be at least 1");
    }
    if args.batch == 0 || args.batch > BATCH_MAX {
        bail!("--batch must be 1-{BATCH_MAX} (SPEC §8 caps a transaction at {BATCH_MAX} events)");
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if args.rooms == 0 {
        bail!("--rooms must be at least 1");
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    if args.tenants == 0 || args.compare_tenants == Some(0) {
        bail!("--tenants and --compare-tenants must be at least 1");
    }
    if (args.tenants > 1 || args.compare_tenants.is_some()) && (args.bound || args.drain) {
        bail!("--tenants and --compare-tenants apply to the ingest mode only");
    }
    if args.tenants > 1 && args.compare_tenants.is_some() {
        bail!("--compare-tenants sets the tenant counts itself; leave out --tenants");
    }
    if args.single != args.rate.is_some() {
        bail!("--single and --rate go together: --single --rate EVENTS_PER_S");
    }
    if args.single && (args.drain || args.tenants > 1 || args.compare_tenants.is_some()) {
        bail!("--single measures one tenant's ingest latency; leave out --drain and the tenant options");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of events per second");
    }
    if args.single && args.bound {
        block_on(single_bound(args))
    } else if args.single {
        block_on(with_pair(args, 1, |target, peer| {
            single(args, target, peer)
        }))
    } else if args.bound {
        run_bound(args)
    } else if args.drain {
        block_on(run_drain(args))
    } else if let Some(target) = &args.target {
        bail!(
            "--target {target}: a remote target is not implemented yet; \
             run without --target to start the target in-process"
        );
    } else if let Some(tenants) = args.compare_tenants {
        block_on(compare_tenants(args, tenants))
    } else {
        block_on(run_inprocess(args, args.tenants))
    }
}

fn block_on(work: impl std::future::Future<Output = Result<Value>>) -> Result<Value> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(work)
}

fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

// ---------------------------------------------------------------------------
// In-process mode: two real servers over loopback HTTPS.
// ---------------------------------------------------------------------------

/// Start the target (serving `tenants`) and the peer, run `work` with
/// them, and stop both whatever happened, so the program always ends by
/// itself.
async fn with_pair<F, Fut>(args: &Args, tenants: usize, work: F) -> Result<Value>
where
    F: FnOnce(Arc<App>, Arc<App>) -> Fut,
    Fut: std::future::Future<Output = Result<Value>>,
{
    let ca = Ca::new()?;
    let mut nodes = start_nodes(
        &ca,
        &[(TARGET_NAME, tenants), (PEER_NAME, 1)],
        &BTreeMap::new(),
        args.sync,
    )
    .await?;
    let outcome = work(nodes[0].app().clone(), nodes[1].app().clone()).await;
    while let Some(node) = nodes.pop() {
        node.running.stop().await;
    }
    drop(ca);
    outcome
}

async fn run_inprocess(args: &Args, tenants: usize) -> Result<Value> {
    with_pair(args, tenants, |target, peer| drive(args, target, peer)).await
}

/// Ingest with one tenant, then with `tenants` on fresh instances: what
/// serving more names on one instance costs (issue 11's figure).
async fn compare_tenants(args: &Args, tenants: usize) -> Result<Value> {
    let one = run_inprocess(args, 1).await?;
    let many = run_inprocess(args, tenants).await?;
    let rate = |v: &Value| v["events_per_s"].as_f64().context("a rate in the result");
    let ratio = round3(rate(&many)? / rate(&one)?);
    Ok(json!({
        "one_tenant": one,
        "tenants": tenants,
        "n_tenants": many,
        "ratio": ratio,
    }))
}

/// `--single`: the latency of one event per request at a fixed offered
/// rate (issue 14's half-load figure).
async fn single(args: &Args, target: Arc<App>, peer: Arc<App>) -> Result<Value> {
    let rate = args.rate.context("--single needs --rate")?;
    let rooms = setup_rooms(&target.first, &peer.first, args.rooms).await?;
    let hosted = vec![(target.first.server_name.clone(), rooms)];
    let (_, sender) = participant(&peer.first, "load", "Load")?;
    let mut txns = transactions(&peer, &hosted, &sender, 0..args.events, 1, "single")?.into_iter();
    eprintln!(
        "loadgen: {} single-event requests at {rate} per second",
        args.events
    );
    let (mut tally, sent, seconds) = send_paced(
        &peer,
        || Ok(txns.next()),
        Duration::from_secs_f64(1.0 / rate),
        SINGLE_IN_FLIGHT_MAX,
        None,
    )
    .await?;
    Ok(single_report(
        "single", args, rate, &mut tally, sent, seconds,
    ))
}

/// The JSON line of `--single` (with or without `--bound`); the reasons
/// of refusals and failures go to stderr.
fn single_report(
    mode: &str,
    args: &Args,
    rate: f64,
    tally: &mut Tally,
    sent: usize,
    seconds: f64,
) -> Value {
    for r in &tally.reasons {
        eprintln!("loadgen: refused or failed: {r}");
    }
    tally.latencies.sort_unstable();
    json!({
        "mode": mode,
        "sync": sync_name(args.sync),
        "events": sent,
        "seconds": round3(seconds),
        "offered_events_per_s": rate,
        "achieved_events_per_s": (sent as f64 / seconds).round(),
        "p50_ms": percentile_ms(&tally.latencies, 0.50),
        "p99_ms": percentile_ms(&tally.latencies, 0.99),
        "p999_ms": percentile_ms(&tally.latencies, 0.999),
        "rejected": tally.rejected,
        "unanswered": tally.unanswered,
        "rooms": args.rooms,
    })
}

/// `--single --bound`: the floor under `--single` at the same offered
/// rate. Each event gets the bound's work (parse, verify, one row, one
/// transaction) on a tokio worker, as the server's commit runs, and then
/// waits for the server's own group flush ([`Store::flush`] with
/// `--sync`); no HTTP, no TLS, no signature on the request, no derived rows.
async fn single_bound(args: &Args) -> Result<Value> {
    let rate = args.rate.context("--single needs --rate")?;
    let input = Arc::new(BoundInput::new(args)?);
    let data = tempfile::tempdir().context("temp dir for sled")?;
    let store = Arc::new(Store::open_with(
        &data.path().join("db"),
        &StoreOptions {
            cache_capacity: scaiwave::limits::CACHE_CAPACITY_BYTES_DEFAULT,
            data_dir: data.path().to_path_buf(),
            sync: args.sync,
        },
    )?);
    eprintln!(
        "loadgen: bound: {} single events at {rate} per second",
        args.events
    );
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let mut next = 0..input.wire.len();
    let seconds = paced(
        || {
            let Some(i) = next.next() else {
                return Ok(None);
            };
            let (input, store, tally) = (input.clone(), store.clone(), tally.clone());
            Ok(Some(async move {
                let t0 = Instant::now();
                let outcome = async {
                    let mut w = WriteSet::default();
                    if !input.check_and_put(&input.wire[i], i as u64 + 1, &mut w)? {
                        return Ok(false);
                    }
                    store.commit(&w)?;
                    store.flush().await?;
                    anyhow::Ok(true)
                }
                .await;
                let elapsed = t0.elapsed();
                let mut tally = tally.lock().expect("tally");
                match outcome {
                    Ok(true) => {
                        tally.accepted += 1;
                        tally.latencies.push(elapsed);
                    }
                    Ok(false) => tally.rejected += 1,
                    Err(e) => tally.failed(1, e.to_string()),
                }
            }))
        },
        Duration::from_secs_f64(1.0 / rate),
        SINGLE_IN_FLIGHT_MAX,
        None,
    )
    .await?;
    let mut tally = std::mem::take(&mut *tally.lock().expect("tally"));
    let sent = input.wire.len();
    Ok(single_report(
        "single-bound",
        args,
        rate,
        &mut tally,
        sent,
        seconds,
    ))
}

async fn run_drain(args: &Args) -> Result<Value> {
    with_pair(args, 1, |target, peer| drain(args, target, peer)).await
}

/// The target hosts one room the peer has joined. While the peer's policy
/// refuses the target (a retryable `SW_FED_PEER_UNKNOWN`), the target
/// sequences `--events` messages, all queued for the peer; then the peer
/// opens up, the target is told the peer is back, and the drain is timed.
async fn drain(args: &Args, target: Arc<App>, peer: Arc<App>) -> Result<Value> {
    use scaiwave::federation::policy::Policy;
    use scaiwave::rooms::host::{self, Source};
    let rooms = setup_rooms(&target.first, &peer.first, 1).await?;
    let room = rooms[0].clone();
    let peer_name = ServerName::parse(PEER_NAME)?;
    peer.first.fed.set_policy(Policy {
        default_mode: scaiwave::federation::policy::Mode::InviteOnly,
        ..Policy::default()
    })?;

    let (_, sender) = participant(&target.first, "owner", "Load owner")?;
    let key = target.first.fed.keys.current()?;
    let mut built = 0;
    while built < args.events {
        let n = (args.events - built).min(BATCH_MAX);
        let batch: Vec<(Event, Source)> = (built..built + n)
            .map(|i| {
                let e = Event::create(
                    room.clone(),
                    sender.clone(),
                    target.clock.now_ms(),
                    message(i),
                    &key.key_id,
                    &key.signing,
                );
                (e, Source::Local)
            })
            .collect();
        host::commit(&target.first.rooms, batch).await?;
        built += n;
    }
    let queued = target.first.store.count_prefix(
        scaiwave::storage::T::Outbox,
        &scaiwave::storage::prefix(PEER_NAME),
    );
    eprintln!("loadgen: {queued} events queued for {PEER_NAME}; opening the peer");
    peer.first.fed.set_policy(Policy::default())?;

    let start = Instant::now();
    let cpu_start = process_cpu_seconds();
    target.first.fed.outbox.peer_is_back(&peer_name);
    let deadline = start + Duration::from_secs(600);
    let outbox = scaiwave::storage::prefix(PEER_NAME);
    loop {
        // Only look at the head: counting the whole queue would cost more
        // than the delivery being measured.
        let head = target
            .first
            .store
            .scan_limit::<scaiwave::storage::OutboxItem>(
                scaiwave::storage::T::Outbox,
                &outbox,
                1,
            )?;
        if head.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("events still queued after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds().zip(cpu_start).map(|(b, a)| b - a);
    let stored = peer.first.store.count_prefix(
        scaiwave::storage::T::Events,
        &scaiwave::storage::prefix(room.as_str()),
    );
    Ok(json!({
        "mode": "drain",
        "events": queued,
        "seconds": round3(seconds),
        "events_per_s": (queued as f64 / seconds).round(),
        "stored_on_peer": stored,
        // Both servers' CPU time over the drain, and how many of the
        // machine's cores that kept busy on average.
        "cpu_us_per_event": cpu.map(|c| (c * 1e6 / queued.max(1) as f64).round()),
        "cores_busy": cpu.map(|c| round3(c / seconds)),
    }))
}

async fn drive(args: &Args, target: Arc<App>, peer: Arc<App>) -> Result<Value> {
    let mut hosted: Vec<Hosted> = Vec::new();
    for tenant in target.tenants() {
        let rooms = setup_rooms(&tenant, &peer.first, args.rooms).await?;
        hosted.push((tenant.server_name.clone(), rooms));
    }
    let (_, sender) = participant(&peer.first, "load", "Load")?;
    eprintln!(
        "loadgen: {} room(s) on each of {} tenant(s) joined by {sender}",
        args.rooms,
        hosted.len()
    );

    // Pre-build every signed event and every transaction body; transaction
    // t goes to tenant t mod N, so each tenant gets an even share.
    let bodies = transactions(
        &peer,
        &hosted,
        &sender,
        0..args.events,
        args.batch,
        "loadgen",
    )?;
    let requests = bodies.len();
    eprintln!(
        "loadgen: sending {} events in {requests} transactions of ≤{}, {} in flight",
        args.events, args.batch, args.concurrency
    );
    let (mut tally, seconds) = send_all(&peer, bodies, args.concurrency).await?;

    for r in &tally.reasons {
        eprintln!("loadgen: refused or failed: {r}");
    }
    if tally.unanswered > 0 {
        eprintln!(
            "loadgen: {} request(s) failed, {} event(s) unanswered",
            tally.failed_requests, tally.unanswered
        );
    }
    tally.latencies.sort_unstable();
    Ok(json!({
        "mode": "inprocess",
        "sync": sync_name(args.sync),
        "events": args.events,
        "seconds": round3(seconds),
        "events_per_s": (args.events as f64 / seconds).round(),
        "p50_ms": percentile_ms(&tally.latencies, 0.50),
        "p99_ms": percentile_ms(&tally.latencies, 0.99),
        "rejected": tally.rejected,
        "accepted": tally.accepted,
        "duplicate": tally.duplicate,
        "unanswered": tally.unanswered,
        "requests": requests,
        "failed_requests": tally.failed_requests,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "rooms": args.rooms,
        "tenants": hosted.len(),
    }))
}

// ---------------------------------------------------------------------------
// Bound mode: the same per-event work without HTTP.
// ---------------------------------------------------------------------------

/// What both bounds start from: events signed by a throwaway key, as
/// wire bytes, as they would sit inside a /send body.
struct BoundInput {
    key_id: KeyId,
    verifying: ed25519_dalek::VerifyingKey,
    wire: Vec<Vec<u8>>,
}

impl BoundInput {
    fn new(args: &Args) -> Result<BoundInput> {
        use rand::RngCore;
        let mut seed = [0u8; 32];
        rand::rng().fill_bytes(&mut seed);
        let signing = SigningKey::from_bytes(&seed);
        let verifying = signing.verifying_key();
        let key_id = KeyId::derive(&verifying.to_bytes());
        let target = ServerName::parse(TARGET_NAME)?;
        let sender = Fqid::new(&LocalId::parse("load")?, &ServerName::parse(PEER_NAME)?);
        let rooms: Vec<RoomId> = (0..args.rooms).map(|_| RoomId::generate(&target)).collect();
        let now = Clock::system().now_ms();
        let wire = signed_messages(0..args.events, &rooms, &sender, now, &key_id, &signing)
            .iter()
            .map(|e| e.to_wire_bytes(None))
            .collect();
        Ok(BoundInput {
            key_id,
            verifying,
            wire,
        })
    }

    /// The work no server can skip for one event: a strict JCS parse, an
    /// Ed25519 verify, and its bytes as one row at its place in `w`. False
    /// for an event that fails its checks.
    fn check_and_put(&self, bytes: &[u8], seq: u64, w: &mut WriteSet) -> Result<bool> {
        let checked = canonical::parse_strict(bytes)
            .and_then(Event::from_value)
            .and_then(|(event, _)| {
                event
                    .verify(|id| (*id == self.key_id).then_some(self.verifying))
                    .map(|()| event)
            });
        let Ok(event) = checked else {
            return Ok(false);
        };
        w.put(
            T::Events,
            keys::event(event.room_id.as_str(), seq),
            &StoredEvent {
                json: bytes.to_vec(),
                state: DeliveryState::Sent,
                rejected: false,
            },
        )?;
        Ok(true)
    }
}

fn run_bound(args: &Args) -> Result<Value> {
    let input = BoundInput::new(args)?;
    let batches: Vec<&[Vec<u8>]> = input.wire.chunks(args.batch).collect();

    let data = tempfile::tempdir().context("temp dir for sled")?;
    let store = Store::open(&data.path().join("db"))?;
    let next_batch = AtomicU64::new(0);
    let next_seq = AtomicU64::new(1);
    eprintln!(
        "loadgen: bound: {} events in batches of ≤{} on {} thread(s)",
        args.events, args.batch, args.threads
    );

    let started = Instant::now();
    let results: Vec<Result<(Vec<Duration>, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.threads)
            .map(|_| {
                s.spawn(|| -> Result<(Vec<Duration>, u64)> {
                    let mut latencies = Vec::new();
                    let mut rejected = 0u64;
                    loop {
                        let b = next_batch.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(batch) = batches.get(b) else {
                            break;
                        };
                        let t0 = Instant::now();
                        let mut w = WriteSet::default();
                        for bytes in batch.iter() {
                            let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                            if !input.check_and_put(bytes, seq, &mut w)? {
                                rejected += 1;
                            }
                        }
                        store.commit(&w)?;
                        store.flush_blocking()?;
                        latencies.push(t0.elapsed());
                    }
                    Ok((latencies, rejected))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a bound worker panicked")))
            })
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();

    let mut latencies = Vec::new();
    let mut rejected = 0;
    for r in results {
        let (l, n) = r?;
        latencies.extend(l);
        rejected += n;
    }
    drop(store);
    drop(data);
    latencies.sort_unstable();
    Ok(json!({
        "mode": "bound",
        "events": args.events,
        "seconds": round3(seconds),
        "events_per_s": (args.events as f64 / seconds).round(),
        "p50_ms": percentile_ms(&latencies, 0.50),
        "p99_ms": percentile_ms(&latencies, 0.99),
        "rejected": rejected,
        "batch": args.batch,
        "threads": args.threads,
        "rooms": args.rooms,
    }))
}
