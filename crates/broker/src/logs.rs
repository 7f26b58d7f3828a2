//! The durable broker's records in append-only log files, Kafka's own design, instead of one
//! SQLite row per record.
//!
//! Tansu's SQLite engine stores every record as a row (and every header as another), through
//! statements libsql prepares from their text each time: under load, producing was most of the
//! durable broker's work (half of it in `sqlite3_prepare_v2`). [`Logs`] wraps that engine and
//! keeps the records of every ordinary topic itself: each produced batch is appended, exactly
//! as the client sent it (Kafka's wire format, with its CRC) and with the offset given to it,
//! to a segment file of its partition — one `write` — and a fetch reads the batches back from
//! a sparse in-memory index of the segment. Everything else — topics and their configuration,
//! consumer groups and committed offsets, producer ids — stays in SQLite, as do the records of
//! compacted topics (Tansu compacts them there) and of topics that already had records in
//! SQLite when the broker was upgraded.
//!
//! Layout: `<dir>/<topic>/<partition>/<base offset, 20 digits>.log`. A segment is closed at
//! [`SEGMENT_BYTES`] or when its first batch is a day old; [`Storage::maintain`] deletes closed
//! segments whose newest record is older than the topic's `retention.ms` (Kafka's default, 7
//! days, when unset; `-1` keeps everything). On start, a partition's segments are read once:
//! the index, the next offset and each idempotent producer's last sequence are rebuilt from
//! the batches, and a torn or corrupt tail (a crash in the middle of a `write`, or a checksum
//! that does not match) is cut off.
//!
//! Durability is that of the SQLite engine as Tansu configures it (WAL, `synchronous =
//! normal`): an acknowledged batch is in the operating system's page cache, so it survives the
//! broker's crash or `kill -9`, not a power cut. Transactional batches are refused for topics
//! kept here (Tansu's transactions are incomplete; the platform does not use them).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tansu_sans_io::create_topics_request::CreatableTopic;
use tansu_sans_io::delete_groups_response::DeletableGroupResult;
use tansu_sans_io::delete_records_request::DeleteRecordsTopic;
use tansu_sans_io::delete_records_response::{DeleteRecordsPartitionResult, DeleteRecordsTopicResult};
use tansu_sans_io::describe_cluster_response::DescribeClusterBroker;
use tansu_sans_io::describe_configs_response::DescribeConfigsResult;
use tansu_sans_io::describe_topic_partitions_response::DescribeTopicPartitionsResponseTopic;
use tansu_sans_io::incremental_alter_configs_request::AlterConfigsResource;
use tansu_sans_io::incremental_alter_configs_response::AlterConfigsResourceResponse;
use tansu_sans_io::list_groups_response::ListedGroup;
use tansu_sans_io::metadata_response::MetadataResponseTopic;
use tansu_sans_io::record::deflated::Batch;
use tansu_sans_io::txn_offset_commit_response::TxnOffsetCommitResponseTopic;
use tansu_sans_io::{
    ConfigResource, ErrorCode, IsolationLevel, ListOffset, OpType, ScramMechanism, to_system_time, to_timestamp,
};
use tansu_storage::{
    BrokerRegistrationRequest, Error, GroupDetail, ListOffsetResponse, MetadataResponse, NamedGroupDetail,
    OffsetCommitRequest, OffsetStage, ProducerIdResponse, Result, ScramCredential, Storage, TopicId, Topition,
    TxnAddPartitionsRequest, TxnAddPartitionsResponse, TxnOffsetCommitRequest, UpdateError, Version,
};
use url::Url;
use uuid::Uuid;

/// A segment is closed when it reaches this size...
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// ...or when its first batch is this old.
const SEGMENT_AGE: Duration = Duration::from_secs(24 * 3600);
/// One index entry per this many bytes of a segment: a fetch reads at most this much before
/// the batch it wants.
const INDEX_EVERY: u64 = 64 << 10;
/// Kafka's default `retention.ms`: 7 days.
const DEFAULT_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;
/// A batch's base offset and length, before the `batch_length` bytes the length counts.
const FRAME_HEADER: usize = 12;
/// Bytes of a batch from its partition leader epoch to its records (Kafka's fixed header
/// less the base offset and length).
const BATCH_FIXED: usize = 49;

/// A storage engine whose ordinary topics keep their records in log files (see the module).
/// With no directory it is the inner engine unchanged.
#[derive(Clone, Debug)]
pub struct Logs<S> {
    inner: S,
    dir: Option<Arc<LogDir>>,
    /// With SQLite: repairs to Tansu's engine (see [`crate::sqlite::Repairs`]).
    repairs: Option<Arc<crate::sqlite::Repairs>>,
}

impl<S: Storage> Logs<S> {
    /// `inner` with the records of ordinary topics in `dir` (created if missing).
    pub fn new(inner: S, dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(Self { inner, dir: Some(Arc::new(LogDir { dir, ..LogDir::default() })), repairs: None })
    }

    /// The same engine, with `repairs` to Tansu's SQLite engine (topic deletion, describing
    /// groups).
    pub fn with_repairs(self, repairs: crate::sqlite::Repairs) -> Self {
        Self { repairs: Some(Arc::new(repairs)), ..self }
    }

    /// `inner` as it is.
    pub fn plain(inner: S) -> Self {
        Self { inner, dir: None, repairs: None }
    }

    /// The log of `topition` when its topic is kept in files; `None` when the inner engine
    /// keeps it (or does not know it, and answers for it).
    async fn log(&self, topition: &Topition) -> Result<Option<SharedLog>> {
        Ok(match self.place(topition).await? {
            Place::Files(log) => Some(log),
            Place::Inner | Place::Unrouted => None,
        })
    }

    /// Where `topition`'s records are kept.
    async fn place(&self, topition: &Topition) -> Result<Place> {
        let Some(dir) = &self.dir else { return Ok(Place::Unrouted) };
        let topic = topition.topic();
        let known = dir.routes().get(topic).copied();
        let route = match known {
            Some(route) => route,
            None => {
                let Some(route) = self.route(dir, topic).await? else { return Ok(Place::Unrouted) };
                dir.routes().insert(topic.to_owned(), route);
                route
            }
        };
        let Route::Files { partitions } = route else { return Ok(Place::Inner) };
        let partition = topition.partition();
        if !(0..partitions).contains(&partition) {
            return Err(Error::Api(ErrorCode::UnknownTopicOrPartition));
        }
        dir.partition(topic, partition).map(Place::Files).map_err(io_error)
    }

    /// Where `topic`'s records are kept; `None` for a topic the inner engine does not know.
    async fn route(&self, dir: &LogDir, topic: &str) -> Result<Option<Route>> {
        let Some(partitions) = self
            .known_topic(topic)
            .await?
            .and_then(|t| t.partitions)
            .map(|p| i32::try_from(p.len()).unwrap_or(i32::MAX))
        else {
            return Ok(None);
        };
        if !valid_topic_name(topic) {
            return Ok(Some(Route::Inner));
        }
        if dir.dir.join(topic).is_dir() {
            return Ok(Some(Route::Files { partitions }));
        }
        let compacted = self.topic_config(topic, "cleanup.policy").await?.is_some_and(|v| v.contains("compact"));
        if compacted {
            return Ok(Some(Route::Inner));
        }
        for partition in 0..partitions {
            if self.inner.offset_stage(&Topition::new(topic, partition)).await?.high_watermark() > 0 {
                tracing::info!(topic, "records already kept in SQLite: the topic stays there");
                return Ok(Some(Route::Inner));
            }
        }
        fs::create_dir_all(dir.dir.join(topic)).map_err(io_error)?;
        Ok(Some(Route::Files { partitions }))
    }

