//! TLS with rustls and its `ring` provider, both directions.
//!
//! * **Listeners** ([`TlsListener`]): TLS 1.3 and 1.2, ALPN `h2` / `http/1.1`
//!   selecting the HTTP protocol, optional client certificates (`client_ca`)
//!   whose verified identity may be forwarded in a header the operator names.
//!   New handshakes load the listener's `ServerConfig` from an `ArcSwap`; a
//!   rotation builds a whole new one (certificate, key *and* client CA) and
//!   swaps it in, so established connections keep the config they were
//!   accepted with and resumption never crosses a rotation.
//! * **Upstreams** ([`TlsClient`]): private CA or the webpki roots, SNI from
//!   `server_name` or the endpoint host, ALPN `h2` for http2 upstreams, an
//!   optional client certificate. Its files are re-checked (a `stat` of each,
//!   at most once a second, on connect) because an upstream is a plain value
//!   rebuilt on reload and owns no task.
//! * **Inspection** shared by `spillway check`, startup and rotation, so what
//!   `check` accepts a rotation accepts: PEM parsing with rustls-pki-types, key
//!   matches certificate, validity period. The few X.509 fields rustls does not
//!   expose (validity, subject, SANs) are read by a small DER walker at the end
//!   of this file: only ever from our own files or from a client certificate
//!   that rustls has already verified.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{HeaderName, HeaderValue};
use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

use crate::config::{ListenerProtocol, ListenerTls, UpstreamConfig, UpstreamProtocol};
use crate::metrics::Metrics;

/// Largest PEM file read; a full public CA bundle is about 250 KiB.
const MAX_PEM_BYTES: u64 = 4 << 20;
/// `spillway check` and rotations warn when a certificate expires sooner than this.
pub(crate) const EXPIRY_WARNING_SECS: i64 = 14 * 86_400;
/// File events closer together than this are one change (cert and key written in turn).
const ROTATION_DEBOUNCE: Duration = Duration::from_millis(150);
/// After a rejected change, wait this long for a follow-up write (a key written
/// just after its certificate) before counting the rejection.
const ROTATION_SETTLE: Duration = Duration::from_millis(400);
/// Upstream TLS files are `stat`ed at most this often.
const CLIENT_FILE_CHECK: Duration = Duration::from_secs(1);
/// Upstream handshake failures are logged at most this often per upstream.
const CLIENT_LOG_EVERY_MS: u64 = 1_000;

const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The one crypto provider: ring. Built once; every config shares it.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

// === types ===

/// Facts read from an X.509 certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CertInfo {
    /// Serial number, big-endian, as encoded.
    pub serial: Vec<u8>,
    /// Validity period, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// Subject distinguished name, RFC 4514 string.
    pub subject: String,
    pub dns: Vec<String>,
    pub uris: Vec<String>,
    pub emails: Vec<String>,
}

/// A certificate chain with its matching private key.
pub(crate) struct LoadedPair {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    /// Content hashes of the certificate and key files, as the file watch computes them.
    hashes: [String; 2],
}

/// Which file of a certificate/key pair is at fault.
#[derive(Debug)]
pub(crate) enum PairError {
    Cert(String),
    Key(String),
}

/// Where a certificate stands against the clock.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Validity {
    Valid,
    ExpiresSoon { days: i64 },
    Expired,
    NotYetValid,
}

/// The negotiated application protocol of an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alpn {
    H2,
    Http11,
    None,
}

/// A client connection after a successful handshake.
pub(crate) struct Accepted {
    pub stream: server::TlsStream<TcpStream>,
    pub alpn: Alpn,
    /// The verified client identity, when the listener forwards it.
    pub identity: Option<HeaderValue>,
}

