//! Adversarial response tests: the client driven over a scripted stream.
//! Every valid response decodes the same however its bytes are split; every
//! hostile one gives a correct response or a clean error, never a hang,
//! never a mixed response, never a connection pooled after an error.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::BodyExt;

use super::script::{Ev, Script, ScriptIo};
use super::{encode_head, exchange, Conn, Error, Pool};
use crate::proxy::request_body::UpstreamBody;

/// What one exchange produced.
#[derive(Debug, PartialEq, Eq)]
struct Got {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Option<Vec<(String, String)>>,
    /// Bytes the upstream sent after a `101` head.
    upgraded: Option<Vec<u8>>,
}

/// The request side of a case.
#[derive(Clone)]
struct Req {
    method: Method,
    headers: Vec<(&'static str, &'static str)>,
    body: Option<Bytes>,
}

fn get() -> Req {
    Req {
        method: Method::GET,
        headers: vec![("host", "up")],
        body: None,
    }
}

fn pairs(h: &HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect()
}

/// Runs one exchange over `reads`; the result, how many connections the
/// pool holds afterwards, and the script (written bytes, closed).
async fn run_with(
    reads: Vec<Ev>,
    req: Req,
    setup: impl FnOnce(&Script, usize),
) -> (Result<Got, String>, usize, Script) {
    let (script, io) = Script::new(reads);
    let pool: Arc<Pool<ScriptIo>> = Arc::new(Pool::new(8, Duration::from_secs(60)));
    let mut headers = HeaderMap::new();
    for (n, v) in &req.headers {
        headers.append(*n, HeaderValue::from_static(v));
    }
    let body = UpstreamBody::Replay(req.body.clone());
    let head = encode_head(&req.method, "/", &headers, None, &body).freeze();
    setup(&script, head.len());
    let method = req.method.clone();
    let p = pool.clone();
    let fut = async move {
        let resp = match exchange(Conn::new(io), false, head, body, &method, p).await {
            Ok(r) => r,
            Err(Error::Stale(m, ..)) => return Err(format!("stale: {m}")),
            Err(Error::Reset(m)) => return Err(format!("reset: {m}")),
            Err(Error::Body(e)) => return Err(format!("request body: {e}")),
        };
        let (parts, mut b) = resp.into_parts();
        let upgraded = b.take_upgraded().map(|u| u.read_ahead.to_vec());
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = b.frame().await {
            let frame = frame.map_err(|e| format!("body: {e}"))?;
            match frame.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        trailers = Some(pairs(&t));
                    }
                }
            }
        }
        Ok(Got {
            status: parts.status.as_u16(),
            headers: pairs(&parts.headers),
            body: data,
            trailers,
            upgraded,
        })
    };
    // Paused time: a hang reaches this timeout at once instead of blocking.
    let got = match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(r) => r,
        Err(_) => panic!("the exchange hung"),
    };
    let pooled = pool.idle_count();
    if got.is_err() {
        assert_eq!(pooled, 0, "no connection is pooled after an error");
    }
    (got, pooled, script)
}

async fn run(reads: Vec<Ev>, req: Req) -> (Result<Got, String>, usize) {
    let (got, pooled, _) = run_with(reads, req, |_, _| {}).await;
    (got, pooled)
}

fn data(b: &[u8]) -> Ev {
    Ev::Data(Bytes::copy_from_slice(b))
}

/// Reads of `raw` cut at the given offsets (empty pieces left out: an empty
/// read is the end of the stream).
fn split(raw: &[u8], cuts: &[usize], eof: bool) -> Vec<Ev> {
    let mut out = Vec::new();
    let mut from = 0;
    for &c in cuts.iter().chain(std::iter::once(&raw.len())) {
        if c > from {
            out.push(data(&raw[from..c]));
            from = c;
        }
    }
    if eof {
        out.push(Ev::Eof);
    }
    out
}

struct Case {
    name: &'static str,
    req: Req,
    raw: &'static [u8],
    /// The upstream closes after the response (close-delimited bodies).
    eof: bool,
    status: u16,
    body: &'static [u8],
    trailers: Option<Vec<(&'static str, &'static str)>>,
    reusable: bool,
}