    /// The value `topic` is configured with for `name`, if any.
    async fn topic_config(&self, topic: &str, name: &str) -> Result<Option<String>> {
        let configs = self.inner.describe_config(topic, ConfigResource::Topic, None).await?;
        Ok(configs.configs.into_iter().flatten().find(|c| c.name == name).and_then(|c| c.value))
    }

    /// `topic` as the inner engine describes it, if it has it.
    async fn known_topic(&self, topic: &str) -> Result<Option<MetadataResponseTopic>> {
        let metadata = self.inner.metadata(Some(&[TopicId::Name(topic.to_owned())])).await?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name.as_deref() == Some(topic) && t.error_code == i16::from(ErrorCode::None))
            .cloned())
    }

    /// The name of `topic`, asking the inner engine when it is given by id.
    async fn topic_name(&self, topic: &TopicId) -> Result<Option<String>> {
        match topic {
            TopicId::Name(name) => Ok(Some(name.clone())),
            TopicId::Id(_) => {
                let metadata = self.inner.metadata(Some(std::slice::from_ref(topic))).await?;
                Ok(metadata.topics().first().filter(|t| t.error_code == 0).and_then(|t| t.name.clone()))
            }
        }
    }

    /// Deletes, in every partition of every topic kept in files, the closed segments whose
    /// newest record is older than the topic's `retention.ms`.
    async fn expire(&self, dir: &LogDir, now: SystemTime) -> Result<()> {
        let topics: Vec<String> =
            fs::read_dir(&dir.dir).map_err(io_error)?.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        for topic in topics {
            let retention = self
                .topic_config(&topic, "retention.ms")
                .await?
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(DEFAULT_RETENTION_MS);
            if retention < 0 {
                continue;
            }
            let horizon = to_timestamp(&now)? - retention;
            let partitions: Vec<i32> = fs::read_dir(dir.dir.join(&topic))
                .map_err(io_error)?
                .filter_map(|e| e.ok()?.file_name().into_string().ok()?.parse().ok())
                .collect();
            for partition in partitions {
                let log = dir.partition(&topic, partition).map_err(io_error)?;
                let deleted = lock(&log).expire(horizon).map_err(io_error)?;
                if deleted > 0 {
                    tracing::info!(topic, partition, deleted, "expired log segments deleted");
                }
            }
        }
        Ok(())
    }
}

/// Where a partition's records are kept, as [`Logs::place`] finds it.
enum Place {
    /// In the partition's log files.
    Files(SharedLog),
    /// In the inner engine, routed there (a compacted topic, or a name the files cannot hold).
    Inner,
    /// Not routed: no log directory, or a topic the inner engine does not know.
    Unrouted,
}

#[derive(Debug, Clone, Copy)]
enum Route {
    /// The inner engine keeps the topic's records.
    Inner,
    /// Log files keep them.
    Files { partitions: i32 },
}

#[derive(Debug, Default)]
struct LogDir {
    dir: PathBuf,
    routes: Mutex<HashMap<String, Route>>,
    partitions: Mutex<HashMap<(String, i32), SharedLog>>,
}

impl LogDir {
    fn routes(&self) -> MutexGuard<'_, HashMap<String, Route>> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The partition's log, read from its files on first use.
    fn partition(&self, topic: &str, partition: i32) -> io::Result<SharedLog> {
        let mut partitions = self.partitions.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (topic.to_owned(), partition);
        if let Some(log) = partitions.get(&key) {
            return Ok(log.clone());
        }
        let log = Arc::new(Mutex::new(PartitionLog::open(self.dir.join(topic).join(partition.to_string()))?));
        partitions.insert(key, log.clone());
        Ok(log)
    }

    /// Forgets `topic` and deletes its files.
    fn remove(&self, topic: &str) -> io::Result<()> {
        self.routes().remove(topic);
        self.partitions.lock().unwrap_or_else(PoisonError::into_inner).retain(|(t, _), _| t != topic);
        match fs::remove_dir_all(self.dir.join(topic)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// A partition's log, shared by the requests on it.
type SharedLog = Arc<Mutex<PartitionLog>>;

fn lock(log: &Mutex<PartitionLog>) -> MutexGuard<'_, PartitionLog> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_error(e: io::Error) -> Error {
    Error::Io(Arc::new(e))
}

/// Kafka's legal topic names, which are also safe as directory names.
fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && topic != "."
        && topic != ".."
        && topic.len() <= 249
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// One segment file: the batches from offset `base`.
#[derive(Debug)]
struct Segment {
    base: i64,
    path: PathBuf,
    file: File,
    size: u64,
    /// (base offset of a batch, its position), one per [`INDEX_EVERY`] bytes, the first batch
    /// included.
    index: Vec<(i64, u64)>,
    first_timestamp: Option<i64>,
    max_timestamp: i64,
}

impl Segment {
    fn create(dir: &Path, base: i64) -> io::Result<Self> {
        let path = dir.join(format!("{base:020}.log"));
        let file = OpenOptions::new().read(true).append(true).create(true).open(&path)?;
        Ok(Self { base, path, file, size: 0, index: Vec::new(), first_timestamp: None, max_timestamp: i64::MIN })
    }

    /// Notes a batch written at `position`.
    fn noted(&mut self, batch: &Batch, position: u64, length: u64) {
        if self.index.last().is_none_or(|&(_, p)| position - p >= INDEX_EVERY) {
            self.index.push((batch.base_offset, position));
        }
        self.first_timestamp.get_or_insert(batch.base_timestamp);
        self.max_timestamp = self.max_timestamp.max(batch.max_timestamp);
        self.size = position + length;
    }

    /// The batch at `position`, and the position after it; `None` at the end.
    fn read_at(&self, position: u64) -> io::Result<Option<(Batch, u64)>> {
        if position >= self.size {
            return Ok(None);
        }
        let mut header = [0; FRAME_HEADER];
        self.file.read_exact_at(&mut header, position)?;
        let length = frame_length(&header).ok_or_else(|| corrupt(&self.path, position))?;
        let mut frame = vec![0; FRAME_HEADER + length];
        self.file.read_exact_at(&mut frame, position)?;
        let batch = Batch::try_from(Bytes::from(frame)).map_err(|_| corrupt(&self.path, position))?;
        Ok(Some((batch, position + (FRAME_HEADER + length) as u64)))
    }
}

/// The length of the batch a frame header announces, when it is plausible.
fn frame_length(header: &[u8; FRAME_HEADER]) -> Option<usize> {
    let length = i32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    usize::try_from(length).ok().filter(|&l| l >= BATCH_FIXED)
}

fn corrupt(path: &Path, position: u64) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("no record batch at {position} of {}", path.display()))
}

/// Whether a whole frame (header and batch) carries the checksum it says.
fn checksum_holds(frame: &[u8]) -> bool {
    // After the header: partition leader epoch (4), magic (1), crc (4), then what the crc covers.
    let crc_at = FRAME_HEADER + 5;
    let Some(stored) = frame.get(crc_at..crc_at + 4) else { return false };
    let stored = u32::from_be_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    digest.update(&frame[crc_at + 4..]);
    digest.finalize() as u32 == stored
}

