//! The delivery loop under controlled time: a scripted transport answers,
//! tokio's paused clock moves, and the real queue (sled) is checked.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use proptest::prelude::*;
use scaiwave::app::App;
use scaiwave::clock::Clock;
use scaiwave::config::Config;
use scaiwave::delivery::Transport;
use scaiwave::federation::peer_api::Attempt;
use scaiwave::federation::Federation;
use scaiwave::ids::{RoomId, ServerName};
use scaiwave::protocol::wire::{SendAnswer, SendResult, SendStatus};
use scaiwave::storage::{self, WriteSet, T};
use serde_json::Value;
use tokio::time::Instant;

use crate::testnet::{message, signed_event};

/// What the scripted peer does with one transaction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Answer {
    AcceptAll,
    Network,
    RetryAfter(u64),
    RefuseWhole,
    /// Reject the first event with a code; accept the rest.
    RejectFirst {
        retryable: bool,
    },
    /// 200 with no result for our events (a confused peer).
    Empty,
}

#[derive(Default)]
pub struct Script {
    pub answers: Mutex<VecDeque<Answer>>,
    pub fallback: Mutex<Option<Answer>>,
    /// (when, event ids) of every attempt.
    pub attempts: Mutex<Vec<(Instant, Vec<String>)>>,
    /// Event ids the peer accepted, in order.
    pub delivered: Mutex<Vec<String>>,
    /// Event ids refused with a retryable per-event error (they go later).
    pub held: Mutex<Vec<String>>,
    /// How long each attempt takes to answer, in order (none: at once).
    pub delays: Mutex<VecDeque<Duration>>,
    /// Transactions in flight now, and the most there ever were at once.
    pub in_flight: Mutex<(usize, usize)>,
    /// For each attempt: whether everything the sender could read was durable.
    pub durable_at_send: Mutex<Vec<bool>>,
}

fn event_ids(body: &[u8]) -> Vec<String> {
    let v: Value = serde_json::from_slice(body).unwrap();
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect()
}

impl Transport for Script {
    fn send<'a>(
        &'a self,
        fed: &'a Federation,
        _peer: &'a ServerName,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Attempt> {
        self.durable_at_send
            .lock()
            .unwrap()
            .push(fed.store.reads_are_durable());
        let ids = event_ids(&body);
        self.attempts
            .lock()
            .unwrap()
            .push((Instant::now(), ids.clone()));
        let answer = self
            .answers
            .lock()
            .unwrap()
            .pop_front()
            .or(*self.fallback.lock().unwrap())
            .unwrap_or(Answer::Network);
        let result = |id: &String, status: SendStatus, error: Option<(&str, bool)>| SendResult {
            event_id: id.clone(),
            status,
            seq: None,
            error: error.map(|(c, r)| scaiwave::error::WireErrorInner {
                code: c.into(),
                message: "scripted".into(),
                reason: None,
                retryable: r,
            }),
        };
        let attempt = match answer {
            Answer::AcceptAll => {
                self.delivered.lock().unwrap().extend(ids.iter().cloned());
                Attempt::Answered(SendAnswer {
                    results: ids
                        .iter()
                        .map(|i| result(i, SendStatus::Accepted, None))
                        .collect(),
                })
            }
            Answer::Network => Attempt::Retry {
                code: "network".into(),
                message: "connection refused".into(),
                retry_after_secs: None,
            },
            Answer::RetryAfter(s) => Attempt::Retry {
                code: "SW_FED_RATE_LIMITED".into(),
                message: "slow down".into(),
                retry_after_secs: Some(s),
            },
            Answer::Empty => Attempt::Answered(SendAnswer { results: vec![] }),
            Answer::RefuseWhole => Attempt::Refused {
                code: "SW_FED_POLICY_REJECTED".into(),
                message: "go away".into(),
            },
            Answer::RejectFirst { retryable } => {
                let code = if retryable {
                    "SW_FED_SIGNATURE_MISMATCH"
                } else {
                    "SW_FED_NOT_MEMBER"
                };
                let mut results = Vec::new();
                for (i, id) in ids.iter().enumerate() {
                    if i == 0 {
                        if retryable {
                            self.held.lock().unwrap().push(id.clone());
                        }
                        results.push(result(id, SendStatus::Rejected, Some((code, retryable))));
                    } else {
                        self.delivered.lock().unwrap().push(id.clone());
                        results.push(result(id, SendStatus::Accepted, None));
                    }
                }
                Attempt::Answered(SendAnswer { results })
            }
        };
        let delay = self.delays.lock().unwrap().pop_front();
        {
            let mut g = self.in_flight.lock().unwrap();
            g.0 += 1;
            g.1 = g.1.max(g.0);
        }
        Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            self.in_flight.lock().unwrap().0 -= 1;
            attempt
        })
    }
}