fn corpus() -> Vec<Case> {
    let upgrade = Req {
        headers: vec![
            ("host", "up"),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
        ],
        ..get()
    };
    vec![
        Case {
            name: "content-length",
            req: get(),
            raw: b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello",
            eof: false,
            status: 200,
            body: b"hello",
            trailers: None,
            reusable: true,
        },
        Case {
            name: "chunked with extensions and trailers",
            req: get(),
            raw: b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n6;x;y=\"q\"\r\n world\r\n0;last\r\nx-t: 1\r\ngrpc-status: 0\r\n\r\n",
            eof: false,
            status: 200,
            body: b"hello world",
            trailers: Some(vec![("x-t", "1"), ("grpc-status", "0")]),
            reusable: true,
        },
        Case {
            name: "chunked without trailers",
            req: get(),
            raw: b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            eof: false,
            status: 200,
            body: b"abc",
            trailers: None,
            reusable: true,
        },
        Case {
            name: "close-delimited",
            req: get(),
            raw: b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
            eof: true,
            status: 200,
            body: b"until the end",
            trailers: None,
            reusable: false,
        },
        Case {
            name: "1xx then final",
            req: get(),
            raw: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            eof: false,
            status: 201,
            body: b"ok",
            trailers: None,
            reusable: true,
        },
        Case {
            name: "204",
            req: get(),
            raw: b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n",
            eof: false,
            status: 204,
            body: b"",
            trailers: None,
            reusable: true,
        },
        Case {
            name: "304 with a length",
            req: get(),
            raw: b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
            eof: false,
            status: 304,
            body: b"",
            trailers: None,
            reusable: true,
        },
        Case {
            name: "HEAD",
            req: Req {
                method: Method::HEAD,
                ..get()
            },
            raw: b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
            eof: false,
            status: 200,
            body: b"",
            trailers: None,
            reusable: true,
        },
        Case {
            name: "101 for an upgrade request",
            req: upgrade,
            raw: b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            eof: false,
            status: 101,
            body: b"",
            trailers: None,
            reusable: false,
        },
    ]
}

fn check(case: &Case, what: &str, got: Result<Got, String>, pooled: usize) -> Got {
    let got = match got {
        Ok(g) => g,
        Err(e) => panic!("{} ({what}): {e}", case.name),
    };
    assert_eq!(got.status, case.status, "{} ({what})", case.name);
    assert_eq!(got.body, case.body, "{} ({what})", case.name);
    let want_trailers = case.trailers.as_ref().map(|t| {
        t.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    });
    assert_eq!(got.trailers, want_trailers, "{} ({what})", case.name);
    assert_eq!(
        got.upgraded.is_some(),
        case.status == 101,
        "{} ({what})",
        case.name
    );
    assert_eq!(pooled, usize::from(case.reusable), "{} ({what})", case.name);
    got
}

