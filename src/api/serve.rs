//! The HTTPS listener: rustls handshakes (recording the SNI), hyper-util's
//! HTTP/1.1 + HTTP/2 server around warp's service, a connection limit, and
//! graceful shutdown (stop accepting, let in-flight requests finish within
//! a deadline).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use crate::api::{routes, ConnInfo};
use crate::app::App;
use crate::limits::{CONNECTIONS_MAX, SHUTDOWN_GRACE_SECS};

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT_SECS: u64 = 10;

pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: Arc<App>) {
    let acceptor = TlsAcceptor::from(tls);
    let filter = routes(app.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = app.shutdown.cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = app.shutdown.cancelled() => break,
        };
        let acceptor = acceptor.clone();
        let service = warp::service(filter.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(
                Duration::from_secs(HANDSHAKE_TIMEOUT_SECS),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let info = ConnInfo {
                sni: tls.get_ref().1.server_name().map(str::to_string),
                peer,
            };
            let svc =
                hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(info.clone());
                    let mut service = service.clone();
                    service.call(req)
                });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(SHUTDOWN_GRACE_SECS)) => {
            tracing::warn!("shutdown deadline reached with requests still in flight");
        }
    }
}