/// Client-facing TLS of one listener.
pub(crate) struct TlsListener {
    name: String,
    files: ListenerTls,
    alpn: Vec<Vec<u8>>,
    /// What new handshakes use; `None` only if the files were unusable at start.
    current: ArcSwapOption<ServerConfig>,
    /// Content hashes of the files behind `current`, in [`TlsListener::paths`] order.
    applied: Mutex<Option<Vec<String>>>,
    reloads_ok: IntCounter,
    reloads_failed: IntCounter,
    expiry: IntGauge,
}

/// What a rotation attempt did.
#[derive(Debug)]
pub(crate) enum Reload {
    /// The files are byte-for-byte what is serving.
    Unchanged,
    /// New certificate in effect for new handshakes.
    Applied(CertInfo),
    /// The files are unusable; the previous certificate keeps serving.
    Rejected(String),
}

/// TLS towards one upstream.
pub(crate) struct TlsClient {
    upstream: String,
    files: crate::config::UpstreamTls,
    alpn: Vec<Vec<u8>>,
    server_name: Option<ServerName<'static>>,
    handshake_timeout: Duration,
    current: ArcSwap<ClientConfig>,
    check: Mutex<FileCheck>,
    reloads_ok: IntCounter,
    reloads_failed: IntCounter,
    epoch: Instant,
    last_log_ms: AtomicU64,
}

/// When an upstream's TLS files were last looked at, and what they were.
struct FileCheck {
    next: Instant,
    stamps: Vec<FileStamp>,
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

// === PEM and certificate inspection ===

/// Reads a PEM file (bounded in size).
fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!(
            "`{}` is {} bytes; a PEM file is limited to {MAX_PEM_BYTES}",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))
}

/// Every `CERTIFICATE` block of a PEM text, at least one.
fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{}` is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "`{}` holds no certificate (expected a `-----BEGIN CERTIFICATE-----` block)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM text (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "`{}` holds no private key (expected a `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)",
            path.display()
        ),
        other => format!("`{}` is not valid PEM: {other}", path.display()),
    })
}

/// Loads a certificate chain and its key and checks that they belong together.
/// The validity period is the caller's to judge (see [`validity`]).
pub(crate) fn load_pair(cert: &Path, key: &Path) -> Result<LoadedPair, PairError> {
    let cert_pem = read_pem(cert).map_err(PairError::Cert)?;
    let key_pem = read_pem(key).map_err(PairError::Key)?;
    let chain = parse_certs(&cert_pem, cert).map_err(PairError::Cert)?;
    let info = cert_info(&chain[0]).ok_or_else(|| {
        PairError::Cert(format!(
            "the first certificate in `{}` is not a parsable X.509 certificate",
            cert.display()
        ))
    })?;
    let key_der = parse_key(&key_pem, key).map_err(PairError::Key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| {
            PairError::Key(format!(
                "`{}`: unsupported private key ({e}); use RSA, ECDSA P-256/P-384 or Ed25519",
                key.display()
            ))
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(PairError::Key(format!(
                "the private key `{}` does not match the certificate `{}` (their public keys differ)",
                key.display(),
                cert.display()
            )))
        }
        Err(e) => {
            return Err(PairError::Cert(format!(
                "`{}`: cannot check the certificate against its key: {e}",
                cert.display()
            )))
        }
    }
    Ok(LoadedPair {
        key: Arc::new(certified),
        info,
        hashes: [
            crate::config::content_hash(&cert_pem),
            crate::config::content_hash(&key_pem),
        ],
    })
}

/// Loads a CA bundle into a root store; every certificate in it must parse.
/// Returns the store and the content hash of the file.
pub(crate) fn load_roots(path: &Path) -> Result<(RootCertStore, String), String> {
    let pem = read_pem(path)?;
    let certs = parse_certs(&pem, path)?;
    let mut roots = RootCertStore::empty();
    for (i, c) in certs.into_iter().enumerate() {
        roots.add(c).map_err(|e| {
            format!(
                "certificate #{} in `{}` is not a usable CA certificate: {e}",
                i + 1,
                path.display()
            )
        })?;
    }
    Ok((roots, crate::config::content_hash(&pem)))
}

