//! The ingestion endpoints: activity (`user-activity`), orders (`order`) and catalog products
//! (`PUT /api/catalog/products` on `user-activity`).
//!
//! - An empty body (or `{}`) publishes one random, realistic event (not for products).
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
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{post, put};
use chrono::{DateTime, Utc};
use events::generate::Generator;
use events::validate::{self, FieldError, Strictness};
use events::{ActivityEvent, CatalogProduct, Message, OrderEvent};
use serde_json::{Value, json};

use crate::http::{ApiError, Body, MAX_BODY_BYTES, SUPPORTED_ENCODINGS};
use crate::kafka::{ProduceError, Producer};

/// Most events in one batch.
pub const MAX_BATCH: usize = 500;

/// A message type an ingestion endpoint accepts.
pub trait Ingest: Message + Sized {
    /// The HTTP method of the endpoint (`post` or `put`).
    const METHOD: &'static str = "post";
    /// The name of the message in the OpenAPI document's schemas.
    const SCHEMA: &'static str;
    /// What the ids in the answer are called (`eventIds`, `failedEventIds`, ...).
    const ID_NAME: &'static str = "Event";
    /// Most messages in one request.
    const MAX_BATCH: usize = MAX_BATCH;
    /// A random message for an empty body, when the endpoint makes one.
    fn random(generator: &mut Generator, now: DateTime<Utc>) -> Option<Self>;
    fn validate(value: &Value, now: DateTime<Utc>) -> Result<Self, FieldError>;
    fn event_id(&self) -> &str;
    /// A one-line summary of the endpoint for the OpenAPI document.
    fn summary() -> &'static str;
    /// The JSON Schema of one event as a client sends it.
    fn schema() -> Value;
    /// A valid example event.
    fn example() -> Value;
}

const ID: &str = "at most 128 characters, no control characters";

impl Ingest for ActivityEvent {
    const SCHEMA: &'static str = "ActivityEvent";
    fn random(generator: &mut Generator, now: DateTime<Utc>) -> Option<Self> {
        Some(generator.activity(now))
    }
    fn validate(value: &Value, now: DateTime<Utc>) -> Result<Self, FieldError> {
        validate::activity(value, now, Strictness::Api)
    }
    fn event_id(&self) -> &str {
        &self.event_id
    }
    fn summary() -> &'static str {
        "Publish user activity (views, clicks, carts, searches) to user-activity-topic"
    }
    fn schema() -> Value {
        let types: Vec<&str> = events::EventType::ACTIVITY.iter().map(|t| t.as_str()).collect();
        json!({
            "type": "object",
            "required": ["userId", "eventType"],
            "properties": {
                "eventId": {"type": "string", "description": format!("makes retries idempotent; generated when absent; {ID}")},
                "userId": {"type": "string", "description": ID},
                "sessionId": {"type": "string", "description": format!("assigned by the event processor when absent; {ID}")},
                "eventType": {"type": "string", "enum": types},
                "productId": {"type": "string", "description": "the product's id (it need not be in the catalog yet); at most 128 characters, no whitespace; required for product_view, click, add_to_cart, remove_from_cart"},
                "query": {"type": "string", "maxLength": validate::MAX_QUERY_LEN, "description": "required for search"},
                "campaignId": {"type": "string"},
                "recommendationId": {"type": "string", "description": "the requestId of the recommendation response the event came from"},
                "timestamp": {"type": "string", "format": "date-time", "description": "RFC 3339; now when absent; at most 5 minutes in the future"}
            }
        })
    }
    fn example() -> Value {
        json!({"eventId": "evt-1001", "userId": "user-0042", "eventType": "product_view", "productId": "P00301"})
    }
}

