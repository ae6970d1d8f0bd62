//! Protocol detection on an `auto` listener: the first bytes of a
//! connection decide between HTTP/1.1 and h2c prior knowledge, however the
//! client's bytes are split into reads.

mod support;

use std::time::Duration;

use http::{Request, StatusCode, Version};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The HTTP/2 client preface, 24 bytes.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Writes `bytes[..split]`, lets the proxy read it on its own, then the rest.
async fn send_split(tcp: &mut TcpStream, bytes: &[u8], split: usize) {
    tcp.write_all(&bytes[..split]).await.expect("write head");
    tcp.flush().await.expect("flush");
    // Not a wait for a result: it only makes it very likely that the proxy
    // reads the first part alone. The assertions hold either way.
    tokio::time::sleep(Duration::from_millis(5)).await;
    tcp.write_all(&bytes[split..]).await.expect("write rest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_split_anywhere_in_the_first_24_bytes_is_http1() {
    within(120, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = one_route_proxy(&fake, "").await;
        // Starts like the preface for 4 bytes, so detection must read on.
        let req = b"PRIX / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";
        let plain = b"GET /a HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";
        for bytes in [&req[..], &plain[..]] {
            for split in 1..=24 {
                let mut tcp = TcpStream::connect(h.addr()).await.expect("connect");
                tcp.set_nodelay(true).expect("nodelay");
                send_split(&mut tcp, bytes, split).await;
                let mut out = Vec::new();
                tcp.read_to_end(&mut out).await.expect("read");
                let head = String::from_utf8_lossy(&out);
                assert!(
                    head.starts_with("HTTP/1.1 "),
                    "split at {split}: not an HTTP/1.1 answer: {head:?}"
                );
            }
        }
        // `PRIX` is an unknown method: answered (400 or proxied), never
        // taken for HTTP/2; the GETs reached the upstream.
        assert!(fake.hits() >= 24, "hits {}", fake.hits());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_preface_split_anywhere_is_h2c() {
    within(120, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = one_route_proxy(&fake, "").await;
        for split in 1..PREFACE.len() {
            let mut tcp = TcpStream::connect(h.addr()).await.expect("connect");
            tcp.set_nodelay(true).expect("nodelay");
            send_split(&mut tcp, PREFACE, split).await;
            // The client sent the preface by hand; hyper's handshake sends
            // it again, which a server would reject, so continue with a raw
            // SETTINGS frame and read the server's SETTINGS back instead.
            tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
                .await
                .expect("settings");
            let mut frame = [0u8; 9];
            tcp.read_exact(&mut frame)
                .await
                .unwrap_or_else(|e| panic!("split at {split}: no HTTP/2 frame back: {e}"));
            assert_eq!(frame[3], 4, "split at {split}: first frame is SETTINGS");
        }
        // And a whole exchange on one connection, preface in single bytes.
        let (mut sender, driver) = h2c_one_byte_preface(&h).await;
        let resp = sender
            .send_request(h2_get("/x"))
            .await
            .expect("h2c request");
        assert_eq!(resp.status(), StatusCode::OK);
        drop(sender);
        let _ = driver.await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_a_split_preface_outlives_the_header_timeout() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = one_route_proxy(&fake, "    request_header_timeout: 300ms").await;
        let (mut sender, driver) = h2c_one_byte_preface(&h).await;
        let resp = sender.send_request(h2_get("/a")).await.expect("first");
        assert_eq!(resp.status(), StatusCode::OK);
        // Idle past the header timeout: an h2c connection has no head to time.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let resp = sender
            .send_request(h2_get("/b"))
            .await
            .expect("idle h2c connection was closed");
        assert_eq!(resp.status(), StatusCode::OK);
        drop(sender);
        let _ = driver.await;
    })
    .await
}

/// An h2c connection to the proxy whose preface goes out one byte per write.
async fn h2c_one_byte_preface(
    h: &ProxyHarness,
) -> (
    hyper::client::conn::http2::SendRequest<Body>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = TcpStream::connect(h.addr()).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let io = hyper_util::rt::TokioIo::new(OneByteWrites::new(tcp, PREFACE.len()));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("h2c handshake");
    (sender, tokio::spawn(conn))
}

fn h2_get(path: &str) -> Request<Body> {
    Request::get(format!("http://app.test{path}"))
        .version(Version::HTTP_2)
        .body(empty())
        .expect("req")
}

/// Writes the first `n` bytes one per `poll_write`, each flushed.
struct OneByteWrites {
    inner: TcpStream,
    left: usize,
}

impl OneByteWrites {
    fn new(inner: TcpStream, n: usize) -> Self {
        OneByteWrites { inner, left: n }
    }
}

impl tokio::io::AsyncRead for OneByteWrites {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for OneByteWrites {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = if self.left > 0 {
            1.min(buf.len())
        } else {
            buf.len()
        };
        let res = std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if let std::task::Poll::Ready(Ok(w)) = &res {
            self.left = self.left.saturating_sub(*w);
        }
        res
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