/// An idempotent producer's place in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Producer {
    epoch: i16,
    last_sequence: i32,
}

/// One partition's segments, in offset order; the last one is written to.
#[derive(Debug)]
struct PartitionLog {
    dir: PathBuf,
    segments: Vec<Segment>,
    next_offset: i64,
    producers: HashMap<i64, Producer>,
}

impl PartitionLog {
    /// Reads the partition's segments in `dir`, cutting off a torn or corrupt tail.
    fn open(dir: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        let mut bases: Vec<i64> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
            .collect();
        bases.sort_unstable();
        let mut log = Self { dir, segments: Vec::new(), next_offset: 0, producers: HashMap::new() };
        let mut damaged = false;
        for base in bases {
            let mut segment = Segment::create(&log.dir, base)?;
            if damaged {
                // Everything after a damaged segment is unreachable: its offsets were cut off.
                drop(segment.file);
                fs::remove_file(&segment.path)?;
                continue;
            }
            log.next_offset = log.next_offset.max(base);
            damaged = log.scan(&mut segment)?;
            log.segments.push(segment);
        }
        Ok(log)
    }

    /// Rebuilds a segment's index, and the partition's next offset and producers, from its
    /// batches; cuts the file at the first one that is incomplete or corrupt and says so.
    fn scan(&mut self, segment: &mut Segment) -> io::Result<bool> {
        let bytes = Bytes::from(fs::read(&segment.path)?);
        let mut position = 0;
        while position < bytes.len() {
            let rest = &bytes[position..];
            let length = rest
                .first_chunk::<FRAME_HEADER>()
                .and_then(frame_length)
                .map(|length| FRAME_HEADER + length)
                .filter(|&length| rest.get(..length).is_some_and(checksum_holds));
            let batch = length.and_then(|length| Batch::try_from(bytes.slice(position..position + length)).ok());
            let (Some(length), Some(batch)) = (length, batch) else {
                tracing::warn!(segment = %segment.path.display(), position, "cutting off a torn or corrupt tail");
                segment.file.set_len(position as u64)?;
                return Ok(true);
            };
            self.remember(&batch);
            segment.noted(&batch, position as u64, length as u64);
            position += length;
        }
        Ok(false)
    }

    /// Notes a stored batch: the next offset, and its producer's last sequence.
    fn remember(&mut self, batch: &Batch) {
        self.next_offset = batch.base_offset + i64::from(batch.last_offset_delta) + 1;
        if batch.is_idempotent() {
            let last_sequence = batch.base_sequence.wrapping_add(batch.last_offset_delta);
            self.producers.insert(batch.producer_id, Producer { epoch: batch.producer_epoch, last_sequence });
        }
    }

    /// Kafka's checks of an idempotent producer's batch against what this partition has
    /// from it: an older epoch is fenced, a sequence already written is a duplicate (which
    /// the client takes as delivered), and a gap is out of order.
    fn check_sequence(&self, batch: &Batch) -> std::result::Result<(), ErrorCode> {
        if !batch.is_idempotent() {
            return Ok(());
        }
        let Some(known) = self.producers.get(&batch.producer_id) else { return Ok(()) };
        if batch.producer_epoch < known.epoch {
            return Err(ErrorCode::ProducerFenced);
        }
        if batch.producer_epoch > known.epoch {
            return Ok(());
        }
        let expected = if known.last_sequence == i32::MAX { 0 } else { known.last_sequence + 1 };
        match batch.base_sequence {
            s if s == expected => Ok(()),
            s if s <= known.last_sequence => Err(ErrorCode::DuplicateSequenceNumber),
            _ => Err(ErrorCode::OutOfOrderSequenceNumber),
        }
    }

    /// Appends `batch` at the next offset and returns that offset.
    fn append(&mut self, mut batch: Batch, now_ms: i64) -> Result<i64> {
        if batch.is_transactional() || batch.is_control() {
            return Err(Error::Api(ErrorCode::InvalidTxnState));
        }
        self.check_sequence(&batch).map_err(Error::Api)?;
        let offset = self.next_offset;
        batch.base_offset = offset;
        let roll = self.segments.last().is_none_or(|s| {
            s.size >= SEGMENT_BYTES || s.first_timestamp.is_some_and(|t| now_ms - t > SEGMENT_AGE.as_millis() as i64)
        });
        if roll {
            let segment = Segment::create(&self.dir, offset).map_err(io_error)?;
            self.segments.push(segment);
        }
        let Some(segment) = self.segments.last_mut() else { return Err(Error::Api(ErrorCode::UnknownServerError)) };
        let frame = Bytes::from(batch.clone());
        let position = segment.size;
        if let Err(e) = (&segment.file).write_all(&frame) {
            // Leave no partial frame behind for the next write to follow.
            let _ = segment.file.set_len(position);
            return Err(io_error(e));
        }
        segment.noted(&batch, position, frame.len() as u64);
        self.remember(&batch);
        Ok(offset)
    }

    /// Batches from the one holding `offset` on, at least one, until `max_bytes` are read.
    fn read(&self, offset: i64, max_bytes: u32) -> io::Result<Vec<Batch>> {
        let mut batches = Vec::new();
        if offset >= self.next_offset {
            return Ok(batches);
        }
        let first = self.segments.partition_point(|s| s.base <= offset).saturating_sub(1);
        let mut bytes = 0_u64;
        for segment in &self.segments[first..] {
            let mut position = match segment.index.partition_point(|&(o, _)| o <= offset) {
                0 => 0,
                i => segment.index[i - 1].1,
            };
            while let Some((batch, next)) = segment.read_at(position)? {
                bytes += next - position;
                position = next;
                if batch.base_offset + i64::from(batch.last_offset_delta) < offset {
                    continue;
                }
                batches.push(batch);
                if bytes >= u64::from(max_bytes) {
                    return Ok(batches);
                }
            }
        }
        Ok(batches)
    }

    fn log_start(&self) -> i64 {
        self.segments.first().map_or(self.next_offset, |s| s.base)
    }

    /// The first offset whose batch has a record at or after `timestamp_ms`, with that batch's
    /// newest timestamp.
    fn offset_for_timestamp(&self, timestamp_ms: i64) -> io::Result<Option<(i64, i64)>> {
        for segment in self.segments.iter().filter(|s| s.max_timestamp >= timestamp_ms) {
            let mut position = 0;
            while let Some((batch, next)) = segment.read_at(position)? {
                if batch.max_timestamp >= timestamp_ms {
                    return Ok(Some((batch.base_offset, batch.max_timestamp)));
                }
                position = next;
            }
        }
        Ok(None)
    }

    /// Deletes the closed segments whose newest record is older than `horizon_ms`; returns how
    /// many.
    fn expire(&mut self, horizon_ms: i64) -> io::Result<usize> {
        let closed = self.segments.len().saturating_sub(1);
        let expired = self.segments[..closed].iter().take_while(|s| s.max_timestamp < horizon_ms).count();
        for segment in self.segments.drain(..expired) {
            fs::remove_file(&segment.path)?;
        }
        Ok(expired)
    }

    fn stage(&self) -> OffsetStage {
        offset_stage(self.log_start(), self.next_offset)
    }
}

/// Tansu's `OffsetStage` has no constructor but is (de)serialisable.
fn offset_stage(log_start: i64, high_watermark: i64) -> OffsetStage {
    serde_json::from_value(serde_json::json!({
        "last_stable": high_watermark,
        "high_watermark": high_watermark,
        "log_start": log_start,
    }))
    .unwrap_or_default()
}

