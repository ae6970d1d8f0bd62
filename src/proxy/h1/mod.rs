//! Spillway's own HTTP/1.1 upstream client, driven inside the task that
//! serves the client's request.
//!
//! hyper-util's pooled client runs every upstream connection as a task of its
//! own and talks to it through channels: each request costs a pool checkout
//! keyed by a hashed URI, a channel hop to the connection task, a oneshot back
//! and a spawned task that waits to return the connection to the pool. Here a
//! request *owns* its upstream connection from checkout to the last byte of
//! the response: the head is written, the response head is read, and the
//! response body ([`H1Body`]) reads and decodes straight from the socket when
//! the client's connection polls it. The request body, when one streams, is
//! written from the same polls (full duplex, one task). When the exchange
//! ends cleanly the connection goes back to its endpoint's [`Pool`].
//!
//! Framing follows RFC 9112 §6: `Transfer-Encoding: chunked` (trailers
//! included) and `Content-Length` (conflicting values are an error), else
//! the body runs to the end of the connection; no body for `HEAD`, 1xx,
//! 204 and 304. A response carrying both framing headers, `Connection:
//! close`, HTTP/1.0, an unfinished request body or stray bytes after the
//! body make the connection single-use. Response heads are bounded
//! ([`MAX_HEAD`]), like chunk-size lines and trailer sections.
//!
//! Buffering is bounded: one read buffer per exchange, refilled only when
//! the client's side asks for more.

mod conn;
mod decode;
mod encode;
/// The client over an in-memory stream, for the fuzz targets.
pub(crate) mod fuzz;
mod pool;

pub(crate) use conn::{exchange, ExchangeFuture, H1Body, Upgraded};
pub(crate) use encode::encode_head;
pub(crate) use pool::{Conn, Pool, Reaper};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::outcome::BoxError;
use super::request_body::UpstreamBody;

/// What the client runs on: a socket in production ([`UpstreamIo`]), a
/// scripted byte stream in tests.
///
/// [`UpstreamIo`]: super::io::UpstreamIo
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Largest response head (status line + headers) accepted from an upstream.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Most headers in one response head or trailer section.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size, extensions, CRLF).
const MAX_CHUNK_LINE: usize = 4096;
/// Total bytes of chunk extensions in one response body: they are skipped,
/// so without a total an upstream could stream them forever.
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;
/// Informational (1xx) responses accepted before the final one.
const MAX_INFORMATIONAL: usize = 16;
/// Largest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;
/// Read buffer size at first; it doubles (up to [`MAX_READ`]) while reads
/// fill it, so large bodies move in large reads.
const READ_CHUNK: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;

// === errors ===

/// Why an exchange failed before a response head was complete.
pub(crate) enum Error {
    /// A reused connection turned out to be closed before any byte of a
    /// response arrived, and the request can be sent again as it was
    /// (idempotent, or its head was never written): here it is back, head
    /// and body.
    Stale(String, Bytes, UpstreamBody),
    /// The connection broke, or the upstream broke the protocol.
    Reset(String),
    /// The client's request body failed (limit, stall, or its connection).
    Body(BoxError),
}

#[cfg(test)]
mod script;
#[cfg(test)]
mod tests;
