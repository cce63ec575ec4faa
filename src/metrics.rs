//! SPEC §16 metrics: what each layer counts, and the text a scrape gets.
//!
//! Counters and histograms go to the process's one `metrics` recorder
//! (installed by [`install`] when `metrics.listen` is set; until then every
//! call here is a no-op). Each tenant records through its own [`Metrics`],
//! which stamps the `tenant` label and bounds the `peer` label. Gauges
//! (queues, peer health) and the `process_*` series are not recorded: they
//! are read at scrape time and rendered by [`Gauges`], so a removed peer or
//! a drained queue never leaves a stale series behind.
//!
//! **Invariant:** every label value is drawn from a bounded set: route
//! templates (never raw paths), status codes, `SW_*` codes, fixed outcome
//! words, tenant names, and at most [`PEER_LABELS_MAX`] peers per tenant
//! (the rest are `other`). A peer cannot grow the metrics without bound.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::limits::PEER_LABELS_MAX;

pub const HTTP_REQUESTS: &str = "scaiwave_http_requests_total";
pub const HTTP_DURATION: &str = "scaiwave_http_request_duration_seconds";
pub const EVENTS_RECEIVED: &str = "scaiwave_federation_events_received_total";
pub const EVENTS_SENT: &str = "scaiwave_federation_events_sent_total";
pub const QUEUE_DEPTH: &str = "scaiwave_federation_queue_depth";
pub const QUEUE_OLDEST_AGE: &str = "scaiwave_federation_queue_oldest_age_seconds";
pub const DELIVERY_SECONDS: &str = "scaiwave_federation_delivery_seconds";
pub const PEER_UP: &str = "scaiwave_federation_peer_up";
pub const SIGNATURE_VERIFICATIONS: &str = "scaiwave_federation_signature_verifications_total";
pub const DESCRIPTOR_FETCHES: &str = "scaiwave_federation_descriptor_fetches_total";
pub const RATE_LIMITED: &str = "scaiwave_federation_rate_limited_total";
pub const STORAGE_FLUSH: &str = "scaiwave_storage_flush_seconds";

/// The label of peers past [`PEER_LABELS_MAX`].
pub const OTHER_PEER: &str = "other";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process's recorder (once; later calls return the same
/// handle). A process has one recorder, so in a test binary running many
/// servers every scrape shows every server's series, each under its own
/// `tenant`.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(HTTP_DURATION.into()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(DELIVERY_SECONDS.into()),
                    &[
                        0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0,
                    ],
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(STORAGE_FLUSH.into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                    ],
                )
            })
            .expect("bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, describe);
        // A recorder set by someone else (only possible in an embedding
        // program) keeps ours from receiving; the scrape then shows gauges
        // only, which is visible rather than wrong.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// The HELP lines of the recorded series.
fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route template and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        "Time from request head to answer, by route template."
    );
    describe_counter!(
        EVENTS_RECEIVED,
        "Events received from peers, by outcome and SW_* code."
    );
    describe_counter!(EVENTS_SENT, "Events a peer acknowledged.");
    describe_histogram!(
        DELIVERY_SECONDS,
        "Time from enqueue to the peer's acknowledgement."
    );
    describe_counter!(
        SIGNATURE_VERIFICATIONS,
        "Request and event signature checks, by result."
    );
    describe_counter!(DESCRIPTOR_FETCHES, "Peer descriptor fetches, by result.");
    describe_counter!(RATE_LIMITED, "Requests refused with 429, by limiter kind.");
    describe_histogram!(STORAGE_FLUSH, "Time of one database flush.");
}

/// Whether a recorder is installed: without one (`metrics.listen` unset)
/// the hot paths skip building labels at all.
pub fn recording() -> bool {
    HANDLE.get().is_some()
}

/// The counters and histograms, rendered (empty before [`install`]).
pub fn render_recorded() -> String {
    HANDLE
        .get()
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

/// One tenant's recording handle.
pub struct Metrics {
    tenant: String,
    /// Peers that have their own label; a std mutex, held for a lookup.
    peers: Mutex<HashSet<String>>,
}

/// How an inbound event ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate,
    Rejected,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected => "rejected",
        }
    }
}

impl Metrics {
    pub fn new(tenant: &str) -> Metrics {
        Metrics {
            tenant: tenant.to_string(),
            peers: Mutex::default(),
        }
    }

