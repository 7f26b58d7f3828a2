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
//! it, to the partition's tail, and a fetch at an offset the tail covers is answered from it:
//! the batches from that offset on, or nothing when the offset is the end. The tails share one
//! budget of record bytes ([`TAIL_BYTES`] by default): past it, the oldest batch of all is
//! dropped, whichever partition it belongs to, so every partition's tail reaches back about the
//! same time, and the memory is bounded however many partitions there are. Offsets outside the
//! tail — a consumer far behind, a broker just started — go to the storage as before, at
//! several times the cost (`docs/broker.md`): the tail's reach is how far a consumer may fall
//! behind (a moment of full CPU) and still catch up at the tail's price. The data is the same: a batch
//! enters the tail only after the storage committed it, produces are appended in the order the
//! storage committed them (they run one at a time, see [`Tails::produce`]), and a deleted
//! topic or deleted records empty the tails. Transactional and control batches are not kept:
//! a partition that gets one is answered by the storage until its tail starts afresh.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use rama::{Context, Service};
use tansu_sans_io::fetch_response::PartitionData;
use tansu_sans_io::record::deflated::{Batch, Frame};
use tansu_sans_io::{ErrorCode, ProduceRequest, ProduceResponse};
use tansu_storage::{ProduceService, Storage};

/// Record bytes kept in all the tails together at most, by default: at 2,000 events/s the
/// pipeline writes about 25 MB of records a second, so about five seconds of every partition.
pub const TAIL_BYTES: usize = 128 << 20;

/// A topic (by name) and a partition.
type Partition = (String, i32);

/// Attribute bits of a batch that is part of a transaction or a control batch.
const TRANSACTIONAL_OR_CONTROL: i16 = 0x10 | 0x20;

/// The tails of every partition (see the module documentation).
#[derive(Debug, Default)]
pub struct Tails {
    /// Record bytes kept in all the tails together at most (0: nothing is kept).
    capacity: usize,
    kept: Mutex<Kept>,
    /// Held by a produce from before it reaches the storage until its batches are in the
    /// tails, so that tails grow in the order the storage committed the batches.
    produce_lock: tokio::sync::Mutex<()>,
    /// How many times the tails were forgotten (see [`Tails::forgotten`]).
    forgotten: std::sync::atomic::AtomicU64,
}

/// The tails, and the order their batches arrived in across partitions.
#[derive(Debug, Default)]
struct Kept {
    partitions: HashMap<Partition, Tail>,
    /// (partition, base offset) of the batches in the order they were appended: the front is
    /// the oldest batch still kept, or one of a tail since dropped (skipped when met).
    arrivals: VecDeque<(Partition, i64)>,
    /// Record bytes of every tail.
    bytes: usize,
    /// Batches of every tail.
    batches: usize,
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

    fn holds(&self, base_offset: i64) -> bool {
        self.batches.binary_search_by_key(&base_offset, |b| b.base_offset).is_ok()
    }
}

impl Kept {
    /// Drops the tail of `key` (its bytes leave the budget; its arrivals are skipped later).
    fn remove(&mut self, key: &Partition) {
        if let Some(tail) = self.partitions.remove(key) {
            self.bytes -= tail.bytes;
            self.batches -= tail.batches.len();
        }
    }

    /// Appends `batch` to the tail of `key`, then drops the oldest batches of all until the
    /// tails fit in `capacity`.
    fn append(&mut self, key: Partition, batch: Batch, capacity: usize) {
        let tail = self.partitions.entry(key.clone()).or_default();
        if tail.end() != Some(batch.base_offset) {
            // A gap (a tail just started, or one dropped): begin again from this batch.
            self.bytes -= tail.bytes;
            self.batches -= tail.batches.len();
            *tail = Tail { log_start: tail.log_start, ..Tail::default() };
        }
        self.bytes += batch.record_data.len();
        self.batches += 1;
        tail.bytes += batch.record_data.len();
        self.arrivals.push_back((key, batch.base_offset));
        tail.batches.push_back(batch);
        while self.bytes > capacity {
            let Some((key, base_offset)) = self.arrivals.pop_front() else { break };
            let Some(tail) = self.partitions.get_mut(&key) else { continue };
            if tail.start() != Some(base_offset) {
                continue; // a batch of a tail dropped since
            }
            if let Some(old) = tail.batches.pop_front() {
                tail.bytes -= old.record_data.len();
                self.bytes -= old.record_data.len();
                self.batches -= 1;
            }
        }
        // Arrivals of dropped tails are skipped only when they reach the front: with few
        // evictions they could pile up, so past twice the batches kept they are swept.
        if self.arrivals.len() > 2 * self.batches + 1_024 {
            let partitions = &self.partitions;
            self.arrivals.retain(|(key, base)| partitions.get(key).is_some_and(|t| t.holds(*base)));
        }
    }
}

/// What a produce wrote, partition by partition: the batches it sent.
type Sent = Vec<(Partition, Vec<Batch>)>;