/// Where `info` stands at `now` (Unix seconds).
pub(crate) fn validity(info: &CertInfo, now: i64) -> Validity {
    if now >= info.not_after {
        Validity::Expired
    } else if now < info.not_before {
        Validity::NotYetValid
    } else if info.not_after - now < EXPIRY_WARNING_SECS {
        Validity::ExpiresSoon {
            days: (info.not_after - now) / 86_400,
        }
    } else {
        Validity::Valid
    }
}

/// Current Unix time in seconds.
pub(crate) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `2025-03-01 12:00:00 UTC`.
pub(crate) fn fmt_time(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Serial number as colon-separated hex, as `openssl x509 -serial` shows it.
pub(crate) fn fmt_serial(serial: &[u8]) -> String {
    let trimmed = match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        s => s,
    };
    trimmed
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A listener's certificate as `check` judges it: `Err` is an error, `Ok(Some)` a warning.
pub(crate) fn judge_expiry(
    what: &str,
    info: &CertInfo,
    now: i64,
) -> Result<Option<String>, String> {
    match validity(info, now) {
        Validity::Valid => Ok(None),
        Validity::Expired => Err(format!(
            "{what} expired at {} (subject `{}`)",
            fmt_time(info.not_after),
            info.subject
        )),
        Validity::ExpiresSoon { days } => Ok(Some(format!(
            "{what} expires at {} (in {days} day{}): renew it",
            fmt_time(info.not_after),
            if days == 1 { "" } else { "s" }
        ))),
        Validity::NotYetValid => Ok(Some(format!(
            "{what} is not valid before {}: clients will refuse it until then",
            fmt_time(info.not_before)
        ))),
    }
}

// === impl TlsListener ===

impl TlsListener {
    /// Loads the listener's files. Unusable files (validated moments ago, so a
    /// race with a writer) are logged and leave the listener refusing
    /// handshakes until a rotation brings usable ones.
    pub(crate) fn new(
        name: &str,
        files: &ListenerTls,
        protocol: ListenerProtocol,
        metrics: &Metrics,
    ) -> Self {
        let alpn = match protocol {
            ListenerProtocol::Auto => vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()],
            ListenerProtocol::Http1 => vec![ALPN_HTTP11.to_vec()],
            ListenerProtocol::Http2 => vec![ALPN_H2.to_vec()],
        };
        let l = TlsListener {
            name: name.to_string(),
            files: files.clone(),
            alpn,
            current: ArcSwapOption::empty(),
            applied: Mutex::new(None),
            reloads_ok: metrics.tls_reloads_total.with_label_values(&["success"]),
            reloads_failed: metrics.tls_reloads_total.with_label_values(&["failure"]),
            expiry: metrics.tls_cert_expiry.with_label_values(&[name]),
        };
        match l.build() {
            Ok((cfg, info, hashes)) => {
                tracing::info!(listener = %l.name, serial = %fmt_serial(&info.serial), subject = %info.subject, not_after = %fmt_time(info.not_after), mtls = l.files.client_ca.is_some(), "TLS certificate loaded");
                l.expiry.set(info.not_after);
                l.current.store(Some(Arc::new(cfg)));
                *l.applied.lock() = Some(hashes);
            }
            Err(e) => {
                tracing::error!(listener = %l.name, error = %e, "TLS files unusable: refusing handshakes until they are fixed");
            }
        }
        l
    }

    /// Handshakes allowed in progress at once.
    pub(crate) fn max_handshakes(&self) -> usize {
        self.files.max_handshakes
    }

    /// The header the verified client identity is forwarded in, if any.
    pub(crate) fn identity_header(&self) -> Option<&HeaderName> {
        self.files.forward_client_identity_header.as_ref()
    }

    /// Runs the handshake on an accepted TCP stream, bounded by `handshake_timeout`.
    pub(crate) async fn accept(&self, tcp: TcpStream) -> Result<Accepted, String> {
        let Some(cfg) = self.current.load_full() else {
            return Err("no usable certificate".into());
        };
        let limit = self.files.handshake_timeout.0;
        let stream = match tokio::time::timeout(limit, TlsAcceptor::from(cfg).accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("handshake failed: {e}")),
            Err(_) => return Err(format!("handshake timed out after {limit:?}")),
        };
        let (_, conn) = stream.get_ref();
        let alpn = match conn.alpn_protocol() {
            Some(ALPN_H2) => Alpn::H2,
            Some(ALPN_HTTP11) => Alpn::Http11,
            _ => Alpn::None,
        };
        let identity = match (
            &self.files.forward_client_identity_header,
            conn.peer_certificates(),
        ) {
            (Some(_), Some([leaf, ..])) => identity_value(leaf),
            _ => None,
        };
        Ok(Accepted {
            stream,
            alpn,
            identity,
        })
    }

    /// Builds a complete server config from the files, rejecting what must not serve.
    fn build(&self) -> Result<(ServerConfig, CertInfo, Vec<String>), String> {
        let pair = load_pair(&self.files.cert, &self.files.key).map_err(|e| match e {
            PairError::Cert(m) | PairError::Key(m) => m,
        })?;
        let now = now_unix();
        if validity(&pair.info, now) == Validity::Expired {
            return Err(format!(
                "certificate `{}` expired at {}",
                self.files.cert.display(),
                fmt_time(pair.info.not_after)
            ));
        }
        let mut hashes = pair.hashes.to_vec();
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| format!("TLS versions: {e}"))?;
        let builder = match &self.files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let (roots, ca_hash) = load_roots(ca)?;
                hashes.push(ca_hash);
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .map_err(|e| format!("client CA `{}`: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(pair.key)));
        cfg.alpn_protocols = self.alpn.clone();
        // Each config gets its own session cache (the builder's default), so no
        // session resumes across a rotation: a new client CA applies at once.
        Ok((cfg, pair.info, hashes))
    }

    /// Re-reads the files and swaps them in if they changed and are usable.
    /// Blocking (file reads): call it off the async workers.
    pub(crate) fn reload(&self) -> Reload {
        match self.build() {
            Ok((cfg, info, hashes)) => {
                let mut applied = self.applied.lock();
                if applied.as_ref() == Some(&hashes) {
                    return Reload::Unchanged;
                }
                self.current.store(Some(Arc::new(cfg)));
                *applied = Some(hashes);
                Reload::Applied(info)
            }
            Err(e) => Reload::Rejected(e),
        }
    }

    /// Records the outcome of a rotation attempt in logs and metrics.
    fn record(&self, outcome: &Reload) {
        match outcome {
            Reload::Unchanged => {
                tracing::debug!(listener = %self.name, "TLS files touched but unchanged")
            }
            Reload::Applied(info) => {
                self.reloads_ok.inc();
                self.expiry.set(info.not_after);
                tracing::info!(listener = %self.name, serial = %fmt_serial(&info.serial), subject = %info.subject, not_after = %fmt_time(info.not_after), "TLS certificate rotated: new handshakes use it");
                match validity(info, now_unix()) {
                    Validity::ExpiresSoon { days } => {
                        tracing::warn!(listener = %self.name, days, "the new TLS certificate expires soon")
                    }
                    // Taken anyway: issuers backdate little, and clocks differ by seconds.
                    Validity::NotYetValid => {
                        tracing::warn!(listener = %self.name, not_before = %fmt_time(info.not_before), "the new TLS certificate is not valid yet")
                    }
                    Validity::Valid | Validity::Expired => {}
                }
            }
            Reload::Rejected(e) => {
                self.reloads_failed.inc();
                tracing::error!(listener = %self.name, error = %e, "TLS rotation rejected: the previous certificate keeps serving");
            }
        }
    }

    /// The files this listener watches.
    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        let mut p = vec![self.files.cert.clone(), self.files.key.clone()];
        p.extend(self.files.client_ca.clone());
        p
    }

    /// Reloads off the async workers.
    async fn reload_blocking(self: &Arc<Self>) -> Reload {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.reload()).await {
            Ok(r) => r,
            Err(e) => Reload::Rejected(format!("reload task failed: {e}")),
        }
    }

    /// Watches the files until `stop` resolves, applying each usable change.
    /// A rejected change is held back for [`ROTATION_SETTLE`] in case a second
    /// write (the key after its certificate) completes it, then counted.
    pub(crate) async fn rotate(self: Arc<Self>, stop: impl Future<Output = ()>) {
        use crate::config::watch::FileWatch;
        tokio::pin!(stop);
        // Against what was loaded: a file replaced between loading and the
        // watch's first look is reported at once instead of missed.
        let baseline = self.applied.lock().clone().unwrap_or_default();
        let mut watch = FileWatch::spawn_with_baseline(
            self.paths(),
            ROTATION_DEBOUNCE,
            baseline.into_iter().map(Some).collect(),
        );
        // Unusable at start (a writer raced the validation): try again at
        // once rather than wait for the next change.
        let mut retry = self.current.load().is_none();
        loop {
            if !std::mem::take(&mut retry) {
                tokio::select! {
                    ev = watch.changed() => if ev.is_none() {
                        tracing::warn!(listener = %self.name, "TLS file watch ended: certificate rotation is off until restart");
                        return;
                    },
                    _ = &mut stop => return,
                }
            }
            let mut outcome = self.reload_blocking().await;
            while matches!(outcome, Reload::Rejected(_)) {
                let again = tokio::select! {
                    ev = watch.changed() => ev.is_some(),
                    _ = tokio::time::sleep(ROTATION_SETTLE) => false,
                    _ = &mut stop => return,
                };
                if !again {
                    break;
                }
                outcome = self.reload_blocking().await;
            }
            self.record(&outcome);
        }
    }
}

