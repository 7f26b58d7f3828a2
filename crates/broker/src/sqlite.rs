//! Repairs to Tansu 0.6's SQLite engine, applied when the broker opens its file. None
//! changes any data; Tansu's own queries run as they are, except that the records it keeps
//! (the compacted catalog) are fetched by [`Repairs::fetch`].

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use tansu_sans_io::record::{Header, Record, deflated, inflated};

/// Tansu 0.6's SQLite schema keeps record headers in a table with no index: reading a record's
/// headers (`header_fetch.sql`, once per record fetched) scans every header ever stored. Every
/// message of the platform carries a correlation-id header, so each fetch got slower as the
/// log grew, and under load the broker spent nearly all its time there (and collapsed).
/// [`Repairs::install`] adds the index the lookup needs.
///
/// Tansu 0.6 deletes a topic's row with `topic_delete_by.sql`,
/// `delete from topic where topic.cluster in (select c.id … where t.name = $2)`: every topic of
/// the cluster, not the one named. Deleting any one topic made every other vanish, for good.
///
/// The guard is a trigger that ignores the deletion of a topic row unless the topic's name is
/// in a table of topics being deleted, which [`Repairs::allow`] fills for the length of one
/// deletion (see `Logs::delete_topic`).
///
/// Tansu 0.6 also reads a consumer group's stored detail back as a JSON string rather than
/// the object it wrote (`describe_groups`: `serde_json::Value::from(&str)`), so describing a
/// group failed and the client's connection was closed; [`Repairs::group_detail`] reads it.
///
/// Tansu 0.6 fetches the records kept in SQLite (the compacted catalog) with one query and
/// then one more per record for its headers, each prepared from its text: with a shop's
/// catalog of 200,000 products, the broker spent a restart parsing SQL (the stack ready after
/// 40.6 s, 32.9 s with this; the rest was the long poll's, `crate::long_poll`). A first
/// record larger than the fetch's byte limit was not returned at all, so its reader stalled.
/// [`Repairs::fetch`] reads a fetch's records, then their headers, with one query each, and
/// always returns a first record, as Kafka does.
#[derive(Debug)]
pub struct Repairs {
    // Kept open with its connection.
    _db: libsql::Database,
    connection: libsql::Connection,
    cluster: String,
}

impl Repairs {
    /// Installs the header index and the topic-deletion trigger in `file` (once) and opens
    /// the connection the repairs use, for the cluster `cluster`.
    pub async fn install(file: &str, cluster: &str) -> anyhow::Result<Self> {
        let db = libsql::Builder::new_local(file).build().await.with_context(|| format!("opening {file}"))?;
        let connection = db.connect()?;
        connection.busy_timeout(Duration::from_secs(10))?;
        connection
            .execute("create index if not exists retargetiq_header_record on header (topition, offset_id)", ())
            .await
            .context("indexing the broker's record headers")?;
        connection
            .execute_batch(
                "create table if not exists retargetiq_topic_deleting (name text primary key);
                 create trigger if not exists retargetiq_delete_the_named_topic_only
                 before delete on topic
                 when not exists (select 1 from retargetiq_topic_deleting d where d.name = old.name)
                 begin select raise(ignore); end;
                 delete from retargetiq_topic_deleting;",
            )
            .await
            .context("guarding the broker's topics against Tansu's topic deletion")?;
        Ok(Self { _db: db, connection, cluster: cluster.to_owned() })
    }

    /// Lets the row of topic `name` be deleted, until [`Repairs::done`].
    pub async fn allow(&self, name: &str) -> libsql::Result<()> {
        self.connection.execute("insert or ignore into retargetiq_topic_deleting (name) values (?1)", [name]).await?;
        Ok(())
    }

    /// Guards topic `name` again.
    pub async fn done(&self, name: &str) -> libsql::Result<()> {
        self.connection.execute("delete from retargetiq_topic_deleting where name = ?1", [name]).await?;
        Ok(())
    }

