//! Bodies: the request tee that streams upstream while keeping a copy for retries, small
//! responses taken whole, and response bodies under the route's timers.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::HeaderMap;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{Body, BoxError};

/// Largest request body kept for replay by default (Envoy's default per-connection buffer
/// limit, 1 MiB; the listener's `per_connection_buffer_limit_bytes` replaces it). A larger
/// body still streams upstream, but the request is not retried.
pub const REPLAY_LIMIT: usize = 1024 * 1024;

/// What a [`Tee`] has seen of the request body so far.
enum Item {
    Data(Bytes),
    Trailers(HeaderMap),
}

struct TeeState {
    /// Frames read from the downstream so far (cleared once over the limit).
    seen: Vec<Item>,
    /// Frames read from the downstream in all; `seen` holds the last `seen.len()` of them.
    total: usize,
    /// Bytes in `seen`.
    bytes: usize,
    /// The downstream body ended.
    done: bool,
    /// More than the limit was read: nothing can be replayed any more.
    overflow: bool,
    /// The downstream body, read by whichever attempt gets ahead.
    source: Body,
}

/// A request body shared by the attempts of one request: the first attempt streams it
/// upstream as it arrives while a copy is kept (up to a limit, as Envoy's retry buffer); a
/// retry replays the copy and then continues with whatever the downstream still sends. So
/// streaming requests (gRPC, uploads) are not held back, and retries work as long as the
/// copy did not overflow.
#[derive(Clone)]
pub struct Tee {
    state: std::sync::Arc<std::sync::Mutex<TeeState>>,
    limit: usize,
}

impl Tee {
    /// Share `source`, keeping at most `limit` bytes for replay.
    pub fn new(source: Body, limit: usize) -> Tee {
        Tee {
            state: std::sync::Arc::new(std::sync::Mutex::new(TeeState {
                seen: Vec::new(),
                total: 0,
                bytes: 0,
                done: false,
                overflow: false,
                source,
            })),
            limit,
        }
    }

    /// A body for one attempt, starting from the first byte.
    pub fn body(&self) -> Body {
        TeeReader {
            tee: self.clone(),
            next: 0,
        }
        .boxed()
    }

    /// Whether another attempt can still send the whole body.
    pub fn replayable(&self) -> bool {
        self.state.lock().map(|s| !s.overflow).unwrap_or(false)
    }
}

/// One request's body as its attempts share it. Only a request a retry policy may send again
/// pays for a replay copy, and an empty one needs none: each attempt gets a new empty body.
pub enum RequestBody {
    /// No retry is possible: the body streams upstream once, without a copy.
    Once(Option<Body>),
    /// The request has no body: every attempt sends an empty one.
    Empty,
    /// A retry may resend the body: it streams through a [`Tee`] that keeps a copy.
    Replay(Tee),
}

impl RequestBody {
    /// Share `body` among attempts; `retries`: a retry policy may resend it, keeping at most
    /// `limit` bytes for replay.
    pub fn new(body: Body, retries: bool, limit: usize) -> RequestBody {
        if !retries {
            RequestBody::Once(Some(body))
        } else if body.is_end_stream() {
            RequestBody::Empty
        } else {
            RequestBody::Replay(Tee::new(body, limit))
        }
    }

