//! Maglev lookup tables with Envoy's semantics (pure).
//!
//! [`table`] builds the table Envoy's `OriginalMaglevTable` builds for the same hosts: host keys
//! (the address strings, `127.0.0.1:8080` / `[::1]:8080`) are sorted, each host's permutation
//! is `offset = xxHash64(key, 0) % size`, `skip = xxHash64(key, 1) % (size - 1) + 1`, and the
//! table is filled round by round, a host of weight `w` taking a turn in `w / max_weight` of the
//! rounds. A connection then uses `table[hash % size]`. Both the userspace MAGLEV balancer and
//! the kernel fast path (which gets a smaller table, see `bpf::projection`) use this builder.

/// Envoy's default `table_size` (a prime).
pub const DEFAULT_TABLE_SIZE: usize = 65_537;

/// Why a table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// Maglev's permutations cover the table only when its size is prime (Envoy rejects the
    /// configuration too).
    #[error("maglev table size {0} is not a prime number")]
    NotPrime(usize),
    /// Envoy's endpoint weights are at least 1.
    #[error("maglev host {0}: weight 0")]
    ZeroWeight(String),
    /// More hosts than entries: some hosts could never be chosen.
    #[error("maglev table size {size} is smaller than the number of hosts ({hosts})")]
    TooManyHosts { size: usize, hosts: usize },
}

/// The Maglev table for `hosts` (`(key, weight)`, any order): `size` entries, each the index
/// into `hosts` of the host that entry maps to. Empty when `hosts` is empty.
pub fn table(hosts: &[(&str, u32)], size: usize) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    if hosts.is_empty() {
        return Ok(Vec::new());
    }
    if hosts.len() > size {
        return Err(MaglevError::TooManyHosts {
            size,
            hosts: hosts.len(),
        });
    }
    if let Some((k, _)) = hosts.iter().find(|(_, w)| *w == 0) {
        return Err(MaglevError::ZeroWeight((*k).to_string()));
    }

    // Envoy normalises weights to fractions of the total and sorts by key, so the table does not
    // depend on the order hosts arrived in (ties, which Envoy leaves to pointer order, are broken
    // here by weight and then input position).
    let total: f64 = hosts.iter().map(|(_, w)| f64::from(*w)).sum();
    let mut order: Vec<usize> = (0..hosts.len()).collect();
    order.sort_by(|&a, &b| (hosts[a].0, hosts[a].1, a).cmp(&(hosts[b].0, hosts[b].1, b)));
    let size64 = size as u64;
    let mut entries: Vec<Entry> = order
        .iter()
        .map(|&i| {
            let key = hosts[i].0.as_bytes();
            Entry {
                host: i as u32,
                offset: xxhash64(key, 0) % size64,
                skip: xxhash64(key, 1) % (size64 - 1) + 1,
                weight: f64::from(hosts[i].1) / total,
                target: 0.0,
                next: 0,
            }
        })
        .collect();
    let max_weight = entries.iter().map(|e| e.weight).fold(0.0, f64::max);

    const EMPTY: u32 = u32::MAX;
    let mut out = vec![EMPTY; size];
    let mut filled = 0usize;
    let mut iteration: u32 = 1;
    while filled < size {
        for e in entries.iter_mut() {
            if filled == size {
                break;
            }
            // A host of weight max_weight takes a turn every round; one of max_weight / 3 every
            // third round (Envoy compares in the same floating-point terms).
            if f64::from(iteration) * e.weight < e.target {
                continue;
            }
            e.target += max_weight;
            let mut c = e.permutation(size64);
            while out[c as usize] != EMPTY {
                e.next += 1;
                c = e.permutation(size64);
            }
            out[c as usize] = e.host;
            e.next += 1;
            filled += 1;
        }
        iteration = iteration.wrapping_add(1);
    }
    Ok(out)
}

/// The host index `table` maps `hash` to (`None` for an empty table).
pub fn choose(table: &[u32], hash: u64) -> Option<u32> {
    if table.is_empty() {
        return None;
    }
    table.get((hash % table.len() as u64) as usize).copied()
}

/// One host while its table is being filled.
struct Entry {
    host: u32,
    offset: u64,
    skip: u64,
    weight: f64,
    target: f64,
    next: u64,
}

impl Entry {
    fn permutation(&self, size: u64) -> u64 {
        // offset and skip are below size (< 2^32 in practice), next grows by one per probe: no
        // overflow for any table that fits in memory.
        (self.offset + self.skip.wrapping_mul(self.next)) % size
    }
}

/// Whether `n` is prime (trial division; table sizes are small).
pub fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let mut d = 3usize;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

