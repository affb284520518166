//! Ordering of the owner task, against a recording sink: the newest input always wins, inputs
//! coalesce, and a publish is reported applied only once an image containing it was written.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::bpf::projection::MapImage;
use crate::model::LbPolicy;
use crate::model::test_util::{static_cluster, tcp_chain, virtual_listener};

/// A snapshot whose one fast-path service (10.96.0.1:80) has the endpoint 127.0.0.1:(10000 + v).
fn versioned(v: u16) -> Arc<Snapshot> {
    let ep = format!("127.0.0.1:{}", 10_000 + v);
    Arc::new(Snapshot::new(
        vec![virtual_listener(vec![tcp_chain(
            "svc",
            "10.96.0.1",
            80,
            "c",
        )])],
        vec![static_cluster("c", LbPolicy::RoundRobin, &[ep.as_str()])],
        &Default::default(),
    ))
}

/// The version an image carries for its one service, if any.
fn version_of(img: &MapImage) -> Option<u16> {
    let c = img.clusters.get("c")?;
    Some(c.endpoints.first()?.port() - 10_000)
}

/// Records every apply: per call, each scope's version; optionally slow, to make inputs pile up.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<BTreeMap<ScopeId, Option<u16>>>>,
    /// The newest version of scope 0 written so far.
    written: AtomicU64,
    delay: Duration,
    /// Scopes whose image "does not fit".
    overflow: Mutex<BTreeMap<ScopeId, String>>,
    /// Every write fails while set.
    fail: std::sync::atomic::AtomicBool,
}

