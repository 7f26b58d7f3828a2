//! `order` (8082): takes orders over REST and publishes them to `order-topic`.
//!
//! The endpoint's behaviour (random event on an empty body, object, batch, `202` only after
//! the broker's acknowledgement, field-naming `4xx` errors, `503` when the broker is down) is
//! shared with the other ingestion service and lives in [`kit::ingest`].

use std::sync::Arc;

use events::OrderEvent;
use kit::config::{ConfigError, Env};
use kit::ingest::{self, IngestState};
use kit::{Context, Service};

/// The `order` service.
pub struct Order;

impl Service for Order {
    const NAME: &'static str = "order";
    const DEFAULT_PORT: u16 = 8082;
    type Config = ();

    fn config(_env: &Env) -> Result<(), ConfigError> {
        Ok(())
    }

    async fn run((): (), mut ctx: Context) -> anyhow::Result<()> {
        let producer = ctx.request_producer()?;
        let routes =
            ingest::router::<OrderEvent>(Self::NAME, "/api/orders/place", Arc::new(IngestState::new(producer)));
        ctx.serve(routes).await
    }
}
