//! Bodies: request bodies buffered for retries, and response bodies under the route's timers.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::HeaderMap;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::{Body, BoxError};

/// Largest request body kept for replay (Envoy's default per-connection buffer limit, 1 MiB).
/// A larger body is streamed once and the request is not retried.
pub const REPLAY_LIMIT: usize = 1024 * 1024;

/// A complete request body that can be sent again on each attempt.
#[derive(Debug, Clone, Default)]
pub struct Buffered {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Buffered {
    /// A fresh body for one attempt (cheap: `Bytes` is reference counted).
    pub fn body(&self) -> Body {
        Replay {
            data: (!self.data.is_empty()).then(|| self.data.clone()),
            trailers: self.trailers.clone(),
        }
        .boxed()
    }

    /// Body length in bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// What reading the request body for replay produced.
pub enum ReadBody {
    /// The whole body fit: every attempt can send it.
    Replayable(Buffered),
    /// Too large (or the client failed mid-body): this body can be sent once.
    Once(Body),
}

/// Read `body` into memory if it fits in `limit` bytes; otherwise hand back a body that
/// streams what was read followed by the rest.
pub async fn read_for_replay(mut body: Incoming, limit: usize) -> ReadBody {
    let mut data = BytesMut::new();
    let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
    loop {
        match body.frame().await {
            None => {
                return ReadBody::Replayable(Buffered {
                    data: data.freeze(),
                    trailers: None,
                });
            }
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => {
                    if data.len() + d.len() > limit {
                        frames.push_back(Frame::data(data.freeze()));
                        frames.push_back(Frame::data(d));
                        return ReadBody::Once(
                            Prefixed {
                                prefix: frames,
                                rest: body,
                            }
                            .boxed(),
                        );
                    }
                    data.extend_from_slice(&d);
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        return ReadBody::Replayable(Buffered {
                            data: data.freeze(),
                            trailers: Some(t),
                        });
                    }
                }
            },
            Some(Err(e)) => {
                // The client broke off: pass the failure on so the upstream request aborts too.
                let err: BoxError = e.into();
                return ReadBody::Once(Failed(Some(err)).boxed());
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
}

impl Timed {
    /// Wrap `inner`; `deadline` is absolute, `idle` restarts with each frame.
    pub fn new(inner: Body, deadline: Option<Instant>, idle: Option<Duration>) -> Timed {
        Timed {
            inner,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
        }
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
            return Poll::Ready(Some(Err(StreamTimeout::Idle(*d).into())));
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
