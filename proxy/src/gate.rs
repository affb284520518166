//! A watchdog beside busy work, polled only when it has something to look at. Below
//! `dataplane` and `http`, which both run one beside each connection.
//!
//! A connection's task runs its work (hyper's dispatcher, the two copy directions) and, in the
//! same `select!`, timers and drain signals that fire rarely. The runtime wakes the task for
//! whatever moved, and `select!` then polls every branch: each read or response polled the
//! idle and duration timers, the drain token (a mutex inside tokio's `Notify`) and the
//! request-limit signal again, about 4 % of the user time of an HTTP request. [`Gated`] gives
//! its future a waker of its own and skips polling it unless that waker fired.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

pin_project_lite::pin_project! {
    /// `inner`, polled on its first poll and then only after it woke itself.
    pub struct Gated<F> {
        #[pin]
        inner: F,
        gate: Arc<Gate>,
        waker: Waker,
    }
}

/// What wakes a [`Gated`] future: marks it due, then wakes the task polling it.
#[derive(Debug)]
struct Gate {
    due: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(true, Ordering::Release);
        if let Ok(t) = self.task.lock()
            && let Some(w) = t.as_ref()
        {
            w.wake_by_ref();
        }
    }
}

impl<F> Gated<F> {
    /// Gate `inner`.
    pub fn new(inner: F) -> Gated<F> {
        let gate = Arc::new(Gate {
            due: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Gated {
            inner,
            waker: Waker::from(gate.clone()),
            gate,
        }
    }
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // The task waker first: a wake that comes after the check below then reaches it.
        if let Ok(mut t) = this.gate.task.lock()
            && !t.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
        {
            *t = Some(cx.waker().clone());
        }
        if !this.gate.due.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Counts its polls; ready once `ready` is set, waking through the waker it was last
    /// polled with.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn the_gated_future_is_polled_only_when_it_woke() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(Mutex::new(None::<Waker>));
        let probe = Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: waker.clone(),
        };
        let gated = Gated::new(probe);
        tokio::pin!(gated);
        // The other branch wakes the task ten times; the probe is polled once, at the start.
        let mut ticks = 0;
        let ended = loop {
            tokio::select! {
                biased;
                () = gated.as_mut() => break ticks,
                () = tokio::time::sleep(Duration::from_millis(1)) => {
                    ticks += 1;
                    if ticks == 10 {
                        // Now the probe has something: its own wake gets it polled.
                        ready.store(true, Ordering::SeqCst);
                        let w = waker.lock().unwrap().take().expect("the probe left a waker");
                        w.wake();
                    }
                }
            }
        };
        assert_eq!(ended, 10, "the probe ended right after its wake");
        assert_eq!(
            polls.load(Ordering::SeqCst),
            2,
            "polled at the start and after its wake"
        );
    }

    #[tokio::test]
    async fn a_wake_from_another_thread_reaches_the_task() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(Mutex::new(None::<Waker>));
        let gated = Gated::new(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: waker.clone(),
        });
        let (r, w) = (ready.clone(), waker.clone());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            r.store(true, Ordering::SeqCst);
            let wk = w.lock().unwrap().take().expect("polled before the wake");
            wk.wake();
        });
        tokio::time::timeout(Duration::from_secs(5), gated)
            .await
            .expect("the gated future finished after its wake");
        t.join().unwrap();
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
