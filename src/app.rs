//! The composition root: opens the instance's database and builds, for
//! each tenant (SPEC §14), its layers (federation, rooms, delivery, the
//! HTTP services) once, bottom up. Each layer gets the handles it needs
//! and nothing above it; only this module and [`crate::server`] (which
//! starts the listener) see them all.
//!
//! **Invariant:** a [`Tenant`]'s handles are built over its own view of
//! the store ([`Store::tenant`]), so nothing one tenant does can read or
//! change another's rows; tenants meet only through signed S2S requests,
//! over HTTPS like any two servers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{Directory, Services};
use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::{Delivery, HttpsTransport, Transport};
use crate::error::{Code, Error, Result};
use crate::federation::outbox::NewPeers;
use crate::federation::Federation;
use crate::ids::{Fqid, LocalId, ServerName};
use crate::rooms::GapFills;
use crate::rooms::Rooms;
use crate::storage::tenants::TenantRecord;
use crate::storage::{PowerLevel, Store, StoreOptions};
use crate::tls::Certificates;

pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// Under the data dir: one directory per tenant besides the first, named
/// by its server_name (its admin token and issued certificate).
pub const TENANTS_DIR: &str = "tenants";

/// One tenant, composed.
pub struct Tenant {
    pub server_name: ServerName,
    /// The instance's configuration with this tenant's server_name.
    pub config: Config,
    pub store: Store,
    pub fed: Arc<Federation>,
    pub rooms: Arc<Rooms>,
    pub services: Arc<Services>,
    pub delivery: Arc<Delivery>,
    /// Where its files live: the data dir for the first tenant,
    /// `tenants/<server_name>/` under it for the others.
    pub dir: PathBuf,
    /// Its certificate pair when given (`tls.cert`/`tls.key`, or
    /// `tenant create --cert/--key`); `None` means the local CA issues one.
    cert: Option<(PathBuf, PathBuf)>,
    /// The receivers its background tasks drain, until
    /// [`Tenant::start_delivery`] hands them over. A std mutex: taken
    /// once, never across `.await`.
    pending: Mutex<Option<(NewPeers, GapFills)>>,
}

/// What `tenant create` prints, once (SPEC §14).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CreatedTenant {
    pub server_name: String,
    pub admin_fqid: String,
    pub admin_token: String,
}

/// One instance: its tenants, and what they share (configuration, clock,
/// database, shutdown, tasks, the listener's routing and certificates).
pub struct App {
    pub config: Config,
    pub clock: Clock,
    /// The first tenant: the configuration's `server_name`.
    pub first: Arc<Tenant>,
    /// Every tenant besides the first. A std lock: written when a tenant
    /// is created, never held across `.await`.
    others: RwLock<BTreeMap<ServerName, Arc<Tenant>>>,
    /// The listener's routing by Host / `:authority`.
    pub directory: Arc<Directory>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    db: Store,
    transport: Arc<dyn Transport>,
    /// The listener's certificates by SNI, once it is started.
    certificates: Mutex<Option<Arc<Certificates>>>,
    /// Whether the background tasks run (a tenant created later starts
    /// its own at once).
    running: AtomicBool,
    /// Held while a tenant is created, so two creations of one name
    /// cannot both pass the check.
    creating: Mutex<()>,
}

/// What every tenant of an instance is built with.
struct Shared<'a> {
    config: &'a Config,
    clock: &'a Clock,
    transport: &'a Arc<dyn Transport>,
    shutdown: &'a CancellationToken,
}

impl Tenant {
    fn open(
        shared: &Shared<'_>,
        server_name: ServerName,
        store: Store,
        dir: PathBuf,
        cert: Option<(PathBuf, PathBuf)>,
    ) -> Result<Arc<Tenant>> {
        let &Shared {
            config: instance,
            clock,
            transport,
            shutdown,
        } = shared;
        let mut config = (*instance).clone();
        config.server_name = server_name.clone();
        let (fed, new_peers) = Federation::open(&config, store.clone(), clock.clone())?;
        let fed = Arc::new(fed);
        // The federation's view records its flushes (SPEC §16).
        let store = fed.store.clone();
        let (rooms, gap_fills) = Rooms::new(fed.clone(), config.livekit.clone());
        let rooms = Arc::new(rooms);
        let services = Arc::new(Services {
            rooms: rooms.clone(),
            limits: config.limits.clone(),
            shutdown: shutdown.clone(),
        });
        let delivery = Delivery::new(rooms.clone(), transport.clone(), shutdown.clone());
        Ok(Arc::new(Tenant {
            server_name,
            config,
            store,
            fed,
            rooms,
            services,
            delivery,
            dir,
            cert,
            pending: Mutex::new(Some((new_peers, gap_fills))),
        }))
    }

