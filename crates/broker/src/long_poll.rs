//! Fetch as a real long poll: answered as soon as data is there, and otherwise held, at no
//! cost, until a produce to one of its partitions wakes it or `max_wait` runs out.
//!
//! Tansu 0.6's own Fetch handler (`tansu-storage` `service/fetch.rs`) ends every pass with a
//! sleep of the remaining wait, even when the pass found data, and otherwise re-queries the
//! storage at intervals. Each hop of a pipeline then costs `fetch.wait.max.ms`, and keeping
//! that low (20 ms) made idle consumers query SQLite hundreds of times a second: one core
//! busy with no traffic. Here each pass is Tansu's handler with `max_wait_ms = 0` (one look,
//! no sleep), and between passes the request waits on per-partition signals that
//! [`NotifyingProduce`] raises after every successful produce. So latency no longer depends
//! on `fetch.wait.max.ms`.
//!
//! Each connection remembers, for every partition whose last answer was empty, the offset
//! asked, the partition's produce counter at the time and the answer. A pass asks the storage
//! only about the partitions whose counter moved (or whose offset changed); the others get
//! their remembered answer, at most [`REVALIDATE`] old, so that a change no produce signals —
//! records deleted, a topic dropped — is seen in bounded time. An idle consumer then costs no
//! storage work at all, and under load a produce to one partition makes its readers read that
//! partition, not every partition they follow. With SQLite that is what keeps the stack quiet
//! when idle and its broker from re-reading every partition for every produce under load.
//! See `docs/broker.md` for the measurements behind this.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::select_all;
use rama::{Context, Service};
use tansu_sans_io::fetch_response::{FetchableTopicResponse, PartitionData};
use tansu_sans_io::{ErrorCode, FetchRequest, FetchResponse, ProduceRequest, ProduceResponse};
use tansu_storage::{Error, FetchService, Storage, TopicId};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::tail::Tails;

/// A topic (by name) and a partition.
type Partition = (String, i32);

/// Per-partition signals: a counter that every produce to the partition advances.
#[derive(Debug, Default)]
pub struct Wakeups {
    partitions: Mutex<HashMap<Partition, watch::Sender<u64>>>,
}

impl Wakeups {
    /// A receiver that sees every produce to `partition` of `topic` from now on.
    pub fn subscribe(&self, topic: &str, partition: i32) -> watch::Receiver<u64> {
        let mut partitions = self.partitions.lock().unwrap_or_else(PoisonError::into_inner);
        partitions.entry((topic.to_owned(), partition)).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// Wakes every fetch waiting on `partition` of `topic`.
    pub fn produced(&self, topic: &str, partition: i32) {
        let partitions = self.partitions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = partitions.get(&(topic.to_owned(), partition)) {
            sender.send_modify(|generation| *generation = generation.wrapping_add(1));
        }
    }

    /// Drops the signals of a topic that turned out not to exist, unless someone waits on them.
    fn forget(&self, topic: &str) {
        let mut partitions = self.partitions.lock().unwrap_or_else(PoisonError::into_inner);
        partitions.retain(|(t, _), sender| t != topic || sender.receiver_count() > 0);
    }
}

/// Tansu's produce handler (through the [`Tails`], which keep what it wrote), then a wake-up
/// of the fetches waiting on the produced partitions.
#[derive(Debug, Clone)]
pub struct NotifyingProduce {
    pub wakeups: Arc<Wakeups>,
    pub tails: Arc<Tails>,
}

impl<G: Storage> Service<G, ProduceRequest> for NotifyingProduce {
    type Response = ProduceResponse;
    type Error = Error;

