//! A fault-injecting TCP relay for chaos tests.
//!
//! [`ChaosRelay`] listens on `127.0.0.1:0` and forwards every connection to a
//! target address. Each direction has its own [`Faults`], changeable while
//! the relay runs (they apply from the next chunk on, to open connections
//! too): added latency, a bandwidth cap, a reset (RST, `SO_LINGER` 0) after N
//! bytes, a half-close (FIN in that direction only) after N bytes, and a
//! blackhole (bytes are read and dropped, never forwarded). Byte counts are
//! per connection. Counters (connections, open connections, bytes forwarded
//! each way) can be awaited. Every task belongs to the relay and is aborted
//! when it is dropped.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A direction through the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From the connecting side to the target (requests).
    Up,
    /// From the target back to the connecting side (responses).
    Down,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::Up => 0,
            Dir::Down => 1,
        }
    }
}

/// The faults of one direction. The default forwards untouched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Waits this long before forwarding each chunk.
    pub latency: Duration,
    /// At most this many bytes per second.
    pub bandwidth: Option<u64>,
    /// After forwarding this many bytes of a connection, resets both of its
    /// sockets (RST, not FIN).
    pub reset_after: Option<u64>,
    /// After forwarding this many bytes of a connection, shuts down this
    /// direction (the receiver reads EOF); the other direction goes on.
    pub half_close_after: Option<u64>,
    /// Reads and drops this direction's bytes: the receiver never sees them.
    pub blackhole: bool,
}

impl Faults {
    /// No fault.
    pub fn none() -> Faults {
        Faults::default()
    }
    /// Adds `d` before each chunk.
    pub fn latency(d: Duration) -> Faults {
        Faults {
            latency: d,
            ..Faults::default()
        }
    }
    /// Caps the rate at `bytes_per_second`.
    pub fn bandwidth(bytes_per_second: u64) -> Faults {
        Faults {
            bandwidth: Some(bytes_per_second),
            ..Faults::default()
        }
    }
    /// Resets the connection after `n` bytes in this direction.
    pub fn reset_after(n: u64) -> Faults {
        Faults {
            reset_after: Some(n),
            ..Faults::default()
        }
    }
    /// Shuts this direction down after `n` bytes.
    pub fn half_close_after(n: u64) -> Faults {
        Faults {
            half_close_after: Some(n),
            ..Faults::default()
        }
    }
    /// Drops every byte of this direction.
    pub fn blackhole() -> Faults {
        Faults {
            blackhole: true,
            ..Faults::default()
        }
    }
}

struct Shared {
    target: SocketAddr,
    faults: [Mutex<Faults>; 2],
    connections: AtomicU64,
    open: AtomicU64,
    bytes: [AtomicU64; 2],
    dropped: [AtomicU64; 2],
    /// Bumped by every counter change, and by `reset_all` (connections
    /// compare it with the generation they started under).
    changed: watch::Sender<u64>,
    kill: watch::Sender<u64>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
    fn faults(&self, dir: Dir) -> Faults {
        *self.faults[dir.index()].lock()
    }
}

/// A TCP relay that injects faults; see the module documentation.
pub struct ChaosRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl ChaosRelay {
    /// Binds `127.0.0.1:0` and relays every connection to `target`.
    pub async fn start(target: SocketAddr) -> ChaosRelay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind chaos relay");
        let addr = listener.local_addr().expect("relay addr");
        let shared = Arc::new(Shared {
            target,
            faults: [Mutex::new(Faults::none()), Mutex::new(Faults::none())],
            connections: AtomicU64::new(0),
            open: AtomicU64::new(0),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            dropped: [AtomicU64::new(0), AtomicU64::new(0)],
            changed: watch::channel(0).0,
            kill: watch::channel(0).0,
            tasks: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let (client, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("chaos relay: accept error: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = client.set_nodelay(true);
                accept_shared.connections.fetch_add(1, Ordering::SeqCst);
                accept_shared.open.fetch_add(1, Ordering::SeqCst);
                accept_shared.bump();
                let conn_shared = accept_shared.clone();
                let handle = tokio::spawn(async move {
                    relay_connection(&conn_shared, client).await;
                    conn_shared.open.fetch_sub(1, Ordering::SeqCst);
                    conn_shared.bump();
                });
                let mut tasks = accept_shared.tasks.lock();
                tasks.retain(|t| !t.is_finished());
                tasks.push(handle);
            }
        });
        shared.tasks.lock().push(accept);
        ChaosRelay { addr, shared }
    }

    /// Where to connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the faults of `dir` (open connections included).
    pub fn set(&self, dir: Dir, faults: Faults) {
        *self.shared.faults[dir.index()].lock() = faults;
    }

