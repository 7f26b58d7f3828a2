//! Repairs to Tansu 0.6's SQLite engine, applied when the broker opens its file. None
//! changes any data; Tansu's own queries run as they are.

use std::time::Duration;

use anyhow::Context as _;

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
