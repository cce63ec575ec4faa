//! The composition root: opens one server's state and builds its layers
//! (federation, rooms, delivery, the HTTP services) once, bottom up. Each
//! layer gets the handles it needs and nothing above it; only this module
//! and [`crate::server`] (which starts the tasks) see them all.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::Services;
use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::{Delivery, HttpsTransport, Transport};
use crate::error::{Error, Result};
use crate::federation::outbox::NewPeers;
use crate::federation::Federation;
use crate::ids::{LocalId, ServerName};
use crate::rooms::GapFills;
use crate::rooms::Rooms;
use crate::storage::{PowerLevel, Store};

pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// One server, composed.
pub struct App {
    pub config: Config,
    pub server_name: ServerName,
    pub store: Store,
    pub clock: Clock,
    pub fed: Arc<Federation>,
    pub rooms: Arc<Rooms>,
    pub services: Arc<Services>,
    pub delivery: Arc<Delivery>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// The receivers the background tasks drain, until [`App::start_tasks`]
    /// hands them over. A std mutex: taken once, never across `.await`.
    pending: Mutex<Option<(NewPeers, GapFills)>>,
}

impl App {
    /// Open the data dir and load state. `first_start` work (key, admin
    /// token) is done by [`App::first_start`].
    pub fn open(config: Config, clock: Clock) -> Result<Arc<App>> {
        App::open_with(config, clock, Arc::new(HttpsTransport))
    }

    /// [`App::open`] with another delivery transport (tests script one).
    pub fn open_with(
        config: Config,
        clock: Clock,
        transport: Arc<dyn Transport>,
    ) -> Result<Arc<App>> {
        crate::tls::install_crypto_provider();
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            Error::bad_request(format!(
                "cannot create data_dir {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let store = Store::open(&config.data_dir.join("db"))?;
        crate::storage::make_private(&config.data_dir)?;
        let (fed, new_peers) = Federation::open(&config, store.clone(), clock.clone())?;
        let fed = Arc::new(fed);
        let (rooms, gap_fills) = Rooms::new(fed.clone(), config.livekit.clone());
        let rooms = Arc::new(rooms);
        let shutdown = CancellationToken::new();
        let services = Arc::new(Services {
            rooms: rooms.clone(),
            limits: config.limits.clone(),
            shutdown: shutdown.clone(),
        });
        let delivery = Delivery::new(rooms.clone(), transport, shutdown.clone());
        Ok(Arc::new(App {
            server_name: config.server_name.clone(),
            config,
            store,
            clock,
            fed,
            rooms,
            services,
            delivery,
            shutdown,
            tasks: TaskTracker::new(),
            pending: Mutex::new(Some((new_peers, gap_fills))),
        }))
    }

    /// First-start behaviour of SPEC §12: a signing key (unless disabled)
    /// and the first admin, whose token goes to `<data_dir>/admin-token`.
    pub fn first_start(&self) -> Result<()> {
        if self.config.federation.generate_key_on_start && !self.fed.keys.has_key() {
            let rec = self.fed.keys.generate(self.clock.now_ms())?;
            tracing::info!(key_id = %rec.key_id, "generated the federation signing key");
        }
        let admin = LocalId::parse("admin")?;
        if self.store.participant(&admin)?.is_none() {
            let token = self
                .rooms
                .create_participant(&admin, "Admin", PowerLevel::Admin)?;
            let path = self.admin_token_path();
            crate::tls::write_private(&path, format!("{token}\n").as_bytes())?;
            tracing::info!(path = %path.display(), "wrote the first admin token (mode 0600)");
        }
        Ok(())
    }

    /// Start the background work every running server has: the delivery
    /// worker and gap fills ([`App::start_delivery`]), key rotation and
    /// retention.
    pub fn start_tasks(&self) {
        self.start_delivery();
        let fed = self.fed.clone();
        let shutdown = self.shutdown.clone();
        self.tasks
            .spawn(async move { fed.rotation_timer(shutdown).await });
        self.tasks.spawn(retention(
            self.rooms.clone(),
            self.config.audit.retention,
            self.shutdown.clone(),
        ));
    }

    /// Start the delivery worker (with a task per peer that has queued
    /// rows) and the gap fill runner. Once; a second call does nothing.
    pub fn start_delivery(&self) {
        let Some((new_peers, gap_fills)) = self.pending.lock().expect("pending lock").take() else {
            return;
        };
        self.tasks
            .spawn(self.delivery.clone().run(new_peers, self.tasks.clone()));
        self.tasks.spawn(crate::rooms::history::fill_gaps(
            self.rooms.clone(),
            gap_fills,
            self.tasks.clone(),
            self.shutdown.clone(),
        ));
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.config.data_dir.join(ADMIN_TOKEN_FILE)
    }

    /// Stop: cancel every task, wait for them, and flush.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}

/// Keep what ages out within its retention: audit rows (`audit.retention`,
/// SPEC §11), cached `/send` answers, and the rest of
/// [`crate::rooms::retention::run_pass`], every
/// [`crate::limits::RETENTION_INTERVAL_SECS`].
async fn retention(
    rooms: Arc<Rooms>,
    audit_retention: std::time::Duration,
    shutdown: CancellationToken,
) {
    loop {
        match crate::rooms::retention::run_pass(&rooms, audit_retention) {
            Ok(p) if p == Default::default() => {}
            Ok(p) => tracing::info!(pruned = ?p, "retention pass pruned rows past their retention"),
            Err(e) => tracing::error!(error = %e, "retention pass failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(crate::limits::RETENTION_INTERVAL_SECS)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