    /// Removes every fault.
    pub fn heal(&self) {
        self.set(Dir::Up, Faults::none());
        self.set(Dir::Down, Faults::none());
    }

    /// Resets (RST) every connection open now; later ones are not affected.
    pub fn reset_all(&self) {
        self.shared.kill.send_modify(|v| *v += 1);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Bytes forwarded in `dir` (all connections).
    pub fn bytes(&self, dir: Dir) -> u64 {
        self.shared.bytes[dir.index()].load(Ordering::SeqCst)
    }

    /// Bytes read in `dir` and dropped by a blackhole.
    pub fn dropped(&self, dir: Dir) -> u64 {
        self.shared.dropped[dir.index()].load(Ordering::SeqCst)
    }

    /// Waits until `cond` holds (re-checked on every counter change), up to 30 s.
    pub async fn wait_until(&self, what: &str, cond: impl Fn(&ChaosRelay) -> bool) {
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
                "chaos relay: timed out waiting for {what} (connections {}, open {}, up {} B, down {} B)",
                self.connections(),
                self.open(),
                self.bytes(Dir::Up),
                self.bytes(Dir::Down)
            );
        }
    }

    /// Waits until no connection is open through the relay.
    pub async fn wait_idle(&self) {
        self.wait_until("no open connection", |r| r.open() == 0)
            .await
    }
}

impl Drop for ChaosRelay {
    fn drop(&mut self) {
        for t in self.shared.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

/// How one direction's pump ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The source closed (EOF, propagated as a FIN) or a socket failed.
    Done,
    /// A reset fault fired: both sockets are to be reset.
    Reset,
}

async fn relay_connection(shared: &Arc<Shared>, mut client: TcpStream) {
    let mut kill = shared.kill.subscribe();
    kill.borrow_and_update();
    let mut target = match TcpStream::connect(shared.target).await {
        Ok(t) => t,
        Err(e) => {
            // As an unreachable target would look: the client is reset.
            eprintln!("chaos relay: connect to {} failed: {e}", shared.target);
            reset(&client);
            return;
        }
    };
    let _ = target.set_nodelay(true);
    let mut ended = End::Done;
    {
        let (cr, cw) = client.split();
        let (tr, tw) = target.split();
        let up = pump(shared, Dir::Up, cr, tw);
        let down = pump(shared, Dir::Down, tr, cw);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        while !(up_done && down_done) {
            tokio::select! {
                e = &mut up, if !up_done => {
                    up_done = true;
                    if e == End::Reset {
                        ended = End::Reset;
                        break;
                    }
                }
                e = &mut down, if !down_done => {
                    down_done = true;
                    if e == End::Reset {
                        ended = End::Reset;
                        break;
                    }
                }
                _ = kill.changed() => {
                    ended = End::Reset;
                    break;
                }
            }
        }
    }
    if ended == End::Reset {
        reset(&client);
        reset(&target);
    }
}

/// Makes the close of `s` a reset (RST) instead of a FIN.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

async fn pump<R, W>(shared: &Shared, dir: Dir, mut from: R, mut to: W) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let i = dir.index();
    let mut buf = vec![0u8; 16 * 1024];
    // Bytes of this connection forwarded in this direction.
    let mut sent: u64 = 0;
    loop {
        let f = shared.faults(dir);
        // A fault already due on an open connection (set after its bytes went by).
        if f.reset_after.is_some_and(|n| sent >= n) {
            return End::Reset;
        }
        if f.half_close_after.is_some_and(|n| sent >= n) {
            let _ = to.shutdown().await;
            return End::Done;
        }
        // Read no further than the next threshold, so that it is exact.
        let mut want = buf.len() as u64;
        for n in [f.reset_after, f.half_close_after].into_iter().flatten() {
            want = want.min(n - sent);
        }
        if let Some(bw) = f.bandwidth {
            // About 50 writes a second.
            want = want.min((bw / 50).max(1));
        }
        let n = match from.read(&mut buf[..want as usize]).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return End::Done;
            }
            Ok(n) => n,
        };
        // Faults may have changed while the read waited.
        let f = shared.faults(dir);
        if f.blackhole {
            shared.dropped[i].fetch_add(n as u64, Ordering::SeqCst);
            shared.bump();
            continue;
        }
        if !f.latency.is_zero() {
            tokio::time::sleep(f.latency).await;
        }
        if to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            return End::Done;
        }
        sent += n as u64;
        shared.bytes[i].fetch_add(n as u64, Ordering::SeqCst);
        shared.bump();
        if let Some(bw) = f.bandwidth {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / bw.max(1) as f64)).await;
        }
    }
}
