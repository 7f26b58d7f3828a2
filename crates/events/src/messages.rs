//! The message types, one per topic (plus their parts).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::topic::{Message, Topic};

fn schema_version() -> u32 {
    crate::SCHEMA_VERSION
}

/// What a user did. `purchase` is never sent as activity: purchases arrive as orders and are
/// turned into `purchase` events by the event processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    PageView,
    ProductView,
    Click,
    AddToCart,
    RemoveFromCart,
    Search,
    Purchase,
}

impl EventType {
    /// The types a client may send to the activity API.
    pub const ACTIVITY: [EventType; 6] = [
        EventType::PageView,
        EventType::ProductView,
        EventType::Click,
        EventType::AddToCart,
        EventType::RemoveFromCart,
        EventType::Search,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::PageView => "page_view",
            EventType::ProductView => "product_view",
            EventType::Click => "click",
            EventType::AddToCart => "add_to_cart",
            EventType::RemoveFromCart => "remove_from_cart",
            EventType::Search => "search",
            EventType::Purchase => "purchase",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ACTIVITY.into_iter().chain([EventType::Purchase]).find(|t| t.as_str() == s)
    }

    /// How much an event of this type says about interest in its product (and category):
    /// view 1, click 1.5, add to cart 3, purchase 5, others 0. Shared by the feature store's
    /// affinities and retrieval's popularity.
    pub fn engagement_weight(self) -> f64 {
        match self {
            EventType::ProductView => 1.0,
            EventType::Click => 1.5,
            EventType::AddToCart => 3.0,
            EventType::Purchase => 5.0,
            EventType::PageView | EventType::RemoveFromCart | EventType::Search => 0.0,
        }
    }

    /// Whether an activity of this type must name a product.
    pub fn needs_product(self) -> bool {
        matches!(self, EventType::ProductView | EventType::Click | EventType::AddToCart | EventType::RemoveFromCart)
    }
}

/// A raw activity event on `user-activity-topic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivityEvent {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub event_id: String,
    pub user_id: String,
    /// Absent when the client did not send one; the event processor then assigns a session.
    pub session_id: Option<String>,
    pub event_type: EventType,
    pub product_id: Option<String>,
    pub campaign_id: Option<String>,
    /// The search text, for `search` events.
    pub query: Option<String>,
    /// The `requestId` of the recommendation response this event came from, for attribution.
    pub recommendation_id: Option<String>,
    pub timestamp: DateTime<Utc>,
}

impl Message for ActivityEvent {
    const TOPIC: Topic = Topic::UserActivity;
    fn key(&self) -> &str {
        &self.user_id
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderItem {
    pub product_id: String,
    pub quantity: u32,
    pub unit_price: f64,
}

/// A raw order event on `order-topic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderEvent {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub event_id: String,
    pub order_id: String,
    pub user_id: String,
    pub session_id: Option<String>,
    pub items: Vec<OrderItem>,
    pub amount: f64,
    pub currency: String,
    pub campaign_id: Option<String>,
    /// The offer decision the order answers, when the client knows it.
    pub offer_decision_id: Option<String>,
    pub timestamp: DateTime<Utc>,
}

impl Message for OrderEvent {
    const TOPIC: Topic = Topic::Order;
    fn key(&self) -> &str {
        &self.user_id
    }
}

/// Catalog data attached to an event by the event processor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductInfo {
    pub product_id: String,
    pub name: String,
    pub category: String,
    pub price: f64,
    /// True when the product was not in the catalog when the event was processed (catalog
    /// feeds lag behind): name and category are empty, the price is the order line's or 0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
}

impl ProductInfo {
    /// The catalog's data for `id`, or an unknown product's placeholder.
    pub fn from_catalog(catalog: &catalog::Catalog, id: &str) -> Self {
        match catalog.get(id) {
            Some(p) => Self {
                product_id: p.id.clone(),
                name: p.name.clone(),
                category: p.category.clone(),
                price: p.price,
                unknown: false,
            },
            None => Self::unknown(id),
        }
    }

    pub fn unknown(id: &str) -> Self {
        Self { product_id: id.to_owned(), name: String::new(), category: String::new(), price: 0.0, unknown: true }
    }