#[tokio::test(start_paused = true)]
async fn valid_responses_decode_the_same_however_they_are_split() {
    for case in corpus() {
        let (got, pooled) = run(split(case.raw, &[], case.eof), case.req.clone()).await;
        let whole = check(&case, "whole", got, pooled);
        for at in 1..case.raw.len() {
            let (got, pooled) = run(split(case.raw, &[at], case.eof), case.req.clone()).await;
            let got = check(&case, &format!("split at {at}"), got, pooled);
            assert_eq!(got, whole, "{} split at {at}", case.name);
        }
        // One byte per read, with a spurious wake-up between reads.
        let mut reads = Vec::new();
        for b in case.raw {
            reads.push(data(&[*b]));
            reads.push(Ev::Pending);
        }
        if case.eof {
            reads.push(Ev::Eof);
        }
        let (got, pooled) = run(reads, case.req.clone()).await;
        let got = check(&case, "byte by byte", got, pooled);
        assert_eq!(got, whole, "{} byte by byte", case.name);
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_shorter_than_its_content_length_is_an_error() {
    let (got, _) = run(
        split(
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
            &[],
            true,
        ),
        get(),
    )
    .await;
    assert!(got.unwrap_err().contains("before the end of the body"));
}

#[tokio::test(start_paused = true)]
async fn bytes_after_the_body_make_the_connection_single_use() {
    // In the same read as the body.
    let (got, pooled) = run(
        split(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",
            &[],
            false,
        ),
        get(),
    )
    .await;
    assert_eq!(got.unwrap().body, b"ok");
    assert_eq!(pooled, 0);
    // A second response for the one request.
    let two = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\naHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb";
    let (got, pooled) = run(split(two, &[], false), get()).await;
    assert_eq!(got.unwrap().body, b"a", "the first response, not a mix");
    assert_eq!(pooled, 0);
}

#[tokio::test(start_paused = true)]
async fn stray_bytes_arriving_after_checkin_keep_the_connection_out_of_use() {
    let (script, io) = Script::new(split(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        &[],
        false,
    ));
    let pool: Arc<Pool<ScriptIo>> = Arc::new(Pool::new(8, Duration::from_secs(60)));
    let head = encode_head(
        &Method::GET,
        "/",
        &HeaderMap::new(),
        None,
        &UpstreamBody::Empty,
    );
    let resp = exchange(
        Conn::new(io),
        false,
        head.freeze(),
        UpstreamBody::Empty,
        &Method::GET,
        pool.clone(),
    )
    .await
    .map_err(|_| "exchange failed")
    .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    assert_eq!(pool.idle_count(), 1);
    script.push(data(b"HTTP/1.1 200 OK\r\n\r\nunasked"));
    assert!(
        pool.checkout().is_none(),
        "a connection with stray bytes is not handed out"
    );
    assert!(script.closed());
}

#[tokio::test(start_paused = true)]
async fn bad_chunk_sizes_are_errors() {
    for size in ["zz", "10000000000000000", "-1", "", " 5"] {
        let raw = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n"
        );
        let (got, _) = run(split(raw.as_bytes(), &[], false), get()).await;
        assert!(got.is_err(), "chunk size {size:?}: {got:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn oversized_heads_are_errors() {
    let mut raw = b"HTTP/1.1 200 OK\r\nx-filler: ".to_vec();
    raw.resize(super::MAX_HEAD + 2, b'a');
    // Never terminated: the limit, not the end of the head, must stop it.
    let (got, _) = run(vec![Ev::Data(raw.into())], get()).await;
    assert!(got.unwrap_err().contains("too large"));
    // Regression: a complete head over the limit that arrives in one read
    // used to pass (the bound was only checked while the head was partial).
    let mut raw = b"HTTP/1.1 200 OK\r\nx-filler: ".to_vec();
    raw.resize(super::MAX_HEAD + 100, b'a');
    raw.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
    let (got, _) = run(vec![Ev::Data(raw.into())], get()).await;
    assert!(got.unwrap_err().contains("too large"));
    let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..super::MAX_HEADERS + 1 {
        raw.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    raw.extend_from_slice(b"content-length: 0\r\n\r\n");
    let (got, _) = run(vec![Ev::Data(raw.into())], get()).await;
    assert!(got.is_err(), "too many headers: {got:?}");
}

#[tokio::test(start_paused = true)]
async fn a_close_or_an_error_mid_head_is_a_reset() {
    let (got, _) = run(split(b"HTTP/1.1 200 OK\r\ncontent-le", &[], true), get()).await;
    assert!(got.unwrap_err().contains("in the response head"));
    let (got, _) = run(
        vec![
            data(b"HTTP/1.1 200 OK\r\n"),
            Ev::Err(std::io::ErrorKind::ConnectionReset),
        ],
        get(),
    )
    .await;
    assert!(got.unwrap_err().starts_with("reset"));
    let (got, _) = run(
        vec![
            data(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc"),
            Ev::Err(std::io::ErrorKind::ConnectionReset),
        ],
        get(),
    )
    .await;
    assert!(got.unwrap_err().starts_with("body"));
}

#[tokio::test(start_paused = true)]
async fn a_response_before_the_request_body_is_sent_is_passed_on_and_not_reused() {
    let req = Req {
        method: Method::POST,
        headers: vec![("host", "up")],
        body: Some(Bytes::from(vec![b'x'; 64 * 1024])),
    };
    // The upstream takes the head, never the body, and answers.
    let (got, pooled, script) = run_with(
        split(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!",
            &[],
            false,
        ),
        req,
        |s, head_len| s.limit_writes(head_len + 10),
    )
    .await;
    let got = got.unwrap();
    assert_eq!((got.status, &got.body[..]), (413, &b"big!"[..]));
    assert_eq!(pooled, 0, "the request body was not finished");
    assert!(script.written().starts_with(b"POST / HTTP/1.1\r\n"));
    assert!(script.closed());
}

#[tokio::test(start_paused = true)]
async fn a_101_to_a_request_that_did_not_ask_to_upgrade_is_a_reset() {
    let (got, _, script) = run_with(
        split(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            &[],
            false,
        ),
        get(),
        |_, _| {},
    )
    .await;
    assert!(
        got.unwrap_err().starts_with("reset"),
        "no tunnel was asked for"
    );
    assert!(script.closed());
}

#[tokio::test(start_paused = true)]
async fn informational_responses_are_bounded() {
    let final_head: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    let with = |n: usize| {
        let mut raw = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(n);
        raw.extend_from_slice(final_head);
        vec![Ev::Data(raw.into())]
    };
    let (got, _) = run(with(super::MAX_INFORMATIONAL), get()).await;
    assert_eq!(got.unwrap().status, 200);
    let (got, _) = run(with(super::MAX_INFORMATIONAL + 1), get()).await;
    assert!(got.unwrap_err().contains("informational"));
    // Endless ones, never a final response: an error, not a wait for the timeout.
    let (got, _) = run(with(1000), get()).await;
    assert!(got.is_err());
}

#[tokio::test(start_paused = true)]
async fn chunk_extensions_have_a_total_budget() {
    let ext = "a".repeat(3000);
    let mut raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    let chunks = super::MAX_CHUNK_EXTENSIONS / 3000 + 1;
    for _ in 0..chunks {
        raw.extend_from_slice(format!("1;{ext}\r\nx\r\n").as_bytes());
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let (got, _) = run(vec![Ev::Data(raw.into())], get()).await;
    assert!(
        got.unwrap_err().contains("extensions"),
        "each line fits, the total does not"
    );
    // Within the budget: fine.
    let raw =
        format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1;{ext}\r\nx\r\n0\r\n\r\n");
    let (got, _) = run(vec![data(raw.as_bytes())], get()).await;
    assert_eq!(got.unwrap().body, b"x");
}

#[tokio::test(start_paused = true)]
async fn only_whitespace_then_an_extension_may_follow_a_chunk_size() {
    for size in ["5 x", "5\tx", "5 ;x"] {
        let raw = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n"
        );
        let (got, _) = run(split(raw.as_bytes(), &[], false), get()).await;
        match size {
            "5 ;x" => assert_eq!(got.unwrap().body, b"hello"),
            _ => assert!(got.is_err(), "chunk size {size:?}: {got:?}"),
        }
    }
}
