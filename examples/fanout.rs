//! Fan-out benchmark (issue 14): one host, `--servers` participating
//! servers, and the time a message takes to be stored on all of them.
//!
//! ```text
//! cargo run --release --example fanout -- --servers 50 [--messages 200] [--interval-ms 20] [--sync flush]
//! ```
//!
//! Everything runs in this process over loopback HTTPS (127.0.0.1 only):
//! a throwaway CA, the host `host.test` and `r1.test` … `rN.test`, each a
//! real server with its own data dir, keys and certificate. The host's
//! owner creates a room and invites `@reader:rI.test` from every server,
//! who accepts on its own server, so each server joins through the real
//! federation flow (invitation delivered, join sent to the host, history
//! and members fetched).
//!
//! Then the owner posts `--messages` messages one at a time: each is
//! signed and sequenced by the host (`host::commit`, `Source::Local`, what
//! `commands::post` does for a room we host), the clock starting just
//! before the signing. The next message goes only once this one is on
//! every server, and `--interval-ms` later, so each figure is one
//! message's fan-out, not a queue of them. The first `--warmup` messages
//! are not counted: they take the first TLS handshakes and page in the
//! caches left cold by the joins.
//!
//! Arrival is learnt without polling: a task per server listens on that
//! server's live stream (`Rooms::subscribe`, what `GET /v1/events` reads),
//! which a replica feeds only after the event's commit and flush, and
//! stamps the time the moment it is woken. A lagging stream would lose
//! arrivals, so the run fails rather than guess.
//!
//! The bound, measured in the same run on the same instances: a second
//! room that only `r1.test` joined, where each fan-out message is followed
//! by one message of its own. Its time (`one_*`) is the whole path to one
//! server — the host's commit and fsync, one `/send`, the replica's verify,
//! commit and fsync — with the other servers idle, so `ratio_p50` and
//! `ratio_p99` (all over one) are what reaching N servers instead of one
//! costs. `first_p50_ms` is the fastest server of each fan-out, and
//! `host_commit_p50_ms` the host's own accept (its fsync included), below
//! which no arrival can be. `cpu_ms_per_message` is the CPU time of the
//! whole process (every instance) over the measured loop, per fan-out
//! message and the solo message after it: next to the machine's core
//! count it says whether the fan-out waits on CPU or on the disk.
//! `rss_mib` is the resident set of all the instances together.
//!
//! Exactly one JSON line goes to stdout:
//! `{"servers","messages","all_p50_ms","all_p99_ms","all_max_ms","each_p50_ms","each_p99_ms","one_p50_ms","ratio_p99",…,"sync"}`;
//! progress goes to stderr. The goal is the issue's: `all_p99_ms` < 1000
//! with 50 servers on loopback.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use scaiwave::app::Tenant;
use scaiwave::ids::{Fqid, RoomId};
use scaiwave::rooms::host::{self, Source};
use scaiwave::rooms::{commands, Outcome};

#[allow(dead_code)]
mod common;
use common::*;

// The same allocator as the shipped binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HOST_NAME: &str = "host.test";
/// A message not on every server this long after its send fails the run.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(about = "Time for one message to reach every participating server")]
struct Args {
    /// Participating servers besides the host.
    #[arg(long, default_value_t = 50)]
    servers: usize,
    /// Messages measured.
    #[arg(long, default_value_t = 200)]
    messages: usize,
    /// Pause after each message has reached every server.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Messages sent first and not counted.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// `[storage] sync` of every server.
    #[arg(long, default_value = "fsync", value_parser = parse_sync)]
    sync: scaiwave::config::StorageSync,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let run = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
        .and_then(|rt| rt.block_on(run(&args)));
    exit_with("fanout", run)
}

async fn run(args: &Args) -> Result<Value> {
    if args.servers == 0 || args.messages == 0 {
        bail!("--servers and --messages must be at least 1");
    }
    let ca = Ca::new()?;
    let names: Vec<String> = std::iter::once(HOST_NAME.to_string())
        .chain((1..=args.servers).map(|i| format!("r{i}.test")))
        .collect();
    let specs: Vec<(&str, usize)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    let started = Instant::now();
    let nodes = start_nodes(&ca, &specs, &BTreeMap::new(), args.sync).await?;
    let start_s = started.elapsed().as_secs_f64();
    let tenants: Vec<&Tenant> = nodes.iter().map(|n| &*n.app().first).collect();
    let outcome = measure(args, &tenants, start_s).await;
    // Every instance winds down at once; waiting for each in turn would
    // leave the rest delivering to servers already gone.
    for node in &nodes {
        node.app().shutdown.cancel();
    }
    for node in nodes {
        node.running.stop().await;
    }
    drop(ca);
    outcome
}

