//! Client-facing TLS of a listener, and certificate rotation.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{HeaderName, HeaderValue};
use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::SingleCertAndKey;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::{server, TlsAcceptor};

use super::inspect::{
    fmt_serial, fmt_time, identity_value, now_unix, pair_from_pem, read_pem, roots_from_pem,
    validity, CertInfo, Validity,
};
use super::{provider, ALPN_H2, ALPN_HTTP11, VERSIONS};
use crate::metrics::Metrics;

/// File events closer together than this are one change (cert and key written in turn).
pub(crate) const ROTATION_DEBOUNCE: Duration = Duration::from_millis(150);
/// After a rejected change, wait this long for a follow-up write (a key written
/// just after its certificate) before counting the rejection.
const ROTATION_SETTLE: Duration = Duration::from_millis(400);

/// The files a listener serves from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ListenerTlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
    /// PEM CA bundle; set: client certificates chaining to it are required.
    pub client_ca: Option<PathBuf>,
}

/// Which application protocols a listener offers in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListenerAlpn {
    /// `h2` and `http/1.1`.
    Both,
    /// `http/1.1` only.
    Http1,
    /// `h2` only.
    Http2,
}

/// Everything a listener's TLS needs, as plain values.
#[derive(Clone, Debug)]
pub(crate) struct ListenerTlsSettings {
    /// Certificate, key and client CA.
    pub files: ListenerTlsFiles,
    /// Protocols offered.
    pub alpn: ListenerAlpn,
    /// A client that has not completed its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once.
    pub max_handshakes: usize,
    /// Header the verified client identity is forwarded in.
    pub identity_header: Option<HeaderName>,
}

/// A file watch as rotation uses it: built by the caller on
/// [`TlsListener::paths`] with [`TlsListener::baseline`] and
/// [`ROTATION_DEBOUNCE`], so that this module needs no watcher of its own.
pub(crate) trait FileChanges: Send {
    /// Resolves when a watched file's content changed; `None` once the watch
    /// has stopped for good.
    fn changed(&mut self) -> impl Future<Output = Option<()>> + Send;
}

/// How the caller's file watch identifies a file's content (its content hash),
/// so that the listener can tell it exactly what is serving.
pub(crate) type Fingerprint = fn(&[u8]) -> String;

/// The negotiated application protocol of an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alpn {
    /// `h2`.
    H2,
    /// `http/1.1`.
    Http11,
    /// Nothing negotiated (plain TCP, or a client without ALPN).
    None,
}

/// A client connection after a successful handshake.
pub(crate) struct Accepted {
    /// The TLS stream.
    pub stream: server::TlsStream<TcpStream>,
    /// The negotiated protocol.
    pub alpn: Alpn,
    /// The verified client identity, when the listener forwards it.
    pub identity: Option<HeaderValue>,
    /// The verified client identity, whenever a client certificate was
    /// presented (fairness keys by identity use it).
    pub peer_identity: Option<HeaderValue>,
}

