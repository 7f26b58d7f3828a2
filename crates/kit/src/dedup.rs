//! A bounded set of recently seen ids: remembers the last `capacity` ids (FIFO eviction), so
//! memory stays bounded while redeliveries — which arrive soon after the original under
//! at-least-once delivery — are recognised.
//!
//! Nearly every consumer asks it once per message: each id is one allocation shared by the
//! FIFO and the set, hashed with foldhash (seeded per process, like [`crate::state::UserMap`]).

use std::collections::VecDeque;
use std::sync::Arc;

use foldhash::HashSet;

#[derive(Debug, Clone)]
pub struct SeenSet {
    capacity: usize,
    order: VecDeque<Arc<str>>,
    set: HashSet<Arc<str>>,
}

impl SeenSet {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), order: VecDeque::new(), set: HashSet::default() }
    }

    /// Records `id`; returns `false` if it was already there (a duplicate).
    pub fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        let id: Arc<str> = Arc::from(id);
        self.order.push_back(Arc::clone(&id));
        self.set.insert(id);
        true
    }

    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
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
}