    /// The product's category, when it is known.
    pub fn known_category(&self) -> Option<&str> {
        (!self.unknown && !self.category.is_empty()).then_some(self.category.as_str())
    }
}

/// A product on `catalog-topic` (key: the product id; compacted, so the latest version of
/// each product is what a new reader sees). A product is withdrawn with `available: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CatalogProduct {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub product_id: String,
    pub name: String,
    pub category: String,
    pub price: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<String>,
    #[serde(default = "yes")]
    pub available: bool,
    /// A popularity prior in `[0, 1]` (the demo catalog has one; a shop's usually has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub popularity: Option<f64>,
    pub updated_at: DateTime<Utc>,
}

fn yes() -> bool {
    true
}

impl Message for CatalogProduct {
    const TOPIC: Topic = Topic::Catalog;
    fn key(&self) -> &str {
        &self.product_id
    }
}

impl CatalogProduct {
    /// The message for a product of a catalog.
    pub fn of(p: &catalog::Product, updated_at: DateTime<Utc>) -> Self {
        Self {
            schema_version: crate::SCHEMA_VERSION,
            product_id: p.id.clone(),
            name: p.name.clone(),
            category: p.category.clone(),
            price: p.price,
            brand: p.brand.clone(),
            available: p.available,
            popularity: (p.popularity > 0.0).then_some(p.popularity),
            updated_at,
        }
    }

    /// The product as the services keep it.
    pub fn to_product(&self) -> catalog::Product {
        catalog::Product {
            id: self.product_id.clone(),
            name: self.name.clone(),
            category: self.category.clone(),
            price: self.price,
            brand: self.brand.clone(),
            available: self.available,
            popularity: self.popularity.filter(|p| p.is_finite()).unwrap_or(0.0).clamp(0.0, 1.0),
        }
    }
}

/// An order line, enriched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessedItem {
    #[serde(flatten)]
    pub product: ProductInfo,
    pub quantity: u32,
    pub unit_price: f64,
}

/// The order part of a `purchase` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessedOrder {
    pub order_id: String,
    pub amount: f64,
    pub currency: String,
    pub items: Vec<ProcessedItem>,
    pub offer_decision_id: Option<String>,
}

/// Where a message was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A validated, enriched, de-duplicated event on `processed-events-topic`: activity and orders
/// in one stream, keyed by user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessedEvent {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub event_id: String,
    pub user_id: String,
    pub session_id: String,
    pub event_type: EventType,
    pub occurred_at: DateTime<Utc>,
    pub processed_at: DateTime<Utc>,
    pub correlation_id: String,
    pub product: Option<ProductInfo>,
    pub campaign_id: Option<String>,
    pub query: Option<String>,
    pub recommendation_id: Option<String>,
    pub order: Option<ProcessedOrder>,
    pub source: SourceRef,
}

impl ProcessedEvent {
    /// This event's identity across users (see [`crate::idempotency_key`]).
    pub fn idempotency_key(&self) -> String {
        crate::idempotency_key(&self.user_id, &self.event_id)
    }
}

impl Message for ProcessedEvent {
    const TOPIC: Topic = Topic::ProcessedEvents;
    fn key(&self) -> &str {
        &self.user_id
    }
}

/// Why a message went to the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterKind {
    /// The payload is not JSON, or not a message of the topic's type.
    Malformed,
    /// The message parsed but broke a rule (unknown product, bad amount, ...).
    Invalid,
    /// The handler failed on it every time it was tried.
    HandlerFailed,
}

/// A rejected or poison message on `dead-letter-topic`, with the original bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub dead_letter_id: String,
    /// The message key, or `""` when the original had none.
    pub key: String,
    pub source: SourceRef,
    pub kind: DeadLetterKind,
    pub reason: String,
    /// The field the reason is about, when there is one.
    pub field: Option<String>,
    pub attempts: u32,
    pub service: String,
    pub correlation_id: Option<String>,
    /// The original payload as text, when it was valid UTF-8.
    pub payload: Option<String>,
    /// The original payload, byte for byte.
    pub payload_base64: String,
    pub failed_at: DateTime<Utc>,
}