    /// The body of the next attempt; `None` when a body streamed once was already sent.
    pub fn attempt(&mut self) -> Option<Body> {
        match self {
            RequestBody::Once(b) => b.take(),
            RequestBody::Empty => {
                Some(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
            }
            RequestBody::Replay(t) => Some(t.body()),
        }
    }

    /// Whether another attempt can send the whole body; `None` when the body was never kept
    /// for replay (no retry policy), `Some(false)` when the copy overflowed its limit.
    pub fn replayable(&self) -> Option<bool> {
        match self {
            RequestBody::Once(_) => None,
            RequestBody::Empty => Some(true),
            RequestBody::Replay(t) => Some(t.replayable()),
        }
    }

    /// Bytes kept for replay so far.
    pub fn kept_bytes(&self) -> usize {
        match self {
            RequestBody::Replay(t) => t
                .state
                .lock()
                .map(|s| if s.overflow { 0 } else { s.bytes })
                .unwrap_or(0),
            RequestBody::Once(_) | RequestBody::Empty => 0,
        }
    }
}

struct TeeReader {
    tee: Tee,
    /// Index in `seen` of the next frame this attempt sends.
    next: usize,
}

impl HttpBody for TeeReader {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let tee = self.tee.clone();
        let Ok(mut st) = tee.state.lock() else {
            return Poll::Ready(Some(Err("request body state poisoned".into())));
        };
        let first_kept = st.total - st.seen.len();
        if self.next < first_kept {
            // Only an abandoned attempt can fall behind an overflow (retries need a full copy).
            return Poll::Ready(Some(Err("request body no longer replayable".into())));
        }
        if let Some(item) = st.seen.get(self.next - first_kept) {
            self.next += 1;
            return Poll::Ready(Some(Ok(match item {
                Item::Data(d) => Frame::data(d.clone()),
                Item::Trailers(t) => Frame::trailers(t.clone()),
            })));
        }
        if st.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut st.source).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                st.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                st.total += 1;
                self.next = st.total;
                if !st.overflow {
                    st.bytes += frame.data_ref().map_or(0, Bytes::len);
                    if st.bytes > tee.limit {
                        st.overflow = true;
                        st.seen.clear();
                    } else if let Some(d) = frame.data_ref() {
                        st.seen.push(Item::Data(d.clone()));
                    } else if let Some(t) = frame.trailers_ref() {
                        st.seen.push(Item::Trailers(t.clone()));
                    } else {
                        // A frame kind with nothing to keep still counts as read.
                        st.seen.push(Item::Data(Bytes::new()));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }
    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

struct Prefixed {
    prefix: VecDeque<Frame<Bytes>>,
    rest: Incoming,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map_err(BoxError::from)
    }
}

struct Failed(Option<BoxError>);

impl HttpBody for Failed {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.take().map(Err))
    }
}

/// Largest body `take_if_complete` may take whole.
const WHOLE_LIMIT: u64 = 64 * 1024;

/// The upstream response body as it will be sent: `complete` when it had fully arrived
/// (then it is one buffer, and no timer needs to watch it).
pub struct Taken {
    /// The body.
    pub body: Body,
    /// Whether all of it is already here.
    pub complete: bool,
}

/// If the whole (small, length-known) body has already been received, take it as one buffer;
/// otherwise return it streaming (with any frame read here kept in front). Polls once, never
/// waits.
pub fn take_if_complete(mut body: Incoming) -> Taken {
    let whole = |data: Option<Bytes>, trailers: Option<HeaderMap>| Taken {
        body: Replay { data, trailers }.boxed(),
        complete: true,
    };
    if body.is_end_stream() {
        return whole(None, None);
    }
    let streaming = |b: Incoming| Taken {
        body: b.map_err(BoxError::from).boxed(),
        complete: false,
    };
    if body.size_hint().exact().is_none_or(|n| n > WHOLE_LIMIT) {
        return streaming(body);
    }
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) if body.is_end_stream() => match frame.into_data() {
            Ok(data) => whole(Some(data), None),
            Err(f) => whole(None, f.into_trailers().ok()),
        },
        Poll::Ready(Some(Ok(frame))) => Taken {
            body: Prefixed {
                prefix: VecDeque::from([frame]),
                rest: body,
            }
            .boxed(),
            complete: false,
        },
        Poll::Ready(Some(Err(e))) => Taken {
            body: Failed(Some(e.into())).boxed(),
            complete: true,
        },
        Poll::Ready(None) => whole(None, None),
        Poll::Pending => streaming(body),
    }
}

/// The route timer ran out while the response streamed.
#[derive(Debug, thiserror::Error)]
pub enum StreamTimeout {
    /// `timeout`: the whole response took too long.
    #[error("upstream response exceeded the route timeout")]
    Route,
    /// `idle_timeout`: no data for this long.
    #[error("upstream response idle for {0:?}")]
    Idle(Duration),
}

