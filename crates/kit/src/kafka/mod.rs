//! Kafka plumbing: settings, the idempotent [`Producer`], topic creation ([`admin`]) and the
//! at-least-once [`consumer`] loop.

pub mod admin;
pub mod consumer;
pub mod producer;

use std::time::Duration;

pub use consumer::{ConsumerSpec, Handler, HandlerError, Outbox, Record, Subscription, Wait, run_consumer};
pub use producer::{ProduceError, Producer};

use crate::config::{ConfigError, Env, positive};

/// What a client of the embedded broker (Tansu 0.6) is given, on top of its address:
/// librdkafka must never time a message out (see [`producer`]), and batches go uncompressed
/// (on one machine, lz4 saved the broker about as much CPU as it cost the clients:
/// docs/measurements.md).
pub const EMBEDDED_BROKER_ENV: [(&str, &str); 2] = [("KAFKA_MESSAGE_TIMEOUT_MS", "0"), ("KAFKA_COMPRESSION", "none")];

/// The record-batch codecs of Kafka, as `KAFKA_COMPRESSION` (and every Kafka client) names
/// them. Consumers read batches in any of them, whoever produced them: librdkafka is built
/// with each (zstd through the `rdkafka` crate's `zstd` feature).
pub const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];

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
    /// `KAFKA_DELIVERY_TIMEOUT_MS`: how long a request path waits for the broker's
    /// acknowledgement before answering 503 (default 5000).
    pub delivery_timeout: Duration,
    /// `KAFKA_MESSAGE_TIMEOUT_MS`: how long librdkafka keeps trying to deliver a message before
    /// it fails with an error (`message.timeout.ms`, default 120000): a deleted topic or a
    /// partition offline for that long stops a pipeline with a clear error rather than
    /// silently. `0` (never give up) is for the embedded broker only, which `retargetiq up`
    /// sets: see [`producer`] for why.
    pub message_timeout: Duration,
    /// `KAFKA_COMPRESSION`: how producers compress batches (`none`, `gzip`, `snappy`, `lz4`,
    /// `zstd`; default `lz4`). `retargetiq up` gives the clients of its embedded broker `none`
    /// (see [`EMBEDDED_BROKER_ENV`]).
    pub compression: String,
    /// `KAFKA_CONSUMER_FETCH_MAX_KB`: most memory a consumer may hold in pre-fetched messages
    /// (librdkafka's `queued.max.messages.kbytes`, one queue for all its partitions; default
    /// 2 MiB).
    pub consumer_queue_kb: u32,
    /// `KAFKA_COALESCE_FETCH_MAX_KB`: the same for a consumer that coalesces a latest-state topic
    /// (default 64 MiB). How far ahead it can look decides how much it can coalesce when it
    /// falls behind: with traffic spread evenly over many users, a user's next snapshot is a
    /// whole round of users later, so only a backlog deeper than the users gives it anything
    /// to skip (see [`ConsumerSpec::coalescing`]).
    pub coalesce_queue_kb: u32,
    /// `KAFKA_FETCH_WAIT_MS`: how long the broker may hold a fetch that finds nothing new
    /// (`fetch.wait.max.ms`, default 500, Kafka's own). Apache Kafka and the embedded broker
    /// answer a fetch as soon as data arrives, so this does not add latency; it sets how often
    /// an idle consumer asks again (lower costs more idle fetch requests).
    pub fetch_wait: Duration,
    /// `KAFKA_STATISTICS_INTERVAL_MS`: how often each consumer reports its lag (librdkafka's
    /// `statistics.interval.ms`, default 5000; `retargetiq bench` asks for 1000 to read the lag
    /// right at the end of a load step; 0 turns the reports off).
    pub statistics_interval: Duration,
    /// `KAFKA_HANDLER_MAX_ATTEMPTS`: tries before a failing message goes to the dead-letter
    /// topic (default 4).
    pub handler_max_attempts: u32,
    /// `KAFKA_DEBUG`: librdkafka debug contexts (`cgrp`, `broker`, `all`, ...), off by default.
    pub debug: Option<String>,
    /// `KAFKA_ASSIGNMENT`: how the instances of a service share partitions (default `auto`:
    /// see [`KafkaSettings::settle_assignment`]).
    pub assignment: Assignment,
    /// `INSTANCE_INDEX` (default 0) and `INSTANCE_COUNT` (default 1): this instance's place
    /// among the instances of its service, for static assignment.
    pub instance_index: u32,
    pub instance_count: u32,
}

