use super::*;

use std::convert::Infallible;

use http_body_util::{Empty, Full, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn take(bytes: &[u8]) -> (Step, BytesMut) {
    let mut buf = BytesMut::from(bytes);
    let step = take_request(&mut buf);
    (step, buf)
}

fn request(bytes: &[u8]) -> (Request<Option<hyper::body::Incoming>>, Head, BytesMut) {
    match take(bytes) {
        (Step::Request(r, h), rest) => (r, h, rest),
        (other, _) => panic!(
            "expected a request from {:?}, got {other:?}",
            String::from_utf8_lossy(bytes)
        ),
    }
}

const GET: &[u8] =
    b"GET /a/b?c=d HTTP/1.1\r\nHost: svc\r\nAccept: */*\r\nX-Two: 1\r\nx-two: 2\r\n\r\n";

#[test]
fn a_plain_get_is_taken_with_its_target_and_headers() {
    let (req, head, rest) = request(GET);
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri(), "/a/b?c=d");
    assert_eq!(req.version(), Version::HTTP_11);
    assert_eq!(req.headers()["host"], "svc");
    assert_eq!(req.headers()["accept"], "*/*");
    let two: Vec<_> = req.headers().get_all("x-two").iter().collect();
    assert_eq!(two, ["1", "2"]);
    assert_eq!(
        head,
        Head {
            close: false,
            head_method: false
        }
    );
    assert!(rest.is_empty());
}

#[test]
fn a_head_split_at_every_byte_is_partial_until_whole_then_the_same() {
    let (whole, _, _) = request(GET);
    for cut in 0..GET.len() {
        let mut buf = BytesMut::from(&GET[..cut]);
        if cut > 0 {
            assert!(
                matches!(take_request(&mut buf), Step::Partial),
                "cut at {cut}"
            );
            assert_eq!(&buf[..], &GET[..cut], "a partial head is left in place");
        }
        buf.extend_from_slice(&GET[cut..]);
        let Step::Request(req, _) = take_request(&mut buf) else {
            panic!("cut at {cut}: not taken once whole");
        };
        assert_eq!(req.uri(), whole.uri());
        assert_eq!(req.headers(), whole.headers());
        assert!(buf.is_empty());
    }
}

#[test]
fn pipelined_heads_are_taken_one_at_a_time() {
    let two = [GET, b"HEAD /x HTTP/1.1\r\nconnection: close\r\n\r\n"].concat();
    let mut buf = BytesMut::from(&two[..]);
    let Step::Request(first, _) = take_request(&mut buf) else {
        panic!("first head not taken");
    };
    assert_eq!(first.uri(), "/a/b?c=d");
    assert_eq!(buf.len(), two.len() - GET.len());
    let Step::Request(second, head) = take_request(&mut buf) else {
        panic!("second head not taken");
    };
    assert_eq!(second.method(), Method::HEAD);
    assert_eq!(
        head,
        Head {
            close: true,
            head_method: true
        }
    );
    assert!(buf.is_empty());
}