/// A stored event as one server's live stream told of it.
struct Arrival {
    server: usize,
    room: Which,
    seq: u64,
    at: Instant,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Fanout,
    Solo,
}

async fn measure(args: &Args, tenants: &[&Tenant], start_s: f64) -> Result<Value> {
    let (host, replicas) = tenants.split_first().context("a host")?;
    let (owner, owner_fqid) = participant(host, "owner", "Fan-out owner")?;
    let fanout = commands::create_room(&host.rooms, &owner, "fanout", "standard").await?;
    let fanout = RoomId::parse(&fanout.room_id)?;
    let solo = commands::create_room(&host.rooms, &owner, "solo", "standard").await?;
    let solo = RoomId::parse(&solo.room_id)?;

    let joining = Instant::now();
    let mut readers = Vec::with_capacity(replicas.len());
    for (i, replica) in replicas.iter().enumerate() {
        let (reader, fqid) = participant(replica, "reader", "Reader")?;
        let invite_id = commands::invite(&host.rooms, &owner, &fanout, &fqid).await?;
        join_when_invited(replica, &reader, &invite_id, &fanout)
            .await
            .with_context(|| format!("{} joining", replica.server_name))?;
        if (i + 1) % 10 == 0 {
            eprintln!("fanout: {} of {} servers joined", i + 1, replicas.len());
        }
        readers.push((reader, fqid));
    }
    let (reader, fqid) = &readers[0];
    let invite_id = commands::invite(&host.rooms, &owner, &solo, fqid).await?;
    join_when_invited(replicas[0], reader, &invite_id, &solo).await?;
    let join_s = joining.elapsed().as_secs_f64();
    eprintln!(
        "fanout: {} servers started in {start_s:.1}s, joined in {join_s:.1}s",
        tenants.len()
    );

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut listeners = tokio::task::JoinSet::new();
    for (server, replica) in replicas.iter().enumerate() {
        let live = replica.rooms.subscribe();
        let (fanout, solo, tx) = (fanout.to_string(), solo.to_string(), tx.clone());
        listeners.spawn(listen(server, live, fanout, solo, tx));
    }
    drop(tx);

    let mut sender = Sender {
        host,
        owner: &owner_fqid,
        rx: &mut rx,
    };
    let everyone: Vec<usize> = (0..replicas.len()).collect();
    let interval = Duration::from_millis(args.interval_ms);
    let (mut all, mut first, mut each, mut one, mut commits) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let total = args.warmup + args.messages;
    let measuring = Instant::now();
    let cpu_from = process_cpu_seconds();
    for k in 0..total {
        let (commit, arrivals) = sender.send(k, &fanout, Which::Fanout, &everyone).await?;
        tokio::time::sleep(interval).await;
        let (_, alone) = sender.send(k, &solo, Which::Solo, &[0]).await?;
        tokio::time::sleep(interval).await;
        if k < args.warmup {
            continue;
        }
        all.push(*arrivals.iter().max().context("one server at least")?);
        first.push(*arrivals.iter().min().context("one server at least")?);
        each.extend(arrivals);
        one.push(alone[0]);
        commits.push(commit);
        let counted = k + 1 - args.warmup;
        if counted % 50 == 0 {
            eprintln!("fanout: {counted} of {} messages", args.messages);
        }
    }
    let measure_s = measuring.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds().zip(cpu_from).map(|(b, a)| b - a);
    listeners.abort_all();

    for v in [&mut all, &mut first, &mut each, &mut one, &mut commits] {
        v.sort_unstable();
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { round3(a / b) } else { 0.0 };
    let (all_p50, all_p99) = (percentile_ms(&all, 0.50), percentile_ms(&all, 0.99));
    let (one_p50, one_p99) = (percentile_ms(&one, 0.50), percentile_ms(&one, 0.99));
    Ok(json!({
        "servers": replicas.len(),
        "messages": args.messages,
        "all_p50_ms": all_p50,
        "all_p99_ms": all_p99,
        "all_max_ms": percentile_ms(&all, 1.0),
        "each_p50_ms": percentile_ms(&each, 0.50),
        "each_p99_ms": percentile_ms(&each, 0.99),
        "first_p50_ms": percentile_ms(&first, 0.50),
        "one_p50_ms": one_p50,
        "one_p99_ms": one_p99,
        "ratio_p50": ratio(all_p50, one_p50),
        "ratio_p99": ratio(all_p99, one_p99),
        "host_commit_p50_ms": percentile_ms(&commits, 0.50),
        "interval_ms": args.interval_ms,
        "warmup": args.warmup,
        "start_s": round3(start_s),
        "join_s": round3(join_s),
        "measure_s": round3(measure_s),
        "cpu_ms_per_message": cpu.map(|c| round3(c * 1000.0 / total as f64)),
        "rss_mib": rss_mib(),
        "sync": sync_name(args.sync),
    }))
}

/// Forward one server's arrivals in the two rooms, stamped as soon as
/// the stream wakes this task; a lag is forwarded as an error.
async fn listen(
    server: usize,
    mut live: broadcast::Receiver<scaiwave::rooms::LiveEvent>,
    fanout: String,
    solo: String,
    tx: mpsc::UnboundedSender<Result<Arrival, String>>,
) {
    loop {
        let sent = match live.recv().await {
            Ok(event) => {
                let at = Instant::now();
                let room = if event.room_id == fanout {
                    Which::Fanout
                } else if event.room_id == solo {
                    Which::Solo
                } else {
                    continue;
                };
                tx.send(Ok(Arrival {
                    server,
                    room,
                    seq: event.seq,
                    at,
                }))
            }
            Err(broadcast::error::RecvError::Lagged(n)) => tx.send(Err(format!(
                "server {server}'s live stream lost {n} events; arrivals would be missed"
            ))),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if sent.is_err() {
            return;
        }
    }
}

struct Sender<'a> {
    host: &'a Tenant,
    owner: &'a Fqid,
    rx: &'a mut mpsc::UnboundedReceiver<Result<Arrival, String>>,
}

impl Sender<'_> {
    /// Post message `k` to `room` and wait until every server in `expect`
    /// has stored it: the host's commit time and each server's arrival,
    /// both from just before the signing.
    async fn send(
        &mut self,
        k: usize,
        room: &RoomId,
        which: Which,
        expect: &[usize],
    ) -> Result<(Duration, Vec<Duration>)> {
        let rooms = &self.host.rooms;
        let t0 = Instant::now();
        let event = commands::sign(rooms, room, self.owner, message(k))?;
        let mut outcomes = host::commit(rooms, vec![(event, Source::Local)]).await?;
        let commit = t0.elapsed();
        let seq = match outcomes.pop() {
            Some(Outcome::Accepted(seq)) => seq,
            Some(Outcome::Rejected(e)) => bail!("message {k} refused by the host: {e}"),
            other => bail!("message {k}: unexpected outcome {other:?}"),
        };
        // Arrivals may come before the commit returns (delivery is woken
        // inside it); each carries its own stamp, so that is fine.
        let mut arrived: BTreeMap<usize, Duration> = BTreeMap::new();
        let deadline = tokio::time::Instant::from_std(t0 + ARRIVAL_TIMEOUT);
        while arrived.len() < expect.len() {
            let next = tokio::time::timeout_at(deadline, self.rx.recv()).await;
            let a = match next {
                Ok(Some(Ok(a))) => a,
                Ok(Some(Err(lag))) => bail!("{lag}"),
                Ok(None) => bail!("every live stream closed"),
                Err(_) => {
                    let missing = expect.iter().filter(|s| !arrived.contains_key(s)).count();
                    bail!(
                        "message {k} (seq {seq}) not on {missing} of {} server(s) after {ARRIVAL_TIMEOUT:?}",
                        expect.len()
                    );
                }
            };
            if a.room == which && a.seq == seq && expect.contains(&a.server) {
                arrived
                    .entry(a.server)
                    .or_insert_with(|| a.at.saturating_duration_since(t0));
            }
        }
        Ok((commit, arrived.into_values().collect()))
    }
}