/// How the instances of a service share the partitions of the topics they consume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignment {
    /// The default: [`Assignment::Static`] when `INSTANCE_COUNT` is set above 1 or the broker
    /// is the embedded one, [`Assignment::Group`] otherwise (Apache Kafka), decided at start
    /// by [`KafkaSettings::settle_assignment`].
    Auto,
    /// Instance `i` of `n` reads the partitions `p` with `p % n == i`, resuming from the
    /// offsets committed under the service's group id. It needs nothing from the broker's group
    /// coordinator, so a crashed instance that restarts simply resumes; a second instance with
    /// the same share waits as a standby (`crate::service::standby`). What the embedded broker
    /// gets: Tansu 0.6 leaves a group stuck when a member dies during a rebalance.
    Static,
    /// Kafka's consumer-group protocol: partitions move between instances automatically as
    /// they come and go, each rebuilding the state of the partitions it holds.
    Group,
}

impl Assignment {
    /// What `auto` means on the broker with this cluster id: static on the embedded broker,
    /// the group protocol on any other.
    pub fn for_cluster(cluster_id: &str) -> Assignment {
        if cluster_id == events::topic::EMBEDDED_BROKER_CLUSTER_ID { Assignment::Static } else { Assignment::Group }
    }
}

impl std::str::FromStr for Assignment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Assignment::Auto),
            "static" => Ok(Assignment::Static),
            "group" => Ok(Assignment::Group),
            _ => Err("expected `auto`, `static` or `group`".to_owned()),
        }
    }
}

impl std::fmt::Display for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Assignment::Auto => "auto",
            Assignment::Static => "static",
            Assignment::Group => "group",
        })
    }
}