impl Message for DeadLetter {
    const TOPIC: Topic = Topic::DeadLetter;
    fn key(&self) -> &str {
        &self.key
    }
}

impl DeadLetter {
    /// The original payload, decoded from `payloadBase64`.
    pub fn original_bytes(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(&self.payload_base64).ok()
    }

    pub fn encode_payload(bytes: &[u8]) -> (Option<String>, String) {
        use base64::Engine as _;
        (std::str::from_utf8(bytes).ok().map(str::to_owned), base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

/// Event counts by type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventCounts {
    pub page_views: u64,
    pub product_views: u64,
    pub clicks: u64,
    pub add_to_cart: u64,
    pub remove_from_cart: u64,
    pub searches: u64,
    pub purchases: u64,
}

impl EventCounts {
    pub fn add(&mut self, t: EventType) {
        *self.slot(t) += 1;
    }

    /// Adds another set of counts to this one.
    pub fn merge(&mut self, other: &EventCounts) {
        for t in EventType::ACTIVITY.into_iter().chain([EventType::Purchase]) {
            *self.slot(t) += other.get(t);
        }
    }

    pub fn get(&self, t: EventType) -> u64 {
        let mut copy = self.clone();
        *copy.slot(t)
    }

    pub fn total(&self) -> u64 {
        EventType::ACTIVITY.into_iter().chain([EventType::Purchase]).map(|t| self.get(t)).sum()
    }

    fn slot(&mut self, t: EventType) -> &mut u64 {
        match t {
            EventType::PageView => &mut self.page_views,
            EventType::ProductView => &mut self.product_views,
            EventType::Click => &mut self.clicks,
            EventType::AddToCart => &mut self.add_to_cart,
            EventType::RemoveFromCart => &mut self.remove_from_cart,
            EventType::Search => &mut self.searches,
            EventType::Purchase => &mut self.purchases,
        }
    }
}

/// Event counts over sliding windows that end at the snapshot's time. The hour is counted in
/// five-minute buckets and the day and week in hourly ones, so a window may include up to one
/// bucket more than its nominal length.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowedCounts {
    pub last_1h: EventCounts,
    pub last_24h: EventCounts,
    pub last_7d: EventCounts,
}

/// The user's sessions: the current one and an average over all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionStats {
    /// Events in the current session.
    pub current_events: u64,
    pub current_started_at: Option<DateTime<Utc>>,
    /// Seconds from the current session's first event to its latest.
    pub current_duration_seconds: f64,
    pub average_events_per_session: f64,
    /// When the previous session's last event happened (for "time since the last visit").
    pub previous_visit_at: Option<DateTime<Utc>>,
}

/// A per-user feature snapshot on `user-features-topic`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserFeatures {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub user_id: String,
    pub updated_at: DateTime<Utc>,
    pub first_seen: DateTime<Utc>,
    /// Time of the user's latest event.
    pub last_seen: DateTime<Utc>,
    pub counts: EventCounts,
    /// Event counts over the last hour, day and week, as of `updatedAt`.
    #[serde(default)]
    pub windows: WindowedCounts,
    pub sessions: u64,
    pub current_session_id: String,
    #[serde(default)]
    pub session: SessionStats,
    /// Category -> affinity, decayed over time (the half-life and the number of categories kept
    /// are documented in the feature store).
    pub category_affinity: BTreeMap<String, f64>,
    pub preferred_category: Option<String>,
    /// Most recent first.
    pub recently_viewed: Vec<String>,
    /// Product -> how much the user engaged with it (views 1, clicks 1.5, carts 3, purchases 5),
    /// decayed like `categoryAffinity`; kept for the products of `recentlyViewed`, `cart` and
    /// `purchased`. Shoppers come back to what they engaged with often, not only lately.
    #[serde(default)]
    pub product_engagement: BTreeMap<String, f64>,
    /// Products in the cart now, most recently added first.
    pub cart: Vec<String>,
    pub cart_value: f64,
    /// Most recent first.
    pub purchased: Vec<String>,
    pub order_count: u64,
    pub total_spend: f64,
    /// Time of the user's latest order.
    #[serde(default)]
    pub last_purchase_at: Option<DateTime<Utc>>,
    /// Derived scores in [0, 1] used by ranking and offers.
    pub purchase_intent: f64,
    pub activity_score: f64,
    pub recency_score: f64,
    /// The event that produced this snapshot.
    pub last_event_id: String,
    pub last_event_type: Option<EventType>,
}

