//! The rules for raw events, shared by the ingestion APIs and the event processor.
//!
//! Rules are checked on the JSON value rather than through a derived deserializer so that
//! every rejection names the field and the reason (`items[2].quantity: must be a whole number
//! from 1 to 1000`). [`Strictness::Api`] fills in what a client may leave out (event id,
//! timestamp, order id); [`Strictness::Stream`] — for messages already on a topic, possibly
//! written by a foreign producer — requires them.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::messages::{ActivityEvent, CatalogProduct, EventType, OrderEvent, OrderItem};

/// Longest accepted id (`eventId`, `userId`, `sessionId`, `productId`, `orderId`, ...).
pub const MAX_ID_LEN: usize = 128;
/// Longest accepted search query.
pub const MAX_QUERY_LEN: usize = 256;
/// Most lines in one order.
pub const MAX_ORDER_ITEMS: usize = 100;
/// Largest quantity of one order line.
pub const MAX_QUANTITY: u64 = 1_000;
/// Largest order amount.
pub const MAX_AMOUNT: f64 = 1_000_000.0;
/// How far in the future a timestamp may be (clock skew between client and server).
pub const MAX_FUTURE_SKEW: Duration = Duration::minutes(5);
/// Tolerance when comparing an order's `amount` with the sum of its lines.
pub const AMOUNT_TOLERANCE: f64 = 0.01;

/// A rule a message broke: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }

    /// The same error for an element of a batch: `userId` becomes `[3].userId`.
    pub fn in_batch(self, index: usize) -> Self {
        let field = if self.field.is_empty() || self.field == "$" {
            format!("[{index}]")
        } else {
            format!("[{index}].{}", self.field)
        };
        Self { field, reason: self.reason }
    }
}

/// How much a client may leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// From our REST API: `eventId`, `timestamp` (and `orderId`) are filled in when absent.
    Api,
    /// From a topic: every required field must be present.
    Stream,
}

/// Validates a raw activity event.
pub fn activity(value: &Value, now: DateTime<Utc>, strictness: Strictness) -> Result<ActivityEvent, FieldError> {
    let obj = object(value)?;
    schema_version(obj)?;
    let event_type_raw = string(obj, "eventType", 32)?.ok_or_else(|| missing("eventType"))?;
    let event_type = EventType::parse(&event_type_raw).filter(|t| *t != EventType::Purchase).ok_or_else(|| {
        let known: Vec<_> = EventType::ACTIVITY.iter().map(|t| t.as_str()).collect();
        let hint = if event_type_raw == "purchase" { " (purchases are sent as orders)" } else { "" };
        FieldError::new(
            "eventType",
            format!("unknown event type {event_type_raw:?}{hint}; expected one of {}", known.join(", ")),
        )
    })?;
    let product_id = product(obj, "productId")?;
    if event_type.needs_product() && product_id.is_none() {
        return Err(FieldError::new("productId", format!("is required for {} events", event_type.as_str())));
    }
    let query = string(obj, "query", MAX_QUERY_LEN)?;
    if event_type == EventType::Search && query.is_none() {
        return Err(FieldError::new("query", "is required for search events"));
    }
    Ok(ActivityEvent {
        schema_version: crate::SCHEMA_VERSION,
        event_id: event_id(obj, strictness)?,
        user_id: string(obj, "userId", MAX_ID_LEN)?.ok_or_else(|| missing("userId"))?,
        session_id: string(obj, "sessionId", MAX_ID_LEN)?,
        event_type,
        product_id,
        campaign_id: string(obj, "campaignId", MAX_ID_LEN)?,
        query,
        recommendation_id: string(obj, "recommendationId", MAX_ID_LEN)?,
        timestamp: timestamp(obj, now, strictness)?,
    })
}