// === impl TlsClient ===

impl TlsClient {
    /// Builds the client config of an upstream with `tls:` (reads its files).
    pub(crate) fn new(cfg: &UpstreamConfig, metrics: &Metrics) -> Result<Self, String> {
        let files = cfg
            .tls
            .clone()
            .ok_or_else(|| format!("upstream `{}` has no tls", cfg.name))?;
        let alpn = match cfg.protocol {
            UpstreamProtocol::Http2 => vec![ALPN_H2.to_vec()],
            UpstreamProtocol::Http1 => vec![ALPN_HTTP11.to_vec()],
        };
        let server_name = match &files.server_name {
            None => None,
            Some(n) => Some(
                ServerName::try_from(n.clone())
                    .map_err(|e| format!("upstream `{}`: tls.server_name `{n}`: {e}", cfg.name))?,
            ),
        };
        let config =
            build_client(&files, &alpn).map_err(|e| format!("upstream `{}`: {e}", cfg.name))?;
        let now = Instant::now();
        Ok(TlsClient {
            upstream: cfg.name.clone(),
            alpn,
            server_name,
            handshake_timeout: cfg.connect_timeout.0,
            current: ArcSwap::from_pointee(config),
            check: Mutex::new(FileCheck {
                next: now + CLIENT_FILE_CHECK,
                stamps: stamps(&client_paths(&files)),
            }),
            files,
            reloads_ok: metrics.tls_reloads_total.with_label_values(&["success"]),
            reloads_failed: metrics.tls_reloads_total.with_label_values(&["failure"]),
            epoch: now,
            last_log_ms: AtomicU64::new(0),
        })
    }

