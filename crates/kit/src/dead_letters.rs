//! Replaying dead letters: each selected letter's original bytes, key and correlation id go
//! back to its source topic (after a fix). Shared by `retargetiq dead-letters replay` and the
//! event processor's operations endpoint.

use std::collections::HashSet;

use events::{DeadLetter, Topic};

use crate::kafka::producer::Outgoing;

/// The messages that replay `ids` (or every letter, with `all`) from `letters`; an unknown id
/// or an unreadable letter is an error naming it. A payload is replayed once however many
/// letters carry it (replaying a replayed message is the same event).
pub fn replay_plan(letters: &[DeadLetter], ids: &[String], all: bool) -> Result<Vec<Outgoing>, String> {
    if !all && ids.is_empty() {
        return Err("name the dead letters to replay, or ask for all".into());
    }
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let chosen: Vec<&DeadLetter> =
        letters.iter().filter(|l| all || wanted.contains(l.dead_letter_id.as_str())).collect();
    let found: HashSet<&str> = chosen.iter().map(|l| l.dead_letter_id.as_str()).collect();
    let mut missing: Vec<&str> = wanted.difference(&found).copied().collect();
    if !missing.is_empty() {
        missing.sort_unstable();
        return Err(format!("no dead letter with id {}", missing.join(", ")));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for l in chosen {
        if !seen.insert((l.source.topic.clone(), l.payload_base64.clone())) {
            continue;
        }
        let topic = Topic::from_name(&l.source.topic)
            .ok_or_else(|| format!("dead letter {} came from an unknown topic {}", l.dead_letter_id, l.source.topic))?;
        let payload =
            l.original_bytes().ok_or_else(|| format!("dead letter {} has no readable payload", l.dead_letter_id))?;
        out.push(Outgoing { topic, key: l.key.clone(), payload, correlation_id: l.correlation_id.clone() });
    }
    Ok(out)
}
