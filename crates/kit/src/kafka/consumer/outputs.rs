//! One message through the handler, and what happens to its outputs: acknowledged (its
//! offset is stored), refused (dead-lettered) or failed (the consumer ends).

use std::sync::OnceLock;

use super::*;

/// A copy of what is needed to dead-letter a record after its outputs failed.
pub(super) struct InFlight {
    topic: Topic,
    partition: i32,
    offset: i64,
    key: Option<String>,
    payload: Vec<u8>,
    correlation_id: Option<String>,
}

impl InFlight {
    /// Where a message was read from, without its contents.
    fn bare(topic: Topic, partition: i32, offset: i64) -> Self {
        InFlight { topic, partition, offset, key: None, payload: Vec::new(), correlation_id: None }
    }
}

pub(super) type Pending = BoxFuture<'static, (InFlight, Result<(), ProduceError>)>;

/// The topic `msg` was read from (one of the platform's).
fn topic_of(msg: &BorrowedMessage<'_>) -> anyhow::Result<Topic> {
    Topic::from_name(msg.topic()).with_context(|| format!("message from unknown topic {}", msg.topic()))
}

/// The metrics a consumer records for every message, looked up in the recorder once, on first
/// use, rather than per message: a lookup (hashing the name and labels, a shard lock) per
/// message and metric cost 1–2 % of a light handler's CPU. On first use, not at start, so
/// that a series shows on `/metrics` only once it happened (no `superseded` count for a
/// consumer that never coalesces), as before.
pub(super) struct MessageMetrics {
    name: &'static str,
    ok: OnceLock<metrics::Counter>,
    superseded: OnceLock<metrics::Counter>,
    handle_seconds: OnceLock<metrics::Histogram>,
    ack_seconds: OnceLock<metrics::Histogram>,
    age_seconds: OnceLock<metrics::Histogram>,
}

impl MessageMetrics {
    pub(super) fn new(name: &'static str) -> Self {
        // The recorder is installed before the first handle is taken: a handle taken earlier
        // would record nothing for the rest of the consumer's life.
        let _ = crate::http::metrics_handle();
        Self {
            name,
            ok: OnceLock::new(),
            superseded: OnceLock::new(),
            handle_seconds: OnceLock::new(),
            ack_seconds: OnceLock::new(),
            age_seconds: OnceLock::new(),
        }
    }

    fn ok(&self) -> &metrics::Counter {
        self.ok.get_or_init(|| metrics::counter!("consumer_messages_total", "consumer" => self.name, "outcome" => "ok"))
    }

    fn superseded(&self) -> &metrics::Counter {
        self.superseded.get_or_init(
            || metrics::counter!("consumer_messages_total", "consumer" => self.name, "outcome" => "superseded"),
        )
    }

    fn handle_seconds(&self) -> &metrics::Histogram {
        self.handle_seconds.get_or_init(|| metrics::histogram!("consumer_handle_seconds", "consumer" => self.name))
    }

    fn ack_seconds(&self) -> &metrics::Histogram {
        self.ack_seconds.get_or_init(|| metrics::histogram!("consumer_outputs_ack_seconds", "consumer" => self.name))
    }

    /// How old a message was when its handler took it: from the time its producer gave it (or
    /// the broker's append time) to the handling. Lag in time rather than in messages: what a
    /// consumer behind, or coalescing a backlog, leaves its readers waiting for.
    fn age_seconds(&self) -> &metrics::Histogram {
        self.age_seconds.get_or_init(|| metrics::histogram!("consumer_message_age_seconds", "consumer" => self.name))
    }
}

/// A message superseded by a later one of its key (see [`ConsumerSpec::coalesce`]): not
/// handled, and settled at once, so that its offset is stored in order with the others.
pub(super) fn skip(m: &MessageMetrics, msg: &BorrowedMessage<'_>) -> anyhow::Result<(Topic, i32, Pending)> {
    let topic = topic_of(msg)?;
    m.superseded().increment(1);
    let info = InFlight::bare(topic, msg.partition(), msg.offset());
    let pending: Pending = Box::pin(std::future::ready((info, Ok(()))));
    Ok((topic, msg.partition(), pending))
}