#[async_trait::async_trait]
impl<S: Storage> Storage for Logs<S> {
    async fn register_broker(&self, registration: BrokerRegistrationRequest) -> Result<()> {
        self.inner.register_broker(registration).await
    }

    /// A topic that exists is answered `TOPIC_ALREADY_EXISTS` here: Tansu's SQLite engine
    /// finds out by its insert failing and logs that as an error, so every start of a stack on
    /// its existing data (whose clients create the topics they need) printed one per topic.
    async fn create_topic(&self, topic: CreatableTopic, validate_only: bool) -> Result<Uuid> {
        let name = topic.name.clone();
        if self.known_topic(&name).await?.is_some() {
            return Err(Error::Api(ErrorCode::TopicAlreadyExists));
        }
        let id = self.inner.create_topic(topic, validate_only).await?;
        if let Some(dir) = self.dir.as_ref().filter(|_| !validate_only) {
            // A new topic starts empty, whatever an interrupted deletion left behind.
            dir.remove(&name).map_err(io_error)?;
        }
        Ok(id)
    }

    /// Only `SET` and `DELETE` operations: Tansu 0.6's engines panic (`todo!()`) on `APPEND`
    /// and `SUBTRACT`, so a resource asking for those (or an unknown operation) is refused
    /// whole with `INVALID_REQUEST`, naming the config.
    async fn incremental_alter_resource(&self, resource: AlterConfigsResource) -> Result<AlterConfigsResourceResponse> {
        let supported = |op: i8| matches!(OpType::try_from(op), Ok(OpType::Set | OpType::Delete));
        if let Some(config) = resource.configs.iter().flatten().find(|c| !supported(c.config_operation)) {
            return Ok(AlterConfigsResourceResponse::default()
                .error_code(ErrorCode::InvalidRequest.into())
                .error_message(Some(format!(
                    "{}: operation {} is not supported by this broker (only SET and DELETE)",
                    config.name, config.config_operation
                )))
                .resource_type(resource.resource_type)
                .resource_name(resource.resource_name));
        }
        if let Some(dir) = &self.dir {
            dir.routes().remove(&resource.resource_name);
        }
        self.inner.incremental_alter_resource(resource).await
    }

    /// Refused, partition by partition, with `POLICY_VIOLATION`: Tansu 0.6's engines panic on
    /// it (`todo!()`, which took the whole broker down with it), and the log files have no
    /// start offset to move. Records go by `retention.ms`, or with their topic.
    async fn delete_records(&self, topics: &[DeleteRecordsTopic]) -> Result<Vec<DeleteRecordsTopicResult>> {
        Ok(topics
            .iter()
            .map(|topic| {
                let partitions = topic.partitions.iter().flatten().map(|p| {
                    DeleteRecordsPartitionResult::default()
                        .partition_index(p.partition_index)
                        .low_watermark(-1)
                        .error_code(ErrorCode::PolicyViolation.into())
                });
                DeleteRecordsTopicResult::default().name(topic.name.clone()).partitions(Some(partitions.collect()))
            })
            .collect())
    }

    async fn delete_topic(&self, topic: &TopicId) -> Result<ErrorCode> {
        let name = if self.dir.is_some() || self.repairs.is_some() { self.topic_name(topic).await? } else { None };
        if let (Some(dir), Some(name)) = (&self.dir, &name) {
            dir.remove(name).map_err(io_error)?;
        }
        let (Some(repairs), Some(name)) = (&self.repairs, &name) else { return self.inner.delete_topic(topic).await };
        repairs.allow(name).await.map_err(|e| io_error(io::Error::other(e)))?;
        let deleted = self.inner.delete_topic(topic).await;
        repairs.done(name).await.map_err(|e| io_error(io::Error::other(e)))?;
        deleted
    }

    async fn brokers(&self) -> Result<Vec<DescribeClusterBroker>> {
        self.inner.brokers().await
    }

    async fn produce(&self, transaction_id: Option<&str>, topition: &Topition, batch: Batch) -> Result<i64> {
        match self.log(topition).await? {
            None => self.inner.produce(transaction_id, topition, batch).await,
            Some(_) if transaction_id.is_some() => Err(Error::Api(ErrorCode::InvalidTxnState)),
            Some(log) => {
                let now = to_timestamp(&SystemTime::now())?;
                lock(&log).append(batch, now)
            }
        }
    }

