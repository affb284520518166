//! Earliest-deadline-first scheduling (Envoy's weighted round robin): each entry's next
//! deadline is `now + 1 / weight`, the earliest deadline is picked, ties go to the entry added
//! first. Over any window an entry is picked in proportion to its weight.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Debug, Clone, Copy)]
struct Entry {
    deadline: f64,
    order: u64,
    item: u32,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    // BinaryHeap is a max-heap: reverse so the earliest deadline (then the oldest) is on top.
    fn cmp(&self, o: &Self) -> Ordering {
        o.deadline
            .total_cmp(&self.deadline)
            .then_with(|| o.order.cmp(&self.order))
    }
}

/// An EDF scheduler over item indices.
#[derive(Debug, Clone, Default)]
pub struct Edf {
    heap: BinaryHeap<Entry>,
    now: f64,
    order: u64,
}

impl Edf {
    /// A scheduler with `items` (index, weight); weights <= 0 are left out.
    pub fn new(items: impl IntoIterator<Item = (u32, f64)>) -> Edf {
        let mut e = Edf::default();
        for (i, w) in items {
            e.add(i, w);
        }
        e
    }

    fn add(&mut self, item: u32, weight: f64) {
        if weight.is_finite() && weight > 0.0 {
            self.heap.push(Entry {
                deadline: self.now + 1.0 / weight,
                order: self.order,
                item,
            });
            self.order += 1;
        }
    }

    /// Pick the next item and re-add it with the weight `reweigh` gives it now (LEAST_REQUEST
    /// lowers the weight of busy hosts this way).
    pub fn pick(&mut self, reweigh: impl Fn(u32) -> f64) -> Option<u32> {
        let e = self.heap.pop()?;
        self.now = e.deadline;
        self.add(e.item, reweigh(e.item));
        Some(e.item)
    }

    /// Whether nothing can be picked.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_in_proportion_to_weights() {
        let w = [1.0, 2.0, 5.0];
        let mut e = Edf::new(w.iter().enumerate().map(|(i, w)| (i as u32, *w)));
        let mut seen = [0u32; 3];
        for _ in 0..800 {
            let i = e.pick(|i| w[i as usize]).unwrap();
            seen[i as usize] += 1;
        }
        assert_eq!(seen, [100, 200, 500]);
    }
}