impl Message for UserFeatures {
    const TOPIC: Topic = Topic::UserFeatures;
    fn key(&self) -> &str {
        &self.user_id
    }
}

/// Where a candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateSource {
    /// Viewed or carted by the user and not bought.
    Retargeting,
    /// Viewed in the same sessions as what the user viewed.
    CoVisitation,
    /// Popular now in the user's favourite categories.
    PopularInCategory,
    /// Rising fast now (short-term popularity well above its long-term level) in the user's
    /// favourite categories.
    Trending,
    /// Popular overall: for users we know little about.
    ColdStart,
}

impl CandidateSource {
    /// Every source, in declaration (and `Ord`) order.
    pub const ALL: [CandidateSource; 5] = [
        CandidateSource::Retargeting,
        CandidateSource::CoVisitation,
        CandidateSource::PopularInCategory,
        CandidateSource::Trending,
        CandidateSource::ColdStart,
    ];

    /// The source's place in [`CandidateSource::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CandidateSource::Retargeting => "retargeting",
            CandidateSource::CoVisitation => "co_visitation",
            CandidateSource::PopularInCategory => "popular_in_category",
            CandidateSource::Trending => "trending",
            CandidateSource::ColdStart => "cold_start",
        }
    }
}

/// What ranking reads of the feature snapshot a candidate set was made from. It travels with
/// the candidates, so that ranking scores them against that same snapshot; the rest of the
/// snapshot (counts, windows, sessions, ...) stays on `user-features-topic` (it was a quarter of
/// each candidate set's bytes). A full [`UserFeatures`] reads as one (older messages).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RankingFeatures {
    /// Category -> affinity, as in [`UserFeatures::category_affinity`].
    #[serde(default)]
    pub category_affinity: BTreeMap<String, f64>,
    /// Most recent first.
    #[serde(default)]
    pub recently_viewed: Vec<String>,
    /// Products in the cart now.
    #[serde(default)]
    pub cart: Vec<String>,
}

impl From<UserFeatures> for RankingFeatures {
    fn from(f: UserFeatures) -> Self {
        Self { category_affinity: f.category_affinity, recently_viewed: f.recently_viewed, cart: f.cart }
    }
}

/// One candidate item with the source that proposed it and that source's score in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    /// Held inline up to 24 bytes (a `CompactString`; on the wire a JSON string like any
    /// other): a list carries about 90 candidates, and ranking decoding them allocated and
    /// freed one string apiece.
    pub product_id: compact_str::CompactString,
    pub source: CandidateSource,
    pub source_score: f64,
}

/// Candidate items for one user on `candidates-topic`, with what ranking needs of the features
/// they were made from (so ranking scores against the same snapshot).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidates {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub user_id: String,
    pub generated_at: DateTime<Utc>,
    pub features: RankingFeatures,
    pub candidates: Vec<Candidate>,
}

impl Message for Candidates {
    const TOPIC: Topic = Topic::Candidates;
    fn key(&self) -> &str {
        &self.user_id
    }
}

/// The sources that proposed an item, in [`CandidateSource::ALL`] order: inline (there are
/// only five), a JSON array on the wire.
pub type Sources = smallvec::SmallVec<[CandidateSource; CandidateSource::ALL.len()]>;

/// One item of a ranked list as published: what the recommendation API serves from (it adds
/// the live catalog's name, category and price). Ranking's `GET /rank/{userId}` shows the
/// list with its own, wider item (described and explained), which the topic never carries:
/// each list keeps 50 of these per user in ranking and in every recommendation API instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RankedItem {
    /// Inline up to 24 bytes, as [`Candidate::product_id`]: ranking builds 50 per list and
    /// the recommendation API decodes them; on the wire a JSON string like any other.
    pub item_id: compact_str::CompactString,
    pub score: f64,
    pub sources: Sources,
}

