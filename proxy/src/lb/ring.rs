//! Ketama-style consistent hash ring with Envoy's RING_HASH construction: weights normalised,
//! `scale = min(ceil(min_weight * min_ring_size) / min_weight, max_ring_size)`, and host `h`
//! gets entries hashed from `"<address>_<i>"` until the running total reaches
//! `scale * weight`. A request takes the first entry whose hash is >= its own (wrapping).

use super::hash_bytes;

/// A built ring: sorted (hash, host index) entries.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    entries: Vec<(u64, u32)>,
}

impl Ring {
    /// Build the ring for `hosts` (`(key, weight)`; key is `ip:port`).
    pub fn new(hosts: &[(String, u32)], min_ring_size: u64, max_ring_size: u64) -> Ring {
        let total: f64 = hosts.iter().map(|(_, w)| f64::from(*w)).sum();
        if hosts.is_empty() || total <= 0.0 {
            return Ring::default();
        }
        let normalized: Vec<f64> = hosts.iter().map(|(_, w)| f64::from(*w) / total).collect();
        let min_w = normalized.iter().copied().fold(f64::INFINITY, f64::min);
        let scale = ((min_w * min_ring_size as f64).ceil() / min_w).min(max_ring_size as f64);
        let mut entries = Vec::with_capacity(scale.ceil() as usize + hosts.len());
        let mut current = 0.0f64;
        let mut target = 0.0f64;
        for (h, ((key, _), w)) in hosts.iter().zip(&normalized).enumerate() {
            target += scale * w;
            let mut i = 0u64;
            while current < target {
                let k = format!("{key}_{i}");
                entries.push((hash_bytes(k.as_bytes()), h as u32));
                i += 1;
                current += 1.0;
            }
        }
        entries.sort_unstable();
        Ring { entries }
    }

    /// Entries on the ring.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The host for `hash`; `attempt > 0` (a retry that wants another host) steps that many
    /// entries further, as Envoy does.
    pub fn choose(&self, hash: u64, attempt: u32) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let i = self.entries.partition_point(|(h, _)| *h < hash);
        let i = (i + attempt as usize) % self.entries.len();
        Some(self.entries[i].1)
    }
}
