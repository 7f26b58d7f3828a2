//! The idempotent producer: `enable.idempotence=true`, `acks=all`, bounded client buffers.
//!
//! librdkafka gives up on a message after `KAFKA_MESSAGE_TIMEOUT_MS` (2 minutes by default),
//! and the error stops the pipeline visibly (the consumer fails, the service exits and its
//! supervisor restarts it). Against the embedded broker that must not happen: when an
//! idempotent producer's messages time out, librdkafka bumps the producer epoch, and Tansu
//! 0.6's SQLite engine panics on a bumped epoch (its storage task dies and the broker is left
//! answering every request with an error). So `retargetiq up`, and the tests, give clients of
//! the embedded broker `KAFKA_MESSAGE_TIMEOUT_MS=0` ([`super::EMBEDDED_BROKER_ENV`]): retry
//! until the broker acknowledges. Request paths that must answer in time put their own
//! deadline on the wait as well ([`Producer::for_requests`]): after it the caller gets
//! [`ProduceError::Unavailable`] while the message stays queued and may still be stored —
//! at-least-once, made exact downstream by event-id de-duplication.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use events::{CORRELATION_HEADER, Message, Topic};
use rdkafka::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::util::Timeout;
use tokio::sync::oneshot;

use super::KafkaSettings;

/// Why a produce failed.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The broker is unreachable or did not acknowledge in time; trying later may succeed.
    #[error("the broker did not acknowledge the message in time: {0}")]
    Unavailable(String),
    /// The message can never be stored as it is (too large, unknown topic, ...).
    #[error("the broker rejected the message: {0}")]
    Rejected(String),
    #[error("could not encode the message: {0}")]
    Encode(#[from] serde_json::Error),
}

impl ProduceError {
    /// Sorts a client error into retryable and terminal.
    pub fn from_kafka(e: &KafkaError) -> Self {
        use RDKafkaErrorCode as C;
        match e.rdkafka_error_code() {
            Some(
                C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::TopicAuthorizationFailed
                | C::InvalidRecord,
            ) => ProduceError::Rejected(e.to_string()),
            _ => ProduceError::Unavailable(e.to_string()),
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, ProduceError::Unavailable(_))
    }
}

/// A serialized message ready to produce.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: Topic,
    pub key: String,
    pub payload: Vec<u8>,
    pub correlation_id: Option<String>,
}

impl Outgoing {
    pub fn encode<M: Message>(msg: &M, correlation_id: Option<&str>) -> Result<Self, serde_json::Error> {
        Ok(Self {
            topic: M::TOPIC,
            key: msg.key().to_owned(),
            payload: serde_json::to_vec(msg)?,
            correlation_id: correlation_id.map(str::to_owned),
        })
    }
}

/// Where the broker stored a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
}

/// Resolves when the broker acknowledged (or finally refused) an enqueued message; an error
/// on the channel itself means the producer was dropped first.
pub type DeliveryFuture = oneshot::Receiver<Result<Delivery, KafkaError>>;

/// Completes each message's [`DeliveryFuture`] from librdkafka's delivery report. Once its
/// producer is dropped (`halted`), the client lingers until the polling thread notices, and
/// says nothing more: a broker that is gone by then is no news.
struct Acks {
    halted: Arc<AtomicBool>,
}

impl ClientContext for Acks {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if !self.halted.load(Ordering::Relaxed) {
            DefaultClientContext.log(level, fac, log_message);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if !self.halted.load(Ordering::Relaxed) {
            DefaultClientContext.error(error, reason);
        }
    }
}

impl ProducerContext for Acks {
    type DeliveryOpaque = Box<oneshot::Sender<Result<Delivery, KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, done: Self::DeliveryOpaque) {
        let outcome = match result {
            Ok(m) => Ok(Delivery { partition: m.partition(), offset: m.offset() }),
            Err((e, _)) => Err(e.clone()),
        };
        let _ = done.send(outcome);
    }
}

/// How long one blocking poll for delivery reports lasts. Reports are handled the moment they
/// arrive whatever this is; it only bounds how long the polling thread outlives its producer.
/// (rust-rdkafka's own polling thread polls in 100 ms slices, each ending in a sub-millisecond
/// busy wait: about 1 % of a core per idle producer, which is why this one is ours.)
const POLL_SLICE: Duration = Duration::from_secs(5);

/// The librdkafka client and the thread that serves its delivery reports; the thread stops
/// (within [`POLL_SLICE`]) when the last clone of the producer is dropped.
struct Client {
    producer: Arc<BaseProducer<Acks>>,
    stop: Arc<AtomicBool>,
}

