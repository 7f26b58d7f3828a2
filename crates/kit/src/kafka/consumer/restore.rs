//! Rebuilding a handler's state from its partitions before it consumes for real.

use super::*;

/// Replays `tpl`'s partitions of the topics `spec` restores from, from the beginning up to the
/// offsets committed for the group, through the handler, discarding its outputs: the handler's
/// state is then what it was when those offsets were committed. Returns those offsets (per
/// topic and partition; partitions with nothing committed, and those of topics not restored
/// from, are absent). Stops early (with a warning) if the broker sends nothing
/// for 10 s, so a gap in the log cannot hang a start.
pub(super) async fn restore<H: Handler>(
    env: &ConsumerEnv,
    spec: &ConsumerSpec,
    handler: &mut H,
    group: Arc<StreamConsumer<GroupContext>>,
    tpl: &TopicPartitionList,
) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let query = tpl.clone();
    let committed = tokio::task::spawn_blocking(move || group.committed_offsets(query, Duration::from_secs(10)))
        .await?
        .context("reading committed offsets")?;
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    let mut replay_tpl = TopicPartitionList::new();
    let replayed = |name: &str| spec.restore.iter().any(|t| t.name() == name);
    for e in committed.elements() {
        if let Offset::Offset(end) = e.offset()
            && end > 0
            && replayed(e.topic())
        {
            ends.insert((e.topic().to_owned(), e.partition()), end);
            replay_tpl.add_partition_offset(e.topic(), e.partition(), Offset::Beginning)?;
        }
    }
    let restored = ends.clone();
    if ends.is_empty() {
        return Ok(restored);
    }
    let replay: StreamConsumer =
        replay_config(&env.settings, env.service).create().context("creating the restore consumer")?;
    replay.assign(&replay_tpl).context("assigning partitions to restore")?;
    let (started, mut count) = (Instant::now(), 0_u64);
    while !ends.is_empty() {
        let msg = tokio::select! {
            () = env.shutdown.cancelled() => anyhow::bail!("shut down while restoring"),
            m = tokio::time::timeout(Duration::from_secs(10), replay.recv()) => match m {
                Ok(m) => m.context("reading while restoring")?,
                Err(_) => {
                    tracing::warn!(consumer = spec.name, remaining = ends.len(), "nothing more to restore from; continuing");
                    break;
                }
            },
        };
        let key = (msg.topic().to_owned(), msg.partition());
        let Some(&end) = ends.get(&key) else { continue };
        if msg.offset() < end
            && let Some(topic) = Topic::from_name(msg.topic())
        {
            let record = Record::of(&msg, topic);
            // Messages the handler rejects were dead-lettered the first time round.
            let _ = handler.handle(&record, &mut Outbox::replaying());
            count += 1;
        }
        if msg.offset() + 1 >= end {
            ends.remove(&key);
        }
    }
    metrics::counter!("consumer_restored_messages_total", "consumer" => spec.name).increment(count);
    tracing::info!(consumer = spec.name, messages = count, elapsed = ?started.elapsed(), "state restored");
    Ok(restored)
}

/// The replaying consumer's configuration: the service's other consumers' (with librdkafka's
/// own backoff for a full queue, 1 s, a replay — whose queue is full whenever the handler is
/// not faster than the broker — read about 2 MB a second: rl-offer took 300 s to replay 1.2
/// million messages), outside any group's offsets.
fn replay_config(settings: &KafkaSettings, service: &str) -> ClientConfig {
    let mut config = reader_config(settings, settings.consumer_queue_kb);
    config.set("group.id", format!("{service}-restore-{}", uuid::Uuid::new_v4())).set("enable.auto.commit", "false");
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_fetches_again_as_soon_as_its_queue_has_room() {
        let settings = KafkaSettings::for_broker("127.0.0.1:9092");
        let config = replay_config(&settings, "rl-offer");
        assert_eq!(config.get("fetch.queue.backoff.ms"), reader_config(&settings, 1).get("fetch.queue.backoff.ms"));
        assert!(config.get("fetch.queue.backoff.ms").and_then(|ms| ms.parse::<u32>().ok()).is_some_and(|ms| ms <= 10));
        assert_eq!(config.get("queued.max.messages.kbytes"), Some(settings.consumer_queue_kb.to_string().as_str()));
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert!(config.get("group.id").is_some_and(|g| g.starts_with("rl-offer-restore-")));
    }
}