/// The ranked list for one user on `ranked-recommendations-topic` (its items [`RankedItem`]s;
/// ranking's `GET /rank/{userId}` shows the same list with wider items).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RankedRecommendations<Item = RankedItem> {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub user_id: String,
    pub ranked_at: DateTime<Utc>,
    pub model_version: String,
    /// Online-learning steps behind the weights.
    #[serde(default)]
    pub model_updates: u64,
    /// The weights the list was scored with (a restarted ranking resumes from them).
    #[serde(default)]
    pub model_weights: BTreeMap<String, f64>,
    /// The ranking instance that published the list: its peers fold its weights into theirs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_instance: String,
    pub items: Vec<Item>,
}

impl Message for RankedRecommendations {
    const TOPIC: Topic = Topic::RankedRecommendations;
    fn key(&self) -> &str {
        &self.user_id
    }
}

/// The offers the platform can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OfferAction {
    NoAction,
    Reminder,
    #[serde(rename = "DISCOUNT_10")]
    Discount10,
    FreeShipping,
}

impl OfferAction {
    pub const ALL: [OfferAction; 4] =
        [OfferAction::NoAction, OfferAction::Reminder, OfferAction::Discount10, OfferAction::FreeShipping];

    pub fn as_str(self) -> &'static str {
        match self {
            OfferAction::NoAction => "NO_ACTION",
            OfferAction::Reminder => "REMINDER",
            OfferAction::Discount10 => "DISCOUNT_10",
            OfferAction::FreeShipping => "FREE_SHIPPING",
        }
    }
}

/// An offer decision on `offers-topic`, logged with its propensity for learning and
/// off-policy evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfferDecision {
    #[serde(default = "schema_version")]
    pub schema_version: u32,
    pub decision_id: String,
    pub user_id: String,
    pub decided_at: DateTime<Utc>,
    pub action: OfferAction,
    /// Probability with which the policy chose this action.
    pub propensity: f64,
    pub policy: String,
    /// What prompted the decision (`cart_abandoned`, `api`, ...).
    pub trigger: String,
    pub context: BTreeMap<String, f64>,
    /// Why this action, in words.
    pub explanation: String,
}

impl Message for OfferDecision {
    const TOPIC: Topic = Topic::Offers;
    fn key(&self) -> &str {
        &self.user_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Generator;

    fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) {
        let json = serde_json::to_string(m).expect("serializes");
        let back: M = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(&back, m, "{json}");
    }

