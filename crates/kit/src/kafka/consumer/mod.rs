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

//!
//! The parts: [`record`] — what a handler sees and gives back; `assign` — subscription,
//! assignment and the checks on the topics; `restore` — rebuilding a handler's state from its
//! partitions; `outputs` — running the handler on one message and settling its outputs
//! (offsets, dead letters); this module — the specs and the loop that ties them together.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;
use events::validate::FieldError;
use events::{CORRELATION_HEADER, DeadLetter, DeadLetterKind, Message, SourceRef, Topic};
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt as _, StreamExt as _};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::KafkaSettings;
use super::producer::{Outgoing, ProduceError, Producer};
use crate::http::ReadyFlag;

mod assign;
mod outputs;
pub mod record;
mod restore;

use assign::{GroupContext, assignment, check_co_partitioned, create, end_offsets, reader_config};
use outputs::{MessageMetrics, Pending, complete, process, skip};
use record::MAX_WAITS;
pub use record::{Handler, HandlerError, Outbox, Record, Wait};
use restore::restore;

/// Most messages whose outputs may be awaiting acknowledgement at once.
pub const MAX_IN_FLIGHT: usize = 1_000;

/// Most messages a coalescing consumer takes from its queue at once (those already there).
/// The queue's size (`KAFKA_COALESCE_FETCH_MAX_KB`) is the bound that matters: with traffic
/// spread evenly over many users, a window shorter than one round of users finds nothing to
/// skip, so this is set well above any round a queue holds.
pub const COALESCE_BATCH: usize = 50_000;

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
    /// The topics to rebuild the handler's state from on start (none: nothing is rebuilt):
    /// this instance's partitions of them are replayed from the beginning up to the committed
    /// offsets, outputs discarded, before consuming for real. For handlers whose state is a
    /// function of their input. A topic of [`ConsumerSpec::topics`] left out here resumes from
    /// its committed offsets with nothing replayed (for a topic whose replay would change
    /// nothing). Under the group protocol the state is rebuilt the same way whenever the
    /// group moves partitions (see [`Handler::reset`]).
    pub restore: Vec<Topic>,
    /// Topics whose messages each carry the whole latest state of their key (a user's feature
    /// snapshot, a user's candidates): of the messages of such a topic already received and not
    /// yet handled, only the last per key is handled; the earlier ones are skipped (their
    /// offsets stored in order, as if handled). Nothing waits for more messages: a consumer
    /// that keeps up handles every message, one that falls behind does less work per message
    /// the further behind it is. See [`ConsumerSpec::coalescing`].
    pub coalesce: Vec<Topic>,
}

impl ConsumerSpec {
    /// A partitioned consumer whose offsets are committed under `group_id`.
    pub fn group(name: &'static str, topics: impl Into<Vec<Topic>>, group_id: &str) -> Self {
        Self {
            name,
            topics: topics.into(),
            subscription: Subscription::Group { group_id: group_id.to_owned() },
            restore: Vec::new(),
            coalesce: Vec::new(),
        }
    }

    /// A replica of `topics` (every partition, from the beginning).
    pub fn replica(name: &'static str, topics: impl Into<Vec<Topic>>) -> Self {
        Self {
            name,
            topics: topics.into(),
            subscription: Subscription::Replica,
            restore: Vec::new(),
            coalesce: Vec::new(),
        }
    }

    /// Every partition of `topics` from the end (see [`Subscription::Live`]).
    pub fn live(name: &'static str, topics: impl Into<Vec<Topic>>) -> Self {
        Self {
            name,
            topics: topics.into(),
            subscription: Subscription::Live,
            restore: Vec::new(),
            coalesce: Vec::new(),
        }
    }

    /// The same consumer, restoring its state on start from all its topics (see
    /// [`ConsumerSpec::restore`]).
    pub fn restoring(self) -> Self {
        Self { restore: self.topics.clone(), ..self }
    }

    /// The same consumer, restoring its state on start from `topics` only (see
    /// [`ConsumerSpec::restore`]).
    pub fn restoring_from(self, topics: impl Into<Vec<Topic>>) -> Self {
        Self { restore: topics.into(), ..self }
    }

