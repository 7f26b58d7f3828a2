//! Realistic random events: a fixed population of shoppers, each with a favourite category,
//! browsing in sessions. Used by the "empty body" ingestion mode and by tests.

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use catalog::{Catalog, Product};

use crate::messages::{ActivityEvent, EventType, OrderEvent, OrderItem, ProcessedEvent, SourceRef};

/// Size of the generated shopper population (`user-0001` ..).
pub const USER_COUNT: u32 = 500;
/// Generated sessions last this long.
pub const SESSION_SECONDS: i64 = 30 * 60;

/// A processed event made by hand, with only its identity, kind and time: processed when it
/// occurred, its correlation id its event id, no product, order, campaign, query or
/// recommendation, read from the start of `processed-events-topic`. For tests, which set what
/// else they need on the value.
pub fn processed(
    event_id: &str,
    user_id: &str,
    session_id: &str,
    event_type: EventType,
    at: DateTime<Utc>,
) -> ProcessedEvent {
    ProcessedEvent {
        schema_version: crate::SCHEMA_VERSION,
        event_id: event_id.to_owned(),
        user_id: user_id.to_owned(),
        session_id: session_id.to_owned(),
        event_type,
        occurred_at: at,
        processed_at: at,
        correlation_id: event_id.to_owned(),
        product: None,
        campaign_id: None,
        query: None,
        recommendation_id: None,
        order: None,
        source: SourceRef { topic: crate::Topic::ProcessedEvents.name().to_owned(), partition: 0, offset: 0 },
    }
}

/// The id of generated shopper `n`.
pub fn user_id(n: u32) -> String {
    format!("user-{n:04}")
}

/// The favourite category of a user id: stable for the same id in every process.
pub fn favourite_category(user_id: &str) -> &'static str {
    let hash = crate::stable_hash(user_id, 0);
    let categories: Vec<_> = Catalog::demo().categories().collect();
    categories[(hash % categories.len() as u64) as usize]
}

/// A generator of realistic random events.
pub struct Generator {
    rng: StdRng,
}

impl Generator {
    pub fn seeded(seed: u64) -> Self {
        Self { rng: StdRng::seed_from_u64(seed) }
    }

    pub fn from_entropy() -> Self {
        Self { rng: StdRng::from_os_rng() }
    }

    fn user(&mut self) -> String {
        user_id(self.rng.random_range(1..=USER_COUNT))
    }

    fn session_of(user: &str, now: DateTime<Utc>) -> String {
        format!("sess-{user}-{}", now.timestamp() / SESSION_SECONDS)
    }

