//! `retargetiq dead-letters`: list rejected messages, and send chosen ones back to their
//! source topic after a fix.
//!
//! A replay produces the original bytes, with the original key and correlation id, to the
//! topic the message came from, so it goes through validation and enrichment again. Replaying
//! twice creates no duplicates: the event processor drops an `eventId` it has already
//! processed, and its memory of ids survives restarts.

use std::time::Duration;

use events::{DeadLetter, Topic};
use kit::kafka::{KafkaSettings, Producer};

/// Every dead letter on the topic, oldest first within each partition.
pub async fn list(bootstrap_servers: &str) -> anyhow::Result<Vec<DeadLetter>> {
    let raw = kit::kafka::admin::read_to_end(bootstrap_servers, Topic::DeadLetter).await?;
    Ok(raw.iter().filter_map(|bytes| kit::json::from_bytes(bytes).ok()).collect())
}

/// One line per dead letter.
pub fn format_line(l: &DeadLetter) -> String {
    let reason: String = l.reason.chars().take(90).collect();
    format!(
        "{}  {}  {}[{}]@{}  {:?}  {}",
        l.dead_letter_id,
        l.failed_at.format("%Y-%m-%d %H:%M:%S"),
        l.source.topic,
        l.source.partition,
        l.source.offset,
        l.kind,
        reason
    )
}

/// Sends the dead letters with these ids (or all, when `ids` is empty and `all` is set) back
/// to their source topics. Returns how many were sent.
pub async fn replay(bootstrap_servers: &str, ids: &[String], all: bool) -> anyhow::Result<usize> {
    anyhow::ensure!(all || !ids.is_empty(), "name the dead letters to replay, or pass --all");
    let letters = list(bootstrap_servers).await?;
    let plan = kit::dead_letters::replay_plan(&letters, ids, all).map_err(anyhow::Error::msg)?;
    let producer = Producer::for_requests(&KafkaSettings::for_broker(bootstrap_servers))?;
    for out in &plan {
        producer.send_outgoing(out).await?;
    }
    producer.flush(Duration::from_secs(5)).await;
    Ok(plan.len())
}
