//! The ingestion endpoint shared by `user-activity` and `order`.
//!
//! - An empty body (or `{}`) publishes one random, realistic event.
//! - A JSON object publishes that event; a JSON array publishes a batch (all or nothing
//!   for validation: one invalid element rejects the batch, naming `[index].field`).
//! - `202 Accepted` with each `eventId`, only after the broker acknowledged every event.
//! - Invalid input: `400`/`413` JSON naming the field and the reason. Broker down: `503` at
//!   once (the producer's connection probe) or after `KAFKA_DELIVERY_TIMEOUT_MS`. A `503` lists
//!   the events that were not acknowledged: they may still be stored later, so a client
//!   retries them with the same `eventId`, and the platform counts each once.
//!
//! The body is read as JSON whatever its `Content-Type`, so `curl -d '{...}'` works as is.

use std::sync::Mutex;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use events::generate::Generator;
use events::validate::{self, FieldError, Strictness};
use events::{ActivityEvent, Message, OrderEvent};
use serde_json::{Value, json};

use crate::http::ApiError;
use crate::kafka::{ProduceError, Producer};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most events in one batch.
pub const MAX_BATCH: usize = 500;

/// An event type the ingestion endpoint accepts.
pub trait Ingest: Message + Sized {
    fn random(generator: &mut Generator, now: DateTime<Utc>) -> Self;
    fn validate(value: &Value, now: DateTime<Utc>) -> Result<Self, FieldError>;
    fn event_id(&self) -> &str;
}

impl Ingest for ActivityEvent {
    fn random(generator: &mut Generator, now: DateTime<Utc>) -> Self {
        generator.activity(now)
    }
    fn validate(value: &Value, now: DateTime<Utc>) -> Result<Self, FieldError> {
        validate::activity(value, now, Strictness::Api)
    }
    fn event_id(&self) -> &str {
        &self.event_id
    }
}

impl Ingest for OrderEvent {
    fn random(generator: &mut Generator, now: DateTime<Utc>) -> Self {
        generator.order(now)
    }
    fn validate(value: &Value, now: DateTime<Utc>) -> Result<Self, FieldError> {
        validate::order(value, now, Strictness::Api)
    }
    fn event_id(&self) -> &str {
        &self.event_id
    }
}

/// State of an ingestion endpoint.
pub struct IngestState {
    producer: Producer,
    generator: Mutex<Generator>,
}

impl IngestState {
    pub fn new(producer: Producer) -> Self {
        Self { producer, generator: Mutex::new(Generator::from_entropy()) }
    }
}

/// A router with the ingestion endpoint for `T` at `path`.
pub fn router<T: Ingest>(path: &str, state: std::sync::Arc<IngestState>) -> axum::Router {
    axum::Router::new().route(path, post(ingest::<T>)).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)).with_state(state)
}

/// Parses a request body into events (without publishing them).
pub fn parse_body<T: Ingest>(
    body: &[u8],
    now: DateTime<Utc>,
    generator: &Mutex<Generator>,
) -> Result<Vec<T>, ApiError> {
    let is_blank = body.iter().all(u8::is_ascii_whitespace);
    let value: Value = if is_blank {
        Value::Object(serde_json::Map::new())
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::Invalid { field: "$".into(), reason: format!("malformed JSON: {e}") })?
    };
    match value {
        Value::Object(ref obj) if obj.is_empty() => {
            let mut g = generator.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Ok(vec![T::random(&mut g, now)])
        }
        Value::Object(_) => Ok(vec![T::validate(&value, now)?]),
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ApiError::Invalid { field: "$".into(), reason: "the batch is empty".into() });
            }
            if items.len() > MAX_BATCH {
                return Err(ApiError::PayloadTooLarge(format!(
                    "a batch holds at most {MAX_BATCH} events, got {}",
                    items.len()
                )));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| T::validate(v, now).map_err(|e| ApiError::from(e.in_batch(i))))
                .collect()
        }
        other => Err(ApiError::Invalid {
            field: "$".into(),
            reason: format!(
                "expected a JSON object, an array of objects, or an empty body; got {}",
                validate::type_name(&other)
            ),
        }),
    }
}

