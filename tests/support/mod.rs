//! Shared test support for Spillway's black-box integration tests.
//!
//! * [`FakeUpstream`]: a real HTTP/1.1 + h2c server on `127.0.0.1:0` with a
//!   pluggable async handler, convenience modes (status, delay, chunked
//!   streaming, echo, reset, trailers, upgrade echo) and counters (hits, hits
//!   by path and by `x-request-id`, current and peak concurrency, recorded
//!   requests). A panic in a handler or in any task it spawned fails the test.
//! * [`ProxyHarness`]: Spillway started in-process through the library, with
//!   HTTP/1 and h2c clients and admin/metrics helpers.
//! * [`RawConn`]: a raw TCP client for hand-written requests.
//! * Body generators and verifiers that never hold large bodies in memory.
#![allow(dead_code)]

pub mod chaos;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

// ===========================================================================
// Basic types and helpers
// ===========================================================================

/// Error type used by all test bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type used by fake upstream responses and client requests.
pub type Body = BoxBody<Bytes, BoxError>;
/// HTTP client used against the proxy (HTTP/1 or h2c prior knowledge).
pub type HttpClient = Client<HttpConnector, Body>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// Boxes a hyper `Incoming` body (e.g. to echo a request body back).
pub fn boxed_incoming(body: Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// Awaits `fut`, failing the test if it takes longer than `secs` seconds.
pub async fn within<F: Future>(secs: u64, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs}s: {what}"),
    }
}

/// Hex-encoded SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes (xorshift64*), so bodies are not compressible
/// or trivially repetitive.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Collects a whole body (only for small/medium bodies).
pub async fn collect_body<B>(body: B) -> Bytes
where
    B: HttpBody,
    B::Error: fmt::Debug,
{
    body.collect().await.expect("reading body").to_bytes()
}

/// Collects a response body as UTF-8 text.
pub async fn body_string(resp: Response<Incoming>) -> String {
    let bytes = collect_body(resp.into_body()).await;
    String::from_utf8_lossy(&bytes).into_owned()
}

/// All values of a header joined with ", " (how repeated headers combine).
pub fn header_joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("<non-ascii>"))
        .collect();
    if values.is_empty() {
        None
    } else {
        Some(values.join(", "))
    }
}

/// The header's value as `&str`, if present.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .map(|v| v.to_str().expect("ascii header value"))
}

/// Asserts that no `x-spillway-*` header is present.
pub fn assert_no_spillway_headers(headers: &HeaderMap) {
    let ours: Vec<&str> = headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.starts_with("x-spillway-"))
        .collect();
    assert!(
        ours.is_empty(),
        "upstream response must pass untouched, found {ours:?}"
    );
}

// ===========================================================================
// Channel body: a body fed from a task, with data, trailers or an error
// ===========================================================================

