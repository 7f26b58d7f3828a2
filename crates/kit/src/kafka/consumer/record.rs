//! What a handler sees and gives back: a consumed record, the handler's error, and the
//! outputs it queues.

use super::*;

/// One consumed message, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub topic: Topic,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a str>,
    pub payload: &'a [u8],
    pub correlation_id: Option<&'a str>,
    /// Broker or producer timestamp, in milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
}

impl<'a> Record<'a> {
    /// A record of `topic` with `payload` at partition 0, offset 0, with no key, correlation id
    /// or timestamp: for handlers driven without a broker (tests).
    pub fn bare(topic: Topic, payload: &'a [u8]) -> Self {
        Record { topic, partition: 0, offset: 0, key: None, payload, correlation_id: None, timestamp_ms: None }
    }

    /// The record of a consumed message of `topic`.
    pub(super) fn of(msg: &'a BorrowedMessage<'_>, topic: Topic) -> Self {
        Record {
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().and_then(|k| std::str::from_utf8(k).ok()),
            payload: msg.payload().unwrap_or_default(),
            correlation_id: msg
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == CORRELATION_HEADER).and_then(|h| h.value))
                .and_then(|v| std::str::from_utf8(v).ok()),
            timestamp_ms: msg.timestamp().to_millis(),
        }
    }

    /// Decodes the payload as a typed message; a payload that does not decode is rejected as
    /// malformed.
    pub fn json<M: DeserializeOwned>(&self) -> Result<M, HandlerError> {
        crate::json::from_bytes(self.payload)
            .map_err(|e| HandlerError::malformed(format!("payload is not a valid message: {e}")))
    }

    /// The payload as a JSON value (rejected as malformed when it is not JSON, or an object in
    /// it gives a key twice).
    pub fn value(&self) -> Result<serde_json::Value, HandlerError> {
        crate::json::value_from_bytes(self.payload)
            .map_err(|e| HandlerError::malformed(format!("payload is not JSON: {e}")))
    }

    /// Where this record was read from.
    pub fn source(&self) -> SourceRef {
        SourceRef { topic: self.topic.name().to_owned(), partition: self.partition, offset: self.offset }
    }
}

/// Why a handler did not process a message.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The message can never be processed: it goes to the dead-letter topic at once.
    #[error("{reason}")]
    Reject { kind: DeadLetterKind, reason: String, field: Option<String> },
    /// Processing failed in a way that may pass on another try.
    #[error("{0:#}")]
    Retry(anyhow::Error),
    /// The message cannot be decided yet: the consumer awaits the [`Wait`], then hands the same
    /// message to the handler again. A handler asks before it changes any state, and never
    /// twice for the same message once the wait is over.
    #[error("{0}")]
    Wait(Wait),
}

/// What a handler waits for before it can process a message ([`HandlerError::Wait`]).
pub struct Wait {
    what: &'static str,
    until: BoxFuture<'static, ()>,
}

impl Wait {
    /// Waits for `until`; `what` names it in logs and errors.
    pub fn new(what: &'static str, until: impl Future<Output = ()> + Send + 'static) -> Self {
        Self { what, until: Box::pin(until) }
    }

    pub(super) fn into_future(self) -> BoxFuture<'static, ()> {
        self.until
    }
}

impl std::fmt::Debug for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wait").field("what", &self.what).finish_non_exhaustive()
    }
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "still waiting for {} after {MAX_WAITS} waits", self.what)
    }
}

/// How many times one message may be made to wait ([`HandlerError::Wait`]) before it is
/// dead-lettered: a handler that keeps asking is a bug, and the partition must move on.
pub(super) const MAX_WAITS: u32 = 3;

impl HandlerError {
    pub fn malformed(reason: impl Into<String>) -> Self {
        HandlerError::Reject { kind: DeadLetterKind::Malformed, reason: reason.into(), field: None }
    }

    pub fn invalid(e: FieldError) -> Self {
        HandlerError::Reject { kind: DeadLetterKind::Invalid, reason: e.to_string(), field: Some(e.field) }
    }
}

/// The messages a handler produces for one input, sent after it returns.
#[derive(Debug, Default)]
pub struct Outbox {
    messages: Vec<Outgoing>,
    correlation_id: Option<String>,
    replay: bool,
}

impl Outbox {
    /// An outbox whose messages carry `correlation_id` (taken from the input's header).
    pub fn new(correlation_id: Option<&str>) -> Self {
        Self { messages: Vec::new(), correlation_id: correlation_id.map(str::to_owned), replay: false }
    }

    /// The outbox of a message replayed to restore state: whatever is queued is discarded.
    pub fn replaying() -> Self {
        Self { replay: true, ..Self::default() }
    }

    /// Whether the input is a replay (state restore at start) rather than a new message: a
    /// handler whose decisions are not a function of its input (random exploration, timers)
    /// rebuilds its state and decides nothing.
    pub fn is_replay(&self) -> bool {
        self.replay
    }

    /// Queues a typed message for its topic, keyed by its key.
    pub fn send<M: Message>(&mut self, msg: &M) {
        match Outgoing::encode(msg, self.correlation_id.as_deref()) {
            Ok(out) => self.messages.push(out),
            // Our message types always serialize; if one ever did not, losing it silently
            // would be wrong, so make it loud.
            Err(e) => tracing::error!(error = %e, topic = %M::TOPIC, "could not encode an output message"),
        }
    }

    pub fn correlation_id(&self) -> Option<&str> {
        self.correlation_id.as_deref()
    }

    /// Sets the correlation id for the messages queued from now on.
    pub fn set_correlation_id(&mut self, id: impl Into<String>) {
        self.correlation_id = Some(id.into());
    }

    /// The queued messages (for tests).
    pub fn messages(&self) -> &[Outgoing] {
        &self.messages
    }

    /// The queued messages of type `M`, decoded (for tests).
    pub fn decoded<M: Message>(&self) -> Vec<M> {
        self.messages
            .iter()
            .filter(|m| m.topic == M::TOPIC)
            .filter_map(|m| serde_json::from_slice(&m.payload).ok())
            .collect()
    }

    pub fn into_messages(self) -> Vec<Outgoing> {
        self.messages
    }
}

/// A service's logic for one kind of input.
pub trait Handler: Send + 'static {
    /// Processes one record, queueing outputs in `out`. Must be idempotent (see module docs).
    fn handle(&mut self, record: &Record<'_>, out: &mut Outbox) -> Result<(), HandlerError>;

    /// Forgets everything this handler learned from its partitions, so that a restoring
    /// consumer can rebuild its state for the partitions it holds after a rebalance
    /// (`KAFKA_ASSIGNMENT=group`): the state of partitions it lost goes, that of partitions it
    /// gained is replayed from Kafka. `false` (the default) for a handler that cannot: the
    /// consumer then ends, and its service with it, to be restarted afresh by its supervisor.
    fn reset(&mut self) -> bool {
        false
    }
}