    async fn fetch(
        &self,
        topition: &'_ Topition,
        offset: i64,
        min_bytes: u32,
        max_bytes: u32,
        isolation: IsolationLevel,
    ) -> Result<Vec<Batch>> {
        let in_sqlite = match self.place(topition).await? {
            Place::Files(log) => return lock(&log).read(offset, max_bytes).map_err(io_error),
            Place::Inner => true,
            Place::Unrouted => false,
        };
        if let Some(repairs) = self.repairs.as_ref().filter(|_| in_sqlite) {
            let stage = self.inner.offset_stage(topition).await?;
            let end = match isolation {
                IsolationLevel::ReadCommitted => stage.last_stable(),
                IsolationLevel::ReadUncommitted => stage.high_watermark(),
            };
            match repairs.fetch(topition.topic(), topition.partition(), offset, max_bytes, end).await {
                Ok(batches) => return Ok(batches),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "reading records from SQLite; Tansu's own fetch instead");
                }
            }
        }
        self.inner.fetch(topition, offset, min_bytes, max_bytes, isolation).await
    }

    async fn offset_stage(&self, topition: &Topition) -> Result<OffsetStage> {
        match self.log(topition).await? {
            None => self.inner.offset_stage(topition).await,
            Some(log) => Ok(lock(&log).stage()),
        }
    }

    async fn list_offsets(
        &self,
        isolation_level: IsolationLevel,
        offsets: &[(Topition, ListOffset)],
    ) -> Result<Vec<(Topition, ListOffsetResponse)>> {
        let mut answers = Vec::with_capacity(offsets.len());
        for (topition, wanted) in offsets {
            let Some(log) = self.log(topition).await? else {
                if *wanted == ListOffset::Latest {
                    // The engine's high watermark, as its fetches report it: Tansu's memory
                    // engine answers `ListOffsets` with one past the first record of the batch
                    // it takes for the newest, not past the last record.
                    let stage = self.inner.offset_stage(topition).await?;
                    let end = match isolation_level {
                        IsolationLevel::ReadCommitted => stage.last_stable(),
                        IsolationLevel::ReadUncommitted => stage.high_watermark(),
                    };
                    answers.push((topition.clone(), ListOffsetResponse { offset: Some(end), ..Default::default() }));
                    continue;
                }
                let mut inner = self.inner.list_offsets(isolation_level, &[(topition.clone(), *wanted)]).await?;
                answers.append(&mut inner);
                continue;
            };
            let log = lock(&log);
            let (offset, timestamp) = match wanted {
                ListOffset::Earliest => (log.log_start(), None),
                ListOffset::Latest => (log.next_offset, None),
                ListOffset::Timestamp(at) => match log.offset_for_timestamp(to_timestamp(at)?).map_err(io_error)? {
                    Some((offset, ms)) => (offset, to_system_time(ms).ok()),
                    // Kafka's answer when no record is that recent.
                    None => (-1, None),
                },
            };
            answers
                .push((topition.clone(), ListOffsetResponse { offset: Some(offset), timestamp, ..Default::default() }));
        }
        Ok(answers)
    }

    async fn offset_commit(
        &self,
        group_id: &str,
        retention_time_ms: Option<Duration>,
        offsets: &[(Topition, OffsetCommitRequest)],
    ) -> Result<Vec<(Topition, ErrorCode)>> {
        self.inner.offset_commit(group_id, retention_time_ms, offsets).await
    }

    async fn offset_fetch(
        &self,
        group_id: Option<&str>,
        topics: &[Topition],
        require_stable: Option<bool>,
    ) -> Result<BTreeMap<Topition, i64>> {
        self.inner.offset_fetch(group_id, topics, require_stable).await
    }

    async fn committed_offset_topitions(&self, group_id: &str) -> Result<BTreeMap<Topition, i64>> {
        self.inner.committed_offset_topitions(group_id).await
    }

    async fn metadata(&self, topics: Option<&[TopicId]>) -> Result<MetadataResponse> {
        self.inner.metadata(topics).await
    }

    async fn upsert_user_scram_credential(
        &self,
        user: &str,
        mechanism: ScramMechanism,
        credential: ScramCredential,
    ) -> Result<()> {
        self.inner.upsert_user_scram_credential(user, mechanism, credential).await
    }

    async fn delete_user_scram_credential(&self, user: &str, mechanism: ScramMechanism) -> Result<()> {
        self.inner.delete_user_scram_credential(user, mechanism).await
    }

    async fn user_scram_credential(&self, user: &str, mechanism: ScramMechanism) -> Result<Option<ScramCredential>> {
        self.inner.user_scram_credential(user, mechanism).await
    }

    async fn describe_config(
        &self,
        name: &str,
        resource: ConfigResource,
        keys: Option<&[String]>,
    ) -> Result<DescribeConfigsResult> {
        self.inner.describe_config(name, resource, keys).await
    }

    async fn list_groups(&self, states_filter: Option<&[String]>) -> Result<Vec<ListedGroup>> {
        self.inner.list_groups(states_filter).await
    }

    async fn delete_groups(&self, group_ids: Option<&[String]>) -> Result<Vec<DeletableGroupResult>> {
        self.inner.delete_groups(group_ids).await
    }

    async fn describe_groups(
        &self,
        group_ids: Option<&[String]>,
        include_authorized_operations: bool,
    ) -> Result<Vec<NamedGroupDetail>> {
        let Some(repairs) = &self.repairs else {
            return self.inner.describe_groups(group_ids, include_authorized_operations).await;
        };
        let mut described = Vec::new();
        for group in group_ids.into_iter().flatten() {
            let detail = repairs.group_detail(group).await.map_err(|e| io_error(io::Error::other(format!("{e:#}"))))?;
            described.push(match detail {
                Some(detail) => NamedGroupDetail::found(group.clone(), detail),
                None => NamedGroupDetail::error_code(group.clone(), ErrorCode::GroupIdNotFound),
            });
        }
        Ok(described)
    }

    async fn describe_topic_partitions(
        &self,
        topics: Option<&[TopicId]>,
        partition_limit: i32,
        cursor: Option<Topition>,
    ) -> Result<Vec<DescribeTopicPartitionsResponseTopic>> {
        self.inner.describe_topic_partitions(topics, partition_limit, cursor).await
    }

    async fn update_group(
        &self,
        group_id: &str,
        detail: GroupDetail,
        version: Option<Version>,
    ) -> Result<Version, UpdateError<GroupDetail>> {
        self.inner.update_group(group_id, detail, version).await
    }

    async fn init_producer(
        &self,
        transaction_id: Option<&str>,
        transaction_timeout_ms: i32,
        producer_id: Option<i64>,
        producer_epoch: Option<i16>,
    ) -> Result<ProducerIdResponse> {
        // Tansu's engines answer only a request for a new producer id (id and epoch -1) and
        // panic (`todo!()`) on the others: InitProducerId versions 0–2 carry no id (aiokafka
        // and kafka-python send them) and an idempotent producer bumping its epoch sends its
        // current one (KIP-360; librdkafka after some errors). Each is answered as a request
        // for a new id, which clients take as they take Kafka's new id for an exhausted epoch.
        if (producer_id, producer_epoch) != (Some(-1), Some(-1)) {
            tracing::debug!(?producer_id, ?producer_epoch, "InitProducerId answered with a new producer id");
        }
        self.inner.init_producer(transaction_id, transaction_timeout_ms, Some(-1), Some(-1)).await
    }

    async fn txn_add_offsets(
        &self,
        transaction_id: &str,
        producer_id: i64,
        producer_epoch: i16,
        group_id: &str,
    ) -> Result<ErrorCode> {
        self.inner.txn_add_offsets(transaction_id, producer_id, producer_epoch, group_id).await
    }

    async fn txn_add_partitions(&self, partitions: TxnAddPartitionsRequest) -> Result<TxnAddPartitionsResponse> {
        self.inner.txn_add_partitions(partitions).await
    }

    async fn txn_offset_commit(&self, offsets: TxnOffsetCommitRequest) -> Result<Vec<TxnOffsetCommitResponseTopic>> {
        self.inner.txn_offset_commit(offsets).await
    }

    async fn txn_end(
        &self,
        transaction_id: &str,
        producer_id: i64,
        producer_epoch: i16,
        committed: bool,
    ) -> Result<ErrorCode> {
        self.inner.txn_end(transaction_id, producer_id, producer_epoch, committed).await
    }

    async fn maintain(&self, now: SystemTime) -> Result<()> {
        self.inner.maintain(now).await?;
        match &self.dir {
            Some(dir) => self.expire(dir, now).await,
            None => Ok(()),
        }
    }

    async fn cluster_id(&self) -> Result<String> {
        self.inner.cluster_id().await
    }

    async fn node(&self) -> Result<i32> {
        self.inner.node().await
    }

    async fn advertised_listener(&self) -> Result<Url> {
        self.inner.advertised_listener().await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of `count` records from `producer` at `sequence`, as a client makes it.
    fn batch(count: i32, producer: i64, sequence: i32, timestamp: i64) -> Batch {
        let mut builder = tansu_sans_io::record::inflated::Batch::builder()
            .last_offset_delta(count - 1)
            .base_timestamp(timestamp)
            .max_timestamp(timestamp)
            .producer_id(producer)
            .base_sequence(sequence);
        for i in 0..count {
            let record = tansu_sans_io::record::Record::builder().offset_delta(i).value(Some(Bytes::from(vec![7; 10])));
            builder = builder.record(record);
        }
        builder.build().and_then(Batch::try_from).expect("a batch")
    }

    fn offsets(batches: &[Batch]) -> Vec<i64> {
        batches.iter().map(|b| b.base_offset).collect()
    }

    #[test]
    fn batches_get_consecutive_offsets_and_read_back_from_any_offset() {
        let dir = tempfile::tempdir().expect("dir");
        let mut log = PartitionLog::open(dir.path().join("t/0")).expect("open");
        for (i, count) in [3, 1, 5].into_iter().enumerate() {
            let expected = [0, 3, 4][i];
            assert_eq!(log.append(batch(count, -1, -1, 1_000), 1_000).expect("append"), expected);
        }
        assert_eq!(log.next_offset, 9);
        assert_eq!(offsets(&log.read(0, u32::MAX).expect("read")), [0, 3, 4]);
        // An offset inside a batch gets that whole batch, as from Kafka.
        assert_eq!(offsets(&log.read(5, u32::MAX).expect("read")), [4]);
        assert_eq!(offsets(&log.read(3, u32::MAX).expect("read")), [3, 4]);
        assert!(log.read(9, u32::MAX).expect("read").is_empty());
        // At least one batch, however small the limit.
        assert_eq!(offsets(&log.read(0, 1).expect("read")), [0]);
        let read = log.read(0, u32::MAX).expect("read");
        assert_eq!(read[2].record_data, batch(5, -1, -1, 1_000).record_data);
    }

    #[test]
    fn a_reopened_log_knows_its_end_and_its_producers() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t/0");
        {
            let mut log = PartitionLog::open(path.clone()).expect("open");
            log.append(batch(2, 42, 0, 1_000), 1_000).expect("append");
            log.append(batch(3, 42, 2, 1_000), 1_000).expect("append");
        }
        let mut log = PartitionLog::open(path).expect("reopen");
        assert_eq!(log.next_offset, 5);
        assert_eq!(log.producers.get(&42), Some(&Producer { epoch: 0, last_sequence: 4 }));
        // A retry of the last batch is a duplicate, a gap is out of order, the next is fine.
        let retry = log.append(batch(3, 42, 2, 1_000), 1_000).expect_err("duplicate");
        assert!(matches!(retry, Error::Api(ErrorCode::DuplicateSequenceNumber)), "{retry:?}");
        let gap = log.append(batch(1, 42, 7, 1_000), 1_000).expect_err("gap");
        assert!(matches!(gap, Error::Api(ErrorCode::OutOfOrderSequenceNumber)), "{gap:?}");
        assert_eq!(log.append(batch(1, 42, 5, 1_000), 1_000).expect("next"), 5);
        // A new epoch starts over; the old one is fenced from then on.
        let mut bumped = batch(1, 42, 0, 1_000);
        bumped.producer_epoch = 1;
        assert_eq!(log.append(bumped, 1_000).expect("new epoch"), 6);
        let fenced = log.append(batch(1, 42, 6, 1_000), 1_000).expect_err("fenced");
        assert!(matches!(fenced, Error::Api(ErrorCode::ProducerFenced)), "{fenced:?}");
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_off_and_writing_goes_on_from_there() {
        for damage in ["torn", "corrupt"] {
            let dir = tempfile::tempdir().expect("dir");
            let path = dir.path().join("t/0");
            let segment = {
                let mut log = PartitionLog::open(path.clone()).expect("open");
                log.append(batch(2, -1, -1, 1_000), 1_000).expect("append");
                log.append(batch(2, -1, -1, 1_000), 1_000).expect("append");
                log.segments[0].path.clone()
            };
            let mut bytes = fs::read(&segment).expect("read");
            let len = bytes.len();
            match damage {
                "torn" => bytes.truncate(len - 5),
                _ => bytes[len - 1] ^= 0xff,
            }
            fs::write(&segment, &bytes).expect("damage");
            let mut log = PartitionLog::open(path).expect("reopen");
            assert_eq!(log.next_offset, 2, "{damage}");
            assert_eq!(offsets(&log.read(0, u32::MAX).expect("read")), [0], "{damage}");
            assert_eq!(log.append(batch(1, -1, -1, 1_000), 1_000).expect("append"), 2, "{damage}");
            assert_eq!(offsets(&log.read(0, u32::MAX).expect("read")), [0, 2], "{damage}");
        }
    }

    #[test]
    fn segments_roll_by_age_and_expire_by_retention() {
        let dir = tempfile::tempdir().expect("dir");
        let day = SEGMENT_AGE.as_millis() as i64;
        let mut log = PartitionLog::open(dir.path().join("t/0")).expect("open");
        log.append(batch(1, -1, -1, 0), 0).expect("append");
        log.append(batch(1, -1, -1, 10), 10).expect("append");
        log.append(batch(1, -1, -1, day + 20), day + 20).expect("append");
        assert_eq!(log.segments.iter().map(|s| s.base).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(log.offset_for_timestamp(5).expect("time"), Some((1, 10)));
        assert_eq!(log.offset_for_timestamp(day + 30).expect("time"), None);
        // The open segment is never deleted, however old.
        assert_eq!(log.expire(day + 1_000).expect("expire"), 1);
        assert_eq!(log.expire(i64::MAX).expect("expire"), 0);
        assert_eq!(log.log_start(), 2);
        assert_eq!(offsets(&log.read(0, u32::MAX).expect("read")), [2]);
        let reopened = PartitionLog::open(dir.path().join("t/0")).expect("reopen");
        assert_eq!((reopened.log_start(), reopened.next_offset), (2, 3));
    }

    #[test]
    fn many_batches_are_found_through_the_sparse_index() {
        let dir = tempfile::tempdir().expect("dir");
        let mut log = PartitionLog::open(dir.path().join("t/0")).expect("open");
        // ~1 KB batches: an index entry every ~64 of them.
        for _ in 0..1_000 {
            log.append(batch(100, -1, -1, 1_000), 1_000).expect("append");
        }
        assert!(log.segments[0].index.len() > 10, "{}", log.segments[0].index.len());
        for offset in [0, 99, 100, 6_450, 99_999] {
            let got = log.read(offset, 1).expect("read");
            assert_eq!(offsets(&got), [offset / 100 * 100], "{offset}");
        }
    }

    #[test]
    fn transactional_batches_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let mut log = PartitionLog::open(dir.path().join("t/0")).expect("open");
        let mut txn = batch(1, 42, 0, 1_000);
        txn.attributes |= 16;
        assert!(matches!(log.append(txn, 1_000), Err(Error::Api(ErrorCode::InvalidTxnState))));
        assert_eq!(log.next_offset, 0);
    }

    /// Logs over each of Tansu's engines: SQLite in `db`, memory; the log files in `dir` and
    /// `scratch`.
    async fn both_engines(
        db: &str,
        dir: &Path,
        scratch: &Path,
    ) -> anyhow::Result<[Logs<tansu_storage::StorageContainer>; 2]> {
        Ok([Logs::new(sqlite_storage(db).await?, dir)?, Logs::new(memory_storage().await?, scratch)?])
    }

    /// Logs over Tansu's SQLite engine with the repairs the broker installs.
    struct Repaired {
        /// The SQLite file (see [`remove_sqlite_files`]).
        db: String,
        /// The log files' directory, removed when dropped.
        dir: tempfile::TempDir,
        logs: Logs<tansu_storage::StorageContainer>,
    }

    /// [`Repaired`] logs in the file `<pid>.<name>.logs-test.db`.
    async fn repaired_sqlite(name: &str) -> anyhow::Result<Repaired> {
        let db = format!("{}.{name}.logs-test.db", std::process::id());
        let dir = tempfile::tempdir()?;
        let sqlite = sqlite_storage(&db).await?;
        let repairs = crate::sqlite::Repairs::install(&db, "logs-test").await?;
        let logs = Logs::new(sqlite, dir.path())?.with_repairs(repairs);
        Ok(Repaired { db, dir, logs })
    }

    /// Removes the SQLite database `db` and its journal files.
    fn remove_sqlite_files(db: &str) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = fs::remove_file(format!("{db}{suffix}"));
        }
    }

    /// Tansu's engine at `url` for cluster "logs-test".
    async fn engine(url: &str) -> anyhow::Result<tansu_storage::StorageContainer> {
        tansu_storage::StorageContainer::builder()
            .cluster_id("logs-test")
            .node_id(1)
            .advertised_listener(Url::parse("tcp://127.0.0.1:9092")?)
            .storage(Url::parse(url)?)
            .cancellation(tokio_util::sync::CancellationToken::new())
            .silent(true)
            .build()
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    }

    /// Tansu's memory engine for cluster "logs-test".
    async fn memory_storage() -> anyhow::Result<tansu_storage::StorageContainer> {
        engine("memory://logs-test/").await
    }

    /// Tansu's SQLite engine for cluster "logs-test" in `db` (relative to the current directory),
    /// with its broker registered.
    async fn sqlite_storage(db: &str) -> anyhow::Result<tansu_storage::StorageContainer> {
        let sqlite = engine(&format!("sqlite://{db}")).await?;
        sqlite
            .register_broker(BrokerRegistrationRequest {
                broker_id: 1,
                cluster_id: "logs-test".into(),
                incarnation_id: Uuid::new_v4(),
                rack: None,
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(sqlite)
    }

    /// Every form of InitProducerId gets a producer id, on both engines: a request without an
    /// id (versions 0–2: aiokafka, kafka-python) and an idempotent producer bumping its epoch
    /// (KIP-360) made Tansu's SQLite engine panic (`todo!()`), taking the broker down.
    #[tokio::test]
    async fn every_init_producer_id_request_gets_a_producer_id() -> anyhow::Result<()> {
        let db = format!("{}.producers.logs-test.db", std::process::id());
        let (dir, scratch) = (tempfile::tempdir()?, tempfile::tempdir()?);
        for logs in both_engines(&db, dir.path(), scratch.path()).await? {
            let first = logs.init_producer(None, 0, Some(-1), Some(-1)).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            assert_eq!(first.error, ErrorCode::None);
            for (id, epoch) in [(None, None), (Some(first.id), Some(first.epoch))] {
                let next = logs.init_producer(None, 0, id, epoch).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
                assert_eq!(next.error, ErrorCode::None, "{id:?}, {epoch:?}");
                assert!(next.id >= 0 && next.epoch >= 0, "{id:?}, {epoch:?}: {next:?}");
            }
        }
        remove_sqlite_files(&db);
        Ok(())
    }

    /// A topic's configs can be set and deleted; appending and subtracting (on which Tansu's
    /// engines panicked) are refused with `INVALID_REQUEST`, on both engines.
    #[tokio::test]
    async fn configs_are_set_and_deleted_and_other_operations_refused() -> anyhow::Result<()> {
        use tansu_sans_io::incremental_alter_configs_request::AlterableConfig;
        let db = format!("{}.configs.logs-test.db", std::process::id());
        let (dir, scratch) = (tempfile::tempdir()?, tempfile::tempdir()?);
        for logs in both_engines(&db, dir.path(), scratch.path()).await? {
            let topic = CreatableTopic::default().name("t".into()).num_partitions(1).replication_factor(1);
            logs.create_topic(topic, false).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let alter = |op: OpType| {
                let config = AlterableConfig::default()
                    .name("retention.ms".into())
                    .config_operation(i8::from(op))
                    .value(Some("60000".into()));
                AlterConfigsResource::default()
                    .resource_type(i8::from(ConfigResource::Topic))
                    .resource_name("t".into())
                    .configs(Some(vec![config]))
            };
            for (name, op, expected) in [
                ("set", OpType::Set, ErrorCode::None),
                ("append", OpType::Append, ErrorCode::InvalidRequest),
                ("subtract", OpType::Subtract, ErrorCode::InvalidRequest),
                ("delete", OpType::Delete, ErrorCode::None),
            ] {
                let answer = logs.incremental_alter_resource(alter(op)).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
                assert_eq!(ErrorCode::try_from(answer.error_code)?, expected, "{name}: {answer:?}");
            }
        }
        remove_sqlite_files(&db);
        Ok(())
    }

    /// Creating a topic that exists is answered `TOPIC_ALREADY_EXISTS` with nothing logged as
    /// an error, on both engines (Tansu's SQLite engine logged one for every such request, so
    /// every restart of a stack printed an error per topic).
    #[tokio::test]
    async fn creating_a_topic_that_exists_logs_no_error() -> anyhow::Result<()> {
        use std::sync::Mutex;
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().expect("capture").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber =
            tracing_subscriber::fmt().with_max_level(tracing::Level::ERROR).with_writer(move || sink.clone()).finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        let db = format!("{}.exists.logs-test.db", std::process::id());
        let (dir, scratch) = (tempfile::tempdir()?, tempfile::tempdir()?);
        for logs in both_engines(&db, dir.path(), scratch.path()).await? {
            let topic = || CreatableTopic::default().name("again".into()).num_partitions(2).replication_factor(1);
            logs.create_topic(topic(), false).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let again = logs.create_topic(topic(), false).await;
            assert!(matches!(again, Err(Error::Api(ErrorCode::TopicAlreadyExists))), "{again:?}");
        }
        remove_sqlite_files(&db);
        let logged = String::from_utf8_lossy(&captured.0.lock().expect("capture")).into_owned();
        assert!(logged.is_empty(), "errors logged: {logged}");
        Ok(())
    }

    /// A consumer group's detail as stored reads back (Tansu's SQLite engine failed on it); a
    /// group it does not have is not found.
    #[tokio::test]
    async fn groups_are_described_from_sqlite() -> anyhow::Result<()> {
        let Repaired { db, dir: _dir, logs } = repaired_sqlite("groups").await?;
        let detail = GroupDetail { generation_id: 3, session_timeout_ms: 10_000, ..GroupDetail::default() };
        logs.update_group("g", detail.clone(), None).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let groups = ["g".to_owned(), "missing".to_owned()];
        let described = logs.describe_groups(Some(&groups), false).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!(
            described,
            [
                NamedGroupDetail::found("g".into(), detail),
                NamedGroupDetail::error_code("missing".into(), ErrorCode::GroupIdNotFound)
            ]
        );
        remove_sqlite_files(&db);
        Ok(())
    }

    /// A compacted topic's records kept in SQLite read back as produced, each with its own
    /// headers and time, from any offset, in fetches that stop at the byte limit but always
    /// return a first record (Tansu's returned nothing when the first was over it, and the
    /// reader stalled).
    #[tokio::test]
    async fn compacted_records_read_back_from_sqlite_with_their_own_headers() -> anyhow::Result<()> {
        use tansu_sans_io::create_topics_request::CreatableTopicConfig;
        use tansu_sans_io::record::{Header, Record, inflated};
        let Repaired { db, dir: _dir, logs } = repaired_sqlite("compacted").await?;
        let configs = vec![CreatableTopicConfig::default().name("cleanup.policy".into()).value(Some("compact".into()))];
        let topic = CreatableTopic::default().name("catalog".into()).num_partitions(1).replication_factor(1);
        logs.create_topic(topic.configs(Some(configs)), false).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let at = Topition::new("catalog", 0);
        // Two batches of three records, each record with a header naming it; the last value
        // is large.
        let mut produced: Vec<(String, Vec<u8>, String)> = Vec::new();
        for b in 0..2 {
            let mut builder =
                inflated::Batch::builder().last_offset_delta(2).base_timestamp(1_000 + b).max_timestamp(1_002 + b);
            for i in 0..3 {
                let n = b * 3 + i;
                let value = if n == 5 { vec![b'x'; 5_000] } else { format!("value-{n}").into_bytes() };
                let record = Record::builder()
                    .offset_delta(i as i32)
                    .timestamp_delta(i)
                    .key(Some(Bytes::from(format!("key-{n}"))))
                    .value(Some(Bytes::from(value.clone())))
                    .header(Header::builder().key(Bytes::from("id")).value(Bytes::from(format!("header-{n}"))));
                builder = builder.record(record);
                produced.push((format!("key-{n}"), value, format!("header-{n}")));
            }
            logs.produce(None, &at, builder.build().and_then(Batch::try_from)?)
                .await
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        // Offset, key, value, the header's value, time.
        type Read = (i64, String, Vec<u8>, String, i64);
        // Every record from `offset`, in fetches of at most `max_bytes`.
        let read = async |mut offset: i64, max_bytes: u32| -> anyhow::Result<Vec<Read>> {
            let mut out = Vec::new();
            while offset < 6 {
                let batches = logs.fetch(&at, offset, 1, max_bytes, IsolationLevel::ReadUncommitted).await;
                let batches = batches.map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let before = out.len();
                for batch in batches {
                    let batch = inflated::Batch::try_from(batch)?;
                    for r in &batch.records {
                        let text =
                            |b: &Option<Bytes>| String::from_utf8_lossy(b.as_deref().unwrap_or_default()).into_owned();
                        let headers: Vec<String> = r.headers.iter().map(|h| text(&h.value)).collect();
                        anyhow::ensure!(headers.len() == 1, "headers {headers:?}");
                        let value = r.value.as_deref().unwrap_or_default().to_vec();
                        let when = batch.base_timestamp + r.timestamp_delta;
                        out.push((
                            batch.base_offset + i64::from(r.offset_delta),
                            text(&r.key),
                            value,
                            headers[0].clone(),
                            when,
                        ));
                    }
                }
                anyhow::ensure!(out.len() > before, "no progress at offset {offset} with {max_bytes} bytes");
                offset = out.last().map_or(offset, |r| r.0 + 1);
            }
            Ok(out)
        };
        for (offset, max_bytes) in [(0, u32::MAX), (0, 1), (2, 20), (4, 100)] {
            let got = read(offset, max_bytes).await?;
            let expected: Vec<Read> = produced
                .iter()
                .enumerate()
                .skip(offset as usize)
                .map(|(n, (k, v, h))| {
                    (n as i64, k.clone(), v.clone(), h.clone(), 1_000 + (n as i64 / 3) + (n as i64 % 3))
                })
                .collect();
            assert_eq!(got, expected, "from {offset}, {max_bytes} bytes");
        }
        remove_sqlite_files(&db);
        Ok(())
    }

    /// A partition's end offset (`ListOffsets`, latest) is one past its last record, and its
    /// start the first, for topics in log files and compacted ones in the engine, on both
    /// engines: Tansu's memory engine answered one past the *first* record of the batch it
    /// took for the newest, so a client reading the end of a compacted topic (the catalog) to
    /// know when it has caught up stopped short of it.
    #[tokio::test]
    async fn end_offsets_are_past_the_last_record_of_every_topic() -> anyhow::Result<()> {
        use tansu_sans_io::create_topics_request::CreatableTopicConfig;
        let db = format!("{}.ends.logs-test.db", std::process::id());
        let (dir, scratch) = (tempfile::tempdir()?, tempfile::tempdir()?);
        for (engine, logs) in ["sqlite", "memory"].into_iter().zip(both_engines(&db, dir.path(), scratch.path()).await?)
        {
            for (name, compacted) in [("plain", false), ("compacted", true)] {
                let configs = compacted.then(|| {
                    vec![CreatableTopicConfig::default().name("cleanup.policy".into()).value(Some("compact".into()))]
                });
                let topic = CreatableTopic::default()
                    .name(name.into())
                    .num_partitions(1)
                    .replication_factor(1)
                    .configs(configs);
                logs.create_topic(topic, false).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let at = Topition::new(name, 0);
                for count in [3, 4, 2] {
                    logs.produce(None, &at, batch(count, -1, -1, 1_000)).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
                let wanted = [(at.clone(), ListOffset::Latest), (at.clone(), ListOffset::Earliest)];
                let answers = logs
                    .list_offsets(IsolationLevel::ReadUncommitted, &wanted)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let offsets: Vec<Option<i64>> = answers.iter().map(|(_, a)| a.offset).collect();
                assert_eq!(offsets, [Some(9), Some(0)], "{engine}, {name}: {answers:?}");
            }
        }
        remove_sqlite_files(&db);
        Ok(())
    }

    /// A data directory from before the log files: a topic whose records are in SQLite stays
    /// there (its offsets go on, its records are read), a new topic goes to files, and a
    /// compacted one stays in SQLite.
    #[tokio::test]
    async fn topics_with_records_in_sqlite_stay_there() -> anyhow::Result<()> {
        use tansu_sans_io::create_topics_request::CreatableTopicConfig;
        // Tansu takes its SQLite file relative to the current directory (the crate's, in a
        // test); removed at the end, and ignored by git.
        let db = format!("{}.logs-test.db", std::process::id());
        let dir = tempfile::tempdir()?;
        let sqlite = sqlite_storage(&db).await?;
        let topic = |name: &str, compacted: bool| {
            let configs = compacted.then(|| {
                vec![CreatableTopicConfig::default().name("cleanup.policy".into()).value(Some("compact".into()))]
            });
            CreatableTopic::default().name(name.into()).num_partitions(1).replication_factor(1).configs(configs)
        };
        let at = |name: &str| Topition::new(name, 0);
        let old = Logs::plain(sqlite.clone());
        old.create_topic(topic("old", false), false).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        assert_eq!(
            old.produce(None, &at("old"), batch(2, -1, -1, 1_000)).await.map_err(|e| anyhow::anyhow!("{e:?}"))?,
            0
        );

        let logs = Logs::new(sqlite, dir.path())?;
        logs.create_topic(topic("new", false), false).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        logs.create_topic(topic("catalog", true), false).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for name in ["old", "new", "catalog"] {
            let first =
                logs.produce(None, &at(name), batch(1, -1, -1, 1_000)).await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            assert_eq!(first, if name == "old" { 2 } else { 0 }, "{name}");
            let read = logs.fetch(&at(name), 0, 1, u32::MAX, IsolationLevel::ReadUncommitted).await;
            let read = read.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            assert_eq!(read.iter().map(|b| b.record_count).sum::<u32>(), if name == "old" { 3 } else { 1 }, "{name}");
            assert_eq!(dir.path().join(name).exists(), name == "new", "{name}");
        }
        // A partition the topic does not have is refused, not made.
        let missing = logs.produce(None, &Topition::new("new", 1), batch(1, -1, -1, 1_000)).await;
        assert!(matches!(missing, Err(Error::Api(ErrorCode::UnknownTopicOrPartition))), "{missing:?}");
        remove_sqlite_files(&db);
        Ok(())
    }

    #[test]
    fn topic_names_that_are_not_safe_directories_are_not_kept_in_files() {
        assert!(valid_topic_name("user-activity-topic") && valid_topic_name("a.b_c"));
        for bad in ["", ".", "..", "a/b", "../x", "é"] {
            assert!(!valid_topic_name(bad), "{bad:?}");
        }
    }
}