/// A response/request body fed through an mpsc channel.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    size: Option<u64>,
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }

    fn size_hint(&self) -> SizeHint {
        match self.size {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The sending half of a [`ChannelBody`].
#[derive(Clone)]
pub struct BodySender {
    tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
}

impl BodySender {
    /// Sends a data chunk; false if the receiver is gone.
    pub async fn data(&self, bytes: impl Into<Bytes>) -> bool {
        self.tx.send(Ok(Frame::data(bytes.into()))).await.is_ok()
    }
    /// Sends trailers (the body ends after them; drop the sender).
    pub async fn trailers(&self, trailers: HeaderMap) -> bool {
        self.tx.send(Ok(Frame::trailers(trailers))).await.is_ok()
    }
    /// Fails the body (the peer sees the stream/connection broken).
    pub async fn abort(&self) -> bool {
        self.tx.send(Err("aborted by test".into())).await.is_ok()
    }
    /// Resolves when the receiving body has been dropped.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A streaming body with unknown length (chunked on HTTP/1.1).
pub fn body_channel() -> (BodySender, Body) {
    let (tx, rx) = mpsc::channel(4);
    (BodySender { tx }, ChannelBody { rx, size: None }.boxed())
}

/// A streaming body announcing an exact length.
pub fn body_channel_sized(len: u64) -> (BodySender, Body) {
    let (tx, rx) = mpsc::channel(4);
    (
        BodySender { tx },
        ChannelBody {
            rx,
            size: Some(len),
        }
        .boxed(),
    )
}

// ===========================================================================
// Large generated bodies and their verification (never held in memory)
// ===========================================================================

/// Block size of [`PatternBody`].
pub const PATTERN_BLOCK: usize = 64 * 1024;

fn pattern_block() -> &'static [u8] {
    static BLOCK: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BLOCK.get_or_init(|| random_bytes(PATTERN_BLOCK, 0x5eed))
}

/// The expected byte of a pattern stream at `offset`.
fn pattern_bytes_at(offset: u64, out: &mut [u8]) {
    let block = pattern_block();
    let mut off = offset;
    let mut i = 0;
    while i < out.len() {
        let index = off / PATTERN_BLOCK as u64;
        let within = (off % PATTERN_BLOCK as u64) as usize;
        let n = (PATTERN_BLOCK - within).min(out.len() - i);
        out[i..i + n].copy_from_slice(&block[within..within + n]);
        // The first 8 bytes of every block carry the block index, so that
        // dropped, duplicated or reordered blocks are detected.
        if within < 8 {
            let m = (8 - within).min(n);
            out[i..i + m].copy_from_slice(&index.to_le_bytes()[within..within + m]);
        }
        i += n;
        off += n as u64;
    }
}

/// A generated body of `len` bytes: 64 KiB blocks, each a fixed random block
/// stamped with its index. Streams without holding the whole body.
pub struct PatternBody {
    len: u64,
    sent: u64,
    chunk: usize,
    exact: bool,
}

impl PatternBody {
    /// A body announcing its exact length (Content-Length on HTTP/1.1).
    pub fn sized(len: u64) -> Self {
        PatternBody {
            len,
            sent: 0,
            chunk: PATTERN_BLOCK,
            exact: true,
        }
    }
    /// A body of unknown length (chunked on HTTP/1.1).
    pub fn chunked(len: u64) -> Self {
        PatternBody {
            len,
            sent: 0,
            chunk: PATTERN_BLOCK,
            exact: false,
        }
    }
}

impl HttpBody for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.sent >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.sent).min(self.chunk as u64) as usize;
        let mut buf = BytesMut::zeroed(n);
        pattern_bytes_at(self.sent, &mut buf);
        self.sent += n as u64;
        Poll::Ready(Some(Ok(Frame::data(buf.freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.len
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.len - self.sent)
        } else {
            SizeHint::default()
        }
    }
}

/// Verifies a pattern stream piece by piece, and feeds a SHA-256.
pub struct PatternVerifier {
    offset: u64,
    scratch: Vec<u8>,
    hasher: Sha256,
    hash: bool,
}

impl PatternVerifier {
    /// `hash`: also compute a SHA-256 of the stream (slow in debug builds).
    pub fn new(hash: bool) -> Self {
        PatternVerifier {
            offset: 0,
            scratch: Vec::new(),
            hasher: Sha256::new(),
            hash,
        }
    }
    /// Checks the next piece; panics at the first mismatching offset.
    pub fn feed(&mut self, data: &[u8]) {
        self.scratch.resize(data.len(), 0);
        pattern_bytes_at(self.offset, &mut self.scratch);
        if self.scratch[..] != *data {
            let pos = self
                .scratch
                .iter()
                .zip(data)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!("body corrupted at byte offset {}", self.offset + pos as u64);
        }
        if self.hash {
            self.hasher.update(data);
        }
        self.offset += data.len() as u64;
    }
    /// Bytes verified so far.
    pub fn len(&self) -> u64 {
        self.offset
    }
    /// Hash of what was fed (only when constructed with `hash = true`).
    pub fn sha256_hex(self) -> String {
        hex(&self.hasher.finalize())
    }
}

/// Resident set size of this process, from /proc (bytes).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .expect("statm rss")
        .parse()
        .expect("rss");
    pages * 4096
}

// ===========================================================================
// FakeUpstream
// ===========================================================================

/// Returned by a handler to drop the connection without any response.
#[derive(Debug)]
pub struct Reset;

impl fmt::Display for Reset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("fake upstream reset the connection")
    }
}

impl std::error::Error for Reset {}

/// What a handler returns.
pub type HandlerResult = Result<Response<Body>, Reset>;
type BoxFut = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
type HandlerFn = Arc<dyn Fn(Request<Incoming>, Ctx) -> BoxFut + Send + Sync>;

/// One request as the fake upstream saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_str(&self.headers, name)
    }
    pub fn header_joined(&self, name: &str) -> Option<String> {
        header_joined(&self.headers, name)
    }
}

struct Shared {
    hits: AtomicU64,
    changed: watch::Sender<u64>,
    by_path: Mutex<HashMap<String, u64>>,
    by_request_id: Mutex<HashMap<String, u64>>,
    current: AtomicUsize,
    peak: AtomicUsize,
    connections: AtomicU64,
    requests: Mutex<Vec<RecordedRequest>>,
    panics: Mutex<Vec<String>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn spawn<F>(self: &Arc<Self>, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let shared = self.clone();
        let handle = tokio::spawn(async move {
            if let Err(panic) = AssertUnwindSafe(fut).catch_unwind().await {
                shared.record_panic(panic);
            }
        });
        let mut tasks = self.tasks.lock();
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    fn record_panic(&self, panic: Box<dyn std::any::Any + Send>) {
        let msg = if let Some(s) = panic.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = panic.downcast_ref::<String>() {
            s.clone()
        } else {
            "<non-string panic>".to_string()
        };
        eprintln!("fake upstream: handler panicked: {msg}");
        self.panics.lock().push(msg);
        self.changed.send_modify(|v| *v += 1);
    }

    fn record(&self, req: &Request<Incoming>) {
        self.requests.lock().push(RecordedRequest {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        });
        *self
            .by_path
            .lock()
            .entry(req.uri().path().to_string())
            .or_insert(0) += 1;
        if let Some(id) = req.headers().get("x-request-id") {
            let id = String::from_utf8_lossy(id.as_bytes()).into_owned();
            *self.by_request_id.lock().entry(id).or_insert(0) += 1;
        }
        self.hits.fetch_add(1, Ordering::SeqCst);
        self.changed.send_modify(|v| *v += 1);
    }
}

/// Handed to handlers: spawn owned tasks (their panics fail the test).
#[derive(Clone)]
pub struct Ctx {
    shared: Arc<Shared>,
}

impl Ctx {
    /// Spawns a task owned by the fake upstream (aborted when it drops).
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.shared.spawn(fut)
    }
}