/// Validates a raw order event.
pub fn order(value: &Value, now: DateTime<Utc>, strictness: Strictness) -> Result<OrderEvent, FieldError> {
    let obj = object(value)?;
    schema_version(obj)?;
    let user_id = string(obj, "userId", MAX_ID_LEN)?.ok_or_else(|| missing("userId"))?;
    let order_id = match (string(obj, "orderId", MAX_ID_LEN)?, strictness) {
        (Some(id), _) => id,
        (None, Strictness::Api) => format!("ord-{}", uuid::Uuid::new_v4()),
        (None, Strictness::Stream) => return Err(missing("orderId")),
    };
    let items_raw = match obj.get("items") {
        None | Some(Value::Null) => return Err(missing("items")),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(wrong_type("items", "an array of order lines", other)),
    };
    if items_raw.is_empty() {
        return Err(FieldError::new("items", "must hold at least one order line"));
    }
    if items_raw.len() > MAX_ORDER_ITEMS {
        return Err(FieldError::new(
            "items",
            format!("holds {} lines; at most {MAX_ORDER_ITEMS} are accepted", items_raw.len()),
        ));
    }
    let mut items = Vec::with_capacity(items_raw.len());
    for (i, raw) in items_raw.iter().enumerate() {
        items.push(order_item(raw).map_err(|e| {
            let field = if e.field.is_empty() { format!("items[{i}]") } else { format!("items[{i}].{}", e.field) };
            FieldError::new(field, e.reason)
        })?);
    }
    let total: f64 = items.iter().map(|i| f64::from(i.quantity) * i.unit_price).sum();
    let amount = match obj.get("amount") {
        None | Some(Value::Null) => return Err(missing("amount")),
        Some(v) => money(v, "amount")?,
    };
    if (amount - total).abs() > AMOUNT_TOLERANCE {
        return Err(FieldError::new(
            "amount",
            format!("is {amount:.2} but the items add up to {total:.2} (quantity x unitPrice)"),
        ));
    }
    let currency = string(obj, "currency", 3)?.unwrap_or_else(|| "EUR".to_owned());
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(FieldError::new("currency", format!("{currency:?} is not a 3-letter ISO 4217 code such as EUR")));
    }
    Ok(OrderEvent {
        schema_version: crate::SCHEMA_VERSION,
        event_id: event_id(obj, strictness)?,
        order_id,
        user_id,
        session_id: string(obj, "sessionId", MAX_ID_LEN)?,
        items,
        amount,
        currency,
        campaign_id: string(obj, "campaignId", MAX_ID_LEN)?,
        offer_decision_id: string(obj, "offerDecisionId", MAX_ID_LEN)?,
        timestamp: timestamp(obj, now, strictness)?,
    })
}

fn order_item(value: &Value) -> Result<OrderItem, FieldError> {
    let obj = value
        .as_object()
        .ok_or_else(|| FieldError::new("", "must be an object with productId, quantity and unitPrice"))?;
    let product_id = product(obj, "productId")?.ok_or_else(|| missing("productId"))?;
    let quantity = match obj.get("quantity") {
        None | Some(Value::Null) => return Err(missing("quantity")),
        Some(v) => {
            v.as_u64().filter(|q| (1..=MAX_QUANTITY).contains(q)).and_then(|q| u32::try_from(q).ok()).ok_or_else(
                || FieldError::new("quantity", format!("must be a whole number from 1 to {MAX_QUANTITY}, got {v}")),
            )?
        }
    };
    let unit_price = match obj.get("unitPrice") {
        None | Some(Value::Null) => return Err(missing("unitPrice")),
        Some(v) => money(v, "unitPrice")?,
    };
    Ok(OrderItem { product_id, quantity, unit_price })
}

fn object(value: &Value) -> Result<&Map<String, Value>, FieldError> {
    value.as_object().ok_or_else(|| wrong_type("$", "a JSON object", value))
}

fn missing(field: &str) -> FieldError {
    FieldError::new(field, "is required")
}

/// How a JSON value's type is named in error messages ("a string", "an array", ...).
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(field: &str, expected: &str, got: &Value) -> FieldError {
    FieldError::new(field, format!("must be {expected}, got {}", type_name(got)))
}

/// An optional string field: trimmed, non-empty, at most `max` characters, no control characters.
fn string(obj: &Map<String, Value>, field: &str, max: usize) -> Result<Option<String>, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => text(field, s, max).map(|s| Some(s.to_owned())),
        Some(other) => Err(wrong_type(field, "a string", other)),
    }
}

