//! The at-least-once consumer loop.
//!
//! - Offsets are stored (`enable.auto.offset.store=false`) only after the handler succeeded
//!   and every message it produced was acknowledged by the broker; librdkafka commits stored
//!   offsets every second, and the loop commits synchronously on shutdown.
//! - Produces are pipelined: the loop keeps reading while earlier outputs are in flight (up
//!   to [`MAX_IN_FLIGHT`] messages), and stores offsets in the order messages were read.
//! - A handler that [`HandlerError::Reject`]s a message sends it straight to
//!   `dead-letter-topic`; one that fails with [`HandlerError::Retry`] is retried with backoff
//!   up to `KAFKA_HANDLER_MAX_ATTEMPTS` times, then dead-lettered. Either way the partition
//!   keeps flowing. A dead letter keeps the original bytes, the source topic, partition and
//!   offset, the reason and the time.
//! - Handlers are plain synchronous functions of (state, record) -> outputs, unit-testable
//!   with no broker. Because delivery is at-least-once, a handler must be idempotent: after a
//!   crash it may see a message again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use events::validate::FieldError;
use events::{CORRELATION_HEADER, DeadLetter, DeadLetterKind, Message, SourceRef, Topic};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::producer::{Outgoing, ProduceError, Producer};
use super::{Assignment, KafkaSettings};
use crate::http::ReadyFlag;

/// Most messages whose outputs may be awaiting acknowledgement at once.
pub const MAX_IN_FLIGHT: usize = 1_000;

/// How a consumer reads its topics.
#[derive(Debug, Clone)]
pub enum Subscription {
    /// The instances of a service share the partitions (see [`super::Assignment`]), and the
    /// offsets committed under `group_id` say where to resume.
    Group { group_id: String },
    /// Read every partition from the beginning, outside any group: a full replica of the
    /// topics, for views and models that every instance needs whole. Ready once it has
    /// caught up with the end of the topics as they were at start.
    Replica,
    /// Every partition from the end, outside any group: what happens from now on, for live
    /// feeds. Ready at once; nothing is replayed or committed.
    Live,
}

/// What to consume.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// A short name for logs and metrics (`processed-events`, ...).
    pub name: &'static str,
    pub topics: Vec<Topic>,
    pub subscription: Subscription,
    /// Rebuild the handler's state on start: replay this instance's partitions from the
    /// beginning up to the committed offsets, outputs discarded, before consuming for real.
    /// For handlers whose state is a function of their input (static assignment only).
    pub restore: bool,
}

impl ConsumerSpec {
    /// A partitioned consumer whose offsets are committed under `group_id`.
    pub fn group(name: &'static str, topics: impl Into<Vec<Topic>>, group_id: &str) -> Self {
        Self {
            name,
            topics: topics.into(),
            subscription: Subscription::Group { group_id: group_id.to_owned() },
            restore: false,
        }
    }

    /// A replica of `topics` (every partition, from the beginning).
    pub fn replica(name: &'static str, topics: impl Into<Vec<Topic>>) -> Self {
        Self { name, topics: topics.into(), subscription: Subscription::Replica, restore: false }
    }

    /// Every partition of `topics` from the end (see [`Subscription::Live`]).
    pub fn live(name: &'static str, topics: impl Into<Vec<Topic>>) -> Self {
        Self { name, topics: topics.into(), subscription: Subscription::Live, restore: false }
    }

    /// The same consumer, restoring its state on start (see [`ConsumerSpec::restore`]).
    pub fn restoring(self) -> Self {
        Self { restore: true, ..self }
    }
}

/// One consumed message, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub topic: Topic,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a str>,
    pub payload: &'a [u8],
    pub correlation_id: Option<&'a str>,
    /// Broker or producer timestamp, in milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
}

