//! `user-activity` (8081): takes user activity over REST and publishes it to
//! `user-activity-topic` (`POST /api/users/activity`), and the shop's products to the
//! compacted `catalog-topic` (`PUT /api/catalog/products`): the platform's ways in.
//!
//! The endpoint's behaviour (random event on an empty body, object, batch, `202` only after
//! the broker's acknowledgement, field-naming `4xx` errors, `503` when the broker is down) is
//! shared with the other ingestion service and lives in [`kit::ingest`].

use std::sync::Arc;

use events::{ActivityEvent, CatalogProduct};
use kit::config::{ConfigError, Env};
use kit::ingest::{self, IngestState};
use kit::{Context, Service};

/// The `user-activity` service.
pub struct UserActivity;

impl Service for UserActivity {
    const NAME: &'static str = "user-activity";
    const DEFAULT_PORT: u16 = 8081;
    type Config = ();

    fn config(_env: &Env) -> Result<(), ConfigError> {
        Ok(())
    }

    async fn run((): (), mut ctx: Context) -> anyhow::Result<()> {
        let state = Arc::new(IngestState::new(ctx.request_producer()?));
        let routes = ingest::Api::new(Self::NAME)
            .endpoint::<ActivityEvent>("/api/users/activity", Arc::clone(&state))
            .endpoint::<CatalogProduct>("/api/catalog/products", state)
            .into_router();
        ctx.serve(routes).await
    }
}
