//! TLS towards an upstream.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use prometheus::IntCounter;
use rustls::sign::SingleCertAndKey;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{client, TlsConnector};

use super::inspect::{fmt_time, load_pair, load_roots, now_unix, validity, Validity};
use super::{provider, ALPN_H2, ALPN_HTTP11, VERSIONS};
use crate::metrics::Metrics;

/// Upstream TLS files are `stat`ed at most this often.
const CLIENT_FILE_CHECK: Duration = Duration::from_secs(1);
/// Upstream handshake failures are logged at most this often per upstream.
const CLIENT_LOG_EVERY_MS: u64 = 1_000;

/// Everything an upstream's TLS needs, as plain values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientTlsSettings {
    /// SNI and the name verified; `None`: the endpoint host.
    pub server_name: Option<String>,
    /// PEM CA bundle; `None`: the compiled-in Mozilla roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain (with `client_key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Offer `h2` in ALPN (an http2 upstream); otherwise `http/1.1`.
    pub alpn_h2: bool,
    /// Bounds the handshake.
    pub handshake_timeout: Duration,
}

/// TLS towards one upstream.
pub(crate) struct TlsClient {
    server_name: Option<ServerName<'static>>,
    handshake_timeout: Duration,
    files: Arc<ClientFiles>,
    epoch: Instant,
    last_log_ms: AtomicU64,
}

/// The part of a [`TlsClient`] that a file check on the blocking pool uses.
struct ClientFiles {
    upstream: String,
    settings: ClientTlsSettings,
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<ClientConfig>,
    /// When the files are next looked at.
    next_check: Mutex<Instant>,
    /// What the files were when last looked at.
    stamps: Mutex<Vec<FileStamp>>,
    reloads_ok: IntCounter,
    reloads_failed: IntCounter,
}

/// Identity of a file's current content as `stat` sees it (a `..data`
/// symlink swap changes the inode even when size and mtime happen to match).
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl TlsClient {
    /// Builds the client config of upstream `upstream` (reads its files:
    /// blocking, a few KiB).
    pub(crate) fn new(
        upstream: &str,
        settings: ClientTlsSettings,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let alpn = if settings.alpn_h2 {
            vec![ALPN_H2.to_vec()]
        } else {
            vec![ALPN_HTTP11.to_vec()]
        };
        let server_name = match &settings.server_name {
            None => None,
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| format!("upstream `{upstream}`: tls.server_name `{n}`: {e}"))?,
            ),
        };
        let config =
            build_client(&settings, &alpn).map_err(|e| format!("upstream `{upstream}`: {e}"))?;
        let now = Instant::now();
        Ok(TlsClient {
            server_name,
            handshake_timeout: settings.handshake_timeout,
            files: Arc::new(ClientFiles {
                upstream: upstream.to_string(),
                alpn,
                current: ArcSwap::from_pointee(config),
                next_check: Mutex::new(now + CLIENT_FILE_CHECK),
                stamps: Mutex::new(stamps(&client_paths(&settings))),
                settings,
                reloads_ok: metrics.tls_reloads_total.with_label_values(&["success"]),
                reloads_failed: metrics.tls_reloads_total.with_label_values(&["failure"]),
            }),
            epoch: now,
            last_log_ms: AtomicU64::new(0),
        })
    }

    /// TLS handshake over a connected stream. `host` is the endpoint host,
    /// the SNI when `server_name` is not set. Bounded by the handshake timeout.
    pub(crate) async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> io::Result<client::TlsStream<TcpStream>> {
        self.refresh().await;
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => {
                let h = host.trim_start_matches('[').trim_end_matches(']');
                ServerName::try_from(h.to_string()).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("`{h}` is not a valid TLS server name ({e}); set tls.server_name"),
                    )
                })?
            }
        };
        let connector = TlsConnector::from(self.files.current.load_full());
        let res = tokio::time::timeout(self.handshake_timeout, connector.connect(name, tcp)).await;
        let err = match res {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => {
                io::Error::new(e.kind(), format!("TLS handshake with `{host}` failed: {e}"))
            }
            Err(_) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "TLS handshake with `{host}` timed out after {:?}",
                    self.handshake_timeout
                ),
            ),
        };
        // A verification failure repeats on every connect: log the cause, but
        // not once per request.
        let now_ms = self.epoch.elapsed().as_millis() as u64 + CLIENT_LOG_EVERY_MS;
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if now_ms >= last + CLIENT_LOG_EVERY_MS
            && self
                .last_log_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(upstream = %self.files.upstream, error = %err, "upstream TLS handshake failed");
        }
        Err(err)
    }

    /// Picks up changed CA / client certificate files: at most one `stat`
    /// round a second, on the blocking pool; the rebuild only when something
    /// changed. The connect that runs the check waits for it (so it uses what
    /// it found); connects meanwhile go ahead with the current config.
    async fn refresh(&self) {
        {
            let now = Instant::now();
            let Some(mut next) = self.files.next_check.try_lock() else {
                return;
            };
            if now < *next {
                return;
            }
            *next = now + CLIENT_FILE_CHECK;
        }
        let files = self.files.clone();
        // If this connect is dropped meanwhile the check still completes and
        // stores its result: nothing is lost, nothing runs on a worker.
        if let Err(e) = tokio::task::spawn_blocking(move || files.recheck()).await {
            tracing::error!(upstream = %self.files.upstream, error = %e, "upstream TLS file check failed");
        }
    }
}

impl ClientFiles {
    /// Blocking: `stat`s the files and rebuilds the config if they changed.
    fn recheck(&self) {
        let current = stamps(&client_paths(&self.settings));
        {
            let mut last = self.stamps.lock();
            if *last == current {
                return;
            }
            *last = current;
        }
        match build_client(&self.settings, &self.alpn) {
            Ok(cfg) => {
                self.current.store(Arc::new(cfg));
                self.reloads_ok.inc();
                tracing::info!(upstream = %self.upstream, "upstream TLS files changed: new connections use them");
            }
            Err(e) => {
                self.reloads_failed.inc();
                tracing::error!(upstream = %self.upstream, error = %e, "upstream TLS files changed but are unusable: the previous ones stay in use");
            }
        }
    }
}

fn client_paths(settings: &ClientTlsSettings) -> Vec<PathBuf> {
    settings
        .ca
        .iter()
        .chain(&settings.client_cert)
        .chain(&settings.client_key)
        .cloned()
        .collect()
}

/// Blocking: one `stat` per file.
fn stamps(paths: &[PathBuf]) -> Vec<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    paths
        .iter()
        .map(|p| match std::fs::metadata(p) {
            Ok(m) => FileStamp {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            },
            Err(_) => FileStamp {
                dev: 0,
                ino: 0,
                len: 0,
                mtime_ns: 0,
            },
        })
        .collect()
}

/// A client config from an upstream's TLS files. Blocking (file reads).
fn build_client(settings: &ClientTlsSettings, alpn: &[Vec<u8>]) -> Result<ClientConfig, String> {
    let roots = match &settings.ca {
        Some(ca) => load_roots(ca)?,
        // Compiled-in Mozilla roots: the same in every image, including
        // distroless ones without /etc/ssl.
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots);
    let mut cfg = match (&settings.client_cert, &settings.client_key) {
        (Some(cert), Some(key)) => {
            let pair = load_pair(cert, key).map_err(|e| e.into_message())?;
            if validity(&pair.info, now_unix()) == Validity::Expired {
                return Err(format!(
                    "client certificate `{}` expired at {}",
                    cert.display(),
                    fmt_time(pair.info.not_after)
                ));
            }
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(pair.key)))
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.to_vec();
    Ok(cfg)
}
