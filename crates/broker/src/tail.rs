//! The tail of every partition, kept in memory as it was produced, so that fetches near the
//! end of a partition — what every caught-up consumer asks for — are answered without the
//! storage engine.
//!
//! With the SQLite engine each fetched partition costs Tansu 0.6 several SQL statements —
//! the records, then *one more query per record* for its headers, the watermarks, the topic's
//! metadata — and libsql prepares every statement from its text each time: measured under
//! load, half of the broker's CPU went to SQLite's parser and query planner
//! (`sqlite3_prepare_v2`), most of it for fetches (docs/broker.md). Each message of the
//! pipeline is read by several consumer groups, so that cost came several times per message.
//!
//! Here every successful produce also appends its batch, with the offsets the storage gave
//! it, to the partition's tail (up to [`TAIL_BYTES`] per partition by default, the oldest
//! dropped first), and a fetch at an offset the tail covers is answered from it: the batches
//! from that offset on, or nothing when the offset is the end. Offsets outside the tail — a consumer far
//! behind, a broker just started — go to the storage as before. The data is the same: a batch
//! enters the tail only after the storage committed it, produces are appended in the order the
//! storage committed them (they run one at a time, see [`Tails::produce_lock`]), and a deleted
//! topic or deleted records empty the tails. Transactional and control batches are not kept:
//! a partition that gets one is answered by the storage until its tail starts afresh.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use rama::{Context, Service};
use tansu_sans_io::fetch_response::PartitionData;
use tansu_sans_io::record::deflated::{Batch, Frame};
use tansu_sans_io::{ErrorCode, ProduceRequest, ProduceResponse};
use tansu_storage::{ProduceService, Storage};

/// Record bytes kept per partition at most, by default.
pub const TAIL_BYTES: usize = 1 << 20;

/// A topic (by name) and a partition.
type Partition = (String, i32);

/// Attribute bits of a batch that is part of a transaction or a control batch.
const TRANSACTIONAL_OR_CONTROL: i16 = 0x10 | 0x20;

/// The tails of every partition (see the module documentation).
#[derive(Debug, Default)]
pub struct Tails {
    /// Record bytes kept per partition at most (0: nothing is kept).
    capacity: usize,
    partitions: Mutex<HashMap<Partition, Tail>>,
    /// Held by a produce from before it reaches the storage until its batches are in the
    /// tails, so that tails grow in the order the storage committed the batches.
    produce_lock: tokio::sync::Mutex<()>,
    /// How many times the tails were forgotten (see [`Tails::forgotten`]).
    forgotten: std::sync::atomic::AtomicU64,
}

/// The newest batches of one partition, contiguous.
#[derive(Debug, Default)]
struct Tail {
    batches: VecDeque<Batch>,
    bytes: usize,
    /// The partition's log start offset as the storage last reported it.
    log_start: Option<i64>,
}

/// The offset after the last record of `batch`.
fn end_of(batch: &Batch) -> i64 {
    batch.base_offset + i64::from(batch.last_offset_delta) + 1
}

impl Tail {
    fn start(&self) -> Option<i64> {
        self.batches.front().map(|b| b.base_offset)
    }

    fn end(&self) -> Option<i64> {
        self.batches.back().map(end_of)
    }
}

/// What a produce wrote, partition by partition: the batches it sent.
type Sent = Vec<(Partition, Vec<Batch>)>;

impl Tails {
    /// Tails of at most `capacity` record bytes per partition.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, ..Self::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Partition, Tail>> {
        self.partitions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs Tansu's produce handler, then appends what the storage accepted to the tails.
    pub async fn produce<G: Storage>(
        &self,
        ctx: Context<G>,
        req: ProduceRequest,
    ) -> Result<ProduceResponse, tansu_storage::Error> {
        let transactional = req.transactional_id.is_some();
        let sent: Sent = req
            .topic_data
            .iter()
            .flatten()
            .flat_map(|t| {
                t.partition_data.iter().flatten().map(|p| {
                    let batches: Vec<Batch> = p.records.iter().flat_map(|f| f.batches.iter().cloned()).collect();
                    ((t.name.clone(), p.index), batches)
                })
            })
            .collect();
        let _order = self.produce_lock.lock().await;
        let response = ProduceService.serve(ctx, req).await;
        match &response {
            Ok(response) => self.appended(sent, transactional, response),
            // Whatever happened to the storage, the tails no longer know its end.
            Err(_) => self.clear(),
        }
        response
    }