#[test]
fn connection_keep_alive_and_close_are_understood() {
    let (_, h, _) = request(b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n");
    assert!(!h.close);
    let (_, h, _) = request(b"GET / HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n\r\n");
    assert!(h.close);
    let (_, h, _) =
        request(b"GET / HTTP/1.1\r\nconnection: keep-alive\r\nconnection: close\r\n\r\n");
    assert!(h.close);
}

#[test]
fn anything_but_a_plain_head_goes_to_hyper_untouched() {
    let declined: &[&[u8]] = &[
        // Body framing, interim answers, protocol changes.
        b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nTE: trailers\r\n\r\n",
        b"GET / HTTP/1.1\r\nTrailer: x\r\n\r\n",
        // Connection naming other headers (hop-by-hop lists).
        b"GET / HTTP/1.1\r\nConnection: x-secret\r\n\r\n",
        // Other versions and request-target forms.
        b"GET / HTTP/1.0\r\n\r\n",
        b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n",
        b"GET http://svc/ HTTP/1.1\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\n\r\n",
        // What httparse rejects: hyper answers 400.
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n\r\n",
        b"\r\n\r\nGET / HTTP/1.2\r\n\r\n",
    ];
    for &bytes in declined {
        let (step, rest) = take(bytes);
        assert!(
            matches!(step, Step::Decline),
            "{:?}: {step:?}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(&rest[..], bytes, "declined bytes are left as they were");
    }
}

#[test]
fn more_headers_than_the_limit_go_to_hyper() {
    let mut head = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..MAX_HEADERS {
        head.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    assert!(
        matches!(take(&head).0, Step::Request(..)),
        "{MAX_HEADERS} headers are fine"
    );
    let more = [&head[..head.len() - 2], b"x-last: v\r\n\r\n"].concat();
    assert!(matches!(take(&more).0, Step::Decline));
}

// === response heads, compared with hyper's ===

/// The head hyper writes for `resp`, answering `req` on a connection that
/// stays open, with the `date` line taken out.
async fn hyper_head<B>(req: &'static [u8], resp: Response<B>) -> String
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let resp = parking_lot::Mutex::new(Some(resp));
    let svc = hyper::service::service_fn(move |_req| {
        let r = resp.lock().take();
        async move { r.ok_or("answered twice") }
    });
    let conn = tokio::spawn(
        hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(server), svc),
    );
    client.write_all(req).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "hyper closed before a whole head: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
    drop(client);
    let _ = conn.await;
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    without_date(&got[..end])
}

fn without_date(head: &[u8]) -> String {
    String::from_utf8_lossy(head)
        .split_inclusive("\r\n")
        .filter(|l| !l.starts_with("date: "))
        .collect()
}

fn ours<B: Body>(resp: &Response<B>, head_method: bool, last: bool) -> (String, Framing, bool) {
    let mut dst = BytesMut::new();
    let (framing, last) = encode_head(
        &mut dst,
        resp.status(),
        resp.headers(),
        body_length(resp.body()),
        head_method,
        last,
    )
    .expect("framed");
    (without_date(&dst), framing, last)
}

fn full(s: &'static str) -> Full<Bytes> {
    Full::new(Bytes::from_static(s.as_bytes()))
}

type Streamed = StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
>;

fn streamed() -> Streamed {
    StreamBody::new(futures_util::stream::iter(vec![Ok(
        http_body::Frame::data(Bytes::from_static(b"x")),
    )]))
}

fn with<B>(status: u16, headers: &[(&'static str, &'static str)], body: B) -> Response<B> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().append(*k, HeaderValue::from_static(v));
    }
    r
}

const GET_REQ: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
const HEAD_REQ: &[u8] = b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\n";

