//! Envoy's `/drain_listeners`: the admin asks, the listener tasks stop accepting.
//!
//! The admin owns a [`DrainSignal`]; every listener task waits on
//! [`DrainSignal::stopped`] beside its shutdown future, so a drain closes exactly the listeners
//! it names (all, or with `inboundonly` those serving inbound traffic) while in-flight
//! connections finish. With `graceful` the listeners keep accepting for the drain period first
//! (readiness and the kernel capture gate are already closed, so new connects stop arriving),
//! as Envoy's drain sequence does; `skip_exit` (only with `graceful`) keeps them open after it.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

/// Which listeners a completed drain has stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stopped {
    /// Inbound listeners (the inbound capture listener, listeners with `traffic_direction:
    /// INBOUND`).
    pub inbound: bool,
    /// Every other listener.
    pub outbound: bool,
}

impl Stopped {
    fn covers(self, inbound: bool) -> bool {
        if inbound { self.inbound } else { self.outbound }
    }
}

/// What one `/drain_listeners` request asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainRequest {
    /// `?inboundonly`: only inbound listeners.
    pub inbound_only: bool,
    /// `?graceful`: keep accepting for the drain period before stopping.
    pub graceful: bool,
    /// `?skip_exit` (with `graceful`): do not stop the listeners after the drain period.
    pub skip_exit: bool,
}

impl DrainRequest {
    /// Parses the query flags; `Err` names the contradiction (Envoy answers 400 too).
    pub fn from_query(has: impl Fn(&str) -> bool) -> Result<DrainRequest, &'static str> {
        let r = DrainRequest {
            inbound_only: has("inboundonly"),
            graceful: has("graceful"),
            skip_exit: has("skip_exit"),
        };
        if r.skip_exit && !r.graceful {
            return Err("skip_exit requires graceful");
        }
        Ok(r)
    }
}

/// The drain state the admin publishes and listener tasks subscribe to. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DrainSignal {
    tx: Arc<watch::Sender<Stopped>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for DrainSignal {
    fn default() -> Self {
        DrainSignal::new()
    }
}

impl DrainSignal {
    /// Nothing drained yet.
    pub fn new() -> DrainSignal {
        DrainSignal {
            tx: Arc::new(watch::Sender::new(Stopped::default())),
            draining: Arc::default(),
        }
    }

    /// Stops the listeners of one direction (or all) now.
    pub fn stop(&self, inbound_only: bool) {
        self.tx.send_modify(|s| {
            s.inbound = true;
            s.outbound |= !inbound_only;
        });
    }

    /// Which listeners are stopped.
    pub fn state(&self) -> Stopped {
        *self.tx.borrow()
    }

    /// Starts a graceful drain unless one is running (Envoy ignores a second one); false when
    /// one was already running.
    pub fn begin_graceful(&self) -> bool {
        !self
            .draining
            .swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// Completes once a drain has stopped listeners of this direction (`inbound`: an inbound
    /// listener). A listener task selects on it beside its shutdown future.
    pub fn stopped(&self, inbound: bool) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // The sender lives as long as any signal clone; if it is gone, nothing can drain.
            if rx.wait_for(|s| s.covers(inbound)).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The shutdown future of one listener: `shutdown` or this drain, whichever comes first.
    pub fn or_shutdown(
        &self,
        inbound: bool,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = ()> + Send + 'static {
        let drained = self.stopped(inbound);
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = drained => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_flags_follow_envoy() {
        let q = |keys: &'static [&'static str]| DrainRequest::from_query(|k| keys.contains(&k));
        assert_eq!(q(&[]), Ok(DrainRequest::default()));
        assert_eq!(
            q(&["inboundonly", "graceful"]),
            Ok(DrainRequest {
                inbound_only: true,
                graceful: true,
                skip_exit: false
            })
        );
        assert!(q(&["skip_exit"]).is_err());
    }

    #[tokio::test]
    async fn inbound_only_stops_only_inbound_listeners() {
        let d = DrainSignal::new();
        let inbound = tokio::spawn(d.stopped(true));
        let outbound = tokio::spawn(d.stopped(false));
        d.stop(true);
        inbound.await.unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!outbound.is_finished());
        assert_eq!(
            d.state(),
            Stopped {
                inbound: true,
                outbound: false
            }
        );
        d.stop(false);
        outbound.await.unwrap();
        assert!(d.begin_graceful());
        assert!(!d.begin_graceful());
    }
}