    /// A product the user would plausibly look at: mostly a best seller of their favourite
    /// category, sometimes anything.
    pub fn product_for(&mut self, user: &str) -> &'static Product {
        let catalog = Catalog::demo();
        if self.rng.random_bool(0.75) {
            let in_cat: Vec<_> = catalog.in_category(favourite_category(user)).collect();
            // Skewed towards the top of the category.
            let u: f64 = self.rng.random();
            let idx = ((u * u) * in_cat.len().min(60) as f64) as usize;
            in_cat[idx.min(in_cat.len() - 1)]
        } else {
            let all = catalog.products();
            &all[self.rng.random_range(0..all.len())]
        }
    }

    /// A random activity event of a random shopper.
    pub fn activity(&mut self, now: DateTime<Utc>) -> ActivityEvent {
        let user = self.user();
        let roll: f64 = self.rng.random();
        let event_type = match roll {
            r if r < 0.45 => EventType::ProductView,
            r if r < 0.60 => EventType::PageView,
            r if r < 0.75 => EventType::Click,
            r if r < 0.87 => EventType::AddToCart,
            r if r < 0.95 => EventType::Search,
            _ => EventType::RemoveFromCart,
        };
        let product = self.product_for(&user);
        let (product_id, query) = match event_type {
            EventType::PageView => (None, None),
            EventType::Search => (None, Some(product.category.to_owned())),
            _ => (Some(product.id.clone()), None),
        };
        ActivityEvent {
            schema_version: crate::SCHEMA_VERSION,
            event_id: uuid::Uuid::new_v4().to_string(),
            session_id: Some(Self::session_of(&user, now)),
            user_id: user,
            event_type,
            product_id,
            campaign_id: self.rng.random_bool(0.2).then(|| format!("campaign-{}", self.rng.random_range(1..=3))),
            query,
            recommendation_id: None,
            timestamp: now,
        }
    }

    /// A random order of a random shopper: one to three lines at catalog prices.
    pub fn order(&mut self, now: DateTime<Utc>) -> OrderEvent {
        let user = self.user();
        let lines = self.rng.random_range(1..=3);
        let items: Vec<OrderItem> = (0..lines)
            .map(|_| {
                let p = self.product_for(&user);
                OrderItem { product_id: p.id.clone(), quantity: self.rng.random_range(1..=2), unit_price: p.price }
            })
            .collect();
        let amount = items.iter().map(|i| f64::from(i.quantity) * i.unit_price).sum::<f64>();
        OrderEvent {
            schema_version: crate::SCHEMA_VERSION,
            event_id: uuid::Uuid::new_v4().to_string(),
            order_id: format!("ord-{}", uuid::Uuid::new_v4()),
            session_id: Some(Self::session_of(&user, now)),
            user_id: user,
            items,
            amount: (amount * 100.0).round() / 100.0,
            currency: "EUR".to_owned(),
            campaign_id: None,
            offer_decision_id: None,
            timestamp: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{self, Strictness};

    #[test]
    fn generated_events_pass_validation_in_stream_mode() {
        let now = Utc::now();
        let mut g = Generator::seeded(42);
        for _ in 0..500 {
            let a = g.activity(now);
            let v = serde_json::to_value(&a).expect("json");
            assert_eq!(validate::activity(&v, now, Strictness::Stream).expect("valid activity"), a);
            let o = g.order(now);
            let v = serde_json::to_value(&o).expect("json");
            assert_eq!(validate::order(&v, now, Strictness::Stream).expect("valid order"), o);
        }
    }

    #[test]
    fn shoppers_mostly_browse_their_favourite_category() {
        let mut g = Generator::seeded(3);
        let user = user_id(17);
        let fav = favourite_category(&user);
        assert_eq!(fav, favourite_category(&user));
        let hits = (0..1000).filter(|_| g.product_for(&user).category == fav).count();
        assert!(hits > 650, "{hits} of 1000 in the favourite category");
    }
}

/// A simulated shopper with a known preference, for traffic that recommendation quality can
/// be measured against.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Shopper {
    pub user_id: String,
    /// The category this shopper mostly browses and buys from.
    pub favourite_category: &'static str,
    /// Probability that a session with something in the cart ends in an order.
    pub purchase_propensity: f64,
}

impl Shopper {
    /// Shopper `n` of a simulated population whose ids start with `prefix`.
    pub fn new(prefix: &str, n: u32, rng: &mut impl Rng) -> Self {
        let user_id = format!("{prefix}-{n:04}");
        Self {
            favourite_category: favourite_category(&user_id),
            user_id,
            purchase_propensity: rng.random_range(0.1..0.6),
        }
    }
}

/// One step of a simulated session.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Activity(ActivityEvent),
    Order(OrderEvent),
}