impl<'a> Record<'a> {
    /// The record of a consumed message of `topic`.
    fn of(msg: &'a BorrowedMessage<'_>, topic: Topic) -> Self {
        Record {
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().and_then(|k| std::str::from_utf8(k).ok()),
            payload: msg.payload().unwrap_or_default(),
            correlation_id: msg
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == CORRELATION_HEADER).and_then(|h| h.value))
                .and_then(|v| std::str::from_utf8(v).ok()),
            timestamp_ms: msg.timestamp().to_millis(),
        }
    }

    /// Decodes the payload as a typed message; a payload that does not decode is rejected as
    /// malformed.
    pub fn json<M: DeserializeOwned>(&self) -> Result<M, HandlerError> {
        serde_json::from_slice(self.payload)
            .map_err(|e| HandlerError::malformed(format!("payload is not a valid message: {e}")))
    }

    /// The payload as a JSON value (rejected as malformed when it is not JSON).
    pub fn value(&self) -> Result<serde_json::Value, HandlerError> {
        serde_json::from_slice(self.payload).map_err(|e| HandlerError::malformed(format!("payload is not JSON: {e}")))
    }

    /// Where this record was read from.
    pub fn source(&self) -> SourceRef {
        SourceRef { topic: self.topic.name().to_owned(), partition: self.partition, offset: self.offset }
    }
}

/// Why a handler did not process a message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The message can never be processed: it goes to the dead-letter topic at once.
    #[error("{reason}")]
    Reject { kind: DeadLetterKind, reason: String, field: Option<String> },
    /// Processing failed in a way that may pass on another try.
    #[error("{0:#}")]
    Retry(anyhow::Error),
}

impl HandlerError {
    pub fn malformed(reason: impl Into<String>) -> Self {
        HandlerError::Reject { kind: DeadLetterKind::Malformed, reason: reason.into(), field: None }
    }

    pub fn invalid(e: FieldError) -> Self {
        HandlerError::Reject { kind: DeadLetterKind::Invalid, reason: e.to_string(), field: Some(e.field) }
    }
}

/// The messages a handler produces for one input, sent after it returns.
#[derive(Debug, Default)]
pub struct Outbox {
    messages: Vec<Outgoing>,
    correlation_id: Option<String>,
    replay: bool,
}

impl Outbox {
    /// An outbox whose messages carry `correlation_id` (taken from the input's header).
    pub fn new(correlation_id: Option<&str>) -> Self {
        Self { messages: Vec::new(), correlation_id: correlation_id.map(str::to_owned), replay: false }
    }

    /// The outbox of a message replayed to restore state: whatever is queued is discarded.
    pub fn replaying() -> Self {
        Self { replay: true, ..Self::default() }
    }

    /// Whether the input is a replay (state restore at start) rather than a new message: a
    /// handler whose decisions are not a function of its input (random exploration, timers)
    /// rebuilds its state and decides nothing.
    pub fn is_replay(&self) -> bool {
        self.replay
    }

    /// Queues a typed message for its topic, keyed by its key.
    pub fn send<M: Message>(&mut self, msg: &M) {
        match Outgoing::encode(msg, self.correlation_id.as_deref()) {
            Ok(out) => self.messages.push(out),
            // Our message types always serialize; if one ever did not, losing it silently
            // would be wrong, so make it loud.
            Err(e) => tracing::error!(error = %e, topic = %M::TOPIC, "could not encode an output message"),
        }
    }

    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// Sets the correlation id for the messages queued from now on.
    pub fn set_correlation_id(&mut self, id: impl Into<String>) {
        self.correlation_id = Some(id.into());
    }

    /// The queued messages (for tests).
    pub fn messages(&self) -> &[Outgoing] {
        &self.messages
    }

    /// The queued messages of type `M`, decoded (for tests).
    pub fn decoded<M: Message>(&self) -> Vec<M> {
        self.messages
            .iter()
            .filter(|m| m.topic == M::TOPIC)
            .filter_map(|m| serde_json::from_slice(&m.payload).ok())
            .collect()
    }

    pub fn into_messages(self) -> Vec<Outgoing> {
        self.messages
    }
}

/// A service's logic for one kind of input.
pub trait Handler: Send + 'static {
    /// Processes one record, queueing outputs in `out`. Must be idempotent (see module docs).
    fn handle(&mut self, record: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError>;
}