    async fn serve(&self, ctx: Context<G>, req: ProduceRequest) -> Result<ProduceResponse, Error> {
        let response = self.tails.produce(ctx, req).await?;
        // The answer names every partition of the request.
        for topic in response.responses.iter().flatten() {
            for partition in topic.partition_responses.iter().flatten() {
                self.wakeups.produced(&topic.name, partition.index);
            }
        }
        Ok(response)
    }
}

/// How long a woken fetch waits for further produces before it looks; and how long a fetch
/// that finds less than [`ENOUGH_BYTES`] waiting waits before it looks again.
pub const COALESCE: Duration = Duration::from_millis(3);

/// What a fetch that finds records at once answers with without a pause. Under load a reader
/// that comes back finds a few records waiting; answering each such fetch at once made a
/// round trip (and a wake-up of the reader's client threads) per record or two.
pub const ENOUGH_BYTES: usize = 64 << 10;

/// Longest an empty answer is reused without asking the storage again.
pub const REVALIDATE: Duration = Duration::from_secs(10);

/// The long-polling Fetch handler of one connection (see the module documentation).
#[derive(Debug)]
pub struct LongPollFetch {
    wakeups: Arc<Wakeups>,
    tails: Arc<Tails>,
    memory: Mutex<Memory>,
    /// Topic names by id, for requests that name topics by id, as of a [`Tails::forgotten`].
    names: Mutex<(u64, HashMap<[u8; 16], String>)>,
}

/// What a connection remembers of its empty answers.
#[derive(Debug, Default)]
struct Memory {
    partitions: HashMap<Partition, EmptyPartition>,
    /// The topic-level fields of the last answer about each topic (its partitions left out).
    topics: HashMap<String, FetchableTopicResponse>,
    /// The top-level fields of the last answer.
    response: Option<FetchResponse>,
}

/// A partition's empty answer, for the offset asked and its produce counter at the time.
#[derive(Debug)]
struct EmptyPartition {
    offset: i64,
    generation: u64,
    data: PartitionData,
    at: Instant,
}

/// One partition a fetch asks about.
#[derive(Debug, Clone)]
struct Wanted {
    /// Index of its topic in the request.
    topic: usize,
    /// The topic's id, when the request named it by id.
    id: Option<[u8; 16]>,
    name: String,
    partition: i32,
    offset: i64,
    /// The most record bytes the client takes from this partition.
    max_bytes: i32,
}

impl LongPollFetch {
    pub fn new(wakeups: Arc<Wakeups>, tails: Arc<Tails>) -> Self {
        Self { wakeups, tails, memory: Mutex::default(), names: Mutex::default() }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One look at every wanted partition: the storage for those that may have changed, the
    /// remembered empty answer for the others.
    async fn pass<G: Storage>(
        &self,
        ctx: &Context<G>,
        req: &FetchRequest,
        wanted: &[Wanted],
        generations: &[u64],
    ) -> Result<FetchResponse, Error> {
        // Partitions whose tail covers the offset are answered from it (see `crate::tail`).
        let from_tail: Vec<Option<PartitionData>> = wanted
            .iter()
            .map(|w| self.tails.read(&w.name, w.partition, w.offset, usize::try_from(w.max_bytes).unwrap_or(0)))
            .collect();
        let stale: Vec<bool> = {
            let memory = self.memory();
            wanted
                .iter()
                .zip(generations)
                .zip(&from_tail)
                .map(|((w, g), tail)| {
                    tail.is_none()
                        && !memory
                            .partitions
                            .get(&(w.name.clone(), w.partition))
                            .is_some_and(|e| e.offset == w.offset && e.generation == *g && e.at.elapsed() < REVALIDATE)
                })
                .collect()
        };
        let fresh = if stale.iter().any(|s| *s) {
            let (sub, asked) = only(req, wanted, &stale);
            let fresh = FetchService.serve(ctx.clone(), sub).await?;
            self.learn(&fresh, wanted, generations);
            Some((fresh, asked))
        } else {
            None
        };
        Ok(self.assemble(req, wanted, &stale, fresh.as_ref(), from_tail))
    }

    /// Remembers the empty partitions of a fresh answer, and forgets the others.
    fn learn(&self, fresh: &FetchResponse, wanted: &[Wanted], generations: &[u64]) {
        let mut memory = self.memory();
        let at = Instant::now();
        for topic in fresh.responses.iter().flatten() {
            let Some(name) = name_of(topic, wanted) else { continue };
            for data in topic.partitions.iter().flatten() {
                let key = (name.clone(), data.partition_index);
                let Some(i) = wanted.iter().position(|w| w.name == name && w.partition == data.partition_index) else {
                    continue;
                };
                if let Some(log_start) = data.log_start_offset.filter(|l| *l >= 0) {
                    self.tails.saw_log_start(&name, data.partition_index, log_start);
                }
                let (bytes, errors) = summary([data]);
                // Empty because it is caught up, not because the fetch's byte budget went to
                // the partitions before it (Tansu's handler spends it in order): a replica
                // reading a long topic from the start had each partition after the first
                // answered empty from memory for REVALIDATE, one after the other (with a
                // 200,000-product catalog the stack was ready 32.9 s after a restart; 5.0 s
                // without these waits).
                let caught_up = wanted[i].offset >= data.high_watermark;
                if bytes == 0 && !errors && caught_up {
                    let entry =
                        EmptyPartition { offset: wanted[i].offset, generation: generations[i], data: data.clone(), at };
                    memory.partitions.insert(key, entry);
                } else {
                    memory.partitions.remove(&key);
                }
            }
            let mut template = topic.clone();
            template.partitions = Some(Vec::new());
            memory.topics.insert(name, template);
        }
        let mut top = fresh.clone();
        top.responses = None;
        memory.response = Some(top);
    }

    /// The answer to the whole request: fresh partitions, those from the tails, and remembered
    /// ones for the rest. `fresh` is the storage's answer to the cut-down request with, for
    /// each of its topics in order, the index of that topic in `req`.
    fn assemble(
        &self,
        req: &FetchRequest,
        wanted: &[Wanted],
        stale: &[bool],
        fresh: Option<&(FetchResponse, Vec<usize>)>,
        mut from_tail: Vec<Option<PartitionData>>,
    ) -> FetchResponse {
        let memory = self.memory();
        let mut response = fresh.map(|(f, _)| f.clone()).or_else(|| memory.response.clone()).unwrap_or_else(|| {
            // The top-level fields as Tansu's fetch fills them.
            FetchResponse::default()
                .throttle_time_ms(Some(0))
                .error_code(Some(ErrorCode::None.into()))
                .session_id(Some(0))
                .node_endpoints(Some([].into()))
        });
        let mut topics = Vec::new();
        for (index, asked) in req.topics.iter().flatten().enumerate() {
            let name = wanted.iter().find(|w| w.topic == index).map(|w| w.name.clone());
            // By position, not by name: a request may name a topic more than once, each time
            // with other partitions (librdkafka does when its partitions of two topics take
            // turns), and each entry gets the answer for its own partitions. Found by name,
            // every entry got the first one's: a partition answered twice, which librdkafka
            // took for a message too large to fetch and stopped reading it.
            let fresh_topic = fresh.and_then(|(f, asked)| {
                let at = asked.iter().position(|i| *i == index)?;
                f.responses.as_ref()?.get(at).cloned()
            });
            let mut topic = match (fresh_topic, &name) {
                (Some(t), _) => t,
                (None, Some(n)) => memory.topics.get(n).cloned().unwrap_or_else(|| {
                    FetchableTopicResponse::default().topic(asked.topic.clone()).topic_id(asked.topic_id)
                }),
                (None, None) => continue,
            };
            let mut partitions = topic.partitions.take().unwrap_or_default();
            for (i, w) in wanted.iter().enumerate().filter(|(i, w)| w.topic == index && !stale[*i]) {
                if let Some(data) = from_tail[i].take() {
                    partitions.push(data);
                } else if let Some(e) = memory.partitions.get(&(w.name.clone(), w.partition)) {
                    partitions.push(e.data.clone());
                }
            }
            topic.partitions = Some(partitions);
            topics.push(topic);
        }
        response.responses = Some(topics);
        response
    }
}

impl<G: Storage> Service<G, FetchRequest> for LongPollFetch {
    type Response = FetchResponse;
    type Error = Error;