impl Ingest for OrderEvent {
    const SCHEMA: &'static str = "OrderEvent";
    fn random(generator: &mut Generator, now: DateTime<Utc>) -> Option<Self> {
        Some(generator.order(now))
    }
    fn validate(value: &Value, now: DateTime<Utc>) -> Result<Self, FieldError> {
        validate::order(value, now, Strictness::Api)
    }
    fn event_id(&self) -> &str {
        &self.event_id
    }
    fn summary() -> &'static str {
        "Publish orders to order-topic"
    }
    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["userId", "items", "amount"],
            "properties": {
                "eventId": {"type": "string", "description": format!("makes retries idempotent; generated when absent; {ID}")},
                "orderId": {"type": "string", "description": format!("generated when absent; {ID}")},
                "userId": {"type": "string", "description": ID},
                "sessionId": {"type": "string"},
                "items": {
                    "type": "array", "minItems": 1, "maxItems": validate::MAX_ORDER_ITEMS,
                    "items": {
                        "type": "object",
                        "required": ["productId", "quantity", "unitPrice"],
                        "properties": {
                            "productId": {"type": "string", "description": "the product's id (it need not be in the catalog yet)"},
                            "quantity": {"type": "integer", "minimum": 1, "maximum": validate::MAX_QUANTITY},
                            "unitPrice": {"type": "number", "minimum": 0}
                        }
                    }
                },
                "amount": {"type": "number", "minimum": 0, "maximum": validate::MAX_AMOUNT,
                    "description": format!("must equal the sum of quantity x unitPrice (within {})", validate::AMOUNT_TOLERANCE)},
                "currency": {"type": "string", "pattern": "^[A-Z]{3}$", "default": "EUR"},
                "campaignId": {"type": "string"},
                "offerDecisionId": {"type": "string", "description": "the offer decision the order answers"},
                "timestamp": {"type": "string", "format": "date-time"}
            }
        })
    }
    fn example() -> Value {
        json!({"eventId": "evt-2001", "orderId": "ord-77", "userId": "user-0042", "currency": "EUR",
            "items": [{"productId": "P00301", "quantity": 2, "unitPrice": 10.5}], "amount": 21.0})
    }
}

impl Ingest for CatalogProduct {
    const METHOD: &'static str = "put";
    const SCHEMA: &'static str = "Product";
    const ID_NAME: &'static str = "Product";
    const MAX_BATCH: usize = validate::MAX_CATALOG_BATCH;
    fn random(_: &mut Generator, _: DateTime<Utc>) -> Option<Self> {
        None
    }
    fn validate(value: &Value, now: DateTime<Utc>) -> Result<Self, FieldError> {
        validate::catalog_product(value, now)
    }
    fn event_id(&self) -> &str {
        &self.product_id
    }
    fn summary() -> &'static str {
        "Add or update catalog products on catalog-topic (compacted, keyed by product id)"
    }
    fn schema() -> Value {
        let name = format!("at most {} characters", validate::MAX_NAME_LEN);
        json!({
            "type": "object",
            "required": ["productId", "name", "category", "price"],
            "properties": {
                "productId": {"type": "string", "description": "the shop's own id: at most 128 characters, no whitespace or control characters"},
                "name": {"type": "string", "description": name},
                "category": {"type": "string", "description": name},
                "price": {"type": "number", "minimum": 0, "maximum": validate::MAX_AMOUNT},
                "brand": {"type": "string", "description": name},
                "available": {"type": "boolean", "default": true, "description": "false withdraws the product: it is no longer recommended"},
                "popularity": {"type": "number", "minimum": 0, "maximum": 1, "description": "an optional popularity prior"}
            }
        })
    }
    fn example() -> Value {
        json!({"productId": "SKU-RED-SHOE-42", "name": "Red running shoe", "category": "shoes", "price": 59.9, "brand": "Acme"})
    }
}