// Named with ports, as real servers often are. No socket is bound here
// (the scripted transport stands in for the network), so a fixed port will do.
/// This server's server_name.
pub const SELF: &str = "a.test:8448";
/// The scripted peer's server_name.
pub const PEER: &str = "b.test:8448";
/// A room this server (a.test) hosts: its events carry their seq.
const HOSTED_ROOM: &str = "!RoomHostedHere000000:a.test:8448";
/// A room the peer (b.test) hosts.
const PEER_ROOM: &str = "!RoomHostedOnPeer0000:b.test:8448";
/// Our participant who writes every queued event.
const ALICE: &str = "@alice:a.test:8448";
pub const T0: i64 = 1_800_000_000_000;

pub fn config(dir: &std::path::Path) -> Config {
    let mut c = Config::default_embedded();
    c.server_name = ServerName::parse(SELF).unwrap();
    c.data_dir = dir.to_path_buf();
    c
}

pub fn open(dir: &std::path::Path, script: Arc<Script>, clock: Clock) -> Arc<App> {
    // After a restart, sled's background flusher of the previous handle may
    // hold the file lock for up to its flush interval: wait for it (bounded).
    let mut tries = 0;
    let app = loop {
        match App::open_with(config(dir), clock.clone(), script.clone()) {
            Ok(app) => break app,
            Err(e) if e.message.contains("could not acquire lock") && tries < 300 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    if !app.first.fed.keys.has_key() {
        app.first.fed.keys.generate(T0).unwrap();
    }
    app.start_delivery();
    app
}

/// Queue `n` new events (in a room the peer hosts) for the peer.
pub fn enqueue(app: &Arc<App>, n: usize) -> Vec<String> {
    enqueue_in(app, PEER_ROOM, n)
}

pub fn enqueue_in(app: &Arc<App>, room: &str, n: usize) -> Vec<String> {
    let ids = enqueue_unflushed(app, room, n);
    // As every committer does: flush after the commit.
    app.first.store.flush_blocking().unwrap();
    ids
}

/// Queue `n` events, committed but not yet flushed, and wake the sender.
fn enqueue_unflushed(app: &Arc<App>, room: &str, n: usize) -> Vec<String> {
    let mut w = WriteSet::default();
    let peer = ServerName::parse(PEER).unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let e = signed_event(app, room, ALICE, message(&format!("m{i}")));
        app.first
            .store
            .queue_event(&mut w, &peer, &e, e.to_wire_bytes(None), app.clock.now_ms())
            .unwrap();
        ids.push(e.event_id.to_string());
    }
    app.first.store.commit(&w).unwrap();
    app.first.fed.outbox.wake(&peer);
    ids
}

/// Every audit row `app` holds, oldest first.
fn audit_rows(app: &App) -> Vec<storage::AuditRow> {
    app.first.store.audit_rows().unwrap()
}

pub fn queue_depth(app: &App) -> usize {
    app.first
        .store
        .count_prefix(T::Outbox, &storage::prefix(PEER))
}

/// A fresh app at `T0` on a temporary directory (kept alive by the caller),
/// its peer scripted to answer `fallback` (a network error if `None`) when
/// no scripted answer is left.
fn fresh(fallback: Option<Answer>) -> (tempfile::TempDir, Arc<Script>, Arc<App>) {
    let dir = tempfile::tempdir().unwrap();
    let script = Arc::new(Script::default());
    *script.fallback.lock().unwrap() = fallback;
    let app = open(dir.path(), script.clone(), Clock::starting_at(T0));
    (dir, script, app)
}

/// Every id in `ids` reached the peer, each once (in any order), and the
/// queue is empty.
fn assert_all_delivered_once(script: &Script, app: &App, mut ids: Vec<String>) {
    let mut delivered = script.delivered.lock().unwrap().clone();
    delivered.sort();
    ids.sort();
    assert_eq!(delivered, ids);
    assert_eq!(queue_depth(app), 0);
}

async fn settle() {
    // Let the delivery task run without moving time much.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Yield until `done` holds, without moving tokio's paused clock, for at
/// most a few real seconds (work on sled's own threads finishes in real
/// time).
async fn settle_until(done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() && std::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}

async fn stop(app: Arc<App>) {
    app.shutdown.cancel();
    app.tasks.close();
    app.tasks.wait().await;
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_with_jitter_one_probe_per_interval() {
    let (_dir, script, app) = fresh(None);
    enqueue(&app, 1);
    tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
    let times: Vec<Instant> = script
        .attempts
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.0)
        .collect();
    let (initial, max) = (
        app.config.federation.retry_initial,
        app.config.federation.retry_max_interval,
    );
    for (k, w) in times.windows(2).enumerate() {
        let gap = w[1] - w[0];
        let base = initial.saturating_mul(1 << k.min(30)).min(max);
        assert!(
            gap >= base / 2 && gap <= base + Duration::from_millis(1),
            "gap {k}: {gap:?} not in [{:?}, {base:?}]",
            base / 2
        );
    }
    // 2+4+…+2048 s ≈ 68 min to reach the cap, then at most one probe per
    // 30-60 min: never a storm.
    assert!(
        times.len() >= 13 && times.len() <= 20,
        "{} attempts in 3 h",
        times.len()
    );
    assert_eq!(queue_depth(&app), 1, "nothing lost while retrying");

    // New rows during backoff do not cause an extra attempt...
    let before = script.attempts.lock().unwrap().len();
    enqueue(&app, 2);
    settle().await;
    assert_eq!(script.attempts.lock().unwrap().len(), before);
    // ...but the peer talking to us wakes the queue at once.
    *script.fallback.lock().unwrap() = Some(Answer::AcceptAll);
    let now = Instant::now();
    app.first
        .fed
        .outbox
        .peer_is_back(&ServerName::parse(PEER).unwrap());
    settle().await;
    let attempts = script.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), before + 1);
    assert_eq!(attempts.last().unwrap().0, now, "woken without waiting");
    assert_eq!(
        attempts.last().unwrap().1.len(),
        3,
        "one transaction with all three, FIFO"
    );
    assert_eq!(queue_depth(&app), 0);
    stop(app).await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let script = Arc::new(Script::default());
    script
        .answers
        .lock()
        .unwrap()
        .push_back(Answer::RetryAfter(120));
    *script.fallback.lock().unwrap() = Some(Answer::AcceptAll);
    let app = open(dir.path(), script.clone(), Clock::starting_at(T0));
    enqueue(&app, 1);
    tokio::time::sleep(Duration::from_secs(600)).await;
    let a = script.attempts.lock().unwrap().clone();
    assert_eq!(a.len(), 2);
    assert!(a[1].0 - a[0].0 >= Duration::from_secs(120));
    stop(app).await;
}

