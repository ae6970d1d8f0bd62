//! TLS (docs/guide.md): termination with ALPN, mutual TLS and the forwarded client
//! identity, TLS to upstreams, certificate rotation, handshake limits, and
//! what `spillway check` says about certificate files.
//!
//! Certificates are generated here with rcgen for each test (nothing checked
//! in can expire). Real sockets on 127.0.0.1:0; every wait is bounded.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Sets a validity period relative to now (seconds; negative = in the past).
fn validity(params: &mut CertificateParams, from: i64, to: i64) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let at = |off: i64| {
        let t = now_unix() as i64 + off;
        epoch + Duration::from_secs(t as u64)
    };
    params.not_before = at(from);
    params.not_after = at(to);
}

/// A private certificate authority.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

/// A certificate issued by a [`Ca`], with its key.
#[derive(Clone)]
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        validity(&mut params, -86_400, 365 * 86_400);
        let key = KeyPair::generate().expect("ca key");
        let pem = params.self_signed(&key).expect("ca cert").pem();
        Ca { params, key, pem }
    }

    /// A leaf for `names` (DNS names, or IP addresses when they parse as one).
    fn leaf(&self, cn: &str, names: &[&str], serial: u64) -> Leaf {
        self.leaf_valid(cn, names, serial, -3_600, 90 * 86_400)
    }

    fn leaf_valid(&self, cn: &str, names: &[&str], serial: u64, from: i64, to: i64) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        for n in names {
            params
                .subject_alt_names
                .push(match n.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) if n.contains("://") => SanType::URI((*n).try_into().expect("uri")),
                    Err(_) => SanType::DnsName((*n).try_into().expect("dns name")),
                });
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        validity(&mut params, from, to);
        let key = KeyPair::generate().expect("leaf key");
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.pem.as_bytes()).expect("ca der")
    }
}

use rustls::pki_types::pem::PemObject;

impl Leaf {
    fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.der.clone()]
    }
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key der")
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Writes `text` to `path` atomically (temp file + rename), as deployment tools do.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, text).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename over");
}

// ---------------------------------------------------------------------------
// TLS client (tokio-rustls + hyper client connection)
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct ClientOpts {
    roots: Vec<CertificateDer<'static>>,
    alpn: Vec<&'static [u8]>,
    identity: Option<Leaf>,
    sni: &'static str,
}

impl ClientOpts {
    fn trusting(ca: &Ca) -> ClientOpts {
        ClientOpts {
            roots: vec![ca.der()],
            alpn: vec![b"http/1.1"],
            identity: None,
            sni: "localhost",
        }
    }
    fn alpn(mut self, alpn: &[&'static [u8]]) -> Self {
        self.alpn = alpn.to_vec();
        self
    }
    fn identity(mut self, leaf: &Leaf) -> Self {
        self.identity = Some(leaf.clone());
        self
    }

    fn config(&self) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        for r in &self.roots {
            roots.add(r.clone()).expect("add root");
        }
        let b = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots);
        let mut cfg = match &self.identity {
            Some(l) => b
                .with_client_auth_cert(l.chain(), l.key())
                .expect("client cert"),
            None => b.with_no_client_auth(),
        };
        cfg.alpn_protocols = self.alpn.iter().map(|a| a.to_vec()).collect();
        // Every connection a full handshake: rotation tests must see the
        // certificate the server presents now.
        cfg.resumption = rustls::client::Resumption::disabled();
        cfg
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

/// One TLS connection to the proxy, HTTP/1.1 or HTTP/2 as ALPN decided.
struct TlsConn {
    sender: Sender,
    /// The certificate the server presented.
    peer: CertificateDer<'static>,
    alpn: Option<Vec<u8>>,
    _driver: JoinHandle<()>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn tls_stream(
    addr: SocketAddr,
    opts: &ClientOpts,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(opts.config()));
    let name = ServerName::try_from(opts.sni.to_string())?;
    Ok(connector.connect(name, tcp).await?)
}

impl TlsConn {
    async fn open(addr: SocketAddr, opts: &ClientOpts) -> Result<TlsConn, BoxError> {
        let tls = tls_stream(addr, opts).await?;
        let (_, conn) = tls.get_ref();
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .ok_or("no server certificate")?;
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let io = TokioIo::new(tls);
        if alpn.as_deref() == Some(b"h2") {
            let (sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            let driver = tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(TlsConn {
                sender: Sender::H2(sender),
                peer,
                alpn,
                _driver: driver,
            })
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            let driver = tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(TlsConn {
                sender: Sender::H1(sender),
                peer,
                alpn,
                _driver: driver,
            })
        }
    }

    /// GET `path` with extra headers; returns status, version, headers and body.
    async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Version, http::HeaderMap, Bytes), BoxError> {
        let mut b = match self.sender {
            Sender::H1(_) => Request::get(path).header("host", "localhost"),
            Sender::H2(_) => Request::get(format!("https://localhost{path}")),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(empty())?;
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts.status, parts.version, parts.headers, body))
    }
}

