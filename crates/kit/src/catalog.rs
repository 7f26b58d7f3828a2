//! The live catalog: every service that needs product data keeps a [`catalog::Catalog`] built
//! from the compacted `catalog-topic` and follows its changes (a new product, a price change,
//! a product withdrawn) while it runs.
//!
//! [`Context::follow_catalog`] starts a replica consumer of the topic (every instance reads
//! every partition from the beginning) and returns once it has caught up with the end of the
//! topic as it was at start, so that a service never handles its first event with a
//! half-loaded catalog.
//!
//! Catalog and events travel on different topics, so a consumer of events may see an event
//! before its catalog consumer has applied the product written just before it (a shop's feed,
//! then its traffic; `retargetiq events import`). [`CatalogSync`] closes that gap where it
//! matters: a handler that meets a product its catalog lacks asks it whether the catalog is
//! current for the message's time, and if it may not be, waits (a [`Wait`]) until the catalog
//! has applied everything the topic held when the wait began.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use catalog::{Catalog, Change};
use chrono::Utc;
use events::validate;
use events::{CatalogProduct, Topic};

use crate::Context;
use crate::kafka::{ConsumerSpec, Handler, HandlerError, KafkaSettings, Outbox, Producer, Record, Wait};
use crate::state::Shared;

/// A catalog shared between a service's consumers and its HTTP handlers.
pub type LiveCatalog = Shared<Catalog>;

/// Applies `catalog-topic` messages to a live catalog, and tells its [`CatalogSync`] how far it
/// has come.
pub struct CatalogFollower {
    pub catalog: LiveCatalog,
    pub sync: CatalogSync,
}

impl Handler for CatalogFollower {
    fn handle(&mut self, rec: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        let result = self.apply(rec);
        // Applied or refused (a refused message is dead-lettered): either way it is behind us.
        self.sync.applied(rec.partition, rec.offset);
        result
    }
}

impl CatalogFollower {
    fn apply(&mut self, rec: &Record<'_>) -> Result<(), HandlerError> {
        // The topic may be written by anyone (a shop's own client too): the same shape and
        // rules as the catalog API, so the platform's own `updatedAt` is not required.
        let message = validate::catalog_product(&rec.value()?, Utc::now()).map_err(HandlerError::invalid)?;
        if rec.key.is_some_and(|k| k != message.product_id) {
            return Err(HandlerError::malformed(format!(
                "the key {:?} is not the product id {:?}",
                rec.key.unwrap_or_default(),
                message.product_id
            )));
        }
        let mut catalog = self.catalog.write();
        let change = catalog.upsert(message.to_product());
        let outcome = match change {
            Change::Added => "added",
            Change::Updated => "updated",
            Change::Unchanged => "unchanged",
        };
        metrics::counter!("catalog_updates_total", "outcome" => outcome).increment(1);
        metrics::gauge!("catalog_products").set(catalog.len() as f64);
        Ok(())
    }
}

impl Context {
    /// Follows `catalog-topic` into a new live catalog, and waits until it holds every product
    /// the topic had when the service started (or the service is shutting down).
    pub async fn follow_catalog(&mut self, producer: &Producer) -> LiveCatalog {
        let sync = CatalogSync::always_current();
        self.follow_catalog_with(producer, sync).await
    }

    /// [`Context::follow_catalog`], with a [`CatalogSync`] that can wait for the catalog to
    /// be current.
    pub async fn follow_catalog_synced(&mut self, producer: &Producer) -> anyhow::Result<(LiveCatalog, CatalogSync)> {
        let sync = CatalogSync::new(&self.kafka)?;
        Ok((self.follow_catalog_with(producer, sync.clone()).await, sync))
    }

    async fn follow_catalog_with(&mut self, producer: &Producer, sync: CatalogSync) -> LiveCatalog {
        let live = LiveCatalog::default();
        let started = Utc::now().timestamp_millis();
        let loaded = self.spawn_consumer_flag(
            producer,
            ConsumerSpec::replica("catalog", [Topic::Catalog]),
            CatalogFollower { catalog: Shared::clone(&live), sync: sync.clone() },
        );
        while !loaded.get() && !self.shutdown.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Loaded up to the end offsets read after `started`: every write acknowledged before.
        sync.current_until(started);
        tracing::info!(products = live.read().len(), "catalog loaded");
        live
    }
}

/// How current a live catalog is: the next offset its follower applies in each partition of
/// `catalog-topic`, and a moment before which every write the broker acknowledged is applied.
/// Cheap to clone.
#[derive(Clone)]
pub struct CatalogSync(Arc<SyncState>);