#[tokio::test(start_paused = true)]
async fn gives_up_at_exactly_retry_max_age_with_audit_and_failed_state() {
    let (_dir, script, app) = fresh(None);
    // bob... here alice@a.test posts into a room b.test hosts: pending until b answers.
    let room = RoomId::parse(PEER_ROOM).unwrap();
    scaiwave::rooms::replica::ensure_room(
        &app.first.rooms,
        &room,
        "r",
        storage::RoomType::Standard,
    )
    .unwrap();
    let e = signed_event(&app, room.as_str(), ALICE, message("hello?"));
    scaiwave::rooms::replica::submit(&app.first.rooms, &e)
        .await
        .unwrap();
    // The row's own time: while submit waited for sled's threads, the
    // paused clock may have jumped to the sender's first retry.
    let queued: Vec<(Vec<u8>, storage::OutboxItem)> = app
        .first
        .store
        .scan(T::Outbox, &storage::prefix(PEER))
        .unwrap();
    let queued_at = queued[0].1.queued_at_ms;
    let max_age = app.config.federation.retry_max_age.as_millis() as i64;

    app.clock.sleep_until_ms(queued_at + max_age - 1).await;
    assert_eq!(
        queue_depth(&app),
        1,
        "still queued 1 ms before the deadline"
    );
    app.clock.sleep_until_ms(queued_at + max_age + 1).await;
    // Giving up writes to sled, whose threads tokio's paused clock does not
    // wait for: yield (time stands still) until it is done, bounded in
    // real time.
    settle_until(|| queue_depth(&app) == 0).await;
    assert_eq!(queue_depth(&app), 0, "dropped at the deadline");
    let state =
        scaiwave::rooms::views::pending_state(&app.first.rooms, &room, &e.event_id.to_string())
            .unwrap();
    assert_eq!(state, Some(storage::DeliveryState::Failed));
    let rows = audit_rows(&app);
    let row = rows
        .iter()
        .find(|r| r.action == "federation.send.failed")
        .expect("audited");
    // Exactly at the deadline, to the timer's resolution: tokio rounds a
    // sleep up to its next millisecond tick.
    let late = row.at_ms - queued_at - max_age;
    assert!(
        (0..=1).contains(&late),
        "given up {late} ms after retry_max_age"
    );
    assert_eq!(
        row.event_id.as_deref(),
        Some(e.event_id.to_string().as_str())
    );
    let attempts = script.attempts.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
    assert_eq!(
        script.attempts.lock().unwrap().len(),
        attempts,
        "a given-up event is never sent again"
    );
    stop(app).await;
}