/// Counts a request as in flight until dropped (lives inside the response body).
struct InFlight {
    shared: Arc<Shared>,
}

impl InFlight {
    fn new(shared: Arc<Shared>) -> Self {
        let now = shared.current.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak.fetch_max(now, Ordering::SeqCst);
        InFlight { shared }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.current.fetch_sub(1, Ordering::SeqCst);
        self.shared.changed.send_modify(|v| *v += 1);
    }
}

/// A response body that keeps the request counted as in flight until it ends.
struct GuardedBody {
    inner: Body,
    guard: Option<InFlight>,
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = res {
            this.guard = None;
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Behaviour of a builder-configured fake upstream.
#[derive(Clone)]
enum Mode {
    Fixed(Bytes),
    Echo,
    Chunks(Vec<Bytes>, Duration),
    Reset,
    Trailers(Bytes, HeaderMap),
    UpgradeEcho,
}

/// Which requests a builder-configured fake fails, deterministically.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// Requests 1..=n fail.
    First(u64, StatusCode),
    /// A fraction `rate` of requests fail, spread evenly (Bresenham), so a
    /// test knows exactly how many of N requests fail.
    Rate(f64, StatusCode),
    /// Requests 1..=n are reset (connection closed without a response).
    ResetFirst(u64),
}

impl Failure {
    /// The failure for the `k`-th request (1-based), if any.
    fn for_request(self, k: u64) -> Option<Option<StatusCode>> {
        match self {
            Failure::First(n, status) => (k <= n).then_some(Some(status)),
            Failure::ResetFirst(n) => (k <= n).then_some(None),
            Failure::Rate(rate, status) => {
                let before = ((k - 1) as f64 * rate).floor();
                let after = (k as f64 * rate).floor();
                (after > before).then_some(Some(status))
            }
        }
    }
}

/// Builder for [`FakeUpstream`].
pub struct FakeUpstreamBuilder {
    status: StatusCode,
    failure: Option<Failure>,
    delay: Option<Duration>,
    headers: HeaderMap,
    mode: Mode,
    handler: Option<HandlerFn>,
}

impl FakeUpstreamBuilder {
    /// Response status (default 200).
    pub fn status(mut self, status: u16) -> Self {
        self.status = StatusCode::from_u16(status).expect("status");
        self
    }
    /// The first `n` requests get `status` (e.g. 503), later ones the normal reply.
    pub fn fail_first(mut self, n: u64, status: u16) -> Self {
        self.failure = Some(Failure::First(
            n,
            StatusCode::from_u16(status).expect("status"),
        ));
        self
    }
    /// A fraction `rate` (0..=1) of requests get `status`, spread evenly and
    /// deterministically (with 0.25, requests 4, 8, 12... fail).
    pub fn failure_rate(mut self, rate: f64, status: u16) -> Self {
        assert!((0.0..=1.0).contains(&rate), "rate in 0..=1");
        self.failure = Some(Failure::Rate(
            rate,
            StatusCode::from_u16(status).expect("status"),
        ));
        self
    }
    /// The first `n` requests are reset without a response.
    pub fn reset_first(mut self, n: u64) -> Self {
        self.failure = Some(Failure::ResetFirst(n));
        self
    }
    /// Waits this long before sending response headers.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
        self
    }
    /// A fixed response body (default "ok").
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.mode = Mode::Fixed(body.into());
        self
    }
    /// Echoes the request body; request metadata in `x-echo-*` headers.
    pub fn echo(mut self) -> Self {
        self.mode = Mode::Echo;
        self
    }
    /// Streams `chunks` (no Content-Length), waiting `gap` before each one.
    pub fn chunks(mut self, chunks: Vec<Bytes>, gap: Duration) -> Self {
        self.mode = Mode::Chunks(chunks, gap);
        self
    }
    /// Closes the connection without a response.
    pub fn reset(mut self) -> Self {
        self.mode = Mode::Reset;
        self
    }
    /// A body followed by trailers (announced in a `Trailer` header).
    pub fn trailers(mut self, body: impl Into<Bytes>, trailers: &[(&str, &str)]) -> Self {
        let mut map = HeaderMap::new();
        for (k, v) in trailers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("trailer name"),
                HeaderValue::from_str(v).expect("trailer value"),
            );
        }
        self.mode = Mode::Trailers(body.into(), map);
        self
    }
    /// Answers upgrade requests with 101 and echoes the tunnelled bytes.
    pub fn upgrade_echo(mut self) -> Self {
        self.mode = Mode::UpgradeEcho;
        self
    }
    /// A custom async handler (overrides every other setting).
    pub fn handler<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Request<Incoming>, Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.handler = Some(Arc::new(move |req: Request<Incoming>, ctx: Ctx| {
            Box::pin(f(req, ctx)) as BoxFut
        }));
        self
    }

    /// Binds 127.0.0.1:0 and starts serving.
    pub async fn start(self) -> FakeUpstream {
        let handler = match self.handler {
            Some(h) => h,
            None => {
                let status = self.status;
                let delay = self.delay;
                let headers = self.headers;
                let mode = self.mode;
                let failure = self.failure;
                let seen = Arc::new(AtomicU64::new(0));
                Arc::new(move |req: Request<Incoming>, ctx: Ctx| {
                    let headers = headers.clone();
                    let mode = mode.clone();
                    let k = seen.fetch_add(1, Ordering::SeqCst) + 1;
                    let fail = failure.and_then(|f| f.for_request(k));
                    Box::pin(async move {
                        if let Some(d) = delay {
                            tokio::time::sleep(d).await;
                        }
                        match fail {
                            Some(Some(code)) => {
                                return Ok(reply::status_body(code.as_u16(), "injected failure"))
                            }
                            Some(None) => return Err(Reset),
                            None => {}
                        }
                        let mut resp = match mode {
                            Mode::Fixed(body) => reply::status_body(status.as_u16(), body),
                            Mode::Echo => reply::echo(req),
                            Mode::Chunks(chunks, gap) => reply::chunks(&ctx, chunks, gap),
                            Mode::Reset => return Err(Reset),
                            Mode::Trailers(body, trailers) => reply::trailers(&ctx, body, trailers),
                            Mode::UpgradeEcho => reply::upgrade_echo(&ctx, req),
                        };
                        if !matches!(resp.status(), StatusCode::SWITCHING_PROTOCOLS) {
                            *resp.status_mut() = status;
                        }
                        for (k, v) in headers.iter() {
                            resp.headers_mut().append(k.clone(), v.clone());
                        }
                        Ok(resp)
                    }) as BoxFut
                })
            }
        };
        FakeUpstream::serve(handler).await
    }
}

