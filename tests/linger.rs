//! Lingering close: an early local reply (413, 431) reaches a client that is
//! still sending, and the lingering that makes it possible is bounded.
//!
//! Real sockets on 127.0.0.1; each client writes from a spawned task while
//! the test task reads, as real uploaders do.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Reads the whole request body before answering.
async fn consume_then_ok(req: Request<hyper::body::Incoming>) -> HandlerResult {
    match req.into_body().collect().await {
        Ok(b) => Ok(reply::status_body(200, b.to_bytes().len().to_string())),
        Err(_) => Err(Reset),
    }
}

/// A proxy whose one route has `max_request_body: 64KiB`, plus `listener` lines.
async fn proxy(fake: &FakeUpstream, listener: &str) -> ProxyHarness {
    let yaml = yaml_with(
        listener,
        &upstream_yaml("app", fake.addr(), ""),
        &route_yaml(
            "all",
            "      path_prefix: /",
            "app",
            "    max_request_body: 64KiB",
        ),
    );
    ProxyHarness::start(&yaml).await
}

/// A parsed response head plus its body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads to EOF (a reset counts as the end too) and parses the first response
/// in what arrived; panics, showing the bytes, if it is not complete.
async fn read_reply(rd: OwnedReadHalf) -> Reply {
    let (got, end) = read_all(rd).await;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(&got) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "no complete response before the connection ended ({end}): {other:?}, {} bytes: {:?}",
            got.len(),
            String::from_utf8_lossy(&got)
        ),
    };
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let status = resp.code.expect("status");
    let mut reply = Reply {
        status,
        headers,
        body: Vec::new(),
    };
    let len: usize = reply
        .header("content-length")
        .expect("early replies have a content-length")
        .parse()
        .expect("content-length");
    let body = &got[head_len..];
    assert!(
        body.len() >= len,
        "body cut short ({end}): {} of {len} bytes",
        body.len()
    );
    reply.body = body[..len].to_vec();
    reply
}

/// Everything that arrives until EOF or a reset, and which of the two it was.
async fn read_all(mut rd: OwnedReadHalf) -> (Vec<u8>, String) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * KIB];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) => return (got, "EOF".to_string()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, format!("error: {e}")),
        }
    }
}

/// One chunk of `len` bytes in chunked framing.
fn chunk(len: usize) -> Vec<u8> {
    let mut c = format!("{len:x}\r\n").into_bytes();
    c.extend(std::iter::repeat_n(b'u', len));
    c.extend_from_slice(b"\r\n");
    c
}

/// Writes `head`, then `body` repeatedly until `total` bytes of it were sent
/// (`usize::MAX`: until a write fails). Returns the write half (kept open:
/// the client does not close on its own) and how the writing ended.
fn spawn_writer(
    mut wr: OwnedWriteHalf,
    head: Vec<u8>,
    body: Vec<u8>,
    total: usize,
    gap: Duration,
) -> JoinHandle<(OwnedWriteHalf, std::io::Result<usize>)> {
    tokio::spawn(async move {
        let res = async {
            wr.write_all(&head).await?;
            let mut sent = 0;
            while sent < total {
                wr.write_all(&body).await?;
                sent += body.len();
                if !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
            }
            Ok(sent)
        }
        .await;
        (wr, res)
    })
}

async fn connect(addr: SocketAddr) -> (OwnedReadHalf, OwnedWriteHalf) {
    TcpStream::connect(addr)
        .await
        .expect("connect to the proxy")
        .into_split()
}

fn assert_413(reply: &Reply) {
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(reply.header("x-spillway-reason"), Some("body_too_large"));
    assert_eq!(reply.body, b"request body too large");
}