#[tokio::test(start_paused = true)]
async fn fifo_batches_of_100_and_per_event_outcomes() {
    let (_dir, script, app) = fresh(Some(Answer::AcceptAll));
    // Queue first, then let the task run: 250 rows go as 100 + 100 + 50.
    let ids = enqueue(&app, 250);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sizes: Vec<usize> = script
        .attempts
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.1.len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 250);
    assert!(sizes.iter().all(|s| *s <= 100), "{sizes:?}");
    assert_eq!(*script.delivered.lock().unwrap(), ids, "FIFO");

    // A retryable per-event rejection keeps only that event; a final one drops it.
    script.delivered.lock().unwrap().clear();
    script.answers.lock().unwrap().extend([
        Answer::RejectFirst { retryable: true },
        Answer::RejectFirst { retryable: false },
    ]);
    let ids = enqueue(&app, 3);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(queue_depth(&app), 0);
    // First answer: ids[1], ids[2] accepted; ids[0] kept. Second: ids[0] refused for good.
    assert_eq!(
        *script.delivered.lock().unwrap(),
        vec![ids[1].clone(), ids[2].clone()]
    );
    let rows = audit_rows(&app);
    assert!(rows
        .iter()
        .any(|r| r.action == "federation.send.failed"
            && r.event_id.as_deref() == Some(ids[0].as_str())));
    stop(app).await;
}