/// The OpenAPI 3.1 document of the ingestion endpoint for `T` at `path`.
pub fn openapi<T: Ingest>(service: &str, path: &str) -> Value {
    let (id, event, max) = (T::ID_NAME, T::ID_NAME.to_lowercase(), T::MAX_BATCH);
    let schema_ref = format!("#/components/schemas/{}", T::SCHEMA);
    let random = if T::random(&mut Generator::seeded(0), Utc::now()).is_some() {
        format!("An empty body (or {{}}) publishes one random, realistic {event}. ")
    } else {
        String::new()
    };
    let error = json!({"type": "object", "properties": {
        "error": {"type": "string"}, "field": {"type": "string", "description": "the field at fault, e.g. items[2].quantity or [3].userId"},
        "reason": {"type": "string"}}});
    let failure = json!({"type": "object", "properties": {
        "error": {"type": "string"},
        format!("stored{id}Ids"): {"type": "array", "items": {"type": "string"}},
        format!("failed{id}Ids"): {"type": "array", "items": {"type": "string"},
            "description": "not acknowledged (they may still be stored): retry them"}}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": format!("RetargetIQ {service}"), "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            path: {T::METHOD: {
                "summary": T::summary(),
                "description": format!(
                    "{random}A JSON object publishes that {event}; an array publishes a batch of at most {max} (validated as a whole). The body is read as JSON whatever its Content-Type; at most {MAX_BODY_BYTES} bytes, decompressed when sent with a Content-Encoding of {SUPPORTED_ENCODINGS} (another is a 415)."),
                "requestBody": {"required": false, "content": {"application/json": {
                    "schema": {"oneOf": [{"$ref": schema_ref}, {"type": "array", "items": {"$ref": schema_ref}, "maxItems": max}]},
                    "example": T::example()}}},
                "responses": {
                    "202": {"description": format!("Every {event} was acknowledged by the broker"), "content": {"application/json": {"schema": {
                        "type": "object", "properties": {"accepted": {"type": "integer"}, format!("{event}Ids"): {"type": "array", "items": {"type": "string"}}, "correlationId": {"type": "string"}}}}}},
                    "400": {"description": "Invalid input; nothing was published", "content": {"application/json": {"schema": error}}},
                    "413": {"description": "Body or batch too large; nothing was published", "content": {"application/json": {"schema": error}}},
                    "415": {"description": format!("A Content-Encoding other than {SUPPORTED_ENCODINGS}; nothing was published"), "content": {"application/json": {"schema": error}}},
                    "503": {"description": "The broker is unavailable", "content": {"application/json": {"schema": failure}}}
                }
            }}
        },
        "components": {"schemas": {T::SCHEMA: T::schema()}}
    })
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

/// A router with the ingestion endpoint for `T` at `path`, and its OpenAPI document at
/// `GET /openapi.json`.
pub fn router<T: Ingest>(service: &str, path: &str, state: std::sync::Arc<IngestState>) -> axum::Router {
    Api::new(service).endpoint::<T>(path, state).into_router()
}

/// A service's ingestion endpoints and their one OpenAPI document.
pub struct Api {
    service: String,
    router: axum::Router,
    doc: Option<Value>,
}

impl Api {
    pub fn new(service: &str) -> Self {
        Self { service: service.to_owned(), router: axum::Router::new(), doc: None }
    }

    /// Adds the endpoint for `T` at `path`.
    pub fn endpoint<T: Ingest>(mut self, path: &str, state: std::sync::Arc<IngestState>) -> Self {
        let method = if T::METHOD == "put" { put(ingest::<T>) } else { post(ingest::<T>) };
        let route =
            axum::Router::new().route(path, method).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)).with_state(state);
        self.router = self.router.merge(route);
        let doc = openapi::<T>(&self.service, path);
        self.doc = Some(match self.doc.take() {
            None => doc,
            Some(mut all) => {
                for key in ["paths", "components"] {
                    merge_json(&mut all[key], &doc[key]);
                }
                all
            }
        });
        self
    }

    /// The endpoints, plus `GET /openapi.json`.
    pub fn into_router(self) -> axum::Router {
        let doc = std::sync::Arc::new(self.doc.unwrap_or_else(|| json!({})));
        self.router.route("/openapi.json", axum::routing::get(move || async move { Json((*doc).clone()) }))
    }
}