struct SyncState {
    /// Partition -> the offset after the last message applied.
    applied: Mutex<HashMap<i32, i64>>,
    /// Milliseconds since the epoch: every catalog write acknowledged before is applied.
    current_until: AtomicI64,
    /// Reads the topic's end offsets; `None` for a catalog that is always current.
    reader: Option<Arc<rdkafka::consumer::BaseConsumer>>,
    /// One catch-up at a time; a message that waited behind one may find it covered it.
    catching_up: tokio::sync::Mutex<()>,
}

/// How long a catch-up waits for the follower before giving up (the message is then handled
/// with the catalog as it is).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(10);

impl CatalogSync {
    /// A sync that reads `catalog-topic`'s end offsets from the broker of `settings`.
    pub fn new(settings: &KafkaSettings) -> anyhow::Result<Self> {
        let reader = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &settings.bootstrap_servers)
            .create()
            .map_err(|e| anyhow::anyhow!("creating the catalog's offset reader: {e}"))?;
        Ok(Self::with_reader(Some(Arc::new(reader))))
    }

    /// A catalog that never waits: built whole before use (tests, offline evaluations), or
    /// a service for which a moment's lag does not matter.
    pub fn always_current() -> Self {
        Self::with_reader(None)
    }

    fn with_reader(reader: Option<Arc<rdkafka::consumer::BaseConsumer>>) -> Self {
        Self(Arc::new(SyncState {
            applied: Mutex::new(HashMap::new()),
            current_until: AtomicI64::new(0),
            reader,
            catching_up: tokio::sync::Mutex::new(()),
        }))
    }

    fn applied(&self, partition: i32, offset: i64) {
        let mut applied = self.0.applied.lock().unwrap_or_else(PoisonError::into_inner);
        let next = applied.entry(partition).or_default();
        *next = (*next).max(offset + 1);
    }

    fn current_until(&self, ms: i64) {
        self.0.current_until.fetch_max(ms, Ordering::AcqRel);
    }

    /// For a message written at `written_ms` (its Kafka timestamp; `None` if it has none) that
    /// names a product the catalog lacks: `None` when the catalog is known to hold every
    /// product written before the message, else a [`Wait`] that ends once the catalog has
    /// applied what the topic holds now.
    pub fn wait_if_behind(&self, written_ms: Option<i64>) -> Option<Wait> {
        self.0.reader.as_ref()?;
        let until = self.0.current_until.load(Ordering::Acquire);
        if written_ms.is_some_and(|t| t < until) {
            return None;
        }
        let sync = self.clone();
        Some(Wait::new("the catalog to catch up", async move { sync.catch_up(written_ms).await }))
    }

    async fn catch_up(&self, written_ms: Option<i64>) {
        let _one = self.0.catching_up.lock().await;
        if written_ms.is_some_and(|t| t < self.0.current_until.load(Ordering::Acquire)) {
            return; // the catch-up this one waited behind covered it
        }
        let started = Utc::now().timestamp_millis();
        match tokio::time::timeout(CATCH_UP_LIMIT, self.reach_end()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = format!("{e:#}"), "could not tell whether the catalog is current"),
            Err(_) => tracing::warn!(limit = ?CATCH_UP_LIMIT, "the catalog did not catch up in time"),
        }
        metrics::histogram!("catalog_catch_up_seconds")
            .record((Utc::now().timestamp_millis() - started).max(0) as f64 / 1000.0);
        // Also past the message's own time, so that it is never made to wait twice (its
        // producer's clock may run ahead of ours).
        self.current_until(started.max(written_ms.map_or(started, |t| t + 1)));
    }

    /// Reads the topic's end offsets, then waits until the follower has applied up to them.
    async fn reach_end(&self) -> anyhow::Result<()> {
        let Some(reader) = self.0.reader.clone() else { return Ok(()) };
        let ranges = tokio::task::spawn_blocking(move || {
            crate::kafka::admin::watermarks(&*reader, Topic::Catalog, |_| true, Duration::from_secs(5))
        })
        .await??;
        let ends: Vec<(i32, i64)> =
            ranges.into_iter().filter(|(_, low, high)| high > low).map(|(p, _, high)| (p, high)).collect();
        loop {
            let behind = {
                let applied = self.0.applied.lock().unwrap_or_else(PoisonError::into_inner);
                ends.iter().any(|(p, end)| applied.get(p).copied().unwrap_or(0) < *end)
            };
            if !behind {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Publishes the demo catalog ([`Catalog::demo`]) to `catalog-topic` if the topic holds no
/// message yet, as `retargetiq up` does unless told not to; returns how many products it
/// published (0 when the topic already had a catalog).
pub async fn load_demo_if_empty(settings: &KafkaSettings) -> anyhow::Result<usize> {
    if crate::kafka::admin::message_count(&settings.bootstrap_servers, Topic::Catalog).await? > 0 {
        return Ok(0);
    }
    let producer = Producer::for_pipeline(settings)?;
    let now = Utc::now();
    let messages: Vec<CatalogProduct> = Catalog::demo().products().iter().map(|p| CatalogProduct::of(p, now)).collect();
    let sent = futures::future::join_all(messages.iter().map(|m| producer.send(m, None))).await;
    if let Some(Err(e)) = sent.into_iter().find(Result::is_err) {
        anyhow::bail!("publishing the demo catalog: {e}");
    }
    Ok(messages.len())
}

/// A live catalog holding the demo catalog ([`Catalog::demo`]): for tests and the offline
/// evaluations, which run the services' code without a broker.
pub fn demo() -> LiveCatalog {
    Shared::new(Catalog::from_products(Catalog::demo().products().iter().cloned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::DeadLetterKind;

    /// Only a message that may have been written after the moment up to which the catalog is
    /// known to be complete is made to wait (one without a timestamp always may); a catalog
    /// built whole never waits.
    #[tokio::test]
    async fn only_a_message_newer_than_the_catalog_waits() -> anyhow::Result<()> {
        assert!(CatalogSync::always_current().wait_if_behind(None).is_none());
        let sync = CatalogSync::new(&KafkaSettings::for_embedded_broker("127.0.0.1:9"))?;
        sync.current_until(1_000);
        assert!(sync.wait_if_behind(Some(999)).is_none());
        assert!(sync.wait_if_behind(Some(1_000)).is_some());
        assert!(sync.wait_if_behind(None).is_some());
        // A catch-up that cannot reach the broker gives up and still moves past the message,
        // so that it is not made to wait again.
        sync.catch_up(Some(5_000)).await;
        assert!(sync.wait_if_behind(Some(5_000)).is_none());
        Ok(())
    }

    /// The topic takes a product in the shape the catalog API and `catalog import` take (a
    /// shop's own client may write it there), and holds it to the same rules.
    #[test]
    fn a_product_written_to_the_topic_is_held_to_the_api_rules() {
        let mut follower = CatalogFollower { catalog: LiveCatalog::default(), sync: CatalogSync::always_current() };
        let mut apply = |key: &str, payload: &str| {
            let mut rec = Record::bare(Topic::Catalog, payload.as_bytes());
            rec.key = Some(key);
            follower.apply(&rec)
        };
        apply("SKU-1", r#"{"productId":"SKU-1","name":"Red shoe","category":"shoes","price":59.9}"#)
            .expect("the API's own shape");
        apply("SKU-2", r#"{"productId":"SKU-2","name":"Mug","category":"home","price":9.5,"brand":"Acme","available":false,"updatedAt":"2026-12-07T00:00:00Z"}"#)
            .expect("with the optional fields and the platform's own updatedAt");
        let mut refused = |key: &str, payload: &str, field: &str| match apply(key, payload) {
            Err(HandlerError::Reject { reason, field: got, .. }) => {
                assert!(reason.contains(field), "{reason}");
                assert_eq!(got.as_deref(), (field != "key").then_some(field), "{reason}");
            }
            other => panic!("{payload}: expected a refusal naming {field}, got {other:?}"),
        };
        refused("SKU-3", r#"{"productId":"SKU-3","name":"x","category":"c","price":-1}"#, "price");
        refused("SKU-4", r#"{"productId":"SKU-4","category":"c","price":1}"#, "name");
        refused("SKU-5", r#"{"productId":"SKU-5","name":"x","category":"c","price":1,"popularity":2}"#, "popularity");
        refused("other", r#"{"productId":"SKU-6","name":"x","category":"c","price":1}"#, "key");
        assert!(matches!(
            apply("SKU-7", "{\"productId\":1"),
            Err(HandlerError::Reject { kind: DeadLetterKind::Malformed, .. })
        ));
        let catalog = follower.catalog.read();
        assert_eq!(catalog.len(), 2);
        let mug = catalog.get("SKU-2").expect("SKU-2");
        assert_eq!((mug.brand.as_deref(), mug.available, mug.price), (Some("Acme"), false, 9.5));
    }
}