    #[test]
    fn every_message_round_trips_as_camel_case_json() {
        let now = Utc::now();
        let mut g = Generator::seeded(7);
        let activity = g.activity(now);
        round_trip(&activity);
        let order = g.order(now);
        round_trip(&order);
        let json = serde_json::to_value(&order).expect("json");
        assert!(json.get("orderId").is_some() && json.get("unitPrice").is_none());
        assert!(json["items"][0].get("unitPrice").is_some());

        let product = ProductInfo {
            product_id: "P00001".into(),
            name: "Thing".into(),
            category: "books".into(),
            price: 9.5,
            unknown: false,
        };
        let processed = ProcessedEvent {
            schema_version: 1,
            event_id: "e1".into(),
            user_id: "u1".into(),
            session_id: "s1".into(),
            event_type: EventType::Purchase,
            occurred_at: now,
            processed_at: now,
            correlation_id: "c1".into(),
            product: None,
            campaign_id: Some("spring".into()),
            query: None,
            recommendation_id: None,
            order: Some(ProcessedOrder {
                order_id: "o1".into(),
                amount: 19.0,
                currency: "EUR".into(),
                items: vec![ProcessedItem { product: product.clone(), quantity: 2, unit_price: 9.5 }],
                offer_decision_id: None,
            }),
            source: SourceRef { topic: "order-topic".into(), partition: 1, offset: 42 },
        };
        round_trip(&processed);
        let v = serde_json::to_value(&processed).expect("json");
        assert_eq!(v["eventType"], "purchase");
        assert_eq!(v["order"]["items"][0]["category"], "books");

        let (payload, payload_base64) = DeadLetter::encode_payload(b"\xffnot json");
        let dl = DeadLetter {
            schema_version: 1,
            dead_letter_id: "d1".into(),
            key: "u1".into(),
            source: SourceRef { topic: "user-activity-topic".into(), partition: 0, offset: 3 },
            kind: DeadLetterKind::Malformed,
            reason: "expected value".into(),
            field: None,
            attempts: 1,
            service: "event-processor".into(),
            correlation_id: None,
            payload,
            payload_base64,
            failed_at: now,
        };
        assert_eq!(dl.payload, None);
        assert_eq!(dl.original_bytes().as_deref(), Some(&b"\xffnot json"[..]));
        round_trip(&dl);

        let mut features = UserFeatures { user_id: "u1".into(), ..Default::default() };
        features.counts.add(EventType::ProductView);
        features.category_affinity.insert("books".into(), 0.5);
        round_trip(&features);
        let candidates = Candidates {
            schema_version: 1,
            user_id: "u1".into(),
            generated_at: now,
            features: RankingFeatures::from(features.clone()),
            candidates: vec![Candidate {
                product_id: "P00001".into(),
                source: CandidateSource::CoVisitation,
                source_score: 0.3,
            }],
        };
        round_trip(&candidates);
        assert_eq!(serde_json::to_value(&candidates).expect("json")["candidates"][0]["source"], "co_visitation");
        // A candidate set written before the features were cut down (the whole snapshot) reads
        // as one with what ranking uses of it.
        let mut older = serde_json::to_value(&candidates).expect("json");
        older["features"] = serde_json::to_value(&features).expect("json");
        let read: Candidates = serde_json::from_value(older).expect("an older candidate set");
        assert_eq!(read.features.category_affinity, features.category_affinity);
        assert_eq!(read, candidates);
        let ranked = RankedRecommendations {
            schema_version: 1,
            user_id: "u1".into(),
            ranked_at: now,
            model_version: "linear-v1".into(),
            model_updates: 0,
            model_weights: BTreeMap::new(),
            model_instance: String::new(),
            items: vec![RankedItem {
                item_id: "P00001".into(),
                score: 0.7,
                sources: std::iter::once(CandidateSource::Retargeting).collect(),
            }],
        };
        round_trip(&ranked);
        let offer = OfferDecision {
            schema_version: 1,
            decision_id: "d".into(),
            user_id: "u1".into(),
            decided_at: now,
            action: OfferAction::Discount10,
            propensity: 0.8,
            policy: "rules-v1".into(),
            trigger: "api".into(),
            context: BTreeMap::new(),
            explanation: "x".into(),
        };
        round_trip(&offer);
        assert_eq!(serde_json::to_value(&offer).expect("json")["action"], "DISCOUNT_10");
        for a in OfferAction::ALL {
            assert_eq!(serde_json::to_value(a).expect("json"), a.as_str());
        }
    }

    #[test]
    fn messages_are_keyed_by_user() {
        let mut g = Generator::seeded(1);
        let a = g.activity(Utc::now());
        assert_eq!(a.key(), a.user_id);
        assert_eq!(ActivityEvent::TOPIC.name(), "user-activity-topic");
        assert_eq!(OrderEvent::TOPIC, Topic::Order);
    }

    #[test]
    fn older_messages_without_schema_version_still_parse() {
        let json = r#"{"eventId":"e","userId":"u","sessionId":null,"eventType":"search",
            "productId":null,"campaignId":null,"query":"shoes","recommendationId":null,
            "timestamp":"2026-01-01T00:00:00Z"}"#;
        let a: ActivityEvent = serde_json::from_str(json).expect("parses");
        assert_eq!(a.schema_version, crate::SCHEMA_VERSION);
    }

    #[test]
    fn event_counts_by_type() {
        let mut c = EventCounts::default();
        c.add(EventType::Click);
        c.add(EventType::Click);
        c.add(EventType::Purchase);
        assert_eq!(c.get(EventType::Click), 2);
        assert_eq!(c.total(), 3);
        for t in EventType::ACTIVITY {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("teleport"), None);
    }
}
