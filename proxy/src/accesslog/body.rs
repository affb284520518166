//! Body wrappers that count data bytes for `%BYTES_RECEIVED%` / `%BYTES_SENT%`; the response
//! side also emits the request's log lines when the body ends or is dropped (Envoy logs
//! when the stream completes).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Counts the data bytes that pass into a shared counter.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    /// Wrap `inner`, adding to `count`.
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts what it sends and calls `done` with the count once: when it
/// ends, or when it is dropped (the client went away, or hyper discarded it).
pub struct Logged<B> {
    inner: B,
    sent: u64,
    done: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl<B> std::fmt::Debug for Logged<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logged").field("sent", &self.sent).finish()
    }
}

impl<B> Logged<B> {
    /// Wrap `inner`; `done` gets the bytes sent.
    pub fn new(inner: B, done: impl FnOnce(u64) + Send + Sync + 'static) -> Self {
        Logged {
            inner,
            sent: 0,
            done: Some(Box::new(done)),
        }
    }

    fn finish(&mut self) {
        if let Some(d) = self.done.take() {
            d(self.sent);
        }
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Logged<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.sent += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
