//! Load balancers: pure choices over a cluster's endpoints.

pub mod maglev;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::state::ClusterEntry;

/// Round-robin over the healthy endpoints, using the cluster's cursor.
/// Returns `None` when the cluster has no healthy endpoint.
pub fn pick_round_robin(entry: &ClusterEntry) -> Option<SocketAddr> {
    let healthy = entry.healthy_endpoints();
    let i = next_index(&entry.rr, healthy.len())?;
    Some(healthy[i].address)
}

/// Weighted pick for `weighted_clusters`: `cursor` walks the total weight round-robin, so
/// shares are exact over each cycle of `sum(weights)` connections.
pub fn pick_weighted<'a>(choices: &'a [(String, u32)], cursor: &AtomicUsize) -> Option<&'a str> {
    let total: u64 = choices.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return None;
    }
    let mut at = (cursor.fetch_add(1, Ordering::Relaxed) as u64) % total;
    for (name, w) in choices {
        let w = u64::from(*w);
        if at < w {
            return Some(name);
        }
        at -= w;
    }
    None
}

/// Next round-robin index below `n`, or `None` when `n` is 0.
pub fn next_index(cursor: &AtomicUsize, n: usize) -> Option<usize> {
    (n > 0).then(|| cursor.fetch_add(1, Ordering::Relaxed) % n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn weighted_shares_are_exact_per_cycle(ws in proptest::collection::vec(0u32..20, 1..6)) {
            let choices: Vec<(String, u32)> =
                ws.iter().enumerate().map(|(i, w)| (format!("c{i}"), *w)).collect();
            let total: u32 = ws.iter().sum();
            let cursor = AtomicUsize::new(0);
            let mut seen = vec![0u32; ws.len()];
            for _ in 0..total {
                let n = pick_weighted(&choices, &cursor).unwrap();
                let i: usize = n[1..].parse().unwrap();
                seen[i] += 1;
            }
            prop_assert_eq!(seen, ws.clone());
            if total == 0 {
                prop_assert!(pick_weighted(&choices, &cursor).is_none());
            }
        }
    }
}
