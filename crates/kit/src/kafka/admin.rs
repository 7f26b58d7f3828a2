//! Topic creation. Tansu does not create topics on first produce, and a real cluster should
//! not either, so every tool that starts the platform creates the topics explicitly.

use std::time::Duration;

use anyhow::Context as _;
use events::Topic;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

/// Creates every topic of the platform that does not exist yet. Retries until the broker
/// answers or `patience` runs out.
pub async fn ensure_topics(bootstrap_servers: &str, replication_factor: i32, patience: Duration) -> anyhow::Result<()> {
    let topics: Vec<TopicSpec<'_>> =
        Topic::ALL.iter().map(|t| (t.name().to_owned(), t.default_partitions(), t.configs())).collect();
    create_topics(bootstrap_servers, &topics, replication_factor, patience).await
}

/// A topic to create: name, partitions, configuration (key, value).
type TopicSpec<'a> = (String, i32, &'a [(&'a str, &'a str)]);

/// Creates the named topics (name, partitions) that do not exist yet.
pub async fn ensure_named_topics(
    bootstrap_servers: &str,
    topics: &[(String, i32)],
    replication_factor: i32,
    patience: Duration,
) -> anyhow::Result<()> {
    let topics: Vec<TopicSpec<'_>> = topics.iter().map(|(n, p)| (n.clone(), *p, &[][..])).collect();
    create_topics(bootstrap_servers, &topics, replication_factor, patience).await
}

/// Creates the topics (name, partitions, configuration) that do not exist yet.
async fn create_topics(
    bootstrap_servers: &str,
    topics: &[TopicSpec<'_>],
    replication_factor: i32,
    patience: Duration,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .create()
        .context("creating the Kafka admin client")?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions, configs)| {
            configs.iter().fold(
                NewTopic::new(name, *partitions, TopicReplication::Fixed(replication_factor)),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let last_error = match admin.create_topics(&new, &options).await {
            Ok(results) => {
                let failures: Vec<String> = results
                    .into_iter()
                    .filter_map(|r| match r {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => None,
                        Err((name, code)) => Some(format!("{name}: {code}")),
                    })
                    .collect();
                if failures.is_empty() {
                    tracing::info!(count = topics.len(), "topics ready");
                    return Ok(());
                }
                failures.join(", ")
            }
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("could not create topics on {bootstrap_servers}: {last_error}");
        }
        tracing::debug!(error = %last_error, "broker not ready for topic creation yet; retrying");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The partitions of `topic` that `partitions` selects, with their start and end offsets as
/// the broker has them now (one request per selected partition; blocking: for
/// `spawn_blocking`).
pub(crate) fn watermarks<C: rdkafka::consumer::ConsumerContext>(
    client: &impl rdkafka::consumer::Consumer<C>,
    topic: events::Topic,
    partitions: impl Fn(i32) -> bool,
    timeout: Duration,
) -> rdkafka::error::KafkaResult<Vec<(i32, i64, i64)>> {
    let metadata = client.fetch_metadata(Some(topic.name()), timeout)?;
    let mut ranges = Vec::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()).filter(|p| partitions(p.id())) {
        let (low, high) = client.fetch_watermarks(topic.name(), p.id(), timeout)?;
        ranges.push((p.id(), low, high));
    }
    Ok(ranges)
}

/// How many messages `topic` holds now (end minus start offset, summed over its partitions).
pub async fn message_count(bootstrap_servers: &str, topic: events::Topic) -> anyhow::Result<i64> {
    use rdkafka::consumer::BaseConsumer;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", format!("retargetiq-counter-{}", uuid::Uuid::new_v4()))
        .create()
        .context("creating a reader")?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<i64> {
        let ranges = watermarks(&consumer, topic, |_| true, Duration::from_secs(10))?;
        Ok(ranges.iter().map(|(_, low, high)| (high - low).max(0)).sum())
    })
    .await?
}

/// Every message of `topic` as it is now (all partitions, from the beginning up to the end
/// offsets read at the start), in partition order: for tools and tests.
pub async fn read_to_end(bootstrap_servers: &str, topic: events::Topic) -> anyhow::Result<Vec<Vec<u8>>> {
    collect_range(bootstrap_servers, topic, |low, _| low).await
}

/// Hands every message of the partitions of `topic` that `partitions` selects to `each`, as
/// they arrive (from the beginning up to the end offsets read at the start, in partition
/// order): for a service that rebuilds its state from a whole log, which holds only what
/// `each` keeps rather than the log.
pub async fn for_each_in_partitions(
    bootstrap_servers: &str,
    topic: events::Topic,
    partitions: impl Fn(i32) -> bool + Send + 'static,
    each: impl FnMut(&[u8]),
) -> anyhow::Result<()> {
    read_range(bootstrap_servers, topic, partitions, |low, _| low, each).await
}

/// The last `n` messages of each partition of `topic` (fewer where a partition holds fewer):
/// for a service that resumes from the newest state it published.
pub async fn read_tail(bootstrap_servers: &str, topic: events::Topic, n: i64) -> anyhow::Result<Vec<Vec<u8>>> {
    collect_range(bootstrap_servers, topic, move |low, high| (high - n).max(low)).await
}

/// The messages of every partition of `topic` from `start(low, high)`, as [`read_range`]
/// hands them, collected.
async fn collect_range(
    bootstrap_servers: &str,
    topic: events::Topic,
    start: impl Fn(i64, i64) -> i64 + Send + 'static,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    read_range(bootstrap_servers, topic, |_| true, start, |m| out.push(m.to_vec())).await?;
    Ok(out)
}

/// Hands `each` the messages of the selected partitions from `start(low, high)` up to the end
/// offset read at the start, in partition order.
async fn read_range(
    bootstrap_servers: &str,
    topic: events::Topic,
    partitions: impl Fn(i32) -> bool + Send + 'static,
    start: impl Fn(i64, i64) -> i64 + Send + 'static,
    each: impl FnMut(&[u8]),
) -> anyhow::Result<()> {
    let consumer = std::sync::Arc::new(reader(bootstrap_servers)?);
    read_from(&consumer, topic, partitions, move |_, low, high| start(low, high), each).await.map(|_| ())
}

/// A consumer outside any group (nothing committed), for the readers of this module.
fn reader(bootstrap_servers: &str) -> anyhow::Result<rdkafka::consumer::StreamConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", format!("retargetiq-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("creating a reader")
}

