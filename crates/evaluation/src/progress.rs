//! Progress of a long pass, for the person waiting on it.

use std::time::{Duration, Instant};

/// How often a progress line is printed at most.
const EVERY: Duration = Duration::from_secs(2);

/// Says when a progress line is due: at most every 2 s (never for a pass shorter than that).
#[derive(Debug)]
pub struct Ticker {
    last: Instant,
}

impl Default for Ticker {
    fn default() -> Self {
        Self { last: Instant::now() }
    }
}

impl Ticker {
    /// True if the last line is 2 s old (and from now on it is this one).
    pub fn due(&mut self) -> bool {
        let due = self.last.elapsed() >= EVERY;
        if due {
            self.last = Instant::now();
        }
        due
    }
}

/// Prints `N of TOTAL WHAT` to stderr as work advances, when a line is [due](Ticker::due).
pub struct Progress {
    what: &'static str,
    total: usize,
    ticker: Ticker,
}

impl Progress {
    pub fn new(what: &'static str, total: usize) -> Self {
        Self { what, total, ticker: Ticker::default() }
    }

    /// Says that `done` of the total are done, if the last line is 2 s old.
    pub fn at(&mut self, done: usize) {
        if self.ticker.due() {
            eprintln!("{done} of {} {}", self.total, self.what);
        }
    }
}
