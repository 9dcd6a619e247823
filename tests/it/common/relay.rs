//! A TCP relay between a client and a real service, for paths that die.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A TCP relay that can black-hole the connections it carries: bytes are read
/// and dropped, nothing is closed, as when a network path silently dies.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    blackholed_below: Arc<AtomicU64>,
    pub accepted: Arc<AtomicU64>,
    pub stop: CancellationToken,
}

impl Relay {
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            blackholed_below: Arc::new(AtomicU64::new(0)),
            accepted: Arc::new(AtomicU64::new(0)),
            stop: CancellationToken::new(),
        };
        let (below, accepted, stop) = (
            relay.blackholed_below.clone(),
            relay.accepted.clone(),
            relay.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (down, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                let number = accepted.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let dead = Arc::new(AtomicBool::new(false));
                for (mut from, mut to) in [(dr, uw), (ur, dw)].map(|(a, b)| {
                    (
                        Box::new(a) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(b) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    )
                }) {
                    let below = below.clone();
                    let stop = stop.clone();
                    let dead = dead.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = tokio::select! {
                                _ = stop.cancelled() => return,
                                r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
                            };
                            if number < below.load(Ordering::SeqCst) || dead.load(Ordering::SeqCst)
                            {
                                dead.store(true, Ordering::SeqCst);
                                continue; // black hole: read and drop
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        relay
    }

    pub fn blackhole_existing(&self) {
        self.blackholed_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}
