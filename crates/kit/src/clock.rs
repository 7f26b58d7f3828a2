//! Event time for work that runs on a timer (sweeps, reward windows): the latest event time
//! seen, advanced by the wall clock while no newer event arrives.
//!
//! Live, events carry the current time, so this is the wall clock. When a history is imported,
//! events arrive far faster than they happened: the clock follows their own times, so a cart
//! left 10 minutes (of event time) ago is not "abandoned for 30 minutes" just because the
//! history is years old; once the import ends the clock runs on from its last event, as if the
//! history had continued live. Events older than the clock (late, or an old history imported
//! into a live stack) do not move it back.

use std::time::Instant;

use chrono::{DateTime, TimeDelta, Utc};

/// See the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventClock {
    /// The latest event time, and when it was seen.
    latest: Option<(DateTime<Utc>, Instant)>,
}

impl EventClock {
    /// Takes the time of an event seen now.
    pub fn observe(&mut self, at: DateTime<Utc>) {
        if self.latest.is_none() || at > self.now() {
            self.latest = Some((at, Instant::now()));
        }
    }

    /// The current event time; the wall clock before any event was seen.
    pub fn now(&self) -> DateTime<Utc> {
        match self.latest {
            Some((at, seen)) => at + TimeDelta::from_std(seen.elapsed()).unwrap_or(TimeDelta::MAX),
            None => Utc::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_event_time_and_runs_on_from_it() {
        let mut clock = EventClock::default();
        assert!((Utc::now() - clock.now()).num_seconds().abs() < 1, "the wall clock before any event");
        let old = DateTime::parse_from_rfc3339("2019-10-01T10:00:00Z").expect("time").to_utc();
        clock.observe(old);
        assert!(clock.now() - old < TimeDelta::seconds(1), "an old history sets it back: {}", clock.now());
        clock.observe(old + TimeDelta::minutes(40));
        assert!(clock.now() >= old + TimeDelta::minutes(40));
        // A late event does not move it back.
        clock.observe(old);
        assert!(clock.now() >= old + TimeDelta::minutes(40));
        let before = clock.now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(clock.now() - before >= TimeDelta::milliseconds(20), "it runs on while no event comes");
    }
}