impl Sink for Recorder {
    fn apply(&self, images: &ScopedImages) -> Result<BTreeMap<ScopeId, String>, BpfError> {
        std::thread::sleep(self.delay);
        if self.fail.load(Ordering::SeqCst) {
            return Err(BpfError::Config("map write refused".into()));
        }
        let seen: BTreeMap<ScopeId, Option<u16>> =
            images.iter().map(|(s, i)| (*s, version_of(i))).collect();
        if let Some(Some(v)) = seen.get(&0) {
            self.written.store(u64::from(*v), Ordering::SeqCst);
        }
        self.calls.lock().unwrap().push(seen);
        Ok(self.overflow.lock().unwrap().clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_input_wins_and_writes_never_go_backwards() {
    let sink = Arc::new(Recorder {
        delay: Duration::from_millis(2),
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let (owner, task) = Owner::start(sink.clone(), stop.clone());
    // Publishes race health refreshes of the same scope and of another scope.
    let refresher = {
        let owner = owner.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                owner.refresh(0);
                owner.refresh(7);
                tokio::task::yield_now().await;
            }
        })
    };
    owner.publish(7, versioned(500), 15001);
    let mut last = 0;
    for v in 1..=100u16 {
        last = owner.publish(0, versioned(v), 15001);
        if v % 10 == 0 {
            tokio::task::yield_now().await;
        }
    }
    refresher.await.unwrap();
    owner.applied(last, 0).await.unwrap();
    assert_eq!(sink.written.load(Ordering::SeqCst), 100);
    let calls = sink.calls.lock().unwrap().clone();
    // Coalesced: far fewer writes than inputs.
    assert!(calls.len() < 100 + 400, "{} writes", calls.len());
    let mut prev = 0;
    for c in &calls {
        if let Some(Some(v)) = c.get(&0) {
            assert!(*v >= prev, "wrote version {v} after {prev}");
            prev = *v;
        }
        // Scope 7 only ever holds its one snapshot.
        assert!(matches!(c.get(&7), None | Some(Some(500))), "{c:?}");
    }
    // The last write holds the newest input of both scopes.
    let final_call = calls.last().unwrap();
    assert_eq!(final_call.get(&0), Some(&Some(100)));
    assert_eq!(final_call.get(&7), Some(&Some(500)));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_is_acked_only_after_an_image_containing_it_is_written() {
    let sink = Arc::new(Recorder {
        delay: Duration::from_millis(20),
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let (owner, _task) = Owner::start(sink.clone(), stop.clone());
    for v in 1..=5u16 {
        owner
            .publish_and_wait(0, versioned(v), 15001)
            .await
            .unwrap();
        assert!(
            sink.written.load(Ordering::SeqCst) >= u64::from(v),
            "acknowledged version {v} before it was written"
        );
    }
    // A refresh of an unknown scope is no input at all.
    assert_eq!(owner.refresh(42), None);
    // Removing a scope takes its entries out in the next write.
    owner.publish(3, versioned(9), 15001);
    let g = owner.remove_scope(3);
    owner.applied(g, 0).await.unwrap();
    let last = sink.calls.lock().unwrap().last().cloned().unwrap();
    assert!(!last.contains_key(&3), "{last:?}");
    stop.cancel();
}

#[tokio::test]
async fn an_overflow_of_a_scope_fails_only_that_scopes_publish() {
    let sink = Arc::new(Recorder::default());
    sink.overflow
        .lock()
        .unwrap()
        .insert(2, "kernel fast path: image does not fit".into());
    let stop = CancellationToken::new();
    let (owner, _task) = Owner::start(sink.clone(), stop.clone());
    let err = owner
        .publish_and_wait(2, versioned(1), 15001)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ApplyError::Overflow { scope: 2, limit } if limit.contains("does not fit")),
        "{err:?}"
    );
    // The NACK carries the limit's text unchanged.
    assert_eq!(err.to_string(), "kernel fast path: image does not fit");
    owner
        .publish_and_wait(0, versioned(1), 15001)
        .await
        .unwrap();
    stop.cancel();
}

#[tokio::test]
async fn a_failed_write_fails_the_waiting_publish_and_the_hook_nacks_with_its_text() {
    let sink = Arc::new(Recorder::default());
    sink.fail.store(true, Ordering::SeqCst);
    let stop = CancellationToken::new();
    let (owner, _task) = Owner::start(sink.clone(), stop.clone());
    let err = owner
        .publish_and_wait(4, versioned(1), 15001)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ApplyError::Write { scope: 4, source } if matches!(**source, BpfError::Config(_))),
        "{err:?}"
    );
    assert_eq!(err.scope(), 4);
    let nack = "kernel fast path: invalid capture config: map write refused";
    assert_eq!(err.to_string(), nack);
    // Through the ADS client's hook: same text, and the owner's error is still there to inspect.
    let hook = owner.publish_hook(4, 15001);
    let err = (hook.0)(versioned(2)).await.unwrap_err();
    assert_eq!(err.to_string(), nack);
    assert!(matches!(
        err.cause().downcast_ref::<ApplyError>(),
        Some(ApplyError::Write { scope: 4, .. })
    ));
    stop.cancel();
}

/// One input: publish version `v` of `scope`, refresh `scope` (health), or remove `scope`.
#[derive(Clone, Debug)]
enum Op {
    Publish(ScopeId, u16),
    Refresh(ScopeId),
    Remove(ScopeId),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (0u32..3, 1u16..60).prop_map(|(s, v)| Op::Publish(s, v)),
        2 => (0u32..3).prop_map(Op::Refresh),
        1 => (0u32..3).prop_map(Op::Remove),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Whatever the inputs and however they interleave with the writes, once the last
    /// generation is reported applied, the last write holds exactly the latest input of every
    /// scope still there.
    #[test]
    fn any_input_sequence_ends_on_the_latest_state(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (last_write, model) = rt.block_on(async {
            let sink = Arc::new(Recorder {
                delay: Duration::from_micros(300),
                ..Default::default()
            });
            let stop = CancellationToken::new();
            let (owner, _task) = Owner::start(sink.clone(), stop.clone());
            let mut model: BTreeMap<ScopeId, Option<u16>> = BTreeMap::new();
            let mut last = 0;
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::Publish(s, v) => {
                        last = owner.publish(*s, versioned(*v), 15001);
                        model.insert(*s, Some(*v));
                    }
                    Op::Refresh(s) => {
                        if let Some(g) = owner.refresh(*s) {
                            last = g;
                        }
                    }
                    Op::Remove(s) => {
                        last = owner.remove_scope(*s);
                        model.remove(s);
                    }
                }
                if i % 3 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            let _ = owner.applied(last, 0).await;
            let last_write = sink.calls.lock().unwrap().last().cloned().unwrap_or_default();
            stop.cancel();
            (last_write, model)
        });
        proptest::prop_assert_eq!(last_write, model);
    }
}
