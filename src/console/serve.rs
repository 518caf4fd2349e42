//! The console's listener: HTTP/1.1 on its own address, over TLS with the Flight
//! endpoint's certificate when one is configured. Each connection has a deadline for its
//! request headers (and for the TLS handshake), and at most [`MAX_CONNECTIONS`] are
//! served at once.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

/// Longest wait for a request's headers (or a TLS handshake).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; further ones wait to be accepted.
pub const MAX_CONNECTIONS: usize = 256;

/// A bound console address.
pub struct Listener {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    pub addr: SocketAddr,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Listener {
    /// Whether the console is served over TLS (`https://`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("console TLS: {0}")]
    Tls(String),
}

/// Binds `addr` (port 0 picks a free port), with TLS from `tls` when given.
pub async fn bind(addr: SocketAddr, tls: Option<&TlsFiles>) -> Result<Listener, Error> {
    let tls = tls.map(acceptor).transpose()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    Ok(Listener {
        listener,
        tls,
        addr,
    })
}

fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, Error> {
    let named = |p: &Path, e: &dyn std::fmt::Display| Error::Tls(format!("{}: {e}", p.display()));
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| named(&files.cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| named(&files.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `router` until `stop` fires (or its sender is dropped).
pub async fn run(listener: Listener, router: Router, mut stop: oneshot::Receiver<()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!(error = %e, "console: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        // The peer's address, for the failed-login throttle per address.
        let router = router.clone().layer(axum::Extension(PeerAddr(peer.ip())));
        let tls = listener.tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(stream, router).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => connection(s, router).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "console: TLS handshake failed"),
                        Err(_) => tracing::debug!("console: TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// The address a console connection comes from.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::IpAddr);

async fn connection<IO>(io: IO, router: Router)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router);
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "console: connection ended with an error");
    }
}