impl Client {
    fn new(config: &ClientConfig) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let producer: Arc<BaseProducer<Acks>> =
            Arc::new(config.create_with_context(Acks { halted: Arc::clone(&stop) })?);
        let (p, halt) = (Arc::clone(&producer), Arc::clone(&stop));
        std::thread::Builder::new().name("kafka-acks".into()).spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                p.poll(POLL_SLICE);
            }
        })?;
        Ok(Self { producer, stop })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The idempotent producer, cheap to clone.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Client>,
    connected: Arc<AtomicBool>,
    /// Messages acknowledged so far.
    acks: Arc<AtomicU64>,
    /// How long [`Producer::send`] waits for the acknowledgement; `None`: as long as it takes.
    deadline: Option<Duration>,
}

impl Producer {
    /// A producer whose [`Producer::send`] gives up waiting after `KAFKA_DELIVERY_TIMEOUT_MS`
    /// (request paths: answer in time).
    pub fn for_requests(settings: &KafkaSettings) -> anyhow::Result<Self> {
        Self::create(settings, Some(settings.delivery_timeout))
    }

    /// A producer that waits as long as it takes (pipelines: never drop, wait for the broker).
    pub fn for_pipeline(settings: &KafkaSettings) -> anyhow::Result<Self> {
        Self::create(settings, None)
    }

    fn create(settings: &KafkaSettings, deadline: Option<Duration>) -> anyhow::Result<Self> {
        let inner = Arc::new(Client::new(&client_config(settings))?);
        Ok(Self { inner, connected: Arc::new(AtomicBool::new(false)), acks: Arc::new(AtomicU64::new(0)), deadline })
    }

    /// Whether the broker is taken to be reachable: set by the service's broker watch (see
    /// [`Producer::probe`]) and by every acknowledged message.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Messages acknowledged by the broker so far.
    pub fn acknowledged(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }

    /// Records whether the broker is reachable.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Asks the broker for metadata; returns whether it answered within `timeout`.
    pub async fn probe(&self, timeout: Duration) -> bool {
        let producer = Arc::clone(&self.inner.producer);
        tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout).is_ok())
            .await
            .unwrap_or(false)
    }

    /// Produces a typed message and waits for the broker's acknowledgement.
    pub async fn send<M: Message>(&self, msg: &M, correlation_id: Option<&str>) -> Result<Delivery, ProduceError> {
        let out = Outgoing::encode(msg, correlation_id)?;
        self.send_outgoing(&out).await
    }

    /// Produces an encoded message and waits for the acknowledgement (up to the deadline).
    pub async fn send_outgoing(&self, out: &Outgoing) -> Result<Delivery, ProduceError> {
        let send = self.enqueue(out).await?;
        let result = match self.deadline {
            None => send.await,
            Some(deadline) => tokio::time::timeout(deadline, send).await.map_err(|_| {
                ProduceError::Unavailable(format!(
                    "no acknowledgement within {} ms; the message may still be stored later",
                    deadline.as_millis()
                ))
            })?,
        };
        match result {
            Ok(Ok(delivery)) => {
                // An acknowledgement proves the broker reachable, whatever a slow probe said.
                self.acks.fetch_add(1, Ordering::Relaxed);
                self.set_connected(true);
                Ok(delivery)
            }
            Ok(Err(e)) => Err(ProduceError::from_kafka(&e)),
            Err(_) => Err(ProduceError::Unavailable("the producer was dropped".to_owned())),
        }
    }

    /// Enqueues a message without waiting; the future resolves on acknowledgement. Waits
    /// (briefly, repeatedly) while the client buffer is full: that is the backpressure.
    pub async fn enqueue(&self, out: &Outgoing) -> Result<DeliveryFuture, ProduceError> {
        loop {
            let (done, delivered) = oneshot::channel();
            match self.inner.producer.send(record(out, Box::new(done))) {
                Ok(()) => return Ok(delivered),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(ProduceError::from_kafka(&e)),
            }
        }
    }

    /// Waits until everything enqueued is delivered, or `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        let producer = Arc::clone(&self.inner.producer);
        let _ = tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout))).await;
    }
}

/// The librdkafka settings of every producer of the platform (also used by the ingestion
/// benchmark's baseline, so the two are the same client).
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &settings.compression)
        .set("linger.ms", settings.linger.as_millis().to_string())
        .set("queue.buffering.max.kbytes", settings.producer_buffer_kb.to_string())
        .set("queue.buffering.max.messages", "100000")
        // 0 (the embedded broker): retry until delivered (see the module docs).
        .set("message.timeout.ms", settings.message_timeout.as_millis().to_string());
    config
}

type Done = Box<oneshot::Sender<Result<Delivery, KafkaError>>>;

fn record(out: &Outgoing, done: Done) -> BaseRecord<'_, str, [u8], Done> {
    let mut record =
        BaseRecord::with_opaque_to(out.topic.name(), done).key(out.key.as_str()).payload(out.payload.as_slice());
    if let Some(id) = &out.correlation_id {
        record =
            record.headers(OwnedHeaders::new().insert(Header { key: CORRELATION_HEADER, value: Some(id.as_str()) }));
    }
    record
}