async fn ingest<T: Ingest>(
    State(state): State<std::sync::Arc<IngestState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::PayloadTooLarge(format!("the body is larger than {MAX_BODY_BYTES} bytes"))
        }
        _ => ApiError::BadRequest(format!("could not read the body: {e}")),
    })?;
    let events: Vec<T> = parse_body(&body, Utc::now(), &state.generator)?;
    if !state.producer.is_connected() {
        return Err(ApiError::Unavailable("the event broker is unavailable; nothing was stored, retry later".into()));
    }
    let correlation_id = headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let results = futures::future::join_all(events.iter().map(|e| state.producer.send(e, Some(&correlation_id)))).await;
    let (mut stored, mut failed, mut first_error) = (Vec::new(), Vec::new(), None);
    for (event, result) in events.iter().zip(results) {
        match result {
            Ok(_) => stored.push(event.event_id().to_owned()),
            Err(e) => {
                failed.push(event.event_id().to_owned());
                first_error.get_or_insert(e);
            }
        }
    }
    metrics::counter!("ingest_events_total", "topic" => T::TOPIC.name(), "outcome" => "stored")
        .increment(stored.len() as u64);
    if let Some(e) = first_error {
        metrics::counter!("ingest_events_total", "topic" => T::TOPIC.name(), "outcome" => "failed")
            .increment(failed.len() as u64);
        tracing::warn!(error = %e, stored = stored.len(), failed = failed.len(), "publishing failed");
        let status = match e {
            ProduceError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProduceError::Rejected(_) | ProduceError::Encode(_) => StatusCode::UNPROCESSABLE_ENTITY,
        };
        return Ok((
            status,
            Json(json!({
                "error": format!("{e}; events listed in failedEventIds were not acknowledged (they may still be stored): retry them with the same eventId"),
                "storedEventIds": stored,
                "failedEventIds": failed,
            })),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"accepted": stored.len(), "eventIds": stored, "correlationId": correlation_id})),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: Ingest>(body: &str) -> Result<Vec<T>, ApiError> {
        parse_body(body.as_bytes(), Utc::now(), &Mutex::new(Generator::seeded(1)))
    }

    fn invalid_field<T: Ingest + std::fmt::Debug>(body: &str) -> String {
        match parse::<T>(body) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn empty_bodies_make_a_random_valid_event() {
        for body in ["", "  \n", "{}"] {
            let events = parse::<ActivityEvent>(body).expect("random event");
            assert_eq!(events.len(), 1);
            let v = serde_json::to_value(&events[0]).expect("json");
            validate::activity(&v, Utc::now(), Strictness::Stream).expect("the random event is valid");
            assert_eq!(parse::<OrderEvent>(body).expect("random order").len(), 1);
        }
    }

    #[test]
    fn objects_arrays_and_errors() {
        let one = parse::<ActivityEvent>(r#"{"userId":"u","eventType":"search","query":"lamp"}"#).expect("valid");
        assert_eq!(one[0].user_id, "u");
        let batch = parse::<ActivityEvent>(
            r#"[{"userId":"a","eventType":"page_view"},{"userId":"b","eventType":"page_view"}]"#,
        )
        .expect("valid batch");
        assert_eq!(batch.len(), 2);
        assert_eq!(
            invalid_field::<ActivityEvent>(r#"[{"userId":"a","eventType":"page_view"},{"eventType":"page_view"}]"#),
            "[1].userId"
        );
        assert_eq!(invalid_field::<ActivityEvent>("{not json"), "$");
        assert_eq!(invalid_field::<ActivityEvent>("42"), "$");
        assert_eq!(invalid_field::<ActivityEvent>("[]"), "$");
        let too_many = format!("[{}]", vec![r#"{"userId":"a","eventType":"page_view"}"#; MAX_BATCH + 1].join(","));
        assert!(matches!(parse::<ActivityEvent>(&too_many), Err(ApiError::PayloadTooLarge(_))));
        assert_eq!(invalid_field::<OrderEvent>(r#"{"userId":"u","items":[]}"#), "items");
    }
}