/// Text checked as a string field is: trimmed, non-empty, at most `max` characters, no
/// control characters.
fn text<'a>(field: &str, s: &'a str, max: usize) -> Result<&'a str, FieldError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if s.chars().count() > max {
        return Err(FieldError::new(field, format!("is longer than {max} characters")));
    }
    if s.chars().any(char::is_control) {
        return Err(FieldError::new(field, "must not contain control characters"));
    }
    Ok(s)
}

/// A user id given outside a message (a URL's path, a request's body): the rules of an
/// event's `userId`, so a lookup finds what ingestion stored — surrounding whitespace trimmed,
/// non-empty, at most [`MAX_ID_LEN`] characters, no control characters.
pub fn user_id(raw: &str) -> Result<&str, FieldError> {
    text("userId", raw, MAX_ID_LEN)
}

/// A product id: an opaque string of at most [`MAX_ID_LEN`] characters with no whitespace or
/// control characters. Products need not be in the catalog yet (catalog feeds lag behind):
/// the event processor enriches such an event as unknown.
fn product(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => product_id_in(field, s).map(|id| Some(id.to_owned())),
        Some(other) => Err(wrong_type(field, "a string", other)),
    }
}

/// A product id given outside a message (a history file's column): the rules of an event's
/// `productId` — surrounding whitespace trimmed, at most [`MAX_ID_LEN`] characters, no
/// whitespace or control characters inside.
pub fn product_id(raw: &str) -> Result<&str, FieldError> {
    product_id_in("productId", raw)
}

fn product_id_in<'a>(field: &str, raw: &'a str) -> Result<&'a str, FieldError> {
    let id = text(field, raw, MAX_ID_LEN)?;
    if id.chars().any(char::is_whitespace) {
        return Err(FieldError::new(field, format!("{id:?} contains whitespace; product ids are single tokens")));
    }
    Ok(id)
}

/// Most products in one catalog request.
pub const MAX_CATALOG_BATCH: usize = 1_000;
/// Longest product name, category and brand.
pub const MAX_NAME_LEN: usize = 200;

/// Validates one catalog product:
/// `{"productId", "name", "category", "price", "brand"?, "available"?, "popularity"?}`.
pub fn catalog_product(value: &Value, now: DateTime<Utc>) -> Result<CatalogProduct, FieldError> {
    let obj = object(value)?;
    schema_version(obj)?;
    let popularity = match obj.get("popularity") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => Some(x),
            _ => return Err(FieldError::new("popularity", format!("must be a number from 0 to 1, got {v}"))),
        },
    };
    let available = match obj.get("available") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(wrong_type("available", "a boolean", other)),
    };
    Ok(CatalogProduct {
        schema_version: crate::SCHEMA_VERSION,
        product_id: product(obj, "productId")?.ok_or_else(|| missing("productId"))?,
        name: string(obj, "name", MAX_NAME_LEN)?.ok_or_else(|| missing("name"))?,
        category: string(obj, "category", MAX_NAME_LEN)?.ok_or_else(|| missing("category"))?,
        price: match obj.get("price") {
            None | Some(Value::Null) => return Err(missing("price")),
            Some(v) => money(v, "price")?,
        },
        brand: string(obj, "brand", MAX_NAME_LEN)?,
        available,
        popularity,
        updated_at: now,
    })
}

fn money(v: &Value, field: &str) -> Result<f64, FieldError> {
    let x = v.as_f64().ok_or_else(|| wrong_type(field, "a number", v))?;
    if !x.is_finite() || x < 0.0 {
        return Err(FieldError::new(field, format!("must be a finite, non-negative amount, got {v}")));
    }
    if x > MAX_AMOUNT {
        return Err(FieldError::new(field, format!("must not exceed {MAX_AMOUNT}, got {v}")));
    }
    Ok(x)
}

fn event_id(obj: &Map<String, Value>, strictness: Strictness) -> Result<String, FieldError> {
    match (string(obj, "eventId", MAX_ID_LEN)?, strictness) {
        (Some(id), _) => Ok(id),
        (None, Strictness::Api) => Ok(uuid::Uuid::new_v4().to_string()),
        (None, Strictness::Stream) => Err(missing("eventId")),
    }
}

