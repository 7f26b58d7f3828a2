//! Kafka plumbing: settings, the idempotent [`Producer`], topic creation ([`admin`]) and the
//! at-least-once [`consumer`] loop.

pub mod admin;
pub mod consumer;
pub mod producer;

use std::time::Duration;

pub use consumer::{ConsumerSpec, Handler, HandlerError, Outbox, Record, Subscription, run_consumer};
pub use producer::{ProduceError, Producer};

use crate::config::{ConfigError, Env, positive};

/// Broker settings shared by every client of a service.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `KAFKA_BOOTSTRAP_SERVERS` (default `127.0.0.1:9092`, where `retargetiq up` starts its broker).
    pub bootstrap_servers: String,
    /// `KAFKA_PRODUCER_BUFFER_KB`: most memory librdkafka may hold for unsent messages
    /// (default 16 MiB; librdkafka's own default is 1 GiB per producer).
    pub producer_buffer_kb: u32,
    /// `KAFKA_LINGER_MS`: how long the producer waits to fill a batch (default 2 ms).
    pub linger: Duration,
    /// `KAFKA_DELIVERY_TIMEOUT_MS`: how long a produce may take before it fails, for request
    /// paths that must answer (default 5000). Pipeline consumers retry without limit instead.
    pub delivery_timeout: Duration,
    /// `KAFKA_CONSUMER_FETCH_MAX_KB`: most memory a consumer's fetch queue may hold (default 8 MiB).
    pub consumer_queue_kb: u32,
    /// `KAFKA_HANDLER_MAX_ATTEMPTS`: tries before a failing message goes to the dead-letter
    /// topic (default 4).
    pub handler_max_attempts: u32,
}

impl KafkaSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            bootstrap_servers: env.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092".to_owned())?,
            producer_buffer_kb: env.checked("KAFKA_PRODUCER_BUFFER_KB", 16_384, positive)?,
            linger: env.millis("KAFKA_LINGER_MS", Duration::from_millis(2))?,
            delivery_timeout: env.millis("KAFKA_DELIVERY_TIMEOUT_MS", Duration::from_secs(5))?,
            consumer_queue_kb: env.checked("KAFKA_CONSUMER_FETCH_MAX_KB", 8_192, positive)?,
            handler_max_attempts: env.checked("KAFKA_HANDLER_MAX_ATTEMPTS", 4, positive)?,
        })
    }

    /// Settings for a broker at `bootstrap_servers`, everything else at its default.
    pub fn for_broker(bootstrap_servers: impl Into<String>) -> Self {
        let mut s =
            Self::from_env(&Env::from_pairs::<&str, &str>([])).unwrap_or_else(|_| unreachable!("defaults are valid"));
        s.bootstrap_servers = bootstrap_servers.into();
        s
    }
}