/// What a running consumer needs from its service.
#[derive(Clone)]
pub struct ConsumerEnv {
    pub settings: KafkaSettings,
    pub service: &'static str,
    pub producer: Producer,
    pub shutdown: CancellationToken,
    pub ready: ReadyFlag,
}

/// Runs a consumer until shutdown; an error ends it (and its service: see `crate::service`).
pub async fn run_consumer<H: Handler>(env: ConsumerEnv, spec: ConsumerSpec, mut handler: H) -> anyhow::Result<()> {
    // No restart here: the handler's state holds what it has seen, and replaying the
    // partitions from the committed offsets into that state would count messages twice (or,
    // for ids marked seen before their outputs were acknowledged, drop them). The service
    // ends instead, and its supervisor starts it afresh (see `crate::service`).
    run_once(&env, &spec, &mut handler).await.inspect_err(|_| {
        env.ready.set(false);
        metrics::counter!("consumer_failures_total", "consumer" => spec.name).increment(1);
    })
}

/// Flips the ready flag when the group assigns partitions.
struct GroupContext {
    ready: ReadyFlag,
    name: &'static str,
}

impl ClientContext for GroupContext {
    /// librdkafka's statistics (every 5 s): the lag of each partition this consumer reads.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    let (topic, partition) = (topic.clone(), partition.to_string());
                    metrics::gauge!("kafka_consumer_lag", "consumer" => self.name, "topic" => topic, "partition" => partition)
                        .set(p.consumer_lag as f64);
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
                self.ready.set(true);
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(consumer = self.name, partitions = tpl.count(), "partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(consumer = self.name, error = %e, "rebalance error"),
        }
    }
}

/// A copy of what is needed to dead-letter a record after its outputs failed.
struct InFlight {
    topic: Topic,
    partition: i32,
    offset: i64,
    key: Option<String>,
    payload: Vec<u8>,
    correlation_id: Option<String>,
}

type Pending = BoxFuture<'static, (InFlight, Result<(), ProduceError>)>;