/// Client-facing TLS of one listener.
pub(crate) struct TlsListener {
    name: String,
    settings: ListenerTlsSettings,
    alpn: Vec<Vec<u8>>,
    fingerprint: Fingerprint,
    /// What new handshakes use; `None` only if the files were unusable at start.
    current: ArcSwapOption<ServerConfig>,
    /// Fingerprints of the files behind `current`, in [`TlsListener::paths`] order.
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

impl TlsListener {
    /// Loads the listener's files (blocking: a few KiB, read once at start).
    /// Unusable files (validated moments ago, so a race with a writer) are
    /// logged and leave the listener refusing handshakes until a rotation
    /// brings usable ones. `fingerprint` is the content hash of the file watch
    /// that will drive [`TlsListener::rotate`].
    pub(crate) fn new(
        name: &str,
        settings: ListenerTlsSettings,
        fingerprint: Fingerprint,
        metrics: &Metrics,
    ) -> Self {
        let alpn = match settings.alpn {
            ListenerAlpn::Both => vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()],
            ListenerAlpn::Http1 => vec![ALPN_HTTP11.to_vec()],
            ListenerAlpn::Http2 => vec![ALPN_H2.to_vec()],
        };
        let l = TlsListener {
            name: name.to_string(),
            settings,
            alpn,
            fingerprint,
            current: ArcSwapOption::empty(),
            applied: Mutex::new(None),
            reloads_ok: metrics.tls_reloads_total.with_label_values(&["success"]),
            reloads_failed: metrics.tls_reloads_total.with_label_values(&["failure"]),
            expiry: metrics.tls_cert_expiry.with_label_values(&[name]),
        };
        match l.build() {
            Ok((cfg, info, hashes)) => {
                tracing::info!(listener = %l.name, serial = %fmt_serial(&info.serial), subject = %info.subject, not_after = %fmt_time(info.not_after), mtls = l.settings.files.client_ca.is_some(), "TLS certificate loaded");
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
        self.settings.max_handshakes
    }

    /// The header the verified client identity is forwarded in, if any.
    pub(crate) fn identity_header(&self) -> Option<&HeaderName> {
        self.settings.identity_header.as_ref()
    }

    /// Runs the handshake on an accepted TCP stream, bounded by `handshake_timeout`.
    pub(crate) async fn accept(&self, tcp: TcpStream) -> Result<Accepted, String> {
        let Some(cfg) = self.current.load_full() else {
            return Err("no usable certificate".into());
        };
        let limit = self.settings.handshake_timeout;
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
        let peer_identity = match conn.peer_certificates() {
            Some([leaf, ..]) => identity_value(leaf),
            _ => None,
        };
        let identity = self
            .settings
            .identity_header
            .as_ref()
            .and(peer_identity.clone());
        Ok(Accepted {
            stream,
            alpn,
            identity,
            peer_identity,
        })
    }

    /// Builds a complete server config from the files, rejecting what must
    /// not serve. Blocking (file reads).
    fn build(&self) -> Result<(ServerConfig, CertInfo, Vec<String>), String> {
        let files = &self.settings.files;
        let cert_pem = read_pem(&files.cert)?;
        let key_pem = read_pem(&files.key)?;
        let pair = pair_from_pem(&files.cert, &cert_pem, &files.key, &key_pem)
            .map_err(|e| e.into_message())?;
        let now = now_unix();
        if validity(&pair.info, now) == Validity::Expired {
            return Err(format!(
                "certificate `{}` expired at {}",
                files.cert.display(),
                fmt_time(pair.info.not_after)
            ));
        }
        let mut hashes = vec![(self.fingerprint)(&cert_pem), (self.fingerprint)(&key_pem)];
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| format!("TLS versions: {e}"))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let ca_pem = read_pem(ca)?;
                let roots = roots_from_pem(ca, &ca_pem)?;
                hashes.push((self.fingerprint)(&ca_pem));
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

    /// The files this listener watches: cert, key, then client CA if any.
    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        let files = &self.settings.files;
        let mut p = vec![files.cert.clone(), files.key.clone()];
        p.extend(files.client_ca.clone());
        p
    }

    /// Fingerprints of the files serving now, in [`TlsListener::paths`] order
    /// (`None`: unknown). A watch started from them reports a file replaced
    /// between loading and the watch's first look at once instead of missing it.
    pub(crate) fn baseline(&self) -> Vec<Option<String>> {
        match &*self.applied.lock() {
            Some(h) => h.iter().cloned().map(Some).collect(),
            None => vec![None; self.paths().len()],
        }
    }

    /// Reloads off the async workers.
    async fn reload_blocking(self: &Arc<Self>) -> Reload {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.reload()).await {
            Ok(r) => r,
            Err(e) => Reload::Rejected(format!("reload task failed: {e}")),
        }
    }

    /// Applies each usable change `watch` reports until `stop` resolves. A
    /// rejected change is held back for [`ROTATION_SETTLE`] in case a second
    /// write (the key after its certificate) completes it, then counted.
    /// Every file read runs on the blocking pool.
    pub(crate) async fn rotate(
        self: Arc<Self>,
        mut watch: impl FileChanges,
        stop: impl Future<Output = ()>,
    ) {
        tokio::pin!(stop);
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