#[tokio::test(start_paused = true)]
async fn events_we_host_go_in_parallel_transactions() {
    let (_dir, script, app) = fresh(Some(Answer::AcceptAll));
    // Events of a room we host carry their seq: arrival order cannot matter.
    let ids = enqueue_in(&app, HOSTED_ROOM, 250);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attempts = script.attempts.lock().unwrap().clone();
    assert_eq!(
        attempts.iter().map(|a| a.1.len()).collect::<Vec<_>>(),
        [100, 100, 50]
    );
    assert!(
        attempts.iter().all(|a| a.0 == attempts[0].0),
        "sent together"
    );
    assert_all_delivered_once(&script, &app, ids);
    stop(app).await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_transaction_does_not_hold_up_the_window() {
    let (_dir, script, app) = fresh(Some(Answer::AcceptAll));
    // The first transaction takes 10 s to answer, every other one 1 s.
    script.delays.lock().unwrap().extend(
        [Duration::from_secs(10)]
            .into_iter()
            .chain(std::iter::repeat_n(Duration::from_secs(1), 20)),
    );
    let ids = enqueue_in(&app, HOSTED_ROOM, 1000);
    tokio::time::sleep(Duration::from_millis(5500)).await;
    // In rounds, nothing more would go before the slow one answered; a
    // window replaces each answered transaction at once, keeping 3 out.
    let sent: usize = script
        .attempts
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.1.len())
        .sum();
    assert_eq!(sent, 1000, "the other nine went while the first was out");
    assert_eq!(
        script.in_flight.lock().unwrap().1,
        scaiwave::limits::PIPELINE_DEPTH,
        "never more than the window"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_all_delivered_once(&script, &app, ids);
    stop(app).await;
}

// Real time: the flush runs on sled's own threads, which paused time
// would not wait for.
#[tokio::test]
async fn rows_leave_only_once_durable() {
    let (_dir, script, app) = fresh(Some(Answer::AcceptAll));
    // The delivery loop can read rows whose commit has not been flushed
    // yet; were they sent and the host crashed, it would give their seqs
    // to other events.
    let ids = enqueue_unflushed(&app, HOSTED_ROOM, 150);
    crate::testnet::eventually("every row sent", || async {
        script.delivered.lock().unwrap().len() == ids.len()
    })
    .await;
    let durable = script.durable_at_send.lock().unwrap().clone();
    assert!(
        !durable.is_empty() && durable.iter().all(|d| *d),
        "{durable:?}"
    );
    stop(app).await;
}

#[derive(Debug, Clone)]
enum Op {
    Enqueue(usize),
    /// Events of a room we host: they may travel in parallel transactions.
    EnqueueHosted(usize),
    Answer(Answer),
    Restart,
    AdvanceSecs(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..30).prop_map(Op::Enqueue),
        (1usize..250).prop_map(Op::EnqueueHosted),
        prop_oneof![
            Just(Answer::AcceptAll),
            Just(Answer::Network),
            Just(Answer::RefuseWhole),
            Just(Answer::RejectFirst { retryable: true }),
            Just(Answer::RejectFirst { retryable: false }),
        ]
        .prop_map(Op::Answer),
        Just(Op::Restart),
        prop_oneof![
            Just(1u64),
            Just(30),
            Just(3600),
            Just(6 * 3600),
            Just(20 * 3600)
        ]
        .prop_map(Op::AdvanceSecs),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Any interleaving of enqueue / answers / restart / time loses nothing
    /// before give-up, never delivers a given-up event, and keeps FIFO
    /// order among events sent one transaction at a time (events of rooms
    /// we host may go in parallel transactions, in any order).
    #[test]
    fn queue_model(ops in proptest::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let script = Arc::new(Script::default());
            *script.fallback.lock().unwrap() = Some(Answer::Network);
            let clock = Clock::starting_at(T0);
            let mut app = open(dir.path(), script.clone(), clock.clone());
            let mut enqueued: Vec<String> = Vec::new();
            let mut hosted: std::collections::BTreeSet<String> = Default::default();
            for op in ops {
                match op {
                    Op::Enqueue(n) => enqueued.extend(enqueue(&app, n)),
                    Op::EnqueueHosted(n) => {
                        let ids = enqueue_in(&app, HOSTED_ROOM, n);
                        hosted.extend(ids.iter().cloned());
                        enqueued.extend(ids);
                    }
                    Op::Answer(a) => script.answers.lock().unwrap().push_back(a),
                    Op::Restart => {
                        stop(app.clone()).await;
                        drop(app);
                        app = open(dir.path(), script.clone(), clock.clone());
                    }
                    Op::AdvanceSecs(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                }
                settle().await;
            }
            *script.fallback.lock().unwrap() = Some(Answer::AcceptAll);
            app.first.fed.outbox.peer_is_back(&ServerName::parse(PEER).unwrap());
            tokio::time::sleep(Duration::from_secs(2 * 3600)).await;

            let delivered = script.delivered.lock().unwrap().clone();
            let rows = audit_rows(&app);
            let failed: std::collections::BTreeSet<String> = rows.iter().filter(|r| r.action == "federation.send.failed").filter_map(|r| r.event_id.clone()).collect();
            // Nothing lost: every event was delivered or given up (audited), and nothing is left.
            assert_eq!(queue_depth(&app), 0);
            for id in &enqueued {
                assert!(delivered.contains(id) || failed.contains(id), "event {id} was lost");
            }
            // Never delivered after being given up.
            for id in &failed {
                assert!(!delivered.contains(id), "given-up event {id} was delivered");
            }
            // FIFO: delivered events keep their enqueue order, except those a
            // retryable per-event rejection held back (they go later).
            let position = |id: &String| enqueued.iter().position(|e| e == id).unwrap();
            let held = script.held.lock().unwrap().clone();
            let in_order: Vec<usize> = delivered.iter().filter(|id| !held.contains(id) && !hosted.contains(*id)).map(position).collect();
            assert!(in_order.windows(2).all(|w| w[0] < w[1]), "FIFO broken: {in_order:?}");
            stop(app).await;
        });
    }
}