impl Generator {
    /// A realistic session of `shopper` starting at `start`: a landing page view, three to
    /// eight product views (mostly in the favourite category, sometimes a click or a search),
    /// an add-to-cart for some of them, then an order (with probability `purchase_propensity`)
    /// or an abandoned cart. Every event passes the platform's validation.
    pub fn session(&mut self, shopper: &Shopper, start: DateTime<Utc>) -> Vec<Step> {
        let session_id = format!("sim-{}", uuid::Uuid::new_v4());
        let mut at = start;
        let mut steps = Vec::new();
        let activity = |g: &mut Self, at: DateTime<Utc>, t: EventType, product: Option<&str>, query: Option<String>| {
            Step::Activity(ActivityEvent {
                schema_version: crate::SCHEMA_VERSION,
                event_id: uuid::Uuid::new_v4().to_string(),
                user_id: shopper.user_id.clone(),
                session_id: Some(session_id.clone()),
                event_type: t,
                product_id: product.map(str::to_owned),
                campaign_id: None,
                query,
                recommendation_id: None,
                timestamp: at + chrono::Duration::milliseconds(i64::from(g.rng.random_range(0..50))),
            })
        };
        steps.push(activity(self, at, EventType::PageView, None, None));
        if self.rng.random_bool(0.3) {
            steps.push(activity(self, at, EventType::Search, None, Some(shopper.favourite_category.to_owned())));
        }
        let mut cart: Vec<&'static Product> = Vec::new();
        for _ in 0..self.rng.random_range(3..=8) {
            at += chrono::Duration::seconds(self.rng.random_range(5..60));
            let p = self.product_for(&shopper.user_id);
            steps.push(activity(self, at, EventType::ProductView, Some(&p.id), None));
            if self.rng.random_bool(0.3) {
                steps.push(activity(self, at, EventType::Click, Some(&p.id), None));
            }
            // Shoppers cart what they like: mostly their favourite category.
            let likes = p.category == shopper.favourite_category;
            if self.rng.random_bool(if likes { 0.3 } else { 0.05 }) && !cart.iter().any(|c| c.id == p.id) {
                steps.push(activity(self, at, EventType::AddToCart, Some(&p.id), None));
                cart.push(p);
            }
        }
        if !cart.is_empty() && self.rng.random_bool(shopper.purchase_propensity) {
            at += chrono::Duration::seconds(self.rng.random_range(10..120));
            let items: Vec<OrderItem> =
                cart.iter().map(|p| OrderItem { product_id: p.id.clone(), quantity: 1, unit_price: p.price }).collect();
            let amount = items.iter().map(|i| i.unit_price).sum::<f64>();
            steps.push(Step::Order(OrderEvent {
                schema_version: crate::SCHEMA_VERSION,
                event_id: uuid::Uuid::new_v4().to_string(),
                order_id: format!("ord-{}", uuid::Uuid::new_v4()),
                user_id: shopper.user_id.clone(),
                session_id: Some(session_id.clone()),
                items,
                amount: (amount * 100.0).round() / 100.0,
                currency: "EUR".to_owned(),
                campaign_id: None,
                offer_decision_id: None,
                timestamp: at,
            }));
        }
        steps
    }
}

#[cfg(test)]
mod session_tests {
    use super::*;
    use crate::validate::{self, Strictness};

    #[test]
    fn sessions_are_valid_and_follow_the_preference() {
        let mut g = Generator::seeded(11);
        let mut rng = StdRng::seed_from_u64(5);
        let shoppers: Vec<Shopper> = (1..=50).map(|n| Shopper::new("sim", n, &mut rng)).collect();
        let start = Utc::now() - chrono::Duration::hours(2);
        let (mut views, mut in_favourite, mut orders) = (0, 0, 0);
        for s in &shoppers {
            for step in g.session(s, start) {
                match step {
                    Step::Activity(a) => {
                        let v = serde_json::to_value(&a).expect("json");
                        validate::activity(&v, Utc::now(), Strictness::Stream).expect("valid activity");
                        if a.event_type == EventType::ProductView {
                            views += 1;
                            let p = Catalog::demo().get(a.product_id.as_deref().unwrap_or_default()).expect("known");
                            in_favourite += usize::from(p.category == s.favourite_category);
                        }
                    }
                    Step::Order(o) => {
                        let v = serde_json::to_value(&o).expect("json");
                        validate::order(&v, Utc::now(), Strictness::Stream).expect("valid order");
                        orders += 1;
                    }
                }
            }
        }
        assert!(views >= 150, "{views}");
        assert!(in_favourite * 100 / views > 65, "{in_favourite} of {views} views in the favourite category");
        assert!(orders > 0 && orders < shoppers.len(), "{orders} orders");
    }
}
