//! Connection-level faults the simulator can inject: a connection that goes
//! silent (stalled: no bytes either way, not even PING answers) and GOAWAY.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Numbers connections as they are accepted and remembers below which number
/// they are stalled.
#[derive(Default)]
pub struct StallControl {
    accepted: AtomicU64,
    stalled_below: AtomicU64,
    dropped_below: AtomicU64,
}

impl StallControl {
    /// The number of a newly accepted connection.
    pub fn next_connection(&self) -> u64 {
        self.accepted.fetch_add(1, Ordering::SeqCst)
    }

    /// Every connection accepted so far goes silent for good.
    pub fn stall_existing(&self) {
        self.stalled_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Every connection accepted so far fails its next read or write, as after a
    /// reset.
    pub fn drop_existing(&self) {
        self.dropped_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn is_dropped(&self, number: u64) -> bool {
        number < self.dropped_below.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    fn is_stalled(&self, number: u64) -> bool {
        number < self.stalled_below.load(Ordering::SeqCst)
    }
}

/// An I/O stream that stops moving bytes once its connection is stalled, the
/// way a black-holed peer behaves: reads and writes stay pending forever.
pub struct Stallable<IO> {
    inner: IO,
    number: u64,
    control: Arc<StallControl>,
}

impl<IO> Stallable<IO> {
    pub fn new(inner: IO, number: u64, control: Arc<StallControl>) -> Self {
        Self {
            inner,
            number,
            control,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Stallable<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.control.is_dropped(self.number) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if self.control.is_stalled(self.number) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Stallable<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.control.is_dropped(self.number) {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if self.control.is_stalled(self.number) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.control.is_stalled(self.number) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