/// Ready-made replies, usable from custom handlers.
pub mod reply {
    use super::*;

    /// `status` with a body.
    pub fn status_body(status: u16, body: impl Into<Bytes>) -> Response<Body> {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain")
            .body(full(body))
            .expect("response")
    }

    /// 200 "ok".
    pub fn ok() -> Response<Body> {
        status_body(200, "ok")
    }

    /// Echoes the request body back (streaming, full duplex) and describes the
    /// request in `x-echo-method`, `x-echo-uri`, `x-echo-version` and
    /// `x-echo-headers` (a JSON object of name -> [values]).
    pub fn echo(req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let mut map: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
        for name in parts.headers.keys() {
            let values: Vec<serde_json::Value> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            map.insert(name.as_str().to_string(), serde_json::Value::Array(values));
        }
        let json = serde_json::Value::Object(map).to_string();
        let mut builder = Response::builder()
            .status(200)
            .header("x-echo-method", parts.method.as_str())
            .header("x-echo-uri", parts.uri.to_string())
            .header("x-echo-version", format!("{:?}", parts.version))
            .header(
                "x-echo-headers",
                HeaderValue::from_bytes(json.as_bytes()).expect("json hdr"),
            );
        if let Some(ct) = parts.headers.get("content-type") {
            builder = builder.header("content-type", ct.clone());
        }
        builder.body(boxed_incoming(body)).expect("response")
    }

    /// Streams `chunks` without Content-Length, waiting `gap` before each.
    pub fn chunks(ctx: &Ctx, chunks: Vec<Bytes>, gap: Duration) -> Response<Body> {
        let (tx, body) = body_channel();
        ctx.spawn(async move {
            for chunk in chunks {
                if !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
                if !tx.data(chunk).await {
                    return;
                }
            }
        });
        Response::builder()
            .status(200)
            .body(body)
            .expect("response")
    }

    /// A body followed by trailers; the `Trailer` header announces them (HTTP/1.1
    /// only sends trailers the response announces and the request accepted with
    /// `te: trailers`).
    pub fn trailers(ctx: &Ctx, body: Bytes, trailers: HeaderMap) -> Response<Body> {
        let (tx, resp_body) = body_channel();
        let names: Vec<String> = trailers.keys().map(|k| k.as_str().to_string()).collect();
        ctx.spawn(async move {
            if !body.is_empty() && !tx.data(body).await {
                return;
            }
            tx.trailers(trailers).await;
        });
        let mut builder = Response::builder().status(200);
        if !names.is_empty() {
            builder = builder.header("trailer", names.join(", "));
        }
        builder.body(resp_body).expect("response")
    }

    /// 101 Switching Protocols, then echoes every tunnelled byte.
    pub fn upgrade_echo(ctx: &Ctx, mut req: Request<Incoming>) -> Response<Body> {
        let proto = req
            .headers()
            .get("upgrade")
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("websocket"));
        let on_upgrade = hyper::upgrade::on(&mut req);
        ctx.spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("fake upstream: upgrade failed: {e}");
                    return;
                }
            };
            let mut io = TokioIo::new(upgraded);
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() || io.flush().await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = io.shutdown().await;
        });
        Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", proto)
            .body(empty())
            .expect("response")
    }
}

