//! Starting and stopping a server: open state, first-start work, the HTTPS
//! listener and the background tasks ([`App::start_tasks`]). `cli::serve`
//! (what `main` runs) and the integration tests call the same [`start_on_with`].

use std::net::SocketAddr;
use std::sync::Arc;

use crate::api::serve::ConnectionCounts;
use crate::app::App;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Error, Result};

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    /// Connections the listener accepted, by HTTP version.
    pub connections: Arc<ConnectionCounts>,
    /// Where `GET /metrics` is served (SPEC §16), when `metrics.listen` is set.
    pub metrics_addr: Option<SocketAddr>,
}

/// How the listener offers HTTP (not configuration: a deployment always
/// offers both; tests use this to pin a peer to HTTP/1.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HttpVersions {
    /// HTTP/2 and HTTP/1.1, chosen by ALPN.
    #[default]
    Both,
    /// HTTP/1.1 only, like a peer behind a proxy that does not speak h2.
    Http1Only,
}

impl Running {
    /// Stop accepting, let in-flight work finish, flush, and return.
    pub async fn stop(self) {
        self.app.stop().await;
    }
}

pub async fn start(config: Config, clock: Clock) -> Result<Running> {
    let listener = std::net::TcpListener::bind(config.listen).map_err(|e| {
        Error::bad_request(format!(
            "cannot listen on {}: {e}; pick another `listen` address",
            config.listen
        ))
    })?;
    start_on(config, clock, listener).await
}

/// Start on a socket the caller bound already (tests bind every server's
/// port first so each can be told where the others are).
pub async fn start_on(
    config: Config,
    clock: Clock,
    listener: std::net::TcpListener,
) -> Result<Running> {
    start_on_with(config, clock, listener, HttpVersions::Both).await
}

/// [`start_on`] with the HTTP versions the listener offers.
pub async fn start_on_with(
    config: Config,
    clock: Clock,
    listener: std::net::TcpListener,
    http: HttpVersions,
) -> Result<Running> {
    let app = App::open(config, clock)?;
    app.first_start()?;
    let certificates = app.certificates()?;
    // First-start files (key ring, admin token, issued certificates) are
    // private whatever the umask.
    crate::storage::make_private(&app.config.data_dir)?;
    let mut tls = crate::tls::server_config(certificates)?;
    if http == HttpVersions::Http1Only {
        Arc::make_mut(&mut tls).alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::internal("listener", e))?;
    let listener =
        tokio::net::TcpListener::from_std(listener).map_err(|e| Error::internal("listener", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::internal("local addr", e))?;
    let metrics_addr = match app.config.metrics.listen {
        Some(at) => Some(start_metrics(&app, at).await?),
        None => None,
    };
    let connections = Arc::new(ConnectionCounts::default());
    app.tasks.spawn(crate::api::serve::serve(
        listener,
        tls,
        app.directory.clone(),
        connections.clone(),
    ));
    app.start_tasks();
    tracing::info!(server_name = %app.first.server_name, tenants = app.tenants().len(), %addr, "scaiwave is serving HTTPS");
    Ok(Running {
        addr,
        app,
        connections,
        metrics_addr,
    })
}

/// Bind `metrics.listen` and serve `GET /metrics` there until shutdown.
async fn start_metrics(app: &App, at: SocketAddr) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(at).await.map_err(|e| {
        Error::bad_request(format!(
            "cannot listen on {at} for metrics: {e}; pick another `metrics.listen` address, or \"\" for none"
        ))
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::internal("metrics local addr", e))?;
    crate::metrics::install();
    for tenant in app.tenants() {
        tenant.fed.metrics.register();
    }
    app.tasks.spawn(crate::api::metrics::serve(
        listener,
        app.directory.clone(),
        app.shutdown.clone(),
    ));
    tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
    Ok(addr)
}