async fn run_once<H: Handler>(env: &ConsumerEnv, spec: &ConsumerSpec, handler: &mut H) -> anyhow::Result<()> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &env.settings.bootstrap_servers)
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", env.settings.fetch_wait.as_millis().clamp(1, 500).to_string())
        .set("queued.max.messages.kbytes", env.settings.consumer_queue_kb.to_string())
        .set("statistics.interval.ms", "5000")
        .set("socket.keepalive.enable", "true");
    if let Some(debug) = &env.settings.debug {
        config.set("debug", debug);
    }
    let is_group = match &spec.subscription {
        Subscription::Group { group_id } => {
            config.set("group.id", group_id).set("enable.auto.commit", "true").set("auto.commit.interval.ms", "1000");
            if env.settings.assignment == Assignment::Group {
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
            .create_with_context(GroupContext { ready: env.ready.clone(), name: spec.name })
            .context("creating the Kafka consumer")?,
    );
    let names: Vec<&str> = spec.topics.iter().map(|t| t.name()).collect();

    // For a replica: the end offsets to catch up with before the view counts as restored.
    let mut catch_up: HashMap<(Topic, i32), i64> = HashMap::new();
    if is_group && spec.topics.len() > 1 {
        check_co_partitioned(&consumer, &spec.topics, &env.shutdown).await?;
    }
    if is_group && env.settings.assignment == Assignment::Group {
        consumer.subscribe(&names).context("subscribing")?;
    } else if is_group {
        let mine = |p: i32| env.settings.owns(p);
        let tpl = assignment(Arc::clone(&consumer), &spec.topics, mine, Offset::Stored, env.shutdown.clone()).await?;
        if spec.restore {
            restore(env, spec, handler, Arc::clone(&consumer), &tpl).await?;
        }
        consumer.assign(&tpl).context("assigning partitions")?;
        tracing::info!(
            consumer = spec.name,
            partitions = tpl.count(),
            instance = env.settings.instance_index,
            of = env.settings.instance_count,
            "partitions assigned"
        );
        env.ready.set(true);
    } else if matches!(spec.subscription, Subscription::Live) {
        let tpl = assignment(Arc::clone(&consumer), &spec.topics, |_| true, Offset::End, env.shutdown.clone()).await?;
        consumer.assign(&tpl).context("assigning partitions")?;
        env.ready.set(true);
        tracing::info!(consumer = spec.name, partitions = tpl.count(), "following the topics from their end");
    } else {
        let tpl =
            assignment(Arc::clone(&consumer), &spec.topics, |_| true, Offset::Beginning, env.shutdown.clone()).await?;
        let ends = end_offsets(Arc::clone(&consumer), &tpl).await?;
        consumer.assign(&tpl).context("assigning partitions")?;
        catch_up = ends;
        if catch_up.is_empty() {
            env.ready.set(true);
        }
        tracing::info!(consumer = spec.name, partitions = tpl.count(), behind = catch_up.len(), "replica assigned");
    }

    let mut in_flight: FuturesOrdered<Pending> = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            () = env.shutdown.cancelled() => break,
            Some((done, result)) = in_flight.next(), if !in_flight.is_empty() => {
                complete(env, spec, &consumer, is_group, done, result).await?;
            }
            received = consumer.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let msg = match received {
                    Ok(msg) => msg,
                    Err(e) => {
                        tracing::warn!(consumer = spec.name, error = %e, "consumer error");
                        continue;
                    }
                };
                let (topic, partition, pending) = process(env, spec, handler, &msg).await?;
                if !catch_up.is_empty() {
                    let tp = (topic, partition);
                    if catch_up.get(&tp).is_some_and(|end| msg.offset() + 1 >= *end) {
                        catch_up.remove(&tp);
                        if catch_up.is_empty() {
                            tracing::info!(consumer = spec.name, "replica caught up");
                            env.ready.set(true);
                        }
                    }
                }
                in_flight.push_back(pending);
            }
        }
    }

    // Drain: wait (bounded) for outputs in flight, store their offsets, commit.
    let drain = async {
        while let Some((done, result)) = in_flight.next().await {
            complete(env, spec, &consumer, is_group, done, result).await?;
        }
        anyhow::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(5), drain).await {
        Ok(r) => r?,
        Err(_) => tracing::warn!(
            consumer = spec.name,
            "shutdown: outputs still in flight after 5 s; they will be re-processed"
        ),
    }
    if is_group {
        let c = Arc::clone(&consumer);
        match tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await? {
            Ok(()) => tracing::info!(consumer = spec.name, "offsets committed on shutdown"),
            // Nothing stored since the last commit is reported as an error by librdkafka.
            Err(e) => tracing::debug!(consumer = spec.name, error = %e, "final commit"),
        }
    }
    Ok(())
}