    /// First-start behaviour of SPEC §12: a signing key (unless disabled)
    /// and the first admin, whose token goes to `<dir>/admin-token`.
    /// Returns the admin's token when it was made now.
    fn first_start(&self) -> Result<Option<String>> {
        if self.config.federation.generate_key_on_start && !self.fed.keys.has_key() {
            let rec = self.fed.keys.generate(self.rooms.clock.now_ms())?;
            tracing::info!(tenant = %self.server_name, key_id = %rec.key_id, "generated the federation signing key");
        }
        let admin = LocalId::parse("admin")?;
        if self.store.participant(&admin)?.is_some() {
            return Ok(None);
        }
        let token = self
            .rooms
            .create_participant(&admin, "Admin", PowerLevel::Admin)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::internal("tenant dir", e))?;
        let path = self.admin_token_path();
        crate::tls::write_private(&path, format!("{token}\n").as_bytes())?;
        tracing::info!(tenant = %self.server_name, path = %path.display(), "wrote the first admin token (mode 0600)");
        Ok(Some(token))
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.dir.join(ADMIN_TOKEN_FILE)
    }

    pub fn admin_fqid(&self) -> Fqid {
        self.fed
            .fqid(&LocalId::parse("admin").expect("a valid local id"))
    }

    /// Its certificate: the given pair, or the one the local CA issued.
    fn certificate(&self, data_dir: &Path) -> Result<Arc<rustls::sign::CertifiedKey>> {
        let given = self.cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        let (cert, key) =
            crate::tls::certificate_paths(given, data_dir, &self.dir, &self.server_name)?;
        crate::tls::certified_key(&cert, &key)
    }

    /// Start the delivery worker (with a task per peer that has queued
    /// rows) and the gap fill runner. Once; a second call does nothing.
    fn start_delivery(&self, tasks: &TaskTracker, shutdown: &CancellationToken) {
        let Some((new_peers, gap_fills)) = self.pending.lock().expect("pending lock").take() else {
            return;
        };
        tasks.spawn(self.delivery.clone().run(new_peers, tasks.clone()));
        tasks.spawn(crate::rooms::history::fill_gaps(
            self.rooms.clone(),
            gap_fills,
            tasks.clone(),
            shutdown.clone(),
        ));
    }

    /// Everything a running tenant does in the background: delivery and
    /// gap fills, key rotation, retention.
    fn start_tasks(&self, tasks: &TaskTracker, shutdown: &CancellationToken) {
        self.start_delivery(tasks, shutdown);
        let fed = self.fed.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move { fed.rotation_timer(stop).await });
        tasks.spawn(retention(
            self.rooms.clone(),
            self.config.audit.retention,
            shutdown.clone(),
        ));
    }
}