#[tokio::test]
async fn response_heads_are_framed_as_hyper_frames_them() {
    macro_rules! same {
        ($req:expr, $head:expr, $mk:expr, $framing:expr) => {{
            let expected = hyper_head($req, $mk).await;
            let (got, framing, last) = ours(&$mk, $head, false);
            assert_eq!(got, expected, "{}", stringify!($mk));
            assert_eq!(framing, $framing, "{}", stringify!($mk));
            assert!(!last);
        }};
    }
    same!(
        GET_REQ,
        false,
        with(200, &[("content-length", "2")], full("ok")),
        Framing::Length(2)
    );
    same!(
        GET_REQ,
        false,
        with(200, &[("x-a", "1"), ("x-a", "2")], full("ok")),
        Framing::Length(2)
    );
    same!(
        GET_REQ,
        false,
        with(404, &[("content-type", "text/plain")], full("nope")),
        Framing::Length(4)
    );
    same!(
        GET_REQ,
        false,
        with(200, &[], Empty::<Bytes>::new()),
        Framing::Length(0)
    );
    same!(
        GET_REQ,
        false,
        with(200, &[("content-length", "0")], Empty::<Bytes>::new()),
        Framing::Length(0)
    );
    same!(GET_REQ, false, with(200, &[], streamed()), Framing::Chunked);
    same!(
        GET_REQ,
        false,
        with(200, &[("content-length", "1")], streamed()),
        Framing::Length(1)
    );
    same!(
        GET_REQ,
        false,
        with(204, &[], Empty::<Bytes>::new()),
        Framing::Length(0)
    );
    same!(
        GET_REQ,
        false,
        with(304, &[("etag", "\"x\"")], Empty::<Bytes>::new()),
        Framing::Length(0)
    );
    same!(
        GET_REQ,
        false,
        with(503, &[("retry-after", "1")], full("busy")),
        Framing::Length(4)
    );
    same!(
        GET_REQ,
        false,
        with(299, &[], full("odd")),
        Framing::Length(3)
    );
    same!(
        HEAD_REQ,
        true,
        with(200, &[("content-length", "10")], Empty::<Bytes>::new()),
        Framing::Length(0)
    );
    same!(
        HEAD_REQ,
        true,
        with(200, &[], Empty::<Bytes>::new()),
        Framing::Length(0)
    );
    same!(
        GET_REQ,
        false,
        with(
            200,
            &[("date", "Tue, 01 Dec 2026 00:00:00 GMT")],
            full("ok")
        ),
        Framing::Length(2)
    );
}

#[tokio::test]
async fn a_closing_connection_says_so() {
    let (head, _, last) = ours(&with(200, &[], full("ok")), false, true);
    assert!(last);
    let expected = hyper_head(
        b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        with(200, &[], full("ok")),
    )
    .await;
    assert_eq!(head, expected);
    // The response's own `Connection: close` closes too.
    let (head, _, last) = ours(
        &with(200, &[("connection", "close")], full("ok")),
        false,
        false,
    );
    assert!(last);
    assert_eq!(head.matches("connection").count(), 1, "{head}");
}

#[test]
fn unframeable_responses_are_refused_and_1xx_become_500() {
    let mut dst = BytesMut::new();
    let conflicting = with(
        200,
        &[("content-length", "1"), ("content-length", "2")],
        streamed(),
    );
    assert!(encode_head(
        &mut dst,
        conflicting.status(),
        conflicting.headers(),
        Some(None),
        false,
        false
    )
    .is_err());
    assert!(dst.is_empty(), "nothing half-written");
    let bad = with(200, &[("content-length", "x")], streamed());
    assert!(encode_head(
        &mut dst,
        bad.status(),
        bad.headers(),
        Some(None),
        false,
        false
    )
    .is_err());
    let (head, framing, last) = ours(&with(103, &[("link", "</a>")], full("x")), false, false);
    assert!(
        head.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
        "{head}"
    );
    assert!(!head.contains("link"), "{head}");
    assert_eq!(framing, Framing::Length(0));
    assert!(last);
}

#[test]
fn the_date_is_a_valid_http_date() {
    let mut dst = BytesMut::new();
    put_date(&mut dst);
    let s = std::str::from_utf8(&dst).unwrap();
    let parsed = httpdate::parse_http_date(s).expect("an HTTP date");
    let age = SystemTime::now().duration_since(parsed).unwrap_or_default();
    assert!(age < Duration::from_secs(5), "{s}");
}

#[tokio::test]
async fn the_two_part_write_sends_both_in_order() {
    let (mut a, mut b) = tokio::io::duplex(7);
    let big = Bytes::from(vec![b'x'; 100]);
    let writer = tokio::spawn(async move {
        write_two(&mut a, b"head:", big).await.unwrap();
    });
    let mut got = Vec::new();
    let mut chunk = [0u8; 16];
    while got.len() < 105 {
        let n = b.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
    }
    writer.await.unwrap();
    assert_eq!(&got[..5], b"head:");
    assert!(got[5..].iter().all(|&c| c == b'x'));
}