/// Waits until the listener has no open client connection.
async fn no_connections(h: &ProxyHarness) {
    loop {
        let open = h
            .metric_value("spillway_connections", &[("listener", "inbound")])
            .await;
        if open == Some(0.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_upload_past_the_limit_reads_its_413() {
    within(120, "test", async {
        let fake = FakeUpstream::with_handler(|req, _| consume_then_ok(req)).await;
        let h = proxy(&fake, "").await;
        // Repeated: without lingering the reply loses the race to the reset
        // most of the time, but not every time.
        for round in 0..20 {
            let (rd, wr) = connect(h.addr()).await;
            let head =
                b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                    .to_vec();
            let writer = spawn_writer(wr, head, chunk(64 * KIB), 4 * MIB, Duration::ZERO);
            let reply = within(15, "the 413", read_reply(rd)).await;
            assert_413(&reply);
            let (_wr, sent) = within(15, "the writer", writer).await.expect("writer task");
            // The proxy read and discarded the rest of the upload.
            let sent = sent.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert!(sent >= 4 * MIB, "round {round}: {sent}");
        }
        within(15, "connections to close", no_connections(&h)).await;
        fake.assert_healthy();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_oversized_upload_sent_anyway_reads_its_413() {
    within(120, "test", async {
        let fake = FakeUpstream::with_handler(|req, _| consume_then_ok(req)).await;
        let h = proxy(&fake, "").await;
        for round in 0..20 {
            let (rd, wr) = connect(h.addr()).await;
            let head = format!(
                "POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\n\r\n",
                3 * MIB
            )
            .into_bytes();
            // Paced, so the upload is still under way when the reply is sent
            // (all at once it could sit in the socket buffers by then).
            let pace = Duration::from_millis(1);
            let writer = spawn_writer(wr, head, vec![b'u'; 64 * KIB], 3 * MIB, pace);
            let reply = within(15, "the 413", read_reply(rd)).await;
            assert_413(&reply);
            let (_wr, sent) = within(15, "the writer", writer).await.expect("writer task");
            assert_eq!(sent.ok(), Some(3 * MIB), "round {round}");
        }
        assert_eq!(fake.hits(), 0, "an oversized request is not forwarded");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_followed_by_more_bytes_reads_its_431() {
    within(120, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = proxy(&fake, "    max_header_bytes: 16KiB").await;
        for round in 0..20 {
            let (rd, wr) = connect(h.addr()).await;
            let huge = "b".repeat(20 * KIB);
            let head =
                format!("GET /big HTTP/1.1\r\nHost: app.test\r\nX-Huge: {huge}\r\n").into_bytes();
            // The head never ends: more header lines keep coming.
            let more = format!("X-More: {}\r\n", "c".repeat(1000)).into_bytes();
            let writer = spawn_writer(wr, head, more, MIB, Duration::ZERO);
            let reply = within(15, "the 431", read_reply(rd)).await;
            assert_eq!(reply.status, 431, "round {round}: {reply:?}");
            let (_wr, sent) = within(15, "the writer", writer).await.expect("writer task");
            assert!(sent.is_ok(), "round {round}: {sent:?}");
        }
        assert_eq!(fake.hits(), 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_stops_sending_is_closed_within_the_bounds() {
    within(120, "test", async {
        let fake = FakeUpstream::with_handler(|req, _| consume_then_ok(req)).await;
        let h = proxy(&fake, "").await;
        let head = b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n";

        // As fast as it can: the size bound ends it. (Whether the 413 is
        // still read depends on how quickly the client reads it: the reset
        // that follows the bound discards it from the client's buffer.)
        let (rd, wr) = connect(h.addr()).await;
        let start = Instant::now();
        let writer = spawn_writer(
            wr,
            head.to_vec(),
            chunk(64 * KIB),
            usize::MAX,
            Duration::ZERO,
        );
        within(15, "the connection to end", read_all(rd)).await;
        let (_wr, sent) = within(15, "the flooding writer to fail", writer)
            .await
            .expect("writer task");
        assert!(sent.is_err(), "{sent:?}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );

        // A trickle that never pauses long enough for the quiet gap: the
        // total bound ends it.
        let (rd, wr) = connect(h.addr()).await;
        let start = Instant::now();
        let mut first = head.to_vec();
        first.extend(chunk(80 * KIB));
        let writer = spawn_writer(
            wr,
            first,
            chunk(100),
            usize::MAX,
            Duration::from_millis(100),
        );
        let reply = within(15, "the 413", read_reply(rd)).await;
        assert_413(&reply);
        let (_wr, sent) = within(15, "the trickling writer to fail", writer)
            .await
            .expect("writer task");
        assert!(sent.is_err(), "{sent:?}");
        let took = start.elapsed();
        assert!(took < Duration::from_secs(10), "{took:?}");
        // It did linger: the client kept writing past the reply for a while.
        assert!(took >= Duration::from_millis(1500), "{took:?}");
        within(15, "connections to close", no_connections(&h)).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_after_an_early_reply_is_closed_after_the_quiet_gap() {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|req, _| consume_then_ok(req)).await;
        let h = proxy(&fake, "").await;
        // Only the head: the declared body is never sent, and the client
        // keeps its side open.
        let (rd, mut wr) = connect(h.addr()).await;
        wr.write_all(
            format!(
                "POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\n\r\n",
                MIB
            )
            .as_bytes(),
        )
        .await
        .expect("write head");
        let reply = within(15, "the 413", read_reply(rd)).await;
        let replied = Instant::now();
        assert_413(&reply);
        within(15, "the silent connection to close", no_connections(&h)).await;
        let took = replied.elapsed();
        // Bounded by the 1 s quiet gap (not by the client, which never closes).
        assert!(took < Duration::from_secs(10), "{took:?}");
        drop(wr);

        // A client that closes at once after reading the reply: no waiting.
        let (rd, mut wr) = connect(h.addr()).await;
        wr.write_all(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1048576\r\n\r\n")
            .await
            .expect("write head");
        let reply = within(15, "the 413", read_reply(rd)).await;
        assert_413(&reply);
        drop(wr);
        within(15, "the closed connection to go", no_connections(&h)).await;

        // Ordinary keep-alive traffic is unaffected.
        let resp = h
            .send(
                Request::post("/upload")
                    .body(full(vec![7u8; 1000]))
                    .unwrap(),
            )
            .await;
        assert_eq!(resp.status(), http::StatusCode::OK);
        assert_eq!(&collect_body(resp.into_body()).await[..], b"1000");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_still_arriving_reads_its_408() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = proxy(&fake, "    request_header_timeout: 300ms").await;
        for round in 0..3 {
            let (rd, wr) = connect(h.addr()).await;
            let head = b"GET /slow HTTP/1.1\r\nHost: app.test\r\n".to_vec();
            // A header line every 50 ms for 1 s: the head is not complete
            // at 300 ms, and the client is still writing when the 408 goes out.
            let line = b"X-Slow: still coming\r\n".to_vec();
            let writer = spawn_writer(
                wr,
                head,
                line.clone(),
                20 * line.len(),
                Duration::from_millis(50),
            );
            let reply = within(15, "the 408", read_reply(rd)).await;
            assert_eq!(reply.status, 408, "round {round}: {reply:?}");
            let (_wr, sent) = within(15, "the writer", writer).await.expect("writer task");
            assert!(sent.is_ok(), "round {round}: {sent:?}");
        }
        assert_eq!(fake.hits(), 0);
    })
    .await
}