impl App {
    /// Open the data dir and load every tenant. `first_start` work (key,
    /// admin token) is done by [`App::first_start`].
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
        let db = Store::open_with(
            &config.data_dir.join("db"),
            &StoreOptions {
                cache_capacity: config.storage.cache_capacity,
                data_dir: config.data_dir.clone(),
                sync: config.storage.sync,
            },
        )?;
        crate::storage::make_private(&config.data_dir)?;
        let shutdown = CancellationToken::new();
        let configured = config.tls.cert.clone().zip(config.tls.key.clone());
        let shared = Shared {
            config: &config,
            clock: &clock,
            transport: &transport,
            shutdown: &shutdown,
        };
        let first = Tenant::open(
            &shared,
            config.server_name.clone(),
            db.clone(),
            config.data_dir.clone(),
            configured,
        )?;
        let directory = Directory::new(first.services.clone());
        let mut others = BTreeMap::new();
        for (name, rec) in db.tenants()? {
            let tenant = Tenant::open(
                &shared,
                name.clone(),
                db.tenant(&name)?,
                tenant_dir(&config, &name),
                rec.certificate,
            )?;
            directory.add(tenant.services.clone());
            others.insert(name, tenant);
        }
        Ok(Arc::new(App {
            config,
            clock,
            first,
            others: RwLock::new(others),
            directory,
            shutdown,
            tasks: TaskTracker::new(),
            db,
            transport,
            certificates: Mutex::new(None),
            running: AtomicBool::new(false),
            creating: Mutex::new(()),
        }))
    }

    /// The tenant `server_name` names (the first one when `None`).
    pub fn tenant(&self, server_name: Option<&str>) -> Result<Arc<Tenant>> {
        let Some(name) = server_name else {
            return Ok(self.first.clone());
        };
        let name = ServerName::parse(name)?;
        self.find(&name).ok_or_else(|| {
            Error::not_found(format!(
                "this instance has no tenant {name}; `scaiwave admin tenant list` shows them"
            ))
        })
    }

    fn find(&self, name: &ServerName) -> Option<Arc<Tenant>> {
        if *name == self.first.server_name {
            return Some(self.first.clone());
        }
        self.others.read().expect("tenants lock").get(name).cloned()
    }

    /// Every tenant: the first, then the others by server_name.
    pub fn tenants(&self) -> Vec<Arc<Tenant>> {
        let others = self.others.read().expect("tenants lock");
        std::iter::once(self.first.clone())
            .chain(others.values().cloned())
            .collect()
    }

    /// First-start behaviour of SPEC §12 for every tenant that still
    /// needs it (a tenant's own first start happens when it is created).
    pub fn first_start(&self) -> Result<()> {
        for tenant in self.tenants() {
            tenant.first_start()?;
        }
        Ok(())
    }

    /// The listener's certificates, one per tenant by SNI (issuing those
    /// the local CA owes). Kept, so a tenant created later is served at once.
    pub fn certificates(&self) -> Result<Arc<Certificates>> {
        let mut slot = self.certificates.lock().expect("certificates lock");
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let certs = Certificates::new(
            self.first.server_name.host(),
            self.first.certificate(&self.config.data_dir)?,
        );
        for tenant in self.tenants().iter().skip(1) {
            let ck = tenant.certificate(&self.config.data_dir)?;
            certs.add(tenant.server_name.host(), ck);
        }
        *slot = Some(certs.clone());
        Ok(certs)
    }

    /// Start the background work of every tenant ([`Tenant::start_tasks`])
    /// and the instance's own: the watch on the data disk.
    pub fn start_tasks(&self) {
        self.running.store(true, Ordering::SeqCst);
        self.tasks
            .spawn(disk_watch(self.db.clone(), self.shutdown.clone()));
        for tenant in self.tenants() {
            tenant.start_tasks(&self.tasks, &self.shutdown);
        }
    }

    /// Start only the delivery workers and gap fill runners (tests that
    /// drive the other timers themselves).
    pub fn start_delivery(&self) {
        for tenant in self.tenants() {
            tenant.start_delivery(&self.tasks, &self.shutdown);
        }
    }

    /// `admin tenant create` (SPEC §14): register the tenant durably, give
    /// it a key, a first admin and a certificate (the given pair, or one
    /// from the local CA in self-signed mode), and serve it at once.
    pub fn create_tenant(
        &self,
        server_name: &ServerName,
        cert: Option<(PathBuf, PathBuf)>,
    ) -> Result<CreatedTenant> {
        let _one_at_a_time = self.creating.lock().expect("creating lock");
        if self.find(server_name).is_some() {
            return Err(Error::new(
                Code::Conflict,
                format!(
                    "tenant {server_name} exists already; `scaiwave admin tenant list` shows them"
                ),
            ));
        }
        let cert = match cert {
            Some((c, k)) => Some((absolute(&c)?, absolute(&k)?)),
            None if self.config.tls.cert.is_some() => {
                return Err(Error::bad_request(format!(
                    "this instance serves configured certificates (tls.cert), not the local CA's: \
                     give {server_name} its own with --cert <PEM> --key <PEM>"
                )))
            }
            None => None,
        };
        let dir = tenant_dir(&self.config, server_name);
        let shared = Shared {
            config: &self.config,
            clock: &self.clock,
            transport: &self.transport,
            shutdown: &self.shutdown,
        };
        let tenant = Tenant::open(
            &shared,
            server_name.clone(),
            self.db.tenant(server_name)?,
            dir,
            cert.clone(),
        )?;
        // Checked (and issued) before anything is stored: a bad pair
        // leaves no tenant behind.
        let ck = tenant.certificate(&self.config.data_dir)?;
        self.db.add_tenant(
            server_name,
            &TenantRecord {
                created_at_ms: self.clock.now_ms(),
                certificate: cert,
            },
        )?;
        let admin_token = tenant.first_start()?.ok_or_else(|| {
            Error::new(
                Code::Conflict,
                format!(
                    "tenant {server_name} already had an admin; its token is in {}",
                    tenant.admin_token_path().display()
                ),
            )
        })?;
        crate::storage::make_private(&self.config.data_dir)?;
        tenant.fed.audit(
            "federation.tenant.created",
            None,
            None,
            None,
            None,
            &format!("tenant {server_name} created"),
        );
        self.directory.add(tenant.services.clone());
        if let Some(certs) = self
            .certificates
            .lock()
            .expect("certificates lock")
            .as_ref()
        {
            certs.add(server_name.host(), ck);
        }
        self.others
            .write()
            .expect("tenants lock")
            .insert(server_name.clone(), tenant.clone());
        if self.running.load(Ordering::SeqCst) {
            tenant.start_tasks(&self.tasks, &self.shutdown);
        }
        tracing::info!(tenant = %server_name, "created a tenant");
        Ok(CreatedTenant {
            server_name: server_name.to_string(),
            admin_fqid: tenant.admin_fqid().to_string(),
            admin_token,
        })
    }

    /// Stop: cancel every task, wait for them, and flush.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Err(e) = self.db.flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
        self.db.close();
    }
}