impl Tails {
    /// Tails of at most `capacity` record bytes in all.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, ..Self::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
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
            let mut batch = batch;
            batch.base_offset = answer.base_offset;
            // What Tansu's own fetch answers: the epoch is not tracked.
            batch.partition_leader_epoch = -1;
            tails.append(key, batch, self.capacity);
        }
    }

    /// The answer to a fetch of `partition` of `topic` from `offset`, if its tail covers the
    /// offset (the end included, answered with no records): at least one batch, then more up to
    /// `max_bytes`.
    pub fn read(&self, topic: &str, partition: i32, offset: i64, max_bytes: usize) -> Option<PartitionData> {
        let tails = self.lock();
        let tail = tails.partitions.get(&(topic.to_owned(), partition))?;
        let (start, end, log_start) = (tail.start()?, tail.end()?, tail.log_start?);
        if offset < start || offset > end {
            return None;
        }
        let mut batches = Vec::new();
        let mut bytes = 0;
        // The batches are in offset order: the first one ending past `offset` is found by
        // bisection, not by a walk over the whole tail (seconds of batches) per fetch.
        let first = tail.batches.partition_point(|b| end_of(b) <= offset);
        for batch in tail.batches.range(first..) {
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
        if let Some(tail) = self.lock().partitions.get_mut(&(topic.to_owned(), partition)) {
            tail.log_start = Some(log_start);
        }
    }

    /// Forgets every tail (topics or records were deleted, or a produce failed).
    pub fn clear(&self) {
        *self.lock() = Kept::default();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(base_offset: i64, bytes: usize) -> Batch {
        Batch { base_offset, magic: 2, record_count: 1, record_data: vec![0; bytes].into(), ..Batch::default() }
    }

    fn key(partition: i32) -> Partition {
        ("topic".to_owned(), partition)
    }

    fn offsets(kept: &Kept, partition: i32) -> Vec<i64> {
        kept.partitions
            .get(&key(partition))
            .map(|t| t.batches.iter().map(|b| b.base_offset).collect())
            .unwrap_or_default()
    }

    /// The running totals agree with the tails.
    fn assert_totals(kept: &Kept) {
        assert_eq!(kept.bytes, kept.partitions.values().map(|t| t.bytes).sum::<usize>());
        assert_eq!(kept.batches, kept.partitions.values().map(|t| t.batches.len()).sum::<usize>());
    }

    #[test]
    fn the_oldest_batches_of_all_partitions_go_first() {
        let mut kept = Kept::default();
        for offset in 0..5 {
            kept.append(key(0), batch(offset, 100), 600);
        }
        for offset in 0..5 {
            kept.append(key(1), batch(offset, 100), 600);
        }
        // A per-partition budget would have kept both partitions whole, or cut each alike.
        assert_eq!(offsets(&kept, 0), vec![4]);
        assert_eq!(offsets(&kept, 1), vec![0, 1, 2, 3, 4]);
        assert_eq!(kept.bytes, 600);
        assert_totals(&kept);
    }

    #[test]
    fn a_tail_started_again_keeps_the_budget_exact() {
        let mut kept = Kept::default();
        for offset in 0..3 {
            kept.append(key(0), batch(offset, 100), 1_000);
        }
        // A gap: partition 0 starts again at 10; its three old batches leave the budget.
        kept.append(key(0), batch(10, 100), 1_000);
        assert_eq!((offsets(&kept, 0), kept.bytes), (vec![10], 100));
        for offset in 0..9 {
            kept.append(key(1), batch(offset, 100), 1_000);
        }
        // Ten batches fit exactly; the next drops partition 0's batch at 10 (the oldest kept),
        // not the old arrivals of the tail dropped before it.
        assert_eq!(kept.bytes, 1_000);
        kept.append(key(1), batch(9, 100), 1_000);
        assert_eq!(offsets(&kept, 0), Vec::<i64>::new());
        assert_eq!(offsets(&kept, 1), (0..10).collect::<Vec<_>>());
        assert_eq!(kept.bytes, 1_000);
        assert_totals(&kept);
    }

    #[test]
    fn arrivals_of_dropped_tails_do_not_pile_up() {
        let mut kept = Kept::default();
        // Every batch starts its tail again (a gap each time) and nothing is ever evicted.
        for offset in 0..10_000 {
            kept.append(key(0), batch(offset * 2, 10), usize::MAX);
        }
        assert_eq!(offsets(&kept, 0), vec![19_998]);
        assert!(kept.arrivals.len() <= 2 + 1_024, "{} arrivals kept for one batch", kept.arrivals.len());
        assert_totals(&kept);
    }

    #[test]
    fn a_removed_tail_leaves_the_budget() {
        let mut kept = Kept::default();
        kept.append(key(0), batch(0, 100), 1_000);
        kept.append(key(1), batch(0, 300), 1_000);
        kept.remove(&key(1));
        assert_eq!(kept.bytes, 100);
        assert_totals(&kept);
        kept.append(key(0), batch(1, 900), 1_000);
        assert_eq!(offsets(&kept, 0), vec![0, 1]);
        assert_totals(&kept);
    }
}