#[tokio::test(start_paused = true)]
async fn audit_rows_are_kept_for_audit_retention() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::starting_at(T0);
    let app = open(dir.path(), Arc::new(Script::default()), clock.clone());
    app.first.fed.audit(
        "federation.event.accepted",
        None,
        Some("old"),
        None,
        None,
        "",
    );
    clock.advance(Duration::from_secs(60 * 86400));
    app.first.fed.audit(
        "federation.event.accepted",
        None,
        Some("recent"),
        None,
        None,
        "",
    );
    clock.advance(Duration::from_secs(30 * 86400 + 1));
    assert_eq!(
        scaiwave::rooms::retention::run_pass(&app.first.rooms, app.config.audit.retention)
            .unwrap()
            .audit_rows,
        1,
        "only the row older than 90 d goes"
    );
    let rows = audit_rows(&app);
    assert_eq!(
        rows.iter()
            .map(|r| r.event_id.clone().unwrap())
            .collect::<Vec<_>>(),
        ["recent"]
    );
    stop(app).await;
}

#[tokio::test(start_paused = true)]
async fn the_key_rotates_on_schedule_and_keeps_the_old_one_for_the_overlap() {
    let (_dir, _script, app) = fresh(None);
    let first = app.first.fed.keys.current().unwrap().key_id;
    let (fed, shutdown) = (app.first.fed.clone(), app.shutdown.clone());
    app.tasks
        .spawn(async move { fed.rotation_timer(shutdown).await });
    let interval = app.config.federation.key_rotation_interval;
    tokio::time::sleep(interval - Duration::from_secs(60)).await;
    assert_eq!(
        app.first.fed.keys.current().unwrap().key_id,
        first,
        "not before key_rotation_interval"
    );
    tokio::time::sleep(Duration::from_secs(120)).await;
    let second = app.first.fed.keys.current().unwrap().key_id;
    assert_ne!(second, first, "rotated at key_rotation_interval");
    let d = app.first.fed.keys.descriptor(&app.first.server_name);
    assert_eq!(d.old_keys.len(), 1);
    assert_eq!(d.old_keys[0].key_id, first.as_str());
    let ring = app.first.fed.keys.ring();
    let old = &ring.old[0];
    assert_eq!(
        old.expires_at_ms.unwrap() - old.rotated_at_ms.unwrap(),
        app.config.federation.key_overlap.as_millis() as i64
    );
    assert!(audit_rows(&app)
        .iter()
        .any(|r| r.action == "federation.key.rotated"));
    stop(app).await;
}

#[tokio::test(start_paused = true)]
async fn an_answer_without_our_events_backs_off_instead_of_spinning() {
    let (_dir, script, app) = fresh(Some(Answer::Empty));
    enqueue(&app, 1);
    tokio::time::sleep(Duration::from_secs(600)).await;
    let attempts = script.attempts.lock().unwrap().len();
    assert!(
        (5..=12).contains(&attempts),
        "{attempts} attempts in 10 min: backoff, not a storm"
    );
    assert_eq!(queue_depth(&app), 1, "kept, since the peer never said");
    stop(app).await;
}

#[tokio::test(start_paused = true)]
async fn nothing_is_sent_to_a_peer_our_policy_refuses() {
    let (_dir, script, app) = fresh(Some(Answer::AcceptAll));
    let deny = app
        .first
        .fed
        .policy()
        .patched(&serde_json::json!({"denied_peers": [PEER]}))
        .unwrap();
    app.first.fed.set_policy(deny).unwrap();
    enqueue(&app, 2);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(
        script.attempts.lock().unwrap().is_empty(),
        "never sent while denied"
    );
    assert_eq!(queue_depth(&app), 2, "kept for when the policy changes");
    app.first
        .fed
        .set_policy(scaiwave::federation::policy::Policy::default())
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        script.delivered.lock().unwrap().len(),
        2,
        "sent once allowed again"
    );
    stop(app).await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_peer_gets_one_probe_per_interval_even_for_hosted_events() {
    let (_dir, script, app) = fresh(None);
    // 250 events we host could go as three parallel transactions...
    enqueue_in(&app, HOSTED_ROOM, 250);
    tokio::time::sleep(Duration::from_secs(120)).await;
    let attempts = script.attempts.lock().unwrap().clone();
    // ...but after the first failure each retry is a single transaction.
    let first_round = attempts.iter().filter(|a| a.0 == attempts[0].0).count();
    assert_eq!(first_round, 3, "the first round goes in parallel");
    let mut times: Vec<_> = attempts[first_round..].iter().map(|a| a.0).collect();
    let n = times.len();
    times.dedup();
    assert_eq!(times.len(), n, "one transaction per retry time");
    assert!(n >= 3, "{n} retries in 2 min");
    stop(app).await;
}