    /// The same consumer, handling only the latest message per key of `topics` among those
    /// received and not yet handled (see [`ConsumerSpec::coalesce`]). Only for topics whose
    /// every message supersedes the earlier ones of its key, and handlers that keep nothing
    /// from a superseded message.
    pub fn coalescing(self, topics: impl Into<Vec<Topic>>) -> Self {
        Self { coalesce: topics.into(), ..self }
    }
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
pub async fn run_consumer<H: Handler>(mut env: ConsumerEnv, spec: ConsumerSpec, mut handler: H) -> anyhow::Result<()> {
    // A partitioned service settles `KAFKA_ASSIGNMENT=auto` before it starts its consumers;
    // this is for partitioned consumers run on their own (tools, tests). Replicas and live
    // readers take every partition whatever the assignment.
    if matches!(spec.subscription, Subscription::Group { .. })
        && env.settings.settle_assignment(&env.shutdown).await.is_none()
    {
        return Ok(());
    }
    // No restart here: the handler's state holds what it has seen, and replaying the
    // partitions from the committed offsets into that state would count messages twice (or,
    // for ids marked seen before their outputs were acknowledged, drop them). The service
    // ends instead, and its supervisor starts it afresh (see `crate::service`).
    run_once(&env, &spec, &mut handler).await.inspect_err(|_| {
        env.ready.set(false);
        metrics::counter!("consumer_failures_total", "consumer" => spec.name).increment(1);
    })
}

async fn run_once<H: Handler>(env: &ConsumerEnv, spec: &ConsumerSpec, handler: &mut H) -> anyhow::Result<()> {
    let (consumer, is_group) = create(env, spec)?;
    let names: Vec<&str> = spec.topics.iter().map(|t| t.name()).collect();

    // For a replica: the end offsets to catch up with before the view counts as restored.
    let mut catch_up: HashMap<(Topic, i32), i64> = HashMap::new();
    if is_group && spec.topics.len() > 1 {
        check_co_partitioned(&consumer, &spec.topics, &env.shutdown).await?;
    }
    if is_group && env.settings.uses_group_protocol() {
        consumer.subscribe(&names).context("subscribing")?;
    } else if is_group {
        let mine = |p: i32| env.settings.owns(p);
        let tpl = assignment(Arc::clone(&consumer), &spec.topics, mine, Offset::Stored, env.shutdown.clone()).await?;
        if !spec.restore.is_empty() {
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

    // Under the group protocol a restoring consumer rebuilds its state whenever the group
    // changes its partitions (see `rebuild`); `restored` holds, per partition, the offset below
    // which messages are already in that state.
    let rebuilds = is_group && env.settings.uses_group_protocol() && !spec.restore.is_empty();
    let (mut generation, mut restored) = (0_u64, HashMap::new());
    let metrics = MessageMetrics::new(spec.name);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut in_flight: FuturesOrdered<Pending> = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            () = env.shutdown.cancelled() => break,
            Some((done, result)) = in_flight.next(), if !in_flight.is_empty() => {
                complete(env, spec, &consumer, done, result).await?;
            }
            _ = tick.tick(), if rebuilds => {
                if consumer.context().generation() != generation {
                    generation = rebuild(env, spec, handler, &consumer, &mut in_flight, &mut restored).await?;
                }
            }
            received = consumer.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let msg = match received {
                    Ok(msg) => msg,
                    Err(e) => {
                        tracing::warn!(consumer = spec.name, error = %e, "consumer error");
                        continue;
                    }
                };
                // With topics to coalesce: the messages already received too, in order.
                let mut batch = vec![msg];
                while !spec.coalesce.is_empty() && batch.len() < COALESCE_BATCH {
                    match consumer.recv().now_or_never() {
                        Some(Ok(msg)) => batch.push(msg),
                        Some(Err(e)) => {
                            tracing::warn!(consumer = spec.name, error = %e, "consumer error");
                            break;
                        }
                        None => break,
                    }
                }
                let superseded = superseded(&batch, &spec.coalesce);
                for (msg, superseded) in batch.iter().zip(superseded) {
                    if rebuilds {
                        if consumer.context().generation() != generation {
                            generation = rebuild(env, spec, handler, &consumer, &mut in_flight, &mut restored).await?;
                        }
                        let end = restored.get(&(msg.topic().to_owned(), msg.partition()));
                        if end.is_some_and(|end| msg.offset() < *end) {
                            continue; // already in the rebuilt state
                        }
                    }
                    let (topic, partition, pending) =
                        if superseded { skip(&metrics, msg)? } else { process(env, spec, &metrics, handler, msg).await? };
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
    }

    drain_and_commit(env, spec, &consumer, is_group, in_flight).await
}

/// For each message of `batch`, whether a later one of the same topic, partition and key
/// supersedes it: only for messages of the `coalesce` topics that have a key.
fn superseded(batch: &[BorrowedMessage<'_>], coalesce: &[Topic]) -> Vec<bool> {
    let mut out = vec![false; batch.len()];
    if coalesce.is_empty() {
        return out;
    }
    let mut last: HashMap<(&str, i32, &[u8]), usize> = HashMap::new();
    for (i, msg) in batch.iter().enumerate() {
        let Some(key) = msg.key() else { continue };
        if !coalesce.iter().any(|t| t.name() == msg.topic()) {
            continue;
        }
        if let Some(earlier) = last.insert((msg.topic(), msg.partition(), key), i) {
            out[earlier] = true;
        }
    }
    out
}

/// After the group moved partitions: settles the outputs in flight, commits, forgets the
/// handler's state and replays the partitions now assigned up to their committed offsets, so
/// the state is exactly that of the partitions this instance holds — what it lost is gone,
/// what it gained is rebuilt, nothing is counted twice. Returns the generation it rebuilt for.
async fn rebuild<H: Handler>(
    env: &ConsumerEnv,
    spec: &ConsumerSpec,
    handler: &mut H,
    consumer: &Arc<StreamConsumer<GroupContext>>,
    in_flight: &mut FuturesOrdered<Pending>,
    restored: &mut HashMap<(String, i32), i64>,
) -> anyhow::Result<u64> {
    let generation = consumer.context().generation();
    while let Some((done, result)) = in_flight.next().await {
        complete(env, spec, consumer, done, result).await?;
    }
    let c = Arc::clone(consumer);
    if let Err(e) = tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await? {
        tracing::debug!(consumer = spec.name, error = %e, "commit before rebuilding");
    }
    anyhow::ensure!(
        handler.reset(),
        "{}: the group moved partitions and this handler cannot rebuild its state in place; ending so that the service restarts afresh",
        spec.name
    );
    let assigned = consumer.assignment().context("reading the assignment")?;
    env.ready.set(false);
    *restored = restore(env, spec, handler, Arc::clone(consumer), &assigned).await?;
    env.ready.set(true);
    tracing::info!(
        consumer = spec.name,
        partitions = assigned.count(),
        generation,
        "state rebuilt for the partitions now held"
    );
    Ok(generation)
}

/// Shutdown: waits (bounded) for outputs in flight, stores their offsets, commits.
async fn drain_and_commit(
    env: &ConsumerEnv,
    spec: &ConsumerSpec,
    consumer: &Arc<StreamConsumer<GroupContext>>,
    is_group: bool,
    mut in_flight: FuturesOrdered<Pending>,
) -> anyhow::Result<()> {
    let drain = async {
        while let Some((done, result)) = in_flight.next().await {
            complete(env, spec, consumer, done, result).await?;
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
        let c = Arc::clone(consumer);
        match tokio::task::spawn_blocking(move || c.commit_consumer_state(CommitMode::Sync)).await? {
            Ok(()) => tracing::info!(consumer = spec.name, "offsets committed on shutdown"),
            // Nothing stored since the last commit is reported as an error by librdkafka.
            Err(e) => tracing::debug!(consumer = spec.name, error = %e, "final commit"),
        }
    }
    Ok(())
}