/// Replays `tpl`'s partitions from the beginning up to the offsets committed for the group,
/// through the handler, discarding its outputs: the handler's state is then what it was when
/// those offsets were committed. Stops early (with a warning) if the broker sends nothing
/// for 10 s, so a gap in the log cannot hang a start.
async fn restore<H: Handler>(
    env: &ConsumerEnv,
    spec: &ConsumerSpec,
    handler: &mut H,
    group: Arc<StreamConsumer<GroupContext>>,
    tpl: &TopicPartitionList,
) -> anyhow::Result<()> {
    let query = tpl.clone();
    let committed = tokio::task::spawn_blocking(move || group.committed_offsets(query, Duration::from_secs(10)))
        .await?
        .context("reading committed offsets")?;
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    let mut replay_tpl = TopicPartitionList::new();
    for e in committed.elements() {
        if let Offset::Offset(end) = e.offset()
            && end > 0
        {
            ends.insert((e.topic().to_owned(), e.partition()), end);
            replay_tpl.add_partition_offset(e.topic(), e.partition(), Offset::Beginning)?;
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    let replay: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.settings.bootstrap_servers)
        .set("group.id", format!("{}-restore-{}", env.service, uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", env.settings.consumer_queue_kb.to_string())
        .create()
        .context("creating the restore consumer")?;
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
    Ok(())
}

/// The partitions of `topics` that `mine` selects, each starting at `start`.
async fn assignment(
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
async fn partitions_of(
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
async fn check_co_partitioned(
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
async fn end_offsets(
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

/// Runs the handler (with retries) on one message and enqueues its outputs.
async fn process<H: Handler>(
    env: &ConsumerEnv,
    spec: &ConsumerSpec,
    handler: &mut H,
    msg: &BorrowedMessage<'_>,
) -> anyhow::Result<(Topic, i32, Pending)> {
    let topic = Topic::from_name(msg.topic()).with_context(|| format!("message from unknown topic {}", msg.topic()))?;
    let record = Record::of(msg, topic);
    let started = Instant::now();
    let mut attempt = 0;
    // Every log line about this message carries its correlation id.
    let span = tracing::info_span!(
        "message",
        correlation_id = record.correlation_id.unwrap_or(""),
        topic = %topic,
        partition = record.partition,
        offset = record.offset
    );
    let outputs = loop {
        attempt += 1;
        let mut out = Outbox::new(record.correlation_id);
        match span.in_scope(|| handler.handle(&record, &mut out)) {
            Ok(()) => {
                metrics::counter!("consumer_messages_total", "consumer" => spec.name, "outcome" => "ok").increment(1);
                break out.into_messages();
            }
            Err(HandlerError::Retry(e)) if attempt < env.settings.handler_max_attempts => {
                metrics::counter!("consumer_retries_total", "consumer" => spec.name).increment(1);
                let delay = Duration::from_millis(100 * 4u64.pow(attempt - 1)).min(Duration::from_secs(2));
                tracing::warn!(
                    consumer = spec.name,
                    attempt,
                    error = format!("{e:#}"),
                    ?delay,
                    "handler failed; retrying"
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                let (kind, field) = match &e {
                    HandlerError::Reject { kind, field, .. } => (*kind, field.clone()),
                    HandlerError::Retry(_) => (DeadLetterKind::HandlerFailed, None),
                };
                metrics::counter!("consumer_messages_total", "consumer" => spec.name, "outcome" => "dead_letter")
                    .increment(1);
                tracing::warn!(
                    consumer = spec.name, topic = %topic, partition = record.partition, offset = record.offset,
                    correlation_id = record.correlation_id.unwrap_or(""), reason = %e, "message sent to the dead-letter topic"
                );
                if !owns_its_partitions(spec) {
                    // Every replica reads every partition: a dead letter from each would be
                    // one per instance and per start. The group that owns the partition writes it.
                    break Vec::new();
                }
                let letter = dead_letter(env.service, &record, kind, e.to_string(), field, attempt);
                let mut out = Outbox::new(record.correlation_id);
                out.send(&letter);
                break out.into_messages();
            }
        }
    };
    metrics::histogram!("consumer_handle_seconds", "consumer" => spec.name).record(started.elapsed().as_secs_f64());

    let mut deliveries = Vec::with_capacity(outputs.len());
    // An output the client refuses before sending it (too large, ...) will be refused every
    // time: the message is dead-lettered with the reason once its other outputs are settled.
    let mut refused = None;
    for out in &outputs {
        match env.producer.enqueue(out).await {
            Ok(delivery) => deliveries.push(delivery),
            Err(e @ ProduceError::Rejected(_)) => {
                refused = Some(e);
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let info = InFlight {
        topic,
        partition: record.partition,
        offset: record.offset,
        key: record.key.map(str::to_owned),
        payload: record.payload.to_vec(),
        correlation_id: record.correlation_id.map(str::to_owned),
    };
    let pending: Pending = Box::pin(async move {
        let mut result = refused.map_or(Ok(()), Err);
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => result = Err(ProduceError::from_kafka(&e)),
                Err(_) => result = Err(ProduceError::Unavailable("the producer was dropped".to_owned())),
            }
        }
        (info, result)
    });
    Ok((topic, record.partition, pending))
}

/// Called when all outputs of a message are settled: store its offset, or dead-letter it if
/// the broker refused an output for good, or fail (to restart from the committed offset).
async fn complete(
    env: &ConsumerEnv,
    spec: &ConsumerSpec,
    consumer: &StreamConsumer<GroupContext>,
    is_group: bool,
    done: InFlight,
    result: Result<(), ProduceError>,
) -> anyhow::Result<()> {
    match result {
        Ok(()) => {}
        Err(e @ (ProduceError::Rejected(_) | ProduceError::Encode(_))) => {
            let record = Record {
                topic: done.topic,
                partition: done.partition,
                offset: done.offset,
                key: done.key.as_deref(),
                payload: &done.payload,
                correlation_id: done.correlation_id.as_deref(),
                timestamp_ms: None,
            };
            let letter = dead_letter(
                env.service,
                &record,
                DeadLetterKind::HandlerFailed,
                format!("an output was refused: {e}"),
                None,
                1,
            );
            if owns_its_partitions(spec) {
                send_dead_letter(env, letter, record.correlation_id).await?;
            }
            metrics::counter!("consumer_messages_total", "consumer" => spec.name, "outcome" => "dead_letter")
                .increment(1);
        }
        Err(e) => return Err(e).context("an output was not acknowledged"),
    }
    if is_group {
        consumer.store_offset(done.topic.name(), done.partition, done.offset).context("storing the offset")?;
    }
    Ok(())
}

/// Whether this consumer is the one instance that reads its partitions (and so writes their
/// dead letters), rather than a replica or live reader of every partition.
fn owns_its_partitions(spec: &ConsumerSpec) -> bool {
    matches!(spec.subscription, Subscription::Group { .. })
}

/// Sends a dead letter; one too large for the broker goes without the original payload (its
/// source topic, partition and offset still say where the message is).
async fn send_dead_letter(
    env: &ConsumerEnv,
    mut letter: DeadLetter,
    correlation_id: Option<&str>,
) -> anyhow::Result<()> {
    match env.producer.send(&letter, correlation_id).await {
        Err(ProduceError::Rejected(e)) => {
            letter.payload = None;
            letter.payload_base64 = String::new();
            letter.reason = format!("{} (the payload itself was left out: {e})", letter.reason);
            env.producer.send(&letter, correlation_id).await.map(|_| ())
        }
        other => other.map(|_| ()),
    }
    .context("dead-lettering a message whose output was refused")
}

fn dead_letter(
    service: &str,
    record: &Record<'_>,
    kind: DeadLetterKind,
    reason: String,
    field: Option<String>,
    attempts: u32,
) -> DeadLetter {
    let (payload, payload_base64) = DeadLetter::encode_payload(record.payload);
    DeadLetter {
        schema_version: events::SCHEMA_VERSION,
        dead_letter_id: uuid::Uuid::new_v4().to_string(),
        key: record.key.unwrap_or_default().to_owned(),
        source: record.source(),
        kind,
        reason,
        field,
        attempts,
        service: service.to_owned(),
        correlation_id: record.correlation_id.map(str::to_owned),
        payload,
        payload_base64,
        failed_at: Utc::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_or_reject_as_malformed() {
        let rec = Record {
            topic: Topic::UserActivity,
            partition: 1,
            offset: 9,
            key: Some("u"),
            payload: b"not json",
            correlation_id: None,
            timestamp_ms: None,
        };
        let err = rec.value().expect_err("not json");
        assert!(matches!(err, HandlerError::Reject { kind: DeadLetterKind::Malformed, .. }));
        let letter = dead_letter("svc", &rec, DeadLetterKind::Malformed, err.to_string(), None, 1);
        assert_eq!(letter.source, SourceRef { topic: "user-activity-topic".into(), partition: 1, offset: 9 });
        assert_eq!(letter.original_bytes().as_deref(), Some(&b"not json"[..]));
        assert_eq!(letter.key, "u");
        assert_eq!(letter.payload.as_deref(), Some("not json"));
    }

    #[test]
    fn outbox_carries_the_correlation_id() {
        let mut out = Outbox::new(Some("corr-1"));
        let f = events::UserFeatures { user_id: "u".into(), ..Default::default() };
        out.send(&f);
        assert_eq!(out.messages()[0].correlation_id.as_deref(), Some("corr-1"));
        assert_eq!(out.messages()[0].key, "u");
        assert_eq!(out.decoded::<events::UserFeatures>(), vec![f]);
    }
}
