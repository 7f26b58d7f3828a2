//! Which partitions a consumer reads, from where, and the checks on its topics.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

/// How long a consumer with a full local queue waits before fetching again (see
/// [`reader_config`]).
const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// What every consumer of a service is configured with, whatever it reads: where the broker
/// is, how far it reads ahead (`queue_kb` of local queue) and how soon it fetches again once
/// that queue has room. Offsets are stored by the loop, not on receipt.
pub(super) fn reader_config(settings: &KafkaSettings, queue_kb: u32) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", settings.fetch_wait.as_millis().clamp(1, 500).to_string())
        .set("queued.max.messages.kbytes", queue_kb.to_string())
        // A consumer whose local queue is full (it fell a little behind: a few hundred large
        // messages fill it) fetches again only after this. librdkafka's default, 1 s, made a
        // consumer that fell behind under load fetch once a second and never catch up, and a
        // consumer replaying a log at start (always "behind") read ~2 MB a second.
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
        .set("socket.keepalive.enable", "true");
    if let Some(debug) = &settings.debug {
        config.set("debug", debug);
    }
    config
}

/// The librdkafka consumer for `spec`, and whether it reads a partitioned share (a group) rather
/// than every partition (a replica or live reader).
pub(super) fn create(
    env: &ConsumerEnv,
    spec: &ConsumerSpec,
) -> anyhow::Result<(Arc<StreamConsumer<GroupContext>>, bool)> {
    // A coalescing consumer looks further ahead: see `KafkaSettings::coalesce_queue_kb`.
    let queue_kb = if spec.coalesce.is_empty() {
        env.settings.consumer_queue_kb
    } else {
        env.settings.coalesce_queue_kb.max(env.settings.consumer_queue_kb)
    };
    let mut config = reader_config(&env.settings, queue_kb);
    config.set("statistics.interval.ms", env.settings.statistics_interval.as_millis().to_string());
    let is_group = match &spec.subscription {
        Subscription::Group { group_id } => {
            config.set("group.id", group_id).set("enable.auto.commit", "true").set("auto.commit.interval.ms", "1000");
            if env.settings.uses_group_protocol() {
                config.set("session.timeout.ms", "10000");
            }
            true
        }
        Subscription::Replica | Subscription::Live => {
            config
                .set("group.id", format!("{}-replica-{}", env.service, uuid::Uuid::new_v4()))
                .set("enable.auto.commit", "false");
            false
        }
    };
    let consumer: Arc<StreamConsumer<GroupContext>> = Arc::new(
        config
            .create_with_context(GroupContext {
                ready: env.ready.clone(),
                name: spec.name,
                generation: AtomicU64::new(0),
            })
            .context("creating the Kafka consumer")?,
    );
    Ok((consumer, is_group))
}

/// Flips the ready flag when the group assigns partitions, and counts the assignments.
pub(super) struct GroupContext {
    ready: ReadyFlag,
    name: &'static str,
    /// Assignments received from the group coordinator so far.
    generation: AtomicU64,
}

impl GroupContext {
    /// Assignments received from the group coordinator so far: a change means the partitions
    /// this consumer holds may have changed.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

impl ClientContext for GroupContext {
    /// librdkafka's statistics (every `KAFKA_STATISTICS_INTERVAL_MS`): the lag of each
    /// partition this consumer reads — the messages the broker holds that the consumer has not
    /// finished (handled, outputs acknowledged: its stored offset), whatever its subscription.
    /// Not the lag behind the committed offset: that trails by up to the commit interval, and
    /// replicas commit nothing. A partition it has finished nothing of yet reports nothing.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                let lag = if p.consumer_lag_stored >= 0 { p.consumer_lag_stored } else { p.consumer_lag };
                if *partition >= 0 && lag >= 0 {
                    let (topic, partition) = (topic.clone(), partition.to_string());
                    metrics::gauge!("kafka_consumer_lag", "consumer" => self.name, "topic" => topic, "partition" => partition)
                        .set(lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(consumer = self.name, partitions = tpl.count(), "partitions assigned");
                self.generation.fetch_add(1, Ordering::SeqCst);
                self.ready.set(true);
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(consumer = self.name, partitions = tpl.count(), "partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(consumer = self.name, error = %e, "rebalance error"),
        }
    }
}

/// The partitions of `topics` that `mine` selects, each starting at `start`.
pub(super) async fn assignment(
    consumer: Arc<StreamConsumer<GroupContext>>,
    topics: &[Topic],
    mine: impl Fn(i32) -> bool,
    start: Offset,
    shutdown: CancellationToken,
) -> anyhow::Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for &topic in topics {
        for id in partitions_of(Arc::clone(&consumer), topic, &shutdown).await?.into_iter().filter(|p| mine(*p)) {
            tpl.add_partition_offset(topic.name(), id, start)?;
        }
    }
    Ok(tpl)
}

/// The partition ids of `topic`, waiting for the broker (and for the topic) as long as it takes.
pub(super) async fn partitions_of(
    consumer: Arc<StreamConsumer<GroupContext>>,
    topic: Topic,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<i32>> {
    loop {
        let c = Arc::clone(&consumer);
        let fetched = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(topic.name()), Duration::from_secs(5))
                .map(|m| m.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect::<Vec<i32>>())
        })
        .await?;
        match fetched {
            Ok(ids) if !ids.is_empty() => return Ok(ids),
            Ok(_) => tracing::warn!(%topic, "topic has no partitions yet; waiting"),
            Err(e) => tracing::warn!(%topic, error = %e, "waiting for the broker"),
        }
        tokio::select! {
            () = shutdown.cancelled() => anyhow::bail!("shut down before the broker answered"),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// A consumer that reads several topics in one group joins them per user: a user's messages
/// must be on the same partition number in each, so the topics must have equal partition
/// counts. Refuses to start otherwise, naming the topics.
pub(super) async fn check_co_partitioned(
    consumer: &Arc<StreamConsumer<GroupContext>>,
    topics: &[Topic],
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut counts = Vec::with_capacity(topics.len());
    for &topic in topics {
        counts.push((topic, partitions_of(Arc::clone(consumer), topic, shutdown).await?.len()));
    }
    if counts.windows(2).any(|w| w[0].1 != w[1].1) {
        let list: Vec<String> = counts.iter().map(|(t, n)| format!("{t} has {n}")).collect();
        anyhow::bail!(
            "the topics this consumer joins per user are not co-partitioned ({}): give them the same number of partitions",
            list.join(", ")
        );
    }
    Ok(())
}

/// The end offset of each non-empty partition of `tpl`: what a replica must catch up with.
pub(super) async fn end_offsets(
    consumer: Arc<StreamConsumer<GroupContext>>,
    tpl: &TopicPartitionList,
) -> anyhow::Result<HashMap<(Topic, i32), i64>> {
    let partitions: Vec<(Topic, i32)> =
        tpl.elements().iter().filter_map(|e| Topic::from_name(e.topic()).map(|t| (t, e.partition()))).collect();
    let mut ends = HashMap::new();
    for (topic, id) in partitions {
        let c = Arc::clone(&consumer);
        let (low, high) =
            tokio::task::spawn_blocking(move || c.fetch_watermarks(topic.name(), id, Duration::from_secs(5)))
                .await?
                .context("reading watermarks")?;
        if high > low {
            ends.insert((topic, id), high);
        }
    }
    Ok(ends)
}
