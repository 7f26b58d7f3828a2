//! The live catalog: every service that needs product data keeps a [`catalog::Catalog`] built
//! from the compacted `catalog-topic` and follows its changes (a new product, a price change,
//! a product withdrawn) while it runs.
//!
//! [`Context::follow_catalog`] starts a replica consumer of the topic (every instance reads
//! every partition from the beginning) and returns once it has caught up with the end of the
//! topic as it was at start, so that a service never handles its first event with a
//! half-loaded catalog.

use std::time::Duration;

use catalog::{Catalog, Change};
use chrono::Utc;
use events::validate;
use events::{CatalogProduct, Topic};

use crate::Context;
use crate::kafka::{ConsumerSpec, Handler, HandlerError, KafkaSettings, Outbox, Producer, Record};
use crate::state::Shared;

/// A catalog shared between a service's consumers and its HTTP handlers.
pub type LiveCatalog = Shared<Catalog>;

/// Applies `catalog-topic` messages to a live catalog.
pub struct CatalogFollower(pub LiveCatalog);

impl Handler for CatalogFollower {
    fn handle(&mut self, rec: &Record<'_>, _out: &mut Outbox) -> Result<(), HandlerError> {
        let message: CatalogProduct = rec.json()?;
        // The topic may be written by anyone: the same rules as the catalog API.
        let value = serde_json::to_value(&message).map_err(|e| HandlerError::malformed(e.to_string()))?;
        validate::catalog_product(&value, Utc::now()).map_err(HandlerError::invalid)?;
        if rec.key.is_some_and(|k| k != message.product_id) {
            return Err(HandlerError::malformed(format!(
                "the key {:?} is not the product id {:?}",
                rec.key.unwrap_or_default(),
                message.product_id
            )));
        }
        let mut catalog = self.0.write();
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
        let live = LiveCatalog::default();
        let loaded = self.spawn_consumer_flag(
            producer,
            ConsumerSpec::replica("catalog", [Topic::Catalog]),
            CatalogFollower(Shared::clone(&live)),
        );
        while !loaded.get() && !self.shutdown.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(products = live.read().len(), "catalog loaded");
        live
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