fn timestamp(
    obj: &Map<String, Value>,
    now: DateTime<Utc>,
    strictness: Strictness,
) -> Result<DateTime<Utc>, FieldError> {
    let raw = match (string(obj, "timestamp", 64)?, strictness) {
        (Some(raw), _) => raw,
        (None, Strictness::Api) => return Ok(now),
        (None, Strictness::Stream) => return Err(missing("timestamp")),
    };
    let ts = DateTime::parse_from_rfc3339(&raw)
        .map_err(|e| FieldError::new("timestamp", format!("{raw:?} is not an RFC 3339 time ({e})")))?
        .with_timezone(&Utc);
    if ts > now + MAX_FUTURE_SKEW {
        return Err(FieldError::new(
            "timestamp",
            format!("{raw} is more than {} minutes in the future", MAX_FUTURE_SKEW.num_minutes()),
        ));
    }
    Ok(ts)
}

fn schema_version(obj: &Map<String, Value>) -> Result<(), FieldError> {
    match obj.get("schemaVersion") {
        None | Some(Value::Null) => Ok(()),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= u64::from(crate::SCHEMA_VERSION) => Ok(()),
            _ => Err(FieldError::new(
                "schemaVersion",
                format!("unsupported schema version {v}; this platform reads 1 to {}", crate::SCHEMA_VERSION),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z").expect("valid").with_timezone(&Utc)
    }

    #[allow(clippy::needless_pass_by_value)] // tests read best with json! literals
    fn act(v: Value) -> Result<ActivityEvent, FieldError> {
        activity(&v, now(), Strictness::Api)
    }

    #[allow(clippy::needless_pass_by_value)]
    fn ord(v: Value) -> Result<OrderEvent, FieldError> {
        order(&v, now(), Strictness::Api)
    }

    fn field_of<T: std::fmt::Debug>(r: Result<T, FieldError>) -> String {
        r.expect_err("must be rejected").field
    }

    #[test]
    fn a_user_id_from_a_path_follows_the_event_rules() {
        assert_eq!(user_id(" u1 "), Ok("u1"));
        assert_eq!(user_id(&"é".repeat(MAX_ID_LEN)).map(|u| u.chars().count()), Ok(MAX_ID_LEN));
        for bad in ["", "  ", "u\u{1}1", &"x".repeat(MAX_ID_LEN + 1)] {
            let e = user_id(bad).expect_err(bad);
            assert_eq!(e.field, "userId", "{bad:?}: {e}");
        }
        // The same id is accepted in an event and in a path, and comes out the same.
        let event = act(json!({"userId": "\tu1 ", "eventType": "click", "productId": "P00001"})).expect("valid");
        assert_eq!(user_id("\tu1 "), Ok(event.user_id.as_str()));
    }

    #[test]
    fn valid_activity_gets_defaults_in_api_mode() {
        let e = act(json!({"userId": " u1 ", "eventType": "product_view", "productId": "P00001"})).expect("valid");
        assert_eq!(e.user_id, "u1");
        assert_eq!(e.timestamp, now());
        assert!(uuid::Uuid::parse_str(&e.event_id).is_ok());
        let e = act(json!({"eventId": "client-1", "userId": "u1", "eventType": "search", "query": "shoes"}))
            .expect("valid");
        assert_eq!(e.event_id, "client-1");
    }

    #[test]
    fn activity_rejections_name_the_field() {
        assert_eq!(field_of(act(json!([1]))), "$");
        assert_eq!(field_of(act(json!({"eventType": "click", "productId": "P00001"}))), "userId");
        assert_eq!(field_of(act(json!({"userId": 5, "eventType": "click", "productId": "P00001"}))), "userId");
        assert_eq!(field_of(act(json!({"userId": "", "eventType": "click", "productId": "P00001"}))), "userId");
        assert_eq!(field_of(act(json!({"userId": "u", "eventType": "teleport"}))), "eventType");
        let e = act(json!({"userId": "u", "eventType": "purchase"})).expect_err("purchase is not activity");
        assert!(e.reason.contains("orders"), "{e}");
        assert_eq!(field_of(act(json!({"userId": "u", "eventType": "click"}))), "productId");
        assert_eq!(field_of(act(json!({"userId": "u", "eventType": "click", "productId": "NO PE"}))), "productId");
        // A product the catalog does not know (yet) is accepted: ids are the shop's own.
        let shop = act(json!({"userId": "u", "eventType": "click", "productId": "SKU-RED-SHOE-42"})).expect("valid");
        assert_eq!(shop.product_id.as_deref(), Some("SKU-RED-SHOE-42"));
        assert_eq!(field_of(act(json!({"userId": "u", "eventType": "search"}))), "query");
        assert_eq!(field_of(act(json!({"userId": "u\u{7}", "eventType": "page_view"}))), "userId");
        assert_eq!(field_of(act(json!({"userId": "x".repeat(129), "eventType": "page_view"}))), "userId");
        assert_eq!(
            field_of(act(json!({"userId": "u", "eventType": "page_view", "timestamp": "2026-06-01T12:10:00Z"}))),
            "timestamp"
        );
        assert_eq!(
            field_of(act(json!({"userId": "u", "eventType": "page_view", "timestamp": "yesterday"}))),
            "timestamp"
        );
        assert_eq!(
            field_of(act(json!({"userId": "u", "eventType": "page_view", "schemaVersion": 99}))),
            "schemaVersion"
        );
        // A little clock skew is fine.
        act(json!({"userId": "u", "eventType": "page_view", "timestamp": "2026-06-01T12:04:00Z"})).expect("valid");
    }

    #[test]
    fn stream_mode_requires_ids_and_time() {
        let v = json!({"userId": "u", "eventType": "page_view"});
        assert_eq!(field_of(activity(&v, now(), Strictness::Stream)), "eventId");
        let v = json!({"eventId": "e", "userId": "u", "eventType": "page_view"});
        assert_eq!(field_of(activity(&v, now(), Strictness::Stream)), "timestamp");
    }

    #[test]
    fn valid_order() {
        let o = ord(json!({"userId": "u", "items": [{"productId": "P00001", "quantity": 2, "unitPrice": 10.5}], "amount": 21.0}))
            .expect("valid");
        assert_eq!(o.currency, "EUR");
        assert!(o.order_id.starts_with("ord-"));
        assert_eq!(o.items[0].quantity, 2);
    }

    #[test]
    fn order_rejections_name_the_field() {
        let item = json!({"productId": "P00001", "quantity": 1, "unitPrice": 10.0});
        assert_eq!(field_of(ord(json!({"items": [item], "amount": 10.0}))), "userId");
        assert_eq!(field_of(ord(json!({"userId": "u", "amount": 10.0}))), "items");
        assert_eq!(field_of(ord(json!({"userId": "u", "items": [], "amount": 0.0}))), "items");
        assert_eq!(field_of(ord(json!({"userId": "u", "items": "P1", "amount": 0.0}))), "items");
        assert_eq!(field_of(ord(json!({"userId": "u", "items": [item], "amount": -10.0}))), "amount");
        assert_eq!(field_of(ord(json!({"userId": "u", "items": [item], "amount": "10"}))), "amount");
        assert_eq!(field_of(ord(json!({"userId": "u", "items": [item], "amount": 12.0}))), "amount");
        assert_eq!(
            field_of(ord(json!({"userId": "u", "items": [item], "amount": 10.0, "currency": "euro"}))),
            "currency"
        );
        let bad = |line: Value| ord(json!({"userId": "u", "items": [item.clone(), line], "amount": 10.0}));
        assert_eq!(field_of(bad(json!({"productId": "P00001", "quantity": 0, "unitPrice": 1.0}))), "items[1].quantity");
        assert_eq!(
            field_of(bad(json!({"productId": "P00001", "quantity": 1.5, "unitPrice": 1.0}))),
            "items[1].quantity"
        );
        assert_eq!(
            field_of(bad(json!({"productId": "P00001", "quantity": 1, "unitPrice": -1.0}))),
            "items[1].unitPrice"
        );
        assert_eq!(field_of(bad(json!({"productId": "Z Z", "quantity": 1, "unitPrice": 1.0}))), "items[1].productId");
        assert_eq!(field_of(bad(json!({"quantity": 1, "unitPrice": 1.0}))), "items[1].productId");
        assert_eq!(field_of(bad(json!(7))), "items[1]");
    }

    #[test]
    fn batch_fields_are_indexed() {
        assert_eq!(FieldError::new("userId", "x").in_batch(3).field, "[3].userId");
        assert_eq!(FieldError::new("$", "x").in_batch(0).field, "[0]");
    }
}