fn tenant_dir(config: &Config, server_name: &ServerName) -> PathBuf {
    config.data_dir.join(TENANTS_DIR).join(server_name.as_str())
}

/// A path as the server will read it on every later start, whatever its
/// working directory then.
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .map_err(|e| Error::bad_request(format!("cannot resolve {}: {e}", path.display())))
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
            Ok(p) => {
                tracing::info!(tenant = %rooms.server_name, pruned = ?p, "retention pass pruned rows past their retention")
            }
            Err(e) => {
                tracing::error!(tenant = %rooms.server_name, error = %e, "retention pass failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(crate::limits::RETENTION_INTERVAL_SECS)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Look at the data disk's free space at start and every
/// [`crate::limits::DISK_CHECK_INTERVAL_SECS`]: below the threshold of
/// [`crate::storage::FreeSpace::is_low`], warn (`storage.low_space`, one
/// line per look) so the operator frees space before writes are refused.
/// After a refusal (`storage.full`), say once when space is back, since
/// sled takes writes again only after a restart.
async fn disk_watch(db: Store, shutdown: CancellationToken) {
    let mut told_space_is_back = false;
    loop {
        match db.free_space() {
            Ok(free) if free.is_low() => tracing::warn!(
                name: "storage.low_space",
                data_dir = %db.data_dir().display(),
                available_bytes = free.available_bytes,
                total_bytes = free.total_bytes,
                "storage.low_space: the data disk has {} MiB of {} MiB free; free space in {} before it fills (writes are then refused with SW_STORAGE_FULL)",
                free.available_bytes / (1024 * 1024),
                free.total_bytes / (1024 * 1024),
                db.data_dir().display()
            ),
            Ok(_) if db.is_full() && !told_space_is_back => {
                told_space_is_back = true;
                tracing::warn!(
                    name: "storage.full",
                    data_dir = %db.data_dir().display(),
                    "storage.full: the data disk has room again, but the database refuses writes until scaiwave restarts; restart it"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                data_dir = %db.data_dir().display(),
                error = %e,
                "cannot read the data disk's free space"
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(crate::limits::DISK_CHECK_INTERVAL_SECS)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