    /// Show the counters that only move on trouble at 0 from the start, so
    /// a dashboard's rate() has a series to begin from.
    pub fn register(&self) {
        for kind in ["origin", "token"] {
            metrics::counter!(RATE_LIMITED, "tenant" => self.tenant.clone(), "kind" => kind)
                .absolute(0);
        }
        for result in ["ok", "error"] {
            metrics::counter!(DESCRIPTOR_FETCHES, "tenant" => self.tenant.clone(), "result" => result)
                .absolute(0);
        }
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// `peer`, or [`OTHER_PEER`] once this tenant has labelled
    /// [`PEER_LABELS_MAX`] others.
    pub fn peer_label(&self, peer: &str) -> String {
        let mut peers = self.peers.lock().expect("metrics peer labels");
        if peers.contains(peer) {
            return peer.to_string();
        }
        if peers.len() < PEER_LABELS_MAX {
            peers.insert(peer.to_string());
            return peer.to_string();
        }
        OTHER_PEER.to_string()
    }

    pub fn http_request(&self, route: &'static str, status: u16, took: Duration) {
        if !recording() {
            return;
        }
        metrics::counter!(HTTP_REQUESTS, "tenant" => self.tenant.clone(), "route" => route, "status" => status.to_string())
            .increment(1);
        metrics::histogram!(HTTP_DURATION, "tenant" => self.tenant.clone(), "route" => route)
            .record(took.as_secs_f64());
    }

    /// The events of one transaction from `peer`: each outcome with the
    /// `SW_*` code of a rejection (`""` otherwise), counted per kind.
    pub fn events_received(
        &self,
        peer: &str,
        outcomes: impl IntoIterator<Item = (Outcome, &'static str)>,
    ) {
        if !recording() {
            return;
        }
        let mut kinds: Vec<((Outcome, &'static str), u64)> = Vec::new();
        for kind in outcomes {
            match kinds.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, n)) => *n += 1,
                None => kinds.push((kind, 1)),
            }
        }
        let peer = self.peer_label(peer);
        for ((outcome, code), n) in kinds {
            metrics::counter!(EVENTS_RECEIVED, "tenant" => self.tenant.clone(), "peer" => peer.clone(), "outcome" => outcome.as_str(), "code" => code)
                .increment(n);
        }
    }

    /// `events` delivered to `peer` in one acknowledged transaction, each
    /// `(now - queued_at)` after it was queued.
    pub fn events_sent(&self, peer: &str, ages: impl IntoIterator<Item = Duration>) {
        if !recording() {
            return;
        }
        let peer = self.peer_label(peer);
        let delivery = metrics::histogram!(DELIVERY_SECONDS, "tenant" => self.tenant.clone(), "peer" => peer.clone());
        let mut n = 0;
        for age in ages {
            delivery.record(age.as_secs_f64());
            n += 1;
        }
        metrics::counter!(EVENTS_SENT, "tenant" => self.tenant.clone(), "peer" => peer)
            .increment(n);
    }

    /// `result`: `ok`, `mismatch`, `no_key`, …, a fixed word.
    pub fn signature_verification(&self, result: &'static str) {
        if !recording() {
            return;
        }
        metrics::counter!(SIGNATURE_VERIFICATIONS, "tenant" => self.tenant.clone(), "result" => result)
            .increment(1);
    }

    /// `result`: `ok` or `error`.
    pub fn descriptor_fetch(&self, result: &'static str) {
        if !recording() {
            return;
        }
        metrics::counter!(DESCRIPTOR_FETCHES, "tenant" => self.tenant.clone(), "result" => result)
            .increment(1);
    }

    /// `kind`: `origin` or `token`.
    pub fn rate_limited(&self, kind: &'static str) {
        if !recording() {
            return;
        }
        metrics::counter!(RATE_LIMITED, "tenant" => self.tenant.clone(), "kind" => kind)
            .increment(1);
    }

    pub fn storage_flush(&self, took: Duration) {
        if !recording() {
            return;
        }
        metrics::histogram!(STORAGE_FLUSH, "tenant" => self.tenant.clone())
            .record(took.as_secs_f64());
    }
}

/// A peer's queue and health as a scrape reports it.
pub struct PeerGauge {
    pub peer: String,
    pub queue_depth: u64,
    pub oldest_age: Duration,
    pub up: bool,
}

/// A gauge family: name, help, and its value for one peer.
type GaugeSeries = (&'static str, &'static str, fn(&PeerGauge) -> String);

/// The series read at scrape time, in Prometheus text format 0.0.4.
#[derive(Default)]
pub struct Gauges {
    /// tenant → its peers (labels already bounded by the tenant's
    /// [`Metrics::peer_label`]; peers folded into `other` are summed).
    peers: Vec<(String, Vec<PeerGauge>)>,
    /// The data disk (one per database, shown under the first tenant).
    storage: Option<StorageGauge>,
}

/// The data disk as a scrape reports it (beyond SPEC §16's table: the
/// full-disk signal issue 12 asks for).
pub struct StorageGauge {
    pub tenant: String,
    /// Writes refused with `SW_STORAGE_FULL` since the start.
    pub full_refusals: u64,
    /// Bytes free for the server on the data disk, when it could be read.
    pub available_bytes: Option<u64>,
}

impl Gauges {
    pub fn tenant(&mut self, metrics: &Metrics, peers: impl IntoIterator<Item = PeerGauge>) {
        let mut rows: Vec<PeerGauge> = Vec::new();
        for mut g in peers {
            g.peer = metrics.peer_label(&g.peer);
            match rows.iter_mut().find(|r| r.peer == g.peer) {
                Some(r) => {
                    r.queue_depth += g.queue_depth;
                    r.oldest_age = r.oldest_age.max(g.oldest_age);
                    r.up &= g.up;
                }
                None => rows.push(g),
            }
        }
        self.peers.push((metrics.tenant().to_string(), rows));
    }

