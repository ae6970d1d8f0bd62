//! TLS with rustls and its `ring` provider, both directions.
//!
//! * **Listeners** ([`server`]): TLS 1.3 and 1.2, ALPN `h2` / `http/1.1`
//!   selecting the HTTP protocol, optional client certificates (`client_ca`)
//!   whose verified identity may be forwarded in a header the operator names.
//!   New handshakes load the listener's `ServerConfig` from an `ArcSwap`; a
//!   rotation builds a whole new one (certificate, key *and* client CA) and
//!   swaps it in, so established connections keep the config they were
//!   accepted with and resumption never crosses a rotation.
//! * **Upstreams** ([`client`]): private CA or the webpki roots, SNI from
//!   `server_name` or the endpoint host, ALPN `h2` for http2 upstreams, an
//!   optional client certificate. Its files are re-checked (a `stat` of each,
//!   at most once a second, on connect, on the blocking pool) because an
//!   upstream is a plain value rebuilt on reload and owns no task.
//! * **Inspection** ([`inspect`]) shared by `spillway check`, startup and
//!   rotation, so what `check` accepts a rotation accepts: PEM parsing with
//!   rustls-pki-types, key matches certificate, validity period, and the
//!   client identity header. The X.509 fields rustls does not expose
//!   (validity, subject, SANs) are read with `x509-parser`.
//!
//! A leaf module: it knows nothing of the configuration. Callers hand it the
//! plain settings below ([`ListenerTlsSettings`], [`ClientTlsSettings`]) and,
//! for rotation, their file watch through [`FileChanges`].

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub(crate) mod client;
pub(crate) mod inspect;
pub(crate) mod server;

pub(crate) use client::{ClientTlsSettings, TlsClient};
pub(crate) use inspect::{judge_expiry, load_pair, load_roots, now_unix, PairError};
pub(crate) use server::{
    Alpn, FileChanges, ListenerAlpn, ListenerTlsFiles, ListenerTlsSettings, TlsListener,
    ROTATION_DEBOUNCE,
};

const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Protocol versions offered both ways.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The one crypto provider: ring. Built once; every config shares it.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}