/// Runs the handler (with retries) on one message and enqueues its outputs.
pub(super) async fn process<H: Handler>(
    env: &ConsumerEnv,
    spec: &ConsumerSpec,
    m: &MessageMetrics,
    handler: &mut H,
    msg: &BorrowedMessage<'_>,
) -> anyhow::Result<(Topic, i32, Pending)> {
    let topic = topic_of(msg)?;
    let record = Record::of(msg, topic);
    if let Some(at) = record.timestamp_ms {
        let age_ms = Utc::now().timestamp_millis().saturating_sub(at).max(0);
        m.age_seconds().record(age_ms as f64 / 1000.0);
    }
    let started = Instant::now();
    let (mut attempt, mut waits) = (0, 0);
    // With `RUST_LOG=debug`, every log line about this message carries its correlation id,
    // topic, partition and offset. At INFO the span is not made: its fields, formatted for
    // every message of every consumer, cost as much as a small handler. The lines a consumer
    // writes at INFO and above about one message name what they are about themselves.
    let span = tracing::debug_span!(
        "message",
        correlation_id = record.correlation_id.unwrap_or(""),
        topic = %topic,
        partition = record.partition,
        offset = record.offset
    );
    let outputs = loop {
        attempt += 1;
        let mut out = Outbox::new(record.correlation_id);
        match span.in_scope(|| handler.handle(&record, &mut out)) {
            Ok(()) => {
                m.ok().increment(1);
                break out.into_messages();
            }
            Err(HandlerError::Wait(wait)) if waits < MAX_WAITS => {
                // Not a failed attempt: the handler will decide once the wait is over.
                (attempt, waits) = (attempt - 1, waits + 1);
                metrics::counter!("consumer_waits_total", "consumer" => spec.name).increment(1);
                wait.into_future().await;
            }
            Err(HandlerError::Retry(e)) if attempt < env.settings.handler_max_attempts => {
                metrics::counter!("consumer_retries_total", "consumer" => spec.name).increment(1);
                let delay = Duration::from_millis(100 * 4u64.pow(attempt - 1)).min(Duration::from_secs(2));
                tracing::warn!(
                    consumer = spec.name,
                    topic = %topic,
                    partition = record.partition,
                    offset = record.offset,
                    correlation_id = record.correlation_id.unwrap_or(""),
                    attempt,
                    error = format!("{e:#}"),
                    ?delay,
                    "handler failed; retrying"
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                let (kind, field) = match &e {
                    HandlerError::Reject { kind, field, .. } => (*kind, field.clone()),
                    HandlerError::Retry(_) | HandlerError::Wait(_) => (DeadLetterKind::HandlerFailed, None),
                };
                metrics::counter!("consumer_messages_total", "consumer" => spec.name, "outcome" => "dead_letter")
                    .increment(1);
                // Every replica reads every partition: a dead letter from each would be one per
                // instance and per start. The group that owns the partition writes it.
                let owner = owns_its_partitions(spec);
                let what = if owner {
                    "message sent to the dead-letter topic"
                } else {
                    "message refused and skipped (a replica: dead letters are written by the group that owns the partition)"
                };
                tracing::warn!(
                    consumer = spec.name, topic = %topic, partition = record.partition, offset = record.offset,
                    correlation_id = record.correlation_id.unwrap_or(""), reason = %e, "{what}"
                );
                if !owner {
                    break Vec::new();
                }
                let letter = dead_letter(env.service, &record, kind, e.to_string(), field, attempt);
                let mut out = Outbox::new(record.correlation_id);
                out.send(&letter);
                break out.into_messages();
            }
        }
    };
    m.handle_seconds().record(started.elapsed().as_secs_f64());

    let mut deliveries = Vec::with_capacity(outputs.len());
    // An output the client refuses before sending it (too large, ...) will be refused every
    // time: the message is dead-lettered with the reason once its other outputs are settled.
    let mut refused = None;
    for out in &outputs {
        match env.producer.enqueue(out).await {
            Ok(delivery) => deliveries.push(delivery),
            Err(e @ ProduceError::Rejected(_)) => {
                refused = Some(e);
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    // The record is kept for a dead letter should an output be refused; with no output,
    // there is nothing to refuse and nothing to copy.
    let info = if deliveries.is_empty() && refused.is_none() {
        InFlight::bare(topic, record.partition, record.offset)
    } else {
        InFlight {
            topic,
            partition: record.partition,
            offset: record.offset,
            key: record.key.map(str::to_owned),
            payload: record.payload.to_vec(),
            correlation_id: record.correlation_id.map(str::to_owned),
        }
    };
    let waited = (!deliveries.is_empty()).then(|| (m.ack_seconds().clone(), Instant::now()));
    let pending: Pending = Box::pin(async move {
        let mut result = refused.map_or(Ok(()), Err);
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => result = Err(ProduceError::from_kafka(&e)),
                Err(_) => result = Err(ProduceError::Unavailable("the producer was dropped".to_owned())),
            }
        }
        if let Some((ack_seconds, waited)) = waited {
            ack_seconds.record(waited.elapsed().as_secs_f64());
        }
        (info, result)
    });
    Ok((topic, record.partition, pending))
}

/// Called when all outputs of a message are settled: store its offset, or dead-letter it if
/// the broker refused an output for good, or fail (to restart from the committed offset).
pub(super) async fn complete(
    env: &ConsumerEnv,
    spec: &ConsumerSpec,
    consumer: &StreamConsumer<GroupContext>,
    done: InFlight,
    result: Result<(), ProduceError>,
) -> anyhow::Result<()> {
    match result {
        Ok(()) => {}
        Err(e @ (ProduceError::Rejected(_) | ProduceError::Encode(_))) => {
            let record = Record {
                topic: done.topic,
                partition: done.partition,
                offset: done.offset,
                key: done.key.as_deref(),
                payload: &done.payload,
                correlation_id: done.correlation_id.as_deref(),
                timestamp_ms: None,
            };
            let letter = dead_letter(
                env.service,
                &record,
                DeadLetterKind::HandlerFailed,
                format!("an output was refused: {e}"),
                None,
                1,
            );
            if owns_its_partitions(spec) {
                send_dead_letter(env, letter, record.correlation_id).await?;
            }
            metrics::counter!("consumer_messages_total", "consumer" => spec.name, "outcome" => "dead_letter")
                .increment(1);
        }
        Err(e) => return Err(e).context("an output was not acknowledged"),
    }
    // Every subscription stores what it finished (the lag it reports is measured from there);
    // only a group's stored offsets are ever committed.
    if let Err(e) = consumer.store_offset(done.topic.name(), done.partition, done.offset) {
        // A partition the group moved to another instance while the message's outputs were in
        // flight: its new owner reads the message again (downstream de-duplicates the outputs).
        let held = consumer.assignment().is_ok_and(|a| a.find_partition(done.topic.name(), done.partition).is_some());
        if held {
            return Err(e).context("storing the offset");
        }
        tracing::debug!(consumer = spec.name, topic = %done.topic, partition = done.partition, "partition moved away; offset not stored");
    }
    Ok(())
}

/// Whether this consumer is the one instance that reads its partitions (and so writes their
/// dead letters), rather than a replica or live reader of every partition.
pub(super) fn owns_its_partitions(spec: &ConsumerSpec) -> bool {
    matches!(spec.subscription, Subscription::Group { .. })
}

/// Sends a dead letter; one too large for the broker goes without the original payload (its
/// source topic, partition and offset still say where the message is).
pub(super) async fn send_dead_letter(
    env: &ConsumerEnv,
    mut letter: DeadLetter,
    correlation_id: Option<&str>,
) -> anyhow::Result<()> {
    match env.producer.send(&letter, correlation_id).await {
        Err(ProduceError::Rejected(e)) => {
            letter.payload = None;
            letter.payload_base64 = String::new();
            letter.reason = format!("{} (the payload itself was left out: {e})", letter.reason);
            env.producer.send(&letter, correlation_id).await.map(|_| ())
        }
        other => other.map(|_| ()),
    }
    .context("dead-lettering a message whose output was refused")
}

pub(super) fn dead_letter(
    service: &str,
    record: &Record<'_>,
    kind: DeadLetterKind,
    reason: String,
    field: Option<String>,
    attempts: u32,
) -> DeadLetter {
    let (payload, payload_base64) = DeadLetter::encode_payload(record.payload);
    DeadLetter {
        schema_version: events::SCHEMA_VERSION,
        dead_letter_id: uuid::Uuid::new_v4().to_string(),
        key: record.key.unwrap_or_default().to_owned(),
        source: record.source(),
        kind,
        reason,
        field,
        attempts,
        service: service.to_owned(),
        correlation_id: record.correlation_id.map(str::to_owned),
        payload,
        payload_base64,
        failed_at: Utc::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_or_reject_as_malformed() {
        let rec = Record {
            topic: Topic::UserActivity,
            partition: 1,
            offset: 9,
            key: Some("u"),
            payload: b"not json",
            correlation_id: None,
            timestamp_ms: None,
        };
        let err = rec.value().expect_err("not json");
        assert!(matches!(err, HandlerError::Reject { kind: DeadLetterKind::Malformed, .. }));
        let letter = dead_letter("svc", &rec, DeadLetterKind::Malformed, err.to_string(), None, 1);
        assert_eq!(letter.source, SourceRef { topic: "user-activity-topic".into(), partition: 1, offset: 9 });
        assert_eq!(letter.original_bytes().as_deref(), Some(&b"not json"[..]));
        assert_eq!(letter.key, "u");
        assert_eq!(letter.payload.as_deref(), Some("not json"));
    }

    #[test]
    fn outbox_carries_the_correlation_id() {
        let mut out = Outbox::new(Some("corr-1"));
        let f = events::UserFeatures { user_id: "u".into(), ..Default::default() };
        out.send(&f);
        assert_eq!(out.messages()[0].correlation_id.as_deref(), Some("corr-1"));
        assert_eq!(out.messages()[0].key, "u");
        assert_eq!(out.decoded::<events::UserFeatures>(), vec![f]);
    }

    /// The handles are taken from the installed recorder, so what they count shows on
    /// `/metrics` (a handle taken before the recorder was installed would count nothing).
    #[test]
    fn message_metrics_record_into_the_installed_recorder() {
        let m = MessageMetrics::new("handles-test");
        m.ok().increment(1);
        m.ok().increment(2);
        m.superseded().increment(1);
        m.handle_seconds().record(0.002);
        m.ack_seconds().clone().record(0.004);
        m.age_seconds().record(1.5);
        let text = crate::http::metrics_handle().render();
        assert!(text.contains(r#"consumer_messages_total{consumer="handles-test",outcome="ok"} 3"#), "{text}");
        assert!(text.contains(r#"consumer_messages_total{consumer="handles-test",outcome="superseded"} 1"#), "{text}");
        assert!(text.contains(r#"consumer_handle_seconds_count{consumer="handles-test"} 1"#), "{text}");
        assert!(text.contains(r#"consumer_outputs_ack_seconds_count{consumer="handles-test"} 1"#), "{text}");
        assert!(text.contains(r#"consumer_message_age_seconds_count{consumer="handles-test"} 1"#), "{text}");
    }
}