    async fn serve(&self, ctx: Context<G>, req: FetchRequest) -> Result<FetchResponse, Error> {
        let deadline = Instant::now() + Duration::from_millis(u64::try_from(req.max_wait_ms).unwrap_or(0));
        let min_bytes = usize::try_from(req.min_bytes).unwrap_or(0).max(1);
        let req = req.max_wait_ms(0);
        let wanted = wanted(&ctx, &req, &self.names, &self.tails).await?;
        // Subscribe before the first look, so that a produce between the look and the wait
        // is not missed.
        let mut signals: Vec<watch::Receiver<u64>> =
            wanted.iter().map(|w| self.wakeups.subscribe(&w.name, w.partition)).collect();
        // Whether this fetch has paused once for more records to arrive.
        let mut paused = false;
        loop {
            let generations: Vec<u64> = signals.iter_mut().map(|signal| *signal.borrow_and_update()).collect();
            let response = self.pass(&ctx, &req, &wanted, &generations).await?;
            let (bytes, errors) =
                summary(response.responses.iter().flatten().flat_map(|t| t.partitions.iter().flatten()));
            let enough = bytes >= min_bytes && (paused || bytes >= ENOUGH_BYTES);
            if enough || errors || signals.is_empty() || Instant::now() >= deadline {
                if errors {
                    drop(signals);
                    for w in &wanted {
                        self.wakeups.forget(&w.name);
                    }
                }
                return Ok(response);
            }
            if bytes < min_bytes {
                let woken = select_all(signals.iter_mut().map(|signal| Box::pin(signal.changed())));
                if tokio::time::timeout_at(deadline, woken).await.is_err() {
                    // Nothing was produced: answer with the empty pass, as the wait ran out.
                    return Ok(response);
                }
            }
            // Records were waiting but few, or a produce woke this fetch. Under load, produces
            // come in quick succession: a moment's pause lets one pass (and one round trip of
            // the reader) carry what several of them wrote, rather than one per produce.
            tokio::time::sleep(COALESCE.min(deadline.saturating_duration_since(Instant::now()))).await;
            paused = true;
        }
    }
}

/// The partitions a fetch asks about, with their topics by name (a request may name a topic
/// by id only: the names of ids are asked of the storage once per connection and kept, as a
/// topic's id never changes — a topic made again gets a new one).
async fn wanted<G: Storage>(
    ctx: &Context<G>,
    req: &FetchRequest,
    names: &Mutex<(u64, HashMap<[u8; 16], String>)>,
    tails: &Tails,
) -> Result<Vec<Wanted>, Error> {
    let names_of = || {
        let mut names = names.lock().unwrap_or_else(PoisonError::into_inner);
        // Topics were deleted since: an id may name nothing now.
        if names.0 != tails.forgotten() {
            *names = (tails.forgotten(), HashMap::new());
        }
        names
    };
    let mut wanted = Vec::new();
    for (index, topic) in req.topics.iter().flatten().enumerate() {
        let known = || topic.topic_id.and_then(|id| names_of().1.get(&id).cloned());
        let name = match topic.topic.clone().or_else(known) {
            name @ Some(_) => name,
            None => {
                let metadata = ctx.state().metadata(Some(&[TopicId::from(topic)])).await?;
                let name = metadata.topics().first().and_then(|t| t.name.clone());
                if let (Some(id), Some(name)) = (topic.topic_id, &name) {
                    names_of().1.insert(id, name.clone());
                }
                name
            }
        };
        let Some(name) = name else { continue };
        for p in topic.partitions.iter().flatten() {
            wanted.push(Wanted {
                topic: index,
                id: topic.topic_id,
                name: name.clone(),
                partition: p.partition,
                offset: p.fetch_offset,
                max_bytes: p.partition_max_bytes,
            });
        }
    }
    Ok(wanted)
}

/// The request cut down to the partitions marked in `keep`, with the index in `req` of each
/// topic it keeps, in order.
fn only(req: &FetchRequest, wanted: &[Wanted], keep: &[bool]) -> (FetchRequest, Vec<usize>) {
    let mut sub = req.clone();
    let mut asked = Vec::new();
    sub.topics = Some(
        req.topics
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(index, topic)| {
                let partitions: Vec<_> = topic
                    .partitions
                    .iter()
                    .flatten()
                    .filter(|p| {
                        wanted
                            .iter()
                            .zip(keep)
                            .find(|(w, _)| w.topic == index && w.partition == p.partition)
                            .is_none_or(|(_, k)| *k)
                    })
                    .cloned()
                    .collect();
                (!partitions.is_empty()).then(|| {
                    asked.push(index);
                    topic.clone().partitions(Some(partitions))
                })
            })
            .collect(),
    );
    (sub, asked)
}

/// The name of a topic in an answer (answers to requests by id carry the id only).
fn name_of(topic: &FetchableTopicResponse, wanted: &[Wanted]) -> Option<String> {
    topic.topic.clone().or_else(|| {
        let id = topic.topic_id?;
        wanted.iter().find(|w| w.id == Some(id)).map(|w| w.name.clone())
    })
}

/// The record bytes of some answered partitions, and whether any answered with an error
/// (an unknown topic, an offset out of range: the client must hear of it at once).
fn summary<'a>(partitions: impl IntoIterator<Item = &'a PartitionData>) -> (usize, bool) {
    let mut bytes = 0;
    let mut errors = false;
    for partition in partitions {
        errors |= partition.error_code != i16::from(ErrorCode::None);
        bytes += partition
            .records
            .iter()
            .flat_map(|frame| &frame.batches)
            .map(|batch| batch.record_data.len())
            .sum::<usize>();
    }
    (bytes, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_produce_wakes_only_the_subscribers_of_its_partition() {
        let wakeups = Wakeups::default();
        let mut a = wakeups.subscribe("t", 0);
        let mut b = wakeups.subscribe("t", 1);
        wakeups.produced("t", 0);
        assert!(a.has_changed().expect("open"));
        assert!(!b.has_changed().expect("open"));
        a.borrow_and_update();
        assert!(tokio::time::timeout(Duration::from_millis(20), b.changed()).await.is_err());
    }

    /// A request that names a topic more than once (librdkafka's fetches do, starting at
    /// another partition each time) gets, in each entry, the partitions that entry asked for:
    /// found by name, the third entry got the first one's partition 1 again, not partition 0.
    #[test]
    fn each_entry_of_a_topic_named_twice_gets_its_own_partitions() {
        use tansu_sans_io::fetch_request::{FetchPartition, FetchTopic};
        let poll = LongPollFetch::new(Arc::default(), Arc::default());
        let entry = |topic: &str, partition: i32| {
            let asked = FetchPartition::default().partition(partition).fetch_offset(0).partition_max_bytes(1 << 20);
            FetchTopic::default().topic(Some(topic.into())).partitions(Some(vec![asked]))
        };
        let req = FetchRequest::default().topics(Some(vec![entry("a", 1), entry("b", 0), entry("a", 0)]));
        let wanted: Vec<Wanted> = [(0, "a", 1), (1, "b", 0), (2, "a", 0)]
            .into_iter()
            .map(|(topic, name, partition)| Wanted {
                topic,
                id: None,
                name: name.into(),
                partition,
                offset: 0,
                max_bytes: 1 << 20,
            })
            .collect();
        // b[0] is answered from memory; the storage is asked about both partitions of `a`.
        let stale = [true, false, true];
        let (sub, asked) = only(&req, &wanted, &stale);
        assert_eq!(asked, [0, 2]);
        assert_eq!(sub.topics.as_ref().map(Vec::len), Some(2));
        let answer = |topic: &str, partition: i32| {
            let data =
                PartitionData::default().partition_index(partition).error_code(0).high_watermark(9).records(None);
            FetchableTopicResponse::default().topic(Some(topic.into())).partitions(Some(vec![data]))
        };
        let fresh = FetchResponse::default().responses(Some(vec![answer("a", 1), answer("a", 0)]));
        let response = poll.assemble(&req, &wanted, &stale, Some(&(fresh, asked)), vec![None, None, None]);
        let entries: Vec<(String, Vec<i32>)> = response
            .responses
            .iter()
            .flatten()
            .map(|t| {
                let partitions = t.partitions.iter().flatten().map(|p| p.partition_index).collect();
                (t.topic.clone().unwrap_or_default(), partitions)
            })
            .collect();
        assert_eq!(entries, [("a".into(), vec![1]), ("b".into(), vec![]), ("a".into(), vec![0])]);
    }

    /// Only a partition with nothing past the offset asked is remembered as empty: one the
    /// fetch's byte budget did not reach is asked about again on the next pass.
    #[test]
    fn only_caught_up_partitions_are_remembered_as_empty() {
        let poll = LongPollFetch::new(Arc::default(), Arc::default());
        let wanted: Vec<Wanted> = (0..2)
            .map(|partition| Wanted {
                topic: 0,
                id: None,
                name: "catalog".into(),
                partition,
                offset: 40,
                max_bytes: 1 << 20,
            })
            .collect();
        let partition = |index: i32, high_watermark: i64| {
            PartitionData::default()
                .partition_index(index)
                .error_code(ErrorCode::None.into())
                .high_watermark(high_watermark)
                .records(None)
        };
        // Partition 0 is caught up at 40; partition 1 holds records up to 90 that the
        // answer did not reach.
        let topic = FetchableTopicResponse::default()
            .topic(Some("catalog".into()))
            .partitions(Some(vec![partition(0, 40), partition(1, 90)]));
        let fresh = FetchResponse::default().responses(Some(vec![topic]));
        poll.learn(&fresh, &wanted, &[0, 0]);
        let remembered: Vec<i32> = poll.memory().partitions.keys().map(|(_, p)| *p).collect();
        assert_eq!(remembered, [0]);
    }

    #[test]
    fn a_produce_to_a_topic_nobody_waits_on_keeps_nothing() {
        let wakeups = Wakeups::default();
        wakeups.produced("nobody", 0);
        assert!(wakeups.partitions.lock().expect("lock").is_empty());
        drop(wakeups.subscribe("gone", 3));
        wakeups.forget("gone");
        assert!(wakeups.partitions.lock().expect("lock").is_empty());
    }
}