// === xxHash64 ===

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// XXH64 of `data` with `seed` (Envoy's `HashUtil::xxHash64`).
pub fn xxhash64(data: &[u8], seed: u64) -> u64 {
    fn round(acc: u64, input: u64) -> u64 {
        acc.wrapping_add(input.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    }
    fn merge(acc: u64, v: u64) -> u64 {
        (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
    }
    fn u64_at(b: &[u8], i: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    }
    fn u32_at(b: &[u8], i: usize) -> u64 {
        let mut w = [0u8; 4];
        w.copy_from_slice(&b[i..i + 4]);
        u64::from(u32::from_le_bytes(w))
    }

    let len = data.len();
    let mut i = 0usize;
    let mut h = if len >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        while i + 32 <= len {
            for (j, acc) in v.iter_mut().enumerate() {
                *acc = round(*acc, u64_at(data, i + 8 * j));
            }
            i += 32;
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for acc in v {
            h = merge(h, acc);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(len as u64);
    while i + 8 <= len {
        h ^= round(0, u64_at(data, i));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        i += 8;
    }
    if i + 4 <= len {
        h ^= u32_at(data, i).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        i += 4;
    }
    for &b in &data[i..] {
        h ^= u64::from(b).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn xxhash64_matches_the_reference_vectors() {
        assert_eq!(xxhash64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxhash64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxhash64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        // 39 bytes: the 32-byte stripe path, then 8-, 4- and 1-byte tails.
        assert_eq!(
            xxhash64(b"Nobody inspects the spammish repetition", 0),
            0xFBCE_A83C_8A37_8BF1
        );
    }

    #[test]
    fn primes() {
        let small: Vec<usize> = (0..30).filter(|n| is_prime(*n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(4093));
        assert!(!is_prime(65_536));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(table(&[("a", 1)], 100), Err(MaglevError::NotPrime(100)));
        assert_eq!(
            table(&[("a", 0)], 7),
            Err(MaglevError::ZeroWeight("a".into()))
        );
        assert!(matches!(
            table(&[("a", 1), ("b", 1), ("c", 1)], 2),
            Err(MaglevError::TooManyHosts { .. })
        ));
        assert_eq!(table(&[], 7), Ok(vec![]));
        assert_eq!(choose(&[], 5), None);
    }

    #[test]
    fn default_size_spreads_three_hosts_evenly() {
        let hosts = [
            ("127.0.0.21:8080", 1),
            ("127.0.0.22:8080", 1),
            ("127.0.0.23:8080", 1),
        ];
        let t = table(&hosts, DEFAULT_TABLE_SIZE).unwrap();
        let mut counts = [0usize; 3];
        for h in &t {
            counts[*h as usize] += 1;
        }
        // Equal weights: every round gives each host one entry, so counts differ by at most 1.
        assert_eq!(counts.iter().sum::<usize>(), DEFAULT_TABLE_SIZE);
        assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1);
    }

    fn hosts_strategy() -> impl Strategy<Value = Vec<(String, u32)>> {
        proptest::collection::btree_map(
            (1u8..=250, 1u16..=9).prop_map(|(ip, port)| format!("10.0.0.{ip}:{port}")),
            1u32..=8,
            1..12,
        )
        .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #[test]
        fn shares_follow_weights(hosts in hosts_strategy(), size in prop::sample::select(vec![251usize, 1021, 4093])) {
            let refs: Vec<(&str, u32)> = hosts.iter().map(|(k, w)| (k.as_str(), *w)).collect();
            let t = table(&refs, size).unwrap();
            prop_assert_eq!(t.len(), size);
            let mut counts = vec![0f64; hosts.len()];
            for h in &t {
                counts[*h as usize] += 1.0;
            }
            let total: f64 = hosts.iter().map(|(_, w)| f64::from(*w)).sum();
            for (i, (_, w)) in hosts.iter().enumerate() {
                let want = size as f64 * f64::from(*w) / total;
                // Filling stops part-way through a round: each host is off by at most about
                // one entry per host.
                prop_assert!((counts[i] - want).abs() <= hosts.len() as f64 + 2.0,
                    "host {} weight {} got {} want {}", i, w, counts[i], want);
                prop_assert!(counts[i] >= 1.0);
            }
        }

        #[test]
        fn input_order_does_not_matter(hosts in hosts_strategy(), seed in any::<u64>()) {
            let refs: Vec<(&str, u32)> = hosts.iter().map(|(k, w)| (k.as_str(), *w)).collect();
            let mut shuffled = refs.clone();
            // A deterministic shuffle from the seed.
            let n = shuffled.len();
            for i in (1..n).rev() {
                let j = (xxhash64(&(seed ^ i as u64).to_le_bytes(), 7) % (i as u64 + 1)) as usize;
                shuffled.swap(i, j);
            }
            let a = table(&refs, 1021).unwrap();
            let b = table(&shuffled, 1021).unwrap();
            let ka: Vec<&str> = a.iter().map(|i| refs[*i as usize].0).collect();
            let kb: Vec<&str> = b.iter().map(|i| shuffled[*i as usize].0).collect();
            prop_assert_eq!(ka, kb);
        }

        #[test]
        fn removing_a_host_moves_few_other_entries(hosts in hosts_strategy()) {
            prop_assume!(hosts.len() >= 3);
            let all: Vec<(&str, u32)> = hosts.iter().map(|(k, _)| (k.as_str(), 1)).collect();
            let fewer: Vec<(&str, u32)> = all[1..].to_vec();
            let size = 4093;
            let a = table(&all, size).unwrap();
            let b = table(&fewer, size).unwrap();
            // Entries that did not belong to the removed host mostly keep their host
            // (Maglev's minimal disruption; the paper's bound is loose, so this one is too).
            let kept = a.iter().zip(&b).filter(|(x, y)| **x != 0 && all[**x as usize].0 == fewer[**y as usize].0).count();
            let others = a.iter().filter(|x| **x != 0).count();
            prop_assert!(kept * 10 >= others * 7, "kept {} of {}", kept, others);
        }
    }
}