/// A fake upstream HTTP server on a real socket.
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FakeUpstream {
    /// A builder: 200 "ok" unless configured otherwise.
    pub fn builder() -> FakeUpstreamBuilder {
        FakeUpstreamBuilder {
            status: StatusCode::OK,
            failure: None,
            delay: None,
            headers: HeaderMap::new(),
            mode: Mode::Fixed(Bytes::from_static(b"ok")),
            handler: None,
        }
    }

    /// A fake upstream answering 200 "ok".
    pub async fn ok() -> FakeUpstream {
        Self::builder().start().await
    }

    /// A fake upstream answering `status`.
    pub async fn status(status: u16) -> FakeUpstream {
        Self::builder().status(status).start().await
    }

    /// A fake upstream echoing requests.
    pub async fn echo() -> FakeUpstream {
        Self::builder().echo().start().await
    }

    /// A fake upstream with a custom handler.
    pub async fn with_handler<F, Fut>(f: F) -> FakeUpstream
    where
        F: Fn(Request<Incoming>, Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        Self::builder().handler(f).start().await
    }

    async fn serve(handler: HandlerFn) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("local addr");
        let (changed, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            hits: AtomicU64::new(0),
            changed,
            by_path: Mutex::new(HashMap::new()),
            by_request_id: Mutex::new(HashMap::new()),
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            connections: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
            panics: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        shared.spawn(async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("fake upstream: accept error: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                accept_shared.connections.fetch_add(1, Ordering::SeqCst);
                let conn_shared = accept_shared.clone();
                let handler = handler.clone();
                accept_shared.spawn(async move {
                    let svc_shared = conn_shared.clone();
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let shared = svc_shared.clone();
                        let handler = handler.clone();
                        async move { handle(shared, handler, req).await }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    // Connection errors are expected (resets, aborted bodies).
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeUpstream { addr, shared }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Port of the bound address.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    /// Total requests received.
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(Ordering::SeqCst)
    }
    /// Requests received for an exact path.
    pub fn hits_for_path(&self, path: &str) -> u64 {
        self.shared.by_path.lock().get(path).copied().unwrap_or(0)
    }
    /// Requests received carrying this `x-request-id`.
    pub fn hits_for_request_id(&self, id: &str) -> u64 {
        self.shared
            .by_request_id
            .lock()
            .get(id)
            .copied()
            .unwrap_or(0)
    }
    /// Requests currently being handled (until their response body ends).
    pub fn current(&self) -> usize {
        self.shared.current.load(Ordering::SeqCst)
    }
    /// Highest concurrency seen.
    pub fn peak(&self) -> usize {
        self.shared.peak.load(Ordering::SeqCst)
    }
    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }
    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().clone()
    }
    /// The last request received.
    pub fn last_request(&self) -> RecordedRequest {
        self.shared
            .requests
            .lock()
            .last()
            .cloned()
            .expect("fake upstream received no request")
    }
    /// Headers of the last request received.
    pub fn last_headers(&self) -> HeaderMap {
        self.last_request().headers
    }

    /// Waits until `cond` holds (re-checked on every hit/completion), up to 30 s.
    pub async fn wait_until(&self, what: &str, cond: impl Fn(&FakeUpstream) -> bool) {
        let mut rx = self.shared.changed.subscribe();
        let res = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if cond(self) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if res.is_err() {
            panic!(
                "fake upstream: timed out waiting for {what} (hits = {})",
                self.hits()
            );
        }
    }

    /// Waits until at least `n` requests have arrived.
    pub async fn wait_hits(&self, n: u64) {
        self.wait_until(&format!("{n} hits"), |f| f.hits() >= n)
            .await
    }

    /// Waits until at least `n` requests for `path` have arrived.
    pub async fn wait_path_hits(&self, path: &str, n: u64) {
        self.wait_until(&format!("{n} hits on {path}"), |f| {
            f.hits_for_path(path) >= n
        })
        .await
    }

    /// Fails the test if a handler (or a task it spawned) panicked.
    pub fn assert_healthy(&self) {
        let panics = self.shared.panics.lock();
        assert!(
            panics.is_empty(),
            "fake upstream handler panicked: {panics:?}"
        );
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for t in self.shared.tasks.lock().drain(..) {
            t.abort();
        }
        let panics = self.shared.panics.lock().clone();
        if !panics.is_empty() && !std::thread::panicking() {
            panic!("fake upstream handler panicked: {panics:?}");
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    handler: HandlerFn,
    req: Request<Incoming>,
) -> Result<Response<GuardedBody>, Reset> {
    let guard = InFlight::new(shared.clone());
    shared.record(&req);
    let ctx = Ctx {
        shared: shared.clone(),
    };
    // The handler call itself is inside the guarded future so that a panic in
    // its synchronous part is caught too.
    match AssertUnwindSafe(async move { handler(req, ctx).await })
        .catch_unwind()
        .await
    {
        Ok(Ok(resp)) => Ok(resp.map(|inner| GuardedBody {
            inner,
            guard: Some(guard),
        })),
        Ok(Err(Reset)) => Err(Reset),
        Err(panic) => {
            shared.record_panic(panic);
            Ok(reply::status_body(500, "fake upstream handler panicked")
                .map(|inner| GuardedBody { inner, guard: None }))
        }
    }
}

/// An address on which nothing listens: bound, then closed.
pub async fn closed_port_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

// ===========================================================================
// Proxy harness
// ===========================================================================

/// An HTTP/1.1 client.
pub fn h1_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An h2c (HTTP/2 prior knowledge) client.
pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// A minimal valid config: one listener, admin, one upstream `app` at
/// `upstream`, one route `all` matching everything, short drain.
pub fn basic_yaml(upstream: SocketAddr) -> String {
    format!(
        r#"version: 1
listeners:
  - name: inbound
    bind: 127.0.0.1:0
admin:
  bind: 127.0.0.1:0
drain:
  grace: 0s
  timeout: 5s
upstreams:
  app:
    endpoints: ["{upstream}"]
routes:
  - name: all
    match:
      path_prefix: /
    upstream: app
"#
    )
}

/// A config with one listener `inbound` (plus `listener_extra` lines, indented
/// 4 spaces, e.g. "    max_header_bytes: 16KiB"), admin, short drain, and the
/// given `upstreams` and `routes` blocks (full YAML, indented as under the keys).
pub fn yaml_with(listener_extra: &str, upstreams: &str, routes: &str) -> String {
    format!(
        "version: 1\nlisteners:\n  - name: inbound\n    bind: 127.0.0.1:0\n{listener_extra}\nadmin:\n  bind: 127.0.0.1:0\ndrain:\n  grace: 0s\n  timeout: 5s\nupstreams:\n{upstreams}\nroutes:\n{routes}\n"
    )
}

/// An upstream entry for the `upstreams:` block.
pub fn upstream_yaml(name: &str, addr: SocketAddr, extra: &str) -> String {
    format!("  {name}:\n    endpoints: [\"{addr}\"]\n{extra}")
}

/// A route entry for the `routes:` block; `match_lines` and `extra` are lines
/// indented 6 and 4 spaces respectively.
pub fn route_yaml(name: &str, match_lines: &str, upstream: &str, extra: &str) -> String {
    format!("  - name: {name}\n    match:\n{match_lines}\n    upstream: {upstream}\n{extra}")
}

/// Spillway with one route `all` (every path) to `fake`, the listener given
/// `listener_extra` lines (e.g. "    request_header_timeout: 300ms").
pub async fn one_route_proxy(fake: &FakeUpstream, listener_extra: &str) -> ProxyHarness {
    let yaml = yaml_with(
        listener_extra,
        &upstream_yaml("app", fake.addr(), ""),
        &route_yaml("all", "      path_prefix: /", "app", ""),
    );
    ProxyHarness::start(&yaml).await
}

/// Spillway started in-process.
pub struct ProxyHarness {
    proxy: Option<spillway::RunningProxy>,
    addr: SocketAddr,
    admin: SocketAddr,
    h1: HttpClient,
    h2: HttpClient,
}

impl ProxyHarness {
    /// Loads `yaml` (source name "test.yaml") and starts the proxy on the
    /// current runtime. Panics with the config issues if it is invalid.
    pub async fn start(yaml: &str) -> ProxyHarness {
        let loaded = match spillway::config::load_str(yaml, "test.yaml") {
            Ok(l) => l,
            Err(e) => panic!("test config invalid:\n{e}\n--- config ---\n{yaml}"),
        };
        for w in &loaded.warnings {
            eprintln!("config warning: {w}");
        }
        let proxy = match spillway::start(loaded.config).await {
            Ok(p) => p,
            Err(e) => panic!("spillway::start failed: {e}"),
        };
        let addr = proxy.listener_addr("inbound").unwrap_or_else(|| {
            panic!("no listener named `inbound` (test configs name their first listener so)")
        });
        let admin = proxy.admin_addr();
        ProxyHarness {
            proxy: Some(proxy),
            addr,
            admin,
            h1: h1_client(),
            h2: h2c_client(),
        }
    }

    /// Address of listener `inbound`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Address of a named listener.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.proxy.as_ref().and_then(|p| p.listener_addr(name))
    }
    /// Admin address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }
    /// `http://{listener}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    /// `http://{admin}{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }
    /// Shared HTTP/1.1 client.
    pub fn h1(&self) -> &HttpClient {
        &self.h1
    }
    /// Shared h2c client.
    pub fn h2(&self) -> &HttpClient {
        &self.h2
    }

    /// Begins graceful shutdown (as SIGTERM does).
    pub fn drain(&self) {
        self.proxy.as_ref().expect("proxy running").drain();
    }

    /// Resolves when the proxy has fully stopped.
    pub async fn stopped(mut self) {
        let proxy = self.proxy.take().expect("proxy running");
        proxy.stopped().await
    }

    /// Takes the running proxy (e.g. to await `stopped()` in another task).
    /// Applies `yaml` as a reload (what a file change or SIGHUP does).
    pub fn reload(&self, yaml: &str) {
        let loaded = match spillway::config::load_str(yaml, "test.yaml") {
            Ok(l) => l,
            Err(e) => panic!("reload config invalid:\n{e}"),
        };
        let proxy = self.proxy.as_ref().expect("proxy running");
        if let Err(e) = proxy.reload(loaded.config) {
            panic!("reload failed: {e}");
        }
    }

    pub fn take_proxy(&mut self) -> spillway::RunningProxy {
        self.proxy.take().expect("proxy running")
    }

    /// Sends a request over HTTP/1.1 (a relative URI is made absolute).
    pub async fn send(&self, req: Request<Body>) -> Response<Incoming> {
        let req = self.absolutize(req);
        self.h1
            .request(req)
            .await
            .expect("HTTP/1.1 request through proxy failed")
    }

    /// Sends a request over h2c.
    pub async fn send_h2(&self, req: Request<Body>) -> Response<Incoming> {
        let mut req = self.absolutize(req);
        *req.version_mut() = Version::HTTP_2;
        self.h2
            .request(req)
            .await
            .expect("h2c request through proxy failed")
    }

    fn absolutize(&self, mut req: Request<Body>) -> Request<Body> {
        if req.uri().authority().is_none() {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            *req.uri_mut() = self.url(pq).parse().expect("uri");
        }
        req
    }

    /// GET over HTTP/1.1.
    pub async fn get(&self, path: &str) -> Response<Incoming> {
        self.send(Request::get(path).body(empty()).expect("req"))
            .await
    }

    /// GET an admin path, returning status, headers and body text.
    pub async fn admin_get(&self, path: &str) -> (StatusCode, HeaderMap, String) {
        let req = Request::get(self.admin_url(path))
            .body(empty())
            .expect("req");
        let resp = self.h1.request(req).await.expect("admin request failed");
        let status = resp.status();
        let headers = resp.headers().clone();
        (status, headers, body_string(resp).await)
    }

    /// The /metrics text.
    pub async fn metrics_text(&self) -> String {
        let (status, _, text) = self.admin_get("/metrics").await;
        assert_eq!(status, StatusCode::OK, "/metrics status");
        text
    }

    /// Parsed /metrics.
    pub async fn metrics(&self) -> Metrics {
        Metrics::parse(&self.metrics_text().await)
    }

    /// Sum of the samples of `name` whose labels include `labels`; None if no
    /// sample matches.
    pub async fn metric_value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.metrics().await.value(name, labels)
    }
}

impl Drop for ProxyHarness {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.as_ref() {
            p.drain();
        }
    }
}

// ===========================================================================
// Prometheus text parsing
// ===========================================================================

/// One sample of the Prometheus text format.
#[derive(Clone, Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parsed Prometheus exposition text.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(parse_sample(line).unwrap_or_else(|| panic!("bad metrics line: {line}")));
        }
        Metrics {
            samples,
            text: text.to_string(),
        }
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
            .collect()
    }

    /// Sum of matching samples, None if none match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.find(name, labels);
        if found.is_empty() {
            None
        } else {
            Some(found.iter().map(|s| s.value).sum())
        }
    }

    /// Whether a `# TYPE name kind` line exists.
    pub fn has_type(&self, name: &str, kind: &str) -> bool {
        self.text
            .lines()
            .any(|l| l.trim() == format!("# TYPE {name} {kind}"))
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name_end, mut rest) = match line.find(['{', ' ']) {
        Some(i) => (i, &line[i..]),
        None => return None,
    };
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    if rest.starts_with('{') {
        let mut chars = rest[1..].char_indices();
        let mut key = String::new();
        let end;
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    end = i + 2;
                    break;
                }
                ',' | ' ' => continue,
                '=' => {
                    let (_, q) = chars.next()?;
                    if q != '"' {
                        return None;
                    }
                    let mut val = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => val.push('\n'),
                                other => val.push(other),
                            },
                            '"' => break,
                            other => val.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), val));
                }
                other => key.push(other),
            }
        }
        rest = &rest[end..];
    }
    let value_str = rest.split_whitespace().next()?;
    let value = match value_str {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

// ===========================================================================
// Raw TCP client
// ===========================================================================

/// A parsed HTTP/1.x response head read off a raw connection.
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How a raw connection ended up.
#[derive(Debug)]
pub enum RawOutcome {
    /// A response head arrived.
    Response(RawResponse),
    /// The peer closed (EOF or reset) before a complete response head.
    Closed {
        partial: Vec<u8>,
        error: Option<std::io::ErrorKind>,
    },
}

/// A raw TCP connection for hand-written HTTP/1.x.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("raw connect");
        stream.set_nodelay(true).expect("nodelay");
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Wraps a stream the test already wrote to.
    pub fn from_stream(stream: TcpStream) -> RawConn {
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes all of `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw write");
        self.stream.flush().await.expect("raw flush");
    }

    /// Writes, tolerating a peer that already closed.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Reads until a full response head, EOF or reset.
    pub async fn read_outcome(&mut self) -> RawOutcome {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                let mut lines = head.split("\r\n");
                let status_line = lines.next().unwrap_or("");
                let status = status_line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("bad status line: {status_line:?}"));
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let resp = RawResponse { status, headers };
                // Skip interim 1xx responses other than 101.
                if (100..200).contains(&status) && status != 101 {
                    continue;
                }
                return RawOutcome::Response(resp);
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk).await {
                Ok(0) => {
                    return RawOutcome::Closed {
                        partial: self.buf.clone(),
                        error: None,
                    }
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => {
                    return RawOutcome::Closed {
                        partial: self.buf.clone(),
                        error: Some(e.kind()),
                    }
                }
            }
        }
    }

    /// Reads a response head; panics if the connection closes first.
    pub async fn read_response(&mut self) -> RawResponse {
        match self.read_outcome().await {
            RawOutcome::Response(r) => r,
            RawOutcome::Closed { partial, error } => panic!(
                "connection closed before a response head ({error:?}); got {:?}",
                String::from_utf8_lossy(&partial)
            ),
        }
    }

    /// Reads the body of `resp` (Content-Length or chunked; otherwise to EOF).
    pub async fn read_body(&mut self, resp: &RawResponse) -> Vec<u8> {
        if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().expect("content-length");
            self.read_exact_buffered(len).await
        } else if resp
            .header("transfer-encoding")
            .map(|te| te.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false)
        {
            let mut body = Vec::new();
            loop {
                let line = self.read_line().await;
                let size_hex = line.split(';').next().unwrap_or("").trim().to_string();
                let size = usize::from_str_radix(&size_hex, 16).expect("chunk size");
                if size == 0 {
                    // Trailers, until an empty line.
                    while !self.read_line().await.is_empty() {}
                    return body;
                }
                body.extend(self.read_exact_buffered(size).await);
                let crlf = self.read_line().await;
                assert!(crlf.is_empty(), "chunk not followed by CRLF");
            }
        } else {
            self.read_to_end().await
        }
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn read_line(&mut self) -> String {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(self.fill().await, "connection closed mid-line");
        }
    }

    /// Reads exactly `n` bytes (buffered data first).
    pub async fn read_exact_buffered(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await,
                "connection closed after {} of {n} bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// Reads until EOF (or error).
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    /// Waits until the peer closes; true if it did (EOF or reset).
    pub async fn closed(&mut self) -> bool {
        loop {
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The underlying stream (for tunnels).
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Bytes read but not consumed yet.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ===========================================================================
// Temporary files
// ===========================================================================

/// A temporary directory removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "spillway-test-{}-{}-{}",
            tag,
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Writes `name` in the directory, returning its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// === shared by the admission and resilience tests ===

/// A gate the fake upstream's handler waits at: the test decides when requests pass.
#[derive(Clone)]
pub struct Gate(pub Arc<tokio::sync::Semaphore>);

impl Gate {
    pub fn new() -> Self {
        Gate(Arc::new(tokio::sync::Semaphore::new(0)))
    }
    /// Waits for a pass (called by the fake upstream's handler).
    pub async fn pass(&self) {
        self.0.acquire().await.expect("gate closed").forget();
    }
    /// Lets `n` held (or future) requests through.
    pub fn release(&self, n: usize) {
        self.0.add_permits(n);
    }
    /// Lets everything through from now on.
    pub fn open(&self) {
        self.0.add_permits(1 << 20);
    }
}

/// What a client saw.
#[derive(Debug)]
pub struct Seen {
    pub status: StatusCode,
    pub reason: Option<String>,
    pub retry_after: Option<String>,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub elapsed: Duration,
}

impl Seen {
    pub async fn read(resp: Response<Incoming>, began: tokio::time::Instant) -> Seen {
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = collect_body(resp.into_body()).await;
        Seen {
            status,
            reason: header_str(&headers, "x-spillway-reason").map(str::to_owned),
            retry_after: header_str(&headers, "retry-after").map(str::to_owned),
            headers,
            body,
            elapsed: began.elapsed(),
        }
    }
}

/// GET `path` on a clone of the harness' HTTP/1.1 client (usable in tasks).
pub async fn get_seen(client: HttpClient, url: String) -> Seen {
    let began = tokio::time::Instant::now();
    let req = Request::get(url).body(empty()).expect("request");
    let resp = client.request(req).await.expect("request through proxy");
    Seen::read(resp, began).await
}

/// Spawns a GET whose outcome is sent on `tx`.
pub fn spawn_get(h: &ProxyHarness, path: &str, tx: &tokio::sync::mpsc::UnboundedSender<Seen>) {
    let (client, url, tx) = (h.h1().clone(), h.url(path), tx.clone());
    tokio::spawn(async move {
        let _ = tx.send(get_seen(client, url).await);
    });
}

/// Receives one outcome, failing the test if none comes within 30 s.
pub async fn recv(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>) -> Seen {
    within(30, "a client response", rx.recv())
        .await
        .expect("client task ended without a response")
}

/// A metric's value (0 when the sample does not exist yet: counters are lazy).
pub async fn metric(h: &ProxyHarness, name: &str, labels: &[(&str, &str)]) -> f64 {
    h.metric_value(name, labels).await.unwrap_or(0.0)
}

/// The client's faults were not the upstream's: breaker closed and never
/// moved, no `upstream_*` reason, no failed upstream outcome, no retry
/// (for the upstream named `app`; shared by the blame and chaos suites).
pub async fn assert_not_blamed_on_the_upstream(h: &ProxyHarness) {
    let m = h.metrics().await;
    assert_eq!(
        m.value(
            "spillway_circuit_state",
            &[("upstream", "app"), ("state", "closed")]
        ),
        Some(1.0),
        "the breaker left closed:\n{}",
        m.text
    );
    assert_eq!(
        m.value("spillway_circuit_transitions_total", &[("upstream", "app")])
            .unwrap_or(0.0),
        0.0
    );
    for s in m.find("spillway_requests_total", &[]) {
        let reason = s.label("reason").unwrap_or("");
        assert!(
            !reason.starts_with("upstream_"),
            "a client-side fault was blamed on the upstream: {s:?}"
        );
    }
    for outcome in ["reset", "timeout", "connect_error", "5xx"] {
        assert_eq!(
            m.value(
                "spillway_upstream_requests_total",
                &[("upstream", "app"), ("outcome", outcome)]
            )
            .unwrap_or(0.0),
            0.0,
            "upstream outcome {outcome} counted:\n{}",
            m.text
        );
    }
    assert_eq!(m.value("spillway_retries_total", &[]).unwrap_or(0.0), 0.0);
}
