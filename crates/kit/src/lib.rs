//! The runtime kit every RetargetIQ service stands on, so that a service's `main.rs` is one
//! line and its `lib.rs` holds only its own logic.
//!
//! - [`config`]: typed settings from environment variables; a bad value names the variable.
//! - [`telemetry`]: structured logs with the service name on every line (text or JSON).
//! - [`kafka`]: the idempotent producer, topic creation, and the at-least-once consumer loop
//!   with retries and dead letters.
//! - [`http`]: `/health`, `/ready`, `/metrics`, request tracing, timeouts and the JSON error type.
//! - [`catalog`]: the live product catalog, followed from `catalog-topic`.
//! - [`json`]: JSON decoding from bytes, validated as UTF-8 once.
//! - [`service`]: the [`service::Service`] trait and [`service::main`], which wires it all
//!   together and drains in-flight work on SIGINT/SIGTERM within a time limit.

pub mod catalog;
pub mod clock;
pub mod config;
pub mod dead_letters;
pub mod dedup;
pub mod http;
pub mod ingest;
pub mod json;
pub mod kafka;
pub mod service;
pub mod state;
pub mod telemetry;

pub use service::{Context, Service};

/// Every binary built on the kit (the services, the `retargetiq` command and so the embedded
/// broker it runs) allocates with mimalloc. The pipeline allocates and frees many small
/// objects per message (decoded JSON, candidate lists); with glibc's allocator that was
/// 15-25 % of ranking's and retrieval's CPU samples under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Spawns a task that stays inside the current tracing span (so its log lines keep the
/// service name).
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument as _;
    tokio::spawn(future.in_current_span())
}
