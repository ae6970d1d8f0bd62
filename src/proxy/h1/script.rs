//! A scripted byte stream for driving the client without sockets: reads
//! return the given chunks (or `Pending`, end of stream, an error) in order,
//! writes are recorded, and the test can tell when the client closed it.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One scripted read result.
#[derive(Clone, Debug)]
pub(crate) enum Ev {
    /// Bytes to hand out (over several reads if the caller's buffer is small).
    Data(Bytes),
    /// One `Pending`; the waker is woken at once, like a spurious wake-up.
    Pending,
    /// End of stream (every read from here on).
    Eof,
    /// A read error (once).
    Err(io::ErrorKind),
}

#[derive(Default)]
struct Inner {
    reads: VecDeque<Ev>,
    written: Vec<u8>,
    /// Bytes writes may still accept; `None` is unlimited. At zero, writes
    /// stall (`Pending`).
    write_budget: Option<usize>,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    dropped: bool,
    eof: bool,
}

/// The test's handle on a [`ScriptIo`].
#[derive(Clone, Default)]
pub(crate) struct Script(Arc<Mutex<Inner>>);

/// The stream the client sees. With its script exhausted, reads stall
/// (`Pending` with the waker kept) until the test pushes more.
pub(crate) struct ScriptIo(Script);

impl Script {
    /// A stream that will return `reads` in order.
    pub(crate) fn new(reads: impl IntoIterator<Item = Ev>) -> (Script, ScriptIo) {
        let s = Script::default();
        s.0.lock().reads.extend(reads);
        (s.clone(), ScriptIo(s))
    }

    /// Appends a read result and wakes a stalled reader.
    pub(crate) fn push(&self, ev: Ev) {
        let waker = {
            let mut i = self.0.lock();
            i.reads.push_back(ev);
            i.read_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Everything written so far.
    pub(crate) fn written(&self) -> Vec<u8> {
        self.0.lock().written.clone()
    }

    /// Writes accept only `n` more bytes, then stall.
    pub(crate) fn limit_writes(&self, n: usize) {
        self.0.lock().write_budget = Some(n);
    }

    /// Whether the client has closed (dropped) the stream.
    pub(crate) fn closed(&self) -> bool {
        self.0.lock().dropped
    }
}

impl Drop for ScriptIo {
    fn drop(&mut self) {
        self.0 .0.lock().dropped = true;
    }
}

impl AsyncRead for ScriptIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut i = self.0 .0.lock();
        if i.eof {
            return Poll::Ready(Ok(()));
        }
        match i.reads.pop_front() {
            None => {
                i.read_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Some(Ev::Pending) => {
                drop(i);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Some(Ev::Eof) => {
                i.eof = true;
                Poll::Ready(Ok(()))
            }
            Some(Ev::Err(kind)) => Poll::Ready(Err(io::Error::from(kind))),
            Some(Ev::Data(mut d)) => {
                let n = d.len().min(buf.remaining());
                buf.put_slice(&d[..n]);
                if n < d.len() {
                    let rest = d.split_off(n);
                    i.reads.push_front(Ev::Data(rest));
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for ScriptIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut i = self.0 .0.lock();
        let n = match i.write_budget {
            Some(0) => {
                i.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Some(b) => b.min(buf.len()),
            None => buf.len(),
        };
        if let Some(b) = i.write_budget.as_mut() {
            *b -= n;
        }
        i.written.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