    /// The records of `topic`'s `partition` from `offset` up to (not including) `end`, as
    /// Tansu's engine returns them (consecutive records of one producer and attributes in one
    /// batch; an empty batch when there is none), each with its own headers: at least one
    /// record, then as many as keep the keys and values under `max_bytes`.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        max_bytes: u32,
        end: i64,
    ) -> anyhow::Result<Vec<deflated::Batch>> {
        let mut rows = self
            .connection
            .query(
                "select r.offset_id, r.attributes, r.timestamp, r.k, r.v, r.producer_id, r.producer_epoch
                 from cluster c
                 join topic t on t.cluster = c.id
                 join topition tp on tp.topic = t.id
                 join record r on r.topition = tp.id
                 where c.name = ?1 and t.name = ?2 and tp.partition = ?3 and r.offset_id >= ?4 and r.offset_id < ?5
                 order by r.offset_id",
                libsql::params![self.cluster.as_str(), topic, partition, offset, end],
            )
            .await?;
        let mut records: Vec<Stored> = Vec::new();
        let mut bytes = 0_u64;
        while let Some(row) = rows.next().await? {
            let key: Option<Vec<u8>> = row.get(3)?;
            let value: Option<Vec<u8>> = row.get(4)?;
            bytes += (key.as_ref().map_or(0, Vec::len) + value.as_ref().map_or(0, Vec::len)) as u64;
            if !records.is_empty() && bytes >= u64::from(max_bytes) {
                break;
            }
            records.push(Stored {
                offset: row.get(0)?,
                attributes: row.get::<Option<i32>>(1)?.unwrap_or(0) as i16,
                timestamp: row.get(2)?,
                key: key.map(Bytes::from),
                value: value.map(Bytes::from),
                producer_id: row.get::<Option<i64>>(5)?.unwrap_or(-1),
                producer_epoch: row.get::<Option<i32>>(6)?.unwrap_or(-1) as i16,
            });
        }
        drop(rows);
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(vec![inflated::Batch::builder().build()?.try_into()?]);
        };
        let mut headers: HashMap<i64, Vec<KeyValue>> = HashMap::new();
        let mut rows = self
            .connection
            .query(
                "select h.offset_id, h.k, h.v
                 from cluster c
                 join topic t on t.cluster = c.id
                 join topition tp on tp.topic = t.id
                 join header h on h.topition = tp.id
                 where c.name = ?1 and t.name = ?2 and tp.partition = ?3 and h.offset_id >= ?4 and h.offset_id <= ?5
                 order by h.offset_id, h.rowid",
                libsql::params![self.cluster.as_str(), topic, partition, first.offset, last.offset],
            )
            .await?;
        while let Some(row) = rows.next().await? {
            let (key, value): (Option<Vec<u8>>, Option<Vec<u8>>) = (row.get(1)?, row.get(2)?);
            headers.entry(row.get(0)?).or_default().push((key.map(Bytes::from), value.map(Bytes::from)));
        }
        let mut batches = Vec::new();
        let mut records = records.into_iter().peekable();
        while let Some(head) = records.next() {
            let mut batch = inflated::Batch::builder()
                .base_offset(head.offset)
                .attributes(head.attributes)
                .base_timestamp(head.timestamp)
                .producer_id(head.producer_id)
                .producer_epoch(head.producer_epoch);
            let (base_offset, base_timestamp) = (head.offset, head.timestamp);
            let (mut last_delta, mut max_timestamp) = (0, head.timestamp);
            let mut next = Some(head);
            while let Some(r) = next {
                last_delta = i32::try_from(r.offset - base_offset)?;
                max_timestamp = max_timestamp.max(r.timestamp);
                let mut record = Record::builder()
                    .offset_delta(last_delta)
                    .timestamp_delta(r.timestamp - base_timestamp)
                    .key(r.key)
                    .value(r.value);
                for (key, value) in headers.remove(&r.offset).into_iter().flatten() {
                    let mut header = Header::builder();
                    if let Some(key) = key {
                        header = header.key(key);
                    }
                    if let Some(value) = value {
                        header = header.value(value);
                    }
                    record = record.header(header);
                }
                batch = batch.record(record);
                next = records.next_if(|n| {
                    (n.attributes, n.producer_id, n.producer_epoch) == (r.attributes, r.producer_id, r.producer_epoch)
                });
            }
            batches.push(batch.last_offset_delta(last_delta).max_timestamp(max_timestamp).build()?.try_into()?);
        }
        Ok(batches)
    }

    /// The stored detail of consumer group `group`; `None` when there is no such group (or
    /// it has no detail yet).
    pub async fn group_detail(&self, group: &str) -> anyhow::Result<Option<tansu_storage::GroupDetail>> {
        let mut rows = self
            .connection
            .query(
                "select cgd.detail from cluster c
                 join consumer_group cg on cg.cluster = c.id
                 join consumer_group_detail cgd on cgd.consumer_group = cg.id
                 where c.name = ?1 and cg.name = ?2",
                [self.cluster.as_str(), group],
            )
            .await?;
        let Some(row) = rows.next().await? else { return Ok(None) };
        let detail: String = row.get(0)?;
        Ok(Some(serde_json::from_str(&detail).with_context(|| format!("the stored detail of group {group:?}"))?))
    }
}

/// A header's key and value.
type KeyValue = (Option<Bytes>, Option<Bytes>);

/// A record as Tansu's engine stores it.
struct Stored {
    offset: i64,
    attributes: i16,
    timestamp: i64,
    key: Option<Bytes>,
    value: Option<Bytes>,
    producer_id: i64,
    producer_epoch: i16,
}