/// Adds `from`'s object members to `into`, recursively.
fn merge_json(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (k, v) in from {
                match into.get_mut(k) {
                    Some(existing) => merge_json(existing, v),
                    None => {
                        into.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (into, from) => *into = from.clone(),
    }
}

/// Parses a request body into events (without publishing them).
pub fn parse_body<T: Ingest>(
    body: &[u8],
    now: DateTime<Utc>,
    generator: &Mutex<Generator>,
) -> Result<Vec<T>, ApiError> {
    let is_blank = body.iter().all(u8::is_ascii_whitespace);
    let value: Value = if is_blank { Value::Object(serde_json::Map::new()) } else { crate::http::json_body(body)? };
    match value {
        Value::Object(ref obj) if obj.is_empty() => {
            let mut g = generator.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let random = T::random(&mut g, now).ok_or_else(|| ApiError::Invalid {
                field: "$".into(),
                reason: format!("the body is empty; expected a {} or an array of them", T::ID_NAME.to_lowercase()),
            })?;
            Ok(vec![random])
        }
        Value::Object(_) => Ok(vec![T::validate(&value, now)?]),
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ApiError::Invalid { field: "$".into(), reason: "the batch is empty".into() });
            }
            if items.len() > T::MAX_BATCH {
                return Err(ApiError::PayloadTooLarge(format!(
                    "a batch holds at most {} {}s, got {}",
                    T::MAX_BATCH,
                    T::ID_NAME.to_lowercase(),
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
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
        let id = T::ID_NAME;
        return Ok((
            status,
            Json(json!({
                "error": format!("{e}; those listed in failed{id}Ids were not acknowledged (they may still be stored): retry them"),
                format!("stored{id}Ids"): stored,
                format!("failed{id}Ids"): failed,
            })),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(
            json!({"accepted": stored.len(), format!("{}Ids", T::ID_NAME.to_lowercase()): stored, "correlationId": correlation_id}),
        ),
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

    /// The document and the validation cannot drift apart: the examples are accepted, the
    /// required fields are required, and the event types listed are exactly the accepted ones.
    fn check_document<T: Ingest + std::fmt::Debug>(path: &str) {
        let doc = openapi::<T>("svc", path);
        assert_eq!(doc["openapi"], "3.1.0");
        let op = &doc["paths"][path][T::METHOD];
        for status in ["202", "400", "413", "503"] {
            assert!(op["responses"].get(status).is_some(), "{status} documented");
        }
        let example = &op["requestBody"]["content"]["application/json"]["example"];
        T::validate(example, Utc::now()).expect("the documented example is valid");
        let schema = T::schema();
        for field in schema["required"].as_array().expect("required fields") {
            let name = field.as_str().expect("name");
            let mut without = example.clone();
            without.as_object_mut().expect("object").remove(name);
            let err = T::validate(&without, Utc::now()).expect_err("a required field is required");
            assert_eq!(err.field, name);
        }
    }

    #[test]
    fn openapi_documents_match_the_validation() {
        check_document::<ActivityEvent>("/api/users/activity");
        check_document::<OrderEvent>("/api/orders/place");
        check_document::<CatalogProduct>("/api/catalog/products");
        let listed: Vec<String> =
            serde_json::from_value(ActivityEvent::schema()["properties"]["eventType"]["enum"].clone())
                .expect("event types");
        assert_eq!(listed.len(), events::EventType::ACTIVITY.len());
        for t in &listed {
            let v = json!({"userId": "u", "eventType": t, "productId": "P00001", "query": "q"});
            ActivityEvent::validate(&v, Utc::now()).unwrap_or_else(|e| panic!("{t} is documented but rejected: {e}"));
        }
        assert!(!listed.contains(&"purchase".to_owned()));
    }

    #[tokio::test]
    async fn oversized_bodies_and_a_missing_broker_are_clear_json_errors() {
        use axum::body::Body;
        use axum::http::Request;
        use http_body_util::BodyExt as _;
        use tower::ServiceExt as _;

        // A producer pointed at a port where no broker listens.
        let settings = crate::kafka::KafkaSettings::for_broker("127.0.0.1:1");
        let producer = Producer::for_requests(&settings).expect("producer");
        let app = router::<ActivityEvent>("user-activity", "/e", std::sync::Arc::new(IngestState::new(producer)));
        let send = |body: Vec<u8>| {
            let app = app.clone();
            async move {
                let resp =
                    app.oneshot(Request::post("/e").body(Body::from(body)).expect("request")).await.expect("response");
                let status = resp.status();
                let body: Value =
                    serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes()).expect("JSON");
                (status, body)
            }
        };
        let (status, body) = send(vec![b' '; MAX_BODY_BYTES + 1]).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("larger than")), "{body}");
        let (status, body) = send(br#"{"userId":"u","eventType":"page_view"}"#.to_vec()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("broker")), "{body}");
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

    /// A key given twice in one object is refused by name, not settled by taking the last
    /// value (which would, say, file a client's event under the second of two user ids).
    #[test]
    fn a_key_given_twice_is_refused() {
        let twice = |body: &str| match parse::<ActivityEvent>(body) {
            Err(ApiError::Invalid { field, reason }) => (field, reason),
            other => panic!("expected a refusal of {body}, got {other:?}"),
        };
        let (field, reason) = twice(r#"{"userId":"a","userId":"b","eventType":"page_view"}"#);
        assert_eq!(field, "$");
        assert!(reason.contains(r#""userId""#) && reason.contains("twice"), "{reason}");
        let (_, reason) = twice(
            r#"[{"userId":"a","eventType":"page_view"},{"userId":"b","eventType":"click","eventType":"search"}]"#,
        );
        assert!(reason.contains(r#""eventType""#), "{reason}");
        let order = r#"{"userId":"u","currency":"EUR","amount":2,"items":[{"productId":"P1","productId":"P2","quantity":1,"unitPrice":2}]}"#;
        match parse::<OrderEvent>(order) {
            Err(ApiError::Invalid { reason, .. }) => assert!(reason.contains(r#""productId""#), "{reason}"),
            other => panic!("{other:?}"),
        }
        // The same key in different objects is no repetition.
        parse::<ActivityEvent>(r#"[{"userId":"a","eventType":"page_view"},{"userId":"a","eventType":"page_view"}]"#)
            .expect("one key per object");
    }

    #[test]
    fn catalog_products_are_validated_and_never_made_up() {
        assert_eq!(invalid_field::<CatalogProduct>(""), "$", "no random product for an empty body");
        let ok = parse::<CatalogProduct>(
            r#"[{"productId":"SKU-RED-SHOE-42","name":"Red shoe","category":"shoes","price":59.9},
                {"productId":"sku/2","name":"Mug","category":"home","price":0,"available":false,"brand":"Acme"}]"#,
        )
        .expect("valid products");
        assert_eq!((ok[0].product_id.as_str(), ok[1].available, ok[0].available), ("SKU-RED-SHOE-42", false, true));
        let bad = |body: &str| invalid_field::<CatalogProduct>(body);
        assert_eq!(bad(r#"[{"productId":"a b","name":"n","category":"c","price":1}]"#), "[0].productId");
        assert_eq!(bad(r#"[{"productId":"a","category":"c","price":1}]"#), "[0].name");
        assert_eq!(bad(r#"[{"productId":"a","name":"n","category":"c","price":-1}]"#), "[0].price");
        assert_eq!(bad(r#"[{"productId":"a","name":"n","category":"c","price":1,"popularity":2}]"#), "[0].popularity");
        let long = "x".repeat(validate::MAX_ID_LEN + 1);
        assert_eq!(bad(&format!(r#"{{"productId":"{long}","name":"n","category":"c","price":1}}"#)), "productId");
        let too_many = format!(
            "[{}]",
            vec![r#"{"productId":"a","name":"n","category":"c","price":1}"#; validate::MAX_CATALOG_BATCH + 1].join(",")
        );
        assert!(matches!(parse::<CatalogProduct>(&too_many), Err(ApiError::PayloadTooLarge(_))));
    }
}