    /// TLS handshake over a connected stream. `host` is the endpoint host,
    /// the SNI when `server_name` is not set. Bounded by `connect_timeout`.
    pub(crate) async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> io::Result<client::TlsStream<TcpStream>> {
        self.refresh();
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
        let connector = TlsConnector::from(self.current.load_full());
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
            tracing::warn!(upstream = %self.upstream, error = %err, "upstream TLS handshake failed");
        }
        Err(err)
    }

    /// Picks up changed CA / client certificate files (at most one `stat`
    /// round a second; the rebuild only when something changed).
    fn refresh(&self) {
        let now = Instant::now();
        let Some(mut check) = self.check.try_lock() else {
            return;
        };
        if now < check.next {
            return;
        }
        check.next = now + CLIENT_FILE_CHECK;
        let current = stamps(&client_paths(&self.files));
        if current == check.stamps {
            return;
        }
        check.stamps = current;
        drop(check);
        match build_client(&self.files, &self.alpn) {
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

fn client_paths(files: &crate::config::UpstreamTls) -> Vec<PathBuf> {
    files
        .ca
        .iter()
        .chain(&files.client_cert)
        .chain(&files.client_key)
        .cloned()
        .collect()
}

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

/// A client config from an upstream's `tls:` files.
fn build_client(
    files: &crate::config::UpstreamTls,
    alpn: &[Vec<u8>],
) -> Result<ClientConfig, String> {
    let roots = match &files.ca {
        Some(ca) => load_roots(ca)?.0,
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
    let mut cfg = match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => {
            let pair = load_pair(cert, key).map_err(|e| match e {
                PairError::Cert(m) | PairError::Key(m) => m,
            })?;
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

// === client identity header ===

/// The verified client identity, Envoy XFCC-style:
/// `Subject="CN=web,O=example";URI=spiffe://cluster/ns/app/sa/web;DNS=web.internal`.
fn identity_value(leaf: &CertificateDer<'_>) -> Option<HeaderValue> {
    let info = cert_info(leaf)?;
    let mut out = format!("Subject=\"{}\"", quote_escape(&info.subject));
    for (key, values) in [
        ("URI", &info.uris),
        ("DNS", &info.dns),
        ("Email", &info.emails),
    ] {
        for v in values {
            if !v.bytes().all(|b| b.is_ascii_graphic()) {
                continue;
            }
            out.push(';');
            out.push_str(key);
            out.push('=');
            if v.contains([',', ';', '=', '"']) {
                out.push('"');
                out.push_str(&quote_escape(v));
                out.push('"');
            } else {
                out.push_str(v);
            }
        }
    }
    HeaderValue::from_str(&out).ok()
}

fn quote_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

// === X.509 (read-only DER walk) ===

/// Reads serial, validity, subject and SANs of a DER certificate.
pub(crate) fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let mut outer = der;
    let mut cert = der_expect(&mut outer, 0x30)?;
    let mut tbs = der_expect(&mut cert, 0x30)?;
    if tbs.first() == Some(&0xA0) {
        der_next(&mut tbs)?; // [0] version
    }
    let serial = der_expect(&mut tbs, 0x02)?.to_vec();
    der_expect(&mut tbs, 0x30)?; // signature algorithm
    der_expect(&mut tbs, 0x30)?; // issuer
    let mut validity = der_expect(&mut tbs, 0x30)?;
    let not_before = der_time(der_next(&mut validity)?)?;
    let not_after = der_time(der_next(&mut validity)?)?;
    let subject = der_expect(&mut tbs, 0x30)?;
    der_expect(&mut tbs, 0x30)?; // subject public key info
    let mut info = CertInfo {
        serial,
        not_before,
        not_after,
        subject: render_name(subject),
        ..CertInfo::default()
    };
    while let Some((tag, mut content)) = der_next(&mut tbs) {
        if tag != 0xA3 {
            continue; // issuer/subject unique IDs
        }
        let mut exts = der_expect(&mut content, 0x30)?;
        while let Some(mut ext) = der_expect(&mut exts, 0x30) {
            let oid = der_expect(&mut ext, 0x06)?;
            if oid != [0x55, 0x1D, 0x11] {
                continue; // not subjectAltName
            }
            if ext.first() == Some(&0x01) {
                der_next(&mut ext)?; // critical
            }
            let mut value = der_expect(&mut ext, 0x04)?;
            let mut names = der_expect(&mut value, 0x30)?;
            while let Some((tag, v)) = der_next(&mut names) {
                let s = || String::from_utf8_lossy(v).into_owned();
                match tag {
                    0x81 => info.emails.push(s()),
                    0x82 => info.dns.push(s()),
                    0x86 => info.uris.push(s()),
                    _ => {}
                }
            }
        }
    }
    Some(info)
}

/// Next TLV (definite lengths only, as DER requires): (tag, content).
fn der_next<'a>(buf: &mut &'a [u8]) -> Option<(u8, &'a [u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    let (content, after) = rest.split_at(len);
    *buf = after;
    Some((tag, content))
}

fn der_expect<'a>(buf: &mut &'a [u8], tag: u8) -> Option<&'a [u8]> {
    match der_next(buf)? {
        (t, c) if t == tag => Some(c),
        _ => None,
    }
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as Unix seconds.
fn der_time((tag, v): (u8, &[u8])) -> Option<i64> {
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |acc, b| {
            b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
        })
    };
    let (year, rest) = match (tag, v.len()) {
        (0x17, 13) => {
            let yy = digits(&v[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &v[2..])
        }
        (0x18, 15) => (digits(&v[..4])?, &v[4..]),
        _ => return None,
    };
    if rest.last() != Some(&b'Z') {
        return None;
    }
    let month = digits(&rest[0..2])?;
    let day = digits(&rest[2..4])?;
    let (h, mi, s) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + mi * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// An X.501 Name as an RFC 4514 string (last RDN first).
fn render_name(mut name: &[u8]) -> String {
    let mut rdns = Vec::new();
    while let Some(mut set) = der_expect(&mut name, 0x31) {
        let mut parts = Vec::new();
        while let Some(mut atv) = der_expect(&mut set, 0x30) {
            let Some(oid) = der_expect(&mut atv, 0x06) else {
                continue;
            };
            let Some((tag, value)) = der_next(&mut atv) else {
                continue;
            };
            let key = match oid {
                [0x55, 0x04, 0x03] => "CN".to_string(),
                [0x55, 0x04, 0x05] => "serialNumber".to_string(),
                [0x55, 0x04, 0x06] => "C".to_string(),
                [0x55, 0x04, 0x07] => "L".to_string(),
                [0x55, 0x04, 0x08] => "ST".to_string(),
                [0x55, 0x04, 0x09] => "STREET".to_string(),
                [0x55, 0x04, 0x0A] => "O".to_string(),
                [0x55, 0x04, 0x0B] => "OU".to_string(),
                [0x09, 0x92, 0x26, 0x89, 0x93, 0xF2, 0x2C, 0x64, 0x01, 0x19] => "DC".to_string(),
                [0x09, 0x92, 0x26, 0x89, 0x93, 0xF2, 0x2C, 0x64, 0x01, 0x01] => "UID".to_string(),
                other => oid_dotted(other),
            };
            let text = match tag {
                // UTF8String, PrintableString, IA5String, T61String (treated as Latin-1 / UTF-8)
                0x0C | 0x13 | 0x16 | 0x14 => String::from_utf8_lossy(value).into_owned(),
                // BMPString: UTF-16BE
                0x1E => {
                    let units: Vec<u16> = value
                        .chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect();
                    String::from_utf16_lossy(&units)
                }
                _ => {
                    parts.push(format!("{key}=#{}", hex(value)));
                    continue;
                }
            };
            parts.push(format!("{key}={}", escape_rdn_value(&text)));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    rdns.join(",")
}

/// RFC 4514 §2.4 escaping; non-printable and non-ASCII bytes as `\XX`, so the
/// result is always a valid header value.
fn escape_rdn_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let n = s.len();
    for (i, b) in s.bytes().enumerate() {
        let special = matches!(b, b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\')
            || (i == 0 && (b == b'#' || b == b' '))
            || (i + 1 == n && b == b' ');
        if special {
            out.push('\\');
            out.push(b as char);
        } else if b.is_ascii_graphic() || b == b' ' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\{b:02X}"));
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn oid_dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut cur: u64 = 0;
    for &b in oid {
        cur = (cur << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (cur / 40).min(2);
                arcs.push(first);
                arcs.push(cur - first * 40);
            } else {
                arcs.push(cur);
            }
            cur = 0;
        }
    }
    arcs.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_round_trips() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for d in [-1000, 0, 11_016, 11_017, 19_000, 60_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        assert_eq!(fmt_time(951_782_400), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn der_times() {
        assert_eq!(der_time((0x17, b"000229000000Z")), Some(951_782_400));
        assert_eq!(der_time((0x18, b"20000229000000Z")), Some(951_782_400));
        assert_eq!(der_time((0x17, b"500101000000Z")), Some(-631_152_000));
        assert_eq!(der_time((0x17, b"0002290000Z")), None);
        assert_eq!(der_time((0x18, b"2000022900000+")), None);
    }

    #[test]
    fn rdn_escaping_makes_header_safe_text() {
        assert_eq!(escape_rdn_value("a,b"), "a\\,b");
        assert_eq!(escape_rdn_value(" x "), "\\ x\\ ");
        assert_eq!(escape_rdn_value("é"), "\\C3\\A9");
        assert!(HeaderValue::from_str(&escape_rdn_value("a\u{1}b\"c")).is_ok());
    }

    #[test]
    fn oids() {
        assert_eq!(oid_dotted(&[0x55, 0x04, 0x03]), "2.5.4.3");
        assert_eq!(
            oid_dotted(&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x09, 0x01]),
            "1.2.840.113549.1.9.1"
        );
    }

    #[test]
    fn reads_an_rcgen_certificate() {
        let mut params =
            rcgen::CertificateParams::new(vec!["svc.example".to_string()]).expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "web, \"blue\"");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster/ns/app/sa/web".try_into().expect("uri"),
        ));
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0x02, 0x03]));
        params.not_before = rcgen::date_time_ymd(2020, 1, 2);
        params.not_after = rcgen::date_time_ymd(2060, 3, 4);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let info = cert_info(cert.der()).expect("parses");
        assert_eq!(fmt_serial(&info.serial), "01:02:03");
        assert_eq!(fmt_time(info.not_before), "2020-01-02 00:00:00 UTC");
        assert_eq!(fmt_time(info.not_after), "2060-03-04 00:00:00 UTC");
        assert_eq!(info.subject, "O=Example,CN=web\\, \\\"blue\\\"");
        assert_eq!(info.dns, vec!["svc.example".to_string()]);
        assert_eq!(
            info.uris,
            vec!["spiffe://cluster/ns/app/sa/web".to_string()]
        );
        let v = identity_value(cert.der()).expect("header value");
        assert_eq!(
            v.to_str().expect("ascii"),
            "Subject=\"O=Example,CN=web\\\\, \\\\\\\"blue\\\\\\\"\";URI=spiffe://cluster/ns/app/sa/web;DNS=svc.example"
        );
        assert_eq!(validity(&info, 1_700_000_000), Validity::Valid);
        assert_eq!(validity(&info, info.not_after), Validity::Expired);
        assert_eq!(
            validity(&info, info.not_after - 86_400 * 3 - 5),
            Validity::ExpiresSoon { days: 3 }
        );
        assert_eq!(validity(&info, 0), Validity::NotYetValid);
        assert!(cert_info(&cert.der()[..40]).is_none());
    }
}
