//! A bounded set of recently seen ids: remembers the last `capacity` ids (FIFO eviction), so
//! memory stays bounded while redeliveries — which arrive soon after the original under
//! at-least-once delivery — are recognised.
//!
//! Nearly every consumer asks it once per message, and the feature store keeps one per user,
//! so an id is kept as its 128-bit fingerprint (XXH3-128 with a seed drawn once per
//! process), not as a string: 16 bytes in the FIFO and 16 in the set instead of a shared heap
//! string of ~50, one hash of the id per question and no allocation. Two different ids are taken for the same
//! one only if their fingerprints collide: with 200,000 ids kept, under one chance in 10^33
//! per id asked about (and the seed, unknown outside the process, keeps anyone from
//! arranging it).

use std::collections::VecDeque;
use std::sync::LazyLock;

use foldhash::HashSet;

/// The fingerprints' seed: drawn once per process (the feature store makes a set per new user,
/// and a draw per set would be a system call per new user).
static SEED: LazyLock<u64> = LazyLock::new(|| uuid::Uuid::new_v4().as_u64_pair().0);

#[derive(Debug, Clone)]
pub struct SeenSet {
    capacity: usize,
    order: VecDeque<u128>,
    set: HashSet<u128>,
}

impl SeenSet {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), order: VecDeque::new(), set: HashSet::default() }
    }

    fn fingerprint(id: &str) -> u128 {
        xxhash_rust::xxh3::xxh3_128_with_seed(id.as_bytes(), *SEED)
    }

    /// Records `id`; returns `false` if it was already there (a duplicate).
    pub fn insert(&mut self, id: &str) -> bool {
        let id = Self::fingerprint(id);
        if !self.set.insert(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(id);
        true
    }

    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(&Self::fingerprint(id))
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_up_to_capacity() {
        let mut s = SeenSet::new(2);
        assert!(s.insert("a"));
        assert!(!s.insert("a"));
        assert!(s.insert("b"));
        assert!(s.insert("c"));
        assert_eq!(s.len(), 2);
        assert!(!s.contains("a"), "the oldest id is forgotten");
        assert!(s.contains("b") && s.contains("c"));
    }

    #[test]
    fn distinct_ids_are_told_apart() {
        // Ids alike but for a character or two, as event ids are.
        let mut s = SeenSet::new(300_000);
        let ids: Vec<String> = (0..200_000).map(|n| format!("user-{}\u{1f}evt-{n:08}", n % 97)).collect();
        assert!(ids.iter().all(|id| s.insert(id)), "every distinct id is new");
        assert!(ids.iter().all(|id| !s.insert(id)), "every id again is a duplicate");
        assert_eq!(s.len(), ids.len());
        assert!(!s.contains("user-0\u{1f}evt-99999999"));
    }
}