    pub fn storage(&mut self, gauge: StorageGauge) {
        self.storage = Some(gauge);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(st) = &self.storage {
            let tenant = escape(&st.tenant);
            let _ = writeln!(
                out,
                "# HELP scaiwave_storage_full_refusals_total Writes refused because the data disk is full.\n\
                 # TYPE scaiwave_storage_full_refusals_total counter\n\
                 scaiwave_storage_full_refusals_total{{tenant=\"{tenant}\"}} {}",
                st.full_refusals
            );
            if let Some(free) = st.available_bytes {
                let _ = writeln!(
                    out,
                    "# HELP scaiwave_storage_available_bytes Bytes free for the server on the data disk.\n\
                     # TYPE scaiwave_storage_available_bytes gauge\n\
                     scaiwave_storage_available_bytes{{tenant=\"{tenant}\"}} {free}"
                );
            }
        }
        let series: [GaugeSeries; 3] = [
            (QUEUE_DEPTH, "Events queued for the peer.", |g| {
                g.queue_depth.to_string()
            }),
            (
                QUEUE_OLDEST_AGE,
                "Age of the oldest event queued for the peer.",
                |g| format!("{:.3}", g.oldest_age.as_secs_f64()),
            ),
            (
                PEER_UP,
                "1 when the peer is ok, 0 in backoff or failing.",
                |g| u8::from(g.up).to_string(),
            ),
        ];
        for (name, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (tenant, rows) in &self.peers {
                for g in rows {
                    let _ = writeln!(
                        out,
                        "{name}{{tenant=\"{}\",peer=\"{}\"}} {}",
                        escape(tenant),
                        escape(&g.peer),
                        value(g)
                    );
                }
            }
        }
        out.push_str(&process_series());
        out
    }
}

/// A label value in the text format: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `process_resident_memory_bytes`, `process_cpu_seconds_total` and
/// `process_open_fds`, read from /proc (Linux, the only target); a series
/// that cannot be read is left out rather than reported as 0.
fn process_series() -> String {
    let mut out = String::new();
    // SAFETY: sysconf only reads a system constant.
    let (page, ticks) = unsafe {
        (
            libc::sysconf(libc::_SC_PAGESIZE),
            libc::sysconf(libc::_SC_CLK_TCK),
        )
    };
    if let Some(rss_pages) = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
    {
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\n\
             process_resident_memory_bytes {}",
            rss_pages * page
        );
    }
    // Fields 14 and 15 of /proc/self/stat (utime, stime), counted after
    // the parenthesised command name, which may itself hold spaces.
    if let Some(cpu_ticks) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
    {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
             # TYPE process_cpu_seconds_total counter\n\
             process_cpu_seconds_total {:.2}",
            cpu_ticks as f64 / ticks.max(1) as f64
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(
            out,
            "# HELP process_open_fds Number of open file descriptors.\n\
             # TYPE process_open_fds gauge\n\
             process_open_fds {}",
            fds.count()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_labels_are_bounded_per_tenant() {
        let m = Metrics::new("a.test:1");
        for i in 0..PEER_LABELS_MAX {
            assert_eq!(m.peer_label(&format!("p{i}.test")), format!("p{i}.test"));
        }
        assert_eq!(m.peer_label("late.test"), OTHER_PEER);
        assert_eq!(
            m.peer_label("p0.test"),
            "p0.test",
            "known peers keep theirs"
        );
        let other_tenant = Metrics::new("b.test:1");
        assert_eq!(other_tenant.peer_label("late.test"), "late.test");
    }

    #[test]
    fn gauges_fold_unlabelled_peers_into_other() {
        let m = Metrics::new("a.test:1");
        for i in 0..PEER_LABELS_MAX {
            m.peer_label(&format!("p{i}.test"));
        }
        let mut g = Gauges::default();
        g.tenant(
            &m,
            ["x.test", "y.test", "p1.test"].map(|p| PeerGauge {
                peer: p.to_string(),
                queue_depth: 2,
                oldest_age: Duration::from_secs(if p == "y.test" { 9 } else { 1 }),
                up: p != "x.test",
            }),
        );
        let text = g.render();
        assert!(
            text.contains("scaiwave_federation_queue_depth{tenant=\"a.test:1\",peer=\"other\"} 4")
        );
        assert!(text.contains(
            "scaiwave_federation_queue_oldest_age_seconds{tenant=\"a.test:1\",peer=\"other\"} 9.000"
        ));
        assert!(text.contains("scaiwave_federation_peer_up{tenant=\"a.test:1\",peer=\"other\"} 0"));
        assert!(
            text.contains("scaiwave_federation_peer_up{tenant=\"a.test:1\",peer=\"p1.test\"} 1")
        );
        assert!(text.contains("process_resident_memory_bytes "));
        assert!(text.contains("process_open_fds "));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