    /// Appends the batches of a produce to the tails, at the offsets the storage gave them.
    fn appended(&self, sent: Sent, transactional: bool, response: &ProduceResponse) {
        let mut tails = self.lock();
        for ((topic, partition), batches) in sent {
            let answer = response
                .responses
                .iter()
                .flatten()
                .filter(|t| t.name == topic)
                .flat_map(|t| t.partition_responses.iter().flatten())
                .find(|p| p.index == partition);
            let key = (topic, partition);
            let Some(answer) = answer.filter(|a| a.error_code == i16::from(ErrorCode::None)) else {
                // Refused (a duplicate, an unknown topic): the storage's end did not move.
                continue;
            };
            // One batch per partition, as every client since produce v3 sends; anything else
            // is left to the storage.
            let Ok([batch]) = <[Batch; 1]>::try_from(batches) else {
                tails.remove(&key);
                continue;
            };
            let plain = !transactional && batch.magic == 2 && batch.attributes & TRANSACTIONAL_OR_CONTROL == 0;
            if !plain || batch.record_count == 0 || self.capacity == 0 {
                tails.remove(&key);
                continue;
            }
            let tail = tails.entry(key).or_default();
            if tail.end() != Some(answer.base_offset) {
                // A gap (a tail just started, or one dropped): begin again from this batch.
                let log_start = tail.log_start;
                *tail = Tail { log_start, ..Tail::default() };
            }
            let mut batch = batch;
            batch.base_offset = answer.base_offset;
            // What Tansu's own fetch answers: the epoch is not tracked.
            batch.partition_leader_epoch = -1;
            tail.bytes += batch.record_data.len();
            tail.batches.push_back(batch);
            while tail.bytes > self.capacity && tail.batches.len() > 1 {
                if let Some(old) = tail.batches.pop_front() {
                    tail.bytes -= old.record_data.len();
                }
            }
        }
    }

    /// The answer to a fetch of `partition` of `topic` from `offset`, if its tail covers the
    /// offset (the end included, answered with no records): at least one batch, then more up to
    /// `max_bytes`.
    pub fn read(&self, topic: &str, partition: i32, offset: i64, max_bytes: usize) -> Option<PartitionData> {
        let tails = self.lock();
        let tail = tails.get(&(topic.to_owned(), partition))?;
        let (start, end, log_start) = (tail.start()?, tail.end()?, tail.log_start?);
        if offset < start || offset > end {
            return None;
        }
        let mut batches = Vec::new();
        let mut bytes = 0;
        for batch in tail.batches.iter().filter(|b| end_of(b) > offset) {
            if !batches.is_empty() && bytes + batch.record_data.len() > max_bytes {
                break;
            }
            bytes += batch.record_data.len();
            batches.push(batch.clone());
        }
        // The fields as Tansu's fetch fills them.
        Some(
            PartitionData::default()
                .partition_index(partition)
                .error_code(ErrorCode::None.into())
                .high_watermark(end)
                .last_stable_offset(Some(end))
                .log_start_offset(Some(log_start))
                .diverging_epoch(None)
                .current_leader(None)
                .snapshot_id(None)
                .aborted_transactions(Some([].into()))
                .preferred_read_replica(Some(-1))
                .records((!batches.is_empty()).then_some(Frame { batches })),
        )
    }

    /// Notes a partition's log start offset from an answer of the storage.
    pub fn saw_log_start(&self, topic: &str, partition: i32, log_start: i64) {
        if let Some(tail) = self.lock().get_mut(&(topic.to_owned(), partition)) {
            tail.log_start = Some(log_start);
        }
    }

    /// Forgets every tail (topics or records were deleted, or a produce failed).
    pub fn clear(&self) {
        self.lock().clear();
        self.forgotten.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A counter that moves whenever the tails are forgotten: what a reader derived from the
    /// topics (their names by id) is stale once it moved.
    pub fn forgotten(&self) -> u64 {
        self.forgotten.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Tansu's handler for requests that delete data (topics, records), followed by forgetting
/// the tails, which may hold what was deleted.
#[derive(Debug, Clone)]
pub struct Forgetting<S> {
    pub inner: S,
    pub tails: std::sync::Arc<Tails>,
}

impl<G, R, S> Service<G, R> for Forgetting<S>
where
    G: Storage,
    R: Send + 'static,
    S: Service<G, R>,
{
    type Response = S::Response;
    type Error = S::Error;

    async fn serve(&self, ctx: Context<G>, req: R) -> Result<S::Response, S::Error> {
        self.tails.clear();
        let response = self.inner.serve(ctx, req).await;
        self.tails.clear();
        response
    }
}