impl KafkaSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let instance_count: u32 = env.checked("INSTANCE_COUNT", 1, positive)?;
        let instance_index: u32 = env.checked("INSTANCE_INDEX", 0, |i| {
            if *i < instance_count {
                Ok(())
            } else {
                Err(format!("must be less than INSTANCE_COUNT ({instance_count})"))
            }
        })?;
        Ok(Self {
            bootstrap_servers: env.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092".to_owned())?,
            producer_buffer_kb: env.checked("KAFKA_PRODUCER_BUFFER_KB", 16_384, positive)?,
            linger: env.millis("KAFKA_LINGER_MS", Duration::from_millis(2))?,
            delivery_timeout: env.millis("KAFKA_DELIVERY_TIMEOUT_MS", Duration::from_secs(5))?,
            message_timeout: env.millis("KAFKA_MESSAGE_TIMEOUT_MS", Duration::from_secs(120))?,
            compression: env.checked("KAFKA_COMPRESSION", "lz4".to_owned(), |c: &String| {
                if CODECS.contains(&c.as_str()) {
                    Ok(())
                } else {
                    Err(format!("expected one of {}", CODECS.join(", ")))
                }
            })?,
            consumer_queue_kb: env.checked("KAFKA_CONSUMER_FETCH_MAX_KB", 2_048, positive)?,
            coalesce_queue_kb: env.checked("KAFKA_COALESCE_FETCH_MAX_KB", 65_536, positive)?,
            fetch_wait: env.millis("KAFKA_FETCH_WAIT_MS", Duration::from_millis(500))?,
            statistics_interval: env.millis("KAFKA_STATISTICS_INTERVAL_MS", Duration::from_secs(5))?,
            handler_max_attempts: env.checked("KAFKA_HANDLER_MAX_ATTEMPTS", 4, positive)?,
            debug: env.raw("KAFKA_DEBUG"),
            assignment: env.get("KAFKA_ASSIGNMENT", Assignment::Auto)?,
            instance_index,
            instance_count,
        })
    }

    /// Whether this instance consumes `partition` under static assignment (instance `i` of
    /// `n` takes the partitions `p` with `p mod n = i`).
    pub fn owns(&self, partition: i32) -> bool {
        u32::try_from(partition).is_ok_and(|p| p % self.instance_count == self.instance_index)
    }

    /// Whether other instances of the service may share its partitions (the group protocol, or
    /// more than one `INSTANCE_COUNT`): then models meant to be global must be kept one model
    /// across instances.
    pub fn shares_partitions(&self) -> bool {
        self.assignment == Assignment::Group || self.instance_count > 1
    }

    /// Whether this instance's partitioned consumers use Kafka's group protocol (after
    /// [`KafkaSettings::settle_assignment`]).
    pub fn uses_group_protocol(&self) -> bool {
        self.assignment == Assignment::Group
    }

    /// Decides `KAFKA_ASSIGNMENT=auto`: static when `INSTANCE_COUNT` or `INSTANCE_INDEX` was
    /// set (the instances were given their shares), static on the embedded broker (known by its
    /// cluster id, [`events::topic::EMBEDDED_BROKER_CLUSTER_ID`]: its group coordinator leaves a
    /// group stuck when a member dies during a rebalance, so there a second instance waits as a
    /// standby), and the group protocol on any other broker, so that on Apache Kafka a second
    /// instance started with nothing but another `HTTP_PORT` takes a share of the partitions.
    /// Waits for the broker to answer; `None` if shut down meanwhile.
    pub async fn settle_assignment(&mut self, shutdown: &tokio_util::sync::CancellationToken) -> Option<Assignment> {
        if self.assignment == Assignment::Auto {
            self.assignment = if self.instance_count > 1 || self.instance_index > 0 {
                Assignment::Static
            } else {
                let cluster = admin::cluster_id(&self.bootstrap_servers, shutdown).await?;
                let assignment = Assignment::for_cluster(&cluster);
                tracing::info!(cluster, %assignment, "KAFKA_ASSIGNMENT=auto: chose by the broker's cluster id");
                assignment
            };
        }
        Some(self.assignment)
    }

    /// Settings for a broker at `bootstrap_servers`, everything else at its default.
    pub fn for_broker(bootstrap_servers: impl Into<String>) -> Self {
        let mut s =
            Self::from_env(&Env::from_pairs::<&str, &str>([])).unwrap_or_else(|_| unreachable!("defaults are valid"));
        s.bootstrap_servers = bootstrap_servers.into();
        s
    }

    /// Settings for the embedded broker at `bootstrap_servers` (see [`EMBEDDED_BROKER_ENV`]).
    pub fn for_embedded_broker(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            message_timeout: Duration::ZERO,
            compression: "none".to_owned(),
            assignment: Assignment::Static,
            ..Self::for_broker(bootstrap_servers)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Assignment, KafkaSettings};
    use crate::config::Env;

    #[test]
    fn auto_is_the_default_and_static_where_shares_were_given() {
        let settings = |pairs: &[(&str, &str)]| KafkaSettings::from_env(&Env::from_pairs(pairs.iter().copied()));
        assert_eq!(settings(&[]).expect("defaults").assignment, Assignment::Auto);
        assert_eq!(Assignment::for_cluster("retargetiq"), Assignment::Static, "the embedded broker");
        assert_eq!(Assignment::for_cluster("MkU3OEVBNTcwNTJENDM2Qk"), Assignment::Group, "an Apache Kafka cluster");
        assert!(settings(&[("KAFKA_ASSIGNMENT", "sometimes")]).is_err());
        // Given shares, no broker is asked (nothing listens on port 9): static at once.
        let mut shared =
            settings(&[("INSTANCE_COUNT", "2"), ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")]).expect("valid");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let settled = runtime.block_on(shared.settle_assignment(&tokio_util::sync::CancellationToken::new()));
        assert_eq!(settled, Some(Assignment::Static));
        assert!(shared.shares_partitions());
    }
}