/// A response body that fails (resetting the downstream stream) when the route's overall
/// deadline passes or when no frame arrives within the idle timeout.
pub struct Timed {
    inner: Body,
    deadline: Option<Pin<Box<Sleep>>>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    /// Counts `downstream_rq_idle_timeout` when the idle timer ends the body.
    idle_stat: Option<std::sync::Arc<crate::stats::HttpStats>>,
}

impl Timed {
    /// Wrap `inner`; `deadline` is absolute, `idle` restarts with each frame.
    pub fn new(inner: Body, deadline: Option<Instant>, idle: Option<Duration>) -> Timed {
        Timed {
            inner,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
            idle_stat: None,
        }
    }

    /// Count an idle timeout in `stats`' `downstream_rq_idle_timeout`.
    pub fn on_idle(mut self, stats: std::sync::Arc<crate::stats::HttpStats>) -> Timed {
        self.idle_stat = Some(stats);
        self
    }
}

impl HttpBody for Timed {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_frame(cx) {
            if let Some((d, sleep)) = self.idle.as_mut() {
                let d = *d;
                sleep.as_mut().reset(Instant::now() + d);
            }
            return Poll::Ready(r);
        }
        if let Some(s) = self.deadline.as_mut()
            && s.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(StreamTimeout::Route.into())));
        }
        if let Some((d, s)) = self.idle.as_mut()
            && s.as_mut().poll(cx).is_ready()
        {
            let d = *d;
            if let Some(st) = &self.idle_stat {
                st.downstream_rq_idle_timeout.inc();
            }
            return Poll::Ready(Some(Err(StreamTimeout::Idle(d).into())));
        }
        Poll::Pending
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Empty, Full};

    fn body_of(n: usize) -> Body {
        Full::new(Bytes::from(vec![7u8; n]))
            .map_err(|e| match e {})
            .boxed()
    }

    #[tokio::test]
    async fn no_replay_copy_is_kept_without_a_retry_policy() {
        let mut rb = RequestBody::new(body_of(4096), false, REPLAY_LIMIT);
        assert!(matches!(rb, RequestBody::Once(_)));
        let sent = rb.attempt().expect("first attempt").collect().await;
        assert_eq!(sent.expect("body").to_bytes().len(), 4096);
        assert_eq!(rb.kept_bytes(), 0, "nothing kept for replay");
        assert_eq!(rb.replayable(), None);
        assert!(
            rb.attempt().is_none(),
            "a body streamed once is not sent again"
        );
    }

    #[tokio::test]
    async fn a_retry_policy_keeps_a_copy_sized_to_the_body() {
        let mut rb = RequestBody::new(body_of(4096), true, REPLAY_LIMIT);
        assert_eq!(
            rb.kept_bytes(),
            0,
            "nothing reserved before the body arrives"
        );
        let first = rb.attempt().expect("first").collect().await.expect("body");
        assert_eq!(first.to_bytes().len(), 4096);
        assert_eq!(rb.kept_bytes(), 4096);
        assert_eq!(rb.replayable(), Some(true));
        let again = rb.attempt().expect("retry").collect().await.expect("body");
        assert_eq!(again.to_bytes(), Bytes::from(vec![7u8; 4096]));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_streamed_but_not_replayable() {
        let mut rb = RequestBody::new(body_of(100), true, 10);
        let first = rb.attempt().expect("first").collect().await.expect("body");
        assert_eq!(first.to_bytes().len(), 100);
        assert_eq!(rb.replayable(), Some(false));
        assert_eq!(
            rb.kept_bytes(),
            0,
            "the copy is dropped once over the limit"
        );
    }

    #[tokio::test]
    async fn an_empty_request_needs_no_copy_even_with_a_retry_policy() {
        let empty = Empty::<Bytes>::new().map_err(|e| match e {}).boxed();
        let mut rb = RequestBody::new(empty, true, REPLAY_LIMIT);
        assert!(matches!(rb, RequestBody::Empty));
        for _ in 0..2 {
            let b = rb.attempt().expect("attempt");
            assert!(b.is_end_stream());
            assert!(b.collect().await.expect("body").to_bytes().is_empty());
        }
        assert_eq!(rb.replayable(), Some(true));
    }
}