/// Opens a connection and sends one request; true if either step failed
/// (with TLS 1.3 a refused client certificate shows on the first read).
async fn refused(addr: SocketAddr, opts: &ClientOpts) -> bool {
    match TlsConn::open(addr, opts).await {
        Err(_) => true,
        Ok(mut c) => c.get("/", &[]).await.is_err(),
    }
}

/// Polls new connections until the server presents `want` or `bound` passes.
async fn wait_for_cert(
    addr: SocketAddr,
    opts: &ClientOpts,
    want: &CertificateDer<'static>,
    bound: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < bound {
        if let Ok(c) = TlsConn::open(addr, opts).await {
            if &c.peer == want {
                return Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

// ---------------------------------------------------------------------------
// An HTTPS fake upstream
// ---------------------------------------------------------------------------

/// What the HTTPS upstream saw of one connection and its requests.
#[derive(Clone, Debug, Default)]
struct Seen {
    sni: Vec<Option<String>>,
    alpn: Vec<Option<Vec<u8>>>,
    client_certs: Vec<bool>,
    versions: Vec<Version>,
}

struct TlsUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsUpstream {
    /// Serves 200 "secure" over TLS with `leaf`; requires client certificates
    /// from `client_ca` when given. HTTP/1.1 or h2 by ALPN.
    async fn start(leaf: &Leaf, client_ca: Option<&Ca>) -> TlsUpstream {
        let b = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let b = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca.der()).expect("root");
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .expect("verifier");
                b.with_client_cert_verifier(v)
            }
            None => b.with_no_client_auth(),
        };
        let mut cfg = b
            .with_single_cert(leaf.chain(), leaf.key())
            .expect("server cert");
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    {
                        let (_, c) = tls.get_ref();
                        let mut seen = s.lock();
                        seen.sni.push(c.server_name().map(str::to_owned));
                        seen.alpn.push(c.alpn_protocol().map(<[u8]>::to_vec));
                        seen.client_certs.push(c.peer_certificates().is_some());
                    }
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let s = s.clone();
                            async move {
                                s.lock().versions.push(req.version());
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(full(
                                    "secure",
                                )))
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsUpstream { addr, seen, task }
    }

    fn seen(&self) -> Seen {
        self.seen.lock().clone()
    }
}

// ---------------------------------------------------------------------------
// Proxy configs
// ---------------------------------------------------------------------------

/// Files of a listener's TLS setup.
struct ListenerFiles {
    dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl ListenerFiles {
    fn new(leaf: &Leaf, client_ca: Option<&Ca>) -> ListenerFiles {
        let dir = TempDir::new("tls");
        let cert = dir.write("tls.crt", &leaf.cert_pem);
        let key = dir.write("tls.key", &leaf.key_pem);
        let client_ca = client_ca.map(|ca| dir.write("client-ca.crt", &ca.pem));
        ListenerFiles {
            dir,
            cert,
            key,
            client_ca,
        }
    }

    /// The listener's `tls:` block (indented for `yaml_with`), plus `extra` lines.
    fn yaml(&self, extra: &[&str]) -> String {
        let mut s = format!(
            "    tls:\n      cert: {}\n      key: {}\n",
            self.cert.display(),
            self.key.display()
        );
        if let Some(ca) = &self.client_ca {
            s.push_str(&format!("      client_ca: {}\n", ca.display()));
        }
        for e in extra {
            s.push_str(&format!("      {e}\n"));
        }
        s
    }
}

fn all_route(upstream: &str) -> String {
    route_yaml("all", "      path_prefix: /", upstream, "")
}

/// A proxy terminating TLS with `files`, forwarding to `upstream` (plain HTTP).
async fn tls_proxy(files: &ListenerFiles, extra: &[&str], upstream: SocketAddr) -> ProxyHarness {
    let yaml = yaml_with(
        &files.yaml(extra),
        &upstream_yaml("app", upstream, ""),
        &all_route("app"),
    );
    ProxyHarness::start(&yaml).await
}

fn reason(h: &http::HeaderMap) -> Option<&str> {
    header_str(h, "x-spillway-reason")
}

// ---------------------------------------------------------------------------
// Termination and ALPN
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_termination_with_http1_and_h2_by_alpn() {
    within(60, "test", async {
        let ca = Ca::new("test CA");
        let leaf = ca.leaf("proxy", &["localhost"], 11);
        let files = ListenerFiles::new(&leaf, None);
        let fake = FakeUpstream::ok().await;
        let h = tls_proxy(&files, &[], fake.addr()).await;
        let opts = ClientOpts::trusting(&ca);

        // ALPN http/1.1
        let mut c = TlsConn::open(h.addr(), &opts).await.expect("h1 connect");
        assert_eq!(c.alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(c.peer, leaf.der);
        let (status, version, _, _) = c.get("/one", &[]).await.expect("h1 request");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(version, Version::HTTP_11);
        let seen = fake.last_request();
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
        // Keep-alive: a second request on the same TLS connection.
        let (status, _, _, _) = c.get("/two", &[]).await.expect("second h1 request");
        assert_eq!(status, StatusCode::OK);

        // ALPN h2 (offered first, as browsers do)
        let mut c = TlsConn::open(h.addr(), &opts.clone().alpn(&[b"h2", b"http/1.1"]))
            .await
            .expect("h2 connect");
        assert_eq!(c.alpn.as_deref(), Some(&b"h2"[..]));
        let (status, version, _, _) = c.get("/three", &[]).await.expect("h2 request");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(version, Version::HTTP_2);
        assert_eq!(
            fake.last_request().header("x-forwarded-proto"),
            Some("https")
        );

        // No ALPN at all: `protocol: auto` still serves HTTP/1.1.
        let mut c = TlsConn::open(h.addr(), &opts.clone().alpn(&[]))
            .await
            .expect("no-ALPN connect");
        assert_eq!(c.alpn, None);
        let (status, version, _, _) = c.get("/four", &[]).await.expect("request");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(version, Version::HTTP_11);

        // The serving certificate's expiry is exported.
        let expiry = h
            .metric_value(
                "spillway_tls_cert_expiry_timestamp_seconds",
                &[("listener", "inbound")],
            )
            .await
            .expect("expiry gauge");
        let expect = (now_unix() + 90 * 86_400) as f64;
        assert!(
            (expiry - expect).abs() < 120.0,
            "expiry {expiry} vs {expect}"
        );
        fake.assert_healthy();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_protocol_limits_alpn() {
    within(60, "test", async {
        let ca = Ca::new("test CA");
        let leaf = ca.leaf("proxy", &["localhost"], 12);
        let files = ListenerFiles::new(&leaf, None);
        let fake = FakeUpstream::ok().await;
        let yaml = yaml_with(
            &format!("    protocol: http1\n{}", files.yaml(&[])),
            &upstream_yaml("app", fake.addr(), ""),
            &all_route("app"),
        );
        let h = ProxyHarness::start(&yaml).await;
        let opts = ClientOpts::trusting(&ca);
        // A client that speaks only h2 has nothing in common with an http1 listener.
        assert!(refused(h.addr(), &opts.clone().alpn(&[b"h2"])).await);
        // Offering both, it gets HTTP/1.1.
        let mut c = TlsConn::open(h.addr(), &opts.clone().alpn(&[b"h2", b"http/1.1"]))
            .await
            .expect("connect");
        assert_eq!(c.alpn.as_deref(), Some(&b"http/1.1"[..]));
        let (status, version, _, _) = c.get("/", &[]).await.expect("request");
        assert_eq!((status, version), (StatusCode::OK, Version::HTTP_11));
    })
    .await
}

// ---------------------------------------------------------------------------
// Mutual TLS and the client identity header
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_missing_or_foreign_client_certificates() {
    within(60, "test", async {
        let ca = Ca::new("server CA");
        let clients = Ca::new("client CA");
        let stranger = Ca::new("some other CA");
        let leaf = ca.leaf("proxy", &["localhost"], 21);
        let files = ListenerFiles::new(&leaf, Some(&clients));
        let fake = FakeUpstream::ok().await;
        let h = tls_proxy(&files, &[], fake.addr()).await;
        let opts = ClientOpts::trusting(&ca);

        assert!(
            refused(h.addr(), &opts).await,
            "no client certificate must be refused"
        );
        let foreign = stranger.leaf("mallory", &["mallory.example"], 22);
        assert!(
            refused(h.addr(), &opts.clone().identity(&foreign)).await,
            "a certificate from another CA must be refused"
        );
        assert_eq!(fake.hits(), 0, "nothing refused reached the upstream");

        let good = clients.leaf("web", &["web.internal"], 23);
        let mut c = TlsConn::open(h.addr(), &opts.clone().identity(&good))
            .await
            .expect("connect with a good client certificate");
        let (status, _, _, _) = c
            .get("/", &[("x-client-identity", "spoofed")])
            .await
            .expect("request");
        assert_eq!(status, StatusCode::OK);
        // Not configured to forward: nothing added, nothing of ours stripped.
        assert_eq!(
            fake.last_request()
                .header_joined("x-client-identity")
                .as_deref(),
            Some("spoofed")
        );
        fake.assert_healthy();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_identity_is_forwarded_and_spoofs_are_stripped() {
    within(60, "test", async {
        let ca = Ca::new("server CA");
        let clients = Ca::new("client CA");
        let leaf = ca.leaf("proxy", &["localhost"], 31);
        let files = ListenerFiles::new(&leaf, Some(&clients));
        let fake = FakeUpstream::ok().await;
        // A TLS listener that forwards the identity, and a plain one beside it.
        let yaml = format!(
            "version: 1\nlisteners:\n  - name: inbound\n    bind: 127.0.0.1:0\n{}  - name: plain\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\ndrain:\n  grace: 0s\n  timeout: 5s\nupstreams:\n{}\nroutes:\n{}\n",
            files.yaml(&["forward_client_identity_header: x-client-identity"]),
            upstream_yaml("app", fake.addr(), ""),
            all_route("app"),
        );
        let h = ProxyHarness::start(&yaml).await;
        let opts = ClientOpts::trusting(&ca);

        let client = clients.leaf("web", &["spiffe://cluster/ns/app/sa/web", "web.internal"], 32);
        for alpn in [&[&b"http/1.1"[..]][..], &[&b"h2"[..]][..]] {
            let mut c = TlsConn::open(h.addr(), &opts.clone().identity(&client).alpn(alpn))
                .await
                .expect("connect");
            let (status, _, _, _) = c
                .get(
                    "/",
                    &[("x-client-identity", "Subject=\"CN=admin\""), ("X-Client-Identity", "again")],
                )
                .await
                .expect("request");
            assert_eq!(status, StatusCode::OK);
            let got = fake
                .last_request()
                .header_joined("x-client-identity")
                .expect("identity forwarded");
            assert_eq!(
                got,
                "Subject=\"CN=web\";URI=spiffe://cluster/ns/app/sa/web;DNS=web.internal",
                "exactly the verified identity, no client-written copy"
            );
        }

        // On the plain listener nobody is verified, and a spoof is still removed.
        let plain = h.listener("plain").expect("plain listener");
        let req = Request::get(format!("http://{plain}/"))
            .header("x-client-identity", "Subject=\"CN=admin\"")
            .body(empty())
            .expect("req");
        let resp = h1_client().request(req).await.expect("plain request");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(fake.last_request().header("x-client-identity"), None);
        fake.assert_healthy();
    })
    .await
}

// ---------------------------------------------------------------------------
// TLS to upstreams
// ---------------------------------------------------------------------------

/// A plain listener in front of an HTTPS upstream with the given `tls:` lines.
async fn proxy_to_tls_upstream(endpoint: &str, tls_lines: &[String], extra: &str) -> ProxyHarness {
    let mut up = format!("  app:\n    endpoints: [\"{endpoint}\"]\n    tls:\n");
    for l in tls_lines {
        up.push_str(&format!("      {l}\n"));
    }
    up.push_str(extra);
    let yaml = yaml_with("", &up, &all_route("app"));
    ProxyHarness::start(&yaml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_with_private_ca_sends_sni_and_alpn() {
    within(60, "test", async {
        let ca = Ca::new("upstream CA");
        let dir = TempDir::new("up-tls");
        let ca_file = dir.write("ca.crt", &ca.pem);
        let leaf = ca.leaf(
            "upstream",
            &["upstream.internal", "localhost", "127.0.0.1"],
            41,
        );
        let up = TlsUpstream::start(&leaf, None).await;
        let port = up.addr.port();

        // server_name set: it is the SNI, and what the certificate must match.
        let h = proxy_to_tls_upstream(
            &format!("127.0.0.1:{port}"),
            &[
                "server_name: upstream.internal".into(),
                format!("ca: {}", ca_file.display()),
            ],
            "",
        )
        .await;
        let resp = h.get("/a").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_string(resp).await, "secure");
        let seen = up.seen();
        assert_eq!(
            seen.sni.last(),
            Some(&Some("upstream.internal".to_string()))
        );
        assert_eq!(seen.alpn.last(), Some(&Some(b"http/1.1".to_vec())));
        assert_eq!(seen.versions.last(), Some(&Version::HTTP_11));
        drop(h);

        // No server_name: the endpoint host is the SNI.
        let h = proxy_to_tls_upstream(
            &format!("localhost:{port}"),
            &[format!("ca: {}", ca_file.display())],
            "",
        )
        .await;
        assert_eq!(h.get("/b").await.status(), StatusCode::OK);
        assert_eq!(up.seen().sni.last(), Some(&Some("localhost".to_string())));
        drop(h);

        // An IP endpoint: no SNI (TLS forbids it), verified against the IP SAN.
        let h = proxy_to_tls_upstream(
            &format!("127.0.0.1:{port}"),
            &[format!("ca: {}", ca_file.display())],
            "",
        )
        .await;
        assert_eq!(h.get("/c").await.status(), StatusCode::OK);
        assert_eq!(up.seen().sni.last(), Some(&None));
        drop(h);

        // protocol: http2 negotiates h2 by ALPN.
        let h = proxy_to_tls_upstream(
            &format!("localhost:{port}"),
            &[format!("ca: {}", ca_file.display())],
            "    protocol: http2\n",
        )
        .await;
        assert_eq!(h.get("/d").await.status(), StatusCode::OK);
        let seen = up.seen();
        assert_eq!(seen.alpn.last(), Some(&Some(b"h2".to_vec())));
        assert_eq!(seen.versions.last(), Some(&Version::HTTP_2));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_client_certificate_is_presented() {
    within(60, "test", async {
        let ca = Ca::new("upstream CA");
        let clients = Ca::new("upstream client CA");
        let dir = TempDir::new("up-mtls");
        let ca_file = dir.write("ca.crt", &ca.pem);
        let me = clients.leaf("spillway", &["spillway.internal"], 51);
        let cert = dir.write("client.crt", &me.cert_pem);
        let key = dir.write("client.key", &me.key_pem);
        let up = TlsUpstream::start(&ca.leaf("upstream", &["localhost"], 52), Some(&clients)).await;
        let h = proxy_to_tls_upstream(
            &format!("localhost:{}", up.addr.port()),
            &[
                format!("ca: {}", ca_file.display()),
                format!("client_cert: {}", cert.display()),
                format!("client_key: {}", key.display()),
            ],
            "",
        )
        .await;
        let resp = h.get("/").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(up.seen().client_certs.last(), Some(&true));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_with_wrong_ca_is_a_fast_connect_error_and_a_breaker_failure() {
    within(60, "test", async {
        let ca = Ca::new("upstream CA");
        let other = Ca::new("not the upstream's CA");
        let dir = TempDir::new("up-wrong");
        let wrong = dir.write("ca.crt", &other.pem);
        let up = TlsUpstream::start(&ca.leaf("upstream", &["localhost"], 61), None).await;
        let h = proxy_to_tls_upstream(
            &format!("localhost:{}", up.addr.port()),
            &[format!("ca: {}", wrong.display())],
            "    connect_timeout: 5s\n    circuit_breaker:\n      failure_threshold: 2\n      recovery_timeout: 60s\n",
        )
        .await;
        for i in 0..2 {
            let start = Instant::now();
            let resp = h.get("/").await;
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "request {i}");
            assert_eq!(reason(resp.headers()), Some("upstream_connect"));
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "a verification failure is immediate, not a timeout: {:?}",
                start.elapsed()
            );
        }
        // Two connect failures opened the breaker.
        let resp = h.get("/").await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reason(resp.headers()), Some("breaker_open"));
        let failed = h
            .metric_value(
                "spillway_upstream_requests_total",
                &[("upstream", "app"), ("outcome", "connect_error")],
            )
            .await;
        assert_eq!(failed, Some(2.0));
        assert!(up.seen().versions.is_empty(), "no request reached the upstream");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_ca_file_change_is_picked_up() {
    within(60, "test", async {
        let ca = Ca::new("upstream CA");
        let other = Ca::new("stale CA");
        let dir = TempDir::new("up-rotate");
        let ca_file = dir.write("ca.crt", &other.pem);
        let up = TlsUpstream::start(&ca.leaf("upstream", &["localhost"], 71), None).await;
        let h = proxy_to_tls_upstream(
            &format!("localhost:{}", up.addr.port()),
            &[format!("ca: {}", ca_file.display())],
            "",
        )
        .await;
        assert_eq!(h.get("/").await.status(), StatusCode::BAD_GATEWAY);
        replace_file(&ca_file, &ca.pem);
        let start = Instant::now();
        loop {
            let status = h.get("/").await.status();
            if status == StatusCode::OK {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "new CA not picked up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ok = h
            .metric_value("spillway_tls_reloads_total", &[("result", "success")])
            .await;
        assert_eq!(ok, Some(1.0));
    })
    .await
}

// ---------------------------------------------------------------------------
// Rotation
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificate_serves_new_connections_and_spares_old_ones() {
    within(60, "test", async {
        let ca = Ca::new("test CA");
        let old = ca.leaf("proxy", &["localhost"], 81);
        let new = ca.leaf_valid("proxy", &["localhost"], 82, -60, 200 * 86_400);
        let files = ListenerFiles::new(&old, None);
        let fake = FakeUpstream::ok().await;
        let h = tls_proxy(&files, &[], fake.addr()).await;
        let opts = ClientOpts::trusting(&ca);

        let mut kept = TlsConn::open(h.addr(), &opts).await.expect("connect");
        assert_eq!(kept.peer, old.der);
        assert_eq!(kept.get("/", &[]).await.expect("request").0, StatusCode::OK);

        replace_file(&files.cert, &new.cert_pem);
        replace_file(&files.key, &new.key_pem);
        let took = wait_for_cert(h.addr(), &opts, &new.der, Duration::from_secs(1)).await;
        eprintln!("rotation seen after {took:?}");
        assert!(took.is_some(), "new certificate not served within 1s");

        // The established connection is untouched.
        let (status, _, _, _) = kept
            .get("/", &[])
            .await
            .expect("old connection still works");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(kept.peer, old.der);

        let ok = h
            .metric_value("spillway_tls_reloads_total", &[("result", "success")])
            .await;
        assert_eq!(ok, Some(1.0));
        let expiry = h
            .metric_value(
                "spillway_tls_cert_expiry_timestamp_seconds",
                &[("listener", "inbound")],
            )
            .await
            .expect("expiry");
        let expect = (now_unix() + 200 * 86_400) as f64;
        assert!(
            (expiry - expect).abs() < 120.0,
            "gauge follows the new certificate"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_data_symlink_swap_rotates_the_certificate() {
    use std::os::unix::fs::symlink;
    within(60, "test", async {
        let ca = Ca::new("test CA");
        let old = ca.leaf("proxy", &["localhost"], 91);
        let new = ca.leaf("proxy", &["localhost"], 92);
        // The layout kubelet mounts a Secret with.
        let dir = TempDir::new("k8s-secret");
        let d = dir.path();
        let write_version = |name: &str, leaf: &Leaf| {
            std::fs::create_dir(d.join(name)).expect("mkdir");
            std::fs::write(d.join(name).join("tls.crt"), &leaf.cert_pem).expect("crt");
            std::fs::write(d.join(name).join("tls.key"), &leaf.key_pem).expect("key");
        };
        write_version("..2026_01_01", &old);
        symlink("..2026_01_01", d.join("..data")).expect("..data");
        symlink("..data/tls.crt", d.join("tls.crt")).expect("tls.crt");
        symlink("..data/tls.key", d.join("tls.key")).expect("tls.key");
        let files = ListenerFiles {
            cert: d.join("tls.crt"),
            key: d.join("tls.key"),
            client_ca: None,
            dir: TempDir::new("unused"),
        };
        let fake = FakeUpstream::ok().await;
        let h = tls_proxy(&files, &[], fake.addr()).await;
        let opts = ClientOpts::trusting(&ca);
        let mut kept = TlsConn::open(h.addr(), &opts).await.expect("connect");
        assert_eq!(kept.peer, old.der);

        // The atomic swap: new directory, new symlink renamed over `..data`.
        write_version("..2026_02_01", &new);
        symlink("..2026_02_01", d.join("..data_tmp")).expect("tmp link");
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).expect("swap");
        std::fs::remove_dir_all(d.join("..2026_01_01")).expect("old version");

        let took = wait_for_cert(h.addr(), &opts, &new.der, Duration::from_secs(1)).await;
        eprintln!("symlink swap seen after {took:?}");
        assert!(
            took.is_some(),
            "new certificate not served within 1s of the swap"
        );
        assert_eq!(
            kept.get("/", &[]).await.expect("old connection").0,
            StatusCode::OK
        );
        drop(files.dir);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_replacements_keep_the_old_certificate_and_are_counted() {
    within(60, "test", async {
        let ca = Ca::new("test CA");
        let old = ca.leaf("proxy", &["localhost"], 101);
        let files = ListenerFiles::new(&old, None);
        let fake = FakeUpstream::ok().await;
        let h = tls_proxy(&files, &[], fake.addr()).await;
        let opts = ClientOpts::trusting(&ca);

        let failures = || async {
            h.metric_value("spillway_tls_reloads_total", &[("result", "failure")])
                .await
                .unwrap_or(0.0)
        };
        let wait_failures = |n: f64| async move {
            let start = Instant::now();
            while failures().await < n {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "rejection {n} not counted"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };

        // A certificate whose key is not the one beside it.
        let other = ca.leaf("proxy", &["localhost"], 102);
        let stray = ca.leaf("proxy", &["localhost"], 103);
        std::fs::write(&files.key, &stray.key_pem).expect("write key");
        std::fs::write(&files.cert, &other.cert_pem).expect("write cert");
        wait_failures(1.0).await;
        let c = TlsConn::open(h.addr(), &opts).await.expect("still serving");
        assert_eq!(c.peer, old.der, "the old certificate keeps serving");

        // An expired certificate with its own key.
        let expired = ca.leaf_valid("proxy", &["localhost"], 104, -10 * 86_400, -86_400);
        std::fs::write(&files.key, &expired.key_pem).expect("write key");
        std::fs::write(&files.cert, &expired.cert_pem).expect("write cert");
        wait_failures(2.0).await;
        assert_eq!(
            TlsConn::open(h.addr(), &opts).await.expect("serving").peer,
            old.der
        );

        // Not PEM at all.
        std::fs::write(&files.cert, "this is not a certificate\n").expect("write");
        wait_failures(3.0).await;
        assert_eq!(
            TlsConn::open(h.addr(), &opts).await.expect("serving").peer,
            old.der
        );

        // Fixed: the good pair is taken.
        let good = ca.leaf("proxy", &["localhost"], 105);
        replace_file(&files.key, &good.key_pem);
        replace_file(&files.cert, &good.cert_pem);
        assert!(
            wait_for_cert(h.addr(), &opts, &good.der, Duration::from_secs(5))
                .await
                .is_some(),
            "a good certificate after broken ones is taken"
        );
        assert_eq!(failures().await, 3.0);
    })
    .await
}

// ---------------------------------------------------------------------------
// Handshake limits
// ---------------------------------------------------------------------------

/// The lingering close works on TLS streams: a client still uploading past
/// `max_request_body` reads its 413, and its upload is drained, not reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_413_reaches_a_tls_client_that_is_still_sending() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(60, "test", async {
        let ca = Ca::new("test CA");
        let files = ListenerFiles::new(&ca.leaf("proxy", &["localhost"], 1), None);
        // Reads the whole body first, so the limit is what answers.
        let fake = FakeUpstream::with_handler(|req, _| async move {
            match req.into_body().collect().await {
                Ok(_) => Ok(reply::ok()),
                Err(_) => Err(Reset),
            }
        })
        .await;
        let yaml = yaml_with(
            &files.yaml(&[]),
            &upstream_yaml("app", fake.addr(), ""),
            &route_yaml(
                "all",
                "      path_prefix: /",
                "app",
                "    max_request_body: 64KiB",
            ),
        );
        let h = ProxyHarness::start(&yaml).await;
        let opts = ClientOpts::trusting(&ca);
        for round in 0..5 {
            let tls = tls_stream(h.addr(), &opts).await.expect("TLS connect");
            let (mut rd, mut wr) = tokio::io::split(tls);
            let writer = tokio::spawn(async move {
                let res = async {
                    wr.write_all(
                        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n",
                    )
                    .await?;
                    let mut chunk = format!("{:x}\r\n", 64 * 1024).into_bytes();
                    chunk.extend(std::iter::repeat_n(b'u', 64 * 1024));
                    chunk.extend_from_slice(b"\r\n");
                    for _ in 0..32 {
                        wr.write_all(&chunk).await?;
                    }
                    wr.flush().await
                }
                .await;
                (wr, res)
            });
            let mut got = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            let end = loop {
                match within(15, "the reply", rd.read(&mut buf)).await {
                    Ok(0) => break "EOF".to_string(),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => break format!("error: {e}"),
                }
            };
            let text = String::from_utf8_lossy(&got).to_lowercase();
            assert!(
                text.starts_with("http/1.1 413") && text.contains("x-spillway-reason: body_too_large"),
                "round {round} ({end}): {text:?}"
            );
            let (_wr, res) = within(15, "the writer", writer).await.expect("writer task");
            assert!(res.is_ok(), "round {round}: {res:?}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_dropped_after_the_handshake_timeout() {
    within(60, "test", async {
        let ca = Ca::new("test CA");
        let files = ListenerFiles::new(&ca.leaf("proxy", &["localhost"], 111), None);
        let fake = FakeUpstream::ok().await;
        let h = tls_proxy(&files, &["handshake_timeout: 300ms"], fake.addr()).await;
        let start = Instant::now();
        let mut silent = RawConn::connect(h.addr()).await;
        assert!(
            within(10, "silent client dropped", silent.closed()).await,
            "closed"
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(250),
            "dropped before the timeout: {took:?}"
        );
        // Others are served normally.
        let mut c = TlsConn::open(h.addr(), &ClientOpts::trusting(&ca))
            .await
            .expect("connect");
        assert_eq!(c.get("/", &[]).await.expect("request").0, StatusCode::OK);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_capped() {
    within(60, "test", async {
        let ca = Ca::new("test CA");
        let files = ListenerFiles::new(&ca.leaf("proxy", &["localhost"], 121), None);
        let fake = FakeUpstream::ok().await;
        let h = tls_proxy(
            &files,
            &["handshake_timeout: 600ms", "max_handshakes: 1"],
            fake.addr(),
        )
        .await;
        // A silent client takes the only handshake slot...
        let mut silent = RawConn::connect(h.addr()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...so a real client is handshaken only once the silent one is dropped.
        let start = Instant::now();
        let mut c = TlsConn::open(h.addr(), &ClientOpts::trusting(&ca))
            .await
            .expect("connect");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(300),
            "handshake did not wait for the slot: {waited:?}"
        );
        assert!(within(5, "silent client dropped", silent.closed()).await);
        assert_eq!(c.get("/", &[]).await.expect("request").0, StatusCode::OK);
    })
    .await
}

// ---------------------------------------------------------------------------
// `spillway check`
// ---------------------------------------------------------------------------

fn check(dir: &TempDir, cert: &Path, key: &Path, extra: &[&str]) -> std::process::Output {
    let mut tls = format!(
        "    tls:\n      cert: {}\n      key: {}\n",
        cert.display(),
        key.display()
    );
    for e in extra {
        tls.push_str(&format!("      {e}\n"));
    }
    let yaml = yaml_with(
        &tls,
        &upstream_yaml("app", "127.0.0.1:3000".parse().expect("addr"), ""),
        &all_route("app"),
    );
    let file = dir.write("spillway.yaml", &yaml);
    std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["check", "--config"])
        .arg(&file)
        .env("SPILLWAY_LOG", "error")
        .output()
        .expect("run spillway check")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn check_validates_certificate_files() {
    let ca = Ca::new("test CA");
    let dir = TempDir::new("check");
    let good = ca.leaf("proxy", &["localhost"], 131);
    let cert = dir.write("tls.crt", &good.cert_pem);
    let key = dir.write("tls.key", &good.key_pem);

    let out = check(&dir, &cert, &key, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("warning"), "{}", text(&out));

    // A key that is not the certificate's.
    let other = ca.leaf("proxy", &["localhost"], 132);
    let wrong_key = dir.write("other.key", &other.key_pem);
    let out = check(&dir, &cert, &wrong_key, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("listeners[0].tls.key"), "{t}");
    assert!(t.contains("does not match the certificate"), "{t}");

    // Expired.
    let expired = ca.leaf_valid("proxy", &["localhost"], 133, -30 * 86_400, -2 * 86_400);
    let ecert = dir.write("expired.crt", &expired.cert_pem);
    let ekey = dir.write("expired.key", &expired.key_pem);
    let out = check(&dir, &ecert, &ekey, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("listeners[0].tls.cert"), "{t}");
    assert!(t.contains("expired at"), "{t}");

    // Expires in 5 days: valid, with a warning.
    let soon = ca.leaf_valid("proxy", &["localhost"], 134, -86_400, 5 * 86_400 + 3_600);
    let scert = dir.write("soon.crt", &soon.cert_pem);
    let skey = dir.write("soon.key", &soon.key_pem);
    let out = check(&dir, &scert, &skey, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("warning:") && t.contains("expires at") && t.contains("in 5 days"),
        "{t}"
    );

    // Not PEM; a PEM with no key in it.
    let junk = dir.write("junk.crt", "hello\n");
    let out = check(&dir, &junk, &key, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("holds no certificate"),
        "{}",
        text(&out)
    );
    let out = check(&dir, &cert, &cert, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("holds no private key"),
        "{}",
        text(&out)
    );

    // The identity header needs client_ca, and must not be a managed header.
    let out = check(
        &dir,
        &cert,
        &key,
        &["forward_client_identity_header: x-client-identity"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("needs `client_ca`"), "{}", text(&out));
    let ca_file = dir.write("ca.crt", &ca.pem);
    let out = check(
        &dir,
        &cert,
        &key,
        &[
            &format!("client_ca: {}", ca_file.display()),
            "forward_client_identity_header: x-forwarded-for",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("name a header of your own"),
        "{}",
        text(&out)
    );
    let out = check(
        &dir,
        &cert,
        &key,
        &[
            &format!("client_ca: {}", ca_file.display()),
            "forward_client_identity_header: x-client-identity",
            "handshake_timeout: 5s",
            "max_handshakes: 64",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn check_validates_upstream_tls_files() {
    let ca = Ca::new("test CA");
    let dir = TempDir::new("check-up");
    let me = ca.leaf("spillway", &["spillway.internal"], 141);
    let cert = dir.write("c.crt", &me.cert_pem);
    let other = ca.leaf("x", &["x"], 142);
    let wrong = dir.write("wrong.key", &other.key_pem);
    let junk = dir.write(
        "junk.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let up = format!(
        "  app:\n    endpoints: [\"127.0.0.1:3000\"]\n    tls:\n      server_name: \"not a name\"\n      ca: {}\n      client_cert: {}\n      client_key: {}\n",
        junk.display(),
        cert.display(),
        wrong.display()
    );
    let yaml = yaml_with("", &up, &all_route("app"));
    let file = dir.write("spillway.yaml", &yaml);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("upstreams.app.tls.server_name"), "{t}");
    assert!(t.contains("upstreams.app.tls.ca"), "{t}");
    assert!(t.contains("upstreams.app.tls.client_key"), "{t}");
    assert!(t.contains("3 problems"), "{t}");
}

// ---------------------------------------------------------------------------
// Blame: a TLS client gone mid-upload is the client's
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_gone_mid_upload_never_opens_the_breaker() {
    within(60, "test", async {
        use tokio::io::AsyncWriteExt;
        let ca = Ca::new("test CA");
        let leaf = ca.leaf("proxy", &["localhost"], 31);
        let files = ListenerFiles::new(&leaf, None);
        let fake = FakeUpstream::with_handler(|req, _ctx| async move {
            let _ = req.into_body().collect().await;
            Ok(reply::ok())
        })
        .await;
        let yaml = yaml_with(
            &files.yaml(&[]),
            &upstream_yaml(
                "app",
                fake.addr(),
                "    circuit_breaker:\n      failure_threshold: 3\n",
            ),
            &all_route("app"),
        );
        let h = ProxyHarness::start(&yaml).await;
        let opts = ClientOpts::trusting(&ca);
        for i in 0..5u64 {
            let mut tls = tls_stream(h.addr(), &opts).await.expect("tls connect");
            tls.write_all(
                b"POST /up HTTP/1.1\r\nhost: localhost\r\ncontent-length: 4194304\r\n\r\n",
            )
            .await
            .expect("head");
            tls.write_all(&vec![b'x'; 128 * 1024]).await.expect("body");
            tls.flush().await.expect("flush");
            fake.wait_hits(i + 1).await;
            if i % 2 == 0 {
                // A clean TLS close_notify, then the TCP close.
                let _ = tls.shutdown().await;
            }
            drop(tls);
            let want = (i + 1) as f64;
            within(30, "client_abort counted", async {
                while metric(
                    &h,
                    "spillway_requests_total",
                    &[("route", "all"), ("reason", "client_abort")],
                )
                .await
                    < want
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
        }
        let m = h.metrics().await;
        assert_eq!(
            m.value(
                "spillway_circuit_state",
                &[("upstream", "app"), ("state", "closed")]
            ),
            Some(1.0)
        );
        assert_eq!(
            m.value(
                "spillway_upstream_requests_total",
                &[("upstream", "app"), ("outcome", "cancelled")]
            ),
            Some(5.0)
        );
        assert!(m
            .find("spillway_requests_total", &[])
            .iter()
            .all(|s| !s.label("reason").unwrap_or("").starts_with("upstream_")));
        let mut c = TlsConn::open(h.addr(), &opts).await.expect("connect");
        let (status, _, _, _) = c.get("/after", &[]).await.expect("get");
        assert_eq!(status, StatusCode::OK);
    })
    .await;
}