/// Hands `each` the messages of the selected partitions from `start(partition, low, high)` up
/// to the end offset read at the start, in partition order, and returns each selected
/// partition's end offset. The consumer is left assigned to nothing (an assigned partition
/// is fetched in the background whether or not anyone reads it).
async fn read_from(
    consumer: &std::sync::Arc<rdkafka::consumer::StreamConsumer>,
    topic: events::Topic,
    partitions: impl Fn(i32) -> bool + Send + 'static,
    start: impl Fn(i32, i64, i64) -> i64 + Send + 'static,
    mut each: impl FnMut(&[u8]),
) -> anyhow::Result<Vec<(i32, i64)>> {
    use rdkafka::consumer::Consumer as _;
    use rdkafka::message::Message as _;
    use rdkafka::{Offset, TopicPartitionList};

    let c = std::sync::Arc::clone(consumer);
    let ranges = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(i32, i64, i64)>> {
        let ranges = watermarks(&*c, topic, partitions, Duration::from_secs(10))?;
        Ok(ranges.into_iter().map(|(p, low, high)| (p, start(p, low, high).clamp(low, high), high)).collect())
    })
    .await??;
    let ends: Vec<(i32, i64)> = ranges.iter().map(|(p, _, high)| (*p, *high)).collect();
    let to_read: Vec<(i32, i64, i64)> = ranges.into_iter().filter(|(_, from, high)| high > from).collect();
    if to_read.is_empty() {
        return Ok(ends);
    }
    let mut tpl = TopicPartitionList::new();
    for (p, from, _) in &to_read {
        tpl.add_partition_offset(topic.name(), *p, Offset::Offset(*from))?;
    }
    consumer.assign(&tpl)?;
    let mut remaining: std::collections::HashMap<i32, i64> = to_read.into_iter().map(|(p, _, end)| (p, end)).collect();
    let read = async {
        while !remaining.is_empty() {
            let msg = tokio::time::timeout(Duration::from_secs(10), consumer.recv())
                .await
                .context("the broker stopped sending before the end of the topic")??;
            let Some(&end) = remaining.get(&msg.partition()) else { continue };
            if msg.offset() < end {
                each(msg.payload().unwrap_or_default());
            }
            if msg.offset() + 1 >= end {
                remaining.remove(&msg.partition());
            }
        }
        anyhow::Ok(())
    }
    .await;
    consumer.unassign()?;
    read.map(|()| ends)
}

/// The newest messages of a topic as it grows: each [`TailReader::read_new`] returns what the
/// topic's partitions gained since the previous call, at most the last `n` of each partition
/// (the first call: the last `n` of each). For a view of the latest few messages, such as the
/// UI's live feed: it reads only when asked, so a busy topic costs it nothing per message
/// written — where a consumer following the topic fetches and hands over every one.
pub struct TailReader {
    consumer: std::sync::Arc<rdkafka::consumer::StreamConsumer>,
    topic: events::Topic,
    /// Per partition, the offset after the last one read (or skipped).
    next: std::collections::HashMap<i32, i64>,
}

impl TailReader {
    pub fn new(bootstrap_servers: &str, topic: events::Topic) -> anyhow::Result<Self> {
        Ok(Self { consumer: std::sync::Arc::new(reader(bootstrap_servers)?), topic, next: Default::default() })
    }

    /// What each partition gained since the last call, at most its newest `n`, in partition
    /// order (offset order within a partition).
    pub async fn read_new(&mut self, n: i64) -> anyhow::Result<Vec<Vec<u8>>> {
        let next = self.next.clone();
        let from = move |p: i32, low: i64, high: i64| next.get(&p).copied().unwrap_or(low).max(high - n.max(0));
        let mut out = Vec::new();
        let ends = read_from(&self.consumer, self.topic, |_| true, from, |m| out.push(m.to_vec())).await?;
        self.next.extend(ends);
        Ok(out)
    }
}

/// The broker's cluster id, asked until it answers (a warning every 30 s while it does not);
/// `None` if `shutdown` comes first.
pub async fn cluster_id(bootstrap_servers: &str, shutdown: &tokio_util::sync::CancellationToken) -> Option<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let started = std::time::Instant::now();
    let mut warned = Duration::ZERO;
    loop {
        let servers = bootstrap_servers.to_owned();
        let asked = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<String>> {
            let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &servers).create()?;
            Ok(client.client().fetch_cluster_id(Duration::from_secs(5)))
        });
        tokio::select! {
            () = shutdown.cancelled() => return None,
            asked = asked => match asked {
                Ok(Ok(Some(id))) => return Some(id),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!(error = format!("{e:#}"), "cannot create a Kafka client"),
                Err(e) => tracing::warn!(error = %e, "asking the broker for its cluster id"),
            },
        }
        if started.elapsed() >= warned + Duration::from_secs(30) {
            warned = started.elapsed();
            tracing::warn!(bootstrap_servers, "the broker does not answer yet (asking for its cluster id)");
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
