//! Progress of a long pass, for the person waiting on it.

use std::time::{Duration, Instant};

/// How often a progress line is printed at most.
const EVERY: Duration = Duration::from_secs(2);

/// Prints `N of TOTAL WHAT` to stderr as work advances, at most every 2 s (nothing for a pass
/// shorter than that).
pub struct Progress {
    what: &'static str,
    total: usize,
    last: Instant,
}

impl Progress {
    pub fn new(what: &'static str, total: usize) -> Self {
        Self { what, total, last: Instant::now() }
    }

    /// Says that `done` of the total are done, if the last line is 2 s old.
    pub fn at(&mut self, done: usize) {
        if self.last.elapsed() >= EVERY {
            eprintln!("{done} of {} {}", self.total, self.what);
            self.last = Instant::now();
        }
    }
}
